/*
 * netacct.c - SPANK plugin: run every task of a SLURM job inside the job's
 * network namespace, so that its traffic is accounted per job.
 *
 * A root prolog (slurm_netacct) creates, for each job, a network namespace
 * bind-mounted at <netns_dir>/<prefix><SLURM_JOB_ID>.  This plugin makes the
 * batch script and every srun task enter that namespace just before slurmstepd
 * switches to the user, so the user cannot leave it again (no CAP_SYS_ADMIN).
 *
 * plugstack.conf:
 *   required /usr/lib/x86_64-linux-gnu/slurm-wlm/netacct.so \
 *            netns_dir=/run/netns prefix=netacct- required=yes
 *
 * Arguments (all optional, each at most once):
 *   netns_dir=PATH  absolute directory of the namespace bind mounts
 *                   (default /run/netns; trailing slashes are ignored)
 *   prefix=STR      file name prefix, [A-Za-z0-9._-]{1,245} (default netacct-)
 *   required=yes|no yes (default): a task whose namespace is missing fails.
 *                   no: the error is logged and the task runs un-namespaced.
 *
 * Built with -DNETACCT_NSPATH_MAIN the same file becomes netacct-nspath, a
 * small program that prints the path the plugin would use; it needs no SLURM
 * header or library.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef NETACCT_NSPATH_MAIN
#include <slurm/spank.h>        /* needs <stdint.h> first */
#endif

#define NETACCT_DEFAULT_DIR     "/run/netns"
#define NETACCT_DEFAULT_PREFIX  "netacct-"
#define NETACCT_JOBID_DIGITS    10      /* UINT32_MAX is 4294967295 */
#define NETACCT_PREFIX_MAX      (NAME_MAX - NETACCT_JOBID_DIGITS)
/* SLURM's NO_VAL (0xfffffffe) and INFINITE (0xffffffff) are never job ids;
 * slurm_netacct.naming.MAX_JOB_ID is the same limit. */
#define NETACCT_JOBID_MAX       0xfffffffdU

#ifndef NETACCT_NSPATH_MAIN
SPANK_PLUGIN(netacct, 1)
#endif

struct netacct_conf {
	char netns_dir[PATH_MAX];       /* without trailing '/'; "" is "/" */
	char prefix[NETACCT_PREFIX_MAX + 1];
	int required;
};

static struct netacct_conf conf;

/*
 * Report an error, prefixed "netacct: ": to the SLURM log in the plugin,
 * to stderr in netacct-nspath.
 */
static void netacct_err(const char *fmt, ...)
	__attribute__ ((format (printf, 1, 2)));

