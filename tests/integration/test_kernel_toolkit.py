"""When compiling or loading fails, the reason says what failed, with bcc's and the kernel's words.

Real compiles and loads with the machine's bcc: a define missing from the -D
list stops the compile at bpf/abi.h's guard; a program the verifier rejects is
blamed on the verifier, with its log; a program the kernel refuses before
verifying it is not. The BPF_PROG_LOAD path that bcc 0.18..0.24 take (their
load_func() has no attach_type) is run here on whatever bcc the machine has:
every program loads with its attach type and attaches to a cgroup. The compile
reads the short /proc/kallsyms of kernel/kallsyms.py, in its own thread only.
"""

from __future__ import annotations

import errno
import os
import platform
import tempfile
from pathlib import Path
from types import ModuleType

import pytest
from helpers_net import skip_or_fail

from pytest_depfence.errors import FenceUnavailable
from pytest_depfence.kernel import abi, kallsyms, machine, progload, program_text, toolkit, tracing

if os.geteuid() != 0:
    pytest.skip("loading programs needs root", allow_module_level=True)

#: f reads through a scalar (the verifier says no); g is fine but asks for the wrong attach type.
BAD = b"""
int f(struct __sk_buff *skb) { char *p = (char *)(long)skb->len; return *p; }
int g(struct __sk_buff *skb) { return 1; }
"""


@pytest.fixture(scope="module")
def bcc(pytestconfig: pytest.Config) -> ModuleType:
    try:
        machine.preflight()
        return machine.import_bcc()
    except FenceUnavailable as exc:
        skip_or_fail(pytestconfig, exc)


def test_a_missing_define_stops_the_compile_at_its_guard(bcc: ModuleType) -> None:
    flags = [f for f in abi.cflags() if not f.startswith("-DDNS_NAME_MAX=")]
    with pytest.raises(FenceUnavailable) as caught:
        toolkit.compile_with(bcc, program_text(), toolkit.program_cflags(flags))
    assert "could not compile the eBPF programs" in caught.value.reason
    assert '"DNS_NAME_MAX is not defined: pass the -D flags of' in caught.value.reason
    assert caught.value.fix


#: Compiles only where bcc found bpf_probe_read_kernel in /proc/kallsyms: else bcc defines
#: it as bpf_probe_read (its fallback for kernels before 5.5).
SEES_PROBE_READ_KERNEL = b"""
#ifdef bpf_probe_read_kernel
#error bcc did not find bpf_probe_read_kernel in /proc/kallsyms
#endif
int f(struct __sk_buff *skb) { return 1; }
"""


def test_the_compile_reads_the_short_kallsyms_the_helpers_in_it(bcc: ModuleType) -> None:
    assert kallsyms.call_with_short_kallsyms(kallsyms.KALLSYMS_PATH.read_bytes) == (
        kallsyms.SHORT_KALLSYMS
    )
    assert (
        toolkit.compile_with(bcc, SEES_PROBE_READ_KERNEL.decode(), toolkit.program_cflags([]))
        is not None
    )


