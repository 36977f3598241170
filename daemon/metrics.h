/* strata — the Prometheus endpoint (--metrics HOST:PORT): GET /metrics
 * in the text exposition format
 * (https://prometheus.io/docs/instrumenting/exposition_formats/).
 *
 * Served by libmicrohttpd without a thread of its own: its epoll
 * descriptor is polled on the loop's ring (IORING_OP_POLL_ADD) and
 * MHD_run() does the ready work, never blocking; the loop's tick runs it
 * too, for its timeouts.  Bounds: METRICS_MAX_CLIENTS connections at once
 * (more wait in the listen backlog), METRICS_TIMEOUT_S of inactivity per
 * connection, METRICS_CONN_MEMORY bytes of request buffer per connection;
 * a page is built in one buffer per scrape (its size grows with the
 * number of exports and jobs, not with traffic).
 *
 * The metrics (label export="ID" is the export id, op="read", "write",
 * "flush", "trim", "write_zeroes", "cache", "block_status"):
 *   strata_requests_total{export,op}            counter
 *   strata_request_bytes_total{export,op}        counter
 *   strata_request_errors_total{export,op}       counter (failed)
 *   strata_request_invalid_total{export,op}      counter (refused)
 *   strata_request_duration_seconds{export,op}   histogram (log2 buckets)
 *   strata_requests_in_flight{export}            gauge
 *   strata_export_clients{export}                gauge
 *   strata_export_idle_seconds{export}           gauge (since last request)
 *   strata_clients_connected                     gauge (all NBD clients)
 *   strata_job_progress_bytes{job,type}          gauge (done)
 *   strata_job_total_bytes{job,type}             gauge (to do)
 *   strata_job_status{job,type,status}           gauge (1)
 *   strata_build_info{version}                   gauge (1)
 */
#ifndef STRATA_METRICS_H
#define STRATA_METRICS_H

#include <stddef.h>

#include "error.h"
#include "server.h"

#define METRICS_MAX_CLIENTS 8
#define METRICS_TIMEOUT_S 10
#define METRICS_CONN_MEMORY (32u << 10)

struct metrics;
struct job_engine;

/* Listens on addr ("HOST:PORT", "[V6]:PORT") and serves on srv's loop.
 * jobs may be NULL (no control socket: no jobs). */
struct metrics *metrics_new(struct server *srv, struct job_engine *jobs,
                            const char *addr, struct error **errp);
/* Stops listening (server shutdown hook calls it). */
void metrics_free(struct metrics *m);

/* The page, malloc'ed in *out (length *len); 0 or -ENOMEM.  Exposed for
 * tests and for builds without libmicrohttpd. */
int metrics_render(struct server *srv, struct job_engine *jobs, char **out,
                   size_t *len);

#endif
