"""The toolkit's answers to the bcc versions users have, without root or bcc.

bcc 0.18 (Debian 11, Ubuntu 22.04) has no `attach_type` in `BPF.load_func()` and
reads tracepoint formats only from debugfs; bcc older than 0.18 is refused with
the version and its fix. Real loads are in tests/integration/test_kernel_toolkit.py.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from pytest_depfence import doctor
from pytest_depfence.errors import FenceUnavailable
from pytest_depfence.kernel import machine, progload, toolkit


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("0.18.0", (0, 18, 0)),
        ("0.18.0+ds", (0, 18, 0)),
        ("v0.29.1", (0, 29, 1)),
        ("0.31", (0, 31)),
        ("unknown", None),
        ("", None),
    ],
)
def test_bcc_versions_are_read_as_distributions_spell_them(text, parsed):
    assert machine.version_tuple(text) == parsed


@pytest.mark.parametrize("version", ["0.18.0", "0.26.0", "0.31.0+ds", "unknown"])
def test_bcc_0_18_and_newer_and_unknown_versions_pass(version):
    machine.check_bcc_version(version)


def test_a_bcc_older_than_0_18_is_refused_with_its_version_and_the_fix():
    with pytest.raises(FenceUnavailable) as caught:
        machine.check_bcc_version("0.15.0")
    assert caught.value.reason.startswith("bcc 0.15.0 is older than 0.18")
    assert "ring buffers" in caught.value.reason
    assert caught.value.fix is not None and "python3-bpfcc 0.18 or newer" in caught.value.fix


class Bcc018:
    """bcc 0.18's signature."""

    def load_func(self, func_name, prog_type, device=None): ...


class Bcc025:
    """bcc 0.25's signature."""

    def load_func(self, func_name, prog_type, device=None, attach_type=-1): ...


def test_load_func_with_attach_type_is_told_from_the_signature():
    assert not toolkit.load_func_takes_attach_type(Bcc018())
    assert not toolkit.load_func_takes_attach_type(Bcc018)
    assert toolkit.load_func_takes_attach_type(Bcc025())


def test_without_attach_type_in_load_func_programs_load_by_syscall(monkeypatch):
    calls: list[tuple[Any, ...]] = []

    def by_syscall(bpf: Any, name: str, prog_type: int, attach_type: int) -> Any:
        calls.append((name, prog_type, attach_type))
        return progload.LoadedProgram(name.encode(), 42)

    monkeypatch.setattr(toolkit, "load_by_syscall", by_syscall)
    connect4 = toolkit.ATTACH_TYPES["connect4"]
    fn = toolkit.load_program(Bcc018(), "connect4", toolkit.PROG_TYPE_CGROUP_SOCK_ADDR, connect4)
    assert fn.fd == 42
    assert calls == [("connect4", toolkit.PROG_TYPE_CGROUP_SOCK_ADDR, connect4)]


VERIFIER_LOG = "0: (61) r1 = *(u32 *)(r1 +0)\nR1 invalid mem access 'scalar'\nprocessed 2 insns"


@pytest.mark.parametrize(
    ("err", "log", "starts"),
    [
        (errno.EACCES, VERIFIER_LOG, "the kernel's verifier rejected the f program: "),
        (errno.EINVAL, "", "loading the f program failed: "),
    ],
)
def test_a_syscall_load_failure_is_blamed_on_what_failed(monkeypatch, err, log, starts):
    def refused(bpf: Any, name: str, prog_type: int, attach_type: int) -> Any:
        raise progload.ProgramLoadError(err, name, log)

    monkeypatch.setattr(toolkit, "load_by_syscall", refused)
    with pytest.raises(FenceUnavailable) as caught:
        toolkit.load_program(Bcc018(), "f", toolkit.PROG_TYPE_CGROUP_SKB, 1)
    reason = caught.value.reason
    assert reason.startswith(starts)
    assert "Failed to load BPF program b'f'" in reason  # bcc's own words, on every bcc
    if log:
        assert "invalid mem access" in reason
    else:
        assert "verifier" not in reason
    assert "attach_type" not in reason and "bcc 0.19" not in reason


class Bcc025Interrupted(Bcc025):
    """Stands in for bcc 0.25+ whose load the verifier gives up on `times` times because
    a signal is pending (the kernel answers EAGAIN; py-spy's sampling did it for real)."""

    def __init__(self, times: int) -> None:
        self.times = times
        self.tries = 0

    def load_func(self, name: bytes, prog_type: int, attach_type: int = -1) -> Any:
        self.tries += 1
        if self.tries <= self.times:
            raise Exception(f"Failed to load BPF program {name!r}: {os.strerror(errno.EAGAIN)}")
        return progload.LoadedProgram(name, 7)


def test_a_load_interrupted_by_a_signal_is_tried_again():
    bcc = Bcc025Interrupted(times=2)
    fn = toolkit.load_program(bcc, "f", toolkit.PROG_TYPE_CGROUP_SKB, 1)
    assert (fn.fd, bcc.tries) == (7, 3)


