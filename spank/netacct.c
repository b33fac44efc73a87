/*
 * netacct.c - SPANK plugin: run every task of a SLURM job inside the job's
 * network namespace, so that its traffic is accounted per job; or, with the
 * cgroup engine (engine=cgroup), make the job's cgroup the one that counts.
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
 *   engine=netns|cgroup  config `engine` (default netns)
 *   bpffs=PATH      config `bpffs` (default /sys/fs/bpf)
 *   cgroup=auto|slurm|own  config cgroup.mode (default auto)
 *   cgroup_root=PATH config cgroup.root (default <cgroup v2 mount>/slurm-netacct)
 *
 * engine=cgroup: the prolog has pinned the job's two counting programs
 * (<bpffs>/slurm-netacct/<prefix><jobid>-out and -in).  cgroup=slurm (SLURM's
 * cgroup/v2): slurm_spank_init, in every slurmstepd of the job (the extern
 * step's first, with PrologFlags=Contain), attaches them to the job's cgroup,
 * .../job_<id>, before any task or adopted ssh session exists.  cgroup=own
 * (SLURM on cgroup v1): every task, the batch script included, moves itself
 * into the job's own cgroup, <cgroup_root>/<prefix><jobid>, before it execs.
 *
 * Built with -DNETACCT_NSPATH_MAIN the same file becomes netacct-nspath, a
 * small program that prints the path the plugin would use; it needs no SLURM
 * header or library.  With -DNETACCT_CGATTACH_MAIN it becomes netacct-cgattach,
 * which does what slurm_spank_init does with cgroup=slurm (for tests).
 */
#define _GNU_SOURCE

#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if !defined(NETACCT_NSPATH_MAIN) && !defined(NETACCT_CGATTACH_MAIN)
#define NETACCT_PLUGIN
#include <slurm/spank.h>        /* needs <stdint.h> first */
SPANK_PLUGIN(netacct, 1)
#endif

static void netacct_err(const char *fmt, ...)
	__attribute__ ((format (printf, 1, 2)));

#include "netacct-path.h"
#include "netacct-cgroup.h"

#define NETACCT_EXTERN_STEP     0xfffffffcU     /* SLURM_EXTERN_CONT */

static struct netacct_conf conf;

/*
 * Report an error, prefixed "netacct: ": to the SLURM log in the plugin,
 * to stderr in netacct-nspath.
 */
