/*
 * cryptodev.c - the proxy's wolfSSL crypto device (see cryptodev.h).
 *
 * AES-GCM: wolfSSL copies the raw key into the Aes object (devKey) when
 * its device id is set, and still prepares its own key schedule, so a
 * record we decline (a key size or IV length gcm_vaes.c does not take) is
 * encrypted by wolfSSL as before. gcm_vaes.c expands the key for each
 * record (see GCM_VAES_MIN) and keeps nothing key-derived outside wolfSSL's
 * objects once a record is done. A tag that does not match is
 * AES_GCM_AUTH_E, as from wolfSSL itself: the record is refused and the
 * TLS session ends with a bad_record_mac alert.
 */
#include "cryptodev.h"

#include "gcm_vaes.h"
#include "metrics.h"
#include "rsa_backend.h"

#include <stdio.h>

#include <wolfssl/options.h>

#include <wolfssl/wolfcrypt/settings.h>

#include <wolfssl/wolfcrypt/aes.h>
#include <wolfssl/wolfcrypt/cryptocb.h>
#include <wolfssl/wolfcrypt/error-crypt.h>

#ifndef WOLF_CRYPTO_CB
#error "wolfSSL must be built with crypto callbacks (--enable-cryptocb)"
#endif

/* Records shorter than this stay with wolfSSL: gcm_vaes.c expands the key
 * and the GHASH key powers for every record (about 100 ns), which wolfSSL
 * did once per session; the two take the same time at about 1 KiB
 * (measured on AMD EPYC with VAES: 16 KiB records 1.9 against 3.2 us, 100-byte
 * records 217 against 101 ns). */
#define GCM_VAES_MIN 1024

static int registered;
static int gcm_on;
static char gcm_why[160] = "AES-GCM by wolfSSL";

#ifdef HAVE_AESGCM
static int aes_gcm(wc_CryptoInfo *info)
{
    int rc;

    if (!gcm_on || info->cipher.type != WC_CIPHER_AES_GCM)
        return CRYPTOCB_UNAVAILABLE;
    /* the same place for both directions: aesgcm_enc and aesgcm_dec begin
     * alike (aes, out, in, sz) */
    if (info->cipher.aesgcm_enc.sz < GCM_VAES_MIN)
        return CRYPTOCB_UNAVAILABLE;
    if (info->cipher.enc) {
        Aes *aes = info->cipher.aesgcm_enc.aes;
        rc = gcm_vaes_encrypt((const unsigned char *)aes->devKey, (size_t)aes->keylen,
                              info->cipher.aesgcm_enc.iv, info->cipher.aesgcm_enc.ivSz,
                              info->cipher.aesgcm_enc.authIn, info->cipher.aesgcm_enc.authInSz,
                              info->cipher.aesgcm_enc.in, info->cipher.aesgcm_enc.out,
                              info->cipher.aesgcm_enc.sz, info->cipher.aesgcm_enc.authTag,
                              info->cipher.aesgcm_enc.authTagSz);
    } else {
        Aes *aes = info->cipher.aesgcm_dec.aes;
        rc = gcm_vaes_decrypt((const unsigned char *)aes->devKey, (size_t)aes->keylen,
                              info->cipher.aesgcm_dec.iv, info->cipher.aesgcm_dec.ivSz,
                              info->cipher.aesgcm_dec.authIn, info->cipher.aesgcm_dec.authInSz,
                              info->cipher.aesgcm_dec.in, info->cipher.aesgcm_dec.out,
                              info->cipher.aesgcm_dec.sz, info->cipher.aesgcm_dec.authTag,
                              info->cipher.aesgcm_dec.authTagSz);
    }
    if (rc == -1)
        return CRYPTOCB_UNAVAILABLE; /* not a kind we take: wolfSSL does it */
    metrics_aes_gcm_vaes();
    return rc == -2 ? AES_GCM_AUTH_E : 0;
}
#endif

static int device_cb(int dev, wc_CryptoInfo *info, void *ctx)
{
    (void)dev;
    (void)ctx;
    if (info->algo_type == WC_ALGO_TYPE_PK && info->pk.type == WC_PK_TYPE_RSA)
        return rsa_backend_op(info);
#ifdef HAVE_AESGCM
    if (info->algo_type == WC_ALGO_TYPE_CIPHER)
        return aes_gcm(info);
#endif
    return CRYPTOCB_UNAVAILABLE;
}

int cryptodev_register(char *err, size_t errlen)
{
    int rc;

    if (registered)
        return 0;
    rc = wc_CryptoCb_RegisterDevice(CRYPTODEV_ID, device_cb, NULL);
    if (rc != 0) {
        snprintf(err, errlen, "cannot register the crypto callback with wolfSSL (%d)", rc);
        return -1;
    }
    registered = 1;
    return 0;
}

int cryptodev_ctx_devid(int rsa_key)
{
    if (registered && (gcm_on || (rsa_key && rsa_backend_devid() != INVALID_DEVID)))
        return CRYPTODEV_ID;
    return INVALID_DEVID;
}

int aes_gcm_select(enum aes_gcm want, char *err, size_t errlen)
{
    int usable = gcm_vaes_usable();

    gcm_on = 0;
    if (want == AES_GCM_WOLFSSL) {
        snprintf(gcm_why, sizeof(gcm_why), "AES-GCM by wolfSSL (aes_gcm = wolfssl)");
        return 0;
    }
    if (!usable) {
        snprintf(gcm_why, sizeof(gcm_why),
                 "AES-GCM by wolfSSL (aes_gcm = auto: the CPU has no VAES/VPCLMULQDQ)");
        return 0;
    }
#ifndef HAVE_AESGCM
    snprintf(gcm_why, sizeof(gcm_why), "AES-GCM by wolfSSL (this wolfSSL has no AES-GCM)");
    return 0;
#else
    if (cryptodev_register(err, errlen) == -1) {
        snprintf(gcm_why, sizeof(gcm_why), "AES-GCM by wolfSSL");
        return -1;
    }
    gcm_on = 1;
    snprintf(gcm_why, sizeof(gcm_why),
             "AES-GCM by VAES/VPCLMULQDQ, two blocks per instruction (aes_gcm = auto: the CPU "
             "has them)");
    return 0;
#endif
}

const char *aes_gcm_describe(void)
{
    return gcm_why;
}
