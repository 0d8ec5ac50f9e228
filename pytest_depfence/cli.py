"""The `depfence` command: run one command fenced, outside pytest, on the same core.

Exit code: the command's own when it failed (never masked); 0 when it
succeeded without forbidden egress; VIOLATION_EXIT when it succeeded but made
forbidden egress attempts; FENCE_ERROR_EXIT when no fence could be built or
the arguments were wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError, FenceUnavailable, PolicyError
from .events import EgressEvent, FenceResult
from .fence import OUTAGES

VIOLATION_EXIT = 3
FENCE_ERROR_EXIT = 125

EPILOG = """\
examples:
  depfence run --no-egress github.com -- ./deploy/mysql.sh --config new.cnf
  depfence run --egress-only mirror.internal --json out.json -- ./deploy/tools.sh
  depfence run --lab --no-egress github.com -- curl -s http://github.com/

exit codes: the command's own code when it fails; 0 when it succeeds without
forbidden egress; 3 when it succeeds but reached for a forbidden host;
125 when the fence cannot be built or the arguments are wrong.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="depfence",
        description="Run a command inside a dependency fence.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run a command fenced and report its egress",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    policy = run.add_mutually_exclusive_group()
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
        "--upstream",
        metavar="HOST[:PORT]",
        help="DNS server for allowed names (default: first nameserver of "
        "/etc/resolv.conf, or the lab's with --lab)",
    )
    run.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="kill everything the command started after this long",
    )
    run.add_argument("--json", metavar="FILE", help="write the result and events as JSON")
    run.add_argument(
        "--lab",
        action="store_true",
        help="run inside the built-in test lab (private network namespace)",
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    return parser


def log_line(event: EgressEvent, method: str) -> str:
    """One event in the key=value shape of GitHub's published fence."""
    level, verdict = ("WARN", "BLOCKED") if event.forbidden else ("INFO", "ALLOWED")
    if event.verdict == "allowed" and event.forbidden:
        verdict = "AUDITED"
    kind = "DNS" if event.blocked_at in (None, "dns") and event.domain else "CONN"
    fields = [
        f"reason={'FromDNSRequest' if kind == 'DNS' else 'FromConnect'}",
        f"blocked={'true' if event.verdict == 'blocked' else 'false'}",
        f"blockedAt={event.blocked_at or 'none'}",
    ]
    if event.domain:
        fields.append(f"domain={event.domain}.")
    if event.address:
        fields.append(f"address={event.address}:{event.port}")
    fields.append(f"pid={event.pid if event.pid is not None else 'unknown'}")
    cmd = event.cmdline if event.cmdline is not None else f"unknown ({event.unattributed})"
    fields.append(f"cmd={json.dumps(cmd)}")
    fields.append(f"firewallMethod={method}")
    return f"{level} {kind} {verdict} " + " ".join(fields)


def _result_json(result: FenceResult, policy: str, mode: str) -> dict[str, Any]:
    return {
        "command": result.command,
        "policy": policy,
        "mode": mode,
        "returncode": result.returncode,
        "timed_out": result.timed_out,
        "domains": result.domains,
        "events": [dataclasses.asdict(e) for e in result.events],
        "violations": len(result.violations),
    }


def exit_code(result: FenceResult) -> int:
    if result.returncode != 0:
        return result.returncode if result.returncode > 0 else 128 - result.returncode
    return VIOLATION_EXIT if result.violations else 0


def _run(args: argparse.Namespace) -> int:
    from .fence import Fence
    from .lab import Lab
    from .policy import Policy

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print(
            "depfence run: no command given (depfence run [options] -- CMD ARGS...)",
            file=sys.stderr,
        )
        return FENCE_ERROR_EXIT
    if args.egress_only:
        policy = Policy.egress_only(*args.egress_only, source="CLI flag --egress-only")
        method = "allowlist"
    else:
        policy = (
            Policy.no_egress(*args.no_egress, source="CLI flag --no-egress")
            if args.no_egress
            else Policy("no_egress", ())
        )
        method = "blocklist"
    with contextlib.ExitStack() as stack:
        upstream = args.upstream
        if args.lab:
            lab = stack.enter_context(Lab())
            upstream = upstream or lab.upstream
        fence = stack.enter_context(
            Fence(
                policy, upstream=upstream, mode=args.mode, outage=args.outage, timeout=args.timeout
            )
        )
        result = fence.run(cmd, check=False)
    sys.stdout.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.write(result.stderr)
    for event in result.events:
        print(log_line(event, method), file=sys.stderr)
    if result.timed_out:
        print(
            f"depfence: timed out after {args.timeout}s; everything it started was killed",
            file=sys.stderr,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_result_json(result, policy.describe(), args.mode), f, indent=2)
            f.write("\n")
    return exit_code(result)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (FenceUnavailable, PolicyError, ConfigError, FileNotFoundError) as exc:
        print(f"depfence: {exc}", file=sys.stderr)
        return FENCE_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
