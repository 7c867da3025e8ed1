/* Units: steering, the egress epoch buffer and back-pressure.
 *
 * The buffer is one circular array of mbuf pointers per unit: the NF port's
 * RX writes into it and the egress TX sends from it, in place. Epoch
 * boundaries are cumulative enqueue counts, so closing an epoch is O(1) and
 * releasing one is moving a limit; the loop then transmits up to that limit
 * in bursts. What the egress port refuses stays held, in order, instead of
 * being dropped.
 */
#include <stdlib.h>
#include <string.h>

#include <rte_byteorder.h>
#include <rte_ether.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_mempool.h>
#include <rte_prefetch.h>

#include "dp.h"

int unit_find(const char *name)
{
	int i;

	for (i = 0; i < DP_MAX_UNITS; i++)
		if (g.units[i].used && strcmp(g.units[i].name, name) == 0)
			return i;
	return -1;
}

static inline uint16_t pid_of(int port)
{
	return g.ports[port].port_id;
}

/* Mirror frame (MIRROR_HDR_LEN): Ethernet header, then the mirror tag (be32)
 * and the ingress sequence number (be64), then the original frame. Copies are
 * made before the NF port takes the originals, because a vhost TX frees them
 * as soon as they are copied into the guest. */
static void mirror_prepare(struct dp_unit *u, struct rte_mbuf **pkts, uint16_t n,
			   struct rte_mbuf **copies)
{
	uint16_t i;

	for (i = 0; i < n; i++) {
		struct rte_mbuf *c = rte_pktmbuf_copy(pkts[i], g.pool, 0, UINT32_MAX);
		struct rte_ether_hdr *h;
		rte_be32_t tag = rte_cpu_to_be_32(u->mirror_tag);
		rte_be64_t seq = rte_cpu_to_be_64(u->in_seq + 1 + i);

		if (c == NULL) {
			copies[i] = NULL;
			continue;
		}
		h = (struct rte_ether_hdr *)rte_pktmbuf_prepend(c, MIRROR_HDR_LEN);
		if (h == NULL) {
			rte_pktmbuf_free(c);
			copies[i] = NULL;
			continue;
		}
		memset(&h->dst_addr, 0xff, sizeof(h->dst_addr));
		rte_eth_macaddr_get(pid_of(u->mirror), &h->src_addr);
		h->ether_type = rte_cpu_to_be_16(DP_ETHERTYPE_MIRROR);
		memcpy((char *)(h + 1), &tag, sizeof(tag));
		memcpy((char *)(h + 1) + sizeof(tag), &seq, sizeof(seq));
		copies[i] = c;
	}
}

static void mirror_send(struct dp_unit *u, struct rte_mbuf **copies, uint16_t n_sent,
			uint16_t n)
{
	struct rte_mbuf *ok[DP_BURST];
	uint16_t i, k = 0, tx;

	for (i = 0; i < n; i++) {
		if (copies[i] == NULL) {
			if (i < n_sent)
				u->drops[DROP_NO_MBUF]++;
			continue;
		}
		if (i < n_sent)
			ok[k++] = copies[i];
		else
			rte_pktmbuf_free(copies[i]);
	}
	tx = k ? rte_eth_tx_burst(pid_of(u->mirror), 0, ok, k) : 0;
	u->mirror_pkts += tx;
	if (tx < k) {
		u->drops[DROP_MIRROR_FAIL] += (uint64_t)(k - tx);
		rte_pktmbuf_free_bulk(ok + tx, k - tx);
	}
}

/* Delivers to the NF; the ingress sequence counts what the NF port accepted,
 * so a cut taken between two calls is exact. */
static uint16_t nf_send(struct dp_unit *u, struct rte_mbuf **pkts, uint16_t n)
{
	struct rte_mbuf *copies[DP_BURST];
	uint16_t sent;

	if (u->mirror >= 0)
		mirror_prepare(u, pkts, n, copies);
	sent = rte_eth_tx_burst(pid_of(u->nf), 0, pkts, n);
	if (u->mirror >= 0)
		mirror_send(u, copies, sent, n);
	u->in_seq += sent;
	return sent;
}

