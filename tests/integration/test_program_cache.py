"""The program cache (kernel/progcache.py): a later process loads what the first compiled,
and fences the same; a cache that is damaged, foreign or does not load is compiled again.

Each case runs fresh processes with DEPFENCE_PROGRAM_CACHE set to a directory of the
test's own. Each builds a fence in the lab (no_egress github.com) and sends two real
queries: dig through the proxy (judged by name there; the command line comes from the
process records of procs.c's raw tracepoints), and dig past the proxy to the lab
resolver's second port, judged by bypass.c in the packet with the name hash, whose
multiplier is this process's own, written into the loaded programs' map.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers_net import skip_or_fail

from pytest_depfence.errors import FenceUnavailable
from pytest_depfence.kernel import progcache, toolkit

if os.geteuid() != 0:
    pytest.skip("loading the programs needs root", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("lab", "clean_env")

CHILD = """
import json, sys
from pytest_depfence import Fence, Policy
from pytest_depfence.errors import FenceUnavailable
from pytest_depfence.kernel import programs
TABLES = sys.argv[2:]
try:
    fence = Fence(Policy.no_egress("github.com"), upstream=sys.argv[1]).open()
except FenceUnavailable as exc:
    print(json.dumps({"unavailable": exc.reason}))
    raise SystemExit(0)
dig = ["dig", "+time=2", "+tries=1", "+notcp"]
with fence:
    proxied = fence.run([*dig, "GitHub.com"], check=False, timeout=30)
    past = fence.run([*dig, "@10.77.0.53", "-p", "5300", "API.github.COM"], check=False, timeout=30)
loaded = programs.load()
lib = sys.modules["bcc.libbcc"].lib
bpf = loaded._bpf
print(json.dumps({
    "built": loaded.built,
    "functions": lib.bpf_num_functions(bpf.module),
    "tables": {name: [lib.bpf_table_key_desc(bpf.module, name.encode()).decode(),
                      lib.bpf_table_leaf_desc(bpf.module, name.encode()).decode()]
               for name in TABLES},
    "tracepoints": sorted(tp.decode() for tp in loaded._bpf.raw_tracepoint_fds),
    "proxied": [proxied.returncode,
                [(e.domain, e.blocked_at, e.cmdline) for e in proxied.violations]],
    "past": [past.returncode, [(e.domain, e.blocked_at, e.cmdline) for e in past.violations]],
}))
"""


def child(pytestconfig: pytest.Config, upstream: str, cache: Path) -> dict[str, Any]:
    env = {**os.environ, progcache.CACHE_ENV: str(cache)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, upstream, *TABLES],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    said: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    if "unavailable" in said:
        skip_or_fail(pytestconfig, FenceUnavailable(said["unavailable"]))
    return said


#: Tables whose key and leaf types are compared (every kind: hash, LRU, LPM trie, arrays,
#: ring buffers, and the multiplier's).
TABLES = ["fences", "sockets", "dnsflows", "procs", "addrs", "names", "conn_events",
          "bypass_scratch", "abi_check", "name_hash_mul"]  # fmt: skip


@pytest.fixture(scope="module")
def seed(
    pytestconfig: pytest.Config, lab: Any, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Path]:
    """A first process with an empty cache: what it said, and the file it left (each
    test copies it: a compile is ~0.6 s here, ~40 s in an emulated VM lane)."""
    cache = tmp_path_factory.mktemp("seed") / "cache"
    said = child(pytestconfig, lab.upstream, cache)
    if said["built"].endswith("not cached: a program is not one the cache can load"):
        pytest.skip("without BTF three tracepoints are classic ones: this kernel always compiles")
    return said, the_file(cache)


def seeded(seed: tuple[dict[str, Any], Path], tmp_path: Path) -> Path:
    """A cache of this test's own holding the seed's file; that file's path."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    copy = cache / seed[1].name
    shutil.copy2(seed[1], copy)
    return copy


def fenced_the_same(said: dict[str, Any]) -> None:
    """Both queries refused, each reported by name with the command that sent it."""
    code, violations = said["proxied"]
    assert code == 0  # the proxy answers with the outage (NXDOMAIN)
    assert [(d, at) for d, at, _ in violations] == [("github.com", "dns")]
    assert violations[0][2].startswith("dig +time=2 +tries=1 +notcp GitHub.com")
    code, violations = said["past"]
    assert code == 9  # no answer: the kernel dropped the query
    assert [(d, at) for d, at, _ in violations] == [("api.github.com", "packet")]
    assert "@10.77.0.53 -p 5300 API.github.COM" in violations[0][2]


def the_file(cache: Path) -> Path:
    (found,) = cache.glob("programs-*")
    return found


