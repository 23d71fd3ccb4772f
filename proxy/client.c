/*
 * client.c - the client-facing dialogue: greeting, the pre-TLS dialogue the
 * proxy answers itself, STARTTLS, and the command follower that relays the
 * first commands after TLS one at a time (so that the upstream's EHLO reply
 * can be edited) until the session is spliced.
 */
#include "session.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "log.h"
#include "proxyproto.h"

#define R_530        "530 5.7.0 Must issue a STARTTLS command first\r\n"
#define R_503_TLS    "503 5.5.1 TLS already active\r\n"
#define R_250_OK     "250 2.0.0 OK\r\n"
#define R_READY      "220 2.0.0 Ready to start TLS\r\n"
#define R_LONG       "500 5.5.2 Line too long\r\n"
#define R_ERRS       "421 4.7.0 Too many errors, closing connection\r\n"
#define R_TIMEOUT    "421 4.4.2 Timeout exceeded, closing connection\r\n"
#define R_AUTH_REQ   "530 5.7.0 Authentication required\r\n"
#define R_LONG_FATAL "500 5.5.2 Line too long, closing connection\r\n"
#define R_INJECT     "421 4.7.0 STARTTLS must be the last command before TLS, closing connection\r\n"

/* Room needed in the out queue before a command is answered: the longest
 * reply we generate (the EHLO reply, with a 255-byte host name). */
#define REPLY_ROOM 384

static void queue_fmt(struct session *s, const char *fmt, const char *arg)
{
    char line[REPLY_ROOM];
    int n = snprintf(line, sizeof(line), fmt, arg);

    if (n > 0 && (size_t)n < sizeof(line))
        conn_queue(&s->c, line, (size_t)n);
}

static void greet(struct session *s)
{
    queue_fmt(s, "220 %s ESMTP\r\n", s->cfg->hostname);
}

static void start_handshake_with(struct session *s, WOLFSSL_CTX *ctx)
{
    WOLFSSL *ssl = wolfSSL_new(ctx);

    if (ssl == NULL || wolfSSL_set_fd(ssl, s->c.fd) != WOLFSSL_SUCCESS) {
        wolfSSL_free(ssl);
        session_close(s, "cannot create TLS session (out of memory)");
        return;
    }
    conn_start_tls(&s->c, ssl);
    s->cphase = CP_HANDSHAKE;
    conn_deadline(&s->c, s->cfg->handshake_timeout);
}

/*
 * With several certificates the ClientHello is read first and the session's
 * TLS object made from the context its SNI selects, so that everything
 * wolfSSL derives from the context while parsing the hello -- in TLS 1.3 the
 * stapled OCSP response among it -- belongs to the certificate sent. (The
 * SNI callback of tls.c only switches the certificate after the hello is
 * parsed; it remains for a hello split over several records.) The bytes
 * read are handed to wolfSSL by conn_start_tls().
 */
static void start_handshake(struct session *s)
{
    if (s->li->sni != NULL) {
        s->cphase = CP_HELLO;
        conn_deadline(&s->c, s->cfg->handshake_timeout);
        return;
    }
    start_handshake_with(s, s->li->ctx);
}

#define TLS_RECORD_HEADER 5
#define TLS_HANDSHAKE     22

static int client_hello(struct session *s)
{
    struct conn *c = &s->c;
    const unsigned char *p;
    WOLFSSL_CTX *ctx = NULL;
    int r = conn_fill(c);

    if (r < 0) {
        session_end_kind(s, c->failed ? END_IO : END_CLIENT_TLS);
        session_close(s, "client %s before the TLS handshake",
                      c->failed ? "read failed" : "closed the connection");
        return 0;
    }
    p = (const unsigned char *)c->in.data + c->in.off;
    if (c->in.len >= TLS_RECORD_HEADER) {
        size_t rec = TLS_RECORD_HEADER + ((size_t)p[3] << 8 | p[4]);
        if (p[0] != TLS_HANDSHAKE) {
            ctx = s->li->ctx; /* not TLS: let wolfSSL say what is wrong */
        } else if (c->in.len >= rec) {
            unsigned char name[256];
            word32 len = sizeof(name) - 1;
            if (wolfSSL_SNI_GetFromBuffer(p, (word32)rec, WOLFSSL_SNI_HOST_NAME, name, &len) ==
                    WOLFSSL_SUCCESS &&
                len < sizeof(name)) {
                name[len] = '\0';
                ctx = tls_sni_lookup(s->li->sni, (const char *)name);
            } else {
                ctx = s->li->ctx;
            }
        } else if (conn_in_room(c) == 0) {
            ctx = s->li->ctx; /* a hello larger than the buffer: the callback decides */
        }
    }
    if (ctx == NULL)
        return r > 0;
    start_handshake_with(s, ctx);
    return 1;
}

