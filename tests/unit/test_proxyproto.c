/*
 * test_proxyproto.c - unit tests for the PROXY protocol parser and builder
 * (proxy/proxyproto.c), and for smtp_xtext (proxy/smtp.c), which XCLIENT
 * uses for its attribute values.
 *
 * Build: cc -std=c17 -O1 -g -Wall -Wextra -Werror -Wshadow -Wconversion \
 *           -Wstrict-prototypes -Wmissing-prototypes -D_GNU_SOURCE -Iproxy \
 *           -fsanitize=address,undefined tests/unit/test_proxyproto.c \
 *           proxy/proxyproto.c proxy/smtp.c -o build/unit/test_proxyproto
 *
 * Self-contained: CHECK counts failures and prints file:line; the program
 * ends with one line "N passed, N failed" and exits non-zero on any failure.
 * Inputs are copied into exact-size heap buffers so that ASan catches any
 * read past the length handed to pp_parse.
 */
#include "proxyproto.h"
#include "smtp.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

/* A string literal and its length (embedded NULs included). */
#define S(lit) (const uint8_t *)(lit), (sizeof(lit) - 1)

static const uint8_t SIG[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

/* pp_parse on an exact-size heap copy; err is checked for consistency. */
static int parse(const uint8_t *buf, size_t len, struct pp_result *res, const char **err)
{
    uint8_t *copy = malloc(len ? len : 1);
    const char *e = (const char *)1;
    int r;

    if (copy == NULL)
        abort();
    if (len)
        memcpy(copy, buf, len);
    memset(res, 0xA5, sizeof(*res));
    r = pp_parse(copy, len, res, &e);
    free(copy);
    /* err is NULL unless the result is -1; then it names the problem. */
    if (r < 0) {
        if (e == NULL || e == (const char *)1 || e[0] == '\0') {
            n_failed++;
            fprintf(stderr, "parse: -1 without an error message\n");
        }
    } else if (e != NULL) {
        n_failed++;
        fprintf(stderr, "parse: returned %d with err=%s\n", r,
                e == (const char *)1 ? "(untouched)" : e);
    }
    if (err)
        *err = e;
    return r;
}

static int parse_rc(const uint8_t *buf, size_t len)
{
    struct pp_result res;
    return parse(buf, len, &res, NULL);
}

/* Every strict prefix of buf[0..len) is "incomplete" (0), never an error. */
static int all_prefixes_incomplete(const uint8_t *buf, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        int r = parse_rc(buf, i);
        if (r != 0) {
            fprintf(stderr, "prefix of %zu bytes (of %zu): %d\n", i, len, r);
            return 0;
        }
    }
    return 1;
}

static int is_v4(const struct sockaddr_storage *ss, const char *ip, unsigned port)
{
    const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
    struct in_addr want;

    if (inet_pton(AF_INET, ip, &want) != 1)
        abort();
    return a->sin_family == AF_INET && a->sin_addr.s_addr == want.s_addr &&
           ntohs(a->sin_port) == port;
}

static int is_v6(const struct sockaddr_storage *ss, const char *ip, unsigned port)
{
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
    struct in6_addr want;

    if (inet_pton(AF_INET6, ip, &want) != 1)
        abort();
    return a->sin6_family == AF_INET6 && memcmp(&a->sin6_addr, &want, 16) == 0 &&
           ntohs(a->sin6_port) == port;
}

static struct sockaddr_storage mk4(const char *ip, unsigned port)
{
    struct sockaddr_storage ss;
    struct sockaddr_in *a = (struct sockaddr_in *)&ss;

    memset(&ss, 0, sizeof(ss));
    a->sin_family = AF_INET;
    a->sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, ip, &a->sin_addr) != 1)
        abort();
    return ss;
}

static struct sockaddr_storage mk6(const char *ip, unsigned port)
{
    struct sockaddr_storage ss;
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;

    memset(&ss, 0, sizeof(ss));
    a->sin6_family = AF_INET6;
    a->sin6_port = htons((uint16_t)port);
    if (inet_pton(AF_INET6, ip, &a->sin6_addr) != 1)
        abort();
    return ss;
}

/* A v2 header: signature, ver/cmd, fam/proto, declared body length, then
 * `have` bytes of body. Returns the total length written. */
static size_t v2(uint8_t *out, uint8_t vc, uint8_t fp, size_t declared, const uint8_t *body,
                 size_t have)
{
    memcpy(out, SIG, 12);
    out[12] = vc;
    out[13] = fp;
    out[14] = (uint8_t)(declared >> 8);
    out[15] = (uint8_t)(declared & 0xff);
    if (have)
        memcpy(out + 16, body, have);
    return 16 + have;
}

/* ------------------------------------------------------------------------ */
/* v1                                                                       */
/* ------------------------------------------------------------------------ */

