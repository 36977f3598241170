/* strata — parser of nbd: export specs (see nbd-spec.h). */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "nbd-spec.h"

bool nbd_spec_claims(const char *spec)
{
    return !strncmp(spec, "nbd:", 4) || !strncmp(spec, "nbd+", 4) ||
           !strncmp(spec, "nbds:", 5) || !strncmp(spec, "nbds+", 5);
}

/* The option fields of *s, freed and set to their defaults. */
static void clear_options(struct nbd_spec *s)
{
    free(s->tls_certificates);
    free(s->tls_psk_file);
    free(s->tls_username);
    s->tls_certificates = s->tls_psk_file = s->tls_username = NULL;
    s->reconnect_delay = NBD_SPEC_DEFAULT_RECONNECT_DELAY;
    s->reconnect_delay_set = false;
    s->connect_timeout = NBD_SPEC_DEFAULT_CONNECT_TIMEOUT;
    s->connect_timeout_set = false;
    s->tls_verify_peer = s->tls_verify_peer_set = false;
}

void nbd_spec_clear(struct nbd_spec *s)
{
    clear_options(s);
    free(s->host);
    free(s->port);
    free(s->socket);
    free(s->export);
    memset(s, 0, sizeof(*s));
    clear_options(s);
}

static bool has_tls_options(const struct nbd_spec *s)
{
    return s->tls_certificates || s->tls_psk_file || s->tls_username ||
           s->tls_verify_peer_set;
}

bool nbd_spec_has_options(const struct nbd_spec *s)
{
    return s->reconnect_delay_set || s->connect_timeout_set ||
           has_tls_options(s);
}

static int dup_or_null(char **dst, const char *src)
{
    free(*dst);
    *dst = src ? strdup(src) : NULL;
    return src && !*dst ? -ENOMEM : 0;
}

/* The options src sets, copied into dst (those src leaves unset stay). */
static int copy_options(struct nbd_spec *dst, const struct nbd_spec *src)
{
    if (src->reconnect_delay_set) {
        dst->reconnect_delay = src->reconnect_delay;
        dst->reconnect_delay_set = true;
    }
    if (src->connect_timeout_set) {
        dst->connect_timeout = src->connect_timeout;
        dst->connect_timeout_set = true;
    }
    if (src->tls_verify_peer_set) {
        dst->tls_verify_peer = src->tls_verify_peer;
        dst->tls_verify_peer_set = true;
    }
    int r = 0;
    if (src->tls_certificates)
        r = dup_or_null(&dst->tls_certificates, src->tls_certificates);
    if (r == 0 && src->tls_psk_file)
        r = dup_or_null(&dst->tls_psk_file, src->tls_psk_file);
    if (r == 0 && src->tls_username)
        r = dup_or_null(&dst->tls_username, src->tls_username);
    return r;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* A new string: [p, p + n) with %XX decoded.  NULL and *bad set on a
 * malformed escape or an encoded NUL; NULL alone when out of memory. */
static char *pct_decode(const char *p, size_t n, bool *bad)
{
    char *out = malloc(n + 1);
    if (!out)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] != '%') {
            out[o++] = p[i];
            continue;
        }
        int hi = i + 1 < n ? hexval(p[i + 1]) : -1;
        int lo = i + 2 < n ? hexval(p[i + 2]) : -1;
        if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) {
            free(out);
            *bad = true;
            return NULL;
        }
        out[o++] = (char)(hi * 16 + lo);
        i += 2;
    }
    out[o] = '\0';
    return out;
}

/* Appends s percent-encoded (all but RFC 3986's unreserved characters and
 * those of keep) to the growing string *buf of length *len. */
static bool append(char **buf, size_t *len, const char *s, const char *keep)
{
    size_t n = strlen(s);
    char *grown = realloc(*buf, *len + 3 * n + 1);
    if (!grown)
        return false;
    *buf = grown;
    for (const char *p = s; *p; p++) {
        unsigned char c = (unsigned char)*p;
        bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                     (c >= '0' && c <= '9') || strchr("-._~", c) ||
                     (keep && strchr(keep, c));
        if (plain && c)
            grown[(*len)++] = (char)c;
        else
            *len += (size_t)sprintf(grown + *len, "%%%02X", c);
    }
    grown[*len] = '\0';
    return true;
}

