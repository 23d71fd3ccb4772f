/*
 * listener.c - the runtime (TLS contexts, resolved upstreams, bound sockets)
 * and the accept path: accept4 in a bounded loop, session caps with a 421
 * before any greeting, and a pause instead of a spin when file descriptors
 * run out.
 */
#include "listener.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "session.h"

#define ACCEPTS_PER_EVENT 64
#define R_TOO_MANY        "421 4.7.0 Too many connections, try again later\r\n"

static struct runtime *active; /* the runtime whose listeners accept */
static ev_timer resume_timer;
static int paused;

/* How often upstream names are resolved again, and how soon after a failure. */
#define RESOLVE_EVERY 60.0
#define RESOLVE_RETRY 5.0

static int resolve(struct upstream_rt *up)
{
    struct addrinfo *res = NULL;
    int rc;

    memset(&up->hints, 0, sizeof(up->hints));
    up->hints.ai_socktype = SOCK_STREAM;
    up->hints.ai_protocol = IPPROTO_TCP;
    rc = getaddrinfo(up->cfg->host, up->cfg->port, &up->hints, &res);
    if (rc != 0) {
        snprintf(up->resolve_err, sizeof(up->resolve_err), "%s", gai_strerror(rc));
        return -1;
    }
    up->ai = res;
    return 0;
}

static void free_ai(struct upstream_rt *up);

static void resolved_thread(union sigval sv)
{
    struct upstream_rt *up = sv.sival_ptr;

    ev_async_send(EV_DEFAULT, &up->resolved);
}

static void resolved_cb(struct ev_loop *loop, ev_async *w, int revents)
{
    struct upstream_rt *up = w->data;
    int rc = gai_error(&up->gai);

    (void)loop;
    (void)revents;
    if (rc == EAI_INPROGRESS)
        return;
    up->busy = 0;
    if (rc == 0 && up->gai.ar_result != NULL) {
        if (up->ai == NULL)
            log_msg(LOG_LVL_INFO, 0, "event=resolved upstream=%s", up->cfg->address);
        free_ai(up);
        up->ai = up->gai.ar_result;
        up->gai.ar_result = NULL;
        up->resolve_err[0] = '\0';
    } else {
        /* Keep the addresses we had: a DNS hiccup must not stop mail. */
        snprintf(up->resolve_err, sizeof(up->resolve_err), "%s", gai_strerror(rc));
        log_msg(LOG_LVL_WARNING, 0, "event=resolve_failed upstream=%s error=\"%s\"%s",
                up->cfg->address, up->resolve_err,
                up->ai ? " (keeping the previous addresses)" : "");
    }
    ev_timer_stop(EV_DEFAULT, &up->refresh);
    ev_timer_set(&up->refresh, up->ai ? RESOLVE_EVERY : RESOLVE_RETRY, 0.);
    ev_timer_start(EV_DEFAULT, &up->refresh);
}

void upstream_rt_refresh(struct upstream_rt *up)
{
    struct gaicb *list[1] = {&up->gai};
    struct sigevent sev;

    if (up->busy || !ev_is_active(&up->resolved))
        return;
    memset(&up->gai, 0, sizeof(up->gai));
    up->gai.ar_name = up->cfg->host;
    up->gai.ar_service = up->cfg->port;
    up->gai.ar_request = &up->hints;
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD;
    sev.sigev_notify_function = resolved_thread;
    sev.sigev_value.sival_ptr = up;
    if (getaddrinfo_a(GAI_NOWAIT, list, 1, &sev) == 0)
        up->busy = 1;
}

static void refresh_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    upstream_rt_refresh(w->data);
}

/* Waits for a lookup still in flight (at shutdown or reload only). */
static void resolver_stop(struct upstream_rt *up)
{
    const struct gaicb *list[1] = {&up->gai};

    ev_async_stop(EV_DEFAULT, &up->resolved);
    ev_timer_stop(EV_DEFAULT, &up->refresh);
    if (up->busy && gai_cancel(&up->gai) != EAI_CANCELED)
        while (gai_error(&up->gai) == EAI_INPROGRESS)
            gai_suspend(list, 1, NULL);
    if (up->busy && up->gai.ar_result)
        freeaddrinfo(up->gai.ar_result);
    up->busy = 0;
}