static void test_v1_tcp4(void)
{
    static const char h[] = "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n";
    struct pp_result res;
    const char *err;
    uint8_t buf[128];
    size_t n = strlen(h);

    CHECK(parse(S(h), &res, &err) == (int)n);
    CHECK(res.version == 1 && res.local == 0);
    CHECK(is_v4(&res.src, "192.0.2.1", 56324));
    CHECK(is_v4(&res.dst, "198.51.100.2", 443));
    CHECK(all_prefixes_incomplete(S(h)));

    /* Bytes after the header (a first command, a ClientHello) are not part
     * of it: the length is the header's alone. */
    memcpy(buf, h, n);
    memcpy(buf + n, "EHLO x\r\n", 8);
    CHECK(parse(buf, n + 8, &res, &err) == (int)n);
    buf[n] = 0x16;
    buf[n + 1] = 0x03;
    buf[n + 2] = 0x01;
    CHECK(parse(buf, n + 3, &res, &err) == (int)n);
    CHECK(is_v4(&res.src, "192.0.2.1", 56324));

    /* Port extremes: 0 and 65535 are both valid numbers. */
    CHECK(parse(S("PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n"), &res, &err) == 44);
    CHECK(is_v4(&res.src, "0.0.0.0", 0) && is_v4(&res.dst, "255.255.255.255", 65535));
}

static void test_v1_tcp6(void)
{
    static const char h[] = "PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n";
    static const char maxh[] = "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                               "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    struct pp_result res;
    const char *err;

    CHECK(parse(S(h), &res, &err) == (int)strlen(h));
    CHECK(res.version == 1 && res.local == 0);
    CHECK(is_v6(&res.src, "2001:db8::1", 1));
    CHECK(is_v6(&res.dst, "2001:db8::2", 65535));
    CHECK(all_prefixes_incomplete(S(h)));

    /* The longest header the spec allows (104 bytes + CRLF <= 107). */
    CHECK(strlen(maxh) == 104);
    CHECK(parse(S(maxh), &res, &err) == 104);
    CHECK(is_v6(&res.src, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535));
    CHECK(all_prefixes_incomplete(S(maxh)));

    /* v4-mapped and loopback forms. */
    CHECK(parse(S("PROXY TCP6 ::ffff:192.0.2.1 ::1 25 26\r\n"), &res, &err) > 0);
    CHECK(is_v6(&res.src, "::ffff:192.0.2.1", 25) && is_v6(&res.dst, "::1", 26));
}

static void test_v1_unknown(void)
{
    struct pp_result res;
    const char *err;

    CHECK(parse(S("PROXY UNKNOWN\r\n"), &res, &err) == 15);
    CHECK(res.local == 1 && res.version == 1);
    CHECK(all_prefixes_incomplete(S("PROXY UNKNOWN\r\n")));
    /* The spec lets a sender add (ignored) addresses after UNKNOWN. */
    {
        static const char u[] = "PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:fff 65535 65535\r\n";
        CHECK(parse(S(u), &res, &err) == (int)strlen(u));
        CHECK(res.local == 1);
    }
    CHECK(parse(S("PROXY UNKNOWN\r\nEHLO x\r\n"), &res, &err) == 15);
}

static void test_v1_termination(void)
{
    uint8_t buf[600];

    /* CR not followed by LF. */
    CHECK(parse_rc(S("PROXY TCP4 192.0.2.1 198.51.100.2 1 2\rX")) == -1);
    CHECK(parse_rc(S("PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r\r\n")) == -1);
    /* CR as the last byte: the LF may still come. */
    CHECK(parse_rc(S("PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r")) == 0);
    /* A bare LF does not end the header; what follows makes it invalid. */
    CHECK(parse_rc(S("PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n")) == 0);
    CHECK(parse_rc(S("PROXY TCP4 192.0.2.1 198.51.100.2 1 2\nEHLO x\r\n")) == -1);

    /* No CR in the first 106 bytes: too long (not "incomplete" forever) --
     * with CRLF at most 107 bytes, the CR is at offset 105 at the latest. */
    memcpy(buf, "PROXY TCP4 ", 11);
    memset(buf + 11, '1', sizeof(buf) - 11);
    CHECK(parse_rc(buf, 105) == 0);
    CHECK(parse_rc(buf, 106) == -1);
    CHECK(parse_rc(buf, 107) == -1);
    CHECK(parse_rc(buf, 200) == -1);
    CHECK(parse_rc(buf, PP_MAX_HEADER) == -1);
    CHECK(parse_rc(buf, sizeof(buf)) == -1);
    /* CR only at offset 107 (a 109-byte line): refused. */
    buf[107] = '\r';
    buf[108] = '\n';
    CHECK(parse_rc(buf, 109) == -1);

    /* 107 bytes, CRLF included, is the v1 maximum (proxyproto.h: "v1 is at
     * most 107 bytes"). IPv6 addresses with an IPv4 tail can be longer than
     * the 39 characters the spec's arithmetic assumes, so single-spaced,
     * well-formed lines of 107 and 108 bytes exist: 107 is accepted (a
     * receiver must support it), 108 (CR at offset 106) is over the limit. */
    {
        static const char h107[] = "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255 "
                                   "ffff:ffff:ffff:ffff::ffff:111.2.3.44 65535 65535\r\n";
        static const char h108[] = "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255 "
                                   "ffff:ffff:ffff:ffff::ffff:111.22.3.44 65535 65535\r\n";
        struct pp_result res;
        CHECK(strlen(h107) == 107 && strlen(h108) == 108);
        CHECK(parse(S(h107), &res, NULL) == 107);
        CHECK(is_v6(&res.src, "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", 65535));
        CHECK(all_prefixes_incomplete(S(h107)));
        CHECK(parse_rc(S(h108)) == -1);
        /* The same limit reached with padding spaces. */
        memset(buf, ' ', sizeof(buf));
        memcpy(buf, "PROXY TCP4 192.0.2.1 198.51.100.2 1 2", 37);
        buf[106] = '\r';
        buf[107] = '\n';
        CHECK(parse_rc(buf, 108) == -1);
    }
}

