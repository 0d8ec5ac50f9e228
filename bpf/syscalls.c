/* raw_syscalls:sys_enter and sys_exit: the syscalls procs.c, mounts.c, hostsfile.c,
 * escape.c and unix.c watch, dispatched by number.
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
 * the programs are loaded, and return at once for all but the numbers below
 * (write among them: hostsfile.c looks at a fenced process's writes). That
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
 *   (and those of procs.c, mounts.c, hostsfile.c, escape.c, unix.c)
 * The raw tracepoints raw_syscalls:sys_enter/sys_exit exist from 4.17.
 */

static __always_inline __u64 reg(__u64 regs, __u32 off)
{
    return kernel_u64(regs + off);
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

/* The exits hostsfile.c watches: writes into a descriptor, and syscalls that make a name,
 * by a process that may be paused (mounts.c pausable_fence), when they succeeded; checked
 * in that order, cheapest first (a write that is not a fenced process's reads nothing).
 * The arguments are read from the registers the call left (syscalls preserve them), the
 * first one from REG_EXIT_ARG0 (arm64's x0 is the return value by then). */
static __always_inline int hosts_exit(long id, __u64 regs, long ret)
{
    int write_first = id == SYS_WRITE || id == SYS_PWRITE64 || id == SYS_WRITEV ||
                      id == SYS_PWRITEV || id == SYS_PWRITEV2 || id == SYS_FTRUNCATE ||
                      id == SYS_SENDFILE;
    int write_third = id == SYS_COPY_FILE_RANGE || id == SYS_SPLICE;  /* (in, off_in, out, ...) */
    int open_at = id == SYS_OPENAT || id == SYS_OPENAT2;
    int name_fourth = id == SYS_RENAMEAT || id == SYS_RENAMEAT2 || id == SYS_LINKAT;
    int name_third = id == SYS_SYMLINKAT;  /* (target, newdirfd, linkpath) */
    int open_first = 0, creat = 0, name_second = 0;
#ifdef SYS_OPEN
    /* x86-64 only: asm-generic (arm64) has just the *at forms. */
    creat = id == SYS_CREAT;
    open_first = id == SYS_OPEN || creat;
    name_second = id == SYS_RENAME || id == SYS_LINK || id == SYS_SYMLINK;  /* (old, new) */
#endif
    __u64 cgid;
    if (!(write_first || write_third || open_at || name_fourth || name_third || open_first ||
          name_second) ||
        ret < 0 || !pausable_fence(&cgid) || !native(regs))
        return 0;
    if (write_first || write_third)
        return hosts_written(cgid, reg(regs, write_first ? DEPFENCE_REG_EXIT_ARG0 : DEPFENCE_REG_ARG2));
    if (open_at) {
        __u64 flags = reg(regs, DEPFENCE_REG_ARG2);
        if (id == SYS_OPENAT2)
            flags = open_how_flags(flags);
        return hosts_opened(cgid, (const char *)reg(regs, DEPFENCE_REG_ARG1), flags);
    }
    if (open_first) {
        __u64 flags = creat ? OPEN_MAKES : reg(regs, DEPFENCE_REG_ARG1);
        return hosts_opened(cgid, (const char *)reg(regs, DEPFENCE_REG_EXIT_ARG0), flags);
    }
    __u32 at = name_fourth ? DEPFENCE_REG_ARG3 : name_third ? DEPFENCE_REG_ARG2 : DEPFENCE_REG_ARG1;
    return hosts_named(cgid, (const char *)reg(regs, at));
}

/* sys_exit(struct pt_regs *regs, long ret) */
RAW_TRACEPOINT_PROBE(sys_exit)
{
    __u64 regs = ctx->args[0];
    long id = reg(regs, DEPFENCE_REG_NR);
    long ret = ctx->args[1];
    if (id != SYS_EXECVE && id != SYS_EXECVEAT && id != SYS_CONNECT && id != SYS_MOUNT &&
        id != SYS_MOVE_MOUNT && id != SYS_CHROOT && id != SYS_PIVOT_ROOT && id != SYS_SETNS &&
        id != SYS_CLONE3 && id != SYS_SOCKET && id != SYS_SENDTO && id != SYS_SENDMSG &&
        id != SYS_SENDMMSG)
        return hosts_exit(id, regs, ret);
    if (!native(regs))
        return 0;
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
