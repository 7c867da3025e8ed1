/* Control commands. Each one checks everything before changing anything, so
 * a refused command leaves the data plane as it was. */
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <rte_cycles.h>
#include <rte_lcore.h>
#include <rte_malloc.h>

#include <rte_errno.h>
#include <rte_ether.h>

#include "ctl.h"

#define DEFAULT_K 4
#define DEFAULT_BUDGET (64ull << 20)
#define DEFAULT_RING 32768
#define MIN_PROBE_US 200
#define DEFAULT_LOG_CAP 65536
#define MAX_LOG_CAP (1u << 22)
#define DEFAULT_LOG_BYTES (64ull << 20)
#define MIN_LOG_BYTES 4096
#define MAX_LOG_BYTES (1ull << 30)

static int fail(struct sbuf *out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int fail(struct sbuf *out, const char *fmt, ...)
{
	va_list ap;
	int n;

	out->len = 0;
	va_start(ap, fmt);
	n = vsnprintf(out->p, out->cap, fmt, ap);
	va_end(ap);
	out->len = n < 0 ? 0 : ((size_t)n < out->cap ? (size_t)n : out->cap - 1);
	return -1;
}

static int name_ok(const char *s)
{
	size_t n = strlen(s);

	if (n == 0 || n > 24)
		return 0;
	for (; *s; s++)
		if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') ||
		      (*s >= '0' && *s <= '9') || *s == '_' || *s == '-'))
			return 0;
	return 1;
}

static const char *need(struct ctl_req *r, const char *key, struct sbuf *out)
{
	const char *v = req_str(r, key);

	if (v == NULL)
		fail(out, "missing_arg %s needs %s=", r->cmd, key);
	return v;
}

static int need_u64(struct ctl_req *r, const char *key, uint64_t *v, struct sbuf *out)
{
	int ret = req_u64(r, key, v, out);

	if (ret == 0)
		fail(out, "missing_arg %s needs %s=", r->cmd, key);
	return ret == 1 ? 0 : -1;
}

static int opt_u64(struct ctl_req *r, const char *key, uint64_t *v, uint64_t dflt,
		   struct sbuf *out)
{
	int ret = req_u64(r, key, v, out);

	if (ret == 0)
		*v = dflt;
	return ret < 0 ? -1 : 0;
}

static struct dp_unit *need_unit(struct ctl_req *r, struct sbuf *out)
{
	const char *n = need(r, "unit", out);
	int i;

	if (n == NULL)
		return NULL;
	i = unit_find(n);
	if (i < 0) {
		fail(out, "no_such_unit unit %s does not exist; add_unit it first", n);
		return NULL;
	}
	return &g.units[i];
}

static int need_port(struct ctl_req *r, const char *key, int *idx, struct sbuf *out)
{
	const char *n = need(r, key, out);

	if (n == NULL)
		return -1;
	*idx = port_find(n);
	if (*idx < 0)
		return fail(out, "no_such_port port %s does not exist; add_port it first", n);
	return 0;
}

/* Fencing: a term below the unit's is refused (I3); one above it means the
 * caller skipped set_term. */
static int term_check(struct dp_unit *u, struct ctl_req *r, int required, struct sbuf *out)
{
	uint64_t t;
	int ret = req_u64(r, "term", &t, out);

	if (ret < 0)
		return -1;
	if (ret == 0)
		return required ? fail(out, "missing_arg %s needs term=", r->cmd) : 0;
	if (t < u->term) {
		u->refused_stale++;
		return fail(out, "stale_term term %lu is older than unit %s's term %lu; refused", t,
			    u->name, u->term);
	}
	if (t > u->term)
		return fail(out, "term_ahead term %lu is newer than unit %s's term %lu; set_term first",
			    t, u->name, u->term);
	return 0;
}

static int cmd_ping(struct ctl_req *r, struct sbuf *out)
{
	(void)r;
	sb_printf(out, "name=%s version=1 lcore=%u mono_us=%lu", g.name, rte_lcore_id(),
		  (unsigned long)dp_tsc_to_mono_us(rte_rdtsc()));
	return 0;
}

static int cmd_stats(struct ctl_req *r, struct sbuf *out)
{
	const char *only = req_str(r, "unit");

	if (only && unit_find(only) < 0)
		return fail(out, "no_such_unit unit %s does not exist", only);
	stats_format(out, only);
	return 0;
}

static int cmd_quit(struct ctl_req *r, struct sbuf *out)
{
	(void)r;
	(void)out;
	g.quit = 1;
	return 0;
}

static int cmd_subscribe(struct ctl_req *r, struct sbuf *out)
{
	(void)out;
	ctl_subscribe(r->client);
	return 0;
}

static int arg_clean(const char *v)
{
	return strpbrk(v, ",=") == NULL;
}

