"""What a job's head wrote about its Ray cluster reaches the API and the dashboard only in a safe form."""

from __future__ import annotations

import pytest

from mljobs.server.queries import safe_ray_info


def test_real_addresses_pass():
    info = {"dashboard_url": "http://10.211.0.1:8265", "gcs_address": "10.211.0.1:6379", "other": 1}
    assert safe_ray_info(info) == {"dashboard_url": "http://10.211.0.1:8265", "gcs_address": "10.211.0.1:6379"}
    assert safe_ray_info({"dashboard_url": "https://[::1]:8265/", "gcs_address": "[::1]:6379"}) == {
        "dashboard_url": "https://[::1]:8265/", "gcs_address": "[::1]:6379"}


@pytest.mark.parametrize("url", ["javascript:alert(1)", "JAVASCRIPT:alert(1)", "data:text/html,<script>x</script>",
                                 'http://x" onmouseover="alert(1)', "http://a b", "//evil.example", 42, None])
def test_anything_a_browser_could_run_or_a_client_trip_on_is_dropped(url):
    assert safe_ray_info({"dashboard_url": url, "gcs_address": "h:1"})["dashboard_url"] is None


@pytest.mark.parametrize("info", [None, [], "http://x", 7, {"gcs_address": "no port"}])
def test_not_a_dict_or_no_port_gives_nothing(info):
    assert safe_ray_info(info)["gcs_address"] is None
