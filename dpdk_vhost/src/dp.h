/* Shared state of the hamgr data plane.
 *
 * One lcore runs everything: the burst loop, the epoch timers, the probes and,
 * every CTL_POLL_EVERY iterations, the control socket. Nothing here is locked
 * because nothing is shared between threads.
 */
#ifndef HAMGR_DP_H
#define HAMGR_DP_H

#include <stdint.h>
#include <stddef.h>

#include <rte_mbuf.h>
#include <rte_ring.h>

#define DP_MAX_PORTS 32
#define DP_MAX_UNITS 16
#define DP_MAX_PROBES 16
#define DP_MAX_LOGS 16
#define DP_MAX_WIRE 4
#define DP_MAX_K 64
#define DP_NAME_LEN 32
#define DP_BURST 32
#define DP_RELEASE_BURSTS 2
#define DP_CATCH_UP 8192 /* releasable packets beyond which release stages faster */
/* Wire frames a unit keeps while its ingress is stopped (a power of two): a
 * 15-20 ms cut at about 25 kpps, in at most this many of the pool's mbufs. */
#define DP_WIRE_STASH 512

#define DP_ETHERTYPE_PROBE 0x88B5
#define DP_ETHERTYPE_MIRROR 0x88B6

enum dp_port_kind { PORT_VHOST, PORT_AF_PACKET, PORT_TAP, PORT_LOOPBACK };

struct dp_port {
	int used;
	enum dp_port_kind kind;
	char name[DP_NAME_LEN];
	char devname[64];
	uint16_t port_id;
	int owner;                /* unit whose wire side this is (it polls RX), or -1 */
	int nf_of;                /* unit whose NF port this is, or -1 */
	int n_probes;             /* probes sent/received on this port */
	int n_logs;               /* input logs fed by this port's RX */
	int rx_filters;           /* n_probes + n_logs: nonzero sends RX through rx_filter */
	int n_shadows;            /* input logs with a shadow log on this port */
	int n_users;              /* units referencing it in any role */
	uint64_t probe_rx, probe_tx, probe_bad, unowned_drops;
	/* mirror frames logged, with a tag no log here wants, and too short to parse */
	uint64_t mirror_rx, mirror_unknown, mirror_bad;
	uint64_t shadow_rx; /* frames an unowned port gave to a shadow log */
	uint64_t xmit_pkts, xmit_bytes; /* frames sent by `xmit` from a held-output file */
};

enum dp_drop {
	DROP_RING_FULL,
	DROP_NO_MBUF,
	DROP_STALE_TERM,
	DROP_DISCARD,
	DROP_TX_FAIL,
	DROP_MIRROR_FAIL,
	DROP_REMOVED,
	DROP_RESERVED_TYPE,
	DROP__COUNT
};

enum dp_mode { MODE_HA, MODE_PLAIN };

#define BP_K 1u
#define BP_BYTES 2u
#define BP_RING 4u

struct dp_epoch {
	uint64_t epoch;
	uint64_t start_cnt;  /* cumulative enqueue count when it opened */
	uint64_t end_cnt;    /* cumulative enqueue count at its close */
	uint64_t release_at; /* auto-epoch ack time in TSC, 0 = waits for release */
};

/* Small FIFO of mbufs already taken from a port but not yet accepted by the
 * next one; while it is non-empty the source is not polled, so a slow
 * consumer back-pressures its producer instead of losing packets. */
struct dp_stash {
	struct rte_mbuf *m[DP_BURST];
	uint16_t off, n;
};

struct dp_unit {
	int used;
	char name[DP_NAME_LEN];
	uint32_t tag;
	int n_wire;
	int wire[DP_MAX_WIRE];
	int nf, egress, mirror;
	enum dp_mode mode;
	int paused;
	unsigned bp;
	uint64_t term;
	uint64_t cur_epoch;
	uint32_t k;
	uint64_t budget_bytes;
	uint32_t ring_size;
	uint32_t ring_high; /* pkts at which ingress pauses, leaving NF headroom */
	/* The held output: a circular array of ring_size mbuf pointers, in
	 * hugepage memory. The NF port's RX writes into it and the egress TX sends
	 * from it in place, so no pointer is copied on the way. It holds
	 * enq_cnt - deq_cnt packets from position hb_head (a running count,
	 * masked on use); a closed epoch that starts at count s begins at offset
	 * s - deq_cnt. At most hb_cap = ring_size - 1 are held. */
	struct rte_mbuf **hb;
	uint32_t hb_mask, hb_cap;
	uint64_t hb_head;
	uint64_t pf_end; /* position up to which the release has prefetched */

	struct dp_epoch closed[DP_MAX_K];
	uint32_t closed_head, closed_n;

	uint64_t enq_cnt, enq_bytes; /* net of discards, so boundaries stay valid */
	uint64_t open_start;         /* enq_cnt when the open epoch began */
	/* Packets that left the buffer: sent, or freed by a retire. */
	uint64_t deq_cnt, deq_bytes;
	uint64_t release_limit;
	uint64_t last_released; /* highest epoch released or retired, 0 = none */

