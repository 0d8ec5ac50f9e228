/* Raw tracepoints: the parent and argv of every process in a fence, kept after it exits.
 *
 * A query's sender may exit before userspace reads /proc, and its pid may be
 * reused; so argv is copied at exec and the parent at fork, synchronously,
 * and the records stay until the fence is torn down.  Only tasks whose cgroup
 * is a registered fence are recorded; everything else returns at once.
 *
 * A process that sends a message and execs at once must still be named by the
 * program that sent it, however late userspace looks: each record says since
 * when it holds (`since`), and the record an exec or a reused pid replaces is
 * kept in `procs_prev`, one generation per pid (a message older than both
 * records of its pid -- two execs before userspace looked -- is named by the
 * older one kept). kernel/programs.py `process(pid, at_ns)` picks the one that
 * held when the message left. The cost: one record copied per exec of a
 * recorded process (~4 KiB, map to map).
 *
 * Each live fenced process is also in `live` (fence.h) from its fork or first
 * exec in a fence until its last thread exits (not its main thread: a process
 * whose main thread exited while others run on is alive), so escape.c knows it
 * however many others came and went. Threads are not recorded: a process's
 * messages and moves are by its pid. With no room left in `live`, the fence's
 * lost-event count goes up: the run is not vouched for.
 *
 * execve/execveat come through raw_syscalls (syscalls.c); fork and exit are
 * the sched tracepoints, raw. The fork's child pid is read from its task_struct
 * at the offset the running kernel's BTF gives (kernel/tracing.py); without
 * BTF, sched_process_fork stays a classic tracepoint (DEPFENCE_NO_BTF_OFFSETS).
 *
 * Helpers (program type BPF_PROG_TYPE_RAW_TRACEPOINT, or TRACEPOINT for the
 * classic fallback: the same helpers), first kernel for this type:
 *   bpf_get_current_cgroup_id   4.18
 *   bpf_get_current_ancestor_cgroup_id  5.14 (for this type; before it, fence_of_task
 *                                       uses the `subcgroups` map: fence.h, subcgroups.c)
 *   bpf_get_current_pid_tgid    4.2
 *   bpf_probe_read_user         5.5
 *   bpf_probe_read_user_str     5.5
 *   bpf_probe_read_kernel       5.5
 *   bpf_map_lookup/update/delete_elem  4.7
 *   bpf_ktime_get_ns            4.1
 */

BPF_PERCPU_ARRAY(scratch, struct proc, 1);
/* argv of an exec in flight, per process, committed only if the exec succeeds. */
BPF_TABLE("lru_hash", __u32, struct proc, pending, 256);
/* The record each pid had before its last exec, or before its pid was reused. */
BPF_TABLE("lru_hash", __u32, struct proc, procs_prev, 1024);  /* a quarter of `procs` */

static __always_inline int in_fence(__u64 *cgid)
{
    return fence_of_task(cgid) != 0;
}

/* `pid` is a live process of fence `cgid` (not an adopted one's: its manager's). */
static __always_inline void set_live(__u32 pid, __u64 cgid)
{
    struct fence_cfg *fence = fences.lookup(&cgid);
    if (!fence || (fence->flags & FENCE_ADOPTED))
        return;
    if (live.update(&pid, &cgid))
        count_lost(cgid);
}

static __always_inline int record_exec(const char *filename, const char *const *argv)
{
    __u64 cgid;
    if (!in_fence(&cgid))
        return 0;
    int zero = 0;
    struct proc *p = scratch.lookup(&zero);
    if (!p)
        return 0;
    p->ppid = 0;
    p->flags = PROC_EXECED;
    p->cgid = cgid;
    p->argc = 0;
    if (read_user_str(p->exe, sizeof(p->exe), filename) < 0)
        p->exe[0] = 0;

    /* A loop, not unrolled: 5.3+ verifiers take bounded loops, and clang unrolling
     * it cost the compile 0.1-0.2 s of CPU here (bench/bench_fence.py, first fence). */
#pragma clang loop unroll(disable)
    for (int i = 0; i < DEPFENCE_ARGC; i++) {
        const char *arg = 0;
        read_user(&arg, sizeof(arg), &argv[i]);
        if (!arg)
            break;
        int len = read_user_str(&p->args[i * DEPFENCE_ARGLEN], DEPFENCE_ARGLEN, arg);
        if (len < 0)
            break;
        if (len == DEPFENCE_ARGLEN)
            p->flags |= PROC_TRUNCATED;
        p->argc = i + 1;
        if (i == DEPFENCE_ARGC - 1) {
            const char *more = 0;
            read_user(&more, sizeof(more), &argv[i + 1]);
            if (more)
                p->flags |= PROC_TRUNCATED;
        }
    }
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    pending.update(&tgid, p);
    return 0;
}

