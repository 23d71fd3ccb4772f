/*
 * rsa_backend.c - RSA private-key operations by OpenSSL's libcrypto (see
 * rsa_backend.h for why).
 *
 * How: wolfSSL calls a registered "crypto device" (WOLF_CRYPTO_CB) for
 * every operation on a key whose devId names it, and falls back to its own
 * code when the device answers CRYPTOCB_UNAVAILABLE. Our device takes only
 * the raw private-key operation of a signature (m^d mod n, wc_RsaFunction's
 * RSA_PRIVATE_ENCRYPT on an already padded block) and answers UNAVAILABLE
 * for everything else, so wolfSSL keeps the PSS and PKCS#1 padding, the
 * public-key operations, RSA decryption (the static-RSA key exchange of
 * legacy listeners, with its checks of the ciphertext's range and its
 * constant-time unpadding), and its check of each
 * signature against the certificate's key before sending it (tls13.c and
 * internal.c verify what they signed: a wrong result from here fails the
 * handshake instead of leaking a faulty signature).
 *
 * Keys: wolfSSL decodes the private key afresh for every handshake. The
 * first operation with a modulus seen for the first time in this process
 * exports that key to PKCS#1 DER (wc_RsaKeyToDer), which libcrypto parses;
 * the result is kept, keyed by the modulus, in a small table (HELD_MAX,
 * least recently used out). The DER copy is wiped at once; libcrypto wipes
 * its copy when the key is freed. libcrypto blinds every operation and
 * checks the CRT result with the public exponent.
 *
 * Processes: the table is per process. Workers are forked from a master
 * that has already used the keys (every context's self-test handshake), so
 * a process that finds the table filled by another pid drops it first: a
 * worker must not reuse the master's blinding state.
 *
 * If libcrypto fails an operation, the device answers UNAVAILABLE and
 * wolfSSL does it instead; the failure is logged (once a minute at most).
 */
#include "rsa_backend.h"

#include "cryptodev.h"
#include "log.h"
#include "metrics.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <wolfssl/options.h>

#include <wolfssl/wolfcrypt/settings.h>

#include <wolfssl/wolfcrypt/asn_public.h>
#include <wolfssl/wolfcrypt/cryptocb.h>
#include <wolfssl/wolfcrypt/error-crypt.h>
#include <wolfssl/wolfcrypt/rsa.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#ifndef WOLF_CRYPTO_CB
#error "wolfSSL must be built with crypto callbacks (--enable-cryptocb)"
#endif

/* Keys held at once: a listener's certificates plus a reload's worth. */
#define HELD_MAX 16

/* Largest modulus handed to libcrypto (8192 bits) and the DER of such a
 * private key (9 integers with headers, rounded up). */
#define N_MAX   1024
#define DER_MAX (N_MAX * 5)

struct held_key {
    unsigned char n[N_MAX];
    word32 nlen;        /* 0: slot free */
    EVP_PKEY_CTX *sign; /* a signing context with no padding; owns the key */
    unsigned long long used;
};

static struct held_key held[HELD_MAX];
static pid_t held_pid;
static unsigned long long use_clock;

static int use_openssl;
static int only_2048; /* auto: keys of other sizes stay with wolfSSL */
static char why[256] = "RSA private-key operations by wolfSSL";
static time_t last_error_log;

static void held_clear(struct held_key *h)
{
    EVP_PKEY_CTX_free(h->sign);
    memset(h, 0, sizeof(*h));
}

void rsa_backend_forget(void)
{
    for (size_t i = 0; i < HELD_MAX; i++)
        if (held[i].nlen != 0)
            held_clear(&held[i]);
}

static void log_failure(const char *what)
{
    char buf[256], q[300];
    unsigned long e = ERR_get_error();
    time_t now = time(NULL);

    ERR_error_string_n(e, buf, sizeof(buf));
    ERR_clear_error();
    if (now - last_error_log < 60)
        return;
    last_error_log = now;
    log_quote(q, sizeof(q), buf, strlen(buf));
    log_msg(LOG_LVL_WARNING, 0,
            "event=rsa_backend_error step=%s error=%s msg=\"OpenSSL failed; wolfSSL does this "
            "RSA operation instead\"",
            what, q);
}

/* The held key for `key` (its modulus n[0..nlen)), loaded on first use. */
static struct held_key *held_get(RsaKey *key, const unsigned char *n, word32 nlen)
{
    struct held_key *h, *victim = &held[0];
    unsigned char der[DER_MAX];
    const unsigned char *p = der;
    EVP_PKEY *pkey;
    OSSL_PARAM params[2];
    int len;

    if (held_pid != getpid()) {
        /* A fork: what the parent loaded is a copy of its state. */
        rsa_backend_forget();
        held_pid = getpid();
    }
    for (size_t i = 0; i < HELD_MAX; i++) {
        h = &held[i];
        if (h->nlen == nlen && memcmp(h->n, n, nlen) == 0) {
            h->used = ++use_clock;
            return h;
        }
        if (h->nlen == 0 || (victim->nlen != 0 && h->used < victim->used))
            victim = h;
    }

