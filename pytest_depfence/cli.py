"""The `depfence` command: fenced runs, audits and a machine check, outside pytest.

Three subcommands on the same core as the plugin (this module never imports
pytest):

- `depfence run`: run one command fenced, stream its output through as it
  runs, and log one line per egress event on stderr as it happens.
- `depfence audit`: run one command in audit mode (nothing blocked) and print
  what it contacted, or write that as a contract file.
- `depfence doctor`: check, step by step, that this machine can build a fence.

Exit codes (`RUN_EXIT_CODES`, `AUDIT_EXIT_CODES`): `run` and `audit` never mask
the command's own failure; `run` never exits 0 after forbidden egress.

Event log lines, on stderr, in the key=value shape of GitHub's fence (one line each):

    WARN DNS BLOCKED reason=FromDNSRequest blocked=true blockedAt=dns
        domain=github.com. pid=266767 cmd="curl github.com" firewallMethod=blocklist

`WARN` for everything the policy forbids (BLOCKED; AUDITED in audit mode;
FORBIDDEN for a name that still resolves because the outage is reset or
blackhole), `INFO` for what it permits (ALLOWED: DNS answers and each
permitted contact). `--quiet` keeps only the WARN lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Callable, NoReturn, TextIO

from .errors import ConfigError, DepfenceError, FenceUnavailable
from .events import VIOLATION_HEADLINE, EgressEvent, FenceResult

if TYPE_CHECKING:
    from .policy import Policy

#: The command succeeded but made forbidden egress attempts (`run`).
VIOLATION_EXIT = 3
#: The run hit --timeout and everything it started was killed (as timeout(1) does).
TIMEOUT_EXIT = 124
#: No fence could be built, or the arguments were wrong.
FENCE_ERROR_EXIT = 125
#: The command was not found (as a shell, env(1) and timeout(1) say it).
NOT_FOUND_EXIT = 127
#: Added to the signal number when the command (or depfence) died of a signal.
SIGNAL_EXIT_BASE = 128
#: `doctor`: some check failed.
DOCTOR_FAILED_EXIT = 1

RUN_EXIT_CODES = """\
exit codes:
  N        the command failed with code N (never masked, violations or not)
  128+N    the command was killed by signal N (or depfence was: the same)
  124      --timeout: the run was killed at its deadline
  3        the command succeeded but made forbidden egress attempts
           (with --mode audit too, where nothing was blocked)
  0        the command succeeded without forbidden egress
  125      no fence could be built, or the arguments are wrong
  127      the command was not found
"""

AUDIT_EXIT_CODES = """\
exit codes:
  N        the command failed with code N (never masked)
  128+N    the command was killed by signal N (or depfence was: the same)
  124      --timeout: the run was killed at its deadline
  0        the command succeeded (whatever it contacted)
  125      no fence could be built, or the arguments are wrong
  127      the command was not found
"""

RUN_EPILOG = (
    """\
examples:
  depfence run --no-egress github.com -- ./deploy/mysql.sh --config new.cnf
  depfence run --egress-only mirror.internal --json out.json -- ./deploy/tools.sh
  depfence run --mode audit --no-egress github.com -- ./deploy/mysql.sh
  depfence run --lab --no-egress github.com -- curl -s http://github.com/

log lines (stderr, one per event, as it happens):
  WARN DNS BLOCKED reason=FromDNSRequest blocked=true blockedAt=dns domain=github.com. \
pid=4312 cmd="curl -s http://github.com/" firewallMethod=blocklist
  WARN: BLOCKED, AUDITED (audit mode) or FORBIDDEN (resolved for a reset/blackhole outage);
  INFO: ALLOWED (DNS answered, a permitted contact). --quiet keeps only WARN.

"""
    + RUN_EXIT_CODES
)

AUDIT_EPILOG = (
    """\
examples:
  depfence audit -- ./deploy/mysql.sh --config new.cnf
  depfence audit --write-contract tests/depfence-contracts/mysql-deploy.contract \\
      -- ./deploy/mysql.sh --config new.cnf
  depfence audit --no-egress github.com -- ./deploy/mysql.sh   # also log what it would block
  depfence audit --lab -- curl -s http://github.com/

Nothing is blocked. The audit list (stdout, after the command) names each
destination -- a DNS name, or ADDRESS:PORT/PROTO contacted without one -- with
the programs that contacted it; --write-contract writes the same list as a
contract file named after the file's stem.

