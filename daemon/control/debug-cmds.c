/* strata — x-debug-fault-inject and x-debug-fault-query: the test
 * suite's handle on backend fault injection (backends/fault.h).  In a
 * build without -Dfault_injection=true both answer with an error that
 * says so. */
#include <errno.h>
#include <string.h>

#include <json-c/json.h>

#include "control-int.h"
#include "fault.h"

static const struct {
    const char *name;
    unsigned op;
} fault_ops[] = {
    {"read", BACKEND_FAULT_READ},         {"write", BACKEND_FAULT_WRITE},
    {"flush", BACKEND_FAULT_FLUSH},       {"zero", BACKEND_FAULT_ZERO},
    {"discard", BACKEND_FAULT_DISCARD},   {"truncate", BACKEND_FAULT_TRUNCATE},
};

static const struct {
    const char *name;
    int error;
} fault_errors[] = {
    {"EIO", -EIO}, {"ENOSPC", -ENOSPC}, {"EDQUOT", -EDQUOT},
    {"EROFS", -EROFS}, {"short", 0}, {"kill", BACKEND_FAULT_KILL},
    {"hold", BACKEND_FAULT_HOLD},
};

struct json_object *cmd_x_debug_fault_inject(struct ctl_cmd_ctx *cx,
                                             struct json_object *args,
                                             struct error **errp)
{
    (void)cx;
    struct backend_fault_plan p = {0};
    struct json_object *v;
    if (json_object_object_get_ex(args, "ops", &v)) {
        size_t n = json_object_array_length(v);
        for (size_t i = 0; i < n; i++) {
            const char *s = json_object_get_string(json_object_array_get_idx(v, i));
            size_t k = 0;
            while (k < sizeof(fault_ops) / sizeof(fault_ops[0]) &&
                   (!s || strcmp(fault_ops[k].name, s)))
                k++;
            if (k == sizeof(fault_ops) / sizeof(fault_ops[0])) {
                error_setf(errp, EINVAL, "Parameter 'ops' expects read, write, "
                           "flush, zero, discard or truncate, not '%s'",
                           s ? s : "(not a string)");
                return NULL;
            }
            p.ops |= fault_ops[k].op;
        }
    } else {
        p.ops = BACKEND_FAULT_ALL;
    }
    json_object_object_get_ex(args, "nth", &v);
    int64_t nth = json_object_get_int64(v);
    if (nth < 0) {
        error_setf(errp, EINVAL, "Parameter 'nth' must be 0 (disarm) or more");
        return NULL;
    }
    p.nth = (uint64_t)nth;
    p.error = -EIO;
    if (json_object_object_get_ex(args, "error", &v)) {
        const char *s = json_object_get_string(v);
        size_t k = 0;
        while (k < sizeof(fault_errors) / sizeof(fault_errors[0]) &&
               strcmp(fault_errors[k].name, s))
            k++;
        if (k == sizeof(fault_errors) / sizeof(fault_errors[0])) {
            error_setf(errp, EINVAL, "Parameter 'error' expects EIO, ENOSPC, "
                       "EDQUOT, EROFS, short, kill or hold, not '%s'", s);
            return NULL;
        }
        p.error = fault_errors[k].error;
    }
    int r = backend_fault_arm(&p);
    if (r == -ENOTSUP) {
        error_setf(errp, ENOTSUP, "this stratad was built without fault "
                   "injection (meson setup -Dfault_injection=true)");
        return NULL;
    }
    if (r < 0) {
        error_setf(errp, EINVAL, p.error == BACKEND_FAULT_HOLD
                   ? "a hold only applies to write and flush operations"
                   : "a short transfer only applies to read and write "
                   "operations");
        return NULL;
    }
    return json_object_new_object();
}

struct json_object *cmd_x_debug_fault_query(struct ctl_cmd_ctx *cx,
                                            struct json_object *args,
                                            struct error **errp)
{
    (void)cx;
    (void)args;
    if (!STRATA_FAULT_INJECTION) {
        error_setf(errp, ENOTSUP, "this stratad was built without fault "
                   "injection (meson setup -Dfault_injection=true)");
        return NULL;
    }
    struct backend_fault_stats st;
    backend_fault_get_stats(&st);
    struct json_object *r = json_object_new_object();
    json_object_object_add(r, "seen", json_object_new_int64((int64_t)st.seen));
    json_object_object_add(r, "armed", json_object_new_boolean(st.armed));
    json_object_object_add(r, "fired", json_object_new_boolean(st.fired));
    return r;
}
