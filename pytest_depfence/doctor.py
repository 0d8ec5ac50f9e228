"""`depfence doctor`: what a fence needs on this machine, checked step by step.

Each check is a probe that says what it found, or raises. The fix comes with
the error: a `FenceUnavailable(reason, fix=...)` is shown as its reason and
its fix; `_fallback_fix` is the one place for advice an error does not carry.
The last check builds what a fence builds: it compiles the eBPF programs and
attaches them to a temporary cgroup, then detaches them and removes it.

Privileges come first: without them the cgroup tree is not writable and
tracefs not readable, which says nothing about the machine. Those checks are
then SKIPs that say they need root (with what can be seen without it), so the
one failure shown is the true cause and its fix.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import FenceUnavailable

#: Some check failed (or was skipped because an earlier one failed).
FAILED_EXIT = 1

EPILOG = """\
examples:
  sudo depfence doctor
  DEPFENCE_BCC_PATH=/opt/bcc/python depfence doctor   # look for bcc only there

Each check prints OK, FAIL (with what to do) or SKIP (needs an earlier check,
or root: run as another user, it checks what it can and says what needs root).
The last check compiles the eBPF programs and attaches them to a temporary
cgroup, then detaches them and removes it.

exit codes: 0 when every check passes, 1 otherwise.
"""


@dataclass(frozen=True)
class Check:
    """One line of `depfence doctor`: status OK, FAIL or SKIP, what was found, what to do."""

    name: str
    status: str
    detail: str
    fix: str | None = None


def run_check(name: str, probe: Callable[[], str]) -> Check:
    """Run one probe: OK with what it found, or FAIL with why and what to do."""
    try:
        return Check(name, "OK", probe())
    except FenceUnavailable as exc:
        return Check(name, "FAIL", exc.reason, exc.fix or _fallback_fix(exc))
    except Exception as exc:  # noqa: BLE001 - every failure is a finding, shown with its fix
        return Check(name, "FAIL", str(exc).strip() or type(exc).__name__, _fallback_fix(exc))


def _fallback_fix(exc: Exception) -> str:
    """What to do when the error carries no fix: the one place such advice lives.

    Every FenceUnavailable carries its fix; an attach the kernel refuses is an
    OSError, and anything else is a failure nobody could foresee.
    """
    if isinstance(exc, OSError):
        return "attaching needs bpf_link for cgroups (Linux 5.7+) and root in this cgroup tree"
    return "report it with this output, uname -r and the bcc version (depfence doctor)"


# --------------------------------------------------------------------------- probes


def _privileges() -> str:
    from .kernel import check_privileges

    check_privileges()
    uid = os.geteuid()
    return "root (uid 0)" if uid == 0 else f"uid {uid} with CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN"


def _kernel() -> str:
    release = platform.release()
    numbers = [int(part) for part in release.split("-")[0].split(".")[:2] if part.isdigit()]
    if len(numbers) < 2:
        return f"{release} (version not understood; 5.8 or newer is needed)"
    if tuple(numbers) < (5, 8):
        raise FenceUnavailable(
            f"Linux {release} is older than 5.8 (ring buffers 5.8, bpf_link for cgroups 5.7)",
            fix="use Linux 5.8 or newer",
        )
    return f"Linux {release} (5.8 or newer is needed)"


def _cgroup2() -> str:
    from .cgroup import cgroup2_mount

    mount = cgroup2_mount()
    if not os.access(mount, os.W_OK):
        raise FenceUnavailable(
            f"cgroup v2 is mounted at {mount}, but it is not writable here",
            fix="run it as root where the cgroup v2 tree is mounted read-write",
        )
    from .confine import read_cgroup2_mount

    found = read_cgroup2_mount()
    wanted = ("nsdelegate", "favordynmods")
    missing = [o for o in wanted if found is None or o not in found.super_options]
    if not missing:
        return f"mounted at {mount}, with {' and '.join(wanted)}"
    return (
        f"mounted at {mount}, without {' and '.join(missing)}: a fence turns nsdelegate on, "
        "and favordynmods where the kernel has it (6.0+: a run's move into its cgroup "
        "waits for no RCU grace period)"
    )


def _cgroup2_unprivileged() -> str:
    from .cgroup import cgroup2_mount

    # Whether it is mounted does not depend on privileges; whether it is writable does.
    return f"mounted at {cgroup2_mount()}"


def _bcc() -> str:
    from .kernel import import_bcc, machine, toolkit

    bcc = import_bcc()
    version = machine.bcc_version(bcc)
    machine.check_bcc_version(version)
    init = getattr(bcc, "__file__", None)
    where = Path(init).parent if init else "(built in)"
    notes = []
    if not toolkit.load_func_takes_attach_type(bcc.BPF):
        notes.append("programs loaded by syscall: its load_func() takes no attach_type")
    if machine.reads_debugfs_only(version):
        notes.append(f"tracepoints read from {machine.DEBUGFS_TRACING} only")
    minimum = ".".join(map(str, machine.MIN_BCC))
    return f"{version} from {where} ({minimum} or newer is needed)" + "".join(
        f"; {note}" for note in notes
    )


def _headers() -> str:
    from .kernel import check_kernel_headers

    build = check_kernel_headers()
    real = build.resolve()
    return f"{build}" + (f" -> {real}" if real != build else "")


def _tracefs() -> str:
    from .kernel import tracefs_dir

    try:
        where = tracefs_dir(mount=False)  # a check must not mount anything
    except PermissionError as exc:
        raise FenceUnavailable(
            f"tracefs is not readable here: {exc}",
            fix="run it as root (tracefs is readable by root only on most systems)",
        ) from exc
    if where is None:
        return "not mounted; mountable at /sys/kernel/tracing (a fence mounts it on first use)"
    return f"mounted at {where}"


def _tracefs_unprivileged() -> str:
    # Mounts are listed for everyone; the tracing directory is readable by root only.
    with open("/proc/self/mountinfo", errors="surrogateescape") as f:  # paths: any bytes
        mounts = [line.split() for line in f]
    where = [fields[4] for fields in mounts if "tracefs" in fields[fields.index("-") + 1 :][:1]]
    return f"mounted at {where[0]}" if where else "not mounted (a fence mounts it as root)"


def _limits() -> str:
    """Where `fence(memory=, cpus=, pids=)` would be enforced; a controller the machine lacks
    makes only that limit unavailable, not the fence (so this check does not fail)."""
    from .cgroup import cgroup2_mount
    from .limits import Limits, where_enforced

    mount = cgroup2_mount()
    found = []
    each = {"memory": Limits(memory=1 << 30), "cpus": Limits(cpus=1.0), "pids": Limits(pids=1)}
    for name, limits in each.items():
        try:
            (place,) = where_enforced(mount, limits).values()
            found.append(f"{name}: {'cgroup v2' if place is None else f'cgroup v1 at {place}'}")
        except FenceUnavailable as exc:
            found.append(f"{name}: unavailable ({exc.reason.split(',')[0]})")
    return "; ".join(found)


def _entry() -> str:
    """What a fenced command enters its fence through (confine.py)."""
    from . import confine, enter

    tools = confine.find_tools()
    if tools.enter is not None:
        return f"depfence-enter ({tools.enter}): a command enters its fence in one exec"
    return (
        f"/bin/sh and {tools.unshare}, about 1 ms more a run than depfence-enter, "
        f"which is not used: {enter.reason()}"
    )


#: What compile+attach says of how a datagram's sender is named here (bpf/egress.c).
SENDERS_PER_TASK = "a datagram is named by the task that sends it (cgroup_skb reads it: 6.10+)"
SENDERS_BY_SOCKET = (
    "a datagram is named by its socket's owner: this kernel's cgroup_skb programs cannot "
    "read the sending task (6.10+ can); a child writing on its parent's socket is named "
    "as the parent, and the report says `socket opened by`"
)


def _compile_and_attach() -> str:
    from . import kernel
    from .cgroup import CgroupTree, FenceCgroup

    started = time.monotonic()
    programs = kernel.load()
    compiled = time.monotonic() - started
    tree = CgroupTree()
    tree.ensure()
    try:
        cgroup = FenceCgroup(tree.session, "doctor")
        try:
            links = programs.attach(cgroup.dir_fd)
            for fd in links:
                os.close(fd)
        finally:
            cgroup.close()
        if cgroup.path.exists():
            raise FenceUnavailable(
                f"the temporary cgroup {cgroup.path} could not be removed",
                fix=f"rmdir {cgroup.path} once nothing runs in it, and report this output",
            )
    finally:
        tree.remove()
    per_task = "-DDEPFENCE_NO_SKB_CURRENT_TASK=1" not in kernel.toolkit.kernel_cflags()
    return (
        f"{len(links)} programs ready in {compiled:.1f} s ({programs.built}), attached to "
        f"{cgroup.path}, then detached and removed\n"
        + (SENDERS_PER_TASK if per_task else SENDERS_BY_SOCKET)
    )


@dataclass(frozen=True)
class Probe:
    """One check: its name, its probe, and for a check that needs root, what it can
    find without root and what the rest is (None: the check needs no privileges)."""

    name: str
    probe: Callable[[], str]
    unprivileged: Callable[[], str] | None = None
    needs_root_for: str = ""


PROBES: tuple[Probe, ...] = (
    Probe("privileges", _privileges),
    Probe("kernel", _kernel),
    Probe("cgroup v2", _cgroup2, _cgroup2_unprivileged, "making fence cgroups there"),
    Probe("bcc", _bcc),
    Probe("kernel headers", _headers),
    Probe("tracefs", _tracefs, _tracefs_unprivileged, "reading its tracepoints"),
    Probe("limits", _limits),
    Probe("entry", _entry),
)
#: The detail of a check skipped for want of privileges.
NEEDS_ROOT = "needs root (see privileges)"


def _without_root(probe: Probe) -> Check:
    """What a check that needs root can say without it: a SKIP, or a FAIL that root
    would not fix (no cgroup v2 mount at all)."""
    assert probe.unprivileged is not None
    found = run_check(probe.name, probe.unprivileged)
    if found.status != "OK":
        return found
    return Check(probe.name, "SKIP", f"{found.detail}; {probe.needs_root_for} {NEEDS_ROOT}")


def doctor_checks() -> Iterator[Check]:
    """Every check, in order; the compile-and-attach step runs only when the rest passed.

    Without privileges, the checks that need them are skipped rather than failed:
    their failure would blame the cgroup tree or tracefs for what is only a lack of root.
    """
    failed = False
    privileged = True
    for probe in PROBES:
        if not privileged and probe.unprivileged is not None:
            found = _without_root(probe)
        else:
            found = run_check(probe.name, probe.probe)
        if probe.name == "privileges":
            privileged = found.status == "OK"
        failed = failed or found.status != "OK"
        yield found
    if not privileged:
        yield Check("compile+attach", "SKIP", NEEDS_ROOT)
    elif failed:
        yield Check("compile+attach", "SKIP", "needs every check above to pass")
    else:
        yield run_check("compile+attach", _compile_and_attach)


def as_root_command() -> str:
    """This check again, as root, in a form sudo runs whatever its PATH (a virtualenv's too)."""
    return f"sudo {shlex.quote(sys.executable)} -m pytest_depfence doctor"


def format_check(check: Check) -> str:
    lines = check.detail.splitlines() or [""]
    out = [f"{check.status:<5} {check.name:<15} {lines[0]}"]
    out += [f"{'':22}{line}" for line in lines[1:]]
    if check.fix:
        out.append(f"{'':22}fix: {check.fix}")
    return "\n".join(out)


def main() -> int:
    """Print every check as it completes and a verdict; FAILED_EXIT unless all passed."""
    print("depfence doctor: what a fence needs on this machine", flush=True)
    checks = []
    for found in doctor_checks():
        checks.append(found)
        print(format_check(found), flush=True)
    failed = sum(c.status == "FAIL" for c in checks)
    skipped = sum(c.status == "SKIP" for c in checks)
    if not failed and not skipped:
        print(f"all {len(checks)} checks passed: fences can be built here")
        return 0
    summary = f"{failed} of {len(checks)} checks failed" + (
        f", {skipped} skipped" if skipped else ""
    )
    if any(NEEDS_ROOT in c.detail for c in checks):
        print(f"{summary}; the skipped ones need root: {as_root_command()}")
    else:
        print(f"{summary}; fix them in order (later checks need the earlier ones)")
    return FAILED_EXIT
