/*
 * tls.c - wolfSSL contexts (see tls.h).
 */
#include "tls.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <wolfssl/error-ssl.h>
#include <wolfssl/wolfcrypt/error-crypt.h>

/* TLS 1.3 suites, then TLS 1.2 AEAD suites with forward secrecy. */
#define CIPHERS_MODERN                                                                             \
    "TLS13-AES128-GCM-SHA256:TLS13-AES256-GCM-SHA384:TLS13-CHACHA20-POLY1305-SHA256:"              \
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"                                   \
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"                                   \
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
/* What old printers and scanners speak (TLS 1.0/1.1 have no AEAD suites). */
#define CIPHERS_LEGACY                                                                             \
    CIPHERS_MODERN ":ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:"          \
                   "ECDHE-RSA-AES256-SHA:AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA:"          \
                   "AES256-SHA"

/* OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH; wolfSSL has no name for it. */
#define VERIFY_ERR_NAME_MISMATCH 62

/* Set by verify_cb when it refuses the leaf's names, read by
 * tls_describe_error() right after the failed handshake step returns (both
 * happen inside one wolfSSL_connect() call chain, so they cannot
 * interleave with another session's). */
static int name_mismatch;

static int is_ip_literal(const char *s)
{
    unsigned char buf[16];

    return inet_pton(AF_INET, s, buf) == 1 || inet_pton(AF_INET6, s, buf) == 1;
}

int tls_name_matches(const char *pattern, const char *name)
{
    size_t plen = strlen(pattern), nlen = strlen(name);
    const char *dot;

    if (plen == 0 || nlen == 0)
        return 0;
    if (pattern[0] != '*')
        return memchr(pattern, '*', plen) == NULL && plen == nlen &&
               strncasecmp(pattern, name, plen) == 0;
    /* RFC 9525 6.3: "*" only as the whole left-most label, matching exactly
     * one label; and not directly under a top-level name ("*.com"). */
    if (plen < 4 || pattern[1] != '.' || memchr(pattern + 2, '*', plen - 2) != NULL ||
        strchr(pattern + 2, '.') == NULL)
        return 0;
    dot = strchr(name, '.');
    if (dot == NULL || dot == name)
        return 0;
    return strcasecmp(dot + 1, pattern + 2) == 0;
}

/*
 * Called by wolfSSL for every certificate of the upstream's chain (Debian's
 * and our build define WOLFSSL_ALWAYS_VERIFY_CB). wolfSSL's own host-name
 * check falls back to the subject CN and accepts partial wildcards such as
 * "up*.test"; RFC 9525 (6.3, 6.4.4) allows neither, so on the leaf we require
 * a subjectAltName dNSName that matches by the RFC's rules.
 */
static int verify_cb(int preverify, WOLFSSL_X509_STORE_CTX *store)
{
    const struct upstream_cfg *u = store->userCtx;
    char *alt;
    int ok = 0;

    if (!preverify)
        return 0;
    if (store->error_depth != 0 || u == NULL || is_ip_literal(u->server_name))
        return 1; /* IP names are checked by wolfSSL against IP SANs */
    if (store->current_cert == NULL)
        return 0;
    name_mismatch = 0;
    while ((alt = wolfSSL_X509_get_next_altname(store->current_cert)) != NULL)
        if (tls_name_matches(alt, u->server_name))
            ok = 1;
    if (!ok) {
        wolfSSL_X509_STORE_CTX_set_error(store, VERIFY_ERR_NAME_MISMATCH);
        name_mismatch = 1;
    }
    return ok;
}

int tls_init(void)
{
    return wolfSSL_Init() == WOLFSSL_SUCCESS ? 0 : -1;
}

void tls_cleanup(void)
{
    wolfSSL_Cleanup();
}

static int wolf_version(int v)
{
    switch (v) {
    case TLS_V10:
        return WOLFSSL_TLSV1;
    case TLS_V11:
        return WOLFSSL_TLSV1_1;
    case TLS_V13:
        return WOLFSSL_TLSV1_3;
    default:
        return WOLFSSL_TLSV1_2;
    }
}

static void err_string(int code, char *buf, size_t len)
{
    char tmp[WOLFSSL_MAX_ERROR_SZ];

    wolfSSL_ERR_error_string_n((unsigned long)code, tmp, sizeof(tmp));
    snprintf(buf, len, "%s (%d)", tmp, code);
}