static int cmd_add_port(struct ctl_req *r, struct sbuf *out)
{
	const char *name = need(r, "name", out), *type, *path, *iface;
	char args[400], err[400];
	uint64_t client, queues;
	int idx;

	if (name == NULL || (type = need(r, "type", out)) == NULL)
		return -1;
	if (!name_ok(name))
		return fail(out, "bad_arg port name must be 1-24 of [A-Za-z0-9_-]");
	path = req_str(r, "path");
	iface = req_str(r, "iface");
	if (opt_u64(r, "client", &client, 0, out) < 0 || opt_u64(r, "queues", &queues, 1, out) < 0)
		return -1;
	if ((path && !arg_clean(path)) || (iface && !arg_clean(iface)))
		return fail(out, "bad_arg path and iface must not contain ',' or '='");
	args[0] = '\0';
	if (strcmp(type, "vhost") == 0) {
		if (path == NULL)
			return fail(out, "missing_arg a vhost port needs path=/socket");
		if (queues != 1)
			return fail(out, "bad_arg only queues=1 is supported");
		snprintf(args, sizeof(args), "iface=%s,queues=1,client=%d", path, client ? 1 : 0);
	} else if (strcmp(type, "af_packet") == 0 || strcmp(type, "tap") == 0) {
		if (iface == NULL)
			return fail(out, "missing_arg a %s port needs iface=NAME", type);
		if (strcmp(type, "af_packet") == 0)
			/* 4096 frames per ring instead of the PMD's 512: a checkpoint pauses ingress
			 * for tens of milliseconds, and the backlog must wait in the ring, not be
			 * dropped by the kernel. */
			snprintf(args, sizeof(args), "iface=%s,qpairs=1,framecnt=4096", iface);
		else
			snprintf(args, sizeof(args), "iface=%s", iface);
	} else if (strcmp(type, "loopback") != 0) {
		return fail(out, "bad_type unknown port type %s; use vhost, af_packet, tap or loopback",
			    type);
	}
	idx = port_add(name, type, args, err, sizeof(err));
	if (idx < 0)
		return fail(out, "%s", err);
	sb_printf(out, "name=%s port_id=%u", name, g.ports[idx].port_id);
	return 0;
}

static int cmd_remove_port(struct ctl_req *r, struct sbuf *out)
{
	char err[300];
	int idx;

	if (need_port(r, "name", &idx, out) < 0)
		return -1;
	if (port_remove(idx, err, sizeof(err)) < 0)
		return fail(out, "%s", err);
	return 0;
}

static int parse_wire(const char *list, int *wire, int *n, struct sbuf *out)
{
	char buf[256], *save = NULL, *tok;

	snprintf(buf, sizeof(buf), "%s", list);
	*n = 0;
	for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		int idx = port_find(tok), i;

		if (idx < 0)
			return fail(out, "no_such_port wire port %s does not exist", tok);
		if (*n == DP_MAX_WIRE)
			return fail(out, "bad_arg at most %d wire ports", DP_MAX_WIRE);
		for (i = 0; i < *n; i++)
			if (wire[i] == idx)
				return fail(out, "bad_arg wire port %s listed twice", tok);
		if (g.ports[idx].owner >= 0 || g.ports[idx].nf_of >= 0)
			return fail(out, "port_busy port %s already feeds unit %s", tok,
				    g.units[g.ports[idx].owner >= 0 ? g.ports[idx].owner
								   : g.ports[idx].nf_of]
					    .name);
		wire[(*n)++] = idx;
	}
	if (*n == 0)
		return fail(out, "missing_arg add_unit needs wire=PORT[,PORT]");
	return 0;
}

