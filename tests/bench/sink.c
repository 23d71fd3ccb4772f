/*
 * sink.c - a fast STARTTLS + AUTH SMTP sink for the benchmarks.
 *
 * Single-threaded libev loop, wolfSSL server. Answers EHLO with PIPELINING,
 * 8BITMIME, STARTTLS (before TLS) and AUTH PLAIN, accepts any AUTH PLAIN,
 * replies 250 to MAIL/RCPT, 354 to DATA, discards the message body (scanned
 * for the end marker in place, never copied) and replies 250. Pipelined
 * commands are answered in one write.
 *
 *   sink -p PORT [-i IMPLICIT_PORT] -c CERT -k KEY [-T MAX_SECONDS]
 *
 * -p: plaintext greeting + STARTTLS; -i: optional implicit-TLS listener (used
 * for the "direct" scenario so that the client does the same work as towards
 * an implicit-TLS proxy). Prints "READY" on stdout once listening; exits on
 * SIGTERM/SIGINT or after -T seconds (default 3600).
 */
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

#include <arpa/inet.h>
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define INBUF  16384
#define OUTBUF 2048

enum state { S_CMD, S_DATA, S_HANDSHAKE, S_AUTHLINE, S_CLOSING };

struct sconn {
    int fd;
    WOLFSSL *ssl;
    ev_io io;
    enum state st;
    int tls;
    int closing;  /* close once out is flushed */
    int greet;    /* implicit TLS: send the greeting after the handshake */
    char tail[4]; /* last bytes of DATA seen (end-marker search) */
    int tail_len;
    uint32_t in_len;
    uint32_t out_len, out_off;
    char *in; /* INBUF, allocated while the conn lives */
    char out[OUTBUF];
};

static WOLFSSL_CTX *ctx;
static struct ev_loop *loop;
static long n_accepted, n_messages;

static void die(const char *m)
{
    perror(m);
    exit(1);
}

static void conn_free(struct sconn *c)
{
    ev_io_stop(loop, &c->io);
    if (c->ssl)
        wolfSSL_free(c->ssl);
    close(c->fd);
    free(c->in);
    free(c);
}

static void out_add(struct sconn *c, const char *s)
{
    size_t n = strlen(s);
    if (c->out_len + n > OUTBUF) /* pipelining abuse: drop the conn */
    {
        c->closing = 1;
        return;
    }
    memcpy(c->out + c->out_len, s, n);
    c->out_len += (uint32_t)n;
}

/* Returns 1 flushed, 0 would block, -1 error. */
static int flush_out(struct sconn *c, int *want)
{
    while (c->out_off < c->out_len) {
        int n;
        int len = (int)(c->out_len - c->out_off);
        if (c->tls) {
            n = wolfSSL_write(c->ssl, c->out + c->out_off, len);
            if (n <= 0) {
                int e = wolfSSL_get_error(c->ssl, n);
                if (e == WOLFSSL_ERROR_WANT_WRITE) {
                    *want = EV_WRITE;
                    return 0;
                }
                if (e == WOLFSSL_ERROR_WANT_READ) {
                    *want = EV_READ;
                    return 0;
                }
                return -1;
            }
        } else {
            n = (int)send(c->fd, c->out + c->out_off, (size_t)len, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN) {
                    *want = EV_WRITE;
                    return 0;
                }
                return -1;
            }
        }
        c->out_off += (uint32_t)n;
    }
    c->out_off = c->out_len = 0;
    return 1;
}

/* Looks for "\r\n.\r\n" in the DATA stream; returns the number of bytes of
 * p consumed by the body (including the marker) or -1 if the marker is not
 * in p (all consumed). */
static long data_scan(struct sconn *c, const char *p, size_t n)
{
    static const char mark[] = "\r\n.\r\n";
    /* Across the boundary: tail (up to 4 bytes) + first up to 4 bytes. */
    if (c->tail_len > 0) {
        char tmp[8];
        size_t k = n < 4 ? n : 4;
        memcpy(tmp, c->tail, (size_t)c->tail_len);
        memcpy(tmp + c->tail_len, p, k);
        size_t tl = (size_t)c->tail_len + k;
        for (size_t i = 0; i + 5 <= tl; i++)
            if (memcmp(tmp + i, mark, 5) == 0)
                return (long)(i + 5 - (size_t)c->tail_len);
    }
    const char *f = memmem(p, n, mark, 5);
    if (f)
        return (long)(f - p) + 5;
    /* Keep the last 4 bytes (of tail+p). */
    if (n >= 4) {
        memcpy(c->tail, p + n - 4, 4);
        c->tail_len = 4;
    } else {
        char tmp[8];
        memcpy(tmp, c->tail, (size_t)c->tail_len);
        memcpy(tmp + c->tail_len, p, n);
        size_t tl = (size_t)c->tail_len + n;
        size_t keep = tl < 4 ? tl : 4;
        memcpy(c->tail, tmp + tl - keep, keep);
        c->tail_len = (int)keep;
    }
    return -1;
}

