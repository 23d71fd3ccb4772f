/*
 * test_gcm_vaes.c - proxy/gcm_vaes.c gives exactly what wolfSSL's AES-GCM
 * gives.
 *
 * AES-GCM is deterministic, so the second implementation must agree with
 * wolfSSL's byte for byte: ciphertext and tag, for AES-128 and AES-256,
 * every data length from 0 to 300 bytes (all tails after the 128-byte
 * steps) and random ones up to a TLS record and beyond, AAD of TLS's sizes
 * and others, tags of 12 to 16 bytes (wolfSSL refuses shorter ones), in place and not. Decryption
 * must give the data back and refuse any changed bit of ciphertext, tag,
 * AAD or IV, wiping what it wrote. Plus the test vectors of the GCM
 * specification (McGrew and Viega, test cases 3, 4 and 16), so that the
 * two cannot be wrong together. On a CPU without VAES the checks against
 * wolfSSL are skipped (nothing would run the code there) and the test says
 * so. Through the crypto device (cryptodev.c), as wolfSSL's TLS code calls
 * it: wolfSSL's API with the device id gives the same bytes, a wrong tag
 * is AES_GCM_AUTH_E, what gcm_vaes.c does not take (a 16-byte IV) is left
 * to wolfSSL, and the metrics counter shows which one did the work.
 * Build: see Makefile (build/unit/test_gcm_vaes).
 */
#include <wolfssl/options.h>

#include <wolfssl/wolfcrypt/aes.h>
#include <wolfssl/wolfcrypt/error-crypt.h>
#include <wolfssl/wolfcrypt/wc_port.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "metric.h"
#include "cryptodev.h"
#include "gcm_vaes.h"
#include "metrics.h"

static void rnd(unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)rand();
}

static int unhex(const char *h, unsigned char *out)
{
    int n = 0;
    for (; h[0] && h[1]; h += 2)
        out[n++] = (unsigned char)strtol((char[]){h[0], h[1], 0}, NULL, 16);
    return n;
}

static int wolf_gcm(const unsigned char *key, size_t keylen, const unsigned char *iv,
                    const unsigned char *aad, size_t aadlen, const unsigned char *in,
                    unsigned char *out, size_t len, unsigned char *tag, size_t taglen)
{
    Aes a;
    int rc;

    if (wc_AesInit(&a, NULL, INVALID_DEVID) != 0)
        return -1;
    rc = wc_AesGcmSetKey(&a, key, (word32)keylen);
    if (rc == 0)
        rc = wc_AesGcmEncrypt(&a, out, in, (word32)len, iv, 12, tag, (word32)taglen, aad,
                              (word32)aadlen);
    wc_AesFree(&a);
    return rc;
}

/* One comparison: returns 1 when everything matched. */
static int compare_one(size_t keylen, size_t len, size_t aadlen, size_t taglen, int inplace)
{
    static unsigned char in[70000], a_out[70000], b_out[70000], back[70000];
    unsigned char key[32], iv[12], aad[64], a_tag[16], b_tag[16];
    int ok = 1;

    rnd(key, sizeof(key));
    rnd(iv, sizeof(iv));
    rnd(aad, sizeof(aad));
    rnd(in, len);
    if (wolf_gcm(key, keylen, iv, aad, aadlen, in, a_out, len, a_tag, taglen) != 0)
        return 0;
    if (inplace) {
        memcpy(b_out, in, len);
        ok &= gcm_vaes_encrypt(key, keylen, iv, 12, aad, aadlen, b_out, b_out, len, b_tag,
                               taglen) == 0;
    } else {
        ok &=
            gcm_vaes_encrypt(key, keylen, iv, 12, aad, aadlen, in, b_out, len, b_tag, taglen) == 0;
    }
    ok &= memcmp(a_out, b_out, len) == 0 && memcmp(a_tag, b_tag, taglen) == 0;
    /* and back, in place or not */
    if (inplace) {
        memcpy(back, b_out, len);
        ok &=
            gcm_vaes_decrypt(key, keylen, iv, 12, aad, aadlen, back, back, len, b_tag, taglen) == 0;
    } else {
        ok &= gcm_vaes_decrypt(key, keylen, iv, 12, aad, aadlen, b_out, back, len, b_tag, taglen) ==
              0;
    }
    ok &= memcmp(back, in, len) == 0;
    return ok;
}

