/* sock_addr programs: DNS to the proxy, every other destination judged at connect time.
 *
 * connect4/6 and sendmsg4/6 run in the calling process's syscall, so the pid
 * they record is exact. They redirect every message to port 53 (UDP over
 * connected and unconnected sockets, TCP) to the fence's proxy on loopback,
 * and remember where it was meant to go; recvmsg4/6 rewrite the reply's
 * source back to that address, because resolvers drop answers from elsewhere.
 *
 * Any other destination is looked up in the fence's address trie (learned from
 * DNS answers, the upstream and the hosts file, plus address rules). A refused
 * one fails at once -- EPERM, or ECONNREFUSED for outage "reset" -- never by a
 * silent drop that leaves connect() hanging; only outage "blackhole" drops, on
 * purpose, in egress.c. Loopback is always reachable, and on record like every
 * permitted destination: the first message of each process to it is reported, and
 * every one counted (map `contacts`). A refused or audited message is reported each
 * time: those are violations.
 *
 * Helpers (program type BPF_PROG_TYPE_CGROUP_SOCK_ADDR), with the first kernel
 * that offers each to this program type:
 *   bpf_get_current_cgroup_id   5.7
 *   bpf_get_current_ancestor_cgroup_id  5.7
 *   bpf_get_current_pid_tgid    5.7
 *   bpf_get_socket_cookie       5.0 (sock_addr variant)
 *   bpf_ringbuf_output          5.8
 *   bpf_ktime_get_ns            4.1
 *   bpf_map_lookup/update_elem  4.17 (base helpers; LPM trie map 4.11)
 *   __sync_fetch_and_add on a map value (BPF_XADD, result unused)  4.x, every kernel here
 * recvmsg4/6 attach types need 5.2.
 */

#define PASS 1
#define REFUSE 0
#define TO_REFUSER 2

/* The socket's owner `o`, with what the hook judged of this message (judge()), on record
 * for egress.c. */
static __always_inline void remember_owner(__u64 cookie, struct owner *o, __u8 where)
{
    /* A socket that sends datagram after datagram keeps its owner: a lookup, not an
     * update each time (a connect is mostly a socket's first message: not looked up).
     * Of the same thread's message, only a refused address let pass is news; the
     * datagram leaves in this very sendmsg(), after that write. */
    if (where == AT_SENDMSG) {
        struct owner *known = socket_owner(cookie);
        if (known && known->pid == o->pid && known->tid == o->tid && known->cgid == o->cgid) {
            if (o->passed_refused && !known->passed_refused)
                known->passed_refused = 1;
            return;
        }
    }
    if (sockets.update(&cookie, o))
        sockets_spill.update(&cookie, o);  /* `sockets` is full (fence.h) */
}

static __always_inline int is_dns(struct bpf_sock_addr *ctx)
{
    return ctx->user_port == bpf_htons(DNS_PORT) &&
           (ctx->protocol == IPPROTO_UDP || ctx->protocol == IPPROTO_TCP);
}

static __always_inline int is_v4_mapped(__u32 *ip6)
{
    return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(0xffff);
}

static __always_inline int is_loopback(__u32 *ip6)
{
    if (is_v4_mapped(ip6))
        return (bpf_ntohl(ip6[3]) >> 24) == 127;
    return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == bpf_htonl(1);
}

/* Whether the fence's rules refuse this (v4-mapped or v6) destination. */
static __always_inline int refused(struct fence_cfg *fence, __u32 *ip6)
{
    if (is_loopback(ip6))
        return 0;
    struct addr_key key = {};
    key.prefixlen = 32 + 128;
    key.fence_id = fence->fence_id;
    key.ip6[0] = ip6[0];
    key.ip6[1] = ip6[1];
    key.ip6[2] = ip6[2];
    key.ip6[3] = ip6[3];
    struct addr_rule *rule = addrs.lookup(&key);
    if (fence->flags & FENCE_EGRESS_ONLY)
        return !(rule && rule->verdict == VERDICT_ALLOW);
    return rule && rule->verdict == VERDICT_BLOCK;
}

/* Permitted contacts, counted: by fence cgroup, process, destination and hook. The first
 * message of a key is reported (a conn_event: the contact is on record at once, with its
 * process, as local.py needs to name a local listener); the rest are only counted here,
 * and userspace reads and deletes a run's keys when the run ends (programs.py
 * take_contacts). So a script's 5,000 connections to one address are one event, not
 * 5,000. A plain hash, not an LRU: no entry is evicted while its run still counts on it.
 * When it is full, every message of a new key is reported, as before this map existed;
 * userspace counts those events. 16384 keys, not more: each run's end reads the whole
 * map, and that costs by its size (~12 us here; 65536: ~45 us). No implicit padding. */
