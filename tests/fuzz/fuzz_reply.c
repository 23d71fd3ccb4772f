/*
 * fuzz_reply.c - libFuzzer target: smtp_parse_reply repeatedly over the
 * input, consuming complete replies (and resynchronising after an error at
 * the next LF). Invariant violations abort().
 *
 * clang -g -O1 -fsanitize=fuzzer,address,undefined -Iproxy \
 *       tests/fuzz/fuzz_reply.c proxy/smtp.c -o build/fuzz/fuzz_reply
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

static enum smtp_reply_status parse(const char *buf, size_t len, struct smtp_reply *r,
                                    const char **err)
{
    enum smtp_reply_status st;

    memset(r, 0xA5, sizeof(*r));
    *err = (const char *)1; /* must be overwritten */
    st = smtp_parse_reply(buf, len, r, err);
    REQUIRE(st == SMTP_REPLY_COMPLETE || st == SMTP_REPLY_INCOMPLETE || st == SMTP_REPLY_ERROR);
    if (st == SMTP_REPLY_ERROR)
        REQUIRE(*err != NULL && *err != (const char *)1 && (*err)[0] != '\0');
    else
        REQUIRE(*err == NULL);
    return st;
}

/* Check a COMPLETE reply r at buf[0..avail). */
static void check_complete(const char *buf, size_t avail, const struct smtp_reply *r)
{
    size_t off = 0, lines = 0, linelen;

    REQUIRE(r->len >= 4 && r->len <= avail);
    REQUIRE(r->code >= 200 && r->code <= 599);
    REQUIRE(r->lines >= 1 && r->lines <= SMTP_MAX_REPLY_LINES);
    REQUIRE(buf[r->len - 1] == '\n');
    while (off < r->len) {
        REQUIRE(smtp_find_line(buf + off, r->len - off, &linelen));
        REQUIRE(linelen <= SMTP_MAX_REPLY_LINE);
        REQUIRE(buf[off] - '0' == r->code / 100);
        REQUIRE(buf[off + 1] - '0' == r->code / 10 % 10);
        REQUIRE(buf[off + 2] - '0' == r->code % 10);
        lines++;
        /* Only the last line is final. */
        {
            size_t n = linelen - 1;
            if (n > 0 && buf[off + n - 1] == '\r')
                n--;
            int final = n == 3 || buf[off + 3] == ' ';
            REQUIRE(n >= 3);
            REQUIRE(n == 3 || buf[off + 3] == ' ' || buf[off + 3] == '-');
            REQUIRE(final == (off + linelen == r->len));
        }
        off += linelen;
    }
    REQUIRE(lines == r->lines);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *buf = (const char *)data;
    size_t off = 0, rounds = 0;

    while (off < size && rounds++ < 1000) {
        struct smtp_reply r, r2;
        const char *err, *err2;
        enum smtp_reply_status st = parse(buf + off, size - off, &r, &err);

        if (st == SMTP_REPLY_COMPLETE) {
            check_complete(buf + off, size - off, &r);
            /* Exactly the reply's bytes give the same result ... */
            REQUIRE(parse(buf + off, r.len, &r2, &err2) == SMTP_REPLY_COMPLETE);
            REQUIRE(r2.len == r.len && r2.code == r.code && r2.lines == r.lines);
            /* ... and any strict prefix is INCOMPLETE (never early
             * COMPLETE, never ERROR). Check a few prefix lengths. */
            size_t cuts[4] = {r.len - 1, r.len / 2, r.len - r.len / 3, data[off] % r.len};
            for (size_t i = 0; i < 4; i++)
                REQUIRE(parse(buf + off, cuts[i], &r2, &err2) == SMTP_REPLY_INCOMPLETE);
            off += r.len;
        } else if (st == SMTP_REPLY_INCOMPLETE) {
            /* Nothing malformed is visible yet; the remaining bytes are
             * shorter than what a maximal reply could need. */
            REQUIRE(size - off <= (size_t)SMTP_MAX_REPLY_LINES * SMTP_MAX_REPLY_LINE);
            /* Adding bytes never turns INCOMPLETE into an early verdict on
             * the bytes we already had: a prefix is INCOMPLETE too. */
            if (size - off > 0)
                REQUIRE(parse(buf + off, size - off - 1, &r2, &err2) == SMTP_REPLY_INCOMPLETE);
            break;
        } else {
            /* Malformed: skip to the next line and try again. */
            size_t linelen;
            if (!smtp_find_line(buf + off, size - off, &linelen))
                break;
            off += linelen; /* resynchronise at the next line */
        }
    }
    return 0;
}