"""
    + AUDIT_EXIT_CODES
)

DOCTOR_EPILOG = """\
examples:
  sudo depfence doctor
  DEPFENCE_BCC_PATH=/opt/bcc/python depfence doctor   # look for bcc only there

Each check prints OK, FAIL (with what to do) or SKIP (needs an earlier check).
The last check compiles the eBPF programs and attaches them to a temporary
cgroup, then detaches them and removes it.

exit codes: 0 when every check passes, 1 otherwise.
"""

MAIN_EPILOG = """\
examples:
  depfence run --no-egress github.com -- ./deploy/mysql.sh --config new.cnf
  depfence audit --write-contract mysql-deploy.contract -- ./deploy/mysql.sh
  depfence doctor

Run `depfence COMMAND --help` for each command's options and exit codes.
"""


class _Parser(argparse.ArgumentParser):
    """Wrong arguments exit with FENCE_ERROR_EXIT (argparse's own 2 is a command's code too)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(FENCE_ERROR_EXIT, f"{self.prog}: error: {message}\n")


def _add_fence_options(cmd: argparse.ArgumentParser) -> None:
    policy = cmd.add_mutually_exclusive_group()
    policy.add_argument(
        "--no-egress",
        action="append",
        default=[],
        metavar="PATTERN",
        help="a name/address the command must not reach (repeatable)",
    )
    policy.add_argument(
        "--egress-only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="the only names/addresses the command may reach (repeatable)",
    )
    cmd.add_argument(
        "--upstream",
        metavar="HOST[:PORT]",
        help="DNS server for allowed names (default: first nameserver of "
        "/etc/resolv.conf, or the lab's with --lab)",
    )
    cmd.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help=f"kill everything the command started after this long (exit {TIMEOUT_EXIT})",
    )
    cmd.add_argument(
        "--lab",
        action="store_true",
        help="run inside the built-in test lab (private network namespace, fake github.com)",
    )
    cmd.add_argument(
        "-q", "--quiet", action="store_true", help="log only WARN lines (what the policy forbids)"
    )
    cmd.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")


def _parser() -> argparse.ArgumentParser:
    from .fence import OUTAGES

    parser = _Parser(
        prog="depfence",
        description="Run commands inside a dependency fence and report their egress.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=MAIN_EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run a command fenced, stream its output and log its egress",
        description="Run a command fenced: stream its output, log each egress event.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=RUN_EPILOG,
    )
    _add_fence_options(run)
    run.add_argument(
        "--mode",
        choices=("block", "audit"),
        default="block",
        help="block forbidden egress (default) or only record it",
    )
    run.add_argument(
        "--outage",
        choices=OUTAGES,
        default="nxdomain",
        help="what a blocked host looks like: a DNS answer (nxdomain, servfail, refused, "
        "timeout), or it resolves and connections are refused at once (reset) or vanish "
        "(blackhole)",
    )
    run.add_argument(
        "--json",
        metavar="FILE",
        help="write the result and events as JSON (one run of the session report's schema)",
    )

    audit = sub.add_parser(
        "audit",
        help="run a command with nothing blocked and list what it contacted",
        description="Run a command in audit mode and list each destination it contacted.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=AUDIT_EPILOG,
    )
    _add_fence_options(audit)
    audit.add_argument(
        "--write-contract",
        metavar="FILE",
        help="write the audit list as a contract file (its name: the file's stem)",
    )

    sub.add_parser(
        "doctor",
        help="check that this machine can build a fence, and say how to fix what is missing",
        description="Check, step by step, what a fence needs on this machine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=DOCTOR_EPILOG,
    )
    return parser


# --------------------------------------------------------------------------- log lines


def _verdict_word(event: EgressEvent) -> str:
    if event.verdict == "blocked":
        return "BLOCKED"
    if not event.forbidden:
        return "ALLOWED"
    # Forbidden but let through: audit mode (no outage), or a name resolved on purpose so
    # that its connections meet the reset/blackhole outage.
    return "AUDITED" if event.outage is None else "FORBIDDEN"


