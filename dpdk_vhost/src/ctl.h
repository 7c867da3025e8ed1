/* Control requests: `<id> <cmd> key=value ...`, one per SOCK_SEQPACKET message. */
#ifndef HAMGR_CTL_H
#define HAMGR_CTL_H

#include <stddef.h>
#include <stdint.h>

#include "dp.h"

#define CTL_MAX_ARGS 24

struct ctl_arg {
	const char *key;
	const char *val;
	int used;
};

struct ctl_req {
	const char *id;
	const char *cmd;
	int nargs;
	struct ctl_arg args[CTL_MAX_ARGS];
	int client;
};

/* A handler appends `key=value` fields to out and returns 0, or writes
 * `code message` to out and returns -1. */
typedef int (*ctl_handler)(struct ctl_req *r, struct sbuf *out);

const char *req_str(struct ctl_req *r, const char *key);
/* 1 = present and valid, 0 = absent, -1 = malformed (err already written) */
int req_u64(struct ctl_req *r, const char *key, uint64_t *v, struct sbuf *err);

ctl_handler command_lookup(const char *cmd);
void ctl_subscribe(int client);

#endif
