/* cgroup_skb egress: join each DNS message to the process that sent it.
 *
 * The proxy sees a query arrive from (loopback, client port) with a DNS id.
 * This program sees the same packet leave the fenced socket, reads those
 * fields from the headers (IPv4 options, IPv6 extension headers and all) and
 * files its sender under them, with the time it left, before the packet can
 * reach the proxy (each datagram of a UDP GSO send under its own id: the
 * kernel cuts the packet into them after this program). So attribution
 * survives the sender exiting at once, a DNS id reused on another socket
 * cannot be mistaken for this one, and a sender
 * that execs right after is named by the program that sent it (procs.c keeps
 * the record its exec replaced).
 *
 * Who the sender is: where the kernel lets this program type read the current
 * task (bpf_get_current_pid_tgid, 6.10+; kernel/toolkit.py probes it and
 * defines DEPFENCE_NO_SKB_CURRENT_TASK when it is missing), a datagram (UDP,
 * raw, ICMP) is named by the task sending it: those leave in the sender's own
 * sendmsg(), so a child writing on a socket its parent connected is named as
 * the child. Only a task of the same fence counts (its record in `procs`).
 * A TCP segment is named by the socket's owner on every kernel: it may leave
 * from softirq (an ACK opening the window, a retransmit timer) or from
 * whichever process releases the socket lock, so the current task proves
 * nothing; and on older kernels datagrams are too. The socket's owner is the
 * process the sock_addr programs recorded in syscall context (connect,
 * sendmsg) or sockcreate.c at socket(); such an event has by_socket set, so
 * the report can say the socket's owner is named, not the sender.
 *
 * Raw and ICMP sockets pass no connect/sendmsg hook: their every packet is
 * judged here by destination, with the owner sockcreate.c recorded; a
 * refused one is dropped and reported. Their UDP or TCP payload is judged
 * after that as any DNS past the proxy (bypass.c). Packets of fenced sockets
 * with no owner on record (no hook saw the socket, or `sockets` evicted its
 * owner) are judged by destination too, and their UDP or TCP payload as DNS
 * past the proxy, with no process (or the datagram's sender, as above). Such a
 * socket may live in a sub-cgroup of the fence (a script's own cgroup, a
 * container), so its fence is found by walking the packet's cgroup up, and
 * the event names the fence's cgroup. It is also where outage "blackhole"
 * happens: packets to a refused address vanish, so the script meets a host
 * that is down the way hosts go down. Everything else is let through:
 * enforcement is done at connect time.
 *
 * Helpers (program type BPF_PROG_TYPE_CGROUP_SKB), first kernel for this type:
 *   bpf_get_socket_cookie (skb)   4.12
 *   bpf_skb_cgroup_id             5.3 (for this program type)
 *   bpf_skb_ancestor_cgroup_id    5.8 (for this program type; tc has it from 4.19)
 *   bpf_get_current_pid_tgid      6.10 (every program type; probed, optional)
 *   bpf_ringbuf_output            5.8
 *   bpf_ktime_get_ns              4.1
 *   bpf_skb_load_bytes            4.5
 *   bpf_map_lookup/update_elem    4.10 (LPM trie map 4.11)
 */

#define IP_PROTO_OFF 9
#define IP_SADDR_OFF 12
#define IP_DADDR_OFF 16
#define IP6_SADDR_OFF 8
#define IP6_NEXTHDR_OFF 6
#define IP6_DADDR_OFF 24
#define IP6_HDR_LEN 40
/* Extension headers walked before the L4 header; more of them and the packet
 * is judged by its address only (its L4 header unread, as for any protocol). */
#define IP6_EXT_MAX 8
#define IP6_FRAG_LEN 8
/* How close two senders of one flow key must come to be a clash (struct owner.clash):
 * the proxy reads a query within this of its sending, however busy. */
#define FLOW_CLASH_NS 2000000000ULL

/* The IPv6 extension headers before the L4 one (hop-by-hop, routing, fragment,
 * destination options): *proto and *l4 move past each, up to IP6_EXT_MAX of
 * them. A fragment that is not the first has no L4 header: *proto stays
 * NEXTHDR_FRAGMENT. Branch-free (0/1 flags kept opaque to the compiler, so it
 * makes no jumps of them): one verifier state comes out, not one per path,
 * and everything judged after it is verified once. */
