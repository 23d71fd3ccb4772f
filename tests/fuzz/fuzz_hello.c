/*
 * fuzz_hello.c - libFuzzer target: what a listener with several
 * certificates does with a client's first bytes (proxy/client.c
 * client_hello): wolfSSL_SNI_GetFromBuffer over one TLS record, then our
 * RFC 9525 matcher (tls_name_matches) between the name found and fixed
 * certificate names, both ways round. Invariant violations abort().
 * The static wolfSSL is not built with sanitizers or coverage, so this
 * mainly exercises our side (and would catch a wolfSSL crash or a name it
 * returns unterminated or oversized); fuzzing wolfSSL's own parser
 * properly needs an instrumented wolfSSL build.
 *
 * clang -g -O1 -fsanitize=fuzzer,address,undefined -Iproxy -Ibuild/wolfssl/include \
 *       tests/fuzz/fuzz_hello.c proxy/tls.c proxy/log.c build/wolfssl/lib/libwolfssl.a \
 *       -lm -lpthread -o build/fuzz/fuzz_hello
 */
#include "tls.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define REQUIRE(cond)                                                                              \
    do {                                                                                           \
        if (!(cond))                                                                               \
            abort();                                                                               \
    } while (0)

static const char *const patterns[] = {
    "mail.sni.test", "*.wild.test", "*.com", "up*.test", "*", "localhost", "*.a.b.c",
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned char *copy, name[256];
    word32 len = sizeof(name) - 1;
    size_t rec;

    if (size < 5 || size > 17000)
        return 0;
    /* As client_hello() does: the first record only, on an exact-size copy
     * (so ASan sees any read past it). */
    rec = 5 + ((size_t)data[3] << 8 | data[4]);
    if (rec > size)
        return 0;
    copy = malloc(rec);
    REQUIRE(copy != NULL);
    memcpy(copy, data, rec);
    if (wolfSSL_SNI_GetFromBuffer(copy, (word32)rec, WOLFSSL_SNI_HOST_NAME, name, &len) ==
            WOLFSSL_SUCCESS &&
        len < sizeof(name)) {
        name[len] = '\0';
        const char *n = (const char *)name;
        for (size_t i = 0; i < sizeof(patterns) / sizeof(patterns[0]); i++) {
            int m = tls_name_matches(patterns[i], n);
            /* A match is never looser than the rules: an exact pattern
             * matches only the same name, a wildcard never an empty label. */
            if (m && patterns[i][0] != '*')
                REQUIRE(strcasecmp(patterns[i], n) == 0);
            if (m && patterns[i][0] == '*')
                REQUIRE(strchr(n, '.') != NULL && n[0] != '.');
            (void)tls_name_matches(n, patterns[i]);
        }
    }
    free(copy);
    return 0;
}
