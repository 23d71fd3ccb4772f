/*
 * fuzz_proxy.c - libFuzzer target: pp_parse over the input (a PROXY v1/v2
 * header, possibly followed by other bytes), with invariants; a parsed
 * header is also rebuilt with pp_build and parsed back. Invariant violations
 * abort().
 *
 * clang -g -O1 -fsanitize=fuzzer,address,undefined -Iproxy \
 *       tests/fuzz/fuzz_proxy.c proxy/proxyproto.c -o build/fuzz/fuzz_proxy
 */
#include "proxyproto.h"

#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRE(cond)                                                                              \
    do {                                                                                           \
        if (!(cond))                                                                               \
            abort();                                                                               \
    } while (0)

/* pp_parse on an exact-size copy (so ASan sees reads past len). */
static int parse(const uint8_t *buf, size_t len, struct pp_result *res, const char **err)
{
    uint8_t *copy = malloc(len ? len : 1);
    int r;

    REQUIRE(copy != NULL);
    if (len)
        memcpy(copy, buf, len);
    memset(res, 0xA5, sizeof(*res));
    *err = (const char *)1; /* must be overwritten */
    r = pp_parse(copy, len, res, err);
    free(copy);
    REQUIRE(r >= -1);
    if (r == -1)
        REQUIRE(*err != NULL && *err != (const char *)1 && (*err)[0] != '\0');
    else
        REQUIRE(*err == NULL);
    return r;
}

static int valid_family(const struct sockaddr_storage *ss)
{
    return ss->ss_family == AF_INET || ss->ss_family == AF_INET6;
}

static int mapped(const struct sockaddr_storage *ss)
{
    return ss->ss_family == AF_INET6 &&
           IN6_IS_ADDR_V4MAPPED(&((const struct sockaddr_in6 *)ss)->sin6_addr);
}

/* The same endpoint, comparing a v4-mapped IPv6 address equal to IPv4. */
static int same_endpoint(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    uint8_t ka[16] = {0}, kb[16] = {0};
    uint16_t pa, pb;

    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const struct sockaddr_in *)a;
        ka[10] = ka[11] = 0xff;
        memcpy(ka + 12, &x->sin_addr, 4);
        pa = x->sin_port;
    } else {
        const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)a;
        memcpy(ka, &x->sin6_addr, 16);
        pa = x->sin6_port;
    }
    if (b->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const struct sockaddr_in *)b;
        kb[10] = kb[11] = 0xff;
        memcpy(kb + 12, &x->sin_addr, 4);
        pb = x->sin_port;
    } else {
        const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)b;
        memcpy(kb, &x->sin6_addr, 16);
        pb = x->sin6_port;
    }
    return memcmp(ka, kb, 16) == 0 && pa == pb;
}

static void check_rebuild(const struct pp_result *res)
{
    for (int v = 1; v <= 2; v++) {
        uint8_t out[PP_MAX_HEADER];
        struct pp_result back;
        const char *err;
        size_t n = pp_build(v, &res->src, &res->dst, out, sizeof(out));

        if (n == 0) {
            /* Only a family mix after unmapping may be refused. */
            REQUIRE(mapped(&res->src) != mapped(&res->dst));
            continue;
        }
        REQUIRE(n <= sizeof(out) && n <= (v == 1 ? 107u : 52u));
        REQUIRE(parse(out, n, &back, &err) == (int)n);
        REQUIRE(back.version == v && back.local == 0);
        REQUIRE(same_endpoint(&res->src, &back.src));
        REQUIRE(same_endpoint(&res->dst, &back.dst));
        /* A smaller buffer is refused, never overrun (ASan). */
        {
            uint8_t *small = malloc(n);
            REQUIRE(small != NULL);
            REQUIRE(pp_build(v, &res->src, &res->dst, small, n - 1) == 0);
            free(small);
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct pp_result res, res2;
    const char *err, *err2;
    int r = parse(data, size, &res, &err);

    if (r == 0) {
        /* "Need more" is only possible while a header could still fit. */
        REQUIRE(size < PP_MAX_HEADER);
        if (size > 0)
            REQUIRE(parse(data, size - 1, &res2, &err2) == 0);
        return 0;
    }
    if (r < 0)
        return 0;

    size_t n = (size_t)r;
    REQUIRE(n <= size && n <= PP_MAX_HEADER);
    REQUIRE(res.version == 1 || res.version == 2);
    REQUIRE(res.local == 0 || res.local == 1);
    if (res.version == 1) {
        REQUIRE(n >= 8 && memcmp(data, "PROXY ", 6) == 0);
        REQUIRE(data[n - 2] == '\r' && data[n - 1] == '\n');
    } else {
        REQUIRE(n >= 16 && data[12] >> 4 == 2);
        REQUIRE(n == 16 + ((size_t)data[14] << 8 | data[15]));
    }
    if (!res.local) {
        REQUIRE(valid_family(&res.src) && valid_family(&res.dst));
        REQUIRE(res.src.ss_family == res.dst.ss_family);
    }

    /* Exactly the header's bytes give the same result ... */
    REQUIRE(parse(data, n, &res2, &err2) == r);
    REQUIRE(res2.version == res.version && res2.local == res.local);
    if (!res.local) {
        REQUIRE(same_endpoint(&res.src, &res2.src));
        REQUIRE(same_endpoint(&res.dst, &res2.dst));
    }
    /* ... and strict prefixes of it are incomplete, never an error. */
    {
        size_t cuts[4] = {n - 1, n / 2, n - n / 3, data[0] % n};
        for (size_t i = 0; i < 4; i++)
            REQUIRE(parse(data, cuts[i], &res2, &err2) == 0);
    }
    if (!res.local)
        check_rebuild(&res);
    return 0;
}
