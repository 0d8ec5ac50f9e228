"""Who asked: pid, command line and process chain of each DNS query, however the asker behaved.

The hard cases for attribution: a query sent from a thread (the event names
the process, not the thread), a sender that exits the moment its datagram is
out (nothing left in /proc to read), a background job whose parent has
already exited, and queries several shells deep. Every case checks the exact
pid (printed by the process itself) and the exact command line.

Scripts print their own pids; coordination with background jobs goes through
FIFOs, never sleeps. Python clients run as sys.executable and keep their
code under the kernel record's 255-byte argument limit, so the recorded argv
is complete.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_depfence import Fence, FenceResult

if os.geteuid() != 0:
    pytest.skip("fenced clients need root (cgroups, eBPF)", allow_module_level=True)
_missing = [t for t in ("getent", "curl", "mkfifo") if not shutil.which(t)]
if _missing:
    pytest.skip(f"these tests need {', '.join(_missing)}", allow_module_level=True)

PY = sys.executable
# A DNS query for github.com/A with id 0x1234, as it goes on the wire.
GITHUB_A = "1234010000010000000000000667697468756203636f6d0000010001"


def github_events(result: FenceResult) -> list:
    events = [e for e in result.events if e.domain == "github.com"]
    assert events, f"no github.com event; events: {result.events}"
    for event in events:
        assert event.unattributed is None, event.unattributed
        assert (event.verdict, event.blocked_at) == ("blocked", "dns")
    return events


def pids(stdout: str) -> list[int]:
    return [int(line) for line in stdout.split()]


# --------------------------------------------------------------------------- threads


THREAD_QUERY = """\
import os,socket,threading as t
def f():
 print(t.get_native_id(),flush=True)
 try:socket.getaddrinfo('github.com',80)
 except OSError:pass
