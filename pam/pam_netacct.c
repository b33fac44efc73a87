/*
 * pam_netacct.c - PAM session module: put a session that pam_slurm_adopt
 * adopted into a SLURM job into that job's network namespace too, so that
 * what the user runs over ssh is accounted to the job like its tasks are.
 *
 * pam_slurm_adopt (an account module) moves the sshd process that serves the
 * connection into the job's extern step: with proctrack/cgroup its cgroup
 * path then names the job (".../job_<id>/step_extern").  This module reads
 * that job id from /proc/self/cgroup in the session phase and calls
 * setns(CLONE_NEWNET) on the namespace the netacct prolog made,
 * <netns_dir>/<prefix><jobid> -- the same path the SPANK plugin enters.
 * sshd opens PAM sessions in its privileged process before it forks the
 * user's shell, so the shell and all its children start in the job's
 * namespace and, without CAP_SYS_ADMIN, cannot leave it.  sshd's own
 * connection keeps its socket (made in the node's namespace) and so is not
 * counted.
 *
 * /etc/pam.d/sshd, after pam_slurm_adopt's account line:
 *   session required pam_netacct.so netns_dir=/run/netns prefix=netacct-
 *
 * With the cgroup engine (engine=cgroup, as in plugstack.conf): cgroup=own
 * moves the session into the job's own cgroup (<cgroup_root>/<prefix><jobid>)
 * instead, so the shell and its children are counted there; cgroup=slurm
 * needs nothing (pam_slurm_adopt put the session into job_<id>, which the
 * programs count): PAM_IGNORE.
 *
 * Arguments: those of the SPANK plugin (netns_dir=, prefix=, required=,
 * engine=, bpffs=, cgroup=, cgroup_root=), with the same meaning and
 * defaults.  Outcomes of open_session:
 *   - root, or a session in no job (not adopted): PAM_IGNORE;
 *   - entered the job's namespace: PAM_SUCCESS;
 *   - a job, but its namespace cannot be entered: PAM_SESSION_ERR with
 *     required=yes (the default; the login is refused), PAM_IGNORE with
 *     required=no (logged; the session is not accounted);
 *   - bad arguments, or contradicting job ids: PAM_SESSION_ERR.
 * Everything is logged through pam_syslog, prefixed "netacct:".
 */
#define _GNU_SOURCE

#include <errno.h>
#include <limits.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>

#define PAM_SM_SESSION
#include <security/pam_modules.h>
#include <security/pam_ext.h>

/* netacct-path.h reports through this; pam_netacct sets it per call. */
static pam_handle_t *netacct_pamh;
/* Where find_job reads the process's cgroups (netacct-cgjob may change it). */
static const char *cgroup_file = "/proc/self/cgroup";

static void netacct_err(const char *fmt, ...)
	__attribute__ ((format (printf, 1, 2)));

#include "../spank/netacct-path.h"
#include "../spank/netacct-cgroup.h"

