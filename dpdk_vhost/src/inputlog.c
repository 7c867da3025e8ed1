/* Input logs and replay, for lossless mode (DESIGN.md I7).
 *
 * The primary's unit mirrors every input its NF port accepted (units.c,
 * mirror_prepare). On the standby, an input log takes the mirror frames of one
 * tag from one port, strips the mirror header and keeps the original frames in
 * sequence order. The standby trims the log at every checkpoint it commits
 * (the checkpoint's input cut), and after a failover replays what follows the
 * restored checkpoint's cut into the restored unit's NF port.
 *
 * Receiving runs on the fast path, but only for ports that have a log; trim,
 * replay and the rest run in command handlers. A replay refuses to deliver
 * anything unless the log holds every seq after the cut: a hole would be an
 * input the restored NF silently never sees.
 *
 * A log made with the NF's MAC also keeps a shadow log: the frames for that
 * MAC that reach this port while no unit owns it. The bridge floods them here
 * because the NF's MAC is never a source on the fabric (the standby releases
 * its output with its own MAC). Each mirror frame drops its copy, and every
 * older one, from the shadow log; what is left at a takeover is what the
 * primary never delivered: inputs queued at its wire port, mirror frames lost
 * with it, and everything sent during the outage. Those are replayed after
 * the mirrored ones (inputlog_replay_shadow).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <rte_byteorder.h>
#include <rte_cycles.h>
#include <rte_ethdev.h>
#include <rte_hash_crc.h>
#include <rte_mbuf.h>

#include "dp.h"

int inputlog_find(const char *name)
{
	int i;

	for (i = 0; i < DP_MAX_LOGS; i++)
		if (g.logs[i].used && strcmp(g.logs[i].name, name) == 0)
			return i;
	return -1;
}

int inputlog_find_port_tag(int port, uint32_t tag)
{
	int i;

	for (i = 0; i < DP_MAX_LOGS; i++)
		if (g.logs[i].used && g.logs[i].port == port && g.logs[i].tag == tag)
			return i;
	return -1;
}

static int frames_alloc(struct dp_log *lg, uint32_t cap, uint64_t max_bytes)
{
	lg->ent = calloc(cap, sizeof(lg->ent[0]));
	/* Not touched here: the pages are faulted in as frames first reach them. */
	lg->arena = malloc(max_bytes);
	if (lg->ent == NULL || lg->arena == NULL) {
		free(lg->ent);
		free(lg->arena);
		lg->ent = NULL;
		lg->arena = NULL;
		return -1;
	}
	lg->cap = cap;
	lg->arena_size = max_bytes;
	return 0;
}

static void frames_free(struct dp_log *lg)
{
	free(lg->ent);
	free(lg->arena);
}

int inputlog_create(struct dp_log *lg, const char *name, int port, uint32_t tag, uint32_t cap,
		    uint64_t max_bytes, const uint8_t *shadow_mac, char *err, size_t errlen)
{
	struct dp_log *sh = NULL;

	memset(lg, 0, sizeof(*lg));
	if (shadow_mac != NULL) {
		sh = calloc(1, sizeof(*sh));
		if (sh != NULL && frames_alloc(sh, cap, max_bytes) < 0) {
			free(sh);
			sh = NULL;
		}
	}
	if (frames_alloc(lg, cap, max_bytes) < 0 || (shadow_mac != NULL && sh == NULL)) {
		if (lg->ent != NULL)
			frames_free(lg);
		lg->ent = NULL;
		lg->arena = NULL;
		snprintf(err, errlen, "no_memory cannot allocate %u entries and %lu bytes%s", cap,
			 (unsigned long)max_bytes, shadow_mac ? ", twice (log and shadow)" : "");
		return -1;
	}
	snprintf(lg->name, sizeof(lg->name), "%s", name);
	lg->port = port;
	lg->tag = tag;
	lg->used = 1;
	g.ports[port].n_logs++;
	g.ports[port].rx_filters++;
	if (sh != NULL) {
		lg->shadow = sh;
		memcpy(lg->shadow_mac, shadow_mac, sizeof(lg->shadow_mac));
		g.ports[port].n_shadows++;
	}
	return 0;
}

/* Returns how many entries it held. */
uint64_t inputlog_destroy(struct dp_log *lg)
{
	uint64_t n = lg->n;

	g.ports[lg->port].n_logs--;
	g.ports[lg->port].rx_filters--;
	if (lg->shadow != NULL) {
		g.ports[lg->port].n_shadows--;
		frames_free(lg->shadow);
		free(lg->shadow);
	}
	frames_free(lg);
	memset(lg, 0, sizeof(*lg));
	return n;
}

