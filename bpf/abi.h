/* The C<->Python contract: every constant both sides use.
 *
 * Each is defined once, in pytest_depfence/kernel/abi.py (what each value
 * means is written there), and passed to the compiler as -DNAME=value. None
 * has a default here: a missing one stops the compile instead of letting the
 * two sides drift apart. tests/unit/test_kernel_abi.py checks that every name
 * guarded below is one abi.py defines, and the reverse.
 */
#ifndef DEPFENCE_ABI_H
#define DEPFENCE_ABI_H

/* Sizes: argv kept per process, process records, DNS names bypass.c judges
 * (DNS_NAME_MAX and DNS_LABELS_MAX are powers of two: they are used as masks),
 * and the multiplier of the name hash. */
#ifndef DEPFENCE_ARGC
#error "DEPFENCE_ARGC is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef DEPFENCE_ARGLEN
#error "DEPFENCE_ARGLEN is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef DEPFENCE_MAX_PROCS
#error "DEPFENCE_MAX_PROCS is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef DEPFENCE_MAX_LIVE
#error "DEPFENCE_MAX_LIVE is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef DNS_NAME_MAX
#error "DNS_NAME_MAX is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef DNS_LABELS_MAX
#error "DNS_LABELS_MAX is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
/* Questions bypass.c judges per packet (TCP: over all its messages). */
#ifndef DNS_QUESTIONS_MAX
#error "DNS_QUESTIONS_MAX is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
/* Bytes kept of the destination path of a process moved out of its fence (escape.c). */
#ifndef CGROUP_PATH_MAX
#error "CGROUP_PATH_MAX is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
/* Bytes kept of a unix socket's path (unix.c): sun_path's 108, rounded up to a power
 * of two (used as a mask). */
#ifndef UNIX_PATH_LEN
#error "UNIX_PATH_LEN is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif

/* fence_cfg.flags */
#ifndef FENCE_EGRESS_ONLY
#error "FENCE_EGRESS_ONLY is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef FENCE_AUDIT
#error "FENCE_AUDIT is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef FENCE_ADOPTED
#error "FENCE_ADOPTED is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef FENCE_RAW_SOCKETS
#error "FENCE_RAW_SOCKETS is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif

/* fence_cfg.outage: what a refused connection meets (outages.KERNEL_ACTIONS) */
#ifndef OUTAGE_REFUSE
#error "OUTAGE_REFUSE is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef OUTAGE_RESET
#error "OUTAGE_RESET is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef OUTAGE_BLACKHOLE
#error "OUTAGE_BLACKHOLE is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif

/* addr_rule.verdict */
#ifndef VERDICT_BLOCK
#error "VERDICT_BLOCK is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef VERDICT_ALLOW
#error "VERDICT_ALLOW is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif

/* conn_event.action and conn_event.where */
#ifndef ACTION_REFUSED
#error "ACTION_REFUSED is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef ACTION_RESET
#error "ACTION_RESET is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef ACTION_BLACKHOLE
#error "ACTION_BLACKHOLE is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef ACTION_AUDITED
#error "ACTION_AUDITED is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef ACTION_ALLOWED
#error "ACTION_ALLOWED is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef AT_CONNECT
#error "AT_CONNECT is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef AT_SENDMSG
#error "AT_SENDMSG is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef AT_PACKET
#error "AT_PACKET is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif

/* proc.flags */
#ifndef PROC_TRUNCATED
#error "PROC_TRUNCATED is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef PROC_EXITED
#error "PROC_EXITED is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef PROC_EXECED
#error "PROC_EXECED is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif

/* bypass_event.unjudged: why a DNS-shaped message past the proxy was not judged */
#ifndef UNJUDGED_POINTER
#error "UNJUDGED_POINTER is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef UNJUDGED_GSO
#error "UNJUDGED_GSO is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef UNJUDGED_TOO_LONG
#error "UNJUDGED_TOO_LONG is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef UNJUDGED_TOO_MANY_LABELS
#error "UNJUDGED_TOO_MANY_LABELS is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef UNJUDGED_TRUNCATED
#error "UNJUDGED_TRUNCATED is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef UNJUDGED_TOO_MANY_QUESTIONS
#error "UNJUDGED_TOO_MANY_QUESTIONS is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef UNJUDGED_SPLIT
#error "UNJUDGED_SPLIT is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef UNJUDGED_NOT_A_QUERY
#error "UNJUDGED_NOT_A_QUERY is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif

/* escape_event.how: how a fenced process got past the fence's hooks */
#ifndef ESCAPE_MOVED
#error "ESCAPE_MOVED is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef ESCAPE_BORN
#error "ESCAPE_BORN is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef ESCAPE_RAW_SOCKET
#error "ESCAPE_RAW_SOCKET is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif

/* name_rule.kind */
#ifndef NAME_AND_BELOW
#error "NAME_AND_BELOW is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif
#ifndef BELOW_ONLY
#error "BELOW_ONLY is not defined: pass the -D flags of pytest_depfence/kernel/abi.py"
#endif

#endif