static int cmd_add_unit(struct ctl_req *r, struct sbuf *out)
{
	const char *name = need(r, "unit", out), *wl, *mode, *mir;
	int wire[DP_MAX_WIRE], n_wire, nf, eg, mirror = -1, slot = -1, i;
	uint64_t k, budget, ring, term, epoch, tag, paused;
	char rname[RTE_RING_NAMESIZE];
	struct dp_unit *u;

	if (name == NULL)
		return -1;
	if (!name_ok(name))
		return fail(out, "bad_arg unit name must be 1-24 of [A-Za-z0-9_-]");
	if (unit_find(name) >= 0)
		return fail(out, "exists unit %s already exists", name);
	for (i = 0; i < DP_MAX_UNITS; i++)
		if (!g.units[i].used) {
			slot = i;
			break;
		}
	if (slot < 0)
		return fail(out, "no_space all %d unit slots are used", DP_MAX_UNITS);
	if ((wl = need(r, "wire", out)) == NULL || parse_wire(wl, wire, &n_wire, out) < 0)
		return -1;
	if (need_port(r, "nf", &nf, out) < 0 || need_port(r, "egress", &eg, out) < 0)
		return -1;
	if (g.ports[nf].owner >= 0 || g.ports[nf].nf_of >= 0)
		return fail(out, "port_busy NF port %s is already in use", g.ports[nf].name);
	if (g.ports[nf].n_logs)
		return fail(out, "port_busy port %s feeds %d input log(s); an NF port's RX is the "
			    "NF's output, so remove_input_log them first", g.ports[nf].name,
			    g.ports[nf].n_logs);
	for (i = 0; i < n_wire; i++)
		if (wire[i] == nf)
			return fail(out, "bad_arg the NF port cannot also be a wire port");
	if (eg == nf)
		return fail(out, "bad_arg the egress port cannot be the NF port");
	mir = req_str(r, "mirror");
	if (mir && strcmp(mir, "-") != 0) {
		mirror = port_find(mir);
		if (mirror < 0)
			return fail(out, "no_such_port mirror port %s does not exist", mir);
	}
	mode = req_str(r, "mode");
	if (mode && strcmp(mode, "ha") != 0 && strcmp(mode, "plain") != 0)
		return fail(out, "bad_arg mode must be ha or plain");
	if (opt_u64(r, "k", &k, DEFAULT_K, out) < 0 ||
	    opt_u64(r, "budget_bytes", &budget, DEFAULT_BUDGET, out) < 0 ||
	    opt_u64(r, "ring_size", &ring, DEFAULT_RING, out) < 0 ||
	    opt_u64(r, "term", &term, 0, out) < 0 || opt_u64(r, "epoch", &epoch, 1, out) < 0 ||
	    opt_u64(r, "tag", &tag, (uint64_t)slot, out) < 0 ||
	    opt_u64(r, "paused", &paused, 0, out) < 0)
		return -1;
	if (tag > UINT32_MAX)
		return fail(out, "bad_arg tag must be 0..%u", UINT32_MAX);
	if (paused > 1)
		return fail(out, "bad_arg paused must be 0 or 1");
	if (k < 1 || k > DP_MAX_K)
		return fail(out, "bad_arg k must be 1..%d", DP_MAX_K);
	if (ring < 64 || ring > (1u << 20) || (ring & (ring - 1)) != 0)
		return fail(out, "bad_arg ring_size must be a power of two in 64..1048576");
	if (budget == 0)
		return fail(out, "bad_arg budget_bytes must be positive");

	u = &g.units[slot];
	memset(u, 0, sizeof(*u));
	snprintf(rname, sizeof(rname), "ub_%s", name);
	u->hb = rte_zmalloc_socket(rname, (size_t)ring * sizeof(u->hb[0]), RTE_CACHE_LINE_SIZE,
				   (int)rte_socket_id());
	if (u->hb == NULL)
		return fail(out, "no_memory cannot allocate a %lu-entry ring", ring);
	u->hb_mask = (uint32_t)ring - 1;
	u->hb_cap = (uint32_t)ring - 1;
	snprintf(u->name, sizeof(u->name), "%s", name);
	u->tag = (uint32_t)tag;
	u->mirror_tag = u->tag;
	u->paused = (int)paused;
	u->n_wire = n_wire;
	memcpy(u->wire, wire, sizeof(wire));
	u->nf = nf;
	u->egress = eg;
	u->mirror = mirror;
	u->mode = (mode && strcmp(mode, "plain") == 0) ? MODE_PLAIN : MODE_HA;
	u->term = term;
	u->cur_epoch = epoch;
	u->k = (uint32_t)k;
	u->budget_bytes = budget;
	u->ring_size = (uint32_t)ring;
	u->ring_high = u->hb_cap * 3 / 4;
	for (i = 0; i < n_wire; i++) {
		g.ports[wire[i]].owner = slot;
		g.ports[wire[i]].n_users++;
	}
	g.ports[nf].nf_of = slot;
	g.ports[nf].n_users++;
	g.ports[eg].n_users++;
	if (mirror >= 0)
		g.ports[mirror].n_users++;
	u->used = 1;
	sb_printf(out, "unit=%s tag=%u epoch=%lu term=%lu", name, u->tag, (unsigned long)epoch,
		  (unsigned long)term);
	return 0;
}

static int cmd_remove_unit(struct ctl_req *r, struct sbuf *out)
{
	struct dp_unit *u = need_unit(r, out);
	uint64_t before;
	int i;

	if (u == NULL)
		return -1;
	before = u->drops[DROP_REMOVED];
	unit_free_all(u, DROP_REMOVED);
	sb_printf(out, "unit=%s dropped=%lu", u->name,
		  (unsigned long)(u->drops[DROP_REMOVED] - before));
	for (i = 0; i < u->n_wire; i++) {
		g.ports[u->wire[i]].owner = -1;
		g.ports[u->wire[i]].n_users--;
	}
	g.ports[u->nf].nf_of = -1;
	g.ports[u->nf].n_users--;
	g.ports[u->egress].n_users--;
	if (u->mirror >= 0)
		g.ports[u->mirror].n_users--;
	rte_free(u->hb);
	memset(u, 0, sizeof(*u));
	return 0;
}

