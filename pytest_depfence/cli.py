"""The `depfence` command: fenced runs, audits and a machine check, outside pytest.

- `depfence run`: run one command fenced, stream its output as it runs, and
  log each egress event on stderr as it happens (`render.log_line`).
- `depfence audit`: run one command with nothing blocked and list what it
  contacted, or write that as a contract file (`contract.write_contract`).
- `depfence doctor`: check what a fence needs on this machine (`doctor`).

This module never imports pytest; settings are described and checked by
`options`, in the plugin's and the library's words. Exit codes
(`RUN_EXIT_CODES`, `AUDIT_EXIT_CODES`) never mask the command's own failure,
and `run` never exits 0 after forbidden egress.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import doctor, options, outages
from .console import Console, Interrupted, interruptible
from .errors import ConfigError, DepfenceError
from .events import FenceResult
from .limits import Limits
from .render import TIMED_OUT_TEXT, attempts, firewall_method, limits_text, violation_headline

if TYPE_CHECKING:
    from .policy import Policy

#: The command succeeded but made forbidden egress attempts (`run`).
VIOLATION_EXIT = 3
#: The command succeeded but hit a limit: a process of it OOM-killed, a fork refused.
LIMIT_EXIT = 4
#: The run hit --timeout and everything it started was killed (as timeout(1) does).
TIMEOUT_EXIT = 124
#: No fence could be built, or the arguments were wrong.
FENCE_ERROR_EXIT = 125
#: The command was not found (as a shell, env(1) and timeout(1) say it).
NOT_FOUND_EXIT = 127
#: Added to the signal number when the command (or depfence) died of a signal.
SIGNAL_EXIT_BASE = 128

RUN_EXIT_CODES = """\
exit codes:
  N        the command failed with code N (never masked, violations or not)
  128+N    the command was killed by signal N (or depfence was: the same)
  124      --timeout: the run was killed at its deadline
  3        the command succeeded but made forbidden egress attempts
           (with --mode audit too, where nothing was blocked)
  4        the command succeeded but hit --memory or --pids (a process of
           it was killed for memory, or a fork refused)
  0        the command succeeded without forbidden egress
  125      no fence could be built, or the arguments are wrong
  127      the command was not found
"""

AUDIT_EXIT_CODES = """\
exit codes:
  N        the command failed with code N (never masked)
  128+N    the command was killed by signal N (or depfence was: the same)
  124      --timeout: the run was killed at its deadline
  4        the command succeeded but hit --memory or --pids
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

MAIN_EPILOG = """\
examples:
  depfence run --no-egress github.com -- ./deploy/mysql.sh --config new.cnf
  depfence audit --write-contract mysql-deploy.contract -- ./deploy/mysql.sh
  depfence doctor

Run `depfence COMMAND --help` for each command's options and exit codes.
"""


class _Parser(argparse.ArgumentParser):
    """Wrong arguments exit with FENCE_ERROR_EXIT (argparse's own 2 is a command's code too);
    epilogs keep their line breaks (subcommands' parsers are of this class too)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(FENCE_ERROR_EXIT, f"{self.prog}: error: {message}\n")


def _add_fence_options(cmd: argparse.ArgumentParser) -> None:
    policy = cmd.add_mutually_exclusive_group()
    for flag, text in (
        ("--no-egress", "a name/address the command must not reach (repeatable)"),
        ("--egress-only", "the only names/addresses the command may reach (repeatable)"),
    ):
        policy.add_argument(flag, action="append", default=[], metavar="PATTERN", help=text)
    # Values are checked by `options` (in `plan`), in the plugin's and library's words.
    cmd.add_argument("--upstream", metavar="HOST[:PORT]", help=options.UPSTREAM.help)
    cmd.add_argument(
        "--timeout", metavar="SECONDS", help=f"{options.TIMEOUT.help} (exit {TIMEOUT_EXIT})"
    )
    for name, metavar in (("memory", "SIZE"), ("cpus", "CPUS"), ("pids", "N")):
        cmd.add_argument(f"--{name}", metavar=metavar, help=options.OPTIONS[name].help)
    cmd.add_argument("--raw-sockets", action="store_true", help=options.RAW_SOCKETS.help)
    for flag, metavar, option in (
        ("--ranges", "FILE", options.RANGES),
        ("--service", "UNIT|CGROUP", options.SERVICES),
    ):
        cmd.add_argument(
            flag, action="append", default=[], metavar=metavar, help=f"{option.help} (repeatable)"
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
    parser = _Parser(
        prog="depfence",
        description="Run commands inside a dependency fence and report their egress.",
        epilog=MAIN_EPILOG,
    )
    from . import __version__  # pyproject's, from the package metadata

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        epilog=RUN_EPILOG,
        help="run a command fenced, stream its output and log its egress",
        description="Run a command fenced: stream its output, log each egress event.",
    )
    _add_fence_options(run)
    run.add_argument(
        "--mode", default="block", metavar="{%s}" % ",".join(options.MODES), help=options.MODE.help
    )
    run.add_argument(
        "--outage",
        default=outages.DEFAULT,
        metavar="{%s}" % ",".join(outages.OUTAGES),
        help=options.OUTAGE.help,
    )
    run.add_argument(
        "--json",
        metavar="FILE",
        help="write the result and events as JSON (one run of the session report's schema)",
    )
    audit = sub.add_parser(
        "audit",
        epilog=AUDIT_EPILOG,
        help="run a command with nothing blocked and list what it contacted",
        description="Run a command in audit mode and list each destination it contacted.",
    )
    _add_fence_options(audit)
    audit.add_argument(
        "--write-contract",
        metavar="FILE",
        help="write the audit list as a contract file (its name: the file's stem)",
    )
    sub.add_parser(
        "doctor",
        epilog=doctor.EPILOG,
        help="check that this machine can build a fence, and say how to fix what is missing",
        description="Check, step by step, what a fence needs on this machine.",
    )
    return parser


def command_exit(result: FenceResult) -> int:
    """The command's own outcome as an exit code: its code, 128+N for signal N, 124 timed out."""
    if result.timed_out:
        return TIMEOUT_EXIT
    if result.returncode < 0:
        return SIGNAL_EXIT_BASE - result.returncode
    return result.returncode