static void stash_put(struct dp_stash *s, struct rte_mbuf **pkts, uint16_t n)
{
	memcpy(s->m, pkts, n * sizeof(pkts[0]));
	s->off = 0;
	s->n = n;
}

/* Takes the frames the data plane itself consumes out of a burst: probes on a
 * port with probes, mirror frames on a port with input logs. Only ports with
 * either get here (rx_filters), so the others pay one test per burst. Logged
 * frames count as work; probes do not, so they never keep an idle loop awake. */
uint16_t rx_filter(struct dp_port *p, struct rte_mbuf **pkts, uint16_t n, uint64_t now,
		   int *work)
{
	const rte_be16_t probe = p->n_probes ? rte_cpu_to_be_16(DP_ETHERTYPE_PROBE) : 0;
	const rte_be16_t mirror = p->n_logs ? rte_cpu_to_be_16(DP_ETHERTYPE_MIRROR) : 0;
	uint16_t i, k = 0;

	for (i = 0; i < n; i++) {
		const struct rte_ether_hdr *eth = rte_pktmbuf_mtod(pkts[i], struct rte_ether_hdr *);
		rte_be16_t type = pkts[i]->data_len >= sizeof(*eth) ? eth->ether_type : 0;

		if (type != 0 && type == probe)
			probe_receive(p, pkts[i], now);
		else if (type != 0 && type == mirror)
			inputlog_receive(p, pkts[i], work);
		else
			pkts[k++] = pkts[i];
	}
	return k;
}

/* While ingress is stopped (paused, or back-pressure) the wire ports are still
 * read, because the probes of peer data planes and the mirror frames of input
 * logs arrive there too: a primary that stopped reading its wire port for a cut
 * would report its standby down at every epoch. What rx_filter leaves is unit
 * input; it goes into the wire stash, in arrival order, untouched until ingress
 * takes it. Each burst asks for no more than the stash has room for, so nothing
 * read is dropped; once it is full the ports are left alone and the backlog
 * waits in their queues, as it did before the stash. */
static void wire_stash_fill(struct dp_unit *u, uint64_t now, int *work)
{
	int w;

	for (w = 0; w < u->n_wire && u->ws_n < DP_WIRE_STASH; w++) {
		struct rte_mbuf *pkts[DP_BURST];
		struct dp_port *p = &g.ports[u->wire[w]];
		uint32_t room = DP_WIRE_STASH - u->ws_n;
		uint16_t n, i;

		n = rte_eth_rx_burst(p->port_id, 0, pkts, room < DP_BURST ? (uint16_t)room : DP_BURST);
		if (n && p->rx_filters)
			n = rx_filter(p, pkts, n, now, work);
		if (n == 0)
			continue;
		*work = 1;
		for (i = 0; i < n; i++)
			u->ws[(u->ws_head + u->ws_n + i) & (DP_WIRE_STASH - 1)] = pkts[i];
		u->ws_n += n;
		u->ws_pkts += n;
		if (u->ws_n == DP_WIRE_STASH)
			u->ws_full++;
	}
}

/* Delivers the wire stash, oldest first, through the same nf_send as live
 * input, so the sequence numbers, the cut and the mirror see the frames exactly
 * as if they had been read from the wire now. They count as wire RX when the NF
 * port takes them. Returns nonzero while frames are left, which keeps the wire
 * unread: its queue holds only later frames. */
static int wire_stash_to_nf(struct dp_unit *u, int *work)
{
	while (u->ws_n) {
		uint32_t pos = u->ws_head & (DP_WIRE_STASH - 1);
		uint32_t n = u->ws_n < DP_BURST ? u->ws_n : DP_BURST;
		uint16_t sent;

		if (n > DP_WIRE_STASH - pos)
			n = DP_WIRE_STASH - pos;
		sent = nf_send(u, u->ws + pos, (uint16_t)n);
		u->ws_head += sent;
		u->ws_n -= sent;
		u->rx_wire += sent;
		if (sent)
			*work = 1;
		if (sent < n)
			return 1;
	}
	return 0;
}

