/*
 * session.c - session life cycle: creation, the progress loop, the one place
 * that frees a session, and its summary log line.
 */
#include "session.h"

#include <arpa/inet.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

/* ---- registry and per-address counts ---- */

static struct session *all_sessions;
static unsigned nsessions;
static uint64_t next_id;

#define IP_BUCKETS 4096

struct ip_count {
    struct ip_count *next;
    uint8_t addr[16];
    unsigned n;
};

static struct ip_count *ip_table[IP_BUCKETS];

/* A client address as 16 bytes (IPv4 as v4-mapped IPv6). */
static void addr_key(const struct sockaddr_storage *sa, uint8_t key[16])
{
    memset(key, 0, 16);
    if (sa->ss_family == AF_INET) {
        key[10] = key[11] = 0xff;
        memcpy(key + 12, &((const struct sockaddr_in *)sa)->sin_addr, 4);
    } else if (sa->ss_family == AF_INET6) {
        memcpy(key, &((const struct sockaddr_in6 *)sa)->sin6_addr, 16);
    }
}

static size_t addr_hash(const uint8_t key[16])
{
    uint64_t h = 1469598103934665603ULL;

    for (int i = 0; i < 16; i++)
        h = (h ^ key[i]) * 1099511628211ULL;
    return (size_t)(h % IP_BUCKETS);
}

static struct ip_count **ip_find(const struct sockaddr_storage *sa, uint8_t key[16])
{
    struct ip_count **pp;

    addr_key(sa, key);
    for (pp = &ip_table[addr_hash(key)]; *pp; pp = &(*pp)->next)
        if (memcmp((*pp)->addr, key, 16) == 0)
            break;
    return pp;
}

unsigned session_count(void)
{
    return nsessions;
}

unsigned session_count_ip(const struct sockaddr_storage *peer)
{
    uint8_t key[16];
    struct ip_count **pp = ip_find(peer, key);

    return *pp ? (*pp)->n : 0;
}

static int ip_inc(const struct sockaddr_storage *peer)
{
    uint8_t key[16];
    struct ip_count **pp = ip_find(peer, key);

    if (*pp == NULL) {
        *pp = calloc(1, sizeof(**pp));
        if (*pp == NULL)
            return -1;
        memcpy((*pp)->addr, key, 16);
    }
    (*pp)->n++;
    return 0;
}

static void ip_dec(const struct sockaddr_storage *peer)
{
    uint8_t key[16];
    struct ip_count **pp = ip_find(peer, key), *e = *pp;

    if (e == NULL)
        return;
    if (--e->n == 0) {
        *pp = e->next;
        free(e);
    }
}

/* ---- callbacks ---- */

static struct session *session_of(ev_io *w, int *upstream)
{
    struct conn *c = w->data;

    *upstream = c == &c->s->u;
    return c->s;
}

static void read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    int up;
    struct session *s = session_of(w, &up);

    (void)loop;
    (void)revents;
    (up ? &s->u : &s->c)->readable = 1;
    session_run(s);
}

static void write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    int up;
    struct session *s = session_of(w, &up);

    (void)loop;
    (void)revents;
    (up ? &s->u : &s->c)->writable = 1;
    session_run(s);
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct conn *c = w->data;
    struct session *s = c->s;

    (void)loop;
    (void)revents;
    if (c == &s->u)
        upstream_timeout(s);
    else
        client_timeout(s);
    session_run(s);
}

static void conn_watchers_init(struct conn *c)
{
    ev_io_init(&c->rio, read_cb, c->fd, EV_READ);
    ev_io_init(&c->wio, write_cb, c->fd, EV_WRITE);
    ev_init(&c->timer, timer_cb);
    c->rio.data = c->wio.data = c->timer.data = c;
}

void session_upstream_fd(struct session *s, int fd)
{
    s->u.fd = fd;
    ev_io_set(&s->u.rio, fd, EV_READ);
    ev_io_set(&s->u.wio, fd, EV_WRITE);
}

/* ---- creation ---- */

static void format_peer(struct session *s);

int session_set_peer(struct session *s, const struct sockaddr_storage *peer)
{
    unsigned cap = s->cfg->max_sessions_per_ip;

    s->peer = *peer;
    format_peer(s);
    if (cap && session_count_ip(peer) >= cap)
        return -1;
    if (ip_inc(peer) == -1)
        return -1;
    ip_dec(&s->tcp_peer);
    s->tcp_peer = *peer; /* the address counted for this session */
    return 0;
}