static void start_tls(struct sconn *c)
{
    c->ssl = wolfSSL_new(ctx);
    if (!c->ssl) {
        c->closing = 1;
        return;
    }
    wolfSSL_set_fd(c->ssl, c->fd);
    c->tls = 1;
    c->st = S_HANDSHAKE;
}

/* Handles one command line (without CRLF). */
static void command(struct sconn *c, char *line)
{
    if (c->st == S_AUTHLINE) {
        out_add(c, "235 2.7.0 Authentication successful\r\n");
        c->st = S_CMD;
        return;
    }
    if (!strncasecmp(line, "EHLO", 4)) {
        out_add(c, "250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n");
        out_add(c, c->tls ? "250 AUTH PLAIN\r\n" : "250-STARTTLS\r\n250 AUTH PLAIN\r\n");
    } else if (!strncasecmp(line, "HELO", 4)) {
        out_add(c, "250 sink.bench\r\n");
    } else if (!strncasecmp(line, "STARTTLS", 8) && !c->tls) {
        out_add(c, "220 2.0.0 Ready to start TLS\r\n");
        c->st = S_HANDSHAKE; /* after the reply is flushed */
    } else if (!strncasecmp(line, "AUTH PLAIN", 10)) {
        if (line[10] == ' ' && line[11])
            out_add(c, "235 2.7.0 Authentication successful\r\n");
        else {
            out_add(c, "334 \r\n");
            c->st = S_AUTHLINE;
        }
    } else if (!strncasecmp(line, "MAIL", 4) || !strncasecmp(line, "RCPT", 4)) {
        out_add(c, "250 2.1.0 Ok\r\n");
    } else if (!strncasecmp(line, "DATA", 4)) {
        out_add(c, "354 End data with <CR><LF>.<CR><LF>\r\n");
        c->st = S_DATA;
        c->tail[0] = '\r';
        c->tail[1] = '\n';
        c->tail_len = 2;
    } else if (!strncasecmp(line, "RSET", 4) || !strncasecmp(line, "NOOP", 4)) {
        out_add(c, "250 2.0.0 Ok\r\n");
    } else if (!strncasecmp(line, "QUIT", 4)) {
        out_add(c, "221 2.0.0 Bye\r\n");
        c->closing = 1;
    } else {
        out_add(c, "502 5.5.2 Error: command not recognized\r\n");
    }
}

/* Consumes c->in; returns 1 if the STARTTLS handshake must start now. */
static int process(struct sconn *c)
{
    uint32_t off = 0;
    while (off < c->in_len && !c->closing) {
        if (c->st == S_DATA) {
            long used = data_scan(c, c->in + off, c->in_len - off);
            if (used < 0) {
                off = c->in_len;
                break;
            }
            off += (uint32_t)used;
            c->st = S_CMD;
            n_messages++;
            out_add(c, "250 2.0.0 Ok: queued as BENCH\r\n");
            continue;
        }
        char *nl = memchr(c->in + off, '\n', c->in_len - off);
        if (!nl)
            break;
        char *line = c->in + off;
        size_t ll = (size_t)(nl - line);
        if (ll > 0 && line[ll - 1] == '\r')
            ll--;
        line[ll] = 0;
        off = (uint32_t)(nl - c->in) + 1;
        command(c, line);
        if (c->st == S_HANDSHAKE && !c->tls) {
            /* Anything pipelined after STARTTLS is discarded (RFC 3207). */
            off = c->in_len;
            break;
        }
    }
    if (off > 0) {
        memmove(c->in, c->in + off, c->in_len - off);
        c->in_len -= off;
    }
    if (c->in_len == INBUF) /* line too long */
        c->closing = 1;
    return c->st == S_HANDSHAKE && !c->tls;
}

static void conn_cb(struct ev_loop *l, ev_io *w, int revents)
{
    struct sconn *c = w->data;
    int want = EV_READ;
    (void)l;
    (void)revents;

    for (;;) {
        int r = flush_out(c, &want);
        if (r < 0)
            goto fail;
        if (r == 0)
            break;
        if (c->closing)
            goto fail; /* reply flushed: done */
        if (c->st == S_HANDSHAKE) {
            if (!c->tls)
                start_tls(c);
            if (c->closing)
                goto fail;
            int h = wolfSSL_accept(c->ssl);
            if (h != WOLFSSL_SUCCESS) {
                int e = wolfSSL_get_error(c->ssl, h);
                if (e == WOLFSSL_ERROR_WANT_READ) {
                    want = EV_READ;
                    break;
                }
                if (e == WOLFSSL_ERROR_WANT_WRITE) {
                    want = EV_WRITE;
                    break;
                }
                goto fail;
            }
            c->st = S_CMD;
            if (c->greet) {
                c->greet = 0;
                out_add(c, "220 sink.bench ESMTP bench sink\r\n");
            }
            continue;
        }
        /* read */
        int n;
        if (c->tls) {
            n = wolfSSL_read(c->ssl, c->in + c->in_len, (int)(INBUF - c->in_len));
            if (n <= 0) {
                int e = wolfSSL_get_error(c->ssl, n);
                if (e == WOLFSSL_ERROR_WANT_READ) {
                    want = EV_READ;
                    break;
                }
                if (e == WOLFSSL_ERROR_WANT_WRITE) {
                    want = EV_WRITE;
                    break;
                }
                goto fail;
            }
        } else {
            n = (int)recv(c->fd, c->in + c->in_len, INBUF - c->in_len, 0);
            if (n < 0 && errno == EAGAIN) {
                want = EV_READ;
                break;
            }
            if (n <= 0)
                goto fail;
        }
        c->in_len += (uint32_t)n;
        process(c);
    }
    if (want != (c->io.events & (EV_READ | EV_WRITE))) {
        ev_io_stop(loop, &c->io);
        ev_io_set(&c->io, c->fd, want);
        ev_io_start(loop, &c->io);
    }
    return;
fail:
    conn_free(c);
}