static int parse_seconds(const char *key, const char *val, unsigned *out,
                         struct error **errp)
{
    unsigned long v = 0;
    const char *p = val;
    if (!*p)
        goto bad;
    for (; *p; p++) {
        if (*p < '0' || *p > '9')
            goto bad;
        v = v * 10 + (unsigned long)(*p - '0');
        if (v > NBD_SPEC_MAX_SECONDS)
            goto bad;
    }
    *out = (unsigned)v;
    return 0;
bad:
    return error_setf(errp, EINVAL, "%s=%s: expected whole seconds from 0 "
                      "to %u", key, val, NBD_SPEC_MAX_SECONDS);
}

static bool valid_port(const char *p, size_t n)
{
    if (n == 0 || n > 5)
        return false;
    unsigned long v = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return false;
        v = v * 10 + (unsigned long)(p[i] - '0');
    }
    return v >= 1 && v <= 65535;
}

/* HOST[:PORT] or [ADDR][:PORT] in [p, p + n) into s->host and s->port
 * (port_required: QEMU's older syntax has no default). */
static int parse_hostport(const char *p, size_t n, struct nbd_spec *s,
                          const char *spec, bool port_required,
                          struct error **errp)
{
    const char *hend, *colon = NULL;
    const char *h = p;
    size_t hn;
    if (n && p[0] == '[') {
        hend = memchr(p, ']', n);
        if (!hend)
            return error_setf(errp, EINVAL, "%s: '[' without ']' around an "
                              "IPv6 address", spec);
        h = p + 1;
        hn = (size_t)(hend - h);
        if (hend + 1 < p + n) {
            if (hend[1] != ':')
                return error_setf(errp, EINVAL, "%s: expected ':PORT' after "
                                  "']'", spec);
            colon = hend + 1;
        }
    } else {
        colon = memchr(p, ':', n);
        hn = colon ? (size_t)(colon - p) : n;
        if (colon && memchr(colon + 1, ':', (size_t)(p + n - colon - 1)))
            return error_setf(errp, EINVAL, "%s: an IPv6 address must be "
                              "written in brackets, [ADDR]", spec);
    }
    if (hn == 0)
        return error_setf(errp, EINVAL, "%s: no host (for a Unix socket "
                          "write nbd+unix:///EXPORT?socket=PATH)", spec);
    /* A name, an IPv4 address, or an IPv6 one in brackets: letters,
     * digits, "-._~" (and ':' in brackets), which the canonical form
     * writes as they are. */
    bool bracketed = h != p;
    for (size_t i = 0; i < hn; i++) {
        unsigned char c = (unsigned char)h[i];
        bool fine = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                    (c >= '0' && c <= '9') || (c && strchr("-._~", c)) ||
                    (c == ':' && bracketed);
        if (!fine && c > ' ' && c < 0x7f)
            return error_setf(errp, EINVAL, "%s: invalid character '%c' in "
                              "the host (a name, an IPv4 address or "
                              "[IPv6])", spec, c);
        if (!fine)
            return error_setf(errp, EINVAL, "%s: invalid byte 0x%02x in the "
                              "host (a name, an IPv4 address or [IPv6])",
                              spec, c);
    }
    size_t pn = colon ? (size_t)(p + n - colon - 1) : 0;
    if (colon && !valid_port(colon + 1, pn))
        return error_setf(errp, EINVAL, "%s: invalid port '%.*s' (1 to "
                          "65535)", spec, (int)pn, colon + 1);
    if (!colon && port_required)
        return error_setf(errp, EINVAL, "%s: expected nbd:HOST:PORT", spec);
    s->host = strndup(h, hn);
    s->port = colon ? strndup(colon + 1, pn) : strdup(NBD_SPEC_DEFAULT_PORT);
    if (!s->host || !s->port)
        return error_setf(errp, ENOMEM, "out of memory");
    return 0;
}