def exit_code(result: FenceResult) -> int:
    """`depfence run`: the command's failure first, then VIOLATION_EXIT, LIMIT_EXIT, else 0."""
    code = command_exit(result)
    return code or (VIOLATION_EXIT if result.violations else limit_exit(result))


def limit_exit(result: FenceResult) -> int:
    return LIMIT_EXIT if result.usage.hit else 0


class _UsageError(DepfenceError):
    """Arguments that parse but do not make a command line (no command at all)."""


# --------------------------------------------------------------------------- run and audit


@dataclass(frozen=True)
class Plan:
    """Validated arguments of run/audit: everything is checked before a fence is built."""

    cmd: list[str]
    policy: Policy
    upstream: str | None
    timeout: float | None
    mode: str
    outage: str
    lab: bool
    quiet: bool
    raw_sockets: bool = False
    services: tuple[Any, ...] = ()
    #: Ranges files (ranges.Ranges), read: their rules join `policy` in the fence.
    ranges: tuple[Any, ...] = ()
    #: memory, cpus, pids: those set (`options.LIMIT_OPTIONS`), checked.
    limits: dict[str, Any] = field(default_factory=dict)

    def fenced_policy(self) -> Policy:
        """The policy the fence judges by: `policy` and every range of the files."""
        return self.policy.with_rules(rule for read in self.ranges for rule in read.rules)


def plan(args: argparse.Namespace) -> Plan:
    """The run `depfence run|audit ARGS` asks for; PolicyError/ConfigError name what is wrong."""
    from .policy import Policy

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else list(args.cmd)
    if not cmd:
        raise _UsageError(f"no command given: depfence {args.command} [options] -- CMD ARGS...")
    if args.egress_only:
        policy = Policy.egress_only(*args.egress_only, source="CLI flag --egress-only")
    elif args.no_egress:
        policy = Policy.no_egress(*args.no_egress, source="CLI flag --no-egress")
    else:
        policy = Policy("no_egress", ())  # nothing forbidden: observe only
    audit, upstream = args.command == "audit", args.upstream
    return Plan(
        cmd=cmd,
        policy=policy,
        upstream=None if upstream is None else options.validate("upstream", upstream, "--upstream"),
        timeout=options.validate("timeout", _number(args.timeout), "--timeout"),
        mode="audit" if audit else options.validate("mode", args.mode, "--mode"),
        outage=outages.DEFAULT if audit else options.validate("outage", args.outage, "--outage"),
        lab=args.lab,
        quiet=args.quiet,
        raw_sockets=options.validate("raw_sockets", args.raw_sockets, "--raw-sockets"),
        services=options.validate("services", args.service, "CLI flag --service"),
        ranges=options.validate("ranges", args.ranges, "CLI flag --ranges"),
        limits={
            name: options.validate(name, getattr(args, name), f"CLI flag --{name}")
            for name in options.LIMIT_OPTIONS
            if getattr(args, name) is not None
        },
    )


def _number(text: str | None) -> int | float | str | None:
    """A flag's text as the number it spells, for `options` to judge (else the text itself)."""
    if text is None:
        return None
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


