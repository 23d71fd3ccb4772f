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
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
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

/* Appends one name's getaddrinfo results to a target list. */
static int add_targets(struct upstream_target **v, size_t *n, const struct addrinfo *ai,
                       unsigned addr)
{
    for (; ai; ai = ai->ai_next) {
        struct upstream_target *nv;
        if (ai->ai_addrlen > sizeof(nv->sa))
            continue;
        nv = realloc(*v, (*n + 1) * sizeof(**v));
        if (nv == NULL)
            return -1;
        *v = nv;
        memset(&nv[*n], 0, sizeof(nv[*n]));
        memcpy(&nv[*n].sa, ai->ai_addr, ai->ai_addrlen);
        nv[*n].salen = ai->ai_addrlen;
        nv[*n].addr = addr;
        (*n)++;
    }
    return 0;
}

/* Appends the targets of `from` that came from address `addr`. */
static int keep_targets(struct upstream_target **v, size_t *n, const struct upstream_target *from,
                        size_t nfrom, unsigned addr, unsigned new_addr)
{
    for (size_t i = 0; i < nfrom; i++) {
        struct upstream_target *nv;
        if (from[i].addr != addr)
            continue;
        nv = realloc(*v, (*n + 1) * sizeof(**v));
        if (nv == NULL)
            return -1;
        *v = nv;
        nv[*n] = from[i];
        nv[*n].addr = new_addr;
        (*n)++;
    }
    return 0;
}

static void set_hints(struct addrinfo *hints)
{
    memset(hints, 0, sizeof(*hints));
    hints->ai_socktype = SOCK_STREAM;
    hints->ai_protocol = IPPROTO_TCP;
}

/* Adds "host: error" to the upstream's last resolution error. */
static void note_resolve_error(struct upstream_rt *up, const char *host, int rc)
{
    size_t o = strlen(up->resolve_err);

    if (o + 1 < sizeof(up->resolve_err))
        snprintf(up->resolve_err + o, sizeof(up->resolve_err) - o, "%s%s: %s", o ? "; " : "", host,
                 gai_strerror(rc));
}

/* Blocking resolution of every name: only at the first start, before the
 * daemon serves anyone. A name that fails is a warning (it may come up). */
static void resolve_now(struct upstream_rt *up)
{
    const struct upstream_cfg *u = up->cfg;
    struct addrinfo hints;

    set_hints(&hints);
    up->resolve_err[0] = '\0';
    for (size_t i = 0; i < u->naddrs; i++) {
        struct addrinfo *res = NULL;
        int rc = getaddrinfo(u->addrs[i].host, u->addrs[i].port, &hints, &res);
        if (rc != 0) {
            note_resolve_error(up, u->addrs[i].host, rc);
            log_msg(LOG_LVL_WARNING, 0, "event=resolve_failed upstream=%s error=\"%s\"%s",
                    u->addrs[i].spec, gai_strerror(rc),
                    u->naddrs > 1 ? " (the other addresses are tried)"
                                  : " (sessions will get 421)");
            continue;
        }
        add_targets(&up->targets, &up->ntargets, res, (unsigned)i);
        freeaddrinfo(res);
    }
}

/*
 * Background resolution. Each batch of lookups (one request per configured
 * address) goes to glibc's resolver thread with getaddrinfo_a, which writes
 * the answers into the batch and then calls resolved_thread in a thread of
 * its own. A running lookup cannot be interrupted (gai_cancel only cancels
 * a request not yet started), and waiting for it would hold the event loop,
 * and every session with it, for the resolver's whole timeout: tens of
 * seconds against a DNS server that does not answer. So the batch lives
 * apart from its upstream, with copies of what glibc reads, and an upstream
 * that goes away while its lookup runs (a reload, shutdown) abandons the
 * batch instead of waiting. Of the notification and the abandoning loop,
 * whichever comes second frees the batch; the state says which.
 */
enum { BATCH_RUNNING, BATCH_DONE, BATCH_ABANDONED };

