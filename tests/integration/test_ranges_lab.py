"""Published address ranges: an address of a blocked service that the run never resolved.

Under `no_egress("github.com")` the fence learns github.com's addresses (the lab's
10.77.1.1) but not api.github.com's (10.77.1.2): nothing resolved that name. A
ranges file (GitHub's meta, committed beside the tests) covers it, so a
hard-coded `curl http://10.77.1.2/` is refused at connect, and the event's rule
names the file and where in it the range is. Under `egress_only` a range allows.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers_net import connections

from pytest_depfence import Fence, Policy

if TYPE_CHECKING:
    from pytest_depfence.lab import Lab

if not shutil.which("curl"):
    pytest.skip("these tests need curl (apt-get install curl)", allow_module_level=True)

API = "10.77.1.2"  # api.github.com in the lab
API6 = "fd77::1:2"
OpenFence = Callable[..., Fence]
META = Path(__file__).parent / "data" / "lab-meta.json"


def _curl(address: str) -> list[str]:
    host = f"[{address}]" if ":" in address else address
    return ["curl", "-g", "-sS", "--max-time", "10", f"http://{host}/"]


def _served(lab: Lab, address: str) -> list[str]:
    return [path for where, _, path in lab.http_log() if where == address]


@pytest.fixture
def open_fence(fences: Callable[..., Fence]) -> OpenFence:
    """`open_fence(policy, **kwargs)`: a library fence in the lab, closed at teardown."""
    return lambda policy, **kwargs: fences(policy, label="ranges", **kwargs)


def test_without_ranges_an_unresolved_address_of_a_blocked_service_gets_through(
    open_fence: OpenFence, lab: Lab
) -> None:
    """The gap the ranges close: api.github.com's address was never learned."""
    fence = open_fence(Policy.no_egress("github.com"))
    lab.clear_http_log()
    result = fence.run(_curl(API), check=False, timeout=30)

    assert result.returncode == 0, result.stderr
    assert _served(lab, API) == ["/"]
    assert result.violations == []


@pytest.mark.parametrize("address", [API, API6], ids=["ipv4", "ipv6"])
def test_a_text_ranges_file_blocks_an_address_never_resolved(
    open_fence: OpenFence, lab: Lab, tmp_path: Path, address: str
) -> None:
    ranges = tmp_path / "github-ranges.txt"
    ranges.write_text(
        "# GitHub's api ranges, committed\n\n140.82.112.0/20\n10.77.1.0/24  # api\nfd77::1:0/112\n"
    )
    fence = open_fence(Policy.no_egress("github.com"), ranges=[str(ranges)])
    lab.clear_http_log()
    argv = _curl(address)
    result = fence.run(argv, check=False, timeout=30)

    assert result.returncode == 7, result.stderr  # curl: could not connect
    assert _served(lab, address) == []
    (event,) = [e for e in connections(result) if e.address == address]
    assert (event.verdict, event.blocked_at, event.forbidden) == ("blocked", "connect", True)
    assert event.cmdline == shlex.join(argv)
    line = 4 if address == API else 5
    network = "10.77.1.0/24" if address == API else "fd77::1:0/112"
    assert event.rule == f'no_egress("{network}") [ranges file {ranges}:{line}]'
    assert event.learned_from == "rule"
    assert result.domains == []  # nothing was resolved: the range alone refused it


@pytest.mark.no_egress("github.com")
@pytest.mark.fence(ranges="data/lab-meta.json")
def test_the_marker_form_names_the_json_key_path(fenced: Fence, lab: Lab) -> None:
    lab.clear_http_log()
    result = fenced.run(_curl(API), check=False, timeout=30)

    assert result.returncode == 7, result.stderr
    assert _served(lab, API) == []
    (event,) = result.violations
    assert event.address == API and event.blocked_at == "connect"
    assert event.rule is not None
    assert event.rule.startswith('no_egress("10.77.1.2/32") [ranges file ')
    assert event.rule.endswith('lab-meta.json ["api"][2]]')
    assert "ranges from" in fenced.policy.describe()


def test_under_egress_only_a_range_allows(open_fence: OpenFence, lab: Lab) -> None:
    fence = open_fence(Policy.egress_only("mirror.internal"), ranges=str(META))
    lab.clear_http_log()
    allowed = fence.run(_curl(API), check=False, timeout=30)
    refused = fence.run(_curl(lab.address("mirror.internal")), check=False, timeout=30)

    assert allowed.returncode == 0, allowed.stderr
    assert _served(lab, API) == ["/"]
    assert allowed.violations == []
    # An address no range and no allowed answer covers is still refused (never resolved).
    assert refused.returncode == 7
    (event,) = refused.violations
    assert event.rule is not None and "ranges from" in event.rule


def test_a_large_ranges_file_is_judged_in_the_kernel(
    open_fence: OpenFence, lab: Lab, tmp_path: Path
) -> None:
    """5,000 ranges (GitHub's meta is about that size) go to the kernel at open, the
    lab's api.github.com last: refused at connect, named by its line. What the ranges
    cost a fence is measured by bench/bench_ranges.py, not here."""
    ranges = tmp_path / "meta.txt"
    ranges.write_text(
        "".join(f"20.{i // 256}.{i % 256}.0/24\n" for i in range(4800))
        + "".join(f"2a01:111:f{i:03x}::/48\n" for i in range(199))
        + f"{API}\n"
    )
    fence = open_fence(Policy.no_egress("github.com"), ranges=[str(ranges)])
    lab.clear_http_log()

    refused = fence.run(_curl(API), check=False, timeout=30)

    assert refused.returncode == 7, refused.stderr
    assert _served(lab, API) == []
    (event,) = refused.violations
    assert event.blocked_at == "connect" and event.rule is not None
    assert event.rule.endswith("meta.txt:5000]"), event.rule


def test_depfence_run_ranges_flag(lab: Lab, clean_env: None, tmp_path: Path) -> None:
    (tmp_path / "api.txt").write_text("10.77.1.2\n")
    argv = [sys.executable, "-m", "pytest_depfence.cli", "run", "--upstream", lab.upstream]
    argv += ["--no-egress", "github.com", "--ranges", "api.txt", "--json", "out.json"]
    argv += ["--", *_curl(API)]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL
    )

    assert proc.returncode == 7, proc.stderr  # curl's own failure, never masked
    assert "blockedAt=connect" in proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["policy"] == 'no_egress("github.com") + ranges from api.txt (1)'
    rules = [e["rule"] for e in report["events"] if e["address"] == API]
    assert rules == ['no_egress("10.77.1.2") [ranges file api.txt:1]'], report["events"]