static void netacct_err(const char *fmt, ...)
{
	char msg[PATH_MAX + 256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
#ifdef NETACCT_NSPATH_MAIN
	fprintf(stderr, "netacct: %s\n", msg);
#else
	slurm_error("netacct: %s", msg);
#endif
}

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

/*
 * Parse the plugstack.conf arguments into *c (defaults first).
 * Returns 0, or -1 after reporting the first bad argument.
 */
static int netacct_parse_args(int ac, char **av, struct netacct_conf *c)
{
	int seen_dir = 0, seen_prefix = 0, seen_required = 0;
	int i;

	memset(c, 0, sizeof(*c));
	strcpy(c->netns_dir, NETACCT_DEFAULT_DIR);
	strcpy(c->prefix, NETACCT_DEFAULT_PREFIX);
	c->required = 1;

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
		} else {
			netacct_err("unknown argument '%s' (known: netns_dir=, "
				    "prefix=, required=)", arg);
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

#ifndef NETACCT_NSPATH_MAIN

/*
 * slurm_spank_init runs in every process that reads plugstack.conf: srun
 * (S_CTX_LOCAL), sbatch/salloc (S_CTX_ALLOCATOR), slurmd (S_CTX_SLURMD),
 * prolog/epilog (S_CTX_JOB_SCRIPT) and slurmstepd (S_CTX_REMOTE, once per
 * step, the extern step included).  Only slurmstepd matters here; the other
 * contexts may run on submit hosts, so they do nothing at all.
 *
 * Never setns() here: this is slurmstepd itself, and moving the daemon
 * would cut it off from slurmd and srun.
 */
int slurm_spank_init(spank_t sp, int ac, char **av)
{
	(void) sp;

	if (spank_context() != S_CTX_REMOTE)
		return 0;

	if (netacct_parse_args(ac, av, &conf) < 0)
		return -1;

	slurm_debug("netacct: namespaces at %s/%s<jobid>, required=%s",
		    conf.netns_dir, conf.prefix, conf.required ? "yes" : "no");
	return 0;
}

/*
 * slurm_spank_task_init_privileged runs in slurmstepd's child for each task,
 * still as root, just before it becomes the user and execs: the tasks of
 * srun steps and the batch script.  The extern step never calls it.
 *
 * Returning -1 makes the child _exit(1) before exec, so the task fails.
 */
int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
	char path[PATH_MAX] = "";
	char msg[PATH_MAX + 256] = "";
	char node[256] = "";
	uint32_t jobid = 0;
	spank_err_t serr;
	int fd = -1;
	int rc = -1;
	int err;

	(void) ac;
	(void) av;

	if (spank_context() != S_CTX_REMOTE)
		return 0;

	serr = spank_get_item(sp, S_JOB_ID, &jobid);
	if (serr != ESPANK_SUCCESS) {
		snprintf(msg, sizeof(msg), "cannot get job id: %s",
			 spank_strerror(serr));
		goto done;
	}
	/* The short host name for a prefix with %h, as the prolog sees it.
	 * (Not $SLURMD_NODENAME: srun passes its own environment on.) */
	if (gethostname(node, sizeof(node) - 1) == 0)
		node[strcspn(node, ".")] = '\0';
	if (netacct_build_path(&conf, jobid, node, path, sizeof(path)) < 0) {
		snprintf(msg, sizeof(msg), "job %u: cannot build the network "
			 "namespace path", jobid);
		goto done;
	}

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		err = errno;
		snprintf(msg, sizeof(msg), "job %u: cannot open network "
			 "namespace %s: %s%s", jobid, path, strerror(err),
			 err == ENOENT ? " (did the netacct prolog run?)" : "");
		goto done;
	}
	if (setns(fd, CLONE_NEWNET) < 0) {
		err = errno;
		snprintf(msg, sizeof(msg), "job %u: cannot enter network "
			 "namespace %s: setns: %s", jobid, path,
			 strerror(err));
		goto done;
	}
	slurm_debug("netacct: job %u: task entered %s", jobid, path);
	rc = 0;

done:
	if (fd >= 0)
		close(fd);
	if (rc == 0)
		return 0;

	slurm_error("netacct: %s", msg);
	if (!conf.required) {
		slurm_error("netacct: required=no: the task runs outside its "
			    "job's network namespace (not accounted)");
		return 0;
	}
	/*
	 * slurmstepd has dup2'd fd 2 to the step's stderr (task 0's: the srun
	 * terminal or the batch job's error file).  Write there directly:
	 * slurm_error's own copy on stderr is buffered and may be lost when
	 * this child _exit()s.  dprintf is one write(2) of one line.
	 */
	dprintf(STDERR_FILENO, "netacct: %s; the task is not started\n", msg);
	return -1;
}

#else /* NETACCT_NSPATH_MAIN */

/* Decimal, no sign, no leading zero, 1..NETACCT_JOBID_MAX. */
static int netacct_parse_jobid(const char *s, uint32_t *out)
{
	unsigned long long v = 0;
	const char *p;

	if (s[0] < '1' || s[0] > '9')
		goto bad;
	for (p = s; *p; p++) {
		if (*p < '0' || *p > '9' || p - s >= NETACCT_JOBID_DIGITS)
			goto bad;
		v = v * 10 + (unsigned long long) (*p - '0');
	}
	if (v > NETACCT_JOBID_MAX)
		goto bad;
	*out = (uint32_t) v;
	return 0;
bad:
	netacct_err("bad job id '%s': expected a decimal number 1..%u "
		    "without leading zeros", s, NETACCT_JOBID_MAX);
	return -1;
}

/*
 * netacct-nspath [netns_dir=PATH] [prefix=STR] [required=yes|no] JOBID
 * prints the namespace path the plugin would enter; exit 2 on bad input.
 */
int main(int argc, char **argv)
{
	char path[PATH_MAX];
	uint32_t jobid;

	if (argc < 2) {
		fprintf(stderr, "usage: netacct-nspath [netns_dir=PATH] "
			"[prefix=STR] [required=yes|no] JOBID\n");
		return 2;
	}
	if (strchr(argv[argc - 1], '=') != NULL) {
		netacct_err("missing JOBID (the last argument)");
		return 2;
	}
	if (netacct_parse_args(argc - 2, argv + 1, &conf) < 0)
		return 2;
	if (netacct_parse_jobid(argv[argc - 1], &jobid) < 0)
		return 2;
	/* %h in the prefix: the short host name, as in a task. */
	{
		char host[256] = "";

		if (gethostname(host, sizeof(host) - 1) == 0)
			host[strcspn(host, ".")] = '\0';
		if (netacct_build_path(&conf, jobid, host, path,
				       sizeof(path)) < 0)
			return 2;
	}
	if (printf("%s\n", path) < 0 || fflush(stdout) != 0)
		return 1;
	return 0;
}

#endif /* NETACCT_NSPATH_MAIN */
