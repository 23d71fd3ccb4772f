/*
 * tls.c - wolfSSL contexts (see tls.h).
 */
#include "tls.h"

#include "log.h"
#include "cryptodev.h"
#include "rsa_backend.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <sys/random.h>
#include <time.h>

#include <wolfssl/error-ssl.h>
#include <wolfssl/openssl/evp.h>
#include <wolfssl/wolfcrypt/chacha20_poly1305.h>
#include <wolfssl/wolfcrypt/error-crypt.h>
#include <wolfssl/wolfcrypt/sha256.h>

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
    const char *name = store->userCtx; /* the name this address must carry */
    char *alt;
    int ok = 0;

    if (!preverify)
        return 0;
    if (store->error_depth != 0 || name == NULL || is_ip_literal(name))
        return 1; /* IP names are checked by wolfSSL against IP SANs */
    if (store->current_cert == NULL)
        return 0;
    name_mismatch = 0;
    while ((alt = wolfSSL_X509_get_next_altname(store->current_cert)) != NULL)
        if (tls_name_matches(alt, name))
            ok = 1;
    if (!ok) {
        wolfSSL_X509_STORE_CTX_set_error(store, VERIFY_ERR_NAME_MISMATCH);
        name_mismatch = 1;
    }
    return ok;
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

/* ---- session tickets for clients ----
 *
 * wolfSSL's default ticket keys are made per context on first use: after
 * fork every worker would have its own, so a client that comes back on
 * another worker (SO_REUSEPORT spreads them) could not resume, and a reload
 * or a certificate picked by SNI (another context) would void every ticket.
 * Instead every context of every worker encrypts tickets with one key
 * schedule, derived without any shared state: a random seed made once at
 * start (before the workers are forked) is ratcheted forward once per hour
 * (chain' = SHA-256(chain || "ratchet"), key = SHA-256(chain || "key")).
 * Every process computes the same key for the same hour; the old chain
 * values are overwritten, so a memory dump today cannot decrypt the
 * tickets (and resumed sessions) of earlier hours: forward secrecy across
 * rotations. A ticket is accepted during its own hour and the next.
 */
#define TICKET_PERIOD      3600
#define TICKET_RATCHET_MAX 100000 /* clock jumps: catch up at most this far */

static struct {
    int ready;
    uint8_t id[8]; /* this daemon instance (tickets of another one are refused at once) */
    uint64_t epoch;
    uint8_t chain[32];
    uint8_t key[32], prev_key[32];
    int have_prev;
} tk;

static void sha256_tag(const uint8_t in[32], const char *tag, uint8_t out[32])
{
    uint8_t buf[32 + 16];
    size_t tl = strlen(tag);

    memcpy(buf, in, 32);
    memcpy(buf + 32, tag, tl);
    wc_Sha256Hash(buf, (word32)(32 + tl), out);
    memset(buf, 0, sizeof(buf));
}

int tls_ticket_keys_init(void)
{
    uint8_t seed[32];

    if (getrandom(seed, sizeof(seed), 0) != (ssize_t)sizeof(seed) ||
        getrandom(tk.id, sizeof(tk.id), 0) != (ssize_t)sizeof(tk.id))
        return -1;
    tk.epoch = (uint64_t)time(NULL) / TICKET_PERIOD;
    memcpy(tk.chain, seed, sizeof(seed));
    memset(seed, 0, sizeof(seed));
    sha256_tag(tk.chain, "key", tk.key);
    tk.have_prev = 0;
    tk.ready = 1;
    return 0;
}

int tls_init(void)
{
    if (wolfSSL_Init() != WOLFSSL_SUCCESS)
        return -1;
    return tk.ready ? 0 : tls_ticket_keys_init();
}

/* Moves the schedule to the current hour. */
void tls_ticket_keys_advance(void)
{
    if (!tk.ready)
        return;
    uint64_t now = (uint64_t)time(NULL) / TICKET_PERIOD;

    if (now <= tk.epoch)
        return;
    if (now - tk.epoch > TICKET_RATCHET_MAX)
        tk.epoch = now - TICKET_RATCHET_MAX;
    while (tk.epoch < now) {
        uint8_t next[32];
        memcpy(tk.prev_key, tk.key, sizeof(tk.key));
        sha256_tag(tk.chain, "ratchet", next);
        memcpy(tk.chain, next, sizeof(next));
        memset(next, 0, sizeof(next));
        sha256_tag(tk.chain, "key", tk.key);
        tk.epoch++;
    }
    tk.have_prev = 1;
}

