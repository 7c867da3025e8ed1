/* Held output for release at the standby.
 *
 * A unit whose standby is on another host can have the standby put its output
 * on the wire. At close_epoch the closed epoch's frames are written to a file
 * that travels inside the checkpoint; the standby's data plane sends them with
 * `xmit` once it has committed that checkpoint, and the primary frees its copy
 * with `retire`. Everything here runs in a command handler, off the fast path.
 *
 * File format, integers little-endian:
 *   header (40 bytes): magic "HMGROUT1", u64 epoch, u64 term, u64 count,
 *                      u64 total frame bytes
 *   count times:       u32 length, then that many bytes of frame
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

#include <rte_byteorder.h>
#include <rte_cycles.h>
#include <rte_ether.h>
#include <rte_ethdev.h>
#include <rte_mbuf.h>

#include "dp.h"

#define WBUF_LEN (256 * 1024)
#define TMP_SUFFIX ".tmp"

static char wbuf[WBUF_LEN];

struct writer {
	int fd;
	size_t len;
	int err; /* errno of the first failed write, 0 = none */
};

static void w_flush(struct writer *w)
{
	size_t off = 0;

	while (!w->err && off < w->len) {
		ssize_t n = write(w->fd, wbuf + off, w->len - off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			w->err = n < 0 ? errno : EIO;
			break;
		}
		off += (size_t)n;
	}
	w->len = 0;
}

static void w_put(struct writer *w, const void *p, size_t n)
{
	while (n && !w->err) {
		size_t c = WBUF_LEN - w->len < n ? WBUF_LEN - w->len : n;

		memcpy(wbuf + w->len, p, c);
		w->len += c;
		p = (const char *)p + c;
		n -= c;
		if (w->len == WBUF_LEN)
			w_flush(w);
	}
}

static void put_le64(uint8_t *p, uint64_t v)
{
	v = rte_cpu_to_le_64(v);
	memcpy(p, &v, sizeof(v));
}

static uint64_t get_le64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, sizeof(v));
	return rte_le_to_cpu_64(v);
}

static uint32_t get_le32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, sizeof(v));
	return rte_le_to_cpu_32(v);
}

static void tmp_name(char *tmp, size_t len, const char *path)
{
	snprintf(tmp, len, "%s%s", path, TMP_SUFFIX);
}

/* Opening the temporary file is the check that the save can start at all: it
 * runs before the epoch is closed, so a bad path leaves the epoch open. */
int heldout_create(const char *path, char *err, size_t errlen)
{
	char tmp[PATH_MAX];
	int fd;

	if (path[0] != '/') {
		snprintf(err, errlen, "bad_path %s: the path must be absolute", path);
		return -1;
	}
	if (strlen(path) + sizeof(TMP_SUFFIX) > sizeof(tmp)) {
		snprintf(err, errlen, "bad_path the path is longer than %d bytes", PATH_MAX - 5);
		return -1;
	}
	tmp_name(tmp, sizeof(tmp), path);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
	if (fd < 0) {
		snprintf(err, errlen, "bad_path cannot create %s: %s", tmp, strerror(errno));
		return -1;
	}
	return fd;
}

/* Writes the frames of closed epoch `ep`, still held, to the file opened by
 * heldout_create, then renames it to `path`. The frames are read in place, so
 * the buffer is untouched.
 * Always closes fd; on failure the temporary file is removed. */
int heldout_save(struct dp_unit *u, const struct dp_epoch *ep, int fd, const char *path,
		 struct heldout_saved *res, char *err, size_t errlen)
{
	uint64_t count = ep->end_cnt - ep->start_cnt, off = 0, bytes = 0, i;
	struct writer w = {.fd = fd, .len = 0, .err = 0};
	uint8_t hdr[HELDOUT_HDR_LEN];
	char tmp[PATH_MAX];

	tmp_name(tmp, sizeof(tmp), path);
	if (count) {
		off = ep->start_cnt - u->deq_cnt;
		if (ep->start_cnt < u->deq_cnt || off + count > unit_buffered_pkts(u)) {
			snprintf(err, errlen,
				 "internal epoch %lu's %lu packets are not where the counts say; "
				 "nothing saved",
				 (unsigned long)ep->epoch, (unsigned long)count);
			close(fd);
			unlink(tmp);
			return -1;
		}
	}
	for (i = off; i < off + count; i++)
		bytes += (*unit_held(u, i))->pkt_len;

