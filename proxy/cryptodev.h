/*
 * cryptodev.h - the proxy's wolfSSL crypto device.
 *
 * wolfSSL (built with crypto callbacks) offers each operation on an object
 * whose device id names a registered "crypto device" to that device first,
 * and does the operation itself when the device answers
 * CRYPTOCB_UNAVAILABLE. The proxy registers one device and uses it for two
 * things, each chosen in [global]:
 *
 *   rsa_backend  RSA signatures by OpenSSL's libcrypto (rsa_backend.h), for
 *                contexts whose certificate key is RSA;
 *   aes_gcm      TLS record encryption and decryption with AES-GCM by
 *                gcm_vaes.c where the CPU has VAES and VPCLMULQDQ, for
 *                every context.
 *
 * Everything else offered to the device (hashes, ECC, RSA decryption and
 * public-key operations, other ciphers) goes back to wolfSSL.
 */
#ifndef SMTPBRIDGE_CRYPTODEV_H
#define SMTPBRIDGE_CRYPTODEV_H

#include <stddef.h>

#include "config.h"

/* Our device id: any value wolfSSL does not use itself ("SBrs"). */
#define CRYPTODEV_ID 0x53427273

/* Registers the device with wolfSSL (once; after tls_init()). Returns 0,
 * or -1 with err set. */
int cryptodev_register(char *err, size_t errlen);

/*
 * The device id for a TLS context built now: CRYPTODEV_ID when either use
 * applies to it (rsa_key: its certificate's key is RSA), else
 * INVALID_DEVID (-2), and wolfSSL does everything itself.
 */
int cryptodev_ctx_devid(int rsa_key);

/*
 * aes_gcm_select(want): whether AES-GCM records go to gcm_vaes.c from now
 * on (read at every record, so it applies to older contexts that have the
 * device id; contexts built while it was off stay with wolfSSL). Registers
 * the device if needed. Returns 0, or -1 with err set (then wolfSSL).
 */
int aes_gcm_select(enum aes_gcm want, char *err, size_t errlen);

/* A one-line description of the current AES-GCM choice, for the log. */
const char *aes_gcm_describe(void);

#endif
