/*
 * netacct-path.h - the job namespace path, shared by the SPANK plugin
 * (netacct.c), netacct-nspath and the PAM module (../pam/pam_netacct.c), so
 * that all of them derive the same <netns_dir>/<prefix><jobid> as the Python
 * prolog (slurm_netacct.naming).
 *
 * Static functions only, no SLURM or PAM header: the including file defines
 *   static void netacct_err(const char *fmt, ...);
 * before including this one.
 */
#ifndef NETACCT_PATH_H
#define NETACCT_PATH_H

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>              /* setns: the including file defines _GNU_SOURCE */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "netacct-host.h"

#define NETACCT_DEFAULT_DIR     "/run/netns"
#define NETACCT_DEFAULT_PREFIX  "netacct-"
#define NETACCT_JOBID_DIGITS    10      /* UINT32_MAX is 4294967295 */
/* Characters of prefix= as written (%h counts 2): slurm_netacct.naming.MAX_PREFIX_LEN. */
#define NETACCT_PREFIX_MAX      32
/* SLURM's NO_VAL (0xfffffffe) and INFINITE (0xffffffff) are never job ids;
 * slurm_netacct.naming.MAX_JOB_ID is the same limit. */
#define NETACCT_JOBID_MAX       0xfffffffdU

#define NETACCT_ENGINE_NETNS    0
#define NETACCT_ENGINE_CGROUP   1
#define NETACCT_CG_AUTO         0       /* slurm on a pure cgroup v2 host, else own */
#define NETACCT_CG_SLURM        1       /* count SLURM's job_<id> (cgroup/v2) */
#define NETACCT_CG_OWN          2       /* count the engine's own cgroup of the job */

struct netacct_conf {
	char netns_dir[PATH_MAX];       /* without trailing '/'; "" is "/" */
	char prefix[NETACCT_PREFIX_MAX + 1];
	int required;
	int engine;                     /* engine=netns|cgroup (config `engine`) */
	char bpffs[PATH_MAX];           /* bpffs=PATH (config `bpffs`) */
	int cgroup_mode;                /* cgroup=auto|slurm|own (config cgroup.mode) */
	char cgroup_root[PATH_MAX];     /* cgroup_root=PATH (config cgroup.root); "": derived */
};

