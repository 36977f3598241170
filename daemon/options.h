/* strata — stratad's command line. */
#ifndef STRATA_OPTIONS_H
#define STRATA_OPTIONS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include <sys/types.h>

#include "server.h"
#include "tls.h"

struct stratad_options {
    const char **listens;          /* --listen, in order (argv strings) */
    size_t n_listens;              /* 0: the default address (main.c) */
    const char **exports;          /* --export SPECs, in order */
    size_t n_exports;
    bool do_fork;                  /* --fork */
    const char *pid_file;
    const char *log_file;
    const char *control_path;      /* --control */
    unsigned control_mode;         /* --control-mode (default 0600) */
    const char *state_path;        /* --state-file */
    const char *run_cmd;           /* --run: captive mode (captive.h) */
    bool print_uri;                /* --print-uri */
    bool exit_with_parent;         /* --exit-with-parent */
    const char *metrics_addr;      /* --metrics HOST:PORT */
    struct server_config cfg;      /* limits and timeouts */

    /* TLS and access control */
    struct tls_options tls;        /* --tls, --tls-* */
    gid_t control_gid;             /* --control-group, or (gid_t)-1 */
};

enum opts_result {
    OPTS_OK,                       /* run the daemon */
    OPTS_EXIT,                     /* --help or --version printed: exit 0 */
    OPTS_ERROR,                    /* message printed: exit 2 */
};

/* Parses argv into *o (strings point into argv; the arrays are
 * malloc'ed: stratad_options_free).  On OPTS_EXIT and OPTS_ERROR nothing
 * is left to free.  Checks what can be checked without opening anything
 * (numbers in range, an export or a control socket given). */
enum opts_result stratad_options_parse(int argc, char **argv,
                                       struct stratad_options *o);
void stratad_options_free(struct stratad_options *o);
void stratad_usage(FILE *fp);

#endif
