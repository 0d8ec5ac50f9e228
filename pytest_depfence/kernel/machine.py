"""The machine a fence needs: bcc found and checked, privileges, kernel headers, tracefs.

`preflight` checks every part without compiling (pytest's header, `depfence
doctor`, the first fence); each check raises FenceUnavailable whose `reason`
says what is missing and whose `fix` says what to run. bcc comes from the
distribution (it is not on PyPI), so it is found in the distro's
site-packages from a virtualenv, or where DEPFENCE_BCC_PATH says, and
`locate_bcc` finds it without loading it (a session that builds no fence
pays for no library load). Compiling and loading: `toolkit`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import importlib.util
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import cast

from ..cgroup import cgroup2_mount
from ..errors import FenceUnavailable

#: Set to a path list to say where the distro's `bcc` package lives (and only there).
BCC_PATH_ENV = "DEPFENCE_BCC_PATH"
BCC_INSTALL_HINT = (
    "install the distro package: apt-get install python3-bpfcc "
    "(bcc is not on PyPI; the PyPI package named 'bcc' is unrelated)"
)
BCC_REINSTALL_HINT = (
    "apt-get install --reinstall python3-bpfcc (or point DEPFENCE_BCC_PATH elsewhere)"
)
_DISTRO_DIRS = (
    "/usr/lib/python3/dist-packages",
    f"/usr/lib/python3.{sys.version_info.minor}/site-packages",
    f"/usr/lib64/python3.{sys.version_info.minor}/site-packages",
    "/usr/local/lib/python3/dist-packages",
)

#: The oldest bcc proven to build fences (Debian 11's and Ubuntu 22.04's python3-bpfcc).
#: Ring buffers, which every event travels on, came to bcc in 0.16.
MIN_BCC = (0, 18)
#: Before this bcc, tracepoint formats are read only from debugfs's tracing directory.
BCC_READS_TRACEFS = (0, 26)
DEBUGFS_TRACING = Path("/sys/kernel/debug/tracing")

# Capabilities a fence needs (include/uapi/linux/capability.h).
_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21
_CAP_BPF = 39


def import_bcc() -> ModuleType:
    """Import the distro's bcc into this interpreter without adding the distro's site-packages."""
    if "bcc" in sys.modules:
        return sys.modules["bcc"]
    configured = os.environ.get(BCC_PATH_ENV)
    if configured is None:
        try:
            import bcc  # noqa: PLC0415

            return cast(ModuleType, bcc)
        except ImportError:
            dirs: list[str] = list(_DISTRO_DIRS)
    else:
        dirs = [d for d in configured.split(os.pathsep) if d]
    for d in dirs:
        module = _import_bcc_from(Path(d) / "bcc" / "__init__.py")
        if module is not None:
            return module
    where = f"{BCC_PATH_ENV}={configured!r}" if configured is not None else ", ".join(dirs)
    raise FenceUnavailable(f"bcc is not installed (looked in {where})", fix=BCC_INSTALL_HINT)


def locate_bcc() -> tuple[Path, str]:
    """Where `import_bcc` would load bcc from, and its version, without loading it.

    Loading bcc costs a library load (libbcc and LLVM) and tens of milliseconds: too
    much for pytest's header in a session that builds no fence. The version is read
    from the package's `version.py`, which is what `bcc.__version__` holds.
    """
    loaded = sys.modules.get("bcc")
    if loaded is not None:
        init = getattr(loaded, "__file__", None)
        return Path(init or "bcc").parent, bcc_version(loaded)
    configured = os.environ.get(BCC_PATH_ENV)
    dirs: list[str] = []
    if configured is None:
        spec = importlib.util.find_spec("bcc")  # finds a top-level package without running it
        if spec is not None and spec.origin:
            return Path(spec.origin).parent, _version_file(Path(spec.origin).parent)
        dirs = list(_DISTRO_DIRS)
    else:
        dirs = [d for d in configured.split(os.pathsep) if d]
    for d in dirs:
        if (Path(d) / "bcc" / "__init__.py").is_file():
            return Path(d) / "bcc", _version_file(Path(d) / "bcc")
    where = f"{BCC_PATH_ENV}={configured!r}" if configured is not None else ", ".join(dirs)
    raise FenceUnavailable(f"bcc is not installed (looked in {where})", fix=BCC_INSTALL_HINT)


def _version_file(package: Path) -> str:
    try:
        text = (package / "version.py").read_text()
    except OSError:
        return "unknown"
    found = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", text, re.MULTILINE)
    return found[1] if found else "unknown"


def _import_bcc_from(init: Path) -> ModuleType | None:
    if not init.is_file():
        return None
    spec = importlib.util.spec_from_file_location(
        "bcc", init, submodule_search_locations=[str(init.parent)]
    )
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bcc"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules["bcc"]
        raise FenceUnavailable(
            f"bcc at {init.parent} does not load: {exc}", fix=BCC_REINSTALL_HINT
        ) from exc
    return module


def _effective_caps() -> int:
    with open("/proc/self/status", errors="replace") as f:  # Name: is any bytes
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges() -> None:
    caps = _effective_caps()
    needed = {"CAP_SYS_ADMIN": _CAP_SYS_ADMIN, "CAP_NET_ADMIN": _CAP_NET_ADMIN}
    # Before 5.8 there is no CAP_BPF and CAP_SYS_ADMIN covers it.
    if not caps & (1 << _CAP_SYS_ADMIN):
        needed["CAP_BPF"] = _CAP_BPF
    missing = [name for name, bit in needed.items() if not caps & (1 << bit)]
    if missing:
        raise FenceUnavailable(
            "a fence needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN); "
            f"this process (uid {os.geteuid()}) lacks {', '.join(missing)}",
            fix="run it as root (sudo), or give it CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN",
        )


def check_kernel_headers() -> Path:
    release = platform.release()
    build = Path("/lib/modules") / release / "build"
    if not (build / "include").is_dir():
        raise FenceUnavailable(
            f"no kernel header tree at {build} (bcc compiles the eBPF programs against it)",
            fix=(
                f"apt-get install linux-headers-{release}, or run scripts/bootstrap.sh; when "
                "this kernel has no packaged headers, link any distro header tree (e.g. "
                f"Debian's linux-headers-amd64) as {build}: the programs use only UAPI types"
            ),
        )
    return build


def _located_bcc_version() -> str:
    try:
        return locate_bcc()[1]
    except FenceUnavailable:
        return "unknown"


def tracefs_dir(mount: bool = True, bcc_version: str | None = None) -> Path | None:
    """Where bcc reads tracepoint formats. With `mount`, mounts tracefs (or, for a bcc
    older than 0.26, debugfs) when nothing is mounted; without, only checks that it could
    be (None: mountable, not mounted yet). `bcc_version`: the located bcc's by default."""
    version = _located_bcc_version() if bcc_version is None else bcc_version
    if reads_debugfs_only(version):
        # This bcc opens /sys/kernel/debug/tracing/events/... and nothing else; mounting
        # debugfs there brings tracefs along (the kernel automounts it at tracing/).
        candidates: tuple[Path, ...] = (DEBUGFS_TRACING,)
        target, fstype = DEBUGFS_TRACING.parent, b"debugfs"
        why = (
            f" (bcc {version} reads tracepoints only from {DEBUGFS_TRACING}; "
            "bcc 0.26+ also from tracefs)"
        )
        fix = f"mount -t debugfs none {target}"
    else:
        candidates = (Path("/sys/kernel/tracing"), DEBUGFS_TRACING)
        target, fstype, why = Path("/sys/kernel/tracing"), b"tracefs", ""
        fix = f"mount -t tracefs nodev {target}"
    for candidate in candidates:
        if (candidate / "events").is_dir():
            return candidate
    if not mount and target.is_dir():
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if target.is_dir() and libc.mount(b"nodev", str(target).encode(), fstype, 0, None) == 0:
        if (candidates[0] / "events").is_dir():
            return candidates[0]
        err = errno.ENOENT
    else:
        err = ctypes.get_errno()
    raise FenceUnavailable(
        f"{fstype.decode()} is not mounted and mounting it at {target} failed "
        f"({os.strerror(err)}){why}",
        fix=fix,
    )


