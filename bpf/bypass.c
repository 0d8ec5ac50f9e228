/* DNS that does not go through the proxy: judged by name, in the packet, or dropped.
 *
 * Port 53 is redirected to the proxy at connect time, but a script can ask a
 * resolver on any other port (dig @resolver -p 5300). egress.c hands every
 * other UDP datagram and TCP segment of a fenced socket here. One that is
 * DNS-shaped -- sent to port 53, or whose header is a query's (QR=0, QUERY,
 * questions, no answers; in a TCP segment, any of its first whole messages'
 * header) -- has the name of every question matched against
 * the fence's name rules, the same label-bounded, case-insensitive matching as
 * the proxy's; a forbidden one is dropped and reported. A DNS-shaped message
 * this code cannot judge (a compression pointer in a question, a name over
 * DNS_NAME_MAX bytes or DNS_LABELS_MAX labels, more than DNS_QUESTIONS_MAX
 * questions in the packet, a message cut short, a TCP segment that does not
 * start with a whole length prefix and header) is dropped and reported too,
 * with the reason (UNJUDGED_*): fail closed. Audit mode reports and lets go.
 *
 * A UDP send of several datagrams at once (GSO: the UDP_SEGMENT option or
 * control message) leaves as one packet, which the kernel cuts into its
 * datagrams after this program: each is a message of its own, at the payload
 * plus k * gso_size. Judging every one would multiply this program's
 * verification by their number (up to GSO_SEGS_MAX), so such a packet with any
 * DNS-shaped datagram is unjudged (UNJUDGED_GSO): no DNS client sends queries so.
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
 * (nor are names of more labels), DNS_QUESTIONS_MAX (questions judged per
 * packet, TCP messages included), the rule kinds NAME_AND_BELOW
 * (github.com: it and every name below) and BELOW_ONLY (*.github.com: names
 * below it only), and the UNJUDGED_* reasons. */

#define DNS_HDR_LEN 12
/* Datagrams of one UDP GSO send looked at: UDP_MAX_SEGMENTS, 64 or (6.9+) 128. */
#define GSO_SEGS_MAX 128
/* The label walk's own stop: the name's final zero. */
#define STOP_END 0x80

/* 0/1 arithmetic for values below 2^31, and a barrier that keeps the compiler
 * from turning it back into jumps: a loop without jumps leaves the verifier
 * one state, not one per path (egress.c uses them too). */
#define EQ(a, b) (((((__u32)(a) ^ (__u32)(b)) - 1) >> 31) & 1)
#define NONZERO(x) (((0 - (__u32)(x)) >> 31) & 1)
#define LESS(a, b) ((((__u32)(a) - (__u32)(b)) >> 31) & 1)
#define OPAQUE(x) asm volatile("" : "+r"(x))

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
    __u8 unjudged;            /* 0: a forbidden name; else UNJUDGED_*: dropped unjudged */
    __u8 pad[6];
    __u8 name[DNS_NAME_MAX];  /* wire form, lowercased; with `unjudged`, what was read */
};

/* Per-CPU working memory for one name: too big for the 512-byte stack. */
struct name_work {
    __u64 suffix[DNS_NAME_MAX];   /* hash of name[i..end] */
    __u8 bounds[DNS_LABELS_MAX];   /* offsets of the label starts */
    __u32 off, end, left, tcp;     /* where judge_messages stands (kept in memory) */
    __u32 start;                   /* where the first message to judge starts (dns_shaped) */
    __u32 matched;                 /* a rule matched (kept in memory: see match_name) */
};

BPF_HASH(names, struct name_key, struct name_rule, 4096);
BPF_RINGBUF_OUTPUT(bypass_events, 64);
BPF_PERCPU_ARRAY(bypass_scratch, struct bypass_event, 1);
BPF_PERCPU_ARRAY(name_scratch, struct name_work, 1);

/* A query's header: QR=0, opcode QUERY, at least one question, no answers. */
static __always_inline int query_shaped(__u8 *hdr)
{
    return !(hdr[2] & 0xf8) && (hdr[4] | hdr[5]) && !(hdr[6] | hdr[7] | hdr[8] | hdr[9]);
}

