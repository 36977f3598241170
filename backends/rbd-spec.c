/* strata — parser of rbd: export specs (see rbd-spec.h). */
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "rbd-spec.h"

/* Copies from *pp up to the first unescaped character of stop (or the
 * end) into a new string *out, dropping the escaping backslashes; *pp is
 * left on the stop character or the terminating NUL. */
static int take_token(const char **pp, const char *stop, char **out,
                      const char *spec, struct error **errp)
{
    const char *p = *pp;
    char *t = malloc(strlen(p) + 1);
    if (!t)
        return error_setf(errp, ENOMEM, "out of memory");
    size_t n = 0;
    while (*p && !strchr(stop, *p)) {
        if (*p == '\\') {
            if (!p[1]) {
                free(t);
                return error_setf(errp, EINVAL, "%s: a backslash at the end "
                                  "escapes nothing", spec);
            }
            p++;
        }
        t[n++] = *p++;
    }
    t[n] = '\0';
    *pp = p;
    *out = t;
    return 0;
}

static int parse_seconds(const char *key, const char *val, unsigned min,
                         unsigned *out, struct error **errp)
{
    unsigned long v = 0;
    const char *p = val;
    if (!*p)
        goto bad;
    for (; *p; p++) {
        if (*p < '0' || *p > '9')
            goto bad;
        v = v * 10 + (unsigned long)(*p - '0');
        if (v > RBD_SPEC_MAX_TIMEOUT)
            goto bad;
    }
    if (v < min)
        goto bad;
    *out = (unsigned)v;
    return 0;
bad:
    return error_setf(errp, EINVAL, "%s=%s: expected whole seconds from %u "
                      "to %u", key, val, min, RBD_SPEC_MAX_TIMEOUT);
}

static bool valid_ceph_key(const char *key)
{
    if (!*key)
        return false;
    for (const char *p = key; *p; p++) {
        bool ok = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                  (*p >= '0' && *p <= '9') || *p == '_' || *p == '-' ||
                  *p == ' ';
        if (!ok)
            return false;
    }
    return true;
}

static void replace(char **dst, char *val)
{
    free(*dst);
    *dst = val;
}

/* Applies one KEY=VALUE; consumes key and val whatever happens. */
static int apply_option(struct rbd_spec *s, char *key, char *val,
                        const char *spec, struct error **errp)
{
    int r = 0;
    if (!strcmp(key, "conf") || !strcmp(key, "keyring") ||
        !strcmp(key, "id")) {
        const char *v = val;
        if (!strcmp(key, "id") && !strncmp(v, "client.", 7))
            v += 7;
        if (!*v) {
            r = error_setf(errp, EINVAL, "%s: %s= needs a value", spec, key);
        } else {
            char *copy = strdup(v);
            if (!copy)
                r = error_setf(errp, ENOMEM, "out of memory");
            else if (!strcmp(key, "conf"))
                replace(&s->conf, copy);
            else if (!strcmp(key, "keyring"))
                replace(&s->keyring, copy);
            else
                replace(&s->id, copy);
        }
    } else if (!strcmp(key, "timeout")) {
        r = parse_seconds(key, val, 0, &s->timeout, errp);
    } else if (!strcmp(key, "connect_timeout")) {
        r = parse_seconds(key, val, 1, &s->connect_timeout, errp);
    } else if (!valid_ceph_key(key)) {
        r = error_setf(errp, EINVAL, "%s: '%s' is not an option name", spec,
                       key);
    } else if (s->n_opts == RBD_SPEC_MAX_OPTS) {
        r = error_setf(errp, EINVAL, "%s: more than %d Ceph options", spec,
                       RBD_SPEC_MAX_OPTS);
    } else {
        s->opts[s->n_opts].key = key;
        s->opts[s->n_opts].val = val;
        s->n_opts++;
        return 0; /* consumed into the spec */
    }
    free(key);
    free(val);
    return r;
}

int rbd_spec_parse(const char *spec, struct rbd_spec *s, struct error **errp)
{
    memset(s, 0, sizeof(*s));
    s->timeout = RBD_SPEC_DEFAULT_TIMEOUT;
    s->connect_timeout = RBD_SPEC_DEFAULT_CONNECT_TIMEOUT;
    if (strncmp(spec, "rbd:", 4) != 0)
        return error_setf(errp, EINVAL, "%s: not an rbd: spec", spec);

    const char *p = spec + 4;
    char *a = NULL, *b = NULL, *c = NULL;
    int r = take_token(&p, "/@:", &a, spec, errp);
    if (r < 0)
        goto fail;
    if (*p != '/') {
        r = error_setf(errp, EINVAL, "%s: expected rbd:POOL/[NAMESPACE/]IMAGE",
                       spec);
        goto fail;
    }
    p++;
    r = take_token(&p, "/@:", &b, spec, errp);
    if (r < 0)
        goto fail;
    if (*p == '/') {
        p++;
        r = take_token(&p, "/@:", &c, spec, errp);
        if (r < 0)
            goto fail;
        if (*p == '/') {
            r = error_setf(errp, EINVAL, "%s: expected rbd:POOL/[NAMESPACE/]"
                           "IMAGE (too many '/'; escape a literal one as \\/)",
                           spec);
            goto fail;
        }
        s->pool = a;
        s->ns = b;
        s->image = c;
    } else {
        s->pool = a;
        s->image = b;
    }
    a = b = c = NULL;
    if (!*s->pool || !*s->image || (s->ns && !*s->ns)) {
        r = error_setf(errp, EINVAL, "%s: empty pool, namespace or image name",
                       spec);
        goto fail;
    }
    if (*p == '@') {
        p++;
        r = take_token(&p, ":", &s->snap, spec, errp);
        if (r < 0)
            goto fail;
        if (!*s->snap) {
            r = error_setf(errp, EINVAL, "%s: empty snapshot name after '@'",
                           spec);
            goto fail;
        }
    }
    while (*p == ':') {
        p++;
        char *key = NULL, *val = NULL;
        r = take_token(&p, "=:", &key, spec, errp);
        if (r < 0)
            goto fail;
        if (*p != '=') {
            r = error_setf(errp, EINVAL, "%s: option '%s': expected KEY=VALUE",
                           spec, key);
            free(key);
            goto fail;
        }
        p++;
        r = take_token(&p, ":", &val, spec, errp);
        if (r < 0) {
            free(key);
            goto fail;
        }
        r = apply_option(s, key, val, spec, errp);
        if (r < 0)
            goto fail;
    }
    /* Every token above stops on one of its stop characters or the end. */
    if (*p) {
        r = error_setf(errp, EINVAL, "%s: unexpected '%c'", spec, *p);
        goto fail;
    }
    return 0;

fail:
    free(a);
    free(b);
    free(c);
    rbd_spec_clear(s);
    return r;
}

void rbd_spec_clear(struct rbd_spec *s)
{
    free(s->pool);
    free(s->ns);
    free(s->image);
    free(s->snap);
    free(s->conf);
    free(s->id);
    free(s->keyring);
    for (size_t i = 0; i < s->n_opts; i++) {
        free(s->opts[i].key);
        free(s->opts[i].val);
    }
    memset(s, 0, sizeof(*s));
}