static void wire_to_nf(struct dp_unit *u, uint64_t now, int *work)
{
	struct rte_mbuf *pkts[DP_BURST];
	int w;

	if (u->to_nf.n) {
		uint16_t sent = nf_send(u, u->to_nf.m + u->to_nf.off, u->to_nf.n);

		u->to_nf.off += sent;
		u->to_nf.n -= sent;
		if (sent)
			*work = 1;
		if (u->to_nf.n)
			return;
	}
	if (u->bp)
		return;
	if (unlikely(u->ws_n) && wire_stash_to_nf(u, work))
		return;
	for (w = 0; w < u->n_wire; w++) {
		struct dp_port *p = &g.ports[u->wire[w]];
		uint16_t n = rte_eth_rx_burst(p->port_id, 0, pkts, DP_BURST);
		uint16_t sent;

		if (n == 0)
			continue;
		if (p->rx_filters)
			n = rx_filter(p, pkts, n, now, work);
		if (n == 0)
			continue;
		*work = 1;
		u->rx_wire += n;
		sent = nf_send(u, pkts, n);
		if (sent < n) {
			stash_put(&u->to_nf, pkts + sent, (uint16_t)(n - sent));
			return;
		}
	}
}

static inline uint64_t sum_len(struct rte_mbuf **pkts, uint16_t n)
{
	uint64_t b = 0;
	uint16_t i;

	for (i = 0; i < n; i++)
		b += pkts[i]->pkt_len;
	return b;
}

/* What the NF emitted, less the frames of the data plane's own ethertypes:
 * a probe would leave through the egress to the fabric and tell a peer this
 * host is alive, a mirror frame would land in a standby's input log. Neither
 * can come from an NF, so they are dropped and counted (reserved_type). The
 * vhost or af_packet RX has just written each frame, so the test reads a hot
 * line. Returns the frames kept (compacted in place) and their bytes. */
static inline uint16_t nf_rx_filter(struct dp_unit *u, struct rte_mbuf **pkts, uint16_t n,
				    uint64_t *bytes)
{
	const rte_be16_t probe = rte_cpu_to_be_16(DP_ETHERTYPE_PROBE);
	const rte_be16_t mirror = rte_cpu_to_be_16(DP_ETHERTYPE_MIRROR);
	uint64_t b = 0;
	uint16_t i, k = 0;

	for (i = 0; i < n; i++) {
		struct rte_mbuf *m = pkts[i];
		rte_be16_t type = rte_pktmbuf_mtod(m, const struct rte_ether_hdr *)->ether_type;

		if (unlikely((type == probe || type == mirror) &&
			     m->data_len >= sizeof(struct rte_ether_hdr))) {
			u->drops[DROP_RESERVED_TYPE]++;
			rte_pktmbuf_free(m);
			continue;
		}
		b += m->pkt_len;
		pkts[k++] = m;
	}
	*bytes = b;
	return k;
}

void unit_update_bp(struct dp_unit *u)
{
	unsigned bp = 0, rising;

	if (u->mode == MODE_HA) {
		if (u->closed_n >= u->k)
			bp |= BP_K;
		if (unit_buffered_bytes(u) >= u->budget_bytes)
			bp |= BP_BYTES;
		if (unit_buffered_pkts(u) >= u->ring_high)
			bp |= BP_RING;
	}
	rising = bp & ~u->bp;
	if (rising & BP_K)
		u->bp_k++;
	if (rising & BP_BYTES)
		u->bp_bytes++;
	if (rising & BP_RING)
		u->bp_ring++;
	u->bp = bp;
}

/* Moves what the NF emitted into the open epoch: the NF port's RX writes
 * straight into the held array. Returns the frames taken from the NF port (0
 * when it had none), and in *kept those buffered. */
