"""The seccomp filter a fenced command inherits (pytest_depfence/seccomp.py).

The program is checked as data everywhere; as root it is also put on a real thread by
`confine.start`, and a real child tries what it refuses: signalling the protected pid
(this test process) and its process group, reaching a BPF object by id, taking a
descriptor with pidfd_getfd, while what it allows still works.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading

import pytest

from pytest_depfence import confine, seccomp

MANY = list(range(100_000, 100_700))  # a process with hundreds of threads


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
@pytest.mark.parametrize("protected", [[os.getpid(), 1], MANY], ids=["two", "700"])
def test_every_jump_lands_inside_the_program_on_a_return(
    machine: str, protected: list[int]
) -> None:
    code = seccomp.program(protected, machine=machine, groups=())
    assert code, "no filter for a machine it knows"
    returns = {at for at, (op, _, _, _) in enumerate(code) if op == 0x06}
    for at, (op, jt, jf, k) in enumerate(code):
        if op == 0x15:  # jeq: a label is a load or a return, never past the end
            assert at + 1 + jt < len(code) and at + 1 + jf < len(code)
            assert jt <= 255 and jf <= 255
        if op == 0x05:  # ja
            assert at + 1 + k < len(code)
    assert code[-1][0] == 0x06 and len(code) - 1 in returns


def run_filter(code: list[seccomp.Instruction], arch: int, nr: int, *args: int) -> int:
    """What `code` returns for a syscall: a classic BPF interpreter for the instructions
    program() emits (it stands in for the kernel's, which the tests below use as root)."""
    data = [nr, arch, 0, 0, *(word for arg in args for word in (arg & 0xFFFFFFFF, 0))]
    acc, at = 0, 0
    while True:
        op, jt, jf, k = code[at]
        at += 1
        if op == 0x20:  # ld [k]
            acc = data[k // 4] if k // 4 < len(data) else 0
        elif op == 0x54:  # and #k
            acc &= k
        elif op == 0x15:  # jeq #k
            at += jt if acc == k else jf
        elif op == 0x05:  # ja
            at += k
        elif op == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"instruction {op:#x} is not one program() emits")


EPERM = 0x00050000 | 1


@pytest.mark.parametrize("protected", [[os.getpid(), 1], MANY], ids=["two", "700"])
def test_each_protected_pid_is_refused_and_no_other(protected: list[int]) -> None:
    code = seccomp.program(protected, machine="x86_64", groups=(4242,))
    x86 = seccomp.AUDIT_ARCH_X86_64
    kill, tgkill, fcntl = 62, 234, 72
    for pid in protected:
        assert run_filter(code, x86, kill, pid, 0) == EPERM, pid
        assert run_filter(code, x86, tgkill, pid, pid, 0) == EPERM, pid
        assert run_filter(code, x86, fcntl, 3, seccomp.F_SETOWN, pid) == EPERM, pid
    assert run_filter(code, x86, kill, -4242, 0) == EPERM  # the group
    assert run_filter(code, x86, kill, -1, 0) == EPERM
    for other in (2, 99_999, 100_700, 12_345_678):
        assert run_filter(code, x86, kill, other, 0) == 0x7FFF0000, other
        assert run_filter(code, x86, fcntl, 3, seccomp.F_SETOWN, other) == 0x7FFF0000
    assert run_filter(code, x86, 321, 13) == EPERM  # bpf(BPF_PROG_GET_FD_BY_ID)
    assert run_filter(code, x86, 39) == 0x7FFF0000  # getpid


def test_a_machine_it_does_not_know_gets_no_filter() -> None:
    assert seccomp.program([os.getpid()], machine="riscv64") == []


# A child of the filtered thread reports what each call gave: "ok" or the errno's name.
PROBE = r"""
import ctypes, errno, fcntl, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
owner = int(sys.argv[1])
nr = {"x86_64": {"bpf": 321, "pidfd_getfd": 438}, "aarch64": {"bpf": 280, "pidfd_getfd": 438}}[
    os.uname().machine]
def call(what, fn):
    try:
        fn()
        print(what, "ok")
    except OSError as exc:
        print(what, errno.errorcode[exc.errno])
def bpf_by_id():
    attr = ctypes.create_string_buffer(128)
    ctypes.c_uint32.from_buffer(attr, 0).value = 1  # prog id 1, whatever it is
    if libc.syscall(nr["bpf"], 13, attr, 128) < 0 and ctypes.get_errno() == errno.EPERM:
        raise OSError(errno.EPERM, "")
def getfd():
    if libc.syscall(nr["pidfd_getfd"], 0, 0, 0) < 0:
        raise OSError(ctypes.get_errno(), "")
call("kill-owner", lambda: os.kill(owner, 0))
call("kill-owner-thread", lambda: os.kill(int(sys.argv[2]), 0))
r, w = os.pipe()
call("sigio-to-owner", lambda: fcntl.fcntl(r, fcntl.F_SETOWN, owner))
call("sigio-to-self", lambda: fcntl.fcntl(r, fcntl.F_SETOWN, os.getpid()))
call("kill-group", lambda: os.killpg(os.getpgid(owner), 0))
call("kill-everything", lambda: os.kill(-1, 0))
call("kill-self", lambda: os.kill(os.getpid(), 0))
call("bpf-by-id", bpf_by_id)
call("pidfd-getfd", getfd)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a filter without no_new_privs")
@pytest.mark.skipif(platform.machine() not in seccomp.ARCHES, reason="no filter here")
@pytest.mark.parametrize("others", [[], list(range(2, 602))], ids=["alone", "600 before it"])
def test_a_filtered_child_may_not_touch_the_protected_process_nor_bpf_objects(
    others: list[int],
) -> None:
    # "600 before it": protected pids that sort before this process's, so its checks come
    # after three runs of 250 (seccomp.py _NEAR); the pids 2-601 themselves are never
    # signalled here.
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        child = confine.start(
            lambda: subprocess.Popen(
                [sys.executable, "-c", PROBE, str(os.getpid()), str(thread.native_id)],
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            ),
            raw_sockets=False,
            protect=[*others, os.getpid(), thread.native_id or 0],
        )
        out, _ = child.communicate(timeout=30)
    finally:
        stop.set()
        thread.join()
    said = dict(line.split() for line in out.splitlines())
    # Where pids wrap (pid_max 32768), the probe itself may get one of the 600: then it is
    # protected like them.
    own = "EPERM" if child.pid in others else "ok"
    assert said == {
        "kill-owner": "EPERM",
        "kill-owner-thread": "EPERM",
        "sigio-to-owner": "EPERM",
        "sigio-to-self": own,
        "kill-group": "EPERM",
        "kill-everything": "EPERM",
        "kill-self": own,
        "bpf-by-id": "EPERM",
        "pidfd-getfd": "ENOSYS",
    }
    # The filter is the child's: this process and its threads are as free as before.
    os.kill(os.getpid(), 0)