#define NBD_SPEC_OPTION_NAMES "reconnect-delay, connect-timeout, " \
    "tls-certificates, tls-psk-file, tls-username, tls-verify-peer"

/* Sets the option KEY (kn bytes at key) of *s to val, which it takes.
 * Returns 1 when KEY is an option, 0 when not (val untouched), or -errno
 * (val freed). */
static int set_option(struct nbd_spec *s, const char *key, size_t kn,
                      char *val, struct error **errp)
{
#define KEY_IS(name) (kn == sizeof(name) - 1 && !strncmp(key, name, kn))
    char **str = KEY_IS("tls-certificates") ? &s->tls_certificates
               : KEY_IS("tls-psk-file") ? &s->tls_psk_file
               : KEY_IS("tls-username") ? &s->tls_username : NULL;
    int r = 1;
    if (str) {
        if (!*val)
            r = error_setf(errp, EINVAL, "%.*s= is empty", (int)kn, key);
        else if (str != &s->tls_username && val[0] != '/')
            r = error_setf(errp, EINVAL, "%.*s=%s: expected an absolute "
                           "path", (int)kn, key, val);
        if (r < 0) {
            free(val);
            return r;
        }
        free(*str);
        *str = val;
        return 1;
    }
    if (KEY_IS("reconnect-delay")) {
        r = parse_seconds("reconnect-delay", val, &s->reconnect_delay, errp);
        s->reconnect_delay_set = true;
    } else if (KEY_IS("connect-timeout")) {
        r = parse_seconds("connect-timeout", val, &s->connect_timeout, errp);
        s->connect_timeout_set = true;
    } else if (KEY_IS("tls-verify-peer")) {
        bool yes = !strcmp(val, "true") || !strcmp(val, "on") ||
                   !strcmp(val, "1");
        bool no = !strcmp(val, "false") || !strcmp(val, "off") ||
                  !strcmp(val, "0");
        if (yes || no) {
            s->tls_verify_peer = yes;
            s->tls_verify_peer_set = true;
        } else {
            r = error_setf(errp, EINVAL, "tls-verify-peer=%s: expected true "
                           "or false", val);
        }
    } else {
        return 0;
    }
#undef KEY_IS
    free(val);
    return r < 0 ? r : 1;
}

/* The TLS options of *s fit together and with its scheme (tls: they make
 * TLS required, as in backing-remote settings). */
static int check_tls_options(const struct nbd_spec *s, bool tls,
                             const char *spec, struct error **errp)
{
    if (!tls && has_tls_options(s))
        return error_setf(errp, EINVAL, "%s: tls- options need TLS: write "
                          "nbds:// (or nbds+unix://)", spec);
    if (s->tls_certificates && s->tls_psk_file)
        return error_setf(errp, EINVAL, "%s: tls-certificates= (X.509) and "
                          "tls-psk-file= (PSK) exclude each other", spec);
    if (s->tls_username && !s->tls_psk_file)
        return error_setf(errp, EINVAL, "%s: tls-username= is the PSK "
                          "identity: it needs tls-psk-file=", spec);
    return 0;
}

/* The query of a URI: socket= (only for nbd+unix) and strata's options. */
static int parse_query(const char *q, struct nbd_spec *s, bool unix_socket,
                       const char *spec, struct error **errp)
{
    while (*q) {
        size_t n = strcspn(q, "&");
        const char *eq = memchr(q, '=', n);
        if (!eq)
            return error_setf(errp, EINVAL, "%s: query item '%.*s' is not "
                              "KEY=VALUE", spec, (int)n, q);
        size_t kn = (size_t)(eq - q);
        bool bad = false;
        char *val = pct_decode(eq + 1, n - kn - 1, &bad);
        if (!val)
            return error_setf(errp, bad ? EINVAL : ENOMEM, bad ? "%s: bad "
                              "percent-encoding" : "out of memory", spec);
        int r = 0;
        if (kn == 6 && !strncmp(q, "socket", 6) && unix_socket) {
            free(s->socket);
            s->socket = val;
            val = NULL;
            if (!s->socket[0])
                r = error_setf(errp, EINVAL, "%s: socket= is empty", spec);
        } else if (kn == 6 && !strncmp(q, "socket", 6)) {
            r = error_setf(errp, EINVAL, "%s: socket= is for nbd+unix:// "
                           "URIs", spec);
        } else {
            r = set_option(s, q, kn, val, errp);
            if (r != 0)
                val = NULL;     /* taken, or freed */
            if (r < 0)
                error_prefix(errp, "%s: ", spec);
            else if (r == 0)
                r = error_setf(errp, EINVAL, "%s: unknown option '%.*s' "
                               "(known: %s" NBD_SPEC_OPTION_NAMES ")", spec,
                               (int)kn, q, unix_socket ? "socket, " : "");
        }
        free(val);
        if (r < 0)
            return r;
        q += n;
        if (*q == '&')
            q++;
    }
    return 0;
}

