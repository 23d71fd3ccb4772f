/*
 * fuzz_ehlo.c - libFuzzer target: smtp_ehlo_has and smtp_ehlo_filter on each
 * complete reply found in the input (and on the raw input), with drop/add in
 * {NULL, "STARTTLS"} and several output capacities. Each output buffer is
 * malloc'ed with exactly outcap bytes so ASan sees any overrun. Invariant
 * violations abort().
 *
 * clang -g -O1 -fsanitize=fuzzer,address,undefined -Iproxy \
 *       tests/fuzz/fuzz_ehlo.c proxy/smtp.c -o build/fuzz/fuzz_ehlo
 */
#include "smtp.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRE(cond)                                                                              \
    do {                                                                                           \
        if (!(cond))                                                                               \
            abort();                                                                               \
    } while (0)

static int lower(int c)
{
    return (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c;
}

static size_t content_len(const char *line, size_t len)
{
    if (len > 0 && line[len - 1] == '\n')
        len--;
    if (len > 0 && line[len - 1] == '\r')
        len--;
    return len;
}

/* Reference: is this (non-first) reply line a `kw` keyword line? */
static int ref_is_kw(const char *line, size_t len, const char *kw)
{
    size_t n = content_len(line, len), k = strlen(kw);

    if (n < 4 + k)
        return 0;
    for (size_t i = 0; i < k; i++)
        if (lower((unsigned char)line[4 + i]) != lower((unsigned char)kw[i]))
            return 0;
    return n == 4 + k || line[4 + k] == ' ';
}

/* Reference: number of keyword lines (never the first line). */
static size_t ref_count_kw(const char *r, size_t len, const char *kw)
{
    size_t off = 0, ll, count = 0;
    int first = 1;

    while (off < len && smtp_find_line(r + off, len - off, &ll)) {
        if (!first && ref_is_kw(r + off, ll, kw))
            count++;
        first = 0;
        off += ll;
    }
    return count;
}

static const char *const keywords[] = {"STARTTLS", "starttls",   "AUTH",
                                       "8BITMIME", "PIPELINING", "SIZE"};

/* Run one filter call and check its output. Returns the filter's result. */
static int check_filter(const char *in, size_t len, int valid, int code, size_t lines,
                        const char *drop, const char *add, size_t outcap, char **prev,
                        size_t *prevlen)
{
    char *out = malloc(outcap ? outcap : 1);
    size_t outlen = (size_t)-1, in_drop, in_add;
    int rc;

    REQUIRE(out != NULL);
    rc = smtp_ehlo_filter(in, len, out, outcap, drop, add, &outlen);
    REQUIRE(rc == 0 || rc == -1);
    if (rc == -1) {
        /* Failure for a valid reply is only allowed for lack of room. */
        REQUIRE(!valid || outcap < len + 8 + (add ? strlen(add) : 0));
        free(out);
        return rc;
    }
    REQUIRE(valid);
    REQUIRE(outlen <= outcap);

    /* The output is exactly one complete valid reply with the same code:
     * only its last line is a final ("DDD " / "DDD") line. */
    {
        struct smtp_reply r;
        const char *err;
        REQUIRE(smtp_parse_reply(out, outlen, &r, &err) == SMTP_REPLY_COMPLETE);
        REQUIRE(r.len == outlen);
        REQUIRE(r.code == code);
        REQUIRE(r.lines >= 1 && r.lines <= lines + (add != NULL));
    }

    /* Keyword lines in the output (drop and add are NULL or "STARTTLS"). */
    in_drop = drop ? ref_count_kw(in, len, drop) : 0;
    in_add = add ? ref_count_kw(in, len, add) : 0;
    if (drop != NULL && add == NULL) {
        REQUIRE(ref_count_kw(out, outlen, drop) == 0);
        REQUIRE(smtp_ehlo_has(out, outlen, drop) == 0);
    }
    if (drop != NULL && add != NULL && strcmp(drop, add) == 0)
        REQUIRE(ref_count_kw(out, outlen, add) == 1);
    if (drop == NULL && add != NULL)
        REQUIRE(ref_count_kw(out, outlen, add) == (in_add ? in_add : 1));
    if (add != NULL)
        REQUIRE(smtp_ehlo_has(out, outlen, add) == 1);
    /* Nothing to change: the output is the input, byte for byte. */
    if (in_drop == 0 && (add == NULL || in_add > 0))
        REQUIRE(outlen == len && memcmp(out, in, len) == 0);

    /* Kept lines keep their code, text and terminator, in order; at most one
     * line is added, at the end, ending in CRLF. */
    {
        size_t io = 0, oo = 0, ill, oll;
        int first = 1;
        while (io < len) {
            REQUIRE(smtp_find_line(in + io, len - io, &ill));
            if (!first && drop != NULL && ref_is_kw(in + io, ill, drop)) {
                io += ill;
                continue;
            }
            REQUIRE(oo < outlen && smtp_find_line(out + oo, outlen - oo, &oll));
            size_t in_n = content_len(in + io, ill), out_n = content_len(out + oo, oll);
            REQUIRE(memcmp(out + oo, in + io, 3) == 0);
            REQUIRE(ill - in_n == oll - out_n); /* same terminator */
            if (in_n > 4 || out_n > 4)
                REQUIRE(in_n == out_n && memcmp(out + oo + 4, in + io + 4, in_n - 4) == 0);
            first = 0;
            io += ill;
            oo += oll;
        }
        if (oo < outlen) {
            size_t alen;
            REQUIRE(add != NULL && (in_add == 0 || (drop != NULL && strcmp(add, drop) == 0)));
            alen = strlen(add);
            REQUIRE(smtp_find_line(out + oo, outlen - oo, &oll));
            REQUIRE(oo + oll == outlen);
            REQUIRE(oll == 4 + alen + 2);
            REQUIRE(memcmp(out + oo + 4, add, alen) == 0);
            REQUIRE(memcmp(out + oo + oll - 2, "\r\n", 2) == 0);
        }
    }

    /* Same result whatever the capacity. */
    if (*prev != NULL) {
        REQUIRE(*prevlen == outlen && memcmp(*prev, out, outlen) == 0);
    } else {
        *prev = malloc(outlen ? outlen : 1);
        REQUIRE(*prev != NULL);
        memcpy(*prev, out, outlen);
        *prevlen = outlen;
    }
    free(out);
    return rc;
}

static void check_reply(const char *in, size_t len)
{
    struct smtp_reply r;
    const char *err;
    int valid = smtp_parse_reply(in, len, &r, &err) == SMTP_REPLY_COMPLETE && r.len == len;
    static const char *const opts[] = {NULL, "STARTTLS"};

    for (size_t k = 0; k < sizeof(keywords) / sizeof(keywords[0]); k++) {
        int has = smtp_ehlo_has(in, len, keywords[k]);
        REQUIRE(has == 0 || has == 1);
        REQUIRE(has == (ref_count_kw(in, len, keywords[k]) > 0));
    }
    for (size_t d = 0; d < 2; d++) {
        for (size_t a = 0; a < 2; a++) {
            /* Capacities from large to small: once one fails, every smaller
             * one must fail too, and all successes give the same bytes. */
            size_t caps[] = {len + 64, len + 14, len + 1, len, len > 0 ? len - 1 : 0, len / 2, 0};
            char *prev = NULL;
            size_t prevlen = 0;
            int failed = 0;
            for (size_t c = 0; c < sizeof(caps) / sizeof(caps[0]); c++) {
                int rc = check_filter(in, len, valid, valid ? r.code : 0, valid ? r.lines : 0,
                                      opts[d], opts[a], caps[c], &prev, &prevlen);
                if (rc == 0)
                    REQUIRE(!failed);
                else
                    failed = 1;
            }
            free(prev);
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *buf = (const char *)data;
    size_t off = 0, rounds = 0;

    /* Raw input, valid or not. */
    check_reply(buf, size);
    /* Every complete reply in the input. */
    while (off < size && rounds++ < 200) {
        struct smtp_reply r;
        const char *err;
        enum smtp_reply_status st = smtp_parse_reply(buf + off, size - off, &r, &err);
        size_t linelen;

        if (st == SMTP_REPLY_COMPLETE) {
            check_reply(buf + off, r.len);
            off += r.len;
        } else if (st == SMTP_REPLY_ERROR && smtp_find_line(buf + off, size - off, &linelen)) {
            off += linelen;
        } else {
            break;
        }
    }
    return 0;
}
