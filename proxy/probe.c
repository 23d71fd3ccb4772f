/*
 * probe.c - upstream health probes for GET /healthz?upstream (see probe.h).
 *
 * A probe is one nonblocking connection driven by one ev_io and one ev_timer.
 * Every event runs probe_run(), which makes all the progress it can and
 * stops at the first operation that would block; the ev_io then waits for
 * exactly what that operation needs (wolfSSL may want to write in order to
 * read). The timer is the deadline of the current step: connect_timeout per
 * address, reply_timeout per reply and for the TLS handshake.
 *
 * The dialogue is the one a real session has (upstream.c), so that "healthy"
 * means "a session would get through": connect each resolved address in
 * turn, PROXY header (v1 UNKNOWN / v2 LOCAL: there is no client to name),
 * then for tls = starttls greeting 220, EHLO 250 with STARTTLS advertised,
 * STARTTLS 220 and nothing after it, and the handshake with the upstream's
 * own context and tls_client_ssl() (same CA, same name check); for
 * tls = implicit the handshake, then greeting and EHLO; for tls = none
 * greeting and EHLO. The result is reported at that point; QUIT follows
 * (its 221 is awaited briefly, so the MTA logs a clean disconnect), and so
 * it does after a refused greeting or EHLO, where the connection is still
 * in a command state.
 *
 * Results live in a table of targets, one per upstream name, which outlives
 * reloads; a cached result only counts while the upstream's address is
 * unchanged. Requests wait for probe generations, not for "whatever runs
 * next", so a request is never held up by a probe started after it.
 */
#include "probe.h"

#include <errno.h>
#include <ev.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <wolfssl/options.h>
#include <wolfssl/error-ssl.h>

#include "log.h"
#include "proxyproto.h"
#include "runtime.h"
#include "smtp.h"

/* Bound on one reply (an EHLO reply with every extension is ~1 KiB). */
#define REPLY_MAX (64 * 1024)
/* After the result: how long the QUIT's 221 is waited for, at most. */
#define QUIT_WAIT 2.0

/* The health of one upstream, by name, as last probed. */
struct target {
    char *key;             /* the section's name ("" for the unnamed [upstream]) */
    char *name;            /* as shown: "default" for the unnamed one */
    char *address;         /* the upstream's address when the result came */
    unsigned started;      /* generation of the newest probe */
    unsigned done;         /* generation of the newest result */
    struct probe *running; /* the probe of generation `started`, until it reports */
    int have, ok;
    int logged_ok; /* state last logged at warning level: 1 ok (or none yet), 0 failed */
    ev_tstamp at;  /* when the result came (loop time) */
    char *line;    /* the body line, "upstream NAME ADDR ok 1.2ms\n" */
};

enum step { ST_CONNECT, ST_GREETING, ST_EHLO, ST_STARTTLS, ST_HANDSHAKE, ST_QUIT, ST_CLOSED };

struct probe {
    struct probe *next;
    struct target *t; /* NULL once the result is reported */
    unsigned gen;
    struct runtime *rt; /* a reference: a reload must not free the contexts */
    struct upstream_rt *up;
    enum step step;
    int fd;
    WOLFSSL *ssl;
    ev_io io;
    ev_timer timer;
    int revents;                     /* of the event being handled */
    size_t ai_next;                  /* index of the address being tried */
    size_t naddr;                    /* addresses known at the start: the attempts allowed */
    struct upstream_target *targets; /* a copy: a re-resolution may replace the runtime's */
    ev_tstamp start;                 /* wall clock (ev_time), for the reported duration */
    ev_tstamp until;                 /* loop time by which the result is reported at the latest */
    char peer[INET6_ADDRSTRLEN + 8];
    char out[SMTP_MAX_COMMAND_LINE];
    size_t out_off, out_len;
    char *in;
    size_t in_len;
};

struct want {
    struct target *t;
    unsigned gen;
};