static int parse_uri(const char *spec, const char *rest, bool unix_socket,
                     struct nbd_spec *s, struct error **errp)
{
    size_t an = strcspn(rest, "/?#");
    if (rest[an] == '#')
        return error_setf(errp, EINVAL, "%s: a fragment (#) means nothing "
                          "here", spec);
    if (unix_socket) {
        if (an)
            return error_setf(errp, EINVAL, "%s: nbd+unix:// takes no host: "
                              "nbd+unix:///EXPORT?socket=PATH", spec);
    } else {
        int r = parse_hostport(rest, an, s, spec, false, errp);
        if (r < 0)
            return r;
    }
    const char *p = rest + an;
    const char *q = strchr(p, '?');
    size_t pn = q ? (size_t)(q - p) : strlen(p);
    if (strchr(q ? q : p, '#'))
        return error_setf(errp, EINVAL, "%s: a fragment (#) means nothing "
                          "here", spec);
    bool bad = false;
    s->export = pct_decode(pn ? p + 1 : p, pn ? pn - 1 : 0, &bad);
    if (!s->export)
        return error_setf(errp, bad ? EINVAL : ENOMEM, bad ? "%s: bad "
                          "percent-encoding" : "out of memory", spec);
    if (q) {
        int r = parse_query(q + 1, s, unix_socket, spec, errp);
        if (r < 0)
            return r;
    }
    if (unix_socket && !s->socket)
        return error_setf(errp, EINVAL, "%s: nbd+unix:// needs "
                          "?socket=PATH", spec);
    return 0;
}

/* QEMU's older syntax: nbd:HOST:PORT[:exportname=NAME] or
 * nbd:unix:PATH[:exportname=NAME]. */
static int parse_legacy(const char *spec, struct nbd_spec *s,
                        struct error **errp)
{
    const char *body = spec + 4;
    const char *en = strstr(body, ":exportname=");
    size_t bn = en ? (size_t)(en - body) : strlen(body);
    s->export = strdup(en ? en + 12 : "");
    if (!s->export)
        return error_setf(errp, ENOMEM, "out of memory");
    if (!strncmp(body, "unix:", 5)) {
        if (bn <= 5)
            return error_setf(errp, EINVAL, "%s: expected nbd:unix:PATH",
                              spec);
        s->socket = strndup(body + 5, bn - 5);
        return s->socket ? 0 : error_setf(errp, ENOMEM, "out of memory");
    }
    return parse_hostport(body, bn, s, spec, true, errp);
}