static void test_v1_ports(void)
{
    static const struct {
        const char *port;
        int ok;
    } cases[] = {
        {"0", 1},     {"1", 1},      {"25", 1},
        {"65535", 1}, {"65536", 0},  {"99999", 0},
        {"00", 0},    {"01", 0},     {"0025", 0},
        {"-1", 0},    {"+1", 0},     {"1a", 0},
        {"0x19", 0},  {"1.0", 0},    {"4294967321", 0},
        {"１", 0},    {"100000", 0}, {"9999999999999", 0},
    };
    char line[160];
    struct pp_result res;
    const char *err;

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int n;
        /* as the source port */
        n = snprintf(line, sizeof(line), "PROXY TCP4 192.0.2.1 198.51.100.2 %s 25\r\n",
                     cases[i].port);
        int r = parse((const uint8_t *)line, (size_t)n, &res, &err);
        CHECK(cases[i].ok ? r == n : r == -1);
        if (r != (cases[i].ok ? n : -1))
            fprintf(stderr, "  src port %s: %d\n", cases[i].port, r);
        if (cases[i].ok && r == n)
            CHECK(is_v4(&res.src, "192.0.2.1", (unsigned)atoi(cases[i].port)));
        /* as the destination port */
        n = snprintf(line, sizeof(line), "PROXY TCP6 ::1 ::2 25 %s\r\n", cases[i].port);
        r = parse((const uint8_t *)line, (size_t)n, &res, &err);
        CHECK(cases[i].ok ? r == n : r == -1);
        if (r != (cases[i].ok ? n : -1))
            fprintf(stderr, "  dst port %s: %d\n", cases[i].port, r);
    }
}

static void test_v1_addresses(void)
{
    /* TCP4 lines with bad addresses. */
    static const char *const bad4[] = {
        "1.2.3",      "256.1.1.1", "1.2.3.4.5", "::1",      "2001:db8::1", "a.b.c.d",
        "1.2.3.4/32", "1.2.3.-4",  "1..2.3",    "1.2.3.4:", "localhost",   "1.2.3.4%lo",
    };
    /* TCP6 lines with bad addresses. */
    static const char *const bad6[] = {
        "1.2.3.4", "2001:db8:::1", "2001:db8::1::2", "[::1]", "::1%lo", "gggg::1", "12345::1",
    };
    char line[160];

    for (size_t i = 0; i < sizeof(bad4) / sizeof(bad4[0]); i++) {
        int n = snprintf(line, sizeof(line), "PROXY TCP4 %s 198.51.100.2 1 2\r\n", bad4[i]);
        CHECK(parse_rc((const uint8_t *)line, (size_t)n) == -1);
        n = snprintf(line, sizeof(line), "PROXY TCP4 192.0.2.1 %s 1 2\r\n", bad4[i]);
        CHECK(parse_rc((const uint8_t *)line, (size_t)n) == -1);
    }
    for (size_t i = 0; i < sizeof(bad6) / sizeof(bad6[0]); i++) {
        int n = snprintf(line, sizeof(line), "PROXY TCP6 %s ::2 1 2\r\n", bad6[i]);
        CHECK(parse_rc((const uint8_t *)line, (size_t)n) == -1);
        n = snprintf(line, sizeof(line), "PROXY TCP6 ::1 %s 1 2\r\n", bad6[i]);
        CHECK(parse_rc((const uint8_t *)line, (size_t)n) == -1);
    }
}

