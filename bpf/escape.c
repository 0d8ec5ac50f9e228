/* Raw tracepoint: a fenced process moved out of its fence is killed and reported.
 *
 * A root process in a fence can write a pid into any cgroup.procs it reaches
 * (directly; after setns into the init cgroup namespace; or by asking systemd
 * to do it), and the moved process leaves every cgroup hook: the sockets it
 * makes next are not fenced. cgroup:cgroup_attach_task fires after every
 * successful move, in the context of the process that WROTE the pid, which
 * may be the moved process itself or any other one. So the moved process is
 * found by the tracepoint's pid in `live`, where procs.c files at fork and
 * exec the fence of every fenced process until its last thread exits: an
 * entry of a registered fence makes it a fenced process, whoever moves it
 * (however many processes came and went since, and whether or not its main
 * thread still runs).
 *
 * Who stops it:
 * - it moved itself (the writer is the moved process, and is now in the
 *   destination): its own ancestors say whether it is still under its fence;
 *   if not, bpf_send_signal(SIGKILL) kills it: the signal is taken on the
 *   way back from its write(), so it runs nothing more (the event: killed = 1).
 * - another process moved it: bpf_send_signal reaches only the writer, and no
 *   helper gives another cgroup's ancestors. Every such move to a cgroup other
 *   than the fence's own is reported (killed = 0), and userspace
 *   (kernel/programs.py, on the event thread) kills the pid at once unless the
 *   destination is a cgroup below the fence. Until then, a few milliseconds,
 *   it runs unfenced.
 *
 * Only moves on the cgroup v2 hierarchy count (dst_root 0, as in the "0::"
 * line of /proc/PID/cgroup; v1 hierarchies are numbered from 1): hybrid hosts
 * also move processes on v1 hierarchies, which fences do not use. A single
 * thread (cgroup.threads) can only move within its threaded domain, so a
 * process cannot leave its fence that way; such a pid is a thread id and
 * matches no record.
 *
 * A child that clone3(CLONE_INTO_CGROUP) starts in a cgroup outside the fence
 * is not moved: it is born there. procs.c files it at the fork (from its
 * fenced parent), and on x86-64 a new child returns from clone3 through the
 * syscall-exit path, so sys_exit_clone3 runs in the child's own context with
 * ret 0: its own cgroup says whether it is in its fence, and if not it is
 * killed there, before its first instruction (how = ESCAPE_BORN, writer: its parent;
 * no path: the event names the cgroup by id). Other architectures return a child
 * through another path, where this tracepoint does not fire for it.
 *
 * cgroup_attach_task is raw: the fields its classic record holds (the moved
 * task's pid, the destination's hierarchy and id) are read from the kernel
 * structs at offsets the running kernel's BTF gives (kernel/tracing.py); without
 * BTF it stays classic (DEPFENCE_NO_BTF_OFFSETS). The clone3 exit comes through
 * raw_syscalls (syscalls.c).
 *
 * Helpers (program type BPF_PROG_TYPE_RAW_TRACEPOINT, or TRACEPOINT for the
 * classic fallback: the same helpers), first kernel for this type:
 *   bpf_send_signal             5.3
 *   bpf_ringbuf_reserve/submit  5.8
 *   bpf_probe_read_kernel(_str) 5.5
 *   bpf_ktime_get_ns            4.1
 *   bpf_get_current_pid_tgid    4.2
 *   bpf_get_current_cgroup_id   4.18
 *   bpf_map_lookup_elem         4.7
 *   (fence_of_task: bpf_get_current_cgroup_id 4.18, ..._ancestor_cgroup_id 5.14;
 *   before 5.14 the `subcgroups` map instead: fence.h, subcgroups.c)
 * The tracepoint cgroup:cgroup_attach_task exists from 4.13; its dst_id is the
 * 64-bit cgroup id (as bpf_get_current_cgroup_id gives it) from 5.5.
 * clone3 exists from 5.3, CLONE_INTO_CGROUP from 5.7.
 */

#define SIGKILL 9

