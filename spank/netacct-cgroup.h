/*
 * netacct-cgroup.h - the cgroup engine's side of the SPANK plugin and the PAM
 * module: where a job's pinned counting programs and its own cgroup are (the
 * same paths as slurm_netacct.naming.bpf_prog_pin and job_cgroup), moving the
 * calling process into the job's own cgroup (mode "own"), and attaching the
 * pinned programs to SLURM's job cgroup (mode "slurm", cgroup/v2).
 *
 * Raw bpf(2) through syscall(2): no libbpf.  Static functions only; include
 * after netacct-path.h.
 */
#ifndef NETACCT_CGROUP_H
#define NETACCT_CGROUP_H

#include <linux/bpf.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <stdlib.h>

#define NETACCT_CGROUP2_MAGIC   0x63677270      /* CGROUP2_SUPER_MAGIC */
#define NETACCT_CGROUP_MOUNT    "/sys/fs/cgroup"
#define NETACCT_UNIFIED_MOUNT   "/sys/fs/cgroup/unified"
#define NETACCT_PIN_DIR         "slurm-netacct"  /* naming.BPF_PIN_DIR */
#define NETACCT_CG_ROOT_NAME    "slurm-netacct"  /* naming.CGROUP_ROOT_NAME */
#define NETACCT_PINS_MISSING    (-2)

/* The two programs: 0 egress ("out", what the job sends), 1 ingress ("in"). */
static inline const char *netacct_prog_suffix(int dir)
{
	return dir == 0 ? "-out" : "-in";
}

static inline enum bpf_attach_type netacct_prog_type(int dir)
{
	return dir == 0 ? BPF_CGROUP_INET_EGRESS : BPF_CGROUP_INET_INGRESS;
}

static inline int netacct_is_cgroup2(const char *path)
{
	struct statfs s;

	return statfs(path, &s) == 0 && s.f_type == NETACCT_CGROUP2_MAGIC;
}

/* The cgroup v2 hierarchy: /sys/fs/cgroup (pure v2) or .../unified (hybrid). */
static const char *netacct_cgroup2_mount(void)
{
	return netacct_is_cgroup2(NETACCT_CGROUP_MOUNT) ? NETACCT_CGROUP_MOUNT
		: NETACCT_UNIFIED_MOUNT;
}

/* cgroup=auto: SLURM's job cgroup where SLURM can run cgroup/v2, else own. */
static inline int netacct_cgroup_mode(const struct netacct_conf *c)
{
	if (c->cgroup_mode != NETACCT_CG_AUTO)
		return c->cgroup_mode;
	return netacct_is_cgroup2(NETACCT_CGROUP_MOUNT) ? NETACCT_CG_SLURM
		: NETACCT_CG_OWN;
}

/*
 * <dir>/<prefix><jobid><suffix> into buf, %h expanded as netacct_build_path
 * does.  Returns 0, or -1 (reported).
 */
static inline int netacct_build_in(const struct netacct_conf *c, const char *dir,
			    uint32_t jobid, const char *suffix, char *buf,
			    size_t len)
{
	static struct netacct_conf tmp;         /* large: not on the stack */
	char node[256];
	size_t used;

	tmp = *c;
	if (snprintf(tmp.netns_dir, sizeof(tmp.netns_dir), "%s", dir) >=
	    (int) sizeof(tmp.netns_dir)) {
		netacct_err("directory %s too long", dir);
		return -1;
	}
	netacct_short_hostname(node, sizeof(node));
	if (netacct_build_path(&tmp, jobid, node, buf, len) < 0)
		return -1;
	used = strlen(buf);
	if (used + strlen(suffix) >= len) {
		netacct_err("path for job %u too long", jobid);
		return -1;
	}
	strcpy(buf + used, suffix);
	return 0;
}

/* The job's own cgroup (mode "own"): <cgroup_root>/<prefix><jobid>. */
static inline int netacct_own_cgroup(const struct netacct_conf *c, uint32_t jobid,
			      char *buf, size_t len)
{
	char root[PATH_MAX];

	if (c->cgroup_root[0] != '\0')
		snprintf(root, sizeof(root), "%s", c->cgroup_root);
	else
		snprintf(root, sizeof(root), "%s/%s", netacct_cgroup2_mount(),
			 NETACCT_CG_ROOT_NAME);
	return netacct_build_in(c, root, jobid, "", buf, len);
}