struct probe_req {
    struct probe_req *next;
    probe_done_fn done;
    void *arg;
    ev_tstamp until;
    size_t n;
    struct want w[];
};

static struct target **targets;
static size_t ntargets;
static struct probe *probes;
static struct probe_req *reqs;

/* I/O results besides "progress" (0) and "blocked on EV_READ/EV_WRITE". */
#define IO_EOF -1
#define IO_ERR -2

static const char *step_name(enum step s)
{
    static const char *const names[] = {
        [ST_CONNECT] = "connect",         [ST_GREETING] = "greeting",
        [ST_EHLO] = "EHLO reply",         [ST_STARTTLS] = "STARTTLS reply",
        [ST_HANDSHAKE] = "TLS handshake", [ST_QUIT] = "QUIT reply",
        [ST_CLOSED] = "closed",
    };
    return names[s];
}

static const char *label(const struct upstream_cfg *u)
{
    return u->name[0] ? u->name : "default";
}

/* ---- targets and requests ---- */

static void target_free(struct target *t)
{
    free(t->key);
    free(t->name);
    free(t->address);
    free(t->line);
    free(t);
}

static struct target *target_get(const struct upstream_cfg *u)
{
    struct target *t, **v;

    for (size_t i = 0; i < ntargets; i++)
        if (strcmp(targets[i]->key, u->name) == 0)
            return targets[i];
    v = realloc(targets, (ntargets + 1) * sizeof(*targets));
    if (v == NULL)
        return NULL;
    targets = v;
    t = calloc(1, sizeof(*t));
    if (t == NULL)
        return NULL;
    t->key = strdup(u->name);
    t->name = strdup(label(u));
    if (t->key == NULL || t->name == NULL) {
        target_free(t);
        return NULL;
    }
    t->logged_ok = 1;
    targets[ntargets++] = t;
    return t;
}

static int req_complete(const struct probe_req *r)
{
    for (size_t i = 0; i < r->n; i++)
        if ((int)(r->w[i].t->done - r->w[i].gen) < 0)
            return 0;
    return 1;
}

/* The answer for a complete request: every line, 200 only if all are ok. */
static void req_answer(const struct probe_req *r, struct probe_answer *ans)
{
    FILE *f = open_memstream(&ans->body, &ans->len);

    ans->status = 200;
    for (size_t i = 0; i < r->n; i++)
        if (!r->w[i].t->ok)
            ans->status = 503;
    if (f == NULL) {
        ans->body = NULL;
        ans->len = 0;
        return;
    }
    for (size_t i = 0; i < r->n; i++)
        fputs(r->w[i].t->line ? r->w[i].t->line : "", f);
    if (fclose(f) != 0) {
        free(ans->body);
        ans->body = NULL;
        ans->len = 0;
    }
}

/* Answers every pending request whose probes have all reported. The one
 * answered is unlinked before its callback runs, and the scan restarts,
 * so a callback may cancel other requests. */
static void reqs_notify(void)
{
    struct probe_req **pp = &reqs, *r;
    struct probe_answer ans;

    while ((r = *pp) != NULL) {
        if (!req_complete(r)) {
            pp = &r->next;
            continue;
        }
        *pp = r->next;
        req_answer(r, &ans);
        r->done(r->arg, &ans);
        free(ans.body);
        free(r);
        pp = &reqs;
    }
}