/* allow_from, for the client named by a PROXY header (empty: everyone). */
static int allowed_from(const struct session *s)
{
    const struct listener_cfg *li = s->li->cfg;

    return li->nallow_from == 0 || cidr_list_match(li->allow_from, li->nallow_from, &s->peer);
}

static void client_begin(struct session *s)
{
    if (s->li->cfg->mode == LISTENER_IMPLICIT) {
        start_handshake(s);
        return;
    }
    greet(s);
    conn_deadline(&s->c, s->cfg->command_timeout);
    if (cidr_list_match(s->li->cfg->allow, s->li->cfg->nallow, &s->peer)) {
        s->plaintext_ok = 1;
        s->cphase = CP_FOLLOW;
        upstream_start(s);
    } else {
        s->cphase = CP_PRETLS;
    }
}

void client_start(struct session *s)
{
    if (s->li->cfg->accept_proxy) {
        /* The header comes before anything else, TLS included. */
        s->cphase = CP_PROXY;
        conn_deadline(&s->c, s->cfg->handshake_timeout);
        return;
    }
    client_begin(s);
}

/*
 * The PROXY header from a trusted load balancer (HAProxy proxy-protocol.txt).
 * Read with MSG_PEEK first and consumed only up to its exact end, so the
 * bytes after it -- a TLS ClientHello on an implicit listener, or the first
 * command -- stay in the socket for whoever reads next. Bytes of a header
 * that is still incomplete are all header bytes, so they are consumed as
 * they come (otherwise a peeked, unconsumed prefix would keep the fd
 * readable and spin the loop).
 */
static int proxy_header(struct session *s)
{
    struct conn *c = &s->c;
    struct pp_result res;
    const char *err;
    ssize_t n;
    int r;

    if (!c->readable)
        return 0;
    if (s->pp == NULL && (s->pp = malloc(PP_MAX_HEADER)) == NULL) {
        session_close(s, "out of memory reading the PROXY header");
        return 0;
    }
    n = recv(c->fd, s->pp + s->pp_len, PP_MAX_HEADER - s->pp_len, MSG_PEEK);
    if (n == 0) {
        session_close(s, "connection closed before a complete PROXY header");
        return 0;
    }
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
            c->readable = 0;
            return 0;
        }
        session_close(s, "read failed before the PROXY header: %s", strerror(errno));
        return 0;
    }
    r = pp_parse(s->pp, s->pp_len + (size_t)n, &res, &err);
    if (r == 0) {
        if (recv(c->fd, s->pp + s->pp_len, (size_t)n, 0) != n) {
            session_close(s, "cannot consume the PROXY header");
            return 0;
        }
        s->pp_len += (size_t)n;
        if (s->pp_len >= PP_MAX_HEADER)
            err = "PROXY header too long";
        else
            return 1;
    }
    if (r < 0 || err != NULL) {
        session_end_kind(s, END_REFUSED);
        slog(s, LOG_LVL_WARNING, "event=proxy_rejected via=%s reason=\"%s\"", s->peer_str, err);
        session_close(s, "bad PROXY header: %s", err);
        return 0;
    }
    size_t rest = (size_t)r - s->pp_len;
    if (rest > 0 && recv(c->fd, s->pp + s->pp_len, rest, 0) != (ssize_t)rest) {
        session_close(s, "cannot consume the PROXY header");
        return 0;
    }
    free(s->pp);
    s->pp = NULL;
    snprintf(s->via, sizeof(s->via), "%s", s->peer_str);
    if (!res.local) {
        if (session_set_peer(s, &res.src) == -1) {
            slog(s, LOG_LVL_WARNING,
                 "event=reject listener=%s cap=max_sessions_per_ip client=%s via=%s",
                 s->li->cfg->name, s->peer_str, s->via);
            session_end_kind(s, END_REFUSED);
            session_close(s, "max_sessions_per_ip reached for %s", s->peer_ip);
            return 0;
        }
        s->local = res.dst;
    }
    slog(s, LOG_LVL_DEBUG, "event=proxy_header version=%d client=%s via=%s", res.version,
         s->peer_str, s->via);
    if (!allowed_from(s)) {
        slog(s, LOG_LVL_INFO, "event=reject listener=%s cap=allow_from client=%s via=%s",
             s->li->cfg->name, s->peer_str, s->via);
        session_end_kind(s, END_REFUSED);
        session_close(s, "client not in allow_from");
        return 0;
    }
    client_begin(s);
    return 1;
}