struct resolve_batch {
    struct resolve_batch *next; /* in `batches` (the loop's) while owned */
    struct upstream_rt *up;
    atomic_int state;
    size_t n;
    struct addrinfo hints;
    struct gaicb gai[UPSTREAM_MAX_ADDRS];
    char *host[UPSTREAM_MAX_ADDRS], *port[UPSTREAM_MAX_ADDRS];
};

static struct resolve_batch *batches; /* owned by an upstream: loop thread only */
/* Process-wide and never stopped or freed, so that a notification may
 * always wake the loop through it, whatever was freed meanwhile. */
static ev_async batches_done;

static void batch_free(struct resolve_batch *b)
{
    for (size_t i = 0; i < b->n; i++) {
        if (b->gai[i].ar_result)
            freeaddrinfo(b->gai[i].ar_result);
        free(b->host[i]);
        free(b->port[i]);
    }
    free(b);
}

static void batch_unlink(struct resolve_batch *b)
{
    for (struct resolve_batch **pp = &batches; *pp; pp = &(*pp)->next)
        if (*pp == b) {
            *pp = b->next;
            break;
        }
    b->next = NULL;
    b->up->lookup = NULL;
    b->up = NULL;
}

/* In glibc's notification thread: touches nothing but the batch's state
 * before it is handed over, and the batch only if abandoned. */
static void resolved_thread(union sigval sv)
{
    struct resolve_batch *b = sv.sival_ptr;
    int running = BATCH_RUNNING;

    if (atomic_compare_exchange_strong(&b->state, &running, BATCH_DONE))
        ev_async_send(EV_DEFAULT, &batches_done);
    else
        batch_free(b); /* abandoned: nobody else will */
}

/* The upstream stops waiting for its lookup (it is being freed). */
static void batch_abandon(struct upstream_rt *up)
{
    struct resolve_batch *b = up->lookup;
    int running = BATCH_RUNNING;

    if (b == NULL)
        return;
    batch_unlink(b);
    if (!atomic_compare_exchange_strong(&b->state, &running, BATCH_ABANDONED))
        batch_free(b); /* already done: its notification has gone */
}

/* A finished batch's answers become the upstream's addresses. */
static void batch_finish(struct resolve_batch *b)
{
    struct upstream_rt *up = b->up;
    const struct upstream_cfg *u = up->cfg;
    struct upstream_target *v = NULL;
    size_t n = 0;
    int had = up->ntargets > 0;

    batch_unlink(b);
    up->resolve_err[0] = '\0';
    for (size_t i = 0; i < b->n; i++) {
        int rc = gai_error(&b->gai[i]);
        if (rc == 0 && b->gai[i].ar_result != NULL) {
            add_targets(&v, &n, b->gai[i].ar_result, (unsigned)i);
        } else {
            /* Keep what we had: a DNS hiccup must not stop mail. */
            size_t kept = n;
            keep_targets(&v, &n, up->targets, up->ntargets, (unsigned)i, (unsigned)i);
            note_resolve_error(up, u->addrs[i].host, rc);
            log_msg(LOG_LVL_WARNING, 0, "event=resolve_failed upstream=%s error=\"%s\"%s",
                    u->addrs[i].spec, gai_strerror(rc),
                    kept < n ? " (keeping the previous addresses)" : "");
        }
    }
    batch_free(b);
    free(up->targets);
    up->targets = v;
    up->ntargets = n;
    if (!had && n > 0)
        log_msg(LOG_LVL_INFO, 0, "event=resolved upstream=%s addresses=%zu", u->address, n);
    ev_timer_stop(EV_DEFAULT, &up->refresh);
    ev_timer_set(&up->refresh, n ? RESOLVE_EVERY : RESOLVE_RETRY, 0.);
    ev_timer_start(EV_DEFAULT, &up->refresh);
    /* Sessions that arrived before the first answer go on (or fail) now. */
    session_upstream_resolved(up);
}