/* 1. Walk the labels of the name read into ev->name (n bytes): where each starts
 *    (w->bounds), where the name ends (*end), how many (*labels). 0, or
 *    -UNJUDGED_* (stop: 0 while walking, then STOP_END or a reason). Without
 *    jumps: one verifier state comes out. */
static __always_inline int walk_labels(struct bypass_event *ev, struct name_work *w, __u32 n,
                                       __u32 *end, __u32 *labels)
{
    __u32 full = EQ(n, DNS_NAME_MAX);
    OPAQUE(full);
    __u32 short_stop = UNJUDGED_TRUNCATED * (full ^ 1) + UNJUDGED_TOO_LONG * full;
    __u32 pos = 0, count = 0, last = 0, stop = 0;
    for (__u32 k = 0; k < DNS_LABELS_MAX; k++) {
        __u32 c = ev->name[pos & (DNS_NAME_MAX - 1)];
        OPAQUE(c);
        OPAQUE(stop);
        OPAQUE(pos);
        __u32 walking = EQ(stop, 0);
        __u32 past = LESS(n - 1, pos);  /* pos >= n: beyond what was read */
        __u32 zero = EQ(c, 0);
        __u32 ptr = LESS(63, c);  /* a compression pointer has no place in a question */
        OPAQUE(walking);
        OPAQUE(past);
        OPAQUE(zero);
        OPAQUE(ptr);
        __u32 here = walking & (past ^ 1);
        __u32 label = here & (zero ^ 1) & (ptr ^ 1);
        OPAQUE(here);
        OPAQUE(label);
        stop += walking * past * short_stop + here * zero * STOP_END + here * ptr * UNJUDGED_POINTER;
        last += here * zero * pos;
        w->bounds[k & (DNS_LABELS_MAX - 1)] = pos;
        count += label;
        pos += label * (c + 1);
    }
    ev->name_len = pos & (2 * DNS_NAME_MAX - 1);  /* what was read, should it come to nothing */
    if (stop == 0)
        return -UNJUDGED_TOO_MANY_LABELS;
    if (stop != STOP_END)
        return -(int)(stop & 0x7f);
    *end = last & (DNS_NAME_MAX - 1);
    *labels = count;
    return 0;
}

/* 2. Hash every suffix of ev->name, from the final zero at `end` back; letters
 *    lowercased (length bytes are at most 63, below 'A', so they are never
 *    touched). Branch-free, and always DNS_NAME_MAX rounds: past offset 0 it
 *    wraps to bytes after the name, whose hashes are never looked up.
 * 3. Look each label-bounded suffix up among the fence's name rules; every
 *    round, the ones past the last label masked out (no jumps but the lookup's).
 *    The result goes through memory, where the verifier does not follow values:
 *    a match or none leaves one state, not two per round. */
static __always_inline __u32 match_name(struct bypass_event *ev, struct name_work *w,
                                        struct fence_cfg *fence, __u32 end, __u32 labels)
{
    __u64 hash = 0, mul = hash_multiplier();
    for (__u32 j = 0; j < DNS_NAME_MAX; j++) {
        __u32 i = (end - j) & (DNS_NAME_MAX - 1);
        __u32 c = ev->name[i];
        OPAQUE(c);
        __u32 upper = (((c - 'A') >> 31) ^ 1) & ((('Z' - c) >> 31) ^ 1);
        OPAQUE(upper);  /* else clang makes a jump of it: a state more every round */
        c += upper << 5;
        ev->name[i] = c;
        hash = hash * mul + c;
        w->suffix[i] = hash;
    }
    *(volatile __u32 *)&w->matched = 0;
    for (__u32 k = 0; k < DNS_LABELS_MAX; k++) {
        struct name_key key = {};
        key.fence_id = fence->fence_id;
        key.hash = w->suffix[w->bounds[k & (DNS_LABELS_MAX - 1)] & (DNS_NAME_MAX - 1)];
        struct name_rule *rule = names.lookup(&key);
        if (rule) {
            __u32 hit = LESS(k, labels) & (EQ(rule->kind, NAME_AND_BELOW) | NONZERO(k));
            *(volatile __u32 *)&w->matched |= hit;
        }
    }
    return *(volatile __u32 *)&w->matched;
}