int client_wants_read(const struct session *s)
{
    const struct conn *c = &s->c;

    if (s->closing != CLOSE_NO || c->eof || c->failed || conn_in_room(c) == 0)
        return 0;
    return s->cphase == CP_PROXY || s->cphase == CP_HELLO || s->cphase == CP_PRETLS ||
           s->cphase == CP_FOLLOW || s->cphase == CP_SPLICE;
}

void client_count_error(struct session *s)
{
    if (++s->errors >= s->cfg->max_errors) {
        session_end_kind(s, END_ERRORS);
        session_finish(s, R_ERRS, "too many errors (%u)", s->errors);
    }
}

/*
 * STARTTLS received with bytes after it: those bytes were sent before the
 * client could know TLS would start, so they are an injection attempt
 * (CVE-2011-0411 and kin). We close rather than discard: a client that
 * pipelines past STARTTLS is either broken or hostile.
 */
static int starttls_injection(struct session *s)
{
    if (s->c.in.len == 0)
        return 0;
    slog(s, LOG_LVL_WARNING, "event=starttls_injection client=%s bytes=%u", s->peer_str,
         s->c.in.len);
    session_end_kind(s, END_INJECTION);
    session_finish(s, R_INJECT, "data pipelined after STARTTLS (command injection attempt)");
    return 1;
}

static void accept_starttls(struct session *s)
{
    conn_queue(&s->c, R_READY, strlen(R_READY));
    s->cphase = CP_STARTTLS;
    /* The handshake starts once the 220 is flushed; until then nothing is
     * read, so the first byte after it is the ClientHello, read by TLS. */
}

/* One command before TLS, answered by the proxy itself (RFC 3207 4). */
static void pretls_command(struct session *s, const char *line, size_t len)
{
    struct smtp_command cmd;
    const char *err = smtp_parse_command(line, len, &cmd);
    const char *host = s->cfg->hostname;

    if (err != NULL) {
        queue_fmt(s, "500 5.5.2 Syntax error: %s\r\n", err);
        client_count_error(s);
        return;
    }
    switch (cmd.verb) {
    case SMTP_VERB_EHLO:
        if (cmd.arg == NULL) {
            queue_fmt(s, "501 5.5.4 Syntax: EHLO hostname%s\r\n", "");
            client_count_error(s);
            break;
        }
        /* Our own short list: STARTTLS, never AUTH (RFC 4954 4: no
         * plaintext credentials) and nothing learned from the upstream. */
        queue_fmt(s, "250-%s\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n", host);
        break;
    case SMTP_VERB_HELO:
        if (cmd.arg == NULL) {
            queue_fmt(s, "501 5.5.4 Syntax: HELO hostname%s\r\n", "");
            client_count_error(s);
            break;
        }
        queue_fmt(s, "250 %s\r\n", host);
        break;
    case SMTP_VERB_NOOP:
    case SMTP_VERB_RSET:
        conn_queue(&s->c, R_250_OK, strlen(R_250_OK));
        break;
    case SMTP_VERB_QUIT:
        queue_fmt(s, "221 2.0.0 %s closing connection\r\n", host);
        session_finish(s, NULL, "client quit before TLS");
        break;
    case SMTP_VERB_STARTTLS:
        if (cmd.arg != NULL) {
            queue_fmt(s, "501 5.5.4 Syntax: STARTTLS%s\r\n", "");
            client_count_error(s);
            break;
        }
        if (!starttls_injection(s))
            accept_starttls(s);
        break;
    default:
        conn_queue(&s->c, R_530, strlen(R_530));
        client_count_error(s);
        break;
    }
}

