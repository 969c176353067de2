"""A tokenless call gets the local admin only when it names a loopback host (no DNS rebinding)."""

from __future__ import annotations

import pytest

from mljobs.errors import AuthenticationError
from mljobs.server.auth import Authenticator, host_name
from mljobs.server.store import Store


@pytest.fixture
def auth(tmp_path):
    store = Store.sqlite(tmp_path / "db.sqlite")
    store.migrate()
    yield Authenticator(store, loopback=True)
    store.close()


@pytest.mark.parametrize("host", [None, "127.0.0.1:8080", "localhost:8080", "localhost", "[::1]:8080", "127.0.0.2"])
def test_loopback_hosts_get_the_local_admin(auth, host):
    assert auth.authenticate(None, host).admin


@pytest.mark.parametrize("host", ["evil.example:8080", "evil.example", "10.0.0.5:8080", "[2001:db8::1]:80",
                                  "127.0.0.1.evil.example"])
def test_other_hosts_are_refused_naming_the_host(auth, host):
    with pytest.raises(AuthenticationError, match=rf"Host '{host.replace('[', '.').replace(']', '.')}'"):
        auth.authenticate(None, host)


def test_host_name_strips_the_port():
    assert [host_name(h) for h in ["[::1]:80", "a:8080", "a", "::1", "[::1]"]] == ["::1", "a", "a", "::1", "::1"]