static void batches_done_cb(struct ev_loop *loop, ev_async *w, int revents)
{
    struct resolve_batch *b;

    (void)loop;
    (void)w;
    (void)revents;
    /* From the head each time: the sessions batch_finish lets go on may
     * start a batch, or end an old runtime's last session, which abandons
     * (and may free) its batches. Lists are a few entries long. */
    for (;;) {
        for (b = batches; b && atomic_load(&b->state) != BATCH_DONE; b = b->next)
            ;
        if (b == NULL)
            return;
        batch_finish(b);
    }
}

void upstream_rt_refresh(struct upstream_rt *up)
{
    struct gaicb *list[UPSTREAM_MAX_ADDRS];
    const struct upstream_cfg *u = up->cfg;
    struct resolve_batch *b;
    struct sigevent sev;
    int oom = 0;

    if (up->lookup != NULL || !up->started)
        return;
    b = calloc(1, sizeof(*b));
    if (b == NULL)
        return; /* the refresh timer tries again */
    set_hints(&b->hints);
    b->n = u->naddrs;
    atomic_init(&b->state, BATCH_RUNNING);
    for (size_t i = 0; i < b->n; i++) {
        /* Copies: glibc reads them whenever its thread gets to the request,
         * possibly after a reload freed this configuration. */
        b->host[i] = strdup(u->addrs[i].host);
        b->port[i] = strdup(u->addrs[i].port);
        oom |= b->host[i] == NULL || b->port[i] == NULL;
        b->gai[i].ar_name = b->host[i];
        b->gai[i].ar_service = b->port[i];
        b->gai[i].ar_request = &b->hints;
        list[i] = &b->gai[i];
    }
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD;
    sev.sigev_notify_function = resolved_thread;
    sev.sigev_value.sival_ptr = b;
    /* One notification once every request of the list has completed. */
    if (oom || getaddrinfo_a(GAI_NOWAIT, list, (int)b->n, &sev) != 0) {
        batch_free(b);
        return;
    }
    b->up = up;
    up->lookup = b;
    b->next = batches;
    batches = b;
}

static void refresh_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    upstream_rt_refresh(w->data);
}

/* At exit, before the runtimes go: lookups still running get up to
 * max_wait seconds to finish, so that their memory is freed rather than
 * left to glibc's threads; one that takes longer (a resolver that does not
 * answer) is abandoned, not waited for. */
void resolver_settle(double max_wait)
{
    const struct timespec step = {0, 10 * 1000 * 1000};

    for (double waited = 0; waited < max_wait; waited += 0.01) {
        const struct resolve_batch *b = batches;
        while (b && atomic_load(&b->state) == BATCH_DONE)
            b = b->next;
        if (b == NULL)
            return;
        nanosleep(&step, NULL);
    }
}