/* The question at `off` (the message ends at `limit`): 1 forbidden, 0 allowed,
 * -UNJUDGED_* when it cannot be judged; *qlen gets its length in bytes. */
static __always_inline int judge_question(struct __sk_buff *skb, __u32 off, __u32 limit,
                                          struct fence_cfg *fence, struct bypass_event *ev,
                                          struct name_work *w, __u32 *qlen)
{
    if (limit <= off)
        return -UNJUDGED_TRUNCATED;
    __u32 avail = limit - off;
    /* The lesser of the two without a jump (one state goes on, not one with n known and
     * one without), written so the verifier sees 1..DNS_NAME_MAX in the register passed. */
    __u32 over = LESS(DNS_NAME_MAX, avail);
    OPAQUE(over);
    __u32 n = avail * (over ^ 1) + DNS_NAME_MAX * over;
    n = ((n - 1) & (DNS_NAME_MAX - 1)) + 1;
    if (bpf_skb_load_bytes(skb, off, ev->name, n))
        return -UNJUDGED_TRUNCATED;
    __u32 end = 0, labels = 0;
    int walked = walk_labels(ev, w, n, &end, &labels);
    if (walked)
        return walked;
    if (avail < end + 5)
        return -UNJUDGED_TRUNCATED;  /* no room for the type and class */
    __u32 matched = match_name(ev, w, fence, end, labels);
    __be16 qtype = 0;
    bpf_skb_load_bytes(skb, off + end + 1, &qtype, sizeof(qtype));
    ev->qtype = bpf_ntohs(qtype);
    ev->name_len = end + 1;
    *qlen = end + 5;
    return (fence->flags & FENCE_EGRESS_ONLY) ? !matched : matched;
}

/* Where a message stands: its next question, its end, questions left in it. */
struct dns_cursor {
    __u32 off;
    __u32 end;
    __u32 left;
};

/* Opens the message whose header is at c->off (TCP: its length prefix at
 * c->off - 2): 0, or -UNJUDGED_*. */
static __always_inline int open_message(struct __sk_buff *skb, struct dns_cursor *c,
                                        __u32 end, struct bypass_event *ev)
{
    __u8 hdr[DNS_HDR_LEN];
    if (c->off + DNS_HDR_LEN > end || bpf_skb_load_bytes(skb, c->off, hdr, sizeof(hdr)))
        return -UNJUDGED_TRUNCATED;
    ev->txid = ((__u16)hdr[0] << 8) | hdr[1];
    if (!query_shaped(hdr))
        return -UNJUDGED_NOT_A_QUERY;
    c->end = end;
    c->left = ((__u32)hdr[4] << 8) | hdr[5];
    c->off += DNS_HDR_LEN;
    return 0;
}

/* The next TCP message of a segment, its length prefix at c->off: 0 or -UNJUDGED_*. */
static __always_inline int open_tcp_message(struct __sk_buff *skb, struct dns_cursor *c,
                                            struct bypass_event *ev)
{
    __u8 len[2];
    if (c->off + 2 + DNS_HDR_LEN > skb->len || bpf_skb_load_bytes(skb, c->off, len, 2))
        return -UNJUDGED_SPLIT;
    __u32 end = c->off + 2 + (((__u32)len[0] << 8) | len[1]);
    if (end > skb->len)
        return -UNJUDGED_SPLIT;  /* the rest would come in a segment not judged */
    c->off += 2;
    return open_message(skb, c, end, ev);
}

/* Every question of the packet's messages (one for UDP; each whole message of
 * a TCP segment): 1 forbidden, 0 allowed, -UNJUDGED_* when one cannot be judged.
 * What follows a message's questions (EDNS and other additional records) names
 * nothing to judge. Where it stands lives in memory (`w`) between questions, read
 * back with volatile loads: the verifier takes such reads as any values, so every
 * path into a round is one state and a question is verified once per round, not
 * once per way of getting there (that was 5/6 of the egress program's load time). */
