/*
 * netacct-host.h - the short host name, what %h in the namespace prefix stands for: shared
 * by the SPANK plugin and the PAM module (through netacct-path.h) and by the prolog/epilog
 * client (../client/netacct-hook.c), so that all of them mean the same name as the Python
 * side (slurm_netacct.naming.short_hostname).
 */
#ifndef NETACCT_HOST_H
#define NETACCT_HOST_H

#include <string.h>
#include <unistd.h>

/* The host name up to its first '.' into buf, "" if unknown. */
static inline void netacct_short_hostname(char *buf, size_t len)
{
	if (gethostname(buf, len) != 0)
		buf[0] = '\0';
	buf[len - 1] = '\0';
	buf[strcspn(buf, ".")] = '\0';
}

#endif /* NETACCT_HOST_H */