static uint16_t nf_to_buffer(struct dp_unit *u, uint16_t *kept)
{
	uint64_t held = u->enq_cnt - u->deq_cnt;
	uint32_t free_slots = (uint32_t)(u->hb_cap - held), tail, room;
	struct rte_mbuf **dst;
	uint16_t n, got;
	uint64_t bytes;

	*kept = 0;
	if (free_slots == 0) {
		u->nf_stalls++;
		return 0;
	}
	tail = (uint32_t)(u->hb_head + held) & u->hb_mask;
	room = u->hb_mask + 1 - tail; /* up to the array's end */
	if (room > free_slots)
		room = free_slots;
	if (room > DP_BURST)
		room = DP_BURST;
	dst = u->hb + tail;
	n = rte_eth_rx_burst(pid_of(u->nf), 0, dst, (uint16_t)room);
	if (n == 0)
		return 0;
	u->nf_rx += n;
	got = n;
	n = nf_rx_filter(u, dst, n, &bytes);
	u->nf_rx_bytes += bytes;
	if (n == 0)
		return got;
	u->enq_cnt += n;
	u->enq_bytes += bytes;
	if (unit_buffered_bytes(u) > u->hwm_bytes)
		u->hwm_bytes = unit_buffered_bytes(u);
	if (unit_buffered_pkts(u) > u->hwm_pkts)
		u->hwm_pkts = unit_buffered_pkts(u);
	unit_update_bp(u);
	*kept = n;
	return got;
}

/* Released packets have waited up to an epoch and their mbufs have left the
 * cache; the three lines the egress path touches (two of metadata, one of
 * data) are prefetched for a whole batch one iteration ahead of use. */
static inline void prefetch_mbuf(struct rte_mbuf *m)
{
	rte_prefetch0(m);
	rte_prefetch0(RTE_PTR_ADD(m, RTE_CACHE_LINE_SIZE));
	/* Where a direct mbuf of our pool keeps its data; computed rather than
	 * read from the cold header, which would stall on the very miss this
	 * hides. A wrong guess only wastes the prefetch. */
	rte_prefetch0(RTE_PTR_ADD(m, sizeof(struct rte_mbuf) + RTE_PKTMBUF_HEADROOM));
}

/* The wire RX allocates the next mbufs from the top of this lcore's mempool
 * cache, which is LIFO. While a release is sending, it frees at least as many
 * mbufs as ingress takes, so those were freed a moment ago and are hot. But a
 * release drains an epoch faster than ingress fills the next one: the mbufs it
 * frees beyond what ingress takes sink into the pool, and once it has caught
 * up nothing is freed, so ingress reuses them up to an epoch later, cold, and
 * the RX stalls on every write. In that phase only, the next burst's worth is
 * prefetched at the end of the poll, which hides the misses behind the rest of
 * the loop. */
static inline void prefetch_next_allocs(void)
{
	struct rte_mempool_cache *c = rte_mempool_default_cache(g.pool, rte_lcore_id());
	unsigned j, n;

	if (c == NULL)
		return;
	n = c->len < DP_BURST ? c->len : DP_BURST;
	for (j = 1; j <= n; j++)
		prefetch_mbuf(c->objs[c->len - j]);
}

/* Sends, from the held array in place, the released packets that an earlier
 * call prefetched, then prefetches the next ones. Prefetching one burst per
 * call keeps the prefetches spread over the loop; a larger backlog takes two,
 * so a release can outrun ingress and catch up after the process was
 * descheduled. */
