/*
 * main.c - command line, configuration, privileges, signals, the loop.
 */
#include <errno.h>
#include <getopt.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "admin.h"
#include "config.h"
#include "listener.h"
#include "metrics.h"
#include "log.h"
#include "cryptodev.h"
#include "rsa_backend.h"
#include "runtime.h"
#include "session.h"
#include "tls.h"

#ifndef SMTPBRIDGE_VERSION
#define SMTPBRIDGE_VERSION "0.1.0"
#endif
#define DEFAULT_CONFIG "/etc/smtpbridge/smtpbridge.conf"

static struct runtime *rt;
static int debug_logging;
static ev_signal sig_term, sig_int, sig_hup;

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: smtpbridge [-c FILE] [-t] [-d] [-V] [-h]\n"
            "TLS-terminating SMTP proxy: clients on 465 (implicit TLS) or 2525 (STARTTLS)\n"
            "reach an upstream submission server over verified STARTTLS.\n\n"
            "  -c, --config FILE  configuration file (default %s)\n"
            "  -t, --test         check the configuration (and load certificates),\n"
            "                     print the effective configuration, exit 0 or 1\n"
            "  -d, --debug        log at debug level (overrides log_level)\n"
            "  -V, --version      print the version and exit\n"
            "  -h, --help         this text\n\n"
            "Runs in the foreground and logs to stderr. Signals: HUP reloads the\n"
            "configuration and certificates; TERM drains (stops accepting, lets\n"
            "sessions finish for up to drain_timeout) and exits; INT exits at once.\n",
            DEFAULT_CONFIG);
}

static void startup_warnings(const struct config *cfg)
{
    for (size_t i = 0; i < cfg->nlisteners; i++) {
        const struct listener_cfg *li = &cfg->listeners[i];
        if (li->min_tls < TLS_V12)
            log_msg(LOG_LVL_WARNING, 0,
                    "event=config_warning listener=%s msg=\"min_tls = 1.%d accepts obsolete TLS "
                    "versions (for legacy devices only)\"",
                    li->name, li->min_tls % 10);
        if (!li->require_auth)
            log_msg(LOG_LVL_WARNING, 0,
                    "event=config_warning listener=%s msg=\"require_auth = no: clients from "
                    "allow_from may send mail without AUTH\"",
                    li->name);
        if (li->nallow > 0)
            log_msg(LOG_LVL_WARNING, 0,
                    "event=config_warning listener=%s msg=\"allow_plaintext_from lets %zu "
                    "network(s) send mail without TLS\"",
                    li->name, li->nallow);
    }
    for (size_t i = 0; i < cfg->nupstreams; i++) {
        const struct upstream_cfg *u = &cfg->upstreams[i];
        if (u->tls == UPSTREAM_TLS_NONE)
            log_msg(LOG_LVL_WARNING, 0,
                    "event=config_warning upstream=%s msg=\"tls = none: mail and passwords go "
                    "to the upstream in plaintext\"",
                    u->address);
        else if (!u->verify)
            log_msg(LOG_LVL_WARNING, 0,
                    "event=config_warning upstream=%s msg=\"verify = no: the upstream's "
                    "certificate and name are not checked\"",
                    u->address);
    }
}

/* Drops root after binding and loading keys; verified (setuid(0) must fail). */
static int drop_privileges(const struct config *cfg)
{
    struct passwd *pw;
    struct group *gr;
    gid_t gid;

    if (cfg->user == NULL) {
        if (geteuid() != 0)
            return 0;
        if (!cfg->run_as_root) {
            fprintf(stderr, "smtpbridge: refusing to run as root: set 'user' in [global] to drop "
                            "privileges after binding (or 'run_as_root = yes' to insist)\n");
            return -1;
        }
        log_msg(LOG_LVL_WARNING, 0,
                "event=config_warning msg=\"run_as_root = yes: serving as root\"");
        return 0;
    }
    if (geteuid() != 0) {
        log_msg(LOG_LVL_WARNING, 0,
                "event=config_warning msg=\"not started as root; 'user = %s' ignored\"", cfg->user);
        return 0;
    }
    errno = 0;
    pw = getpwnam(cfg->user);
    if (pw == NULL) {
        fprintf(stderr, "%s: [global] key 'user': no such user '%s'\n", cfg->path, cfg->user);
        return -1;
    }
    gid = pw->pw_gid;
    if (cfg->group != NULL) {
        gr = getgrnam(cfg->group);
        if (gr == NULL) {
            fprintf(stderr, "%s: [global] key 'group': no such group '%s'\n", cfg->path,
                    cfg->group);
            return -1;
        }
        gid = gr->gr_gid;
    }
    if (initgroups(pw->pw_name, gid) == -1 || setgid(gid) == -1 || setuid(pw->pw_uid) == -1) {
        fprintf(stderr, "smtpbridge: cannot switch to user '%s': %s\n", cfg->user, strerror(errno));
        return -1;
    }
    if (setuid(0) != -1 || geteuid() == 0) {
        fprintf(stderr, "smtpbridge: still root after dropping privileges\n");
        return -1;
    }
    log_msg(LOG_LVL_INFO, 0, "event=privileges_dropped user=%s uid=%u gid=%u", cfg->user,
            (unsigned)pw->pw_uid, (unsigned)gid);
    return 0;
}

