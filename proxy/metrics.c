/*
 * metrics.c - process-wide counters and their Prometheus rendering.
 */
#include "metrics.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define MAX_LISTENERS 256

/* Relaxed atomics: with several workers the counters live in one shared
 * mapping (metrics_share) and only need to add up, not order anything. */
#define ADD(x, n) __atomic_add_fetch(&(x), (n), __ATOMIC_RELAXED)
#define GET(x)    __atomic_load_n(&(x), __ATOMIC_RELAXED)

/* Open sessions are counted per process slot (0: a single process, 1..:
 * workers), so that the master can forget a worker's sessions when the
 * worker dies without closing them (SIGKILL, crash). */
#define SLOTS 513

struct shared {
    uint64_t active[SLOTS][MAX_LISTENERS];
    struct listener_metrics listeners[MAX_LISTENERS];
    size_t nlisteners;
    struct listener_metrics overflow;
    uint64_t tls_failures[2][3];
    uint64_t dial_count[16], dial_n, resumed_n, failovers, client_resumed, rsa_openssl, gcm_vaes;
    double dial_sum;
    uint64_t bytes_c2u, bytes_u2c, auth_ok, auth_failed;
};

static struct shared *m;
static int slot;

/* The counters start in private memory (a single process), allocated on
 * first use: the slot table is too big for a static. */
static struct shared *shared_get(void)
{
    if (m == NULL) {
        m = mmap(NULL, sizeof(*m), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED)
            abort();
        snprintf(m->overflow.name, sizeof(m->overflow.name), "other");
    }
    return m;
}

void metrics_set_slot(int s)
{
    slot = s > 0 && s < SLOTS ? s : 0;
}

void metrics_clear_slot(int s)
{
    if (s > 0 && s < SLOTS)
        for (size_t i = 0; i < MAX_LISTENERS; i++)
            __atomic_store_n(&shared_get()->active[s][i], 0, __ATOMIC_RELAXED);
}

static uint64_t *active_of(struct listener_metrics *l)
{
    ptrdiff_t i = l - m->listeners;

    if (i < 0 || i >= MAX_LISTENERS)
        return NULL;
    return &m->active[slot][i];
}

static const char *const end_names[END_KINDS] = {
    [END_UNSET] = "unknown",
    [END_COMPLETED] = "completed",
    [END_ABANDONED] = "abandoned",
    [END_CLIENT_TLS] = "client_tls_error",
    [END_UPSTREAM] = "upstream_error",
    [END_TIMEOUT] = "timeout",
    [END_INJECTION] = "starttls_injection",
    [END_ERRORS] = "too_many_errors",
    [END_REFUSED] = "refused",
    [END_SHUTDOWN] = "shutdown",
    [END_IO] = "io_error",
};

/* TLS failures by side and cause. */
static const char *const sides[] = {"client", "upstream"};
static const char *const causes[] = {"certificate", "handshake", "timeout"};

/* Upstream dial latency (connect to READY), seconds. */
static const double buckets[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
#define NBUCKETS (sizeof(buckets) / sizeof(buckets[0]))

int metrics_share(void)
{
    struct shared *p =
        mmap(NULL, sizeof(*p), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

    struct shared *old = shared_get();

    if (p == MAP_FAILED)
        return -1;
    memcpy(p, old, sizeof(*p));
    munmap(old, sizeof(*old));
    m = p;
    return 0;
}

struct listener_metrics *metrics_listener(const char *name)
{
    size_t n = GET(shared_get()->nlisteners);

    for (size_t i = 0; i < n; i++)
        if (strcmp(m->listeners[i].name, name) == 0)
            return &m->listeners[i];
    if (n == MAX_LISTENERS)
        return &m->overflow;
    snprintf(m->listeners[n].name, sizeof(m->listeners[0].name), "%s", name);
    ADD(m->nlisteners, 1);
    return &m->listeners[n];
}

void metrics_session_start(struct listener_metrics *l)
{
    uint64_t *a = active_of(l);

    ADD(l->total, 1);
    if (a != NULL)
        ADD(*a, 1);
}

void metrics_rejected(struct listener_metrics *l)
{
    ADD(l->rejected, 1);
}

void metrics_session_end(struct listener_metrics *l, enum end_kind kind, uint64_t c2u, uint64_t u2c)
{
    uint64_t *a = active_of(l);

    if (a != NULL && GET(*a) > 0)
        __atomic_sub_fetch(a, 1, __ATOMIC_RELAXED);
    ADD(l->ended[kind < END_KINDS ? kind : END_UNSET], 1);
    ADD(m->bytes_c2u, c2u);
    ADD(m->bytes_u2c, u2c);
}

static int index_of(const char *const *v, size_t n, const char *s)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(v[i], s) == 0)
            return (int)i;
    return -1;
}