void inputlogs_free_all(void)
{
	int i;

	for (i = 0; i < DP_MAX_LOGS; i++)
		if (g.logs[i].used)
			inputlog_destroy(&g.logs[i]);
}

static inline struct dp_log_entry *entry(struct dp_log *lg, uint32_t k)
{
	return &lg->ent[(lg->head + k) % lg->cap];
}

static void drop_oldest(struct dp_log *lg)
{
	struct dp_log_entry *e = entry(lg, 0);

	lg->bytes -= e->len;
	lg->head = (lg->head + 1) % lg->cap;
	lg->n--;
	if (lg->n == 0)
		lg->wpos = 0;
}

/* Where a frame of `len` bytes can go in the arena, or -1 when the oldest
 * entries are in the way. The live bytes run from the oldest entry's offset
 * (r) to wpos (w), wrapping at the arena's end. */
static int64_t arena_place(const struct dp_log *lg, uint32_t len)
{
	uint64_t r, w = lg->wpos;

	if (lg->n == 0)
		return len <= lg->arena_size ? 0 : -1;
	r = lg->ent[lg->head].off;
	if (w > r) {
		if (lg->arena_size - w >= len)
			return (int64_t)w;
		return r >= len ? 0 : -1;
	}
	/* Wrapped (w == r: full). */
	return r - w >= len ? (int64_t)w : -1;
}

static void copy_out(uint8_t *dst, const struct rte_mbuf *m, uint32_t off, uint32_t len)
{
	const struct rte_mbuf *seg = m;

	while (seg != NULL && off >= seg->data_len) {
		off -= seg->data_len;
		seg = seg->next;
	}
	while (seg != NULL && len) {
		uint32_t c = seg->data_len - off < len ? seg->data_len - off : len;

		memcpy(dst, rte_pktmbuf_mtod_offset(seg, const uint8_t *, off), c);
		dst += c;
		len -= c;
		off = 0;
		seg = seg->next;
	}
}

/* Copies the frame in m from byte `skip` on as the newest entry, with `seq`,
 * dropping the oldest entries for room; NULL (nothing stored) when it is
 * bigger than the whole arena. */
static struct dp_log_entry *store(struct dp_log *lg, const struct rte_mbuf *m, uint32_t skip,
				  uint64_t seq)
{
	uint32_t len = m->pkt_len - skip;
	struct dp_log_entry *e;
	int64_t off;

	if (len > lg->arena_size) {
		lg->too_big++;
		return NULL;
	}
	if (lg->n == lg->cap) {
		lg->overflow++;
		lg->overflow_seq = entry(lg, 0)->seq;
		drop_oldest(lg);
	}
	while ((off = arena_place(lg, len)) < 0) {
		lg->overflow++;
		lg->overflow_seq = entry(lg, 0)->seq;
		drop_oldest(lg);
	}
	copy_out(lg->arena + off, m, skip, len);
	e = entry(lg, lg->n);
	e->seq = seq;
	e->off = (uint32_t)off;
	e->len = len;
	e->hash = 0;
	lg->n++;
	lg->wpos = (uint64_t)off + len;
	lg->bytes += len;
	lg->received++;
	return e;
}

static inline uint32_t frame_hash(const uint8_t *p, uint32_t len)
{
	return rte_hash_crc(p, len, 0);
}

/* frame_hash of the frame in m, segment by segment (a CRC runs on byte by
 * byte, so the split does not change it). */
static uint32_t mbuf_hash(const struct rte_mbuf *m)
{
	uint32_t h = 0;

	for (; m != NULL; m = m->next)
		h = rte_hash_crc(rte_pktmbuf_mtod(m, const uint8_t *), m->data_len, h);
	return h;
}

/* The primary delivered the frame at p: its copy in the shadow log, and every
 * older entry there, need no replay.
 *
 * The bridge floods each input to the primary and the standby at once, and
 * both keep the wire's order, so the copies come in the order the primary
 * delivered them; a mirror frame can still overtake its own copy (the copy
 * waits in a busy queue on its way here). Such a mirror frame is remembered
 * (pend, a FIFO in mirror order) and its copy, when it comes, is dropped
 * rather than logged. Frames for another MAC (a broadcast, a frame the fabric
 * floods to the primary for an unknown MAC) never get a copy here, so they are
 * neither looked for nor remembered: remembering them pushed the frames that
 * do get one out of the FIFO, and their copies were then logged and replayed
 * a second time at a takeover (I7). */
