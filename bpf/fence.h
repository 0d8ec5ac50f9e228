/* Maps and records shared by every program of the fence.
 *
 * One loaded program set serves every live fence: each fence cgroup is a key
 * of `fences`, and every record carries the cgroup id it was made in, so the
 * userspace side can tell fences apart and clean up after each one.
 *
 * Only UAPI types are used, so any distro's kernel header tree compiles this.
 */
#ifndef DEPFENCE_FENCE_H
#define DEPFENCE_FENCE_H

#include <uapi/linux/bpf.h>

#include "abi.h"

/* UAPI constants (uapi/linux/in.h, in6.h, if_ether.h), written out rather than
 * included: under bcc's __KERNEL__, in.h pulls in the kernel's linux/socket.h and
 * what it includes, which cost 0.45 s of CPU per compile here, half of it all
 * (measured: bench/bench_fence.py's first fence). The values are ABI. */
#define IPPROTO_HOPOPTS 0
#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_ROUTING 43
#define IPPROTO_FRAGMENT 44
#define IPPROTO_ICMPV6 58
#define IPPROTO_DSTOPTS 60
#define SOCK_DGRAM 2
#define SOCK_RAW 3
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD

#define DNS_PORT 53
#define LOOPBACK4 0x7f000001

/* Per fence cgroup: where its DNS proxy listens and how addresses are judged. */
struct fence_cfg {
    __u32 fence_id;     /* shared by every run of one Fence: keys its address rules */
    __u16 proxy_port;   /* host byte order */
    __u16 refuser_port; /* host byte order: bound, never listening */
    __u16 flags;        /* FENCE_* */
    __u8 outage;        /* OUTAGE_*: refuse (EPERM), reset (to the refuser port), blackhole */
    __u8 touched;       /* set by the programs that record its sockets (sockaddr.c,
                         * sockcreate.c): only then has unregistering it maps to sweep */
};

/* An address or network of a fence: learned from DNS, the hosts file, or a rule.
 * IPv4 is stored v4-mapped (::ffff:a.b.c.d), so one trie serves both families. */
struct addr_key {
    __u32 prefixlen;    /* 32 (fence_id) + address prefix */
    __u32 fence_id;
    __u32 ip6[4];
};

struct addr_rule {
    __u32 verdict;      /* VERDICT_* */
};

/* The start of every event about a message (conn_event, bypass_event). No
 * implicit padding: what follows it starts at offset 48 on both sides. */
struct event_head {
    __u64 ts;           /* bpf_ktime_get_ns: CLOCK_MONOTONIC, as userspace reads it */
    __u64 cgid;         /* the fence's cgroup: the registered one, not a sub-cgroup */
    __u32 pid;          /* 0: not known (a packet whose socket has no recorded owner) */
    __u32 tid;
    __u32 ip6[4];       /* network order; IPv4 as ::ffff:a.b.c.d */
    __u16 port;         /* host order */
    __u8 proto;
    /* 1: pid is the socket's recorded owner (who created, connected or addressed it),
     * not necessarily the task that sent this message: a TCP segment, or a datagram
     * on a kernel whose cgroup_skb programs cannot read the current task (before
     * 6.10). 0: pid is the task that sent it (or 0, unknown). */
    __u8 by_socket;
    __u8 pad[4];
};

/* A connection or datagram: refused, would-be refused (audit), or the first one
 * a socket sends to a permitted destination (so every contact is on record). */
struct conn_event {
    struct event_head head;
    __u8 action;        /* ACTION_* */
    __u8 where;         /* AT_* */
    __u8 pad[6];
};

static __always_inline void fill_head(struct event_head *h, __u64 cgid, __u64 pid_tgid,
                                      __u32 *ip6, __u16 port, __u8 proto)
{
    h->ts = bpf_ktime_get_ns();
    h->cgid = cgid;
    h->pid = pid_tgid >> 32;
    h->tid = (__u32)pid_tgid;
    h->ip6[0] = ip6[0];
    h->ip6[1] = ip6[1];
    h->ip6[2] = ip6[2];
    h->ip6[3] = ip6[3];
    h->port = port;
    h->proto = proto;
}

/* Who owns a socket: recorded in syscall context, where pid is reliable. In
 * `dnsflows`, who sent a DNS message (egress.c fills ts and by_socket there). */