static void release_tx(struct dp_unit *u, int *work)
{
	uint64_t todo = u->release_limit - u->deq_cnt, ready, end;
	int b;

	ready = u->pf_end > u->hb_head ? u->pf_end - u->hb_head : 0;
	if (ready > todo)
		ready = todo;
	for (b = 0; b < DP_RELEASE_BURSTS && ready; b++) {
		uint32_t pos = (uint32_t)u->hb_head & u->hb_mask;
		uint64_t n = ready < DP_BURST ? ready : DP_BURST, bytes;
		struct rte_mbuf **s = u->hb + pos;
		uint16_t sent;

		if (pos + n > (uint64_t)u->hb_mask + 1)
			n = u->hb_mask + 1 - pos;
		/* Lengths are read first: a vhost TX frees what it sent. */
		bytes = sum_len(s, (uint16_t)n);
		sent = rte_eth_tx_burst(pid_of(u->egress), 0, s, (uint16_t)n);
		if (sent < n)
			bytes -= sum_len(s + sent, (uint16_t)(n - sent));
		u->hb_head += sent;
		u->deq_cnt += sent;
		u->deq_bytes += bytes;
		u->tx += sent;
		u->tx_bytes += bytes;
		u->released_pkts += sent;
		u->released_bytes += bytes;
		ready -= sent;
		todo -= sent;
		*work = 1;
		if (sent < n)
			break;
	}
	if (u->pf_end < u->hb_head)
		u->pf_end = u->hb_head;
	end = u->hb_head + (todo < DP_CATCH_UP ? DP_BURST : 2 * DP_BURST);
	if (end > u->hb_head + todo)
		end = u->hb_head + todo;
	for (; u->pf_end < end; u->pf_end++)
		prefetch_mbuf(u->hb[u->pf_end & u->hb_mask]);
	if (todo)
		*work = 1;
	if (u->bp)
		unit_update_bp(u);
}

void unit_poll(struct dp_unit *u, uint64_t now, int *work)
{
	if (!u->paused)
		wire_to_nf(u, now, work);
	if (unlikely(u->paused || u->bp))
		wire_stash_fill(u, now, work);

	if (u->mode == MODE_PLAIN) {
		struct rte_mbuf *pkts[DP_BURST];
		uint16_t n, sent;
		uint64_t bytes;

		if (u->paused)
			return;
		if (u->to_egress.n) {
			struct rte_mbuf **s = u->to_egress.m + u->to_egress.off;

			bytes = sum_len(s, u->to_egress.n);
			sent = rte_eth_tx_burst(pid_of(u->egress), 0, s, u->to_egress.n);
			if (sent < u->to_egress.n)
				bytes -= sum_len(s + sent, (uint16_t)(u->to_egress.n - sent));
			u->to_egress.off += sent;
			u->to_egress.n -= sent;
			u->tx += sent;
			u->tx_bytes += bytes;
			if (sent)
				*work = 1;
			if (u->to_egress.n)
				return;
		}
		n = rte_eth_rx_burst(pid_of(u->nf), 0, pkts, DP_BURST);
		if (n == 0)
			return;
		*work = 1;
		u->nf_rx += n;
		n = nf_rx_filter(u, pkts, n, &bytes);
		u->nf_rx_bytes += bytes;
		if (n == 0)
			return;
		sent = rte_eth_tx_burst(pid_of(u->egress), 0, pkts, n);
		if (sent < n) {
			bytes -= sum_len(pkts + sent, (uint16_t)(n - sent));
			stash_put(&u->to_egress, pkts + sent, (uint16_t)(n - sent));
		}
		u->tx += sent;
		u->tx_bytes += bytes;
		return;
	}

	if (!u->paused) {
		uint16_t kept;

		if (nf_to_buffer(u, &kept))
			*work = 1;
	}
	if (u->release_limit != u->deq_cnt)
		release_tx(u, work);

	if (u->auto_interval_tsc) {
		if (now >= u->auto_next_close) {
			if (u->enq_cnt != u->open_start && u->closed_n < u->k) {
				uint64_t drained, e = unit_close_epoch(u, &drained);

				if (u->auto_ack_delay_tsc == 0)
					unit_release_upto(u, e);
				else
					u->closed[(u->closed_head + u->closed_n - 1) % DP_MAX_K]
						.release_at = now + u->auto_ack_delay_tsc;
			}
			u->auto_next_close += u->auto_interval_tsc;
			if (u->auto_next_close <= now)
				u->auto_next_close = now + u->auto_interval_tsc;
		}
		if (u->closed_n) {
			const struct dp_epoch *h = &u->closed[u->closed_head];

			if (h->release_at && now >= h->release_at)
				unit_release_upto(u, h->epoch);
			else if (h->release_at && (!g.next_timer || h->release_at < g.next_timer))
				g.next_timer = h->release_at;
		}
		if (!g.next_timer || u->auto_next_close < g.next_timer)
			g.next_timer = u->auto_next_close;
	}
	if (u->release_limit == u->deq_cnt)
		prefetch_next_allocs();
}