	struct dp_stash to_nf;
	struct dp_stash to_egress;

	/* auto-epoch bench/test mode */
	uint64_t auto_interval_tsc, auto_next_close, auto_ack_delay_tsc;

	/* counters */
	uint64_t rx_wire, in_seq, nf_rx, nf_rx_bytes;
	uint64_t tx, tx_bytes, released_pkts, released_bytes;
	uint64_t discarded_pkts, discarded_bytes;
	uint64_t epochs_closed, epochs_released, epochs_discarded;
	uint64_t retired_pkts, retired_bytes, epochs_retired;
	uint64_t bp_k, bp_bytes, bp_ring, nf_stalls, refused_stale;
	uint64_t hwm_bytes, hwm_pkts;
	uint64_t mirror_pkts;
	uint64_t drops[DROP__COUNT];

	/* Last, so the fields above keep the layout the fast path was tuned with. */
	uint32_t mirror_tag;    /* the tag its mirror frames carry; the unit's tag by default */
	uint64_t replayed_pkts; /* delivered to the NF by replay_input_log */

	/* The wire stash: frames read from the wire ports while ingress is
	 * stopped (paused, or back-pressure), so that the probes and mirror
	 * frames on those ports are still received. A FIFO of ws_n frames from
	 * the running count ws_head, delivered before the wire is read again.
	 * Full, it stops the reading, and the rest waits in the ports' queues. */
	uint32_t ws_head, ws_n;
	uint64_t ws_pkts, ws_full; /* frames it took; times it filled up */
	struct rte_mbuf *ws[DP_WIRE_STASH];
};

struct dp_probe {
	int used;
	char peer[DP_NAME_LEN];
	int port;
	uint64_t interval_tsc, interval_us;
	uint32_t miss;
	uint64_t term;
	uint64_t next_tx, last_rx, tx_seq, rx_seq;
	uint64_t rx, tx, tx_fail;
	int state; /* 0 = waiting for first probe, 1 = up, 2 = down */
	uint64_t downs, ups;
};

/* One logged input: the original frame (the mirror header stripped) sits at
 * arena[off, off + len). */
struct dp_log_entry {
	uint64_t seq;
	uint32_t off, len;
	uint32_t hash; /* shadow logs only: crc of the frame, to match mirror frames */
};

#define DP_SHADOW_SCAN 512 /* shadow entries a mirror frame is looked for among */
/* Mirror frames remembered because their flooded copy had not come yet: a burst
 * of them can overtake their copies, so a few bursts' worth. */
#define DP_SHADOW_PEND 256

/* Input log (lossless mode, on the standby): mirror frames with one tag from
 * one port, in sequence order. Frames are copied out of their mbufs into the
 * log's own arena, so a long log never drains the mbuf pool that RX (and the
 * probes) depend on. Entries are a FIFO, the arena a circular byte buffer in
 * the same order; a frame that does not fit before the arena's end goes to its
 * start, and the tail it skips stays unused until the oldest entries go. */
struct dp_log {
	int used;
	char name[DP_NAME_LEN];
	int port;
	uint32_t tag;
	uint32_t cap;                /* entries */
	struct dp_log_entry *ent;
	uint32_t head, n;
	uint8_t *arena;
	uint64_t arena_size, wpos;
	uint64_t bytes;              /* frame bytes held */
	int started;                 /* a frame was logged or a trim set `last` */
	uint64_t last;               /* highest seq logged or trimmed; lower ones are duplicates */
	uint64_t received, gaps, gap_seq, duplicates, too_big;
	uint64_t overflow, overflow_seq; /* oldest entries dropped for room, highest seq dropped */
	uint64_t trimmed, trim_seq;      /* entries dropped by trim, highest `upto` */
	uint64_t replayed;
	/* The shadow log (lossless takeover of the inputs no mirror frame
	 * carries): every other frame the port receives for the NF's MAC while
	 * no unit owns it, in arrival order; seq is the arrival count. A mirror
	 * frame found there (same bytes) drops it and everything older, which
	 * the primary delivered. Allocated with the log when a MAC is given. */
	struct dp_log *shadow;
	uint8_t shadow_mac[6];
	uint64_t shadow_matched, shadow_unmatched;
	/* Remembered mirror frames forgotten for room while their copy had not
	 * come: each is an input the shadow log may replay a second time. */
	uint64_t shadow_evicted;
	/* The remembered mirror frames, a FIFO in mirror order (crc and length). */
	uint32_t pend_hash[DP_SHADOW_PEND], pend_len[DP_SHADOW_PEND];
	uint32_t pend_head, pend_n;
};

struct dp_global {
	char name[DP_NAME_LEN];
	struct rte_mempool *pool;
	uint64_t hz;
	uint64_t tsc0, mono0_ns;
	struct dp_port ports[DP_MAX_PORTS];
	struct dp_unit units[DP_MAX_UNITS];
	struct dp_probe probes[DP_MAX_PROBES];
	struct dp_log logs[DP_MAX_LOGS];
	uint64_t idle_sleep_max_us;
	volatile int quit;
	/* loop counters */
	uint64_t loops, sleeps, ctl_polls, ctl_requests, ctl_errors;
	uint64_t busy_loops, busy_cycles; /* iterations that moved packets, and their TSC */
	uint64_t events_sent, events_dropped;
	uint64_t next_timer; /* earliest timer deadline in TSC, for idle sleep */
};

