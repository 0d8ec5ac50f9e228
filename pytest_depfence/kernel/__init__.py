"""The kernel side: the bcc toolkit, the C<->Python contract, and the loaded programs.

    machine   finding bcc, checking the machine (privileges, headers, tracefs)
    toolkit   compiling, loading, bpf_link
    kallsyms  the compile's thread, which sees a /proc/kallsyms of two lines
    progload  BPF_PROG_LOAD by syscall (bcc < 0.25) and the helper probe
    tracing   the raw tracepoints' machine-dependent -D flags (syscall ABI, BTF offsets)
    abi       every constant, event struct and hash both C and Python use
    programs  the program set loaded once per process, its maps and events
    batch     a whole map read, and many of its keys deleted, a batch per syscall

The rest of the package uses only the names below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .abi import BypassEvent, ConnEvent, EscapeEvent, Owner, ProcRecord, UnixEvent
    from .machine import (
        BCC_INSTALL_HINT,
        BCC_PATH_ENV,
        MachineState,
        check_kernel_headers,
        check_privileges,
        import_bcc,
        preflight,
        tracefs_dir,
    )
    from .programs import KernelFence, Listener, Programs, load, loaded
    from .toolkit import bpf_source_dir, probe_link_support, program_text

#: Where each name lives, imported at its first use: the report header's machine check
#: (`preflight`) needs only `machine`, and a session that builds no fence then pays for no
#: more (toolkit, abi and programs: ~20 ms).
_HOMES = {
    **dict.fromkeys(
        ("BypassEvent", "ConnEvent", "EscapeEvent", "Owner", "ProcRecord", "UnixEvent"), "abi"
    ),
    **dict.fromkeys(("KernelFence", "Listener", "Programs", "load", "loaded"), "programs"),
    **dict.fromkeys(
        (
            "BCC_INSTALL_HINT",
            "BCC_PATH_ENV",
            "MachineState",
            "check_kernel_headers",
            "check_privileges",
            "import_bcc",
            "preflight",
            "tracefs_dir",
        ),
        "machine",
    ),
}


_SUBMODULES = frozenset(
    {"abi", "batch", "kallsyms", "machine", "progload", "programs", "toolkit", "tracing"}
)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # `kernel.toolkit.X` before anything imported it
        return importlib.import_module(f".{name}", __name__)
    module = _HOMES.get(name, "toolkit" if name in __all__ else None)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "BCC_INSTALL_HINT",
    "BCC_PATH_ENV",
    "BypassEvent",
    "ConnEvent",
    "EscapeEvent",
    "KernelFence",
    "Listener",
    "MachineState",
    "Owner",
    "ProcRecord",
    "Programs",
    "UnixEvent",
    "bpf_source_dir",
    "check_kernel_headers",
    "check_privileges",
    "import_bcc",
    "load",
    "loaded",
    "preflight",
    "probe_link_support",
    "program_text",
    "tracefs_dir",
]
