/* BFD-like liveness probes between data planes.
 *
 * Each probe sends a small frame every interval and expects one from its peer;
 * `miss` silent intervals make the peer down. The check runs every loop
 * iteration and the idle sleep is capped at half the smallest interval, so the
 * event leaves within one interval of the miss run.
 */
#include <string.h>

#include <rte_byteorder.h>
#include <rte_ether.h>
#include <rte_ethdev.h>

#include "dp.h"

#define PROBE_MAGIC 0x48415052u /* "HAPR" */

/* Follows the Ethernet header; copied in and out because it sits at an odd
 * offset. */
struct probe_payload {
	rte_be32_t magic;
	rte_be16_t version;
	rte_be16_t interval_us_div8;
	rte_be64_t seq;
	rte_be64_t term;
	char sender[DP_NAME_LEN];
};

#define PROBE_LEN (sizeof(struct rte_ether_hdr) + sizeof(struct probe_payload))

int probe_find(const char *peer)
{
	int i;

	for (i = 0; i < DP_MAX_PROBES; i++)
		if (g.probes[i].used && strcmp(g.probes[i].peer, peer) == 0)
			return i;
	return -1;
}

uint64_t probes_min_interval_us(void)
{
	uint64_t m = 0;
	int i;

	for (i = 0; i < DP_MAX_PROBES; i++)
		if (g.probes[i].used && (m == 0 || g.probes[i].interval_us < m))
			m = g.probes[i].interval_us;
	return m;
}

static void probe_send(struct dp_probe *pr)
{
	struct dp_port *p = &g.ports[pr->port];
	struct rte_mbuf *m = rte_pktmbuf_alloc(g.pool);
	struct rte_ether_hdr *eth;
	struct probe_payload f;

	if (m == NULL) {
		pr->tx_fail++;
		return;
	}
	eth = (struct rte_ether_hdr *)rte_pktmbuf_append(m, PROBE_LEN);
	if (eth == NULL) {
		rte_pktmbuf_free(m);
		pr->tx_fail++;
		return;
	}
	memset(&f, 0, sizeof(f));
	memset(&eth->dst_addr, 0xff, sizeof(eth->dst_addr));
	rte_eth_macaddr_get(p->port_id, &eth->src_addr);
	eth->ether_type = rte_cpu_to_be_16(DP_ETHERTYPE_PROBE);
	f.magic = rte_cpu_to_be_32(PROBE_MAGIC);
	f.version = rte_cpu_to_be_16(1);
	f.interval_us_div8 = rte_cpu_to_be_16((uint16_t)(pr->interval_us / 8));
	f.seq = rte_cpu_to_be_64(++pr->tx_seq);
	f.term = rte_cpu_to_be_64(pr->term);
	memcpy(f.sender, g.name, sizeof(f.sender));
	memcpy(eth + 1, &f, sizeof(f));
	if (rte_eth_tx_burst(p->port_id, 0, &m, 1) == 1) {
		pr->tx++;
		p->probe_tx++;
	} else {
		rte_pktmbuf_free(m);
		pr->tx_fail++;
	}
}

void probe_receive(struct dp_port *p, struct rte_mbuf *m, uint64_t now)
{
	const struct rte_ether_hdr *eth = rte_pktmbuf_mtod(m, const struct rte_ether_hdr *);
	struct probe_payload pl, *f = &pl;
	char sender[DP_NAME_LEN];
	int i;

	if (m->data_len < PROBE_LEN) {
		p->probe_bad++;
		rte_pktmbuf_free(m);
		return;
	}
	memcpy(&pl, eth + 1, sizeof(pl));
	if (pl.magic != rte_cpu_to_be_32(PROBE_MAGIC)) {
		p->probe_bad++;
		rte_pktmbuf_free(m);
		return;
	}
	memcpy(sender, f->sender, sizeof(sender));
	sender[DP_NAME_LEN - 1] = '\0';
	p->probe_rx++;
	for (i = 0; i < DP_MAX_PROBES; i++) {
		struct dp_probe *pr = &g.probes[i];

		if (!pr->used || &g.ports[pr->port] != p || strcmp(pr->peer, sender) != 0)
			continue;
		pr->rx++;
		pr->rx_seq = rte_be_to_cpu_64(f->seq);
		pr->last_rx = now;
		if (pr->state != 1) {
			pr->state = 1;
			pr->ups++;
			ctl_event("peer_up peer=%s port=%s seq=%lu term=%lu mono_us=%lu", pr->peer,
				  p->name, (unsigned long)pr->rx_seq,
				  (unsigned long)rte_be_to_cpu_64(f->term),
				  (unsigned long)dp_tsc_to_mono_us(now));
		}
	}
	rte_pktmbuf_free(m);
}

/* Deadlines are checked before any probe is sent: an af_packet send is a
 * syscall that can take milliseconds (it runs the receiving side's stack in
 * this thread), and it must not push a detection past its deadline. */
void probes_tick(uint64_t now)
{
	int i;

	for (i = 0; i < DP_MAX_PROBES; i++) {
		struct dp_probe *pr = &g.probes[i];

		if (!pr->used || pr->state == 2 || now - pr->last_rx < pr->miss * pr->interval_tsc)
			continue;
		pr->state = 2;
		pr->downs++;
		ctl_event("peer_down peer=%s port=%s last_rx_mono_us=%lu mono_us=%lu "
			  "silent_us=%lu last_seq=%lu",
			  pr->peer, g.ports[pr->port].name,
			  (unsigned long)dp_tsc_to_mono_us(pr->last_rx),
			  (unsigned long)dp_tsc_to_mono_us(now),
			  (unsigned long)((now - pr->last_rx) * 1000000ull / g.hz),
			  (unsigned long)pr->rx_seq);
	}
	for (i = 0; i < DP_MAX_PROBES; i++) {
		struct dp_probe *pr = &g.probes[i];

		if (!pr->used)
			continue;
		if (now >= pr->next_tx) {
			probe_send(pr);
			pr->next_tx += pr->interval_tsc;
			if (pr->next_tx <= now)
				pr->next_tx = now + pr->interval_tsc;
		}
		if (!g.next_timer || pr->next_tx < g.next_timer)
			g.next_timer = pr->next_tx;
		/* Waking at the miss deadline itself keeps detection within a few
		 * microseconds of N intervals instead of half an interval late. */
		if (pr->state != 2) {
			uint64_t dl = pr->last_rx + pr->miss * pr->interval_tsc;

			if (dl < g.next_timer)
				g.next_timer = dl;
		}
	}
}