static int cmd_set_mode(struct ctl_req *r, struct sbuf *out)
{
	struct dp_unit *u = need_unit(r, out);
	const char *mode;

	if (u == NULL || (mode = need(r, "mode", out)) == NULL)
		return -1;
	if (strcmp(mode, "plain") == 0) {
		if (unit_buffered_pkts(u) || u->closed_n)
			return fail(out, "busy unit %s still buffers output; release or discard first",
				    u->name);
		u->mode = MODE_PLAIN;
		u->auto_interval_tsc = 0;
	} else if (strcmp(mode, "ha") == 0) {
		if (u->to_egress.n)
			return fail(out, "busy unit %s has output in flight; retry", u->name);
		u->mode = MODE_HA;
		u->open_start = u->enq_cnt;
	} else {
		return fail(out, "bad_arg mode must be ha or plain");
	}
	unit_update_bp(u);
	return 0;
}

static int cmd_configure_unit(struct ctl_req *r, struct sbuf *out)
{
	struct dp_unit *u = need_unit(r, out);
	uint64_t k, budget;

	if (u == NULL)
		return -1;
	if (opt_u64(r, "k", &k, u->k, out) < 0 ||
	    opt_u64(r, "budget_bytes", &budget, u->budget_bytes, out) < 0)
		return -1;
	if (k < 1 || k > DP_MAX_K)
		return fail(out, "bad_arg k must be 1..%d", DP_MAX_K);
	if (budget == 0)
		return fail(out, "bad_arg budget_bytes must be positive");
	u->k = (uint32_t)k;
	u->budget_bytes = budget;
	unit_update_bp(u);
	return 0;
}

static int cmd_pause(struct ctl_req *r, struct sbuf *out)
{
	struct dp_unit *u = need_unit(r, out);

	if (u == NULL || term_check(u, r, 0, out) < 0)
		return -1;
	u->paused = 1;
	sb_printf(out, "unit=%s cut=%lu rx=%lu nf_rx=%lu epoch=%lu term=%lu", u->name,
		  (unsigned long)u->in_seq, (unsigned long)u->rx_wire, (unsigned long)u->nf_rx,
		  (unsigned long)u->cur_epoch, (unsigned long)u->term);
	return 0;
}

static int cmd_resume(struct ctl_req *r, struct sbuf *out)
{
	struct dp_unit *u = need_unit(r, out);

	if (u == NULL || term_check(u, r, 0, out) < 0)
		return -1;
	u->paused = 0;
	sb_printf(out, "unit=%s cut=%lu", u->name, (unsigned long)u->in_seq);
	return 0;
}

/* The epoch just closed, or the closed epoch `e` (NULL when it is not closed). */
static const struct dp_epoch *closed_epoch(const struct dp_unit *u, uint64_t e)
{
	uint32_t i;

	for (i = 0; i < u->closed_n; i++) {
		const struct dp_epoch *ep = &u->closed[(u->closed_head + i) % DP_MAX_K];

		if (ep->epoch == e)
			return ep;
	}
	return NULL;
}

/* With save=PATH the epoch's frames are written to PATH as well. A path that
 * cannot be created is refused before anything changes (bad_path: the epoch is
 * still open). A write that fails after that leaves the epoch closed, exactly
 * as without save, and says so (save_failed): its output is still buffered and
 * can be released, retired, discarded or saved again with save_epoch. */
static int cmd_close_epoch(struct ctl_req *r, struct sbuf *out)
{
	struct dp_unit *u = need_unit(r, out);
	const char *save = req_str(r, "save");
	struct heldout_saved saved;
	uint64_t e, drained, start;
	char err[PATH_MAX + 200];
	int fd = -1;

	if (u == NULL || need_u64(r, "epoch", &e, out) < 0 || term_check(u, r, 0, out) < 0)
		return -1;
	if (u->mode != MODE_HA)
		return fail(out, "not_ha unit %s is unprotected (mode plain)", u->name);
	if (e != u->cur_epoch)
		return fail(out, "bad_epoch epoch %lu is not open; the open epoch is %lu",
			    (unsigned long)e, (unsigned long)u->cur_epoch);
	if (u->closed_n >= u->k)
		return fail(out, "epoch_limit %u epochs are in flight (k=%u); release one first",
			    u->closed_n, u->k);
	if (save != NULL && (fd = heldout_create(save, err, sizeof(err))) < 0)
		return fail(out, "%s; epoch %lu was not closed", err, (unsigned long)e);
	start = u->open_start;
	unit_close_epoch(u, &drained);
	if (save != NULL &&
	    heldout_save(u, closed_epoch(u, e), fd, save, &saved, err, sizeof(err)) < 0)
		return fail(out,
			    "save_failed %s; epoch %lu is closed and its output is still buffered "
			    "(release, retire, discard or save_epoch it)",
			    err, (unsigned long)e);
	sb_printf(out, "unit=%s epoch=%lu pkts=%lu drained=%lu in_flight=%u buffered_pkts=%lu",
		  u->name, (unsigned long)e, (unsigned long)(u->enq_cnt - start),
		  (unsigned long)drained, u->closed_n, (unsigned long)unit_buffered_pkts(u));
	if (save != NULL)
		sb_printf(out, " saved=%lu saved_bytes=%lu", (unsigned long)saved.count,
			  (unsigned long)saved.bytes);
	return 0;
}

