/*
 * rsa_backend.h - which library computes RSA private-key operations.
 *
 * A TLS handshake on a listener with an RSA certificate costs one RSA
 * private-key operation (the CertificateVerify / ServerKeyExchange
 * signature), more than half of the proxy's CPU for such a session.
 * wolfSSL 5.5.4's RSA has AVX2 assembly but nothing for AVX-512; OpenSSL
 * 3.0's libcrypto has an AVX-512 IFMA implementation of RSA-2048 that
 * signs in little more than half the time on CPUs that have it. On those
 * CPUs the proxy hands the modular exponentiation, and only that, to
 * libcrypto through wolfSSL's crypto callback interface; wolfSSL still
 * does the padding, the protocol and the check of every signature it
 * sends (see rsa_backend.c). The callback is the proxy's crypto device
 * (cryptodev.h), which also serves AES-GCM.
 *
 * [global] rsa_backend = auto | wolfssl | openssl (config.h):
 *   auto     OpenSSL for 2048-bit keys where the CPU has AVX-512 IFMA
 *            (and OpenSSL will therefore use it), wolfSSL otherwise;
 *   wolfssl  always wolfSSL;
 *   openssl  OpenSSL for every RSA key size, whatever the CPU.
 */
#ifndef SMTPBRIDGE_RSA_BACKEND_H
#define SMTPBRIDGE_RSA_BACKEND_H

#include <stddef.h>

#include "config.h"

/*
 * rsa_backend_select(want): the choice for contexts built from now on
 * (call it before building a configuration's TLS contexts). Whether a
 * context goes to libcrypto at all is fixed when it is built; the key-size
 * rule of `auto` is read at each signature, so it applies to older
 * contexts too (a failed reload must select the running configuration's
 * choice again). Registers the crypto callback with wolfSSL the first time
 * (after tls_init()). Returns 0, or -1 with err set when the callback
 * cannot be registered (the choice is then wolfSSL).
 */
int rsa_backend_select(enum rsa_backend want, char *err, size_t errlen);

/*
 * The wolfSSL device id to set on a context whose private key is RSA, or
 * INVALID_DEVID (-2) when wolfSSL computes RSA itself.
 */
int rsa_backend_devid(void);

/* The device's handler for RSA operations (cryptodev.c): the signature's
 * private-key operation by libcrypto when selected, CRYPTOCB_UNAVAILABLE
 * (wolfSSL does it) for everything else. */
struct wc_CryptoInfo;
int rsa_backend_op(const struct wc_CryptoInfo *info);

/* A one-line description of the current choice and why, for the log. */
const char *rsa_backend_describe(void);

/* Forgets the keys libcrypto holds (at reload: keys no longer configured
 * must not stay in memory; the next handshake loads the current ones). */
void rsa_backend_forget(void);

#endif