int nbd_spec_parse(const char *spec, struct nbd_spec *s, struct error **errp)
{
    memset(s, 0, sizeof(*s));
    clear_options(s);
    int r;
    const char *rest = NULL;    /* after "nbd" or "nbds" */
    if (!strncmp(spec, "nbds", 4) && (spec[4] == ':' || spec[4] == '+')) {
        s->tls = true;
        rest = spec + 4;
    } else if (!strncmp(spec, "nbd", 3)) {
        rest = spec + 3;
    }
    if (rest && !strncmp(rest, "://", 3))
        r = parse_uri(spec, rest + 3, false, s, errp);
    else if (rest && !strncmp(rest, "+tcp://", 7))
        r = parse_uri(spec, rest + 7, false, s, errp);
    else if (rest && !strncmp(rest, "+unix://", 8))
        r = parse_uri(spec, rest + 8, true, s, errp);
    else if (rest && !s->tls && rest[0] == ':' && rest[1] != '/')
        r = parse_legacy(spec, s, errp);
    else
        r = error_setf(errp, EINVAL, "%s: expected nbd[s]://HOST[:PORT]/"
                       "EXPORT or nbd[s]+unix:///EXPORT?socket=PATH", spec);
    if (r == 0)
        r = check_tls_options(s, s->tls, spec, errp);
    if (r < 0)
        nbd_spec_clear(s);
    return r;
}

char *nbd_spec_format(const struct nbd_spec *s, bool with_options)
{
    char *buf = NULL;
    size_t len = 0;
    bool ok;
    if (s->socket) {
        ok = append(&buf, &len, s->tls ? "nbds+unix:///" : "nbd+unix:///",
                    ":/+") &&
             append(&buf, &len, s->export, "/:@!$'()*+,;") &&
             append(&buf, &len, "?socket=", "?=") &&
             append(&buf, &len, s->socket, "/:@!$'()*+,;");
    } else {
        bool v6 = strchr(s->host, ':') != NULL;
        ok = append(&buf, &len, s->tls ? "nbds://" : "nbd://", ":/") &&
             append(&buf, &len, v6 ? "[" : "", "[") &&
             append(&buf, &len, s->host, v6 ? ":" : NULL) &&
             append(&buf, &len, v6 ? "]:" : ":", "]:") &&
             append(&buf, &len, s->port, NULL);
        if (ok && s->export[0])
            ok = append(&buf, &len, "/", "/") &&
                 append(&buf, &len, s->export, "/:@!$'()*+,;");
    }
    if (ok && with_options) {
        char sep = s->socket ? '&' : '?';
        char num[48];
        if (s->reconnect_delay_set) {
            snprintf(num, sizeof(num), "%creconnect-delay=%u", sep,
                     s->reconnect_delay);
            ok = append(&buf, &len, num, "?&=");
            sep = '&';
        }
        if (ok && s->connect_timeout_set) {
            snprintf(num, sizeof(num), "%cconnect-timeout=%u", sep,
                     s->connect_timeout);
            ok = append(&buf, &len, num, "?&=");
            sep = '&';
        }
        const struct { const char *key; const char *val; } strs[] = {
            {"tls-certificates=", s->tls_certificates},
            {"tls-psk-file=", s->tls_psk_file},
            {"tls-username=", s->tls_username},
            {"tls-verify-peer=", !s->tls_verify_peer_set ? NULL :
                                 s->tls_verify_peer ? "true" : "false"},
        };
        for (size_t i = 0; ok && i < sizeof(strs) / sizeof(*strs); i++) {
            if (!strs[i].val)
                continue;
            char lead[2] = {sep, '\0'};
            ok = append(&buf, &len, lead, "?&") &&
                 append(&buf, &len, strs[i].key, "=") &&
                 append(&buf, &len, strs[i].val, "/:@!$'()*+,;");
            sep = '&';
        }
    }
    if (!ok) {
        free(buf);
        return NULL;
    }
    return buf;
}

bool nbd_spec_same_server(const struct nbd_spec *a, const struct nbd_spec *b)
{
    if (a->socket || b->socket)
        return a->socket && b->socket && !strcmp(a->socket, b->socket);
    return !strcasecmp(a->host, b->host) && !strcmp(a->port, b->port);
}

/* ---- backing names and the operator's allow list ---- */

struct nbd_allow {
    bool any;
    struct nbd_spec opt;        /* the options of the settings */
};

static void allow_clear(struct nbd_allow *a)
{
    nbd_spec_clear(&a->opt);
    a->any = false;
}

/* Does the path have a ".." component? */
static bool has_dotdot(const char *p)
{
    for (const char *c = p; (c = strstr(c, "..")); c += 2)
        if ((c == p || c[-1] == '/') && (c[2] == '\0' || c[2] == '/'))
            return true;
    return false;
}