static __always_inline void skip_ip6_ext(struct __sk_buff *skb, __u8 *proto, __u32 *l4)
{
    __u32 p = *proto, off = *l4;
    for (int i = 0; i < IP6_EXT_MAX; i++) {
        __u8 ext[4] = {};
        bpf_skb_load_bytes(skb, off, ext, sizeof(ext));  /* zeroes ext when past the end */
        __u32 next = ext[0], len8 = ext[1], frag_off = ((__u32)ext[2] << 8) | ext[3];
        OPAQUE(p);
        OPAQUE(next);
        OPAQUE(len8);
        OPAQUE(frag_off);
        __u32 frag = EQ(p, IPPROTO_FRAGMENT);
        __u32 walk = EQ(p, IPPROTO_HOPOPTS) | EQ(p, IPPROTO_ROUTING) | EQ(p, IPPROTO_DSTOPTS) | frag;
        __u32 later = frag & NONZERO(frag_off & 0xfff8);
        __u32 go = walk & (later ^ 1);
        OPAQUE(frag);
        OPAQUE(go);
        __u32 len = frag * IP6_FRAG_LEN + (frag ^ 1) * (len8 + 1) * 8;
        off += go * len;
        p = go * next + (go ^ 1) * p;
    }
    *proto = p;
    *l4 = off;
}

/* Where the L4 header starts (0: not IP, or unreadable); *proto gets its protocol
 * (IPv6: past the extension headers), daddr the destination. */
static __always_inline __u32 l4_of(struct __sk_buff *skb, __u8 *proto, __u32 *daddr)
{
    __u32 l4 = 0;
    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        __u8 vihl;
        if (bpf_skb_load_bytes(skb, 0, &vihl, 1) ||
            bpf_skb_load_bytes(skb, IP_PROTO_OFF, proto, 1) ||
            bpf_skb_load_bytes(skb, IP_DADDR_OFF, &daddr[3], 4))
            return 0;
        l4 = (vihl & 0xf) * 4;
        return l4 < 20 ? 0 : l4;
    }
    if (skb->protocol != bpf_htons(ETH_P_IPV6) ||
        bpf_skb_load_bytes(skb, IP6_NEXTHDR_OFF, proto, 1) ||
        bpf_skb_load_bytes(skb, IP6_DADDR_OFF, daddr, 16))
        return 0;
    l4 = IP6_HDR_LEN;
    skip_ip6_ext(skb, proto, &l4);
    return l4;
}

/* The fence of a packet's socket: its cgroup when registered, else the
 * registered ancestor closest to the root -- the walk fence_of_current() does
 * for tasks, so both kinds of program agree on which fence a socket is in.
 * *fence_id gets the fence cgroup's id. */
static __always_inline struct fence_cfg *fence_of_skb(struct __sk_buff *skb, __u64 *fence_id)
{
    __u64 id = bpf_skb_cgroup_id(skb);
    struct fence_cfg *fence = fences.lookup(&id);
    if (fence) {
        *fence_id = id;
        return fence;
    }
    /* A loop, not unrolled: 5.3+ verifiers take bounded loops, and clang unrolling
     * it cost the compile 0.1-0.2 s of CPU here (bench/bench_fence.py, first fence). */
#pragma clang loop unroll(disable)
    for (int level = 1; level < DEPFENCE_MAX_LEVEL; level++) {
        id = bpf_skb_ancestor_cgroup_id(skb, level);
        if (!id)
            break;  /* deeper than the socket's own cgroup */
        fence = fences.lookup(&id);
        if (fence) {
            *fence_id = id;
            return fence;
        }
    }
    return 0;
}

/* A packet judged by its destination here (raw and ICMP sockets, or a socket no
 * hook saw: `who` NULL, no process): 1 let it go, 0 drop it. cgid is the fence's; the
 * L4 header at `l4` gives a UDP or TCP packet's port for the report. */
static __always_inline int judge_packet(struct __sk_buff *skb, __u32 l4, __u64 cgid,
                                        struct fence_cfg *fence, __u32 *daddr, __u8 proto,
                                        struct owner *who)
{
    if (!refused(fence, daddr))
        return 1;
    struct conn_event e = {};
    __u64 pid_tgid = who ? ((__u64)who->pid << 32) | who->tid : 0;
    __be16 port = 0;
    if (proto == IPPROTO_TCP || proto == IPPROTO_UDP)
        bpf_skb_load_bytes(skb, l4 + 2, &port, sizeof(port));  /* stays 0 when short */
    fill_head(&e.head, cgid, pid_tgid, daddr, bpf_ntohs(port), proto);
    e.head.by_socket = who ? who->by_socket : 0;
    e.action = (fence->flags & FENCE_AUDIT) ? ACTION_AUDITED : ACTION_REFUSED;
    e.where = AT_PACKET;
    if (conn_events.ringbuf_output(&e, sizeof(e), 0))
        count_lost(cgid);
    return (fence->flags & FENCE_AUDIT) ? 1 : 0;
}

