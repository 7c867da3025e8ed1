/*
 * tcpnf: a TCP NF that terminates connections.
 *
 * Listens on --listen PORT (or TCPNF_LISTEN). For every request line a connection sends, it
 * answers "<counter> <request>\n", where counter counts lines per connection starting at 1. A
 * client that keeps its socket across a failover sees a gap or a repeat if state rolled back or
 * the connection was rebuilt.
 *
 * One thread and poll(): the whole NF is one process, which keeps its checkpoint small.
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_CONN 64
#define LINE_MAX_LEN 4096

struct conn {
	int fd;
	uint64_t counter;
	size_t fill;
	char buf[LINE_MAX_LEN];
};

static struct conn conns[MAX_CONN];
static volatile sig_atomic_t stopping;

static void on_term(int sig)
{
	(void)sig;
	stopping = 1;
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static void drop(struct conn *c)
{
	close(c->fd);
	c->fd = -1;
}

/* Answers every complete line in the buffer; returns -1 when the connection should close. */
static int serve(struct conn *c)
{
	ssize_t n = read(c->fd, c->buf + c->fill, sizeof(c->buf) - c->fill);
	if (n <= 0)
		return (n < 0 && errno == EINTR) ? 0 : -1;
	c->fill += (size_t)n;
	char *start = c->buf;
	char *nl;
	while ((nl = memchr(start, '\n', c->fill - (size_t)(start - c->buf))) != NULL) {
		char reply[LINE_MAX_LEN + 32];
		int len = snprintf(reply, sizeof(reply), "%llu %.*s\n",
				   (unsigned long long)++c->counter, (int)(nl - start), start);
		if (len < 0 || write_all(c->fd, reply, (size_t)len) < 0)
			return -1;
		start = nl + 1;
	}
	c->fill -= (size_t)(start - c->buf);
	memmove(c->buf, start, c->fill);
	if (c->fill == sizeof(c->buf))
		return -1; /* a line longer than the buffer is a protocol error */
	return 0;
}

int main(int argc, char **argv)
{
	const char *port_s = NULL;
	for (int i = 1; i + 1 < argc; i++)
		if (strcmp(argv[i], "--listen") == 0)
			port_s = argv[i + 1];
	if (!port_s)
		port_s = getenv("TCPNF_LISTEN");
	if (!port_s) {
		fprintf(stderr, "usage: tcpnf --listen PORT\n");
		return 2;
	}

	struct sigaction sa = {.sa_handler = on_term};
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	int lfd = socket(AF_INET, SOCK_STREAM, 0);
	int one = 1;
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in a = {.sin_family = AF_INET,
				.sin_port = htons((uint16_t)atoi(port_s)),
				.sin_addr.s_addr = htonl(INADDR_ANY)};
	if (bind(lfd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(lfd, 16) < 0) {
		perror("tcpnf: bind/listen");
		return 1;
	}
	for (int i = 0; i < MAX_CONN; i++)
		conns[i].fd = -1;

	while (!stopping) {
		struct pollfd p[MAX_CONN + 1];
		int idx[MAX_CONN + 1];
		int np = 0;
		p[np].fd = lfd;
		p[np].events = POLLIN;
		idx[np++] = -1;
		for (int i = 0; i < MAX_CONN; i++)
			if (conns[i].fd >= 0) {
				p[np].fd = conns[i].fd;
				p[np].events = POLLIN;
				idx[np++] = i;
			}
		if (poll(p, (nfds_t)np, -1) < 0) {
			if (errno == EINTR)
				continue;
			perror("tcpnf: poll");
			return 1;
		}
		for (int k = 1; k < np; k++)
			if (p[k].revents && serve(&conns[idx[k]]) < 0)
				drop(&conns[idx[k]]);
		if (p[0].revents & POLLIN) {
			int cfd = accept(lfd, NULL, NULL);
			if (cfd < 0)
				continue;
			setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
			int slot = -1;
			for (int i = 0; i < MAX_CONN && slot < 0; i++)
				if (conns[i].fd < 0)
					slot = i;
			if (slot < 0) {
				close(cfd);
				continue;
			}
			conns[slot].fd = cfd;
			conns[slot].counter = 0;
			conns[slot].fill = 0;
		}
	}
	return 0;
}
