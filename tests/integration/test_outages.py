"""Outage simulation: what a script meets when a blocked dependency is down, and what is recorded.

`@pytest.mark.fence(outage=...)` decides what a blocked name looks like to
the script: a DNS answer (nxdomain, servfail, refused), no answer at all
(timeout), or a name that resolves and whose host refuses connections at once
(reset) or swallows every packet (blackhole). Each test runs a client that
shows what it met (dig's status, getent's and curl's exit codes, the errno
and time of a python connect()) and checks that every event records the mode,
the domain and the exact command line.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers_net import DIG, client_argv, connections

from pytest_depfence import EgressViolation

if TYPE_CHECKING:
    from pytest_depfence import EgressEvent, Fence, FenceResult
    from pytest_depfence.lab import Lab

if os.geteuid() != 0:
    pytest.skip("fenced clients need root (cgroups, eBPF)", allow_module_level=True)
_missing = [t for t in ("curl", "dig", "getent") if not shutil.which(t)]
if _missing:
    pytest.skip(
        f"these tests need {', '.join(_missing)} (apt-get install curl dnsutils libc-bin)",
        allow_module_level=True,
    )

NO_GITHUB = pytest.mark.no_egress("github.com")
GITHUB = ("10.77.1.1", "fd77::1:1")
#: A refused connect must fail at once; the issue wants 100 ms, this bound is generous.
AT_ONCE = 0.5


def dns_violations(result: FenceResult, argv: list[str], outage: str) -> list[EgressEvent]:
    """The github.com queries, each checked for domain, outage and command line."""
    events = [e for e in result.violations if e.address is None]
    assert events, f"no github.com query recorded; events: {result.events}"
    for event in events:
        assert (event.domain, event.outage, event.forbidden) == ("github.com", outage, True)
        assert event.cmdline == shlex.join(argv)
        assert event.rule is not None and event.rule.startswith('no_egress("github.com")')
    return events


def github_connections(
    result: FenceResult, argv: list[str], outage: str, blocked_at: str
) -> list[EgressEvent]:
    """The tcp connections to github.com's addresses, each checked like `dns_violations`."""
    events = connections(result)
    assert events, f"no tcp connection recorded; events: {result.events}"
    for event in events:
        assert event.address in GITHUB
        assert (event.domain, event.port) == ("github.com", 80)
        # Learned when the fence opened, and again from the answer the script got.
        assert event.learned_from in ("upstream", "upstream, dns")
        assert (event.verdict, event.blocked_at, event.outage) == ("blocked", blocked_at, outage)
        assert event.cmdline == shlex.join(argv)
    return events


def served_github(lab: Lab) -> list[str]:
    return [path for where, _, path in lab.http_log() if where in GITHUB]


# --------------------------------------------------------------------------- DNS answers


@NO_GITHUB
@pytest.mark.parametrize(
    ("outage", "status"),
    [
        pytest.param("nxdomain", "NXDOMAIN", id="default"),  # no fence marker: the default
        pytest.param("nxdomain", "NXDOMAIN", marks=pytest.mark.fence(outage="nxdomain")),
        pytest.param("servfail", "SERVFAIL", marks=pytest.mark.fence(outage="servfail")),
        pytest.param("refused", "REFUSED", marks=pytest.mark.fence(outage="refused")),
    ],
)
def test_dns_outage_is_the_status_dig_sees(fenced: Fence, outage: str, status: str) -> None:
    argv = [*DIG, "github.com"]
    result = fenced.run(argv, check=False, timeout=30)

    assert result.returncode == 0, result.stdout  # dig got an answer: the outage's rcode
    assert f"status: {status}," in result.stdout
    assert "10.77.1.1" not in result.stdout
    (event,) = dns_violations(result, argv, outage)
    assert (event.verdict, event.blocked_at, event.qtype) == ("blocked", "dns", "A")


