/* strata — in-memory exports for the fuzz targets (see mem-export.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "exports.h"
#include "format.h"
#include "mem-export.h"
#include "tls.h"

static void die(const char *what, struct error *err)
{
    fprintf(stderr, "mem_export_add_co: %s: %s\n", what,
            err ? err->msg : "?");
    abort();
}

void mem_export_add_co(struct server *srv, struct coro *co,
                       struct mem_store *m, const char *name,
                       const char *nbd_name, bool writable,
                       const char *allow)
{
    struct error *err = NULL;
    struct backend *b = mem_backend_open(srv->loop, m, name, !writable);
    struct fmt_open_opts o = {.format = "raw", .read_only = !writable};
    struct fmt_node *n = raw_open_co(srv->loop, co, b, &o, &err);
    if (!n)
        die("raw_open_co", err);
    n->drv = &raw_driver;
    struct blockdev *bd = calloc(1, sizeof(*bd));
    void *arr = realloc(srv->bdevs, sizeof(*srv->bdevs) * (srv->n_bdevs + 1));
    if (!bd || !arr)
        abort();
    srv->bdevs = arr;
    bd->node_name = strdup(name);
    bd->driver = strdup("raw");
    bd->filename = strdup(name);
    if (!bd->node_name || !bd->driver || !bd->filename)
        abort();
    bd->read_only = !writable;
    bd->root = n;
    srv->bdevs[srv->n_bdevs++] = bd;

    struct tls_allow al = {0};
    if (allow && tls_allow_parse(allow, &al, &err) < 0)
        die("tls_allow_parse", err);
    struct export_add_config ec = {
        .id = name, .node_name = name, .name = nbd_name,
        .description = "fuzzed", .writable = writable,
        .allow = allow ? &al : NULL,
    };
    if (!server_export_add(srv, &ec, &err))
        die("server_export_add", err);
    tls_allow_clear(&al);
}
