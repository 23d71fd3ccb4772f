/*
 * test_smtp.c - unit tests for the pure SMTP parser (proxy/smtp.c).
 *
 * Build: gcc -std=c17 -Wall -Wextra -Werror -Wshadow -Wconversion -Iproxy \
 *            tests/unit/test_smtp.c proxy/smtp.c -o build/test_smtp
 *
 * Self-contained: CHECK counts failures and prints file:line; the program
 * ends with one line "N passed, N failed" and exits non-zero on any failure.
 */
#include "smtp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

/* A string literal and its length (embedded NULs included). */
#define S(lit) (lit), (sizeof(lit) - 1)

/* ------------------------------------------------------------------------ */
/* smtp_find_line                                                           */
/* ------------------------------------------------------------------------ */

static void test_find_line(void)
{
    size_t ll = 999;

    CHECK(smtp_find_line(S("EHLO x\r\nRSET\r\n"), &ll) == 1);
    CHECK(ll == 8);
    ll = 999;
    CHECK(smtp_find_line(S("EHLO x\nRSET\n"), &ll) == 1);
    CHECK(ll == 7);
    ll = 999;
    CHECK(smtp_find_line(S("\n"), &ll) == 1);
    CHECK(ll == 1);
    ll = 999;
    CHECK(smtp_find_line(S("\r\n"), &ll) == 1);
    CHECK(ll == 2);
    ll = 999;
    CHECK(smtp_find_line(S("EHLO x\r"), &ll) == 0);
    CHECK(ll == 999); /* untouched when no line */
    CHECK(smtp_find_line(S("EHLO x"), &ll) == 0);
    CHECK(smtp_find_line("", 0, &ll) == 0);
    /* The LF beyond len does not count. */
    CHECK(smtp_find_line("abc\n", 3, &ll) == 0);
    /* A NUL byte does not end the search. */
    CHECK(smtp_find_line(S("a\0b\nc"), &ll) == 1);
    CHECK(ll == 4);
}

/* ------------------------------------------------------------------------ */
/* smtp_parse_command                                                       */
/* ------------------------------------------------------------------------ */

static const struct {
    const char *name;
    enum smtp_verb verb;
} all_verbs[] = {
    {"EHLO", SMTP_VERB_EHLO}, {"HELO", SMTP_VERB_HELO}, {"STARTTLS", SMTP_VERB_STARTTLS},
    {"NOOP", SMTP_VERB_NOOP}, {"RSET", SMTP_VERB_RSET}, {"QUIT", SMTP_VERB_QUIT},
    {"AUTH", SMTP_VERB_AUTH}, {"MAIL", SMTP_VERB_MAIL}, {"RCPT", SMTP_VERB_RCPT},
    {"DATA", SMTP_VERB_DATA}, {"BDAT", SMTP_VERB_BDAT}, {"VRFY", SMTP_VERB_VRFY},
    {"EXPN", SMTP_VERB_EXPN}, {"HELP", SMTP_VERB_HELP}, {"XCLIENT", SMTP_VERB_XCLIENT},
};
#define N_VERBS (sizeof(all_verbs) / sizeof(all_verbs[0]))

static int arg_is(const struct smtp_command *c, const char *s)
{
    return c->arg != NULL && c->arg_len == strlen(s) && memcmp(c->arg, s, c->arg_len) == 0;
}