/* ---- drain (TERM/INT) ---- */

#define R_SHUTDOWN "421 4.3.2 Service shutting down, closing connection\r\n"

static int draining;
static ev_timer drain_timer, drain_poll;

static void drain_poll_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)w;
    (void)revents;
    if (session_count() == 0)
        ev_break(loop, EVBREAK_ALL);
}

static void drain_expired_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    log_msg(LOG_LVL_INFO, 0, "event=drain_expired sessions=%u", session_count());
    /* Each gets a 421 and a few seconds to read it (session_finish). */
    session_finish_all(R_SHUTDOWN, "proxy shutting down (drain_timeout reached)");
}

/*
 * TERM: stop accepting (listening sockets closed, so a load balancer sees
 * refusals at once), let sessions finish for up to drain_timeout, then tell
 * the rest 421 4.3.2 and exit 0. INT: the same without the wait. A second
 * signal during the drain closes everything at once.
 */
static void stop_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    double wait = w->signum == SIGINT ? 0 : rt->cfg->drain_timeout;

    (void)revents;
    if (draining) {
        log_msg(LOG_LVL_INFO, 0, "event=shutdown_now sessions=%u", session_count());
        session_close_all("proxy shutting down (second signal)");
        ev_break(loop, EVBREAK_ALL);
        return;
    }
    draining = 1;
    admin_set_draining();
    log_msg(LOG_LVL_INFO, 0, "event=drain signal=%s sessions=%u timeout=%gs",
            w->signum == SIGINT ? "INT" : "TERM", session_count(), wait);
    listener_close(rt);
    if (session_count() == 0) {
        ev_break(loop, EVBREAK_ALL);
        return;
    }
    ev_timer_init(&drain_poll, drain_poll_cb, 0.05, 0.05);
    ev_timer_start(loop, &drain_poll);
    if (wait <= 0) {
        drain_expired_cb(loop, NULL, 0);
    } else {
        ev_timer_init(&drain_timer, drain_expired_cb, wait, 0.);
        ev_timer_start(loop, &drain_timer);
    }
}

/*
 * Before a configuration's contexts are built: who computes RSA signatures
 * and AES-GCM records (the contexts read the choices when they are built).
 * Logged only once the configuration is in use, by log_crypto().
 */
static void select_crypto(const struct config *cfg)
{
    char err[200], q[300];

    if (rsa_backend_select(cfg->rsa_backend, err, sizeof(err)) == -1 ||
        aes_gcm_select(cfg->aes_gcm, err, sizeof(err)) == -1)
        log_msg(LOG_LVL_WARNING, 0, "event=config_warning msg=%s",
                log_quote(q, sizeof(q), err, strlen(err)));
}

static void log_crypto(void)
{
    char q[300];
    const char *d = rsa_backend_describe();

    log_msg(LOG_LVL_INFO, 0, "event=rsa_backend msg=%s", log_quote(q, sizeof(q), d, strlen(d)));
    d = aes_gcm_describe();
    log_msg(LOG_LVL_INFO, 0, "event=aes_gcm msg=%s", log_quote(q, sizeof(q), d, strlen(d)));
}

/* ---- reload (HUP) ---- */

static const char *config_path;

