/* Syscall entries and exits (syscalls.c): a fenced process reaching a unix socket is on record.
 *
 * A daemon's unix socket (/run/docker.sock, a package manager's socket) is a
 * way out of the fence no cgroup hook sees: whatever the daemon fetches, it
 * fetches from its own cgroup. So a fenced process's connect() to a unix socket
 * is reported with the socket's path and the connect's result, the first one of
 * each process to each path in a run (`unix_reached`: a loop of 20,000 connects is one
 * event, not a ring buffer overrun); userspace names the process listening there
 * (pytest_depfence/local.py) and judges the contact (judge.py).
 *
 * The path is read at syscall entry (the caller's sockaddr, in user memory)
 * and reported at syscall exit only when the connect reached a listener (0,
 * or EINPROGRESS): one that failed (nothing listens: glibc tries nscd's socket
 * on every lookup) is dropped here. Any connect costs a read of its address's
 * family, a unix one a cgroup lookup too, and only a fenced process's are kept.
 * The path is the one the caller passed: a thread that rewrites it between our
 * read and the kernel's copy is named with the path it first gave (a deploy tool
 * does not).
 *
 * A datagram sent without connect() names its socket in the send itself:
 * sendto(), sendmsg() and sendmmsg() (its first message) with a unix address are
 * read the same way, and reported the same way, once per run, process and path:
 * a script logging a line per datagram to journald is one event, not one per
 * line. A send on a connected socket (no address) costs the address check alone.
 *
 * cgroup/connect_unix (6.7+) would see the path too, but only on new kernels;
 * the syscall tracepoints exist on every kernel this project supports, so they
 * are used everywhere. Not seen: connects and sends made through io_uring, and
 * the later messages of one sendmmsg() when they name other sockets.
 *
 * Helpers (program type BPF_PROG_TYPE_RAW_TRACEPOINT), first kernel for this type:
 *   bpf_probe_read_user         5.5
 *   bpf_get_current_pid_tgid    4.2
 *   bpf_ktime_get_ns            4.1
 *   bpf_ringbuf_output          5.8
 *   bpf_map_lookup/update/delete_elem  4.7
 *   (fence_of_task: bpf_get_current_cgroup_id 4.18, ..._ancestor_cgroup_id 5.14;
 *   before 5.14 the `subcgroups` map instead: fence.h, subcgroups.c)
 */

#define AF_UNIX_FAMILY 1
#define EINPROGRESS_ERRNO 115
/* sizeof(sun_path) */
#define UNIX_SUN_PATH 108

/* A connect() to a unix socket in progress, by thread. */
struct unix_pending {
    __u64 cgid;
    __u32 path_len;     /* bytes of sun_path the caller gave (addrlen - 2, at most 108) */
    __u32 pad;
    char path[UNIX_PATH_LEN];
};

/* A fenced process's connect() to a unix socket, with its result. No implicit padding. */
struct unix_event {
    struct event_head head;  /* ip6, port and proto are zero */
    __s32 ret;          /* the connect's return: 0, or -errno */
    __u32 path_len;
    char path[UNIX_PATH_LEN];  /* sun_path as given (an abstract name starts with a NUL) */
};

/* A (fence cgroup, process, path) a connect or datagram reached: reported once. The fence's
 * cgroup is in it, and a run's keys go when the run ends (kernel/programs.py): keyed by
 * pid alone, a later run's process that got a reused pid was never reported. */
struct unix_reached_key {
    __u64 cgid;
    __u32 pid;
    __u32 path_len;
    __u64 hash;         /* FNV-1a of the path's bytes */
};

BPF_TABLE("lru_hash", __u64, struct unix_pending, unix_pending, 1024);
BPF_TABLE("lru_hash", struct unix_reached_key, __u8, unix_reached, 4096);
BPF_RINGBUF_OUTPUT(unix_events, 64);

