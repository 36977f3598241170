/* strata — fuzz target: the nbd: spec parser and the rules for nbd://
 * backing names (backends/nbd-spec.c).
 *
 * Export specs come from the operator, backing names from image headers,
 * which whoever wrote the image controls.  Input layout: up to the first
 * newline a spec A ("nbd" is put in front when it does not start with
 * it, so the search does not spend its time on the prefix); up to the
 * second the export's backing-remote=nbd: settings S (absent: none);
 * after it a backing name B.
 *
 * Properties:
 *  - parse -> format -> parse gives the same struct, and formatting that
 *    gives the same string; without options the format has no '?' option
 *    other than socket=;
 *  - a failed parse leaves the struct empty and sets an error;
 *  - nbd_spec_check_settings(S) succeeds iff resolving under S can get
 *    past the settings (an error about S is never confused with one
 *    about B);
 *  - B resolved under A (when it parses) or under a local image:
 *    whatever comes back parses; it names A's server, or S was given (a
 *    local overlay reaches no NBD server without the operator's say); a
 *    B that sets options is refused; a result on A's server has A's TLS
 *    and options (a header cannot turn TLS off, nor choose files); a B
 *    with nbds is never resolved to plaintext.
 * Every result is freed, so LeakSanitizer sees a leak on any path.
 */
#include <errno.h>
#include <stdbool.h>

#include "fuzz.h"
#include "nbd-spec.h"

static bool same_str(const char *a, const char *b)
{
    if (!a || !b)
        return a == b;
    return strcmp(a, b) == 0;
}

static bool spec_equal(const struct nbd_spec *x, const struct nbd_spec *y)
{
    return same_str(x->host, y->host) && same_str(x->port, y->port) &&
           same_str(x->socket, y->socket) && same_str(x->export, y->export) &&
           x->tls == y->tls &&
           x->reconnect_delay == y->reconnect_delay &&
           x->reconnect_delay_set == y->reconnect_delay_set &&
           x->connect_timeout == y->connect_timeout &&
           x->connect_timeout_set == y->connect_timeout_set &&
           same_str(x->tls_certificates, y->tls_certificates) &&
           same_str(x->tls_psk_file, y->tls_psk_file) &&
           same_str(x->tls_username, y->tls_username) &&
           x->tls_verify_peer == y->tls_verify_peer &&
           x->tls_verify_peer_set == y->tls_verify_peer_set;
}

static bool same_options(const struct nbd_spec *x, const struct nbd_spec *y)
{
    return x->tls == y->tls && x->reconnect_delay == y->reconnect_delay &&
           x->connect_timeout == y->connect_timeout &&
           same_str(x->tls_certificates, y->tls_certificates) &&
           same_str(x->tls_psk_file, y->tls_psk_file) &&
           same_str(x->tls_username, y->tls_username) &&
           x->tls_verify_peer_set == y->tls_verify_peer_set &&
           x->tls_verify_peer == y->tls_verify_peer;
}

static void check_empty(const struct nbd_spec *s)
{
    FUZZ_CHECK(!s->host && !s->port && !s->socket && !s->export &&
               !s->tls_certificates && !s->tls_psk_file && !s->tls_username);
}

static void fail(const char *what, const char *a, const char *b)
{
    fprintf(stderr, "%s\n  input:  %s\n  result: %s\n", what, a,
            b ? b : "(null)");
    abort();
}

/* Parses text into *s; on success checks the round trip.  Returns whether
 * it parsed (*s is empty when not). */