static void test_v1_syntax(void)
{
    /* Extra or missing fields. */
    CHECK(parse_rc(S("PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n")) == -1);
    CHECK(parse_rc(S("PROXY TCP4 192.0.2.1 198.51.100.2 1 2 x y z\r\n")) == -1);
    CHECK(parse_rc(S("PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n")) == -1);
    CHECK(parse_rc(S("PROXY TCP4 192.0.2.1 198.51.100.2\r\n")) == -1);
    CHECK(parse_rc(S("PROXY TCP4\r\n")) == -1);
    CHECK(parse_rc(S("PROXY \r\n")) == -1);
    CHECK(parse_rc(S("PROXY\r\n")) == -1);
    /* Protocol names are exact and upper case; so is "PROXY". */
    CHECK(parse_rc(S("PROXY tcp4 192.0.2.1 198.51.100.2 1 2\r\n")) == -1);
    CHECK(parse_rc(S("PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n")) == -1);
    CHECK(parse_rc(S("PROXY TCP 192.0.2.1 198.51.100.2 1 2\r\n")) == -1);
    CHECK(parse_rc(S("PROXY unknown\r\n")) == -1);
    CHECK(parse_rc(S("proxy TCP4 192.0.2.1 198.51.100.2 1 2\r\n")) == -1);
    CHECK(parse_rc(S("Proxy TCP4 192.0.2.1 198.51.100.2 1 2\r\n")) == -1);
    CHECK(parse_rc(S("proxy")) == -1);
    CHECK(parse_rc(S("PROXYTCP4 192.0.2.1 198.51.100.2 1 2\r\n")) == -1);
    /* Fields are separated by exactly one space (proxy-protocol.txt 2.1). */
    CHECK(parse_rc(S("PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n")) == -1);
    CHECK(parse_rc(S("PROXY  TCP4 192.0.2.1 198.51.100.2 1 2\r\n")) == -1);
    CHECK(parse_rc(S("PROXY TCP4 192.0.2.1 198.51.100.2 1 2 \r\n")) == -1);
    /* Family and address disagree. */
    CHECK(parse_rc(S("PROXY TCP4 ::1 ::2 1 2\r\n")) == -1);
    CHECK(parse_rc(S("PROXY TCP6 192.0.2.1 198.51.100.2 1 2\r\n")) == -1);
    /* Non-printable bytes inside the line. */
    CHECK(parse_rc(S("PROXY TCP4 192.0.2.1\t198.51.100.2 1 2\r\n")) == -1);
    CHECK(parse_rc(S("PROXY TCP4 192.0.2.1 198.51.100.2 1 2\0\r\n")) == -1);
    CHECK(parse_rc(S("PROXY TCP4 192.0.2.1 198.51.100.2 1 \x80\r\n")) == -1);
    /* Not a PROXY header at all: decided on the first byte that differs. */
    CHECK(parse_rc(S("EHLO client.test\r\n")) == -1);
    CHECK(parse_rc(S("\x16\x03\x01\x02\x00")) == -1);
    CHECK(parse_rc(S("E")) == -1);
    CHECK(parse_rc(S("PRO")) == 0);
    CHECK(parse_rc(S("PROXZ")) == -1);
    CHECK(parse_rc(S("")) == 0);
}

/* ------------------------------------------------------------------------ */
/* v2                                                                       */
/* ------------------------------------------------------------------------ */

static const uint8_t body4[12] = {192, 0, 2, 1, 198, 51, 100, 2, 0xDC, 0x04, 0x01, 0xD1};

static void test_v2_ipv4(void)
{
    uint8_t buf[600];
    struct pp_result res;
    const char *err;
    size_t n = v2(buf, 0x21, 0x11, 12, body4, 12);

    CHECK(n == 28);
    CHECK(parse(buf, n, &res, &err) == 28);
    CHECK(res.version == 2 && res.local == 0);
    CHECK(is_v4(&res.src, "192.0.2.1", 56324));
    CHECK(is_v4(&res.dst, "198.51.100.2", 465));
    CHECK(all_prefixes_incomplete(buf, n));
    /* Followed by a ClientHello: only the header counts. */
    buf[28] = 0x16;
    buf[29] = 0x03;
    CHECK(parse(buf, 30, &res, &err) == 28);

    /* TLVs after the addresses (here: a NOOP TLV and an ALPN TLV): the
     * declared length covers them and the return value includes them. */
    {
        uint8_t body[12 + 7 + 5];
        memcpy(body, body4, 12);
        memcpy(body + 12,
               "\x04\x00\x04"
               "abcd",
               7);
        memcpy(body + 19,
               "\x01\x00\x02"
               "h2",
               5);
        n = v2(buf, 0x21, 0x11, sizeof(body), body, sizeof(body));
        CHECK(n == 40);
        memcpy(buf + n, "EHLO x\r\n", 8);
        CHECK(parse(buf, n + 8, &res, &err) == 40);
        CHECK(is_v4(&res.src, "192.0.2.1", 56324));
        CHECK(all_prefixes_incomplete(buf, n));
    }

    /* Body shorter than IPv4 addresses need. */
    n = v2(buf, 0x21, 0x11, 11, body4, 11);
    CHECK(parse(buf, n, &res, &err) == -1);
    n = v2(buf, 0x21, 0x11, 0, NULL, 0);
    CHECK(parse(buf, n, &res, &err) == -1);
}