def test_a_load_interrupted_every_time_still_fails_with_the_reason():
    bcc = Bcc025Interrupted(times=100)
    with pytest.raises(FenceUnavailable, match="Resource temporarily unavailable") as caught:
        toolkit.load_program(bcc, "f", toolkit.PROG_TYPE_CGROUP_SKB, 1)
    assert bcc.tries == 5
    reason = str(caught.value)
    assert "the f program was interrupted 5 times in a row" in reason
    assert "verifier rejected" not in reason and "py-spy without --nonblocking" in reason


def test_an_old_bcc_finds_tracepoints_under_debugfs_only(tmp_path, monkeypatch):
    debug_tracing = tmp_path / "debug" / "tracing"
    monkeypatch.setattr(machine, "DEBUGFS_TRACING", debug_tracing)
    (debug_tracing / "events").mkdir(parents=True)
    assert machine.tracefs_dir(mount=False, bcc_version="0.18.0") == debug_tracing
    assert machine.reads_debugfs_only("0.25.0")
    assert not machine.reads_debugfs_only("0.26.0")


def test_an_old_bcc_without_debugfs_says_why_and_how_to_mount_it(tmp_path, monkeypatch):
    debug_tracing = tmp_path / "missing" / "tracing"
    monkeypatch.setattr(machine, "DEBUGFS_TRACING", debug_tracing)
    with pytest.raises(FenceUnavailable) as caught:
        machine.tracefs_dir(mount=False, bcc_version="0.18.0")
    assert caught.value.reason.startswith("debugfs is not mounted")
    assert f"bcc 0.18.0 reads tracepoints only from {debug_tracing}" in caught.value.reason
    assert caught.value.fix == f"mount -t debugfs none {debug_tracing.parent}"


def test_an_old_bcc_with_debugfs_mountable_is_fine_for_the_doctor(tmp_path, monkeypatch):
    debug_tracing = tmp_path / "debug" / "tracing"
    debug_tracing.parent.mkdir()
    monkeypatch.setattr(machine, "DEBUGFS_TRACING", debug_tracing)
    assert machine.tracefs_dir(mount=False, bcc_version="0.18.0") is None


class FakeBcc:
    __version__ = "0.15.0"
    __file__ = "/usr/lib/python3/dist-packages/bcc/__init__.py"
    BPF = Bcc018


def test_doctor_refuses_a_bcc_older_than_0_18_with_the_fix(monkeypatch):
    import pytest_depfence.kernel as kernel

    monkeypatch.setattr(kernel, "import_bcc", lambda: FakeBcc)
    check = doctor.run_check("bcc", doctor._bcc)
    assert check.status == "FAIL"
    assert check.detail.startswith("bcc 0.15.0 is older than 0.18")
    assert check.fix is not None and "python3-bpfcc" in check.fix


def test_doctor_says_how_bcc_0_18_is_used(monkeypatch):
    class Bcc18(FakeBcc):
        __version__ = "0.18.0"

    import pytest_depfence.kernel as kernel

    monkeypatch.setattr(kernel, "import_bcc", lambda: Bcc18)
    check = doctor.run_check("bcc", doctor._bcc)
    assert check.status == "OK", check
    assert check.detail.startswith(f"0.18.0 from {Path(FakeBcc.__file__).parent}")
    assert "loaded by syscall" in check.detail
    assert "/sys/kernel/debug/tracing only" in check.detail


def test_an_instruction_is_packed_as_struct_bpf_insn():
    # call 123: code 0x85, no registers, imm 123
    assert progload._insn(0x85, imm=123).to_bytes(8, "little") == bytes.fromhex("850000007b000000")
    # r1 = -1: code 0xb7, dst 1, imm 0xffffffff
    assert progload._insn(0xB7, dst=1, imm=-1).to_bytes(8, "little") == bytes.fromhex(
        "b7010000ffffffff"
    )


UNKNOWN_HELPER_LOG = """bpf: Failed to load program: Invalid argument
47: (b7) r1 = 1
48: (85) call bpf_get_current_ancestor_cgroup_id#123
unknown func bpf_get_current_ancestor_cgroup_id#123
processed 46 insns (limit 1000000) max_states_per_insn 0 total_states 4"""


def test_a_helper_the_kernel_lacks_is_named_not_blamed_on_the_verifier_or_headers(monkeypatch):
    monkeypatch.setattr(toolkit, "kernel_cflags", lambda: [])

    class Bcc:
        __version__ = "0.18.0"

        @staticmethod
        def BPF(text: bytes, cflags: list[str]) -> Any:  # noqa: N802 - bcc's name
            import os

            os.write(2, b"3 warnings generated.\n" + UNKNOWN_HELPER_LOG.encode())
            raise Exception("Failed to load BPF program b'tracepoint__cgroup__cgroup_attach_task'")

    with pytest.raises(FenceUnavailable) as caught:
        toolkit.compile_with(Bcc, "int x;", toolkit.program_cflags([]))  # type: ignore[arg-type]
    reason = caught.value.reason
    assert reason.startswith(
        "this kernel (" + __import__("platform").release() + ") has no helper "
        "bpf_get_current_ancestor_cgroup_id for the tracepoint__cgroup__cgroup_attach_task program"
    )
    assert "could not compile" not in reason and "warnings generated" not in reason
    assert caught.value.fix is not None and "bpf/*.c" in caught.value.fix
