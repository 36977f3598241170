/* strata — small helpers every layer uses: container_of, MIN/MAX,
 * ARRAY_SIZE.  Header-only, no dependencies.
 */
#ifndef STRATA_UTIL_H
#define STRATA_UTIL_H

#include <stddef.h>

/* The structure of type `type` whose member `member` is at ptr: how a
 * completion handler embedded in an object finds the object. */
#define container_of(ptr, type, member) \
    ((type *)(void *)((char *)(ptr) - offsetof(type, member)))

#ifndef MIN
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#endif
#ifndef MAX
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#endif

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

#endif
