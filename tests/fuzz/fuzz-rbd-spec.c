/* strata — fuzz target: the rbd: spec parser (backends/rbd-spec.c).
 *
 * Export specs come from the operator, but backing names come from image
 * headers, which whoever wrote the image controls.  Input layout: up to
 * the first newline, a spec A ("rbd:" is put in front when it does not
 * start with it, so the search does not spend its time on the prefix);
 * after it, a backing name B.
 *
 * Properties:
 *  - parse -> format -> parse gives the same struct, and formatting that
 *    gives the same string (rbd-spec.h: "rbd_spec_parse() reads back the
 *    same spec");
 *  - a failed parse leaves the struct empty and sets an error;
 *  - a spec names the same image as itself iff it parses;
 *  - whatever rbd_spec_resolve_backing() and rbd_spec_backing_name()
 *    return parses.
 * Every result is freed, so LeakSanitizer sees a leak on any path.
 */
#include <errno.h>
#include <stdbool.h>

#include "fuzz.h"
#include "rbd-spec.h"

static bool same_str(const char *a, const char *b)
{
    if (!a || !b)
        return a == b;
    return strcmp(a, b) == 0;
}

static bool spec_equal(const struct rbd_spec *x, const struct rbd_spec *y)
{
    if (!same_str(x->pool, y->pool) || !same_str(x->ns, y->ns) ||
        !same_str(x->image, y->image) || !same_str(x->snap, y->snap) ||
        !same_str(x->conf, y->conf) || !same_str(x->id, y->id) ||
        !same_str(x->keyring, y->keyring))
        return false;
    if (x->timeout != y->timeout || x->connect_timeout != y->connect_timeout ||
        x->timeout_set != y->timeout_set ||
        x->connect_timeout_set != y->connect_timeout_set ||
        x->n_opts != y->n_opts)
        return false;
    for (size_t i = 0; i < x->n_opts; i++)
        if (!same_str(x->opts[i].key, y->opts[i].key) ||
            !same_str(x->opts[i].val, y->opts[i].val))
            return false;
    return true;
}

static void check_empty(const struct rbd_spec *s)
{
    FUZZ_CHECK(!s->pool && !s->ns && !s->image && !s->snap && !s->conf &&
               !s->id && !s->keyring && s->n_opts == 0);
}

static void fail_roundtrip(const char *what, const char *text, const char *f)
{
    fprintf(stderr, "round trip: %s\n  spec:      %s\n  formatted: %s\n",
            what, text, f ? f : "(null)");
    abort();
}

/* Parses text; on success checks the round trip.  Returns whether it
 * parsed. */
static bool check_spec(const char *text)
{
    struct rbd_spec s, s2;
    struct error *err = NULL;
    char *f, *f2;
    int r = rbd_spec_parse(text, &s, &err);

    if (r < 0) {
        FUZZ_CHECK(err != NULL && err->code == -r && err->msg[0] != '\0');
        check_empty(&s);
        error_free(err);
        return false;
    }
    FUZZ_CHECK(r == 0 && err == NULL);
    FUZZ_CHECK(s.pool && s.image);
    FUZZ_CHECK(s.n_opts <= RBD_SPEC_MAX_OPTS);
    FUZZ_CHECK(s.connect_timeout >= 1);

    f = rbd_spec_format(&s);
    FUZZ_CHECK(f != NULL);
    if (rbd_spec_parse(f, &s2, &err) < 0) {
        fprintf(stderr, "error: %s\n", err->msg);
        fail_roundtrip("the formatted spec does not parse", text, f);
    }
    if (!spec_equal(&s, &s2))
        fail_roundtrip("the formatted spec parses to another spec", text, f);
    f2 = rbd_spec_format(&s2);
    FUZZ_CHECK(f2 != NULL);
    if (strcmp(f, f2) != 0)
        fail_roundtrip("formatting is not stable", f, f2);
    FUZZ_CHECK(rbd_spec_same_image(text, f));

    free(f2);
    free(f);
    rbd_spec_clear(&s2);
    rbd_spec_clear(&s);
    check_empty(&s);
    return true;
}

static void check_parses(const char *what, const char *spec)
{
    struct rbd_spec s;
    struct error *err = NULL;

    if (rbd_spec_parse(spec, &s, &err) < 0) {
        fprintf(stderr, "%s returned a spec that does not parse: %s (%s)\n",
                what, spec, err->msg);
        abort();
    }
    rbd_spec_clear(&s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *nl = memchr(data, '\n', size);
    size_t alen = nl ? (size_t)(nl - data) : size;
    char *a0 = fuzz_strdup(data, alen);
    char *b = nl ? fuzz_strdup(nl + 1, size - alen - 1) : NULL;
    char *a;
    bool a_ok;

    if (strncmp(a0, "rbd:", 4) == 0) {
        a = a0;
    } else {
        a = malloc(strlen(a0) + 5);
        if (!a)
            abort();
        memcpy(a, "rbd:", 4);
        strcpy(a + 4, a0);
        free(a0);
    }

    a_ok = check_spec(a);
    FUZZ_CHECK(rbd_spec_same_image(a, a) == a_ok);

    if (b) {
        char *out = NULL;
        struct error *err = NULL;
        int r;

        if (strncmp(b, "rbd:", 4) == 0)
            check_spec(b);

        /* B as the backing name of an image, under A (when it is a spec)
         * or under a local file. */
        r = rbd_spec_resolve_backing(a_ok ? a : NULL, a_ok ? NULL : "", b,
                                     &out, &err);
        if (r == 0) {
            FUZZ_CHECK(out != NULL && err == NULL);
            check_parses("rbd_spec_resolve_backing", out);
            free(out);
        } else {
            FUZZ_CHECK(r < 0 && out == NULL && err != NULL);
            error_free(err);
            err = NULL;
        }

        /* A as a layer recorded in the header of an overlay B. */
        r = rbd_spec_backing_name(a, strncmp(b, "rbd:", 4) ? NULL : b, &out,
                                  &err);
        if (r == 0) {
            FUZZ_CHECK(out != NULL && err == NULL);
            check_parses("rbd_spec_backing_name", out);
            free(out);
        } else {
            FUZZ_CHECK(r < 0 && out == NULL && err != NULL);
            error_free(err);
        }
    }
    free(b);
    free(a);
    return 0;
}
