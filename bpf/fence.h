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
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/if_ether.h>

#ifndef DEPFENCE_ARGC
#define DEPFENCE_ARGC 16
#endif
#ifndef DEPFENCE_ARGLEN
#define DEPFENCE_ARGLEN 256
#endif
#ifndef DEPFENCE_MAX_PROCS
#define DEPFENCE_MAX_PROCS 4096
#endif

#define DNS_PORT 53
#define LOOPBACK4 0x7f000001

#define FENCE_EGRESS_ONLY 1  /* addresses not allowed explicitly are refused */
#define FENCE_AUDIT 2        /* record what would be refused, refuse nothing */

#define OUTAGE_REFUSE 0      /* connect()/sendmsg() fail at once with EPERM */
#define OUTAGE_RESET 1       /* redirected to a closed loopback port: ECONNREFUSED at once */
#define OUTAGE_BLACKHOLE 2   /* allowed to start; every packet is dropped, like a dead host */

/* Per fence cgroup: where its DNS proxy listens and how addresses are judged. */
struct fence_cfg {
    __u32 fence_id;     /* shared by every run of one Fence: keys its address rules */
    __u16 proxy_port;   /* host byte order */
    __u16 refuser_port; /* host byte order: bound, never listening */
    __u16 flags;
    __u8 outage;
    __u8 pad;
};

#define VERDICT_BLOCK 1
#define VERDICT_ALLOW 2

/* An address or network of a fence: learned from DNS, the hosts file, or a rule.
 * IPv4 is stored v4-mapped (::ffff:a.b.c.d), so one trie serves both families. */
struct addr_key {
    __u32 prefixlen;    /* 32 (fence_id) + address prefix */
    __u32 fence_id;
    __u32 ip6[4];
};

struct addr_rule {
    __u32 verdict;
};

#define ACTION_REFUSED 1
#define ACTION_RESET 2
#define ACTION_BLACKHOLE 3
#define ACTION_AUDITED 4
#define ACTION_ALLOWED 5     /* a permitted destination, reported once per socket */

#define AT_CONNECT 1
#define AT_SENDMSG 2
#define AT_PACKET 3

/* A connection or datagram: refused, would-be refused (audit), or the first one
 * a socket sends to a permitted destination (so every contact is on record). */
struct conn_event {
    __u64 ts;           /* bpf_ktime_get_ns: CLOCK_MONOTONIC, as userspace reads it */
    __u64 cgid;
    __u32 pid;
    __u32 tid;
    __u32 ip6[4];
    __u16 port;         /* host order */
    __u8 proto;
    __u8 action;
    __u8 where;
    __u8 pad[3];
};

/* Who owns a socket: recorded in syscall context, where pid is reliable. */
struct owner {
    __u32 pid;          /* tgid: the process, also when a thread asked */
    __u32 tid;
    __u64 cgid;
};

/* Where a redirected socket meant to send its DNS, to rewrite replies back. */
struct orig_dst {
    __u32 ip6[4];       /* network order; ip6[3] holds the IPv4 address for family 4 */
    __u16 port;         /* network order */
    __u16 family;
};

/* A DNS message on its way to a proxy, keyed as the proxy sees it arrive. */
struct flow_key {
    __u16 proxy_port;   /* host order */
    __u16 client_port;  /* host order */
    __u16 txid;         /* DNS id for UDP; 0 for TCP (a connection is one socket) */
    __u8 proto;
    __u8 pad;
};

#define PROC_TRUNCATED 1  /* more arguments, or a longer one, than fit */
#define PROC_EXITED 2     /* the process has exited; the pid may be reused */
#define PROC_EXECED 4     /* argv comes from an exec inside the fence */

/* A process seen in a fence: parent and argv, kept after it exits. */
struct proc {
    __u32 ppid;
    __u32 flags;
    __u64 cgid;
    __u32 argc;
    __u32 pad;
    /* argv[i] at args[i * DEPFENCE_ARGLEN]; flat because bcc's Python side
     * does not understand two-dimensional arrays. */
    char args[DEPFENCE_ARGC * DEPFENCE_ARGLEN];
};

BPF_HASH(fences, __u64, struct fence_cfg, 1024);
BPF_TABLE("lru_hash", __u64, struct owner, sockets, 65536);
BPF_TABLE("lru_hash", __u64, struct orig_dst, redirected, 65536);
BPF_TABLE("lru_hash", struct flow_key, struct owner, dnsflows, 65536);
BPF_TABLE("lru_hash", __u32, struct proc, procs, DEPFENCE_MAX_PROCS);
BPF_LPM_TRIE(addrs, struct addr_key, struct addr_rule, 65536);
/* Sockets whose packets vanish (outage "blackhole"). */
BPF_TABLE("lru_hash", __u64, __u8, blackholed, 65536);
BPF_RINGBUF_OUTPUT(conn_events, 256);

#define DEPFENCE_MAX_LEVEL 16

/* The fence the current task is in: its own cgroup, or the nearest registered
 * ancestor, so a sub-cgroup made inside a fence (a service, a container) is
 * still fenced. *fence_id gets the fence cgroup's id, which every record uses. */
static __always_inline struct fence_cfg *fence_of_current(__u64 *fence_id)
{
    __u64 id = bpf_get_current_cgroup_id();
    struct fence_cfg *fence = fences.lookup(&id);
    if (fence) {
        *fence_id = id;
        return fence;
    }
#pragma unroll
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

#endif
