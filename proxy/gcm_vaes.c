/*
 * gcm_vaes.c - AES-GCM on 256-bit vectors (see gcm_vaes.h for why).
 *
 * GCM (NIST SP 800-38D) with a 12-byte IV: the counter block is IV || ctr,
 * ctr a 32-bit big-endian number that starts at 1 (J0, which encrypts the
 * tag) and at 2 for the data; ciphertext = data XOR AES(K, counter blocks);
 * tag = AES(K, J0) XOR GHASH(H, AAD, ciphertext), H = AES(K, 0^128).
 *
 * GHASH representation. GCM numbers a block's bits from the first byte's
 * most significant bit as the coefficient of x^0. We load each block
 * byte-reversed into a 128-bit integer, so that bit i of the integer is
 * the coefficient of x^(127-i) (a bit-reversed polynomial). The carry-less
 * product of two such integers a, b is a 255-bit integer whose bit k is
 * the coefficient of x^(254-k) of a*b. The key is kept "twisted": H*x^-1,
 * which in this representation is H shifted left by one bit, with the bit
 * shifted out (the x^0 coefficient; x^-1 = x^127 + x^6 + x + 1 modulo
 * P = x^128 + x^7 + x^2 + x + 1) folded back in as GFPOLY. The product
 * with a twisted key then has bit k = coefficient of x^(255-k) of a*b:
 * the low 128 bits are the degree 128..255 part that the reduction folds
 * away, 64 bits at a time, and the result is the high 128 bits.
 *
 * Folding. A 64-bit piece at integer bits 0..63 stands for coefficients
 * x^255..x^192. Moving it up 128 bits divides by x^128; adding it also
 * multiplied by x^-121 + x^-126 + x^-127 (the 64-bit constant GFPOLY_HI,
 * bits 57, 62, 63, placed 64 bits up) makes the sum equal to the piece
 * times (x^-128 + x^-127 + x^-126 + x^-121), which is 1 modulo P because
 * x^128 = x^7 + x^2 + x + 1. Two such folds (bits 0..63, then 64..127)
 * leave the reduced product in bits 128..255.
 *
 * Aggregation: 16 blocks X1..X16 after state Y give
 * Y' = (Y ^ X1)*H^16 ^ X2*H^15 ^ ... ^ X16*H, so the 16 products are
 * summed unreduced and reduced once. Two blocks share a 256-bit register;
 * their key powers (twisted: H^i * x^-1) sit in the matching lanes.
 *
 * Speed (AMD EPYC with VAES, 16 KiB records, one core): AES-CTR alone
 * about 16 GB/s, GHASH alone about 11 GB/s, together about 8.5 GB/s
 * against wolfSSL 5.5.4's 5 GB/s: the two share the vector units, so they
 * add up. Hence 16 blocks per step (8 independent AES chains hide the
 * rounds' latency), Karatsuba products (3 carry-less multiplications per
 * block pair instead of 4), and one reduction per 16 blocks.
 */
#include "gcm_vaes.h"

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)

#include <cpuid.h>
#include <immintrin.h>

#define TGT __attribute__((target("avx2,aes,pclmul,vaes,vpclmulqdq")))

#define GFPOLY_HI 0xc200000000000000ULL

/* CPUID directly: clang 14's __builtin_cpu_supports knows no "vaes". Leaf 1
 * ECX: PCLMULQDQ (1), AES (25), OSXSAVE (27), AVX (28); leaf 7 EBX: AVX2
 * (5); leaf 7 ECX: VAES (9), VPCLMULQDQ (10); and the kernel must save the
 * YMM registers (XCR0 bits 1 and 2). */
int gcm_vaes_usable(void)
{
    unsigned a, b, c, d, lo, hi;
    const unsigned l1 = 1u << 1 | 1u << 25 | 1u << 27 | 1u << 28, l7 = 1u << 9 | 1u << 10;

    if (__get_cpuid_max(0, NULL) < 7 || !__get_cpuid(1, &a, &b, &c, &d) || (c & l1) != l1)
        return 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 6) != 6)
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b & (1u << 5)) != 0 && (c & l7) == l7;
}

/* Everything one call needs: round keys (also broadcast to both lanes),
 * the key powers H^1..H^16 (twisted) and the lane-paired powers. */