def _found(cmd: list[str]) -> bool:
    """Whether the command exists; says so on stderr when it does not."""
    if shutil.which(cmd[0]) is not None or (os.sep in cmd[0] and os.path.isfile(cmd[0])):
        return True
    print(f"depfence: {cmd[0]}: command not found", file=sys.stderr)
    return False


def _stdin() -> int | None:
    """Our stdin, passed on to the command (`cmd < file`, `echo y | depfence run ...`)."""
    try:
        return sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return None  # no usable stdin: the command gets an empty one


def _console(plan: Plan) -> Console:
    return Console(firewall_method(plan.policy.kind), plan.quiet)


def _fenced_run(plan: Plan, console: Console) -> FenceResult:
    from .fence import Fence
    from .lab import Lab

    with contextlib.ExitStack() as stack:
        upstream = plan.upstream
        if plan.lab:
            lab = stack.enter_context(Lab())
            upstream = upstream or lab.upstream
        fence = Fence(
            plan.policy,
            upstream=upstream,
            mode=plan.mode,
            outage=plan.outage,
            timeout=plan.timeout,
            raw_sockets=plan.raw_sockets,
            services=plan.services,
            ranges=plan.ranges,
            **plan.limits,
        )
        result = stack.enter_context(fence).run(
            plan.cmd, check=False, stdin=_stdin(), on_output=console.output, on_event=console.event
        )
    if result.timed_out:
        console.log("depfence: " + TIMED_OUT_TEXT.format(seconds=plan.timeout))
    if result.usage.hit:
        console.log(f"depfence: {result.command}: {limits_text(result.usage)}")
    return result


def _writable(path: str, flag: str) -> None:
    parent = Path(path).resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(path, f"cannot write there ({parent} is not a writable directory)", flag)


def _run(args: argparse.Namespace) -> int:
    from .report import write_run

    run = plan(args)
    if args.json:
        _writable(args.json, "--json")
    if not _found(run.cmd):
        return NOT_FOUND_EXIT
    result = _fenced_run(run, _console(run))
    code = exit_code(result)
    if result.violations:
        headline = violation_headline(len(attempts(result.violations)), result.command)
        done = "recorded, not blocked: audit mode" if run.mode == "audit" else "blocked"
        print(f"depfence: {headline} ({done}); exit {code}", file=sys.stderr)
    if args.json:
        write_run(
            args.json,
            result,
            policy=run.fenced_policy().describe(),
            mode=run.mode,
            outage=run.outage,
        )
    return code


def regenerate_command(plan: Plan, contract: str) -> str:
    """The `depfence audit` command line that writes this contract again."""
    argv = ["depfence", "audit"]
    if plan.lab:
        argv.append("--lab")
    if plan.upstream is not None:
        argv += ["--upstream", plan.upstream]
    flag = "--egress-only" if plan.policy.kind == "egress_only" else "--no-egress"
    for rule in plan.policy.rules:
        argv += [flag, rule.pattern]
    for read in plan.ranges:
        argv += ["--ranges", read.shown]
    if plan.timeout is not None:
        argv += ["--timeout", f"{plan.timeout:g}"]
    if plan.raw_sockets:
        argv.append("--raw-sockets")
    limits = Limits(**plan.limits)
    for name in plan.limits:
        argv += [f"--{name}", limits.shown(name)]
    argv += ["--write-contract", contract, "--", *plan.cmd]
    return shlex.join(argv)


def _audit(args: argparse.Namespace) -> int:
    from .contract import Contract, audit_list, check_name, write_contract

    run = plan(args)
    target: Path | None = None
    if args.write_contract:
        target = Path(args.write_contract)
        check_name(target.stem, "--write-contract (the contract's name is the file's stem)")
        if target.is_dir():
            raise ConfigError(args.write_contract, "is a directory", "--write-contract")
    if not _found(run.cmd):
        return NOT_FOUND_EXIT
    console = _console(run)
    result = _fenced_run(run, console)
    code = command_exit(result) or limit_exit(result)
    if target is None:
        console.say(audit_list(result))
        return code
    contract = Contract.from_events(result.events)
    text = contract.render(target.stem, regenerate_command(run, args.write_contract))
    change = {"created": "new", "updated": "changed", None: "unchanged"}[
        write_contract(target, text)
    ]
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


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "doctor":
        return doctor.main()
    command = _run if args.command == "run" else _audit
    try:
        with interruptible():
            return command(args)
    except Interrupted as exc:
        name = signal.Signals(exc.signum).name
        stopped = f"depfence: stopped by {name}; everything the command started was killed"
        print(stopped, file=sys.stderr)
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