static bool check_spec(const char *text, struct nbd_spec *s)
{
    struct nbd_spec s2;
    struct error *err = NULL;
    int r = nbd_spec_parse(text, s, &err);

    if (r < 0) {
        FUZZ_CHECK(err != NULL && err->code == -r && err->msg[0] != '\0');
        check_empty(s);
        error_free(err);
        return false;
    }
    FUZZ_CHECK(r == 0 && err == NULL);
    FUZZ_CHECK(s->export && (s->socket ? !s->host && !s->port
                                       : s->host && s->port));
    FUZZ_CHECK(s->tls || !(s->tls_certificates || s->tls_psk_file ||
                           s->tls_username || s->tls_verify_peer_set));

    char *f = nbd_spec_format(s, true);
    FUZZ_CHECK(f != NULL);
    if (nbd_spec_parse(f, &s2, &err) < 0) {
        fprintf(stderr, "error: %s\n", err->msg);
        fail("the formatted spec does not parse", text, f);
    }
    if (!spec_equal(s, &s2))
        fail("the formatted spec parses to another spec", text, f);
    char *f2 = nbd_spec_format(&s2, true);
    FUZZ_CHECK(f2 != NULL);
    if (strcmp(f, f2) != 0)
        fail("formatting is not stable", f, f2);
    free(f2);
    nbd_spec_clear(&s2);

    /* without options: the same server and export, no option */
    char *bare = nbd_spec_format(s, false);
    FUZZ_CHECK(bare != NULL);
    if (nbd_spec_parse(bare, &s2, &err) < 0) {
        fprintf(stderr, "error: %s\n", err->msg);
        fail("the spec without options does not parse", text, bare);
    }
    if (!nbd_spec_same_server(s, &s2) || strcmp(s->export, s2.export) ||
        s2.tls != s->tls || nbd_spec_has_options(&s2))
        fail("the spec without options differs", text, bare);
    nbd_spec_clear(&s2);
    free(bare);
    free(f);
    return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *nl = memchr(data, '\n', size);
    size_t alen = nl ? (size_t)(nl - data) : size;
    char *a0 = fuzz_strdup(data, alen);
    char *settings = NULL, *b = NULL;
    if (nl) {
        const uint8_t *rest = nl + 1;
        size_t rlen = size - alen - 1;
        const uint8_t *nl2 = memchr(rest, '\n', rlen);
        size_t slen = nl2 ? (size_t)(nl2 - rest) : rlen;
        settings = fuzz_strdup(rest, slen);
        if (nl2)
            b = fuzz_strdup(nl2 + 1, rlen - slen - 1);
    }
    char *a;
    if (strncmp(a0, "nbd", 3) == 0) {
        a = a0;
    } else {
        a = malloc(strlen(a0) + 4);
        if (!a)
            abort();
        memcpy(a, "nbd", 3);
        strcpy(a + 3, a0);
        free(a0);
    }

    struct nbd_spec sa;
    bool a_ok = check_spec(a, &sa);

    bool settings_ok = false;
    if (settings) {
        struct error *err = NULL;
        int r = nbd_spec_check_settings(settings, &err);
        FUZZ_CHECK(r == 0 ? err == NULL : err != NULL && err->code == -r);
        error_free(err);
        settings_ok = r == 0;
    }

    if (b) {
        struct nbd_spec sb = {0};
        bool b_ok = nbd_spec_claims(b) && check_spec(b, &sb);
        char *out = NULL;
        struct error *err = NULL;
        int r = nbd_spec_resolve_backing(a_ok ? a : NULL, settings, b, &out,
                                         &err);
        if (r == 0) {
            FUZZ_CHECK(out != NULL && err == NULL);
            struct nbd_spec so;
            if (!check_spec(out, &so))
                fail("a resolved backing name does not parse", b, out);
            bool on_a = a_ok && nbd_spec_same_server(&sa, &so);
            if (!on_a && !settings)
                fail("a backing name reached a server without the "
                     "operator's settings", b, out);
            if (!on_a && !settings_ok)
                fail("a backing name resolved under bad settings", b, out);
            if (b_ok && nbd_spec_has_options(&sb))
                fail("a backing name with options was resolved", b, out);
            if (b_ok && sb.tls && !so.tls)
                fail("an nbds backing name was resolved to plaintext", b,
                     out);
            if (on_a && !same_options(&sa, &so))
                fail("a backing name on its overlay's server has other "
                     "options or TLS than the overlay", b, out);
            nbd_spec_clear(&so);
            free(out);
        } else {
            FUZZ_CHECK(r < 0 && out == NULL && err != NULL &&
                       err->code == -r && err->msg[0] != '\0');
            error_free(err);
        }
        nbd_spec_clear(&sb);
    }
    if (a_ok)
        nbd_spec_clear(&sa);
    free(b);
    free(settings);
    free(a);
    return 0;
}