/* Records a result for generation gen of t and answers whoever waited. */
static void target_result(struct target *t, unsigned gen, int ok, const char *address,
                          const char *peer, double ms, const char *why)
{
    char *line = NULL, q[300];
    int n;

    if (ok)
        n = asprintf(&line, "upstream %s %s ok %.1fms\n", t->name, peer, ms);
    else
        n = asprintf(&line, "upstream %s %s failed: %s\n", t->name, peer, why);
    if (n < 0)
        line = NULL;
    free(t->line);
    t->line = line;
    free(t->address);
    t->address = strdup(address);
    t->have = 1;
    t->ok = ok;
    t->at = ev_now(EV_DEFAULT);
    if ((int)(gen - t->done) > 0)
        t->done = gen;
    if (gen == t->started)
        t->running = NULL;
    log_quote(q, sizeof(q), ok ? "" : why, ok ? 0 : strlen(why));
    log_msg(LOG_LVL_DEBUG, 0, "event=upstream_probe upstream=%s address=%s result=%s ms=%.1f%s%s",
            t->name, peer, ok ? "ok" : "failed", ms, ok ? "" : " reason=", ok ? "" : q);
    /* A load balancer polls every few seconds: log changes, not polls. */
    if (ok != t->logged_ok) {
        if (ok)
            log_msg(LOG_LVL_WARNING, 0,
                    "event=upstream_probe_ok upstream=%s address=%s msg=\"the upstream answers "
                    "again\"",
                    t->name, peer);
        else
            log_msg(LOG_LVL_WARNING, 0,
                    "event=upstream_probe_failed upstream=%s address=%s reason=%s", t->name, peer,
                    q);
        t->logged_ok = ok;
    }
    reqs_notify();
}

/* ---- one probe ---- */

static void probe_io_cb(struct ev_loop *loop, ev_io *w, int revents);
static void probe_timer_cb(struct ev_loop *loop, ev_timer *w, int revents);

static void probe_close_fd(struct probe *p)
{
    ev_io_stop(EV_DEFAULT, &p->io);
    if (p->ssl != NULL) {
        wolfSSL_free(p->ssl);
        p->ssl = NULL;
    }
    if (p->fd != -1) {
        close(p->fd);
        p->fd = -1;
    }
    p->in_len = p->out_len = p->out_off = 0;
}

static void probe_free(struct probe *p)
{
    struct probe **pp;

    for (pp = &probes; *pp != NULL; pp = &(*pp)->next)
        if (*pp == p) {
            *pp = p->next;
            break;
        }
    probe_close_fd(p);
    ev_timer_stop(EV_DEFAULT, &p->timer);
    runtime_unref(p->rt);
    free(p->in);
    free(p->targets);
    free(p);
}

static void deadline(struct probe *p, double secs)
{
    p->timer.repeat = secs;
    ev_timer_again(EV_DEFAULT, &p->timer);
}

static void enter(struct probe *p, enum step s)
{
    p->step = s;
    if (s == ST_QUIT)
        deadline(p, p->up->cfg->reply_timeout < QUIT_WAIT ? p->up->cfg->reply_timeout : QUIT_WAIT);
    else if (s != ST_CLOSED)
        deadline(p, s == ST_CONNECT ? p->up->cfg->connect_timeout : p->up->cfg->reply_timeout);
}

/* Queues "VERB\r\n" or "VERB arg\r\n". */
static void queue(struct probe *p, const char *verb, const char *arg)
{
    int n = snprintf(p->out, sizeof(p->out), "%s%s%s\r\n", verb, arg ? " " : "", arg ? arg : "");

    p->out_off = 0;
    p->out_len = n > 0 && (size_t)n < sizeof(p->out) ? (size_t)n : 0;
}