/* Does the item (one of the settings) allow server s?  With s NULL only
 * checks the item.  Returns 1 (allowed), 0 (not), or -errno. */
static int allow_item(const char *item, const struct nbd_spec *s,
                      struct nbd_allow *a, struct error **errp)
{
    if (!strcmp(item, "*")) {
        a->any = true;
        return 1;
    }
    const char *eq = strchr(item, '=');
    if (eq) {
        char *val = strdup(eq + 1);
        if (!val)
            return error_setf(errp, ENOMEM, "out of memory");
        int r = set_option(&a->opt, item, (size_t)(eq - item), val, errp);
        if (r == 0) {
            free(val);
            return error_setf(errp, EINVAL, "'%s': unknown option (known: "
                              NBD_SPEC_OPTION_NAMES ")", item);
        }
        return r < 0 ? r : 0;
    }
    if (!strncmp(item, "unix:", 5)) {
        const char *path = item + 5;
        if (path[0] != '/' || has_dotdot(path))
            return error_setf(errp, EINVAL, "'%s': expected unix:/PATH "
                              "(absolute, without '..')", item);
        if (!s || !s->socket)
            return 0;
        size_t n = strlen(path);
        if (path[n - 1] == '/')
            return !strncmp(s->socket, path, n) && !has_dotdot(s->socket);
        return !strcmp(s->socket, path);
    }
    struct nbd_spec p = {0};
    int r = parse_hostport(item, strlen(item), &p, item, false, errp);
    if (r < 0) {
        nbd_spec_clear(&p);
        error_prefix(errp, "expected HOST[:PORT], [ADDR][:PORT], unix:PATH, "
                     "* or OPTION=VALUE: ");
        return r;
    }
    bool port_given = strchr(item[0] == '[' ? strchr(item, ']') : item, ':');
    bool match = s && s->host && !strcasecmp(p.host, s->host) &&
                 (!port_given || !strcmp(p.port, s->port));
    nbd_spec_clear(&p);
    return match;
}

/* Walks the settings; *allowed tells whether s (may be NULL) is allowed. */
static int walk_settings(const char *settings, const struct nbd_spec *s,
                         struct nbd_allow *a, bool *allowed,
                         struct error **errp)
{
    memset(a, 0, sizeof(*a));
    clear_options(&a->opt);
    *allowed = false;
    bool any_server = false;
    char *copy = strdup(settings);
    if (!copy)
        return error_setf(errp, ENOMEM, "out of memory");
    int ret = 0;
    for (char *save = NULL, *item = strtok_r(copy, ";", &save); item;
         item = strtok_r(NULL, ";", &save)) {
        int r = allow_item(item, s, a, errp);
        if (r < 0) {
            ret = r;
            break;
        }
        any_server |= strchr(item, '=') == NULL;
        *allowed |= r > 0;
    }
    free(copy);
    if (ret == 0 && !any_server)
        ret = error_setf(errp, EINVAL, "no server allowed: name them, as "
                         "HOST[:PORT], [ADDR][:PORT] or unix:PATH joined "
                         "with ';' (or * for any)");
    if (ret == 0)
        ret = check_tls_options(&a->opt, true, "the settings", errp);
    if (ret < 0)
        allow_clear(a);
    return ret;
}

int nbd_spec_check_settings(const char *settings, struct error **errp)
{
    struct nbd_allow a;
    bool allowed;
    int r = walk_settings(settings ? settings : "", NULL, &a, &allowed, errp);
    if (r == 0)
        allow_clear(&a);
    return r;
}

/* A name without a prefix under an NBD overlay: an export on the overlay's
 * server, the name taking the place of the last '/'-separated part of the
 * overlay's export name (QEMU's path_combine). */
