/* strata — nbdkit's conventions for running under or around other
 * programs: captive mode (--run CMD), --print-uri and the URI a client
 * uses to reach the server.
 *
 * Captive mode: once serving, stratad runs CMD with /bin/sh -c, with these
 * variables set (the same meaning as nbdkit-captive(1)):
 *   $uri, $nbd     the NBD URI of the server (nbd+unix:///NAME?socket=PATH
 *                  or nbd://HOST:PORT/NAME: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md)
 *   $unixsocket    the unix socket path (unix listeners only)
 *   $port          the TCP port (TCP listeners only)
 *   $exportname    the default export's name
 * When CMD exits, the server shuts down gracefully and stratad exits with
 * CMD's status (128 + N when a signal N killed it, as the shell does).
 * The child is watched through a pidfd polled on the ring: nothing blocks.
 */
#ifndef STRATA_CAPTIVE_H
#define STRATA_CAPTIVE_H

#include <stdbool.h>
#include <sys/types.h>

#include "error.h"
#include "loop.h"
#include "server.h"

struct captive {
    struct server *srv;
    pid_t pid;                 /* 0: not started */
    int pidfd;
    struct loop_op exit_op;
    bool exited;
    int exit_status;           /* as a shell reports it */
};

/* The URI of srv's first unix listener (else its first TCP one) and the
 * default export: malloc'ed, NULL with *errp when there is none.  The
 * export name and socket path are percent-encoded. */
char *server_uri(struct server *srv, struct error **errp);

/* A private directory for --run without --listen: *dir (mkdtemp under
 * $TMPDIR or /tmp) and *sock inside it, both malloc'ed.  0 or -errno. */
int captive_private_socket(char **dir, char **sock);

/* Starts CMD (the server must be listening); 0 or -errno with *errp. */
int captive_start(struct captive *cap, struct server *srv, const char *cmd,
                  struct error **errp);
/* After the loop stopped: reaps the child if it has exited (it is left
 * running otherwise: the server stopped first, by a signal). */
void captive_finish(struct captive *cap);

#endif
