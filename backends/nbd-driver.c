/* strata — the nbd: backend driver: specs, backing names and QMP file
 * nodes of layers served by other NBD servers (see backend.h for the ops,
 * nbd-spec.h for the syntax).  The spec work needs no libnbd; open does,
 * and says so when stratad was built without it. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "nbd-spec.h"
#include "strata-config.h"

static int nbd_validate(const char *spec, struct error **errp)
{
    struct nbd_spec s;
    int r = nbd_spec_parse(spec, &s, errp);
    if (r == 0)
        nbd_spec_clear(&s);
    return r;
}

#if !STRATA_HAVE_NBD
struct backend *nbd_backend_open(struct loop *loop, const char *spec,
                                 const struct backend_open_opts *opts,
                                 struct error **errp)
{
    (void)loop;
    (void)opts;
    error_setf(errp, ENOTSUP, "%s: nbd: layers are unavailable: stratad "
               "was built without libnbd (install libnbd-dev, then meson "
               "setup -Dnbd=enabled)", spec);
    return NULL;
}
#endif

static int nbd_remove(const char *spec, struct error **errp)
{
    return error_setf(errp, ENOTSUP, "%s: an NBD export cannot be deleted "
                      "by its client", spec);
}

static char *nbd_resolve_backing(const char *overlay, const char *name,
                                 const char *settings, struct error **errp)
{
    char *p = NULL;
    if (nbd_spec_resolve_backing(overlay, settings, name, &p, errp) < 0)
        return NULL;
    return p;
}

/* What a header records: the server and the export, as QEMU reads them
 * back (no strata options). */
static char *nbd_backing_name(const char *overlay, const char *layer,
                              struct error **errp)
{
    struct nbd_spec s;
    (void)overlay;
    if (nbd_spec_parse(layer, &s, errp) < 0)
        return NULL;
    char *name = nbd_spec_format(&s, false);
    nbd_spec_clear(&s);
    if (!name)
        error_setf(errp, ENOMEM, "out of memory");
    return name;
}

/* The export name alone, when layer is on the overlay's server and its
 * name reads back the same through QEMU's combination (same directory
 * part of the export name). */
static char *nbd_relative_backing_name(const char *overlay, const char *layer,
                                       struct error **errp)
{
    struct nbd_spec o, t;
    char *name = NULL;
    if (nbd_spec_parse(overlay, &o, NULL) < 0) {
        error_setf(errp, EINVAL, "%s cannot be named relative to %s", layer,
                   overlay);
        return NULL;
    }
    if (nbd_spec_parse(layer, &t, NULL) == 0) {
        const char *os = strrchr(o.export, '/'), *ts = strrchr(t.export, '/');
        size_t od = os ? (size_t)(os - o.export + 1) : 0;
        size_t td = ts ? (size_t)(ts - t.export + 1) : 0;
        if (nbd_spec_same_server(&o, &t) && od == td &&
            !strncmp(o.export, t.export, od) && t.export[td] &&
            !nbd_spec_claims(t.export + td) && t.export[td] != '/')
            name = strdup(t.export + td);
        nbd_spec_clear(&t);
    }
    nbd_spec_clear(&o);
    if (!name)
        error_setf(errp, EINVAL, "%s cannot be named relative to %s (not "
                   "an export of the same server)", layer, overlay);
    return name;
}

static bool nbd_same_storage(const char *a, const char *b)
{
    struct nbd_spec x, y;
    if (nbd_spec_parse(a, &x, NULL) < 0)
        return false;
    if (nbd_spec_parse(b, &y, NULL) < 0) {
        nbd_spec_clear(&x);
        return false;
    }
    bool same = nbd_spec_same_server(&x, &y) && !strcmp(x.export, y.export);
    nbd_spec_clear(&x);
    nbd_spec_clear(&y);
    return same;
}

/* ---- QMP file nodes: QEMU's BlockdevOptionsNbd ---- */

static const char *kv_get(const struct backend_kv *kv, size_t n,
                          const char *key)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(kv[i].key, key))
            return kv[i].val;
    return NULL;
}