static void shadow_match(struct dp_log *lg, const uint8_t *p, uint32_t len)
{
	struct dp_log *sh = lg->shadow;
	uint32_t h, i, scan = sh->n < DP_SHADOW_SCAN ? sh->n : DP_SHADOW_SCAN;

	if (len < 6 || memcmp(p, lg->shadow_mac, 6) != 0)
		return;
	h = frame_hash(p, len);
	for (i = 0; i < scan; i++) {
		const struct dp_log_entry *e = entry(sh, i);

		if (e->hash == h && e->len == len && memcmp(sh->arena + e->off, p, len) == 0) {
			uint32_t k;

			for (k = 0; k <= i; k++)
				drop_oldest(sh);
			sh->trimmed += i + 1;
			lg->shadow_matched++;
			/* Every remembered frame is older than this one, so its
			 * copy would have come before this copy did: it never will. */
			lg->pend_n = 0;
			return;
		}
	}
	lg->shadow_unmatched++;
	if (lg->pend_n == DP_SHADOW_PEND) {
		lg->pend_head = (lg->pend_head + 1) % DP_SHADOW_PEND;
		lg->pend_n--;
		lg->shadow_evicted++;
	}
	i = (lg->pend_head + lg->pend_n) % DP_SHADOW_PEND;
	lg->pend_hash[i] = h;
	lg->pend_len[i] = len;
	lg->pend_n++;
}

/* Whether the copy in m is of a remembered mirror frame; if so, it and the
 * older remembered ones are forgotten (their copies, older, are not coming). */
static int pend_take(struct dp_log *lg, const struct rte_mbuf *m)
{
	uint32_t h, i;

	if (lg->pend_n == 0)
		return 0;
	h = mbuf_hash(m);
	for (i = 0; i < lg->pend_n; i++) {
		uint32_t k = (lg->pend_head + i) % DP_SHADOW_PEND;

		if (lg->pend_hash[k] == h && lg->pend_len[k] == m->pkt_len) {
			lg->pend_head = (k + 1) % DP_SHADOW_PEND;
			lg->pend_n -= i + 1;
			return 1;
		}
	}
	return 0;
}

static void log_append(struct dp_log *lg, const struct rte_mbuf *m, uint64_t seq)
{
	struct dp_log_entry *e;

	if (lg->started && seq <= lg->last) {
		lg->duplicates++;
		return;
	}
	if (m->pkt_len - MIRROR_HDR_LEN > lg->arena_size) {
		/* Left out: the next frame then shows it as a gap. */
		lg->too_big++;
		return;
	}
	if (lg->started && seq != lg->last + 1) {
		lg->gaps++;
		if (lg->gap_seq == 0 || lg->last + 1 < lg->gap_seq)
			lg->gap_seq = lg->last + 1;
	}
	e = store(lg, m, MIRROR_HDR_LEN, seq);
	lg->last = seq;
	lg->started = 1;
	if (lg->shadow != NULL && e != NULL)
		shadow_match(lg, lg->arena + e->off, e->len);
}

/* A frame for the shadow's MAC on an unowned port; returns 1 if it was taken
 * (logged, or dropped as one a mirror frame already covered). */
static int shadow_receive(struct dp_log *lg, struct rte_mbuf *m)
{
	struct dp_log *sh = lg->shadow;
	struct dp_log_entry *e;

	if (pend_take(lg, m)) {
		/* Its mirror frame came first: the primary has it. */
		lg->shadow_matched++;
		return 1;
	}
	e = store(sh, m, 0, sh->received + 1);
	if (e == NULL)
		return 0;
	e->hash = frame_hash(sh->arena + e->off, e->len);
	return 1;
}

/* The frames of an unowned port left after rx_filter: those for a shadow
 * log's MAC are logged there and freed. Returns the frames left, compacted. */
uint16_t inputlog_shadow_filter(struct dp_port *p, struct rte_mbuf **pkts, uint16_t n, int *work)
{
	const int port = (int)(p - g.ports);
	uint16_t i, k = 0;
	int j;

	for (i = 0; i < n; i++) {
		const uint8_t *dst = rte_pktmbuf_mtod(pkts[i], const uint8_t *);
		int taken = 0;

		for (j = 0; j < DP_MAX_LOGS && !taken && pkts[i]->data_len >= 6; j++) {
			struct dp_log *lg = &g.logs[j];

			if (lg->used && lg->shadow != NULL && lg->port == port &&
			    memcmp(dst, lg->shadow_mac, 6) == 0)
				taken = shadow_receive(lg, pkts[i]);
		}
		if (taken) {
			p->shadow_rx++;
			*work = 1;
			rte_pktmbuf_free(pkts[i]);
		} else {
			pkts[k++] = pkts[i];
		}
	}
	return k;
}