static int pretls_lines(struct session *s)
{
    struct conn *c = &s->c;
    int progress = 0;
    size_t ll;

    while (c->in.len > 0 && s->cphase == CP_PRETLS && s->closing == CLOSE_NO &&
           c->out_len + REPLY_ROOM <= CONN_OUT_SIZE) {
        const char *p = c->in.data + c->in.off;
        if (!smtp_find_line(p, c->in.len, &ll)) {
            if (c->in.len <= SMTP_MAX_COMMAND_LINE)
                break;
            /* Over-long line: drop what we have and the rest of the line. */
            s->discard_line = 1;
            conn_consume(c, c->in.len);
            progress = 1;
            break;
        }
        char line[SMTP_MAX_COMMAND_LINE + 1];
        size_t n = ll;
        int too_long = s->discard_line || ll > SMTP_MAX_COMMAND_LINE;
        if (!too_long)
            memcpy(line, p, n);
        conn_consume(c, (uint32_t)ll);
        progress = 1;
        s->discard_line = 0;
        conn_deadline(c, s->cfg->command_timeout);
        if (too_long) {
            conn_queue(c, R_LONG, strlen(R_LONG));
            client_count_error(s);
            continue;
        }
        pretls_command(s, line, n);
    }
    if (c->eof && s->closing == CLOSE_NO && (c->in.len == 0 || s->cphase != CP_PRETLS))
        session_close(s, "client closed connection before TLS");
    return progress;
}

/* ---- after TLS (or for allowed plaintext clients): the follower ---- */

static char *scratch;
static size_t scratch_cap;

/*
 * The upstream's reply to a relayed EHLO: remove STARTTLS (the client is on
 * TLS with us, or may upgrade with us, never with the upstream) and, for a
 * plaintext client, advertise our own STARTTLS.
 */
static int edit_ehlo_reply(struct session *s, size_t rlen)
{
    struct conn *u = &s->u;
    const char *add = s->c.ssl == NULL ? "STARTTLS" : NULL;
    size_t need = rlen + 64, outlen;

    if (scratch_cap < need) {
        char *p = realloc(scratch, need);
        if (p == NULL)
            return -1;
        scratch = p;
        scratch_cap = need;
    }
    if (smtp_ehlo_filter(u->in.data + u->in.off, rlen, scratch, scratch_cap, "STARTTLS", add,
                         &outlen) == -1)
        return -1;
    /* Replace the reply in place; growing needs room in front (the reply
     * was read at the head of the buffer, so any growth fits in the slack
     * left by the command bytes already consumed, or at the tail). */
    if (outlen > rlen) {
        size_t grow = outlen - rlen;
        if (u->in.off >= grow) {
            u->in.off -= (uint32_t)grow;
            u->in.len += (uint32_t)grow;
        } else if (s->cfg->buffer_size - u->in.off - u->in.len >= grow) {
            memmove(u->in.data + u->in.off + outlen, u->in.data + u->in.off + rlen,
                    u->in.len - rlen);
            u->in.len += (uint32_t)grow;
        } else {
            return -1;
        }
    } else {
        size_t shrink = rlen - outlen;
        u->in.off += (uint32_t)shrink;
        u->in.len -= (uint32_t)shrink;
    }
    memcpy(u->in.data + u->in.off, scratch, outlen);
    u->pass = (uint32_t)outlen;
    return 0;
}