static __always_inline int judge_messages(struct __sk_buff *skb, __u8 proto,
                                          struct fence_cfg *fence, struct bypass_event *ev,
                                          struct name_work *w)
{
    int tcp = proto == IPPROTO_TCP;
    struct dns_cursor c = {*(volatile __u32 *)&w->start, 0, 0};
    int verdict = tcp ? open_tcp_message(skb, &c, ev) : open_message(skb, &c, skb->len, ev);
    if (verdict)
        return verdict;
    *(volatile __u32 *)&w->off = c.off;
    *(volatile __u32 *)&w->end = c.end;
    *(volatile __u32 *)&w->left = c.left;
    *(volatile __u32 *)&w->tcp = tcp;
    for (__u32 q = 0; q < DNS_QUESTIONS_MAX; q++) {
        c.off = *(volatile __u32 *)&w->off;
        c.end = *(volatile __u32 *)&w->end;
        c.left = *(volatile __u32 *)&w->left;
        tcp = *(volatile __u32 *)&w->tcp;
        if (!c.left) {
            c.off = c.end;  /* TCP: the next message of the segment */
            verdict = open_tcp_message(skb, &c, ev);
            if (verdict)
                return verdict;
        }
        *(volatile __u32 *)&w->off = c.off;
        *(volatile __u32 *)&w->end = c.end;
        *(volatile __u32 *)&w->left = c.left;
        __u32 qlen = 0;
        verdict = judge_question(skb, *(volatile __u32 *)&w->off, *(volatile __u32 *)&w->end,
                                 fence, ev, w, &qlen);
        if (verdict)
            return verdict;
        c.off = *(volatile __u32 *)&w->off + qlen;
        c.end = *(volatile __u32 *)&w->end;
        c.left = *(volatile __u32 *)&w->left - 1;
        if (!c.left && (!tcp || c.end == skb->len))
            return 0;
        *(volatile __u32 *)&w->off = c.off;
        *(volatile __u32 *)&w->left = c.left;
    }
    return -UNJUDGED_TOO_MANY_QUESTIONS;
}

/* Whether a packet past the proxy is DNS to judge: 1 yes (w->start: where its first
 * message to judge starts), 0 no, -UNJUDGED_SPLIT for a TCP segment that starts
 * with a query's header but no length prefix (the prefix went alone, in an earlier
 * segment). `off`: the L4 payload. A TCP segment to another port than 53 is DNS
 * when any of its first DNS_QUESTIONS_MAX whole messages is a query: what comes
 * before that one (messages that are not queries) is not judged, what comes after
 * is, as in any segment. */
static __always_inline int dns_shaped(struct __sk_buff *skb, __u32 off, __u8 proto,
                                      __be16 dport, struct name_work *w)
{
    *(volatile __u32 *)&w->start = off;
    if (dport == bpf_htons(DNS_PORT))
        return 1;
    __u8 hdr[DNS_HDR_LEN];
    if (proto != IPPROTO_TCP)
        return !bpf_skb_load_bytes(skb, off, hdr, sizeof(hdr)) && query_shaped(hdr);
    __u32 at = off, whole = 0;
    for (int m = 0; m < DNS_QUESTIONS_MAX; m++) {
        __u8 len[2];
        if (bpf_skb_load_bytes(skb, at, len, sizeof(len)) ||
            bpf_skb_load_bytes(skb, at + 2, hdr, sizeof(hdr)))
            break;
        if (query_shaped(hdr)) {
            *(volatile __u32 *)&w->start = at;  /* read back as any value: one state */
            return 1;
        }
        __u32 size = ((__u32)len[0] << 8) | len[1];
        /* Counted as a DNS message: at least a header, and the header's four counts
         * each below 64. Shorter ones are skipped, as a resolver may skip them, and
         * not counted (zeros, as many protocols begin, are no DNS); nor is what merely
         * has a length in front (random bytes of bulk TCP, a 64 KiB segment of them,
         * chain four such "messages" often: those were dropped, measured). */
        __u32 high = hdr[4] | hdr[6] | hdr[8] | hdr[10];
        __u32 low = hdr[5] | hdr[7] | hdr[9] | hdr[11];
        OPAQUE(high);
        OPAQUE(low);
        whole += LESS(DNS_HDR_LEN - 1, size) & EQ(high, 0) & LESS(low, 64);
        at += 2 + size;
    }
    /* As many DNS messages as are looked at, none a query, and room for another: a
     * query after them would go unjudged (fail closed). */
    if (whole == DNS_QUESTIONS_MAX && at + 2 + DNS_HDR_LEN <= skb->len)
        return -UNJUDGED_TOO_MANY_QUESTIONS;
    if (!bpf_skb_load_bytes(skb, off, hdr, sizeof(hdr)) && query_shaped(hdr))
        return -UNJUDGED_SPLIT;
    return 0;
}

