/* strata — parser of rbd: export specs (see rbd-spec.h). */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
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
        s->timeout_set = r == 0;
    } else if (!strcmp(key, "connect_timeout")) {
        r = parse_seconds(key, val, 1, &s->connect_timeout, errp);
        s->connect_timeout_set = r == 0;
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

/* Parses ":KEY=VALUE"... from *pp into s up to the end. */
static int parse_options(const char **pp, struct rbd_spec *s, const char *spec,
                         struct error **errp)
{
    const char *p = *pp;
    int r;
    while (*p == ':') {
        p++;
        char *key = NULL, *val = NULL;
        r = take_token(&p, "=:", &key, spec, errp);
        if (r < 0)
            return r;
        if (*p != '=') {
            r = error_setf(errp, EINVAL, "%s: option '%s': expected KEY=VALUE",
                           spec, key);
            free(key);
            return r;
        }
        p++;
        r = take_token(&p, ":", &val, spec, errp);
        if (r < 0) {
            free(key);
            return r;
        }
        r = apply_option(s, key, val, spec, errp);
        if (r < 0)
            return r;
    }
    /* Every token above stops on one of its stop characters or the end. */
    *pp = p;
    if (*p)
        return error_setf(errp, EINVAL, "%s: unexpected '%c'", spec, *p);
    return 0;
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
    r = parse_options(&p, s, spec, errp);
    if (r < 0)
        goto fail;
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

int rbd_spec_parse_settings(const char *settings, struct rbd_spec *s,
                            struct error **errp)
{
    memset(s, 0, sizeof(*s));
    s->timeout = RBD_SPEC_DEFAULT_TIMEOUT;
    s->connect_timeout = RBD_SPEC_DEFAULT_CONNECT_TIMEOUT;
    if (!settings || !*settings)
        return 0;
    char *text = NULL;
    if (asprintf(&text, ":%s", settings) < 0)
        return error_setf(errp, ENOMEM, "out of memory");
    const char *p = text;
    int r = parse_options(&p, s, settings, errp);
    free(text);
    if (r < 0)
        rbd_spec_clear(s);
    return r;
}

/* ---- formatting, backing names ---- */

/* A growing string; on allocation failure it turns NULL and stays so. */
struct sbuf {
    char *p;
    size_t len, cap;
    bool failed;                   /* out of memory: p is NULL from now on */
};

static void sb_putc(struct sbuf *b, char c)
{
    if (b->failed)
        return;
    if (b->len + 2 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 64;
        char *p = realloc(b->p, cap);
        if (!p) {
            free(b->p);
            b->p = NULL;
            b->failed = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    b->p[b->len] = c;
    b->p[b->len + 1] = '\0';
    b->len++;
}

static void sb_puts(struct sbuf *b, const char *s)
{
    while (*s)
        sb_putc(b, *s++);
}

/* s with a backslash before every character of special (and backslash). */
static void sb_escaped(struct sbuf *b, const char *s, const char *special)
{
    for (; *s; s++) {
        if (*s == '\\' || strchr(special, *s))
            sb_putc(b, '\\');
        sb_putc(b, *s);
    }
}

static void sb_option(struct sbuf *b, const char *key, const char *val)
{
    sb_putc(b, ':');
    sb_escaped(b, key, ":=");
    sb_putc(b, '=');
    sb_escaped(b, val, ":");
}

static void sb_seconds(struct sbuf *b, const char *key, unsigned v)
{
    char num[16];
    snprintf(num, sizeof(num), "%u", v);
    sb_option(b, key, num);
}

char *rbd_spec_format(const struct rbd_spec *s)
{
    struct sbuf b = {0};
    sb_puts(&b, "rbd:");
    sb_escaped(&b, s->pool, "/@:");
    sb_putc(&b, '/');
    if (s->ns) {
        sb_escaped(&b, s->ns, "/@:");
        sb_putc(&b, '/');
    }
    sb_escaped(&b, s->image, "/@:");
    if (s->snap) {
        sb_putc(&b, '@');
        sb_escaped(&b, s->snap, ":");
    }
    if (s->conf)
        sb_option(&b, "conf", s->conf);
    if (s->id) {
        /* Parsing strips one "client." prefix: an id that itself starts
         * with it gets one back, so that it reads back unchanged. */
        if (!strncmp(s->id, "client.", 7)) {
            sb_putc(&b, ':');
            sb_puts(&b, "id=client.");
            sb_escaped(&b, s->id, ":");
        } else {
            sb_option(&b, "id", s->id);
        }
    }
    if (s->keyring)
        sb_option(&b, "keyring", s->keyring);
    if (s->timeout_set)
        sb_seconds(&b, "timeout", s->timeout);
    if (s->connect_timeout_set)
        sb_seconds(&b, "connect_timeout", s->connect_timeout);
    for (size_t i = 0; i < s->n_opts; i++)
        sb_option(&b, s->opts[i].key, s->opts[i].val);
    return b.p;
}

/* A header may say which image (pool, namespace, image, snapshot) and
 * nothing else: every other setting names a local path (conf, keyring), a
 * credential (id), a host (mon_host and the other Ceph options) or how
 * long the daemon waits (timeouts: 0 would make a request to a stuck
 * cluster wait for ever).  Those come from the operator. */
static int check_header_identity(const struct rbd_spec *s, const char *name,
                                 struct error **errp)
{
    const char *key = s->conf ? "conf" : s->id ? "id" : s->keyring ? "keyring"
                    : s->timeout_set ? "timeout"
                    : s->connect_timeout_set ? "connect_timeout" : NULL;
    if (!key && s->n_opts == 0)
        return 0;
    return error_setf(errp, EPERM, "backing name %s sets %s%s%s: an image "
                      "header may only name the pool, namespace, image and "
                      "snapshot of its backing image; the cluster settings "
                      "(conf, id, keyring, timeouts, mon_host and other Ceph "
                      "options) come from the export: the rbd: spec of its "
                      "top, or backing-remote=rbd:KEY=VALUE:... for RBD "
                      "images under a local image", name,
                      key ? "'" : "the Ceph option '",
                      key ? key : s->opts[0].key, "'");
}

static int opt_index(const struct rbd_spec *s, const char *key)
{
    for (size_t i = 0; i < s->n_opts; i++)
        if (!strcmp(s->opts[i].key, key))
            return (int)i;
    return -1;
}

static int dup_into(char **dst, const char *src)
{
    if (*dst || !src)
        return 0;
    *dst = strdup(src);
    return *dst ? 0 : -ENOMEM;
}

/* Fills what s leaves unsaid from the overlay's spec o. */
static int inherit(struct rbd_spec *s, const struct rbd_spec *o)
{
    if (dup_into(&s->conf, o->conf) < 0 || dup_into(&s->id, o->id) < 0 ||
        dup_into(&s->keyring, o->keyring) < 0)
        return -ENOMEM;
    if (!s->timeout_set) {
        s->timeout = o->timeout;
        s->timeout_set = o->timeout_set;
    }
    if (!s->connect_timeout_set) {
        s->connect_timeout = o->connect_timeout;
        s->connect_timeout_set = o->connect_timeout_set;
    }
    for (size_t i = 0; i < o->n_opts; i++) {
        if (opt_index(s, o->opts[i].key) >= 0)
            continue;
        if (s->n_opts == RBD_SPEC_MAX_OPTS)
            return -E2BIG;
        char *k = strdup(o->opts[i].key), *v = strdup(o->opts[i].val);
        if (!k || !v) {
            free(k);
            free(v);
            return -ENOMEM;
        }
        s->opts[s->n_opts].key = k;
        s->opts[s->n_opts].val = v;
        s->n_opts++;
    }
    return 0;
}

/* A relative backing name under an RBD overlay: IMAGE[@SNAP] in the
 * overlay's pool and namespace. */
static int parse_relative(const struct rbd_spec *o, const char *name,
                          struct rbd_spec *s, struct error **errp)
{
    memset(s, 0, sizeof(*s));
    s->timeout = RBD_SPEC_DEFAULT_TIMEOUT;
    s->connect_timeout = RBD_SPEC_DEFAULT_CONNECT_TIMEOUT;
    const char *at = strchr(name, '@');
    size_t ilen = at ? (size_t)(at - name) : strlen(name);
    if (strchr(name, '/') || ilen == 0 || (at && !at[1]))
        return error_setf(errp, EINVAL, "backing name '%s' of an RBD image: a "
                          "name that is not an rbd: spec must be IMAGE[@SNAP] "
                          "in the same pool (no '/')", name);
    s->pool = strdup(o->pool);
    s->ns = o->ns ? strdup(o->ns) : NULL;
    s->image = strndup(name, ilen);
    s->snap = at ? strdup(at + 1) : NULL;
    if (!s->pool || (o->ns && !s->ns) || !s->image || (at && !s->snap)) {
        rbd_spec_clear(s);
        return error_setf(errp, ENOMEM, "out of memory");
    }
    return 0;
}

int rbd_spec_resolve_backing(const char *overlay, const char *settings,
                             const char *name, char **out,
                             struct error **errp)
{
    struct rbd_spec o = {0}, s = {0};
    bool have_o = false;
    int r;
    *out = NULL;
    if (overlay) {
        r = rbd_spec_parse(overlay, &o, errp);
        if (r < 0)
            return r;
        have_o = true;
    }
    if (strncmp(name, "rbd:", 4) == 0) {
        r = rbd_spec_parse(name, &s, errp);
        if (r < 0) {
            error_prefix(errp, "backing name: ");
            goto out;
        }
    } else if (have_o) {
        r = parse_relative(&o, name, &s, errp);
        if (r < 0)
            goto out;
    } else {
        r = error_setf(errp, EINVAL, "%s: not an rbd: spec", name);
        goto out;
    }
    r = check_header_identity(&s, name, errp);
    if (r < 0)
        goto out;
    if (!have_o) {
        /* Under a local image: only where the export allows it, with the
         * export's settings. */
        if (!settings) {
            r = error_setf(errp, EACCES, "backing name %s names an RBD image "
                           "under a local image: set backing-remote=rbd: (or "
                           "backing-remote=rbd:conf=PATH:id=USER:...) on the "
                           "export to allow it", name);
            goto out;
        }
        r = rbd_spec_parse_settings(settings, &o, errp);
        if (r < 0) {
            error_prefix(errp, "backing-remote=rbd:");
            goto out;
        }
        have_o = true;
    }
    {
        r = inherit(&s, &o);
        if (r < 0) {
            error_setf(errp, -r, r == -E2BIG ? "backing name %s: more than %d "
                       "Ceph options with the overlay's" : "out of memory",
                       name, RBD_SPEC_MAX_OPTS);
            goto out;
        }
    }
    *out = rbd_spec_format(&s);
    if (!*out)
        r = error_setf(errp, ENOMEM, "out of memory");
out:
    rbd_spec_clear(&s);
    rbd_spec_clear(&o);
    return r;
}

static bool same_str(const char *a, const char *b)
{
    return (!a && !b) || (a && b && !strcmp(a, b));
}

int rbd_spec_backing_name(const char *layer, const char *overlay, char **out,
                          struct error **errp)
{
    struct rbd_spec s;
    (void)overlay;
    *out = NULL;
    int r = rbd_spec_parse(layer, &s, errp);
    if (r < 0)
        return r;
    struct rbd_spec id = {
        .pool = s.pool, .ns = s.ns, .image = s.image, .snap = s.snap,
    };
    *out = rbd_spec_format(&id);
    if (!*out)
        r = error_setf(errp, ENOMEM, "out of memory");
    rbd_spec_clear(&s);
    return r;
}

bool rbd_spec_same_image(const char *a, const char *b)
{
    struct rbd_spec x, y;
    if (rbd_spec_parse(a, &x, NULL) < 0)
        return false;
    if (rbd_spec_parse(b, &y, NULL) < 0) {
        rbd_spec_clear(&x);
        return false;
    }
    bool same = !strcmp(x.pool, y.pool) && same_str(x.ns, y.ns) &&
                !strcmp(x.image, y.image) && same_str(x.snap, y.snap);
    rbd_spec_clear(&x);
    rbd_spec_clear(&y);
    return same;
}
