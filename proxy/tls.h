/*
 * tls.h - wolfSSL contexts and error reporting.
 *
 * Debian's wolfSSL is built OpenSSL-compatible, so its defaults are unsafe
 * for us: a client context verifies nothing unless told to, the host name is
 * never checked unless asked per connection, and servers accept TLS 1.1.
 * Everything here sets those explicitly.
 */
#ifndef SMTPBRIDGE_TLS_H
#define SMTPBRIDGE_TLS_H

#include <stddef.h>

#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

#include "config.h"

/* Whether this binary links the project's own wolfSSL build (with its
 * fixes, scripts/wolfssl-patches/) rather than the system library. */
int tls_own_build(void);

/* Library set-up and tear-down; call once per process. Returns 0 or -1. */
int tls_init(void);
void tls_cleanup(void);

/*
 * tls_server_ctx(li, idx, err, errlen): a server context for a listener's
 * certificate pair idx (li->certs[idx], li->keys[idx]): chain and key
 * (checked to match by a test handshake), the listener's TLS floor, a
 * modern cipher list (CBC suites only added when the floor is below 1.2),
 * session tickets under the shared key schedule, and the OCSP response of
 * li->ocsps[idx] stapled if one is configured. Returns the context, or
 * NULL with err describing the problem.
 */
WOLFSSL_CTX *tls_server_ctx(const struct listener_cfg *li, size_t idx, char *err, size_t errlen);

/* Frees a context made by tls_server_ctx() and its OCSP response. */
void tls_server_ctx_free(WOLFSSL_CTX *ctx);

/*
 * Several certificates on one listener: ctxs[i] is li's pair i. The table
 * maps every DNS name (subjectAltName, else CN) of certificates 1..n-1 to
 * its context and makes ctxs[0] switch to it when a ClientHello's SNI
 * matches (exact names before wildcards, earlier certificates first);
 * anything else gets ctxs[0]. Returns NULL with err set on failure.
 */
struct tls_sni;
struct tls_sni *tls_sni_new(const struct listener_cfg *li, WOLFSSL_CTX *const *ctxs, char *err,
                            size_t errlen);
WOLFSSL_CTX *tls_sni_lookup(const struct tls_sni *t, const char *name);
void tls_sni_free(struct tls_sni *t);

/*
 * The key schedule of client session tickets (see tls.c): made once per
 * daemon, before workers are forked, so that every worker and every reload
 * accepts the same tickets. Called by tls_init(). Returns 0 or -1.
 */
int tls_ticket_keys_init(void);

/* Ratchets the schedule to the current hour, forgetting older keys (done
 * on use; a process that uses none, the workers' master, calls it). */
void tls_ticket_keys_advance(void);

/*
 * tls_client_ctx(u, err, errlen): a client context for an upstream: TLS 1.2
 * floor (or u->min_tls), peer verification against u->ca_file unless
 * u->verify is 0, optional client certificate. Returns NULL with err set on
 * failure.
 */
WOLFSSL_CTX *tls_client_ctx(const struct upstream_cfg *u, char *err, size_t errlen);

/*
 * tls_client_ssl(ctx, u, name, fd): a new connection object for one of the
 * upstream's addresses, whose certificate must carry `name` (a string that
 * outlives the connection): SNI (unless name is an IP literal, RFC 6066 3)
 * and the host-name or IP check armed. Returns NULL on failure.
 */
WOLFSSL *tls_client_ssl(WOLFSSL_CTX *ctx, const struct upstream_cfg *u, const char *name, int fd);

/*
 * tls_name_matches(pattern, name): RFC 9525 6.3 matching of a certificate's
 * DNS name against the reference name: case-insensitive; "*" only as the
 * complete left-most label of a pattern with at least two more labels, and
 * matching exactly one label. Returns 1 on a match.
 */
int tls_name_matches(const char *pattern, const char *name);

/*
 * tls_describe_error(ssl, ret, buf, len): a human description of why the
 * last wolfSSL call on ssl returned ret, including the certificate
 * verification error when there is one. Returns buf.
 */
const char *tls_describe_error(WOLFSSL *ssl, int ret, char *buf, size_t len);

/*
 * tls_peer_alert(ssl, buf, len): " (the peer's TLS alert: 116
 * certificate_required)" when the peer's last alert was anything but
 * close_notify, else "" (ssl may be NULL). For the reasons of a session
 * that ended because the peer closed it: a refusal comes as an alert.
 */
const char *tls_peer_alert(WOLFSSL *ssl, char *buf, size_t len);

#endif