/* connect(fd, uservaddr, addrlen) entered; also a send naming its address. */
static __always_inline int unix_connect_entered(const char *addr, int addrlen)
{
    /* The family first: most connects on the machine are no unix ones, and those need
     * no walk up the caller's cgroups. */
    __u16 family = 0;
    __u64 tid = bpf_get_current_pid_tgid();
    if (read_user(&family, sizeof(family), addr) != 0 || family != AF_UNIX_FAMILY) {
        /* An exit this thread never reached (a signal) left its entry: stale. Looked up
         * first, since a delete takes the bucket's lock even when there is nothing. */
        if (unix_pending.lookup(&tid))
            unix_pending.delete(&tid);
        return 0;
    }
    __u64 cgid;
    if (!fence_of_task(&cgid))
        return 0;
    struct unix_pending pending = {};
    pending.cgid = cgid;
    __u32 len = addrlen > 2 ? addrlen - 2 : 0;
    if (len > UNIX_SUN_PATH)
        len = UNIX_SUN_PATH;
    pending.path_len = len;
    /* Exactly what the caller gave: reading past it could fault (a short sockaddr
     * at the end of a page) and lose the whole path. Read back through volatile so
     * the mask the verifier needs is applied to the register passed. */
    __u32 size = *(volatile __u32 *)&pending.path_len & (UNIX_PATH_LEN - 1);
    read_user(pending.path, size, addr + 2);
    unix_pending.update(&tid, &pending);
    return 0;
}

/* sendto(fd, buf, len, flags, addr, addrlen) entered. */
static __always_inline int unix_sendto_entered(const char *addr, int addrlen)
{
    if (!addr)
        return 0;  /* a connected socket: its connect() was on record */
    return unix_connect_entered(addr, addrlen);
}

/* sendmsg(fd, msg, flags) and sendmmsg(fd, msgvec, vlen, flags) entered: struct
 * user_msghdr (the first member of struct mmsghdr) starts with msg_name, msg_namelen. */
static __always_inline int unix_sendmsg_entered(const char *msg)
{
    struct {
        const char *name;
        int namelen;
    } head = {};
    if (read_user(&head, sizeof(head), msg) != 0 || !head.name)
        return 0;
    return unix_connect_entered(head.name, head.namelen);
}

/* Whether this is this process's first connect or datagram to this path that reached a
 * socket, in this fence cgroup: unix_reached's key inserted. */
static __always_inline int first_reach(__u32 pid, struct unix_pending *pending)
{
    struct unix_reached_key key = {};
    key.cgid = pending->cgid;
    key.pid = pid;
    key.path_len = pending->path_len;
    key.hash = 14695981039346656037ULL;  /* FNV-1a offset basis */
    __u64 mul = hash_multiplier();
    /* Every byte of sun_path (zero past path_len): a loop bounded by path_len became a
     * countdown whose bound a 5.10 verifier does not see ("invalid access to map value"). */
#pragma clang loop unroll(disable)
    for (int i = 0; i < UNIX_SUN_PATH; i++)
        key.hash = (key.hash ^ (__u8)pending->path[i]) * mul;
    __u8 one = 1;
    return unix_reached.insert(&key, &one) == 0;  /* insert: BPF_NOEXIST */
}

/* The exit of connect(), or of a send (`sent`): its result is the bytes sent. */
static __always_inline int unix_connect_exited(long ret, int sent)
{
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    struct unix_pending *pending = unix_pending.lookup(&pid_tgid);
    if (!pending)
        return 0;
    if (sent && ret >= 0)
        ret = 0;
    if ((ret != 0 && ret != -EINPROGRESS_ERRNO) || !first_reach(pid_tgid >> 32, pending)) {
        /* nothing was reached (nscd's socket, mostly), or this path is on record */
        unix_pending.delete(&pid_tgid);
        return 0;
    }
    struct unix_event e = {};
    __u32 zero[4] = {};
    fill_head(&e.head, pending->cgid, pid_tgid, zero, 0, 0);
    e.ret = ret;
    e.path_len = pending->path_len;
    __builtin_memcpy(e.path, pending->path, sizeof(e.path));
    unix_pending.delete(&pid_tgid);
    if (unix_events.ringbuf_output(&e, sizeof(e), 0))
        count_lost(e.head.cgid);
    return 0;
}
