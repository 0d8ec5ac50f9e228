"""A process moved out of its fence, without root: the kernel's record decoded, the
judge's event (a violation in every mode), the run's attribution of the process and
of whoever moved it, every text form of the event, and the directory walk that
tells a cgroup below the fence from one outside it. A raw or packet socket made in a
fence that does not allow it (escape.c's socket()) is the same record and the same
kind of event, with the socket in place of the cgroup.
"""

from __future__ import annotations

import ctypes
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from event_factory import event as dns_event

from pytest_depfence import render
from pytest_depfence import report as reports
from pytest_depfence.addresses import AddressBook
from pytest_depfence.contract import Contract
from pytest_depfence.events import EgressEvent, FenceResult
from pytest_depfence.judge import MOVED_BY, MOVED_ITSELF, RAW_SOCKET_TAKEN, STARTED_BY, Judge
from pytest_depfence.kernel import EscapeEvent, ProcRecord, abi
from pytest_depfence.kernel.programs import _in_tree
from pytest_depfence.policy import Policy
from pytest_depfence.procinfo import Attribution
from pytest_depfence.report import SCHEMA_PATH, event_from_record, event_record, run_record
from pytest_depfence.run import Member, Run

FENCE = 77
WHO = Attribution(4313, "sleep 1000", ((4301, "sh -c 'sleep 1000 & wait'"),))
COMMAND = "sh -c 'sleep 1000 & wait'"


def escape(**overrides: Any) -> EscapeEvent:
    """The kernel's report: pid 4313 moved to the root cgroup by pid 4242."""
    fields: dict[str, Any] = dict(
        time_ns=5,
        cgroup_id=FENCE,
        pid=4313,
        writer=4242,
        dst_id=1,
        dst_path="/",
        killed_in_kernel=False,
    )
    return EscapeEvent(**{**fields, **overrides})


class NoAddresses:
    def add_network(self, fence_id: int, network: object, verdict: str) -> None:
        raise AssertionError("an escape teaches the judge no address")

    def forget_networks(self, fence_id: int, networks: object) -> None:
        pass


def judge(mode: str = "block") -> Judge:
    return Judge(
        Policy.no_egress("github.com"), mode, "nxdomain", AddressBook(FENCE, NoAddresses())
    )


# --------------------------------------------------------------------------- the kernel's record


def raw_escape(path: bytes, path_len: int | None = None) -> abi.EscapeEventStruct:
    raw = abi.EscapeEventStruct()
    raw.ts, raw.cgid, raw.dst_id, raw.pid, raw.writer, raw.killed = 5, FENCE, 1, 4313, 4242, 1
    raw.how = abi.Escape.BORN
    ctypes.memmove(raw.path, path, min(len(path), abi.CGROUP_PATH_MAX))
    raw.path_len = len(path) + 1 if path_len is None else path_len
    return raw


def test_decode_escape_reads_every_field() -> None:
    event = abi.decode_escape(raw_escape(b"/system.slice/cron.service"))
    assert event == EscapeEvent(5, FENCE, 4313, 4242, 1, "/system.slice/cron.service", True, True)


def test_decode_a_raw_socket_names_its_family_and_type() -> None:
    raw = raw_escape(b"", path_len=-1)
    raw.how, raw.dst_id, raw.writer = abi.Escape.RAW_SOCKET, 17 << 8 | 3, raw.pid
    event = abi.decode_escape(raw)
    assert (event.raw_socket, event.born, event.writer) == ("AF_PACKET/SOCK_RAW", False, 4313)
    assert abi.socket_kind(2 << 8 | 3) == "AF_INET/SOCK_RAW"
    assert abi.socket_kind(99 << 8 | 77) == "family 99/type 77"
    assert abi.decode_escape(raw_escape(b"/")).raw_socket is None


def test_a_path_that_filled_the_buffer_is_marked_cut_and_an_unread_one_is_empty() -> None:
    longest = b"/" + b"x" * (abi.CGROUP_PATH_MAX - 2)  # fits with its NUL: may go on
    cut = abi.decode_escape(raw_escape(longest, path_len=abi.CGROUP_PATH_MAX))
    assert cut.dst_path == longest.decode() + "…"
    assert abi.decode_escape(raw_escape(b"", path_len=-14)).dst_path == ""


def test_the_struct_has_no_implicit_padding() -> None:
    fields = abi.EscapeEventStruct._fields_
    named = sum(getattr(abi.EscapeEventStruct, f[0]).size for f in fields)
    assert named == ctypes.sizeof(abi.EscapeEventStruct) == 40 + abi.CGROUP_PATH_MAX


# --------------------------------------------------------------------------- the judge