/*
 * Builds a complete new runtime from the file (certificates and keys
 * re-read, contexts built and self-tested) before touching the running one;
 * any error keeps the old configuration serving. New sessions use the new
 * runtime; sessions in flight keep theirs (reference counted) until they end.
 */
static int same_str(const char *a, const char *b)
{
    return (a == NULL && b == NULL) || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

/*
 * The common part of a reload, in a single process or in the master: load
 * and build the new runtime next to the running one (taking over its
 * sockets), switch logging, close the sockets no longer configured, and
 * make it current. Returns 0, or -1 with the running one untouched.
 */
static int reload_runtime(void)
{
    struct config *cfg;
    struct runtime *next;

    log_msg(LOG_LVL_INFO, 0, "event=reload_start path=%s", config_path);
    cfg = config_load(config_path);
    if (cfg != NULL) {
        /* Keys of the old configuration go; the new ones load on first use. */
        rsa_backend_forget();
        select_crypto(cfg);
    }
    next = cfg ? runtime_build(cfg, 1, rt) : NULL;
    if (next == NULL) {
        /* The running configuration's choices again (they are read at
         * every signature and record, by old contexts too). */
        select_crypto(rt->cfg);
        log_msg(LOG_LVL_ERROR, 0,
                "event=reload_failed msg=\"the new configuration has errors (see above); "
                "keeping the running one\"");
        return -1;
    }
    if (!same_str(next->cfg->admin, rt->cfg->admin))
        log_msg(LOG_LVL_WARNING, 0,
                "event=reload_warning msg=\"a change of 'admin' needs a restart\"");
    if (!same_str(next->cfg->user, rt->cfg->user) || !same_str(next->cfg->group, rt->cfg->group))
        log_msg(LOG_LVL_WARNING, 0,
                "event=reload_warning msg=\"a change of 'user' or 'group' needs a restart\"");
    for (size_t i = 0; i < next->nlis; i++)
        metrics_listener(next->lis[i].cfg->name);
    log_init(debug_logging ? LOG_LVL_DEBUG : next->cfg->log_level, next->cfg->syslog);
    log_set_json(next->cfg->log_json);
    /* Sockets the new runtime took over are -1 in the old one; the rest
     * (addresses no longer configured) close now, not when the last old
     * session ends. */
    listener_close(rt);
    runtime_unref(rt); /* freed once its last session ends */
    rt = next;
    log_crypto();
    startup_warnings(rt->cfg);
    return 0;
}

static void hup_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    if (draining || reload_runtime() == -1)
        return;
    listener_start(rt);
    log_msg(LOG_LVL_INFO, 0, "event=reload_done sessions=%u", session_count());
}

/* ---- workers: a supervising master and N serving processes ---- */

#define MAX_WORKERS 256

struct worker {
    pid_t pid;
    ev_child watcher;
    struct runtime *rt;
    int retiring; /* told to drain after a reload */
    int marked;   /* serving when a reload started */
    ev_tstamp started;
};

/* Twice the maximum: after a reload old workers drain while new ones serve. */
static struct worker workers[2 * MAX_WORKERS];
static int master_stopping;
static ev_timer respawn_timer;
/* Ratchets the ticket key schedule every minute even without traffic. The
 * master encrypts no tickets, but it holds the ticket key schedule the
 * workers are forked with: it ratchets too, or its memory would keep every
 * hour's key derivable. */
static ev_timer ticket_timer;

static void ticket_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    tls_ticket_keys_advance();
}

static void start_ticket_timer(struct ev_loop *loop)
{
    ev_timer_init(&ticket_timer, ticket_timer_cb, 60., 60.);
    ev_timer_start(loop, &ticket_timer);
    ev_unref(loop);
}

static unsigned wanted_workers(const struct config *cfg)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);

    if (cfg->workers)
        return cfg->workers;
    return n < 1 ? 1 : (n > MAX_WORKERS ? MAX_WORKERS : (unsigned)n);
}

static unsigned live_workers(int retiring)
{
    unsigned n = 0;

    for (size_t i = 0; i < sizeof(workers) / sizeof(workers[0]); i++)
        if (workers[i].pid > 0 && workers[i].retiring == retiring)
            n++;
    return n;
}