static void format_peer(struct session *s)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    unsigned port = 0;

    if (s->peer.ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)&s->peer;
        inet_ntop(AF_INET, &a->sin_addr, ip, sizeof(ip));
        port = ntohs(a->sin_port);
        snprintf(s->peer_str, sizeof(s->peer_str), "%s:%u", ip, port);
    } else if (s->peer.ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&s->peer;
        inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof(ip));
        port = ntohs(a->sin6_port);
        snprintf(s->peer_str, sizeof(s->peer_str), "[%s]:%u", ip, port);
    } else {
        snprintf(s->peer_str, sizeof(s->peer_str), "unknown");
    }
    snprintf(s->peer_ip, sizeof(s->peer_ip), "%s", ip);
}

int session_new(struct listener *li, int fd, const struct sockaddr_storage *peer)
{
    struct session *s = calloc(1, sizeof(*s));

    if (s == NULL || ip_inc(peer) == -1) {
        free(s);
        close(fd);
        return -1;
    }
    /* Random high bits make ids unique across restarts and workers. */
    if (next_id == 0)
        next_id = ((uint64_t)getpid() << 20 ^ (uint64_t)time(NULL) << 8) & 0xffffff00ULL;
    s->id = ++next_id;
    s->li = li;
    s->rt = li->rt;
    s->rt->refs++;
    s->cfg = s->rt->cfg;
    s->peer = *peer;
    s->tcp_peer = *peer;
    format_peer(s);
    socklen_t llen = sizeof(s->local);
    if (getsockname(fd, (struct sockaddr *)&s->local, &llen) == -1)
        memset(&s->local, 0, sizeof(s->local));
    conn_init(&s->c, s, fd);
    conn_watchers_init(&s->c);
    conn_init(&s->u, s, -1);
    conn_watchers_init(&s->u);
    s->started = s->last_activity = ev_now(EV_DEFAULT);
    s->m = metrics_listener(li->cfg->name);
    metrics_session_start(s->m);
    s->next = all_sessions;
    if (all_sessions)
        all_sessions->prev = s;
    all_sessions = s;
    nsessions++;
    slog(s, LOG_LVL_DEBUG, "event=accept client=%s listener=%s", s->peer_str, li->cfg->name);
    client_start(s);
    session_run(s);
    return 0;
}

/* ---- closing ---- */

static void vset_reason(struct session *s, const char *fmt, va_list ap)
{
    if (s->reason[0] == '\0')
        vsnprintf(s->reason, sizeof(s->reason), fmt, ap);
}

void session_close(struct session *s, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vset_reason(s, fmt, ap);
    va_end(ap);
    s->closing = CLOSE_NOW;
}

void session_finish(struct session *s, const char *reply, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vset_reason(s, fmt, ap);
    va_end(ap);
    if (s->closing == CLOSE_NOW)
        return;
    /* The upstream gets nothing more: not even what the client had queued. */
    if (s->u.fd != -1) {
        conn_shutdown_write(&s->u);
        conn_release(&s->u);
        s->uphase = UP_CLOSED;
    }
    s->c.pass = 0;
    /* A reply is only meaningful where the client can read it: in plaintext
     * before any TLS, or once its TLS is up. */
    if (reply != NULL && !s->c.handshaking && !s->c.failed && (s->c.ssl == NULL || s->c.tls_up))
        conn_queue(&s->c, reply, strlen(reply));
    s->closing = CLOSE_FLUSH;
    conn_deadline(&s->c, 5.0);
}

static const char *or_dash(const char *v)
{
    return v ? v : "-";
}

static void session_free(struct session *s)
{
    char reason[260], user[80] = "-", sni[300] = "";
    const struct upstream_cfg *u = s->li->up->cfg;
    double ms = (ev_now(EV_DEFAULT) - s->started) * 1000.0;

    conn_shutdown_write(&s->c);
    upstream_save_tls_session(s);
    log_quote(reason, sizeof(reason), s->reason, strlen(s->reason));
    if (s->authed)
        log_quote(user, sizeof(user), s->auth_user, strlen(s->auth_user));
    if (s->c.ssl != NULL && s->c.tls_up) {
        /* Known when the listener has several certificates (wolfSSL keeps
         * the name only for an SNI callback); the client chose it: quoted. */
        const char *name = wolfSSL_get_servername(s->c.ssl, WOLFSSL_SNI_HOST_NAME);
        if (name != NULL) {
            memcpy(sni, " sni=", 5);
            log_quote(sni + 5, sizeof(sni) - 5, name, strnlen(name, 255));
        }
    }
    slog(s, LOG_LVL_INFO,
         "event=session_end client=%s%s%s listener=%s client_tls=%s client_cipher=%s "
         "upstream=%s upstream_tls=%s upstream_cipher=%s%s%s%s user=%s bytes_c2u=%llu "
         "bytes_u2c=%llu duration_ms=%.0f reason=%s",
         s->peer_str, s->via[0] ? " via=" : "", s->via, s->li->cfg->name, or_dash(s->c.tls_version),
         or_dash(s->c.tls_cipher), s->uphase <= UP_RESOLVING ? "-" : u->addrs[s->up_addr].spec,
         or_dash(s->u.tls_version), or_dash(s->u.tls_cipher),
         s->up_resumed ? " upstream_resumed=yes" : "",
         s->c.tls_up && wolfSSL_session_reused(s->c.ssl) == 1 ? " client_resumed=yes" : "", sni,
         user, (unsigned long long)s->bytes_c2u, (unsigned long long)s->bytes_u2c, ms, reason);
    if (s->end == END_UNSET)
        s->end = s->cphase == CP_SPLICE ? END_COMPLETED : END_ABANDONED;
    metrics_session_end(s->m, s->end, s->bytes_c2u, s->bytes_u2c);
    conn_release(&s->c);
    conn_release(&s->u);
    if (s->prev)
        s->prev->next = s->next;
    else
        all_sessions = s->next;
    if (s->next)
        s->next->prev = s->prev;
    nsessions--;
    ip_dec(&s->tcp_peer);
    free(s->pp);
    runtime_unref(s->rt);
    free(s);
}

