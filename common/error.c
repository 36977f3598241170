/* strata — the control-path error object (see error.h). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"

__attribute__((format(printf, 2, 0)))
static struct error *error_vnew(int code, const char *fmt, va_list ap)
{
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    if (n < 0)
        n = 0;
    struct error *e = malloc(sizeof(*e) + (size_t)n + 1);
    if (!e)
        return NULL;
    e->code = code;
    vsnprintf(e->msg, (size_t)n + 1, fmt, ap);
    return e;
}

int error_setf(struct error **errp, int code, const char *fmt, ...)
{
    if (errp && !*errp) {
        va_list ap;
        va_start(ap, fmt);
        *errp = error_vnew(code, fmt, ap);
        va_end(ap);
    }
    return -code;
}

void error_prefix(struct error **errp, const char *fmt, ...)
{
    if (!errp || !*errp)
        return;
    char prefix[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof(prefix), fmt, ap);
    va_end(ap);
    struct error *old = *errp;
    *errp = NULL;
    error_setf(errp, old->code, "%s%s", prefix, old->msg);
    if (!*errp) {
        *errp = old; /* keep the unprefixed one rather than nothing */
        return;
    }
    free(old);
}

void error_free(struct error *e)
{
    free(e);
}