static int bind_one(struct listener *li, const char *spec)
{
    struct addrinfo hints, *res = NULL;
    char *host = NULL, *port = NULL;
    int fd = -1, one = 1, rc;
    const char *h;

    if (config_split_hostport(spec, &host, &port) == -1)
        return -1;
    memset(&hints, 0, sizeof(hints));
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    h = (strcmp(host, "*") == 0) ? NULL : host;
    rc = getaddrinfo(h, port, &hints, &res);
    if (rc != 0) {
        log_msg(LOG_LVL_ERROR, 0, "event=bind_failed listener=%s address=%s error=\"%s\"",
                li->cfg->name, spec, gai_strerror(rc));
        goto fail;
    }
    fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd == -1)
        goto syserr;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    /* [::]:465 and 0.0.0.0:465 are separate sockets; keep v6 to v6. */
    if (res->ai_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, res->ai_addr, res->ai_addrlen) == -1 || listen(fd, 511) == -1)
        goto syserr;
    li->fds[li->nfds++] = fd;
    freeaddrinfo(res);
    free(host);
    free(port);
    return 0;
syserr:
    log_msg(LOG_LVL_ERROR, 0, "event=bind_failed listener=%s address=%s error=\"%s\"",
            li->cfg->name, spec, strerror(errno));
fail:
    if (fd != -1)
        close(fd);
    if (res)
        freeaddrinfo(res);
    free(host);
    free(port);
    return -1;
}

static void accept_cb(struct ev_loop *loop, ev_io *w, int revents);

/* The listening socket the old runtime has for exactly this address. */
static int *old_fd(struct runtime *old, const char *spec)
{
    for (size_t i = 0; old && i < old->nlis; i++)
        for (size_t j = 0; j < old->lis[i].nfds; j++)
            if (old->lis[i].fds[j] != -1 && strcmp(old->lis[i].specs[j], spec) == 0)
                return &old->lis[i].fds[j];
    return NULL;
}

/* A copy of the old runtime's addresses for the same host and port, so a
 * reload does not block the loop on DNS for an unchanged upstream. */
static struct addrinfo *copy_ai(const struct addrinfo *ai)
{
    struct addrinfo *head = NULL, **tail = &head;

    for (; ai; ai = ai->ai_next) {
        struct addrinfo *n = calloc(1, sizeof(*n) + ai->ai_addrlen);
        if (n == NULL)
            break;
        *n = *ai;
        n->ai_addr = (struct sockaddr *)(n + 1);
        memcpy(n->ai_addr, ai->ai_addr, ai->ai_addrlen);
        n->ai_canonname = NULL;
        n->ai_next = NULL;
        *tail = n;
        tail = &n->ai_next;
    }
    return head;
}

static void free_ai(struct upstream_rt *up)
{
    struct addrinfo *n;

    if (!up->ai_copied) {
        if (up->ai)
            freeaddrinfo(up->ai);
    } else {
        while (up->ai) {
            n = up->ai->ai_next;
            free(up->ai);
            up->ai = n;
        }
    }
    up->ai = NULL;
    up->ai_copied = 0;
}

struct runtime *runtime_build(struct config *cfg, int bind_sockets, struct runtime *old)
{
    struct runtime *rt = calloc(1, sizeof(*rt));
    char err[512];
    int failed = 0;

