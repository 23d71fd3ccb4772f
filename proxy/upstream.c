/*
 * upstream.c - the upstream dialogue: connect (each resolved address in
 * turn), greeting, EHLO, STARTTLS, verified TLS handshake. Any failure ends
 * the session with a 421 to the client; there is no plaintext fallback.
 */
#include "session.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "tls.h"
#include "proxyproto.h"

#define R_UNREACHABLE "421 4.4.1 Upstream server unreachable, try again later\r\n"
#define R_FAILED      "421 4.4.2 Upstream server error, try again later\r\n"

static const char *stage_name(enum upstream_phase p)
{
    static const char *const names[] = {
        [UP_IDLE] = "idle",          [UP_RESOLVING] = "resolve", [UP_CONNECTING] = "connect",
        [UP_GREETING] = "greeting",  [UP_EHLO] = "ehlo",         [UP_STARTTLS] = "starttls",
        [UP_HANDSHAKE] = "tls",      [UP_READY] = "ready",       [UP_CLOSED] = "closed",
        [UP_XEHLO] = "xclient-ehlo", [UP_XCLIENT] = "xclient",
    };
    return names[p];
}

static const struct upstream_cfg *ucfg(const struct session *s)
{
    return s->li->up->cfg;
}

/* The address being tried (or last tried). */
static const struct upstream_addr *uaddr(const struct session *s)
{
    return &ucfg(s)->addrs[s->up_addr];
}

/* Is there a resolved address after the one being tried? */
static int has_next_address(const struct session *s)
{
    return s->target + 1 < s->li->up->ntargets;
}

static void dial_next(struct session *s);

/* Closes the current attempt and tries the next resolved address. */
static void redial(struct session *s, const char *why)
{
    char q[220];

    log_quote(q, sizeof(q), why, strlen(why));
    slog(s, LOG_LVL_INFO, "event=upstream_retry upstream=%s stage=%s reason=%s", uaddr(s)->spec,
         stage_name(s->uphase), q);
    metrics_failover();
    conn_release(&s->u);
    s->u.tls_version = s->u.tls_cipher = NULL;
    s->u.handshaking = s->u.tls_up = 0;
    s->u.retry_src = WSRC_NONE;
    s->resume_offered = s->resume_retried = 0;
    s->target++;
    dial_next(s);
}

void upstream_fail(struct session *s, const char *reply, const char *fmt, ...)
{
    char what[200], q[220];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    /* Failover: an address that does not connect, or connects but does
     * not greet with 220 (down, overloaded, shutting down), is skipped for
     * the next one. Nothing has been said to the upstream yet and nothing
     * from it reached the client, so another server can take over. */
    if ((s->uphase == UP_CONNECTING || s->uphase == UP_GREETING) && s->closing == CLOSE_NO &&
        has_next_address(s)) {
        redial(s, what);
        return;
    }
    log_quote(q, sizeof(q), what, strlen(what));
    session_end_kind(s, END_UPSTREAM);
    slog(s, LOG_LVL_WARNING, "event=upstream_failed client=%s upstream=%s stage=%s reason=%s",
         s->peer_str, s->uphase <= UP_RESOLVING ? ucfg(s)->address : uaddr(s)->spec,
         stage_name(s->uphase), q);
    session_finish(s, reply ? reply : R_FAILED, "upstream %s failed: %s", stage_name(s->uphase),
                   what);
}

