/* strata — stratad's command line: the options, their checks and the
 * help text (see options.h). */
#include <errno.h>
#include <getopt.h>
#include <grp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "options.h"
#include "strata-config.h"

void stratad_usage(FILE *fp)
{
    fprintf(fp,
"Usage: stratad [OPTION]... --export file=PATH[,KEY=VAL]...\n"
"Serve disk images over NBD.\n"
"\n"
"  -l, --listen ADDR          listen on ADDR: HOST:PORT, [IPV6]:PORT or\n"
"                             unix:PATH (repeatable; default 127.0.0.1:10809,\n"
"                             or the sockets of socket activation, or with\n"
"                             --run a private unix socket)\n"
"  -e, --export SPEC          serve an image (repeatable; the first one is\n"
"                             also the default export, for the empty name)\n"
"      --fork                 go to the background once serving\n"
"      --pid-file FILE        write the daemon's pid to FILE once serving\n"
"      --log-file FILE        append log messages to FILE (with --fork the\n"
"                             daemon otherwise detaches from all output)\n"
"      --max-connections N    clients at once (default 256)\n"
"      --max-connections-per-peer N  clients of one address (TCP) or one\n"
"                             user (unix socket) at once (default 128)\n"
"      --max-handshakes N     clients still in the handshake at once; past\n"
"                             it new clients wait to be accepted (default 128)\n"
"      --max-handshakes-per-peer N  of those, from one address or user\n"
"                             (default 16)\n"
"      --handshake-timeout S  seconds a client may take to choose an export\n"
"                             (default 10)\n"
"      --max-inflight N       requests in flight per client (default 128)\n"
"      --max-memory SIZE      payload buffers of all clients together, e.g.\n"
"                             512M or 2G (default 256M; at least 64M); past\n"
"                             it clients wait, in turn, for memory\n"
"      --shutdown-timeout S   seconds to drain clients on SIGTERM (default 30)\n"
"      --threads N            event loops (default 1): the main one, which runs\n"
"                             every chain, and N-1 that serve the sockets of\n"
"                             clients in transmission (without TLS); each\n"
"                             loop's clients get 1/N of --max-memory\n"
"      --control PATH         serve the QMP control socket on unix socket PATH\n"
"      --control-mode OCTAL   permissions of the control socket (default 0600)\n"
"      --state-file PATH      record exports and chains in PATH and restore\n"
"                             them at start (see the README)\n"
"      --control-group GROUP  the control socket's group, mode 0660 (unless\n"
"                             --control-mode says otherwise)\n"
"      --run CMD              captive mode: once serving, run CMD with /bin/sh\n"
"                             ($uri, $nbd, $unixsocket, $port, $exportname\n"
"                             set), stop when it exits, exit with its status\n"
"      --print-uri            print the NBD URI of the server once serving\n"
"      --exit-with-parent     shut down when the parent process exits\n"
"      --metrics HOST:PORT    serve Prometheus metrics at http://HOST:PORT/metrics\n"
"  -v, --verbose              log every connection and refused request\n"
"  -h, --help                 show this help\n"
"  -V, --version              show the version\n"
"\n"
"TLS and access control (see docs/tls.md):\n"
"      --tls=off|on|require   offer TLS (NBD_OPT_STARTTLS); require: nothing\n"
"                             but STARTTLS before it (default off)\n"
"      --tls-certificates DIR ca-cert.pem, server-cert.pem, server-key.pem,\n"
"                             optional ca-crl.pem\n"
"      --tls-psk FILE         pre-shared keys, psktool's username:hexkey lines\n"
"      --tls-verify-peer      require a client certificate signed by the CA\n"
"      --tls-priority STRING  GnuTLS priority string (default NORMAL: TLS 1.3\n"
"                             preferred)\n"
"      --tls-allow LIST       only these TLS identities may connect: X.509\n"
"                             DNs or PSK usernames, exact or fnmatch globs,\n"
"                             separated by ';' (needs --tls=require)\n"
"      --tls-ktls=auto|off    auto: hand TLS 1.2/1.3 AES-GCM and ChaCha20\n"
"                             records to the kernel's TLS (the tls module)\n"
"                             after the handshake (default auto)\n"
"\n"
"Export SPEC keys (comma separated, ',,' for a literal comma):\n"
"  name=NAME           export name (default: empty)\n"
"  file=PATH           image file or block device (required)\n"
"  format=raw          image format (default raw; a file that looks like\n"
"                      qcow2 must be named explicitly)\n"
"  readonly=on|off     refuse writes (default off)\n"
"  cache=writeback|none  none: O_DIRECT, no host page cache\n"
"  description=TEXT    shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION\n"
"  id=ID               QMP export id (default: the name, or \"default\")\n"
"  node-name=NAME      QMP node name of its chain (default: the id)\n"
"  allow=LIST          only these TLS identities see and open it (as\n"
"                      --tls-allow; ',,' for a comma in a DN)\n"
"\n"
"Example:\n"
"  stratad --listen unix:/run/strata.sock --export name=disk,file=disk.img\n"
"  nbdinfo 'nbd+unix:///disk?socket=/run/strata.sock'\n");
}

