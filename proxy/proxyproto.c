/*
 * proxyproto.c - PROXY protocol v1/v2 parsing and building (see
 * proxyproto.h and HAProxy's doc/proxy-protocol.txt).
 */
#include "proxyproto.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>

static const uint8_t v2sig[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                  0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

/* ---- v1: "PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\n" ---- */

static int parse_port(const char *s, uint16_t *out)
{
    unsigned v = 0;

    if (*s == '\0' || (s[0] == '0' && s[1] != '\0'))
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        v = v * 10 + (unsigned)(*s - '0');
        if (v > 65535)
            return -1;
    }
    *out = (uint16_t)v;
    return 0;
}

static int set_addr(struct sockaddr_storage *ss, int family, const char *ip, const char *port)
{
    uint16_t p;

    memset(ss, 0, sizeof(*ss));
    if (parse_port(port, &p) == -1)
        return -1;
    if (family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)ss;
        a->sin_family = AF_INET;
        a->sin_port = htons(p);
        return inet_pton(AF_INET, ip, &a->sin_addr) == 1 ? 0 : -1;
    }
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(p);
    return inet_pton(AF_INET6, ip, &a->sin6_addr) == 1 ? 0 : -1;
}

static int parse_v1(const uint8_t *buf, size_t len, struct pp_result *res, const char **err)
{
    char line[108], *f[6], *save = NULL;
    const uint8_t *cr;
    size_t n;
    int nf = 0, family;

    /* At most 107 bytes with the CRLF: the CR is among the first 106. */
    cr = memchr(buf, '\r', len < 106 ? len : 106);
    if (cr == NULL) {
        if (len >= 106) {
            *err = "PROXY v1 header longer than 107 bytes";
            return -1;
        }
        return 0;
    }
    n = (size_t)(cr - buf);
    if (n + 1 >= len)
        return 0;
    if (cr[1] != '\n') {
        *err = "PROXY v1 header not terminated by CRLF";
        return -1;
    }
    memcpy(line, buf, n);
    line[n] = '\0';
    for (size_t i = 0; i < n; i++) {
        if (line[i] < 0x20 || line[i] > 0x7e) {
            *err = "PROXY v1 header has a non-printable byte";
            return -1;
        }
    }
    /* Fields are separated by exactly one space (strtok alone would take
     * runs of them). */
    if (strstr(line, "  ") != NULL || (n > 0 && line[n - 1] == ' ')) {
        *err = "malformed PROXY v1 header";
        return -1;
    }
    for (char *t = strtok_r(line, " ", &save); t != NULL; t = strtok_r(NULL, " ", &save)) {
        if (nf == 6) {
            *err = "PROXY v1 header with too many fields";
            return -1;
        }
        f[nf++] = t;
    }
    if (nf < 2 || strcmp(f[0], "PROXY") != 0) {
        *err = "malformed PROXY v1 header";
        return -1;
    }
    memset(res, 0, sizeof(*res));
    res->version = 1;
    if (strcmp(f[1], "UNKNOWN") == 0) {
        res->local = 1;
        return (int)n + 2;
    }
    if (strcmp(f[1], "TCP4") == 0)
        family = AF_INET;
    else if (strcmp(f[1], "TCP6") == 0)
        family = AF_INET6;
    else {
        *err = "PROXY v1 header with an unknown protocol";
        return -1;
    }
    if (nf != 6 || set_addr(&res->src, family, f[2], f[4]) == -1 ||
        set_addr(&res->dst, family, f[3], f[5]) == -1) {
        *err = "malformed addresses in PROXY v1 header";
        return -1;
    }
    return (int)n + 2;
}

/* ---- v2: 12-byte signature, ver/cmd, fam/proto, length, addresses, TLVs ---- */

static int parse_v2(const uint8_t *buf, size_t len, struct pp_result *res, const char **err)
{
    size_t body, total;
    uint8_t ver = buf[12] >> 4, cmd = buf[12] & 0x0f, fam = buf[13] >> 4, proto = buf[13] & 0x0f;

    body = (size_t)buf[14] << 8 | buf[15];
    total = 16 + body;
    if (ver != 2 || cmd > 1) {
        *err = "PROXY v2 header with a bad version or command";
        return -1;
    }
    if (total > PP_MAX_HEADER) {
        *err = "PROXY v2 header too long";
        return -1;
    }
    if (len < total)
        return 0;
    memset(res, 0, sizeof(*res));
    res->version = 2;
    if (cmd == 0 || fam == 0) { /* LOCAL, or PROXY with AF_UNSPEC */
        res->local = 1;
        return (int)total;
    }
    if (proto != 1) {
        *err = "PROXY v2 header for a protocol other than TCP";
        return -1;
    }
    if (fam == 1) {
        struct sockaddr_in *s = (struct sockaddr_in *)&res->src;
        struct sockaddr_in *d = (struct sockaddr_in *)&res->dst;
        if (body < 12) {
            *err = "PROXY v2 header too short for IPv4 addresses";
            return -1;
        }
        s->sin_family = d->sin_family = AF_INET;
        memcpy(&s->sin_addr, buf + 16, 4);
        memcpy(&d->sin_addr, buf + 20, 4);
        memcpy(&s->sin_port, buf + 24, 2);
        memcpy(&d->sin_port, buf + 26, 2);
        return (int)total;
    }
    if (fam == 2) {
        struct sockaddr_in6 *s = (struct sockaddr_in6 *)&res->src;
        struct sockaddr_in6 *d = (struct sockaddr_in6 *)&res->dst;
        if (body < 36) {
            *err = "PROXY v2 header too short for IPv6 addresses";
            return -1;
        }
        s->sin6_family = d->sin6_family = AF_INET6;
        memcpy(&s->sin6_addr, buf + 16, 16);
        memcpy(&d->sin6_addr, buf + 32, 16);
        memcpy(&s->sin6_port, buf + 48, 2);
        memcpy(&d->sin6_port, buf + 50, 2);
        return (int)total;
    }
    *err = "PROXY v2 header with an unsupported address family";
    return -1;
}