/*
 * The upstream's answer in an AUTH exchange (RFC 4954 4): 334 asks for
 * another client line, 235 ends it successfully and hands the session to the
 * splice, anything else is a failure, logged in a stable format for fail2ban
 * (config/fail2ban-filter.conf) and counted against max_errors.
 */
static void auth_result(struct session *s, int code)
{
    char user[80];

    if (code == 334) {
        s->in_auth = 1;
        return;
    }
    s->in_auth = 0;
    log_quote(user, sizeof(user), s->auth_user, strlen(s->auth_user));
    if (code == 235) {
        s->authed = 1;
        metrics_auth(1);
        slog(s, LOG_LVL_INFO, "event=auth_ok ip=%s user=%s", s->peer_ip, user);
        if (s->li->cfg->require_auth)
            splice_enter(s);
        return;
    }
    metrics_auth(0);
    slog(s, LOG_LVL_WARNING, "event=auth_failed ip=%s user=%s code=%d", s->peer_ip, user, code);
    client_count_error(s);
}

/* A complete reply from the upstream to the command we relayed. */
static int follow_reply(struct session *s)
{
    struct conn *u = &s->u;
    struct smtp_reply r;
    const char *err;
    enum smtp_reply_status st;

    /* Before READY the upstream's bytes belong to upstream.c and are never
     * shown to the client (pre-TLS text is unauthenticated). */
    if (s->uphase != UP_READY || u->in.len == 0)
        return 0;
    if (s->await == AWAIT_NONE) {
        /* Unsolicited (a 421 before closing, say): pass it on as is. */
        if (u->pass < u->in.len) {
            u->pass = u->in.len;
            return 1;
        }
        return 0;
    }
    if (u->pass > 0)
        return 0;
    st = smtp_parse_reply(u->in.data + u->in.off, u->in.len, &r, &err);
    if (st == SMTP_REPLY_INCOMPLETE) {
        if (conn_in_room(u) == 0)
            upstream_fail(s, NULL, "reply larger than buffer_size (%zu bytes)",
                          s->cfg->buffer_size);
        return 0;
    }
    if (st == SMTP_REPLY_ERROR) {
        upstream_fail(s, NULL, "malformed reply to relayed %s: %s",
                      s->await == AWAIT_EHLO ? "EHLO" : "command", err);
        return 0;
    }
    if (s->await == AWAIT_EHLO && r.code == 250) {
        if (edit_ehlo_reply(s, r.len) == -1) {
            upstream_fail(s, NULL, "EHLO reply too large to edit");
            return 0;
        }
    } else {
        u->pass = (uint32_t)r.len;
    }
    enum await was = s->await;
    s->await = AWAIT_NONE;
    conn_deadline(u, 0);
    conn_deadline(&s->c, s->cfg->command_timeout);
    if (was == AWAIT_AUTH)
        auth_result(s, r.code);
    return 1;
}

static void relay(struct session *s, size_t ll, enum await what)
{
    s->c.pass = (uint32_t)ll;
    s->await = what;
    conn_deadline(&s->c, 0);
    conn_deadline(&s->u, s->li->up->cfg->reply_timeout);
}

/* RFC 4954 4: a SASL response line may be up to 12288 octets. */
#define MAX_FOLLOW_LINE 12288

/* A line inside an AUTH exchange: relayed as is, never logged. */
static void auth_line(struct session *s, const char *p, size_t ll)
{
    size_t n = ll;

    while (n > 0 && (p[n - 1] == '\n' || p[n - 1] == '\r'))
        n--;
    /* The first response names the user (LOGIN: the user name alone). */
    if (s->auth_steps++ == 0 && s->auth_user[0] == '\0')
        smtp_sasl_user(s->auth_mech, p, n, s->auth_user, sizeof(s->auth_user));
    s->in_auth = 0;
    relay(s, ll, AWAIT_AUTH);
}

