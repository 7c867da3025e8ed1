/* hamgr data plane: EAL set-up and the single-lcore loop. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/prctl.h>

#include <rte_common.h>
#include <rte_cycles.h>
#include <rte_eal.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>

#include <rte_errno.h>

#include "dp.h"

#define CTL_POLL_EVERY 64
#define IDLE_POLLS_BEFORE_SLEEP 256
#define BUSY_CAP_US 50

struct dp_global g;

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Anchored at the present rather than at start-up: the TSC rate EAL reports
 * in a VM is an estimate, and its error would grow with uptime. */
uint64_t dp_tsc_to_mono_us(uint64_t tsc)
{
	uint64_t now_tsc = rte_rdtsc(), now_ns = mono_ns();
	double back = (double)(int64_t)(now_tsc - tsc) * 1e9 / (double)g.hz;

	return (uint64_t)(((double)now_ns - back) / 1000.0);
}

uint64_t dp_us_to_tsc(uint64_t us)
{
	return us * g.hz / 1000000ull;
}

static void on_signal(int sig)
{
	(void)sig;
	g.quit = 1;
}

static void usage(const char *prog)
{
	fprintf(stderr,
		"usage: %s [EAL args] -- --ctl PATH [--name HOST] [--idle-sleep-max-us N]"
		" [--mbufs N] [--mempool-ops stack|ring_mp_mc]\n",
		prog);
}

/* Sleeping when idle keeps an idle data plane under a few percent of a CPU;
 * the sleep grows geometrically so a burst arriving after a pause waits at
 * most one short sleep, and never past half a probe interval or a timer. */
static uint64_t idle_sleep_us(uint64_t prev, uint64_t now)
{
	uint64_t cap = g.idle_sleep_max_us;
	uint64_t probe = probes_min_interval_us();
	uint64_t next;

	if (probe && probe / 2 < cap)
		cap = probe / 2;
	if (g.next_timer) {
		uint64_t left = g.next_timer > now ? (g.next_timer - now) * 1000000ull / g.hz : 0;
		if (left < cap)
			cap = left;
	}
	next = prev ? prev * 2 : 1;
	return next < cap ? next : cap;
}

static int main_loop(void)
{
	uint64_t iter = 0, empty = 0, sleep_us = 0;
	const uint64_t busy_cap = dp_us_to_tsc(BUSY_CAP_US);

	while (!g.quit) {
		uint64_t now = rte_rdtsc();
		int work = 0;
		int i;

		g.next_timer = 0;
		for (i = 0; i < DP_MAX_UNITS; i++)
			if (g.units[i].used)
				unit_poll(&g.units[i], now, &work);
		unowned_ports_poll(now, &work);
		probes_tick(now);
		g.loops++;

		if (++iter % CTL_POLL_EVERY == 0)
			ctl_poll();
		if (work) {
			/* Cycles per packet, robust to preemption: an iteration
			 * longer than BUSY_CAP_US was interrupted and is clipped. */
			uint64_t d = rte_rdtsc() - now;

			g.busy_cycles += d < busy_cap ? d : busy_cap;
			g.busy_loops++;
			empty = 0;
			sleep_us = 0;
			continue;
		}
		if (++empty < IDLE_POLLS_BEFORE_SLEEP)
			continue;
		sleep_us = idle_sleep_us(sleep_us, now);
		if (sleep_us) {
			/* A control request ends the sleep: a command issued while
			 * the loop idles is answered at once, not a sleep later. */
			ctl_wait(sleep_us);
			g.sleeps++;
		}
		ctl_poll();
	}
	return 0;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"ctl", required_argument, NULL, 'c'},
		{"name", required_argument, NULL, 'n'},
		{"idle-sleep-max-us", required_argument, NULL, 's'},
		{"mbufs", required_argument, NULL, 'm'},
		{"mempool-ops", required_argument, NULL, 'o'},
		{NULL, 0, NULL, 0},
	};
	const char *ctl = NULL, *pool_ops = "stack";
	unsigned mbufs = 16383;
	int ret, opt, i;

	ret = rte_eal_init(argc, argv);
	if (ret < 0) {
		fprintf(stderr, "dpdk-vhost: EAL init failed: %s\n", rte_strerror(rte_errno));
		return 1;
	}
	argc -= ret;
	argv += ret;

	snprintf(g.name, sizeof(g.name), "dp");
	g.idle_sleep_max_us = 1000;
	optind = 1;
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (opt) {
		case 'c':
			ctl = optarg;
			break;
		case 'n':
			snprintf(g.name, sizeof(g.name), "%s", optarg);
			break;
		case 's':
			g.idle_sleep_max_us = strtoull(optarg, NULL, 10);
			break;
		case 'm':
			mbufs = (unsigned)strtoul(optarg, NULL, 10);
			break;
		case 'o':
			pool_ops = optarg;
			break;
		default:
			usage(argv[0]);
			return 2;
		}
	}
	if (ctl == NULL) {
		usage(argv[0]);
		return 2;
	}

	/* The default 50 us timer slack would swallow the short idle sleeps. */
	prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	signal(SIGPIPE, SIG_IGN);

	g.hz = rte_get_tsc_hz();
	g.tsc0 = rte_rdtsc();
	g.mono0_ns = mono_ns();
	for (i = 0; i < DP_MAX_PORTS; i++)
		g.ports[i].owner = g.ports[i].nf_of = -1;

	/* A LIFO pool hands back the mbufs freed last, which are still in cache.
	 * With a FIFO ring, an epoch's worth of held packets pushes every mbuf
	 * through the whole pool before it is reused, so each one arrives cold. */
	g.pool = rte_pktmbuf_pool_create_by_ops("dp_pool", mbufs, 256, 0,
						RTE_MBUF_DEFAULT_BUF_SIZE, (int)rte_socket_id(),
						pool_ops);
	if (g.pool == NULL && strcmp(pool_ops, "stack") == 0) {
		fprintf(stderr, "dpdk-vhost: no stack mempool (%s); using the default ring\n",
			rte_strerror(rte_errno));
		g.pool = rte_pktmbuf_pool_create("dp_pool", mbufs, 256, 0,
						 RTE_MBUF_DEFAULT_BUF_SIZE, (int)rte_socket_id());
	}
	if (g.pool == NULL) {
		fprintf(stderr, "dpdk-vhost: cannot create mbuf pool of %u: %s\n", mbufs,
			rte_strerror(rte_errno));
		rte_eal_cleanup();
		return 1;
	}
	if (ctl_open(ctl) < 0) {
		rte_eal_cleanup();
		return 1;
	}
	fprintf(stderr, "dpdk-vhost: %s ready on %s (lcore %u, tsc %lu Hz)\n", g.name, ctl,
		rte_lcore_id(), (unsigned long)g.hz);

	main_loop();

	for (i = 0; i < DP_MAX_UNITS; i++)
		if (g.units[i].used)
			unit_free_all(&g.units[i], DROP_REMOVED);
	inputlogs_free_all();
	ports_remove_all();
	ctl_close();
	rte_mempool_free(g.pool);
	rte_eal_cleanup();
	return 0;
}
