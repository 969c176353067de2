"""The typed REST API: malformed input is a 4xx naming the field, never a 5xx, and changes
nothing; uploads have a cap; submits are idempotent; logs stream with keep-alives."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

import mljobs
from mljobs import logformat
from mljobs.client.job import MLJob
from mljobs.client.session import Session
from mljobs.stages import tar_bytes as _tar
from tests.conftest import ServerProc, assert_no_leftovers

SPEC = {"compute_pool": "DEFAULT_POOL", "stage_name": "api_stage", "payload_kind": "file", "entrypoint": ["m.py"]}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A server with a small payload cap and fast log keep-alives, and a plain user's client."""
    home = tmp_path_factory.mktemp("mlh")
    srv = ServerProc(home, extra_env={"MLJOBS_MAX_PAYLOAD_MB": "1", "MLJOBS_LOG_KEEPALIVE_S": "0.5"})
    srv.start()
    admin = httpx.post(srv.url + "/api/v1/users", json={"name": "root", "admin": True}).json()["token"]
    token = httpx.post(srv.url + "/api/v1/users", json={"name": "tester"},
                       headers={"authorization": f"Bearer {admin}"}).json()["token"]
    client = httpx.Client(base_url=srv.url + "/api/v1", headers={"authorization": f"Bearer {token}"}, timeout=60)
    yield srv, client, token
    client.close()
    httpx.post(srv.url + "/api/v1/server/shutdown", headers={"authorization": f"Bearer {admin}"}, timeout=30)
    srv.proc.wait(60)
    assert_no_leftovers(home)


def _submit(client: httpx.Client, spec, payload: bytes | None = None, key: str | None = None) -> httpx.Response:
    files = {"payload": ("p.tar", payload, "application/x-tar")} if payload is not None else None
    headers = {"Idempotency-Key": key} if key else {}
    return client.post("/jobs", data={"spec": spec if isinstance(spec, str) else json.dumps(spec)}, files=files,
                       headers=headers)


@pytest.mark.parametrize("bad, field", [
    ({"payload_kind": "bogus"}, "payload_kind"),
    ({"env_vars": ["A=1"]}, "env_vars"),
    ({"args": "abc"}, "args"),
    ({"pip_requirements": "humanize"}, "pip_requirements"),
    ({"target_instances": "many"}, "target_instances"),
    ({"surprise": 1}, "surprise"),
])
def test_malformed_spec_is_422_naming_the_field(api, bad, field):
    srv, client, _ = api
    resp = _submit(client, {**SPEC, **bad}, _tar({"m.py": b""}))
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["error"] == "InvalidArgumentError" and f"spec.{field}" in body["message"]
    assert any(err["loc"][:3] == ["body", "spec", field] for err in body["detail"])
    assert client.get("/jobs", params={"limit": 0}).json() == []  # nothing was made


def test_spec_that_is_not_an_object_and_garbage_payload(api):
    srv, client, _ = api
    assert _submit(client, "[1, 2]", _tar({"m.py": b""})).status_code == 422
    assert _submit(client, "{not json", _tar({"m.py": b""})).status_code == 422
    resp = _submit(client, SPEC, b"this is no tar archive")
    assert resp.status_code == 400 and "tar archive" in resp.json()["detail"]
    assert client.get("/jobs", params={"limit": 0}).json() == []
    # the SDK says the same as an exception naming the field
    with pytest.raises(mljobs.InvalidArgumentError, match="spec.args"):
        Session(url=srv.url, token=client.headers["authorization"][7:]).request(
            "POST", "/jobs", data={"spec": json.dumps({**SPEC, "args": "abc"})})


def test_idempotent_submit(api):
    srv, client, _ = api
    payload = _tar({"m.py": b"__return__ = 7\n"})
    first = _submit(client, SPEC, payload, key="k-123")
    again = _submit(client, SPEC, payload, key="k-123")
    assert first.status_code == again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = _submit(client, SPEC, payload, key="k-456")
    assert other.json()["id"] != first.json()["id"]
    ids = {j["id"] for j in client.get("/jobs", params={"limit": 0}).json()}
    assert ids == {first.json()["id"], other.json()["id"]}
    for job_id in ids:
        client.get(f"/jobs/{job_id}/wait", params={"timeout": 60})
        assert client.delete(f"/jobs/{job_id}").status_code == 200


def test_upload_caps_and_stage_folder_get(api):
    srv, client, _ = api
    big = b"x" * (2 << 20)  # the cap is 1 MiB
    resp = client.put("/stages/capped/files/big.bin", content=big)
    assert resp.status_code == 413 and "MLJOBS_MAX_PAYLOAD_MB" in resp.json()["detail"]

    def chunked():  # no Content-Length: the cap holds while streaming, and the partial file goes
        for _ in range(4):
            yield b"y" * (512 << 10)

    resp = client.put("/stages/capped/files/big.bin", content=chunked())
    assert resp.status_code == 413
    listed = client.get("/stages/capped/list").json()
    assert listed == []
    assert _submit(client, SPEC, _tar({"m.py": b"", "data.bin": big})).status_code == 413
    assert client.get("/jobs", params={"limit": 0}).json() == []
    # a stage file streams back; a folder is a clear 400
    assert client.put("/stages/capped/files/dir/a.txt", content=b"hello").json() == {"name": "dir/a.txt", "size": 5}
    assert client.get("/stages/capped/files/dir/a.txt").content == b"hello"
    resp = client.get("/stages/capped/files/dir")
    assert resp.status_code == 400 and "is a folder" in resp.json()["detail"]