/* Whether a packet of a socket the hooks judged at connect/sendmsg is judged here by
 * its destination again: a datagram, or a TCP SYN. The destination the hooks saw is not
 * always the packet's: a NAT rule of the namespace (`nft ... dnat to`, a fenced root
 * script may add one) rewrites it after them. Once a connection, not once a segment:
 * bulk TCP pays nothing. In every mode: in audit mode such a packet is reported and
 * let go, with outage "blackhole" reported and dropped; unless the hook let a refused
 * address pass on this socket and reported it already (owner.passed_refused), or the
 * SYN goes to the very address the connect let pass (judged_already). */
static __always_inline int opens_flow(struct __sk_buff *skb, __u8 proto, __u32 l4)
{
    if (proto == IPPROTO_UDP)
        return 1;
    __u8 flags = 0;
    if (proto != IPPROTO_TCP || bpf_skb_load_bytes(skb, l4 + 13, &flags, 1))
        return 0;
    return (flags & 0x12) == 0x02;  /* SYN without ACK */
}

/* Whether this is a TCP SYN to the very IPv4 destination its connect() let pass as not
 * refused (owner.judged4): no NAT rule rewrote it, and the judgement of a moment ago
 * stands. A datagram is judged again (a connected socket's sends pass no hook, and its
 * connect may be long past), and so is an IPv6 SYN: the owner keeps no IPv6 address.
 * What it saves is an LPM lookup, ~0.1 us a connection. */
static __always_inline int judged_already(struct __sk_buff *skb, struct owner *who, __u32 *daddr,
                                          __u8 proto)
{
    return proto == IPPROTO_TCP && who->judged4 && skb->protocol == bpf_htons(ETH_P_IP) &&
           daddr[3] == who->judged4;
}

/* A TCP segment with no payload that opens nothing (an ACK, a FIN, a reset): of a socket
 * the hooks judged, nothing below concerns it but a blackhole's drop. Two of a short
 * connection's three segments; their flags and data offset in one load. */
static __always_inline int settled_segment(struct __sk_buff *skb, __u32 l4)
{
    __u8 tcp[14];
    if (bpf_skb_load_bytes(skb, l4, tcp, sizeof(tcp)))
        return 0;
    return !(tcp[13] & 0x02) && l4 + (tcp[12] >> 4) * 4 >= skb->len;  /* no SYN, no data */
}

/* A datagram leaves in its sender's sendmsg(): where this program may read the
 * current task, that task is the sender, when it is a process of the same fence.
 * Otherwise `who` stays the socket's owner (by_socket). */
static __always_inline void datagram_sender(struct owner *who)
{
#ifndef DEPFENCE_NO_SKB_CURRENT_TASK
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tgid = pid_tgid >> 32;
    struct proc *p = procs.lookup(&tgid);
    if (!p || p->cgid != who->cgid || (p->flags & PROC_EXITED))
        return;
    who->pid = tgid;
    who->tid = (__u32)pid_tgid;
    who->by_socket = 0;
#endif
}

/* The datagram count of a UDP GSO send, kept in memory, where the verifier does not
 * follow values: compared with the round in a register, it would leave the verifier
 * another state for every round it could have ended in, each going through every
 * later round (128 rounds: as much work as the rest of egress). */
BPF_PERCPU_ARRAY(gso_segs, __u32, 1);

/* Files the sender of each datagram of a UDP GSO send to the proxy (the kernel cuts
 * it into them after this program) under its own DNS id; the first is filed already. */
static __always_inline void file_gso_flows(struct __sk_buff *skb, __u32 payload,
                                           struct flow_key *key, struct owner *who)
{
    int zero = 0;
    __u32 *segs = gso_segs.lookup(&zero);
    if (!segs)
        return;
    *segs = skb->gso_segs;
    __u32 size = skb->gso_size;
    for (__u32 k = 1; k < GSO_SEGS_MAX; k++) {
        __be16 txid = 0;
        bpf_skb_load_bytes(skb, payload + k * size, &txid, sizeof(txid));
        key->txid = bpf_ntohs(txid);
        if (k < *(volatile __u32 *)segs)
            dnsflows.update(key, who);
    }
}

