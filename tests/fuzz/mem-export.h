/* strata — in-memory exports for the fuzz targets that run the daemon's
 * server (tests only): a block node over a struct mem_store (raw format),
 * put in the server's table as blockdev-add would, and exported. */
#ifndef STRATA_FUZZ_MEM_EXPORT_H
#define STRATA_FUZZ_MEM_EXPORT_H

#include <stdbool.h>

#include "coro.h"
#include "mem-backend.h"
#include "server.h"

/* Node and export id name, NBD name nbd_name; allow: a --tls-allow style
 * list of the TLS identities that may see it, or NULL.  From a coroutine
 * on srv's loop.  Aborts on failure (a broken fixture, not a finding). */
void mem_export_add_co(struct server *srv, struct coro *co,
                       struct mem_store *m, const char *name,
                       const char *nbd_name, bool writable,
                       const char *allow);

#endif
