/*
 * test_rsa_backend.c - proxy/rsa_backend.c against wolfSSL's own RSA.
 *
 * PKCS#1 v1.5 signatures are deterministic, so a signature that wolfSSL
 * makes through the crypto callback (libcrypto computing m^d mod n) must
 * equal, byte for byte, the one wolfSSL computes itself. Checked for more
 * keys than the held-key table has room for (evictions, and a key signed
 * again after its eviction), in a forked child (which must drop the
 * parent's table), and for the `auto` rule (RSA-2048 only, IFMA CPUs
 * only). The metrics counter says which path signed.
 * Build: see Makefile (build/unit/test_rsa_backend).
 */
#include "check.h"
#include "metric.h"
#include "metrics.h"
#include "rsa_backend.h"

#include <wolfssl/options.h>

#include <wolfssl/wolfcrypt/wc_port.h>
#include <wolfssl/wolfcrypt/random.h>
#include <wolfssl/wolfcrypt/rsa.h>

#include <openssl/evp.h>
#include <openssl/rsa.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define NKEYS 18 /* more than rsa_backend.c's HELD_MAX (16) */

static unsigned char *der[NKEYS];
static int derlen[NKEYS];
static WC_RNG rng;

static unsigned long long counter(void)
{
    return metric("smtpbridge_rsa_openssl_signatures_total");
}

/* wolfSSL's PKCS#1 v1.5 signature of a fixed block with key i, the key
 * decoded with device id devid. Returns its length, or -1. */
static int sign(int i, int devid, unsigned char *out, word32 outlen)
{
    static const unsigned char msg[32] = "smtpbridge rsa backend test msg";
    RsaKey key;
    word32 idx = 0;
    int n = -1;

    if (wc_InitRsaKey_ex(&key, NULL, devid) != 0)
        return -1;
    if (wc_RsaPrivateKeyDecode(der[i], &idx, &key, (word32)derlen[i]) == 0 &&
        wc_RsaSetRNG(&key, &rng) == 0)
        n = wc_RsaSSL_Sign(msg, sizeof(msg), out, outlen, &key, &rng);
    wc_FreeRsaKey(&key);
    return n;
}

/* Key i signed through the backend equals wolfSSL's own signature; returns
 * 1 if so, and whether libcrypto made it in *offloaded. */
static int same_signature(int i, int *offloaded)
{
    unsigned char a[512], b[512];
    unsigned long long before = counter();
    int na = sign(i, rsa_backend_devid(), a, sizeof(a));
    int nb;

    *offloaded = counter() == before + 1;
    nb = sign(i, INVALID_DEVID, b, sizeof(b));
    return na > 0 && na == nb && memcmp(a, b, (size_t)na) == 0;
}

int main(void)
{
    char err[200];
    int off, ok, all_ok = 1, all_off = 1;

    CHECK(wolfCrypt_Init() == 0);
    CHECK(wc_InitRng(&rng) == 0);
    for (int i = 0; i < NKEYS; i++) {
        /* key 0 is RSA-2048 (the `auto` size); the others 1024 bits, for speed */
        EVP_PKEY *pk = EVP_RSA_gen(i == 0 ? 2048 : 1024);
        der[i] = NULL;
        derlen[i] = pk ? i2d_PrivateKey(pk, &der[i]) : -1;
        CHECK(derlen[i] > 0);
        EVP_PKEY_free(pk);
    }

    /* openssl: every key size; more keys than the table holds, twice over */
    CHECK(rsa_backend_select(RSA_BACKEND_OPENSSL, err, sizeof(err)) == 0);
    CHECK(rsa_backend_devid() != INVALID_DEVID);
    for (int round = 0; round < 2; round++) {
        for (int i = 0; i < NKEYS; i++) {
            ok = same_signature(i, &off);
            all_ok &= ok;
            all_off &= off;
        }
    }
    CHECK(all_ok);
    CHECK(all_off);

    /* a forked child signs with its own copy, and correctly */
    pid_t pid = fork();
    if (pid == 0) {
        ok = same_signature(1, &off) && same_signature(0, &off);
        _exit(ok ? 0 : 1);
    }
    int status = -1;
    CHECK(pid > 0 && waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(same_signature(2, &off) && off); /* the parent still signs too */

    /* forget: the next signature loads the key again and is still right */
    rsa_backend_forget();
    CHECK(same_signature(3, &off) && off);

    /* wolfssl: nothing reaches libcrypto */
    CHECK(rsa_backend_select(RSA_BACKEND_WOLFSSL, err, sizeof(err)) == 0);
    CHECK(rsa_backend_devid() == INVALID_DEVID);
    CHECK(same_signature(0, &off) && !off);

    /* auto: RSA-2048 to libcrypto on IFMA CPUs; 1024 bits never */
    CHECK(rsa_backend_select(RSA_BACKEND_AUTO, err, sizeof(err)) == 0);
    if (rsa_backend_devid() != INVALID_DEVID) {
        CHECK(strstr(rsa_backend_describe(), "AVX-512 IFMA") != NULL);
        CHECK(same_signature(0, &off) && off);
        CHECK(same_signature(1, &off) && !off);
    } else {
        CHECK(strstr(rsa_backend_describe(), "no AVX-512 IFMA") != NULL);
        CHECK(same_signature(0, &off) && !off);
    }

    rsa_backend_forget();
    for (int i = 0; i < NKEYS; i++)
        OPENSSL_free(der[i]);
    wc_FreeRng(&rng);
    wolfCrypt_Cleanup();
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