PROGRAM int egress(struct __sk_buff *skb)
{
    __u64 cookie = bpf_get_socket_cookie(skb);
    struct owner *o = socket_owner(cookie);
    /* Only raw and ICMP sockets are in `rawsocks`. Of those, only a ping socket passes a
     * hook (connect) into `sockets` as well, and it sends ICMP alone: an owned socket's
     * TCP or UDP packet is not looked for there (below, once its protocol is known). */
    struct owner *raw = o ? 0 : rawsocks.lookup(&cookie);
    struct owner who = {};
    __u64 cgid = 0;
    struct fence_cfg *fence;
    /* A ping socket may also have been connected: its latest owner is that one. */
    if (o)
        __builtin_memcpy(&who, o, sizeof(who));
    else if (raw)
        __builtin_memcpy(&who, raw, sizeof(who));
    int owned = who.pid != 0;  /* a hook recorded the socket (never for pid 0) */
    if (owned) {
        cgid = who.cgid;  /* already the fence's: the hook walked the task's cgroup */
        fence = fences.lookup(&cgid);
    } else {
        fence = fence_of_skb(skb, &cgid);
    }
    if (!fence)
        return 1;

    __u8 proto = 0;
    __u32 daddr[4] = {0, 0, bpf_htonl(0xffff), 0};  /* IPv4 as v4-mapped */
    __u32 l4 = l4_of(skb, &proto, daddr);
    if (!l4)
        return 1;
    if (o && proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        raw = rawsocks.lookup(&cookie);  /* a connected ping socket's latest owner is o */
    if (owned && !raw && proto == IPPROTO_TCP && fence->outage != OUTAGE_BLACKHOLE &&
        settled_segment(skb, l4))
        return 1;
    if (owned) {
        who.by_socket = 1;
    } else {
        /* An adopted service's ownerless packets are its replies on connections it
         * accepted and what its sockets from before the run send: its own business,
         * never cut (its new connections were judged at connect). */
        if (fence->flags & FENCE_ADOPTED)
            return 1;
        if (!judge_packet(skb, l4, cgid, fence, daddr, proto, 0))
            return 0;
        /* Its payload is judged below all the same: the owner of a socket a hook saw is
         * gone once `sockets` evicted it (a script that made more sockets than the map
         * holds), and DNS past the proxy must not pass unjudged for that. A datagram's
         * sender is named where this kernel allows (datagram_sender), else no process. */
        who.cgid = cgid;
    }
    int is_raw = raw != 0;  /* owned: rawsocks names its owner */
    if (is_raw || proto == IPPROTO_UDP)
        datagram_sender(&who);
    if (is_raw && !judge_packet(skb, l4, cgid, fence, daddr, proto, &who))
        return 0;
    if (owned && !is_raw && !who.passed_refused && opens_flow(skb, proto, l4) &&
        !judged_already(skb, &who, daddr, proto) &&
        !judge_packet(skb, l4, cgid, fence, daddr, proto, &who))
        return 0;
    if (fence->outage == OUTAGE_BLACKHOLE && !(fence->flags & FENCE_AUDIT) &&
        refused(fence, daddr))
        return 0;
    if (proto != IPPROTO_UDP && proto != IPPROTO_TCP)
        return 1;

    __be16 ports[2];
    if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)))
        return 1;
    if (!is_loopback(daddr) || ports[1] != bpf_htons(fence->proxy_port))
        return judge_bypass(skb, &who, fence, daddr, proto, l4, ports[1]);
    if (!who.pid)
        return 1;  /* the proxy finds no flow: "no fenced socket sent this message" */

    struct flow_key key = {};
    key.proxy_port = fence->proxy_port;
    key.client_port = bpf_ntohs(ports[0]);
    key.proto = proto;
    if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        bpf_skb_load_bytes(skb, IP6_SADDR_OFF, key.client, sizeof(key.client));
    } else {
        key.client[2] = bpf_htonl(0xffff);
        bpf_skb_load_bytes(skb, IP_SADDR_OFF, &key.client[3], sizeof(key.client[3]));
    }
    if (proto == IPPROTO_UDP) {
        __be16 txid;
        /* 8 bytes of UDP header, then the DNS id. */
        if (bpf_skb_load_bytes(skb, l4 + 8, &txid, sizeof(txid)))
            return 1;
        key.txid = bpf_ntohs(txid);
    }
    /* Two programs sending with one key at once -- two processes (a socket shared across
     * a fork, both asking with one id), or one that exec'd in between (its record's
     * `since` is newer than the earlier message) -- the later would be taken for the
     * sender of both. So the entry says so, and the proxy names neither. */
    who.ts = bpf_ktime_get_ns();
    struct owner *before = dnsflows.lookup(&key);
    if (before && who.ts - before->ts < FLOW_CLASH_NS) {
        __u32 pid = who.pid;
        struct proc *now = procs.lookup(&pid);
        if (before->pid != who.pid || (now && now->since > before->ts))
            who.clash = 1;
    }
    dnsflows.update(&key, &who);
    if (proto == IPPROTO_UDP && skb->gso_segs > 1)
        file_gso_flows(skb, l4 + 8, &key, &who);
    return 1;
}