void metrics_tls_failure(const char *side, const char *cause)
{
    int a = index_of(sides, 2, side), b = index_of(causes, 3, cause);
    shared_get();

    if (a >= 0 && b >= 0)
        ADD(m->tls_failures[a][b], 1);
}

void metrics_dial(double seconds, int resumed)
{
    size_t i;
    shared_get();

    for (i = 0; i < NBUCKETS && seconds > buckets[i]; i++)
        ;
    ADD(m->dial_count[i], 1);
    ADD(m->dial_n, 1);
    /* A double cannot be added atomically in C17; a lost update of the sum
     * only skews the mean slightly, the counts stay exact. */
    m->dial_sum += seconds;
    if (resumed)
        ADD(m->resumed_n, 1);
}

void metrics_failover(void)
{
    shared_get();
    ADD(m->failovers, 1);
}

void metrics_client_resumed(void)
{
    shared_get();
    ADD(m->client_resumed, 1);
}

void metrics_rsa_openssl(void)
{
    shared_get();
    ADD(m->rsa_openssl, 1);
}

void metrics_aes_gcm_vaes(void)
{
    shared_get();
    ADD(m->gcm_vaes, 1);
}

void metrics_auth(int ok)
{
    shared_get();
    if (ok)
        ADD(m->auth_ok, 1);
    else
        ADD(m->auth_failed, 1);
}

/* Label values here are listener names from the config (no quotes or
 * backslashes can appear: the INI parser rejects nothing, so escape). */
static void label(FILE *out, const char *v)
{
    for (; *v; v++) {
        if (*v == '"' || *v == '\\')
            fputc('\\', out);
        if (*v == '\n')
            fputs("\\n", out);
        else
            fputc(*v, out);
    }
}

/* One metric with a value per listener, read at byte offset `off`. */
static void per_listener(FILE *out, const char *name, const char *help, const char *type,
                         size_t off)
{
    size_t nl = GET(m->nlisteners);

    fprintf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
    for (size_t i = 0; i < nl; i++) {
        uint64_t *v = (uint64_t *)((char *)&m->listeners[i] + off);
        fprintf(out, "%s{listener=\"", name);
        label(out, m->listeners[i].name);
        fprintf(out, "\"} %llu\n", (unsigned long long)GET(*v));
    }
}

