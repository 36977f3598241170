/* strata — the Prometheus endpoint (see metrics.h). */
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "jobs.h"
#include "log.h"
#include "metrics.h"
#include "stats.h"
#include "strata-config.h"
#include "util.h"

#if STRATA_HAVE_MICROHTTPD
#include <microhttpd.h>
#endif

/* ---- the page ---- */

struct mbuf {
    char *p;
    size_t len, cap;
    bool oom;
};

__attribute__((format(printf, 2, 3)))
static void mb_printf(struct mbuf *b, const char *fmt, ...)
{
    if (b->oom)
        return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = true;
            return;
        }
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        size_t ncap = (b->cap + (size_t)n + 1) * 2;
        char *np = realloc(b->p, ncap);
        if (!np) {
            b->oom = true;
            return;
        }
        b->p = np;
        b->cap = ncap;
    }
}

/* A label value: backslash, double quote and newline escaped. */
static void mb_label(struct mbuf *b, const char *s)
{
    for (; *s && !b->oom; s++) {
        if (*s == '\\')
            mb_printf(b, "\\\\");
        else if (*s == '"')
            mb_printf(b, "\\\"");
        else if (*s == '\n')
            mb_printf(b, "\\n");
        else
            mb_printf(b, "%c", *s);
    }
}