/* At reload or shutdown: no more lookups for this upstream, and none waited for. */
static void resolver_stop(struct upstream_rt *up)
{
    ev_timer_stop(EV_DEFAULT, &up->refresh);
    up->started = 0;
    batch_abandon(up);
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

void runtime_resolve_stale(struct runtime *rt)
{
    for (size_t i = 0; i < rt->nups; i++) {
        struct upstream_rt *up = &rt->ups[i];
        if (!up->stale)
            continue;
        free(up->targets);
        up->targets = NULL;
        up->ntargets = 0;
        resolve_now(up);
        up->stale = 0;
    }
}

/*
 * A reload copies the addresses of every name the running runtime already
 * resolved (same host and port), so it never waits for DNS; a name it does
 * not know is resolved in the background as soon as the new runtime starts
 * (sessions that need it wait for the answer, up to connect_timeout).
 */
static void reuse_targets(struct upstream_rt *up, const struct runtime *old)
{
    const struct upstream_cfg *u = up->cfg;

    for (size_t i = 0; i < u->naddrs; i++) {
        int found = 0;
        for (size_t j = 0; j < old->nups && !found; j++) {
            const struct upstream_rt *o = &old->ups[j];
            for (size_t k = 0; k < o->cfg->naddrs && !found; k++) {
                if (strcmp(o->cfg->addrs[k].host, u->addrs[i].host) != 0 ||
                    strcmp(o->cfg->addrs[k].port, u->addrs[i].port) != 0)
                    continue;
                size_t before = up->ntargets;
                keep_targets(&up->targets, &up->ntargets, o->targets, o->ntargets, (unsigned)k,
                             (unsigned)i);
                found = up->ntargets > before;
            }
        }
        if (!found)
            up->stale = 1;
    }
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
        if (old == NULL)
            resolve_now(up);
        else
            reuse_targets(up, old);
    }
    for (size_t i = 0; i < rt->nlis; i++) {
        struct listener *li = &rt->lis[i];
        li->cfg = &cfg->listeners[i];
        li->rt = rt;
        for (size_t j = 0; j < rt->nups; j++)
            if (rt->ups[j].cfg == li->cfg->upstream)
                li->up = &rt->ups[j];
        li->ctxs = calloc(li->cfg->ncerts, sizeof(*li->ctxs));
        if (li->ctxs == NULL) {
            failed = 1;
            continue;
        }
        err[0] = '\0';
        for (size_t j = 0; j < li->cfg->ncerts && err[0] == '\0'; j++)
            li->ctxs[j] = tls_server_ctx(li->cfg, j, err, sizeof(err));
        li->ctx = li->ctxs[0];
        if (err[0] == '\0' && li->cfg->ncerts > 1)
            li->sni = tls_sni_new(li->cfg, li->ctxs, err, sizeof(err));
        if (err[0] != '\0') {
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
        tls_sni_free(li->sni);
        for (size_t j = 0; li->ctxs && j < li->cfg->ncerts; j++)
            if (li->ctxs[j])
                tls_server_ctx_free(li->ctxs[j]);
        free(li->ctxs);
    }
    for (size_t i = 0; i < rt->nups; i++) {
        resolver_stop(&rt->ups[i]);
        if (rt->ups[i].ctx)
            wolfSSL_CTX_free(rt->ups[i].ctx);
        free(rt->ups[i].targets);
        for (size_t j = 0; j < UPSTREAM_MAX_ADDRS; j++)
            if (rt->ups[i].resume[j])
                wolfSSL_SESSION_free(rt->ups[i].resume[j]);
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

void runtime_resolver_start(struct runtime *rt)
{
    if (!ev_is_active(&batches_done)) {
        ev_async_init(&batches_done, batches_done_cb);
        ev_async_start(EV_DEFAULT, &batches_done);
    }
    for (size_t i = 0; i < rt->nups; i++) {
        struct upstream_rt *up = &rt->ups[i];
        if (up->started)
            continue;
        up->started = 1;
        ev_init(&up->refresh, refresh_cb);
        up->refresh.data = up;
        ev_timer_set(&up->refresh, up->ntargets ? RESOLVE_EVERY : RESOLVE_RETRY, 0.);
        ev_timer_start(EV_DEFAULT, &up->refresh);
        if (up->stale)
            upstream_rt_refresh(up);
        up->stale = 0;
    }
}

void runtime_resolver_forget(struct runtime *rt)
{
    for (size_t i = 0; i < rt->nups; i++) {
        struct upstream_rt *up = &rt->ups[i];
        ev_timer_stop(EV_DEFAULT, &up->refresh);
        up->started = 0;
        /* A lookup the parent had in flight runs in the parent's thread:
         * its answer never comes here. Ask again. The batch is left as it
         * is (glibc's inherited queue still points into it). */
        up->stale = up->stale || up->lookup != NULL || up->ntargets == 0;
        if (up->lookup != NULL)
            batch_unlink(up->lookup);
    }
}

void listener_start(struct runtime *rt)
{
    runtime_resolver_start(rt);
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