uint64_t unit_close_epoch(struct dp_unit *u, uint64_t *drained)
{
	uint64_t d = 0, e = u->cur_epoch;
	int i;

	/* A frozen NF cannot add to its egress, so a bounded drain empties it;
	 * the bound only matters for an NF that was not frozen. */
	for (i = 0; i < 1024; i++) {
		uint16_t kept;

		if (nf_to_buffer(u, &kept) == 0)
			break;
		d += kept;
	}
	u->closed[(u->closed_head + u->closed_n) % DP_MAX_K] = (struct dp_epoch){
		.epoch = e, .start_cnt = u->open_start, .end_cnt = u->enq_cnt, .release_at = 0};
	u->closed_n++;
	u->open_start = u->enq_cnt;
	u->cur_epoch = e + 1;
	u->epochs_closed++;
	unit_update_bp(u);
	*drained = d;
	return e;
}

void unit_release_upto(struct dp_unit *u, uint64_t epoch)
{
	while (u->closed_n && u->closed[u->closed_head].epoch <= epoch) {
		u->release_limit = u->closed[u->closed_head].end_cnt;
		u->last_released = u->closed[u->closed_head].epoch;
		u->closed_head = (u->closed_head + 1) % DP_MAX_K;
		u->closed_n--;
		u->epochs_released++;
	}
	unit_update_bp(u);
}

/* Frees the `n` held packets from offset `off` and returns their bytes. */
static uint64_t free_held(struct dp_unit *u, uint64_t off, uint64_t n)
{
	uint64_t bytes = 0, i;

	for (i = 0; i < n; i++) {
		struct rte_mbuf *m = *unit_held(u, off + i);

		bytes += m->pkt_len;
		rte_pktmbuf_free(m);
	}
	return bytes;
}

/* Off the fast path. Retiring frees, without sending, the closed epochs up to
 * `epoch`: the standby sent them. They are the oldest closed epochs, so their
 * packets follow the released ones still held (`pending`). The pending ones
 * move up over the freed ones, so the array stays one run from the head.
 * They count as dequeued and the release limit moves past them, so what the
 * loop still has to send (release_limit - deq_cnt) is unchanged and every
 * later boundary stays valid. Returns -1, with nothing changed, when the
 * array does not hold what the counts say it does. */
int unit_retire_upto(struct dp_unit *u, uint64_t epoch, uint64_t *epochs, uint64_t *pkts,
		     uint64_t *bytes)
{
	uint64_t pending = u->release_limit - u->deq_cnt, end, n, b, i;
	uint32_t k = 0;

	while (k < u->closed_n && u->closed[(u->closed_head + k) % DP_MAX_K].epoch <= epoch)
		k++;
	*epochs = *pkts = *bytes = 0;
	if (k == 0)
		return 0;
	end = u->closed[(u->closed_head + k - 1) % DP_MAX_K].end_cnt;
	n = end - u->release_limit;
	if (unit_buffered_pkts(u) < pending + n)
		return -1; /* the bookkeeping disagrees with the array; change nothing */
	b = free_held(u, pending, n);
	for (i = pending; i > 0; i--)
		*unit_held(u, n + i - 1) = *unit_held(u, i - 1);
	u->hb_head += n;
	u->pf_end = u->hb_head; /* what was prefetched has moved */
	u->deq_cnt += n;
	u->deq_bytes += b;
	u->release_limit = end;
	u->last_released = u->closed[(u->closed_head + k - 1) % DP_MAX_K].epoch;
	u->closed_head = (u->closed_head + k) % DP_MAX_K;
	u->closed_n -= k;
	u->retired_pkts += n;
	u->retired_bytes += b;
	u->epochs_retired += k;
	unit_update_bp(u);
	*epochs = k;
	*pkts = n;
	*bytes = b;
	return 0;
}