static void accept_cb(struct ev_loop *l, ev_io *w, int revents)
{
    int implicit = w->data != NULL;
    (void)l;
    (void)revents;
    for (int i = 0; i < 256; i++) {
        int fd = accept4(w->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                perror("accept");
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        struct sconn *c = calloc(1, sizeof(*c));
        if (!c || !(c->in = malloc(INBUF))) {
            close(fd);
            free(c);
            continue;
        }
        c->fd = fd;
        n_accepted++;
        ev_io_init(&c->io, conn_cb, fd, EV_READ);
        c->io.data = c;
        if (implicit) {
            start_tls(c);
            c->greet = 1; /* greeting once TLS is up */
            ev_io_start(loop, &c->io);
            ev_feed_event(loop, &c->io, EV_READ);
        } else {
            out_add(c, "220 sink.bench ESMTP bench sink\r\n");
            ev_io_start(loop, &c->io);
            ev_feed_event(loop, &c->io, EV_WRITE);
        }
    }
}

static int listen_on(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 4096) < 0)
        die("bind/listen");
    return fd;
}

static void stop_cb(struct ev_loop *l, ev_signal *w, int revents)
{
    (void)w;
    (void)revents;
    ev_break(l, EVBREAK_ALL);
}

static void timeout_cb(struct ev_loop *l, ev_timer *w, int revents)
{
    (void)w;
    (void)revents;
    fprintf(stderr, "sink: max time reached\n");
    ev_break(l, EVBREAK_ALL);
}

int main(int argc, char **argv)
{
    int port = 0, iport = 0, opt;
    const char *cert = NULL, *key = NULL;
    double max_s = 3600;
    while ((opt = getopt(argc, argv, "p:i:c:k:T:")) != -1) {
        switch (opt) {
        case 'p':
            port = atoi(optarg);
            break;
        case 'i':
            iport = atoi(optarg);
            break;
        case 'c':
            cert = optarg;
            break;
        case 'k':
            key = optarg;
            break;
        case 'T':
            max_s = atof(optarg);
            break;
        default:
            fprintf(stderr, "usage: sink -p PORT [-i IMPLICIT_PORT] -c CERT -k KEY [-T SECONDS]\n");
            return 2;
        }
    }
    if (!port || !cert || !key) {
        fprintf(stderr, "usage: sink -p PORT [-i IMPLICIT_PORT] -c CERT -k KEY [-T SECONDS]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    wolfSSL_Init();
    ctx = wolfSSL_CTX_new(wolfSSLv23_server_method());
    if (!ctx)
        die("ctx");
    wolfSSL_CTX_SetMinVersion(ctx, WOLFSSL_TLSV1_2);
    if (wolfSSL_CTX_use_certificate_chain_file(ctx, cert) != WOLFSSL_SUCCESS ||
        wolfSSL_CTX_use_PrivateKey_file(ctx, key, WOLFSSL_FILETYPE_PEM) != WOLFSSL_SUCCESS) {
        fprintf(stderr, "sink: cannot load %s / %s\n", cert, key);
        return 1;
    }
    loop = ev_default_loop(EVFLAG_AUTO);
    ev_io lw, liw;
    ev_io_init(&lw, accept_cb, listen_on(port), EV_READ);
    lw.data = NULL;
    ev_io_start(loop, &lw);
    if (iport) {
        ev_io_init(&liw, accept_cb, listen_on(iport), EV_READ);
        liw.data = &liw;
        ev_io_start(loop, &liw);
    }
    ev_signal s1, s2;
    ev_signal_init(&s1, stop_cb, SIGTERM);
    ev_signal_init(&s2, stop_cb, SIGINT);
    ev_signal_start(loop, &s1);
    ev_signal_start(loop, &s2);
    ev_timer t;
    ev_timer_init(&t, timeout_cb, max_s, 0);
    ev_timer_start(loop, &t);
    printf("READY\n");
    fflush(stdout);
    ev_run(loop, 0);
    fprintf(stderr, "sink: %ld connections, %ld messages\n", n_accepted, n_messages);
    return 0;
}