struct contact_key {
    __u64 cgid;         /* the fence's cgroup */
    __u32 pid;          /* tgid */
    __u32 ip6[4];       /* network order; IPv4 as ::ffff:a.b.c.d */
    __u16 port;         /* host order */
    __u8 proto;
    __u8 where;         /* AT_CONNECT, AT_SENDMSG */
};

BPF_HASH(contacts, struct contact_key, __u64, 16384);

/* Whether this message is the first of its key (to be reported); counts it either way. */
static __always_inline int first_contact(struct bpf_sock_addr *ctx, __u64 cgid, __u32 *ip6,
                                         __u8 where)
{
    struct contact_key key = {};
    key.cgid = cgid;
    key.pid = bpf_get_current_pid_tgid() >> 32;
    key.ip6[0] = ip6[0];
    key.ip6[1] = ip6[1];
    key.ip6[2] = ip6[2];
    key.ip6[3] = ip6[3];
    key.port = bpf_ntohs(ctx->user_port);
    key.proto = ctx->protocol;
    key.where = where;
    __u64 *count = contacts.lookup(&key);
    if (!count) {
        __u64 one = 1;
        if (contacts.insert(&key, &one) == 0)  /* BPF_NOEXIST */
            return 1;
        count = contacts.lookup(&key);  /* another CPU inserted it first */
        if (!count)
            return 1;  /* the map is full: reported, and counted by userspace */
    }
    __sync_fetch_and_add(count, 1);
    return 0;
}

static __always_inline void report(struct bpf_sock_addr *ctx, __u64 cgid, __u32 *ip6,
                                   __u8 action, __u8 where)
{
    struct conn_event e = {};
    fill_head(&e.head, cgid, bpf_get_current_pid_tgid(), ip6, bpf_ntohs(ctx->user_port),
              ctx->protocol);
    e.action = action;
    e.where = where;
    if (conn_events.ringbuf_output(&e, sizeof(e), 0))
        count_lost(cgid);
}

/* PASS, REFUSE, or TO_REFUSER (the caller rewrites the destination for its family);
 * what egress.c needs of the verdict goes into the owner `o` (remember_owner): the
 * IPv4 destination let pass as not refused, or that a refused one passed and was
 * reported (audit mode, outage blackhole: its packets are not reported again). One
 * report() for every outcome: inlined once, not once per outcome. */
static __always_inline int judge(struct bpf_sock_addr *ctx, struct fence_cfg *fence,
                                 struct owner *o, __u32 *ip6, __u8 where)
{
    __u8 action = ACTION_REFUSED;
    int verdict = REFUSE;
    if (!refused(fence, ip6)) {
        o->judged4 = is_v4_mapped(ip6) ? ip6[3] : 0;
        /* Loopback too: a local service may fetch for the caller (local.py names it). */
        if (!first_contact(ctx, o->cgid, ip6, where))
            return PASS;
        action = ACTION_ALLOWED;
        verdict = PASS;
    } else if (fence->flags & FENCE_AUDIT) {
        action = ACTION_AUDITED;
        verdict = PASS;
        o->passed_refused = 1;
    } else if (fence->outage == OUTAGE_RESET) {
        action = ACTION_RESET;
        verdict = TO_REFUSER;
    } else if (fence->outage == OUTAGE_BLACKHOLE) {
        action = ACTION_BLACKHOLE;
        verdict = PASS;  /* egress.c drops its packets */
        o->passed_refused = 1;
    }
    report(ctx, o->cgid, ip6, action, where);
    return verdict;
}

/* The fence of the calling process, which `o` names as the socket's owner. */
static __always_inline struct fence_cfg *fenced_socket(struct bpf_sock_addr *ctx, struct owner *o,
                                                       __u64 *cookie)
{
    struct fence_cfg *fence = fence_of_current(&o->cgid);
    if (!fence)
        return 0;
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    o->pid = pid_tgid >> 32;
    o->tid = (__u32)pid_tgid;
    *cookie = bpf_get_socket_cookie(ctx);
    if (!fence->touched)  /* a read first: the fence's line is not made dirty every time */
        fence->touched = 1;  /* its sockets, their DNS flows and contacts are in the maps */
    return fence;
}