static void test_v2_ipv6(void)
{
    uint8_t buf[600], body[36 + 4];
    struct pp_result res;
    const char *err;
    size_t n;

    inet_pton(AF_INET6, "2001:db8::1", body);
    inet_pton(AF_INET6, "2001:db8::2", body + 16);
    body[32] = 0x30; /* 12345 */
    body[33] = 0x39;
    body[34] = 0x00; /* 25 */
    body[35] = 0x19;
    n = v2(buf, 0x21, 0x21, 36, body, 36);
    CHECK(n == 52);
    CHECK(parse(buf, n, &res, &err) == 52);
    CHECK(res.version == 2 && res.local == 0);
    CHECK(is_v6(&res.src, "2001:db8::1", 12345));
    CHECK(is_v6(&res.dst, "2001:db8::2", 25));
    CHECK(all_prefixes_incomplete(buf, n));

    /* With a TLV. */
    memcpy(body + 36,
           "\x04\x00\x01"
           "z",
           4);
    n = v2(buf, 0x21, 0x21, 40, body, 40);
    CHECK(parse(buf, n, &res, &err) == 56);

    /* Too short for IPv6 (an IPv4-sized body with the IPv6 family). */
    n = v2(buf, 0x21, 0x21, 12, body, 12);
    CHECK(parse(buf, n, &res, &err) == -1);
    n = v2(buf, 0x21, 0x21, 35, body, 35);
    CHECK(parse(buf, n, &res, &err) == -1);
}

static void test_v2_local_unspec(void)
{
    uint8_t buf[600], tlv[5] = {0x04, 0x00, 0x02, 'h', 'c'};
    struct pp_result res;
    const char *err;
    size_t n;

    /* LOCAL (a health check by the balancer itself). */
    n = v2(buf, 0x20, 0x00, 0, NULL, 0);
    CHECK(parse(buf, n, &res, &err) == 16);
    CHECK(res.local == 1 && res.version == 2);
    CHECK(all_prefixes_incomplete(buf, n));
    /* LOCAL with TLVs: skipped as part of the header. */
    n = v2(buf, 0x20, 0x00, 5, tlv, 5);
    CHECK(parse(buf, n, &res, &err) == 21);
    CHECK(res.local == 1);
    /* LOCAL with an address block: addresses are ignored. */
    n = v2(buf, 0x20, 0x11, 12, body4, 12);
    CHECK(parse(buf, n, &res, &err) == 28);
    CHECK(res.local == 1);
    /* PROXY with AF_UNSPEC: local too. */
    n = v2(buf, 0x21, 0x00, 0, NULL, 0);
    CHECK(parse(buf, n, &res, &err) == 16);
    CHECK(res.local == 1 && res.version == 2);
}

static void test_v2_refused(void)
{
    uint8_t buf[600], body[216];
    size_t n;

    memset(body, 0, sizeof(body));
    /* UDP over IPv4 / IPv6. */
    n = v2(buf, 0x21, 0x12, 12, body4, 12);
    CHECK(parse_rc(buf, n) == -1);
    n = v2(buf, 0x21, 0x22, 36, body, 36);
    CHECK(parse_rc(buf, n) == -1);
    /* Unspecified transport with an address family. */
    n = v2(buf, 0x21, 0x10, 12, body4, 12);
    CHECK(parse_rc(buf, n) == -1);
    /* AF_UNIX and an unknown family. */
    n = v2(buf, 0x21, 0x31, 216, body, 216);
    CHECK(parse_rc(buf, n) == -1);
    n = v2(buf, 0x21, 0x41, 12, body4, 12);
    CHECK(parse_rc(buf, n) == -1);
    /* Bad version (1, 3, 0, 15) and bad command (2, 15): refused as soon as
     * byte 13 is there, without waiting for the body. */
    static const uint8_t vcs[] = {0x11, 0x31, 0x01, 0xF1, 0x22, 0x2F, 0x10};
    for (size_t i = 0; i < sizeof(vcs); i++) {
        n = v2(buf, vcs[i], 0x11, 12, body4, 12);
        CHECK(parse_rc(buf, n) == -1);
        CHECK(parse_rc(buf, 16) == -1);
    }
    /* A signature with one wrong byte, at every position. */
    for (size_t i = 0; i < 12; i++) {
        n = v2(buf, 0x21, 0x11, 12, body4, 12);
        buf[i] ^= 0x20;
        CHECK(parse_rc(buf, n) == -1);
        CHECK(parse_rc(buf, i + 1) == -1);
    }
}