static void netacct_err(const char *fmt, ...)
{
	char msg[PATH_MAX + 256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (netacct_pamh != NULL)
		pam_syslog(netacct_pamh, LOG_ERR, "netacct: %s", msg);
	else
		syslog(LOG_AUTHPRIV | LOG_ERR, "pam_netacct: netacct: %s", msg);
}

/*
 * The job id in a cgroup path: a component "job_<decimal>" (cgroup v1:
 * /slurm[_<node>]/uid_<uid>/job_<id>/step_extern; v2:
 * .../slurmstepd.scope/job_<id>/step_extern/...).  With a "uid_<n>"
 * component before it, *uid is set to n, else to (uid_t)-1.
 * Returns the id, 0 if the path names no job.
 */
static uint32_t job_in_cgroup_path(const char *path, uid_t *uid)
{
	const char *p = path;

	*uid = (uid_t) -1;
	while (*p) {
		const char *end;
		size_t len;

		while (*p == '/')
			p++;
		end = strchr(p, '/');
		len = end ? (size_t) (end - p) : strlen(p);
		if (len > 4 && len <= 4 + 10 && strncmp(p, "uid_", 4) == 0) {
			char num[16];
			char *e;
			unsigned long v;

			memcpy(num, p + 4, len - 4);
			num[len - 4] = '\0';
			v = strtoul(num, &e, 10);
			if (*e == '\0' && num[0] >= '0' && num[0] <= '9')
				*uid = (uid_t) v;
		}
		if (len > 4 && len <= 4 + 10 && strncmp(p, "job_", 4) == 0 &&
		    p[4] >= '1' && p[4] <= '9') {
			unsigned long long v = 0;
			size_t i;

			for (i = 4; i < len && p[i] >= '0' && p[i] <= '9'; i++)
				v = v * 10 + (unsigned long long) (p[i] - '0');
			if (i == len && v <= NETACCT_JOBID_MAX)
				return (uint32_t) v;
		}
		p += len;
	}
	return 0;
}

/*
 * The job this process belongs to, from /proc/self/cgroup.  Returns 0 and
 * sets *jobid (0: in no job), or -1 (reported in msg) when the lines name
 * different jobs, or a job of another user.
 */
static int find_job(uid_t user, uint32_t *jobid, char *msg, size_t msglen)
{
	char line[PATH_MAX + 64];
	FILE *f;
	int rc = 0;

	*jobid = 0;
	f = fopen(cgroup_file, "re");
	if (f == NULL) {
		snprintf(msg, msglen, "cannot read %s: %s", cgroup_file,
			 strerror(errno));
		return -1;
	}
	while (fgets(line, sizeof(line), f) != NULL) {
		/* hierarchy-id:controllers:path */
		char *path = strchr(line, ':');
		uint32_t id;
		uid_t owner;

		if (path == NULL || (path = strchr(path + 1, ':')) == NULL)
			continue;
		path++;
		path[strcspn(path, "\n")] = '\0';
		id = job_in_cgroup_path(path, &owner);
		if (id == 0)
			continue;
		if (owner != (uid_t) -1 && owner != user) {
			snprintf(msg, msglen, "cgroup %s is another user's "
				 "(uid %u, session user uid %u)", path,
				 (unsigned int) owner, (unsigned int) user);
			rc = -1;
			break;
		}
		if (*jobid != 0 && *jobid != id) {
			snprintf(msg, msglen, "cgroups name two jobs, %u and "
				 "%u", *jobid, id);
			rc = -1;
			break;
		}
		*jobid = id;
	}
	fclose(f);
	return rc;
}

#ifndef NETACCT_CGJOB_MAIN
PAM_EXTERN int pam_sm_open_session(pam_handle_t *pamh, int flags, int argc,
				   const char **argv)
{
	struct netacct_conf conf;
	struct passwd *pw;
	const char *user = NULL;
	char path[PATH_MAX] = "";
	char msg[PATH_MAX + 256] = "";
	uint32_t jobid = 0;

	(void) flags;
	netacct_pamh = pamh;

	if (netacct_parse_args(argc, (char **) argv, &conf) < 0)
		return PAM_SESSION_ERR;         /* reported by the parser */

	if (pam_get_user(pamh, &user, NULL) != PAM_SUCCESS || user == NULL) {
		pam_syslog(pamh, LOG_ERR, "netacct: cannot get the user");
		return PAM_SESSION_ERR;
	}
	pw = getpwnam(user);
	if (pw == NULL) {
		pam_syslog(pamh, LOG_ERR, "netacct: unknown user %s", user);
		return PAM_SESSION_ERR;
	}
	if (pw->pw_uid == 0)
		return PAM_IGNORE;      /* root is never adopted */

	if (find_job(pw->pw_uid, &jobid, msg, sizeof(msg)) < 0) {
		pam_syslog(pamh, LOG_ERR, "netacct: user %s: %s", user, msg);
		pam_error(pamh, "netacct: %s", msg);
		return PAM_SESSION_ERR;
	}
	if (jobid == 0) {
		pam_syslog(pamh, LOG_DEBUG, "netacct: user %s: session is in "
			   "no job; not entering a job namespace", user);
		return PAM_IGNORE;
	}
	/*
	 * pam_slurm_adopt (SLURM >= 22.05) also exports the job it chose as
	 * SLURM_JOB_ID in the PAM environment.  The cgroup is the authority
	 * (the user cannot write it; a later pam_env may let the user set
	 * PAM variables), so a different value only refuses the session.
	 */
	{
		const char *env = pam_getenv(pamh, "SLURM_JOB_ID");
		char want[16];

		snprintf(want, sizeof(want), "%u", jobid);
		if (env != NULL && strcmp(env, want) != 0) {
			snprintf(msg, sizeof(msg), "job %u (from the cgroup) "
				 "but SLURM_JOB_ID=%.20s in the PAM "
				 "environment", jobid, env);
			pam_syslog(pamh, LOG_ERR, "netacct: user %s: %s",
				   user, msg);
			pam_error(pamh, "netacct: %s", msg);
			return PAM_SESSION_ERR;
		}
	}

	if (conf.engine == NETACCT_ENGINE_CGROUP) {
		if (netacct_cgroup_mode(&conf) != NETACCT_CG_OWN)
			return PAM_IGNORE;      /* already in SLURM's job cgroup */
		if (netacct_enter_job_cgroup(&conf, jobid, path, sizeof(path),
					     msg, sizeof(msg)) < 0)
			goto fail;
		pam_syslog(pamh, LOG_INFO, "netacct: user %s: session entered "
			   "job %u's cgroup %s", user, jobid, path);
		return PAM_SUCCESS;
	}
	if (netacct_enter_job_netns(&conf, jobid, path, sizeof(path), msg,
				    sizeof(msg)) < 0)
		goto fail;
	pam_syslog(pamh, LOG_INFO, "netacct: user %s: session entered job %u's "
		   "network namespace %s", user, jobid, path);
	return PAM_SUCCESS;

fail:
	pam_syslog(pamh, LOG_ERR, "netacct: user %s: %s", user, msg);
	if (!conf.required) {
		pam_syslog(pamh, LOG_ERR, "netacct: required=no: the session "
			   "runs outside its job's %s (not accounted)",
			   conf.engine == NETACCT_ENGINE_CGROUP ? "cgroup" :
			   "network namespace");
		return PAM_IGNORE;
	}
	pam_error(pamh, "netacct: %s; the session is refused", msg);
	return PAM_SESSION_ERR;
}

PAM_EXTERN int pam_sm_close_session(pam_handle_t *pamh, int flags, int argc,
				    const char **argv)
{
	(void) pamh;
	(void) flags;
	(void) argc;
	(void) argv;
	return PAM_SUCCESS;
}
#endif /* !NETACCT_CGJOB_MAIN */

#ifdef NETACCT_CGJOB_MAIN
/*
 * netacct-cgjob UID [FILE]: print the job id that pam_netacct would find in
 * FILE (default /proc/self/cgroup) for a session of user UID; 0 for none.
 * Exit 1 (one line on stderr) when it would refuse the session.  For tests.
 */
int main(int argc, char **argv)
{
	char msg[PATH_MAX + 256] = "";
	uint32_t jobid;

	if (argc < 2 || argc > 3) {
		fprintf(stderr, "usage: netacct-cgjob UID [FILE]\n");
		return 2;
	}
	if (argc == 3)
		cgroup_file = argv[2];
	if (find_job((uid_t) strtoul(argv[1], NULL, 10), &jobid, msg,
		     sizeof(msg)) < 0) {
		fprintf(stderr, "netacct: %s\n", msg);
		return 1;
	}
	printf("%u\n", jobid);
	return 0;
}
#endif