def test_without_the_helpers_in_the_short_kallsyms_bcc_takes_them_for_missing(
    bcc: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compile above passes because bcc read the short file: with nothing in it, the
    same compile stops at the #error."""
    monkeypatch.setattr(kallsyms, "SHORT_KALLSYMS", b"")
    with pytest.raises(FenceUnavailable) as caught:
        toolkit.compile_with(bcc, SEES_PROBE_READ_KERNEL.decode(), toolkit.program_cflags([]))
    assert "bcc did not find bpf_probe_read_kernel" in caught.value.reason


def test_the_short_kallsyms_is_seen_by_the_compile_thread_only() -> None:
    """Not by this thread after, nor by the machine (the mount went with the thread's own
    namespace, and never reached pid 1's); its file is removed."""
    before = set(Path(tempfile.gettempdir()).glob("depfence-kallsyms-*"))
    kallsyms.call_with_short_kallsyms(lambda: None)
    with kallsyms.KALLSYMS_PATH.open("rb") as real:
        assert real.readline() not in kallsyms.SHORT_KALLSYMS.splitlines(keepends=True)
    for pid in ("self", "1"):
        assert "kallsyms" not in Path(f"/proc/{pid}/mountinfo").read_text()
    assert set(Path(tempfile.gettempdir()).glob("depfence-kallsyms-*")) == before


def test_without_a_temporary_file_the_compile_reads_the_real_kallsyms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def first_line() -> bytes:
        with kallsyms.KALLSYMS_PATH.open("rb") as f:
            return f.readline()

    monkeypatch.setattr(tempfile, "tempdir", "/nonexistent-depfence-test-dir")
    assert kallsyms.call_with_short_kallsyms(first_line) == first_line()


def test_what_the_compile_thread_raises_is_raised_in_the_caller() -> None:
    def fails() -> None:
        raise ValueError("from the compile thread")

    with pytest.raises(ValueError, match="from the compile thread"):
        kallsyms.call_with_short_kallsyms(fails)


def test_a_verifier_rejection_is_blamed_on_the_verifier_with_its_log(bcc: ModuleType) -> None:
    bpf = bcc.BPF(text=BAD)
    with pytest.raises(FenceUnavailable) as caught:
        toolkit.load_program(bpf, "f", toolkit.PROG_TYPE_CGROUP_SKB, toolkit.ATTACH_TYPES["egress"])
    reason = caught.value.reason
    assert reason.startswith("the kernel's verifier rejected the f program")
    assert "invalid mem access" in reason  # the verifier's own words
    assert "processed" in reason and "insns" in reason


def test_a_refusal_before_verifying_does_not_blame_the_verifier(bcc: ModuleType) -> None:
    bpf = bcc.BPF(text=BAD)
    connect4 = toolkit.ATTACH_TYPES["connect4"]  # not an attach type of a cgroup_skb program
    with pytest.raises(FenceUnavailable) as caught:
        toolkit.load_program(bpf, "g", toolkit.PROG_TYPE_CGROUP_SKB, connect4)
    reason = caught.value.reason
    assert reason.startswith("loading the g program failed: ")
    assert "Invalid argument" in reason
    assert "verifier" not in reason


def test_every_program_loads_by_syscall_with_its_attach_type_and_attaches(bcc: ModuleType) -> None:
    """The path bcc 0.18..0.24 take (their load_func() has no attach_type), on this bcc too."""
    from pytest_depfence.cgroup import CgroupTree, FenceCgroup

    bpf = toolkit.compile_with(bcc, program_text(), toolkit.program_cflags(abi.cflags()))
    loaded = {}
    for name in toolkit.ATTACH_TYPES:
        loaded[name] = progload.load_by_syscall(bpf, name, *toolkit.cgroup_program_kind(name))
    tree = CgroupTree()
    tree.ensure()
    links = []
    try:
        cgroup = FenceCgroup(tree.session, "syscall-load")
        try:
            for name, attach_type in toolkit.ATTACH_TYPES.items():
                links.append(toolkit.bpf_link_create(loaded[name].fd, cgroup.dir_fd, attach_type))
        finally:
            for fd in links:
                os.close(fd)
            cgroup.close()
    finally:
        tree.remove()
        for program in loaded.values():
            os.close(program.fd)
    assert len(links) == len(toolkit.ATTACH_TYPES)


def test_a_sock_addr_program_without_its_attach_type_is_refused_by_syscall(bcc: ModuleType) -> None:
    bpf = bcc.BPF(text=b"int h(struct bpf_sock_addr *ctx) { return 1; }")
    with pytest.raises(progload.ProgramLoadError) as caught:
        progload.load_by_syscall(bpf, "h", toolkit.PROG_TYPE_CGROUP_SOCK_ADDR, 0)
    assert caught.value.errno == errno.EINVAL
    assert str(caught.value) == "Failed to load BPF program b'h': Invalid argument"
    fn = progload.load_by_syscall(
        bpf, "h", toolkit.PROG_TYPE_CGROUP_SOCK_ADDR, toolkit.ATTACH_TYPES["connect4"]
    )
    os.close(fn.fd)


def test_a_verifier_rejection_by_syscall_carries_the_verifier_log(bcc: ModuleType) -> None:
    bpf = bcc.BPF(text=BAD)
    with pytest.raises(progload.ProgramLoadError) as caught:
        progload.load_by_syscall(bpf, "f", toolkit.PROG_TYPE_CGROUP_SKB, 1)
    assert caught.value.errno == errno.EACCES
    assert "invalid mem access" in caught.value.verifier_log
    assert "processed" in caught.value.verifier_log


def _has_table(bpf: object, name: bytes) -> bool:
    try:
        bpf.get_table(name)  # type: ignore[attr-defined]
    except KeyError:
        return False
    return True


@pytest.mark.parametrize("ancestors", [True, False], ids=["5.14+", "before 5.14"])
@pytest.mark.parametrize("btf", [True, False], ids=["BTF", "no BTF"])
def test_every_fallback_of_the_programs_compiles_and_loads_here_too(
    bcc: ModuleType, ancestors: bool, btf: bool
) -> None:
    """Kernels older than 5.14 (tracing programs without bpf_get_current_ancestor_cgroup_id:
    subcgroups.c) and kernels without BTF (the struct offsets raw tracepoints need: classic
    tracepoints for the three that read them; hostsfile.c without its descriptor check)
    build here too; the rest is raw tracepoints.
    A variant that needs what this kernel lacks is skipped (it runs the other one)."""
    if ancestors and not progload.has_helper(toolkit.PROG_TYPE_RAW_TRACEPOINT, 123):
        pytest.skip("this kernel's tracing programs lack bpf_get_current_ancestor_cgroup_id")
    no_btf = ["-DDEPFENCE_NO_BTF_OFFSETS=1", "-DDEPFENCE_NO_FD_INODE=1"]
    offsets = tracing.btf_cflags() if btf else no_btf
    if offsets == no_btf and btf:
        pytest.skip("this kernel has no BTF")
    extra = [] if ancestors else ["-DDEPFENCE_NO_TRACING_ANCESTORS=1"]
    cgroup_tps = ["cgroup_attach_task"] + ([] if ancestors else ["cgroup_mkdir", "cgroup_rmdir"])
    needs_offsets = {f"cgroup:{tp}" for tp in cgroup_tps} | {"sched:sched_process_fork"}
    raw = {"sys_enter", "sys_exit", "sched_process_exit"}
    if btf:
        raw |= {tp.split(":")[1] for tp in needs_offsets}
    flags = [*abi.cflags(), *tracing.syscall_cflags(), *offsets, *extra]
    bpf = bcc.BPF(text=program_text().encode(), cflags=flags)
    try:
        assert _has_table(bpf, b"subcgroups") == (not ancestors)
        assert {tp.decode() for tp in bpf.tracepoint_fds} == (set() if btf else needs_offsets)
        assert {tp.decode() for tp in bpf.raw_tracepoint_fds} == raw
    finally:
        bpf.cleanup()


def test_the_helper_probe_tells_a_helper_from_none() -> None:
    raw = toolkit.PROG_TYPE_RAW_TRACEPOINT
    assert progload.has_helper(raw, 14)  # bpf_get_current_pid_tgid, 4.2
    assert not progload.has_helper(raw, 100_000)
    flags = toolkit.kernel_cflags()
    assert ("-DDEPFENCE_NO_TRACING_ANCESTORS=1" in flags) == (not progload.has_helper(raw, 123))
    # cgroup_skb programs read the current task from 6.10 (bpf/egress.c names datagrams by it).
    skb_task = progload.has_helper(toolkit.PROG_TYPE_CGROUP_SKB, 14)
    assert ("-DDEPFENCE_NO_SKB_CURRENT_TASK=1" in flags) == (not skb_task)
    release = tuple(int(part) for part in platform.release().split(".")[:2])
    assert skb_task or release < (6, 10), platform.release()  # older: unless backported
    assert [f for f in flags if f.startswith("-DSYS_")] == [
        f for f in tracing.syscall_cflags() if f.startswith("-DSYS_")
    ]