/* Whether a UDP GSO packet (skb->gso_segs > 1) holds a DNS-shaped datagram: any of
 * them query-shaped, or all of them sent to port 53. `off`: the first one's payload. */
static __always_inline int gso_dns_shaped(struct __sk_buff *skb, __u32 off, __be16 dport)
{
    __u32 size = skb->gso_size, segs = skb->gso_segs, shaped = 0;
    if (dport == bpf_htons(DNS_PORT) || segs > GSO_SEGS_MAX)
        return 1;
    OPAQUE(segs);
    /* Every round, the ones past the last datagram masked out, and query_shaped()
     * without its jumps: the loop leaves the verifier one state, not one per way out
     * (each of which would have the rest of the program verified again). */
    for (__u32 k = 0; k < GSO_SEGS_MAX; k++) {
        __u8 hdr[DNS_HDR_LEN] = {};
        bpf_skb_load_bytes(skb, off + k * size, hdr, sizeof(hdr));  /* zeroes: no query */
        __u32 flags = hdr[2], questions = hdr[4] | hdr[5];
        __u32 records = hdr[6] | hdr[7] | hdr[8] | hdr[9];
        OPAQUE(flags);
        OPAQUE(questions);
        OPAQUE(records);
        shaped |= LESS(k, segs) & EQ(flags & 0xf8, 0) & NONZERO(questions) & EQ(records, 0);
    }
    return shaped;
}

/* 1: let the packet go; 0: drop it (a forbidden query that bypassed the proxy,
 * or a DNS-shaped one that cannot be judged). `o`: who sent it (egress.c). */
static __always_inline int judge_bypass(struct __sk_buff *skb, struct owner *o,
                                        struct fence_cfg *fence, __u32 *daddr, __u8 proto,
                                        __u32 l4, __be16 dport)
{
    __u32 off = l4 + 8;
    if (proto == IPPROTO_TCP) {
        __u8 doff;
        if (bpf_skb_load_bytes(skb, l4 + 12, &doff, 1))
            return 1;
        off = l4 + (doff >> 4) * 4;
        if (off >= skb->len)
            return 1;  /* no payload: SYN, ACK, FIN */
    }
    int zero = 0;
    struct name_work *w = name_scratch.lookup(&zero);
    struct bypass_event *ev = bypass_scratch.lookup(&zero);
    if (!w || !ev)
        return 0;  /* cannot happen (an array's only slot); fail closed all the same */
    int verdict = dns_shaped(skb, off, proto, dport, w);
    /* A flag, not two tests: what the verifier would learn of proto from them would
     * make it verify judge_messages once per thing it knew (twice the program). */
    __u32 gso = EQ(proto, IPPROTO_UDP) & LESS(1, skb->gso_segs);
    OPAQUE(gso);
    if (gso && gso_dns_shaped(skb, off, dport))
        verdict = -UNJUDGED_GSO;
    if (!verdict)
        return 1;
    __builtin_memset(ev, 0, sizeof(*ev));
    if (verdict > 0) {
        verdict = judge_messages(skb, proto, fence, ev, w);
        if (!verdict)
            return 1;
    }
    fill_head(&ev->head, o->cgid, ((__u64)o->pid << 32) | o->tid, daddr, bpf_ntohs(dport),
              proto);
    ev->head.by_socket = o->by_socket;
    ev->unjudged = verdict < 0 ? -verdict : 0;
    if (ev->name_len > DNS_NAME_MAX)
        ev->name_len = DNS_NAME_MAX;
    ev->audited = (fence->flags & FENCE_AUDIT) ? 1 : 0;
    if (bypass_events.ringbuf_output(ev, sizeof(*ev), 0))
        count_lost(o->cgid);
    return (fence->flags & FENCE_AUDIT) ? 1 : 0;
}