/* In the child: forget the master's duties, drop privileges, serve. */
static void worker_main(struct runtime *r, int slot)
{
    struct ev_loop *loop = EV_DEFAULT;

    ev_loop_fork(loop);
    metrics_set_slot(slot);
    /* The master's resolvers, for every runtime it holds, are its own. */
    runtime_resolver_forget(rt);
    for (size_t i = 0; i < sizeof(workers) / sizeof(workers[0]); i++) {
        if (workers[i].pid > 0)
            ev_child_stop(loop, &workers[i].watcher);
        if (workers[i].rt != NULL)
            runtime_resolver_forget(workers[i].rt);
    }
    ev_timer_stop(loop, &respawn_timer);
    ev_ref(loop); /* ticket_timer was unref'd (it must not keep a loop alive) */
    ev_timer_stop(loop, &ticket_timer);
    ev_signal_stop(loop, &sig_term);
    ev_signal_stop(loop, &sig_int);
    ev_signal_stop(loop, &sig_hup);
    signal(SIGHUP, SIG_IGN); /* the master reloads; workers are replaced */
    admin_stop();            /* the master serves /metrics (shared counters) */
    rt = r;
    runtime_resolver_forget(rt);
    if (drop_privileges(rt->cfg) == -1)
        _exit(1);
    ev_signal_init(&sig_term, stop_cb, SIGTERM);
    ev_signal_init(&sig_int, stop_cb, SIGINT);
    ev_signal_start(loop, &sig_term);
    ev_signal_start(loop, &sig_int);
    listener_start(rt);
    log_msg(LOG_LVL_INFO, 0, "event=worker_ready pid=%d", (int)getpid());
    ev_run(loop, 0);
    session_close_all("proxy shutting down");
    conn_pool_trim();
    log_msg(LOG_LVL_INFO, 0, "event=worker_exit pid=%d", (int)getpid());
    _exit(0);
}

static void child_cb(struct ev_loop *loop, ev_child *w, int revents);

static int spawn_worker(void)
{
    struct worker *k = NULL;
    pid_t pid;

    for (size_t i = 0; i < sizeof(workers) / sizeof(workers[0]) && k == NULL; i++)
        if (workers[i].pid == 0)
            k = &workers[i];
    if (k == NULL)
        return -1;
    pid = fork();
    if (pid == -1) {
        log_msg(LOG_LVL_ERROR, 0, "event=worker_fork_failed error=\"%s\"", strerror(errno));
        return -1;
    }
    if (pid == 0)
        worker_main(rt, (int)(k - workers) + 1);
    k->pid = pid;
    k->rt = rt;
    k->retiring = 0;
    k->started = ev_now(EV_DEFAULT);
    rt->refs++;
    ev_child_init(&k->watcher, child_cb, pid, 0);
    k->watcher.data = k;
    ev_child_start(EV_DEFAULT, &k->watcher);
    log_msg(LOG_LVL_INFO, 0, "event=worker_started pid=%d", (int)pid);
    return 0;
}

static void respawn_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    while (!master_stopping && live_workers(0) < wanted_workers(rt->cfg))
        if (spawn_worker() == -1)
            break;
}

static void child_cb(struct ev_loop *loop, ev_child *w, int revents)
{
    struct worker *k = w->data;
    int st = w->rstatus;
    int quick = ev_now(loop) - k->started < 1.0;

    (void)revents;
    ev_child_stop(loop, w);
    if (WIFSIGNALED(st))
        log_msg(master_stopping || k->retiring ? LOG_LVL_INFO : LOG_LVL_ERROR, 0,
                "event=worker_died pid=%d signal=%d%s", (int)k->pid, WTERMSIG(st),
                WCOREDUMP(st) ? " core=yes" : "");
    else
        log_msg(master_stopping || k->retiring || WEXITSTATUS(st) == 0 ? LOG_LVL_INFO
                                                                       : LOG_LVL_ERROR,
                0, "event=worker_exited pid=%d status=%d", (int)k->pid, WEXITSTATUS(st));
    /* Sessions it had open died with it. */
    metrics_clear_slot((int)(k - workers) + 1);
    runtime_unref(k->rt);
    k->pid = 0;
    k->rt = NULL;
    if (master_stopping) {
        if (live_workers(0) + live_workers(1) == 0)
            ev_break(loop, EVBREAK_ALL);
        return;
    }
    if (k->retiring)
        return;
    /* Replace it; a worker that dies at once is retried after a second
     * rather than in a fork loop. */
    if (!ev_is_active(&respawn_timer)) {
        ev_timer_set(&respawn_timer, quick ? 1.0 : 0.0, 0.);
        ev_timer_start(loop, &respawn_timer);
    }
}

