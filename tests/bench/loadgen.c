/*
 * loadgen.c - SMTP submission load generator for the benchmarks.
 *
 * Single-threaded libev loop, non-blocking sockets, wolfSSL client. Each
 * connection: connect, TLS (implicit: at once; starttls: after the plaintext
 * greeting, EHLO and STARTTLS), EHLO, AUTH PLAIN, then M messages of S bytes
 * (MAIL, RCPT, DATA pipelined; body; wait for the final 250), QUIT. Up to C
 * connections run at once until K connections have completed.
 *
 *   loadgen -t HOST:PORT [-m implicit|starttls] [-c CONC] [-k CONNS]
 *           [-n MSGS_PER_CONN] [-s SIZE] [-T MAX_SECONDS] [-a CAFILE]
 *           [-S SERVER_NAME] [-u USER] [-w PASS]
 *   loadgen ... -I N [-P PARALLEL]   idle mode: open N sessions up to the
 *           authenticated state (TLS up), print "READY N", hold them until
 *           SIGUSR1/SIGTERM (or -T), then close them.
 *
 * The run is bounded by the connection count and by -T (default 120 s).
 * One result line on stdout (times in ms):
 *   RESULT conns= msgs= bytes= elapsed= conn_s= msg_s= mb_s= greet_p50=
 *          greet_p99= hs_p50= hs_p99= msg_p50= msg_p99= errors= timeout=
 * Latencies: greeting = connect() until the 220 greeting (for implicit TLS it
 * includes the handshake); handshake = TLS start until the handshake is done;
 * message = MAIL sent until the final 250 after the body.
 */
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

#include <arpa/inet.h>
#include <errno.h>
#include <ev.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum phase {
    P_CONNECT,
    P_GREET_PLAIN,
    P_EHLO1,
    P_STARTTLS,
    P_HS,
    P_GREET_TLS,
    P_EHLO2,
    P_AUTH,
    P_MAIL,
    P_BODY,
    P_QUIT,
    P_IDLE,
};

struct lconn {
    int fd;
    WOLFSSL *ssl;
    ev_io io;
    enum phase ph;
    const char *wptr;
    size_t wlen;
    int replies; /* final replies seen in the current step */
    int msgs;
    double t_conn, t_hs, t_msg;
    size_t rlen;
    char rbuf[4096];
    char cmd[512];
};

static struct {
    const char *host, *port, *ca, *sni, *user, *pass;
    int implicit, conc, msgs, idle, parallel;
    long conns;
    size_t size;
    double max_s;
} o = {.host = "127.0.0.1",
       .port = NULL,
       .ca = NULL,
       .sni = "localhost",
       .user = "bench",
       .pass = "bench",
       .implicit = 1,
       .conc = 10,
       .msgs = 1,
       .idle = 0,
       .parallel = 64,
       .conns = 100,
       .size = 1024,
       .max_s = 120};

static struct ev_loop *loop;
static WOLFSSL_CTX *ctx;
static struct addrinfo *target;
static char *body;
static size_t body_len;
static char auth_cmd[512];
static long started, completed, active, ready, n_msgs, errors;
static long long n_bytes;
static int stopping, timed_out;
static double t_first, t_last, t_ready;
static float *lat_greet, *lat_hs, *lat_msg;
static long n_greet, n_hs, n_lat_msg, cap_conn, cap_msg;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void start_conn(void);

static void finish(struct lconn *c, int ok)
{
    ev_io_stop(loop, &c->io);
    if (c->ssl)
        wolfSSL_free(c->ssl);
    close(c->fd);
    int was_idle = c->ph == P_IDLE;
    if (was_idle)
        ready--;
    else
        active--;
    free(c);
    if (ok)
        completed++;
    else
        errors++;
    t_last = now();
    if (errors > 100 && !stopping) {
        fprintf(stderr, "loadgen: too many errors, stopping\n");
        stopping = 1;
    }
    if (o.idle && !was_idle && !stopping) {
        if (started < o.idle)
            start_conn();
        else if (active == 0) {
            t_ready = now();
            printf("READY %ld\n", ready);
            fflush(stdout);
        }
    }
    if (!o.idle) {
        if (!stopping && started < o.conns)
            start_conn();
        if (active == 0)
            ev_break(loop, EVBREAK_ALL);
    }
}

static void send_str(struct lconn *c, const char *s)
{
    size_t n = strlen(s);
    memcpy(c->cmd, s, n);
    c->wptr = c->cmd;
    c->wlen = n;
}