/* Writes a closed epoch's frames again, e.g. after close_epoch's save failed. */
static int cmd_save_epoch(struct ctl_req *r, struct sbuf *out)
{
	struct dp_unit *u = need_unit(r, out);
	const struct dp_epoch *ep;
	struct heldout_saved saved;
	char err[PATH_MAX + 200];
	const char *path;
	uint64_t e;
	int fd;

	if (u == NULL || need_u64(r, "epoch", &e, out) < 0 || (path = need(r, "path", out)) == NULL ||
	    term_check(u, r, 0, out) < 0)
		return -1;
	ep = closed_epoch(u, e);
	if (ep == NULL)
		return fail(out, "not_closed epoch %lu of unit %s is not closed and held (the open "
			    "epoch is %lu; released or retired ones are gone)",
			    (unsigned long)e, u->name, (unsigned long)u->cur_epoch);
	if ((fd = heldout_create(path, err, sizeof(err))) < 0)
		return fail(out, "%s", err);
	if (heldout_save(u, ep, fd, path, &saved, err, sizeof(err)) < 0)
		return fail(out, "save_failed %s; epoch %lu is still held", err, (unsigned long)e);
	sb_printf(out, "unit=%s epoch=%lu saved=%lu saved_bytes=%lu", u->name, (unsigned long)e,
		  (unsigned long)saved.count, (unsigned long)saved.bytes);
	return 0;
}

static int cmd_release(struct ctl_req *r, struct sbuf *out)
{
	struct dp_unit *u = need_unit(r, out);
	uint64_t e, before;

	if (u == NULL || need_u64(r, "epoch", &e, out) < 0 || term_check(u, r, 1, out) < 0)
		return -1;
	if (e >= u->cur_epoch)
		return fail(out, "not_closed epoch %lu is not closed; close_epoch it first",
			    (unsigned long)e);
	before = u->epochs_released;
	unit_release_upto(u, e);
	sb_printf(out, "unit=%s epoch=%lu released_epochs=%lu releasable_pkts=%lu in_flight=%u",
		  u->name, (unsigned long)e, (unsigned long)(u->epochs_released - before),
		  (unsigned long)(u->release_limit - u->deq_cnt), u->closed_n);
	return 0;
}

/* Like release, but the standby sent these epochs: they are freed, not sent. */
static int cmd_retire(struct ctl_req *r, struct sbuf *out)
{
	struct dp_unit *u = need_unit(r, out);
	uint64_t e, epochs, pkts, bytes;

	if (u == NULL || need_u64(r, "epoch", &e, out) < 0 || term_check(u, r, 1, out) < 0)
		return -1;
	if (e >= u->cur_epoch)
		return fail(out, "not_closed epoch %lu is not closed; close_epoch it first",
			    (unsigned long)e);
	if (unit_retire_upto(u, e, &epochs, &pkts, &bytes) < 0)
		return fail(out, "no_memory cannot rearrange unit %s's buffer; nothing was retired",
			    u->name);
	sb_printf(out,
		  "unit=%s epoch=%lu retired_epochs=%lu retired_pkts=%lu retired_bytes=%lu"
		  " releasable_pkts=%lu in_flight=%u",
		  u->name, (unsigned long)e, (unsigned long)epochs, (unsigned long)pkts,
		  (unsigned long)bytes, (unsigned long)(u->release_limit - u->deq_cnt), u->closed_n);
	return 0;
}

static int cmd_xmit(struct ctl_req *r, struct sbuf *out)
{
	const char *path, *mac;
	struct heldout_sent res;
	char err[PATH_MAX + 200];
	int port, keep = 0;

	if (need_port(r, "port", &port, out) < 0 || (path = need(r, "path", out)) == NULL)
		return -1;
	mac = req_str(r, "src_mac");
	if (mac != NULL && strcmp(mac, "keep") == 0)
		keep = 1;
	else if (mac != NULL && strcmp(mac, "own") != 0)
		return fail(out, "bad_arg src_mac must be own or keep");
	if (heldout_xmit(port, path, keep, &res, err, sizeof(err)) < 0)
		return fail(out, "%s", err);
	sb_printf(out, "port=%s sent=%lu bytes=%lu epoch=%lu term=%lu", g.ports[port].name,
		  (unsigned long)res.sent, (unsigned long)res.bytes, (unsigned long)res.epoch,
		  (unsigned long)res.term);
	return 0;
}