static void master_signal(int sig)
{
    for (size_t i = 0; i < sizeof(workers) / sizeof(workers[0]); i++)
        if (workers[i].pid > 0)
            kill(workers[i].pid, sig);
}

static void master_stop_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)revents;
    log_msg(LOG_LVL_INFO, 0, "event=%s signal=%s workers=%u",
            master_stopping ? "shutdown_now" : "drain", w->signum == SIGINT ? "INT" : "TERM",
            live_workers(0) + live_workers(1));
    master_stopping = 1;
    admin_set_draining();
    listener_close(rt);
    ev_timer_stop(loop, &respawn_timer);
    master_signal(w->signum);
    if (live_workers(0) + live_workers(1) == 0)
        ev_break(loop, EVBREAK_ALL);
}

/* Reload with workers: validate and build the new runtime here (the master
 * keeps its privileges, so root-only keys and new privileged ports work),
 * start new workers on it, and let the old ones drain. */
static void master_hup_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)w;
    (void)revents;
    if (master_stopping)
        return;
    for (size_t i = 0; i < sizeof(workers) / sizeof(workers[0]); i++)
        workers[i].marked = workers[i].pid > 0 && !workers[i].retiring;
    if (reload_runtime() == -1)
        return;
    /* Names new in this reload: the master resolves them here, blocking its
     * own loop (which serves no mail) for that lookup only, so that the new
     * workers and the master's /healthz probes start with addresses. It
     * must not use getaddrinfo_a: glibc's resolver threads do not survive
     * fork, and a worker forked while one idles inherits a request queue
     * nobody serves (seen: sessions waiting for an answer that never came). */
    runtime_resolve_stale(rt);
    for (size_t i = 0; i < sizeof(workers) / sizeof(workers[0]); i++)
        if (workers[i].marked && workers[i].pid > 0) {
            workers[i].retiring = 1;
            kill(workers[i].pid, SIGTERM);
        }
    respawn_cb(loop, NULL, 0);
    log_msg(LOG_LVL_INFO, 0, "event=reload_done workers=%u", live_workers(0));
}

