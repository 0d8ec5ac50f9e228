/* sock_addr programs: send the fence's DNS to its proxy and remember socket owners.
 *
 * connect4/6 and sendmsg4/6 run in the calling process's syscall, so the pid
 * they record is exact. They redirect every message to port 53 (UDP over
 * connected and unconnected sockets, TCP) to the fence's proxy on loopback,
 * and remember where it was meant to go; recvmsg4/6 rewrite the reply's
 * source back to that address, because resolvers drop answers from elsewhere.
 *
 * Helpers (program type BPF_PROG_TYPE_CGROUP_SOCK_ADDR), with the first kernel
 * that offers each to this program type:
 *   bpf_get_current_cgroup_id   5.7
 *   bpf_get_current_ancestor_cgroup_id  5.7
 *   bpf_get_current_pid_tgid    5.7
 *   bpf_get_socket_cookie       5.0 (sock_addr variant)
 *   bpf_map_lookup/update_elem  4.17 (base helpers)
 * recvmsg4/6 attach types need 5.2.
 */

static __always_inline void remember_owner(__u64 cookie, __u64 cgid)
{
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    struct owner o = {};
    o.pid = pid_tgid >> 32;
    o.tid = (__u32)pid_tgid;
    o.cgid = cgid;
    sockets.update(&cookie, &o);
}

static __always_inline int is_dns(struct bpf_sock_addr *ctx)
{
    return ctx->user_port == bpf_htons(DNS_PORT) &&
           (ctx->protocol == IPPROTO_UDP || ctx->protocol == IPPROTO_TCP);
}

/* For a fenced socket: record its owner; return its fence when the message is DNS. */
static __always_inline struct fence_cfg *fenced_dns(struct bpf_sock_addr *ctx, __u64 *cookie)
{
    __u64 cgid;
    struct fence_cfg *fence = fence_of_current(&cgid);
    if (!fence)
        return 0;
    *cookie = bpf_get_socket_cookie(ctx);
    remember_owner(*cookie, cgid);
    return is_dns(ctx) ? fence : 0;
}

static __always_inline int redirect4(struct bpf_sock_addr *ctx)
{
    __u64 cookie;
    struct fence_cfg *fence = fenced_dns(ctx, &cookie);
    if (!fence)
        return 1;

    struct orig_dst dst = {};
    dst.ip6[3] = ctx->user_ip4;
    dst.port = ctx->user_port;
    dst.family = 4;
    redirected.update(&cookie, &dst);

    ctx->user_ip4 = bpf_htonl(LOOPBACK4);
    ctx->user_port = bpf_htons(fence->proxy_port);
    return 1;
}

static __always_inline int is_v4_mapped(__u32 *ip6)
{
    return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(0xffff);
}

static __always_inline int redirect6(struct bpf_sock_addr *ctx)
{
    __u64 cookie;
    struct fence_cfg *fence = fenced_dns(ctx, &cookie);
    if (!fence)
        return 1;

    struct orig_dst dst = {};
    dst.ip6[0] = ctx->user_ip6[0];
    dst.ip6[1] = ctx->user_ip6[1];
    dst.ip6[2] = ctx->user_ip6[2];
    dst.ip6[3] = ctx->user_ip6[3];
    dst.port = ctx->user_port;
    dst.family = 6;
    redirected.update(&cookie, &dst);

    /* A v4-mapped destination travels as IPv4: send it to the IPv4 proxy. */
    int mapped = is_v4_mapped(dst.ip6);
    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = mapped ? bpf_htonl(0xffff) : 0;
    ctx->user_ip6[3] = mapped ? bpf_htonl(LOOPBACK4) : bpf_htonl(1);
    ctx->user_port = bpf_htons(fence->proxy_port);
    return 1;
}

int connect4(struct bpf_sock_addr *ctx) { return redirect4(ctx); }
int sendmsg4(struct bpf_sock_addr *ctx) { return redirect4(ctx); }
int connect6(struct bpf_sock_addr *ctx) { return redirect6(ctx); }
int sendmsg6(struct bpf_sock_addr *ctx) { return redirect6(ctx); }

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

int recvmsg4(struct bpf_sock_addr *ctx)
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

int recvmsg6(struct bpf_sock_addr *ctx)
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