/* A pinned program of the job: <bpffs>/slurm-netacct/<prefix><jobid>-out|-in. */
static inline int netacct_prog_pin(const struct netacct_conf *c, uint32_t jobid,
			    int dir, char *buf, size_t len)
{
	char pins[PATH_MAX];

	if (snprintf(pins, sizeof(pins), "%s/%s", c->bpffs, NETACCT_PIN_DIR) >=
	    (int) sizeof(pins)) {
		netacct_err("bpffs=%s: too long", c->bpffs);
		return -1;
	}
	return netacct_build_in(c, pins, jobid, netacct_prog_suffix(dir), buf,
				len);
}

/*
 * Mode "own": move the calling process into the job's own cgroup (made by the
 * prolog), so that every socket it and its children open is counted.  Needs
 * root.  Returns 0, or -1 with a one-line reason in msg.
 */
static inline int netacct_enter_job_cgroup(const struct netacct_conf *c,
				    uint32_t jobid, char *path, size_t pathlen,
				    char *msg, size_t msglen)
{
	char procs[PATH_MAX + 16], pid[24];
	int fd, err, n;

	if (netacct_own_cgroup(c, jobid, path, pathlen) < 0) {
		snprintf(msg, msglen, "job %u: cannot build the cgroup path",
			 jobid);
		return -1;
	}
	snprintf(procs, sizeof(procs), "%s/cgroup.procs", path);
	fd = open(procs, O_WRONLY | O_CLOEXEC);
	if (fd < 0) {
		err = errno;
		snprintf(msg, msglen, "job %u: cannot open %s: %s%s", jobid,
			 procs, strerror(err),
			 err == ENOENT ? " (did the netacct prolog run?)" : "");
		return -1;
	}
	n = snprintf(pid, sizeof(pid), "%d\n", (int) getpid());
	if (write(fd, pid, (size_t) n) != n) {
		err = errno;
		close(fd);
		snprintf(msg, msglen, "job %u: cannot move into cgroup %s: %s",
			 jobid, path, strerror(err));
		return -1;
	}
	close(fd);
	return 0;
}

static inline long netacct_bpf(int cmd, union bpf_attr *attr)
{
	return syscall(SYS_bpf, cmd, attr, sizeof(*attr));
}

/*
 * The job-level cgroup of the calling process: the cgroup v2 path from
 * /proc/self/cgroup up to (not including) its "step_*" component, i.e.
 * .../job_<id> (or the SLUID directory of SLURM 26.05), as a full path under
 * the cgroup v2 mount.  A job_<n> directory must be this job's.  Returns 0,
 * or -1 with a reason in msg.
 */
static inline int netacct_slurm_job_cgroup(uint32_t jobid, char *path, size_t len,
				    char *msg, size_t msglen)
{
	char line[PATH_MAX + 8], *cg = NULL, *step, *base;
	FILE *f = fopen("/proc/self/cgroup", "re");

	if (f == NULL) {
		snprintf(msg, msglen, "cannot read /proc/self/cgroup: %s",
			 strerror(errno));
		return -1;
	}
	while (fgets(line, sizeof(line), f) != NULL) {
		if (strncmp(line, "0::", 3) == 0) {
			cg = line + 3;
			cg[strcspn(cg, "\n")] = '\0';
			break;
		}
	}
	fclose(f);
	if (cg == NULL) {
		snprintf(msg, msglen, "job %u: this process has no cgroup v2 "
			 "path", jobid);
		return -1;
	}
	step = strstr(cg, "/step_");
	if (step == NULL || step == cg) {
		snprintf(msg, msglen, "job %u: cgroup %s is not a SLURM step's "
			 "(cgroup/v2 needed for cgroup=slurm)", jobid, cg);
		return -1;
	}
	*step = '\0';
	base = strrchr(cg, '/');
	base = base ? base + 1 : cg;
	if (strncmp(base, "job_", 4) == 0 &&
	    strtoul(base + 4, NULL, 10) != (unsigned long) jobid) {
		snprintf(msg, msglen, "job %u: the step's cgroup is %s's", jobid,
			 base);
		return -1;
	}
	if (snprintf(path, len, "%s%s", netacct_cgroup2_mount(), cg) >=
	    (int) len) {
		snprintf(msg, msglen, "job %u: cgroup path too long", jobid);
		return -1;
	}
	return 0;
}

