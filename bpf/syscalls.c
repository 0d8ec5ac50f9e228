/* raw_syscalls:sys_enter and sys_exit: the syscalls procs.c, mounts.c, escape.c
 * and unix.c watch, dispatched by number.
 *
 * Why raw (measured on 6.18, bench/bench_exit.py): a classic syscalls:*
 * tracepoint is a perf event, and closing the last perf event of a tracepoint
 * waits for an RCU grace period pair (perf_trace_event_unreg ->
 * tracepoint_synchronize_unregister), one after another under the kernel's
 * event_mutex (closing them from threads took as long: 613 ms against 586 ms).
 * The 12 syscall tracepoints these files used cost ~37 ms each at every exit of
 * a process that had opened a fence; a raw tracepoint's bpf_link detaches in
 * well under a millisecond.
 *
 * The price: these two programs run for every syscall on the machine while
 * the programs are loaded, and return at once for all but thirteen numbers. That
 * costs a getppid() +165 ns here against +70 ns for the classic tracepoints
 * (which filter by number before calling a program); a connect() or an
 * execve() costs microseconds, so a deploy script does not notice.
 *
 * A raw tracepoint has the syscall's registers, not a formatted record: the
 * number, the arguments and the caller's mode are read from struct pt_regs at
 * the ptrace-ABI offsets kernel/tracing.py passes (DEPFENCE_REG_*, DEPFENCE_MODE_*),
 * and the syscall numbers come from there too (SYS_*; tests/unit/test_tracing.py
 * checks that every one used here is passed, for both architectures). Compat (32-bit) callers are
 * skipped, as the classic tracepoints skip them.
 *
 * Helpers (program type BPF_PROG_TYPE_RAW_TRACEPOINT), first kernel for this type:
 *   bpf_probe_read_kernel       5.5
 *   (and those of procs.c, mounts.c, escape.c, unix.c)
 * The raw tracepoints raw_syscalls:sys_enter/sys_exit exist from 4.17.
 */

static __always_inline __u64 reg(__u64 regs, __u32 off)
{
    __u64 value = 0;
    bpf_probe_read_kernel(&value, sizeof(value), (void *)(regs + off));
    return value;
}

/* Whether the syscall came from native (64-bit) code. */
static __always_inline int native(__u64 regs)
{
    return (reg(regs, DEPFENCE_REG_MODE) & DEPFENCE_MODE_MASK) == DEPFENCE_MODE_NATIVE;
}

/* sys_enter(struct pt_regs *regs, long id) */
RAW_TRACEPOINT_PROBE(sys_enter)
{
    long id = ctx->args[1];
    if (id != SYS_EXECVE && id != SYS_EXECVEAT && id != SYS_CONNECT && id != SYS_SOCKET &&
        id != SYS_SENDTO && id != SYS_SENDMSG && id != SYS_SENDMMSG)
        return 0;
    __u64 regs = ctx->args[0];
    if (!native(regs))
        return 0;
    if (id == SYS_SOCKET)
        return socket_entered(reg(regs, DEPFENCE_REG_ARG0), reg(regs, DEPFENCE_REG_ARG1));
    if (id == SYS_CONNECT)
        return unix_connect_entered((const char *)reg(regs, DEPFENCE_REG_ARG1),
                                    (int)reg(regs, DEPFENCE_REG_ARG2));
    if (id == SYS_SENDTO)
        return unix_sendto_entered((const char *)reg(regs, DEPFENCE_REG_ARG4),
                                   (int)reg(regs, DEPFENCE_REG_ARG5));
    if (id == SYS_SENDMSG || id == SYS_SENDMMSG)
        return unix_sendmsg_entered((const char *)reg(regs, DEPFENCE_REG_ARG1));
    /* execve(filename, argv, envp); execveat(dfd, filename, argv, envp, flags) */
    int execve = id == SYS_EXECVE;
    __u64 filename = reg(regs, execve ? DEPFENCE_REG_ARG0 : DEPFENCE_REG_ARG1);
    __u64 argv = reg(regs, execve ? DEPFENCE_REG_ARG1 : DEPFENCE_REG_ARG2);
    return record_exec((const char *)filename, (const char *const *)argv);
}

/* sys_exit(struct pt_regs *regs, long ret) */
RAW_TRACEPOINT_PROBE(sys_exit)
{
    __u64 regs = ctx->args[0];
    long id = reg(regs, DEPFENCE_REG_NR);
    if (id != SYS_EXECVE && id != SYS_EXECVEAT && id != SYS_CONNECT && id != SYS_MOUNT &&
        id != SYS_MOVE_MOUNT && id != SYS_CHROOT && id != SYS_PIVOT_ROOT && id != SYS_SETNS &&
        id != SYS_CLONE3 && id != SYS_SOCKET && id != SYS_SENDTO && id != SYS_SENDMSG &&
        id != SYS_SENDMMSG)
        return 0;
    if (!native(regs))
        return 0;
    long ret = ctx->args[1];
    if (id == SYS_EXECVE || id == SYS_EXECVEAT)
        return commit_exec(ret);
    if (id == SYS_CONNECT)
        return unix_connect_exited(ret, 0);
    if (id == SYS_SENDTO || id == SYS_SENDMSG || id == SYS_SENDMMSG)
        return unix_connect_exited(ret, 1);
    if (id == SYS_CLONE3)
        return clone3_exited(ret);
    if (id == SYS_SOCKET)
        return socket_exited(ret);
    return view_changed(ret);
}
