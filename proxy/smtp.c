/*
 * smtp.c - pure SMTP parsing (see smtp.h). No I/O, no allocation.
 */
#include "smtp.h"

#include <string.h>

static const struct {
    const char *name;
    size_t len;
    enum smtp_verb verb;
} verbs[] = {
    {"EHLO", 4, SMTP_VERB_EHLO}, {"HELO", 4, SMTP_VERB_HELO}, {"STARTTLS", 8, SMTP_VERB_STARTTLS},
    {"NOOP", 4, SMTP_VERB_NOOP}, {"RSET", 4, SMTP_VERB_RSET}, {"QUIT", 4, SMTP_VERB_QUIT},
    {"AUTH", 4, SMTP_VERB_AUTH}, {"MAIL", 4, SMTP_VERB_MAIL}, {"RCPT", 4, SMTP_VERB_RCPT},
    {"DATA", 4, SMTP_VERB_DATA}, {"BDAT", 4, SMTP_VERB_BDAT}, {"VRFY", 4, SMTP_VERB_VRFY},
    {"EXPN", 4, SMTP_VERB_EXPN}, {"HELP", 4, SMTP_VERB_HELP}, {"XCLIENT", 7, SMTP_VERB_XCLIENT},
};

static int lower(int c)
{
    return (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c;
}

static int ci_equal(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (lower((unsigned char)a[i]) != lower((unsigned char)b[i]))
            return 0;
    return 1;
}

int smtp_find_line(const char *buf, size_t len, size_t *linelen)
{
    const char *lf = memchr(buf, '\n', len);

    if (lf == NULL)
        return 0;
    *linelen = (size_t)(lf - buf) + 1;
    return 1;
}

/* Length of the line without its terminator (LF or CRLF). */
static size_t content_len(const char *line, size_t len)
{
    if (len > 0 && line[len - 1] == '\n')
        len--;
    if (len > 0 && line[len - 1] == '\r')
        len--;
    return len;
}

const char *smtp_parse_command(const char *line, size_t len, struct smtp_command *cmd)
{
    size_t n, i, vlen;

    cmd->verb = SMTP_VERB_UNKNOWN;
    cmd->arg = NULL;
    cmd->arg_len = 0;
    if (len > SMTP_MAX_COMMAND_LINE)
        return "line too long";
    n = content_len(line, len);
    for (i = 0; i < n; i++) {
        if (line[i] == '\0')
            return "NUL byte in command";
        if (line[i] == '\r')
            return "bare CR in command";
        if (line[i] == '\n')
            return "line feed inside command";
    }
    for (vlen = 0; vlen < n && line[vlen] != ' '; vlen++)
        ;
    for (i = 0; i < sizeof(verbs) / sizeof(verbs[0]); i++) {
        if (verbs[i].len == vlen && ci_equal(line, verbs[i].name, vlen)) {
            cmd->verb = verbs[i].verb;
            break;
        }
    }
    /* Skip the separating spaces; drop trailing spaces. */
    i = vlen;
    while (i < n && line[i] == ' ')
        i++;
    while (n > i && line[n - 1] == ' ')
        n--;
    if (n > i) {
        cmd->arg = line + i;
        cmd->arg_len = n - i;
    }
    return NULL;
}

const char *smtp_verb_name(enum smtp_verb verb)
{
    for (size_t i = 0; i < sizeof(verbs) / sizeof(verbs[0]); i++)
        if (verbs[i].verb == verb)
            return verbs[i].name;
    return "unknown";
}

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

enum smtp_reply_status smtp_parse_reply(const char *buf, size_t len, struct smtp_reply *reply,
                                        const char **err)
{
    size_t off = 0, lines = 0, linelen, n;
    int code = 0, c;

    *err = NULL;
    for (;;) {
        if (!smtp_find_line(buf + off, len - off, &linelen)) {
            if (len - off > SMTP_MAX_REPLY_LINE) {
                *err = "reply line too long";
                return SMTP_REPLY_ERROR;
            }
            /* Reject a bad prefix early rather than waiting for more bytes. */
            for (size_t i = 0; i < len - off && i < 3; i++) {
                if (!is_digit(buf[off + i])) {
                    *err = "reply does not start with a 3-digit code";
                    return SMTP_REPLY_ERROR;
                }
            }
            return SMTP_REPLY_INCOMPLETE;
        }
        if (linelen > SMTP_MAX_REPLY_LINE) {
            *err = "reply line too long";
            return SMTP_REPLY_ERROR;
        }
        n = content_len(buf + off, linelen);
        if (n < 3 || !is_digit(buf[off]) || !is_digit(buf[off + 1]) || !is_digit(buf[off + 2])) {
            *err = "reply does not start with a 3-digit code";
            return SMTP_REPLY_ERROR;
        }
        if (n > 3 && buf[off + 3] != ' ' && buf[off + 3] != '-') {
            *err = "reply code not followed by space or hyphen";
            return SMTP_REPLY_ERROR;
        }
        c = (buf[off] - '0') * 100 + (buf[off + 1] - '0') * 10 + (buf[off + 2] - '0');
        if (c < 200 || c > 599 || buf[off + 1] > '5') {
            *err = "reply code out of range";
            return SMTP_REPLY_ERROR;
        }
        if (lines == 0)
            code = c;
        else if (c != code) {
            *err = "reply code changes inside a multi-line reply";
            return SMTP_REPLY_ERROR;
        }
        lines++;
        off += linelen;
        if (n == 3 || buf[off - linelen + 3] == ' ') {
            reply->code = code;
            reply->len = off;
            reply->lines = lines;
            return SMTP_REPLY_COMPLETE;
        }
        if (lines >= SMTP_MAX_REPLY_LINES) {
            *err = "too many lines in reply";
            return SMTP_REPLY_ERROR;
        }
    }
}

/* Does the reply line (terminator included) advertise `keyword`? */
static int line_is_keyword(const char *line, size_t len, const char *keyword)
{
    size_t n = content_len(line, len), klen = strlen(keyword);

    if (n < 4 + klen)
        return 0;
    if (!ci_equal(line + 4, keyword, klen))
        return 0;
    return n == 4 + klen || line[4 + klen] == ' ';
}

int smtp_ehlo_has(const char *reply, size_t len, const char *keyword)
{
    size_t off = 0, linelen;
    int first = 1;

    while (off < len && smtp_find_line(reply + off, len - off, &linelen)) {
        if (!first && line_is_keyword(reply + off, linelen, keyword))
            return 1;
        first = 0;
        off += linelen;
    }
    return 0;
}

int smtp_ehlo_filter(const char *in, size_t len, char *out, size_t outcap, const char *drop,
                     const char *add, size_t *outlen)
{
    struct smtp_reply r;
    const char *err;
    size_t start[SMTP_MAX_REPLY_LINES], llen[SMTP_MAX_REPLY_LINES];
    size_t off = 0, o = 0, linelen = 0, nkept = 0, nout;
    int have_add = 0;

    if (smtp_parse_reply(in, len, &r, &err) != SMTP_REPLY_COMPLETE || r.len != len)
        return -1;
    /* First pass: which lines stay. The first line (the server name) always
     * stays; it is never a keyword line. */
    for (int first = 1; off < len; off += linelen, first = 0) {
        smtp_find_line(in + off, len - off, &linelen);
        if (!first && drop != NULL && line_is_keyword(in + off, linelen, drop))
            continue;
        if (!first && add != NULL && line_is_keyword(in + off, linelen, add))
            have_add = 1;
        start[nkept] = off;
        llen[nkept] = linelen;
        nkept++;
    }
    nout = nkept + (add != NULL && !have_add);
    /* Second pass: copy, with "-" on every line but the last and " " on the
     * last. Lines are otherwise copied byte for byte; a bare "DDD" line that
     * is no longer last gains a "-" (it has no marker to flip). */
    for (size_t i = 0; i < nkept; i++) {
        const char *line = in + start[i];
        int last = i + 1 == nout;
        size_t n = content_len(line, llen[i]);
        if (n == 3 && !last) {
            if (o + llen[i] + 1 > outcap)
                return -1;
            memcpy(out + o, line, 3);
            out[o + 3] = '-';
            memcpy(out + o + 4, line + 3, llen[i] - 3);
            o += llen[i] + 1;
            continue;
        }
        if (o + llen[i] > outcap)
            return -1;
        memcpy(out + o, line, llen[i]);
        if (n >= 4)
            out[o + 3] = last ? ' ' : '-';
        o += llen[i];
    }
    if (nout > nkept) {
        size_t alen = strlen(add);
        if (o + 4 + alen + 2 > outcap)
            return -1;
        memcpy(out + o, in, 3);
        out[o + 3] = ' ';
        memcpy(out + o + 4, add, alen);
        memcpy(out + o + 4 + alen, "\r\n", 2);
        o += 4 + alen + 2;
    }
    *outlen = o;
    return 0;
}

enum smtp_sasl smtp_sasl_mech(const char *name, size_t len)
{
    static const struct {
        const char *name;
        enum smtp_sasl mech;
    } mechs[] = {
        {"PLAIN", SASL_PLAIN},
        {"LOGIN", SASL_LOGIN},
        {"CRAM-MD5", SASL_CRAM_MD5},
        {"XOAUTH2", SASL_XOAUTH2},
    };
    size_t wl = 0;

    while (wl < len && name[wl] != ' ')
        wl++;
    for (size_t i = 0; i < sizeof(mechs) / sizeof(mechs[0]); i++)
        if (strlen(mechs[i].name) == wl && ci_equal(name, mechs[i].name, wl))
            return mechs[i].mech;
    return SASL_OTHER;
}

static int b64_value(char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

long smtp_base64_decode(const char *in, size_t len, unsigned char *out, size_t cap)
{
    size_t o = 0, i;
    unsigned acc = 0;
    int bits = 0, v;

    while (len > 0 && in[len - 1] == '=')
        len--;
    if (len % 4 == 1)
        return -1;
    for (i = 0; i < len; i++) {
        v = b64_value(in[i]);
        if (v < 0)
            return -1;
        acc = (acc << 6) | (unsigned)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (o >= cap)
                return -1;
            out[o++] = (unsigned char)((acc >> bits) & 0xff);
        }
    }
    return (long)o;
}

static void copy_printable(char *dst, size_t cap, const unsigned char *src, size_t len)
{
    size_t i;

    if (cap == 0)
        return;
    for (i = 0; i < len && i + 1 < cap; i++)
        dst[i] = (src[i] >= 0x20 && src[i] < 0x7f) ? (char)src[i] : '?';
    dst[i] = '\0';
}

int smtp_sasl_user(enum smtp_sasl mech, const char *b64, size_t len, char *user, size_t cap)
{
    unsigned char buf[1024];
    const unsigned char *start, *end;
    long n = smtp_base64_decode(b64, len, buf, sizeof(buf));

    if (n <= 0 || cap == 0)
        return -1;
    start = buf;
    end = buf + n;
    switch (mech) {
    case SASL_PLAIN:
        /* authzid NUL authcid NUL passwd: stop at the second NUL. */
        start = memchr(buf, '\0', (size_t)n);
        if (start == NULL)
            return -1;
        start++;
        end = memchr(start, '\0', (size_t)(buf + n - start));
        if (end == NULL)
            return -1;
        break;
    case SASL_LOGIN:
        break;
    case SASL_CRAM_MD5:
        for (end = buf + n; end > buf && end[-1] != ' '; end--)
            ;
        if (end == buf)
            return -1;
        end--;
        break;
    case SASL_XOAUTH2:
        if (n < 5 || memcmp(buf, "user=", 5) != 0)
            return -1;
        start = buf + 5;
        end = memchr(start, 0x01, (size_t)(buf + n - start));
        if (end == NULL)
            return -1;
        break;
    default:
        return -1;
    }
    if (end <= start)
        return -1;
    copy_printable(user, cap, start, (size_t)(end - start));
    return 0;
}

size_t smtp_xtext(const char *in, char *out, size_t cap)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;

    if (cap == 0)
        return 0;
    for (; *in; in++) {
        unsigned char c = (unsigned char)*in;
        if (c < 33 || c > 126 || c == '+' || c == '=') {
            if (o + 3 >= cap)
                break;
            out[o++] = '+';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 15];
        } else {
            if (o + 1 >= cap)
                break;
            out[o++] = (char)c;
        }
    }
    out[o] = '\0';
    return o;
}