/* Copy src into buf with case style 0 = upper, 1 = lower, 2 = alternating. */
static void case_copy(char *buf, const char *src, int style)
{
    size_t i;

    for (i = 0; src[i] != '\0'; i++) {
        char c = src[i];
        int low = style == 1 || (style == 2 && (i % 2) == 1);
        if (low && c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        buf[i] = c;
    }
    buf[i] = '\0';
}

static void test_command_verbs(void)
{
    char line[64], verb[16];
    struct smtp_command c;

    for (size_t v = 0; v < N_VERBS; v++) {
        for (int style = 0; style < 3; style++) {
            case_copy(verb, all_verbs[v].name, style);

            /* Bare verb with CRLF. */
            snprintf(line, sizeof(line), "%s\r\n", verb);
            CHECK(smtp_parse_command(line, strlen(line), &c) == NULL);
            CHECK(c.verb == all_verbs[v].verb);
            CHECK(c.arg == NULL && c.arg_len == 0);

            /* Bare verb with bare LF. */
            snprintf(line, sizeof(line), "%s\n", verb);
            CHECK(smtp_parse_command(line, strlen(line), &c) == NULL);
            CHECK(c.verb == all_verbs[v].verb);
            CHECK(c.arg == NULL);

            /* Verb with an argument. */
            snprintf(line, sizeof(line), "%s some arg\r\n", verb);
            CHECK(smtp_parse_command(line, strlen(line), &c) == NULL);
            CHECK(c.verb == all_verbs[v].verb);
            CHECK(arg_is(&c, "some arg"));
            CHECK(c.arg == line + strlen(verb) + 1);

            /* Verb with a suffix is another (unknown) verb. */
            snprintf(line, sizeof(line), "%sX\r\n", verb);
            CHECK(smtp_parse_command(line, strlen(line), &c) == NULL);
            CHECK(c.verb == SMTP_VERB_UNKNOWN);

            /* A truncated verb is unknown too. */
            snprintf(line, sizeof(line), "%.*s\r\n", (int)(strlen(verb) - 1), verb);
            CHECK(smtp_parse_command(line, strlen(line), &c) == NULL);
            CHECK(c.verb == SMTP_VERB_UNKNOWN);
        }
        CHECK(strcmp(smtp_verb_name(all_verbs[v].verb), all_verbs[v].name) == 0);
    }
    CHECK(strcmp(smtp_verb_name(SMTP_VERB_UNKNOWN), "unknown") == 0);
}

static void test_command_cases(void)
{
    struct smtp_command c;
    const char *line;

    /* EHLOX is unknown; so is a verb followed by a tab. */
    CHECK(smtp_parse_command(S("EHLOX\r\n"), &c) == NULL);
    CHECK(c.verb == SMTP_VERB_UNKNOWN);
    CHECK(smtp_parse_command(S("EHLOX host\r\n"), &c) == NULL);
    CHECK(c.verb == SMTP_VERB_UNKNOWN);
    CHECK(smtp_parse_command(S("EHLO\thost\r\n"), &c) == NULL);
    CHECK(c.verb == SMTP_VERB_UNKNOWN);
    /* A leading space means an empty verb. */
    CHECK(smtp_parse_command(S(" EHLO host\r\n"), &c) == NULL);
    CHECK(c.verb == SMTP_VERB_UNKNOWN);

    /* EHLO with and without argument. */
    line = "EHLO client.example.org\r\n";
    CHECK(smtp_parse_command(line, strlen(line), &c) == NULL);
    CHECK(c.verb == SMTP_VERB_EHLO);
    CHECK(c.arg == line + 5);
    CHECK(c.arg_len == strlen("client.example.org"));
    CHECK(smtp_parse_command(S("EHLO\r\n"), &c) == NULL);
    CHECK(c.verb == SMTP_VERB_EHLO);
    CHECK(c.arg == NULL && c.arg_len == 0);
    CHECK(smtp_parse_command(S("ehlo\n"), &c) == NULL);
    CHECK(c.verb == SMTP_VERB_EHLO && c.arg == NULL);

    /* Multiple separating spaces and trailing spaces. */
    line = "EHLO    host.example   \r\n";
    CHECK(smtp_parse_command(line, strlen(line), &c) == NULL);
    CHECK(c.verb == SMTP_VERB_EHLO);
    CHECK(c.arg == line + 8);
    CHECK(arg_is(&c, "host.example"));
    /* Spaces inside the argument are kept. */
    line = "AUTH PLAIN  dGVzdA==  \r\n";
    CHECK(smtp_parse_command(line, strlen(line), &c) == NULL);
    CHECK(c.verb == SMTP_VERB_AUTH);
    CHECK(arg_is(&c, "PLAIN  dGVzdA=="));
    /* Only spaces after the verb: no argument. */
    CHECK(smtp_parse_command(S("EHLO     \r\n"), &c) == NULL);
    CHECK(c.verb == SMTP_VERB_EHLO && c.arg == NULL && c.arg_len == 0);

    /* STARTTLS with trailing spaces (CRLF and bare LF). */
    CHECK(smtp_parse_command(S("STARTTLS   \r\n"), &c) == NULL);
    CHECK(c.verb == SMTP_VERB_STARTTLS && c.arg == NULL && c.arg_len == 0);
    CHECK(smtp_parse_command(S("starttls \n"), &c) == NULL);
    CHECK(c.verb == SMTP_VERB_STARTTLS && c.arg == NULL);

    /* MAIL FROM. */
    line = "MAIL FROM:<a@b>\r\n";
    CHECK(smtp_parse_command(line, strlen(line), &c) == NULL);
    CHECK(c.verb == SMTP_VERB_MAIL);
    CHECK(c.arg == line + 5);
    CHECK(arg_is(&c, "FROM:<a@b>"));
    line = "mail from:<a@b> SIZE=100 BODY=8BITMIME\n";
    CHECK(smtp_parse_command(line, strlen(line), &c) == NULL);
    CHECK(c.verb == SMTP_VERB_MAIL);
    CHECK(arg_is(&c, "from:<a@b> SIZE=100 BODY=8BITMIME"));
    line = "RCPT TO:<x@y.z>\r\n";
    CHECK(smtp_parse_command(line, strlen(line), &c) == NULL);
    CHECK(c.verb == SMTP_VERB_RCPT && arg_is(&c, "TO:<x@y.z>"));

    /* NUL byte anywhere in the content is rejected. */
    CHECK(smtp_parse_command(S("EHLO a\0b\r\n"), &c) != NULL);
    CHECK(c.verb == SMTP_VERB_UNKNOWN && c.arg == NULL);
    CHECK(smtp_parse_command(S("\0EHLO\r\n"), &c) != NULL);
    CHECK(smtp_parse_command(S("EHLO\0\r\n"), &c) != NULL);
    CHECK(smtp_parse_command(S("NOOP\0\n"), &c) != NULL);

    /* Bare CR in the middle is rejected. */
    CHECK(smtp_parse_command(S("EHLO a\rb\r\n"), &c) != NULL);
    CHECK(c.verb == SMTP_VERB_UNKNOWN && c.arg == NULL);
    CHECK(smtp_parse_command(S("STARTTLS\rRSET\r\n"), &c) != NULL);
    CHECK(smtp_parse_command(S("NOOP\r\r\n"), &c) != NULL);
    CHECK(smtp_parse_command(S("\rNOOP\n"), &c) != NULL);
    /* Injection attempt handed over as one "line": the inner CR is bare. */
    CHECK(smtp_parse_command(S("STARTTLS\r\nRSET\r\n"), &c) != NULL);

    /* Empty lines parse as unknown, not as an error. */
    CHECK(smtp_parse_command(S("\r\n"), &c) == NULL);
    CHECK(c.verb == SMTP_VERB_UNKNOWN && c.arg == NULL);
    CHECK(smtp_parse_command(S("\n"), &c) == NULL);
    CHECK(c.verb == SMTP_VERB_UNKNOWN && c.arg == NULL);

    /* Unknown verb with argument still reports the argument. */
    line = "XFOO bar\r\n";
    CHECK(smtp_parse_command(line, strlen(line), &c) == NULL);
    CHECK(c.verb == SMTP_VERB_UNKNOWN);
    CHECK(c.arg == line + 5 && c.arg_len == 3);
}

static void test_command_length(void)
{
    char line[SMTP_MAX_COMMAND_LINE + 8];
    struct smtp_command c;
    size_t len;

    /* Exactly 512 octets including CRLF: accepted. */
    memset(line, 'x', sizeof(line));
    memcpy(line, "NOOP ", 5);
    len = SMTP_MAX_COMMAND_LINE;
    line[len - 2] = '\r';
    line[len - 1] = '\n';
    CHECK(smtp_parse_command(line, len, &c) == NULL);
    CHECK(c.verb == SMTP_VERB_NOOP);
    CHECK(c.arg == line + 5 && c.arg_len == len - 7);

    /* 513 octets: rejected. */
    memset(line, 'x', sizeof(line));
    memcpy(line, "NOOP ", 5);
    len = SMTP_MAX_COMMAND_LINE + 1;
    line[len - 2] = '\r';
    line[len - 1] = '\n';
    CHECK(smtp_parse_command(line, len, &c) != NULL);
    CHECK(c.verb == SMTP_VERB_UNKNOWN && c.arg == NULL && c.arg_len == 0);

    /* 512 octets with bare LF: accepted; 513 with bare LF: rejected. */
    memset(line, 'x', sizeof(line));
    memcpy(line, "HELP ", 5);
    line[SMTP_MAX_COMMAND_LINE - 1] = '\n';
    CHECK(smtp_parse_command(line, SMTP_MAX_COMMAND_LINE, &c) == NULL);
    CHECK(c.verb == SMTP_VERB_HELP && c.arg_len == SMTP_MAX_COMMAND_LINE - 6);
    line[SMTP_MAX_COMMAND_LINE - 1] = 'x';
    line[SMTP_MAX_COMMAND_LINE] = '\n';
    CHECK(smtp_parse_command(line, SMTP_MAX_COMMAND_LINE + 1, &c) != NULL);
}

/* ------------------------------------------------------------------------ */
/* smtp_parse_reply                                                         */
/* ------------------------------------------------------------------------ */

static enum smtp_reply_status parse(const char *buf, size_t len, struct smtp_reply *r,
                                    const char **err)
{
    r->code = -1;
    r->len = 0;
    r->lines = 0;
    *err = "unset";
    return smtp_parse_reply(buf, len, r, err);
}

static int reply_ok(const char *buf, size_t len, int code, size_t rlen, size_t lines)
{
    struct smtp_reply r;
    const char *err;

    return parse(buf, len, &r, &err) == SMTP_REPLY_COMPLETE && err == NULL && r.code == code &&
           r.len == rlen && r.lines == lines;
}

static int reply_status(const char *buf, size_t len)
{
    struct smtp_reply r;
    const char *err;
    enum smtp_reply_status st = parse(buf, len, &r, &err);

    if (st == SMTP_REPLY_ERROR && (err == NULL || err[0] == '\0'))
        return 99; /* an error must name its cause */
    return (int)st;
}

/* Every strict prefix of a complete reply must be INCOMPLETE. */
static int all_prefixes_incomplete(const char *buf, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (reply_status(buf, i) != SMTP_REPLY_INCOMPLETE) {
            fprintf(stderr, "  prefix of length %zu is not INCOMPLETE\n", i);
            return 0;
        }
    return 1;
}

static void test_reply_basic(void)
{
    CHECK(reply_ok(S("220 mx.example.org ESMTP Postfix\r\n"), 220, 34, 1));
    CHECK(reply_ok(S("250-a\r\n250-b\r\n250 c\r\n"), 250, 21, 3));
    CHECK(reply_ok(S("250-a\n250-b\n250 c\n"), 250, 18, 3));
    /* Mixed terminators. */
    CHECK(reply_ok(S("250-a\r\n250-b\n250 c\r\n"), 250, 20, 3));
    /* Exactly "DDD". */
    CHECK(reply_ok(S("220\r\n"), 220, 5, 1));
    CHECK(reply_ok(S("220\n"), 220, 4, 1));
    CHECK(reply_ok(S("250-a\r\n250\r\n"), 250, 12, 2));
    /* Empty text after the marker. */
    CHECK(reply_ok(S("250 \r\n"), 250, 6, 1));
    CHECK(reply_ok(S("250-\r\n250 \r\n"), 250, 12, 2));
    /* Bounds of the code range. */
    CHECK(reply_ok(S("200 ok\r\n"), 200, 8, 1));
    CHECK(reply_ok(S("559 x\r\n"), 559, 7, 1));
    CHECK(reply_ok(S("421 4.3.0 bye\r\n"), 421, 15, 1));
    CHECK(reply_ok(S("554 5.7.1 no\r\n"), 554, 14, 1));
    /* Two replies back to back: len covers only the first. */
    CHECK(reply_ok(S("250 a\r\n220 b\r\n"), 250, 7, 1));
    CHECK(reply_ok(S("250-a\r\n250 b\r\n354 go\r\n"), 250, 14, 2));
    /* Trailing partial garbage after a complete reply does not matter. */
    CHECK(reply_ok(S("250 a\r\nxyz"), 250, 7, 1));
}

static void test_reply_incomplete(void)
{
    static const char *const replies[] = {
        "220 mx.example.org ESMTP Postfix\r\n",
        "250-a\r\n250-b\r\n250 c\r\n",
        "250-a\n250-b\n250 c\n",
        "220\r\n",
        "250-x\r\n250\r\n",
        ("250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-STARTTLS\r\n"
         "250-8BITMIME\r\n250 SMTPUTF8\r\n"),
    };

    for (size_t i = 0; i < sizeof(replies) / sizeof(replies[0]); i++)
        CHECK(all_prefixes_incomplete(replies[i], strlen(replies[i])));
    CHECK(reply_status("", 0) == SMTP_REPLY_INCOMPLETE);
    CHECK(reply_status(S("22")) == SMTP_REPLY_INCOMPLETE);
    CHECK(reply_status(S("220")) == SMTP_REPLY_INCOMPLETE);
    CHECK(reply_status(S("220\r")) == SMTP_REPLY_INCOMPLETE);
    CHECK(reply_status(S("250-a\r\n")) == SMTP_REPLY_INCOMPLETE);
    CHECK(reply_status(S("250-a\r\n25")) == SMTP_REPLY_INCOMPLETE);
}

static void test_reply_errors(void)
{
    /* Bad codes. */
    CHECK(reply_status(S("2200 x\r\n")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("620 x\r\n")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("199 x\r\n")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("099\r\n")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("099 x\r\n")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("abc\r\n")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("abc")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("22\r\n")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("\r\n")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("\n")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S(" 220 x\r\n")) == SMTP_REPLY_ERROR);
    /* No space or hyphen after the code. */
    CHECK(reply_status(S("220x\r\n")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("220\tx\r\n")) == SMTP_REPLY_ERROR);
    /* Code changes inside a multi-line reply. */
    CHECK(reply_status(S("250-a\r\n251 b\r\n")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("250-a\r\n251-b\r\n250 c\r\n")) == SMTP_REPLY_ERROR);
    /* A bad later line. */
    CHECK(reply_status(S("250-a\r\nxyz\r\n")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("250-a\r\n250x\r\n")) == SMTP_REPLY_ERROR);

    /* Early error for a garbage prefix without newline. */
    CHECK(reply_status(S("a")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("2x")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("22x")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("HTTP/1.1 400 Bad Request")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("\x16\x03\x01\x02\x00")) == SMTP_REPLY_ERROR); /* TLS record */
    CHECK(reply_status(S("250-a\r\nx")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("250-a\r\n2 ")) == SMTP_REPLY_ERROR);

    /* Second digit outside 0..5 (RFC 5321 Reply-code grammar
     * %x32-35 %x30-35 %x30-39). smtp.c enforces this although smtp.h only
     * states "first digit 2..5" and "200..599"; the header should say so. */
    CHECK(reply_status(S("260 x\r\n")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("599 x\r\n")) == SMTP_REPLY_ERROR);
    CHECK(reply_status(S("250-a\r\n290 b\r\n")) == SMTP_REPLY_ERROR);
}

static void test_reply_limits(void)
{
    size_t cap = (SMTP_MAX_REPLY_LINES + 2) * 8 + 2 * SMTP_MAX_REPLY_LINE + 16;
    char *buf = malloc(cap);
    size_t o;

    if (buf == NULL) {
        CHECK(buf != NULL);
        return;
    }

    /* Exactly SMTP_MAX_REPLY_LINES lines: accepted. */
    o = 0;
    for (int i = 0; i < SMTP_MAX_REPLY_LINES - 1; i++) {
        memcpy(buf + o, "250-x\r\n", 7);
        o += 7;
    }
    memcpy(buf + o, "250 y\r\n", 7);
    o += 7;
    CHECK(reply_ok(buf, o, 250, o, SMTP_MAX_REPLY_LINES));

    /* One more line (101): rejected. */
    o = 0;
    for (int i = 0; i < SMTP_MAX_REPLY_LINES; i++) {
        memcpy(buf + o, "250-x\r\n", 7);
        o += 7;
    }
    memcpy(buf + o, "250 y\r\n", 7);
    o += 7;
    CHECK(reply_status(buf, o) == SMTP_REPLY_ERROR);
    /* ... and already rejected before the final line arrives. */
    CHECK(reply_status(buf, o - 7) == SMTP_REPLY_ERROR);

    /* Complete line of exactly SMTP_MAX_REPLY_LINE bytes: accepted. */
    memset(buf, 'x', SMTP_MAX_REPLY_LINE + 2);
    memcpy(buf, "250 ", 4);
    buf[SMTP_MAX_REPLY_LINE - 2] = '\r';
    buf[SMTP_MAX_REPLY_LINE - 1] = '\n';
    CHECK(reply_ok(buf, SMTP_MAX_REPLY_LINE, 250, SMTP_MAX_REPLY_LINE, 1));
    /* One byte longer: rejected. */
    memset(buf, 'x', SMTP_MAX_REPLY_LINE + 2);
    memcpy(buf, "250 ", 4);
    buf[SMTP_MAX_REPLY_LINE - 1] = '\r';
    buf[SMTP_MAX_REPLY_LINE] = '\n';
    CHECK(reply_status(buf, SMTP_MAX_REPLY_LINE + 1) == SMTP_REPLY_ERROR);
    /* Same for a long continuation line. */
    memset(buf, 'x', SMTP_MAX_REPLY_LINE + 2);
    memcpy(buf, "250-", 4);
    buf[SMTP_MAX_REPLY_LINE] = '\n';
    CHECK(reply_status(buf, SMTP_MAX_REPLY_LINE + 1) == SMTP_REPLY_ERROR);

    /* Incomplete line longer than the limit: rejected without waiting. */
    memset(buf, 'x', SMTP_MAX_REPLY_LINE + 2);
    memcpy(buf, "250 ", 4);
    CHECK(reply_status(buf, SMTP_MAX_REPLY_LINE + 1) == SMTP_REPLY_ERROR);
    CHECK(reply_status(buf, SMTP_MAX_REPLY_LINE + 2) == SMTP_REPLY_ERROR);
    /* An incomplete line below the limit is still INCOMPLETE. */
    CHECK(reply_status(buf, SMTP_MAX_REPLY_LINE - 1) == SMTP_REPLY_INCOMPLETE);
    /* Too long incomplete line after a good first line. */
    memset(buf, 'x', 2 * SMTP_MAX_REPLY_LINE);
    memcpy(buf, "250-a\r\n250 ", 11);
    CHECK(reply_status(buf, 7 + SMTP_MAX_REPLY_LINE + 1) == SMTP_REPLY_ERROR);

    free(buf);
}

/* ------------------------------------------------------------------------ */
/* smtp_ehlo_has                                                            */
/* ------------------------------------------------------------------------ */

static void test_ehlo_has(void)
{
    CHECK(smtp_ehlo_has(S("250-mx\r\n250-STARTTLS\r\n250 8BITMIME\r\n"), "STARTTLS") == 1);
    CHECK(smtp_ehlo_has(S("250-mx\r\n250-8BITMIME\r\n250 STARTTLS\r\n"), "STARTTLS") == 1);
    CHECK(smtp_ehlo_has(S("250-mx\n250 STARTTLS\n"), "STARTTLS") == 1);
    CHECK(smtp_ehlo_has(S("250-mx\r\n250-8BITMIME\r\n250 SIZE\r\n"), "STARTTLS") == 0);
    CHECK(smtp_ehlo_has(S("250-mx\r\n250-XSTARTTLS\r\n250 SIZE\r\n"), "STARTTLS") == 0);
    CHECK(smtp_ehlo_has(S("250-mx\r\n250-STARTTLSX\r\n250 SIZE\r\n"), "STARTTLS") == 0);
    CHECK(smtp_ehlo_has(S("250-mx\r\n250 STARTTLSX\r\n"), "STARTTLS") == 0);
    CHECK(smtp_ehlo_has(S("250-mx\r\n250-STARTTL\r\n250 SIZE\r\n"), "STARTTLS") == 0);
    /* The greeting line is never a keyword line. */
    CHECK(smtp_ehlo_has(S("250-host STARTTLS\r\n250 SIZE\r\n"), "STARTTLS") == 0);
    CHECK(smtp_ehlo_has(S("250-STARTTLS\r\n250 SIZE\r\n"), "STARTTLS") == 0);
    CHECK(smtp_ehlo_has(S("250 STARTTLS\r\n"), "STARTTLS") == 0);
    /* Keyword must be the first word of the line. */
    CHECK(smtp_ehlo_has(S("250-mx\r\n250-host STARTTLS\r\n250 SIZE\r\n"), "STARTTLS") == 0);
    /* Keyword with parameters matches. */
    CHECK(smtp_ehlo_has(S("250-mx\r\n250-STARTTLS extra\r\n250 SIZE\r\n"), "STARTTLS") == 1);
    /* Case-insensitive both ways. */
    CHECK(smtp_ehlo_has(S("250-mx\r\n250-starttls\r\n250 SIZE\r\n"), "STARTTLS") == 1);
    CHECK(smtp_ehlo_has(S("250-mx\r\n250-StartTls\r\n250 SIZE\r\n"), "starttls") == 1);
    /* AUTH with params. */
    static const char auth[] = "250-mx.example.org\r\n250-PIPELINING\r\n"
                               "250-AUTH PLAIN LOGIN CRAM-MD5\r\n250 8BITMIME\r\n";
    CHECK(smtp_ehlo_has(S(auth), "AUTH") == 1);
    CHECK(smtp_ehlo_has(S(auth), "PLAIN") == 0);
    CHECK(smtp_ehlo_has(S(auth), "LOGIN") == 0);
    CHECK(smtp_ehlo_has(S(auth), "AUT") == 0);
    CHECK(smtp_ehlo_has(S(auth), "PIPELINING") == 1);
    CHECK(smtp_ehlo_has(S(auth), "8BITMIME") == 1);
    CHECK(smtp_ehlo_has(S(auth), "mx.example.org") == 0);
    CHECK(smtp_ehlo_has(S("250-mx\r\n250-AUTH=LOGIN PLAIN\r\n250 x\r\n"), "AUTH") == 0);
    /* Empty / one-line / "DDD" replies. */
    CHECK(smtp_ehlo_has("", 0, "STARTTLS") == 0);
    CHECK(smtp_ehlo_has(S("250-mx\r\n250\r\n"), "STARTTLS") == 0);
    /* Only the given length is looked at. */
    CHECK(smtp_ehlo_has("250-mx\r\n250 STARTTLS\r\n", 8, "STARTTLS") == 0);
}

/* ------------------------------------------------------------------------ */
/* smtp_ehlo_filter                                                         */
/* ------------------------------------------------------------------------ */

static char outbuf[16384];

/* Run the filter; check the result equals `want` (NULL: expect -1). */
static int filter_is(const char *in, size_t len, size_t outcap, const char *drop, const char *add,
                     const char *want)
{
    size_t outlen = 12345;
    int rc;

    memset(outbuf, '#', sizeof(outbuf));
    rc = smtp_ehlo_filter(in, len, outbuf, outcap, drop, add, &outlen);
    if (want == NULL)
        return rc == -1;
    if (rc != 0) {
        fprintf(stderr, "  filter returned %d, want 0\n", rc);
        return 0;
    }
    if (outlen != strlen(want) || memcmp(outbuf, want, outlen) != 0) {
        fprintf(stderr, "  filter gave \"%.*s\"\n  wanted \"%s\"\n", (int)outlen, outbuf, want);
        return 0;
    }
    /* Nothing written beyond outlen. */
    for (size_t i = outlen; i < outcap && i < sizeof(outbuf); i++)
        if (outbuf[i] != '#')
            return 0;
    return 1;
}

/* Does out[0..outlen) parse as exactly one complete valid reply? */
static int single_reply(const char *out, size_t outlen, int code, size_t lines)
{
    struct smtp_reply r;
    const char *err;

    return smtp_parse_reply(out, outlen, &r, &err) == SMTP_REPLY_COMPLETE && r.len == outlen &&
           r.code == code && r.lines == lines;
}

static void test_ehlo_filter_drop(void)
{
    size_t big = sizeof(outbuf);

    /* Drop STARTTLS in the middle. */
    CHECK(filter_is(S("250-mx\r\n250-STARTTLS\r\n250 8BITMIME\r\n"), big, "STARTTLS", NULL,
                    "250-mx\r\n250 8BITMIME\r\n"));
    /* Drop STARTTLS as the last line: previous line becomes "250 ". */
    CHECK(filter_is(S("250-mx\r\n250-8BITMIME\r\n250 STARTTLS\r\n"), big, "STARTTLS", NULL,
                    "250-mx\r\n250 8BITMIME\r\n"));
    /* Greeting line + STARTTLS only. */
    CHECK(filter_is(S("250-mx.example.org\r\n250 STARTTLS\r\n"), big, "STARTTLS", NULL,
                    "250 mx.example.org\r\n"));
    /* Lowercase and with parameters; several occurrences. */
    CHECK(filter_is(S("250-mx\r\n250-starttls\r\n250-SIZE 1000\r\n250 STARTTLS x\r\n"), big,
                    "STARTTLS", NULL, "250-mx\r\n250 SIZE 1000\r\n"));
    /* Look-alikes are kept, and the greeting is never dropped. */
    CHECK(filter_is(S("250-STARTTLS\r\n250-XSTARTTLS\r\n250-STARTTLSX\r\n250 host STARTTLS\r\n"),
                    big, "STARTTLS", NULL,
                    "250-STARTTLS\r\n250-XSTARTTLS\r\n250-STARTTLSX\r\n250 host STARTTLS\r\n"));
    /* Nothing to drop: output equals input. */
    CHECK(filter_is(S("250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n"), big, "STARTTLS", NULL,
                    "250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n"));
    /* Single-line reply. */
    CHECK(filter_is(S("250 mx\r\n"), big, "STARTTLS", NULL, "250 mx\r\n"));
    /* drop == NULL and add == NULL: identity. */
    CHECK(
        filter_is(S("250-mx\r\n250 STARTTLS\r\n"), big, NULL, NULL, "250-mx\r\n250 STARTTLS\r\n"));
    /* Bare LF terminated input keeps bare LF. */
    CHECK(filter_is(S("250-mx\n250-STARTTLS\n250 SIZE\n"), big, "STARTTLS", NULL,
                    "250-mx\n250 SIZE\n"));
    CHECK(filter_is(S("250-mx\n250-SIZE\n250 STARTTLS\n"), big, "STARTTLS", NULL,
                    "250-mx\n250 SIZE\n"));
    /* Mixed terminators are kept per line. */
    CHECK(filter_is(S("250-mx\r\n250-SIZE\n250 STARTTLS\r\n"), big, "STARTTLS", NULL,
                    "250-mx\r\n250 SIZE\n"));
    /* Dropping other keywords (AUTH with params). */
    CHECK(filter_is(S("250-mx\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"), big, "AUTH", NULL,
                    "250-mx\r\n250 8BITMIME\r\n"));
}

static void test_ehlo_filter_add(void)
{
    size_t big = sizeof(outbuf);
    size_t outlen = 0;

    /* Add when absent: last line, earlier lines become "250-". */
    CHECK(filter_is(S("250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n"), big, NULL, "STARTTLS",
                    "250-mx\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 STARTTLS\r\n"));
    CHECK(filter_is(S("250 mx.example.org\r\n"), big, NULL, "STARTTLS",
                    "250-mx.example.org\r\n250 STARTTLS\r\n"));
    /* Bare LF input keeps bare LF; the added line ends in CRLF. */
    CHECK(filter_is(S("250-mx\n250 SIZE\n"), big, NULL, "STARTTLS",
                    "250-mx\n250-SIZE\n250 STARTTLS\r\n"));
    /* Add when already present: no duplicate, output equals input. */
    CHECK(filter_is(S("250-mx\r\n250-STARTTLS\r\n250 8BITMIME\r\n"), big, NULL, "STARTTLS",
                    "250-mx\r\n250-STARTTLS\r\n250 8BITMIME\r\n"));
    CHECK(filter_is(S("250-mx\r\n250 starttls\r\n"), big, NULL, "STARTTLS",
                    "250-mx\r\n250 starttls\r\n"));
    /* STARTTLS in the greeting line does not count as present. */
    CHECK(filter_is(S("250 STARTTLS\r\n"), big, NULL, "STARTTLS",
                    "250-STARTTLS\r\n250 STARTTLS\r\n"));
    /* Drop and add the same keyword: exactly one, at the end. */
    CHECK(filter_is(S("250-mx\r\n250-STARTTLS\r\n250 8BITMIME\r\n"), big, "STARTTLS", "STARTTLS",
                    "250-mx\r\n250-8BITMIME\r\n250 STARTTLS\r\n"));
    /* The added line uses the reply's code. */
    CHECK(filter_is(S("251-mx\r\n251 x\r\n"), big, NULL, "STARTTLS",
                    "251-mx\r\n251-x\r\n251 STARTTLS\r\n"));

    /*
     * A last line of exactly "DDD" cannot carry a continuation marker. After
     * adding a line, the output must still be ONE valid reply whose last line
     * is the only final one (smtp.h: "exactly the last line uses DDD ").
     */
    static const char three[] = "250-mx\r\n250\r\n";
    memset(outbuf, 0, sizeof(outbuf));
    CHECK(smtp_ehlo_filter(S(three), outbuf, big, NULL, "STARTTLS", &outlen) == 0);
    CHECK(single_reply(outbuf, outlen, 250, 3));
    CHECK(smtp_ehlo_has(outbuf, outlen, "STARTTLS") == 1);
    memset(outbuf, 0, sizeof(outbuf));
    CHECK(smtp_ehlo_filter(S("250\r\n"), outbuf, big, NULL, "STARTTLS", &outlen) == 0);
    CHECK(single_reply(outbuf, outlen, 250, 2));
    /* Without add, a final "DDD" line is fine as it is. */
    CHECK(filter_is(S("250-mx\r\n250-STARTTLS\r\n250\r\n"), big, "STARTTLS", NULL,
                    "250-mx\r\n250\r\n"));
}

static void test_ehlo_filter_errors(void)
{
    static const char in[] = "250-mx\r\n250-STARTTLS\r\n250 8BITMIME\r\n";
    static const char want_drop[] = "250-mx\r\n250 8BITMIME\r\n";
    static const char in2[] = "250-mx\r\n250 8BITMIME\r\n";
    static const char want_add[] = "250-mx\r\n250-8BITMIME\r\n250 STARTTLS\r\n";
    size_t big = sizeof(outbuf);
    size_t outlen = 777;

    /* outcap exactly enough vs one too small. */
    CHECK(filter_is(S(in), strlen(want_drop), "STARTTLS", NULL, want_drop));
    CHECK(filter_is(S(in), strlen(want_drop) - 1, "STARTTLS", NULL, NULL));
    CHECK(filter_is(S(in2), strlen(want_add), NULL, "STARTTLS", want_add));
    CHECK(filter_is(S(in2), strlen(want_add) - 1, NULL, "STARTTLS", NULL));
    CHECK(filter_is(S(in2), strlen(in2), NULL, "STARTTLS", NULL));
    CHECK(filter_is(S(in2), 0, NULL, NULL, NULL));
    CHECK(filter_is(S(in2), 0, "STARTTLS", "STARTTLS", NULL));
    /* No write past outcap on failure. */
    memset(outbuf, '#', sizeof(outbuf));
    CHECK(smtp_ehlo_filter(S(in2), outbuf, 10, NULL, "STARTTLS", &outlen) == -1);
    for (size_t i = 10; i < 64; i++)
        CHECK(outbuf[i] == '#');
    CHECK(outlen == 777);

    /* Invalid replies. */
    CHECK(filter_is(S("abc\r\n"), big, "STARTTLS", NULL, NULL));
    CHECK(filter_is(S("250-mx\r\n251 x\r\n"), big, "STARTTLS", NULL, NULL));
    CHECK(filter_is(S("250x\r\n"), big, NULL, "STARTTLS", NULL));
    CHECK(filter_is("", 0, big, NULL, "STARTTLS", NULL));
    /* Incomplete replies. */
    CHECK(filter_is(S("250-mx\r\n"), big, NULL, "STARTTLS", NULL));
    CHECK(filter_is(S("250-mx\r\n250 x"), big, NULL, "STARTTLS", NULL));
    CHECK(filter_is(S("250 mx"), big, NULL, NULL, NULL));
    /* Trailing extra bytes after a complete reply. */
    CHECK(filter_is(S("250-mx\r\n250 x\r\nX"), big, NULL, "STARTTLS", NULL));
    CHECK(filter_is(S("250-mx\r\n250 x\r\n250 y\r\n"), big, "STARTTLS", NULL, NULL));
    CHECK(filter_is(S("250 x\r\n\r\n"), big, NULL, NULL, NULL));
}

int main(void)
{
    test_find_line();
    test_command_verbs();
    test_command_cases();
    test_command_length();
    test_reply_basic();
    test_reply_incomplete();
    test_reply_errors();
    test_reply_limits();
    test_ehlo_has();
    test_ehlo_filter_drop();
    test_ehlo_filter_add();
    test_ehlo_filter_errors();

    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed == 0 ? 0 : 1;
}