struct owner {
    __u32 pid;          /* tgid: the process, also when a thread asked */
    __u32 tid;
    __u64 cgid;
    __u64 ts;           /* dnsflows: when the message left (bpf_ktime_get_ns); else 0 */
    __u8 by_socket;     /* as event_head.by_socket */
    __u8 clash;         /* dnsflows: another process sent with this key just before */
    __u8 passed_refused; /* sockets: a hook let a refused address pass (audit, blackhole)
                          * and reported it (sockaddr.c); egress.c reports no packet again */
    __u8 pad;
    __u32 judged4;      /* sockets: the IPv4 destination (network order) the hook last let
                         * pass as not refused; 0: none. egress.c trusts it for a TCP SYN
                         * only (judged_already) and judges one to another address again */
};

/* Where a redirected socket meant to send its DNS, to rewrite replies back. */
struct orig_dst {
    __u32 ip6[4];       /* network order; ip6[3] holds the IPv4 address for family 4 */
    __u16 port;         /* network order */
    __u16 family;
};

/* A DNS message on its way to a proxy, keyed as the proxy sees it arrive: from which
 * address and port, with which id. The address tells apart sockets that share a port:
 * an IPv4 one and an IPv6-only one, or two bound to different local addresses. */
struct flow_key {
    __u16 proxy_port;   /* host order */
    __u16 client_port;  /* host order */
    __u16 txid;         /* DNS id for UDP; 0 for TCP (a connection is one socket) */
    __u8 proto;
    __u8 pad;
    __u32 client[4];    /* the packet's source, network order; IPv4 as ::ffff:a.b.c.d */
};

/* A process seen in a fence: parent and argv, kept after it exits. */
struct proc {
    __u32 ppid;
    __u32 flags;        /* PROC_* */
    __u64 cgid;
    /* When this record became true (bpf_ktime_get_ns): the exec that loaded its argv,
     * or the fork. A message sent before it was sent by the record in `procs_prev`. */
    __u64 since;
    __u32 argc;
    __u32 pad;
    /* The path execve() was given: the program that really runs, whatever argv[0]
     * says (`exec -a innocuous-tool curl ...`); empty before the process's first exec. */
    char exe[DEPFENCE_ARGLEN];
    /* argv[i] at args[i * DEPFENCE_ARGLEN]; flat because bcc's Python side
     * does not understand two-dimensional arrays. */
    char args[DEPFENCE_ARGC * DEPFENCE_ARGLEN];
};

BPF_HASH(fences, __u64, struct fence_cfg, 1024);
/* Each fenced socket's owner, by socket cookie: recorded at connect and sendmsg
 * (sockaddr.c), read by egress.c. A plain hash, not an LRU: an LRU insert cost 0.6 us of
 * a connect's 1.2 (bench_traffic.py's short connections, with kernel.bpf_stats_enabled).
 * A run's or a fence's entries go when it ends (kernel/programs.py). A run that fills it
 * spills into `sockets_spill`, an LRU: an owner evicted from there is judged as that of
 * a socket no hook saw (egress.c). */
BPF_TABLE("hash", __u64, struct owner, sockets, 65536);
BPF_TABLE("lru_hash", __u64, struct owner, sockets_spill, 16384);
BPF_TABLE("lru_hash", __u64, struct orig_dst, redirected, 65536);
BPF_TABLE("lru_hash", struct flow_key, struct owner, dnsflows, 65536);
BPF_TABLE("lru_hash", __u32, struct proc, procs, DEPFENCE_MAX_PROCS);
/* The fenced processes alive now, by pid, and the fence of each: what escape.c
 * knows a moved process by. Not an LRU: `procs` keeps the dead too and evicts the
 * least used, a long-sleeping process among them once a script has started a few
 * thousand others; a process missing here could leave unseen. Added at fork and
 * exec (procs.c), removed when its last thread exits. */
BPF_HASH(live, __u32, __u64, DEPFENCE_MAX_LIVE);

static __always_inline struct owner *socket_owner(__u64 cookie)
{
    struct owner *o = sockets.lookup(&cookie);
    return o ? o : sockets_spill.lookup(&cookie);
}

/* The multiplier of the name hashes (bypass.c, unix.c): drawn by each process
 * (kernel/abi.py NAME_HASH_MUL) and written here before any fence is registered. A
 * map, not a -D constant, so that the compiled programs are the same in every process
 * (kernel/progcache.py). */
BPF_ARRAY(name_hash_mul, __u64, 1);

static __always_inline __u64 hash_multiplier(void)
{
    __u32 zero = 0;
    __u64 *mul = name_hash_mul.lookup(&zero);
    return mul ? *mul : 0;  /* an array's index 0 is always there */
}

BPF_LPM_TRIE(addrs, struct addr_key, struct addr_rule, 65536);
BPF_RINGBUF_OUTPUT(conn_events, 256);
/* Events a fence's programs could not report (a ring buffer was full), by fence cgroup:
 * a run with any is not vouched for (run.py). */