static void mb_help(struct mbuf *b, const char *name, const char *type,
                    const char *help)
{
    mb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* name{export="ID",op="OP"} value, one line per export and op */
static void per_op_counter(struct mbuf *b, struct server *srv,
                           const char *name, const char *help,
                           size_t field_off)
{
    mb_help(b, name, "counter", help);
    for (size_t i = 0; i < srv->n_exports; i++) {
        const struct export *e = srv->exports[i];
        for (unsigned op = 0; op < STATS_OP__MAX; op++) {
            const uint64_t *v = (const uint64_t *)
                ((const char *)&e->stats.op[op] + field_off);
            mb_printf(b, "%s{export=\"", name);
            mb_label(b, e->cfg.id);
            mb_printf(b, "\",op=\"%s\"} %llu\n", stats_op_name(op),
                      (unsigned long long)*v);
        }
    }
}

static void histograms(struct mbuf *b, struct server *srv)
{
    const char *name = "strata_request_duration_seconds";
    mb_help(b, name, "histogram",
            "Time from a request's start to its reply, by export and operation.");
    for (size_t i = 0; i < srv->n_exports; i++) {
        const struct export *e = srv->exports[i];
        for (unsigned op = 0; op < STATS_OP__MAX; op++) {
            const struct stats_op_counters *c = &e->stats.op[op];
            uint64_t cum = 0;
            for (unsigned k = 0; k < STATS_LAT_BUCKETS; k++) {
                cum += c->lat[k];
                mb_printf(b, "%s_bucket{export=\"", name);
                mb_label(b, e->cfg.id);
                if (k + 1 < STATS_LAT_BUCKETS)
                    mb_printf(b, "\",op=\"%s\",le=\"%.9g\"} %llu\n",
                              stats_op_name(op),
                              (double)stats_lat_bound_ns(k) / 1e9,
                              (unsigned long long)cum);
                else
                    mb_printf(b, "\",op=\"%s\",le=\"+Inf\"} %llu\n",
                              stats_op_name(op), (unsigned long long)cum);
            }
            mb_printf(b, "%s_sum{export=\"", name);
            mb_label(b, e->cfg.id);
            mb_printf(b, "\",op=\"%s\"} %.9f\n", stats_op_name(op),
                      (double)c->total_ns / 1e9);
            mb_printf(b, "%s_count{export=\"", name);
            mb_label(b, e->cfg.id);
            mb_printf(b, "\",op=\"%s\"} %llu\n", stats_op_name(op),
                      (unsigned long long)c->ops);
        }
    }
}

static void per_export_gauges(struct mbuf *b, struct server *srv)
{
    uint64_t now = loop_now_ns();
    mb_help(b, "strata_requests_in_flight", "gauge",
            "Requests started and not yet answered, by export.");
    for (size_t i = 0; i < srv->n_exports; i++) {
        mb_printf(b, "strata_requests_in_flight{export=\"");
        mb_label(b, srv->exports[i]->cfg.id);
        mb_printf(b, "\"} %u\n", srv->exports[i]->stats.inflight);
    }
    mb_help(b, "strata_export_clients", "gauge",
            "NBD clients in transmission on the export.");
    for (size_t i = 0; i < srv->n_exports; i++) {
        mb_printf(b, "strata_export_clients{export=\"");
        mb_label(b, srv->exports[i]->cfg.id);
        mb_printf(b, "\"} %u\n", srv->exports[i]->n_conns);
    }
    mb_help(b, "strata_export_idle_seconds", "gauge",
            "Time since the export's last request ended (absent before the first).");
    for (size_t i = 0; i < srv->n_exports; i++) {
        const struct export_stats *st = &srv->exports[i]->stats;
        if (!st->last_done_ns)
            continue;
        mb_printf(b, "strata_export_idle_seconds{export=\"");
        mb_label(b, srv->exports[i]->cfg.id);
        mb_printf(b, "\"} %.9f\n", now > st->last_done_ns
                  ? (double)(now - st->last_done_ns) / 1e9 : 0.0);
    }
}

static void job_metrics(struct mbuf *b, struct job_engine *jobs)
{
    mb_help(b, "strata_job_progress_bytes", "gauge",
            "Bytes a job has done (query-jobs current-progress).");
    for (struct job *j = jobs ? job_first(jobs) : NULL; j; j = job_next(j)) {
        mb_printf(b, "strata_job_progress_bytes{job=\"");
        mb_label(b, j->id);
        mb_printf(b, "\",type=\"%s\"} %llu\n", j->drv->type,
                  (unsigned long long)j->progress_current);
    }
    mb_help(b, "strata_job_total_bytes", "gauge",
            "Bytes a job has to do, as far as known (query-jobs total-progress).");
    for (struct job *j = jobs ? job_first(jobs) : NULL; j; j = job_next(j)) {
        mb_printf(b, "strata_job_total_bytes{job=\"");
        mb_label(b, j->id);
        mb_printf(b, "\",type=\"%s\"} %llu\n", j->drv->type,
                  (unsigned long long)j->progress_total);
    }
    mb_help(b, "strata_job_status", "gauge",
            "1 for each job, labelled with its status.");
    for (struct job *j = jobs ? job_first(jobs) : NULL; j; j = job_next(j)) {
        mb_printf(b, "strata_job_status{job=\"");
        mb_label(b, j->id);
        mb_printf(b, "\",type=\"%s\",status=\"%s\"} 1\n", j->drv->type,
                  job_status_name(j->status));
    }
}

int metrics_render(struct server *srv, struct job_engine *jobs, char **out,
                   size_t *len)
{
    struct mbuf b = {.cap = 16384};
    b.p = malloc(b.cap);
    if (!b.p)
        return -ENOMEM;
    b.p[0] = '\0';
    mb_help(&b, "strata_build_info", "gauge", "stratad's version.");
    mb_printf(&b, "strata_build_info{version=\"%s\"} 1\n", STRATA_VERSION);
    mb_help(&b, "strata_clients_connected", "gauge",
            "NBD clients connected, in handshake or transmission.");
    mb_printf(&b, "strata_clients_connected %u\n", srv->n_conns);
    per_op_counter(&b, srv, "strata_requests_total",
                   "Requests completed (success or failure), by export and operation.",
                   offsetof(struct stats_op_counters, ops));
    per_op_counter(&b, srv, "strata_request_bytes_total",
                   "Bytes of successful requests (payload, or range for trim and zero).",
                   offsetof(struct stats_op_counters, bytes));
    per_op_counter(&b, srv, "strata_request_errors_total",
                   "Requests that failed with an error reply.",
                   offsetof(struct stats_op_counters, failed));
    per_op_counter(&b, srv, "strata_request_invalid_total",
                   "Requests refused before they ran (invalid range, flags...).",
                   offsetof(struct stats_op_counters, invalid));
    histograms(&b, srv);
    per_export_gauges(&b, srv);
    job_metrics(&b, jobs);
    if (b.oom) {
        free(b.p);
        return -ENOMEM;
    }
    *out = b.p;
    *len = b.len;
    return 0;
}

#if STRATA_HAVE_MICROHTTPD

struct metrics {
    struct server *srv;
    struct job_engine *jobs;
    struct MHD_Daemon *mhd;
    int epfd;
    struct loop_op poll_op;
    bool poll_pending;
    struct loop_op timeout_op;     /* MHD_get_timeout() asked for a run */
    struct __kernel_timespec timeout_ts;
    bool timeout_pending;
    bool closing;
    struct loop_timer timer;
    char *addr;
};

static enum MHD_Result handle(void *cls, struct MHD_Connection *conn,
                              const char *url, const char *method,
                              const char *version, const char *upload_data,
                              size_t *upload_data_size, void **req_cls)
{
    struct metrics *m = cls;
    (void)version;
    (void)upload_data;
    if (*upload_data_size) {
        *upload_data_size = 0; /* a body is not for us: dropped */
        return MHD_YES;
    }
    (void)req_cls;
    struct MHD_Response *resp;
    unsigned status;
    if (strcmp(method, "GET") && strcmp(method, "HEAD")) {
        static const char msg[] = "only GET /metrics\n";
        resp = MHD_create_response_from_buffer(sizeof(msg) - 1, (void *)msg,
                                               MHD_RESPMEM_PERSISTENT);
        status = MHD_HTTP_METHOD_NOT_ALLOWED;
    } else if (strcmp(url, "/metrics")) {
        static const char msg[] = "not found: the metrics are at /metrics\n";
        resp = MHD_create_response_from_buffer(sizeof(msg) - 1, (void *)msg,
                                               MHD_RESPMEM_PERSISTENT);
        status = MHD_HTTP_NOT_FOUND;
    } else {
        char *page;
        size_t len;
        if (metrics_render(m->srv, m->jobs, &page, &len) < 0)
            return MHD_NO; /* closes the connection */
        resp = MHD_create_response_from_buffer(len, page, MHD_RESPMEM_MUST_FREE);
        if (!resp) {
            free(page);
            return MHD_NO;
        }
        MHD_add_response_header(resp, "Content-Type",
                                "text/plain; version=0.0.4; charset=utf-8");
        status = MHD_HTTP_OK;
    }
    if (!resp)
        return MHD_NO;
    enum MHD_Result r = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return r;
}

static void poll_done(struct loop_op *op, int res, uint32_t flags);
static void run_mhd(struct metrics *m);

static void timeout_done(struct loop_op *op, int res, uint32_t flags)
{
    struct metrics *m = container_of(op, struct metrics, timeout_op);
    (void)res;
    (void)flags;
    m->timeout_pending = false;
    if (!m->closing)
        run_mhd(m);
}

/* MHD_run(), then, when MHD wants to run again before the next second's
 * tick (work it could not finish, a timeout due), a ring timeout for
 * it. */
static void run_mhd(struct metrics *m)
{
    MHD_run(m->mhd); /* does what is ready, without blocking */
    MHD_UNSIGNED_LONG_LONG ms;
    if (m->timeout_pending || MHD_get_timeout(m->mhd, &ms) != MHD_YES ||
        ms >= 1000)
        return;
    m->timeout_ts.tv_sec = 0;
    m->timeout_ts.tv_nsec = (long long)ms * 1000000;
    m->timeout_op.done = timeout_done;
    io_uring_prep_timeout(loop_get_sqe(m->srv->loop, &m->timeout_op),
                          &m->timeout_ts, 0, 0);
    m->timeout_pending = true;
}

static void arm_poll(struct metrics *m)
{
    if (m->poll_pending || m->closing)
        return;
    io_uring_prep_poll_add(loop_get_sqe(m->srv->loop, &m->poll_op), m->epfd,
                           POLLIN);
    m->poll_pending = true;
}

static void poll_done(struct loop_op *op, int res, uint32_t flags)
{
    struct metrics *m = container_of(op, struct metrics, poll_op);
    (void)flags;
    m->poll_pending = false;
    if (m->closing)
        return;
    if (res < 0 && res != -EINTR && res != -EAGAIN && res != -ECANCELED) {
        log_error("--metrics: poll: %s", strerror(-res));
        return;
    }
    run_mhd(m);
    arm_poll(m);
}

static void tick(struct loop_timer *t, uint64_t now)
{
    struct metrics *m = container_of(t, struct metrics, timer);
    (void)now;
    if (!m->closing)
        run_mhd(m); /* connection timeouts */
}

__attribute__((format(printf, 2, 0)))
static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char msg[256];
    vsnprintf(msg, sizeof(msg), fmt, ap);
    size_t n = strlen(msg);
    while (n && msg[n - 1] == '\n')
        msg[--n] = '\0';
    log_debug("--metrics: %s", msg);
}

