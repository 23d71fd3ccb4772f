/*
 * conn.c - one endpoint of a session: socket, TLS object, direction buffer,
 * queued proxy output, watchers and deadline timer.
 *
 * Reads and writes are attempted whenever the socket is known (or assumed)
 * ready and stop at EAGAIN, which clears the readiness flag until libev
 * reports the fd again. With TLS, wolfSSL may need the opposite event
 * (WANT_WRITE while reading), which is tracked in rd_wait/wr_wait/hs_wait.
 */
#include "session.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <wolfssl/error-ssl.h>

/* ---- buffer pool: blocks of the configured buffer size ---- */

#define POOL_KEEP 64

static char *pool[POOL_KEEP];
static size_t pool_n, pool_size;

/* Blocks of one size are pooled; a new size (after a reload that changed
 * buffer_size) empties the pool, and blocks of another size are freed. */
static char *buf_get(size_t size)
{
    if (size != pool_size) {
        conn_pool_trim();
        pool_size = size;
    }
    if (pool_n > 0)
        return pool[--pool_n];
    return malloc(size);
}

static void buf_put(char *p, size_t size)
{
    if (size == pool_size && pool_n < POOL_KEEP)
        pool[pool_n++] = p;
    else
        free(p);
}

void conn_pool_trim(void)
{
    while (pool_n > 0)
        free(pool[--pool_n]);
}

static uint32_t cap_of(const struct conn *c)
{
    return (uint32_t)c->s->cfg->buffer_size;
}

/* ---- life cycle ---- */

void conn_init(struct conn *c, struct session *s, int fd)
{
    memset(c, 0, sizeof(*c));
    c->fd = fd;
    c->s = s;
    /* Optimistic: try the first read/write and learn from EAGAIN. */
    c->readable = 1;
    c->writable = 1;
    c->rd_wait = EV_READ;
    c->wr_wait = EV_WRITE;
    c->hs_wait = EV_READ;
}

void conn_release(struct conn *c)
{
    struct ev_loop *loop = EV_DEFAULT;

    if (c->s == NULL)
        return;
    ev_io_stop(loop, &c->rio);
    ev_io_stop(loop, &c->wio);
    ev_timer_stop(loop, &c->timer);
    if (c->ssl != NULL) {
        wolfSSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd != -1) {
        close(c->fd);
        c->fd = -1;
    }
    if (c->in.data != NULL) {
        buf_put(c->in.data, cap_of(c));
        c->in.data = NULL;
    }
    c->in.off = c->in.len = 0;
    c->pass = 0;
    c->out_len = 0;
}

/* ---- reading ---- */

uint32_t conn_in_room(const struct conn *c)
{
    return cap_of(c) - c->in.len;
}

int conn_tls_pending(const struct conn *c)
{
    return c->ssl != NULL && c->tls_up && wolfSSL_pending(c->ssl) > 0;
}

static void set_err(struct conn *c, const char *what, int err)
{
    snprintf(c->errmsg, sizeof(c->errmsg), "%s: %s", what, strerror(err));
    c->failed = 1;
}

int conn_fill(struct conn *c)
{
    uint32_t cap = cap_of(c), room;
    char *dst;
    int n;

    if (c->eof || c->failed || c->fd == -1)
        return -1;
    if (c->in.len >= cap)
        return 0;
    if (c->ssl != NULL) {
        int ready = c->rd_wait == EV_READ ? c->readable : c->writable;
        if (!ready && wolfSSL_pending(c->ssl) <= 0)
            return 0;
    } else if (!c->readable) {
        return 0;
    }
    if (c->in.data == NULL) {
        c->in.data = buf_get(cap);
        if (c->in.data == NULL) {
            set_err(c, "out of memory", ENOMEM);
            return -1;
        }
        c->in.off = 0;
    }
    if (c->in.off > 0 && c->in.off + c->in.len == cap) {
        memmove(c->in.data, c->in.data + c->in.off, c->in.len);
        c->in.off = 0;
    }
    dst = c->in.data + c->in.off + c->in.len;
    room = cap - c->in.off - c->in.len;
    if (c->ssl != NULL) {
        n = wolfSSL_read(c->ssl, dst, (int)room);
        if (n > 0) {
            c->in.len += (uint32_t)n;
            c->nread += (uint64_t)n;
            return n;
        }
        int e = wolfSSL_get_error(c->ssl, n);
        if (e == WOLFSSL_ERROR_WANT_READ) {
            c->readable = 0;
            c->rd_wait = EV_READ;
        } else if (e == WOLFSSL_ERROR_WANT_WRITE) {
            c->writable = 0;
            c->rd_wait = EV_WRITE;
        } else if (e == WOLFSSL_ERROR_ZERO_RETURN || e == SOCKET_PEER_CLOSED_E) {
            c->eof = 1;
            return -1;
        } else {
            char d[160];
            tls_describe_error(c->ssl, n, d, sizeof(d));
            snprintf(c->errmsg, sizeof(c->errmsg), "TLS read: %s", d);
            c->failed = 1;
            return -1;
        }
        if (c->in.len == 0) {
            buf_put(c->in.data, cap_of(c));
            c->in.data = NULL;
        }
        return 0;
    }
    ssize_t r = read(c->fd, dst, room);
    if (r > 0) {
        c->in.len += (uint32_t)r;
        c->nread += (uint64_t)r;
        return (int)r;
    }
    if (c->in.len == 0) {
        buf_put(c->in.data, cap_of(c));
        c->in.data = NULL;
    }
    if (r == 0) {
        c->eof = 1;
        return -1;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
        c->readable = 0;
        return 0;
    }
    set_err(c, "read", errno);
    return -1;
}

