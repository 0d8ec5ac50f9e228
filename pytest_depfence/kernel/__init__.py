"""The kernel side: the bcc toolkit, the C<->Python contract, and the loaded programs.

    toolkit   finding bcc, checking the machine, compiling, bpf_link
    progload  BPF_PROG_LOAD by syscall (bcc < 0.25) and the helper probe
    tracing   the raw tracepoints' machine-dependent -D flags (syscall ABI, BTF offsets)
    abi       every constant, event struct and hash both C and Python use
    programs  the program set loaded once per process, its maps and events
    batch     a whole map read, and many of its keys deleted, a batch per syscall

The rest of the package uses only the names below.
"""

from __future__ import annotations

from .abi import BypassEvent, ConnEvent, EscapeEvent, Owner, ProcRecord, UnixEvent
from .programs import KernelFence, Listener, Programs, load
from .toolkit import (
    BCC_INSTALL_HINT,
    BCC_PATH_ENV,
    MachineState,
    bpf_source_dir,
    check_kernel_headers,
    check_privileges,
    import_bcc,
    preflight,
    probe_link_support,
    program_text,
    tracefs_dir,
)

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
    "preflight",
    "probe_link_support",
    "program_text",
    "tracefs_dir",
]
