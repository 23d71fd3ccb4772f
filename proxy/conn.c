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
#include <sys/uio.h>
#include <unistd.h>

#include <wolfssl/error-ssl.h>

/* ---- buffer pools ---- */

/* TLS record I/O blocks (see "record I/O" below): sixteen full TLS records
 * (16,406 bytes each in TLS 1.3, 16,413 in 1.2) and a little more. Measured
 * with 1 MiB messages (tests/bench, CPU per MiB, same invocation): on an
 * AMD EPYC host 32 KiB blocks saved about half as much as 64 KiB, 64 KiB
 * (three full records) 5-10 % less than 65 KiB (four), and 129 KiB no more
 * than 65 KiB; on an Intel Xeon host (kernel 6.18) 65 KiB blocks took 17
 * readv and 21 sendto per MiB, 257 KiB blocks 8.5 and 9.4, and 9 % less CPU
 * per MiB (129 KiB: 4.5 % less; 513 KiB: no more than 257 KiB). Blocks
 * are held only while bytes are in flight (at most two per leg) and capped
 * per process by tls_batch_memory, so the size costs nothing at idle. */
#define RAW_BLOCK (257 * 1024)

/* Free blocks kept for the next busy sessions: 64 direction buffers (1 MiB
 * at the default buffer_size), 4 record I/O blocks (1 MiB). */
#define POOL_KEEP 64

struct pool {
    char *blk[POOL_KEEP];
    size_t n, keep, size;
};

/* direction buffers (buffer_size) and TLS record I/O blocks (RAW_BLOCK) */
static struct pool bufs = {.keep = POOL_KEEP}, raws = {.keep = 4, .size = RAW_BLOCK};

static void pool_trim(struct pool *p)
{
    while (p->n > 0)
        free(p->blk[--p->n]);
}

static char *pool_get(struct pool *p)
{
    return p->n > 0 ? p->blk[--p->n] : malloc(p->size);
}

static void pool_put(struct pool *p, char *b, size_t size)
{
    if (size == p->size && p->n < p->keep)
        p->blk[p->n++] = b;
    else
        free(b);
}

/* Blocks of one size are pooled; a new size (after a reload that changed
 * buffer_size) empties the pool, and blocks of another size are freed. */
static char *buf_get(size_t size)
{
    if (size != bufs.size) {
        pool_trim(&bufs);
        bufs.size = size;
    }
    return pool_get(&bufs);
}

static void buf_put(char *p, size_t size)
{
    pool_put(&bufs, p, size);
}

void conn_pool_trim(void)
{
    pool_trim(&bufs);
    pool_trim(&raws);
}

static void raw_drop(struct buf *b);
static int push(struct conn *c);

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
        /* Best effort, as a direct send would have been: the last records
         * (a reply, an alert, close_notify) are queued here. */
        conn_push(c);
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
    raw_drop(&c->raw_in);
    raw_drop(&c->raw_out);
    c->replay = c->shut_pending = c->drained = 0;
}

/* ---- reading ---- */

uint32_t conn_in_room(const struct conn *c)
{
    return cap_of(c) - c->in.len;
}