static void auth_command(struct session *s, const struct smtp_command *cmd, size_t ll)
{
    s->auth_mech = SASL_OTHER;
    s->auth_steps = 0;
    s->auth_user[0] = '\0';
    if (cmd->arg != NULL) {
        const char *sp = memchr(cmd->arg, ' ', cmd->arg_len);
        s->auth_mech = smtp_sasl_mech(cmd->arg, cmd->arg_len);
        /* An initial response (RFC 4954 4) counts as the first step. */
        if (sp != NULL) {
            size_t off = (size_t)(sp - cmd->arg) + 1;
            smtp_sasl_user(s->auth_mech, sp + 1, cmd->arg_len - off, s->auth_user,
                           sizeof(s->auth_user));
            s->auth_steps = 1;
        }
    }
    relay(s, ll, AWAIT_AUTH);
}

static int follow_lines(struct session *s)
{
    struct conn *c = &s->c;
    struct smtp_command cmd;
    int gate = s->li->cfg->require_auth && !s->authed;
    size_t ll;

    if (s->uphase != UP_READY) {
        /* A command is waiting for the upstream: from now on the upstream's
         * own deadlines bound the wait, not the client's. */
        if (ev_is_active(&c->timer) && c->in.len > 0 &&
            memchr(c->in.data + c->in.off, '\n', c->in.len) != NULL)
            conn_deadline(c, 0);
        return 0;
    }
    if (s->await != AWAIT_NONE || c->pass > 0 || conn_pending_out(c, &s->u) > 0)
        return 0;
    if (c->in.len == 0) {
        if (c->eof)
            session_close(s, "client closed connection");
        else if (!ev_is_active(&c->timer))
            conn_deadline(c, s->cfg->command_timeout);
        return 0;
    }
    const char *p = c->in.data + c->in.off;
    if (!smtp_find_line(p, c->in.len, &ll)) {
        if (c->eof) {
            session_close(s, "client closed connection in the middle of a line");
            return 0;
        }
        if (c->in.len <= SMTP_MAX_COMMAND_LINE ||
            (gate && c->in.len < MAX_FOLLOW_LINE && conn_in_room(c) > 0))
            return 0;
        /* Nothing we handle is this long. Without the gate, let the upstream
         * judge it; with the gate nothing may pass before AUTH. */
        if (!gate) {
            splice_enter(s);
            return 1;
        }
        session_finish(s, R_LONG_FATAL, "over-long line before authentication");
        return 0;
    }
    if (s->in_auth) {
        auth_line(s, p, ll);
        return 1;
    }
    if (smtp_parse_command(p, ll, &cmd) != NULL) {
        if (!gate) {
            splice_enter(s);
            return 1;
        }
        conn_consume(c, (uint32_t)ll);
        queue_fmt(s, "500 5.5.2 Syntax error%s\r\n", "");
        client_count_error(s);
        return 1;
    }
    switch (cmd.verb) {
    case SMTP_VERB_EHLO:
        relay(s, ll, AWAIT_EHLO);
        break;
    case SMTP_VERB_STARTTLS:
        conn_consume(c, (uint32_t)ll);
        if (c->ssl != NULL) {
            /* RFC 3207 4.2: no second handshake inside TLS. */
            conn_queue(c, R_503_TLS, strlen(R_503_TLS));
            client_count_error(s);
        } else if (cmd.arg != NULL) {
            queue_fmt(s, "501 5.5.4 Syntax: STARTTLS%s\r\n", "");
            client_count_error(s);
        } else if (!starttls_injection(s)) {
            accept_starttls(s);
        }
        break;
    case SMTP_VERB_XCLIENT:
        /* Only the proxy may speak XCLIENT to the upstream (SECURITY.md 5). */
        conn_consume(c, (uint32_t)ll);
        conn_queue(c, R_NO_XCLIENT, strlen(R_NO_XCLIENT));
        client_count_error(s);
        break;
    case SMTP_VERB_AUTH:
        if (c->ssl == NULL && !s->plaintext_ok) {
            conn_consume(c, (uint32_t)ll);
            conn_queue(c, R_530, strlen(R_530));
            client_count_error(s);
            break;
        }
        auth_command(s, &cmd, ll);
        break;
    case SMTP_VERB_MAIL:
    case SMTP_VERB_RCPT:
    case SMTP_VERB_DATA:
    case SMTP_VERB_BDAT:
        if (gate) {
            conn_consume(c, (uint32_t)ll);
            conn_queue(c, R_AUTH_REQ, strlen(R_AUTH_REQ));
            client_count_error(s);
            break;
        }
        splice_enter(s);
        break;
    case SMTP_VERB_QUIT:
        /* The upstream answers; but a client that never got past the AUTH
         * gate leaves before any mail could flow: not a completed session. */
        if (gate)
            session_end_kind(s, END_ABANDONED);
        splice_enter(s);
        break;
    default:
        /* HELO, NOOP, RSET, HELP, VRFY, unknown: one at a time while gated;
         * without the gate only the harmless ones keep us following. */
        if (gate || cmd.verb == SMTP_VERB_HELO || cmd.verb == SMTP_VERB_NOOP ||
            cmd.verb == SMTP_VERB_RSET)
            relay(s, ll, AWAIT_REPLY);
        else
            splice_enter(s);
        break;
    }
    return 1;
}

