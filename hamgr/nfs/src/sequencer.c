/*
 * sequencer: the consistency probe NF.
 *
 * Receives UDP datagrams on --listen PORT and forwards each one to --dest IP:PORT with an 8-byte
 * big-endian per-flow counter prepended (flow = source ip/port). The sender's own payload, which
 * starts with its own sequence number, follows unchanged. After any rollback the sink sees the
 * stamped counter repeat or skip relative to the sender's sequence.
 *
 * --mem-mb N touches N MiB at start; --dirty-pct P rewrites P% of those pages every
 * --dirty-ms MS, so a checkpoint benchmark has a known working set and change rate.
 *
 * --tcp-listen PORT (optional) also serves TCP on PORT, so one unit carries a UDP flow and a TCP
 * connection through the same failover. Every line a connection sends is answered on it with
 * "<conn> <count> <line>\n", where conn is the connection's number among those this NF accepted
 * and count is the number of lines this connection has sent so far, both from 1. Both live in the
 * NF's memory, so a client that keeps its socket across a failover sees them continue; a rolled
 * back or rebuilt connection shows as a repeat, a skip or a new conn. Without the option the NF
 * opens no TCP socket and its UDP path is unchanged.
 *
 * Every option may also come from the environment (SEQ_LISTEN, SEQ_DEST, SEQ_MEM_MB,
 * SEQ_DIRTY_PCT, SEQ_DIRTY_MS, SEQ_TCP_LISTEN) because OCI specs carry env more naturally than
 * argv.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FLOW_SLOTS 4096 /* power of two; open addressing */
#define MAX_DGRAM 65536
#define STAMP_LEN 8
#define TCP_CONNS 16
#define TCP_LINE_MAX 512

struct flow {
	uint32_t addr;
	uint16_t port;
	uint16_t used;
	uint64_t counter;
};

static struct flow flows[FLOW_SLOTS];
static volatile sig_atomic_t stopping;

struct tcp_conn {
	int fd; /* -1: free */
	uint64_t id;
	uint64_t count;
	size_t fill;
	char buf[TCP_LINE_MAX];
};

static struct tcp_conn conns[TCP_CONNS];
static uint64_t accepted;

static void on_term(int sig)
{
	(void)sig;
	stopping = 1;
}

static const char *opt(int argc, char **argv, const char *name, const char *env)
{
	for (int i = 1; i + 1 < argc; i++)
		if (strcmp(argv[i], name) == 0)
			return argv[i + 1];
	return getenv(env);
}

static uint64_t *flow_counter(uint32_t addr, uint16_t port)
{
	uint32_t h = (addr * 2654435761u) ^ ((uint32_t)port * 40503u);
	for (uint32_t i = 0; i < FLOW_SLOTS; i++) {
		struct flow *f = &flows[(h + i) & (FLOW_SLOTS - 1)];
		if (!f->used) {
			f->used = 1;
			f->addr = addr;
			f->port = port;
			f->counter = 0;
			return &f->counter;
		}
		if (f->addr == addr && f->port == port)
			return &f->counter;
	}
	return NULL; /* table full: the caller drops, which the probe reports as a gap */
}

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static int tcp_listen(const char *port_s)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return -1;
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in a = {.sin_family = AF_INET,
				.sin_port = htons((uint16_t)atoi(port_s)),
				.sin_addr.s_addr = htonl(INADDR_ANY)};
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, TCP_CONNS) < 0) {
		close(fd);
		return -1;
	}
	for (int i = 0; i < TCP_CONNS; i++)
		conns[i].fd = -1;
	return fd;
}

static void tcp_accept(int lfd)
{
	int fd = accept(lfd, NULL, NULL);
	if (fd < 0)
		return;
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	for (int i = 0; i < TCP_CONNS; i++)
		if (conns[i].fd < 0) {
			conns[i].fd = fd;
			conns[i].id = ++accepted;
			conns[i].count = 0;
			conns[i].fill = 0;
			return;
		}
	close(fd);
}

