/* Counters are plain fields bumped on the fast path; this file only formats
 * them for the `stats` reply, off the fast path. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <rte_ethdev.h>
#include <rte_mempool.h>

#include "dp.h"

static const char *const drop_names[DROP__COUNT] = {
	[DROP_RING_FULL] = "ring_full",   [DROP_NO_MBUF] = "no_mbuf",
	[DROP_STALE_TERM] = "stale_term", [DROP_DISCARD] = "discard",
	[DROP_TX_FAIL] = "tx_fail",       [DROP_MIRROR_FAIL] = "mirror_fail",
	[DROP_REMOVED] = "removed",       [DROP_RESERVED_TYPE] = "reserved_type",
};

static const char *const kind_names[] = {
	[PORT_VHOST] = "vhost",
	[PORT_AF_PACKET] = "af_packet",
	[PORT_TAP] = "tap",
	[PORT_LOOPBACK] = "loopback",
};

const char *drop_name(enum dp_drop d)
{
	return drop_names[d];
}

void sb_printf(struct sbuf *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (b->overflow)
		return;
	va_start(ap, fmt);
	n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= b->cap - b->len) {
		b->overflow = 1;
		return;
	}
	b->len += (size_t)n;
}

#define U64(x) ((unsigned long)(x))

static void port_stats(struct sbuf *b, const struct dp_port *p)
{
	struct rte_eth_stats st;
	struct rte_eth_link link;

	memset(&st, 0, sizeof(st));
	memset(&link, 0, sizeof(link));
	rte_eth_stats_get(p->port_id, &st);
	rte_eth_link_get_nowait(p->port_id, &link);
	sb_printf(b,
		  " port.%s.type=%s port.%s.port_id=%u port.%s.link=%u port.%s.rx=%lu"
		  " port.%s.tx=%lu port.%s.rx_bytes=%lu port.%s.tx_bytes=%lu"
		  " port.%s.rx_missed=%lu port.%s.rx_nombuf=%lu port.%s.tx_errors=%lu"
		  " port.%s.probe_rx=%lu port.%s.probe_tx=%lu port.%s.probe_bad=%lu"
		  " port.%s.unowned_drops=%lu port.%s.xmit_pkts=%lu port.%s.xmit_bytes=%lu"
		  " port.%s.mirror_rx=%lu port.%s.mirror_unknown=%lu port.%s.mirror_bad=%lu"
		  " port.%s.shadow_rx=%lu",
		  p->name, kind_names[p->kind], p->name, p->port_id, p->name,
		  link.link_status, p->name, U64(st.ipackets), p->name, U64(st.opackets), p->name,
		  U64(st.ibytes), p->name, U64(st.obytes), p->name, U64(st.imissed), p->name,
		  U64(st.rx_nombuf), p->name, U64(st.oerrors), p->name, U64(p->probe_rx), p->name,
		  U64(p->probe_tx), p->name, U64(p->probe_bad), p->name, U64(p->unowned_drops), p->name,
		  U64(p->xmit_pkts), p->name, U64(p->xmit_bytes), p->name, U64(p->mirror_rx),
		  p->name, U64(p->mirror_unknown), p->name, U64(p->mirror_bad), p->name,
		  U64(p->shadow_rx));
}

static void unit_stats(struct sbuf *b, const struct dp_unit *u)
{
	const char *n = u->name;
	char bp[32];
	int d, w;

	sb_printf(b, " unit.%s.mode=%s unit.%s.tag=%u unit.%s.wire=", n,
		  u->mode == MODE_HA ? "ha" : "plain", n, u->tag, n);
	for (w = 0; w < u->n_wire; w++)
		sb_printf(b, "%s%s", w ? "," : "", g.ports[u->wire[w]].name);
	sb_printf(b, " unit.%s.nf=%s unit.%s.egress=%s unit.%s.mirror=%s unit.%s.mirror_tag=%u", n,
		  g.ports[u->nf].name, n, g.ports[u->egress].name, n,
		  u->mirror >= 0 ? g.ports[u->mirror].name : "-", n, u->mirror_tag);
	bp[0] = '\0';
	if (u->bp & BP_K)
		strcat(bp, ",k");
	if (u->bp & BP_BYTES)
		strcat(bp, ",bytes");
	if (u->bp & BP_RING)
		strcat(bp, ",ring");
	sb_printf(b,
		  " unit.%s.paused=%d unit.%s.bp=%s unit.%s.term=%lu unit.%s.epoch=%lu"
		  " unit.%s.k=%u unit.%s.budget_bytes=%lu unit.%s.ring_size=%u"
		  " unit.%s.epochs_in_flight=%u",
		  n, u->paused, n, u->bp ? bp + 1 : "none", n,
		  U64(u->term), n, U64(u->cur_epoch), n, u->k, n, U64(u->budget_bytes), n,
		  u->ring_size, n, u->closed_n);
	sb_printf(b,
		  " unit.%s.rx=%lu unit.%s.in_seq=%lu unit.%s.nf_rx=%lu unit.%s.nf_rx_bytes=%lu"
		  " unit.%s.tx=%lu unit.%s.tx_bytes=%lu unit.%s.buffered_pkts=%lu"
		  " unit.%s.buffered_bytes=%lu unit.%s.releasable_pkts=%lu"
		  " unit.%s.released_pkts=%lu unit.%s.released_bytes=%lu"
		  " unit.%s.discarded_pkts=%lu unit.%s.discarded_bytes=%lu"
		  " unit.%s.epochs_closed=%lu unit.%s.epochs_released=%lu"
		  " unit.%s.epochs_discarded=%lu unit.%s.bp_k=%lu unit.%s.bp_bytes=%lu"
		  " unit.%s.bp_ring=%lu unit.%s.nf_stalls=%lu unit.%s.refused_stale=%lu"
		  " unit.%s.hwm_bytes=%lu unit.%s.hwm_pkts=%lu unit.%s.mirror_pkts=%lu"
		  " unit.%s.stash_to_nf=%u unit.%s.stash_to_egress=%u"
		  " unit.%s.retired_pkts=%lu unit.%s.retired_bytes=%lu unit.%s.epochs_retired=%lu"
		  " unit.%s.replayed_pkts=%lu unit.%s.stash_wire=%u unit.%s.stash_wire_pkts=%lu"
		  " unit.%s.stash_wire_full=%lu",
		  n, U64(u->rx_wire), n, U64(u->in_seq), n, U64(u->nf_rx), n, U64(u->nf_rx_bytes),
		  n, U64(u->tx), n, U64(u->tx_bytes), n, U64(unit_buffered_pkts(u)), n,
		  U64(unit_buffered_bytes(u)), n, U64(u->release_limit - u->deq_cnt), n,
		  U64(u->released_pkts), n, U64(u->released_bytes), n, U64(u->discarded_pkts), n,
		  U64(u->discarded_bytes), n, U64(u->epochs_closed), n, U64(u->epochs_released), n,
		  U64(u->epochs_discarded), n, U64(u->bp_k), n, U64(u->bp_bytes), n,
		  U64(u->bp_ring), n, U64(u->nf_stalls), n, U64(u->refused_stale), n,
		  U64(u->hwm_bytes), n, U64(u->hwm_pkts), n, U64(u->mirror_pkts), n, u->to_nf.n,
		  n, u->to_egress.n, n, U64(u->retired_pkts), n, U64(u->retired_bytes), n,
		  U64(u->epochs_retired), n, U64(u->replayed_pkts), n, u->ws_n, n, U64(u->ws_pkts),
		  n, U64(u->ws_full));
	for (d = 0; d < DROP__COUNT; d++)
		sb_printf(b, " unit.%s.drop_%s=%lu", n, drop_names[d], U64(u->drops[d]));
}

static void probe_stats(struct sbuf *b, const struct dp_probe *pr)
{
	static const char *const states[] = {"init", "up", "down"};
	const char *n = pr->peer;

	sb_printf(b,
		  " probe.%s.port=%s probe.%s.state=%s probe.%s.interval_us=%lu probe.%s.miss=%u"
		  " probe.%s.rx=%lu probe.%s.tx=%lu probe.%s.tx_fail=%lu probe.%s.downs=%lu"
		  " probe.%s.ups=%lu",
		  n, g.ports[pr->port].name, n, states[pr->state], n, U64(pr->interval_us), n,
		  pr->miss, n, U64(pr->rx), n, U64(pr->tx), n, U64(pr->tx_fail), n, U64(pr->downs),
		  n, U64(pr->ups));
}

static void log_stats(struct sbuf *b, const struct dp_log *lg)
{
	const char *n = lg->name;
	uint64_t first = lg->n ? lg->ent[lg->head].seq : 0;
	uint64_t last = lg->n ? lg->ent[(lg->head + lg->n - 1) % lg->cap].seq : 0;

	sb_printf(b,
		  " log.%s.port=%s log.%s.tag=%u log.%s.capacity=%u log.%s.max_bytes=%lu"
		  " log.%s.frames=%u log.%s.bytes=%lu log.%s.first_seq=%lu log.%s.last_seq=%lu"
		  " log.%s.high_seq=%lu log.%s.received=%lu log.%s.gaps=%lu log.%s.gap_seq=%lu"
		  " log.%s.duplicates=%lu log.%s.too_big=%lu log.%s.overflow=%lu"
		  " log.%s.overflow_seq=%lu log.%s.trimmed=%lu log.%s.trim_seq=%lu"
		  " log.%s.replayed=%lu",
		  n, g.ports[lg->port].name, n, lg->tag, n, lg->cap, n, U64(lg->arena_size), n,
		  lg->n, n, U64(lg->bytes), n, U64(first), n, U64(last), n, U64(lg->last), n,
		  U64(lg->received), n, U64(lg->gaps), n, U64(lg->gap_seq), n, U64(lg->duplicates),
		  n, U64(lg->too_big), n, U64(lg->overflow), n, U64(lg->overflow_seq), n,
		  U64(lg->trimmed), n, U64(lg->trim_seq), n, U64(lg->replayed));
	if (lg->shadow != NULL)
		sb_printf(b,
			  " log.%s.shadow_frames=%u log.%s.shadow_bytes=%lu log.%s.shadow_received=%lu"
			  " log.%s.shadow_matched=%lu log.%s.shadow_unmatched=%lu"
			  " log.%s.shadow_overflow=%lu log.%s.shadow_replayed=%lu"
			  " log.%s.shadow_evicted=%lu",
			  n, lg->shadow->n, n, U64(lg->shadow->bytes), n, U64(lg->shadow->received),
			  n, U64(lg->shadow_matched), n, U64(lg->shadow_unmatched), n,
			  U64(lg->shadow->overflow), n, U64(lg->shadow->replayed), n,
			  U64(lg->shadow_evicted));
}

void stats_format(struct sbuf *b, const char *only_unit)
{
	int i;

	sb_printf(b,
		  "name=%s loops=%lu sleeps=%lu ctl_polls=%lu ctl_requests=%lu ctl_errors=%lu"
		  " events_sent=%lu events_dropped=%lu mbuf_avail=%u mbuf_in_use=%u"
		  " mono_us=%lu busy_loops=%lu busy_cycles=%lu tsc_hz=%lu",
		  g.name, U64(g.loops), U64(g.sleeps), U64(g.ctl_polls), U64(g.ctl_requests),
		  U64(g.ctl_errors), U64(g.events_sent), U64(g.events_dropped),
		  rte_mempool_avail_count(g.pool), rte_mempool_in_use_count(g.pool),
		  U64(dp_tsc_to_mono_us(rte_rdtsc())), U64(g.busy_loops), U64(g.busy_cycles),
		  U64(g.hz));
	for (i = 0; i < DP_MAX_PORTS; i++)
		if (g.ports[i].used && only_unit == NULL)
			port_stats(b, &g.ports[i]);
	for (i = 0; i < DP_MAX_UNITS; i++)
		if (g.units[i].used &&
		    (only_unit == NULL || strcmp(only_unit, g.units[i].name) == 0))
			unit_stats(b, &g.units[i]);
	for (i = 0; i < DP_MAX_PROBES; i++)
		if (g.probes[i].used && only_unit == NULL)
			probe_stats(b, &g.probes[i]);
	for (i = 0; i < DP_MAX_LOGS; i++)
		if (g.logs[i].used && only_unit == NULL)
			log_stats(b, &g.logs[i]);
}
