/* Syscall exits (syscalls.c): a fenced process that changes what it sees as /etc/hosts is paused.
 *
 * A script can give itself its own hosts file (unshare -m; mount --bind ...)
 * and then connect to an address only that file names. So when a fenced
 * process's mount, move_mount, chroot, pivot_root or setns succeeds, it is
 * stopped (SIGSTOP) before it returns to userspace, and userspace is told;
 * userspace reads /proc/<pid>/root/etc/hosts, learns the addresses of the
 * names the policy names, and sends SIGCONT. The pause lasts as long as that
 * read, about a millisecond.
 *
 * Helpers (program type BPF_PROG_TYPE_RAW_TRACEPOINT), first kernel for this type:
 *   bpf_send_signal             5.3
 *   bpf_ringbuf_output          5.8
 *   bpf_get_current_pid_tgid    4.2
 *   (fence_of_task: bpf_get_current_cgroup_id 4.18, ..._ancestor_cgroup_id 5.14;
 *   before 5.14 the `subcgroups` map instead: fence.h, subcgroups.c)
 * The move_mount syscall (and its tracepoint) exists from 5.2.
 */

#define SIGCONT 18
#define SIGSTOP 19

struct view_event {
    __u64 cgid;
    __u32 pid;
    __s32 fd;           /* a descriptor of the process to read too (hostsfile.c), or -1 */
};

BPF_RINGBUF_OUTPUT(view_events, 16);

/* The fence of the current task, if its processes may be paused (not an adopted service:
 * its hosts file is the machine's). */
static __always_inline struct fence_cfg *pausable_fence(__u64 *cgid)
{
    struct fence_cfg *fence = fence_of_task(cgid);
    if (!fence || (fence->flags & FENCE_ADOPTED))
        return 0;
    return fence;
}

/* Stop the current process until userspace has read its hosts file (and the file at
 * `fd`, when not -1), and tell userspace.
 *
 * The stop first, then the event: userspace's SIGCONT, sent once it has read the event,
 * then always comes after the stop, and takes it back should the process not have
 * stopped yet. The other way round, a SIGCONT could come first and the stop after it
 * leave the process stopped for good (seen under QEMU's software CPUs, where a CPU
 * can wait milliseconds between two instructions: a run's timeout ended it). No
 * event, no pause: a SIGCONT right away takes the pending stop back. */
static __always_inline int pause_to_look(__u64 cgid, __s32 fd)
{
    struct view_event e = {};
    e.cgid = cgid;
    e.pid = bpf_get_current_pid_tgid() >> 32;
    e.fd = fd;
    bpf_send_signal(SIGSTOP);
    if (view_events.ringbuf_output(&e, sizeof(e), 0)) {
        bpf_send_signal(SIGCONT);
        count_lost(cgid);
    }
    return 0;
}

static __always_inline int view_changed(long ret)
{
    __u64 cgid;
    if (ret != 0 || !pausable_fence(&cgid))
        return 0;
    return pause_to_look(cgid, -1);
}
