/* dpdk-vhost-gen: traffic generator and sink in one lcore loop.
 *
 * Sends UDP/IPv4 frames carrying a sequence number and the TSC at transmission
 * on one port, receives them back on another, and prints one JSON object:
 * rates over the measurement window, losses, reordering and a latency
 * histogram. Generator and sink share the loop so they never preempt each
 * other on a shared CPU.
 */
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <rte_byteorder.h>
#include <rte_cycles.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_ether.h>
#include <rte_ip.h>
#include <rte_mbuf.h>
#include <rte_udp.h>

#define BURST 32
#define HIST_US 100000
#define PAYLOAD_OFF (sizeof(struct rte_ether_hdr) + sizeof(struct rte_ipv4_hdr) + \
		     sizeof(struct rte_udp_hdr))

static volatile int stop;
static uint64_t hist[HIST_US + 1];

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static int port_up(const char *dev, struct rte_mempool *pool, uint16_t *pid)
{
	struct rte_eth_conf conf;
	int ret;

	if (rte_eth_dev_get_port_by_name(dev, pid) != 0) {
		fprintf(stderr, "gen: no port %s (pass it with --vdev)\n", dev);
		return -1;
	}
	memset(&conf, 0, sizeof(conf));
	ret = rte_eth_dev_configure(*pid, 1, 1, &conf);
	if (ret == 0)
		ret = rte_eth_rx_queue_setup(*pid, 0, 1024, rte_eth_dev_socket_id(*pid), NULL, pool);
	if (ret == 0)
		ret = rte_eth_tx_queue_setup(*pid, 0, 1024, rte_eth_dev_socket_id(*pid), NULL);
	if (ret == 0)
		ret = rte_eth_dev_start(*pid);
	if (ret != 0) {
		fprintf(stderr, "gen: cannot start %s: %s\n", dev, rte_strerror(-ret));
		return -1;
	}
	return 0;
}

static void build_template(uint8_t *t, uint16_t len)
{
	struct rte_ether_hdr *eth = (struct rte_ether_hdr *)t;
	struct rte_ipv4_hdr *ip = (struct rte_ipv4_hdr *)(eth + 1);
	struct rte_udp_hdr *udp = (struct rte_udp_hdr *)(ip + 1);
	static const uint8_t dst[6] = {2, 0, 0, 0, 0, 2}, src[6] = {2, 0, 0, 0, 0, 1};

	memset(t, 0, len);
	memcpy(&eth->dst_addr, dst, 6);
	memcpy(&eth->src_addr, src, 6);
	eth->ether_type = rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV4);
	ip->version_ihl = RTE_IPV4_VHL_DEF;
	ip->time_to_live = 64;
	ip->next_proto_id = IPPROTO_UDP;
	ip->total_length = rte_cpu_to_be_16((uint16_t)(len - sizeof(*eth)));
	/* RFC 2544 benchmarking addresses, 198.18.0.1 -> 198.19.0.1 */
	ip->src_addr = rte_cpu_to_be_32(0xC6120001);
	ip->dst_addr = rte_cpu_to_be_32(0xC6130001);
	ip->hdr_checksum = rte_ipv4_cksum(ip);
	udp->src_port = rte_cpu_to_be_16(1024);
	udp->dst_port = rte_cpu_to_be_16(1025);
	udp->dgram_len = rte_cpu_to_be_16((uint16_t)(len - sizeof(*eth) - sizeof(*ip)));
}