/* Runs the master until its workers are gone. */
static void run_master(struct ev_loop *loop)
{
    if (metrics_share() == -1)
        log_msg(LOG_LVL_WARNING, 0,
                "event=metrics_unshared msg=\"/metrics shows the master only\"");
    for (size_t i = 0; i < rt->nlis; i++)
        metrics_listener(rt->lis[i].cfg->name);
    ev_signal_init(&sig_term, master_stop_cb, SIGTERM);
    ev_signal_init(&sig_int, master_stop_cb, SIGINT);
    ev_signal_init(&sig_hup, master_hup_cb, SIGHUP);
    ev_signal_start(loop, &sig_term);
    ev_signal_start(loop, &sig_int);
    ev_signal_start(loop, &sig_hup);
    ev_init(&respawn_timer, respawn_cb);
    start_ticket_timer(loop);
    admin_start(&rt);
    respawn_cb(loop, NULL, 0);
    log_msg(LOG_LVL_INFO, 0, "event=ready version=%s pid=%d workers=%u listeners=%zu",
            SMTPBRIDGE_VERSION, (int)getpid(), live_workers(0), rt->nlis);
    ev_run(loop, 0);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'}, {"test", no_argument, NULL, 't'},
        {"debug", no_argument, NULL, 'd'},        {"version", no_argument, NULL, 'V'},
        {"help", no_argument, NULL, 'h'},         {NULL, 0, NULL, 0},
    };
    const char *path = DEFAULT_CONFIG;
    int test = 0, debug = 0, ch;
    struct config *cfg;
    struct ev_loop *loop;

    while ((ch = getopt_long(argc, argv, "c:tdVh", opts, NULL)) != -1) {
        switch (ch) {
        case 'c':
            path = optarg;
            break;
        case 't':
            test = 1;
            break;
        case 'd':
            debug = 1;
            debug_logging = 1;
            break;
        case 'V':
            printf("smtpbridge %s (wolfSSL %s, %s)\n", SMTPBRIDGE_VERSION, wolfSSL_lib_version(),
                   tls_own_build() ? "the project's build" : "the system library");
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "smtpbridge: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);

    cfg = config_load(path);
    if (cfg == NULL) {
        fprintf(stderr, "smtpbridge: %s: configuration has errors\n", path);
        return 1;
    }
    log_init(debug ? LOG_LVL_DEBUG : cfg->log_level, test ? 0 : cfg->syslog);
    log_set_json(cfg->log_json);
    if (tls_init() == -1) {
        fprintf(stderr, "smtpbridge: cannot initialise wolfSSL\n");
        config_free(cfg);
        return 1;
    }
    loop = ev_default_loop(EVFLAG_AUTO);
    if (loop == NULL) {
        fprintf(stderr, "smtpbridge: cannot initialise libev\n");
        return 1;
    }
    config_path = path;
    select_crypto(cfg);
    rt = runtime_build(cfg, !test, NULL);
    if (rt != NULL && !test)
        log_crypto();
    if (rt == NULL) {
        fprintf(stderr, "smtpbridge: %s: configuration has errors\n", path);
        tls_cleanup();
        return 1;
    }
    if (test) {
        const char *bad = NULL;
        if (rt->cfg->user != NULL && getpwnam(rt->cfg->user) == NULL)
            bad = "user";
        else if (rt->cfg->group != NULL && getgrnam(rt->cfg->group) == NULL)
            bad = "group";
        if (bad != NULL) {
            fprintf(stderr, "%s: [global] key '%s': no such %s '%s'\n", path, bad, bad,
                    bad[0] == 'u' ? rt->cfg->user : rt->cfg->group);
            runtime_unref(rt);
            tls_cleanup();
            return 1;
        }
        if (geteuid() == 0 && rt->cfg->user == NULL && !rt->cfg->run_as_root)
            fprintf(stderr,
                    "%s: warning: started as root this configuration would refuse to run: "
                    "set 'user' (or run_as_root = yes)\n",
                    path);
        config_dump(rt->cfg, stdout);
        fprintf(stderr, "smtpbridge: %s: configuration OK\n", path);
        runtime_unref(rt);
        tls_cleanup();
        return 0;
    }
    startup_warnings(rt->cfg);
    if (rt->cfg->admin != NULL && admin_bind(rt->cfg->admin) == -1) {
        fprintf(stderr, "smtpbridge: cannot bind the admin address %s\n", rt->cfg->admin);
        runtime_unref(rt);
        tls_cleanup();
        return 1;
    }
    if (wanted_workers(rt->cfg) > 1) {
        /* Fail now rather than in every worker. */
        if (geteuid() == 0 && rt->cfg->user == NULL && !rt->cfg->run_as_root) {
            drop_privileges(rt->cfg); /* prints why */
            runtime_unref(rt);
            tls_cleanup();
            return 1;
        }
        run_master(loop);
        admin_stop();
        runtime_unref(rt);
        tls_cleanup();
        log_msg(LOG_LVL_INFO, 0, "event=exit");
        return 0;
    }
    if (drop_privileges(rt->cfg) == -1) {
        runtime_unref(rt);
        tls_cleanup();
        return 1;
    }

    ev_signal_init(&sig_term, stop_cb, SIGTERM);
    ev_signal_init(&sig_int, stop_cb, SIGINT);
    ev_signal_init(&sig_hup, hup_cb, SIGHUP);
    ev_signal_start(loop, &sig_term);
    ev_signal_start(loop, &sig_int);
    ev_signal_start(loop, &sig_hup);
    listener_start(rt);
    start_ticket_timer(loop);
    admin_start(&rt);
    size_t nsock = 0;
    for (size_t i = 0; i < rt->nlis; i++)
        nsock += rt->lis[i].nfds;
    log_msg(LOG_LVL_INFO, 0, "event=ready version=%s pid=%d listeners=%zu sockets=%zu",
            SMTPBRIDGE_VERSION, (int)getpid(), rt->nlis, nsock);

    ev_run(loop, 0);

    resolver_settle(1.0);
    session_close_all("proxy shutting down");
    admin_stop();
    runtime_unref(rt);
    conn_pool_trim();
    rsa_backend_forget();
    tls_cleanup();
    log_msg(LOG_LVL_INFO, 0, "event=exit");
    return 0;
}