static int cmd_discard(struct ctl_req *r, struct sbuf *out)
{
	struct dp_unit *u = need_unit(r, out);
	uint64_t from, n;

	if (u == NULL || need_u64(r, "from", &from, out) < 0 || term_check(u, r, 0, out) < 0)
		return -1;
	if (u->mode != MODE_HA)
		return fail(out, "not_ha unit %s is unprotected (mode plain)", u->name);
	if (u->last_released && from <= u->last_released)
		return fail(out, "bad_epoch epoch %lu was already released or retired (up to %lu); it "
			    "cannot be discarded", (unsigned long)from, (unsigned long)u->last_released);
	n = unit_discard_from(u, from, DROP_DISCARD);
	sb_printf(out, "unit=%s discarded=%lu epoch=%lu", u->name, (unsigned long)n,
		  (unsigned long)u->cur_epoch);
	return 0;
}

static int cmd_set_term(struct ctl_req *r, struct sbuf *out)
{
	struct dp_unit *u = need_unit(r, out);
	uint64_t t, e, n = 0;

	if (u == NULL || need_u64(r, "term", &t, out) < 0 ||
	    opt_u64(r, "epoch", &e, u->cur_epoch, out) < 0)
		return -1;
	if (t < u->term) {
		u->refused_stale++;
		return fail(out, "stale_term term %lu is older than unit %s's term %lu; refused",
			    (unsigned long)t, u->name, (unsigned long)u->term);
	}
	if (t > u->term) {
		/* Nothing the old term buffered may leave once a newer term exists. */
		if (u->mode == MODE_HA)
			n = unit_discard_from(u, 0, DROP_STALE_TERM);
		u->term = t;
	}
	u->cur_epoch = e;
	sb_printf(out, "unit=%s term=%lu epoch=%lu discarded=%lu", u->name, (unsigned long)u->term,
		  (unsigned long)u->cur_epoch, (unsigned long)n);
	return 0;
}

static int cmd_auto_epoch(struct ctl_req *r, struct sbuf *out)
{
	struct dp_unit *u = need_unit(r, out);
	uint64_t iv, ack;

	if (u == NULL || need_u64(r, "interval_us", &iv, out) < 0 ||
	    opt_u64(r, "ack_delay_us", &ack, 0, out) < 0)
		return -1;
	if (iv && u->mode != MODE_HA)
		return fail(out, "not_ha unit %s is unprotected (mode plain)", u->name);
	if (iv && iv < 50)
		return fail(out, "bad_arg interval_us must be 0 (off) or >= 50");
	u->auto_interval_tsc = dp_us_to_tsc(iv);
	u->auto_ack_delay_tsc = dp_us_to_tsc(ack);
	u->auto_next_close = rte_rdtsc() + u->auto_interval_tsc;
	return 0;
}

/* tag= sets the tag the mirror frames carry, so that the standby's input log
 * can be told it up front; without it they carry the unit's own tag. */
static int cmd_set_mirror(struct ctl_req *r, struct sbuf *out)
{
	struct dp_unit *u = need_unit(r, out);
	const char *p;
	uint64_t tag;
	int idx = -1, has_tag;

	if (u == NULL || (p = need(r, "port", out)) == NULL)
		return -1;
	if ((has_tag = req_u64(r, "tag", &tag, out)) < 0)
		return -1;
	if (has_tag && tag > UINT32_MAX)
		return fail(out, "bad_arg tag must be 0..%u", UINT32_MAX);
	if (strcmp(p, "-") != 0) {
		idx = port_find(p);
		if (idx < 0)
			return fail(out, "no_such_port port %s does not exist", p);
	} else if (has_tag) {
		return fail(out, "bad_arg tag= needs a mirror port, not port=-");
	}
	if (u->mirror >= 0)
		g.ports[u->mirror].n_users--;
	u->mirror = idx;
	u->mirror_tag = has_tag ? (uint32_t)tag : u->tag;
	if (idx >= 0)
		g.ports[idx].n_users++;
	sb_printf(out, "unit=%s port=%s tag=%u", u->name, idx >= 0 ? g.ports[idx].name : "-",
		  u->mirror_tag);
	return 0;
}

static struct dp_log *need_log(struct ctl_req *r, struct sbuf *out)
{
	const char *n = need(r, "name", out);
	int i;

	if (n == NULL)
		return NULL;
	i = inputlog_find(n);
	if (i < 0) {
		fail(out, "no_such_log input log %s does not exist; add_input_log it first", n);
		return NULL;
	}
	return &g.logs[i];
}

