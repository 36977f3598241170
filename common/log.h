/* strata — logging to stderr (or syslog-less journald via stderr).
 *
 * The verbosity is set once at start-up, before any loop runs, and is read
 * only afterwards: the one piece of process-wide configuration.
 */
#ifndef STRATA_LOG_H
#define STRATA_LOG_H

enum log_level { LOG_ERROR, LOG_WARN, LOG_INFO, LOG_DEBUG };

void log_set_level(enum log_level level);
enum log_level log_get_level(void);
void log_msg(enum log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)
#define log_warn(...)  log_msg(LOG_WARN, __VA_ARGS__)
#define log_info(...)  log_msg(LOG_INFO, __VA_ARGS__)
#define log_debug(...)                                  \
    do {                                                \
        if (log_get_level() >= LOG_DEBUG)               \
            log_msg(LOG_DEBUG, __VA_ARGS__);            \
    } while (0)

#endif