BPF_HASH(lost_events, __u64, __u64, 1024);

static __always_inline void count_lost(__u64 cgid)
{
    __u64 one = 1;
    __u64 *count = lost_events.lookup(&cgid);
    if (count)
        __sync_fetch_and_add(count, 1);
    else
        lost_events.update(&cgid, &one);
}

#define DEPFENCE_MAX_LEVEL 16

/* The fence the current task is in: its own cgroup when registered, else the
 * registered ancestor closest to the root (levels are walked from the top), so
 * a sub-cgroup made inside a fence (a service, a container) is still fenced.
 * *fence_id gets the fence cgroup's id, which every record uses. egress.c's
 * fence_of_skb() walks a packet's cgroup the same way. */
static __always_inline struct fence_cfg *fence_of_current(__u64 *fence_id)
{
    __u64 id = bpf_get_current_cgroup_id();
    struct fence_cfg *fence = fences.lookup(&id);
    if (fence) {
        *fence_id = id;
        return fence;
    }
    /* A loop, not unrolled: 5.3+ verifiers take bounded loops, and clang unrolling
     * it cost the compile 0.1-0.2 s of CPU here (bench/bench_fence.py, first fence). */
#pragma clang loop unroll(disable)
    for (int level = 1; level < DEPFENCE_MAX_LEVEL; level++) {
        id = bpf_get_current_ancestor_cgroup_id(level);
        if (!id)
            break;  /* deeper than the task's own cgroup */
        fence = fences.lookup(&id);
        if (fence) {
            *fence_id = id;
            return fence;
        }
    }
    return 0;
}

/* bpf_probe_read_user(_str) under names of our own. For each call by the helper's own
 * name, bcc's rewriter reads the whole of /proc/kallsyms once more to learn whether the
 * kernel has it (a fallback for kernels before 5.5, older than any we run on): a third
 * of the first fence's compile time. The helpers are the same. */
static long (*read_user)(void *dst, __u32 size, const void *src) =
    (void *)BPF_FUNC_probe_read_user;
static long (*read_user_str)(void *dst, __u32 size, const void *src) =
    (void *)BPF_FUNC_probe_read_user_str;

/* The 8 bytes of kernel memory at `at` (a pointer, a register, an id); 0 when they
 * cannot be read. */
static __always_inline __u64 kernel_u64(__u64 at)
{
    __u64 value = 0;
    bpf_probe_read_kernel(&value, sizeof(value), (void *)at);
    return value;
}

#ifndef DEPFENCE_NO_BTF_OFFSETS
/* The hierarchy and id of a struct cgroup (a raw tracepoint's argument), as the
 * classic cgroup tracepoints record them: cgrp->root->hierarchy_id (0: cgroup v2)
 * and cgrp->kn->id. The offsets are the running kernel's (BTF: kernel/tracing.py). */
static __always_inline void cgroup_ids(__u64 cgrp, int *root, __u64 *id)
{
    __u64 cgroup_root = kernel_u64(cgrp + DEPFENCE_OFF_CGROUP_ROOT);
    bpf_probe_read_kernel(root, sizeof(*root),
                          (void *)(cgroup_root + DEPFENCE_OFF_ROOT_HIERARCHY_ID));
    *id = kernel_u64(kernel_u64(cgrp + DEPFENCE_OFF_CGROUP_KN) + DEPFENCE_OFF_KERNFS_ID);
}
#endif

#ifdef DEPFENCE_NO_TRACING_ANCESTORS
/* The fence of the current task, for tracepoint programs on a kernel whose
 * tracing programs lack bpf_get_current_ancestor_cgroup_id (it came to them in
 * 5.14; sock_addr programs have it from 5.7): kernel/toolkit.py probes for the
 * helper and defines DEPFENCE_NO_TRACING_ANCESTORS when it is missing. A task's
 * own cgroup is looked up as above; a sub-cgroup is known by `subcgroups`, where
 * subcgroups.c files every cgroup a fenced process makes under that process's
 * fence. */
BPF_HASH(subcgroups, __u64, __u64, 4096);

static __always_inline struct fence_cfg *fence_of_task(__u64 *fence_id)
{
    __u64 id = bpf_get_current_cgroup_id();
    struct fence_cfg *fence = fences.lookup(&id);
    if (!fence) {
        __u64 *maker = subcgroups.lookup(&id);
        if (!maker)
            return 0;
        id = *maker;
        fence = fences.lookup(&id);
    }
    if (fence)
        *fence_id = id;
    return fence;
}
#else
/* Tracepoint programs walk the task's ancestors as sock_addr programs do. */
#define fence_of_task fence_of_current
#endif

#endif
