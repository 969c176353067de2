"""The name @remote registers a function under (mljobs.client.definitions.remote_name): the same
for the same content, another for an edited function, a changed global, other options or imports."""

from __future__ import annotations

import sys

from mljobs.client import payload as pl
from mljobs.client.definitions import remote_name
from mljobs.server.definitions import _REMOTE_HASH, _remote_family, is_remote
from mljobs.spec import REMOTE_PREFIX, JobSpec, PayloadKind

SCALE = 2


def scaled(x: int) -> int:
    return x * SCALE


def _name(fn, imports=None, **opts) -> str:
    spec = JobSpec(compute_pool="P", stage_name="S", payload_kind=PayloadKind.FUNCTION, entrypoint=[fn.__qualname__],
                   **opts)
    return remote_name(fn, pl.pickle_call(fn, (), {}), spec, [{"name": "x"}], imports)


def test_the_name_follows_the_content(monkeypatch, tmp_path):
    first = _name(scaled)
    assert first == _name(scaled)  # the same function, pickled again
    assert first.startswith(f"{REMOTE_PREFIX}SCALED_") and is_remote(first) and is_remote(first.lower())
    assert _REMOTE_HASH.fullmatch(first[len(_remote_family(first)):])
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 3)  # a global the function reads
    assert _name(scaled) != first
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 2)
    assert _name(scaled) == first
    assert _name(scaled, pip_requirements=["humanize"]) != first  # its options are part of it
    helper = tmp_path / "helper_mod.py"
    helper.write_text("A = 1\n")
    with_import = _name(scaled, imports=[str(helper)])
    assert with_import != first
    helper.write_text("A = 22\n")  # an imported file's content, not just its name
    assert _name(scaled, imports=[str(helper)]) != with_import
    family = _remote_family(first)
    assert family.startswith(f"{REMOTE_PREFIX}SCALED_") and len(family) == len(f"{REMOTE_PREFIX}SCALED_") + 9

    def scaled_elsewhere(x: int) -> int:  # another function of the same name: a family of its own
        return x
    scaled_elsewhere.__name__ = "scaled"
    assert _remote_family(_name(scaled_elsewhere)) != family

