"""Attribution from the kernel's process records.

`Records` stands in for kernel.Programs (the BPF `procs` map): it returns
ProcRecord values the way the kernel would have recorded them.
"""

from pytest_depfence.kernel import ProcRecord
from pytest_depfence.procinfo import attribute, cmdline_of

CG = 1234


class Records:
    def __init__(self, *records):
        self.by_pid = {r.pid: r for r in records}

    def process(self, pid):
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