static int cmd_add_input_log(struct ctl_req *r, struct sbuf *out)
{
	const char *name = need(r, "name", out), *mac = req_str(r, "shadow_mac");
	uint64_t tag, cap, max_bytes;
	struct rte_ether_addr shadow;
	struct dp_log *lg = NULL;
	char err[200];
	int port, i;

	if (name == NULL || need_port(r, "port", &port, out) < 0 ||
	    need_u64(r, "tag", &tag, out) < 0 ||
	    opt_u64(r, "capacity", &cap, DEFAULT_LOG_CAP, out) < 0 ||
	    opt_u64(r, "max_bytes", &max_bytes, DEFAULT_LOG_BYTES, out) < 0)
		return -1;
	if (!name_ok(name))
		return fail(out, "bad_arg log name must be 1-24 of [A-Za-z0-9_-]");
	if (tag > UINT32_MAX)
		return fail(out, "bad_arg tag must be 0..%u", UINT32_MAX);
	if (cap < 1 || cap > MAX_LOG_CAP)
		return fail(out, "bad_arg capacity must be 1..%u frames", MAX_LOG_CAP);
	if (max_bytes < MIN_LOG_BYTES || max_bytes > MAX_LOG_BYTES)
		return fail(out, "bad_arg max_bytes must be %d..%llu", MIN_LOG_BYTES, MAX_LOG_BYTES);
	if (mac != NULL && (rte_ether_unformat_addr(mac, &shadow) < 0 ||
			    rte_is_multicast_ether_addr(&shadow) || rte_is_zero_ether_addr(&shadow)))
		return fail(out, "bad_arg shadow_mac must be a unicast MAC like 02:00:c6:12:00:02, "
			    "got %s", mac);
	if (inputlog_find(name) >= 0)
		return fail(out, "exists input log %s exists; remove_input_log it first", name);
	if ((i = inputlog_find_port_tag(port, (uint32_t)tag)) >= 0)
		return fail(out, "exists input log %s already takes tag %lu on port %s", g.logs[i].name,
			    (unsigned long)tag, g.ports[port].name);
	if (g.ports[port].nf_of >= 0)
		return fail(out, "port_busy port %s is the NF port of unit %s; its RX is the NF's "
			    "output", g.ports[port].name, g.units[g.ports[port].nf_of].name);
	for (i = 0; i < DP_MAX_LOGS; i++)
		if (!g.logs[i].used) {
			lg = &g.logs[i];
			break;
		}
	if (lg == NULL)
		return fail(out, "no_space all %d input log slots are used", DP_MAX_LOGS);
	if (inputlog_create(lg, name, port, (uint32_t)tag, (uint32_t)cap, max_bytes,
			    mac ? shadow.addr_bytes : NULL, err, sizeof(err)) < 0)
		return fail(out, "%s", err);
	sb_printf(out, "log=%s port=%s tag=%u capacity=%u max_bytes=%lu shadow=%d", name,
		  g.ports[port].name, lg->tag, lg->cap, (unsigned long)lg->arena_size,
		  lg->shadow != NULL);
	return 0;
}

static int cmd_remove_input_log(struct ctl_req *r, struct sbuf *out)
{
	struct dp_log *lg = need_log(r, out);
	char name[DP_NAME_LEN];
	uint64_t n;

	if (lg == NULL)
		return -1;
	snprintf(name, sizeof(name), "%s", lg->name);
	n = inputlog_destroy(lg);
	sb_printf(out, "log=%s dropped=%lu", name, (unsigned long)n);
	return 0;
}

static int cmd_trim_input_log(struct ctl_req *r, struct sbuf *out)
{
	struct dp_log *lg = need_log(r, out);
	uint64_t upto, n;

	if (lg == NULL || need_u64(r, "upto", &upto, out) < 0)
		return -1;
	n = inputlog_trim(lg, upto);
	sb_printf(out, "log=%s dropped=%lu frames=%u", lg->name, (unsigned long)n, lg->n);
	return 0;
}

static int cmd_replay_input_log(struct ctl_req *r, struct sbuf *out)
{
	struct dp_log *lg = need_log(r, out);
	struct inputlog_replayed res;
	struct dp_unit *u;
	char err[600];
	uint64_t after;

	if (lg == NULL || (u = need_unit(r, out)) == NULL || need_u64(r, "after", &after, out) < 0 ||
	    term_check(u, r, 0, out) < 0)
		return -1;
	if (!u->paused)
		return fail(out, "not_paused unit %s takes live input; pause_ingress it first, or live "
			    "input would interleave with the replay", u->name);
	if (inputlog_replay(lg, u, after, &res, err, sizeof(err)) < 0)
		return fail(out, "%s", err);
	sb_printf(out, "log=%s unit=%s delivered=%lu first=%lu last=%lu", lg->name, u->name,
		  (unsigned long)res.delivered, (unsigned long)res.first, (unsigned long)res.last);
	return 0;
}

static int cmd_replay_shadow_log(struct ctl_req *r, struct sbuf *out)
{
	struct dp_log *lg = need_log(r, out);
	struct inputlog_replayed res;
	struct dp_unit *u;
	char err[300];

	if (lg == NULL || (u = need_unit(r, out)) == NULL || term_check(u, r, 0, out) < 0)
		return -1;
	if (!u->paused)
		return fail(out, "not_paused unit %s takes live input; pause_ingress it first, or live "
			    "input would interleave with the replay", u->name);
	if (inputlog_replay_shadow(lg, u, &res, err, sizeof(err)) < 0)
		return fail(out, "%s", err);
	sb_printf(out, "log=%s unit=%s delivered=%lu first=%lu last=%lu", lg->name, u->name,
		  (unsigned long)res.delivered, (unsigned long)res.first, (unsigned long)res.last);
	return 0;
}