/* A fenced process moved to a cgroup outside its fence. No implicit padding. */
struct escape_event {
    __u64 ts;           /* bpf_ktime_get_ns: CLOCK_MONOTONIC */
    __u64 cgid;         /* the fence it left: the registered cgroup */
    __u64 dst_id;       /* the cgroup it was moved to; ESCAPE_RAW_SOCKET: family << 8 | type */
    __u32 pid;          /* the moved process */
    __u32 writer;       /* the process that wrote the pid into a cgroup.procs */
    __s32 path_len;     /* bytes of path, its NUL included; < 0: not read */
    __u8 killed;        /* 1: the kernel sent it SIGKILL (it moved itself, or was born) */
    __u8 how;           /* ESCAPE_*: moved; born there (clone3); a raw or packet socket */
    __u8 pad[2];
    char path[CGROUP_PATH_MAX]; /* the destination from the v2 root; cut to fit */
};

BPF_RINGBUF_OUTPUT(escape_events, 16);

/* The fence of `pid` when it is a live fenced process (`live`, procs.c), of a
 * registered fence; else 0. */
static __always_inline __u64 fenced_process(__u32 pid)
{
    __u64 *cgid = live.lookup(&pid);
    if (!cgid)
        return 0;
    __u64 fence_id = *cgid;
    return fences.lookup(&fence_id) ? fence_id : 0;
}

/* Whether the current task is in fence `fence_id`: its cgroup or one below. */
static __always_inline int current_in(__u64 fence_id)
{
    __u64 now_in;
    return fence_of_task(&now_in) && now_in == fence_id;
}

/* `path` 0: not known (the event names the cgroup by id). */
static __always_inline void report_escape(__u64 fence_id, __u32 pid, __u32 writer,
                                          __u64 dst_id, __u8 killed, __u8 how,
                                          const char *path)
{
    struct escape_event *e = escape_events.ringbuf_reserve(sizeof(struct escape_event));
    if (!e) {
        count_lost(fence_id);
        return;
    }
    e->ts = bpf_ktime_get_ns();
    e->cgid = fence_id;
    e->dst_id = dst_id;
    e->pid = pid;
    e->writer = writer;
    e->killed = killed;
    e->how = how;
    e->pad[0] = e->pad[1] = 0;
    e->path[0] = 0;
    e->path_len = path ? bpf_probe_read_kernel_str(e->path, sizeof(e->path), path) : -1;
    escape_events.ringbuf_submit(e, 0);
}

/* A move of `pid` to cgroup `dst_id` of hierarchy `dst_root` (0: cgroup v2). */
static __always_inline int task_moved(int dst_root, __u64 dst_id, __u32 pid, const char *path)
{
    if (dst_root != 0)
        return 0;  /* a v1 hierarchy */
    __u64 fence_id = fenced_process(pid);
    if (!fence_id || dst_id == fence_id)
        return 0;
    __u32 writer = bpf_get_current_pid_tgid() >> 32;
    __u8 killed = 0;
    if (writer == pid) {
        if (current_in(fence_id))
            return 0;  /* into a cgroup below its fence */
        killed = bpf_send_signal(SIGKILL) == 0;
    }
    report_escape(fence_id, pid, writer, dst_id, killed, ESCAPE_MOVED, path);
    return 0;
}

#ifdef DEPFENCE_NO_BTF_OFFSETS
TRACEPOINT_PROBE(cgroup, cgroup_attach_task)
{
    /* __data_loc: the low 16 bits are the string's offset in the record. */
    const char *path = (const char *)args + (args->data_loc_dst_path & 0xFFFF);
    return task_moved(args->dst_root, args->dst_id, args->pid, path);
}
#else
/* cgroup_attach_task(struct cgroup *dst, const char *path, struct task_struct *task,
 * bool threadgroup): the classic record's pid is task->pid; cgroup_ids: fence.h. */
RAW_TRACEPOINT_PROBE(cgroup_attach_task)
{
    int root = -1;
    __u64 dst_id = 0;
    cgroup_ids(ctx->args[0], &root, &dst_id);
    __u32 pid = 0;
    bpf_probe_read_kernel(&pid, sizeof(pid), (void *)(ctx->args[2] + DEPFENCE_OFF_TASK_PID));
    return task_moved(root, dst_id, pid, (const char *)ctx->args[1]);
}
#endif