static void start_msg(struct lconn *c)
{
    c->t_msg = now();
    send_str(c, "MAIL FROM:<bench@example.com>\r\nRCPT TO:<sink@example.com>\r\nDATA\r\n");
    c->replies = 0;
    c->ph = P_MAIL;
}

static int new_ssl(struct lconn *c)
{
    c->ssl = wolfSSL_new(ctx);
    if (!c->ssl)
        return -1;
    wolfSSL_set_fd(c->ssl, c->fd);
    if (o.sni) {
        wolfSSL_UseSNI(c->ssl, WOLFSSL_SNI_HOST_NAME, o.sni, (unsigned short)strlen(o.sni));
        if (o.ca)
            wolfSSL_check_domain_name(c->ssl, o.sni);
    }
    c->t_hs = now();
    c->ph = P_HS;
    return 0;
}

/* A final reply line (code) arrived. Returns 0 to go on, -1 to fail,
 * 1 when the connection is done. */
static int on_reply(struct lconn *c, int code)
{
    double t = now();
    switch (c->ph) {
    case P_GREET_PLAIN:
        if (code != 220)
            return -1;
        if (n_greet < cap_conn)
            lat_greet[n_greet++] = (float)((t - c->t_conn) * 1e3);
        send_str(c, "EHLO loadgen.bench\r\n");
        c->ph = P_EHLO1;
        return 0;
    case P_EHLO1:
        if (code != 250)
            return -1;
        send_str(c, "STARTTLS\r\n");
        c->ph = P_STARTTLS;
        return 0;
    case P_STARTTLS:
        if (code != 220 || c->rlen != 0)
            return -1;
        return new_ssl(c);
    case P_GREET_TLS:
        if (code != 220)
            return -1;
        if (n_greet < cap_conn)
            lat_greet[n_greet++] = (float)((t - c->t_conn) * 1e3);
        send_str(c, "EHLO loadgen.bench\r\n");
        c->ph = P_EHLO2;
        return 0;
    case P_EHLO2:
        if (code != 250)
            return -1;
        send_str(c, auth_cmd);
        c->ph = P_AUTH;
        return 0;
    case P_AUTH:
        if (code != 235)
            return -1;
        if (o.idle) {
            c->ph = P_IDLE;
            ready++;
            active--; /* no longer setting up */
            if (started >= o.idle && active == 0) {
                t_ready = now();
                printf("READY %ld\n", ready);
                fflush(stdout);
            } else if (started < o.idle)
                start_conn();
            return 0;
        }
        if (o.msgs == 0) {
            send_str(c, "QUIT\r\n");
            c->ph = P_QUIT;
            return 0;
        }
        start_msg(c);
        return 0;
    case P_MAIL:
        c->replies++;
        if (c->replies < 3) {
            if (code != 250)
                return -1;
            return 0;
        }
        if (code != 354)
            return -1;
        c->wptr = body;
        c->wlen = body_len;
        c->ph = P_BODY;
        return 0;
    case P_BODY:
        if (code != 250)
            return -1;
        if (n_lat_msg < cap_msg)
            lat_msg[n_lat_msg++] = (float)((t - c->t_msg) * 1e3);
        n_msgs++;
        n_bytes += (long long)o.size;
        c->msgs++;
        if (c->msgs < o.msgs && !stopping) {
            start_msg(c);
            return 0;
        }
        send_str(c, "QUIT\r\n");
        c->ph = P_QUIT;
        return 0;
    case P_QUIT:
        return 1; /* 221 or anything: done */
    default:
        return -1;
    }
}

static void io_cb(struct ev_loop *l, ev_io *w, int revents);

