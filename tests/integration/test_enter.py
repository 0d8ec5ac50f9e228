"""depfence-enter (pytest_depfence/enter.c), the first program of every fenced command.

Built by the machine's real C compiler into a temporary cache directory, then run as a
fence runs it: it moves into each cgroup it is given, unshares the cgroup namespace,
drops the capabilities and takes the seccomp filter it is given, then runs the command
as execvp(3) would (the PATH of the command's environment, a script without `#!`
through /bin/sh, argv[0] and the environment untouched). A step that fails runs nothing.
The cache is used only when it is the user's alone.

test_escape.py runs its escape attempts through both entries (this program, and the
sh + unshare chain used where it cannot be built).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_depfence import confine, enter
from pytest_depfence.cgroup import cgroup2_mount

if shutil.which("cc") is None and shutil.which("gcc") is None:
    pytest.skip("building depfence-enter needs a C compiler", allow_module_level=True)


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> str:
    return enter.build(tmp_path_factory.mktemp("cache") / "pytest-depfence")


def run(helper: str, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helper, *args], capture_output=True, text=True, timeout=30, check=False, **kwargs
    )  # type: ignore[call-overload]


# --------------------------------------------------------------------------- the build


def test_a_build_is_kept_and_used_again_without_a_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    built = Path(enter.build(cache))
    assert (built.stat().st_mode & 0o777, cache.stat().st_mode & 0o777) == (0o700, 0o700)
    assert [p.name for p in cache.iterdir()] == [built.name]  # no temporary file left
    first = built.stat()

    monkeypatch.setattr(shutil, "which", lambda name, **_: None)
    assert enter.build(cache) == str(built)
    assert (built.stat().st_ino, built.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)


def test_roots_cache_is_never_in_a_home_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    # `sudo -E` keeps the invoking user's HOME (and XDG_CACHE_HOME): root's helper must
    # not live where that user may swap it.
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("XDG_CACHE_HOME", "/home/someone/.cache")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert enter.cache_dir() == Path("/var/cache/pytest-depfence")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert enter.cache_dir() == Path("/home/someone/.cache/pytest-depfence")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert enter.cache_dir() == Path("/home/someone/.cache/pytest-depfence")


def test_without_a_compiler_there_is_no_helper_and_it_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, **_: None)
    with pytest.raises(enter.Unavailable, match=r"no C compiler \(cc\)"):
        enter.build(tmp_path / "cache")


def test_an_error_while_building_means_no_helper_not_a_failed_fence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Stands in for a cache directory root may not read (NFS with root_squash, say).
    def unreadable(directory: Path) -> str:
        raise PermissionError(13, "Permission denied", str(directory))

    monkeypatch.setattr(enter, "build", unreadable)
    enter._found.cache_clear()
    try:
        assert enter.helper() is None
        assert enter.reason() == (
            "cannot build or check depfence-enter: [Errno 13] Permission denied: "
            f"'{enter.cache_dir()}'"
        )
    finally:
        enter._found.cache_clear()


def test_a_cache_others_may_write_is_not_used(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    with pytest.raises(enter.Unavailable, match=rf"{cache} is not this user's alone .*drwxrwxrwx"):
        enter.build(cache)
    assert list(cache.iterdir()) == []


def test_a_cache_below_a_directory_others_may_write_is_not_used(tmp_path: Path) -> None:
    # Under `sudo -E` the cache is in the invoking user's home: they could swap the
    # directory for one of their own after the check. (Sticky /tmp, above tmp_path, is fine.)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(enter.Unavailable, match=rf"{shared} is not this user's alone"):
        enter.build(shared / "home" / ".cache" / "pytest-depfence")
    assert [p.name for p in (shared / "home" / ".cache" / "pytest-depfence").iterdir()] == []


def test_a_file_planted_under_the_helpers_name_is_not_run(tmp_path: Path, helper: str) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    planted = cache / Path(helper).name
    planted.symlink_to("/bin/true")
    with pytest.raises(enter.Unavailable, match="not this user's alone"):
        enter.build(cache)
    planted.unlink()
    shutil.copy(helper, planted)
    os.chown(planted, 65534, 65534)
    with pytest.raises(enter.Unavailable, match="owner uid 65534"):
        enter.build(cache)


def test_a_cache_on_a_noexec_mount_is_not_used(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("mounting a tmpfs needs root and unshare (util-linux)")
    mount = tmp_path / "noexec"
    mount.mkdir()
    probe = (
        "from pathlib import Path; from pytest_depfence import enter\n"
        "try: enter.build(Path(__import__('sys').argv[1]))\n"
        "except enter.Unavailable as exc: print(exc)\n"
    )
    script = 'mount -t tmpfs -o noexec,mode=0700 none "$0" && exec "$1" -c "$2" "$0/cache"'
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, mount,
         sys.executable, probe],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.stdout == f"{mount}/cache is on a file system mounted noexec\n", done.stderr


def test_a_compiler_whose_output_does_not_run_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stands in for a compiler that builds something other than a working program
    # (another architecture's, or one that crashes at its first instruction).
    fake = tmp_path / "bin" / "cc"
    fake.parent.mkdir()
    fake.write_text(
        '#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done\n'
        'printf "#!/bin/sh\\nexit 3\\n" > "$2"; chmod +x "$2"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    cache = tmp_path / "cache"
    with pytest.raises(enter.Unavailable, match=r"does not run \(exit 3\)"):
        enter.build(cache)
    assert list(cache.iterdir()) == []


# --------------------------------------------------------------------------- the exec


def test_argv_and_the_environment_reach_the_command_untouched(helper: str) -> None:
    script = "cat /proc/$$/cmdline"
    env = {"PATH": os.environ["PATH"], "ODD": "a b\tc=d", "EMPTY": ""}
    argv = run(helper, "--", "sh", "-c", script, "x y", "", env=env)
    environment = run(helper, "--", "env", "-0", env=env)
    assert argv.stdout == f"sh\0-c\0{script}\0x y\0\0"  # argv[0] as given, not a path
    assert sorted(environment.stdout.split("\0")[:-1]) == sorted(f"{k}={v}" for k, v in env.items())


def test_the_command_is_found_in_its_own_path_and_a_script_without_shebang_runs_in_sh(
    helper: str, tmp_path: Path
) -> None:
    denied, found = tmp_path / "denied", tmp_path / "found"
    for directory in (denied, found):
        directory.mkdir()
    (denied / "deploy").write_text("echo not this one\n")
    (denied / "deploy").chmod(0o644)  # EACCES: execvp goes on to the next entry
    (found / "deploy").write_text('echo ran "$0" "$@"\n')  # no #!: ENOEXEC, then /bin/sh
    (found / "deploy").chmod(0o755)
    done = run(helper, "--", "deploy", "one", env={"PATH": f"/nonexistent:{denied}:{found}"})
    assert (done.returncode, done.stdout, done.stderr) == (0, f"ran {found}/deploy one\n", "")


def test_a_command_that_cannot_run_exits_as_unshare_would(helper: str, tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("echo hi\n")
    script.chmod(0o644)
    missing = run(helper, "--", "no-such-command", env={"PATH": str(tmp_path)})
    denied = run(helper, "--", str(script))
    assert (missing.returncode, missing.stderr) == (
        127,
        "depfence-enter: failed to execute no-such-command: No such file or directory\n",
    )
    assert (denied.returncode, denied.stderr) == (
        126,
        f"depfence-enter: failed to execute {script}: Permission denied\n",
    )
    usage = run(helper, str(script))
    assert (usage.returncode, usage.stdout) == (126, "")
    assert usage.stderr.startswith("depfence-enter: usage: depfence-enter [-c CAP]... [-f FILTER]")


def test_it_writes_0_to_each_procs_file_in_turn_and_runs_nothing_after_a_failure(
    helper: str, tmp_path: Path
) -> None:
    # Regular files stand in for cgroup.procs here; the move itself is the test below.
    first, missing, last = tmp_path / "first", tmp_path / "gone" / "cgroup.procs", tmp_path / "last"
    first.write_text("")
    last.write_text("")
    marker = tmp_path / "ran"
    done = run(helper, str(first), str(missing), str(last), "--", "touch", str(marker))
    assert (done.returncode, done.stdout) == (126, "")  # 127 is for a command not found
    assert done.stderr == (
        f"depfence-enter: cannot enter the cgroup of {missing}: No such file or directory\n"
    )
    assert (first.read_text(), last.read_text(), marker.exists()) == ("0", "", False)


def test_it_moves_into_the_cgroup_then_unshares(helper: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("moving into a cgroup needs root")
    cgroup = cgroup2_mount() / f"depfence-test-enter-{os.getpid()}"
    cgroup.mkdir()
    try:
        procs = str(cgroup / "cgroup.procs")
        script = 'grep ^0:: /proc/self/cgroup; readlink /proc/self/ns/cgroup; echo $$; cat "$0"'
        done = run(helper, procs, "--", "sh", "-c", script, procs)
    finally:
        cgroup.rmdir()
    lines = done.stdout.splitlines()
    assert (lines[0], done.returncode) == ("0::/", 0), done.stderr
    assert lines[1] != os.readlink("/proc/self/ns/cgroup")
    assert lines[2] in lines[3:]  # the shell's pid, in the cgroup's procs seen from outside


def capabilities(status: str) -> dict[str, int]:
    """CapInh, CapPrm, CapEff, CapBnd and CapAmb of a /proc/PID/status text."""
    return {
        key: int(value, 16)
        for key, _, value in (line.partition(":\t") for line in status.splitlines())
        if key.startswith("Cap")
    }


def test_it_drops_the_capabilities_it_is_given(helper: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("a bounding set is dropped with CAP_SETPCAP")
    raw, ptrace = 1 << confine.CAP_NET_RAW, 1 << confine.CAP_SYS_PTRACE
    kept = capabilities(run(helper, "--", "cat", "/proc/self/status").stdout)
    done = run(helper, "-c", "13", "-c", "19", "--", "cat", "/proc/self/status")
    assert done.returncode == 0, done.stderr
    dropped = capabilities(done.stdout)
    assert kept["CapBnd"] & raw and kept["CapPrm"] & ptrace  # root's, before
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert dropped[key] == kept[key] & ~(raw | ptrace), key


def test_it_takes_the_seccomp_filter_it_is_given(helper: str) -> None:
    # The filter a fence gives, protecting this test's process: the command may not even
    # probe it with signal 0, nor reach a program by id through bpf(); without the filter
    # it may. (What the filter refuses, call by call: tests/unit/test_seccomp.py.)
    options = confine.enter_options(raw_sockets=True, protect=[os.getpid()])
    probe = (
        "import ctypes, os, sys\n"
        "try:\n    os.kill(int(sys.argv[1]), 0); print('signalled')\n"
        "except PermissionError: print('refused')\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "attr = ctypes.create_string_buffer(128)\n"  # BPF_PROG_GET_FD_BY_ID, id 1
        "attr[0] = 1\n"
        "libc.syscall(321, 13, attr, 128)\n"
        "print(os.strerror(ctypes.get_errno()))\n"
        "print(open('/proc/self/status').read().split('Seccomp:')[1].split()[0])\n"
    )
    argv = [sys.executable, "-c", probe, str(os.getpid())]
    fenced = run(helper, *options, "--", *argv)
    plain = run(helper, "--", *argv)
    assert fenced.stdout.splitlines() == ["refused", "Operation not permitted", "2"], fenced.stderr
    assert plain.stdout.splitlines()[0] == "signalled"
    assert plain.stdout.splitlines()[2] == "0"


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("-c", "64", "not a capability number: 64"),
        ("-c", "", "not a capability number: "),
        ("-c", "NET_RAW", "not a capability number: NET_RAW"),
        ("-f", "0600", "not a seccomp filter (whole instructions in hex): 0600"),
        ("-f", "0600000000FF7F00", "not a seccomp filter (whole instructions in hex): 06"),
        ("-f", "00" * 8 * 4097, "a seccomp filter of more than 4096 instructions"),
        ("-f", "", "not a seccomp filter (whole instructions in hex): "),
    ],
)
def test_an_option_it_cannot_take_runs_nothing(
    helper: str, tmp_path: Path, option: str, value: str, said: str
) -> None:
    marker = tmp_path / "ran"
    done = run(helper, option, value, "--", "touch", str(marker))
    assert (done.returncode, done.stdout, marker.exists()) == (126, "", False)
    assert done.stderr.startswith(f"depfence-enter: {said}")