static void ticket_name(uint64_t epoch, unsigned char name[WOLFSSL_TICKET_NAME_SZ])
{
    memcpy(name, tk.id, 8);
    for (int i = 0; i < 8; i++)
        name[8 + i] = (unsigned char)(epoch >> (56 - 8 * i));
}

/* AAD = key name || IV || ticket length, as wolfSSL's own callback does. */
static int ticket_cb(WOLFSSL *ssl, unsigned char key_name[WOLFSSL_TICKET_NAME_SZ],
                     unsigned char iv[WOLFSSL_TICKET_IV_SZ],
                     unsigned char mac[WOLFSSL_TICKET_MAC_SZ], int enc, unsigned char *ticket,
                     int len, int *out_len, void *arg)
{
    unsigned char aad[WOLFSSL_TICKET_NAME_SZ + WOLFSSL_TICKET_IV_SZ + 2];
    const uint8_t *key = tk.key;
    int rc = WOLFSSL_TICKET_RET_OK;

    (void)ssl;
    (void)arg;
    if (!tk.ready || len < 0)
        return WOLFSSL_TICKET_RET_FATAL;
    tls_ticket_keys_advance();
    if (enc) {
        ticket_name(tk.epoch, key_name);
        if (getrandom(iv, CHACHA20_POLY1305_AEAD_IV_SIZE, 0) != CHACHA20_POLY1305_AEAD_IV_SIZE)
            return WOLFSSL_TICKET_RET_FATAL;
        memset(iv + CHACHA20_POLY1305_AEAD_IV_SIZE, 0,
               WOLFSSL_TICKET_IV_SZ - CHACHA20_POLY1305_AEAD_IV_SIZE);
    } else {
        unsigned char cur[WOLFSSL_TICKET_NAME_SZ], prev[WOLFSSL_TICKET_NAME_SZ];
        ticket_name(tk.epoch, cur);
        ticket_name(tk.epoch - 1, prev);
        if (memcmp(key_name, cur, sizeof(cur)) == 0)
            key = tk.key;
        else if (tk.have_prev && memcmp(key_name, prev, sizeof(prev)) == 0) {
            key = tk.prev_key;
            rc = WOLFSSL_TICKET_RET_CREATE; /* TLS 1.2: send a fresh ticket */
        } else
            return WOLFSSL_TICKET_RET_REJECT; /* full handshake */
    }
    memcpy(aad, key_name, WOLFSSL_TICKET_NAME_SZ);
    memcpy(aad + WOLFSSL_TICKET_NAME_SZ, iv, WOLFSSL_TICKET_IV_SZ);
    aad[sizeof(aad) - 2] = (unsigned char)(len >> 8);
    aad[sizeof(aad) - 1] = (unsigned char)len;
    if (enc) {
        memset(mac, 0, WOLFSSL_TICKET_MAC_SZ);
        if (wc_ChaCha20Poly1305_Encrypt(key, iv, aad, sizeof(aad), ticket, (word32)len, ticket,
                                        mac) != 0)
            return WOLFSSL_TICKET_RET_FATAL;
    } else if (wc_ChaCha20Poly1305_Decrypt(key, iv, aad, sizeof(aad), ticket, (word32)len, mac,
                                           ticket) != 0) {
        return WOLFSSL_TICKET_RET_REJECT;
    }
    *out_len = len;
    return rc;
}

/* ---- certificates chosen by SNI ---- */

struct sni_entry {
    char *name; /* a DNS name or "*.example.com" from the certificate */
    WOLFSSL_CTX *ctx;
};

struct tls_sni {
    struct sni_entry *v;
    size_t n;
    WOLFSSL_CTX *dflt;
};

