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
    size_t n_opts;
    struct rbd_spec_opt opts[RBD_SPEC_MAX_OPTS]; /* passed to Ceph as is */
};

/* Parses spec (which starts with "rbd:") into *s.  On failure sets *errp,
 * leaves *s empty and returns -errno.  Control path. */
int rbd_spec_parse(const char *spec, struct rbd_spec *s, struct error **errp);
/* Frees what rbd_spec_parse() allocated; *s is left empty. */
void rbd_spec_clear(struct rbd_spec *s);

#endif