static void dial_next(struct session *s)
{
    const struct upstream_rt *up = s->li->up;
    int fd, one = 1;
    char err[128] = "no address";

    for (; s->target < up->ntargets; s->target++) {
        const struct upstream_target *t = &up->targets[s->target];
        s->up_addr = t->addr;
        fd = socket(t->sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd == -1) {
            snprintf(err, sizeof(err), "socket: %s", strerror(errno));
            continue;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (connect(fd, (const struct sockaddr *)&t->sa, t->salen) == -1 && errno != EINPROGRESS) {
            snprintf(err, sizeof(err), "connect to %s: %s", ucfg(s)->addrs[t->addr].spec,
                     strerror(errno));
            close(fd);
            continue;
        }
        session_upstream_fd(s, fd);
        s->u.readable = 0;
        s->u.writable = 0;
        s->u.eof = s->u.failed = s->u.shut = 0;
        s->uphase = UP_CONNECTING;
        conn_deadline(&s->u, ucfg(s)->connect_timeout);
        return;
    }
    s->uphase = UP_CONNECTING;
    s->target = up->ntargets; /* nothing left to fail over to */
    upstream_fail(s, R_UNREACHABLE, "cannot connect to %s: %s", ucfg(s)->address, err);
}

/* Dials the first address, or waits for a name still being resolved. */
static void dial_first(struct session *s)
{
    struct upstream_rt *up = s->li->up;

    if (up->ntargets == 0) {
        if (up->lookup != NULL && s->uphase == UP_IDLE) {
            /* A name new in a reload: its first answer is on the way. */
            s->uphase = UP_RESOLVING;
            conn_deadline(&s->u, ucfg(s)->connect_timeout);
            return;
        }
        if (s->uphase == UP_RESOLVING && up->lookup != NULL)
            return;
        upstream_rt_refresh(up);
        s->uphase = UP_CONNECTING;
        s->target = 0;
        upstream_fail(s, R_UNREACHABLE, "cannot resolve %s: %s", ucfg(s)->address,
                      up->resolve_err[0] ? up->resolve_err : "no address");
        return;
    }
    s->target = 0;
    dial_next(s);
}

void upstream_start(struct session *s)
{
    if (s->uphase != UP_IDLE)
        return;
    s->dial_start = ev_now(EV_DEFAULT);
    dial_first(s);
}

/* Closes the current attempt and dials the same address again. */
static void redial_same(struct session *s, const char *why)
{
    slog(s, LOG_LVL_INFO,
         "event=upstream_resume_failed upstream=%s reason=\"%s\" msg=\"retrying "
         "with a full handshake\"",
         uaddr(s)->spec, why);
    conn_release(&s->u);
    s->u.tls_version = s->u.tls_cipher = NULL;
    s->u.handshaking = s->u.tls_up = 0;
    s->u.retry_src = WSRC_NONE;
    dial_next(s);
}

static void send_line(struct session *s, const char *fmt, const char *arg)
{
    char line[300];
    int n = snprintf(line, sizeof(line), fmt, arg);

    if (n > 0 && (size_t)n < sizeof(line))
        conn_queue(&s->u, line, (size_t)n);
}

static void enter(struct session *s, enum upstream_phase p)
{
    slog(s, LOG_LVL_DEBUG, "event=upstream_state from=%s to=%s", stage_name(s->uphase),
         stage_name(p));
    s->uphase = p;
    if (p == UP_READY)
        conn_deadline(&s->u, 0);
    else
        conn_deadline(&s->u, ucfg(s)->reply_timeout);
}

static void start_tls(struct session *s)
{
    WOLFSSL *ssl = tls_client_ssl(s->li->up->ctx, ucfg(s), uaddr(s)->server_name, s->u.fd);
    WOLFSSL_SESSION *resume = s->li->up->resume[s->up_addr];

    if (ssl == NULL) {
        upstream_fail(s, NULL, "cannot create TLS session");
        return;
    }
    if (resume != NULL && !s->resume_retried && wolfSSL_set_session(ssl, resume) == WOLFSSL_SUCCESS)
        s->resume_offered = 1;
    conn_start_tls(&s->u, ssl);
    /* Nothing can arrive before our ClientHello: wait for the read event
     * rather than try a read that fails with EAGAIN. */
    s->u.drained = 1;
    enter(s, UP_HANDSHAKE);
}

/*
 * The PROXY header goes out first on the fresh connection, before TLS; it is
 * small enough for an empty socket buffer, so it is written directly rather
 * than queued (a queued header could lose the race with the ClientHello).
 */
static int send_proxy_header(struct session *s)
{
    uint8_t hdr[PP_MAX_HEADER];
    size_t n = pp_build(ucfg(s)->proxy_protocol, &s->peer, &s->local, hdr, sizeof(hdr));

    /* Unknown family (cannot happen for TCP): say so honestly. */
    if (n == 0)
        n = pp_build_local(ucfg(s)->proxy_protocol, hdr, sizeof(hdr));
    if (send(s->u.fd, hdr, n, MSG_NOSIGNAL) != (ssize_t)n) {
        upstream_fail(s, NULL, "cannot send the PROXY header: %s", strerror(errno));
        return -1;
    }
    return 0;
}

/* XCLIENT (Postfix XCLIENT_README): the real client's address and port. */
static void send_xclient(struct session *s)
{
    char ip[64], port[16], a[80], b[32], line[200];
    const char *fam = s->peer.ss_family == AF_INET6 ? "IPV6:" : "";

    /* peer_ip is printable already; IPv6 addresses take an "IPV6:" prefix. */
    snprintf(ip, sizeof(ip), "%s%s", fam, s->peer_ip);
    snprintf(port, sizeof(port), "%u",
             ntohs(s->peer.ss_family == AF_INET6
                       ? ((const struct sockaddr_in6 *)&s->peer)->sin6_port
                       : ((const struct sockaddr_in *)&s->peer)->sin_port));
    smtp_xtext(ip, a, sizeof(a));
    smtp_xtext(port, b, sizeof(b));
    snprintf(line, sizeof(line), "XCLIENT ADDR=%s PORT=%s\r\n", a, b);
    conn_queue(&s->u, line, strlen(line));
}

static int connected(struct session *s)
{
    int err = 0;
    socklen_t len = sizeof(err);

    if (!s->u.writable)
        return 0;
    if (getsockopt(s->u.fd, SOL_SOCKET, SO_ERROR, &err, &len) == -1)
        err = errno;
    if (err != 0) {
        if (err == EINPROGRESS || err == EALREADY) {
            s->u.writable = 0;
            return 0;
        }
        upstream_fail(s, R_UNREACHABLE, "cannot connect to %s: %s", uaddr(s)->spec, strerror(err));
        return 1;
    }
    s->u.readable = 1;
    if (ucfg(s)->proxy_protocol && send_proxy_header(s) == -1)
        return 0;
    if (ucfg(s)->tls == UPSTREAM_TLS_IMPLICIT)
        start_tls(s);
    else
        enter(s, UP_GREETING);
    return 1;
}

/* One complete reply during the dialogue (left in the buffer for the caller
 * to inspect and consume), or 0 if it is not there yet. */
static int dialogue_reply(struct session *s, struct smtp_reply *r)
{
    struct conn *u = &s->u;
    const char *err;
    enum smtp_reply_status st;
    char a[64];

    if (u->in.len == 0) {
        if (u->eof)
            upstream_fail(s, NULL, "connection closed by upstream while waiting for %s%s",
                          stage_name(s->uphase), tls_peer_alert(u->ssl, a, sizeof(a)));
        return 0;
    }
    st = smtp_parse_reply(u->in.data + u->in.off, u->in.len, r, &err);
    if (st == SMTP_REPLY_ERROR) {
        upstream_fail(s, NULL, "malformed %s reply: %s", stage_name(s->uphase), err);
        return 0;
    }
    if (st == SMTP_REPLY_INCOMPLETE) {
        if (u->eof)
            upstream_fail(s, NULL, "connection closed by upstream in the middle of a reply%s",
                          tls_peer_alert(u->ssl, a, sizeof(a)));
        else if (conn_in_room(u) == 0)
            upstream_fail(s, NULL, "reply longer than buffer_size");
        return 0;
    }
    /* RFC 2920 forbids an unrequested reply; after STARTTLS's 220 it would be
     * a response injection (the bytes were sent before TLS). */
    if (u->in.len != r->len) {
        upstream_fail(s, NULL, "%u unexpected bytes after the %s reply%s",
                      (unsigned)(u->in.len - r->len), stage_name(s->uphase),
                      s->uphase == UP_STARTTLS ? " (response injection)" : "");
        return 0;
    }
    return 1;
}

static void ready(struct session *s)
{
    metrics_dial(ev_now(EV_DEFAULT) - s->dial_start, s->up_resumed);
    enter(s, UP_READY);
    slog(s, LOG_LVL_DEBUG, "event=upstream_ready upstream=%s tls=%s", uaddr(s)->spec,
         s->u.tls_version ? s->u.tls_version : "none");
}

/* The TLS part of the dialogue is done: XCLIENT if configured, else ready. */
static void dialogue_done(struct session *s)
{
    if (!ucfg(s)->xclient) {
        ready(s);
        return;
    }
    send_line(s, "EHLO %s\r\n", s->cfg->hostname);
    enter(s, UP_XEHLO);
}

int upstream_wants_read(const struct session *s)
{
    const struct conn *u = &s->u;

    if (s->closing != CLOSE_NO || u->fd == -1 || u->eof || u->failed || conn_in_room(u) == 0)
        return 0;
    return s->uphase == UP_GREETING || s->uphase == UP_EHLO || s->uphase == UP_STARTTLS ||
           s->uphase == UP_XEHLO || s->uphase == UP_XCLIENT || s->uphase == UP_READY;
}

int upstream_step(struct session *s)
{
    struct conn *u = &s->u;
    struct smtp_reply r;
    int progress = 0, n;

    switch (s->uphase) {
    case UP_IDLE:
    case UP_CLOSED:
        return 0;
    case UP_RESOLVING:
        if (s->li->up->lookup != NULL)
            return 0;
        dial_first(s);
        return 1;
    case UP_CONNECTING:
        return connected(s);
    case UP_HANDSHAKE:
        n = conn_handshake(u, 0);
        if (n < 0) {
            /* A session the server no longer takes must not poison later
             * dials, nor cost this client its session: forget it and dial
             * again once with a full handshake. */
            if (s->resume_offered) {
                struct upstream_rt *up = s->li->up;
                if (up->resume[s->up_addr] != NULL) {
                    wolfSSL_SESSION_free(up->resume[s->up_addr]);
                    up->resume[s->up_addr] = NULL;
                }
                s->resume_offered = 0;
                s->resume_retried = 1;
                redial_same(s, u->errmsg);
                return 1;
            }
            metrics_tls_failure("upstream",
                                strstr(u->errmsg, "certificate") ? "certificate" : "handshake");
            upstream_fail(s, NULL, "TLS handshake with %s (name %s) failed: %s", uaddr(s)->spec,
                          uaddr(s)->server_name, u->errmsg);
            return 0;
        }
        if (n == 0)
            return 0;
        s->up_resumed = wolfSSL_session_reused(u->ssl) == 1;
        slog(s, LOG_LVL_DEBUG, "event=upstream_tls version=%s cipher=%s resumed=%s", u->tls_version,
             u->tls_cipher, s->up_resumed ? "yes" : "no");
        if (ucfg(s)->tls == UPSTREAM_TLS_IMPLICIT)
            enter(s, UP_GREETING);
        else
            dialogue_done(s);
        return 1;
    default:
        break;
    }
    if (upstream_wants_read(s)) {
        n = conn_fill(u);
        if (n > 0)
            progress = 1;
        else if (n < 0 && u->failed) {
            if (s->uphase == UP_READY && s->cphase == CP_SPLICE)
                session_close(s, "upstream read failed: %s", u->errmsg);
            else
                upstream_fail(s, NULL, "read failed: %s", u->errmsg);
            return 0;
        }
    }
    switch (s->uphase) {
    case UP_GREETING:
        if (!dialogue_reply(s, &r))
            break;
        if (r.code != 220) {
            upstream_fail(s, NULL, "greeting was %d, not 220", r.code);
            break;
        }
        /* Pre-TLS text from the upstream is never shown to the client. */
        conn_consume(u, (uint32_t)r.len);
        if (ucfg(s)->tls == UPSTREAM_TLS_STARTTLS) {
            send_line(s, "EHLO %s\r\n", s->cfg->hostname);
            enter(s, UP_EHLO);
        } else {
            dialogue_done(s);
        }
        progress = 1;
        break;
    case UP_EHLO:
        if (!dialogue_reply(s, &r))
            break;
        if (r.code != 250) {
            upstream_fail(s, NULL, "EHLO refused with %d", r.code);
            break;
        }
        /* Exact keyword match: XSTARTTLS, STARTTLSX or "250-host STARTTLS"
         * do not count. */
        if (!smtp_ehlo_has(u->in.data + u->in.off, r.len, "STARTTLS")) {
            upstream_fail(s, NULL, "upstream does not offer STARTTLS (refusing plaintext)");
            break;
        }
        conn_consume(u, (uint32_t)r.len);
        send_line(s, "STARTTLS\r\n%s", "");
        enter(s, UP_STARTTLS);
        progress = 1;
        break;
    case UP_STARTTLS:
        if (!dialogue_reply(s, &r))
            break;
        if (r.code != 220) {
            upstream_fail(s, NULL, "STARTTLS refused with %d", r.code);
            break;
        }
        conn_consume(u, (uint32_t)r.len);
        start_tls(s);
        progress = 1;
        break;
    case UP_XEHLO:
        if (!dialogue_reply(s, &r))
            break;
        if (r.code != 250) {
            upstream_fail(s, NULL, "EHLO after TLS refused with %d", r.code);
            break;
        }
        if (smtp_ehlo_has(u->in.data + u->in.off, r.len, "XCLIENT")) {
            conn_consume(u, (uint32_t)r.len);
            send_xclient(s);
            enter(s, UP_XCLIENT);
        } else {
            conn_consume(u, (uint32_t)r.len);
            slog(s, LOG_LVL_WARNING,
                 "event=xclient_unavailable upstream=%s msg=\"the upstream does not offer "
                 "XCLIENT to us; it sees the proxy's address, not the client's\"",
                 uaddr(s)->spec);
            ready(s);
        }
        progress = 1;
        break;
    case UP_XCLIENT:
        if (!dialogue_reply(s, &r))
            break;
        /* Success is a fresh 220 greeting, which nobody is shown. */
        if (r.code != 220) {
            upstream_fail(s, NULL, "XCLIENT refused with %d", r.code);
            break;
        }
        conn_consume(u, (uint32_t)r.len);
        ready(s);
        progress = 1;
        break;
    case UP_READY:
        /* In the follower, replies are read by client.c; here only the end
         * of the connection before the splice matters. */
        if (s->cphase != CP_SPLICE && u->eof && u->in.len == 0) {
            char a[64];
            session_finish(s, R_FAILED, "upstream closed the connection%s",
                           tls_peer_alert(u->ssl, a, sizeof(a)));
        }
        break;
    default:
        break;
    }
    return progress;
}

void upstream_save_tls_session(struct session *s)
{
    struct upstream_rt *up = s->li->up;
    WOLFSSL_SESSION *sess;

    /* Only a cleanly used connection: a failed or unverified one must not
     * seed later handshakes. TLS 1.3 tickets arrive after the handshake, so
     * this runs when the session ends, not when TLS comes up. */
    if (s->u.ssl == NULL || !s->u.tls_up || s->u.failed || s->uphase != UP_READY)
        return;
    /* Only sessions from full handshakes: a ticket received on a resumed
     * TLS 1.3 connection, offered again, made Postfix (OpenSSL) fail the
     * PSK binder check ("binder does not verify") on every later dial --
     * seen in the e2e tests with wolfSSL 5.5.4. The first ticket stays
     * valid for its lifetime, so nothing is lost. */
    if (s->up_resumed)
        return;
    sess = wolfSSL_get1_session(s->u.ssl);
    if (sess == NULL)
        return;
    /* TLS 1.3 resumes only with a ticket, which arrives after the
     * handshake: a session that ended before reading one is useless. */
    if ((strcmp(s->u.tls_version, "TLSv1.3") == 0 ? wolfSSL_SESSION_has_ticket(sess)
                                                  : wolfSSL_SESSION_is_resumable(sess)) != 1) {
        wolfSSL_SESSION_free(sess);
        return;
    }
    if (up->resume[s->up_addr])
        wolfSSL_SESSION_free(up->resume[s->up_addr]);
    up->resume[s->up_addr] = sess;
}

void upstream_timeout(struct session *s)
{
    if (s->closing != CLOSE_NO)
        return;
    if (s->uphase == UP_RESOLVING) {
        s->uphase = UP_CONNECTING;
        upstream_fail(s, R_UNREACHABLE, "timeout resolving %s (%gs)", ucfg(s)->address,
                      ucfg(s)->connect_timeout);
        return;
    }
    if (s->uphase == UP_CONNECTING) {
        upstream_fail(s, R_UNREACHABLE, "timeout connecting to %s (%gs)", uaddr(s)->spec,
                      ucfg(s)->connect_timeout);
        return;
    }
    if (s->uphase == UP_HANDSHAKE)
        metrics_tls_failure("upstream", "timeout");
    upstream_fail(s, NULL, "timeout waiting for the upstream's %s (%gs)",
                  s->uphase == UP_READY ? "reply" : stage_name(s->uphase), ucfg(s)->reply_timeout);
}
