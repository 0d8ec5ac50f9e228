"""The CLI's text and codes without a fence: log lines, exit codes, argument errors, doctor lines.

Argument errors must be caught before any fence is built: `Fence` is replaced
by a stub that fails the test if anything tries to build one.
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from pytest_depfence import cli
from pytest_depfence.events import EgressEvent, FenceResult

GITHUB_SHAPE = (
    "WARN DNS BLOCKED reason=FromDNSRequest blocked=true blockedAt=dns domain=github.com. "
    'pid=266767 cmd="curl github.com " firewallMethod=blocklist'
)


def event(**overrides: Any) -> EgressEvent:
    fields: dict[str, Any] = dict(
        domain="github.com",
        address=None,
        port=53,
        protocol="udp",
        verdict="blocked",
        blocked_at="dns",
        rule='no_egress("github.com") [CLI flag --no-egress]',
        pid=266767,
        cmdline="curl github.com ",
        qtype="A",
        forbidden=True,
        outage="nxdomain",
    )
    fields.update(overrides)
    return EgressEvent(**fields)


def connection(**overrides: Any) -> EgressEvent:
    fields: dict[str, Any] = dict(
        domain=None,
        address="10.77.1.1",
        port=443,
        protocol="tcp",
        verdict="blocked",
        blocked_at="connect",
        rule='no_egress("10.77.1.1")',
        pid=42,
        cmdline="curl https://10.77.1.1/",
        qtype=None,
        forbidden=True,
        outage="refused",
        learned_from="rule",
    )
    fields.update(overrides)
    return event(**fields)


# --------------------------------------------------------------------------- log lines


def test_blocked_dns_keeps_githubs_shape_as_a_prefix() -> None:
    assert cli.log_line(event(), "blocklist") == f"{GITHUB_SHAPE} qtype=A"


def test_domain_gets_exactly_one_trailing_dot() -> None:
    assert " domain=github.com. " in cli.log_line(event(domain="github.com."), "blocklist")


def test_allowed_dns_is_info() -> None:
    line = cli.log_line(
        event(verdict="allowed", blocked_at=None, forbidden=False, outage=None, rule=None),
        "allowlist",
    )
    assert line == (
        "INFO DNS ALLOWED reason=FromDNSRequest blocked=false blockedAt=none "
        'domain=github.com. pid=266767 cmd="curl github.com " firewallMethod=allowlist qtype=A'
    )


def test_audited_dns_is_warn_and_not_blocked() -> None:
    line = cli.log_line(event(verdict="allowed", blocked_at=None, outage=None), "blocklist")
    assert line.startswith("WARN DNS AUDITED reason=FromDNSRequest blocked=false blockedAt=none ")


def test_name_resolved_for_a_reset_outage_is_forbidden_with_its_outage() -> None:
    line = cli.log_line(event(verdict="allowed", blocked_at=None, outage="reset"), "blocklist")
    assert line.startswith("WARN DNS FORBIDDEN reason=FromDNSRequest blocked=false ")
    assert line.endswith(" firewallMethod=blocklist outage=reset qtype=A")


def test_refused_connection() -> None:
    assert cli.log_line(connection(), "blocklist") == (
        "WARN CONN BLOCKED reason=FromConnect blocked=true blockedAt=connect "
        "address=10.77.1.1 port=443 protocol=tcp pid=42 "
        'cmd="curl https://10.77.1.1/" firewallMethod=blocklist learnedFrom=rule'
    )


def test_permitted_contact_is_info_with_its_name_and_ipv6_address() -> None:
    line = cli.log_line(
        connection(
            domain="mirror.internal",
            address="fd77::3:1",
            port=80,
            verdict="allowed",
            blocked_at=None,
            forbidden=False,
            outage=None,
            rule=None,
            learned_from="dns, hosts file",
        ),
        "allowlist",
    )
    assert line == (
        "INFO CONN ALLOWED reason=FromConnect blocked=false blockedAt=none "
        "domain=mirror.internal. address=fd77::3:1 port=80 protocol=tcp pid=42 "
        'cmd="curl https://10.77.1.1/" firewallMethod=allowlist learnedFrom="dns, hosts file"'
    )


def test_backstop_drop_of_an_ownerless_packet() -> None:
    line = cli.log_line(
        connection(
            protocol="icmp",
            port=0,
            blocked_at="packet",
            outage="dropped",
            pid=None,
            cmdline=None,
            unattributed="a raw or ICMP socket",
        ),
        "blocklist",
    )
    assert line == (
        "WARN CONN BLOCKED reason=FromPacket blocked=true blockedAt=packet "
        'address=10.77.1.1 port=0 protocol=icmp pid=unknown cmd="" firewallMethod=blocklist '
        'outage=dropped learnedFrom=rule unattributed="a raw or ICMP socket"'
    )


def test_dns_sent_past_the_proxy() -> None:
    line = cli.log_line(
        event(address="10.77.0.53", port=5300, blocked_at="packet", outage="dropped"),
        "blocklist",
    )
    assert line == (
        "WARN DNS BLOCKED reason=FromDNSBypass blocked=true blockedAt=packet domain=github.com. "
        'address=10.77.0.53 port=5300 protocol=udp pid=266767 cmd="curl github.com " '
        "firewallMethod=blocklist outage=dropped qtype=A"
    )


def test_command_line_quotes_are_escaped() -> None:
    line = cli.log_line(event(cmdline='sh -c "curl x"'), "blocklist")
    assert ' cmd="sh -c \\"curl x\\"" ' in line


# --------------------------------------------------------------------------- exit codes


def result(returncode: int, *events: EgressEvent, timed_out: bool = False) -> FenceResult:
    return FenceResult("cmd", returncode, "", "", timed_out=timed_out, events=events)


ALLOWED = event(verdict="allowed", blocked_at=None, forbidden=False, outage=None)


@pytest.mark.parametrize(
    ("outcome", "run_code", "audit_code"),
    [
        (result(0, ALLOWED), 0, 0),
        (result(7, ALLOWED), 7, 7),
        (result(0, event()), cli.VIOLATION_EXIT, 0),
        (result(7, event()), 7, 7),
        (result(-15), 143, 143),
        (result(-15, event()), 143, 143),
        (result(-9, event(), timed_out=True), cli.TIMEOUT_EXIT, cli.TIMEOUT_EXIT),
    ],
    ids=["clean", "failed", "violations", "both", "signal", "signal-violations", "timeout"],
)
def test_exit_codes(outcome: FenceResult, run_code: int, audit_code: int) -> None:
    assert cli.exit_code(outcome) == run_code
    assert cli.command_exit(outcome) == audit_code


# --------------------------------------------------------------------------- argument errors


@pytest.fixture
def no_fence(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a fence was built for arguments that are wrong")

    monkeypatch.setattr("pytest_depfence.fence.Fence", refuse)
    monkeypatch.setattr("pytest_depfence.lab.Lab", refuse)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["run", "--no-egress", "https://github.com", "--", "true"], "'https://github.com'"),
        (["run", "--egress-only", "", "--", "true"], "--egress-only"),
        (["run", "--upstream", "10.0.0.1:99999", "--", "true"], "'10.0.0.1:99999'"),
        (["run", "--timeout", "-1", "--", "true"], "'-1' from --timeout"),
        (["run", "--json", "/no/such/dir/out.json", "--", "true"], "'/no/such/dir/out.json'"),
        (["run", "--no-egress", "a.com", "--egress-only", "b.com", "--", "true"], "not allowed"),
        (["run", "--outage", "meltdown", "--", "true"], "'meltdown'"),
        (["run", "--lab"], "no command given"),
        (["audit", "--write-contract", "my deploy.contract", "--", "true"], "--write-contract"),
        (["frobnicate"], "'frobnicate'"),
    ],
    ids=[
        "pattern",
        "empty-pattern",
        "upstream-port",
        "timeout",
        "json-dir",
        "both-policies",
        "outage",
        "no-command",
        "contract-name",
        "subcommand",
    ],
)
def test_wrong_arguments_exit_125_before_any_fence(
    argv: list[str], named: str, no_fence: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code: object
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == cli.FENCE_ERROR_EXIT
    assert named in capsys.readouterr().err


def test_command_not_found_exits_127_before_any_fence(
    no_fence: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["run", "--", "no-such-command-depfence"]) == cli.NOT_FOUND_EXIT
    assert "no-such-command-depfence: command not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- audit, doctor


def test_regenerate_command_repeats_every_option_that_shapes_the_result() -> None:
    args = argparse.Namespace(
        lab=True,
        upstream="10.77.0.53",
        no_egress=["github.com", "*.githubusercontent.com"],
        egress_only=[],
        timeout=30.0,
        write_contract="tests/depfence-contracts/deploy.contract",
    )
    assert cli.regenerate_command(args, ["./deploy.sh", "--config", "new cnf"]) == (
        "depfence audit --lab --upstream 10.77.0.53 --no-egress github.com "
        "--no-egress '*.githubusercontent.com' --timeout 30 "
        "--write-contract tests/depfence-contracts/deploy.contract -- ./deploy.sh --config "
        "'new cnf'"
    )


def test_audit_list_names_each_destination_with_its_programs() -> None:
    events = (
        event(),
        event(cmdline="python3 tools/update_check.py --quiet"),
        connection(cmdline="curl -s http://10.77.3.2/", address="10.77.3.2", port=80),
    )
    text = cli.audit_list(result(0, *events))
    assert text.splitlines() == [
        "depfence audit: 2 destinations contacted while running cmd:",
        "  10.77.3.2:80/tcp  curl",
        "  github.com        curl, python3 update_check.py",
    ]
    assert cli.audit_list(result(0)) == "depfence audit: nothing contacted while running cmd\n"


def test_failing_check_shows_the_fix_once() -> None:
    check = cli.Check("bcc", "FAIL", "bcc is not installed (looked in X)", "apt-get install y")
    assert cli.format_check(check).splitlines() == [
        "FAIL  bcc             bcc is not installed (looked in X)",
        " " * 22 + "fix: apt-get install y",
    ]


def test_check_drops_the_fix_the_library_message_already_ends_with() -> None:
    def missing() -> str:
        raise RuntimeError("bcc is not installed (looked in X); apt-get install y")

    check = cli._check("bcc", missing, lambda _exc: "apt-get install y")
    assert (check.status, check.detail, check.fix) == (
        "FAIL",
        "bcc is not installed (looked in X)",
        "apt-get install y",
    )