static int cmd_add_probe(struct ctl_req *r, struct sbuf *out)
{
	const char *peer = need(r, "peer", out);
	uint64_t iv, miss, term, now;
	struct dp_probe *pr = NULL;
	int port, i;

	if (peer == NULL || need_port(r, "port", &port, out) < 0)
		return -1;
	if (opt_u64(r, "interval_us", &iv, 1000, out) < 0 || opt_u64(r, "miss", &miss, 3, out) < 0 ||
	    opt_u64(r, "term", &term, 0, out) < 0)
		return -1;
	if (!name_ok(peer))
		return fail(out, "bad_arg peer must be 1-24 of [A-Za-z0-9_-]");
	if (iv < MIN_PROBE_US || iv > 10000000)
		return fail(out, "bad_arg interval_us must be %d..10000000", MIN_PROBE_US);
	if (miss < 1 || miss > 1000)
		return fail(out, "bad_arg miss must be 1..1000");
	if (probe_find(peer) >= 0)
		return fail(out, "exists a probe to %s exists; remove_probe it first", peer);
	for (i = 0; i < DP_MAX_PROBES; i++)
		if (!g.probes[i].used) {
			pr = &g.probes[i];
			break;
		}
	if (pr == NULL)
		return fail(out, "no_space all %d probe slots are used", DP_MAX_PROBES);
	now = rte_rdtsc();
	memset(pr, 0, sizeof(*pr));
	snprintf(pr->peer, sizeof(pr->peer), "%s", peer);
	pr->port = port;
	pr->interval_us = iv;
	pr->interval_tsc = dp_us_to_tsc(iv);
	pr->miss = (uint32_t)miss;
	pr->term = term;
	pr->next_tx = now;
	pr->last_rx = now;
	pr->used = 1;
	g.ports[port].n_probes++;
	g.ports[port].rx_filters++;
	sb_printf(out, "peer=%s port=%s interval_us=%lu miss=%lu", peer, g.ports[port].name,
		  (unsigned long)iv, (unsigned long)miss);
	return 0;
}

static int cmd_remove_probe(struct ctl_req *r, struct sbuf *out)
{
	const char *peer = need(r, "peer", out);
	int i;

	if (peer == NULL)
		return -1;
	i = probe_find(peer);
	if (i < 0)
		return fail(out, "no_such_probe no probe to %s", peer);
	g.ports[g.probes[i].port].n_probes--;
	g.ports[g.probes[i].port].rx_filters--;
	memset(&g.probes[i], 0, sizeof(g.probes[i]));
	return 0;
}

static int cmd_help(struct ctl_req *r, struct sbuf *out);

static const struct {
	const char *name;
	ctl_handler fn;
} commands[] = {
	{"ping", cmd_ping},
	{"help", cmd_help},
	{"stats", cmd_stats},
	{"quit", cmd_quit},
	{"subscribe", cmd_subscribe},
	{"add_port", cmd_add_port},
	{"remove_port", cmd_remove_port},
	{"add_unit", cmd_add_unit},
	{"remove_unit", cmd_remove_unit},
	{"set_mode", cmd_set_mode},
	{"configure_unit", cmd_configure_unit},
	{"pause_ingress", cmd_pause},
	{"resume_ingress", cmd_resume},
	{"close_epoch", cmd_close_epoch},
	{"release", cmd_release},
	{"retire", cmd_retire},
	{"save_epoch", cmd_save_epoch},
	{"xmit", cmd_xmit},
	{"discard", cmd_discard},
	{"set_term", cmd_set_term},
	{"unit_auto_epoch", cmd_auto_epoch},
	{"set_mirror", cmd_set_mirror},
	{"add_input_log", cmd_add_input_log},
	{"remove_input_log", cmd_remove_input_log},
	{"trim_input_log", cmd_trim_input_log},
	{"replay_input_log", cmd_replay_input_log},
	{"replay_shadow_log", cmd_replay_shadow_log},
	{"add_probe", cmd_add_probe},
	{"remove_probe", cmd_remove_probe},
};

static int cmd_help(struct ctl_req *r, struct sbuf *out)
{
	size_t i;

	(void)r;
	sb_printf(out, "commands=");
	for (i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		sb_printf(out, "%s%s", i ? "," : "", commands[i].name);
	return 0;
}

ctl_handler command_lookup(const char *cmd)
{
	size_t i;

	for (i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		if (strcmp(commands[i].name, cmd) == 0)
			return commands[i].fn;
	return NULL;
}