enum {
    OPT_FORK = 256,
    OPT_PIDFILE,
    OPT_LOGFILE,
    OPT_MAXCONN,
    OPT_HSTIMEOUT,
    OPT_MAXINFLIGHT,
    OPT_SHUTDOWN_TIMEOUT,
    OPT_CONTROL,
    OPT_CONTROL_MODE,
    OPT_STATE_FILE,
    /* TLS and access control */
    OPT_TLS,
    OPT_TLS_CERTIFICATES,
    OPT_TLS_PSK,
    OPT_TLS_VERIFY_PEER,
    OPT_TLS_PRIORITY,
    OPT_TLS_ALLOW,
    OPT_TLS_KTLS,
    OPT_CONTROL_GROUP,
    OPT_MAX_MEMORY,
    OPT_MAX_PER_PEER,
    OPT_MAX_HANDSHAKES,
    OPT_MAX_HANDSHAKES_PER_PEER,
    OPT_RUN,
    OPT_PRINT_URI,
    OPT_THREADS,
    OPT_EXIT_WITH_PARENT,
    OPT_METRICS,
};

/* TLS and access control: one option; OPTS_OK when it was handled. */
static enum opts_result parse_tls_option(int ch, const char *arg,
                                         struct stratad_options *o)
{
    switch (ch) {
    case OPT_TLS:
        if (!strcmp(arg, "off"))
            o->tls.mode = TLS_MODE_OFF;
        else if (!strcmp(arg, "on"))
            o->tls.mode = TLS_MODE_ON;
        else if (!strcmp(arg, "require"))
            o->tls.mode = TLS_MODE_REQUIRE;
        else {
            fprintf(stderr, "stratad: --tls=%s: expected off, on or require\n",
                    arg);
            return OPTS_ERROR;
        }
        return OPTS_OK;
    case OPT_TLS_CERTIFICATES:
        o->tls.certificates = arg;
        return OPTS_OK;
    case OPT_TLS_PSK:
        o->tls.psk_file = arg;
        return OPTS_OK;
    case OPT_TLS_VERIFY_PEER:
        o->tls.verify_peer = true;
        return OPTS_OK;
    case OPT_TLS_PRIORITY:
        o->tls.priority = arg;
        return OPTS_OK;
    case OPT_TLS_ALLOW:
        o->tls.allow = arg;
        return OPTS_OK;
    case OPT_TLS_KTLS:
        if (!strcmp(arg, "auto"))
            o->tls.ktls = TLS_KTLS_AUTO;
        else if (!strcmp(arg, "off"))
            o->tls.ktls = TLS_KTLS_OFF;
        else {
            fprintf(stderr, "stratad: --tls-ktls=%s: expected auto or off\n",
                    arg);
            return OPTS_ERROR;
        }
        return OPTS_OK;
    case OPT_CONTROL_GROUP: {
        struct group *g = getgrnam(arg);
        char *end;
        unsigned long n = strtoul(arg, &end, 10);
        if (g)
            o->control_gid = g->gr_gid;
        else if (*arg && !*end)
            o->control_gid = (gid_t)n;
        else {
            fprintf(stderr, "stratad: --control-group %s: no such group\n", arg);
            return OPTS_ERROR;
        }
        return OPTS_OK;
    }
    }
    return OPTS_EXIT; /* not one of these */
}