int pp_parse(const uint8_t *buf, size_t len, struct pp_result *res, const char **err)
{
    size_t n;

    *err = NULL;
    if (len == 0)
        return 0;
    if (buf[0] == 'P') {
        n = len < 6 ? len : 6;
        if (memcmp(buf, "PROXY ", n) != 0) {
            *err = "not a PROXY protocol header";
            return -1;
        }
        return len < 6 ? 0 : parse_v1(buf, len, res, err);
    }
    n = len < 12 ? len : 12;
    if (memcmp(buf, v2sig, n) != 0) {
        *err = "not a PROXY protocol header";
        return -1;
    }
    if (len < 16)
        return 0;
    return parse_v2(buf, len, res, err);
}

/* IPv4 in v4-mapped IPv6 form becomes plain IPv4. */
static void unmap(const struct sockaddr_storage *in, struct sockaddr_storage *out)
{
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)in;

    *out = *in;
    if (in->ss_family == AF_INET6 && IN6_IS_ADDR_V4MAPPED(&a->sin6_addr)) {
        struct sockaddr_in *b = (struct sockaddr_in *)out;
        uint16_t port = a->sin6_port;
        struct in_addr v4;
        memcpy(&v4, a->sin6_addr.s6_addr + 12, 4);
        memset(out, 0, sizeof(*out));
        b->sin_family = AF_INET;
        b->sin_port = port;
        b->sin_addr = v4;
    }
}

size_t pp_build(int version, const struct sockaddr_storage *src_in,
                const struct sockaddr_storage *dst_in, uint8_t *out, size_t cap)
{
    struct sockaddr_storage src, dst;
    char a[INET6_ADDRSTRLEN], b[INET6_ADDRSTRLEN];
    int n;

    unmap(src_in, &src);
    unmap(dst_in, &dst);
    if (src.ss_family != dst.ss_family || (src.ss_family != AF_INET && src.ss_family != AF_INET6))
        return 0;
    if (version == 1) {
        unsigned sp, dp;
        if (src.ss_family == AF_INET) {
            const struct sockaddr_in *s = (const void *)&src, *d = (const void *)&dst;
            inet_ntop(AF_INET, &s->sin_addr, a, sizeof(a));
            inet_ntop(AF_INET, &d->sin_addr, b, sizeof(b));
            sp = ntohs(s->sin_port);
            dp = ntohs(d->sin_port);
        } else {
            const struct sockaddr_in6 *s = (const void *)&src, *d = (const void *)&dst;
            inet_ntop(AF_INET6, &s->sin6_addr, a, sizeof(a));
            inet_ntop(AF_INET6, &d->sin6_addr, b, sizeof(b));
            sp = ntohs(s->sin6_port);
            dp = ntohs(d->sin6_port);
        }
        n = snprintf((char *)out, cap, "PROXY %s %s %s %u %u\r\n",
                     src.ss_family == AF_INET ? "TCP4" : "TCP6", a, b, sp, dp);
        return n > 0 && (size_t)n < cap ? (size_t)n : 0;
    }
    size_t body = src.ss_family == AF_INET ? 12 : 36;
    if (cap < 16 + body)
        return 0;
    memcpy(out, v2sig, 12);
    out[12] = 0x21; /* version 2, PROXY */
    out[13] = src.ss_family == AF_INET ? 0x11 : 0x21;
    out[14] = 0;
    out[15] = (uint8_t)body;
    if (src.ss_family == AF_INET) {
        const struct sockaddr_in *s = (const void *)&src, *d = (const void *)&dst;
        memcpy(out + 16, &s->sin_addr, 4);
        memcpy(out + 20, &d->sin_addr, 4);
        memcpy(out + 24, &s->sin_port, 2);
        memcpy(out + 26, &d->sin_port, 2);
    } else {
        const struct sockaddr_in6 *s = (const void *)&src, *d = (const void *)&dst;
        memcpy(out + 16, &s->sin6_addr, 16);
        memcpy(out + 32, &d->sin6_addr, 16);
        memcpy(out + 48, &s->sin6_port, 2);
        memcpy(out + 50, &d->sin6_port, 2);
    }
    return 16 + body;
}

size_t pp_build_local(int version, uint8_t *out, size_t cap)
{
    static const char v1[] = "PROXY UNKNOWN\r\n";

    if (version == 1) {
        if (cap < sizeof(v1) - 1)
            return 0;
        memcpy(out, v1, sizeof(v1) - 1);
        return sizeof(v1) - 1;
    }
    if (version != 2 || cap < 16)
        return 0;
    memcpy(out, v2sig, 12);
    out[12] = 0x20; /* version 2, LOCAL */
    out[13] = 0x00; /* AF_UNSPEC, UNSPEC */
    out[14] = 0;
    out[15] = 0; /* no addresses */
    return 16;
}