/* A mirror frame (ethertype 0x88B6) from a port that has at least one log.
 * Always consumes m. */
void inputlog_receive(struct dp_port *p, struct rte_mbuf *m, int *work)
{
	uint8_t hdr[MIRROR_HDR_LEN];
	const uint8_t *h;
	rte_be32_t tag;
	rte_be64_t seq;
	int i;

	h = rte_pktmbuf_read(m, 0, MIRROR_HDR_LEN, hdr);
	if (h == NULL || m->pkt_len == MIRROR_HDR_LEN) {
		p->mirror_bad++;
		rte_pktmbuf_free(m);
		return;
	}
	memcpy(&tag, h + 14, sizeof(tag));
	memcpy(&seq, h + 18, sizeof(seq));
	i = inputlog_find_port_tag((int)(p - g.ports), rte_be_to_cpu_32(tag));
	if (i < 0) {
		p->mirror_unknown++;
	} else {
		p->mirror_rx++;
		log_append(&g.logs[i], m, rte_be_to_cpu_64(seq));
	}
	*work = 1;
	rte_pktmbuf_free(m);
}

uint64_t inputlog_trim(struct dp_log *lg, uint64_t upto)
{
	uint64_t n = 0;

	while (lg->n && entry(lg, 0)->seq <= upto) {
		drop_oldest(lg);
		n++;
	}
	lg->trimmed += n;
	if (upto > lg->trim_seq)
		lg->trim_seq = upto;
	/* Inputs up to the committed cut are in the checkpoint: mirror frames
	 * for them that are still on their way are not needed any more. */
	if (!lg->started || upto > lg->last) {
		lg->last = upto;
		lg->started = 1;
	}
	return n;
}