/* Off the fast path: drops the held packets of epochs >= from, the array's
 * tail. */
uint64_t unit_discard_from(struct dp_unit *u, uint64_t from, enum dp_drop reason)
{
	uint64_t keep_cnt = u->release_limit, total, keep, bytes = 0;

	while (u->closed_n) {
		struct dp_epoch *last = &u->closed[(u->closed_head + u->closed_n - 1) % DP_MAX_K];

		if (last->epoch < from)
			break;
		u->closed_n--;
		u->epochs_discarded++;
	}
	if (u->closed_n) {
		uint64_t end = u->closed[(u->closed_head + u->closed_n - 1) % DP_MAX_K].end_cnt;

		if (end > keep_cnt)
			keep_cnt = end;
	}
	if (from > u->cur_epoch)
		keep_cnt = u->enq_cnt;
	/* Released packets are never discarded. */
	total = u->enq_cnt - u->deq_cnt;
	keep = keep_cnt - u->deq_cnt;
	if (total != keep) {
		bytes = free_held(u, keep, total - keep);
		u->enq_cnt = keep_cnt;
		u->enq_bytes -= bytes;
		u->discarded_pkts += total - keep;
		u->discarded_bytes += bytes;
		u->drops[reason] += total - keep;
	}
	if (from <= u->cur_epoch)
		u->cur_epoch = from;
	u->open_start = u->enq_cnt;
	unit_update_bp(u);
	return total - keep;
}

void unit_free_all(struct dp_unit *u, enum dp_drop reason)
{
	u->release_limit = u->deq_cnt;
	u->closed_n = 0;
	if (u->hb) {
		uint64_t n = unit_buffered_pkts(u), bytes = free_held(u, 0, n);

		u->hb_head += n;
		u->pf_end = u->hb_head;
		u->deq_cnt = u->enq_cnt;
		u->deq_bytes = u->enq_bytes;
		u->discarded_pkts += n;
		u->discarded_bytes += bytes;
		u->drops[reason] += n;
	}
	if (u->to_nf.n) {
		rte_pktmbuf_free_bulk(u->to_nf.m + u->to_nf.off, u->to_nf.n);
		u->drops[reason] += u->to_nf.n;
		u->to_nf.n = 0;
	}
	while (u->ws_n) {
		rte_pktmbuf_free(u->ws[u->ws_head++ & (DP_WIRE_STASH - 1)]);
		u->ws_n--;
		u->drops[reason]++;
	}
	if (u->to_egress.n) {
		rte_pktmbuf_free_bulk(u->to_egress.m + u->to_egress.off, u->to_egress.n);
		u->drops[reason] += u->to_egress.n;
		u->to_egress.n = 0;
	}
}

/* Ports outside any unit are drained so their queues never fill; only probes
 * and, on ports with input logs, mirror frames and the frames a shadow log
 * takes are consumed; the rest is counted and freed. */
void unowned_ports_poll(uint64_t now, int *work)
{
	struct rte_mbuf *pkts[DP_BURST];
	int i;

	for (i = 0; i < DP_MAX_PORTS; i++) {
		struct dp_port *p = &g.ports[i];
		uint16_t n;

		if (!p->used || p->owner >= 0 || p->nf_of >= 0)
			continue;
		n = rte_eth_rx_burst(p->port_id, 0, pkts, DP_BURST);
		if (n == 0)
			continue;
		/* Probes alone do not count as work: they must not keep an idle
		 * data plane from sleeping. */
		if (p->rx_filters)
			n = rx_filter(p, pkts, n, now, work);
		if (n && p->n_shadows)
			n = inputlog_shadow_filter(p, pkts, n, work);
		if (n == 0)
			continue;
		*work = 1;
		p->unowned_drops += n;
		rte_pktmbuf_free_bulk(pkts, n);
	}
}
