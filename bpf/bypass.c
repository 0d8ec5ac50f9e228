/* DNS that does not go through the proxy: judged by name, in the packet.
 *
 * Port 53 is redirected to the proxy at connect time, but a script can ask a
 * resolver on any other port (dig @resolver -p 5300). egress.c hands every
 * other UDP datagram and TCP segment of a fenced socket here; one that is a
 * DNS query (QR=0, QUERY, one question) has its name matched against the
 * fence's name rules -- the same label-bounded, case-insensitive matching as
 * the proxy's -- and a forbidden one is dropped and reported.
 *
 * Matching without string compares: userspace stores, per rule, a hash of the
 * rule's name in DNS wire form (lowercase, with length bytes, so labels stay
 * bounded); here the query's name is hashed from its end, and the hash at
 * each label boundary is a suffix to look up.
 *
 * Helpers (program type BPF_PROG_TYPE_CGROUP_SKB), first kernel for this type:
 *   bpf_skb_load_bytes          4.5
 *   bpf_ringbuf_output          5.8
 *   bpf_ktime_get_ns            4.1 (base)
 *   bpf_map_lookup_elem         4.10
 * Bounded loops need 5.3.
 */

/* From abi.h: DNS_NAME_MAX (longer names are not judged here), DNS_LABELS_MAX
 * (nor are names of more labels), NAME_HASH_MUL, and the rule kinds
 * NAME_AND_BELOW (github.com: it and every name below) and BELOW_ONLY
 * (*.github.com: names below it only). */

struct name_key {
    __u32 fence_id;
    __u32 pad;
    __u64 hash;
};

struct name_rule {
    __u32 kind;
};

struct bypass_event {
    struct event_head head;
    __u32 name_len;
    __u16 txid;
    __u16 qtype;
    __u8 audited;
    __u8 pad[7];
    __u8 name[DNS_NAME_MAX];  /* wire form, lowercased */
};

/* Per-CPU working memory for one name: too big for the 512-byte stack. */
struct name_work {
    __u64 suffix[DNS_NAME_MAX];   /* hash of name[i..end] */
    __u8 bounds[DNS_LABELS_MAX];   /* offsets of the label starts */
};

BPF_HASH(names, struct name_key, struct name_rule, 4096);
BPF_RINGBUF_OUTPUT(bypass_events, 64);
BPF_PERCPU_ARRAY(bypass_scratch, struct bypass_event, 1);
BPF_PERCPU_ARRAY(name_scratch, struct name_work, 1);

/* Whether the query at `off` asks for a name the fence forbids; fills ev's DNS fields.
 * Three loops with no data-dependent branching inside, so the verifier (5.3+
 * bounded loops) walks them cheaply: label walk, suffix hashes, rule lookups. */
static __always_inline int forbidden_query(struct __sk_buff *skb, __u32 off,
                                           struct fence_cfg *fence, struct bypass_event *ev)
{
    __u8 hdr[12];
    if (bpf_skb_load_bytes(skb, off, hdr, sizeof(hdr)))
        return 0;
    if ((hdr[2] & 0xf8) || hdr[4] || hdr[5] != 1 || hdr[6] || hdr[7] || hdr[8] || hdr[9])
        return 0;  /* not a plain query with one question */
    if (skb->len <= off + sizeof(hdr))
        return 0;
    __u32 avail = skb->len - off - sizeof(hdr);
    __u32 n = avail < DNS_NAME_MAX ? avail : DNS_NAME_MAX;
    /* Written so the verifier sees 1..DNS_NAME_MAX in the register passed. */
    n = ((n - 1) & (DNS_NAME_MAX - 1)) + 1;
    if (bpf_skb_load_bytes(skb, off + sizeof(hdr), ev->name, n))
        return 0;
    int zero = 0;
    struct name_work *w = name_scratch.lookup(&zero);
    if (!w)
        return 0;

    /* 1. Walk the labels: where each starts, where the name ends. */
    __u32 pos = 0, labels = 0, end = DNS_NAME_MAX;
    for (__u32 k = 0; k < DNS_LABELS_MAX; k++) {
        if (pos >= n)
            return 0;  /* longer than we read: not judged here */
        __u8 c = ev->name[pos & (DNS_NAME_MAX - 1)];
        if (c == 0) {
            end = pos;
            labels = k;
            break;
        }
        if (c > 63)
            return 0;  /* a compression pointer has no place in a question */
        w->bounds[k & (DNS_LABELS_MAX - 1)] = pos;
        pos += c + 1;
    }
    if (end >= DNS_NAME_MAX)
        return 0;

    /* 2. Hash every suffix, from the final zero back; letters lowercased (length
     *    bytes are at most 63, below 'A', so they are never touched). Branch-free,
     *    and always DNS_NAME_MAX rounds: past offset 0 it wraps to bytes after the
     *    name, whose hashes are never looked up. */
    __u64 hash = 0;
    for (__u32 j = 0; j < DNS_NAME_MAX; j++) {
        __u32 i = (end - j) & (DNS_NAME_MAX - 1);
        __u32 c = ev->name[i];
        __u32 upper = (((c - 'A') >> 31) ^ 1) & ((('Z' - c) >> 31) ^ 1);
        c += upper << 5;
        ev->name[i] = c;
        hash = hash * NAME_HASH_MUL + c;
        w->suffix[i] = hash;
    }

    /* 3. Look each label-bounded suffix up among the fence's name rules. */
    int matched = 0;
    for (__u32 k = 0; k < DNS_LABELS_MAX; k++) {
        if (k >= labels)
            break;
        struct name_key key = {};
        key.fence_id = fence->fence_id;
        key.hash = w->suffix[w->bounds[k & (DNS_LABELS_MAX - 1)] & (DNS_NAME_MAX - 1)];
        struct name_rule *rule = names.lookup(&key);
        if (rule && (rule->kind == NAME_AND_BELOW || k > 0)) {
            matched = 1;
            break;
        }
    }
    __be16 qtype = 0;
    bpf_skb_load_bytes(skb, off + sizeof(hdr) + end + 1, &qtype, sizeof(qtype));
    ev->qtype = bpf_ntohs(qtype);
    ev->txid = ((__u16)hdr[0] << 8) | hdr[1];
    ev->name_len = end + 1;
    return (fence->flags & FENCE_EGRESS_ONLY) ? !matched : matched;
}

/* 1: let the packet go; 0: drop it (a forbidden query that bypassed the proxy). */
static __always_inline int judge_bypass(struct __sk_buff *skb, struct owner *o,
                                        struct fence_cfg *fence, __u32 *daddr, __u8 proto,
                                        __u32 l4, __be16 dport)
{
    __u32 off = l4 + 8;
    if (proto == IPPROTO_TCP) {
        __u8 doff;
        if (bpf_skb_load_bytes(skb, l4 + 12, &doff, 1))
            return 1;
        off = l4 + (doff >> 4) * 4 + 2;  /* DNS over TCP: a 2-byte length, then the message */
    }
    int zero = 0;
    struct bypass_event *ev = bypass_scratch.lookup(&zero);
    if (!ev)
        return 1;
    __builtin_memset(ev, 0, sizeof(*ev));
    if (!forbidden_query(skb, off, fence, ev))
        return 1;
    fill_head(&ev->head, o->cgid, ((__u64)o->pid << 32) | o->tid, daddr, bpf_ntohs(dport),
              proto);
    ev->audited = (fence->flags & FENCE_AUDIT) ? 1 : 0;
    bypass_events.ringbuf_output(ev, sizeof(*ev), 0);
    return (fence->flags & FENCE_AUDIT) ? 1 : 0;
}