    if (rt == NULL) {
        config_free(cfg);
        return NULL;
    }
    rt->cfg = cfg;
    rt->refs = 1;
    rt->ups = calloc(cfg->nupstreams, sizeof(*rt->ups));
    rt->lis = calloc(cfg->nlisteners, sizeof(*rt->lis));
    if (rt->ups == NULL || rt->lis == NULL) {
        runtime_unref(rt);
        return NULL;
    }
    rt->nups = cfg->nupstreams;
    rt->nlis = cfg->nlisteners;
    for (size_t i = 0; i < rt->nups; i++) {
        struct upstream_rt *up = &rt->ups[i];
        up->cfg = &cfg->upstreams[i];
        if (up->cfg->tls != UPSTREAM_TLS_NONE) {
            up->ctx = tls_client_ctx(up->cfg, err, sizeof(err));
            if (up->ctx == NULL) {
                fprintf(stderr, "%s:%d: [upstream%s%s] %s\n", cfg->path, up->cfg->line,
                        up->cfg->name[0] ? " " : "", up->cfg->name, err);
                failed = 1;
            }
        }
        for (size_t j = 0; old && j < old->nups; j++) {
            const struct upstream_cfg *o = old->ups[j].cfg;
            if (old->ups[j].ai && strcmp(o->host, up->cfg->host) == 0 &&
                strcmp(o->port, up->cfg->port) == 0) {
                up->ai = copy_ai(old->ups[j].ai);
                up->ai_copied = up->ai != NULL;
                break;
            }
        }
        if (up->ai == NULL && resolve(up) == -1)
            log_msg(LOG_LVL_WARNING, 0,
                    "event=resolve_failed upstream=%s error=\"%s\" (sessions will get 421)",
                    up->cfg->address, up->resolve_err);
    }
    for (size_t i = 0; i < rt->nlis; i++) {
        struct listener *li = &rt->lis[i];
        li->cfg = &cfg->listeners[i];
        li->rt = rt;
        for (size_t j = 0; j < rt->nups; j++)
            if (rt->ups[j].cfg == li->cfg->upstream)
                li->up = &rt->ups[j];
        li->ctx = tls_server_ctx(li->cfg, err, sizeof(err));
        if (li->ctx == NULL) {
            /* The message names the key: cite its line. */
            const char *k = strstr(err, "key 'key'") ? "key"
                            : strstr(err, "min_tls") ? "min_tls"
                                                     : "cert";
            fprintf(stderr, "%s:%d: [listener %s] %s\n", cfg->path,
                    config_listener_line(li->cfg, k), li->cfg->name, err);
            failed = 1;
        }
        li->fds = calloc(li->cfg->nlisten, sizeof(int));
        li->specs = calloc(li->cfg->nlisten, sizeof(char *));
        li->steal = calloc(li->cfg->nlisten, sizeof(int *));
        li->watchers = calloc(li->cfg->nlisten, sizeof(ev_io));
        if (li->fds == NULL || li->specs == NULL || li->steal == NULL || li->watchers == NULL) {
            failed = 1;
            continue;
        }
        if (!bind_sockets)
            continue;
        for (size_t j = 0; j < li->cfg->nlisten; j++) {
            const char *spec = li->cfg->listen[j];
            int *from = old_fd(old, spec);
            /* On reload an address already bound keeps its socket: no
             * window where connections are refused, no re-bind of a
             * privileged port after privileges were dropped. */
            if (from != NULL) {
                li->steal[li->nfds] = from;
                li->fds[li->nfds++] = *from;
            } else if (bind_one(li, spec) == -1) {
                failed = 1;
                continue;
            }
            li->specs[li->nfds - 1] = spec;
            ev_io_init(&li->watchers[li->nfds - 1], accept_cb, li->fds[li->nfds - 1], EV_READ);
            li->watchers[li->nfds - 1].data = li;
        }
    }
    if (failed) {
        runtime_unref(rt);
        return NULL;
    }
    /* Only now that nothing can fail does the old runtime give them up. */
    for (size_t i = 0; i < rt->nlis; i++)
        for (size_t j = 0; j < rt->lis[i].nfds; j++)
            if (rt->lis[i].steal[j] != NULL) {
                *rt->lis[i].steal[j] = -1;
                rt->lis[i].steal[j] = NULL;
            }
    return rt;
}

void runtime_unref(struct runtime *rt)
{
    if (rt == NULL || --rt->refs > 0)
        return;
    for (size_t i = 0; i < rt->nlis; i++) {
        struct listener *li = &rt->lis[i];
        for (size_t j = 0; j < li->nfds; j++) {
            ev_io_stop(EV_DEFAULT, &li->watchers[j]);
            /* Sockets taken over from another runtime are not ours. */
            if (li->fds[j] != -1 && li->steal[j] == NULL)
                close(li->fds[j]);
        }
        free(li->fds);
        free(li->specs);
        free(li->steal);
        free(li->watchers);
        if (li->ctx)
            wolfSSL_CTX_free(li->ctx);
    }
    for (size_t i = 0; i < rt->nups; i++) {
        resolver_stop(&rt->ups[i]);
        if (rt->ups[i].ctx)
            wolfSSL_CTX_free(rt->ups[i].ctx);
        free_ai(&rt->ups[i]);
        if (rt->ups[i].resume)
            wolfSSL_SESSION_free(rt->ups[i].resume);
    }
    free(rt->lis);
    free(rt->ups);
    config_free(rt->cfg);
    free(rt);
}

static void set_watchers(struct runtime *rt, int on)
{
    for (size_t i = 0; i < rt->nlis; i++)
        for (size_t j = 0; j < rt->lis[i].nfds; j++) {
            if (on)
                ev_io_start(EV_DEFAULT, &rt->lis[i].watchers[j]);
            else
                ev_io_stop(EV_DEFAULT, &rt->lis[i].watchers[j]);
        }
}

static void resume_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    paused = 0;
    if (active)
        set_watchers(active, 1);
}