struct gcm_state {
    __m128i rk[15];
    __m256i rk2[15];
    __m128i h[17];    /* h[i] = H^i * x^-1, in the byte-reversed form */
    __m256i hpair[8]; /* (H^16, H^15), (H^14, H^13), ..., (H^2, H^1) */
    __m256i hkar[8];  /* for Karatsuba: each lane's two halves XORed, in both */
    int rounds;
};

TGT static inline __m128i bswap128(__m128i x)
{
    return _mm_shuffle_epi8(x, _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

TGT static inline __m256i bswap256(__m256i x)
{
    const __m256i m = _mm256_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2,
                                      3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm256_shuffle_epi8(x, m);
}

/* Reduce the unreduced product lo + mi*2^64 + hi*2^128 (see the top). */
TGT static inline __m128i ghash_reduce(__m128i lo, __m128i mi, __m128i hi)
{
    const __m128i poly = _mm_set_epi64x((long long)GFPOLY_HI, 1);
    __m128i t = _mm_clmulepi64_si128(lo, poly, 0x10);
    mi = _mm_xor_si128(mi, _mm_xor_si128(_mm_shuffle_epi32(lo, 0x4e), t));
    t = _mm_clmulepi64_si128(mi, poly, 0x10);
    return _mm_xor_si128(hi, _mm_xor_si128(_mm_shuffle_epi32(mi, 0x4e), t));
}

/* a * b, where b is a twisted key power; the result is not twisted. */
TGT static inline __m128i ghash_mul(__m128i a, __m128i b)
{
    __m128i lo = _mm_clmulepi64_si128(a, b, 0x00);
    __m128i hi = _mm_clmulepi64_si128(a, b, 0x11);
    __m128i mi = _mm_xor_si128(_mm_clmulepi64_si128(a, b, 0x01), _mm_clmulepi64_si128(a, b, 0x10));
    return ghash_reduce(lo, mi, hi);
}

/*
 * Y' for 2n ciphertext blocks in c[0..n) (memory order, two per register),
 * state y, with the key powers H^2n..H^1 in keys[0..n) (kar: their
 * Karatsuba halves). Each product takes three carry-less multiplications
 * (low halves, high halves, and the XORed halves, from which the middle
 * term follows once for the sum). The products of blocks 2..2n do not
 * depend on y and are summed first; y enters through block 1's product
 * alone, so the chain from one step's y to the next is one multiplication,
 * a few additions and the reduction.
 */
TGT static inline __m128i ghashn(__m128i y, const __m256i *c, const __m256i *keys,
                                 const __m256i *kar, int n)
{
    __m256i x, lo = _mm256_setzero_si256(), hi = lo, md = lo;
    __m128i l, h, m;

#pragma GCC unroll 8
    for (int i = n - 1; i >= 0; i--) {
        x = bswap256(c[i]);
        if (i == 0)
            x = _mm256_xor_si256(x, _mm256_set_m128i(_mm_setzero_si128(), y));
        lo = _mm256_xor_si256(lo, _mm256_clmulepi64_epi128(x, keys[i], 0x00));
        hi = _mm256_xor_si256(hi, _mm256_clmulepi64_epi128(x, keys[i], 0x11));
        x = _mm256_xor_si256(x, _mm256_shuffle_epi32(x, 0x4e));
        md = _mm256_xor_si256(md, _mm256_clmulepi64_epi128(x, kar[i], 0x00));
    }
    l = _mm_xor_si128(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1));
    h = _mm_xor_si128(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
    m = _mm_xor_si128(_mm256_castsi256_si128(md), _mm256_extracti128_si256(md, 1));
    return ghash_reduce(l, _mm_xor_si128(m, _mm_xor_si128(l, h)), h);
}

/* One block of GHASH: 16 bytes of data as they are in memory. */
TGT static inline __m128i ghash1(const struct gcm_state *s, __m128i y, __m128i block)
{
    return ghash_mul(_mm_xor_si128(y, bswap128(block)), s->h[1]);
}

/* GHASH of len bytes, zero-padded to whole blocks. */
TGT static __m128i ghash_bytes(const struct gcm_state *s, __m128i y, const unsigned char *p,
                               size_t len)
{
    for (; len >= 16; p += 16, len -= 16)
        y = ghash1(s, y, _mm_loadu_si128((const __m128i *)p));
    if (len > 0) {
        unsigned char b[16] = {0};
        memcpy(b, p, len);
        y = ghash1(s, y, _mm_loadu_si128((const __m128i *)b));
    }
    return y;
}

TGT static inline __m128i aes1(const struct gcm_state *s, __m128i x)
{
    x = _mm_xor_si128(x, s->rk[0]);
    for (int r = 1; r < s->rounds; r++)
        x = _mm_aesenc_si128(x, s->rk[r]);
    return _mm_aesenclast_si128(x, s->rk[s->rounds]);
}

/* Expansion steps of FIPS-197 with AESKEYGENASSIST; t is its result. */
TGT static inline __m128i expand_step(__m128i k, __m128i t)
{
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    return _mm_xor_si128(k, t);
}

#define EXP128(i, rcon)                                                                            \
    s->rk[i] = expand_step(s->rk[i - 1],                                                           \
                           _mm_shuffle_epi32(_mm_aeskeygenassist_si128(s->rk[i - 1], rcon), 0xff))
#define EXP256A(i, rcon)                                                                           \
    s->rk[i] = expand_step(s->rk[i - 2],                                                           \
                           _mm_shuffle_epi32(_mm_aeskeygenassist_si128(s->rk[i - 1], rcon), 0xff))
#define EXP256B(i)                                                                                 \
    s->rk[i] = expand_step(s->rk[i - 2],                                                           \
                           _mm_shuffle_epi32(_mm_aeskeygenassist_si128(s->rk[i - 1], 0), 0xaa))

TGT static void expand_key(struct gcm_state *s, const unsigned char *key, size_t keylen)
{
    s->rk[0] = _mm_loadu_si128((const __m128i *)key);
    if (keylen == 16) {
        s->rounds = 10;
        EXP128(1, 0x01);
        EXP128(2, 0x02);
        EXP128(3, 0x04);
        EXP128(4, 0x08);
        EXP128(5, 0x10);
        EXP128(6, 0x20);
        EXP128(7, 0x40);
        EXP128(8, 0x80);
        EXP128(9, 0x1b);
        EXP128(10, 0x36);
    } else {
        s->rounds = 14;
        s->rk[1] = _mm_loadu_si128((const __m128i *)(key + 16));
        EXP256A(2, 0x01);
        EXP256B(3);
        EXP256A(4, 0x02);
        EXP256B(5);
        EXP256A(6, 0x04);
        EXP256B(7);
        EXP256A(8, 0x08);
        EXP256B(9);
        EXP256A(10, 0x10);
        EXP256B(11);
        EXP256A(12, 0x20);
        EXP256B(13);
        EXP256A(14, 0x40);
    }
    for (int r = 0; r <= s->rounds; r++)
        s->rk2[r] = _mm256_broadcastsi128_si256(s->rk[r]);
}

/* H = AES(K, 0), twisted, and its powers up to `powers` (1, 8 or 16). */
TGT static void hash_key(struct gcm_state *s, int powers)
{
    __m128i h = bswap128(aes1(s, _mm_setzero_si128()));
    uint64_t lo = (uint64_t)_mm_cvtsi128_si64(h), hi = (uint64_t)_mm_extract_epi64(h, 1);
    uint64_t carry = 0 - (hi >> 63); /* all ones when the x^0 bit shifts out */

    hi = (hi << 1) | (lo >> 63);
    lo = (lo << 1) ^ (carry & 1);
    hi ^= carry & GFPOLY_HI;
    s->h[1] = _mm_set_epi64x((long long)hi, (long long)lo);
    /* Twisted powers multiply like the powers: ghash_mul(H^i x^-1,
     * H^j x^-1) = H^(i+j) x^-1. Doubling the span each round keeps the
     * multiplications of a round independent of each other. */
    for (int have = 1; have < powers; have *= 2)
        for (int j = 1; j <= have && have + j <= powers; j++)
            s->h[have + j] = ghash_mul(s->h[have], s->h[j]);
    for (int i = 0; 2 * i + 2 <= powers; i++) {
        __m256i p = _mm256_set_m128i(s->h[powers - 2 * i - 1], s->h[powers - 2 * i]);
        s->hpair[8 - powers / 2 + i] = p;
        s->hkar[8 - powers / 2 + i] = _mm256_xor_si256(p, _mm256_shuffle_epi32(p, 0x4e));
    }
}

/* Encrypts 2n counter blocks in k[0..n) (n independent chains, so that
 * the AES units are kept busy despite each round's latency). */
TGT static inline void aesn(const struct gcm_state *s, __m256i *k, int n)
{
#pragma GCC unroll 8
    for (int j = 0; j < n; j++)
        k[j] = _mm256_xor_si256(bswap256(k[j]), s->rk2[0]);
    for (int r = 1; r < s->rounds; r++) {
        const __m256i rk = s->rk2[r];
#pragma GCC unroll 8
        for (int j = 0; j < n; j++)
            k[j] = _mm256_aesenc_epi128(k[j], rk);
    }
#pragma GCC unroll 8
    for (int j = 0; j < n; j++)
        k[j] = _mm256_aesenclast_epi128(k[j], s->rk2[s->rounds]);
}

/*
 * 2n blocks (32n bytes) of counter mode and GHASH. The counters are kept
 * byte-reversed, so the 32-bit counter is the low element of each lane and
 * a plain add steps it; *base holds the next two. GHASH reads the
 * ciphertext: when decrypting, it reads the input before anything is
 * stored (so in == out works), and the input is read again for the XOR
 * rather than held in registers through the AES rounds.
 */
TGT static inline __m128i step(const struct gcm_state *s, int enc, __m256i *base, __m128i y,
                               const unsigned char *in, unsigned char *out, int n)
{
    const __m256i two = _mm256_set_epi32(0, 0, 0, 2, 0, 0, 0, 2);
    __m256i k[8];

    if (!enc) {
#pragma GCC unroll 8
        for (int j = 0; j < n; j++)
            k[j] = _mm256_loadu_si256((const __m256i *)(in + 32 * j));
        y = ghashn(y, k, s->hpair + 8 - n, s->hkar + 8 - n, n);
    }
#pragma GCC unroll 8
    for (int j = 0; j < n; j++) {
        k[j] = *base;
        *base = _mm256_add_epi32(*base, two);
    }
    aesn(s, k, n);
#pragma GCC unroll 8
    for (int j = 0; j < n; j++) {
        k[j] = _mm256_xor_si256(k[j], _mm256_loadu_si256((const __m256i *)(in + 32 * j)));
        _mm256_storeu_si256((__m256i *)(out + 32 * j), k[j]);
    }
    if (enc)
        y = ghashn(y, k, s->hpair + 8 - n, s->hkar + 8 - n, n);
    return y;
}

/* The whole operation; enc selects which of in/out is the ciphertext that
 * GHASH reads. Writes the full 16-byte tag to tag16. */
TGT static void gcm(struct gcm_state *s, int enc, const unsigned char *iv, const unsigned char *aad,
                    size_t aadlen, const unsigned char *in, unsigned char *out, size_t len,
                    unsigned char *tag16)
{
    unsigned char j0[16];
    __m128i y = _mm_setzero_si128(), ctr, t;
    size_t i = 0;

    hash_key(s, len >= 256 ? 16 : len >= 128 ? 8 : 1);
    memcpy(j0, iv, 12);
    j0[12] = j0[13] = j0[14] = 0;
    j0[15] = 1;
    ctr = bswap128(_mm_loadu_si128((const __m128i *)j0)); /* byte-reversed J0 */
    y = ghash_bytes(s, y, aad, aadlen);

    if (len >= 128) {
        /* lanes: counters 2 and 3 (J0 + 1, J0 + 2) */
        __m256i base =
            _mm256_add_epi32(_mm256_set_m128i(ctr, ctr), _mm256_set_epi32(0, 0, 0, 2, 0, 0, 0, 1));
        for (; i + 256 <= len; i += 256)
            y = step(s, enc, &base, y, in + i, out + i, 8);
        if (i + 128 <= len) {
            y = step(s, enc, &base, y, in + i, out + i, 4);
            i += 128;
        }
        ctr = _mm256_castsi256_si128(base); /* the next counter, byte-reversed */
        ctr = _mm_sub_epi32(ctr, _mm_set_epi32(0, 0, 0, 1));
    }
    /* Blocks past the last 128 bytes, one at a time; ctr is the counter
     * before the next one. */
    for (; i < len; i += 16) {
        size_t n = len - i < 16 ? len - i : 16;
        unsigned char b[16] = {0}, c[16] = {0};
        __m128i ks, d;

        ctr = _mm_add_epi32(ctr, _mm_set_epi32(0, 0, 0, 1));
        ks = aes1(s, bswap128(ctr));
        memcpy(b, in + i, n);
        d = _mm_loadu_si128((const __m128i *)b);
        _mm_storeu_si128((__m128i *)c, _mm_xor_si128(d, ks));
        memcpy(out + i, c, n);
        if (enc) {
            memset(c + n, 0, 16 - n); /* the padding is zeros, not key stream */
            y = ghash1(s, y, _mm_loadu_si128((const __m128i *)c));
        } else {
            y = ghash1(s, y, d);
        }
        explicit_bzero(b, sizeof(b));
        explicit_bzero(c, sizeof(c));
    }
    /* The length block: 64-bit big-endian bit counts of AAD and data; in
     * the byte-reversed form the data's count is the low half. */
    y = ghash_mul(_mm_xor_si128(y, _mm_set_epi64x((long long)((uint64_t)aadlen * 8),
                                                  (long long)((uint64_t)len * 8))),
                  s->h[1]);
    t = _mm_xor_si128(bswap128(y), aes1(s, _mm_loadu_si128((const __m128i *)j0)));
    _mm_storeu_si128((__m128i *)tag16, t);
}

static int args_ok(size_t keylen, size_t ivlen, size_t taglen)
{
    return (keylen == 16 || keylen == 32) && ivlen == 12 && taglen >= 4 && taglen <= 16;
}

TGT int gcm_vaes_encrypt(const unsigned char *key, size_t keylen, const unsigned char *iv,
                         size_t ivlen, const unsigned char *aad, size_t aadlen,
                         const unsigned char *in, unsigned char *out, size_t len,
                         unsigned char *tag, size_t taglen)
{
    struct gcm_state s;
    unsigned char full[16];

    if (!args_ok(keylen, ivlen, taglen))
        return -1;
    expand_key(&s, key, keylen);
    gcm(&s, 1, iv, aad, aadlen, in, out, len, full);
    memcpy(tag, full, taglen);
    explicit_bzero(&s, sizeof(s));
    return 0;
}

TGT int gcm_vaes_decrypt(const unsigned char *key, size_t keylen, const unsigned char *iv,
                         size_t ivlen, const unsigned char *aad, size_t aadlen,
                         const unsigned char *in, unsigned char *out, size_t len,
                         const unsigned char *tag, size_t taglen)
{
    struct gcm_state s;
    unsigned char full[16];
    unsigned diff = 0;

    if (!args_ok(keylen, ivlen, taglen))
        return -1;
    expand_key(&s, key, keylen);
    gcm(&s, 0, iv, aad, aadlen, in, out, len, full);
    explicit_bzero(&s, sizeof(s));
    for (size_t k = 0; k < taglen; k++) /* constant time: no early exit */
        diff |= (unsigned)(full[k] ^ tag[k]);
    if (diff != 0) {
        explicit_bzero(out, len);
        return -2;
    }
    return 0;
}

#else /* not x86-64: never usable, callers use wolfSSL's AES-GCM */

int gcm_vaes_usable(void)
{
    return 0;
}

int gcm_vaes_encrypt(const unsigned char *key, size_t keylen, const unsigned char *iv, size_t ivlen,
                     const unsigned char *aad, size_t aadlen, const unsigned char *in,
                     unsigned char *out, size_t len, unsigned char *tag, size_t taglen)
{
    (void)key, (void)keylen, (void)iv, (void)ivlen, (void)aad, (void)aadlen;
    (void)in, (void)out, (void)len, (void)tag, (void)taglen;
    return -1;
}

int gcm_vaes_decrypt(const unsigned char *key, size_t keylen, const unsigned char *iv, size_t ivlen,
                     const unsigned char *aad, size_t aadlen, const unsigned char *in,
                     unsigned char *out, size_t len, const unsigned char *tag, size_t taglen)
{
    (void)key, (void)keylen, (void)iv, (void)ivlen, (void)aad, (void)aadlen;
    (void)in, (void)out, (void)len, (void)tag, (void)taglen;
    return -1;
}

#endif