static uint64_t percentile(uint64_t total, double q)
{
	uint64_t want = (uint64_t)((double)total * q), acc = 0;
	uint64_t i;

	if (total == 0)
		return 0;
	if (want >= total)
		want = total - 1;
	for (i = 0; i <= HIST_US; i++) {
		acc += hist[i];
		if (acc > want)
			return i;
	}
	return HIST_US;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"seconds", required_argument, NULL, 's'},
		{"warmup-ms", required_argument, NULL, 'w'},
		{"drain-ms", required_argument, NULL, 'd'},
		{"rate-pps", required_argument, NULL, 'r'},
		{"pkt-size", required_argument, NULL, 'p'},
		{"tx-dev", required_argument, NULL, 't'},
		{"rx-dev", required_argument, NULL, 'x'},
		{NULL, 0, NULL, 0},
	};
	double seconds = 2.0;
	uint64_t warmup_ms = 300, drain_ms = 200, rate = 0;
	uint16_t pkt = 60, txp, rxp, stash_n = 0;
	const char *txdev = "net_virtio_user0", *rxdev = "net_virtio_user1";
	struct rte_mbuf *stash[BURST], *rx[BURST];
	uint8_t tmpl[2048];
	struct rte_mempool *pool;
	uint64_t hz, start, warm_end, end, fin, now, us_mult;
	uint64_t seq = 0, tx = 0, tx_win = 0, rx_all = 0, rx_win = 0, expect = 1;
	uint64_t gaps = 0, reorder = 0, foreign = 0, lat_n = 0, lat_sum = 0, lat_max = 0;
	uint64_t first_win_tx = 0, last_rx = 0;
	int ret, opt;

	ret = rte_eal_init(argc, argv);
	if (ret < 0) {
		fprintf(stderr, "gen: EAL init failed: %s\n", rte_strerror(rte_errno));
		return 1;
	}
	argc -= ret;
	argv += ret;
	optind = 1;
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (opt) {
		case 's':
			seconds = atof(optarg);
			break;
		case 'w':
			warmup_ms = strtoull(optarg, NULL, 10);
			break;
		case 'd':
			drain_ms = strtoull(optarg, NULL, 10);
			break;
		case 'r':
			rate = strtoull(optarg, NULL, 10);
			break;
		case 'p':
			pkt = (uint16_t)atoi(optarg);
			break;
		case 't':
			txdev = optarg;
			break;
		case 'x':
			rxdev = optarg;
			break;
		default:
			fprintf(stderr, "usage: dpdk-vhost-gen [EAL] -- --seconds S [--warmup-ms N]"
					" [--drain-ms N] [--rate-pps N] [--pkt-size N]"
					" [--tx-dev NAME] [--rx-dev NAME]\n");
			return 2;
		}
	}
	if (pkt < PAYLOAD_OFF + 16 || pkt > 1500) {
		fprintf(stderr, "gen: --pkt-size must be %zu..1500\n", PAYLOAD_OFF + 16);
		return 2;
	}
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	pool = rte_pktmbuf_pool_create("gen_pool", 16383, 256, 0, RTE_MBUF_DEFAULT_BUF_SIZE,
				       (int)rte_socket_id());
	if (pool == NULL || port_up(txdev, pool, &txp) < 0 ||
	    (strcmp(txdev, rxdev) != 0 && port_up(rxdev, pool, &rxp) < 0)) {
		rte_eal_cleanup();
		return 1;
	}
	if (strcmp(txdev, rxdev) == 0)
		rxp = txp;
	build_template(tmpl, pkt);

	hz = rte_get_tsc_hz();
	us_mult = (1000000ull << 32) / hz;
	start = rte_rdtsc();
	warm_end = start + warmup_ms * hz / 1000;
	end = warm_end + (uint64_t)(seconds * (double)hz);
	fin = end + drain_ms * hz / 1000;

	/* The drain ends after drain-ms without a packet (at most 20 drain-ms):
	 * what a descheduled data plane still holds is late, not lost. */
	for (now = start; !stop; now = rte_rdtsc()) {
		if (now >= end && (now - RTE_MAX(end, last_rx) > fin - end ||
				   now - end > 20 * (fin - end)))
			break;
		uint16_t n, i;
		int rounds;

		if (now < end) {
			uint16_t want = BURST;

			if (rate) {
				uint64_t due = (now - start) * rate / hz;

				want = due > seq ? (uint16_t)RTE_MIN(due - seq, (uint64_t)BURST) : 0;
				if (stash_n && want < stash_n)
					want = stash_n;
			}
			if (stash_n < want && rte_pktmbuf_alloc_bulk(pool, stash + stash_n,
								     want - stash_n) == 0) {
				for (i = stash_n; i < want; i++) {
					struct rte_mbuf *m = stash[i];
					uint8_t *d = rte_pktmbuf_mtod(m, uint8_t *);
					uint64_t s = ++seq;

					rte_memcpy(d, tmpl, pkt);
					memcpy(d + PAYLOAD_OFF, &s, 8);
					m->data_len = m->pkt_len = pkt;
				}
				stash_n = want;
			}
			if (stash_n) {
				for (i = 0; i < stash_n; i++)
					memcpy(rte_pktmbuf_mtod(stash[i], uint8_t *) + PAYLOAD_OFF + 8,
					       &now, 8);
				n = rte_eth_tx_burst(txp, 0, stash, stash_n);
				tx += n;
				if (now >= warm_end) {
					if (!first_win_tx)
						first_win_tx = tx - n + 1;
					tx_win += n;
				}
				if (n < stash_n)
					memmove(stash, stash + n, (stash_n - n) * sizeof(stash[0]));
				stash_n = (uint16_t)(stash_n - n);
			}
		}
		/* The sink drains harder than the generator fills, so it is never
		 * what limits the measured rate. */
		for (rounds = 0; rounds < 4; rounds++) {
		n = rte_eth_rx_burst(rxp, 0, rx, BURST);
		if (n == 0)
			break;
		now = rte_rdtsc();
		last_rx = now;
		for (i = 0; i < n; i++) {
			const uint8_t *d = rte_pktmbuf_mtod(rx[i], const uint8_t *);
			uint64_t s, t, lat;

			if (rx[i]->data_len < PAYLOAD_OFF + 16 ||
			    ((const struct rte_ether_hdr *)d)->ether_type !=
				    rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV4)) {
				foreign++;
				continue;
			}
			memcpy(&s, d + PAYLOAD_OFF, 8);
			memcpy(&t, d + PAYLOAD_OFF + 8, 8);
			rx_all++;
			if (s == expect) {
				expect++;
			} else if (s > expect) {
				gaps += s - expect;
				expect = s + 1;
			} else {
				reorder++;
			}
			/* Only packets sent inside the window count, so warm-up and
			 * drain do not skew rates or latency. */
			if (t < warm_end || t >= end)
				continue;
			rx_win++;
			lat = ((now - t) * us_mult) >> 32;
			lat_sum += lat;
			if (lat > lat_max)
				lat_max = lat;
			hist[lat < HIST_US ? lat : HIST_US]++;
			lat_n++;
		}
		rte_pktmbuf_free_bulk(rx, n);
		if (n < BURST)
			break;
		}
	}
	if (stash_n)
		rte_pktmbuf_free_bulk(stash, stash_n);

	{
		double win = (double)(end - warm_end) / (double)hz;

		printf("{\"pkt_size\": %u, \"window_s\": %.3f, \"tx\": %" PRIu64 ", \"rx\": %" PRIu64
		       ", \"tx_mpps\": %.4f, \"rx_mpps\": %.4f, \"lost\": %" PRIu64
		       ", \"gaps\": %" PRIu64 ", \"reordered\": %" PRIu64 ", \"foreign\": %" PRIu64
		       ", \"lat_samples\": %" PRIu64 ", \"lat_us\": {\"mean\": %.1f, \"p50\": %" PRIu64
		       ", \"p90\": %" PRIu64 ", \"p99\": %" PRIu64 ", \"p999\": %" PRIu64
		       ", \"max\": %" PRIu64 "}}\n",
		       pkt + 4, win, tx, rx_all, (double)tx_win / win / 1e6,
		       (double)rx_win / win / 1e6, tx - rx_all, gaps, reorder, foreign, lat_n,
		       lat_n ? (double)lat_sum / (double)lat_n : 0.0, percentile(lat_n, 0.5),
		       percentile(lat_n, 0.9), percentile(lat_n, 0.99), percentile(lat_n, 0.999),
		       lat_max);
	}
	(void)first_win_tx;
	rte_eth_dev_stop(txp);
	if (rxp != txp)
		rte_eth_dev_stop(rxp);
	rte_eth_dev_close(txp);
	if (rxp != txp)
		rte_eth_dev_close(rxp);
	rte_eal_cleanup();
	return 0;
}