/*
 * Answers every complete line received on `c`; returns -1 when the connection is to be closed:
 * the peer closed it, a line overflowed the buffer, or an answer did not fit the socket's send
 * buffer. The last case is a client that does not read its answers; dropping it keeps the UDP
 * path from ever blocking on a TCP peer.
 */
static int tcp_serve(struct tcp_conn *c)
{
	ssize_t n = recv(c->fd, c->buf + c->fill, sizeof(c->buf) - c->fill, MSG_DONTWAIT);
	if (n < 0)
		return (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
	if (n == 0)
		return -1;
	c->fill += (size_t)n;
	char *start = c->buf;
	char *nl;
	while ((nl = memchr(start, '\n', c->fill - (size_t)(start - c->buf))) != NULL) {
		char reply[TCP_LINE_MAX + 48];
		int len = snprintf(reply, sizeof(reply), "%llu %llu %.*s\n",
				   (unsigned long long)c->id, (unsigned long long)++c->count,
				   (int)(nl - start), start);
		if (len < 0 || send(c->fd, reply, (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL) != len)
			return -1;
		start = nl + 1;
	}
	c->fill -= (size_t)(start - c->buf);
	memmove(c->buf, start, c->fill);
	return c->fill == sizeof(c->buf) ? -1 : 0;
}

int main(int argc, char **argv)
{
	const char *listen_s = opt(argc, argv, "--listen", "SEQ_LISTEN");
	const char *dest_s = opt(argc, argv, "--dest", "SEQ_DEST");
	const char *mem_s = opt(argc, argv, "--mem-mb", "SEQ_MEM_MB");
	const char *pct_s = opt(argc, argv, "--dirty-pct", "SEQ_DIRTY_PCT");
	const char *ms_s = opt(argc, argv, "--dirty-ms", "SEQ_DIRTY_MS");
	const char *tcp_s = opt(argc, argv, "--tcp-listen", "SEQ_TCP_LISTEN");

	if (!listen_s || !dest_s) {
		fprintf(stderr, "usage: sequencer --listen PORT --dest IP:PORT "
				"[--mem-mb N --dirty-pct P --dirty-ms MS] [--tcp-listen PORT]\n");
		return 2;
	}
	char dest_ip[64];
	const char *colon = strrchr(dest_s, ':');
	if (!colon || (size_t)(colon - dest_s) >= sizeof(dest_ip)) {
		fprintf(stderr, "sequencer: --dest must be IP:PORT, got %s\n", dest_s);
		return 2;
	}
	memcpy(dest_ip, dest_s, (size_t)(colon - dest_s));
	dest_ip[colon - dest_s] = '\0';
	struct sockaddr_in dest = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1))};
	if (inet_pton(AF_INET, dest_ip, &dest.sin_addr) != 1) {
		fprintf(stderr, "sequencer: bad destination address %s\n", dest_ip);
		return 2;
	}

	size_t mem_bytes = (size_t)(mem_s ? atol(mem_s) : 0) << 20;
	double dirty_pct = pct_s ? atof(pct_s) : 0.0;
	int dirty_ms = ms_s ? atoi(ms_s) : 100;
	if (dirty_ms <= 0)
		dirty_ms = 100;
	long page = sysconf(_SC_PAGESIZE);
	size_t npages = mem_bytes / (size_t)page;
	unsigned char *mem = NULL;
	if (mem_bytes) {
		mem = mmap(NULL, mem_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (mem == MAP_FAILED) {
			perror("sequencer: mmap");
			return 1;
		}
		for (size_t i = 0; i < npages; i++)
			memset(mem + i * (size_t)page, (int)(i & 0xff) | 1, (size_t)page);
	}
	size_t dirty_per_round = (size_t)((double)npages * dirty_pct / 100.0);
	if (dirty_pct > 0 && dirty_per_round == 0 && npages)
		dirty_per_round = 1;
	size_t dirty_cursor = 0;
	uint64_t dirty_round = 0;

	struct sigaction sa = {.sa_handler = on_term};
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0) {
		perror("sequencer: socket");
		return 1;
	}
	struct sockaddr_in local = {.sin_family = AF_INET,
				    .sin_port = htons((uint16_t)atoi(listen_s)),
				    .sin_addr.s_addr = htonl(INADDR_ANY)};
	if (bind(fd, (struct sockaddr *)&local, sizeof(local)) < 0) {
		perror("sequencer: bind");
		return 1;
	}
	int lfd = -1;
	if (tcp_s) {
		lfd = tcp_listen(tcp_s);
		if (lfd < 0) {
			perror("sequencer: tcp listen");
			return 1;
		}
	}

	static unsigned char in[MAX_DGRAM], out[MAX_DGRAM + STAMP_LEN];
	uint64_t next_dirty = now_ms() + (uint64_t)dirty_ms;
	while (!stopping) {
		int timeout = -1;
		if (dirty_per_round) {
			uint64_t t = now_ms();
			if (t >= next_dirty) {
				dirty_round++;
				for (size_t i = 0; i < dirty_per_round; i++) {
					/* One word per page is enough to make the page differ. */
					uint64_t *w = (uint64_t *)(mem + dirty_cursor * (size_t)page);
					*w = dirty_round;
					dirty_cursor = (dirty_cursor + 1) % npages;
				}
				next_dirty = t + (uint64_t)dirty_ms;
			}
			timeout = (int)(next_dirty - now_ms());
			if (timeout < 0)
				timeout = 0;
		}
		/* Slot 0 is the UDP socket; without --tcp-listen it is the only one. */
		struct pollfd p[2 + TCP_CONNS];
		int slot[2 + TCP_CONNS];
		nfds_t np = 0;
		p[np] = (struct pollfd){.fd = fd, .events = POLLIN};
		slot[np++] = -1;
		if (lfd >= 0) {
			p[np] = (struct pollfd){.fd = lfd, .events = POLLIN};
			slot[np++] = -1;
			for (int i = 0; i < TCP_CONNS; i++)
				if (conns[i].fd >= 0) {
					p[np] = (struct pollfd){.fd = conns[i].fd, .events = POLLIN};
					slot[np++] = i;
				}
		}
		int r = poll(p, np, timeout);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			perror("sequencer: poll");
			return 1;
		}
		if (r == 0)
			continue;
		for (nfds_t k = 2; k < np; k++)
			if (p[k].revents && tcp_serve(&conns[slot[k]]) < 0) {
				close(conns[slot[k]].fd);
				conns[slot[k]].fd = -1;
			}
		if (np > 1 && (p[1].revents & POLLIN))
			tcp_accept(lfd);
		if (!p[0].revents)
			continue;
		/* Drain what is queued so a burst costs one poll. */
		for (;;) {
			struct sockaddr_in src;
			socklen_t slen = sizeof(src);
			ssize_t n = recvfrom(fd, in, sizeof(in), MSG_DONTWAIT, (struct sockaddr *)&src,
					     &slen);
			if (n < 0)
				break;
			uint64_t *ctr = flow_counter(src.sin_addr.s_addr, src.sin_port);
			if (!ctr)
				continue;
			uint64_t c = ++*ctr;
			for (int i = 0; i < STAMP_LEN; i++)
				out[i] = (unsigned char)(c >> (56 - 8 * i));
			size_t len = (size_t)n;
			if (len > sizeof(out) - STAMP_LEN)
				len = sizeof(out) - STAMP_LEN;
			memcpy(out + STAMP_LEN, in, len);
			sendto(fd, out, len + STAMP_LEN, 0, (struct sockaddr *)&dest, sizeof(dest));
		}
	}
	return 0;
}