void listener_start(struct runtime *rt)
{
    for (size_t i = 0; i < rt->nups; i++) {
        struct upstream_rt *up = &rt->ups[i];
        ev_async_init(&up->resolved, resolved_cb);
        up->resolved.data = up;
        ev_async_start(EV_DEFAULT, &up->resolved);
        ev_init(&up->refresh, refresh_cb);
        up->refresh.data = up;
        ev_timer_set(&up->refresh, up->ai ? RESOLVE_EVERY : RESOLVE_RETRY, 0.);
        ev_timer_start(EV_DEFAULT, &up->refresh);
    }
    active = rt;
    ev_init(&resume_timer, resume_cb);
    set_watchers(rt, 1);
}

void listener_close(struct runtime *rt)
{
    listener_stop(rt);
    for (size_t i = 0; i < rt->nlis; i++)
        for (size_t j = 0; j < rt->lis[i].nfds; j++)
            if (rt->lis[i].fds[j] != -1 && rt->lis[i].steal[j] == NULL) {
                close(rt->lis[i].fds[j]);
                rt->lis[i].fds[j] = -1;
            }
}

void listener_stop(struct runtime *rt)
{
    set_watchers(rt, 0);
    ev_timer_stop(EV_DEFAULT, &resume_timer);
    if (active == rt)
        active = NULL;
}

/*
 * Out of file descriptors: the pending connection stays in the backlog and
 * the listening fd stays readable, so accepting again at once would spin.
 * Stop accepting for a second instead (sessions ending free descriptors).
 */
static void pause_accepting(struct runtime *rt, int err)
{
    if (paused)
        return;
    paused = 1;
    log_msg(LOG_LVL_WARNING, 0, "event=accept_paused error=\"%s\" sessions=%u seconds=1",
            strerror(err), session_count());
    set_watchers(rt, 0);
    ev_timer_set(&resume_timer, 1.0, 0.);
    ev_timer_start(EV_DEFAULT, &resume_timer);
}

static int over_cap(const struct config *cfg, const struct listener_cfg *li,
                    const struct sockaddr_storage *peer, const char **why)
{
    if (cfg->max_sessions && session_count() >= cfg->max_sessions) {
        *why = "max_sessions";
        return 1;
    }
    /* Behind a load balancer every connection comes from the balancer: the
     * per-address cap is applied to the real client, after its PROXY header
     * (session_count_client). */
    if (cfg->max_sessions_per_ip && !li->accept_proxy &&
        session_count_ip(peer) >= cfg->max_sessions_per_ip) {
        *why = "max_sessions_per_ip";
        return 1;
    }
    return 0;
}

/* An empty list allows everyone (allow_from); proxy_from is never empty. */
static int in_list(const struct cidr *v, size_t n, const struct sockaddr_storage *peer)
{
    return n == 0 || cidr_list_match(v, n, peer);
}

static void accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct listener *li = w->data;
    const struct config *cfg = li->rt->cfg;
    struct sockaddr_storage ss;
    socklen_t len;
    const char *why;
    int fd, one = 1;

    (void)loop;
    (void)revents;
    for (int i = 0; i < ACCEPTS_PER_EVENT; i++) {
        len = sizeof(ss);
        fd = accept4(w->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd == -1) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                pause_accepting(li->rt, errno);
            return;
        }
        /* Behind a load balancer the real client is only known from its
         * PROXY header; allow_from is checked then (client.c). */
        if (li->cfg->accept_proxy ? !in_list(li->cfg->proxy_from, li->cfg->nproxy_from, &ss)
                                  : !in_list(li->cfg->allow_from, li->cfg->nallow_from, &ss)) {
            metrics_rejected(metrics_listener(li->cfg->name));
            log_msg(LOG_LVL_INFO, 0, "event=reject listener=%s cap=%s", li->cfg->name,
                    li->cfg->accept_proxy ? "proxy_from" : "allow_from");
            close(fd);
            continue;
        }
        if (over_cap(cfg, li->cfg, &ss, &why)) {
            metrics_rejected(metrics_listener(li->cfg->name));
            log_msg(LOG_LVL_WARNING, 0, "event=reject listener=%s cap=%s", li->cfg->name, why);
            /* Plaintext listeners get a reply; on an implicit-TLS port any
             * plaintext would be garbage to the client, so just close. */
            if (li->cfg->mode == LISTENER_STARTTLS)
                (void)!send(fd, R_TOO_MANY, strlen(R_TOO_MANY), MSG_DONTWAIT | MSG_NOSIGNAL);
            close(fd);
            continue;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        session_new(li, fd, &ss);
    }
}