def test_a_later_process_loads_what_the_first_compiled_and_fences_the_same(
    pytestconfig: pytest.Config, lab: Any, seed: tuple[dict[str, Any], Path]
) -> None:
    first, stored = seed
    assert first["built"] == f"compiled: nothing was cached for these programs; cached at {stored}"
    assert stat.S_IMODE(stored.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    fenced_the_same(first)

    second = child(pytestconfig, lab.upstream, stored.parent)
    assert second["built"] == f"loaded from {stored}"
    assert second["functions"] == 0  # bcc compiled the maps alone
    assert first["functions"] > len(toolkit.ATTACH_TYPES)
    assert second["tables"] == first["tables"]  # bcc's tables decode by these
    assert second["tracepoints"] == first["tracepoints"]
    assert {"sys_enter", "sys_exit", "sched_process_exit"} <= set(second["tracepoints"])
    fenced_the_same(second)
    assert the_file(stored.parent) == stored


def rewrite(path: Path, change: Any) -> None:
    """Change the cached record with `change(record)` and checksum it again."""
    body = json.loads(path.read_bytes().partition(b"\n")[2])
    change(body)
    raw = json.dumps(body, sort_keys=True).encode()
    path.write_bytes(hashlib.sha256(raw).hexdigest().encode() + b"\n" + raw)


def test_a_damaged_file_is_compiled_again_and_replaced(
    pytestconfig: pytest.Config, lab: Any, seed: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    stored = seeded(seed, tmp_path)
    raw = bytearray(stored.read_bytes())
    raw[len(raw) // 2] ^= 0x04  # a bit inside the instructions' text: the checksum fails
    stored.write_bytes(bytes(raw))

    again = child(pytestconfig, lab.upstream, stored.parent)
    assert again["built"] == f"compiled: {stored} was damaged; cached at {stored}"
    fenced_the_same(again)
    assert stored.read_bytes() == seed[1].read_bytes()  # the same programs, whole again


def test_programs_the_kernel_refuses_are_removed_and_compiled(
    pytestconfig: pytest.Config, lab: Any, seed: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    """A checksummed file whose egress program the verifier refuses (it reads r0 before
    setting it) is not half loaded: the maps, the programs and the tracepoints loaded
    so far are let go, the file removed, and the compiled programs fence."""
    stored = seeded(seed, tmp_path)

    def break_egress(record: dict[str, Any]) -> None:
        (egress,) = (p for p in record["programs"] if p["name"] == "egress")
        egress["insns"] = "lQAAAAAAAAA="  # exit, with r0 never set
        egress["maps"] = []

    rewrite(stored, break_egress)
    again = child(pytestconfig, lab.upstream, stored.parent)
    assert again["built"].startswith("compiled: the cached programs did not load ("), again
    assert "egress" in again["built"]
    assert again["built"].endswith(f"; cached at {stored}")
    fenced_the_same(again)


def test_a_file_others_may_write_is_not_loaded(
    pytestconfig: pytest.Config, lab: Any, seed: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    stored = seeded(seed, tmp_path)
    cache = stored.parent
    stored.chmod(0o666)
    again = child(pytestconfig, lab.upstream, cache)
    assert again["built"].startswith(f"compiled: the cache is not used ({stored} is not this")
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600  # replaced by a file of its own

    cache.chmod(0o777)
    shared = child(pytestconfig, lab.upstream, cache)
    assert shared["built"].startswith(f"compiled: the cache is not used ({cache} is not this")
    assert "; not cached (" in shared["built"]
    fenced_the_same(shared)


def test_maps_that_come_out_unlike_the_compiled_ones_are_not_used(
    pytestconfig: pytest.Config, lab: Any, seed: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    """The maps-alone compile must give every table the key and leaf types of the full
    compile (bcc's tables decode entries by them): a file that says otherwise is not
    loaded, whatever its programs."""
    stored = seeded(seed, tmp_path)

    def another_leaf(record: dict[str, Any]) -> None:
        record["tables"]["fences"][1] = '"unsigned long long"'

    rewrite(stored, another_leaf)
    again = child(pytestconfig, lab.upstream, stored.parent)
    assert again["built"] == (
        "compiled: the cached programs did not load (the maps alone differ from the "
        f"compiled ones: fences); cached at {stored}"
    )
    fenced_the_same(again)


def test_a_fifo_in_the_files_place_is_no_wait(
    pytestconfig: pytest.Config, lab: Any, seed: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    """A FIFO where the file goes (made by a fenced root process, say) would keep an open
    for reading waiting for a writer: the first fence of every later process would hang."""
    stored = seeded(seed, tmp_path)
    stored.unlink()
    os.mkfifo(stored, 0o600)
    again = child(pytestconfig, lab.upstream, stored.parent)
    assert again["built"].startswith(f"compiled: the cache is not used ({stored} is not a regular")
    assert stored.is_file() and stat.S_IMODE(stored.stat().st_mode) == 0o600  # replaced
    fenced_the_same(again)