@NO_GITHUB
def test_nxdomain_makes_getent_report_not_found(fenced: Fence) -> None:
    argv = ["getent", "hosts", "github.com"]
    result = fenced.run(argv, check=False, timeout=30)

    assert (result.returncode, result.stdout) == (2, "")  # getent: key not found
    events = dns_violations(result, argv, "nxdomain")
    assert {e.qtype for e in events} <= {"A", "AAAA"}
    assert {(e.verdict, e.blocked_at) for e in events} == {("blocked", "dns")}


@NO_GITHUB
@pytest.mark.fence(outage="timeout")
def test_timeout_outage_leaves_the_query_unanswered(fenced: Fence) -> None:
    argv = ["dig", "@10.77.0.53", "+tries=1", "+timeout=1", "github.com"]
    result = fenced.run(argv, check=False, timeout=30)

    # dig waited its own timeout: nothing was sent back (no answer, no refusal: those
    # read "status:" and "connection refused"). Its timer, not a wall-clock bound.
    assert result.returncode == 9, result.stdout  # dig: no reply from any server
    assert "timed out" in result.stdout
    assert "status:" not in result.stdout and "connection refused" not in result.stdout
    (event,) = dns_violations(result, argv, "timeout")
    assert (event.verdict, event.blocked_at) == ("blocked", "dns")


@pytest.mark.no_egress("*.githubusercontent.com")
@pytest.mark.parametrize(
    ("outage", "status"),
    [
        pytest.param("nxdomain", "NXDOMAIN"),
        pytest.param("servfail", "SERVFAIL", marks=pytest.mark.fence(outage="servfail")),
        pytest.param("refused", "REFUSED", marks=pytest.mark.fence(outage="refused")),
    ],
)
def test_cname_to_a_blocked_name_gets_the_outage_answer(
    fenced: Fence, outage: str, status: str
) -> None:
    argv = [*DIG, "downloads.mirror.internal"]
    result = fenced.run(argv, check=False, timeout=30)

    assert f"status: {status}," in result.stdout
    assert "objects.githubusercontent.com" not in result.stdout
    (event,) = result.violations
    assert (event.domain, event.outage, event.blocked_at) == (
        "downloads.mirror.internal",
        outage,
        "dns",
    )
    assert event.rule is not None
    assert event.rule.endswith("via CNAME objects.githubusercontent.com")
    assert event.cmdline == shlex.join(argv)


# --------------------------------------------------------------------------- connections


@NO_GITHUB
@pytest.mark.fence(outage="reset")
def test_reset_outage_refuses_connections_at_once(fenced: Fence, lab: Lab) -> None:
    argv = ["curl", "-sS", "-w", "%{time_total}", "http://github.com/"]
    lab.clear_http_log()
    result = fenced.run(argv, check=False, timeout=30)

    assert result.returncode == 7, result.stderr  # curl: could not connect
    seconds = float(result.stdout)
    print(f"\ncurl met outage reset after {seconds * 1e3:.1f} ms")
    assert seconds < AT_ONCE
    assert served_github(lab) == []
    # The name resolved (that is the point of reset), but the lookup is still forbidden.
    lookups = dns_violations(result, argv, "reset")
    assert {(e.verdict, e.blocked_at) for e in lookups} == {("allowed", None)}
    github_connections(result, argv, "reset", "connect")


@NO_GITHUB
@pytest.mark.fence(outage="reset")
def test_reset_outage_is_econnrefused_for_a_python_client(fenced: Fence, tmp_path: Path) -> None:
    argv = client_argv(tmp_path, "github.com")
    result = fenced.run(argv, check=False, timeout=30)

    out = json.loads(result.stdout)
    assert out["address"] == "10.77.1.1"  # the real answer: the name resolved
    (attempt,) = out["attempts"]
    print(f"\nconnect() met outage reset after {attempt['seconds'] * 1e3:.3f} ms")
    assert attempt["error"] == 111  # ECONNREFUSED, as from a host that is up but closed
    assert attempt["seconds"] < AT_ONCE
    dns_violations(result, argv, "reset")
    (event,) = github_connections(result, argv, "reset", "connect")
    assert event.address == "10.77.1.1"