/* Key shares in order of preference: X25519 is the cheapest to compute.
 * Also: handshake messages of one flight go out in one write (without it
 * wolfSSL sends each message with its own syscall and TCP segment). */
static int set_groups(WOLFSSL_CTX *ctx)
{
    wolfSSL_CTX_set_group_messages(ctx);
    int groups[] = {WOLFSSL_ECC_X25519, WOLFSSL_ECC_SECP256R1, WOLFSSL_ECC_SECP384R1};

    return wolfSSL_CTX_set_groups(ctx, groups, (int)(sizeof(groups) / sizeof(groups[0])));
}

/* ---- start-up self-test: one handshake in memory against our own server ---- */

struct memio {
    unsigned char buf[2][16384 * 2]; /* [0] client->server, [1] server->client */
    size_t len[2];
};

static int memio_io(int dir, int recv, char *b, int sz, void *ctx)
{
    struct memio *m = ctx;
    size_t n;

    if (recv) {
        if (m->len[dir] == 0)
            return WOLFSSL_CBIO_ERR_WANT_READ;
        n = (size_t)sz < m->len[dir] ? (size_t)sz : m->len[dir];
        memcpy(b, m->buf[dir], n);
        memmove(m->buf[dir], m->buf[dir] + n, m->len[dir] - n);
        m->len[dir] -= n;
        return (int)n;
    }
    if (m->len[dir] + (size_t)sz > sizeof(m->buf[dir]))
        return WOLFSSL_CBIO_ERR_WANT_WRITE;
    memcpy(m->buf[dir] + m->len[dir], b, (size_t)sz);
    m->len[dir] += (size_t)sz;
    return sz;
}

static int c_recv(WOLFSSL *ssl, char *b, int sz, void *ctx)
{
    (void)ssl;
    return memio_io(1, 1, b, sz, ctx);
}

static int c_send(WOLFSSL *ssl, char *b, int sz, void *ctx)
{
    (void)ssl;
    return memio_io(0, 0, b, sz, ctx);
}

static int s_recv(WOLFSSL *ssl, char *b, int sz, void *ctx)
{
    (void)ssl;
    return memio_io(0, 1, b, sz, ctx);
}

static int s_send(WOLFSSL *ssl, char *b, int sz, void *ctx)
{
    (void)ssl;
    return memio_io(1, 0, b, sz, ctx);
}

/*
 * Completes one handshake between a throw-away client and the listener's
 * context. Catches what loading cannot: Debian's wolfSSL accepts a private
 * key that does not belong to the certificate in wolfSSL_CTX_check_private_key
 * (every real handshake then fails), and a chain the key cannot sign for.
 */
static int self_test(WOLFSSL_CTX *sctx, char *err, size_t errlen)
{
    WOLFSSL_CTX *cctx = wolfSSL_CTX_new(wolfSSLv23_client_method());
    WOLFSSL *c = NULL, *sv = NULL;
    struct memio *m = calloc(1, sizeof(*m));
    int rc = -1, cdone = 0, sdone = 0;

    if (cctx == NULL || m == NULL)
        goto out;
    wolfSSL_CTX_set_verify(cctx, WOLFSSL_VERIFY_NONE, NULL);
    c = wolfSSL_new(cctx);
    sv = wolfSSL_new(sctx);
    if (c == NULL || sv == NULL)
        goto out;
    wolfSSL_SSLSetIORecv(c, c_recv);
    wolfSSL_SSLSetIOSend(c, c_send);
    wolfSSL_SSLSetIORecv(sv, s_recv);
    wolfSSL_SSLSetIOSend(sv, s_send);
    wolfSSL_SetIOReadCtx(c, m);
    wolfSSL_SetIOWriteCtx(c, m);
    wolfSSL_SetIOReadCtx(sv, m);
    wolfSSL_SetIOWriteCtx(sv, m);
    for (int i = 0; i < 20 && !(cdone && sdone); i++) {
        if (!cdone) {
            int r = wolfSSL_connect(c);
            if (r == WOLFSSL_SUCCESS)
                cdone = 1;
            else if (wolfSSL_get_error(c, r) != WOLFSSL_ERROR_WANT_READ) {
                char e[120];
                err_string(wolfSSL_get_error(c, r), e, sizeof(e));
                snprintf(err, errlen, "test handshake failed on the client side: %s", e);
                goto out;
            }
        }
        if (!sdone) {
            int r = wolfSSL_accept(sv);
            if (r == WOLFSSL_SUCCESS)
                sdone = 1;
            else if (wolfSSL_get_error(sv, r) != WOLFSSL_ERROR_WANT_READ) {
                char e[120];
                err_string(wolfSSL_get_error(sv, r), e, sizeof(e));
                snprintf(err, errlen, "test handshake failed on the server side: %s", e);
                goto out;
            }
        }
    }
    if (cdone && sdone)
        rc = 0;
    else
        snprintf(err, errlen, "test handshake did not complete");
out:
    if (rc == -1 && err[0] == '\0')
        snprintf(err, errlen, "cannot run a test handshake (out of memory)");
    wolfSSL_free(c);
    wolfSSL_free(sv);
    if (cctx)
        wolfSSL_CTX_free(cctx);
    free(m);
    return rc;
}

