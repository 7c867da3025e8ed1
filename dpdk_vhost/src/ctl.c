/* The control socket: non-blocking, polled from the loop every few dozen
 * iterations; an idle loop sleeps in ctl_wait, which a request ends at once.
 * A malformed request costs one error reply. */
#include <errno.h>
#include <poll.h>
#include <time.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "ctl.h"

#define CTL_MAX_CLIENTS 16
#define CTL_MSG_MAX 4096
#define CTL_REPLY_MAX (256 * 1024)
#define CTL_MSGS_PER_POLL 8

struct ctl_client {
	int fd;
	int subscribed;
};

static int listen_fd = -1;
static char listen_path[108];
static struct ctl_client clients[CTL_MAX_CLIENTS];
static char reply_buf[CTL_REPLY_MAX];

int ctl_open(const char *path)
{
	struct sockaddr_un sa;
	int i;

	for (i = 0; i < CTL_MAX_CLIENTS; i++)
		clients[i].fd = -1;
	if (strlen(path) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "dpdk-vhost: control socket path too long: %s\n", path);
		return -1;
	}
	listen_fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (listen_fd < 0) {
		perror("dpdk-vhost: socket");
		return -1;
	}
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	unlink(path);
	if (bind(listen_fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(listen_fd, 8) < 0) {
		fprintf(stderr, "dpdk-vhost: cannot listen on %s: %s\n", path, strerror(errno));
		close(listen_fd);
		listen_fd = -1;
		return -1;
	}
	snprintf(listen_path, sizeof(listen_path), "%s", path);
	return 0;
}

void ctl_close(void)
{
	int i;

	for (i = 0; i < CTL_MAX_CLIENTS; i++)
		if (clients[i].fd >= 0) {
			close(clients[i].fd);
			clients[i].fd = -1;
		}
	if (listen_fd >= 0) {
		close(listen_fd);
		unlink(listen_path);
		listen_fd = -1;
	}
}

void ctl_subscribe(int client)
{
	clients[client].subscribed = 1;
}

static void client_drop(int c)
{
	close(clients[c].fd);
	clients[c].fd = -1;
	clients[c].subscribed = 0;
}