@pytest.mark.parametrize("mode", ["block", "audit"])
def test_an_escape_is_a_blocked_violation_in_every_mode(mode: str) -> None:
    event = judge(mode).escape(escape(), WHO, "pid 4242 python3 -m pytest")
    assert event == EgressEvent(
        domain=None,
        address="/",
        port=None,
        protocol="cgroup",
        verdict="blocked",
        blocked_at="cgroup",
        rule=MOVED_BY.format(mover="pid 4242 python3 -m pytest"),
        pid=4313,
        cmdline="sleep 1000",
        ancestry=WHO.ancestry,
        forbidden=True,
        outage="killed",
        moved_by=4242,
    )
    assert event.is_violation and event.is_escape
    result = FenceResult(COMMAND, -9, "", "", events=(dns_event(), event))
    assert result.violations[-1] is event
    assert result.domains == ["github.com"]  # an escape names no domain


def test_a_child_born_outside_was_started_there_by_its_parent() -> None:
    born = escape(writer=4301, killed_in_kernel=True, born=True, dst_path="", dst_id=1)
    event = judge().escape(born, WHO, "pid 4301 python3 clone.py")
    assert (event.rule, event.moved_by) == (
        STARTED_BY.format(mover="pid 4301 python3 clone.py"),
        4301,
    )
    assert event.address == "id:1"


def test_a_process_that_moved_itself_has_no_mover() -> None:
    event = judge().escape(escape(writer=4313, killed_in_kernel=True), WHO, None)
    assert (event.rule, event.moved_by) == (MOVED_ITSELF, None)


def test_an_unread_path_names_the_cgroup_by_id() -> None:
    event = judge().escape(escape(dst_path="", dst_id=9001), WHO, None)
    assert event.address == "id:9001"


# --------------------------------------------------------------------------- the run


@dataclass
class Records:
    """Stands in for `kernel.Programs`: the process records the kernel made."""

    records: dict[int, ProcRecord]

    def process(self, pid: int, at_ns: int | None = None) -> ProcRecord | None:
        return self.records.get(pid)


def record(pid: int, ppid: int, *argv: str, exited: bool = False) -> ProcRecord:
    return ProcRecord(pid, ppid, argv, truncated=False, exited=exited, cgroup_id=FENCE)


def run_with(*records: ProcRecord) -> Run:
    programs = Records({r.pid: r for r in records})
    run = Run(programs, judge())  # type: ignore[arg-type]
    run.add_member(Member("command", FENCE, Path("/x"), "/x", root_pid=4301))
    return run


SCRIPT = record(4301, 1, "sh", "-c", "sleep 1000 & wait")
SLEEP = record(4313, 4301, "sleep", "1000")


def test_the_run_names_the_moved_process_its_ancestry_and_a_fenced_mover() -> None:
    run = run_with(SCRIPT, SLEEP)
    run.on_escape(escape(writer=4301))
    (event,) = run.in_order()
    assert (event.pid, event.cmdline, event.ancestry) == (4313, "sleep 1000", WHO.ancestry)
    assert event.rule == "moved out of the fence by pid 4301 sh -c 'sleep 1000 & wait'"
    assert event.moved_by == 4301


def test_a_mover_outside_the_fence_is_named_from_proc() -> None:
    run = run_with(SCRIPT, SLEEP, record(os.getpid(), 1, "stale", "record", exited=True))
    run.on_escape(escape(writer=os.getpid()))
    (event,) = run.in_order()
    with open("/proc/self/cmdline", "rb") as f:
        first = f.read().split(b"\0")[0].decode()
    assert event.rule is not None
    assert event.rule.startswith(f"moved out of the fence by pid {os.getpid()} {first}")


def test_a_process_that_moved_itself_is_named_once() -> None:
    run = run_with(SCRIPT, SLEEP)
    run.on_escape(escape(writer=4313, killed_in_kernel=True))
    (event,) = run.in_order()
    assert (event.rule, event.moved_by, event.cmdline) == (MOVED_ITSELF, None, "sleep 1000")


# --------------------------------------------------------------------------- texts

MOVED = judge().escape(escape(dst_path="/system.slice"), WHO, "pid 4242 python3 -m pytest")
ITSELF = judge().escape(escape(writer=4313), WHO, None)
RAW = judge().escape(
    escape(writer=4313, killed_in_kernel=True, raw_socket="AF_PACKET/SOCK_RAW", dst_id=4355),
    WHO,
    None,
)


@pytest.mark.parametrize("mode", ["block", "audit"])
def test_a_raw_socket_is_a_killed_violation_in_every_mode(mode: str) -> None:
    raw = escape(writer=4313, killed_in_kernel=True, raw_socket="AF_INET/SOCK_RAW")
    event = judge(mode).escape(raw, WHO, None)
    assert (event.protocol, event.blocked_at, event.address) == (
        "socket",
        "socket",
        "AF_INET/SOCK_RAW",
    )
    assert (event.verdict, event.outage, event.moved_by) == ("blocked", "killed", None)
    assert event.rule == RAW_SOCKET_TAKEN.format(socket="AF_INET/SOCK_RAW")
    assert event.is_violation and event.is_escape