WOLFSSL_CTX *tls_server_ctx(const struct listener_cfg *li, char *err, size_t errlen)
{
    WOLFSSL_CTX *ctx = wolfSSL_CTX_new(wolfSSLv23_server_method());
    char e[256];
    int rc;

    if (ctx == NULL) {
        snprintf(err, errlen, "cannot create TLS context");
        return NULL;
    }
    if (wolfSSL_CTX_SetMinVersion(ctx, wolf_version(li->min_tls)) != WOLFSSL_SUCCESS) {
        snprintf(err, errlen,
                 "key 'min_tls': TLS %d.%d is not supported by this wolfSSL build (the "
                 "project's own build, make WOLFSSL=static, has TLS 1.0 and 1.1)",
                 li->min_tls / 10, li->min_tls % 10);
        goto fail;
    }
    if (wolfSSL_CTX_set_cipher_list(ctx, li->min_tls < TLS_V12 ? CIPHERS_LEGACY : CIPHERS_MODERN) !=
        WOLFSSL_SUCCESS) {
        snprintf(err, errlen, "cannot set cipher list");
        goto fail;
    }
    if (set_groups(ctx) != WOLFSSL_SUCCESS) {
        snprintf(err, errlen, "cannot set key-share groups");
        goto fail;
    }
    rc = wolfSSL_CTX_use_certificate_chain_file(ctx, li->cert);
    if (rc != WOLFSSL_SUCCESS) {
        err_string(rc, e, sizeof(e));
        snprintf(err, errlen, "key 'cert': cannot load certificate chain '%s': %s", li->cert, e);
        goto fail;
    }
    rc = wolfSSL_CTX_use_PrivateKey_file(ctx, li->key, WOLFSSL_FILETYPE_PEM);
    if (rc != WOLFSSL_SUCCESS) {
        err_string(rc, e, sizeof(e));
        snprintf(err, errlen, "key 'key': cannot load private key '%s': %s", li->key, e);
        goto fail;
    }
    if (wolfSSL_CTX_check_private_key(ctx) != WOLFSSL_SUCCESS) {
        snprintf(err, errlen, "key 'key': '%s' does not match the certificate in '%s'", li->key,
                 li->cert);
        goto fail;
    }
    err[0] = '\0';
    if (self_test(ctx, e, sizeof(e)) == -1) {
        snprintf(err, errlen,
                 "keys 'cert'/'key': '%s' and '%s' cannot complete a TLS handshake (does the "
                 "key belong to the certificate?): %s",
                 li->cert, li->key, e);
        goto fail;
    }
    return ctx;
fail:
    wolfSSL_CTX_free(ctx);
    return NULL;
}

