/* strata — the --export SPEC: parsing "key=value,..." into an
 * export_config, and the QMP id an export gets (see exports.h). */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "exports.h"
#include "jobs.h"
#include "nbd-protocol.h"
#include "server.h"

void export_config_clear(struct export_config *cfg)
{
    free(cfg->name);
    free(cfg->file);
    free(cfg->format);
    free(cfg->description);
    free(cfg->backing_root);
    free(cfg->backing_remote);
    free(cfg->id);
    free(cfg->node_name);
    tls_allow_clear(&cfg->allow);
    for (size_t i = 0; i < cfg->n_bitmaps; i++) {
        free(cfg->bitmaps[i].node);
        free(cfg->bitmaps[i].name);
    }
    free(cfg->bitmaps);
    memset(cfg, 0, sizeof(*cfg));
}

int export_config_add_bitmap(struct export_config *cfg, const char *node,
                             const char *name, struct error **errp)
{
    if (cfg->n_bitmaps == EXPORT_MAX_BITMAPS)
        return error_setf(errp, EINVAL, "an export offers at most %u bitmaps",
                          EXPORT_MAX_BITMAPS);
    struct export_bitmap_ref *a = realloc(cfg->bitmaps,
                                          sizeof(*a) * (cfg->n_bitmaps + 1));
    if (!a)
        return error_setf(errp, ENOMEM, "out of memory");
    cfg->bitmaps = a;
    struct export_bitmap_ref *r = &a[cfg->n_bitmaps];
    r->node = node ? strdup(node) : NULL;
    r->name = strdup(name);
    if (!r->name || (node && !r->node)) {
        free(r->node);
        free(r->name);
        return error_setf(errp, ENOMEM, "out of memory");
    }
    cfg->n_bitmaps++;
    return 0;
}

static int parse_bool(const char *key, const char *v, bool *out,
                      struct error **errp)
{
    if (!strcmp(v, "on") || !strcmp(v, "yes") || !strcmp(v, "true") ||
        !strcmp(v, "1")) {
        *out = true;
        return 0;
    }
    if (!strcmp(v, "off") || !strcmp(v, "no") || !strcmp(v, "false") ||
        !strcmp(v, "0")) {
        *out = false;
        return 0;
    }
    return error_setf(errp, EINVAL, "%s=%s: expected on or off", key, v);
}

/* A byte count with an optional K, M or G suffix (binary units). */
static int parse_size(const char *key, const char *v, uint64_t *out,
                      struct error **errp)
{
    char *end;
    errno = 0;
    unsigned long long n = strtoull(v, &end, 10);
    unsigned shift = 0;
    if (*end == 'K' || *end == 'k')
        shift = 10, end++;
    else if (*end == 'M' || *end == 'm')
        shift = 20, end++;
    else if (*end == 'G' || *end == 'g')
        shift = 30, end++;
    if (errno || end == v || *end || v[0] == '-' || n == 0 ||
        n > (UINT64_C(1) << 40) >> shift)
        return error_setf(errp, EINVAL, "%s=%s: expected a size in bytes "
                          "(with an optional K, M or G suffix)", key, v);
    *out = (uint64_t)n << shift;
    return 0;
}

/* Splits "k=v,k=v" with ",," standing for a literal comma. */
int export_config_parse(const char *spec, struct export_config *cfg,
                        struct error **errp)
{
    memset(cfg, 0, sizeof(*cfg));
    size_t len = strlen(spec);
    char *item = malloc(len + 1);
    if (!item)
        return error_setf(errp, ENOMEM, "out of memory");
    const char *p = spec;
    int ret = 0;
    while (*p && ret == 0) {
        size_t n = 0;
        while (*p) {
            if (*p == ',' && p[1] == ',') {
                item[n++] = ',';
                p += 2;
            } else if (*p == ',') {
                p++;
                break;
            } else {
                item[n++] = *p++;
            }
        }
        item[n] = '\0';
        if (n == 0)
            continue;
        char *eq = strchr(item, '=');
        if (!eq) {
            ret = error_setf(errp, EINVAL, "'%s': expected KEY=VALUE", item);
            break;
        }
        *eq = '\0';
        const char *key = item, *val = eq + 1;
        char **str = NULL;
        if (!strcmp(key, "name"))
            str = &cfg->name;
        else if (!strcmp(key, "file"))
            str = &cfg->file;
        else if (!strcmp(key, "format"))
            str = &cfg->format;
        else if (!strcmp(key, "description"))
            str = &cfg->description;
        else if (!strcmp(key, "backing-root"))
            str = &cfg->backing_root;
        else if (!strcmp(key, "backing-remote"))
            str = &cfg->backing_remote;
        else if (!strcmp(key, "id"))
            str = &cfg->id;
        else if (!strcmp(key, "node-name"))
            str = &cfg->node_name;
        if (str) {
            free(*str);
            *str = strdup(val);
            if (!*str)
                ret = error_setf(errp, ENOMEM, "out of memory");
        } else if (!strcmp(key, "readonly")) {
            ret = parse_bool(key, val, &cfg->read_only, errp);
        } else if (!strcmp(key, "cache")) {
            if (!strcmp(val, "none"))
                cfg->direct = true;
            else if (!strcmp(val, "writeback"))
                cfg->direct = false;
            else
                ret = error_setf(errp, EINVAL,
                                 "cache=%s: expected none or writeback", val);
        } else if (!strcmp(key, "l2-cache-size")) {
            ret = parse_size(key, val, &cfg->l2_cache_bytes, errp);
        } else if (!strcmp(key, "refcount-cache-size")) {
            ret = parse_size(key, val, &cfg->refcount_cache_bytes, errp);
        } else if (!strcmp(key, "bitmap")) {
            ret = val[0] ? export_config_add_bitmap(cfg, NULL, val, errp)
                         : error_setf(errp, EINVAL, "bitmap=: a bitmap name "
                                      "is required");
        } else if (!strcmp(key, "allow")) {
            tls_allow_clear(&cfg->allow);
            ret = tls_allow_parse(val, &cfg->allow, errp);
        } else {
            ret = error_setf(errp, EINVAL, "unknown export key '%s' (known: "
                             "name, file, format, readonly, cache, description, "
                             "id, node-name, backing-root, backing-remote, "
                             "l2-cache-size, "
                             "refcount-cache-size, allow, bitmap)", key);
        }
    }
    free(item);
    if (ret == 0 && !cfg->file)
        ret = error_setf(errp, EINVAL, "file= is required");
    if (ret == 0 && !cfg->name) {
        cfg->name = strdup("");
        if (!cfg->name)
            ret = error_setf(errp, ENOMEM, "out of memory");
    }
    if (ret == 0 && strlen(cfg->name) > NBD_MAX_STRING)
        ret = error_setf(errp, EINVAL, "export name longer than %u bytes",
                         NBD_MAX_STRING);
    if (ret < 0)
        export_config_clear(cfg);
    return ret;
}

char *export_config_id(const struct export_config *cfg)
{
    if (cfg->id)
        return strdup(cfg->id);
    if (!cfg->name[0])
        return strdup("default");
    if (qmp_id_wellformed(cfg->name))
        return strdup(cfg->name);
    /* a name QMP ids cannot spell: a stable id derived from it (FNV-1a),
     * so that the same --export gets the same id on every start */
    uint32_t h = 2166136261u;
    for (const unsigned char *p = (const unsigned char *)cfg->name; *p; p++)
        h = (h ^ *p) * 16777619u;
    char *id = NULL;
    if (asprintf(&id, "export-%08x", h) < 0)
        return NULL;
    return id;
}