static char *nbd_spec_from_options(const struct backend_kv *kv, size_t n,
                                   const char *prefix, struct error **errp)
{
    static const char *const known[] = {
        "server.type", "server.host", "server.port", "server.path",
        "export", "reconnect-delay",
    };
    for (size_t i = 0; i < n; i++) {
        const char *k = kv[i].key;
        bool ok = false;
        for (size_t j = 0; j < sizeof(known) / sizeof(*known); j++)
            ok |= !strcmp(k, known[j]);
        if (ok)
            continue;
        if (!strcmp(k, "tls-creds") || !strcmp(k, "tls-hostname"))
            error_setf(errp, EINVAL, "Parameter '%s%s' is not supported by "
                       "strata's nbd backend (no QMP credential objects): "
                       "give {\"driver\": \"file\", \"filename\": "
                       "\"nbds://HOST/EXPORT?tls-certificates=DIR\"}",
                       prefix, k);
        else if (!strcmp(k, "x-dirty-bitmap") || !strcmp(k, "open-timeout"))
            error_setf(errp, EINVAL, "Parameter '%s%s' is not supported by "
                       "strata's nbd backend", prefix, k);
        else
            error_setf(errp, EINVAL, "Parameter '%s%.64s' is unexpected",
                       prefix, k);
        return NULL;
    }
    const char *type = kv_get(kv, n, "server.type");
    if (!type) {
        error_setf(errp, EINVAL, "Parameter '%sserver.type' is missing",
                   prefix);
        return NULL;
    }
    struct nbd_spec s = {0};
    bool is_unix = !strcmp(type, "unix");
    if (!is_unix && strcmp(type, "inet")) {
        error_setf(errp, EINVAL, "Parameter '%sserver.type' does not accept "
                   "value '%s' (strata supports 'inet' and 'unix')", prefix,
                   type);
        return NULL;
    }
    const char *need[] = {is_unix ? "server.path" : "server.host",
                          is_unix ? NULL : "server.port"};
    for (size_t i = 0; i < 2; i++) {
        if (need[i] && !kv_get(kv, n, need[i])) {
            error_setf(errp, EINVAL, "Parameter '%s%s' is missing", prefix,
                       need[i]);
            return NULL;
        }
    }
    const char *wrong = is_unix ? (kv_get(kv, n, "server.host") ? "host" :
                                   kv_get(kv, n, "server.port") ? "port" : NULL)
                                : kv_get(kv, n, "server.path") ? "path" : NULL;
    if (wrong) {
        error_setf(errp, EINVAL, "Parameter '%sserver.%s' is unexpected",
                   prefix, wrong);
        return NULL;
    }
    const char *exp = kv_get(kv, n, "export");
    const char *delay = kv_get(kv, n, "reconnect-delay");
    s.export = strdup(exp ? exp : "");
    if (is_unix) {
        s.socket = strdup(kv_get(kv, n, "server.path"));
    } else {
        s.host = strdup(kv_get(kv, n, "server.host"));
        s.port = strdup(kv_get(kv, n, "server.port"));
    }
    char *spec = NULL;
    if (!s.export || (is_unix ? !s.socket : !s.host || !s.port)) {
        error_setf(errp, ENOMEM, "out of memory");
        goto out;
    }
    if (delay) {
        s.reconnect_delay_set = true;
        char *end;
        unsigned long v = strtoul(delay, &end, 10);
        if (!*delay || *end || v > NBD_SPEC_MAX_RECONNECT_DELAY) {
            error_setf(errp, EINVAL, "Parameter '%sreconnect-delay' expects "
                       "whole seconds from 0 to %u", prefix,
                       NBD_SPEC_MAX_RECONNECT_DELAY);
            goto out;
        }
        s.reconnect_delay = (unsigned)v;
    }
    spec = nbd_spec_format(&s, true);
    if (!spec) {
        error_setf(errp, ENOMEM, "out of memory");
        goto out;
    }
    /* What the user gave must parse back (a port out of range, a host
     * with a '/'). */
    if (nbd_validate(spec, errp) < 0) {
        error_prefix(errp, "%sserver: ", prefix);
        free(spec);
        spec = NULL;
    }
out:
    nbd_spec_clear(&s);
    return spec;
}

BACKEND_REGISTER_DRIVER(nbd_driver,
    .name = "nbd",
    .prefix = "nbd:",
    .flags = BACKEND_DRV_OFFLOAD,
    .validate = nbd_validate,
    .open = nbd_backend_open,
    .remove = nbd_remove,
    .resolve_backing = nbd_resolve_backing,
    .backing_name = nbd_backing_name,
    .relative_backing_name = nbd_relative_backing_name,
    .same_storage = nbd_same_storage,
    .spec_from_options = nbd_spec_from_options,
    .check_settings = nbd_spec_check_settings,
    .claims = nbd_spec_claims,
);
