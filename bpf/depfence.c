/* The fence's kernel side, compiled once per process by bcc.
 *
 *   abi.h       the constants shared with Python (-D flags, no defaults)
 *   fence.h     maps, records and the event head every program shares
 *   subcgroups.c  before 5.14 only: the sub-cgroups fenced processes make
 *   procs.c     parent and argv of every fenced process
 *   mounts.c    pause a fenced process that changes its mounts
 *   hostsfile.c pause a fenced process that writes or makes a hosts file
 *   escape.c    kill and report a fenced process moved out of its fence
 *   unix.c      a fenced process's connects to unix sockets
 *   syscalls.c  raw_syscalls: the syscalls of the five above, by number
 *   sockaddr.c  connect4/6, sendmsg4/6, recvmsg4/6: DNS redirect, socket owners
 *   sockcreate.c  sock_create: the owners of raw and ICMP sockets
 *   bypass.c    DNS queries that skip the proxy, judged by name in the packet
 *   egress.c    cgroup_skb egress: DNS message -> sending process, backstop, blackhole
 *
 * The sock_addr, sock and skb programs are attached only to fence cgroups (one
 * bpf_link each, so they go away with the process that made them); the
 * tracepoints (raw: they detach at once, see syscalls.c) filter on the fence
 * cgroups in `fences`.
 *
 * With DEPFENCE_MAPS_ONLY (kernel/progcache.py: the programs come from the cache),
 * every program is a static function nothing calls, which clang drops: bcc makes the
 * same maps, with the same key and leaf types, and compiles no program.
 */
#ifdef DEPFENCE_MAPS_ONLY
#undef RAW_TRACEPOINT_PROBE
#define RAW_TRACEPOINT_PROBE(event) \
    static __always_inline int raw_tracepoint__##event(struct bpf_raw_tracepoint_args *ctx)
#define PROGRAM static __always_inline
#else
#define PROGRAM
#endif
#include "fence.h"
#include "subcgroups.c"
#include "procs.c"
#include "mounts.c"
#include "hostsfile.c"
#include "escape.c"
#include "unix.c"
#include "syscalls.c"
#include "sockaddr.c"
#include "sockcreate.c"
#include "bypass.c"
#include "egress.c"

/* Never written nor read by a program: bcc derives this map's value type from
 * the C, so userspace can compare every ring-buffer event struct with its
 * ctypes mirror (kernel/abi.py RINGS; tests/integration/test_kernel_contract.py). */
struct abi_check {
    struct conn_event conn;
    struct bypass_event bypass;
    struct view_event view;
    struct escape_event escape;
    struct unix_event unix_connect;
};
BPF_ARRAY(abi_check, struct abi_check, 1);
