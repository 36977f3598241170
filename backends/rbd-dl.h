/* strata — librbd and librados, loaded when first needed (see rbd-dl.c).
 *
 * stratad does not link librbd: rbd-dl.c defines each librbd and librados
 * function strata calls, under its real name, as a forwarder into the
 * library loaded by rbd_dl_load().  Only built with librbd's headers
 * (STRATA_HAVE_RBD).
 */
#ifndef STRATA_RBD_DL_H
#define STRATA_RBD_DL_H

#include "error.h"

/* Loads librados.so.2 and librbd.so.1 and resolves every function strata
 * uses; must have succeeded before any rbd_* or rados_* call.  The first
 * success is final (the libraries stay loaded for the life of the process)
 * and later calls return 0 at once; after a failure the next call tries
 * again, so installing the libraries needs no restart.  Control path:
 * blocks while a short-lived thread of its own maps the libraries and runs
 * their static initialisers (they need more stack than a coroutine has);
 * safe to call from any thread and from a coroutine.  Returns 0, or
 * -ENOTSUP with errp set when a library or a function is missing. */
int rbd_dl_load(struct error **errp);

#endif