static int check_tls_options(const struct stratad_options *o)
{
    const struct tls_options *t = &o->tls;
    if (t->allow && t->mode != TLS_MODE_REQUIRE) {
        /* a plaintext client has no identity to check */
        fprintf(stderr, "stratad: --tls-allow needs --tls=require\n");
        return -1;
    }
    if (t->mode == TLS_MODE_OFF) {
        if (t->certificates || t->psk_file || t->verify_peer || t->priority) {
            fprintf(stderr, "stratad: --tls-certificates, --tls-psk, "
                    "--tls-verify-peer and --tls-priority need --tls=on or "
                    "--tls=require\n");
            return -1;
        }
        return 0;
    }
    if (!t->certificates == !t->psk_file) {
        fprintf(stderr, "stratad: --tls=%s needs either --tls-certificates DIR "
                "or --tls-psk FILE\n", t->mode == TLS_MODE_ON ? "on" : "require");
        return -1;
    }
    if (t->verify_peer && t->psk_file) {
        fprintf(stderr, "stratad: --tls-verify-peer is for X.509 certificates "
                "(a PSK client always proves its key)\n");
        return -1;
    }
    return 0;
}

/* "N", "NK", "NM", "NG" or "NT" (powers of 1024), within [min, max]. */
static int parse_size_arg(const char *opt, const char *s, uint64_t min,
                          uint64_t max, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    unsigned shift = 0;
    switch (*end) {
    case 'k': case 'K': shift = 10; end++; break;
    case 'm': case 'M': shift = 20; end++; break;
    case 'g': case 'G': shift = 30; end++; break;
    case 't': case 'T': shift = 40; end++; break;
    }
    if (errno || *end || end == s || s[0] == '-' || v > (max >> shift) ||
        (v << shift) < min) {
        fprintf(stderr, "stratad: %s %s: expected a size from %llu MiB to "
                "%llu GiB (a number with K, M, G or T)\n", opt, s,
                (unsigned long long)(min >> 20), (unsigned long long)(max >> 30));
        return -1;
    }
    *out = (uint64_t)v << shift;
    return 0;
}

static int parse_uint(const char *opt, const char *s, unsigned min,
                      unsigned max, unsigned *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || *end || end == s || v < min || v > max) {
        fprintf(stderr, "stratad: %s %s: expected a number from %u to %u\n",
                opt, s, min, max);
        return -1;
    }
    *out = (unsigned)v;
    return 0;
}


static enum opts_result stratad_options_fail(struct stratad_options *o)
{
    stratad_options_free(o);
    return OPTS_ERROR;
}

void stratad_options_free(struct stratad_options *o)
{
    free(o->listens);
    free(o->exports);
    o->listens = o->exports = NULL;
}