static __always_inline int guard4(struct bpf_sock_addr *ctx, __u8 where)
{
    __u64 cookie;
    struct owner o = {};
    struct fence_cfg *fence = fenced_socket(ctx, &o, &cookie);
    if (!fence)
        return PASS;

    __u32 ip6[4] = {0, 0, bpf_htonl(0xffff), ctx->user_ip4};
    int dns = is_dns(ctx);
    int verdict = PASS;
    if (dns) {
        struct orig_dst dst = {};
        dst.ip6[3] = ctx->user_ip4;
        dst.port = ctx->user_port;
        dst.family = 4;
        redirected.update(&cookie, &dst);
    } else {
        verdict = judge(ctx, fence, &o, ip6, where);
    }
    remember_owner(cookie, &o, where);
    if (dns || verdict == TO_REFUSER) {
        ctx->user_ip4 = bpf_htonl(LOOPBACK4);
        ctx->user_port = bpf_htons(dns ? fence->proxy_port : fence->refuser_port);
        return PASS;
    }
    return verdict;
}

static __always_inline int guard6(struct bpf_sock_addr *ctx, __u8 where)
{
    __u64 cookie;
    struct owner o = {};
    struct fence_cfg *fence = fenced_socket(ctx, &o, &cookie);
    if (!fence)
        return PASS;

    __u32 ip6[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
    /* A v4-mapped destination travels as IPv4: its loopback is the IPv4 one. */
    int mapped = is_v4_mapped(ip6);
    int dns = is_dns(ctx);
    int verdict = PASS;
    if (dns) {
        struct orig_dst dst = {};
        dst.ip6[0] = ip6[0];
        dst.ip6[1] = ip6[1];
        dst.ip6[2] = ip6[2];
        dst.ip6[3] = ip6[3];
        dst.port = ctx->user_port;
        dst.family = 6;
        redirected.update(&cookie, &dst);
    } else {
        verdict = judge(ctx, fence, &o, ip6, where);
    }
    remember_owner(cookie, &o, where);
    if (!dns && verdict != TO_REFUSER)
        return verdict;
    ctx->user_port = bpf_htons(dns ? fence->proxy_port : fence->refuser_port);
    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = mapped ? bpf_htonl(0xffff) : 0;
    ctx->user_ip6[3] = mapped ? bpf_htonl(LOOPBACK4) : bpf_htonl(1);
    return PASS;
}

PROGRAM int connect4(struct bpf_sock_addr *ctx) { return guard4(ctx, AT_CONNECT); }
PROGRAM int sendmsg4(struct bpf_sock_addr *ctx) { return guard4(ctx, AT_SENDMSG); }
PROGRAM int connect6(struct bpf_sock_addr *ctx) { return guard6(ctx, AT_CONNECT); }
PROGRAM int sendmsg6(struct bpf_sock_addr *ctx) { return guard6(ctx, AT_SENDMSG); }

/* Replies: only messages from this fence's proxy port on loopback are rewritten. */
static __always_inline struct orig_dst *reply_origin(struct bpf_sock_addr *ctx)
{
    __u64 cgid;
    struct fence_cfg *fence = fence_of_current(&cgid);
    if (!fence || ctx->user_port != bpf_htons(fence->proxy_port))
        return 0;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    return redirected.lookup(&cookie);
}

PROGRAM int recvmsg4(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip4 != bpf_htonl(LOOPBACK4))
        return 1;
    struct orig_dst *dst = reply_origin(ctx);
    if (dst && dst->family == 4) {
        ctx->user_ip4 = dst->ip6[3];
        ctx->user_port = dst->port;
    }
    return 1;
}

PROGRAM int recvmsg6(struct bpf_sock_addr *ctx)
{
    __u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1];
    __u32 a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
    int from_loopback6 = a0 == 0 && a1 == 0 && a2 == 0 && a3 == bpf_htonl(1);
    int from_mapped_loopback = a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff) &&
                               a3 == bpf_htonl(LOOPBACK4);
    if (!from_loopback6 && !from_mapped_loopback)
        return 1;
    struct orig_dst *dst = reply_origin(ctx);
    if (!dst)
        return 1;
    if (dst->family == 6) {
        ctx->user_ip6[0] = dst->ip6[0];
        ctx->user_ip6[1] = dst->ip6[1];
        ctx->user_ip6[2] = dst->ip6[2];
        ctx->user_ip6[3] = dst->ip6[3];
        ctx->user_port = dst->port;
    } else if (from_mapped_loopback) {
        /* A dual-stack socket sent to ::ffff:a.b.c.d, which the kernel handed to
         * sendmsg4; its reply must come from that same mapped address. */
        ctx->user_ip6[0] = 0;
        ctx->user_ip6[1] = 0;
        ctx->user_ip6[2] = bpf_htonl(0xffff);
        ctx->user_ip6[3] = dst->ip6[3];
        ctx->user_port = dst->port;
    }
    return 1;
}