/* A changed bit anywhere must fail decryption and leave no plaintext. */
static void check_refusals(void)
{
    unsigned char key[16], iv[12], aad[13], in[1000], ct[1000], out[1000], tag[16];

    rnd(key, sizeof(key));
    rnd(iv, sizeof(iv));
    rnd(aad, sizeof(aad));
    rnd(in, sizeof(in));
    CHECK(gcm_vaes_encrypt(key, 16, iv, 12, aad, 13, in, ct, sizeof(ct), tag, 16) == 0);
    for (int what = 0; what < 4; what++) {
        for (int trial = 0; trial < 50; trial++) {
            unsigned char c2[1000], t2[16], a2[13], i2[12];
            memcpy(c2, ct, sizeof(c2));
            memcpy(t2, tag, sizeof(t2));
            memcpy(a2, aad, sizeof(a2));
            memcpy(i2, iv, sizeof(i2));
            unsigned bit = (unsigned)rand();
            if (what == 0)
                c2[bit % sizeof(c2)] ^= (unsigned char)(1u << (bit >> 16) % 8);
            else if (what == 1)
                t2[bit % 16] ^= (unsigned char)(1u << (bit >> 16) % 8);
            else if (what == 2)
                a2[bit % 13] ^= (unsigned char)(1u << (bit >> 16) % 8);
            else
                i2[bit % 12] ^= (unsigned char)(1u << (bit >> 16) % 8);
            memset(out, 0x55, sizeof(out));
            CHECK(gcm_vaes_decrypt(key, 16, i2, 12, a2, 13, c2, out, sizeof(out), t2, 16) == -2);
            unsigned char zero[1000] = {0};
            CHECK(memcmp(out, zero, sizeof(out)) == 0);
        }
    }
    /* arguments it does not take: the caller falls back */
    CHECK(gcm_vaes_encrypt(key, 24, iv, 12, aad, 13, in, ct, 16, tag, 16) == -1);
    CHECK(gcm_vaes_encrypt(key, 16, iv, 16, aad, 13, in, ct, 16, tag, 16) == -1);
    CHECK(gcm_vaes_encrypt(key, 16, iv, 12, aad, 13, in, ct, 16, tag, 17) == -1);
    CHECK(gcm_vaes_decrypt(key, 16, iv, 12, aad, 13, ct, out, 16, tag, 3) == -1);
}

/* GCM specification test cases 3 (AES-128, no AAD), 4 (AES-128, AAD,
 * 60 bytes) and 16 (AES-256, AAD, 60 bytes). */
static void check_vectors(void)
{
    static const struct {
        const char *key, *iv, *pt, *aad, *ct, *tag;
    } v[] = {
        {"feffe9928665731c6d6a8f9467308308", "cafebabefacedbaddecaf888",
         "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e24"
         "49a6b525b16aedf5aa0de657ba637b391aafd255",
         "",
         "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e21d514b25466931c7d8f6a5a"
         "ac84aa051ba30b396a0aac973d58e091473f5985",
         "4d5c2af327cd64a62cf35abd2ba6fab4"},
        {"feffe9928665731c6d6a8f9467308308", "cafebabefacedbaddecaf888",
         "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e24"
         "49a6b525b16aedf5aa0de657ba637b39",
         "feedfacedeadbeeffeedfacedeadbeefabaddad2",
         "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e21d514b25466931c7d8f6a5a"
         "ac84aa051ba30b396a0aac973d58e091",
         "5bc94fbc3221a5db94fae95ae7121a47"},
        {"feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
         "cafebabefacedbaddecaf888",
         "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e24"
         "49a6b525b16aedf5aa0de657ba637b39",
         "feedfacedeadbeeffeedfacedeadbeefabaddad2",
         "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b10"
         "56828838c5f61e6393ba7a0abcc9f662",
         "76fc6ece0f4e1768cddf8853bb2d551b"},
    };
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
        unsigned char key[32], iv[12], pt[64], aad[20], ct[64], tag[16], out[64], t[16];
        int klen = unhex(v[i].key, key), plen = unhex(v[i].pt, pt), alen = unhex(v[i].aad, aad);
        unhex(v[i].iv, iv);
        unhex(v[i].ct, ct);
        unhex(v[i].tag, tag);
        CHECK(gcm_vaes_encrypt(key, (size_t)klen, iv, 12, aad, (size_t)alen, pt, out, (size_t)plen,
                               t, 16) == 0);
        CHECK(memcmp(out, ct, (size_t)plen) == 0);
        CHECK(memcmp(t, tag, 16) == 0);
    }
}

static unsigned long long counter(void)
{
    return metric("smtpbridge_aes_gcm_vaes_records_total");
}

/* wolfSSL's AES-GCM API on an Aes with device id devid. */
static int api_gcm(int devid, int enc, const unsigned char *key, const unsigned char *iv,
                   word32 ivlen, const unsigned char *in, unsigned char *out, word32 len,
                   unsigned char *tag)
{
    Aes a;
    int rc;
    static const unsigned char aad[13] = {23, 3, 3, 0x40, 0x11};

    if (wc_AesInit(&a, NULL, devid) != 0)
        return -1;
    rc = wc_AesGcmSetKey(&a, key, 16);
    if (rc == 0 && enc)
        rc = wc_AesGcmEncrypt(&a, out, in, len, iv, ivlen, tag, 16, aad, sizeof(aad));
    else if (rc == 0)
        rc = wc_AesGcmDecrypt(&a, out, in, len, iv, ivlen, tag, 16, aad, sizeof(aad));
    wc_AesFree(&a);
    return rc;
}