int client_step(struct session *s)
{
    struct conn *c = &s->c;
    int progress = 0, r;

    switch (s->cphase) {
    case CP_PROXY:
        return proxy_header(s);
    case CP_HELLO:
        return client_hello(s);
    case CP_HANDSHAKE:
        r = conn_handshake(c, 1);
        if (r < 0) {
            session_end_kind(s, END_CLIENT_TLS);
            metrics_tls_failure("client", "handshake");
            session_close(s, "client TLS handshake failed: %s", c->errmsg);
            return 0;
        }
        if (r == 0)
            return 0;
        slog(s, LOG_LVL_DEBUG, "event=client_tls version=%s cipher=%s", c->tls_version,
             c->tls_cipher);
        if (wolfSSL_session_reused(c->ssl) == 1)
            metrics_client_resumed();
        /* RFC 3207 4.2: after STARTTLS the client starts afresh with EHLO and
         * gets no new greeting; after implicit TLS it gets the greeting. */
        if (!s->client_tls_seen && s->li->cfg->mode == LISTENER_IMPLICIT)
            greet(s);
        s->client_tls_seen = 1;
        s->cphase = CP_FOLLOW;
        conn_deadline(c, s->cfg->command_timeout);
        upstream_start(s);
        return 1;
    case CP_STARTTLS:
        if (c->out_len > 0)
            return 0;
        start_handshake(s);
        return 1;
    case CP_PRETLS:
    case CP_FOLLOW:
    case CP_SPLICE:
        break;
    }
    if (client_wants_read(s)) {
        r = conn_fill(c);
        if (r > 0)
            progress = 1;
        else if (r < 0 && c->failed) {
            session_end_kind(s, END_IO);
            session_close(s, "client read failed: %s", c->errmsg);
            return 0;
        }
    }
    if (s->cphase == CP_PRETLS)
        progress |= pretls_lines(s);
    else if (s->cphase == CP_FOLLOW && s->closing == CLOSE_NO) {
        progress |= follow_reply(s);
        if (s->closing == CLOSE_NO && s->cphase == CP_FOLLOW)
            progress |= follow_lines(s);
    }
    return progress;
}

void client_timeout(struct session *s)
{
    if (s->closing != CLOSE_NO) {
        session_close(s, "timeout while flushing the last reply");
        return;
    }
    switch (s->cphase) {
    case CP_PROXY:
        session_end_kind(s, END_TIMEOUT);
        session_close(s, "no complete PROXY header within %gs", s->cfg->handshake_timeout);
        break;
    case CP_HELLO:
    case CP_HANDSHAKE:
        session_end_kind(s, END_TIMEOUT);
        metrics_tls_failure("client", "timeout");
        session_close(s, "client TLS handshake timeout (%gs)", s->cfg->handshake_timeout);
        break;
    case CP_STARTTLS:
        session_close(s, "timeout while sending the STARTTLS reply");
        break;
    case CP_PRETLS:
    case CP_FOLLOW:
        session_end_kind(s, END_TIMEOUT);
        session_finish(s, R_TIMEOUT, "client command timeout (%gs)", s->cfg->command_timeout);
        break;
    case CP_SPLICE:
        splice_idle_check(s);
        break;
    }
}