extern struct dp_global g;

/* main.c */
uint64_t dp_tsc_to_mono_us(uint64_t tsc);
uint64_t dp_us_to_tsc(uint64_t us);

/* ports.c */
int port_find(const char *name);
int port_add(const char *name, const char *type, const char *args, char *err, size_t errlen);
int port_remove(int idx, char *err, size_t errlen);
void ports_remove_all(void);

/* units.c */
int unit_find(const char *name);
void unit_poll(struct dp_unit *u, uint64_t now, int *work);
void unit_free_all(struct dp_unit *u, enum dp_drop reason);
uint64_t unit_close_epoch(struct dp_unit *u, uint64_t *drained);
void unit_release_upto(struct dp_unit *u, uint64_t epoch);
uint64_t unit_discard_from(struct dp_unit *u, uint64_t from, enum dp_drop reason);
int unit_retire_upto(struct dp_unit *u, uint64_t epoch, uint64_t *epochs, uint64_t *pkts,
		     uint64_t *bytes);
void unit_update_bp(struct dp_unit *u);
void unowned_ports_poll(uint64_t now, int *work);
uint16_t rx_filter(struct dp_port *p, struct rte_mbuf **pkts, uint16_t n, uint64_t now,
		   int *work);

/* heldout.c: held output for release at the standby */
#define HELDOUT_MAGIC "HMGROUT1"
#define HELDOUT_HDR_LEN 40
#define HELDOUT_MAX_FILE (256ull << 20)
#define HELDOUT_MAX_FRAME 65535u
#define HELDOUT_XMIT_STALL_US 200000

struct heldout_saved {
	uint64_t count, bytes;
};
struct heldout_sent {
	uint64_t sent, bytes, epoch, term;
};
int heldout_create(const char *path, char *err, size_t errlen);
int heldout_save(struct dp_unit *u, const struct dp_epoch *ep, int fd, const char *path,
		 struct heldout_saved *res, char *err, size_t errlen);
int heldout_xmit(int port, const char *path, int keep_src, struct heldout_sent *res, char *err,
		 size_t errlen);
struct rte_mbuf *frame_mbuf(const uint8_t *p, uint32_t len);

/* inputlog.c: input logs and replay (lossless mode) */
#define MIRROR_HDR_LEN (14 + 4 + 8) /* Ethernet header, tag (be32), seq (be64) */
#define INPUTLOG_REPLAY_STALL_US 200000

struct inputlog_replayed {
	uint64_t delivered, first, last;
};
int inputlog_find(const char *name);
int inputlog_find_port_tag(int port, uint32_t tag);
int inputlog_create(struct dp_log *lg, const char *name, int port, uint32_t tag, uint32_t cap,
		    uint64_t max_bytes, const uint8_t *shadow_mac, char *err, size_t errlen);
uint64_t inputlog_destroy(struct dp_log *lg);
void inputlog_receive(struct dp_port *p, struct rte_mbuf *m, int *work);
uint64_t inputlog_trim(struct dp_log *lg, uint64_t upto);
int inputlog_replay(struct dp_log *lg, struct dp_unit *u, uint64_t after,
		    struct inputlog_replayed *res, char *err, size_t errlen);
int inputlog_replay_shadow(struct dp_log *lg, struct dp_unit *u, struct inputlog_replayed *res,
			   char *err, size_t errlen);
uint16_t inputlog_shadow_filter(struct dp_port *p, struct rte_mbuf **pkts, uint16_t n, int *work);
void inputlogs_free_all(void);

/* probes.c */
int probe_find(const char *peer);
void probes_tick(uint64_t now);
void probe_receive(struct dp_port *p, struct rte_mbuf *m, uint64_t now);
uint64_t probes_min_interval_us(void);

/* ctl.c */
int ctl_open(const char *path);
void ctl_poll(void);
/* Sleep up to `us` microseconds, ended early by a control request. */
void ctl_wait(uint64_t us);
void ctl_close(void);
void ctl_event(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* counters.c */
struct sbuf {
	char *p;
	size_t len, cap;
	int overflow;
};
void sb_printf(struct sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void stats_format(struct sbuf *b, const char *only_unit);
const char *drop_name(enum dp_drop d);

static inline uint64_t unit_buffered_pkts(const struct dp_unit *u)
{
	return u->enq_cnt - u->deq_cnt;
}

/* The held packet at offset `off` from the head. */
static inline struct rte_mbuf **unit_held(const struct dp_unit *u, uint64_t off)
{
	return &u->hb[(u->hb_head + off) & u->hb_mask];
}

static inline uint64_t unit_buffered_bytes(const struct dp_unit *u)
{
	return u->enq_bytes - u->deq_bytes;
}

#endif
