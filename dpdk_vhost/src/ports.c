/* Ports are virtual devices hot-plugged at run time, one RX and one TX queue
 * each, all drawing on the one mbuf pool. */
#include <stdio.h>
#include <string.h>

#include <rte_bus_vdev.h>
#include <rte_dev.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>

#include "dp.h"

#define PORT_DESC 1024
#define LOOPBACK_NAME_MAX 9

int port_find(const char *name)
{
	int i;

	for (i = 0; i < DP_MAX_PORTS; i++)
		if (g.ports[i].used && strcmp(g.ports[i].name, name) == 0)
			return i;
	return -1;
}

static int port_setup(uint16_t pid, char *err, size_t errlen)
{
	struct rte_eth_conf conf;
	int ret;

	memset(&conf, 0, sizeof(conf));
	ret = rte_eth_dev_configure(pid, 1, 1, &conf);
	if (ret == 0)
		ret = rte_eth_rx_queue_setup(pid, 0, PORT_DESC, rte_eth_dev_socket_id(pid), NULL,
					     g.pool);
	if (ret == 0)
		ret = rte_eth_tx_queue_setup(pid, 0, PORT_DESC, rte_eth_dev_socket_id(pid), NULL);
	if (ret == 0)
		ret = rte_eth_dev_start(pid);
	if (ret != 0) {
		snprintf(err, errlen, "port_setup_failed configure/start returned %d (%s)", ret,
			 rte_strerror(-ret));
		return -1;
	}
	rte_eth_promiscuous_enable(pid);
	return 0;
}

/* args is the rest of the request, already checked for spaces; for vhost it is
 * "path=...,client=0|1", for af_packet and tap "iface=...". */
int port_add(const char *name, const char *type, const char *args, char *err, size_t errlen)
{
	struct dp_port *p = NULL;
	char devargs[512];
	uint16_t pid;
	int i, ret;

	if (port_find(name) >= 0) {
		snprintf(err, errlen, "exists port %s already exists; remove_port it first", name);
		return -1;
	}
	for (i = 0; i < DP_MAX_PORTS; i++)
		if (!g.ports[i].used) {
			p = &g.ports[i];
			break;
		}
	if (p == NULL) {
		snprintf(err, errlen, "no_space all %d port slots are used", DP_MAX_PORTS);
		return -1;
	}
	memset(p, 0, sizeof(*p));
	p->owner = p->nf_of = -1;
	snprintf(p->name, sizeof(p->name), "%s", name);

	if (strcmp(type, "loopback") == 0) {
		/* The ring PMD, given no arguments, creates one ring per queue and
		 * uses it for both RX and TX: what is sent comes back. Its ring name
		 * embeds the device name and must fit RTE_RING_NAMESIZE. */
		p->kind = PORT_LOOPBACK;
		if (strlen(name) > LOOPBACK_NAME_MAX) {
			snprintf(err, errlen, "bad_arg loopback port names are at most %d characters",
				 LOOPBACK_NAME_MAX);
			return -1;
		}
		snprintf(p->devname, sizeof(p->devname), "net_ring_%s", name);
		ret = rte_dev_probe(p->devname);
		if (ret < 0 || rte_eth_dev_get_port_by_name(p->devname, &pid) != 0) {
			snprintf(err, errlen, "probe_failed loopback port %s: %s", name,
				 rte_strerror(-ret));
			return -1;
		}
	} else {
		const char *drv;

		if (strcmp(type, "vhost") == 0) {
			p->kind = PORT_VHOST;
			drv = "net_vhost";
		} else if (strcmp(type, "af_packet") == 0) {
			p->kind = PORT_AF_PACKET;
			drv = "net_af_packet";
		} else if (strcmp(type, "tap") == 0) {
			p->kind = PORT_TAP;
			drv = "net_tap";
		} else {
			snprintf(err, errlen,
				 "bad_type unknown port type %s; use vhost, af_packet, tap or loopback",
				 type);
			return -1;
		}
		snprintf(p->devname, sizeof(p->devname), "%s_%s", drv, name);
		ret = snprintf(devargs, sizeof(devargs), "%s,%s", p->devname, args);
		if (ret < 0 || (size_t)ret >= sizeof(devargs)) {
			snprintf(err, errlen, "too_long device arguments are too long");
			return -1;
		}
		ret = rte_dev_probe(devargs);
		if (ret < 0) {
			snprintf(err, errlen, "probe_failed %s: %s (check the path/interface exists)",
				 devargs, rte_strerror(-ret));
			return -1;
		}
		if (rte_eth_dev_get_port_by_name(p->devname, &pid) != 0) {
			rte_eal_hotplug_remove("vdev", p->devname);
			snprintf(err, errlen, "probe_failed %s created no ethdev", p->devname);
			return -1;
		}
	}
	p->port_id = pid;
	if (port_setup(pid, err, errlen) < 0) {
		rte_eal_hotplug_remove("vdev", p->devname);
		return -1;
	}
	p->used = 1;
	return (int)(p - g.ports);
}

int port_remove(int idx, char *err, size_t errlen)
{
	struct dp_port *p = &g.ports[idx];
	struct rte_mbuf *m[DP_BURST];
	uint16_t n;

	if (p->n_users > 0 || p->n_probes > 0 || p->n_logs > 0) {
		snprintf(err, errlen,
			 "port_busy port %s is used by %d unit(s), %d probe(s) and %d input log(s); "
			 "remove them first",
			 p->name, p->n_users, p->n_probes, p->n_logs);
		return -1;
	}
	/* What a loopback still holds would leak with its ring. */
	if (p->kind == PORT_LOOPBACK)
		while ((n = rte_eth_rx_burst(p->port_id, 0, m, DP_BURST)) > 0)
			rte_pktmbuf_free_bulk(m, n);
	rte_eth_dev_stop(p->port_id);
	if (rte_eal_hotplug_remove("vdev", p->devname) < 0)
		fprintf(stderr, "dpdk-vhost: removing %s failed\n", p->devname);
	memset(p, 0, sizeof(*p));
	p->owner = p->nf_of = -1;
	return 0;
}

void ports_remove_all(void)
{
	int i;

	for (i = 0; i < DP_MAX_PORTS; i++)
		if (g.ports[i].used) {
			g.ports[i].n_users = 0;
			g.ports[i].n_probes = 0;
			g.ports[i].n_logs = 0;
			port_remove(i, NULL, 0);
		}
}