static void send_msg(int c, const char *buf, size_t len)
{
	if (send(clients[c].fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
		/* A client that does not read its replies is not allowed to stall the
		 * loop; it loses the connection instead. */
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			client_drop(c);
		g.ctl_errors++;
	}
}

void ctl_event(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n, c;

	buf[0] = '*';
	buf[1] = ' ';
	va_start(ap, fmt);
	n = vsnprintf(buf + 2, sizeof(buf) - 3, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	n += 2;
	if ((size_t)n > sizeof(buf) - 2)
		n = (int)sizeof(buf) - 2;
	buf[n++] = '\n';
	for (c = 0; c < CTL_MAX_CLIENTS; c++) {
		if (clients[c].fd < 0 || !clients[c].subscribed)
			continue;
		if (send(clients[c].fd, buf, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
			g.events_dropped++;
		else
			g.events_sent++;
	}
}

const char *req_str(struct ctl_req *r, const char *key)
{
	int i;

	for (i = 0; i < r->nargs; i++)
		if (strcmp(r->args[i].key, key) == 0) {
			r->args[i].used = 1;
			return r->args[i].val;
		}
	return NULL;
}

int req_u64(struct ctl_req *r, const char *key, uint64_t *v, struct sbuf *err)
{
	const char *s = req_str(r, key);
	char *end;

	if (s == NULL)
		return 0;
	errno = 0;
	*v = strtoull(s, &end, 10);
	if (*s == '\0' || *s == '-' || *end != '\0' || errno != 0) {
		sb_printf(err, "bad_arg %s=%s is not an unsigned integer", key, s);
		return -1;
	}
	return 1;
}

static int printable(const char *t)
{
	for (; *t; t++) {
		unsigned char ch = (unsigned char)*t;

		if ((ch < 0x20 && ch != '\t') || ch > 0x7e)
			return 0;
	}
	return 1;
}

static void handle(int c, char *msg, size_t len)
{
	struct ctl_req r;
	struct sbuf out = {.p = reply_buf, .len = 0, .cap = sizeof(reply_buf)};
	char *save = NULL, *tok;
	const char *bad = NULL;
	ctl_handler h;
	size_t hdr;
	int ok = 0, i;

	g.ctl_requests++;
	while (len && (msg[len - 1] == '\n' || msg[len - 1] == '\r'))
		len--;
	msg[len] = '\0';
	memset(&r, 0, sizeof(r));
	r.client = c;
	r.id = "-";

	if (memchr(msg, '\0', len) != NULL)
		bad = "bad_request request contains a NUL byte";
	else if (!printable(msg))
		bad = "bad_request request must be printable ASCII";

	tok = bad ? NULL : strtok_r(msg, " \t", &save);
	if (!bad && tok == NULL)
		bad = "bad_request empty request; send '<id> <command> key=value ...'";
	if (!bad) {
		r.id = tok;
		if (strlen(tok) > 32 || strchr(tok, '*') != NULL) {
			r.id = "-";
			bad = "bad_request request id must be 1-32 characters and not '*'";
		}
	}
	if (!bad) {
		r.cmd = strtok_r(NULL, " \t", &save);
		if (r.cmd == NULL)
			bad = "bad_request missing command after the request id";
	}
	while (!bad && (tok = strtok_r(NULL, " \t", &save)) != NULL) {
		char *eq = strchr(tok, '=');

		if (eq == NULL || eq == tok) {
			bad = "bad_request arguments must be key=value";
			break;
		}
		if (r.nargs == CTL_MAX_ARGS) {
			bad = "bad_request too many arguments";
			break;
		}
		*eq = '\0';
		for (i = 0; i < r.nargs; i++)
			if (strcmp(r.args[i].key, tok) == 0)
				bad = "bad_request duplicate argument";
		r.args[r.nargs].key = tok;
		r.args[r.nargs].val = eq + 1;
		r.nargs++;
	}

	sb_printf(&out, "%s ", r.id);
	hdr = out.len;
	if (bad) {
		sb_printf(&out, "err %s", bad);
	} else if ((h = command_lookup(r.cmd)) == NULL) {
		sb_printf(&out, "err unknown_command %s is not a command; try ping, stats or help",
			  r.cmd);
	} else {
		struct sbuf body = {.p = reply_buf + hdr + 3, .len = 0, .cap = sizeof(reply_buf) - hdr - 8};

		/* The handler writes past "ok " (3 bytes) so either outcome can be
		 * framed without copying the stats body. */
		ok = h(&r, &body) == 0;
		for (i = 0; ok && i < r.nargs; i++)
			if (!r.args[i].used) {
				ok = 0;
				body.len = 0;
				sb_printf(&body, "unknown_arg %s is not an argument of %s", r.args[i].key,
					  r.cmd);
			}
		if (body.overflow) {
			ok = 0;
			body.len = 0;
			body.overflow = 0;
			sb_printf(&body, "too_long reply does not fit; ask for one unit");
		}
		if (ok) {
			memcpy(reply_buf + hdr, "ok ", 3);
			out.len = hdr + 3 + body.len;
			if (body.len == 0)
				out.len--;
		} else {
			memmove(reply_buf + hdr + 4, body.p, body.len);
			memcpy(reply_buf + hdr, "err ", 4);
			out.len = hdr + 4 + body.len;
		}
	}
	if (!ok)
		g.ctl_errors++;
	reply_buf[out.len++] = '\n';
	send_msg(c, reply_buf, out.len);
}

void ctl_wait(uint64_t us)
{
	struct pollfd fds[CTL_MAX_CLIENTS + 1];
	struct timespec ts = {
		.tv_sec = (time_t)(us / 1000000),
		.tv_nsec = (long)(us % 1000000) * 1000,
	};
	nfds_t n = 0;
	int c;

	if (listen_fd >= 0)
		fds[n++] = (struct pollfd){.fd = listen_fd, .events = POLLIN};
	for (c = 0; c < CTL_MAX_CLIENTS; c++)
		if (clients[c].fd >= 0)
			fds[n++] = (struct pollfd){.fd = clients[c].fd, .events = POLLIN};
	/* Woken early by a request or a hangup; ctl_poll then reads it. */
	if (ppoll(fds, n, &ts, NULL) < 0 && errno != EINTR)
		nanosleep(&ts, NULL);
}

void ctl_poll(void)
{
	char msg[CTL_MSG_MAX + 1];
	int c, k;

	if (listen_fd < 0)
		return;
	g.ctl_polls++;
	for (k = 0; k < 4; k++) {
		int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (fd < 0)
			break;
		for (c = 0; c < CTL_MAX_CLIENTS && clients[c].fd >= 0; c++)
			;
		if (c == CTL_MAX_CLIENTS) {
			static const char full[] = "- err no_space too many control clients\n";

			if (send(fd, full, sizeof(full) - 1, MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
				g.ctl_errors++;
			close(fd);
			continue;
		}
		clients[c].fd = fd;
		clients[c].subscribed = 0;
	}
	for (c = 0; c < CTL_MAX_CLIENTS; c++) {
		for (k = 0; k < CTL_MSGS_PER_POLL && clients[c].fd >= 0; k++) {
			struct msghdr mh;
			struct iovec iov = {.iov_base = msg, .iov_len = CTL_MSG_MAX};
			ssize_t n;

			memset(&mh, 0, sizeof(mh));
			mh.msg_iov = &iov;
			mh.msg_iovlen = 1;
			n = recvmsg(clients[c].fd, &mh, MSG_DONTWAIT);
			if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK &&
				       errno != EINTR)) {
				client_drop(c);
				break;
			}
			if (n < 0)
				break;
			if (mh.msg_flags & MSG_TRUNC) {
				static const char big[] = "- err too_long request exceeds 4096 bytes\n";

				g.ctl_errors++;
				send_msg(c, big, sizeof(big) - 1);
				continue;
			}
			handle(c, msg, (size_t)n);
		}
	}
}
