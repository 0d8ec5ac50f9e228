/* The fence's kernel side, compiled once per process by bcc.
 *
 *   procs.c     tracepoints: parent and argv of every fenced process
 *   mounts.c    tracepoints: pause a fenced process that changes its mounts
 *   sockaddr.c  connect4/6, sendmsg4/6, recvmsg4/6: DNS redirect, socket owners
 *   bypass.c    DNS queries that skip the proxy, judged by name in the packet
 *   egress.c    cgroup_skb egress: DNS message -> sending process, blackhole
 *
 * The sock_addr and skb programs are attached only to fence cgroups (one
 * bpf_link each, so they go away with the process that made them); the
 * tracepoints filter on the fence cgroups in `fences`.
 */
#include "fence.h"
#include "procs.c"
#include "mounts.c"
#include "sockaddr.c"
#include "bypass.c"
#include "egress.c"