/* Reports the result once; the connection is the caller's business. */
static void report(struct probe *p, int ok, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void report(struct probe *p, int ok, const char *fmt, ...)
{
    struct target *t = p->t;
    char why[256] = "";
    va_list ap;

    if (t == NULL)
        return;
    if (fmt != NULL) {
        va_start(ap, fmt);
        vsnprintf(why, sizeof(why), fmt, ap);
        va_end(ap);
    }
    p->t = NULL;
    target_result(t, p->gen, ok, p->up->cfg->address, p->peer, (ev_time() - p->start) * 1000.0,
                  why);
}

/* The connection is useless: report (if not yet) and close it. */
#define FAIL(p, ...)                                                                               \
    do {                                                                                           \
        report((p), 0, __VA_ARGS__);                                                               \
        (p)->step = ST_CLOSED;                                                                     \
    } while (0)

/* Refused, but still in a command state: report, then say QUIT politely. */
static void fail_quit(struct probe *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void fail_quit(struct probe *p, const char *fmt, ...)
{
    char why[200];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    report(p, 0, "%s", why);
    queue(p, "QUIT", NULL);
    enter(p, ST_QUIT);
}

/* The name the certificate of the address being tried must carry. */
static const char *probe_name(const struct probe *p)
{
    return p->up->cfg->addrs[p->targets[p->ai_next].addr].server_name;
}

/* Dials the next resolved address; 0, or -1 (then reported) if none is left. */
static int dial_next(struct probe *p)
{
    char err[128] = "no address", host[INET6_ADDRSTRLEN], port[8];
    int fd, one = 1;

    probe_close_fd(p);
    for (; p->ai_next < p->naddr; p->ai_next++) {
        const struct upstream_target *t = &p->targets[p->ai_next];
        const struct sockaddr *sa = (const struct sockaddr *)&t->sa;
        if (getnameinfo(sa, t->salen, host, sizeof(host), port, sizeof(port),
                        NI_NUMERICHOST | NI_NUMERICSERV) == 0)
            snprintf(p->peer, sizeof(p->peer), sa->sa_family == AF_INET6 ? "[%s]:%s" : "%s:%s",
                     host, port);
        fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd == -1) {
            snprintf(err, sizeof(err), "socket: %s", strerror(errno));
            continue;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (connect(fd, sa, t->salen) == -1 && errno != EINPROGRESS) {
            snprintf(err, sizeof(err), "%s", strerror(errno));
            close(fd);
            continue;
        }
        p->fd = fd;
        p->revents = 0;
        enter(p, ST_CONNECT);
        return 0;
    }
    FAIL(p, "cannot connect: %s", err);
    return -1;
}

/* Sends what is queued. 0 when all is out, else what to wait for. */
static int flush_out(struct probe *p)
{
    while (p->out_off < p->out_len) {
        const char *d = p->out + p->out_off;
        size_t len = p->out_len - p->out_off;
        if (p->ssl != NULL) {
            int n = wolfSSL_write(p->ssl, d, (int)len);
            if (n > 0) {
                p->out_off += (size_t)n;
                continue;
            }
            int e = wolfSSL_get_error(p->ssl, n);
            if (e == WOLFSSL_ERROR_WANT_READ)
                return EV_READ;
            if (e == WOLFSSL_ERROR_WANT_WRITE)
                return EV_WRITE;
            char m[160];
            FAIL(p, "TLS write failed: %s", tls_describe_error(p->ssl, n, m, sizeof(m)));
            return IO_ERR;
        }
        ssize_t n = send(p->fd, d, len, MSG_NOSIGNAL);
        if (n > 0) {
            p->out_off += (size_t)n;
            continue;
        }
        if (n == -1 && (errno == EAGAIN || errno == EINTR))
            return errno == EINTR ? 0 : EV_WRITE;
        FAIL(p, "write failed: %s", strerror(errno));
        return IO_ERR;
    }
    p->out_off = p->out_len = 0;
    return 0;
}

/* Reads more of a reply. 0 on progress, EV_READ/EV_WRITE when blocked,
 * IO_EOF, or IO_ERR (reported). */
static int fill_in(struct probe *p)
{
    size_t room = REPLY_MAX - p->in_len;

    if (p->ssl != NULL) {
        int n = wolfSSL_read(p->ssl, p->in + p->in_len, (int)room);
        if (n > 0) {
            p->in_len += (size_t)n;
            return 0;
        }
        int e = wolfSSL_get_error(p->ssl, n);
        if (e == WOLFSSL_ERROR_WANT_READ)
            return EV_READ;
        if (e == WOLFSSL_ERROR_WANT_WRITE)
            return EV_WRITE;
        if (e == WOLFSSL_ERROR_ZERO_RETURN || e == SOCKET_PEER_CLOSED_E)
            return IO_EOF;
        char m[160];
        FAIL(p, "TLS read failed while waiting for the %s: %s", step_name(p->step),
             tls_describe_error(p->ssl, n, m, sizeof(m)));
        return IO_ERR;
    }
    ssize_t n = recv(p->fd, p->in + p->in_len, room, 0);
    if (n > 0) {
        p->in_len += (size_t)n;
        return 0;
    }
    if (n == 0)
        return IO_EOF;
    if (errno == EAGAIN || errno == EINTR)
        return errno == EINTR ? 0 : EV_READ;
    FAIL(p, "read failed while waiting for the %s: %s", step_name(p->step), strerror(errno));
    return IO_ERR;
}

/*
 * One complete reply in r (1), or not yet (0 with *want set to what to wait
 * for; 0 with the step changed when the probe failed). As in a session's
 * dialogue, nothing may follow the reply: RFC 2920 forbids an unrequested
 * reply, and after STARTTLS's 220 it would be a response injection (bytes
 * sent before TLS, read as if after it).
 */
static int get_reply(struct probe *p, struct smtp_reply *r, int *want)
{
    const char *err;
    int n;

    for (;;) {
        enum smtp_reply_status st = smtp_parse_reply(p->in, p->in_len, r, &err);
        if (st == SMTP_REPLY_ERROR) {
            FAIL(p, "malformed %s: %s", step_name(p->step), err);
            return 0;
        }
        if (st == SMTP_REPLY_COMPLETE) {
            if (r->len != p->in_len) {
                FAIL(p, "%zu unexpected bytes after the %s%s", p->in_len - r->len,
                     step_name(p->step), p->step == ST_STARTTLS ? " (response injection)" : "");
                return 0;
            }
            return 1;
        }
        if (p->in_len == REPLY_MAX) {
            FAIL(p, "%s longer than %d KiB", step_name(p->step), REPLY_MAX / 1024);
            return 0;
        }
        n = fill_in(p);
        if (n == 0)
            continue;
        if (n == IO_EOF)
            FAIL(p, "connection closed by the upstream while waiting for the %s",
                 step_name(p->step));
        else if (n > 0)
            *want = n;
        return 0;
    }
}

/* TCP is up: the PROXY header (written directly: it must precede the
 * ClientHello and fits an empty socket buffer), then TLS or the greeting. */
static void connected(struct probe *p)
{
    const struct upstream_cfg *u = p->up->cfg;
    uint8_t hdr[PP_MAX_HEADER];
    size_t n;

    if (u->proxy_protocol) {
        n = pp_build_local(u->proxy_protocol, hdr, sizeof(hdr));
        if (n == 0 || send(p->fd, hdr, n, MSG_NOSIGNAL) != (ssize_t)n) {
            FAIL(p, "cannot send the PROXY header: %s", n ? strerror(errno) : "cannot build it");
            return;
        }
    }
    if (u->tls == UPSTREAM_TLS_IMPLICIT) {
        p->ssl = tls_client_ssl(p->up->ctx, u, probe_name(p), p->fd);
        if (p->ssl == NULL) {
            FAIL(p, "cannot create a TLS session");
            return;
        }
        enter(p, ST_HANDSHAKE);
    } else {
        enter(p, ST_GREETING);
    }
}

/* The upstream passed every check. */
static void healthy(struct probe *p)
{
    report(p, 1, NULL);
    queue(p, "QUIT", NULL);
    enter(p, ST_QUIT);
}

/* One step of progress: 0 to go on, EV_READ/EV_WRITE when blocked, -1 when
 * the probe is over (closed). */
static int advance(struct probe *p)
{
    const struct upstream_cfg *u = p->up->cfg;
    struct smtp_reply r;
    const char *perr;
    int want = 0, n, err = 0;
    socklen_t len = sizeof(err);

    if (p->step == ST_CLOSED)
        return -1;
    if (p->step == ST_CONNECT) {
        if (!(p->revents & EV_WRITE))
            return EV_WRITE;
        if (getsockopt(p->fd, SOL_SOCKET, SO_ERROR, &err, &len) == -1)
            err = errno;
        if (err == EINPROGRESS || err == EALREADY) {
            p->revents = 0;
            return EV_WRITE;
        }
        if (err != 0) {
            p->ai_next++;
            if (p->ai_next < p->naddr && dial_next(p) == 0)
                return EV_WRITE;
            FAIL(p, "cannot connect: %s", strerror(err));
            return -1;
        }
        connected(p);
        return 0;
    }
    n = flush_out(p);
    if (n != 0)
        return n > 0 ? n : -1;
    if (p->step == ST_HANDSHAKE) {
        n = wolfSSL_connect(p->ssl);
        if (n != WOLFSSL_SUCCESS) {
            int e = wolfSSL_get_error(p->ssl, n);
            if (e == WOLFSSL_ERROR_WANT_READ)
                return EV_READ;
            if (e == WOLFSSL_ERROR_WANT_WRITE)
                return EV_WRITE;
            char m[200];
            FAIL(p, "TLS handshake (name %s) failed: %s", probe_name(p),
                 tls_describe_error(p->ssl, n, m, sizeof(m)));
            return -1;
        }
        log_msg(LOG_LVL_DEBUG, 0, "event=upstream_probe_tls upstream=%s version=%s cipher=%s",
                label(u), wolfSSL_get_version(p->ssl), wolfSSL_get_cipher(p->ssl));
        if (u->tls == UPSTREAM_TLS_IMPLICIT)
            enter(p, ST_GREETING);
        else
            healthy(p);
        return 0;
    }
    if (p->step == ST_QUIT) {
        /* The result is out; any reply, the end, or an error ends it. */
        n = 0;
        while (smtp_parse_reply(p->in, p->in_len, &r, &perr) == SMTP_REPLY_INCOMPLETE &&
               p->in_len < REPLY_MAX && (n = fill_in(p)) == 0)
            ;
        if (n > 0)
            return n;
        p->step = ST_CLOSED;
        return -1;
    }
    if (!get_reply(p, &r, &want))
        return p->step == ST_CLOSED ? -1 : want;
    p->in_len = 0;
    switch (p->step) {
    case ST_GREETING:
        if (r.code != 220) {
            fail_quit(p, "the greeting was %d, not 220", r.code);
            return 0;
        }
        queue(p, "EHLO", p->rt->cfg->hostname);
        enter(p, ST_EHLO);
        return 0;
    case ST_EHLO:
        if (r.code != 250) {
            fail_quit(p, "EHLO was answered %d, not 250", r.code);
            return 0;
        }
        if (u->tls != UPSTREAM_TLS_STARTTLS) {
            healthy(p);
            return 0;
        }
        /* Exact keyword, as for sessions (the reply is still in the
         * buffer: in_len was only reset). No plaintext fallback. */
        if (!smtp_ehlo_has(p->in, r.len, "STARTTLS")) {
            fail_quit(p, "no STARTTLS in the EHLO reply");
            return 0;
        }
        queue(p, "STARTTLS", NULL);
        enter(p, ST_STARTTLS);
        return 0;
    case ST_STARTTLS:
        if (r.code != 220) {
            fail_quit(p, "STARTTLS was answered %d, not 220", r.code);
            return 0;
        }
        p->ssl = tls_client_ssl(p->up->ctx, u, probe_name(p), p->fd);
        if (p->ssl == NULL) {
            FAIL(p, "cannot create a TLS session");
            return -1;
        }
        enter(p, ST_HANDSHAKE);
        return 0;
    default:
        FAIL(p, "internal error: step %d", (int)p->step);
        return -1;
    }
}

/* All the progress possible, then either the end or the right watcher. */
static void probe_run(struct probe *p)
{
    int want;

    while ((want = advance(p)) == 0)
        ;
    p->revents = 0;
    if (want < 0) {
        if (p->t != NULL) /* every end reports; this is a safety net */
            report(p, 0, "internal error: probe ended without a result");
        probe_free(p);
        return;
    }
    if (p->io.fd != p->fd || (p->io.events & (EV_READ | EV_WRITE)) != want ||
        !ev_is_active(&p->io)) {
        ev_io_stop(EV_DEFAULT, &p->io);
        ev_io_set(&p->io, p->fd, want);
        ev_io_start(EV_DEFAULT, &p->io);
    }
}

static void probe_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct probe *p = w->data;

    (void)loop;
    p->revents = revents;
    probe_run(p);
}

static void probe_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct probe *p = w->data;
    const struct upstream_cfg *u = p->up->cfg;

    (void)loop;
    (void)revents;
    ev_timer_stop(EV_DEFAULT, w);
    switch (p->step) {
    case ST_CONNECT:
        if (++p->ai_next < p->naddr && dial_next(p) == 0) {
            probe_run(p);
            return;
        }
        if (p->step != ST_CLOSED)
            FAIL(p, "timeout connecting (%gs)", u->connect_timeout);
        break;
    case ST_QUIT:
        p->step = ST_CLOSED;
        break;
    default:
        FAIL(p, "timeout waiting for the %s (%gs)", step_name(p->step), u->reply_timeout);
        break;
    }
    probe_free(p);
}

