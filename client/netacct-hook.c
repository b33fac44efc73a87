/*
 * netacct-hook - the prolog's and epilog's fast path: hand the work to netacct-daemon.
 *
 *   netacct-hook prolog|epilog PYTHON
 *
 * Sends the SLURM environment (SLURM_*, NETACCT_*) and descriptors of this process's
 * network namespace and /etc/resolv.conf to the daemon's unix socket ($NETACCT_SOCKET,
 * default /run/slurm-netacct/daemon.sock), waits for "RC MESSAGE", prints MESSAGE on
 * stderr and exits RC. If the daemon is not there, does not answer within
 * $NETACCT_TIMEOUT seconds (default 30) or answers 75 ("do it yourself"), it execs
 * PYTHON -m slurm_netacct.cli.hooks OP, which does the same work in-process: no job fails
 * because the daemon is down. An answer that is not exactly "RC MESSAGE\n" with RC a
 * decimal from 0 to 255 is treated like no answer: the hook runs itself (it is idempotent,
 * whatever the daemon may have done). Standard C library only.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "../spank/netacct-host.h"   /* netacct_short_hostname: %h as the plugin sees it */

#define DEFAULT_SOCKET "/run/slurm-netacct/daemon.sock"
#define TEMPFAIL 75

extern char **environ;

/* A whole decimal number from lo to hi, nothing else; -1 otherwise. */
static long strict_number(const char *s, const char *end, long lo, long hi)
{
	long v = 0;

	if (s == end || end - s > 9 || (*s == '0' && end - s > 1))
		return -1;
	for (; s < end; s++) {
		if (*s < '0' || *s > '9')
			return -1;
		v = v * 10 + (*s - '0');
	}
	return v >= lo && v <= hi ? v : -1;
}

/*
 * The daemon's answer "RC MESSAGE\n" (MESSAGE may be empty): its exit code, with *msg at
 * MESSAGE; -1 if the answer is anything else (cut short, garbled, no newline at the end).
 */
static int parse_answer(char *reply, size_t len, char **msg)
{
	char *sp = memchr(reply, ' ', len);
	long rc;

	if (len < 3 || reply[len - 1] != '\n' || !sp || memchr(reply, '\0', len))
		return -1;
	rc = strict_number(reply, sp, 0, 255);
	if (rc < 0)
		return -1;
	if (memchr(sp + 1, '\n', (size_t) (reply + len - 1 - (sp + 1))))
		return -1;      /* one line only */
	*msg = sp + 1;
	return (int) rc;
}

static void fallback(const char *op, const char *python)
{
	char *argv[] = { (char *) python, "-m", "slurm_netacct.cli.hooks", (char *) op, NULL };

	execv(python, argv);
	fprintf(stderr, "netacct-%s: cannot run %s: %s\n", op, python, strerror(errno));
	_exit(1);
}

static int wanted(const char *entry)
{
	return strncmp(entry, "SLURM", 5) == 0 || strncmp(entry, "NETACCT_", 8) == 0;
}

int main(int argc, char **argv)
{
	const char *op, *python, *path, *t;
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	struct timeval tv = { .tv_sec = 30 };
	char *buf = NULL, reply[4096];
	size_t len = 0, cap = 4096, n;
	int fds[2], nfds = 0, s = -1, rc;
	ssize_t got, total = 0;
	char **e;

	if (argc != 3 || (strcmp(argv[1], "prolog") != 0 && strcmp(argv[1], "epilog") != 0)) {
		fprintf(stderr, "usage: netacct-hook prolog|epilog PYTHON\n");
		return 2;
	}
	op = argv[1];
	python = argv[2];
	path = getenv("NETACCT_SOCKET");
	if (!path || !*path)
		path = DEFAULT_SOCKET;
	if ((t = getenv("NETACCT_TIMEOUT")) && strict_number(t, t + strlen(t), 1, 86400) > 0)
		tv.tv_sec = strict_number(t, t + strlen(t), 1, 86400);
	if (strlen(path) >= sizeof(addr.sun_path))
		fallback(op, python);
	strcpy(addr.sun_path, path);

	s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0 || connect(s, (struct sockaddr *) &addr, sizeof(addr)) < 0)
		fallback(op, python);   /* no daemon: do it ourselves */

	/* "netacct/1\0OP\0KEY=VALUE\0...\0" */
	buf = malloc(cap);
	if (!buf)
		fallback(op, python);
#define PUT(str) do { \
		n = strlen(str) + 1; \
		while (len + n + 1 > cap) { \
			char *nb = realloc(buf, cap *= 2); \
			if (!nb) \
				fallback(op, python); \
			buf = nb; \
		} \
		memcpy(buf + len, str, n); \
		len += n; \
	} while (0)
	PUT("netacct/1");
	PUT(op);
	for (e = environ; *e; e++)
		if (wanted(*e) && strncmp(*e, "NETACCT_HOST=", 13) != 0)
			PUT(*e);
	{       /* our short host name, for %h in netns_prefix (as the SPANK plugin sees it) */
		char host[300] = "NETACCT_HOST=";

		netacct_short_hostname(host + 13, sizeof(host) - 13);
		if (host[13])
			PUT(host);
	}
	buf[len++] = '\0';

	fds[nfds] = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
	if (fds[nfds] < 0)
		fallback(op, python);
	nfds++;
	fds[nfds] = open("/etc/resolv.conf", O_RDONLY | O_CLOEXEC);
	if (fds[nfds] >= 0)
		nfds++;
	{
		union {
			char data[CMSG_SPACE(sizeof(int) * 2)];
			struct cmsghdr align;
		} u;
		struct iovec iov = { .iov_base = buf, .iov_len = len };
		struct msghdr msg = {
			.msg_iov = &iov, .msg_iovlen = 1,
			.msg_control = u.data, .msg_controllen = CMSG_SPACE(sizeof(int) * nfds),
		};
		struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
		size_t sent = 0;

		memset(&u, 0, sizeof(u));
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
		got = sendmsg(s, &msg, MSG_NOSIGNAL);
		if (got < 0)
			fallback(op, python);
		sent = (size_t) got;
		while (sent < len) {    /* the rest, without descriptors */
			got = send(s, buf + sent, len - sent, MSG_NOSIGNAL);
			if (got <= 0)
				fallback(op, python);
			sent += (size_t) got;
		}
	}
	setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	while ((got = recv(s, reply + total, sizeof(reply) - 1 - (size_t) total, 0)) > 0) {
		total += got;
		if ((size_t) total >= sizeof(reply) - 1)
			break;
	}
	if (total == 0)             /* timed out or the daemon died: do it ourselves */
		fallback(op, python);
	reply[total] = '\0';
	{
		char *m = NULL;

		rc = parse_answer(reply, (size_t) total, &m);
		if (rc < 0 || rc == TEMPFAIL)   /* not an answer we understand: do it ourselves */
			fallback(op, python);
		if (*m != '\n')
			fputs(m, stderr);
	}
	return rc;
}