static void check_device(void)
{
    static unsigned char in[16400], a[16400], b[16400], back[16400];
    unsigned char key[16], iv[16], ta[16], tb[16];
    char err[200];
    unsigned long long c0;

    rnd(key, sizeof(key));
    rnd(iv, sizeof(iv));
    rnd(in, sizeof(in));
    CHECK(aes_gcm_select(AES_GCM_AUTO, err, sizeof(err)) == 0);
    CHECK(strstr(aes_gcm_describe(), "VAES") != NULL);
    CHECK(cryptodev_ctx_devid(0) == CRYPTODEV_ID);
    c0 = counter();
    CHECK(api_gcm(INVALID_DEVID, 1, key, iv, 12, in, a, sizeof(in), ta) == 0);
    CHECK(counter() == c0);
    CHECK(api_gcm(CRYPTODEV_ID, 1, key, iv, 12, in, b, sizeof(in), tb) == 0);
    CHECK(counter() == c0 + 1);
    CHECK(memcmp(a, b, sizeof(a)) == 0 && memcmp(ta, tb, 16) == 0);
    CHECK(api_gcm(CRYPTODEV_ID, 0, key, iv, 12, b, back, sizeof(in), tb) == 0);
    CHECK(counter() == c0 + 2);
    CHECK(memcmp(back, in, sizeof(in)) == 0);
    tb[3] ^= 1;
    CHECK(api_gcm(CRYPTODEV_ID, 0, key, iv, 12, b, back, sizeof(in), tb) == AES_GCM_AUTH_E);
    CHECK(counter() == c0 + 3);
    /* a 16-byte IV: not ours, wolfSSL does it (and gets the same bytes) */
    CHECK(api_gcm(INVALID_DEVID, 1, key, iv, 16, in, a, 1000, ta) == 0);
    CHECK(api_gcm(CRYPTODEV_ID, 1, key, iv, 16, in, b, 1000, tb) == 0);
    CHECK(counter() == c0 + 3);
    CHECK(memcmp(a, b, 1000) == 0 && memcmp(ta, tb, 16) == 0);
    /* aes_gcm = wolfssl: the device declines, contexts get no device id */
    CHECK(aes_gcm_select(AES_GCM_WOLFSSL, err, sizeof(err)) == 0);
    CHECK(strstr(aes_gcm_describe(), "wolfssl") != NULL);
    CHECK(cryptodev_ctx_devid(0) == INVALID_DEVID);
    CHECK(api_gcm(CRYPTODEV_ID, 1, key, iv, 12, in, b, sizeof(in), tb) == 0);
    CHECK(counter() == c0 + 3);
}

int main(void)
{
    int mismatches = 0, runs = 0;

    srand(1234);
    if (!gcm_vaes_usable()) {
        printf("test_gcm_vaes: this CPU has no VAES/VPCLMULQDQ; the proxy uses wolfSSL's "
               "AES-GCM here, and nothing was checked\n");
        printf("0 passed, 0 failed\n");
        return 0;
    }
    CHECK(wolfCrypt_Init() == 0);
    check_vectors();
    check_refusals();
    check_device();
    static const size_t aads[] = {0, 5, 13, 16, 17, 40};
    for (size_t keylen = 16; keylen <= 32; keylen += 16) {
        for (size_t len = 0; len <= 300; len++, runs++)
            mismatches += !compare_one(keylen, len, aads[len % 6], 16, (int)(len & 1));
        for (int i = 0; i < 300; i++, runs++) {
            size_t len = (size_t)rand() % 17000;
            mismatches += !compare_one(keylen, len, aads[i % 6], 16 - (size_t)(i % 5), i & 1);
        }
        /* a full TLS record, and sizes past 2^16 (the counter's carry
         * between bytes) */
        mismatches += !compare_one(keylen, 16384, 5, 16, 1);
        mismatches += !compare_one(keylen, 16384 + 256, 13, 16, 0);
        mismatches += !compare_one(keylen, 69999, 13, 16, 0);
        runs += 3;
    }
    if (mismatches)
        fprintf(stderr, "test_gcm_vaes: %d of %d comparisons differ from wolfSSL\n", mismatches,
                runs);
    CHECK(mismatches == 0);
    printf("%d passed, %d failed (%d comparisons with wolfSSL)\n", n_passed, n_failed, runs);
    return n_failed != 0;
}
