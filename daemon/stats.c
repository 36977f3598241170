/* strata — per-export I/O statistics (see stats.h). */
#include <assert.h>
#include <stdio.h>

#include <json-c/json.h>

#include "loop.h"
#include "stats.h"

static const char *const op_names[] = {
#define X(e, name, qemu) [STATS_OP_##e] = name,
    STATS_OPS(X)
#undef X
};

static const char *const op_qemu[] = {
#define X(e, name, qemu) [STATS_OP_##e] = qemu,
    STATS_OPS(X)
#undef X
};

const char *stats_op_name(enum stats_op op)
{
    assert(op < STATS_OP__MAX);
    return op_names[op];
}

const char *stats_op_qemu(enum stats_op op)
{
    assert(op < STATS_OP__MAX);
    return op_qemu[op];
}

uint64_t stats_request_start(struct export_stats *s)
{
    s->inflight++;
    return loop_now_ns();
}

void stats_request_done(struct export_stats *s, enum stats_op op,
                        uint64_t start_ns, int ret, uint64_t offset,
                        uint64_t bytes)
{
    assert(op < STATS_OP__MAX);
    assert(s->inflight > 0);
    uint64_t now = loop_now_ns();
    uint64_t ns = now > start_ns ? now - start_ns : 0;
    struct stats_op_counters *c = &s->op[op];
    s->inflight--;
    c->ops++;
    if (ret < 0)
        c->failed++;
    else
        c->bytes += bytes;
    if (op == STATS_OP_WRITE && ret >= 0 && offset + bytes > s->wr_highest_offset)
        s->wr_highest_offset = offset + bytes;
    c->total_ns += ns;
    c->lat[stats_lat_bucket(ns)]++;
    s->last_done_ns = now;
}

static void put_u64(struct json_object *o, const char *key, uint64_t v)
{
    json_object_object_add(o, key, json_object_new_uint64(v));
}

static struct json_object *histogram_json(const struct stats_op_counters *c)
{
    struct json_object *h = json_object_new_object();
    struct json_object *bounds = json_object_new_array();
    struct json_object *bins = json_object_new_array();
    for (unsigned k = 0; k + 1 < STATS_LAT_BUCKETS; k++)
        json_object_array_add(bounds, json_object_new_uint64(stats_lat_bound_ns(k)));
    for (unsigned k = 0; k < STATS_LAT_BUCKETS; k++)
        json_object_array_add(bins, json_object_new_uint64(c->lat[k]));
    json_object_object_add(h, "boundaries", bounds);
    json_object_object_add(h, "bins", bins);
    return h;
}

struct json_object *stats_to_json(const struct export_stats *s, uint64_t now_ns)
{
    struct json_object *o = json_object_new_object();
    char key[64];
    for (unsigned op = 0; op < STATS_OP__MAX; op++) {
        const struct stats_op_counters *c = &s->op[op];
        /* QEMU has rd, wr, flush and unmap; the rest is strata's */
        const char *x = op <= STATS_OP_UNMAP ? "" : "x_";
        const char *q = op_qemu[op];
        if (op != STATS_OP_FLUSH) {
            snprintf(key, sizeof(key), "%s%s_bytes", x, q);
            put_u64(o, key, c->bytes);
        }
        snprintf(key, sizeof(key), "%s%s_operations", x, q);
        put_u64(o, key, c->ops);
        snprintf(key, sizeof(key), "%s%s_total_time_ns", x, q);
        put_u64(o, key, c->total_ns);
        snprintf(key, sizeof(key), "%sfailed_%s_operations", x, q);
        put_u64(o, key, c->failed);
        snprintf(key, sizeof(key), "%sinvalid_%s_operations", x, q);
        put_u64(o, key, __atomic_load_n(&c->invalid, __ATOMIC_RELAXED));
        if (op != STATS_OP_UNMAP) {
            snprintf(key, sizeof(key), "%s%s_latency_histogram",
                     op <= STATS_OP_FLUSH ? "" : "x_", q);
            json_object_object_add(o, key, histogram_json(c));
        } else {
            json_object_object_add(o, "x_unmap_latency_histogram",
                                   histogram_json(c));
        }
    }
    /* strata does not merge requests */
    put_u64(o, "rd_merged", 0);
    put_u64(o, "wr_merged", 0);
    put_u64(o, "unmap_merged", 0);
    put_u64(o, "wr_highest_offset", s->wr_highest_offset);
    if (s->last_done_ns)
        put_u64(o, "idle_time_ns",
                now_ns > s->last_done_ns ? now_ns - s->last_done_ns : 0);
    json_object_object_add(o, "account_invalid", json_object_new_boolean(1));
    json_object_object_add(o, "account_failed", json_object_new_boolean(1));
    json_object_object_add(o, "timed_stats", json_object_new_array());
    put_u64(o, "x_inflight", s->inflight);
    return o;
}