/* The exit of clone3 (syscalls.c), in the new child's context when ret is 0. */
static __always_inline int clone3_exited(long ret)
{
    if (ret != 0)
        return 0;  /* the parent's return, or a failure: not a new child */
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 pid = pid_tgid >> 32;
    if ((__u32)pid_tgid != pid)
        return 0;  /* a new thread: in its process's cgroup */
    __u64 fence_id = fenced_process(pid);
    if (!fence_id || current_in(fence_id))
        return 0;
    __u8 killed = bpf_send_signal(SIGKILL) == 0;
    struct proc *p = procs.lookup(&pid);
    report_escape(fence_id, pid, p ? p->ppid : 0, bpf_get_current_cgroup_id(), killed,
                  ESCAPE_BORN, 0);
    return 0;
}

/* socket() (syscalls.c): a raw or packet socket in a fence that does not allow them.
 *
 * A fence without raw_sockets runs its command without CAP_NET_RAW (confine.py),
 * so socket(AF_PACKET, ...) and socket(AF_INET, SOCK_RAW, ...) fail with EPERM.
 * A user namespace gives the capability back (`unshare -Urn`: every capability
 * inside, over a network namespace it owns), and a packet socket sends frames
 * below every hook of the fence (a veth out of that namespace carries them on).
 * (AF_XDP and the obsolete AF_INET/SOCK_PACKET, a packet socket too, likewise.)
 * So when such a socket() succeeds all the same, the process is killed
 * (bpf_send_signal: taken on the way back from the syscall, before it can use the
 * descriptor) and reported as an escape (how = ESCAPE_RAW_SOCKET, dst_id: the
 * family and type). The arguments are read at entry (arm64 overwrites x0 with the
 * result) and kept per thread until the exit says whether the socket was made.
 *
 * Not seen: a socket made through io_uring (IORING_OP_SOCKET, 5.19+), or by a
 * 32-bit (compat) caller; ICMP datagram sockets are not raw and stay allowed.
 */
#define AF_INET 2
#define AF_INET6 10
#define AF_PACKET 17
#define AF_XDP 44
#define SOCK_PACKET 10
#define SOCK_TYPE_MASK 0xf

BPF_TABLE("lru_hash", __u32, __u32, raw_asked, 1024);

static __always_inline int socket_entered(long family, long type)
{
    long kind = type & SOCK_TYPE_MASK;
    /* Only these need CAP_NET_RAW: a netlink or unix SOCK_RAW socket does not (curl
     * opens a netlink one for its interface list). An XDP socket sends frames straight to
     * a device queue, as a packet socket does; and the kernel makes a packet socket of
     * the obsolete AF_INET/SOCK_PACKET (__sock_create). */
    int inet = family == AF_INET || family == AF_INET6;
    if (family != AF_PACKET && family != AF_XDP && !(inet && (kind == SOCK_RAW || kind == SOCK_PACKET)))
        return 0;
    __u64 fence_id;
    struct fence_cfg *fence = fence_of_task(&fence_id);
    if (!fence || (fence->flags & (FENCE_ADOPTED | FENCE_RAW_SOCKETS)))
        return 0;
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    __u32 what = ((__u32)family & 0xff) << 8 | (__u32)kind;
    raw_asked.update(&tid, &what);
    return 0;
}

static __always_inline int socket_exited(long ret)
{
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)pid_tgid;
    __u32 *what = raw_asked.lookup(&tid);
    if (!what)
        return 0;
    __u64 socket = *what;
    raw_asked.delete(&tid);
    if (ret < 0)
        return 0;  /* refused (EPERM): the fence works as meant */
    __u64 fence_id;
    if (!fence_of_task(&fence_id))
        return 0;
    __u32 pid = pid_tgid >> 32;
    __u8 killed = bpf_send_signal(SIGKILL) == 0;
    report_escape(fence_id, pid, pid, socket, killed, ESCAPE_RAW_SOCKET, 0);
    return 0;
}