    len = wc_RsaKeyToDer(key, der, sizeof(der));
    if (len <= 0)
        return NULL; /* not a complete private key, or too large */
    pkey = d2i_PrivateKey(EVP_PKEY_RSA, NULL, &p, len);
    OPENSSL_cleanse(der, sizeof(der));
    if (pkey == NULL) {
        log_failure("load_key");
        return NULL;
    }
    h = victim;
    if (h->nlen != 0)
        held_clear(h);
    h->sign = EVP_PKEY_CTX_new_from_pkey(NULL, pkey, NULL);
    EVP_PKEY_free(pkey); /* the context holds its own reference */
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE,
                                                 (char *)OSSL_PKEY_RSA_PAD_MODE_NONE, 0);
    params[1] = OSSL_PARAM_construct_end();
    if (h->sign == NULL || EVP_PKEY_sign_init(h->sign) <= 0 ||
        EVP_PKEY_CTX_set_params(h->sign, params) <= 0) {
        log_failure("init_key");
        held_clear(h);
        return NULL;
    }
    memcpy(h->n, n, nlen);
    h->nlen = nlen;
    h->used = ++use_clock;
    log_msg(LOG_LVL_DEBUG, 0, "event=rsa_backend_key bits=%u backend=openssl", nlen * 8);
    return h;
}

int rsa_backend_op(const wc_CryptoInfo *info)
{
    RsaKey *key = info->pk.rsa.key;
    unsigned char e[16], n[N_MAX];
    word32 elen = sizeof(e), nlen = sizeof(n);
    size_t outlen;
    struct held_key *h;

    if (!use_openssl || info->pk.rsa.type != RSA_PRIVATE_ENCRYPT)
        return CRYPTOCB_UNAVAILABLE; /* signatures only (see the top) */
    if (key == NULL || key->type != RSA_PRIVATE ||
        wc_RsaFlattenPublicKey(key, e, &elen, n, &nlen) != 0)
        return CRYPTOCB_UNAVAILABLE;
    if (only_2048 && nlen != 256)
        return CRYPTOCB_UNAVAILABLE;
    /* The raw operation works on exactly one block of the modulus' size. */
    if (info->pk.rsa.inLen != nlen || info->pk.rsa.outLen == NULL || *info->pk.rsa.outLen < nlen)
        return CRYPTOCB_UNAVAILABLE;
    h = held_get(key, n, nlen);
    if (h == NULL)
        return CRYPTOCB_UNAVAILABLE;
    outlen = *info->pk.rsa.outLen;
    if (EVP_PKEY_sign(h->sign, info->pk.rsa.out, &outlen, info->pk.rsa.in, nlen) <= 0 ||
        outlen != nlen) {
        log_failure("sign");
        return CRYPTOCB_UNAVAILABLE;
    }
    *info->pk.rsa.outLen = (word32)outlen;
    metrics_rsa_openssl();
    return 0;
}

/* What OpenSSL 3.0 requires of the CPU before it uses its AVX-512 IFMA
 * RSA code (crypto/bn/rsaz_exp_x2.c, ossl_rsaz_avx512ifma_eligible: CPUID
 * leaf 7 AVX512F, AVX512IFMA and AVX512VL; 2048-bit keys only, as two
 * 1024-bit CRT halves). __builtin_cpu_supports also asks the kernel
 * whether it saves AVX-512 state (XCR0), as OpenSSL does. */
static int cpu_has_ifma(void)
{
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512ifma") &&
           __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

/* OPENSSL_ia32cap, OpenSSL's mask of CPU features, is most often set to
 * keep it off AVX-512 (clock throttling on some Intel parts), and that
 * also turns its IFMA RSA code off: libcrypto would then sign at half
 * speed. Its syntax differs between OpenSSL versions (3.0: two words,
 * newer: five), so auto does not parse it: any value keeps RSA with
 * wolfSSL, and rsa_backend = openssl still forces libcrypto. */
static int ia32cap_set(void)
{
    const char *v = getenv("OPENSSL_ia32cap");
    return v && *v;
}

int rsa_backend_select(enum rsa_backend want, char *err, size_t errlen)
{
    int use = 0, ifma = want == RSA_BACKEND_AUTO && cpu_has_ifma();

    if (ifma && ia32cap_set()) {
        snprintf(why, sizeof(why),
                 "RSA private-key operations by wolfSSL (rsa_backend = auto: OPENSSL_ia32cap is "
                 "set and may turn OpenSSL's AVX-512 IFMA code off; rsa_backend = openssl uses "
                 "libcrypto anyway)");
    } else if (want == RSA_BACKEND_OPENSSL) {
        use = 1;
        only_2048 = 0;
        snprintf(why, sizeof(why),
                 "RSA private-key operations by %s (rsa_backend = openssl, every key size)",
                 OpenSSL_version(OPENSSL_VERSION));
    } else if (ifma) {
        use = 1;
        only_2048 = 1;
        snprintf(why, sizeof(why),
                 "RSA-2048 private-key operations by %s (rsa_backend = auto: the CPU has "
                 "AVX-512 IFMA); other key sizes by wolfSSL",
                 OpenSSL_version(OPENSSL_VERSION));
    } else {
        snprintf(why, sizeof(why), "RSA private-key operations by wolfSSL (rsa_backend = %s%s)",
                 want == RSA_BACKEND_WOLFSSL ? "wolfssl" : "auto",
                 want == RSA_BACKEND_WOLFSSL ? "" : ": the CPU has no AVX-512 IFMA");
    }
    if (use && cryptodev_register(err, errlen) == -1) {
        snprintf(why, sizeof(why), "RSA private-key operations by wolfSSL");
        use_openssl = 0;
        return -1;
    }
    use_openssl = use;
    return 0;
}

int rsa_backend_devid(void)
{
    return use_openssl ? CRYPTODEV_ID : INVALID_DEVID;
}

const char *rsa_backend_describe(void)
{
    return why;
}