/* Starts generation t->started of t on up. The result may come at once
 * (nothing to dial); the caller registers its request afterwards. */
static void probe_start(struct target *t, struct runtime *rt, struct upstream_rt *up)
{
    struct probe *p = calloc(1, sizeof(*p));
    const struct upstream_cfg *u = up->cfg;

    if (p == NULL || (p->in = malloc(REPLY_MAX)) == NULL) {
        free(p);
        target_result(t, t->started, 0, u->address, u->address, 0, "out of memory");
        return;
    }
    p->t = t;
    p->gen = t->started;
    p->rt = rt;
    rt->refs++;
    p->up = up;
    p->fd = -1;
    p->start = ev_time();
    snprintf(p->peer, sizeof(p->peer), "%s", u->address);
    if (up->ntargets > 0 && (p->targets = malloc(up->ntargets * sizeof(*p->targets))) != NULL) {
        memcpy(p->targets, up->targets, up->ntargets * sizeof(*p->targets));
        p->naddr = up->ntargets;
    }
    /* connect_timeout per address, reply_timeout per step (greeting, EHLO,
     * STARTTLS and the handshake at most). */
    p->until = ev_now(EV_DEFAULT) + (double)p->naddr * u->connect_timeout +
               (u->tls == UPSTREAM_TLS_STARTTLS   ? 4
                : u->tls == UPSTREAM_TLS_IMPLICIT ? 3
                                                  : 2) *
                   u->reply_timeout;
    ev_init(&p->io, probe_io_cb);
    p->io.data = p;
    ev_init(&p->timer, probe_timer_cb);
    p->timer.data = p;
    p->next = probes;
    probes = p;
    t->running = p;
    if (p->naddr == 0) {
        /* Hurry the resolver (where it runs: not in a workers' master). */
        upstream_rt_refresh(up);
        report(p, 0, "cannot resolve %s: %s", u->address,
               up->resolve_err[0] ? up->resolve_err : "no address");
        probe_free(p);
        return;
    }
    if (dial_next(p) == -1) {
        probe_free(p);
        return;
    }
    probe_run(p);
}