def test_log_follow_sends_keepalives_that_clients_drop(api):
    srv, client, token = api
    script = b"import time\nprint('start', flush=True)\ntime.sleep(2)\nprint('end', flush=True)\n"
    job_id = _submit(client, SPEC, _tar({"m.py": script})).json()["id"]
    raw = []
    with client.stream("GET", f"/jobs/{job_id}/logs", params={"follow": True}) as resp:
        raw = list(resp.iter_lines())
    assert raw[0] == "start" and raw[-1] == "end"
    assert raw.count(logformat.KEEPALIVE) >= 2  # two quiet seconds, keep-alives every 0.5 s
    job = MLJob(job_id, Session(url=srv.url, token=token))
    assert list(job.stream_logs()) == ["start", "end"]
    assert client.delete(f"/jobs/{job_id}").status_code == 200


def test_client_gives_up_on_a_dead_log_stream(monkeypatch):
    """A server that answers and then says nothing: the client raises instead of hanging."""
    monkeypatch.setattr(logformat, "KEEPALIVE_S", 0.2)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    conns = []

    def serve() -> None:
        conn, _ = listener.accept()
        conns.append(conn)
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    job = MLJob("MLJOB_00000000_0000_0000_0000_000000000000",
                Session(url=f"http://127.0.0.1:{listener.getsockname()[1]}"))
    started = time.monotonic()
    with pytest.raises(mljobs.ServerUnavailableError, match="went silent"):
        list(job.stream_logs())
    assert time.monotonic() - started < 10
    t.join(5)
    for c in conns:
        c.close()
    listener.close()


def test_no_input_makes_a_server_error(api):
    """Schemathesis against the live server, as a plain user, with inputs that fit the schema and
    inputs that break it: every answer is below 500."""
    srv, client, token = api
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
    auth = {"authorization": f"Bearer {token}"}
    examples, errors, operations = 0, [], 0
    for result in schema.get_all_operations():
        op = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.generate])
            def call(case) -> None:
                nonlocal examples
                examples += 1
                resp = case.call(base_url=srv.url, headers=auth, timeout=30)
                if resp.status_code >= 500:
                    errors.append(f"{case.method} {case.formatted_path} {case.body!r:.200} -> {resp.status_code} "
                                  f"{resp.text[:300]}")

            try:
                call()
            except Unsatisfiable:  # an operation with no input to break (GET /health): nothing negative to send
                assert mode is GenerationMode.NEGATIVE, op.label
    print(f"schemathesis: {examples} examples over {operations} operations, {len(errors)} server error(s)")
    assert operations >= 25 and examples >= 300
    assert not errors, "\n".join(errors[:10])


def test_tokenless_calls_naming_another_host_get_no_data(sqlite_server):
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 sends Host: evil.example."""
    url = sqlite_server.url
    rebound = {"host": "evil.example:" + url.rsplit(":", 1)[1]}
    r = httpx.get(url + "/api/v1/jobs", headers=rebound, timeout=30)
    assert r.status_code == 401 and "Host 'evil.example:" in r.json()["detail"], r.text
    r = httpx.post(url + "/api/v1/pools", json={"name": "P", "instance_family": "CPU_X64_XS"}, headers=rebound,
                   timeout=30)
    assert r.status_code == 401
    page = httpx.get(url + "/", headers=rebound, timeout=30)
    assert page.status_code == 401 and "DEFAULT_POOL" not in page.text and 'name="token"' in page.text
    assert httpx.get(url + "/api/v1/jobs", timeout=30).status_code == 200  # 127.0.0.1 itself still works
    assert [p["name"] for p in httpx.get(url + "/api/v1/pools", timeout=30).json()] == ["DEFAULT_POOL"]


def test_the_long_poll_answers_when_the_job_ends_by_id_and_by_name(api):
    """The wait reads only the job's row at each look, and the whole job (its instances) for its
    answer; by id it listens before its first read, by name once the name is resolved. A missed
    wake-up would answer at the timeout with the job still running."""
    srv, client, _ = api
    script = b"import time\ntime.sleep(1.5)\n__return__ = 1\n"
    named = _submit(client, {**SPEC, "name": "long_poll_by_name"}, _tar({"m.py": script})).json()
    assert named["status"] == "PENDING" and named["instances"] == []  # as recorded, not read back
    body = client.get("/jobs/long_poll_by_name/wait", params={"timeout": 30}, timeout=60).json()
    assert body["id"] == named["id"] and body["status"] == "DONE", body
    assert [i["status"] for i in body["instances"]] == ["EXITED"], body
    by_id = _submit(client, SPEC, _tar({"m.py": script})).json()["id"]
    body = client.get(f"/jobs/{by_id}/wait", params={"timeout": 30}, timeout=60).json()
    assert body["id"] == by_id and body["status"] == "DONE", body
    assert [i["status"] for i in body["instances"]] == ["EXITED"], body
    from mljobs.spec import new_job_id

    missing = client.get(f"/jobs/{new_job_id()}/wait", params={"timeout": 1})
    assert missing.status_code == 404 and "does not exist" in missing.text
    assert client.get("/jobs/no_such_name/wait", params={"timeout": 1}).status_code == 404
    for job_id in (by_id, named["id"]):
        assert client.delete(f"/jobs/{job_id}").status_code == 200