def test_terminal_lines() -> None:
    assert render.format_event(MOVED) == [
        "  blocked  cgroup /system.slice   at cgroup   [killed] "
        "moved out of the fence by pid 4242 python3 -m pytest",
        "           pid 4313  sleep 1000",
        "           via pid 4301 sh -c 'sleep 1000 & wait'",
    ]
    born = escape(writer=4301, killed_in_kernel=True, born=True, dst_path="", dst_id=1)
    assert render.format_event(judge().escape(born, WHO, "pid 4301 sh x"))[0] == (
        "  blocked  cgroup id:1            at cgroup   [killed] "
        "started outside the fence by pid 4301 sh x"
    )
    assert render.format_event(ITSELF)[0] == (
        "  blocked  cgroup /               at cgroup   [killed] moved itself out of the fence"
    )
    assert render.format_event(RAW)[0] == (
        "  blocked  socket AF_PACKET/SOCK_RAW at socket   [killed] "
        + RAW_SOCKET_TAKEN.format(socket="AF_PACKET/SOCK_RAW")
    )


def test_the_violation_report_names_the_process_and_the_cgroup() -> None:
    text = render.format_violations([MOVED], COMMAND)
    assert text.splitlines()[0] == render.violation_headline(1, COMMAND)
    assert "cgroup /system.slice" in text and "pid 4313  sleep 1000" in text


def test_log_line() -> None:
    assert render.log_line(MOVED, "blocklist") == (
        "WARN CGROUP BLOCKED reason=FromCgroupEscape blocked=true blockedAt=cgroup "
        'cgroup=/system.slice pid=4313 cmd="sleep 1000" firewallMethod=blocklist '
        "outage=killed movedBy=4242"
    )
    spaced = replace(ITSELF, address="/odd name")
    assert render.log_line(spaced, "allowlist") == (
        "WARN CGROUP BLOCKED reason=FromCgroupEscape blocked=true blockedAt=cgroup "
        'cgroup="/odd name" pid=4313 cmd="sleep 1000" firewallMethod=allowlist outage=killed'
    )
    assert render.log_line(RAW, "blocklist") == (
        "WARN SOCKET BLOCKED reason=FromRawSocket blocked=true blockedAt=socket "
        'socket=AF_PACKET/SOCK_RAW pid=4313 cmd="sleep 1000" firewallMethod=blocklist '
        "outage=killed"
    )


def test_destinations() -> None:
    assert render.target(MOVED) == render.report_target(MOVED) == "cgroup /system.slice"
    assert render.destination(MOVED) == "cgroup:/system.slice"
    contract = Contract.from_events([MOVED]).render("deploy", "depfence audit ...")
    assert contract.splitlines()[2] == "cgroup:/system.slice  sleep"
    assert render.target(RAW) == render.report_target(RAW) == "socket AF_PACKET/SOCK_RAW"
    assert render.destination(RAW) == "socket:AF_PACKET/SOCK_RAW"


def session_report(event: EgressEvent) -> reports.SessionReport:
    result = FenceResult(COMMAND, -9, "", "", events=(event,))
    runs = [run_record(result, policy='no_egress("github.com")', mode="block", outage="nxdomain")]
    session = reports.SessionReport()
    session.add(reports.TestRuns("test_x.py::test_escape", "test_x.py", 3, "failed", runs, []))
    return session


def test_annotation_and_step_summary() -> None:
    session = session_report(MOVED)
    assert session.github_annotations() == [
        "::error file=test_x.py,line=3,title=depfence%3A test_x.py%3A%3Atest_escape::"
        "cgroup /system.slice: 1 escape by sleep (blocked at cgroup)%0A"
        f"  sleep 1000: cgroup /system.slice%0Awhile running {COMMAND}"
    ]
    row = "| `test_x.py::test_escape` | `cgroup /system.slice` | `sleep 1000` | blocked |"
    assert row in session.step_summary().splitlines()


def test_the_json_report_is_valid_and_reads_back_the_same_event() -> None:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)(schema)
    for event in (MOVED, ITSELF, RAW):
        document = session_report(event).to_json()
        assert list(validator.iter_errors(document)) == []
        (record_,) = document["tests"][0]["runs"][0]["violations"]
        assert event_from_record(record_) == event


def test_a_record_written_before_moved_by_existed_still_reads_and_validates() -> None:
    old = event_record(dns_event())
    del old["moved_by"]
    assert event_from_record(old) == dns_event()
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    event_schema = {"$schema": schema["$schema"], "$defs": schema["$defs"]}
    event_schema["$ref"] = "#/$defs/event"
    jsonschema.validators.validator_for(schema)(event_schema).validate(old)


# --------------------------------------------------------------------------- inside or out


def test_the_tree_walk_finds_the_fence_and_every_directory_below_it(tmp_path: Path) -> None:
    fence = tmp_path / "fence"
    (fence / "sub" / "deeper").mkdir(parents=True)
    (fence / "a-file").write_text("")
    (tmp_path / "elsewhere").mkdir()
    fd = os.open(fence, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for inside in (fence, fence / "sub", fence / "sub" / "deeper"):
            assert _in_tree(fd, os.stat(inside).st_ino), inside
        for outside in (tmp_path, tmp_path / "elsewhere", fence / "a-file"):
            assert not _in_tree(fd, os.stat(outside).st_ino), outside
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0  # our fd is left as it was, for the next walk
    finally:
        os.close(fd)