def log_line(event: EgressEvent, method: str) -> str:
    """One event in the key=value shape of GitHub's published fence.

    DNS through the proxy: `reason=FromDNSRequest`; a DNS query sent past the
    proxy and judged in the packet: `reason=FromDNSBypass` with the resolver's
    address; a connection or datagram: `reason=FromConnect` (at connect/sendmsg)
    or `FromPacket` (the backstop). Fields that GitHub's line lacks come after
    `firewallMethod`, so its shape stays a prefix.
    """
    level = "WARN" if event.forbidden else "INFO"
    if event.address is None:
        kind, reason = "DNS", "FromDNSRequest"
    elif event.qtype is not None:
        kind, reason = "DNS", "FromDNSBypass"
    else:
        kind, reason = "CONN", "FromPacket" if event.blocked_at == "packet" else "FromConnect"
    fields = [
        f"reason={reason}",
        f"blocked={'true' if event.verdict == 'blocked' else 'false'}",
        f"blockedAt={event.blocked_at or 'none'}",
    ]
    if event.domain:
        fields.append(f"domain={event.domain.rstrip('.')}.")
    if event.address is not None:
        fields += [f"address={event.address}", f"port={event.port}", f"protocol={event.protocol}"]
    fields.append(f"pid={event.pid if event.pid is not None else 'unknown'}")
    fields.append(f"cmd={_quoted(event.cmdline or '')}")
    fields.append(f"firewallMethod={method}")
    # The default outages (nxdomain for names, refused for connections) go unsaid.
    if event.outage and event.outage not in ("nxdomain", "refused"):
        fields.append(f"outage={event.outage}")
    if event.qtype:
        fields.append(f"qtype={event.qtype}")
    if event.learned_from:
        fields.append(f"learnedFrom={_value(event.learned_from)}")
    if event.pid is None:
        fields.append(f"unattributed={_value(event.unattributed or 'unknown')}")
    return f"{level} {kind} {_verdict_word(event)} " + " ".join(fields)


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _value(text: str) -> str:
    """A value as logfmt writes it: bare when it can be, else quoted."""
    bare = text and not any(c.isspace() or c in '"=\\' for c in text)
    return text if bare else _quoted(text)


def firewall_method(kind: str) -> str:
    return "allowlist" if kind == "egress_only" else "blocklist"


# --------------------------------------------------------------------------- exit codes


def command_exit(result: FenceResult) -> int:
    """The command's own outcome as an exit code: its code, 128+N for signal N, 124 timed out."""
    if result.timed_out:
        return TIMEOUT_EXIT
    if result.returncode < 0:
        return SIGNAL_EXIT_BASE - result.returncode
    return result.returncode


def exit_code(result: FenceResult) -> int:
    """`depfence run`: the command's failure first, then VIOLATION_EXIT, else 0."""
    code = command_exit(result)
    if code != 0:
        return code
    return VIOLATION_EXIT if result.violations else 0


# --------------------------------------------------------------------------- output


class _Console:
    """The command's output and the event log, written as they come from any thread.

    One lock: a log line never lands inside a chunk of the command's stderr.
    A reader that went away (`depfence run ... | head`) stops that stream only;
    the command keeps running and its output keeps being drained.
    """

    def __init__(self, method: str, quiet: bool) -> None:
        self.method = method
        self.quiet = quiet
        self._lock = threading.Lock()
        self._gone: set[int] = set()

    def output(self, stream: str, chunk: bytes) -> None:
        self._write(sys.stdout if stream == "stdout" else sys.stderr, chunk)

    def event(self, event: EgressEvent) -> None:
        if self.quiet and not event.forbidden:
            return
        self.log(log_line(event, self.method))

    def log(self, line: str) -> None:
        self._write(sys.stderr, line.encode() + b"\n")

    def say(self, text: str) -> None:
        """depfence's own results (the audit list) go to stdout."""
        self._write(sys.stdout, text.encode())

    def _write(self, stream: TextIO, data: bytes) -> None:
        with self._lock:
            if id(stream) in self._gone:
                return
            try:
                stream.flush()
                buffer = stream.buffer
                buffer.write(data)
                buffer.flush()
            except BrokenPipeError:
                self._gone.add(id(stream))
                # Nothing more reaches it; keep interpreter shutdown from complaining too.
                with contextlib.suppress(OSError, ValueError):
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, stream.fileno())
                    os.close(devnull)


class _UsageError(DepfenceError):
    """Arguments that parse but do not make a command line (no command at all)."""


