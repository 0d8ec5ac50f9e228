/* cgroup/sock_create: the owner of every raw and ICMP socket made in a fence.
 *
 * Raw sockets (SOCK_RAW) and ICMP datagram sockets ("ping sockets") send
 * without passing the connect/sendmsg hooks that record a socket's owner
 * (sockaddr.c), so their packets had no process. The socket's creation runs in
 * the creating process's socket() call, so the pid recorded here is exact; it
 * goes to `rawsocks`, by socket cookie, where egress.c finds it: such a socket's
 * every packet is judged there by destination (nothing judged it at connect),
 * and its UDP/TCP payload as any DNS past the proxy (bypass.c), with this owner
 * -- or, where the kernel lets egress.c read the current task (6.10+), the
 * process that sent the packet. Other sockets are not recorded here.
 *
 * Helpers (program type BPF_PROG_TYPE_CGROUP_SOCK, attach type
 * BPF_CGROUP_INET_SOCK_CREATE), first kernel for this type:
 *   bpf_get_current_pid_tgid    5.7
 *   bpf_get_current_cgroup_id   5.7
 *   bpf_get_current_ancestor_cgroup_id  5.7
 *   bpf_get_socket_cookie       5.7 (sock variant)
 *   bpf_map_lookup/update_elem  4.10 (base helpers)
 * bpf_sock's type and protocol fields are readable here from 4.10.
 */

BPF_TABLE("lru_hash", __u64, struct owner, rawsocks, 16384);

PROGRAM int sock_create(struct bpf_sock *ctx)
{
    __u32 type = ctx->type, proto = ctx->protocol;
    int icmp = type == SOCK_DGRAM && (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6);
    if (type != SOCK_RAW && !icmp)
        return 1;
    __u64 cgid;
    struct fence_cfg *fence = fence_of_current(&cgid);
    if (!fence)
        return 1;
    fence->touched = 1;
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    struct owner o = {};
    o.pid = pid_tgid >> 32;
    o.tid = (__u32)pid_tgid;
    o.cgid = cgid;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    rawsocks.update(&cookie, &o);
    return 1;  /* the fence's rules for raw sockets are CAP_NET_RAW's (confine.py) */
}
