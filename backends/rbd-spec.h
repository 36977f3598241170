/* strata — the rbd: export spec, parsed without librbd (unit-tested).
 *
 *   rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:KEY=VALUE]...
 *
 * as QEMU's rbd driver reads it.  A backslash makes the next character
 * literal (rbd:p/a\:b names the image "a:b").  Keys:
 *   conf=PATH             ceph.conf to read (default: $CEPH_CONF, then
 *                         Ceph's search path)
 *   id=CLIENT             Ceph user, with or without "client." (default admin)
 *   keyring=PATH          keyring of that user
 *   timeout=SECONDS       bound on every cluster operation (OSD and monitor
 *                         requests): a request to a stuck cluster fails with
 *                         an I/O error after that long; 0 waits for ever.
 *                         Default RBD_SPEC_DEFAULT_TIMEOUT.
 *   connect_timeout=SECONDS  bound on reaching the monitors and
 *                         authenticating at open (default 10, minimum 1)
 *   any other KEY         a Ceph option given to rados_conf_set() (for
 *                         example mon_host=127.0.0.1\:3300)
 * @SNAP opens the snapshot, read-only.
 */
#ifndef STRATA_RBD_SPEC_H
#define STRATA_RBD_SPEC_H

#include <stdbool.h>
#include <stddef.h>

#include "error.h"

#define RBD_SPEC_MAX_OPTS 16
#define RBD_SPEC_DEFAULT_TIMEOUT 30
#define RBD_SPEC_DEFAULT_CONNECT_TIMEOUT 10
#define RBD_SPEC_MAX_TIMEOUT 86400

struct rbd_spec_opt {
    char *key;
    char *val;
};

struct rbd_spec {
    char *pool;
    char *ns;              /* NULL: the default namespace */
    char *image;
    char *snap;            /* NULL: the image head (writable) */
    char *conf;            /* NULL: Ceph's default search */
    char *id;              /* without "client."; NULL: Ceph's default */
    char *keyring;         /* NULL: as the configuration says */
    unsigned timeout;              /* seconds, 0 = none */
    unsigned connect_timeout;      /* seconds, >= 1 */
    bool timeout_set, connect_timeout_set; /* given in the spec */
    size_t n_opts;
    struct rbd_spec_opt opts[RBD_SPEC_MAX_OPTS]; /* passed to Ceph as is */
};

/* Parses spec (which starts with "rbd:") into *s.  On failure sets *errp,
 * leaves *s empty and returns -errno.  Control path. */
int rbd_spec_parse(const char *spec, struct rbd_spec *s, struct error **errp);
/* Frees what rbd_spec_parse() allocated; *s is left empty. */
void rbd_spec_clear(struct rbd_spec *s);

/* The spec string of *s, escaped so that rbd_spec_parse() reads back the
 * same spec (options in a canonical order: conf, id, keyring, timeout,
 * connect_timeout when given, then the Ceph options).  NULL when out of
 * memory. */
char *rbd_spec_format(const struct rbd_spec *s);

/* The settings part of a spec alone, "KEY=VALUE[:KEY=VALUE]..." (the
 * export option backing-remote=rbd:SETTINGS), into *s (pool and image
 * left NULL).  NULL or "" gives Ceph's defaults.  -errno with *errp set. */
int rbd_spec_parse_settings(const char *settings, struct rbd_spec *s,
                            struct error **errp);

/* Backing names.  A backing name is read from an image header, which is
 * not trusted like the spec of an export: whoever can write an image must
 * not make the daemon read local files (conf=, keyring=), use another
 * Ceph user (id=), reach hosts of its choosing (mon_host= or any Ceph
 * option) or wait for ever (timeout=0).  So a backing name says which
 * image — pool, namespace, image, snapshot — and nothing else; a name
 * that says more is refused with the key it tried to set.
 *
 * rbd_spec_resolve_backing() turns the backing name of an image into the
 * spec to open.  overlay is the image's own spec when it is on RBD, else
 * NULL.  name is either an rbd: spec, or — only under an RBD overlay — a
 * relative name IMAGE[@SNAP], an image in the overlay's pool and
 * namespace (as QEMU resolves it).  The cluster settings come from the
 * operator: under an RBD overlay from the overlay's spec (so the layers
 * of a chain in one cluster are opened with the configuration,
 * credentials and timeouts of its top); under a local image from
 * settings, the export's backing-remote=rbd:SETTINGS ("" = Ceph's
 * defaults), and when that is NULL the export does not allow RBD backing
 * images under local ones: refused (EACCES).
 * Returns 0 and a new string in *out, or -errno with *errp set. */
int rbd_spec_resolve_backing(const char *overlay, const char *settings,
                             const char *name, char **out,
                             struct error **errp);

/* The backing name to record in an overlay's header for the image layer
 * (an rbd: spec): rbd:POOL/[NAMESPACE/]IMAGE[@SNAP] alone, the only part
 * a header may carry (overlay is not used: the settings come from the
 * export when the name is read back).  Returns 0 and a new string in
 * *out, or -errno with *errp set. */
int rbd_spec_backing_name(const char *layer, const char *overlay, char **out,
                          struct error **errp);

/* Do the two rbd: specs name the same image (pool, namespace, image and
 * snapshot)?  Specs that do not parse are never the same. */
bool rbd_spec_same_image(const char *a, const char *b);

#endif
