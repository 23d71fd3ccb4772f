/*
 * admin.c - /metrics and /healthz over a tiny HTTP/1.0 server (see admin.h).
 *
 * Deliberately minimal: it should be bound to loopback or a private
 * network; requests are at most 2 KiB, answered once, and the connection
 * closed. The metrics body is built in memory (open_memstream) and sent with
 * one blocking-free write per readiness event.
 *
 * GET /healthz?upstream[=NAME] hands the request to probe.c and parks the
 * connection (no watcher, a deadline of the probe's own bound plus a margin)
 * until the answer comes back through health_done().
 */
#include "admin.h"

#include <errno.h>
#include <ev.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "metrics.h"
#include "probe.h"
#include "runtime.h"
#include "session.h"

#define REQ_MAX        2048
#define MAX_CLIENTS    32
#define CLIENT_TIMEOUT 5.0
/* Beyond a probe's own bound, for the answer to be written. */
#define PROBE_MARGIN 2.0

struct admin_client {
    struct admin_client *next, **prevp;
    int fd;
    ev_io io;
    ev_timer timer;
    struct probe_req *preq; /* waiting for an upstream probe */
    char req[REQ_MAX];
    size_t len;
    char *resp;
    size_t resp_len, sent;
};

static int listen_fd = -1;
static ev_io accept_w;
static int draining;
static unsigned nclients;
static struct admin_client *clients;
static struct runtime **current; /* the serving runtime (changes on reload) */

static void client_free(struct admin_client *a)
{
    if (a->preq != NULL)
        probe_cancel(a->preq);
    ev_io_stop(EV_DEFAULT, &a->io);
    ev_timer_stop(EV_DEFAULT, &a->timer);
    close(a->fd);
    *a->prevp = a->next;
    if (a->next != NULL)
        a->next->prevp = a->prevp;
    free(a->resp);
    free(a);
    nclients--;
}

static void respond(struct admin_client *a, int code, const char *status, const char *ctype,
                    const char *body, size_t blen)
{
    FILE *f = open_memstream(&a->resp, &a->resp_len);

    if (f == NULL) {
        client_free(a);
        return;
    }
    fprintf(f,
            "HTTP/1.0 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
            "Connection: close\r\n\r\n",
            code, status, ctype, blen);
    fwrite(body, 1, blen, f);
    fclose(f);
    ev_io_stop(EV_DEFAULT, &a->io);
    ev_io_set(&a->io, a->fd, EV_WRITE);
    ev_io_start(EV_DEFAULT, &a->io);
}

static void health_done(void *arg, const struct probe_answer *ans)
{
    struct admin_client *a = arg;

    a->preq = NULL;
    if (draining)
        respond(a, 503, "Service Unavailable", "text/plain", "draining\n", 9);
    else
        respond(a, ans->status, ans->status == 200 ? "OK" : "Service Unavailable", "text/plain",
                ans->body ? ans->body : "", ans->len);
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f')
        return (c | 0x20) - 'a' + 10;
    return -1;
}

/*
 * The value of the query parameter `key` ("" if it has none) into out
 * (%XX and '+' decoded, %00 kept as text, truncated to fit); -1 if the
 * query does not have it.
 */
static int query_param(const char *q, const char *key, char *out, size_t cap)
{
    size_t klen = strlen(key), o = 0;
    int hi, lo;

    while (q != NULL) {
        if (strncmp(q, key, klen) == 0 && (q[klen] == '\0' || q[klen] == '&' || q[klen] == '=')) {
            for (q += klen + (q[klen] == '='); *q != '\0' && *q != '&' && o + 1 < cap; q++) {
                if (*q == '%' && (hi = hexval(q[1])) >= 0 && (lo = hexval(q[2])) >= 0 &&
                    (hi | lo) != 0) {
                    out[o++] = (char)(hi * 16 + lo);
                    q += 2;
                } else {
                    out[o++] = *q == '+' ? ' ' : *q;
                }
            }
            out[o] = '\0';
            return 0;
        }
        q = strchr(q, '&');
        if (q != NULL)
            q++;
    }
    return -1;
}

/* /healthz?upstream[=NAME]: answered now (cache, unknown name) or parked. */
static void health_probe(struct admin_client *a, const char *name)
{
    struct probe_answer now;

    a->preq = probe_request(*current, name[0] ? name : NULL, health_done, a, &now);
    if (a->preq == NULL) {
        respond(a, now.status,
                now.status == 200   ? "OK"
                : now.status == 404 ? "Not Found"
                                    : "Service Unavailable",
                "text/plain", now.body ? now.body : "", now.len);
        free(now.body);
        return;
    }
    /* Nothing more is read from the client; the probe's own deadlines
     * bound the wait, this one only catches a bug. */
    ev_io_stop(EV_DEFAULT, &a->io);
    ev_timer_stop(EV_DEFAULT, &a->timer);
    ev_timer_set(&a->timer, probe_req_wait(a->preq) + PROBE_MARGIN, 0.);
    ev_timer_start(EV_DEFAULT, &a->timer);
}