class _Interrupted(BaseException):
    """depfence got SIGINT/SIGTERM/SIGHUP: stop the run (its cgroup is killed) and exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Turn the first terminating signal into _Interrupted, so every cleanup runs (the run's
    cgroup killed and removed, the lab left); later ones are ignored until cleanup is done."""
    caught: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        if caught:
            return
        caught.append(signum)
        raise _Interrupted(signum)

    wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, handler) for sig in wanted}
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


# --------------------------------------------------------------------------- run and audit


@dataclass(frozen=True)
class _Plan:
    """Validated arguments of run/audit: everything is checked before a fence is built."""

    policy: Policy
    method: str
    cmd: list[str]
    upstream: str | None
    timeout: float | None


def _plan(args: argparse.Namespace, name: str) -> _Plan:
    from .fence import parse_upstream
    from .policy import Policy

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise _UsageError(f"no command given: depfence {name} [options] -- CMD ARGS...")
    if args.egress_only:
        policy = Policy.egress_only(*args.egress_only, source="CLI flag --egress-only")
    elif args.no_egress:
        policy = Policy.no_egress(*args.no_egress, source="CLI flag --no-egress")
    else:
        policy = Policy("no_egress", ())  # nothing forbidden: observe only
    if args.upstream is not None:
        parse_upstream(args.upstream, "--upstream")
    if args.timeout is not None and not args.timeout > 0:
        raise ConfigError(f"{args.timeout:g}", "the timeout must be a positive number", "--timeout")
    return _Plan(policy, firewall_method(policy.kind), cmd, args.upstream, args.timeout)


def _command_found(cmd: list[str]) -> bool:
    return shutil.which(cmd[0]) is not None or (os.sep in cmd[0] and os.path.isfile(cmd[0]))


def _stdin() -> int | None:
    """Our stdin, passed on to the command (`cmd < file`, `echo y | depfence run ...`)."""
    try:
        return sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return None  # no usable stdin: the command gets an empty one


def _fenced_run(plan: _Plan, args: argparse.Namespace, mode: str, outage: str) -> FenceResult:
    from .fence import Fence
    from .lab import Lab

    console = _Console(plan.method, args.quiet)
    with contextlib.ExitStack() as stack:
        upstream = plan.upstream
        if args.lab:
            lab = stack.enter_context(Lab())
            upstream = upstream or lab.upstream
        fence = stack.enter_context(
            Fence(plan.policy, upstream=upstream, mode=mode, outage=outage, timeout=plan.timeout)
        )
        result = fence.run(
            plan.cmd,
            check=False,
            stdin=_stdin(),
            on_output=console.output,
            on_event=console.event,
        )
    if result.timed_out:
        console.log(
            f"depfence: timed out after {plan.timeout:g} s; everything it started was killed"
        )
    return result


def _writable(path: str, flag: str) -> None:
    parent = Path(path).resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(path, f"cannot write there ({parent} is not a writable directory)", flag)


def _run(args: argparse.Namespace) -> int:
    from .report import run_record

    plan = _plan(args, "run")
    if args.json:
        _writable(args.json, "--json")
    if not _command_found(plan.cmd):
        print(f"depfence: {plan.cmd[0]}: command not found", file=sys.stderr)
        return NOT_FOUND_EXIT
    result = _fenced_run(plan, args, args.mode, args.outage)
    code = exit_code(result)
    if result.violations:
        count = len(result.violations)
        headline = VIOLATION_HEADLINE.format(
            count=count, s="" if count == 1 else "s", command=result.command
        )
        done = "recorded, not blocked: audit mode" if args.mode == "audit" else "blocked"
        print(f"depfence: {headline} ({done}); exit {code}", file=sys.stderr)
    if args.json:
        # The same record as one run of the session report (report.schema.json, $defs/run).
        with open(args.json, "w", encoding="utf-8") as f:
            record = run_record(
                result, policy=plan.policy.describe(), mode=args.mode, outage=args.outage
            )
            json.dump(record, f, indent=2)
            f.write("\n")
    return code


def regenerate_command(args: argparse.Namespace, cmd: Sequence[str]) -> str:
    """The `depfence audit` command line that writes this contract again."""
    argv = ["depfence", "audit"]
    if args.lab:
        argv.append("--lab")
    if args.upstream is not None:
        argv += ["--upstream", args.upstream]
    for flag, patterns in (("--no-egress", args.no_egress), ("--egress-only", args.egress_only)):
        for pattern in patterns:
            argv += [flag, pattern]
    if args.timeout is not None:
        argv += ["--timeout", f"{args.timeout:g}"]
    argv += ["--write-contract", args.write_contract, "--", *cmd]
    return shlex.join(argv)


