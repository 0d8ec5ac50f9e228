"""The violation text: what a failing test shows (no root, no kernel)."""

import pickle

from pytest_depfence import EgressViolation
from pytest_depfence.events import (
    UNATTRIBUTED,
    VIOLATION_HEADLINE,
    EgressEvent,
    FenceResult,
    format_violations,
)


def event(**overrides):
    fields = dict(
        domain="github.com",
        address=None,
        port=53,
        protocol="udp",
        verdict="blocked",
        blocked_at="dns",
        rule='no_egress("github.com") [marker at test_deploy.py:12]',
        pid=4312,
        cmdline="curl -fsSL https://github.com/org/tool/releases/latest/download/tool.tgz",
        ancestry=((4301, "bash ./deploy/mysql.sh --config new.cnf"),),
        qtype="A",
        forbidden=True,
    )
    fields.update(overrides)
    return EgressEvent(**fields)


def test_report_names_domain_rule_process_and_ancestry():
    text = format_violations([event()], "./deploy/mysql.sh --config new.cnf")
    lines = text.splitlines()
    assert lines[0] == VIOLATION_HEADLINE.format(
        count=1, s="", command="./deploy/mysql.sh --config new.cnf"
    )
    assert lines[1].split() == [
        "blocked",
        "github.com",
        "(A)",
        "at",
        "dns",
        "rule",
        'no_egress("github.com")',
        "[marker",
        "at",
        "test_deploy.py:12]",
    ]
    assert lines[2].strip() == (
        "pid 4312  curl -fsSL https://github.com/org/tool/releases/latest/download/tool.tgz"
    )
    assert lines[3].strip() == "via pid 4301 bash ./deploy/mysql.sh --config new.cnf"


def test_report_counts_in_plural_and_lists_every_violation():
    text = format_violations([event(), event(qtype="AAAA", pid=7, ancestry=())], "x")
    assert text.splitlines()[0] == VIOLATION_HEADLINE.format(count=2, s="s", command="x")
    assert "github.com (AAAA)" in text
    assert "pid 7  curl" in text


def test_unattributed_event_says_so_instead_of_naming_a_process():
    text = format_violations(
        [event(pid=None, cmdline=None, ancestry=(), unattributed="no fenced socket sent this")],
        "x",
    )
    assert UNATTRIBUTED.format(reason="no fenced socket sent this") in text
    assert "pid" not in text


def test_result_derives_violations_and_sorted_unique_domains():
    allowed = event(
        domain="mirror.internal", verdict="allowed", blocked_at=None, rule=None, forbidden=False
    )
    audited = event(domain="api.github.com", verdict="allowed", forbidden=True)
    result = FenceResult("x", 0, "", "", events=(event(), allowed, event(qtype="AAAA"), audited))
    assert result.domains == ["api.github.com", "github.com", "mirror.internal"]
    assert [v.domain for v in result.violations] == ["github.com", "github.com", "api.github.com"]


def test_egress_violation_is_an_assertion_error_that_survives_pickling():
    exc = EgressViolation(format_violations([event()], "x"), [event()])
    assert isinstance(exc, AssertionError)
    copy = pickle.loads(pickle.dumps(exc))
    assert str(copy) == str(exc)
    assert copy.violations == [event()]