void conn_consume(struct conn *c, uint32_t n)
{
    if (n > c->in.len)
        abort(); /* invariant: never consume bytes we do not hold */
    c->in.off += n;
    c->in.len -= n;
    c->pass = c->pass > n ? c->pass - n : 0;
    if (c->in.len == 0) {
        c->in.off = 0;
        if (c->in.data != NULL) {
            buf_put(c->in.data, cap_of(c));
            c->in.data = NULL;
        }
    }
}

/* ---- writing ---- */

int conn_queue(struct conn *c, const char *data, size_t len)
{
    if (c->out_len + len > sizeof(c->out))
        return -1;
    memcpy(c->out + c->out_len, data, len);
    c->out_len += (uint32_t)len;
    return 0;
}

uint32_t conn_pending_out(const struct conn *c, const struct conn *peer)
{
    return c->out_len + peer->pass;
}

/* Writes up to len bytes; returns bytes written, 0 if blocked, -1 on error. */
static int write_some(struct conn *c, const char *p, uint32_t len, enum write_src src)
{
    if (c->ssl != NULL) {
        int n = wolfSSL_write(c->ssl, p, (int)len);
        if (n > 0) {
            c->retry_src = WSRC_NONE;
            return n;
        }
        int e = wolfSSL_get_error(c->ssl, n);
        if (e == WOLFSSL_ERROR_WANT_WRITE || e == WOLFSSL_ERROR_WANT_READ) {
            if (e == WOLFSSL_ERROR_WANT_WRITE) {
                c->writable = 0;
                c->wr_wait = EV_WRITE;
            } else {
                c->readable = 0;
                c->wr_wait = EV_READ;
            }
            c->retry_src = src;
            return 0;
        }
        char d[160];
        tls_describe_error(c->ssl, n, d, sizeof(d));
        snprintf(c->errmsg, sizeof(c->errmsg), "TLS write: %s", d);
        c->failed = 1;
        return -1;
    }
    ssize_t n = send(c->fd, p, len, MSG_NOSIGNAL);
    if (n >= 0)
        return (int)n;
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
        c->writable = 0;
        return 0;
    }
    set_err(c, "write", errno);
    return -1;
}

static int can_write(const struct conn *c)
{
    if (c->ssl != NULL)
        return c->wr_wait == EV_READ ? c->readable : c->writable;
    return c->writable;
}

int conn_flush(struct conn *c, struct conn *peer, uint64_t *counter)
{
    int progress = 0, n;

    if (c->failed || c->fd == -1 || c->shut)
        return c->failed ? -1 : 0;
    while (can_write(c)) {
        /* A pending TLS retry must be finished with the same source. */
        enum write_src src = c->retry_src;
        if (src == WSRC_NONE)
            src = c->out_len > 0 ? WSRC_OUT : (peer->pass > 0 ? WSRC_PEER : WSRC_NONE);
        if (src == WSRC_NONE)
            break;
        if (src == WSRC_OUT) {
            n = write_some(c, c->out, c->out_len, src);
            if (n > 0) {
                memmove(c->out, c->out + n, c->out_len - (uint32_t)n);
                c->out_len -= (uint32_t)n;
            }
        } else {
            n = write_some(c, peer->in.data + peer->in.off, peer->pass, src);
            if (n > 0) {
                conn_consume(peer, (uint32_t)n);
                *counter += (uint64_t)n;
            }
        }
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        c->nwritten += (uint64_t)n;
        progress = 1;
    }
    return progress;
}

/* ---- TLS ---- */

