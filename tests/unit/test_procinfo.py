"""Attribution from the kernel's process records.

`Records` stands in for kernel.Programs (the BPF `procs` map): it returns
ProcRecord values the way the kernel would have recorded them.
"""

from pytest_depfence import procinfo
from pytest_depfence.kernel import ProcRecord
from pytest_depfence.procinfo import attribute, cmdline_of

CG = 1234


class Records:
    def __init__(self, *records):
        self.by_pid = {r.pid: r for r in records}

    def process(self, pid, at_ns=None):
        return self.by_pid.get(pid)


def rec(pid, ppid, *argv, cgroup_id=CG, truncated=False, exited=True):
    return ProcRecord(pid, ppid, tuple(argv), truncated, exited, cgroup_id)


def test_walks_parents_up_to_the_script():
    source = Records(
        rec(10, 0, "/bin/sh", "./deploy.sh"),
        rec(11, 10, "python3", "-c", "import x; x.y()"),
        rec(12, 11, "curl", "-s", "http://github.com/"),
    )
    who = attribute(source, 12, CG, root_pid=10)
    assert who.pid == 12
    assert who.cmdline == "curl -s http://github.com/"
    assert who.ancestry == ((11, "python3 -c 'import x; x.y()'"), (10, "/bin/sh ./deploy.sh"))


def test_a_record_from_another_fence_is_never_shown():
    source = Records(rec(12, 0, "curl", cgroup_id=999))
    who = attribute(source, 12, CG, root_pid=10)
    assert who.pid is None and who.cmdline is None
    assert "not recorded in this fence" in who.unattributed


def test_ancestry_stops_at_a_parent_outside_the_fence_and_at_loops():
    source = Records(rec(12, 11, "curl"), rec(11, 12, "sh"), rec(5, 0, "init", cgroup_id=1))
    assert attribute(source, 12, CG, root_pid=None).ancestry == ((11, "sh"),)
    assert attribute(Records(rec(12, 5, "curl")), 12, CG, None).ancestry == ()


def test_truncated_argv_of_an_exited_process_is_marked_not_guessed():
    record = rec(12, 0, "python3", "-c", "x" * 255, truncated=True, exited=True)
    assert cmdline_of(record).endswith(" …")


def test_a_command_line_is_quoted_once_per_argv(monkeypatch):
    # Every DNS query of a resolver loop names the same process: its argv is quoted
    # once, and a process that execs (a new argv under the same pid) gets its own.
    calls = []
    join = procinfo.shlex.join
    monkeypatch.setattr(procinfo, "_cmdlines", {})
    monkeypatch.setattr(procinfo.shlex, "join", lambda argv: calls.append(argv) or join(argv))
    first = rec(12, 0, "dig", "+short", "a b.test")
    assert [cmdline_of(first) for _ in range(3)] == ["dig +short 'a b.test'"] * 3
    assert cmdline_of(rec(13, 0, "dig", "+short", "a b.test")) == "dig +short 'a b.test'"
    assert cmdline_of(rec(12, 0, "curl", "x")) == "curl x"
    assert cmdline_of(rec(12, 0, "curl", "x", truncated=True)) == "curl x …"
    assert calls == [("dig", "+short", "a b.test"), ("curl", "x"), ("curl", "x")]


def test_a_truncated_argv_of_a_live_process_is_read_again_each_time(monkeypatch):
    # /proc can say more than the kernel kept, and a process may rewrite its own argv.
    shown = iter([["python3", "-c", "x" * 300], ["python3", "-c", "x" * 300, "--more"]])
    monkeypatch.setattr(procinfo, "read_proc_cmdline", lambda pid: next(shown))
    record = rec(12, 0, "python3", "-c", "x" * 255, truncated=True, exited=False)
    assert cmdline_of(record) == "python3 -c " + "x" * 300
    assert cmdline_of(record) == "python3 -c " + "x" * 300 + " --more"


def test_the_exec_path_is_shown_when_argv0_does_not_name_the_program():
    def with_exe(exe, *argv):
        return ProcRecord(7, 0, tuple(argv), False, True, CG, exe=exe)

    hidden = with_exe("/usr/bin/curl", "innocuous-tool", "https://github.com/")
    assert cmdline_of(hidden) == "innocuous-tool https://github.com/ (exe /usr/bin/curl)"
    assert cmdline_of(with_exe("/usr/bin/curl", "curl", "-s")) == "curl -s"
    assert cmdline_of(with_exe("/usr/bin/python3", "/usr/bin/python3", "x.py")).endswith("x.py")
    assert cmdline_of(with_exe("", "curl")) == "curl"  # no exec seen in the fence
    assert cmdline_of(with_exe("/opt/my tools/x", "y")) == "y (exe '/opt/my tools/x')"