/*
 * 1 if program progfd is attached to cgroup cgfd as type, 0 if not, -1 if
 * that cannot be asked.  (The kernel refuses to attach one program twice with
 * BPF_F_ALLOW_MULTI, with EINVAL: that is how a repeat is told apart.)
 */
static inline int netacct_is_attached(int cgfd, int progfd,
				      enum bpf_attach_type type)
{
	struct bpf_prog_info info;
	union bpf_attr attr;
	uint32_t ids[64];
	uint32_t i;

	memset(&info, 0, sizeof(info));
	memset(&attr, 0, sizeof(attr));
	attr.info.bpf_fd = (uint32_t) progfd;
	attr.info.info_len = sizeof(info);
	attr.info.info = (uint64_t) (uintptr_t) &info;
	if (netacct_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr) < 0)
		return -1;
	memset(&attr, 0, sizeof(attr));
	attr.query.target_fd = (uint32_t) cgfd;
	attr.query.attach_type = type;
	attr.query.prog_ids = (uint64_t) (uintptr_t) ids;
	attr.query.prog_cnt = 64;
	if (netacct_bpf(BPF_PROG_QUERY, &attr) < 0)
		return -1;
	for (i = 0; i < attr.query.prog_cnt && i < 64; i++)
		if (ids[i] == info.id)
			return 1;
	return 0;
}

/*
 * Mode "slurm": attach the job's pinned programs to the job-level cgroup of
 * the calling slurmstepd (already in job_<id>/step_*), with BPF_F_ALLOW_MULTI
 * so that SLURM's own device program and any other stay.  Already attached
 * (another step's stepd did it) is success.  Returns 0, -1 with a reason in
 * msg, or NETACCT_PINS_MISSING (reason in msg) when the job's programs are not
 * pinned (yet: with PrologFlags=RunInJob the extern step starts before the
 * prolog).
 */
static inline int netacct_attach_job_cgroup(const struct netacct_conf *c,
				     uint32_t jobid, char *path, size_t pathlen,
				     char *msg, size_t msglen)
{
	char pin[PATH_MAX];
	union bpf_attr attr;
	int cgfd, progfd, d, err, rc = -1;

	if (netacct_slurm_job_cgroup(jobid, path, pathlen, msg, msglen) < 0)
		return -1;
	cgfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (cgfd < 0) {
		snprintf(msg, msglen, "job %u: cannot open cgroup %s: %s", jobid,
			 path, strerror(errno));
		return -1;
	}
	for (d = 0; d < 2; d++) {
		if (netacct_prog_pin(c, jobid, d, pin, sizeof(pin)) < 0) {
			snprintf(msg, msglen, "job %u: cannot build the program "
				 "pin path", jobid);
			goto done;
		}
		memset(&attr, 0, sizeof(attr));
		attr.pathname = (uint64_t) (uintptr_t) pin;
		attr.file_flags = 0;
		progfd = (int) netacct_bpf(BPF_OBJ_GET, &attr);
		if (progfd < 0) {
			err = errno;
			snprintf(msg, msglen, "job %u: cannot open %s: %s%s",
				 jobid, pin, strerror(err), err == ENOENT ?
				 " (did the netacct prolog run?)" : "");
			if (err == ENOENT)
				rc = NETACCT_PINS_MISSING;
			goto done;
		}
		memset(&attr, 0, sizeof(attr));
		attr.target_fd = (uint32_t) cgfd;
		attr.attach_bpf_fd = (uint32_t) progfd;
		attr.attach_type = netacct_prog_type(d);
		attr.attach_flags = BPF_F_ALLOW_MULTI;
		if (netacct_bpf(BPF_PROG_ATTACH, &attr) < 0 &&
		    netacct_is_attached(cgfd, progfd, netacct_prog_type(d)) != 1) {
			err = errno;
			close(progfd);
			snprintf(msg, msglen, "job %u: cannot attach %s to %s: %s",
				 jobid, pin, path, strerror(err));
			goto done;
		}
		close(progfd);
	}
	rc = 0;
done:
	close(cgfd);
	return rc;
}

#endif /* NETACCT_CGROUP_H */