/* wolfSSL's receive callback while c->in holds bytes read before TLS
 * started; then the library's own socket receive takes over for good. */
static int replay_recv(WOLFSSL *ssl, char *buf, int sz, void *ctx)
{
    struct conn *c = ctx;
    uint32_t n;

    if (c->in.len == 0) {
        wolfSSL_SSLSetIORecv(ssl, EmbedReceive);
        wolfSSL_SetIOReadCtx(ssl, &c->fd);
        return EmbedReceive(ssl, buf, sz, &c->fd);
    }
    n = c->in.len < (uint32_t)sz ? c->in.len : (uint32_t)sz;
    memcpy(buf, c->in.data + c->in.off, n);
    conn_consume(c, n);
    return (int)n;
}

void conn_start_tls(struct conn *c, WOLFSSL *ssl)
{
    if (c->in.len > 0) {
        wolfSSL_SSLSetIORecv(ssl, replay_recv);
        wolfSSL_SetIOReadCtx(ssl, c);
    }
    c->ssl = ssl;
    c->handshaking = 1;
    c->readable = 1;
    c->writable = 1;
    c->hs_wait = EV_READ;
    c->rd_wait = EV_READ;
    c->wr_wait = EV_WRITE;
}

int conn_handshake(struct conn *c, int server)
{
    int ready = c->hs_wait == EV_READ ? c->readable : c->writable;
    int rc, e;

    if (!c->handshaking)
        return 1;
    if (!ready)
        return 0;
    rc = server ? wolfSSL_accept(c->ssl) : wolfSSL_connect(c->ssl);
    if (rc == WOLFSSL_SUCCESS) {
        c->handshaking = 0;
        c->tls_up = 1;
        c->tls_version = wolfSSL_get_version(c->ssl);
        c->tls_cipher = wolfSSL_get_cipher_name(c->ssl);
        return 1;
    }
    e = wolfSSL_get_error(c->ssl, rc);
    if (e == WOLFSSL_ERROR_WANT_READ) {
        c->readable = 0;
        c->hs_wait = EV_READ;
        return 0;
    }
    if (e == WOLFSSL_ERROR_WANT_WRITE) {
        c->writable = 0;
        c->hs_wait = EV_WRITE;
        return 0;
    }
    tls_describe_error(c->ssl, rc, c->errmsg, sizeof(c->errmsg));
    c->failed = 1;
    return -1;
}

void conn_shutdown_write(struct conn *c)
{
    if (c->shut || c->fd == -1)
        return;
    c->shut = 1;
    if (c->ssl != NULL && c->tls_up && !c->failed)
        wolfSSL_shutdown(c->ssl); /* close_notify; we do not wait for the peer's */
    shutdown(c->fd, SHUT_WR);
}

/* ---- watchers ---- */

void conn_deadline(struct conn *c, double seconds)
{
    struct ev_loop *loop = EV_DEFAULT;

    ev_timer_stop(loop, &c->timer);
    if (seconds > 0) {
        ev_timer_set(&c->timer, seconds, 0.);
        ev_timer_start(loop, &c->timer);
    }
}

void conn_arm(struct conn *c, int want_read, int want_write)
{
    struct ev_loop *loop = EV_DEFAULT;
    int r = 0, w = 0;

    if (c->fd == -1 || c->failed) {
        ev_io_stop(loop, &c->rio);
        ev_io_stop(loop, &c->wio);
        return;
    }
    if (c->handshaking) {
        r = c->hs_wait == EV_READ;
        w = c->hs_wait == EV_WRITE;
    } else {
        if (want_read) {
            r |= c->ssl == NULL || c->rd_wait == EV_READ;
            w |= c->ssl != NULL && c->rd_wait == EV_WRITE;
        }
        if (want_write) {
            w |= c->ssl == NULL || c->wr_wait == EV_WRITE;
            r |= c->ssl != NULL && c->wr_wait == EV_READ;
        }
    }
    /* Level-triggered: a wanted event that is already there fires on the
     * next loop iteration, which is what resumes a session whose progress
     * loop stopped at its round limit. */
    if (r && !ev_is_active(&c->rio))
        ev_io_start(loop, &c->rio);
    else if (!r && ev_is_active(&c->rio))
        ev_io_stop(loop, &c->rio);
    if (w && !ev_is_active(&c->wio))
        ev_io_start(loop, &c->wio);
    else if (!w && ev_is_active(&c->wio))
        ev_io_stop(loop, &c->wio);
    /* Decrypted bytes inside wolfSSL raise no fd event: ask for another pass. */
    if (want_read && conn_tls_pending(c))
        ev_feed_event(loop, &c->rio, EV_READ);
}
