/* strata — telling a service manager (systemd, Type=notify) how the
 * daemon is doing: READY=1 once it serves, STOPPING=1 when it starts to
 * shut down, STATUS= lines for humans.
 *
 * The protocol (sd_notify(3), a public and stable interface): one
 * datagram of "KEY=VALUE\n" lines to the unix socket named by
 * $NOTIFY_SOCKET (a path, or "@name" for the abstract namespace).  Built
 * with libsystemd, its sd_notify() sends it; without it, notify.c sends
 * the same datagram itself, so the feature never depends on the build.
 * Without $NOTIFY_SOCKET nothing is sent.
 */
#ifndef STRATA_NOTIFY_H
#define STRATA_NOTIFY_H

/* Sends state (e.g. "READY=1\nSTATUS=serving"); returns 1 if sent, 0 if
 * no service manager listens, -errno on failure.  Never blocks. */
int notify_send(const char *state);
/* printf-style. */
int notify_sendf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