enum opts_result stratad_options_parse(int argc, char **argv,
                                       struct stratad_options *o)
{
    static const struct option longopts[] = {
        {"listen", required_argument, NULL, 'l'},
        {"export", required_argument, NULL, 'e'},
        {"fork", no_argument, NULL, OPT_FORK},
        {"pid-file", required_argument, NULL, OPT_PIDFILE},
        {"log-file", required_argument, NULL, OPT_LOGFILE},
        {"max-connections", required_argument, NULL, OPT_MAXCONN},
        {"handshake-timeout", required_argument, NULL, OPT_HSTIMEOUT},
        {"max-inflight", required_argument, NULL, OPT_MAXINFLIGHT},
        {"shutdown-timeout", required_argument, NULL, OPT_SHUTDOWN_TIMEOUT},
        {"control", required_argument, NULL, OPT_CONTROL},
        {"control-mode", required_argument, NULL, OPT_CONTROL_MODE},
        {"state-file", required_argument, NULL, OPT_STATE_FILE},
        {"tls", required_argument, NULL, OPT_TLS},
        {"tls-certificates", required_argument, NULL, OPT_TLS_CERTIFICATES},
        {"tls-psk", required_argument, NULL, OPT_TLS_PSK},
        {"tls-verify-peer", no_argument, NULL, OPT_TLS_VERIFY_PEER},
        {"tls-priority", required_argument, NULL, OPT_TLS_PRIORITY},
        {"tls-ktls", required_argument, NULL, OPT_TLS_KTLS},
        {"tls-allow", required_argument, NULL, OPT_TLS_ALLOW},
        {"control-group", required_argument, NULL, OPT_CONTROL_GROUP},
        {"max-memory", required_argument, NULL, OPT_MAX_MEMORY},
        {"max-connections-per-peer", required_argument, NULL, OPT_MAX_PER_PEER},
        {"max-handshakes", required_argument, NULL, OPT_MAX_HANDSHAKES},
        {"max-handshakes-per-peer", required_argument, NULL,
         OPT_MAX_HANDSHAKES_PER_PEER},
        {"run", required_argument, NULL, OPT_RUN},
        {"print-uri", no_argument, NULL, OPT_PRINT_URI},
        {"threads", required_argument, NULL, OPT_THREADS},
        {"exit-with-parent", no_argument, NULL, OPT_EXIT_WITH_PARENT},
        {"metrics", required_argument, NULL, OPT_METRICS},
        {"verbose", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    memset(o, 0, sizeof(*o));
    o->listens = calloc((size_t)argc + 1, sizeof(char *));
    o->exports = calloc((size_t)argc + 1, sizeof(char *));
    if (!o->listens || !o->exports) {
        fprintf(stderr, "stratad: out of memory\n");
        stratad_options_free(o);
        return OPTS_ERROR;
    }
    o->control_mode = 0600;
    o->control_gid = (gid_t)-1;
    bool control_mode_given = false;
    server_config_defaults(&o->cfg);

    int ch;
    while ((ch = getopt_long(argc, argv, "l:e:vhV", longopts, NULL)) != -1) {
        switch (ch) {
        case 'l':
            o->listens[o->n_listens++] = optarg;
            break;
        case 'e':
            o->exports[o->n_exports++] = optarg;
            break;
        case OPT_FORK:
            o->do_fork = true;
            break;
        case OPT_PIDFILE:
            o->pid_file = optarg;
            break;
        case OPT_LOGFILE:
            o->log_file = optarg;
            break;
        case OPT_MAXCONN:
            if (parse_uint("--max-connections", optarg, 1, 65536,
                           &o->cfg.max_connections) < 0)
                return stratad_options_fail(o);
            break;
        case OPT_HSTIMEOUT:
            if (parse_uint("--handshake-timeout", optarg, 1, 3600,
                           &o->cfg.handshake_timeout_s) < 0)
                return stratad_options_fail(o);
            break;
        case OPT_MAXINFLIGHT:
            if (parse_uint("--max-inflight", optarg, 1, 4096,
                           &o->cfg.max_inflight) < 0)
                return stratad_options_fail(o);
            break;
        case OPT_SHUTDOWN_TIMEOUT:
            if (parse_uint("--shutdown-timeout", optarg, 1, 3600,
                           &o->cfg.shutdown_timeout_s) < 0)
                return stratad_options_fail(o);
            break;
        case OPT_CONTROL:
            o->control_path = optarg;
            break;
        case OPT_CONTROL_MODE: {
            char *end;
            errno = 0;
            unsigned long m = strtoul(optarg, &end, 8);
            if (errno || *end || end == optarg || m > 0777) {
                fprintf(stderr, "stratad: --control-mode %s: expected an octal "
                        "mode such as 0600\n", optarg);
                return stratad_options_fail(o);
            }
            o->control_mode = (unsigned)m;
            control_mode_given = true;
            break;
        }
        case OPT_MAX_PER_PEER:
            if (parse_uint("--max-connections-per-peer", optarg, 1, 65536,
                           &o->cfg.max_per_peer) < 0)
                return stratad_options_fail(o);
            break;
        case OPT_MAX_HANDSHAKES:
            if (parse_uint("--max-handshakes", optarg, 1, 65536,
                           &o->cfg.max_handshakes) < 0)
                return stratad_options_fail(o);
            break;
        case OPT_MAX_HANDSHAKES_PER_PEER:
            if (parse_uint("--max-handshakes-per-peer", optarg, 1, 65536,
                           &o->cfg.max_handshakes_per_peer) < 0)
                return stratad_options_fail(o);
            break;
        case OPT_MAX_MEMORY:
            if (parse_size_arg("--max-memory", optarg, UINT64_C(64) << 20,
                               UINT64_C(1) << 40, &o->cfg.max_memory) < 0)
                return stratad_options_fail(o);
            break;
        case OPT_STATE_FILE:
            o->state_path = optarg;
            break;
        case OPT_RUN:
            o->run_cmd = optarg;
            break;
        case OPT_PRINT_URI:
            o->print_uri = true;
            break;
        case OPT_THREADS:
            if (parse_uint("--threads", optarg, 1, 256, &o->cfg.threads) < 0)
                return stratad_options_fail(o);
            break;
        case OPT_EXIT_WITH_PARENT:
            o->exit_with_parent = true;
            break;
        case OPT_METRICS:
            o->metrics_addr = optarg;
            break;
        case 'v':
            log_set_level(LOG_DEBUG);
            break;
        case 'h':
            stratad_usage(stdout);
            stratad_options_free(o);
            return OPTS_EXIT;
        case 'V':
            printf("stratad %s\n", STRATA_VERSION);
            stratad_options_free(o);
            return OPTS_EXIT;
        case OPT_TLS:
        case OPT_TLS_CERTIFICATES:
        case OPT_TLS_PSK:
        case OPT_TLS_VERIFY_PEER:
        case OPT_TLS_PRIORITY:
        case OPT_TLS_ALLOW:
        case OPT_TLS_KTLS:
        case OPT_CONTROL_GROUP:
            if (parse_tls_option(ch, optarg, o) != OPTS_OK)
                return stratad_options_fail(o);
            break;
        default:
            stratad_usage(stderr);
            return stratad_options_fail(o);
        }
    }
    if (check_tls_options(o) < 0)
        return stratad_options_fail(o);
    if (o->control_gid != (gid_t)-1 && !control_mode_given)
        o->control_mode = 0660; /* shared with the group */
    if (optind < argc) {
        fprintf(stderr, "stratad: unexpected argument '%s'\n", argv[optind]);
        stratad_usage(stderr);
        return stratad_options_fail(o);
    }
    if (o->n_exports == 0 && !o->control_path && !o->state_path) {
        fprintf(stderr, "stratad: no export given (--export file=PATH, or "
                "--control to add exports later)\n");
        stratad_usage(stderr);
        return stratad_options_fail(o);
    }
    if (o->do_fork && (o->run_cmd || o->exit_with_parent)) {
        fprintf(stderr, "stratad: --fork cannot be used with %s\n",
                o->run_cmd ? "--run" : "--exit-with-parent");
        return stratad_options_fail(o);
    }

    /* a per-peer or handshake limit above the global one means nothing */
    struct server_config *c = &o->cfg;
    if (c->max_per_peer > c->max_connections)
        c->max_per_peer = c->max_connections;
    if (c->max_handshakes > c->max_connections)
        c->max_handshakes = c->max_connections;
    if (c->max_handshakes_per_peer > c->max_handshakes)
        c->max_handshakes_per_peer = c->max_handshakes;
    return OPTS_OK;
}
