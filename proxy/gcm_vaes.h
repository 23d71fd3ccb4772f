/*
 * gcm_vaes.h - AES-GCM with VAES and VPCLMULQDQ on 256-bit vectors.
 *
 * For bulk data the proxy's CPU is AES-GCM (about a third: one decryption
 * on the client leg, one encryption on the upstream leg) and loopback TCP.
 * wolfSSL 5.5.4's fastest AES-GCM uses AES-NI and PCLMULQDQ on 128-bit
 * registers, one block per instruction. CPUs with VAES and VPCLMULQDQ
 * (Intel Ice Lake and later, AMD Zen 3 and later) do the same work on two
 * blocks per instruction. This file is that second implementation: AES-128
 * and AES-256 in counter mode, 16 blocks per step, and GHASH on the same
 * 16 blocks with one reduction per step. The proxy hands wolfSSL's TLS record
 * encryption and decryption to it through the crypto device (cryptodev.c);
 * wolfSSL keeps everything else.
 *
 * The result must be, and is checked to be, byte for byte what wolfSSL's
 * own AES-GCM gives (tests/unit/test_gcm_vaes.c). AES rounds are the CPU's
 * instructions and GHASH is carry-less multiplication, so the time taken
 * does not depend on keys or data; the tag is compared in constant time.
 */
#ifndef SMTPBRIDGE_GCM_VAES_H
#define SMTPBRIDGE_GCM_VAES_H

#include <stddef.h>

/* 1 when this CPU (and the kernel's saved register state) has AVX2, AES-NI,
 * PCLMULQDQ, VAES and VPCLMULQDQ. */
int gcm_vaes_usable(void);

/*
 * AES-GCM with a 12-byte IV (the only kind TLS uses), keys of 16 or 32
 * bytes, tags of 4 to 16 bytes. in and out may be the same buffer.
 * Return 0, or -1 for arguments outside those (nothing is written; the
 * caller uses another implementation). gcm_vaes_decrypt() returns -2 when
 * the tag does not match, and then wipes out[0..len).
 */
int gcm_vaes_encrypt(const unsigned char *key, size_t keylen, const unsigned char *iv, size_t ivlen,
                     const unsigned char *aad, size_t aadlen, const unsigned char *in,
                     unsigned char *out, size_t len, unsigned char *tag, size_t taglen);
int gcm_vaes_decrypt(const unsigned char *key, size_t keylen, const unsigned char *iv, size_t ivlen,
                     const unsigned char *aad, size_t aadlen, const unsigned char *in,
                     unsigned char *out, size_t len, const unsigned char *tag, size_t taglen);

#endif