void metrics_render(FILE *out)
{
    uint64_t cum = 0;
    size_t nl = GET(shared_get()->nlisteners);
    struct listener_metrics *listeners = m->listeners;

    fputs("# HELP smtpbridge_sessions_active Sessions open now.\n"
          "# TYPE smtpbridge_sessions_active gauge\n",
          out);
    for (size_t i = 0; i < nl; i++) {
        uint64_t sum = 0;
        for (size_t k = 0; k < SLOTS; k++)
            sum += GET(m->active[k][i]);
        fputs("smtpbridge_sessions_active{listener=\"", out);
        label(out, listeners[i].name);
        fprintf(out, "\"} %llu\n", (unsigned long long)sum);
    }
    per_listener(out, "smtpbridge_sessions_total", "Sessions accepted.", "counter",
                 offsetof(struct listener_metrics, total));
    fputs("# HELP smtpbridge_sessions_ended_total Sessions ended, by reason.\n"
          "# TYPE smtpbridge_sessions_ended_total counter\n",
          out);
    for (size_t i = 0; i < nl; i++)
        for (int k = 1; k < END_KINDS; k++) {
            fputs("smtpbridge_sessions_ended_total{listener=\"", out);
            label(out, listeners[i].name);
            fprintf(out, "\",reason=\"%s\"} %llu\n", end_names[k],
                    (unsigned long long)GET(listeners[i].ended[k]));
        }
    per_listener(out, "smtpbridge_connections_rejected_total",
                 "Connections closed at accept (caps, allow_from, proxy_from).", "counter",
                 offsetof(struct listener_metrics, rejected));
    fputs("# HELP smtpbridge_tls_handshake_failures_total TLS handshakes that failed.\n"
          "# TYPE smtpbridge_tls_handshake_failures_total counter\n",
          out);
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 3; b++)
            fprintf(out, "smtpbridge_tls_handshake_failures_total{side=\"%s\",cause=\"%s\"} %llu\n",
                    sides[a], causes[b], (unsigned long long)GET(m->tls_failures[a][b]));
    fputs("# HELP smtpbridge_upstream_dial_seconds Time from dialling the upstream to a "
          "verified, ready session.\n"
          "# TYPE smtpbridge_upstream_dial_seconds histogram\n",
          out);
    for (size_t i = 0; i < NBUCKETS; i++) {
        cum += GET(m->dial_count[i]);
        fprintf(out, "smtpbridge_upstream_dial_seconds_bucket{le=\"%g\"} %llu\n", buckets[i],
                (unsigned long long)cum);
    }
    cum += GET(m->dial_count[NBUCKETS]);
    fprintf(out,
            "smtpbridge_upstream_dial_seconds_bucket{le=\"+Inf\"} %llu\n"
            "smtpbridge_upstream_dial_seconds_sum %.6f\n"
            "smtpbridge_upstream_dial_seconds_count %llu\n",
            (unsigned long long)cum, m->dial_sum, (unsigned long long)GET(m->dial_n));
    fprintf(out,
            "# HELP smtpbridge_upstream_tls_resumed_total Upstream TLS handshakes that "
            "resumed a session.\n"
            "# TYPE smtpbridge_upstream_tls_resumed_total counter\n"
            "smtpbridge_upstream_tls_resumed_total %llu\n",
            (unsigned long long)GET(m->resumed_n));
    fprintf(out,
            "# HELP smtpbridge_upstream_failovers_total Upstream addresses given up for the "
            "next one (no connect, or no 220 greeting).\n"
            "# TYPE smtpbridge_upstream_failovers_total counter\n"
            "smtpbridge_upstream_failovers_total %llu\n",
            (unsigned long long)GET(m->failovers));
    fprintf(out,
            "# HELP smtpbridge_client_tls_resumed_total Client TLS handshakes that resumed a "
            "session (a ticket).\n"
            "# TYPE smtpbridge_client_tls_resumed_total counter\n"
            "smtpbridge_client_tls_resumed_total %llu\n",
            (unsigned long long)GET(m->client_resumed));
    fprintf(out,
            "# HELP smtpbridge_rsa_openssl_signatures_total RSA signatures computed by "
            "OpenSSL's libcrypto (rsa_backend), each context's self-test included.\n"
            "# TYPE smtpbridge_rsa_openssl_signatures_total counter\n"
            "smtpbridge_rsa_openssl_signatures_total %llu\n",
            (unsigned long long)GET(m->rsa_openssl));
    fprintf(out,
            "# HELP smtpbridge_aes_gcm_vaes_records_total TLS records encrypted or decrypted "
            "by the VAES/VPCLMULQDQ AES-GCM (aes_gcm = auto on a CPU that has them).\n"
            "# TYPE smtpbridge_aes_gcm_vaes_records_total counter\n"
            "smtpbridge_aes_gcm_vaes_records_total %llu\n",
            (unsigned long long)GET(m->gcm_vaes));
    fprintf(out,
            "# HELP smtpbridge_bytes_total Bytes relayed, by direction.\n"
            "# TYPE smtpbridge_bytes_total counter\n"
            "smtpbridge_bytes_total{direction=\"client_to_upstream\"} %llu\n"
            "smtpbridge_bytes_total{direction=\"upstream_to_client\"} %llu\n",
            (unsigned long long)GET(m->bytes_c2u), (unsigned long long)GET(m->bytes_u2c));
    fprintf(out,
            "# HELP smtpbridge_auth_total AUTH outcomes as the upstream decided them.\n"
            "# TYPE smtpbridge_auth_total counter\n"
            "smtpbridge_auth_total{result=\"success\"} %llu\n"
            "smtpbridge_auth_total{result=\"failure\"} %llu\n",
            (unsigned long long)GET(m->auth_ok), (unsigned long long)GET(m->auth_failed));
}