static void handle(struct admin_client *a)
{
    char method[8], path[256];
    char *body = NULL;
    size_t blen = 0;

    if (sscanf(a->req, "%7s %255s", method, path) != 2) {
        respond(a, 400, "Bad Request", "text/plain", "bad request\n", 12);
        return;
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        respond(a, 405, "Method Not Allowed", "text/plain", "GET only\n", 9);
        return;
    }
    char *q = strchr(path, '?'), name[256];
    if (q)
        *q++ = '\0';
    if (strcmp(path, "/healthz") == 0) {
        if (draining)
            respond(a, 503, "Service Unavailable", "text/plain", "draining\n", 9);
        else if (q != NULL && current != NULL &&
                 query_param(q, "upstream", name, sizeof(name)) == 0)
            health_probe(a, name);
        else
            respond(a, 200, "OK", "text/plain", "ok\n", 3);
        return;
    }
    if (strcmp(path, "/metrics") == 0) {
        FILE *f = open_memstream(&body, &blen);
        if (f == NULL) {
            client_free(a);
            return;
        }
        metrics_render(f);
        fprintf(f, "# HELP smtpbridge_draining 1 while the process is draining.\n"
                   "# TYPE smtpbridge_draining gauge\n");
        fprintf(f, "smtpbridge_draining %d\n", draining);
        probe_render_metrics(f);
        fclose(f);
        respond(a, 200, "OK", "text/plain; version=0.0.4", body, blen);
        free(body);
        return;
    }
    respond(a, 404, "Not Found", "text/plain", "not found\n", 10);
}

static void client_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct admin_client *a = w->data;
    ssize_t n;

    (void)loop;
    if (a->preq != NULL)
        return; /* parked: the answer is not there yet */
    if (revents & EV_WRITE) {
        n = send(a->fd, a->resp + a->sent, a->resp_len - a->sent, MSG_NOSIGNAL);
        if (n > 0)
            a->sent += (size_t)n;
        if ((n < 0 && errno != EAGAIN && errno != EINTR) || a->sent == a->resp_len)
            client_free(a);
        return;
    }
    n = read(a->fd, a->req + a->len, REQ_MAX - 1 - a->len);
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        client_free(a);
        return;
    }
    a->len += (size_t)n;
    a->req[a->len] = '\0';
    if (strstr(a->req, "\r\n\r\n") || strstr(a->req, "\n\n"))
        handle(a);
    else if (a->len == REQ_MAX - 1)
        respond(a, 431, "Request Header Fields Too Large", "text/plain", "too large\n", 10);
}

static void timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    client_free(w->data);
}

static void accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    for (int i = 0; i < 16; i++) {
        int fd = accept4(w->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd == -1)
            return;
        struct admin_client *a = calloc(1, sizeof(*a));
        if (a == NULL || nclients >= MAX_CLIENTS) {
            free(a);
            close(fd);
            continue;
        }
        nclients++;
        a->next = clients;
        if (clients != NULL)
            clients->prevp = &a->next;
        a->prevp = &clients;
        clients = a;
        a->fd = fd;
        ev_io_init(&a->io, client_cb, fd, EV_READ);
        a->io.data = a;
        ev_timer_init(&a->timer, timeout_cb, CLIENT_TIMEOUT, 0.);
        a->timer.data = a;
        ev_io_start(loop, &a->io);
        ev_timer_start(loop, &a->timer);
    }
}

int admin_bind(const char *spec)
{
    struct addrinfo hints, *res = NULL;
    char *host = NULL, *port = NULL;
    int one = 1, rc;

    if (config_split_hostport(spec, &host, &port) == -1)
        return -1;
    memset(&hints, 0, sizeof(hints));
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    rc = getaddrinfo(host, port, &hints, &res);
    free(host);
    free(port);
    if (rc != 0) {
        log_msg(LOG_LVL_ERROR, 0, "event=bind_failed listener=admin address=%s error=\"%s\"", spec,
                gai_strerror(rc));
        return -1;
    }
    listen_fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (listen_fd == -1 ||
        setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == -1 ||
        bind(listen_fd, res->ai_addr, res->ai_addrlen) == -1 || listen(listen_fd, 64) == -1) {
        log_msg(LOG_LVL_ERROR, 0, "event=bind_failed listener=admin address=%s error=\"%s\"", spec,
                strerror(errno));
        if (listen_fd != -1)
            close(listen_fd);
        listen_fd = -1;
        freeaddrinfo(res);
        return -1;
    }
    freeaddrinfo(res);
    return 0;
}

void admin_start(struct runtime **rtp)
{
    current = rtp;
    if (listen_fd == -1)
        return;
    ev_io_init(&accept_w, accept_cb, listen_fd, EV_READ);
    ev_io_start(EV_DEFAULT, &accept_w);
}

void admin_set_draining(void)
{
    draining = 1;
}

void admin_stop(void)
{
    /* Also in a freshly forked worker: the connections and probes it
     * inherited are the master's to serve (a worker that answered too would
     * send a second response, or hold the connection open after the
     * master's). */
    while (clients != NULL)
        client_free(clients);
    probe_shutdown();
    if (listen_fd == -1)
        return;
    ev_io_stop(EV_DEFAULT, &accept_w);
    close(listen_fd);
    listen_fd = -1;
}