static int sni_add(struct tls_sni *t, const char *name, WOLFSSL_CTX *ctx)
{
    struct sni_entry *nv = realloc(t->v, (t->n + 1) * sizeof(*nv));

    if (nv == NULL)
        return -1;
    t->v = nv;
    if ((nv[t->n].name = strdup(name)) == NULL)
        return -1;
    nv[t->n++].ctx = ctx;
    return 0;
}

/* The names a certificate is for: its DNS subjectAltNames, else its CN. */
static int add_cert_names(struct tls_sni *t, const char *file, WOLFSSL_CTX *ctx)
{
    WOLFSSL_X509 *x = wolfSSL_X509_load_certificate_file(file, WOLFSSL_FILETYPE_PEM);
    char *alt, cn[256];
    size_t before = t->n;
    int rc = 0;

    if (x == NULL)
        return -1;
    while (rc == 0 && (alt = wolfSSL_X509_get_next_altname(x)) != NULL)
        if (!is_ip_literal(alt) && strchr(alt, '@') == NULL)
            rc = sni_add(t, alt, ctx);
    if (rc == 0 && t->n == before &&
        wolfSSL_X509_NAME_get_text_by_NID(wolfSSL_X509_get_subject_name(x), NID_commonName, cn,
                                          (int)sizeof(cn)) > 0)
        rc = sni_add(t, cn, ctx);
    wolfSSL_X509_free(x);
    return rc;
}

WOLFSSL_CTX *tls_sni_lookup(const struct tls_sni *t, const char *name)
{
    if (name == NULL || *name == '\0')
        return t->dflt;
    /* An exact name beats a wildcard; among equals the first listed wins. */
    for (size_t i = 0; i < t->n; i++)
        if (t->v[i].name[0] != '*' && strcasecmp(t->v[i].name, name) == 0)
            return t->v[i].ctx;
    for (size_t i = 0; i < t->n; i++)
        if (t->v[i].name[0] == '*' && tls_name_matches(t->v[i].name, name))
            return t->v[i].ctx;
    return t->dflt;
}

/* Called by wolfSSL once the ClientHello's extensions are parsed, before
 * the cipher suite and the certificate are chosen. */
static int sni_cb(WOLFSSL *ssl, int *alert, void *arg)
{
    const struct tls_sni *t = arg;
    const char *name = wolfSSL_get_servername(ssl, WOLFSSL_SNI_HOST_NAME);
    WOLFSSL_CTX *ctx = tls_sni_lookup(t, name);

    (void)alert;
    /* A no-op when the session was made from that context already (the
     * usual case: client.c picked it from the ClientHello). */
    if (wolfSSL_set_SSL_CTX(ssl, ctx) == NULL)
        return fatal_return;
    return 0;
}

