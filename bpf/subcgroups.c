/* Raw tracepoints (classic without BTF offsets, as in escape.c), only on kernels whose tracing programs lack
 * bpf_get_current_ancestor_cgroup_id (before 5.14; DEPFENCE_NO_TRACING_ANCESTORS,
 * fence.h): every cgroup a fenced process makes is filed under that process's
 * fence in `subcgroups`, so that fence_of_task() finds the processes later in it,
 * and forgotten when it is removed. The sock_addr and skb programs need none of
 * this: they walk a socket's ancestors with helpers they have from 5.7 and 5.8.
 *
 * What this sees less than the ancestor walk: a sub-cgroup made by a process
 * outside the fence (one that existed under an adopted service's cgroup before
 * it was adopted, say) is not known to the tracepoints. A cgroup a fenced root
 * process makes elsewhere in the tree is filed under its fence too: its
 * processes are then recorded and watched as fenced (fail closed).
 *
 * Only the cgroup v2 hierarchy counts (root 0, as in escape.c); on hybrid hosts
 * v1 cgroup ids are another numbering.
 *
 * Helpers (program type BPF_PROG_TYPE_RAW_TRACEPOINT or TRACEPOINT), first kernel for this type:
 *   bpf_get_current_cgroup_id   4.18
 *   bpf_map_lookup/update/delete_elem  4.7
 * The tracepoints cgroup:cgroup_mkdir and cgroup_rmdir exist from 4.13; their
 * id is the 64-bit cgroup id (as bpf_get_current_cgroup_id gives it) from 5.5.
 */
#ifdef DEPFENCE_NO_TRACING_ANCESTORS

static __always_inline int subcgroup_made(int root, __u64 id)
{
    if (root != 0)
        return 0;  /* a v1 hierarchy */
    __u64 fence_id;
    if (!fence_of_task(&fence_id))
        return 0;
    subcgroups.update(&id, &fence_id);
    return 0;
}

static __always_inline int subcgroup_removed(int root, __u64 id)
{
    if (root == 0)
        subcgroups.delete(&id);
    return 0;
}

#ifdef DEPFENCE_NO_BTF_OFFSETS
TRACEPOINT_PROBE(cgroup, cgroup_mkdir) { return subcgroup_made(args->root, args->id); }
TRACEPOINT_PROBE(cgroup, cgroup_rmdir) { return subcgroup_removed(args->root, args->id); }
#else
/* cgroup_mkdir/rmdir(struct cgroup *cgrp, const char *path); cgroup_ids: fence.h. */
RAW_TRACEPOINT_PROBE(cgroup_mkdir)
{
    int root = -1;
    __u64 id = 0;
    cgroup_ids(ctx->args[0], &root, &id);
    return subcgroup_made(root, id);
}

RAW_TRACEPOINT_PROBE(cgroup_rmdir)
{
    int root = -1;
    __u64 id = 0;
    cgroup_ids(ctx->args[0], &root, &id);
    return subcgroup_removed(root, id);
}
#endif

#endif