def audit_list(result: FenceResult) -> str:
    """What `depfence audit` prints: each destination with the programs that contacted it."""
    from .contract import Contract

    contract = Contract.from_events(result.events)
    count = len(contract.entries)
    if not count:
        return f"depfence audit: nothing contacted while running {result.command}\n"
    # The contract's entries, without its header: the list a contract file would hold.
    body = ["  " + line for line in contract.render("audit", "").splitlines()[2:]]
    head = (
        f"depfence audit: {count} destination{'s' if count != 1 else ''} contacted "
        f"while running {result.command}:"
    )
    return "\n".join([head, *body]) + "\n"


def _audit(args: argparse.Namespace) -> int:
    from .contract import Contract, check_name

    plan = _plan(args, "audit")
    target: Path | None = None
    if args.write_contract:
        target = Path(args.write_contract)
        check_name(target.stem, "--write-contract (the contract's name is the file's stem)")
        if target.is_dir():
            raise ConfigError(args.write_contract, "is a directory", "--write-contract")
    if not _command_found(plan.cmd):
        print(f"depfence: {plan.cmd[0]}: command not found", file=sys.stderr)
        return NOT_FOUND_EXIT
    result = _fenced_run(plan, args, "audit", "nxdomain")
    code = command_exit(result)
    console = _Console(plan.method, args.quiet)
    if target is None:
        console.say(audit_list(result))
        return code
    contract = Contract.from_events(result.events)
    text = contract.render(target.stem, regenerate_command(args, plan.cmd))
    try:
        before: str | None = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        before = None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, target)
    change = "new" if before is None else ("unchanged" if before == text else "changed")
    count = len(contract.entries)
    console.say(
        f'depfence audit: wrote contract "{target.stem}" to {target} '
        f"({count} destination{'s' if count != 1 else ''}; {change})\n"
    )
    if code != 0:
        console.log(
            f"depfence: the command failed (exit {code}); the contract may miss what it "
            "would have contacted had it succeeded"
        )
    return code


# --------------------------------------------------------------------------- doctor


@dataclass(frozen=True)
class Check:
    """One line of `depfence doctor`: status OK, FAIL or SKIP, what was found, what to do."""

    name: str
    status: str
    detail: str
    fix: str | None = None


def _check(name: str, probe: Callable[[], str], fix: Callable[[Exception], str]) -> Check:
    try:
        return Check(name, "OK", probe())
    except Exception as exc:  # noqa: BLE001 - every failure is a finding, shown with its fix
        detail, advice = str(exc).strip() or type(exc).__name__, fix(exc)
        if detail.endswith(advice):  # the library's message already ends with the fix
            detail = detail[: -len(advice)].rstrip("; ")
        return Check(name, "FAIL", detail, advice)


def _privileges() -> str:
    from .loader import check_privileges

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
            f"Linux {release} is older than 5.8 (ring buffers 5.8, bpf_link for cgroups 5.7)"
        )
    return f"Linux {release} (5.8 or newer is needed)"


def _cgroup2() -> str:
    from .cgroup import cgroup2_mount

    mount = cgroup2_mount()
    if not os.access(mount, os.W_OK):
        raise FenceUnavailable(f"cgroup v2 is mounted at {mount}, but it is not writable here")
    return f"mounted at {mount}"


def _bcc() -> str:
    from .loader import import_bcc

    bcc = import_bcc()
    version = getattr(bcc, "__version__", "unknown version")
    init = getattr(bcc, "__file__", None)
    where = Path(init).parent if init else "(built in)"
    return f"{version} from {where}"


def _bcc_fix(exc: Exception) -> str:
    from .loader import BCC_INSTALL_HINT

    if "does not load" in str(exc):
        return "apt-get install --reinstall python3-bpfcc (or point DEPFENCE_BCC_PATH elsewhere)"
    return BCC_INSTALL_HINT


def _headers() -> str:
    from .loader import check_kernel_headers

    build = check_kernel_headers()
    real = build.resolve()
    return f"{build}" + (f" -> {real}" if real != build else "")