	memcpy(hdr, HELDOUT_MAGIC, 8);
	put_le64(hdr + 8, ep->epoch);
	put_le64(hdr + 16, u->term);
	put_le64(hdr + 24, count);
	put_le64(hdr + 32, bytes);
	w_put(&w, hdr, sizeof(hdr));
	for (i = off; i < off + count && !w.err; i++) {
		const struct rte_mbuf *m = *unit_held(u, i), *seg;
		uint32_t len = rte_cpu_to_le_32(m->pkt_len);

		w_put(&w, &len, sizeof(len));
		/* An mbuf may be a chain: its frame is the segments in order. */
		for (seg = m; seg != NULL; seg = seg->next)
			w_put(&w, rte_pktmbuf_mtod(seg, const void *), seg->data_len);
	}
	w_flush(&w);
	if (close(fd) < 0 && !w.err)
		w.err = errno;
	if (!w.err && rename(tmp, path) < 0)
		w.err = errno;
	if (w.err) {
		unlink(tmp);
		snprintf(err, errlen, "cannot write %s: %s", path, strerror(w.err));
		return -1;
	}
	res->count = count;
	res->bytes = bytes;
	return 0;
}

struct heldout_file {
	uint8_t *data;
	size_t size;
	uint64_t epoch, term, count, bytes;
};

/* Reads and checks the whole file, so that a malformed one sends nothing. */
static int heldout_load(const char *path, struct heldout_file *f, char *err, size_t errlen)
{
	struct stat st;
	uint64_t i, off, bytes = 0;
	size_t got = 0;
	int fd;

	memset(f, 0, sizeof(*f));
	if (path[0] != '/') {
		snprintf(err, errlen, "bad_path %s: the path must be absolute", path);
		return -1;
	}
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		snprintf(err, errlen, "bad_file cannot open %s: %s", path, strerror(errno));
		return -1;
	}
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		snprintf(err, errlen, "bad_file %s is not a regular file", path);
		close(fd);
		return -1;
	}
	if ((uint64_t)st.st_size > HELDOUT_MAX_FILE) {
		snprintf(err, errlen, "bad_file %s is %lu bytes; the limit is %llu", path,
			 (unsigned long)st.st_size, HELDOUT_MAX_FILE);
		close(fd);
		return -1;
	}
	if ((size_t)st.st_size < HELDOUT_HDR_LEN) {
		snprintf(err, errlen, "bad_file %s is truncated: %lu bytes, shorter than the %d-byte "
			 "header", path, (unsigned long)st.st_size, HELDOUT_HDR_LEN);
		close(fd);
		return -1;
	}
	f->size = (size_t)st.st_size;
	f->data = malloc(f->size);
	if (f->data == NULL) {
		snprintf(err, errlen, "no_memory cannot buffer %s (%zu bytes)", path, f->size);
		close(fd);
		return -1;
	}
	while (got < f->size) {
		ssize_t n = read(fd, f->data + got, f->size - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			snprintf(err, errlen, "bad_file cannot read %s: %s", path,
				 n < 0 ? strerror(errno) : "it shrank while being read");
			close(fd);
			free(f->data);
			f->data = NULL;
			return -1;
		}
		got += (size_t)n;
	}
	close(fd);

	if (memcmp(f->data, HELDOUT_MAGIC, 8) != 0) {
		snprintf(err, errlen, "bad_file %s is not a held-output file (magic is not %s)", path,
			 HELDOUT_MAGIC);
		goto bad;
	}
	f->epoch = get_le64(f->data + 8);
	f->term = get_le64(f->data + 16);
	f->count = get_le64(f->data + 24);
	f->bytes = get_le64(f->data + 32);
	off = HELDOUT_HDR_LEN;
	for (i = 0; i < f->count; i++) {
		uint32_t len;

		if (f->size - off < 4) {
			snprintf(err, errlen, "bad_file %s is truncated: frame %lu of %lu has no length",
				 path, (unsigned long)i + 1, (unsigned long)f->count);
			goto bad;
		}
		len = get_le32(f->data + off);
		if (len == 0 || len > HELDOUT_MAX_FRAME) {
			snprintf(err, errlen, "bad_file %s: frame %lu has length %u; frames are 1..%u "
				 "bytes", path, (unsigned long)i + 1, len, HELDOUT_MAX_FRAME);
			goto bad;
		}
		off += 4;
		if (f->size - off < len) {
			snprintf(err, errlen, "bad_file %s is truncated: frame %lu of %lu needs %u bytes, "
				 "%lu are left", path, (unsigned long)i + 1, (unsigned long)f->count, len,
				 (unsigned long)(f->size - off));
			goto bad;
		}
		off += len;
		bytes += len;
	}
	if (off != f->size) {
		snprintf(err, errlen, "bad_file %s: %lu bytes follow the %lu frames the header "
			 "counts", path, (unsigned long)(f->size - off), (unsigned long)f->count);
		goto bad;
	}
	if (bytes != f->bytes) {
		snprintf(err, errlen, "bad_file %s: the frames hold %lu bytes, the header says %lu",
			 path, (unsigned long)bytes, (unsigned long)f->bytes);
		goto bad;
	}
	return 0;
