/* strata — the rbd: backend driver: specs, backing names and QMP file
 * nodes of Ceph RBD images (see backend.h for the ops, rbd-spec.h for the
 * syntax).  The spec work needs no librbd; open and remove do, and say so
 * when stratad was built without it. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "rbd-spec.h"
#include "strata-config.h"

static int rbd_validate(const char *spec, struct error **errp)
{
    struct rbd_spec s;
    int r = rbd_spec_parse(spec, &s, errp);
    if (r == 0)
        rbd_spec_clear(&s);
    return r;
}

#if !STRATA_HAVE_RBD
struct backend *rbd_backend_open(struct loop *loop, const char *spec,
                                 const struct backend_open_opts *opts,
                                 struct error **errp)
{
    (void)loop;
    (void)opts;
    error_setf(errp, ENOTSUP, "%s: rbd: exports are unavailable: stratad "
               "was built without librbd (install librbd-dev and "
               "librados-dev, then meson setup -Drbd=enabled)", spec);
    return NULL;
}

int rbd_backend_remove(const char *spec, struct error **errp)
{
    return error_setf(errp, ENOTSUP, "%s: stratad was built without librbd",
                      spec);
}
#endif

static char *rbd_resolve_backing(const char *overlay, const char *name,
                                 const char *settings, struct error **errp)
{
    char *p = NULL;
    (void)settings;
    if (rbd_spec_resolve_backing(overlay, name, &p, errp) < 0)
        return NULL;
    return p;
}

static char *rbd_backing_name(const char *overlay, const char *layer,
                              struct error **errp)
{
    char *p = NULL;
    bool on_rbd = !strncmp(overlay, "rbd:", 4);
    if (rbd_spec_backing_name(layer, on_rbd ? overlay : NULL, &p, errp) < 0)
        return NULL;
    return p;
}

/* The bare IMAGE[@SNAP] of layer, when it is in the overlay's pool and
 * namespace. */
static char *rbd_relative_backing_name(const char *overlay, const char *layer,
                                       struct error **errp)
{
    char *name = NULL;
    struct rbd_spec o, t;
    if (rbd_spec_parse(overlay, &o, NULL) < 0) {
        error_setf(errp, EINVAL, "%s cannot be named relative to %s", layer,
                   overlay);
        return NULL;
    }
    if (rbd_spec_parse(layer, &t, NULL) == 0) {
        bool same_pool = !strcmp(o.pool, t.pool) &&
                         ((!o.ns && !t.ns) ||
                          (o.ns && t.ns && !strcmp(o.ns, t.ns)));
        if (same_pool && !strpbrk(t.image, "/@") &&
            asprintf(&name, "%s%s%s", t.image, t.snap ? "@" : "",
                     t.snap ? t.snap : "") < 0)
            name = NULL;
        rbd_spec_clear(&t);
    }
    rbd_spec_clear(&o);
    if (!name)
        error_setf(errp, EINVAL, "%s cannot be named relative to %s (not "
                   "in the same pool and namespace)", layer, overlay);
    return name;
}

/* ---- QMP file nodes: QEMU's BlockdevOptionsRbd ---- */

static const char *const rbd_qmp_keys[] = {
    "pool", "image", "namespace", "snapshot", "conf", "user",
};

static const char *kv_get(const struct backend_kv *kv, size_t n,
                          const char *key)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(kv[i].key, key))
            return kv[i].val;
    return NULL;
}

/* Is key "name" or "name.SOMETHING"? */
static bool key_under(const char *key, const char *name)
{
    size_t n = strlen(name);
    return !strncmp(key, name, n) && (key[n] == '\0' || key[n] == '.');
}

/* Checks one "server..." key: server.N.host or server.N.port. */
static int check_server_key(const char *key, const char *val,
                            const char *prefix, struct error **errp)
{
    if (!strcmp(key, "server")) {
        if (val)
            return error_setf(errp, EINVAL, "Invalid parameter type for "
                              "'%sserver', expected: array", prefix);
        return 0; /* an empty list */
    }
    char *end;
    unsigned long i = strtoul(key + 7, &end, 10);
    if (*end != '.')
        return error_setf(errp, EINVAL, "Invalid parameter type for "
                          "'%sserver[%lu]', expected: object", prefix, i);
    if (strcmp(end + 1, "host") && strcmp(end + 1, "port"))
        return error_setf(errp, EINVAL, "Parameter '%sserver[].%.64s' is "
                          "unexpected", prefix, end + 1);
    return 0;
}

/* QEMU's "server": [{host, port}...] as Ceph's mon_host
 * ("host:port;host:port", IPv6 hosts in brackets).  *out NULL when the
 * list is empty. */