static void netacct_err(const char *fmt, ...)
{
	char msg[PATH_MAX + 256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
#ifndef NETACCT_PLUGIN
	fprintf(stderr, "netacct: %s\n", msg);
#else
	slurm_error("netacct: %s", msg);
#endif
}

#ifdef NETACCT_PLUGIN

/*
 * slurm_spank_init runs in every process that reads plugstack.conf: srun
 * (S_CTX_LOCAL), sbatch/salloc (S_CTX_ALLOCATOR), slurmd (S_CTX_SLURMD),
 * prolog/epilog (S_CTX_JOB_SCRIPT) and slurmstepd (S_CTX_REMOTE, once per
 * step, the extern step included).  Only slurmstepd matters here; the other
 * contexts may run on submit hosts, so they do nothing at all.
 *
 * Never setns() here: this is slurmstepd itself, and moving the daemon
 * would cut it off from slurmd and srun.
 *
 * engine=cgroup, cgroup=slurm: here slurmstepd is already in its step's
 * cgroup under the job's (proctrack_g_create ran before spank_init), and no
 * task exists yet: attach the job's programs to the job's cgroup.  The extern
 * step may find them not pinned yet: with PrologFlags=RunInJob it starts
 * before the prolog (which it runs itself); the batch and srun steps, which
 * start after the prolog, attach them then.  Any other step requires them.
 */
int slurm_spank_init(spank_t sp, int ac, char **av)
{
	char path[PATH_MAX] = "";
	char msg[PATH_MAX + 256] = "";
	uint32_t jobid = 0, stepid = 0;
	spank_err_t serr;
	int rc;

	if (spank_context() != S_CTX_REMOTE)
		return 0;

	if (netacct_parse_args(ac, av, &conf) < 0)
		return -1;

	if (conf.engine == NETACCT_ENGINE_NETNS) {
		slurm_debug("netacct: namespaces at %s/%s<jobid>, required=%s",
			    conf.netns_dir, conf.prefix,
			    conf.required ? "yes" : "no");
		return 0;
	}
	if (netacct_cgroup_mode(&conf) != NETACCT_CG_SLURM)
		return 0;       /* own: each task moves itself (task_init_privileged) */
	serr = spank_get_item(sp, S_JOB_ID, &jobid);
	if (serr != ESPANK_SUCCESS) {
		snprintf(msg, sizeof(msg), "cannot get job id: %s",
			 spank_strerror(serr));
		goto fail;
	}
	rc = netacct_attach_job_cgroup(&conf, jobid, path, sizeof(path), msg,
				       sizeof(msg));
	if (rc == NETACCT_PINS_MISSING &&
	    spank_get_item(sp, S_JOB_STEPID, &stepid) == ESPANK_SUCCESS &&
	    stepid == NETACCT_EXTERN_STEP) {
		slurm_debug("netacct: %s; the extern step leaves it to the "
			    "job's other steps", msg);
		return 0;
	}
	if (rc < 0)
		goto fail;
	slurm_debug("netacct: job %u: counting programs on %s", jobid, path);
	return 0;
fail:
	slurm_error("netacct: %s", msg);
	if (!conf.required) {
		slurm_error("netacct: required=no: the job runs without its "
			    "counting programs (not accounted)");
		return 0;
	}
	return -1;
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
	uint32_t jobid = 0;
	spank_err_t serr;
	int rc = -1;

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
	/* %h is the short host name, as the prolog sees it (not
	 * $SLURMD_NODENAME: srun passes its own environment on). */
	if (conf.engine == NETACCT_ENGINE_CGROUP) {
		if (netacct_cgroup_mode(&conf) == NETACCT_CG_OWN &&
		    netacct_enter_job_cgroup(&conf, jobid, path, sizeof(path),
					     msg, sizeof(msg)) < 0)
			goto done;
	} else if (netacct_enter_job_netns(&conf, jobid, path, sizeof(path),
					   msg, sizeof(msg)) < 0)
		goto done;
	slurm_debug("netacct: job %u: task entered %s", jobid, path);
	rc = 0;

done:
	if (rc == 0)
		return 0;

	slurm_error("netacct: %s", msg);
	if (!conf.required) {
		slurm_error("netacct: required=no: the task runs outside its "
			    "job's %s (not accounted)",
			    conf.engine == NETACCT_ENGINE_CGROUP ? "cgroup" :
			    "network namespace");
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

#else /* netacct-nspath, netacct-cgattach */

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

#ifdef NETACCT_CGATTACH_MAIN
/*
 * netacct-cgattach [ARGS...] JOBID: as slurm_spank_init with engine=cgroup
 * cgroup=slurm, run in a process inside job_<JOBID>/step_*: attach the job's
 * pinned programs to the job's cgroup; print its path.  Exit 1 on failure,
 * 3 when the programs are not pinned.
 */
int main(int argc, char **argv)
{
	char path[PATH_MAX], msg[PATH_MAX + 256];
	uint32_t jobid;
	int rc;

	if (argc < 2 || netacct_parse_args(argc - 2, argv + 1, &conf) < 0 ||
	    netacct_parse_jobid(argv[argc - 1], &jobid) < 0)
		return 2;
	rc = netacct_attach_job_cgroup(&conf, jobid, path, sizeof(path), msg,
				       sizeof(msg));
	if (rc < 0) {
		netacct_err("%s", msg);
		return rc == NETACCT_PINS_MISSING ? 3 : 1;
	}
	printf("%s\n", path);
	return 0;
}
#else
/*
 * netacct-nspath [netns_dir=PATH] [prefix=STR] [required=yes|no] [engine=...]
 * [bpffs=PATH] [cgroup=...] [cgroup_root=PATH] JOBID prints the namespace path
 * the plugin would enter; with engine=cgroup instead the job's own cgroup and
 * its two program pins, one a line.  Exit 2 on bad input.
 */
int main(int argc, char **argv)
{
	char path[PATH_MAX];
	uint32_t jobid;

	if (argc < 2) {
		fprintf(stderr, "usage: netacct-nspath [netns_dir=PATH] "
			"[prefix=STR] [required=yes|no] [engine=netns|cgroup] "
			"[bpffs=PATH] [cgroup=auto|slurm|own] "
			"[cgroup_root=PATH] JOBID\n");
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
	if (conf.engine == NETACCT_ENGINE_CGROUP) {
		char out[PATH_MAX], in[PATH_MAX];

		if (netacct_own_cgroup(&conf, jobid, path, sizeof(path)) < 0 ||
		    netacct_prog_pin(&conf, jobid, 0, out, sizeof(out)) < 0 ||
		    netacct_prog_pin(&conf, jobid, 1, in, sizeof(in)) < 0)
			return 2;
		if (printf("%s\n%s\n%s\n", path, out, in) < 0 ||
		    fflush(stdout) != 0)
			return 1;
		return 0;
	}
	/* %h in the prefix: the short host name, as in a task. */
	{
		char host[256];

		netacct_short_hostname(host, sizeof(host));
		if (netacct_build_path(&conf, jobid, host, path,
				       sizeof(path)) < 0)
			return 2;
	}
	if (printf("%s\n", path) < 0 || fflush(stdout) != 0)
		return 1;
	return 0;
}
#endif /* NETACCT_CGATTACH_MAIN */

#endif /* NETACCT_PLUGIN */
