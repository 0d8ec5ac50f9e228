"""The `depfence` command, run as a user runs it: a subprocess, real clients, the lab.

Every run asks the session's lab resolver (`--upstream 10.77.0.53`; the CLI
process inherits the session's lab namespace from pytest) or builds its own
lab (`--lab`): nothing reaches the machine's network or resolver. Each run
compiles the eBPF programs in its own process, so a test asks for what it
needs in as few runs as it can.

Streaming is proved without sleeps: the fenced script prints, then blocks on
a FIFO the test holds; the test reads the output (and the event's log line)
from the CLI's pipes while the script is still blocked, and only then lets it
finish.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import pytest
from helpers_net import skip_or_fail

from pytest_depfence.cli import (
    FENCE_ERROR_EXIT,
    NOT_FOUND_EXIT,
    TIMEOUT_EXIT,
    VIOLATION_EXIT,
)
from pytest_depfence.contract import Contract
from pytest_depfence.report import SCHEMA_PATH

if TYPE_CHECKING:
    from pytest_depfence.lab import Lab

Fifo = Any  # conftest.Fifo
CLI = [sys.executable, "-m", "pytest_depfence.cli"]
UPSTREAM = ["--upstream", "10.77.0.53"]  # the session lab's resolver
RUN_TIMEOUT = 120  # seconds a whole CLI run may take before the test gives up on it
GITHUB = "curl -s http://github.com/"
MIRROR = "curl -s http://mirror.internal/"


@pytest.fixture(autouse=True)
def cli_env(lab: Lab, clean_env: None, pytestconfig: pytest.Config) -> Iterator[dict[str, str]]:
    """Inside the session lab, on a machine that can build fences (else skip, or fail
    with --depfence-require); the environment for the CLI, without proxy settings."""
    from pytest_depfence.errors import FenceUnavailable
    from pytest_depfence.kernel import preflight

    try:
        preflight()
    except FenceUnavailable as exc:
        skip_or_fail(pytestconfig, exc)
    yield dict(os.environ)


def depfence(
    *args: str, env: dict[str, str] | None = None, check_code: int | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    if check_code is not None:
        assert proc.returncode == check_code, describe(proc)
    return proc


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def log_lines(stderr: str, prefix: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


# --------------------------------------------------------------------------- exit codes


EXIT_CASES = {
    # id: (extra options, script, expected exit code)
    "clean": ([], MIRROR, 0),
    "command-failed": ([], "exit 7", 7),
    "violations": ([], f"{GITHUB}; exit 0", VIOLATION_EXIT),
    "both": ([], f"{GITHUB}; exit 7", 7),
    "killed-by-signal": ([], "kill -TERM $$", 128 + signal.SIGTERM),
    "violations-and-signal": ([], f"{GITHUB}; kill -TERM $$", 128 + signal.SIGTERM),
    "audit-mode-violations": (["--mode", "audit"], f"{GITHUB}; exit 0", VIOLATION_EXIT),
}


@pytest.mark.parametrize(("options", "script", "expected"), EXIT_CASES.values(), ids=EXIT_CASES)
def test_exit_code(options: list[str], script: str, expected: int) -> None:
    proc = depfence(
        "run", *UPSTREAM, "--no-egress", "github.com", *options, "--", "sh", "-c", script
    )
    assert proc.returncode == expected, describe(proc)
    warned = log_lines(proc.stderr, "WARN ")
    if "curl -s http://github.com/" in script:
        assert warned, f"no WARN line for the forbidden query\n{describe(proc)}"
        assert f"exit {expected}" in proc.stderr.splitlines()[-1], describe(proc)
    else:
        assert warned == [], describe(proc)
    if "--mode" in options:  # audit: nothing was blocked, the lab's github.com answered
        assert "lab:github.com" in proc.stdout, describe(proc)
        assert all(" AUDITED " in line for line in warned), describe(proc)


def test_timeout_exits_124_and_says_so(fifo: Callable[[str], Fifo]) -> None:
    never = fifo("never")  # nobody writes: the script waits until it is killed
    proc = depfence(
        "run", *UPSTREAM, "--timeout", "0.5", "--", "sh", "-c", 'read x < "$0"', str(never)
    )
    assert proc.returncode == TIMEOUT_EXIT, describe(proc)
    assert "timed out after 0.5 s; everything it started was killed" in proc.stderr


def test_command_not_found_exits_127() -> None:
    proc = depfence("run", *UPSTREAM, "--", "no-such-command-depfence")
    assert proc.returncode == NOT_FOUND_EXIT, describe(proc)
    assert "no-such-command-depfence: command not found" in proc.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (
            ["--no-egress", "https://github.com", "--", "true"],
            ["'https://github.com'", "--no-egress"],
        ),
        (["--upstream", "dns.google", "--", "true"], ["'dns.google'", "--upstream"]),
        (["--timeout", "0", "--", "true"], ["'0'", "--timeout"]),
        (["--mode", "panic", "--", "true"], ["'panic'", "--mode"]),
        (["--outage", "meltdown", "--", "true"], ["'meltdown'", "--outage", "nxdomain"]),
        (
            [
                "--",
            ],
            ["no command given"],
        ),
    ],
    ids=["pattern", "upstream", "timeout", "mode", "outage", "no-command"],
)
def test_wrong_arguments_exit_125_naming_the_value(args: list[str], named: list[str]) -> None:
    proc = depfence("run", *args)
    assert proc.returncode == FENCE_ERROR_EXIT, describe(proc)
    for text in named:
        assert text in proc.stderr, describe(proc)


def test_terminating_depfence_kills_the_command_and_exits_128_plus_signal(
    fifo: Callable[[str], Fifo],
) -> None:
    pids, never = fifo("pids"), fifo("never")
    script = 'echo "$$" > "$0"; read x < "$1"'
    cli = subprocess.Popen(
        [*CLI, "run", *UPSTREAM, "--", "sh", "-c", script, str(pids), str(never)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        shell = int(pids.read_line(timeout=RUN_TIMEOUT))
        pidfd = os.pidfd_open(shell)
        cli.send_signal(signal.SIGTERM)
        out, err = cli.communicate(timeout=RUN_TIMEOUT)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    try:
        assert select.select([pidfd], [], [], 10)[0], "the fenced script outlived depfence"
    finally:
        os.close(pidfd)
    assert cli.returncode == 128 + signal.SIGTERM, f"{cli.returncode}\n{out}\n{err}"
    assert "stopped by SIGTERM; everything the command started was killed" in err


# --------------------------------------------------------------------------- log lines


def test_blocked_dns_log_line_names_domain_pid_and_command_blocklist() -> None:
    script = f'{GITHUB} & echo "$!"; wait'
    proc = depfence("run", *UPSTREAM, "--no-egress", "github.com", "--", "sh", "-c", script)
    assert proc.returncode == VIOLATION_EXIT, describe(proc)
    curl = int(proc.stdout.split()[0])
    shape = (
        "WARN DNS BLOCKED reason=FromDNSRequest blocked=true blockedAt=dns domain=github.com. "
        f'pid={curl} cmd="{GITHUB}" firewallMethod=blocklist'
    )
    blocked = log_lines(proc.stderr, "WARN DNS BLOCKED")
    assert blocked, describe(proc)
    assert {line for line in blocked} <= {f"{shape} qtype=A", f"{shape} qtype=AAAA"}, blocked
    assert f"{shape} qtype=A" in blocked


def test_log_lines_allowlist_allowed_and_refused_connection() -> None:
    allowed, refused = "curl -4 -s http://mirror.internal/", "curl -s http://10.77.1.1/"
    script = f'{allowed} & echo "$!"; wait; {GITHUB} & echo "$!"; wait; {refused} & echo "$!"; wait'
    proc = depfence("run", *UPSTREAM, "--egress-only", "mirror.internal", "--", "sh", "-c", script)
    assert proc.returncode == VIOLATION_EXIT, describe(proc)
    pids = [int(word) for word in proc.stdout.split() if word.isdigit()]
    assert len(pids) == 3, describe(proc)
    mirror, github, direct = pids
    lines = proc.stderr.splitlines()
    assert (
        "INFO DNS ALLOWED reason=FromDNSRequest blocked=false blockedAt=none "
        f'domain=mirror.internal. pid={mirror} cmd="{allowed}" firewallMethod=allowlist qtype=A'
    ) in lines, describe(proc)
    assert (
        "INFO CONN ALLOWED reason=FromConnect blocked=false blockedAt=none "
        "domain=mirror.internal. address=10.77.3.1 port=80 protocol=tcp "
        f'pid={mirror} cmd="{allowed}" firewallMethod=allowlist learnedFrom=dns'
    ) in lines, describe(proc)
    assert (
        "WARN DNS BLOCKED reason=FromDNSRequest blocked=true blockedAt=dns domain=github.com. "
        f'pid={github} cmd="{GITHUB}" firewallMethod=allowlist qtype=A'
    ) in lines, describe(proc)
    assert (
        "WARN CONN BLOCKED reason=FromConnect blocked=true blockedAt=connect "
        f'address=10.77.1.1 port=80 protocol=tcp pid={direct} cmd="{refused}" '
        "firewallMethod=allowlist"
    ) in lines, describe(proc)


def test_log_line_of_dns_sent_past_the_proxy_and_quiet() -> None:
    dig = "dig @10.77.0.53 -p 5300 +time=1 +tries=1 github.com"
    proc = depfence(
        "run", *UPSTREAM, "--quiet", "--no-egress", "github.com", "--", *shlex.split(dig)
    )
    assert proc.returncode == 9, describe(proc)  # dig: no answer (the query was dropped)
    assert log_lines(proc.stderr, "INFO ") == [], "--quiet still logged INFO lines"
    dig_pid = re.search(r"pid=(\d+)", proc.stderr)
    assert dig_pid, describe(proc)
    assert (
        "WARN DNS BLOCKED reason=FromDNSBypass blocked=true blockedAt=packet domain=github.com. "
        f"address=10.77.0.53 port=5300 protocol=udp pid={dig_pid[1]} "
        f'cmd="{dig}" firewallMethod=blocklist outage=dropped qtype=A'
    ) in proc.stderr.splitlines(), describe(proc)


# --------------------------------------------------------------------------- streaming


class PipeLines:
    """Lines from a pipe, each waited for with a deadline (a dead CLI fails, not hangs)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""

    def line(self, timeout: float = RUN_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                raise TimeoutError(f"no complete line within {timeout}s; got {self.buffer!r}")
            chunk = os.read(self.fd, 4096)
            if not chunk:
                raise EOFError(f"the pipe closed; got {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def rest(self) -> str:
        chunks = [self.buffer]
        while chunk := os.read(self.fd, 4096):
            chunks.append(chunk)
        return b"".join(chunks).decode()


def test_output_and_events_stream_while_the_command_runs(fifo: Callable[[str], Fifo]) -> None:
    gate = fifo("gate")
    script = f'echo first; echo err-first >&2; {GITHUB}; read x < "$0"; echo second'
    cli = subprocess.Popen(
        [*CLI, "run", *UPSTREAM, "--no-egress", "github.com", "--", "sh", "-c", script, str(gate)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert cli.stdout is not None and cli.stderr is not None
    try:
        out, err = PipeLines(cli.stdout.fileno()), PipeLines(cli.stderr.fileno())
        assert out.line() == "first"
        seen = [err.line()]
        while not seen[-1].startswith("WARN DNS BLOCKED"):
            seen.append(err.line())
        assert "err-first" in seen
        assert cli.poll() is None, "the CLI ended before the script was released"
        gate.write_line()
        assert cli.wait(timeout=RUN_TIMEOUT) == VIOLATION_EXIT
        assert out.rest() == "second\n"
        err.rest()
    finally:
        if cli.poll() is None:
            cli.terminate()
            cli.wait(timeout=RUN_TIMEOUT)
        cli.stdout.close()
        cli.stderr.close()


# --------------------------------------------------------------------------- --json, --lab


def test_json_result_is_a_run_of_the_report_schema(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    argv = ["sh", "-c", f"{GITHUB}; {MIRROR}"]
    proc = depfence("run", *UPSTREAM, "--no-egress", "github.com", "--json", str(out), "--", *argv)
    assert proc.returncode == VIOLATION_EXIT, describe(proc)
    data = json.loads(out.read_text())
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    run_schema = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": "#/$defs/run"}
    jsonschema.validators.validator_for(schema)(run_schema).validate(data)
    assert data["command"] == shlex.join(argv)
    assert data["policy"] == 'no_egress("github.com")'
    assert (data["mode"], data["outage"], data["returncode"], data["timed_out"]) == (
        "block",
        "nxdomain",
        0,
        False,
    )
    assert data["duration"] > 0
    assert data["domains"] == ["github.com", "mirror.internal"]
    assert data["violations"] == [e for e in data["events"] if e["forbidden"]]
    assert data["violations"], describe(proc)
    for event in data["violations"]:
        assert (event["domain"], event["verdict"], event["blocked_at"]) == (
            "github.com",
            "blocked",
            "dns",
        )
        assert event["cmdline"] == GITHUB and isinstance(event["pid"], int)
        assert event["ancestry"][-1]["cmdline"] == shlex.join(argv)


def test_lab_flag_runs_in_its_own_lab() -> None:
    proc = depfence(
        "run", "--lab", "--no-egress", "github.com", "--", "sh", "-c", f"{GITHUB}; {MIRROR}"
    )
    assert proc.returncode == VIOLATION_EXIT, describe(proc)
    assert proc.stdout == "lab:mirror.internal\n"  # the lab's mirror answered, through the fence
    assert log_lines(proc.stderr, "WARN DNS BLOCKED reason=FromDNSRequest")


# --------------------------------------------------------------------------- audit


def test_audit_lists_destinations_and_programs_and_blocks_nothing() -> None:
    proc = depfence(
        "audit", *UPSTREAM, "--no-egress", "github.com", "--", "sh", "-c", f"{GITHUB}; {MIRROR}"
    )
    assert proc.returncode == 0, describe(proc)  # forbidden egress, but audit never fails on it
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["lab:github.com", "lab:mirror.internal"], describe(proc)
    assert lines[2].startswith("depfence audit: 2 destinations contacted while running sh -c")
    assert [line.split() for line in lines[3:]] == [
        ["github.com", "curl"],
        ["mirror.internal", "curl"],
    ]
    assert log_lines(proc.stderr, "WARN DNS AUDITED"), describe(proc)


@pytest.mark.parametrize(
    ("script", "expected"),
    [(f"{GITHUB}; exit 5", 5), (f"{GITHUB}; kill -TERM $$", 128 + signal.SIGTERM)],
    ids=["failed", "killed-by-signal"],
)
def test_audit_never_masks_the_commands_failure(script: str, expected: int) -> None:
    proc = depfence("audit", *UPSTREAM, "--", "sh", "-c", script)
    assert proc.returncode == expected, describe(proc)
    assert re.search(r"^\s+github\.com\s+curl$", proc.stdout, re.M), describe(proc)


def test_write_contract_is_byte_identical_across_runs(tmp_path: Path) -> None:
    target = tmp_path / "contracts" / "deploy.contract"
    v4, v6 = "curl -s http://10.77.3.2/ >/dev/null", "curl -s -g http://[fd77::3:2]/ >/dev/null"
    script = f"{GITHUB} >/dev/null; {v4}; {v6}"
    args = ["audit", *UPSTREAM, "--write-contract", str(target), "--", "sh", "-c", script]
    first = depfence(*args, check_code=0)
    text = target.read_bytes()
    second = depfence(*args, check_code=0)
    assert target.read_bytes() == text
    assert f'wrote contract "deploy" to {target} (3 destinations; new)' in first.stdout
    assert f'wrote contract "deploy" to {target} (3 destinations; unchanged)' in second.stdout
    lines = text.decode().splitlines()
    assert lines[0] == '# depfence contract "deploy"'
    assert lines[1] == "# Regenerate: " + shlex.join(["depfence", *args])
    contract = Contract.parse(text.decode(), target)
    assert dict(contract.entries) == {
        "github.com": frozenset({"curl"}),
        "10.77.3.2:80/tcp": frozenset({"curl"}),
        "[fd77::3:2]:80/tcp": frozenset({"curl"}),  # an IPv6 address next to its port: bracketed
    }
    fewer = ["audit", *UPSTREAM, "--write-contract", str(target), "--", "sh", "-c", v4]
    third = depfence(*fewer, check_code=0)
    assert f'wrote contract "deploy" to {target} (1 destination; changed)' in third.stdout
    assert [p.name for p in target.parent.iterdir()] == ["deploy.contract"], "a partial file"


# --------------------------------------------------------------------------- doctor, help


CHECKS = [
    "privileges",
    "kernel",
    "cgroup v2",
    "bcc",
    "kernel headers",
    "tracefs",
    "limits",
    "entry",
    "compile+attach",
]


def check_lines(stdout: str) -> dict[str, str]:
    found = {}
    for line in stdout.splitlines():
        for name in CHECKS:
            if re.match(rf"^(OK|FAIL|SKIP) +{re.escape(name)}  ", line):
                found[name] = line.split()[0]
    return found


def test_doctor_passes_here_and_leaves_no_cgroup() -> None:
    proc = depfence("doctor", check_code=0)
    assert check_lines(proc.stdout) == {name: "OK" for name in CHECKS}, describe(proc)
    attached = re.search(r"attached to (\S+), then detached and removed", proc.stdout)
    assert attached, describe(proc)
    assert not Path(attached[1]).exists()
    assert (
        proc.stdout.splitlines()[-1] == f"all {len(CHECKS)} checks passed: fences can be built here"
    )


def test_doctor_without_bcc_says_how_to_install_it(tmp_path: Path, cli_env: dict[str, str]) -> None:
    empty = tmp_path / "no-bcc-here"
    empty.mkdir()
    proc = depfence("doctor", env={**cli_env, "DEPFENCE_BCC_PATH": str(empty)})
    assert proc.returncode != 0, describe(proc)
    status = check_lines(proc.stdout)
    assert status["bcc"] == "FAIL" and status["compile+attach"] == "SKIP", describe(proc)
    assert status["privileges"] == status["cgroup v2"] == "OK", describe(proc)
    bcc_part = proc.stdout[proc.stdout.index("FAIL  bcc") :]
    assert f"bcc is not installed (looked in DEPFENCE_BCC_PATH='{empty}')" in bcc_part
    assert "fix: " in bcc_part and "apt-get install python3-bpfcc" in bcc_part


@pytest.mark.parametrize("command", ["", "run", "audit", "doctor"])
def test_help_shows_examples(command: str) -> None:
    proc = depfence(*([command] if command else []), "--help", check_code=0)
    assert "examples:" in proc.stdout
    examples = proc.stdout.split("examples:", 1)[1]
    # An example line: the command itself, perhaps after sudo or an environment setting.
    example = rf"^  (sudo |\S+=\S+ )?depfence {command or 'run'}( |$)"
    assert re.search(example, examples, re.M), proc.stdout