static void test_v2_lengths(void)
{
    uint8_t buf[PP_MAX_HEADER + 64], body[PP_MAX_HEADER];
    struct pp_result res;
    const char *err;
    size_t n;

    memset(body, 0, sizeof(body));
    memcpy(body, body4, 12);
    /* The longest accepted: 16 + 520 = PP_MAX_HEADER (TLVs: one big NOOP). */
    body[12] = 0x04;
    body[13] = (uint8_t)((520 - 15) >> 8);
    body[14] = (uint8_t)((520 - 15) & 0xff);
    n = v2(buf, 0x21, 0x11, 520, body, 520);
    CHECK(n == PP_MAX_HEADER);
    CHECK(parse(buf, n, &res, &err) == PP_MAX_HEADER);
    CHECK(is_v4(&res.src, "192.0.2.1", 56324));
    CHECK(parse_rc(buf, 16) == 0);
    CHECK(parse_rc(buf, n - 1) == 0);
    CHECK(all_prefixes_incomplete(buf, n));
    /* One more byte: too long, refused from the fixed part alone. */
    n = v2(buf, 0x21, 0x11, 521, body, 521);
    CHECK(parse(buf, n, &res, &err) == -1);
    CHECK(parse_rc(buf, 16) == -1);
    /* The largest declared length. */
    v2(buf, 0x21, 0x11, 0xFFFF, NULL, 0);
    CHECK(parse_rc(buf, 16) == -1);
    /* LOCAL does not escape the cap. */
    v2(buf, 0x20, 0x00, 0xFFFF, NULL, 0);
    CHECK(parse_rc(buf, 16) == -1);

    /* Truncated bodies: a short read is "incomplete", never an error and
     * never a success with the wrong length. */
    n = v2(buf, 0x21, 0x11, 12, body4, 12);
    for (size_t i = 16; i < n; i++)
        CHECK(parse_rc(buf, i) == 0);
    n = v2(buf, 0x21, 0x11, 30, body, 30);
    CHECK(parse_rc(buf, n - 1) == 0);
    CHECK(parse_rc(buf, n) == 46);
}

/* ------------------------------------------------------------------------ */
/* pp_build                                                                 */
/* ------------------------------------------------------------------------ */

/* Builds into an exact-size heap buffer of `cap` bytes (ASan-checked). */
static size_t build(int version, const struct sockaddr_storage *src,
                    const struct sockaddr_storage *dst, uint8_t *out, size_t cap)
{
    uint8_t *b = malloc(cap ? cap : 1);
    size_t n;

    if (b == NULL)
        abort();
    n = pp_build(version, src, dst, b, cap);
    if (n > 0 && n <= cap)
        memcpy(out, b, n);
    free(b);
    return n;
}