static int mon_host_of(const struct backend_kv *kv, size_t n,
                       const char *prefix, char **out, struct error **errp)
{
    char *hosts = NULL;
    size_t len = 0;
    *out = NULL;
    for (unsigned i = 0;; i++) {
        char hk[32], pk[32], ik[32];
        snprintf(hk, sizeof(hk), "server.%u.host", i);
        snprintf(pk, sizeof(pk), "server.%u.port", i);
        snprintf(ik, sizeof(ik), "server.%u", i);
        bool any = false;
        for (size_t j = 0; j < n; j++)
            any |= key_under(kv[j].key, ik);
        if (!any)
            break;
        const char *h = kv_get(kv, n, hk), *port = kv_get(kv, n, pk);
        if (!h || !port) {
            free(hosts);
            return error_setf(errp, EINVAL, "Parameter '%sserver[].%s' is "
                              "missing", prefix, h ? "port" : "host");
        }
        bool v6 = strchr(h, ':') != NULL;
        size_t add = strlen(h) + strlen(port) + 5;
        char *grown = realloc(hosts, len + add);
        if (!grown) {
            free(hosts);
            return error_setf(errp, ENOMEM, "out of memory");
        }
        hosts = grown;
        len += (size_t)snprintf(hosts + len, add, "%s%s%s%s:%s", i ? ";" : "",
                                v6 ? "[" : "", h, v6 ? "]" : "", port);
    }
    *out = hosts;
    return 0;
}

static char *rbd_spec_from_options(const struct backend_kv *kv, size_t n,
                                   const char *prefix, struct error **errp)
{
    bool unsupported = false;
    for (size_t i = 0; i < n; i++) {
        const char *k = kv[i].key;
        bool known = false;
        for (size_t j = 0; j < sizeof(rbd_qmp_keys) / sizeof(*rbd_qmp_keys); j++)
            known |= !strcmp(k, rbd_qmp_keys[j]);
        if (known)
            continue;
        if (key_under(k, "server")) {
            if (check_server_key(k, kv[i].val, prefix, errp) < 0)
                return NULL;
        } else if (!strcmp(k, "key-secret") ||
                   key_under(k, "auth-client-required") ||
                   key_under(k, "encrypt")) {
            unsupported = true;
        } else {
            error_setf(errp, EINVAL, "Parameter '%s%.64s' is unexpected",
                       prefix, k);
            return NULL;
        }
    }
    if (!kv_get(kv, n, "pool") || !kv_get(kv, n, "image")) {
        error_setf(errp, EINVAL, "Parameter '%s%s' is missing", prefix,
                   kv_get(kv, n, "pool") ? "image" : "pool");
        return NULL;
    }
    if (unsupported) {
        error_setf(errp, EINVAL, "Parameters '%skey-secret', "
                   "'%sauth-client-required' and '%sencrypt' are not "
                   "supported by strata: give the key in a keyring named by "
                   "the Ceph configuration ('conf')", prefix, prefix, prefix);
        return NULL;
    }
    struct rbd_spec sp = {0};
    const char *v[] = {kv_get(kv, n, "pool"), kv_get(kv, n, "image"),
                       kv_get(kv, n, "namespace"), kv_get(kv, n, "snapshot"),
                       kv_get(kv, n, "conf"), kv_get(kv, n, "user")};
    char **dst[] = {&sp.pool, &sp.image, &sp.ns, &sp.snap, &sp.conf, &sp.id};
    bool oom = false;
    for (size_t i = 0; i < sizeof(v) / sizeof(*v); i++) {
        *dst[i] = v[i] ? strdup(v[i]) : NULL;
        oom |= v[i] && !*dst[i];
    }
    char *spec = NULL, *hosts = NULL;
    if (mon_host_of(kv, n, prefix, &hosts, errp) < 0)
        goto out;
    if (hosts) {
        sp.opts[0].key = strdup("mon_host");
        sp.opts[0].val = hosts;
        sp.n_opts = 1;
        oom |= !sp.opts[0].key;
    }
    if (!oom)
        spec = rbd_spec_format(&sp);
    if (!spec)
        error_setf(errp, ENOMEM, "out of memory");
out:
    rbd_spec_clear(&sp);
    return spec;
}

BACKEND_REGISTER_DRIVER(rbd_driver,
    .name = "rbd",
    .prefix = "rbd:",
    .flags = BACKEND_DRV_OFFLOAD,
    .validate = rbd_validate,
    .open = rbd_backend_open,
    .remove = rbd_backend_remove,
    .resolve_backing = rbd_resolve_backing,
    .backing_name = rbd_backing_name,
    .relative_backing_name = rbd_relative_backing_name,
    .same_storage = rbd_spec_same_image,
    .spec_from_options = rbd_spec_from_options,
);
