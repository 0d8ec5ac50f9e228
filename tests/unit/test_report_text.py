"""The violation text: what a failing test shows (no root, no kernel)."""

import pickle

from event_factory import ALLOWED, event

from pytest_depfence import CommandFailed, EgressViolation
from pytest_depfence.events import FenceResult
from pytest_depfence.render import (
    COMMAND_FAILED,
    TIMED_OUT,
    TIMED_OUT_TEXT,
    UNATTRIBUTED,
    VIOLATION_HEADLINE,
    attempts,
    failure_text,
    format_violations,
)

#: A query by a tool a deploy script runs, blocked by a marker's rule.
DEPLOY = dict(
    rule='no_egress("github.com") [marker at test_deploy.py:12]',
    pid=4312,
    cmdline="curl -fsSL https://github.com/org/tool/releases/latest/download/tool.tgz",
    ancestry=((4301, "bash ./deploy/mysql.sh --config new.cnf"),),
)


def deploy_event(**overrides):
    return event(**{**DEPLOY, **overrides})


def test_report_names_domain_rule_process_and_ancestry():
    text = format_violations([deploy_event()], "./deploy/mysql.sh --config new.cnf")
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
    text = format_violations([deploy_event(), deploy_event(qtype="AAAA", pid=7, ancestry=())], "x")
    assert text.splitlines()[0] == VIOLATION_HEADLINE.format(count=2, s="s", command="x")
    assert "github.com (AAAA)" in text
    assert "pid 7  curl" in text


def test_unattributed_event_says_so_instead_of_naming_a_process():
    text = format_violations(
        [
            deploy_event(
                pid=None, cmdline=None, ancestry=(), unattributed="no fenced socket sent this"
            )
        ],
        "x",
    )
    assert UNATTRIBUTED.format(reason="no fenced socket sent this") in text
    assert "pid" not in text


def test_result_derives_violations_and_sorted_unique_domains():
    allowed = event(**ALLOWED, domain="mirror.internal")
    audited = event(domain="api.github.com", verdict="allowed", forbidden=True)
    result = FenceResult("x", 0, "", "", events=(event(), allowed, event(qtype="AAAA"), audited))
    assert result.domains == ["api.github.com", "github.com", "mirror.internal"]
    assert [v.domain for v in result.violations] == ["github.com", "github.com", "api.github.com"]


def test_egress_violation_is_an_assertion_error_that_survives_pickling():
    exc = EgressViolation(format_violations([deploy_event()], "x"), [deploy_event()])
    assert isinstance(exc, AssertionError)
    copy = pickle.loads(pickle.dumps(exc))
    assert str(copy) == str(exc)
    assert copy.violations == [deploy_event()]


def test_timed_out_run_says_so_in_the_headline():
    text = format_violations([deploy_event()], "x", timed_out_after=2.5)
    assert text.splitlines()[0] == VIOLATION_HEADLINE.format(
        count=1, s="", command="x"
    ) + TIMED_OUT.format(seconds=2.5)
    assert text.splitlines()[0].endswith(
        "(timed out after 2.5 s; everything it started was killed)"
    )


def test_one_process_asking_one_name_twice_is_one_attempt() -> None:
    a, aaaa = deploy_event(), deploy_event(qtype="AAAA")
    other = deploy_event(pid=7, ancestry=())
    text = format_violations([a, aaaa, other], "x")
    lines = text.splitlines()
    assert lines[0] == VIOLATION_HEADLINE.format(count=2, s="s", command="x")
    assert lines[1].startswith("  blocked  github.com (A, AAAA)")
    assert sum("github.com (" in line for line in lines) == 2  # one head per attempt


def test_a_probe_and_a_connect_to_one_address_are_one_attempt() -> None:
    where = dict(qtype=None, domain="github.com", address="10.77.1.1", blocked_at="connect")
    probe = deploy_event(**where, port=0, protocol="udp")
    connect = deploy_event(**where, port=80, protocol="tcp")
    assert attempts([probe, connect]) == [[probe, connect]]
    head = format_violations([probe, connect], "x").splitlines()[1]
    assert "10.77.1.1:0/udp, 10.77.1.1:80/tcp" in head


def test_a_result_repr_is_short_whatever_the_output() -> None:
    result = FenceResult(
        command="./deploy.sh",
        returncode=1,
        stdout="x" * 100_000,
        stderr="",
        events=(deploy_event(),),
    )
    assert repr(result) == (
        "FenceResult(command='./deploy.sh', returncode=1, events=1, violations=1, "
        "domains=['github.com'], stdout=100000 chars, stderr=0 chars)"
    )


def test_a_failed_command_says_how_it_ended_and_the_tail_of_its_stderr() -> None:
    stderr = "".join(f"line {n}\n" for n in range(30))
    text = failure_text("./deploy.sh", 3, stderr, None)
    lines = text.splitlines()
    assert lines[0] == COMMAND_FAILED.format(command="./deploy.sh", how="exited with 3")
    assert lines[1] == "stderr (last 20 lines):"
    assert lines[2:] == [f"  line {n}" for n in range(10, 30)]
    assert failure_text("x", -9, "", None) == "x was killed by signal 9"
    assert failure_text("x", -9, "", 2.5) == "x " + TIMED_OUT_TEXT.format(seconds=2.5)


def test_command_failed_survives_pickling_with_its_outcome() -> None:
    exc = CommandFailed("x exited with 3", 3, "out", "err")
    back = pickle.loads(pickle.dumps(exc))
    assert (str(back), back.returncode, back.stdout, back.stderr) == (
        "x exited with 3",
        3,
        "out",
        "err",
    )
    assert isinstance(back, AssertionError)