static int prefix_char_ok(char c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')
		|| (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
}

static int set_netns_dir(struct netacct_conf *c, const char *val)
{
	size_t len = strlen(val);

	if (len == 0 || val[0] != '/') {
		netacct_err("netns_dir=%s: must be an absolute path", val);
		return -1;
	}
	while (len > 0 && val[len - 1] == '/')
		len--;
	if (len >= sizeof(c->netns_dir)) {
		netacct_err("netns_dir=%s: too long", val);
		return -1;
	}
	memcpy(c->netns_dir, val, len);
	c->netns_dir[len] = '\0';
	return 0;
}

static int set_prefix(struct netacct_conf *c, const char *val)
{
	size_t len = strlen(val);
	size_t i;

	if (len == 0 || len > NETACCT_PREFIX_MAX) {
		netacct_err("prefix=%s: length must be 1..%d", val,
			    NETACCT_PREFIX_MAX);
		return -1;
	}
	for (i = 0; i < len; i++) {
		if (val[i] == '%' && val[i + 1] == 'h') {
			i++;    /* %h: the short host name, expanded per task */
			continue;
		}
		if (!prefix_char_ok(val[i])) {
			netacct_err("prefix=%s: only A-Z a-z 0-9 . _ - and %%h "
				    "allowed", val);
			return -1;
		}
	}
	memcpy(c->prefix, val, len + 1);
	return 0;
}

static int set_required(struct netacct_conf *c, const char *val)
{
	if (strcmp(val, "yes") == 0)
		c->required = 1;
	else if (strcmp(val, "no") == 0)
		c->required = 0;
	else {
		netacct_err("required=%s: must be yes or no", val);
		return -1;
	}
	return 0;
}

/* An absolute directory argument into dst (trailing '/' dropped). */
static int set_dir(const char *key, char *dst, size_t size, const char *val)
{
	size_t len = strlen(val);

	if (len == 0 || val[0] != '/' || strstr(val, "/../") != NULL ||
	    strstr(val, "/./") != NULL) {
		netacct_err("%s=%s: must be an absolute path without . or .. "
			    "components", key, val);
		return -1;
	}
	while (len > 1 && val[len - 1] == '/')
		len--;
	if (len >= size) {
		netacct_err("%s=%s: too long", key, val);
		return -1;
	}
	memcpy(dst, val, len);
	dst[len] = '\0';
	return 0;
}

static int set_engine(struct netacct_conf *c, const char *val)
{
	if (strcmp(val, "netns") == 0)
		c->engine = NETACCT_ENGINE_NETNS;
	else if (strcmp(val, "cgroup") == 0)
		c->engine = NETACCT_ENGINE_CGROUP;
	else {
		netacct_err("engine=%s: must be netns or cgroup", val);
		return -1;
	}
	return 0;
}

static int set_cgroup_mode(struct netacct_conf *c, const char *val)
{
	if (strcmp(val, "auto") == 0)
		c->cgroup_mode = NETACCT_CG_AUTO;
	else if (strcmp(val, "slurm") == 0)
		c->cgroup_mode = NETACCT_CG_SLURM;
	else if (strcmp(val, "own") == 0)
		c->cgroup_mode = NETACCT_CG_OWN;
	else {
		netacct_err("cgroup=%s: must be auto, slurm or own", val);
		return -1;
	}
	return 0;
}

/*
 * Parse the plugstack.conf arguments into *c (defaults first).
 * Returns 0, or -1 after reporting the first bad argument.
 */
static int netacct_parse_args(int ac, char **av, struct netacct_conf *c)
{
	int seen_dir = 0, seen_prefix = 0, seen_required = 0, seen_engine = 0;
	int seen_bpffs = 0, seen_cgroup = 0, seen_cgroup_root = 0;
	int i;

	memset(c, 0, sizeof(*c));
	strcpy(c->netns_dir, NETACCT_DEFAULT_DIR);
	strcpy(c->prefix, NETACCT_DEFAULT_PREFIX);
	c->required = 1;
	c->engine = NETACCT_ENGINE_NETNS;
	strcpy(c->bpffs, "/sys/fs/bpf");
	c->cgroup_mode = NETACCT_CG_AUTO;

	for (i = 0; i < ac; i++) {
		const char *arg = av[i];
		const char *eq = strchr(arg, '=');
		const char *val;
		size_t klen;
		int *seen;
		int rc;

		if (eq == NULL) {
			netacct_err("bad argument '%s': expected key=value",
				    arg);
			return -1;
		}
		klen = (size_t) (eq - arg);
		val = eq + 1;

		if (klen == 9 && strncmp(arg, "netns_dir", klen) == 0) {
			seen = &seen_dir;
			rc = set_netns_dir(c, val);
		} else if (klen == 6 && strncmp(arg, "prefix", klen) == 0) {
			seen = &seen_prefix;
			rc = set_prefix(c, val);
		} else if (klen == 8 && strncmp(arg, "required", klen) == 0) {
			seen = &seen_required;
			rc = set_required(c, val);
		} else if (klen == 6 && strncmp(arg, "engine", klen) == 0) {
			seen = &seen_engine;
			rc = set_engine(c, val);
		} else if (klen == 5 && strncmp(arg, "bpffs", klen) == 0) {
			seen = &seen_bpffs;
			rc = set_dir("bpffs", c->bpffs, sizeof(c->bpffs), val);
		} else if (klen == 6 && strncmp(arg, "cgroup", klen) == 0) {
			seen = &seen_cgroup;
			rc = set_cgroup_mode(c, val);
		} else if (klen == 11 && strncmp(arg, "cgroup_root", klen) == 0) {
			seen = &seen_cgroup_root;
			rc = set_dir("cgroup_root", c->cgroup_root,
				     sizeof(c->cgroup_root), val);
		} else {
			netacct_err("unknown argument '%s' (known: netns_dir=, "
				    "prefix=, required=, engine=, bpffs=, "
				    "cgroup=, cgroup_root=)", arg);
			return -1;
		}
		if (rc < 0)
			return -1;
		if ((*seen)++) {
			netacct_err("argument '%.*s=' given more than once",
				    (int) klen, arg);
			return -1;
		}
	}

	/* Reject now a directory so long that no job's path would fit. */
	if (strlen(c->netns_dir) + 1 + strlen(c->prefix) + NETACCT_JOBID_DIGITS
	    >= PATH_MAX) {
		netacct_err("netns_dir=%s: too long for prefix=%s",
			    c->netns_dir, c->prefix);
		return -1;
	}
	return 0;
}

/* A host name that may become part of a file name: [A-Za-z0-9._-]{1,64}. */
static int node_name_ok(const char *node)
{
	size_t i, len = node ? strlen(node) : 0;

	if (len == 0 || len > 64 || strcmp(node, ".") == 0 ||
	    strcmp(node, "..") == 0)
		return 0;
	for (i = 0; i < len; i++)
		if (!prefix_char_ok(node[i]))
			return 0;
	return 1;
}

/*
 * Write <netns_dir>/<prefix><jobid> into buf, with %h in the prefix replaced
 * by node, the short host name (as slurm_netacct.naming.netns_name does).  Returns 0, or -1
 * (reported).
 */
static int netacct_build_path(const struct netacct_conf *c, uint32_t jobid,
			      const char *node, char *buf, size_t len)
{
	char prefix[PATH_MAX];
	const char *p;
	size_t o = 0;
	int n;

	if (jobid == 0 || jobid > NETACCT_JOBID_MAX) {
		netacct_err("invalid job id %u", (unsigned int) jobid);
		return -1;
	}
	for (p = c->prefix; *p; p++) {
		if (p[0] == '%' && p[1] == 'h') {
			if (!node_name_ok(node)) {
				netacct_err("prefix=%s needs the host name, and "
					    "'%s' is not usable", c->prefix,
					    node ? node : "");
				return -1;
			}
			n = snprintf(prefix + o, sizeof(prefix) - o, "%s",
				     node);
			if (n < 0 || (size_t) n >= sizeof(prefix) - o)
				goto toolong;
			o += (size_t) n;
			p++;
			continue;
		}
		if (o + 1 >= sizeof(prefix))
			goto toolong;
		prefix[o++] = *p;
	}
	prefix[o] = '\0';
	n = snprintf(buf, len, "%s/%s%u", c->netns_dir, prefix,
		     (unsigned int) jobid);
	if (n < 0 || (size_t) n >= len)
		goto toolong;
	return 0;
toolong:
	netacct_err("namespace path for job %u too long", jobid);
	return -1;
}

/*
 * Move the calling thread into job `jobid`'s network namespace: build its
 * path (into path), open it, setns.  Returns 0, or -1 with a one-line reason
 * in msg.  Used by the SPANK plugin (each task) and the PAM module (each
 * adopted ssh session), so that both enter the very same namespace.
 */
static inline int netacct_enter_job_netns(const struct netacct_conf *c,
					  uint32_t jobid, char *path,
					  size_t pathlen, char *msg,
					  size_t msglen)
{
	char node[256];
	int fd, err;

	netacct_short_hostname(node, sizeof(node));
	if (netacct_build_path(c, jobid, node, path, pathlen) < 0) {
		snprintf(msg, msglen, "job %u: cannot build the network "
			 "namespace path", jobid);
		return -1;
	}
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		err = errno;
		snprintf(msg, msglen, "job %u: cannot open network namespace "
			 "%s: %s%s", jobid, path, strerror(err),
			 err == ENOENT ? " (did the netacct prolog run?)" : "");
		return -1;
	}
	/* setns checks that fd is a network namespace (EINVAL if not). */
	if (setns(fd, CLONE_NEWNET) < 0) {
		err = errno;
		close(fd);
		snprintf(msg, msglen, "job %u: cannot enter network namespace "
			 "%s: setns: %s", jobid, path, strerror(err));
		return -1;
	}
	close(fd);
	return 0;
}

#endif /* NETACCT_PATH_H */