/* ---- the interface ---- */

static struct upstream_rt *find_upstream(struct runtime *rt, const char *name)
{
    for (size_t i = 0; i < rt->nups; i++)
        if (strcmp(rt->ups[i].cfg->name, name) == 0)
            return &rt->ups[i];
    if (strcmp(name, "default") == 0)
        return find_upstream(rt, "");
    return NULL;
}

static int in_use(const struct runtime *rt, const struct upstream_rt *up)
{
    for (size_t i = 0; i < rt->nlis; i++)
        if (rt->lis[i].up == up)
            return 1;
    return 0;
}

static void answer_now(struct probe_answer *ans, int status, const char *fmt, const char *arg)
{
    ans->status = status;
    if (asprintf(&ans->body, fmt, arg) < 0) {
        ans->body = NULL;
        ans->len = 0;
        return;
    }
    ans->len = strlen(ans->body);
}

struct probe_req *probe_request(struct runtime *rt, const char *name, probe_done_fn done, void *arg,
                                struct probe_answer *now)
{
    struct upstream_rt *one = NULL;
    struct probe_req *r;
    ev_tstamp t_now = ev_now(EV_DEFAULT);

    if (name != NULL) {
        one = find_upstream(rt, name);
        if (one == NULL) {
            char clean[100];
            size_t i;
            /* Echoed back: printable ASCII only. */
            for (i = 0; name[i] != '\0' && i < sizeof(clean) - 1; i++)
                clean[i] = name[i] > 0x20 && name[i] < 0x7f && name[i] != '\'' ? name[i] : '?';
            clean[i] = '\0';
            answer_now(now, 404, "no upstream called '%s'\n", clean);
            return NULL;
        }
    }
    r = calloc(1, sizeof(*r) + rt->nups * sizeof(r->w[0]));
    if (r == NULL) {
        answer_now(now, 503, "%s", "out of memory\n");
        return NULL;
    }
    r->done = done;
    r->arg = arg;
    r->until = t_now;
    for (size_t i = 0; i < rt->nups; i++) {
        struct upstream_rt *up = &rt->ups[i];
        if (one != NULL ? up != one : !in_use(rt, up))
            continue;
        struct target *t = target_get(up->cfg);
        if (t == NULL) {
            free(r);
            answer_now(now, 503, "%s", "out of memory\n");
            return NULL;
        }
        r->w[r->n].t = t;
        if (t->running != NULL) {
            r->w[r->n].gen = t->started;
        } else if (t->have && t_now - t->at < PROBE_CACHE_SECONDS &&
                   strcmp(t->address, up->cfg->address) == 0) {
            r->w[r->n].gen = t->done;
        } else {
            r->w[r->n].gen = ++t->started;
            probe_start(t, rt, up);
        }
        if (t->running != NULL && t->running->until > r->until)
            r->until = t->running->until;
        r->n++;
    }
    if (req_complete(r)) {
        req_answer(r, now);
        free(r);
        return NULL;
    }
    r->next = reqs;
    reqs = r;
    return r;
}