int conn_tls_pending(const struct conn *c)
{
    return c->ssl != NULL && c->tls_up && (c->raw_in.len > 0 || wolfSSL_pending(c->ssl) > 0);
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
        if (!ready && !conn_tls_pending(c))
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

/*
 * Record I/O. wolfSSL asks its receive callback for exactly what it needs
 * next, a 5-byte record header and then the record's body, and sends every
 * record it builds with its own send(): relaying 1 MiB cost about 140
 * recv() and 70 send() calls, and perf put 57% of the proxy's CPU per MiB
 * in the kernel, mostly per call and per packet rather than per byte
 * (loopback delivery, wake-ups, ACKs). So each TLS endpoint
 *  - reads ahead: when nothing is buffered, one readv() fills wolfSSL's
 *    request and a pooled block behind it; later requests are served from
 *    the block;
 *  - writes behind: records are appended to a pooled block, which is sent
 *    when full and at the end of every progress pass (session_run), before
 *    the session waits for anything, so nothing is held back while waiting.
 * Both blocks go back to the pool as soon as they are empty: an idle session
 * holds neither. The plaintext side is unchanged: nothing read here is ever
 * seen before TLS starts (bytes read before it are replayed from `in`).
 */
static size_t raws_out; /* record I/O blocks held by this process's sessions */

/* A block, if tls_batch_memory allows one more; NULL: do without (read and
 * send record by record, as wolfSSL's own I/O would). */
static char *raw_get(const struct conn *c)
{
    static int warned;
    size_t limit = c->s->cfg->tls_batch_memory;
    char *b;

    if ((raws_out + 1) * RAW_BLOCK > limit) {
        /* Once per process: the operator may want a larger limit. 0 is a
         * choice, not a shortage. */
        if (limit >= RAW_BLOCK && !warned) {
            warned = 1;
            log_msg(LOG_LVL_WARNING, c->s->id,
                    "event=tls_batch_memory_full limit=%zu blocks=%zu msg=\"sessions now also "
                    "read and send TLS records one by one; raise tls_batch_memory if this "
                    "is frequent\"",
                    limit, raws_out);
        }
        return NULL;
    }
    b = pool_get(&raws);
    if (b != NULL)
        raws_out++;
    return b;
}

static void raw_drop(struct buf *b)
{
    if (b->data != NULL) {
        pool_put(&raws, b->data, RAW_BLOCK);
        raws_out--;
    }
    b->data = NULL;
    b->off = b->len = 0;
}

/* errno to wolfSSL's callback codes, as its own socket I/O maps them */
static int cbio_error(int err)
{
    switch (err) {
    case EAGAIN:
#if EWOULDBLOCK != EAGAIN
    case EWOULDBLOCK:
#endif
        return WOLFSSL_CBIO_ERR_WANT_READ; /* == WANT_WRITE */
    case EINTR:
        return WOLFSSL_CBIO_ERR_ISR;
    case ECONNRESET:
        return WOLFSSL_CBIO_ERR_CONN_RST;
    case EPIPE:
    case ECONNABORTED:
        return WOLFSSL_CBIO_ERR_CONN_CLOSE;
    default:
        return WOLFSSL_CBIO_ERR_GENERAL;
    }
}

static int take(struct conn *c, struct buf *b, char *dst, int sz)
{
    uint32_t n = b->len < (uint32_t)sz ? b->len : (uint32_t)sz;

    memcpy(dst, b->data + b->off, n);
    if (b == &c->in) {
        conn_consume(c, n);
    } else {
        b->off += n;
        b->len -= n;
        if (b->len == 0)
            raw_drop(b);
    }
    return (int)n;
}

static int tls_recv(WOLFSSL *ssl, char *buf, int sz, void *ctx)
{
    struct conn *c = ctx;
    struct iovec iov[2];
    ssize_t r;

    (void)ssl;
    if (c->replay) {
        if (c->in.len > 0)
            return take(c, &c->in, buf, sz);
        c->replay = 0;
    }
    if (c->raw_in.len > 0)
        return take(c, &c->raw_in, buf, sz);
    /* The last read came back short, so the socket was empty: wait for the
     * (level-triggered) read event instead of a read that fails with EAGAIN. */
    if (c->drained) {
        c->drained = 0;
        return WOLFSSL_CBIO_ERR_WANT_READ;
    }
    iov[0].iov_base = buf;
    iov[0].iov_len = (size_t)sz;
    if (c->raw_in.data == NULL)
        c->raw_in.data = raw_get(c); /* NULL: no read-ahead this time */
    iov[1].iov_base = c->raw_in.data;
    iov[1].iov_len = RAW_BLOCK;
    do
        r = readv(c->fd, iov, c->raw_in.data != NULL ? 2 : 1);
    while (r == -1 && errno == EINTR);
    c->drained = r > 0 && (size_t)r < iov[0].iov_len + (c->raw_in.data != NULL ? RAW_BLOCK : 0);
    if (r > sz) {
        c->raw_in.off = 0;
        c->raw_in.len = (uint32_t)(r - sz);
        return sz;
    }
    raw_drop(&c->raw_in);
    if (r > 0)
        return (int)r;
    return r == 0 ? WOLFSSL_CBIO_ERR_CONN_CLOSE : cbio_error(errno);
}

/* Appends what fits; when the block is full it is sent first. Whatever
 * cannot be taken is refused with WANT_WRITE and wolfSSL offers it again. */
static int tls_send(WOLFSSL *ssl, char *buf, int sz, void *ctx)
{
    struct conn *c = ctx;
    struct buf *b = &c->raw_out;
    uint32_t room;

    (void)ssl;
    if (b->len > 0 && b->off + b->len + (uint32_t)sz > RAW_BLOCK) {
        int r = push(c);
        if (r < 0)
            return cbio_error(-r);
        if (b->len > 0 && b->off > 0) {
            memmove(b->data, b->data + b->off, b->len);
            b->off = 0;
        }
    }
    if (b->data == NULL) {
        b->data = raw_get(c);
        if (b->data == NULL) { /* no block to spare: send directly */
            ssize_t n = send(c->fd, buf, (size_t)sz, MSG_NOSIGNAL);
            return n >= 0 ? (int)n : cbio_error(errno);
        }
        b->off = b->len = 0;
    }
    room = RAW_BLOCK - b->off - b->len;
    if (room == 0)
        return WOLFSSL_CBIO_ERR_WANT_WRITE;
    if ((uint32_t)sz < room)
        room = (uint32_t)sz;
    memcpy(b->data + b->off + b->len, buf, room);
    b->len += room;
    return (int)room;
}

/* 1 when everything queued is sent, 0 if the socket is full, -errno */
static int push(struct conn *c)
{
    struct buf *b = &c->raw_out;

    while (b->len > 0) {
        ssize_t n = send(c->fd, b->data + b->off, b->len, MSG_NOSIGNAL);
        if (n > 0) {
            b->off += (uint32_t)n;
            b->len -= (uint32_t)n;
        } else if (n == 0 || errno == EAGAIN || errno == EWOULDBLOCK) {
            c->writable = 0;
            return 0;
        } else if (errno != EINTR) {
            return -errno;
        }
    }
    raw_drop(b);
    if (c->shut_pending) {
        c->shut_pending = 0;
        shutdown(c->fd, SHUT_WR);
    }
    return 1;
}

int conn_push(struct conn *c)
{
    int r;

    if (c->raw_out.len == 0)
        return 1;
    if (c->failed || c->fd == -1)
        return -1;
    r = push(c);
    if (r < 0) {
        set_err(c, "write", -r);
        return -1;
    }
    return r;
}

void conn_start_tls(struct conn *c, WOLFSSL *ssl)
{
    wolfSSL_SSLSetIORecv(ssl, tls_recv);
    wolfSSL_SSLSetIOSend(ssl, tls_send);
    wolfSSL_SetIOReadCtx(ssl, c);
    wolfSSL_SetIOWriteCtx(ssl, c);
    c->replay = c->in.len > 0;
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
    /* After the queued records, or the peer would see a truncated stream. */
    if (conn_push(c) == 0)
        c->shut_pending = 1;
    else
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
    /* Queued records go out as soon as the socket takes them. */
    if (c->raw_out.len > 0)
        w = 1;
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
