/* strata — the control-path error object.
 *
 * Data path functions return -errno.  Control-path functions (open, parse,
 * configure) take `struct error **errp` last and, on failure, set it to an
 * object carrying an errno class and a one-phrase message for humans.
 * errp may be NULL when the caller does not care.
 */
#ifndef STRATA_ERROR_H
#define STRATA_ERROR_H

struct error {
    int code;      /* positive errno describing the class of failure */
    char msg[];    /* NUL-terminated message */
};

/* Sets *errp (if errp and *errp is NULL) and returns -code. */
int error_setf(struct error **errp, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Prefixes an existing error's message ("opening x: " + old). */
void error_prefix(struct error **errp, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void error_free(struct error *e);

static inline void error_freep(struct error **e)
{
    error_free(*e);
    *e = 0;
}
#define CLEANUP_ERROR __attribute__((cleanup(error_freep)))

#endif