static void drive(struct lconn *c)
{
    int want = EV_READ;
    for (;;) {
        if (c->ph == P_CONNECT) {
            int err = 0;
            socklen_t el = sizeof(err);
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
            if (err == EINPROGRESS || err == EALREADY) {
                want = EV_WRITE;
                break;
            }
            if (err) {
                fprintf(stderr, "loadgen: connect: %s\n", strerror(err));
                finish(c, 0);
                return;
            }
            /* Writable means connected; check it really is. */
            struct sockaddr_storage ss;
            socklen_t sl = sizeof(ss);
            if (getpeername(c->fd, (struct sockaddr *)&ss, &sl) < 0) {
                want = EV_WRITE;
                break;
            }
            if (o.implicit) {
                if (new_ssl(c) < 0)
                    goto fail;
            } else
                c->ph = P_GREET_PLAIN;
            continue;
        }
        if (c->ph == P_HS) {
            int r = wolfSSL_connect(c->ssl);
            if (r != WOLFSSL_SUCCESS) {
                int e = wolfSSL_get_error(c->ssl, r);
                if (e == WOLFSSL_ERROR_WANT_READ) {
                    want = EV_READ;
                    break;
                }
                if (e == WOLFSSL_ERROR_WANT_WRITE) {
                    want = EV_WRITE;
                    break;
                }
                char eb[WOLFSSL_MAX_ERROR_SZ];
                fprintf(stderr, "loadgen: handshake: %s\n",
                        wolfSSL_ERR_error_string((unsigned long)e, eb));
                goto fail;
            }
            if (n_hs < cap_conn)
                lat_hs[n_hs++] = (float)((now() - c->t_hs) * 1e3);
            if (o.implicit)
                c->ph = P_GREET_TLS;
            else {
                send_str(c, "EHLO loadgen.bench\r\n");
                c->ph = P_EHLO2;
            }
            continue;
        }
        if (c->wlen > 0) {
            long n;
            if (c->ssl) {
                int chunk = c->wlen > 65536 ? 65536 : (int)c->wlen;
                n = wolfSSL_write(c->ssl, c->wptr, chunk);
                if (n <= 0) {
                    int e = wolfSSL_get_error(c->ssl, (int)n);
                    if (e == WOLFSSL_ERROR_WANT_WRITE) {
                        want = EV_WRITE;
                        break;
                    }
                    if (e == WOLFSSL_ERROR_WANT_READ) {
                        want = EV_READ;
                        break;
                    }
                    goto fail;
                }
            } else {
                n = send(c->fd, c->wptr, c->wlen, MSG_NOSIGNAL);
                if (n < 0) {
                    if (errno == EAGAIN) {
                        want = EV_WRITE;
                        break;
                    }
                    goto fail;
                }
            }
            c->wptr += n;
            c->wlen -= (size_t)n;
            continue;
        }
        /* read */
        long n;
        size_t room = sizeof(c->rbuf) - c->rlen;
        if (room == 0)
            goto fail;
        if (c->ssl) {
            n = wolfSSL_read(c->ssl, c->rbuf + c->rlen, (int)room);
            if (n <= 0) {
                int e = wolfSSL_get_error(c->ssl, (int)n);
                if (e == WOLFSSL_ERROR_WANT_READ) {
                    want = EV_READ;
                    break;
                }
                if (e == WOLFSSL_ERROR_WANT_WRITE) {
                    want = EV_WRITE;
                    break;
                }
                if (c->ph == P_QUIT) {
                    finish(c, 1);
                    return;
                }
                goto fail;
            }
        } else {
            n = recv(c->fd, c->rbuf + c->rlen, room, 0);
            if (n < 0 && errno == EAGAIN) {
                want = EV_READ;
                break;
            }
            if (n <= 0)
                goto fail;
        }
        c->rlen += (size_t)n;
        /* complete lines */
        size_t off = 0;
        for (;;) {
            char *nl = memchr(c->rbuf + off, '\n', c->rlen - off);
            if (!nl)
                break;
            char *line = c->rbuf + off;
            size_t ll = (size_t)(nl - line) + 1;
            off += ll;
            if (ll >= 4 && line[3] == '-')
                continue;
            int code = atoi(line);
            memmove(c->rbuf, c->rbuf + off, c->rlen - off);
            c->rlen -= off;
            off = 0;
            int r = on_reply(c, code);
            if (r < 0) {
                fprintf(stderr, "loadgen: unexpected reply in phase %d: %.*s", (int)c->ph, (int)ll,
                        line);
                goto fail;
            }
            if (r > 0) {
                finish(c, 1);
                return;
            }
            if (c->ph == P_HS)
                break; /* handshake next */
        }
        if (off) {
            memmove(c->rbuf, c->rbuf + off, c->rlen - off);
            c->rlen -= off;
        }
    }
    if ((c->io.events & (EV_READ | EV_WRITE)) != want) {
        ev_io_stop(loop, &c->io);
        ev_io_set(&c->io, c->fd, want);
        ev_io_start(loop, &c->io);
    }
    return;
fail:
    finish(c, 0);
}

static void io_cb(struct ev_loop *l, ev_io *w, int revents)
{
    (void)l;
    (void)revents;
    drive(w->data);
}