/* The logical index of the first entry with a seq above `after` (n if none). */
static uint32_t first_after(struct dp_log *lg, uint64_t after)
{
	uint32_t lo = 0, hi = lg->n;

	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;

		if (entry(lg, mid)->seq <= after)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static const char *missing_reason(const struct dp_log *lg, uint64_t seq, char *buf, size_t len)
{
	if (seq <= lg->overflow_seq)
		snprintf(buf, len, "dropped by overflow, which dropped up to seq %lu (capacity=%u "
			 "max_bytes=%lu)", (unsigned long)lg->overflow_seq, lg->cap,
			 (unsigned long)lg->arena_size);
	else if (seq <= lg->trim_seq)
		snprintf(buf, len, "trimmed (trim_input_log upto=%lu)", (unsigned long)lg->trim_seq);
	else
		snprintf(buf, len, "never logged: a gap in the mirror stream");
	return buf;
}

/* Sends entries k, k+1, ... to the end of the log to u's NF port, in order.
 * A port that refuses frames is retried until it has refused for
 * INPUTLOG_REPLAY_STALL_US in all (-1). *done counts what it took; a dry mbuf
 * pool stops it early with *short_of_mbufs set. */
static int deliver(struct dp_log *lg, struct dp_unit *u, uint32_t k, uint64_t *done,
		   int *short_of_mbufs)
{
	const uint64_t stall_max = dp_us_to_tsc(INPUTLOG_REPLAY_STALL_US);
	const uint16_t pid = g.ports[u->nf].port_id;
	uint64_t stalled = 0;

	*done = 0;
	*short_of_mbufs = 0;
	while (k < lg->n && !*short_of_mbufs) {
		struct rte_mbuf *m[DP_BURST];
		uint16_t n = 0, sent = 0;

		while (n < DP_BURST && k + n < lg->n) {
			const struct dp_log_entry *e = entry(lg, k + n);

			m[n] = frame_mbuf(lg->arena + e->off, e->len);
			if (m[n] == NULL) {
				*short_of_mbufs = 1;
				break;
			}
			n++;
		}
		while (sent < n) {
			uint64_t t;

			sent += rte_eth_tx_burst(pid, 0, m + sent, (uint16_t)(n - sent));
			if (sent == n)
				break;
			if (stalled >= stall_max) {
				rte_pktmbuf_free_bulk(m + sent, n - sent);
				*done += sent;
				return -1;
			}
			t = rte_rdtsc();
			rte_delay_us_sleep(20);
			stalled += rte_rdtsc() - t;
		}
		*done += sent;
		k += sent;
	}
	return 0;
}

/* Delivers the logged frames with seq > after to u's NF port, in order, before
 * it returns; ingress must be paused. Nothing is delivered unless the log holds
 * every seq from after+1 to its last. A port that refuses frames is retried
 * until it has refused for INPUTLOG_REPLAY_STALL_US in all; what was delivered
 * by then stays delivered and counted, and the error says up to which seq. */
int inputlog_replay(struct dp_log *lg, struct dp_unit *u, uint64_t after,
		    struct inputlog_replayed *res, char *err, size_t errlen)
{
	uint32_t start = first_after(lg, after), k;
	uint64_t expect = after + 1, done = 0;
	int ret, short_of_mbufs = 0;
	char why[200];

	memset(res, 0, sizeof(*res));
	for (k = start; k < lg->n; k++, expect++)
		if (entry(lg, k)->seq != expect)
			break;
	/* With no entry after `after`, entries after it can still have been
	 * dropped: by a trim above it, or by overflow (then later ones are held,
	 * and the scan finds the hole). */
	if (k < lg->n || (start == lg->n && (after < lg->trim_seq || after < lg->overflow_seq))) {
		snprintf(err, errlen, "log_incomplete log %s cannot replay after seq %lu: seq %lu is "
			 "missing (%s); nothing was delivered", lg->name, (unsigned long)after,
			 (unsigned long)expect, missing_reason(lg, expect, why, sizeof(why)));
		return -1;
	}
	ret = deliver(lg, u, start, &done, &short_of_mbufs);
	if (done) {
		res->first = entry(lg, start)->seq;
		res->last = entry(lg, start + (uint32_t)done - 1)->seq;
	}
	if (ret < 0)
		snprintf(err, errlen, "tx_timeout NF port %s of unit %s took %lu of %u frames "
			 "(up to seq %lu), then refused the rest for %d ms; replay again with "
			 "after=%lu", g.ports[u->nf].name, u->name, (unsigned long)done,
			 lg->n - start, (unsigned long)(done ? res->last : after),
			 INPUTLOG_REPLAY_STALL_US / 1000, (unsigned long)(done ? res->last : after));
	else if (short_of_mbufs)
		snprintf(err, errlen, "no_mbuf unit %s took %lu of %u frames (up to seq %lu), "
			 "then the mbuf pool ran dry; replay again with after=%lu", u->name,
			 (unsigned long)done, lg->n - start, (unsigned long)(done ? res->last : after),
			 (unsigned long)(done ? res->last : after));
	if (short_of_mbufs)
		ret = -1;
	/* Counted as input the NF port accepted, so the next cut includes them. */
	u->in_seq += done;
	u->replayed_pkts += done;
	lg->replayed += done;
	res->delivered = done;
	return ret;
}

/* Delivers the shadow log to u's NF port, in order, and drops what it
 * delivered; ingress must be paused, and the mirrored inputs replayed first. */
int inputlog_replay_shadow(struct dp_log *lg, struct dp_unit *u, struct inputlog_replayed *res,
			   char *err, size_t errlen)
{
	struct dp_log *sh = lg->shadow;
	uint64_t done = 0, i;
	int ret, short_of_mbufs = 0;

	memset(res, 0, sizeof(*res));
	if (sh == NULL) {
		snprintf(err, errlen, "no_shadow log %s has no shadow log; add_input_log it with "
			 "shadow_mac", lg->name);
		return -1;
	}
	ret = deliver(sh, u, 0, &done, &short_of_mbufs);
	if (done) {
		res->first = entry(sh, 0)->seq;
		res->last = entry(sh, (uint32_t)done - 1)->seq;
	}
	for (i = 0; i < done; i++)
		drop_oldest(sh);
	u->in_seq += done;
	u->replayed_pkts += done;
	sh->replayed += done;
	res->delivered = done;
	if (ret < 0 || short_of_mbufs) {
		snprintf(err, errlen, "%s unit %s took %lu shadow frames, then %s; %u are left, "
			 "replay_shadow_log again", ret < 0 ? "tx_timeout" : "no_mbuf", u->name,
			 (unsigned long)done, ret < 0 ? "its NF port refused the rest" :
			 "the mbuf pool ran dry", sh->n);
		return -1;
	}
	return 0;
}
