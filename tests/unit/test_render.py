"""Every text form of an event, for each kind of event (render, no root, no kernel).

The forms: the terminal's lines (`format_event`), the CLI's log line, the
destination as annotations, the step summary and contracts name it. Reports
go through their JSON records and back, as they do between xdist workers.
An IPv6 address next to a port is always in brackets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from event_factory import ALLOWED, connection, event

from pytest_depfence import render
from pytest_depfence import report as reports
from pytest_depfence.contract import Contract, program_of
from pytest_depfence.events import EgressEvent, FenceResult
from pytest_depfence.report import SessionReport, event_from_record, run_record


@dataclass(frozen=True)
class Texts:
    """What each text form says about one event."""

    terminal: list[str]
    log: str
    report: str  # annotations and the step summary
    contract: str


KINDS: dict[str, tuple[EgressEvent, Texts]] = {
    "ipv4": (
        connection(domain="github.com", address="140.82.112.3", learned_from="dns"),
        Texts(
            terminal=[
                "  blocked  140.82.112.3:443/tcp   at connect  (github.com, learned from dns) "
                'rule no_egress("10.77.1.1")',
                "           pid 42  curl https://10.77.1.1/",
            ],
            log="WARN CONN BLOCKED reason=FromConnect blocked=true blockedAt=connect "
            "domain=github.com. address=140.82.112.3 port=443 protocol=tcp pid=42 "
            'cmd="curl https://10.77.1.1/" firewallMethod=blocklist learnedFrom=dns',
            report="github.com 140.82.112.3:443/tcp",
            contract="github.com",
        ),
    ),
    "ipv6": (
        connection(address="fd77::3:1", port=80, outage="reset", learned_from=None),
        Texts(
            terminal=[
                "  blocked  [fd77::3:1]:80/tcp     at connect  (no name) [reset] "
                'rule no_egress("10.77.1.1")',
                "           pid 42  curl https://10.77.1.1/",
            ],
            log="WARN CONN BLOCKED reason=FromConnect blocked=true blockedAt=connect "
            "address=fd77::3:1 port=80 protocol=tcp pid=42 "
            'cmd="curl https://10.77.1.1/" firewallMethod=blocklist outage=reset',
            report="[fd77::3:1]:80/tcp",
            contract="[fd77::3:1]:80/tcp",
        ),
    ),
    "dns": (
        event(),
        Texts(
            terminal=[
                '  blocked  github.com (A)         at dns      rule no_egress("github.com") '
                "[CLI flag --no-egress]",
                "           pid 266767  curl github.com",
            ],
            log="WARN DNS BLOCKED reason=FromDNSRequest blocked=true blockedAt=dns "
            'domain=github.com. pid=266767 cmd="curl github.com " firewallMethod=blocklist '
            "qtype=A",
            report="github.com (A)",
            contract="github.com",
        ),
    ),
    "dns-by-socket": (
        event(by_socket=True),
        Texts(
            terminal=[
                '  blocked  github.com (A)         at dns      rule no_egress("github.com") '
                "[CLI flag --no-egress]",
                "           " + render.SOCKET_OWNER + "pid 266767  curl github.com",
            ],
            log="WARN DNS BLOCKED reason=FromDNSRequest blocked=true blockedAt=dns "
            'domain=github.com. pid=266767 cmd="curl github.com " firewallMethod=blocklist '
            "qtype=A",
            report="github.com (A)",
            contract="github.com",
        ),
    ),
    "bypass": (
        event(address="fd77::53", port=5300, blocked_at="packet", outage="dropped"),
        Texts(
            terminal=[
                "  blocked  github.com (A) to [fd77::53]:5300/udp at packet   [dropped] "
                'rule no_egress("github.com") [CLI flag --no-egress]',
                "           pid 266767  curl github.com",
            ],
            log="WARN DNS BLOCKED reason=FromDNSBypass blocked=true blockedAt=packet "
            "domain=github.com. address=fd77::53 port=5300 protocol=udp pid=266767 "
            'cmd="curl github.com " firewallMethod=blocklist outage=dropped qtype=A',
            report="github.com [fd77::53]:5300/udp",
            contract="github.com",
        ),
    ),
    "ownerless": (
        connection(
            address="fd77::1:1",
            protocol="icmpv6",
            port=0,
            blocked_at="packet",
            outage="dropped",
            pid=None,
            cmdline=None,
            unattributed="a raw or ICMP socket",
        ),
        Texts(
            terminal=[
                "  blocked  [fd77::1:1]:0/icmpv6   at packet   (no name, learned from rule) "
                '[dropped] rule no_egress("10.77.1.1")',
                "           " + render.UNATTRIBUTED.format(reason="a raw or ICMP socket"),
            ],
            log="WARN CONN BLOCKED reason=FromPacket blocked=true blockedAt=packet "
            'address=fd77::1:1 port=0 protocol=icmpv6 pid=unknown cmd="" '
            "firewallMethod=blocklist outage=dropped learnedFrom=rule "
            'unattributed="a raw or ICMP socket"',
            report="[fd77::1:1]:0/icmpv6",
            contract="[fd77::1:1]:0/icmpv6",
        ),
    ),
}

COMMAND = "./deploy/mysql.sh --config new.cnf"


def session_report(*events: EgressEvent) -> SessionReport:
    """A report of one failed test with one run of these events, made as the plugin makes it."""
    result = FenceResult(COMMAND, 0, "", "", events=events)
    record = run_record(result, policy='no_egress("github.com")', mode="block", outage="nxdomain")
    report = SessionReport()
    report.add(
        reports.TestRuns("test_deploy.py::test_mysql", "test_deploy.py", 12, "failed", [record], [])
    )
    return report


def every_text(event: EgressEvent) -> list[str]:
    """Each text form of `event`, as the user meets it."""
    report = session_report(event)
    return [
        *render.format_event(event),
        render.format_violations([event], COMMAND),
        render.log_line(event, "blocklist"),
        *report.github_annotations(),
        report.step_summary(),
        Contract.from_events([event]).render("deploy", "depfence audit ..."),
    ]


@pytest.mark.parametrize(("kind", "texts"), [(k, t) for k, (_, t) in KINDS.items()], ids=KINDS)
def test_every_text_form(kind: str, texts: Texts) -> None:
    event = KINDS[kind][0]
    assert [line.rstrip() for line in render.format_event(event)] == texts.terminal
    assert render.log_line(event, "blocklist") == texts.log
    assert render.report_target(event) == texts.report
    assert render.destination(event) == texts.contract

    report = session_report(event)
    # One annotation per destination: the name (else the endpoint), then who reached what.
    who = event.cmdline or f"(unattributed: {event.unattributed})"
    message = (
        f"{event.domain or texts.report}: 1 attempt by {program_of(event.cmdline)} "
        f"(blocked at {event.blocked_at})%0A  {who}: {texts.report}%0Awhile running {COMMAND}"
    )
    assert report.github_annotations() == [
        "::error file=test_deploy.py,line=12,title=depfence%3A test_deploy.py%3A%3Atest_mysql::"
        + message
    ]
    row = (
        f"| `test_deploy.py::test_mysql` | `{texts.report}` | `{event.cmdline or '?'}` | blocked |"
    )
    assert row in report.step_summary().splitlines()
    assert texts.contract in Contract.from_events([event]).render("d", "r").splitlines()[2]


IPV6_WITH_PORT = re.compile(r"(?<![\[\w:])[0-9a-f]*:[0-9a-f:]*:[0-9a-f]+:\d+/")


@pytest.mark.parametrize("kind", ["ipv6", "bypass", "ownerless"])
def test_an_ipv6_address_next_to_a_port_is_bracketed_in_every_form(kind: str) -> None:
    event = KINDS[kind][0]
    assert event.address is not None
    bracketed = f"[{event.address}]:{event.port}/{event.protocol}"
    texts = every_text(event)
    for text in texts:
        assert not IPV6_WITH_PORT.search(text), text
    forms_with_an_endpoint = [t for t in texts if bracketed in t]
    # The terminal's head line, the violation report, annotation, summary (and a
    # contract when nothing named the address).
    assert len(forms_with_an_endpoint) >= 4, texts


def test_endpoint_brackets_ipv6_only() -> None:
    assert render.endpoint("10.0.0.7", 443, "tcp") == "10.0.0.7:443/tcp"
    assert render.endpoint("::1", 53, "udp") == "[::1]:53/udp"
    assert render.endpoint("::ffff:10.0.0.7", 80, "tcp") == "[::ffff:10.0.0.7]:80/tcp"


def test_report_records_round_trip_to_the_same_event() -> None:
    for original, _ in KINDS.values():
        record = run_record(
            FenceResult("x", 0, "", "", events=(original,)), policy="", mode="", outage=""
        )["events"][0]
        assert event_from_record(record) == original


# --------------------------------------------------------------------------- log lines


def test_blocked_dns_keeps_githubs_shape_as_a_prefix() -> None:
    github = (
        "WARN DNS BLOCKED reason=FromDNSRequest blocked=true blockedAt=dns domain=github.com. "
        'pid=266767 cmd="curl github.com " firewallMethod=blocklist'
    )
    assert render.log_line(event(), "blocklist") == f"{github} qtype=A"


def test_domain_gets_exactly_one_trailing_dot() -> None:
    assert " domain=github.com. " in render.log_line(event(domain="github.com."), "blocklist")


def test_allowed_dns_is_info() -> None:
    assert render.log_line(event(**ALLOWED), "allowlist") == (
        "INFO DNS ALLOWED reason=FromDNSRequest blocked=false blockedAt=none "
        'domain=github.com. pid=266767 cmd="curl github.com " firewallMethod=allowlist qtype=A'
    )


def test_audited_dns_is_warn_and_not_blocked() -> None:
    line = render.log_line(event(verdict="allowed", blocked_at=None, outage=None), "blocklist")
    assert line.startswith("WARN DNS AUDITED reason=FromDNSRequest blocked=false blockedAt=none ")


def test_name_resolved_for_a_reset_outage_is_forbidden_with_its_outage() -> None:
    line = render.log_line(event(verdict="allowed", blocked_at=None, outage="reset"), "blocklist")
    assert line.startswith("WARN DNS FORBIDDEN reason=FromDNSRequest blocked=false ")
    assert line.endswith(" firewallMethod=blocklist outage=reset qtype=A")


def test_refused_connection() -> None:
    assert render.log_line(connection(), "blocklist") == (
        "WARN CONN BLOCKED reason=FromConnect blocked=true blockedAt=connect "
        "address=10.77.1.1 port=443 protocol=tcp pid=42 "
        'cmd="curl https://10.77.1.1/" firewallMethod=blocklist learnedFrom=rule'
    )


def test_permitted_contact_is_info_with_its_name_and_ipv6_address() -> None:
    line = render.log_line(
        connection(
            **ALLOWED,
            domain="mirror.internal",
            address="fd77::3:1",
            port=80,
            learned_from="dns, hosts file",
        ),
        "allowlist",
    )
    assert line == (
        "INFO CONN ALLOWED reason=FromConnect blocked=false blockedAt=none "
        "domain=mirror.internal. address=fd77::3:1 port=80 protocol=tcp pid=42 "
        'cmd="curl https://10.77.1.1/" firewallMethod=allowlist learnedFrom="dns, hosts file"'
    )


def test_command_line_quotes_are_escaped() -> None:
    line = render.log_line(event(cmdline='sh -c "curl x"'), "blocklist")
    assert ' cmd="sh -c \\"curl x\\"" ' in line


@pytest.mark.parametrize(
    ("value", "written"),
    [("dns", "dns"), ("dns, hosts file", '"dns, hosts file"'), ("a=b", '"a=b"'), ("", '""')],
)
def test_logfmt_values_are_bare_only_when_they_can_be(value: str, written: str) -> None:
    assert render.logfmt_value(value) == written


def test_firewall_method_names_the_policy_kind() -> None:
    assert render.firewall_method("egress_only") == "allowlist"
    assert render.firewall_method("no_egress") == "blocklist"


def test_lost_events_read_as_a_violation_of_the_run() -> None:
    from pytest_depfence.addresses import AddressBook
    from pytest_depfence.judge import LOST_WHO, Judge
    from pytest_depfence.policy import Policy

    class NoAddresses:
        """Stands in for the kernel's address trie (never used here)."""

        def add_network(self, fence_id: int, network: object, verdict: str) -> None: ...

        def forget_networks(self, fence_id: int, networks: object) -> None: ...

    judge = Judge(
        Policy.no_egress("github.com"), "audit", "nxdomain", AddressBook(1, NoAddresses())
    )
    lost = judge.lost(3, "command")
    assert lost.is_loss and lost.is_violation  # in audit mode too: fail closed
    head, who = render.format_event(lost)
    assert render.LOST_TARGET in head and "could not report 3 event(s) of command" in head
    assert LOST_WHO in who
    assert render.log_line(lost, "blocklist").startswith("WARN KERNEL BLOCKED reason=EventsLost")
    assert render.destination(lost) == "lost-events"