void session_finish_all(const char *reply, const char *reason)
{
    struct session *s = all_sessions, *next;

    for (; s != NULL; s = next) {
        next = s->next;
        if (s->closing == CLOSE_NO) {
            session_end_kind(s, END_SHUTDOWN);
            session_finish(s, reply, "%s", reason);
            session_run(s);
        }
    }
}

void session_upstream_resolved(const struct upstream_rt *up)
{
    struct session *s = all_sessions, *next;

    for (; s != NULL; s = next) {
        next = s->next;
        if (s->uphase == UP_RESOLVING && s->li->up == up && s->closing == CLOSE_NO)
            session_run(s);
    }
}

void session_close_all(const char *reason)
{
    while (all_sessions) {
        struct session *s = all_sessions;
        session_end_kind(s, END_SHUTDOWN);
        session_close(s, "%s", reason);
        session_run(s);
    }
}

/* ---- the progress loop ---- */

static void arm(struct session *s)
{
    int cread = client_wants_read(s);
    int cwrite = conn_pending_out(&s->c, &s->u) > 0;
    int uread = upstream_wants_read(s);
    int uwrite = s->uphase == UP_CONNECTING || conn_pending_out(&s->u, &s->c) > 0;

    conn_arm(&s->c, cread, cwrite);
    conn_arm(&s->u, uread, uwrite);
}

void session_run(struct session *s)
{
    int progress, rounds = 0;

    /* Bounded so that one busy session cannot starve the others; whatever is
     * left is picked up on the next loop iteration (level-triggered
     * watchers, or a fed event for bytes buffered inside wolfSSL). */
    do {
        progress = 0;
        if (s->closing == CLOSE_NOW)
            break;
        if (s->closing == CLOSE_NO) {
            progress |= client_step(s);
            if (s->closing == CLOSE_NOW)
                break;
            progress |= upstream_step(s);
            if (s->closing == CLOSE_NOW)
                break;
            if (s->closing == CLOSE_NO && s->cphase == CP_SPLICE) {
                progress |= splice_step(s);
                if (s->closing == CLOSE_NOW)
                    break;
            }
        }
        int n = conn_flush(&s->c, &s->u, &s->bytes_u2c);
        if (n < 0) {
            session_end_kind(s, END_IO);
            session_close(s, "client write failed: %s", s->c.errmsg);
            break;
        }
        progress |= n;
        if (s->u.fd != -1 && s->uphase != UP_CONNECTING && !s->u.handshaking) {
            n = conn_flush(&s->u, &s->c, &s->bytes_c2u);
            if (n < 0) {
                session_end_kind(s, END_IO);
                session_close(s, "upstream write failed: %s", s->u.errmsg);
                break;
            }
            progress |= n;
        }
        if (progress)
            s->last_activity = ev_now(EV_DEFAULT);
        if (s->closing == CLOSE_FLUSH && conn_pending_out(&s->c, &s->u) == 0 &&
            conn_push(&s->c) != 0) {
            s->closing = CLOSE_NOW;
            break;
        }
    } while (progress && ++rounds < 16);

    if (s->closing == CLOSE_NOW) {
        session_free(s);
        return;
    }
    /* Write-behind (conn.c): the records this pass built go out now, before
     * the session waits for anything. */
    if (conn_push(&s->c) < 0) {
        session_end_kind(s, END_IO);
        session_close(s, "client write failed: %s", s->c.errmsg);
    } else if (conn_push(&s->u) < 0) {
        session_end_kind(s, END_IO);
        session_close(s, "upstream write failed: %s", s->u.errmsg);
    }
    if (s->closing == CLOSE_NOW) {
        session_free(s);
        return;
    }
    arm(s);
}