static int parse_relative(const struct nbd_spec *o, const char *name,
                          struct nbd_spec *s, struct error **errp)
{
    memset(s, 0, sizeof(*s));
    if (!*name)
        return error_setf(errp, EINVAL, "an empty backing name");
    const char *slash = strrchr(o->export, '/');
    size_t dn = slash ? (size_t)(slash - o->export + 1) : 0;
    s->export = malloc(dn + strlen(name) + 1);
    s->host = o->host ? strdup(o->host) : NULL;
    s->port = o->port ? strdup(o->port) : NULL;
    s->socket = o->socket ? strdup(o->socket) : NULL;
    if (!s->export || (o->host && !s->host) || (o->port && !s->port) ||
        (o->socket && !s->socket))
        return error_setf(errp, ENOMEM, "out of memory");
    memcpy(s->export, o->export, dn);
    strcpy(s->export + dn, name);
    s->tls = o->tls;
    clear_options(s);
    return 0;
}

int nbd_spec_resolve_backing(const char *overlay, const char *settings,
                             const char *name, char **out,
                             struct error **errp)
{
    struct nbd_spec o = {0}, s = {0};
    bool have_o = false;
    int r;
    *out = NULL;
    if (overlay) {
        r = nbd_spec_parse(overlay, &o, errp);
        if (r < 0)
            return r;
        have_o = true;
    }
    if (nbd_spec_claims(name)) {
        r = nbd_spec_parse(name, &s, errp);
        if (r < 0) {
            error_prefix(errp, "backing name: ");
            goto out;
        }
    } else if (have_o) {
        r = parse_relative(&o, name, &s, errp);
        if (r < 0)
            goto out;
    } else {
        r = error_setf(errp, EINVAL, "%s: not an nbd: spec", name);
        goto out;
    }
    if (nbd_spec_has_options(&s)) {
        r = error_setf(errp, EPERM, "backing name %s sets options: an image "
                       "header may only name the server and export of its "
                       "backing image; the options (files, identities, "
                       "timeouts) come from the export (its spec, or "
                       "backing-remote=nbd:...)", name);
        goto out;
    }
    bool wants_tls = s.tls;
    const char *tls_from;
    if (have_o && nbd_spec_same_server(&o, &s)) {
        s.tls = o.tls;          /* a header cannot turn TLS off */
        tls_from = "its overlay is reached without TLS";
        if (copy_options(&s, &o) < 0) {
            r = error_setf(errp, ENOMEM, "out of memory");
            goto out;
        }
    } else {
        struct nbd_allow a = {0};
        clear_options(&a.opt);
        bool allowed = false;
        if (settings) {
            r = walk_settings(settings, &s, &a, &allowed, errp);
            if (r < 0) {
                error_prefix(errp, "backing-remote=nbd:%s: ", settings);
                goto out;
            }
        }
        if (!allowed && !a.any) {
            allow_clear(&a);
            bool v6 = s.host && strchr(s.host, ':');
            r = error_setf(errp, EACCES, "backing name %s names the NBD "
                           "server %s%s%s%s%s, which the export does not "
                           "allow (%s): set backing-remote=nbd:SERVER on "
                           "the export to allow it", name,
                           s.socket ? "unix:" : v6 ? "[" : "",
                           s.socket ? s.socket : s.host,
                           v6 ? "]" : "", s.socket ? "" : ":",
                           s.socket ? "" : s.port,
                           have_o ? "not the server of its overlay"
                                  : "under an image that is not on NBD");
            goto out;
        }
        s.tls = has_tls_options(&a.opt);
        tls_from = "backing-remote=nbd:... gives no tls- option";
        r = copy_options(&s, &a.opt);
        allow_clear(&a);
        if (r < 0) {
            r = error_setf(errp, ENOMEM, "out of memory");
            goto out;
        }
    }
    if (wants_tls && !s.tls) {
        r = error_setf(errp, EACCES, "backing name %s asks for TLS, but %s: "
                       "the credentials are the operator's to choose (add "
                       "tls-certificates=DIR or tls-psk-file=FILE to the "
                       "export's backing-remote=nbd:...)", name, tls_from);
        goto out;
    }
    *out = nbd_spec_format(&s, true);
    r = *out ? 0 : error_setf(errp, ENOMEM, "out of memory");
out:
    nbd_spec_clear(&s);
    nbd_spec_clear(&o);
    return r;
}