print(os.getpid(),flush=True)
x=t.Thread(target=f);x.start();x.join()
"""


@pytest.mark.no_egress("github.com")
def test_query_from_a_thread_names_the_process(fenced: Fence) -> None:
    argv = [PY, "-c", THREAD_QUERY]
    assert len(THREAD_QUERY) < 255
    result = fenced.run(argv, check=False, timeout=30)

    pid, tid = pids(result.stdout)
    assert tid != pid
    for event in github_events(result):
        assert event.pid == pid
        assert event.cmdline == shlex.join(argv)
        assert event.ancestry == ()


# --------------------------------------------------------------------------- exiting askers


SEND_AND_EXIT = {
    # One datagram with sendto() to the lab resolver, then gone without reading a reply.
    "udp": "import os,socket\nprint(os.getpid(),flush=True)\n"
    f"socket.socket(2,2).sendto(bytes.fromhex('{GITHUB_A}'),('10.77.0.53',53))\nos._exit(0)",
    # Same over TCP: the length-prefixed query, then exit with the connection open.
    "tcp": "import os,socket\nprint(os.getpid(),flush=True)\nq=bytes.fromhex('"
    f"{GITHUB_A}')\nsocket.create_connection(('10.77.0.53',53)).send(bytes([0,len(q)])+q)"
    "\nos._exit(0)",
}


@pytest.mark.no_egress("github.com")
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_sender_that_exits_right_after_its_query(fenced: Fence, transport: str) -> None:
    code = SEND_AND_EXIT[transport]
    assert len(code) < 255
    argv = [PY, "-c", code]
    result = fenced.run(argv, check=False, timeout=30)

    assert result.returncode == 0, result.stderr
    [pid] = pids(result.stdout)
    [event] = github_events(result)
    assert (event.pid, event.cmdline, event.ancestry) == (pid, shlex.join(argv), ())
    assert (event.protocol, event.qtype) == (transport, "A")


@pytest.mark.no_egress("github.com")
def test_background_sender_of_a_script_that_already_exited(fenced: Fence, tmp_path: Path) -> None:
    # The script starts the sender in the background and exits as soon as the datagram
    # is out (the sender says so through a FIFO); the sender exits at once too.
    code = (
        "import os,socket,sys\nprint(os.getpid(),flush=True)\nsocket.socket(2,2).sendto("
        f"bytes.fromhex('{GITHUB_A}'),('10.77.0.53',53))\nopen(sys.argv[1],'w').write('x\\n')"
    )
    assert len(code) < 255
    script = 'echo $$; mkfifo "$0"; "$1" -c "$2" "$0" & read x < "$0"; exit 0'
    argv = ["sh", "-c", script, str(tmp_path / "sent"), PY, code]
    result = fenced.run(argv, check=False, timeout=30)

    assert result.returncode == 0, result.stderr
    root, sender = pids(result.stdout)
    [event] = github_events(result)
    assert event.pid == sender
    assert event.cmdline == shlex.join([PY, "-c", code, str(tmp_path / "sent")])
    assert event.ancestry == ((root, shlex.join(argv)),)


@pytest.mark.no_egress("github.com")
def test_getent_in_the_background_of_an_exiting_shell(fenced: Fence, tmp_path: Path) -> None:
    # `getent ... & exit 0`, made deterministic: the shell exits once getent has asked.
    script = (
        'echo $$; mkfifo "$0"; '
        '{ getent hosts github.com & echo $!; wait $!; echo done > "$0"; } & '
        'read x < "$0"; exit 0'
    )
    argv = ["sh", "-c", script, str(tmp_path / "asked")]
    result = fenced.run(argv, check=False, timeout=30)

    assert result.returncode == 0, result.stderr
    root, getent = pids(result.stdout)
    for event in github_events(result):
        assert (event.pid, event.cmdline) == (getent, "getent hosts github.com")
        # getent's parent is the background subshell (a fork of the script), then the script.
        subshell, top = event.ancestry
        assert top == (root, shlex.join(argv))
        assert subshell[1] == shlex.join(argv) and subshell[0] not in (root, getent)


# --------------------------------------------------------------------------- ancestry


@pytest.mark.no_egress("github.com")
def test_script_file_is_in_the_ancestry(fenced: Fence, tmp_path: Path) -> None:
    deploy = tmp_path / "deploy.sh"
    deploy.write_text("#!/bin/sh\necho $$\ncurl -sS http://github.com/\nexit 0\n")
    deploy.chmod(0o755)
    argv = [str(deploy), "--config", "new.cnf"]
    result = fenced.run(argv, check=False, timeout=30)

    assert result.returncode == 0, result.stderr
    [root] = pids(result.stdout)
    for event in github_events(result):
        assert event.cmdline == "curl -sS http://github.com/"
        assert event.pid != root
        assert event.ancestry == ((root, shlex.join(argv)),)


@pytest.mark.no_egress("github.com")
def test_nested_shells_are_each_in_the_ancestry(fenced: Fence) -> None:
    # `; true` keeps each shell from exec'ing its last command, so every level stays a process.
    inner = "echo $$; curl -sS http://github.com/; true"
    middle = f"echo $$; sh -c {shlex.quote(inner)}; true"
    outer = f"echo $$; sh -c {shlex.quote(middle)}; true"
    argv = ["sh", "-c", outer]
    result = fenced.run(argv, check=False, timeout=30)

    top, mid, low = pids(result.stdout)
    for event in github_events(result):
        assert event.cmdline == "curl -sS http://github.com/"
        assert event.pid not in (top, mid, low)
        assert event.ancestry == (
            (low, shlex.join(["sh", "-c", inner])),
            (mid, shlex.join(["sh", "-c", middle])),
            (top, shlex.join(argv)),
        )


@pytest.mark.no_egress("github.com")
def test_exec_in_a_script_names_the_new_program(fenced: Fence) -> None:
    # The script's process becomes curl: same pid, curl's command line, no ancestry.
    argv = ["sh", "-c", 'echo $$; exec curl -sS "http://github.com/"']
    result = fenced.run(argv, check=False, timeout=30)

    [root] = pids(result.stdout)
    for event in github_events(result):
        assert (event.pid, event.cmdline, event.ancestry) == (
            root,
            "curl -sS http://github.com/",
            (),
        )


@pytest.mark.no_egress("github.com")
def test_exec_a_does_not_hide_the_real_program(fenced: Fence) -> None:
    # `exec -a` puts any name in argv[0]; the path given to execve is the program.
    curl = shutil.which("curl")
    argv = ["bash", "-c", 'echo $$; exec -a innocuous-tool curl -sS "http://github.com/"']
    result = fenced.run(argv, check=False, timeout=30)

    [root] = pids(result.stdout)
    for event in github_events(result):
        assert event.pid == root
        assert event.cmdline == f"innocuous-tool -sS http://github.com/ (exe {curl})"
    shown = str(result.violations[0].cmdline)
    assert "innocuous-tool" in shown and curl is not None and curl in shown