struct tls_sni *tls_sni_new(const struct listener_cfg *li, WOLFSSL_CTX *const *ctxs, char *err,
                            size_t errlen)
{
    struct tls_sni *t = calloc(1, sizeof(*t));

    if (t == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    t->dflt = ctxs[0];
    for (size_t i = 1; i < li->ncerts; i++) {
        size_t before = t->n;
        if (add_cert_names(t, li->certs[i], ctxs[i]) == -1) {
            snprintf(err, errlen, "key 'cert': cannot read the names of '%s'", li->certs[i]);
            tls_sni_free(t);
            return NULL;
        }
        if (t->n == before) {
            snprintf(err, errlen,
                     "key 'cert': '%s' names no host (no DNS subjectAltName, no CN), so no "
                     "client could select it by SNI",
                     li->certs[i]);
            tls_sni_free(t);
            return NULL;
        }
    }
    /* On every context: wolfSSL keeps the client's name (for the logs)
     * only when the context has an SNI callback. */
    for (size_t i = 0; i < li->ncerts; i++) {
        wolfSSL_CTX_set_servername_callback(ctxs[i], sni_cb);
        wolfSSL_CTX_set_servername_arg(ctxs[i], t);
    }
    return t;
}

void tls_sni_free(struct tls_sni *t)
{
    if (t == NULL)
        return;
    for (size_t i = 0; i < t->n; i++)
        free(t->v[i].name);
    free(t->v);
    free(t);
}

int tls_own_build(void)
{
#ifdef SMTPBRIDGE_OWN_WOLFSSL
    return 1;
#else
    return 0;
#endif
}

/* ---- OCSP stapling from a file ----
 *
 * The operator keeps a DER OCSP response per certificate up to date (e.g.
 * `openssl ocsp ... -respout`, from cron; see docs/reference.md); the daemon
 * never makes network requests of its own. wolfSSL's stapling asks an I/O
 * callback for the response: ours hands over the file's bytes. wolfSSL then
 * checks the response (signed by the issuer, for this certificate, current)
 * and caches it until its nextUpdate; a response that fails the check is
 * not stapled and the handshake goes on without it. A reload re-reads it.
 */
#define OCSP_MAX_RESPONSE (64 * 1024)

struct ocsp_staple {
    WOLFSSL_CTX *ctx;
    unsigned char *der;
    int len;
    struct ocsp_staple *next;
};

static struct ocsp_staple *staples;

static int ocsp_io_cb(void *arg, const char *url, int url_len, unsigned char *req, int req_len,
                      unsigned char **resp)
{
    const struct ocsp_staple *st = arg;

    (void)url;
    (void)url_len;
    (void)req;
    (void)req_len;
    *resp = malloc((size_t)st->len);
    if (*resp == NULL)
        return -1;
    memcpy(*resp, st->der, (size_t)st->len);
    return st->len;
}

static void ocsp_free_cb(void *arg, unsigned char *resp)
{
    (void)arg;
    free(resp);
}

static int read_file(const char *path, unsigned char **out, size_t max)
{
    FILE *f = fopen(path, "rb");
    unsigned char *b;
    size_t n;

    if (f == NULL)
        return -1;
    b = malloc(max + 1);
    n = b ? fread(b, 1, max + 1, f) : 0;
    fclose(f);
    if (b == NULL || n == 0 || n > max) {
        free(b);
        return -1;
    }
    *out = b;
    return (int)n;
}

/*
 * Checks the response the way a client would: signed by the certificate's
 * issuer (from the chain file) or a responder it delegated to, about this
 * certificate, current, and "good". Returns 0, or -1 with err set.
 */
static int check_staple(const char *cert, struct ocsp_staple *st, char *err, size_t errlen)
{
    WOLFSSL_CERT_MANAGER *cm = wolfSSL_CertManagerNew();
    WOLFSSL_X509 *x = wolfSSL_X509_load_certificate_file(cert, WOLFSSL_FILETYPE_PEM);
    const unsigned char *der;
    int len = 0, rc = -1;
    char e[160];

    if (cm == NULL || x == NULL || (der = wolfSSL_X509_get_der(x, &len)) == NULL) {
        snprintf(err, errlen, "cannot read the certificate");
        goto out;
    }
    if (wolfSSL_CertManagerLoadCA(cm, cert, NULL) != WOLFSSL_SUCCESS ||
        wolfSSL_CertManagerEnableOCSP(cm, WOLFSSL_OCSP_URL_OVERRIDE) != WOLFSSL_SUCCESS ||
        wolfSSL_CertManagerSetOCSPOverrideURL(cm, "file:") != WOLFSSL_SUCCESS ||
        wolfSSL_CertManagerSetOCSP_Cb(cm, ocsp_io_cb, ocsp_free_cb, st) != WOLFSSL_SUCCESS) {
        snprintf(err, errlen, "cannot set up an OCSP check");
        goto out;
    }
    rc = wolfSSL_CertManagerCheckOCSP(cm, (unsigned char *)der, len);
    if (rc != WOLFSSL_SUCCESS) {
        err_string(rc, e, sizeof(e));
        snprintf(err, errlen, "%s%s", e,
                 rc == ASN_NO_SIGNER_E ? " (the issuing CA must follow the certificate in "
                                         "the 'cert' file)"
                                       : "");
        rc = -1;
    } else {
        rc = 0;
    }
out:
    wolfSSL_X509_free(x);
    if (cm)
        wolfSSL_CertManagerFree(cm);
    return rc;
}

/* Staples the response in `file` on ctx if it checks out; if it does not,
 * says why and serves without stapling (a stale response must not stop
 * TLS; clients then ask the CA themselves, as for any unstapled server). */
static int setup_stapling(WOLFSSL_CTX *ctx, const char *cert, const char *file, char *err,
                          size_t errlen)
{
    struct ocsp_staple *st;

    if (!tls_own_build()) {
        snprintf(err, errlen,
                 "key 'ocsp_response': needs the project's wolfSSL build (make WOLFSSL=static): "
                 "wolfSSL 5.5.4 as packaged leaks memory on every TLS 1.3 handshake that "
                 "staples a response (fixed by scripts/wolfssl-patches/)");
        return -1;
    }
    st = calloc(1, sizeof(*st));

    if (st == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    st->len = read_file(file, &st->der, OCSP_MAX_RESPONSE);
    if (st->len <= 0) {
        snprintf(err, errlen,
                 "key 'ocsp_response': cannot read '%s' (a DER OCSP response of 1 byte to %d KiB)",
                 file, OCSP_MAX_RESPONSE / 1024);
        free(st);
        return -1;
    }
    if (check_staple(cert, st, err, errlen) == -1) {
        char q[240];
        log_quote(q, sizeof(q), err, strlen(err));
        log_msg(LOG_LVL_WARNING, 0,
                "event=ocsp_not_stapled cert=%s ocsp_response=%s error=%s msg=\"serving this "
                "certificate without a stapled OCSP response\"",
                cert, file, q);
        err[0] = '\0';
        free(st->der);
        free(st);
        return 0;
    }
    /* The issuer must be known to check the response (and, in TLS 1.3, to
     * parse our own certificate): it is the next certificate of the chain. */
    if (wolfSSL_CTX_load_verify_locations(ctx, cert, NULL) != WOLFSSL_SUCCESS ||
        wolfSSL_CTX_EnableOCSPStapling(ctx) != WOLFSSL_SUCCESS ||
        /* The response comes from the file whatever the certificate's AIA
         * says (and certificates without an OCSP URL get one too). */
        wolfSSL_CTX_EnableOCSP(ctx, WOLFSSL_OCSP_URL_OVERRIDE) != WOLFSSL_SUCCESS ||
        wolfSSL_CTX_SetOCSP_OverrideURL(ctx, "file:") != WOLFSSL_SUCCESS ||
        wolfSSL_CTX_SetOCSP_Cb(ctx, ocsp_io_cb, ocsp_free_cb, st) != WOLFSSL_SUCCESS) {
        snprintf(err, errlen, "key 'ocsp_response': cannot enable OCSP stapling for '%s'", cert);
        free(st->der);
        free(st);
        return -1;
    }
    st->ctx = ctx;
    st->next = staples;
    staples = st;
    return 1;
}

/*
 * The crypto device (cryptodev.h) for a context: AES-GCM records by
 * gcm_vaes.c where that is selected (every context), and the signature of
 * a context whose private key is RSA by rsa_backend where that is
 * selected. With neither, the context has no device id: wolfSSL offers
 * every operation of a context with one to the device first, which costs
 * a call per hash update for nothing. The key type is read from the
 * certificate (the leaf, first in the file; cert NULL: none), which the
 * caller has already checked to match the key.
 */
static void use_crypto_device(WOLFSSL_CTX *ctx, const char *cert)
{
    WOLFSSL_X509 *x;
    WOLFSSL_EVP_PKEY *pkey;
    int rsa = 0;

    if (cert != NULL && rsa_backend_devid() != INVALID_DEVID) {
        x = wolfSSL_X509_load_certificate_file(cert, WOLFSSL_FILETYPE_PEM);
        pkey = x ? wolfSSL_X509_get_pubkey(x) : NULL;
        rsa = pkey != NULL && wolfSSL_EVP_PKEY_base_id(pkey) == EVP_PKEY_RSA;
        wolfSSL_EVP_PKEY_free(pkey);
        wolfSSL_X509_free(x);
    }
    if (cryptodev_ctx_devid(rsa) != INVALID_DEVID)
        wolfSSL_CTX_SetDevId(ctx, cryptodev_ctx_devid(rsa));
}

void tls_server_ctx_free(WOLFSSL_CTX *ctx)
{
    for (struct ocsp_staple **p = &staples; *p; p = &(*p)->next) {
        if ((*p)->ctx == ctx) {
            struct ocsp_staple *st = *p;
            *p = st->next;
            free(st->der);
            free(st);
            break;
        }
    }
    wolfSSL_CTX_free(ctx);
}

WOLFSSL_CTX *tls_server_ctx(const struct listener_cfg *li, size_t idx, char *err, size_t errlen)
{
    WOLFSSL_CTX *ctx = wolfSSL_CTX_new(wolfSSLv23_server_method());
    const char *cert = li->certs[idx], *key = li->keys[idx];
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
    if (wolfSSL_CTX_set_TicketEncCb(ctx, ticket_cb) != WOLFSSL_SUCCESS ||
        wolfSSL_CTX_set_TicketHint(ctx, TICKET_PERIOD) != WOLFSSL_SUCCESS) {
        snprintf(err, errlen, "cannot set up session tickets");
        goto fail;
    }
    /* Sessions (and tickets) live as long as the ticket hint says. With an
     * OpenSSL-compatible build (Debian's) this returns the old timeout, not
     * a status, so it is not checked. */
    wolfSSL_CTX_set_timeout(ctx, TICKET_PERIOD);
    rc = wolfSSL_CTX_use_certificate_chain_file(ctx, cert);
    if (rc != WOLFSSL_SUCCESS) {
        err_string(rc, e, sizeof(e));
        snprintf(err, errlen, "key 'cert': cannot load certificate chain '%s': %s", cert, e);
        goto fail;
    }
    rc = wolfSSL_CTX_use_PrivateKey_file(ctx, key, WOLFSSL_FILETYPE_PEM);
    if (rc != WOLFSSL_SUCCESS) {
        err_string(rc, e, sizeof(e));
        snprintf(err, errlen, "key 'key': cannot load private key '%s': %s", key, e);
        goto fail;
    }
    if (wolfSSL_CTX_check_private_key(ctx) != WOLFSSL_SUCCESS) {
        snprintf(err, errlen, "key 'key': '%s' does not match the certificate in '%s'", key, cert);
        goto fail;
    }
    /* Before the self-test, which then also checks the RSA backend. */
    use_crypto_device(ctx, cert);
    /* The response itself is checked by check_staple(), with the same code
     * wolfSSL runs for each handshake. */
    if (idx < li->nocsp && strcmp(li->ocsps[idx], "-") != 0 &&
        setup_stapling(ctx, cert, li->ocsps[idx], err, errlen) == -1)
        goto fail;
    err[0] = '\0';
    if (self_test(ctx, e, sizeof(e)) == -1) {
        snprintf(err, errlen,
                 "keys 'cert'/'key': '%s' and '%s' cannot complete a TLS handshake (does the "
                 "key belong to the certificate?): %s",
                 cert, key, e);
        goto fail;
    }
    return ctx;
fail:
    tls_server_ctx_free(ctx);
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
    use_crypto_device(ctx, u->cert);
    return ctx;
fail:
    wolfSSL_CTX_free(ctx);
    return NULL;
}

WOLFSSL *tls_client_ssl(WOLFSSL_CTX *ctx, const struct upstream_cfg *u, const char *name, int fd)
{
    WOLFSSL *ssl = wolfSSL_new(ctx);

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
        wolfSSL_SetCertCbCtx(ssl, (void *)name);
    }
    return ssl;
fail:
    wolfSSL_free(ssl);
    return NULL;
}

/*
 * The reason for a certificate verification result. wolfSSL reports
 * OpenSSL's X509_V_ERR_* numbers (its verify callback maps its own errors
 * to them), but wolfSSL_X509_verify_cert_error_string() only knows
 * wolfSSL's negative codes: for 10 it says "unknown error number". The
 * numbers are OpenSSL's, which wolfSSL copies.
 */
static const char *verify_reason(long v)
{
    switch (v) {
    case 7:
        return "certificate signature failure";
    case 9:
    case 13: /* wolfSSL: ASN_BEFORE_DATE_E */
        return "certificate is not yet valid";
    case 10:
    case 14: /* wolfSSL: ASN_AFTER_DATE_E */
        return "certificate has expired";
    case 18:
        return "self-signed certificate";
    case 19:
        return "self-signed certificate in certificate chain";
    case 2:
    case 20:
        return "unable to get local issuer certificate (not signed by a CA in ca_file)";
    case 21:
        return "unable to verify the first certificate (its issuer is not in ca_file)";
    case 22:
        return "certificate chain too long";
    case 24:
        return "invalid CA certificate";
    case 25:
        return "path length constraint exceeded";
    case 28:
        return "certificate rejected";
    default:
        return v < 0 ? wolfSSL_X509_verify_cert_error_string(v) : "verification error";
    }
}

/* TLS alert descriptions (RFC 8446 section 6, RFC 5246 section 7.2). */
static const struct {
    int code;
    const char *name;
} alerts[] = {
    {10, "unexpected_message"},
    {20, "bad_record_mac"},
    {22, "record_overflow"},
    {40, "handshake_failure"},
    {42, "bad_certificate"},
    {43, "unsupported_certificate"},
    {44, "certificate_revoked"},
    {45, "certificate_expired"},
    {46, "certificate_unknown"},
    {47, "illegal_parameter"},
    {48, "unknown_ca"},
    {49, "access_denied"},
    {50, "decode_error"},
    {51, "decrypt_error"},
    {70, "protocol_version"},
    {71, "insufficient_security"},
    {80, "internal_error"},
    {86, "inappropriate_fallback"},
    {90, "user_canceled"},
    {109, "missing_extension"},
    {110, "unsupported_extension"},
    {112, "unrecognized_name"},
    {113, "bad_certificate_status_response"},
    {115, "unknown_psk_identity"},
    {116, "certificate_required"},
    {120, "no_application_protocol"},
};

static const char *alert_name(int code)
{
    for (size_t i = 0; i < sizeof(alerts) / sizeof(alerts[0]); i++)
        if (alerts[i].code == code)
            return alerts[i].name;
    return "unknown alert";
}

const char *tls_peer_alert(WOLFSSL *ssl, char *buf, size_t len)
{
    WOLFSSL_ALERT_HISTORY h;

    buf[0] = '\0';
    if (ssl == NULL || wolfSSL_get_alert_history(ssl, &h) != WOLFSSL_SUCCESS)
        return buf;
    /* -1: none received; 0: close_notify, an orderly close */
    if (h.last_rx.code > 0)
        snprintf(buf, len, " (the peer's TLS alert: %d %s)", h.last_rx.code,
                 alert_name(h.last_rx.code));
    return buf;
}

const char *tls_describe_error(WOLFSSL *ssl, int ret, char *buf, size_t len)
{
    int code = wolfSSL_get_error(ssl, ret);
    char e[160], a[64];
    long v;

    if (code == WOLFSSL_ERROR_SYSCALL || code == SOCKET_ERROR_E) {
        snprintf(buf, len, "connection error during TLS");
        return buf;
    }
    if (code == WOLFSSL_ERROR_ZERO_RETURN || code == SOCKET_PEER_CLOSED_E) {
        snprintf(buf, len, "peer closed the connection during TLS%s",
                 tls_peer_alert(ssl, a, sizeof(a)));
        return buf;
    }
    err_string(code, e, sizeof(e));
    if (code == FATAL_ERROR && tls_peer_alert(ssl, a, sizeof(a))[0] != '\0') {
        /* "received alert fatal error" says no more than that */
        snprintf(buf, len, "%s%s", e, a);
        return buf;
    }
    v = wolfSSL_get_verify_result(ssl);
    if (name_mismatch || v == VERIFY_ERR_NAME_MISMATCH)
        snprintf(buf, len,
                 "certificate verification failed: no subjectAltName DNS entry matches the "
                 "configured server_name (CN and partial wildcards are not accepted, RFC 9525)");
    else if (v != 0)
        snprintf(buf, len, "certificate verification failed: %s (%ld); %s", verify_reason(v), v, e);
    else
        snprintf(buf, len, "%s", e);
    name_mismatch = 0;
    return buf;
}
