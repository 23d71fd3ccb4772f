/*
 * fuzz_command.c - libFuzzer target: smtp_find_line + smtp_parse_command over
 * every line of the input, plus the unterminated tail and the whole input as
 * one "line". Invariant violations abort().
 *
 * clang -g -O1 -fsanitize=fuzzer,address,undefined -Iproxy \
 *       tests/fuzz/fuzz_command.c proxy/smtp.c -o build/fuzz/fuzz_command
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

static void check_line(const char *line, size_t len)
{
    struct smtp_command cmd;
    const char *err;
    size_t n = content_len(line, len);

    memset(&cmd, 0xA5, sizeof(cmd));
    err = smtp_parse_command(line, len, &cmd);
    REQUIRE(smtp_verb_name(cmd.verb) != NULL);
    if (err != NULL) {
        REQUIRE(err[0] != '\0');
        REQUIRE(cmd.verb == SMTP_VERB_UNKNOWN);
        REQUIRE(cmd.arg == NULL && cmd.arg_len == 0);
        /* An error must have a reason we can see. */
        REQUIRE(len > SMTP_MAX_COMMAND_LINE || memchr(line, '\0', n) != NULL ||
                memchr(line, '\r', n) != NULL || memchr(line, '\n', n) != NULL);
        return;
    }
    REQUIRE(len <= SMTP_MAX_COMMAND_LINE);
    REQUIRE(memchr(line, '\0', n) == NULL && memchr(line, '\r', n) == NULL &&
            memchr(line, '\n', n) == NULL);
    REQUIRE((int)cmd.verb >= SMTP_VERB_UNKNOWN && (int)cmd.verb <= SMTP_VERB_XCLIENT);

    /* The argument lies inside the line content, trimmed of spaces. */
    if (cmd.arg == NULL) {
        REQUIRE(cmd.arg_len == 0);
    } else {
        REQUIRE(cmd.arg_len > 0);
        REQUIRE(cmd.arg > line && cmd.arg + cmd.arg_len <= line + n);
        REQUIRE(cmd.arg[0] != ' ' && cmd.arg[cmd.arg_len - 1] != ' ');
        REQUIRE(cmd.arg[-1] == ' ');
        REQUIRE(memchr(cmd.arg, '\r', cmd.arg_len) == NULL);
    }

    /* A known verb is spelled out at the start of the line and followed by
     * a space or the end of the content. */
    if (cmd.verb != SMTP_VERB_UNKNOWN) {
        const char *name = smtp_verb_name(cmd.verb);
        size_t vlen = strlen(name);

        REQUIRE(vlen <= n);
        for (size_t i = 0; i < vlen; i++)
            REQUIRE(lower((unsigned char)line[i]) == lower((unsigned char)name[i]));
        REQUIRE(vlen == n || line[vlen] == ' ');
        if (cmd.arg != NULL)
            REQUIRE(cmd.arg >= line + vlen + 1);
    }
    /* Re-parsing gives the same answer (no hidden state). */
    {
        struct smtp_command again;
        REQUIRE(smtp_parse_command(line, len, &again) == NULL);
        REQUIRE(again.verb == cmd.verb && again.arg == cmd.arg && again.arg_len == cmd.arg_len);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *buf = (const char *)data;
    size_t off = 0, linelen;

    if (size == 0)
        return 0;
    while (off < size) {
        linelen = 0;
        if (!smtp_find_line(buf + off, size - off, &linelen)) {
            REQUIRE(memchr(buf + off, '\n', size - off) == NULL);
            /* The unterminated tail, as if the peer closed the connection. */
            check_line(buf + off, size - off);
            break;
        }
        REQUIRE(linelen >= 1 && linelen <= size - off);
        REQUIRE(buf[off + linelen - 1] == '\n');
        REQUIRE(memchr(buf + off, '\n', linelen - 1) == NULL);
        check_line(buf + off, linelen);
        off += linelen;
    }
    /* Whole input as one line: must not crash; a multi-line buffer that
     * contains CRLF inside must be refused. */
    check_line(buf, size);
    return 0;
}
