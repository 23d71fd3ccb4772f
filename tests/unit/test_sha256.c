/*
 * test_sha256.c - the project's wolfSSL build hashes SHA-256 correctly.
 *
 * scripts/wolfssl-patches/0004-sha256-shani.patch adds a SHA-256 transform
 * with the x86 SHA extensions, chosen at run time where the CPU has them.
 * This checks wolfSSL's SHA-256 (whichever transform this CPU selects)
 * against OpenSSL's on random inputs fed in random pieces, and against the
 * FIPS 180-2 vectors. Build: see Makefile (build/unit/test_sha256).
 */
#include <wolfssl/options.h>

#include <wolfssl/wolfcrypt/hash.h>
#include <wolfssl/wolfcrypt/sha256.h>

#include <cpuid.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

static void hex(const unsigned char *d, char out[65])
{
    for (int i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", d[i]);
}

static int wolf_sha256(const unsigned char *in, size_t n, size_t piece_max, unsigned char out[32])
{
    wc_Sha256 s;
    size_t off = 0;

    if (wc_InitSha256(&s) != 0)
        return -1;
    while (off < n) {
        size_t k = piece_max ? (size_t)rand() % (piece_max + 1) : n - off;
        if (k > n - off)
            k = n - off;
        if (wc_Sha256Update(&s, in + off, (word32)k) != 0)
            return -1;
        off += k;
    }
    return wc_Sha256Final(&s, out);
}

int main(void)
{
    static unsigned char buf[9000];
    unsigned char a[32], b[32];
    unsigned int blen, ax, bx, cx, dx;
    char h[65];
    int mismatches = 0;

    /* FIPS 180-2, appendix B */
    CHECK(wolf_sha256((const unsigned char *)"abc", 3, 0, a) == 0);
    hex(a, h);
    CHECK(strcmp(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad") == 0);
    const char *two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    CHECK(wolf_sha256((const unsigned char *)two, strlen(two), 0, a) == 0);
    hex(a, h);
    CHECK(strcmp(h, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1") == 0);
    CHECK(wolf_sha256((const unsigned char *)"", 0, 0, a) == 0);
    hex(a, h);
    CHECK(strcmp(h, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855") == 0);

    /* random lengths (0..9000, so every block and padding boundary), fed
     * whole and in pieces of 0..300 bytes */
    srand(20261202);
    for (int t = 0; t < 5000; t++) {
        size_t n = (size_t)rand() % sizeof(buf);
        for (size_t i = 0; i < n; i++)
            buf[i] = (unsigned char)rand();
        if (EVP_Digest(buf, n, b, &blen, EVP_sha256(), NULL) != 1 || blen != 32) {
            n_failed++;
            break;
        }
        if (wolf_sha256(buf, n, 0, a) != 0 || memcmp(a, b, 32) != 0)
            mismatches++;
        if (wolf_sha256(buf, n, 300, a) != 0 || memcmp(a, b, 32) != 0)
            mismatches++;
    }
    CHECK(mismatches == 0);

    int shani = __get_cpuid_count(7, 0, &ax, &bx, &cx, &dx) && ((bx >> 29) & 1);
    printf("SHA-256 transform under test: %s\n",
           shani ? "SHA-NI (patch 0004)" : "wolfSSL's own (this CPU has no SHA extensions)");
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