double probe_req_wait(const struct probe_req *req)
{
    double left = req->until - ev_now(EV_DEFAULT);

    return left > 0 ? left : 0;
}

void probe_cancel(struct probe_req *req)
{
    for (struct probe_req **pp = &reqs; *pp != NULL; pp = &(*pp)->next)
        if (*pp == req) {
            *pp = req->next;
            free(req);
            return;
        }
}

void probe_render_metrics(FILE *out)
{
    int header = 0;

    for (size_t i = 0; i < ntargets; i++) {
        const struct target *t = targets[i];
        if (!t->have)
            continue;
        if (!header) {
            fprintf(out, "# HELP smtpbridge_upstream_probe_ok 1 if the last /healthz?upstream "
                         "probe of the upstream passed, 0 if it failed.\n"
                         "# TYPE smtpbridge_upstream_probe_ok gauge\n");
            header = 1;
        }
        fputs("smtpbridge_upstream_probe_ok{upstream=\"", out);
        /* Prometheus label escaping. */
        for (const char *c = t->name; *c; c++) {
            if (*c == '"' || *c == '\\')
                fputc('\\', out);
            fputc(*c, out);
        }
        fprintf(out, "\"} %d\n", t->ok);
    }
}

void probe_shutdown(void)
{
    while (probes != NULL)
        probe_free(probes);
    while (reqs != NULL) {
        struct probe_req *r = reqs;
        reqs = r->next;
        free(r);
    }
    for (size_t i = 0; i < ntargets; i++)
        target_free(targets[i]);
    free(targets);
    targets = NULL;
    ntargets = 0;
}