struct metrics *metrics_new(struct server *srv, struct job_engine *jobs,
                            const char *addr, struct error **errp)
{
    char host[256];
    const char *port;
    if (addr[0] == '[') {
        const char *end = strchr(addr, ']');
        if (!end || end[1] != ':' || (size_t)(end - addr - 1) >= sizeof(host)) {
            error_setf(errp, EINVAL, "--metrics %s: expected [IPV6]:PORT", addr);
            return NULL;
        }
        memcpy(host, addr + 1, (size_t)(end - addr - 1));
        host[end - addr - 1] = '\0';
        port = end + 2;
    } else {
        const char *colon = strrchr(addr, ':');
        if (!colon || (size_t)(colon - addr) >= sizeof(host)) {
            error_setf(errp, EINVAL, "--metrics %s: expected HOST:PORT", addr);
            return NULL;
        }
        memcpy(host, addr, (size_t)(colon - addr));
        host[colon - addr] = '\0';
        port = colon + 1;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    int gai = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
    if (gai != 0) {
        error_setf(errp, EINVAL, "--metrics %s: %s", addr, gai_strerror(gai));
        return NULL;
    }
    struct metrics *m = calloc(1, sizeof(*m));
    if (!m || !(m->addr = strdup(addr))) {
        free(m);
        freeaddrinfo(res);
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    m->srv = srv;
    m->jobs = jobs;
    /* no MHD_USE_INTERNAL_POLLING_THREAD: it runs only when we call it */
    unsigned flags = MHD_USE_EPOLL | MHD_USE_ERROR_LOG;
    if (res->ai_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    m->mhd = MHD_start_daemon(flags, 0, NULL, NULL, handle, m,
                              MHD_OPTION_SOCK_ADDR, res->ai_addr,
                              MHD_OPTION_CONNECTION_LIMIT,
                              (unsigned)METRICS_MAX_CLIENTS,
                              MHD_OPTION_CONNECTION_TIMEOUT,
                              (unsigned)METRICS_TIMEOUT_S,
                              MHD_OPTION_CONNECTION_MEMORY_LIMIT,
                              (size_t)METRICS_CONN_MEMORY,
                              MHD_OPTION_LISTENING_ADDRESS_REUSE, 1u,
                              MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL,
                              MHD_OPTION_END);
    freeaddrinfo(res);
    if (!m->mhd) {
        error_setf(errp, EADDRNOTAVAIL, "--metrics %s: cannot listen there "
                   "(in use, or not a local address)", addr);
        free(m->addr);
        free(m);
        return NULL;
    }
    const union MHD_DaemonInfo *info =
        MHD_get_daemon_info(m->mhd, MHD_DAEMON_INFO_EPOLL_FD);
    if (!info || info->epoll_fd < 0) {
        MHD_stop_daemon(m->mhd);
        free(m->addr);
        free(m);
        error_setf(errp, ENOTSUP, "--metrics: libmicrohttpd has no epoll");
        return NULL;
    }
    m->epfd = info->epoll_fd;
    m->poll_op.done = poll_done;
    m->timer.fn = tick;
    loop_timer_add(srv->loop, &m->timer);
    arm_poll(m);
    log_info("metrics on http://%s/metrics", addr);
    return m;
}

void metrics_free(struct metrics *m)
{
    if (!m)
        return;
    /* After the loop stopped: nothing runs MHD any more.  A poll still
     * pending on the ring dies with it. */
    m->closing = true;
    loop_timer_del(m->srv->loop, &m->timer);
    MHD_stop_daemon(m->mhd);
    free(m->addr);
    free(m);
}

#else /* no libmicrohttpd */

struct metrics *metrics_new(struct server *srv, struct job_engine *jobs,
                            const char *addr, struct error **errp)
{
    (void)srv;
    (void)jobs;
    error_setf(errp, ENOTSUP, "--metrics %s: stratad was built without "
               "libmicrohttpd (meson setup -Dmetrics=enabled)", addr);
    return NULL;
}

void metrics_free(struct metrics *m)
{
    (void)m;
}

#endif