bad:
	free(f->data);
	f->data = NULL;
	return -1;
}

/* One frame as an mbuf, chained when it is longer than a segment. */
struct rte_mbuf *frame_mbuf(const uint8_t *p, uint32_t len)
{
	struct rte_mbuf *head = NULL;

	while (len) {
		struct rte_mbuf *m = rte_pktmbuf_alloc(g.pool);
		uint16_t c;

		if (m == NULL)
			goto fail;
		c = rte_pktmbuf_tailroom(m) < len ? rte_pktmbuf_tailroom(m) : (uint16_t)len;
		memcpy(rte_pktmbuf_append(m, c), p, c);
		p += c;
		len -= c;
		if (head == NULL) {
			head = m;
		} else if (rte_pktmbuf_chain(head, m) != 0) {
			rte_pktmbuf_free(m);
			goto fail;
		}
	}
	return head;
fail:
	rte_pktmbuf_free(head);
	return NULL;
}

/* Sends the frames of a held-output file on `port`, in order, before it
 * returns. A port that refuses frames is retried until it has refused for
 * HELDOUT_XMIT_STALL_US in all; the error then says how many went out. */
int heldout_xmit(int port, const char *path, int keep_src, struct heldout_sent *res, char *err,
		 size_t errlen)
{
	struct dp_port *p = &g.ports[port];
	const uint64_t stall_max = dp_us_to_tsc(HELDOUT_XMIT_STALL_US);
	uint64_t stalled = 0, off = HELDOUT_HDR_LEN, done = 0, bytes = 0;
	struct rte_ether_addr own;
	struct heldout_file f;
	int ret = 0;

	if (heldout_load(path, &f, err, errlen) < 0)
		return -1;
	rte_eth_macaddr_get(p->port_id, &own);
	while (done < f.count && ret == 0) {
		struct rte_mbuf *m[DP_BURST];
		uint32_t lens[DP_BURST];
		uint16_t n = 0, k = 0;
		int short_of_mbufs = 0;

		while (n < DP_BURST && done + n < f.count) {
			uint32_t len = get_le32(f.data + off);

			m[n] = frame_mbuf(f.data + off + 4, len);
			if (m[n] == NULL) {
				short_of_mbufs = 1;
				break;
			}
			if (!keep_src && len >= 2 * RTE_ETHER_ADDR_LEN)
				rte_ether_addr_copy(&own, rte_pktmbuf_mtod_offset(
								m[n], struct rte_ether_addr *,
								RTE_ETHER_ADDR_LEN));
			lens[n++] = len;
			off += 4 + len;
		}
		while (k < n) {
			uint16_t s = rte_eth_tx_burst(p->port_id, 0, m + k, (uint16_t)(n - k));
			uint64_t t;

			for (; s; s--, k++) {
				bytes += lens[k];
				done++;
			}
			if (k == n)
				break;
			if (stalled >= stall_max) {
				rte_pktmbuf_free_bulk(m + k, n - k);
				snprintf(err, errlen, "tx_timeout port %s sent %lu of %lu frames of %s, "
					 "then refused the rest for %d ms", p->name,
					 (unsigned long)done, (unsigned long)f.count, path,
					 HELDOUT_XMIT_STALL_US / 1000);
				ret = -1;
				break;
			}
			t = rte_rdtsc();
			rte_delay_us_sleep(20);
			stalled += rte_rdtsc() - t;
		}
		if (ret == 0 && short_of_mbufs) {
			snprintf(err, errlen, "no_mbuf port %s sent %lu of %lu frames of %s, then the "
				 "mbuf pool ran dry", p->name, (unsigned long)done,
				 (unsigned long)f.count, path);
			ret = -1;
		}
	}
	p->xmit_pkts += done;
	p->xmit_bytes += bytes;
	res->sent = done;
	res->bytes = bytes;
	res->epoch = f.epoch;
	res->term = f.term;
	free(f.data);
	return ret;
}