static __always_inline int commit_exec(long ret)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct proc *p = pending.lookup(&tgid);
    if (!p)
        return 0;
    if (ret == 0) {
        /* Keep the parent learned at fork; argv is the new program's. */
        struct proc *old = procs.lookup(&tgid);
        if (old && !(old->flags & PROC_EXITED))
            p->ppid = old->ppid;
        if (old)
            procs_prev.update(&tgid, old);
        /* Set at the exec's return: every message of the old program left before
         * it, every one of the new program after it. */
        p->since = bpf_ktime_get_ns();
        procs.update(&tgid, p);
        set_live(tgid, p->cgid);
    }
    pending.delete(&tgid);
    return 0;
}

static __always_inline int record_fork(__u32 child)
{
    __u64 cgid;
    if (!in_fence(&cgid))
        return 0;
    set_live(child, cgid);
    __u32 ppid = bpf_get_current_pid_tgid() >> 32;
    struct proc *c = procs.lookup(&child);
    if (c && !(c->flags & PROC_EXITED)) {
        /* The child ran first and already exec'd: keep its argv. */
        c->ppid = ppid;
        return 0;
    }
    if (c)
        procs_prev.update(&child, c);  /* a reused pid: the dead process's late messages */
    __u64 now = bpf_ktime_get_ns();
    struct proc *parent = procs.lookup(&ppid);
    if (parent) {
        /* Until it execs, a forked child runs its parent's program. */
        procs.update(&child, parent);
        c = procs.lookup(&child);
        if (!c)
            return 0;
        c->flags &= ~(PROC_EXITED | PROC_EXECED);
        c->ppid = ppid;
        c->since = now;
        return 0;
    }
    int zero = 0;
    struct proc *p = scratch.lookup(&zero);
    if (!p)
        return 0;
    p->ppid = ppid;
    p->flags = 0;
    p->cgid = cgid;
    p->since = now;
    p->argc = 0;
    p->exe[0] = 0;
    procs.update(&child, p);
    return 0;
}

#ifdef DEPFENCE_NO_BTF_OFFSETS
TRACEPOINT_PROBE(sched, sched_process_fork)
{
    return record_fork(args->child_pid);
}
#else
/* sched_process_fork(struct task_struct *parent, struct task_struct *child):
 * the classic tracepoint's child_pid is child->pid. A new thread (its tgid is
 * its creator's) is not a process. */
RAW_TRACEPOINT_PROBE(sched_process_fork)
{
    __u32 child = 0, tgid = 0;
    bpf_probe_read_kernel(&child, sizeof(child),
                          (void *)(ctx->args[1] + DEPFENCE_OFF_TASK_PID));
    bpf_probe_read_kernel(&tgid, sizeof(tgid),
                          (void *)(ctx->args[1] + DEPFENCE_OFF_TASK_TGID));
    if (child != tgid)
        return 0;
    return record_fork(child);
}
#endif

/* Whether the exiting task is its process's last: do_exit() has taken it off
 * current->signal->live before the tracepoint. Without BTF offsets: its main
 * thread's exit counts (a process that outlives it is taken for gone). */
static __always_inline int process_exits(__u64 pid_tgid)
{
#ifdef DEPFENCE_NO_BTF_OFFSETS
    return (__u32)pid_tgid == pid_tgid >> 32;
#else
    __u64 signal = kernel_u64(bpf_get_current_task() + DEPFENCE_OFF_TASK_SIGNAL);
    int threads = 1;
    bpf_probe_read_kernel(&threads, sizeof(threads), (void *)(signal + DEPFENCE_OFF_SIGNAL_LIVE));
    return threads == 0;
#endif
}

/* sched_process_exit(struct task_struct *p, ...): p is the current task. */
RAW_TRACEPOINT_PROBE(sched_process_exit)
{
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)pid_tgid, tgid = pid_tgid >> 32;
#ifdef DEPFENCE_NO_BTF_OFFSETS
    if (tid != tgid)
        live.delete(&tid);  /* the classic fork tracepoint filed it as a process */
#endif
    if (!process_exits(pid_tgid))
        return 0;  /* a thread; the process lives on */
    live.delete(&tgid);
    struct proc *p = procs.lookup(&tgid);
    if (p)
        p->flags |= PROC_EXITED;
    return 0;
}