@NO_GITHUB
@pytest.mark.fence(outage="blackhole")
def test_blackhole_outage_hangs_curl_until_its_own_timeout(fenced: Fence, lab: Lab) -> None:
    argv = ["curl", "-sS", "-m", "1", "-w", "%{time_total}", "http://github.com/"]
    lab.clear_http_log()
    result = fenced.run(argv, check=False, timeout=30)

    # Held until curl's own -m 1 gave up: exit 28 is curl's timer, not a refusal (7).
    # No lower bound on the time: curl 7.74 (Debian 11) gives up after 0.75-0.9 s.
    assert result.returncode == 28, result.stderr
    assert "timed out" in result.stderr
    assert float(result.stdout) < 2.0
    assert served_github(lab) == []
    lookups = dns_violations(result, argv, "blackhole")
    assert {(e.verdict, e.blocked_at) for e in lookups} == {("allowed", None)}
    github_connections(result, argv, "blackhole", "packet")


@NO_GITHUB
@pytest.mark.fence(outage="blackhole")
def test_blackhole_outage_is_a_connect_timeout_for_a_python_client(
    fenced: Fence, tmp_path: Path
) -> None:
    argv = client_argv(tmp_path, "github.com", timeout=0.5)
    result = fenced.run(argv, check=False, timeout=30)

    out = json.loads(result.stdout)
    assert out["address"] == "10.77.1.1"
    (attempt,) = out["attempts"]
    assert attempt["error"] == "timeout"  # socket.timeout: no answer, not a refusal
    assert 0.45 <= attempt["seconds"] < 1.5
    dns_violations(result, argv, "blackhole")
    (event,) = github_connections(result, argv, "blackhole", "packet")
    assert event.address == "10.77.1.1"


# --------------------------------------------------------------------------- the report


@NO_GITHUB
@pytest.mark.parametrize(
    "outage",
    [
        pytest.param("servfail", marks=pytest.mark.fence(outage="servfail")),
        pytest.param("reset", marks=pytest.mark.fence(outage="reset")),
        pytest.param("blackhole", marks=pytest.mark.fence(outage="blackhole")),
    ],
)
def test_violation_report_says_what_the_script_was_shown(
    fenced: Fence, tmp_path: Path, outage: str
) -> None:
    argv = client_argv(tmp_path, "github.com", timeout=0.5)
    with pytest.raises(EgressViolation) as info:
        fenced.run(argv, timeout=30)

    text = str(info.value)
    assert f"[{outage}]" in text
    assert "github.com" in text
    assert f"  {shlex.join(argv)}" in text
    assert {v.outage for v in info.value.violations} == {outage}


# --------------------------------------------------------------------------- audit


@NO_GITHUB
@pytest.mark.fence(mode="audit")
def test_audit_mode_refuses_nothing_and_records_every_violation(fenced: Fence, lab: Lab) -> None:
    argv = ["curl", "-sS", "http://10.77.1.1/"]
    lab.clear_http_log()
    result = fenced.run(argv, check=False, timeout=30)

    assert (result.returncode, result.stdout) == (0, "lab:github.com\n")
    assert served_github(lab) == ["/"]
    (event,) = result.violations
    assert (event.address, event.port, event.protocol) == ("10.77.1.1", 80, "tcp")
    assert (event.domain, event.learned_from) == ("github.com", "upstream")
    assert (event.verdict, event.blocked_at, event.forbidden) == ("allowed", None, True)
    assert event.cmdline == shlex.join(argv)

    by_name = ["curl", "-sS", "http://github.com/"]
    named = fenced.run(by_name, check=False, timeout=30)
    assert named.stdout == "lab:github.com\n"
    assert named.violations and named.domains == ["github.com"]
    for violation in named.violations:
        assert (violation.domain, violation.verdict) == ("github.com", "allowed")
        assert violation.cmdline == shlex.join(by_name)

    # Audit mode leaves the outcome to the test: even a checked run does not raise.
    checked = fenced.run(argv, timeout=30)
    assert [(v.address, v.verdict) for v in checked.violations] == [("10.77.1.1", "allowed")]