WOLFSSL_CTX *tls_client_ctx(const struct upstream_cfg *u, char *err, size_t errlen)
{
    WOLFSSL_CTX *ctx = wolfSSL_CTX_new(wolfSSLv23_client_method());
    char e[160];
    int rc;

    if (ctx == NULL) {
        snprintf(err, errlen, "cannot create TLS context");
        return NULL;
    }
    if (wolfSSL_CTX_SetMinVersion(ctx, wolf_version(u->min_tls)) != WOLFSSL_SUCCESS) {
        snprintf(err, errlen, "cannot set the TLS floor");
        goto fail;
    }
    if (wolfSSL_CTX_set_cipher_list(ctx, CIPHERS_MODERN) != WOLFSSL_SUCCESS) {
        snprintf(err, errlen, "cannot set cipher list");
        goto fail;
    }
    if (set_groups(ctx) != WOLFSSL_SUCCESS) {
        snprintf(err, errlen, "cannot set key-share groups");
        goto fail;
    }
    if (u->verify) {
        /* The system bundle may hold a certificate wolfSSL cannot parse; skip
         * such entries there rather than refusing the whole store. */
        rc = wolfSSL_CTX_load_verify_locations_ex(ctx, u->ca_file, NULL,
                                                  WOLFSSL_LOAD_FLAG_IGNORE_ERR);
        if (rc != WOLFSSL_SUCCESS) {
            err_string(rc, e, sizeof(e));
            snprintf(err, errlen, "key 'ca_file': cannot load CA certificates from '%s': %s",
                     u->ca_file, e);
            goto fail;
        }
        wolfSSL_CTX_set_verify(ctx, WOLFSSL_VERIFY_PEER, verify_cb);
    } else {
        wolfSSL_CTX_set_verify(ctx, WOLFSSL_VERIFY_NONE, NULL);
    }
    if (u->cert != NULL) {
        rc = wolfSSL_CTX_use_certificate_chain_file(ctx, u->cert);
        if (rc != WOLFSSL_SUCCESS) {
            err_string(rc, e, sizeof(e));
            snprintf(err, errlen, "key 'cert': cannot load certificate chain '%s': %s", u->cert, e);
            goto fail;
        }
        rc = wolfSSL_CTX_use_PrivateKey_file(ctx, u->key, WOLFSSL_FILETYPE_PEM);
        if (rc != WOLFSSL_SUCCESS) {
            err_string(rc, e, sizeof(e));
            snprintf(err, errlen, "key 'key': cannot load private key '%s': %s", u->key, e);
            goto fail;
        }
        if (wolfSSL_CTX_check_private_key(ctx) != WOLFSSL_SUCCESS) {
            snprintf(err, errlen, "key 'key': '%s' does not match the certificate in '%s'", u->key,
                     u->cert);
            goto fail;
        }
    }
    return ctx;
fail:
    wolfSSL_CTX_free(ctx);
    return NULL;
}

WOLFSSL *tls_client_ssl(WOLFSSL_CTX *ctx, const struct upstream_cfg *u, int fd)
{
    WOLFSSL *ssl = wolfSSL_new(ctx);
    const char *name = u->server_name;

    if (ssl == NULL)
        return NULL;
    if (wolfSSL_set_fd(ssl, fd) != WOLFSSL_SUCCESS)
        goto fail;
    if (is_ip_literal(name)) {
        /* RFC 6066 3: no IP literals in SNI; check the IP SAN instead. */
        if (u->verify &&
            wolfSSL_X509_VERIFY_PARAM_set1_ip_asc(wolfSSL_get0_param(ssl), name) != WOLFSSL_SUCCESS)
            goto fail;
    } else {
        if (wolfSSL_UseSNI(ssl, WOLFSSL_SNI_HOST_NAME, name, (unsigned short)strlen(name)) !=
            WOLFSSL_SUCCESS)
            goto fail;
        if (u->verify && wolfSSL_check_domain_name(ssl, name) != WOLFSSL_SUCCESS)
            goto fail;
        wolfSSL_SetCertCbCtx(ssl, (void *)u);
    }
    return ssl;
fail:
    wolfSSL_free(ssl);
    return NULL;
}

const char *tls_describe_error(WOLFSSL *ssl, int ret, char *buf, size_t len)
{
    int code = wolfSSL_get_error(ssl, ret);
    char e[160];
    long v;

    if (code == WOLFSSL_ERROR_SYSCALL || code == SOCKET_ERROR_E) {
        snprintf(buf, len, "connection error during TLS");
        return buf;
    }
    if (code == WOLFSSL_ERROR_ZERO_RETURN || code == SOCKET_PEER_CLOSED_E) {
        snprintf(buf, len, "peer closed the connection during TLS");
        return buf;
    }
    err_string(code, e, sizeof(e));
    v = wolfSSL_get_verify_result(ssl);
    if (name_mismatch || v == VERIFY_ERR_NAME_MISMATCH)
        snprintf(buf, len,
                 "certificate verification failed: no subjectAltName DNS entry matches the "
                 "configured server_name (CN and partial wildcards are not accepted, RFC 9525)");
    else if (v != 0)
        snprintf(buf, len, "certificate verification failed: %s (%ld); %s",
                 wolfSSL_X509_verify_cert_error_string(v), v, e);
    else
        snprintf(buf, len, "%s", e);
    name_mismatch = 0;
    return buf;
}
