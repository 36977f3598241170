/* strata — the nbd: export spec, parsed without libnbd (unit-tested).
 *
 * A layer served by another NBD server, named the way QEMU and libnbd name
 * it:
 *   nbd://HOST[:PORT][/EXPORT][?OPTIONS]        (also nbd+tcp://)
 *   nbd+unix:///[EXPORT]?socket=PATH[&OPTIONS]
 *   nbd:HOST:PORT[:exportname=EXPORT]          (QEMU's older syntax)
 *   nbd:unix:PATH[:exportname=EXPORT]
 *   nbds://HOST[:PORT][/EXPORT][?OPTIONS]       (TLS; also nbds+tcp://)
 *   nbds+unix:///[EXPORT]?socket=PATH[&OPTIONS]
 * HOST is a name or an address ([ADDR] for IPv6); PORT defaults to 10809;
 * EXPORT (percent-encoded in URIs) defaults to the server's default export
 * "".  OPTIONS, KEY=VALUE joined with '&', are strata's own:
 *   reconnect-delay=SECONDS  after the server went away, how long requests
 *                            fail with EIO before the next one tries to
 *                            connect again (default
 *                            NBD_SPEC_DEFAULT_RECONNECT_DELAY; 0: at once)
 *   connect-timeout=SECONDS  how long a connection (the first, or one
 *                            after the server went away) may take, TCP
 *                            connect, NBD handshake and TLS included
 *                            (default NBD_SPEC_DEFAULT_CONNECT_TIMEOUT; 0:
 *                            no limit)
 * and, with nbds (TLS required; the names are libnbd's):
 *   tls-certificates=DIR     X.509: DIR holds ca-cert.pem, and the
 *                            client's client-cert.pem and client-key.pem
 *                            when the server asks for one (default:
 *                            libnbd's, $HOME/.pki/libnbd, then the
 *                            system's trust store)
 *   tls-psk-file=FILE        pre-shared keys, psktool's USER:HEXKEY lines
 *   tls-username=NAME        the PSK identity (default: the login name)
 *   tls-verify-peer=BOOL     check the server's certificate against the CA
 *                            and the host name (default true)
 */
#ifndef STRATA_NBD_SPEC_H
#define STRATA_NBD_SPEC_H

#include <stdbool.h>

#include "error.h"

#define NBD_SPEC_DEFAULT_PORT "10809"
#define NBD_SPEC_DEFAULT_RECONNECT_DELAY 2
#define NBD_SPEC_MAX_RECONNECT_DELAY 3600
#define NBD_SPEC_DEFAULT_CONNECT_TIMEOUT 30
#define NBD_SPEC_MAX_SECONDS 3600

struct nbd_spec {
    char *host;                 /* TCP: name or address (no brackets);
                                   NULL for a Unix socket */
    char *port;                 /* TCP: decimal port; NULL for a socket */
    char *socket;               /* Unix socket path; NULL for TCP */
    char *export;               /* export name, "" for the default */
    bool tls;                   /* nbds: TLS required */
    /* Options (nbd_spec_has_options): */
    unsigned reconnect_delay;   /* seconds */
    bool reconnect_delay_set;   /* given in the spec */
    unsigned connect_timeout;   /* seconds, 0: no limit */
    bool connect_timeout_set;
    char *tls_certificates;     /* directory, or NULL */
    char *tls_psk_file;         /* file, or NULL */
    char *tls_username;         /* PSK identity, or NULL */
    bool tls_verify_peer;       /* check the server (when _set) */
    bool tls_verify_peer_set;
};

/* Does spec carry one of the nbd prefixes (nbd:, nbd+tcp:, nbd+unix:,
 * nbds...)?  Says nothing about whether it parses. */
bool nbd_spec_claims(const char *spec);

/* Parses spec into *s.  On failure sets *errp, leaves *s empty and returns
 * -errno.  Control path. */
int nbd_spec_parse(const char *spec, struct nbd_spec *s, struct error **errp);
void nbd_spec_clear(struct nbd_spec *s);

/* Does *s set any of the options? */
bool nbd_spec_has_options(const struct nbd_spec *s);

/* The canonical URI of *s: nbd[s]://HOST:PORT[/EXPORT] or
 * nbd[s]+unix:///EXPORT?socket=PATH, followed by the options when
 * with_options and they were given.  NULL when out of memory. */
char *nbd_spec_format(const struct nbd_spec *s, bool with_options);

/* Same server (host and port, or socket path)? */
bool nbd_spec_same_server(const struct nbd_spec *a, const struct nbd_spec *b);

/* Backing names.  A backing name comes from an image header, which is not
 * trusted like an export's spec: whoever can write an image must not make
 * the daemon connect to hosts or sockets of its choosing.  So a backing
 * name may name an export on the server of its overlay (when the overlay
 * is on NBD too) and otherwise only a server the operator allowed with the
 * export's backing-remote=nbd:SETTINGS, where SETTINGS is a list of items
 * joined with ';':
 *   HOST            any port of HOST (names and addresses compared as
 *                   written, without resolving them)
 *   HOST:PORT, [ADDR], [ADDR]:PORT
 *   unix:PATH       that socket; unix:DIR/ any socket beneath DIR
 *   *               any server
 *   OPTION=VALUE    any option above (reconnect-delay, connect-timeout,
 *                   the tls- ones), for the layers so allowed; a TLS
 *                   option makes TLS required for them
 * A backing name may not set options: they name local files and
 * identities, which are the operator's.  The layers under an NBD overlay
 * on the same server take the overlay's options and TLS (a header cannot
 * turn TLS off), those on another server the settings'.  A name with
 * nbds (TLS) for a server the operator gave no TLS option for is refused:
 * the credentials are the operator's to choose.  overlay: the overlay's
 * spec when it is on NBD, else NULL; a name without an nbd prefix is then
 * an export on the overlay's server, relative to the overlay's export
 * name as QEMU combines them.
 * Returns 0 and a new spec in *out, or -errno (EACCES: not allowed) with
 * *errp set. */
int nbd_spec_resolve_backing(const char *overlay, const char *settings,
                             const char *name, char **out,
                             struct error **errp);

/* Checks backing-remote=nbd:SETTINGS (syntax above). */
int nbd_spec_check_settings(const char *settings, struct error **errp);

#endif
