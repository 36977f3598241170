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

/* ---- formatting, backing names ---- */

/* A growing string; on allocation failure it turns NULL and stays so. */
struct sbuf {
    char *p;
    size_t len, cap;
};

static void sb_putc(struct sbuf *b, char c)
{
    if (!b->p && b->cap)
        return; /* failed earlier */
    if (b->len + 2 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 64;
        char *p = realloc(b->p, cap);
        if (!p) {
            free(b->p);
            b->p = NULL;
            b->cap = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    b->p[b->len++] = c;
    b->p[b->len] = '\0';
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

/* Ceph reads "mon host", "mon-host" and "mon_host" as one option. */
static bool ceph_key_is(const char *key, const char *want)
{
    for (; *key && *want; key++, want++) {
        char k = *key == ' ' || *key == '-' ? '_' : *key;
        if (k != *want)
            return false;
    }
    return *key == *want;
}

/* The Ceph options a header may set: where the monitors are. */
static bool header_safe_option(const char *key)
{
    return ceph_key_is(key, "mon_host");
}

static int check_header_safe(const struct rbd_spec *s, const char *name,
                             struct error **errp)
{
    for (size_t i = 0; i < s->n_opts; i++)
        if (!header_safe_option(s->opts[i].key))
            return error_setf(errp, EPERM, "backing name %s sets the Ceph "
                              "option '%s': an image header may only say "
                              "where its backing image is (conf, id, keyring, "
                              "timeout, connect_timeout, mon_host)", name,
                              s->opts[i].key);
    return 0;
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

int rbd_spec_resolve_backing(const char *overlay, const char *name,
                             char **out, struct error **errp)
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
    r = check_header_safe(&s, name, errp);
    if (r < 0)
        goto out;
    if (have_o) {
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

static void drop(char **p)
{
    free(*p);
    *p = NULL;
}

int rbd_spec_backing_name(const char *layer, const char *overlay, char **out,
                          struct error **errp)
{
    struct rbd_spec s = {0}, o = {0};
    *out = NULL;
    int r = rbd_spec_parse(layer, &s, errp);
    if (r < 0)
        return r;
    if (overlay) {
        r = rbd_spec_parse(overlay, &o, errp);
        if (r < 0) {
            rbd_spec_clear(&s);
            return r;
        }
    }
    /* Ceph options a header may not carry are dropped. */
    size_t keep = 0;
    for (size_t i = 0; i < s.n_opts; i++) {
        int j = overlay ? opt_index(&o, s.opts[i].key) : -1;
        bool inherited = j >= 0 && !strcmp(o.opts[j].val, s.opts[i].val);
        if (header_safe_option(s.opts[i].key) && !inherited) {
            s.opts[keep++] = s.opts[i];
        } else {
            free(s.opts[i].key);
            free(s.opts[i].val);
        }
    }
    s.n_opts = keep;
    if (overlay) {
        /* what the overlay passes on anyway needs no saying */
        if (same_str(s.conf, o.conf))
            drop(&s.conf);
        if (same_str(s.id, o.id))
            drop(&s.id);
        if (same_str(s.keyring, o.keyring))
            drop(&s.keyring);
        if (s.timeout == o.timeout)
            s.timeout_set = false;
        if (s.connect_timeout == o.connect_timeout)
            s.connect_timeout_set = false;
    }
    *out = rbd_spec_format(&s);
    if (!*out)
        r = error_setf(errp, ENOMEM, "out of memory");
    rbd_spec_clear(&s);
    rbd_spec_clear(&o);
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