@dataclass(frozen=True)
class MachineState:
    """What a fence is built from on this machine (shown in pytest's header)."""

    kernel: str
    cgroup2: Path
    bcc_version: str

    def describe(self) -> str:
        return f"kernel {self.kernel}, cgroup2 at {self.cgroup2}, bcc {self.bcc_version}"


def preflight(load_bcc: bool = True) -> MachineState:
    """Check every part a fence needs, without compiling; FenceUnavailable names the first gap.

    With `load_bcc=False` bcc is only found, not loaded (`locate_bcc`): cheap enough for
    pytest's header in a session that may build no fence at all.
    """
    check_privileges()
    version = bcc_version(import_bcc()) if load_bcc else locate_bcc()[1]
    check_bcc_version(version)
    check_kernel_headers()
    mount = cgroup2_mount()
    tracefs_dir(mount=False, bcc_version=version)  # a header or doctor check mounts nothing
    return MachineState(platform.release(), mount, version)


def bcc_version(bcc: ModuleType) -> str:
    return str(getattr(bcc, "__version__", "unknown"))


def version_tuple(version: str) -> tuple[int, ...] | None:
    """(0, 18, 0) for "0.18.0" or "0.18.0+ds"; None when the version is not understood."""
    found = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", version.strip())
    if found is None:
        return None
    return tuple(int(part) for part in found.groups() if part is not None)


def reads_debugfs_only(version: str) -> bool:
    """Whether this bcc reads tracepoint formats from debugfs only (before 0.26)."""
    return _older_than(version, BCC_READS_TRACEFS)


def _older_than(version: str, bound: tuple[int, ...]) -> bool:
    """Whether a bcc version is known to be older than `bound` (unknown: assume not)."""
    parsed = version_tuple(version)
    return parsed is not None and parsed < bound


def check_bcc_version(version: str) -> None:
    """FenceUnavailable when this bcc is older than MIN_BCC."""
    if _older_than(version, MIN_BCC):
        minimum = ".".join(map(str, MIN_BCC))
        raise FenceUnavailable(
            f"bcc {version} is older than {minimum}, the oldest bcc pytest-depfence is "
            "tested with (its events travel on ring buffers, which bcc has from 0.16)",
            fix=(
                f"install python3-bpfcc {minimum} or newer (Debian 11 and Ubuntu 22.04: 0.18, "
                "Debian 12: 0.26, Ubuntu 24.04: 0.29), or point DEPFENCE_BCC_PATH at one"
            ),
        )
