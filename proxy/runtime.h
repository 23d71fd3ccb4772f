/*
 * runtime.h - what a loaded configuration becomes at run time: TLS contexts,
 * resolved upstream addresses and bound listeners. Sessions hold a reference
 * to the runtime they were accepted under, so that a reload can build a new
 * one while old sessions finish on the old.
 */
#ifndef SMTPBRIDGE_RUNTIME_H
#define SMTPBRIDGE_RUNTIME_H

#include <ev.h>
#include <netdb.h>

#include "config.h"
#include "tls.h"

struct resolve_batch;

/* One resolved address of an upstream. */
struct upstream_target {
    struct sockaddr_storage sa;
    socklen_t salen;
    unsigned addr; /* which entry of cfg->addrs it came from */
};

struct upstream_rt {
    const struct upstream_cfg *cfg;
    WOLFSSL_CTX *ctx; /* NULL when tls = none */
    /* Every address the upstream's names resolve to, in the order they are
     * tried: the configured addresses in order, each name's results in
     * getaddrinfo's order. Empty while none is known. */
    struct upstream_target *targets;
    size_t ntargets;
    char resolve_err[160];
    /* Resolution runs in glibc's resolver thread (getaddrinfo_a), never in
     * the event loop (only the first start resolves before serving): one
     * batch of requests, one per address, at a time (listener.c). */
    struct resolve_batch *lookup; /* the batch in flight, NULL when none */
    ev_timer refresh;
    int started; /* background resolution runs for it in this process */
    int stale;   /* a name has never been resolved (new in a reload): resolve at start */
    /* The last resumable TLS session with each address: the proxy talks to
     * the same server all day, and a resumed handshake skips the
     * certificate chain and most of the public-key work. */
    WOLFSSL_SESSION *resume[UPSTREAM_MAX_ADDRS];
};

/* Starts (or hurries) a background re-resolution of the upstream's names. */
void upstream_rt_refresh(struct upstream_rt *up);

struct listener {
    const struct listener_cfg *cfg;
    struct runtime *rt;
    WOLFSSL_CTX *ctx;    /* the default certificate's context (ctxs[0]) */
    WOLFSSL_CTX **ctxs;  /* one per certificate (cfg->certs) */
    struct tls_sni *sni; /* names -> ctxs, when there are several */
    struct upstream_rt *up;
    size_t nfds;
    int *fds;           /* -1 once handed over to a newer runtime */
    const char **specs; /* the listen address each fd was bound for */
    int **steal;        /* during build: the older runtime's slot of a reused fd */
    ev_io *watchers;
};

struct runtime {
    struct config *cfg;
    struct upstream_rt *ups;
    size_t nups;
    struct listener *lis;
    size_t nlis;
    unsigned refs;
};

/*
 * runtime_build(cfg, bind_sockets, old): TLS contexts for every listener and
 * upstream, upstream addresses resolved (a failure there is a warning, not an
 * error: the upstream may come up later), and, if bind_sockets, every listen
 * address bound. With old (a reload), sockets for addresses old already has
 * are taken over from it and the resolved addresses of names old knows are
 * copied; names new in the reload are resolved in the background once the
 * runtime starts (never in the loop). old is changed only if the build
 * succeeds. Takes ownership of cfg.
 * Returns NULL after reporting the problems (cfg freed, old untouched).
 */
struct runtime *runtime_build(struct config *cfg, int bind_sockets, struct runtime *old);

/* Starts background resolution (every upstream re-resolved periodically,
 * names new in a reload at once) in this process; listener_start() does. */
void runtime_resolver_start(struct runtime *rt);

/* In a worker just forked: forgets watchers and lookups of the parent
 * (none today: the master resolves only with blocking getaddrinfo) and
 * marks upstreams without addresses to be resolved at once when
 * listener_start() runs. Idempotent. */
void runtime_resolver_forget(struct runtime *rt);

/* At exit: gives lookups still in flight up to max_wait seconds. */
void resolver_settle(double max_wait);

/* Resolves, blocking, the names new in a reload (the workers' master, which
 * serves no mail, before forking new workers). */
void runtime_resolve_stale(struct runtime *rt);

/* Drops a reference; frees everything when the last one goes. */
void runtime_unref(struct runtime *rt);

#endif