def _headers_fix(_exc: Exception) -> str:
    release = platform.release()
    return (
        f"apt-get install linux-headers-{release}, or run scripts/bootstrap.sh; when this "
        "kernel has no packaged headers, link any distro header tree (e.g. Debian's "
        f"linux-headers-amd64) as /lib/modules/{release}/build: the programs use only UAPI types"
    )


def _tracefs() -> str:
    from .loader import tracefs_dir

    where = tracefs_dir(mount=False)
    if where is None:
        return "not mounted; mountable at /sys/kernel/tracing (a fence mounts it on first use)"
    return f"mounted at {where}"


def _compile_and_attach() -> str:
    from . import loader
    from .cgroup import CgroupTree, FenceCgroup

    started = time.monotonic()
    programs = loader.load()
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
            raise FenceUnavailable(f"the temporary cgroup {cgroup.path} could not be removed")
    finally:
        tree.remove()
    return (
        f"{len(links)} programs compiled in {compiled:.1f} s, attached to {cgroup.path}, "
        "then detached and removed"
    )


def _compile_fix(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return "attaching needs bpf_link for cgroups (Linux 5.7+) and root in this cgroup tree"
    return (
        "the message above is bcc's or the verifier's; check the kernel and bcc versions "
        "(uname -r; depfence doctor) and report it with this output"
    )


def doctor_checks() -> Iterator[Check]:
    """Every check, in order; the compile-and-attach step runs only when the rest passed."""
    steps: list[tuple[str, Callable[[], str], Callable[[Exception], str]]] = [
        (
            "privileges",
            _privileges,
            lambda _e: "run it as root (sudo), or give it CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN",
        ),
        ("kernel", _kernel, lambda _e: "use Linux 5.8 or newer"),
        (
            "cgroup v2",
            _cgroup2,
            lambda _e: (
                "mount -t cgroup2 none /sys/fs/cgroup/unified (hybrid layout), or boot "
                "with systemd.unified_cgroup_hierarchy=1"
            ),
        ),
        ("bcc", _bcc, _bcc_fix),
        ("kernel headers", _headers, _headers_fix),
        ("tracefs", _tracefs, lambda _e: "mount -t tracefs nodev /sys/kernel/tracing"),
    ]
    failed = False
    for name, probe, fix in steps:
        check = _check(name, probe, fix)
        failed = failed or check.status != "OK"
        yield check
    if failed:
        yield Check("compile+attach", "SKIP", "needs every check above to pass")
    else:
        yield _check("compile+attach", _compile_and_attach, _compile_fix)


def format_check(check: Check) -> str:
    lines = check.detail.splitlines() or [""]
    out = [f"{check.status:<5} {check.name:<15} {lines[0]}"]
    out += [f"{'':22}{line}" for line in lines[1:]]
    if check.fix:
        out.append(f"{'':22}fix: {check.fix}")
    return "\n".join(out)


def _doctor(_args: argparse.Namespace) -> int:
    print("depfence doctor: what a fence needs on this machine", flush=True)
    checks = []
    for check in doctor_checks():
        checks.append(check)
        print(format_check(check), flush=True)
    failed = sum(c.status == "FAIL" for c in checks)
    skipped = sum(c.status == "SKIP" for c in checks)
    if not failed and not skipped:
        print(f"all {len(checks)} checks passed: fences can be built here")
        return 0
    print(
        f"{failed} of {len(checks)} checks failed"
        + (f", {skipped} skipped" if skipped else "")
        + "; fix them in order (later checks need the earlier ones)"
    )
    return DOCTOR_FAILED_EXIT


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "doctor":
        return _doctor(args)
    command = _run if args.command == "run" else _audit
    try:
        with _interruptible():
            return command(args)
    except _Interrupted as exc:
        name = signal.Signals(exc.signum).name
        print(
            f"depfence: stopped by {name}; everything the command started was killed",
            file=sys.stderr,
        )
        return SIGNAL_EXIT_BASE + exc.signum
    except DepfenceError as exc:
        # PolicyError, ConfigError (each names the value and the flag), FenceUnavailable
        # (names what is missing and the fix), LabError.
        print(f"depfence: {exc}", file=sys.stderr)
        return FENCE_ERROR_EXIT
    except Exception:  # noqa: BLE001 - an internal error must not pass for the command's code
        traceback.print_exc()
        print("depfence: internal error (above); the fence's result is unknown", file=sys.stderr)
        return FENCE_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
