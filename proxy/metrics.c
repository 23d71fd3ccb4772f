/*
 * metrics.c - process-wide counters and their Prometheus rendering.
 */
#include "metrics.h"

#include <string.h>

#define MAX_LISTENERS 256

static struct listener_metrics listeners[MAX_LISTENERS];
static size_t nlisteners;
static struct listener_metrics overflow = {.name = "other"};

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
static uint64_t tls_failures[2][3];

/* Upstream dial latency (connect to READY), seconds. */
static const double buckets[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
#define NBUCKETS (sizeof(buckets) / sizeof(buckets[0]))
static uint64_t dial_count[NBUCKETS + 1], dial_n, resumed_n;
static double dial_sum;

static uint64_t bytes_c2u, bytes_u2c, auth_ok, auth_failed;

struct listener_metrics *metrics_listener(const char *name)
{
    for (size_t i = 0; i < nlisteners; i++)
        if (strcmp(listeners[i].name, name) == 0)
            return &listeners[i];
    if (nlisteners == MAX_LISTENERS)
        return &overflow;
    snprintf(listeners[nlisteners].name, sizeof(listeners[0].name), "%s", name);
    return &listeners[nlisteners++];
}

void metrics_session_end(struct listener_metrics *m, enum end_kind kind, uint64_t c2u, uint64_t u2c)
{
    if (m->active > 0)
        m->active--;
    m->ended[kind < END_KINDS ? kind : END_UNSET]++;
    bytes_c2u += c2u;
    bytes_u2c += u2c;
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

    if (a >= 0 && b >= 0)
        tls_failures[a][b]++;
}

void metrics_dial(double seconds, int resumed)
{
    size_t i;

    for (i = 0; i < NBUCKETS && seconds > buckets[i]; i++)
        ;
    dial_count[i]++;
    dial_n++;
    dial_sum += seconds;
    if (resumed)
        resumed_n++;
}

void metrics_auth(int ok)
{
    if (ok)
        auth_ok++;
    else
        auth_failed++;
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

void metrics_render(FILE *out)
{
    uint64_t cum = 0;

    fputs("# HELP smtpbridge_sessions_active Sessions open now.\n"
          "# TYPE smtpbridge_sessions_active gauge\n",
          out);
    for (size_t i = 0; i < nlisteners; i++) {
        fputs("smtpbridge_sessions_active{listener=\"", out);
        label(out, listeners[i].name);
        fprintf(out, "\"} %llu\n", (unsigned long long)listeners[i].active);
    }
    fputs("# HELP smtpbridge_sessions_total Sessions accepted.\n"
          "# TYPE smtpbridge_sessions_total counter\n",
          out);
    for (size_t i = 0; i < nlisteners; i++) {
        fputs("smtpbridge_sessions_total{listener=\"", out);
        label(out, listeners[i].name);
        fprintf(out, "\"} %llu\n", (unsigned long long)listeners[i].total);
    }
    fputs("# HELP smtpbridge_sessions_ended_total Sessions ended, by reason.\n"
          "# TYPE smtpbridge_sessions_ended_total counter\n",
          out);
    for (size_t i = 0; i < nlisteners; i++)
        for (int k = 1; k < END_KINDS; k++) {
            fputs("smtpbridge_sessions_ended_total{listener=\"", out);
            label(out, listeners[i].name);
            fprintf(out, "\",reason=\"%s\"} %llu\n", end_names[k],
                    (unsigned long long)listeners[i].ended[k]);
        }
    fputs("# HELP smtpbridge_connections_rejected_total Connections closed at accept "
          "(caps, allow_from, proxy_from).\n"
          "# TYPE smtpbridge_connections_rejected_total counter\n",
          out);
    for (size_t i = 0; i < nlisteners; i++) {
        fputs("smtpbridge_connections_rejected_total{listener=\"", out);
        label(out, listeners[i].name);
        fprintf(out, "\"} %llu\n", (unsigned long long)listeners[i].rejected);
    }
    fputs("# HELP smtpbridge_tls_handshake_failures_total TLS handshakes that failed.\n"
          "# TYPE smtpbridge_tls_handshake_failures_total counter\n",
          out);
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 3; b++)
            fprintf(out, "smtpbridge_tls_handshake_failures_total{side=\"%s\",cause=\"%s\"} %llu\n",
                    sides[a], causes[b], (unsigned long long)tls_failures[a][b]);
    fputs("# HELP smtpbridge_upstream_dial_seconds Time from dialling the upstream to a "
          "verified, ready session.\n"
          "# TYPE smtpbridge_upstream_dial_seconds histogram\n",
          out);
    for (size_t i = 0; i < NBUCKETS; i++) {
        cum += dial_count[i];
        fprintf(out, "smtpbridge_upstream_dial_seconds_bucket{le=\"%g\"} %llu\n", buckets[i],
                (unsigned long long)cum);
    }
    cum += dial_count[NBUCKETS];
    fprintf(out,
            "smtpbridge_upstream_dial_seconds_bucket{le=\"+Inf\"} %llu\n"
            "smtpbridge_upstream_dial_seconds_sum %.6f\n"
            "smtpbridge_upstream_dial_seconds_count %llu\n",
            (unsigned long long)cum, dial_sum, (unsigned long long)dial_n);
    fprintf(out,
            "# HELP smtpbridge_upstream_tls_resumed_total Upstream TLS handshakes that "
            "resumed a session.\n"
            "# TYPE smtpbridge_upstream_tls_resumed_total counter\n"
            "smtpbridge_upstream_tls_resumed_total %llu\n",
            (unsigned long long)resumed_n);
    fprintf(out,
            "# HELP smtpbridge_bytes_total Bytes relayed, by direction.\n"
            "# TYPE smtpbridge_bytes_total counter\n"
            "smtpbridge_bytes_total{direction=\"client_to_upstream\"} %llu\n"
            "smtpbridge_bytes_total{direction=\"upstream_to_client\"} %llu\n",
            (unsigned long long)bytes_c2u, (unsigned long long)bytes_u2c);
    fprintf(out,
            "# HELP smtpbridge_auth_total AUTH outcomes as the upstream decided them.\n"
            "# TYPE smtpbridge_auth_total counter\n"
            "smtpbridge_auth_total{result=\"success\"} %llu\n"
            "smtpbridge_auth_total{result=\"failure\"} %llu\n",
            (unsigned long long)auth_ok, (unsigned long long)auth_failed);
}
