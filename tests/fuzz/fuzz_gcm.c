/*
 * fuzz_gcm.c - libFuzzer target: proxy/gcm_vaes.c against wolfSSL's
 * AES-GCM (differential). The input chooses the key size, in-place or
 * not, the tag length, the key, the IV, the AAD and the data; the two
 * implementations must give the same ciphertext and tag, decryption must
 * give the data back, and a bit changed where the input says must be
 * refused with the output wiped. Buffers are exact-size heap copies, so
 * ASan sees any read or write past them. On a CPU without VAES nothing
 * runs (the proxy never calls the code there). Violations abort().
 *
 * clang -g -O1 -fsanitize=fuzzer,address,undefined -Iproxy -Ibuild/wolfssl/include \
 *       tests/fuzz/fuzz_gcm.c proxy/gcm_vaes.c build/wolfssl/lib/libwolfssl.a -lm \
 *       -lpthread -o build/fuzz/fuzz_gcm
 */
#include "gcm_vaes.h"

#include <wolfssl/options.h>

#include <wolfssl/wolfcrypt/aes.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRE(cond)                                                                              \
    do {                                                                                           \
        if (!(cond))                                                                               \
            abort();                                                                               \
    } while (0)

/* header: flags, tag length, flip position (2), AAD length, key (32), IV (12) */
#define HDR (1 + 1 + 2 + 1 + 32 + 12)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int usable = -1;
    size_t keylen, taglen, aadlen, len, flip;
    const uint8_t *key, *iv;
    uint8_t *aad, *in, *a, *b, *back, ta[16], tb[16];
    int inplace;
    Aes w;

    if (usable < 0)
        usable = gcm_vaes_usable();
    if (!usable || size < HDR)
        return 0;
    keylen = (data[0] & 1) ? 32 : 16;
    inplace = (data[0] & 2) != 0;
    taglen = 12 + data[1] % 5; /* wolfSSL's minimum is 12 */
    flip = (size_t)data[2] << 8 | data[3];
    aadlen = data[4];
    key = data + 5;
    iv = key + 32;
    data += HDR;
    size -= HDR;
    if (aadlen > size)
        aadlen = size;
    len = size - aadlen;

    aad = malloc(aadlen ? aadlen : 1);
    in = malloc(len ? len : 1);
    a = malloc(len ? len : 1);
    b = malloc(len ? len : 1);
    back = malloc(len ? len : 1);
    REQUIRE(aad && in && a && b && back);
    memcpy(aad, data, aadlen);
    memcpy(in, data + aadlen, len);

    REQUIRE(wc_AesInit(&w, NULL, INVALID_DEVID) == 0);
    REQUIRE(wc_AesGcmSetKey(&w, key, (word32)keylen) == 0);
    REQUIRE(wc_AesGcmEncrypt(&w, a, in, (word32)len, iv, 12, ta, (word32)taglen, aad,
                             (word32)aadlen) == 0);
    wc_AesFree(&w);

    if (inplace) {
        memcpy(b, in, len);
        REQUIRE(gcm_vaes_encrypt(key, keylen, iv, 12, aad, aadlen, b, b, len, tb, taglen) == 0);
    } else {
        REQUIRE(gcm_vaes_encrypt(key, keylen, iv, 12, aad, aadlen, in, b, len, tb, taglen) == 0);
    }
    REQUIRE(memcmp(a, b, len) == 0 && memcmp(ta, tb, taglen) == 0);

    if (inplace) {
        memcpy(back, b, len);
        REQUIRE(gcm_vaes_decrypt(key, keylen, iv, 12, aad, aadlen, back, back, len, tb, taglen) ==
                0);
    } else {
        REQUIRE(gcm_vaes_decrypt(key, keylen, iv, 12, aad, aadlen, b, back, len, tb, taglen) == 0);
    }
    REQUIRE(memcmp(back, in, len) == 0);

    /* one bit changed in the ciphertext, AAD or tag: refused, out wiped */
    {
        size_t span = len + aadlen + taglen, pos = flip % span;
        uint8_t bit = (uint8_t)(1u << (flip >> 13));
        if (pos < len)
            b[pos] ^= bit;
        else if (pos < len + aadlen)
            aad[pos - len] ^= bit;
        else
            tb[pos - len - aadlen] ^= bit;
        REQUIRE(gcm_vaes_decrypt(key, keylen, iv, 12, aad, aadlen, b, back, len, tb, taglen) == -2);
        for (size_t i = 0; i < len; i++)
            REQUIRE(back[i] == 0);
    }
    free(aad);
    free(in);
    free(a);
    free(b);
    free(back);
    return 0;
}
