/* strata — logging (see log.h). */
#include <stdarg.h>
#include <stdio.h>


#include "log.h"

/* Written once by main() before the loop starts; read-only afterwards. */
static enum log_level log_level = LOG_INFO;

void log_set_level(enum log_level level)
{
    log_level = level;
}

enum log_level log_get_level(void)
{
    return log_level;
}

void log_msg(enum log_level level, const char *fmt, ...)
{
    static const char *const names[] = {"error", "warning", "info", "debug"};
    if (level > log_level)
        return;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    fprintf(stderr, "stratad: %s: %s\n", names[level], line);
}