static void start_conn(void)
{
    struct lconn *c = calloc(1, sizeof(*c));
    if (!c) {
        errors++;
        return;
    }
    started++;
    active++;
    if (t_first == 0)
        t_first = now();
    c->fd = socket(target->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        perror("loadgen: socket");
        free(c);
        active--;
        errors++;
        stopping = 1;
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    c->t_conn = now();
    c->ph = P_CONNECT;
    ev_io_init(&c->io, io_cb, c->fd, EV_WRITE);
    c->io.data = c;
    if (connect(c->fd, target->ai_addr, target->ai_addrlen) < 0 && errno != EINPROGRESS) {
        perror("loadgen: connect");
        close(c->fd);
        free(c);
        active--;
        errors++;
        return;
    }
    ev_io_start(loop, &c->io);
}

static void timeout_cb(struct ev_loop *l, ev_timer *w, int revents)
{
    (void)w;
    (void)revents;
    fprintf(stderr, "loadgen: max time reached\n");
    timed_out = 1;
    stopping = 1;
    ev_break(l, EVBREAK_ALL);
}

static void sig_cb(struct ev_loop *l, ev_signal *w, int revents)
{
    (void)w;
    (void)revents;
    stopping = 1;
    ev_break(l, EVBREAK_ALL);
}

static int cmpf(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

static double pct(float *v, long n, double p)
{
    if (n == 0)
        return 0;
    qsort(v, (size_t)n, sizeof(*v), cmpf);
    long i = (long)(p * (double)(n - 1) + 0.5);
    return v[i];
}

static void b64(const unsigned char *in, size_t n, char *out)
{
    static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i, j = 0;
    for (i = 0; i + 2 < n; i += 3) {
        out[j++] = t[in[i] >> 2];
        out[j++] = t[((in[i] & 3) << 4) | (in[i + 1] >> 4)];
        out[j++] = t[((in[i + 1] & 15) << 2) | (in[i + 2] >> 6)];
        out[j++] = t[in[i + 2] & 63];
    }
    if (i < n) {
        out[j++] = t[in[i] >> 2];
        if (i + 1 < n) {
            out[j++] = t[((in[i] & 3) << 4) | (in[i + 1] >> 4)];
            out[j++] = t[(in[i + 1] & 15) << 2];
        } else {
            out[j++] = t[(in[i] & 3) << 4];
            out[j++] = '=';
        }
        out[j++] = '=';
    }
    out[j] = 0;
}

/* Message: a few headers, then lines of 76 printable characters + CRLF,
 * S bytes in all (before the end marker). */
static void make_body(void)
{
    size_t s = o.size < 128 ? 128 : o.size;
    body = malloc(s + 8);
    const char *hdr = "From: bench@example.com\r\nTo: sink@example.com\r\nSubject: bench\r\n\r\n";
    size_t h = strlen(hdr);
    memcpy(body, hdr, h);
    size_t i = h;
    while (s - i > 80) {
        for (size_t k = 0; k < 76; k++)
            body[i + k] = (char)('A' + (int)((i + k) % 26));
        i += 76;
        body[i++] = '\r';
        body[i++] = '\n';
    }
    while (i < s - 2)
        body[i++] = 'x';
    body[i++] = '\r';
    body[i++] = '\n';
    memcpy(body + i, ".\r\n", 3);
    body_len = i + 3;
}

int main(int argc, char **argv)
{
    int opt;
    char *tgt = NULL;
    while ((opt = getopt(argc, argv, "t:m:c:k:n:s:T:a:S:u:w:I:P:")) != -1) {
        switch (opt) {
        case 't':
            tgt = optarg;
            break;
        case 'm':
            o.implicit = strcmp(optarg, "starttls") != 0;
            break;
        case 'c':
            o.conc = atoi(optarg);
            break;
        case 'k':
            o.conns = atol(optarg);
            break;
        case 'n':
            o.msgs = atoi(optarg);
            break;
        case 's':
            o.size = (size_t)atol(optarg);
            break;
        case 'T':
            o.max_s = atof(optarg);
            break;
        case 'a':
            o.ca = optarg;
            break;
        case 'S':
            o.sni = optarg;
            break;
        case 'u':
            o.user = optarg;
            break;
        case 'w':
            o.pass = optarg;
            break;
        case 'I':
            o.idle = atoi(optarg);
            break;
        case 'P':
            o.parallel = atoi(optarg);
            break;
        default:
            fprintf(stderr, "usage: see the comment at the top of loadgen.c\n");
            return 2;
        }
    }
    if (!tgt || !strrchr(tgt, ':')) {
        fprintf(stderr, "loadgen: -t HOST:PORT required\n");
        return 2;
    }
    char *colon = strrchr(tgt, ':');
    *colon = 0;
    o.host = tgt;
    o.port = colon + 1;
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM};
    if (getaddrinfo(o.host, o.port, &hints, &target) != 0) {
        fprintf(stderr, "loadgen: cannot resolve %s\n", o.host);
        return 2;
    }
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    signal(SIGPIPE, SIG_IGN);

    wolfSSL_Init();
    ctx = wolfSSL_CTX_new(wolfSSLv23_client_method());
    wolfSSL_CTX_SetMinVersion(ctx, WOLFSSL_TLSV1_2);
    if (o.ca) {
        if (wolfSSL_CTX_load_verify_locations(ctx, o.ca, NULL) != WOLFSSL_SUCCESS) {
            fprintf(stderr, "loadgen: cannot load CA %s\n", o.ca);
            return 2;
        }
        wolfSSL_CTX_set_verify(ctx, WOLFSSL_VERIFY_PEER, NULL);
    } else
        wolfSSL_CTX_set_verify(ctx, WOLFSSL_VERIFY_NONE, NULL);

    unsigned char plain[300];
    size_t ul = strlen(o.user), pl = strlen(o.pass);
    plain[0] = 0;
    memcpy(plain + 1, o.user, ul);
    plain[1 + ul] = 0;
    memcpy(plain + 2 + ul, o.pass, pl);
    char enc[420];
    b64(plain, 2 + ul + pl, enc);
    snprintf(auth_cmd, sizeof(auth_cmd), "AUTH PLAIN %s\r\n", enc);
    make_body();

    cap_conn = o.idle ? o.idle : o.conns;
    cap_msg = o.idle ? 1 : o.conns * (long)o.msgs;
    if (cap_msg > 5000000)
        cap_msg = 5000000;
    lat_greet = malloc(sizeof(float) * (size_t)cap_conn);
    lat_hs = malloc(sizeof(float) * (size_t)cap_conn);
    lat_msg = malloc(sizeof(float) * (size_t)(cap_msg ? cap_msg : 1));

    loop = ev_default_loop(EVFLAG_AUTO);
    ev_timer t;
    ev_timer_init(&t, timeout_cb, o.max_s, 0);
    ev_timer_start(loop, &t);
    ev_signal s1, s2, s3;
    ev_signal_init(&s1, sig_cb, SIGUSR1);
    ev_signal_init(&s2, sig_cb, SIGTERM);
    ev_signal_init(&s3, sig_cb, SIGINT);
    ev_signal_start(loop, &s1);
    ev_signal_start(loop, &s2);
    ev_signal_start(loop, &s3);

    double t0 = now();
    if (o.idle) {
        /* Open N sessions, at most P in setup at a time. */
        for (int i = 0; i < o.parallel && started < o.idle; i++)
            start_conn();
        ev_run(loop, 0);
        t_last = now();
    } else {
        for (int i = 0; i < o.conc && started < o.conns; i++)
            start_conn();
        ev_run(loop, 0);
    }
    double elapsed = (t_last > t_first ? t_last : now()) - t_first;
    if (o.idle && t_ready > 0)
        elapsed = t_ready - t_first; /* set-up rate, not the hold */
    if (elapsed <= 0)
        elapsed = 1e-9;
    long held = ready;
    printf("RESULT conns=%ld msgs=%ld bytes=%lld elapsed=%.3f conn_s=%.1f msg_s=%.1f mb_s=%.2f "
           "greet_p50=%.3f greet_p99=%.3f hs_p50=%.3f hs_p99=%.3f msg_p50=%.3f msg_p99=%.3f "
           "errors=%ld timeout=%d held=%ld\n",
           o.idle ? n_hs : completed, n_msgs, n_bytes, elapsed,
           (double)(o.idle ? n_hs : completed) / elapsed, (double)n_msgs / elapsed,
           (double)n_bytes / 1e6 / elapsed, pct(lat_greet, n_greet, 0.5),
           pct(lat_greet, n_greet, 0.99), pct(lat_hs, n_hs, 0.5), pct(lat_hs, n_hs, 0.99),
           pct(lat_msg, n_lat_msg, 0.5), pct(lat_msg, n_lat_msg, 0.99), errors, timed_out, held);
    fflush(stdout);
    (void)t0;
    return timed_out ? 3 : (errors ? 1 : 0);
}