static void test_build_v1(void)
{
    static const char want4[] = "PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n";
    static const char want6[] = "PROXY TCP6 2001:db8::1 ::1 65535 0\r\n";
    struct sockaddr_storage s4 = mk4("192.0.2.1", 56324), d4 = mk4("198.51.100.2", 25);
    struct sockaddr_storage s6 = mk6("2001:db8::1", 65535), d6 = mk6("::1", 0);
    struct sockaddr_storage m4 = mk6("::ffff:192.0.2.1", 56324),
                            md = mk6("::ffff:198.51.100.2", 25);
    uint8_t out[PP_MAX_HEADER];
    struct pp_result res;
    const char *err;
    size_t n;

    n = build(1, &s4, &d4, out, sizeof(out));
    CHECK(n == strlen(want4) && memcmp(out, want4, n) == 0);
    CHECK(parse(out, n, &res, &err) == (int)n);
    CHECK(is_v4(&res.src, "192.0.2.1", 56324) && is_v4(&res.dst, "198.51.100.2", 25));

    n = build(1, &s6, &d6, out, sizeof(out));
    CHECK(n == strlen(want6) && memcmp(out, want6, n) == 0);
    CHECK(parse(out, n, &res, &err) == (int)n);
    CHECK(is_v6(&res.src, "2001:db8::1", 65535) && is_v6(&res.dst, "::1", 0));

    /* v4-mapped IPv6 goes out as TCP4. */
    n = build(1, &m4, &md, out, sizeof(out));
    CHECK(n == strlen(want4) && memcmp(out, want4, n) == 0);
    CHECK(parse(out, n, &res, &err) == (int)n);
    CHECK(is_v4(&res.src, "192.0.2.1", 56324) && is_v4(&res.dst, "198.51.100.2", 25));

    /* The longest v1 header fits in 107 bytes and parses back. */
    {
        struct sockaddr_storage a = mk6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", 65535),
                                b = mk6("fffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65534);
        n = build(1, &a, &b, out, sizeof(out));
        CHECK(n == 104 && n <= 107);
        CHECK(parse(out, n, &res, &err) == 104);
        CHECK(is_v6(&res.src, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", 65535));
        CHECK(is_v6(&res.dst, "fffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65534));
    }

    /* cap: the text needs one byte more for snprintf's NUL. */
    CHECK(build(1, &s4, &d4, out, strlen(want4)) == 0);
    CHECK(build(1, &s4, &d4, out, strlen(want4) + 1) == strlen(want4));
    CHECK(build(1, &s4, &d4, out, 10) == 0);
    CHECK(build(1, &s4, &d4, out, 1) == 0);
    CHECK(build(1, &s4, &d4, out, 0) == 0);
}

static void test_build_v2(void)
{
    static const uint8_t want4[28] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49,
                                      0x54, 0x0A, 0x21, 0x11, 0x00, 0x0C, 192,  0,    2,    1,
                                      198,  51,   100,  2,    0xDC, 0x04, 0x00, 0x19};
    struct sockaddr_storage s4 = mk4("192.0.2.1", 56324), d4 = mk4("198.51.100.2", 25);
    struct sockaddr_storage s6 = mk6("2001:db8::1", 12345), d6 = mk6("::1", 465);
    struct sockaddr_storage m4 = mk6("::ffff:192.0.2.1", 56324),
                            md = mk6("::ffff:198.51.100.2", 25);
    uint8_t out[PP_MAX_HEADER];
    struct pp_result res;
    const char *err;
    size_t n;

    n = build(2, &s4, &d4, out, sizeof(out));
    CHECK(n == 28 && memcmp(out, want4, 28) == 0);
    CHECK(parse(out, n, &res, &err) == 28);
    CHECK(res.version == 2 && res.local == 0);
    CHECK(is_v4(&res.src, "192.0.2.1", 56324) && is_v4(&res.dst, "198.51.100.2", 25));

    n = build(2, &s6, &d6, out, sizeof(out));
    CHECK(n == 52);
    CHECK(memcmp(out, SIG, 12) == 0 && out[12] == 0x21 && out[13] == 0x21 && out[14] == 0 &&
          out[15] == 36);
    CHECK(parse(out, n, &res, &err) == 52);
    CHECK(is_v6(&res.src, "2001:db8::1", 12345) && is_v6(&res.dst, "::1", 465));

    /* v4-mapped: sent as IPv4, byte for byte the same as plain IPv4. */
    n = build(2, &m4, &md, out, sizeof(out));
    CHECK(n == 28 && memcmp(out, want4, 28) == 0);
    CHECK(parse(out, n, &res, &err) == 28);
    CHECK(is_v4(&res.src, "192.0.2.1", 56324));

    /* cap too small: 0, and nothing written past cap (ASan). */
    CHECK(build(2, &s4, &d4, out, 27) == 0);
    CHECK(build(2, &s4, &d4, out, 28) == 28);
    CHECK(build(2, &s6, &d6, out, 51) == 0);
    CHECK(build(2, &s6, &d6, out, 52) == 52);
    CHECK(build(2, &s4, &d4, out, 16) == 0);
    CHECK(build(2, &s4, &d4, out, 0) == 0);
}

static void test_build_families(void)
{
    struct sockaddr_storage s4 = mk4("192.0.2.1", 1), s6 = mk6("2001:db8::1", 2),
                            m4 = mk6("::ffff:192.0.2.1", 3), un;
    uint8_t out[PP_MAX_HEADER];

    memset(&un, 0, sizeof(un));
    un.ss_family = AF_UNIX;
    for (int v = 1; v <= 2; v++) {
        CHECK(build(v, &s4, &s6, out, sizeof(out)) == 0);
        CHECK(build(v, &s6, &s4, out, sizeof(out)) == 0);
        /* mapped src (becomes IPv4) with a real IPv6 dst: mixed */
        CHECK(build(v, &m4, &s6, out, sizeof(out)) == 0);
        /* mapped src with an IPv4 dst: both IPv4 */
        CHECK(build(v, &m4, &s4, out, sizeof(out)) > 0);
        CHECK(build(v, &un, &un, out, sizeof(out)) == 0);
        memset(&un, 0, sizeof(un)); /* AF_UNSPEC */
        CHECK(build(v, &un, &un, out, sizeof(out)) == 0);
        un.ss_family = AF_UNIX;
    }
}

/* The address-less headers a health probe sends: exact bytes, and the
 * parser reads them back as "local". */
static void test_build_local(void)
{
    static const uint8_t v2[16] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51,
                                   0x55, 0x49, 0x54, 0x0A, 0x20, 0x00, 0x00, 0x00};
    uint8_t out[PP_MAX_HEADER];
    struct pp_result res;
    const char *err;

    CHECK(pp_build_local(1, out, sizeof(out)) == 15);
    CHECK(memcmp(out, "PROXY UNKNOWN\r\n", 15) == 0);
    CHECK(parse(out, 15, &res, &err) == 15 && res.local == 1 && res.version == 1);
    CHECK(pp_build_local(2, out, sizeof(out)) == 16);
    CHECK(memcmp(out, v2, 16) == 0);
    CHECK(parse(out, 16, &res, &err) == 16 && res.local == 1 && res.version == 2);
    /* too small, or no such version: nothing written */
    CHECK(pp_build_local(1, out, 14) == 0);
    CHECK(pp_build_local(2, out, 15) == 0);
    CHECK(pp_build_local(0, out, sizeof(out)) == 0);
    CHECK(pp_build_local(3, out, sizeof(out)) == 0);
}

/* ------------------------------------------------------------------------ */
/* smtp_xtext (proxy/smtp.c)                                                */
/* ------------------------------------------------------------------------ */

/* Encodes into an exact-size heap buffer; checks return == strlen(out). */
static int xtext_is(const char *in, size_t cap, const char *want)
{
    char *out = malloc(cap ? cap : 1);
    size_t n;
    int ok;

    if (out == NULL)
        abort();
    memset(out, '#', cap ? cap : 1);
    n = smtp_xtext(in, out, cap);
    if (cap == 0)
        ok = n == 0 && out[0] == '#' && want == NULL;
    else
        ok = n == strlen(out) && strcmp(out, want) == 0;
    if (!ok)
        fprintf(stderr, "  xtext(%s, cap %zu): got %zu \"%s\", want \"%s\"\n", in, cap, n,
                cap ? out : "", want ? want : "(nothing)");
    free(out);
    return ok;
}

static void test_xtext(void)
{
    char all[256], want[1024];

    CHECK(xtext_is("127.0.0.1", 64, "127.0.0.1"));
    CHECK(xtext_is("IPV6:::1", 64, "IPV6:::1"));
    CHECK(xtext_is("IPV6:2001:db8::1", 64, "IPV6:2001:db8::1"));
    CHECK(xtext_is("", 64, ""));
    CHECK(xtext_is("a+b", 64, "a+2Bb"));
    CHECK(xtext_is("a=b", 64, "a+3Db"));
    CHECK(xtext_is("+=", 64, "+2B+3D"));
    CHECK(xtext_is("a b", 64, "a+20b"));
    CHECK(xtext_is("\x7f", 64, "+7F"));
    CHECK(xtext_is("\x80\xff\xc3\xa9", 64, "+80+FF+C3+A9"));
    CHECK(xtext_is("\x01\x1f\t\r\n", 64, "+01+1F+09+0D+0A"));
    /* The printable edges stay as they are. */
    CHECK(xtext_is("!~", 64, "!~"));
    CHECK(xtext_is("[]<>@\\\"", 64, "[]<>@\\\""));

    /* Every byte 1..255: '!'..'~' except '+' and '=' are literal. */
    {
        size_t o = 0;
        for (int c = 1; c < 256; c++) {
            all[c - 1] = (char)c;
            if (c < 33 || c > 126 || c == '+' || c == '=')
                o += (size_t)snprintf(want + o, sizeof(want) - o, "+%02X", (unsigned)c);
            else
                want[o++] = (char)c;
        }
        all[255] = '\0';
        want[o] = '\0';
        CHECK(xtext_is(all, sizeof(want), want));
        CHECK(strlen(want) == 94 - 2 + (255 - 92) * 3);
    }

    /* Truncation: never a partial "+HH", always NUL-terminated, nothing
     * written past cap (exact-size buffers, ASan). */
    CHECK(xtext_is("abcdef", 4, "abc"));
    CHECK(xtext_is("abcdef", 7, "abcdef"));
    CHECK(xtext_is("abcdef", 6, "abcde"));
    CHECK(xtext_is("abcdef", 1, ""));
    CHECK(xtext_is("+", 3, ""));
    CHECK(xtext_is("+", 4, "+2B"));
    CHECK(xtext_is("a+", 4, "a"));
    CHECK(xtext_is("a+", 5, "a+2B"));
    CHECK(xtext_is("ab+c", 5, "ab"));
    CHECK(xtext_is("a b c", 8, "a+20b"));
    CHECK(xtext_is("\xff\xff", 7, "+FF+FF"));
    CHECK(xtext_is("\xff\xff", 6, "+FF"));
    CHECK(xtext_is("\xff\xff", 4, "+FF"));
    CHECK(xtext_is("abc", 0, NULL));
}

int main(void)
{
    test_v1_tcp4();
    test_v1_tcp6();
    test_v1_unknown();
    test_v1_termination();
    test_v1_ports();
    test_v1_addresses();
    test_v1_syntax();
    test_v2_ipv4();
    test_v2_ipv6();
    test_v2_local_unspec();
    test_v2_refused();
    test_v2_lengths();
    test_build_v1();
    test_build_v2();
    test_build_families();
    test_build_local();
    test_xtext();

    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed == 0 ? 0 : 1;
}
