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

/* Library set-up and tear-down; call once per process. Returns 0 or -1. */
int tls_init(void);
void tls_cleanup(void);

/*
 * tls_server_ctx(li, err, errlen): a server context for a listener: its
 * certificate chain and key (checked to match), its TLS floor, a modern
 * cipher list (CBC suites only added when the floor is below 1.2).
 * Returns the context, or NULL with err describing the problem.
 */
WOLFSSL_CTX *tls_server_ctx(const struct listener_cfg *li, char *err, size_t errlen);

/*
 * tls_client_ctx(u, err, errlen): a client context for an upstream: TLS 1.2
 * floor (or u->min_tls), peer verification against u->ca_file unless
 * u->verify is 0, optional client certificate. Returns NULL with err set on
 * failure.
 */
WOLFSSL_CTX *tls_client_ctx(const struct upstream_cfg *u, char *err, size_t errlen);

/*
 * tls_client_ssl(ctx, u, fd): a new connection object for the upstream with
 * SNI (unless server_name is an IP literal, RFC 6066 3) and the host-name or
 * IP check armed. Returns NULL on failure.
 */
WOLFSSL *tls_client_ssl(WOLFSSL_CTX *ctx, const struct upstream_cfg *u, int fd);

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

#endif
