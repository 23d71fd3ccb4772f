/*
 * metrics.h - counters for the admin endpoint (Prometheus text format).
 *
 * Everything is a plain counter or gauge in this process; the admin
 * listener (admin.c) renders them on GET /metrics.
 */
#ifndef SMTPBRIDGE_METRICS_H
#define SMTPBRIDGE_METRICS_H

#include <stdint.h>
#include <stdio.h>

/* Why a session ended, coarsely (the log line has the details). */
enum end_kind {
    END_UNSET = 0,
    END_COMPLETED,  /* spliced session that ended normally */
    END_ABANDONED,  /* client left before the splice */
    END_CLIENT_TLS, /* client TLS handshake failed */
    END_UPSTREAM,   /* upstream unreachable or misbehaving: client got 421 */
    END_TIMEOUT,    /* a client-side deadline */
    END_INJECTION,  /* bytes pipelined after STARTTLS */
    END_ERRORS,     /* max_errors reached */
    END_REFUSED,    /* bad PROXY header, allow_from after PROXY, ... */
    END_SHUTDOWN,   /* drain or stop */
    END_IO,         /* read/write error or reset */
    END_KINDS
};

struct listener_metrics {
    char name[64];
    uint64_t total;
    uint64_t ended[END_KINDS];
    uint64_t rejected; /* at accept: caps, allow_from, proxy_from */
};

/* The counters of the listener called name (created on first use; stable
 * pointer for the life of the process, across reloads). */
struct listener_metrics *metrics_listener(const char *name);

/* The process slot whose open sessions this process counts: 0 for a single
 * process, 1.. for workers (set in the worker after fork). */
void metrics_set_slot(int slot);

/* Forgets the open sessions of a slot whose process died. */
void metrics_clear_slot(int slot);

/* Moves the counters into memory shared with processes forked later (call
 * before starting workers). Returns 0 or -1. */
int metrics_share(void);

void metrics_session_start(struct listener_metrics *l);
void metrics_rejected(struct listener_metrics *l);
void metrics_session_end(struct listener_metrics *l, enum end_kind kind, uint64_t c2u,
                         uint64_t u2c);
/* side: "client" or "upstream"; cause: "certificate", "handshake", "timeout". */
void metrics_tls_failure(const char *side, const char *cause);
void metrics_dial(double seconds, int resumed);
void metrics_auth(int ok);
/* An upstream address was given up for the next one. */
void metrics_failover(void);
/* A client TLS handshake resumed a session. */
void metrics_client_resumed(void);
/* OpenSSL's libcrypto computed an RSA signature (rsa_backend.c). */
void metrics_rsa_openssl(void);
/* gcm_vaes.c encrypted or decrypted a TLS record (cryptodev.c). */
void metrics_aes_gcm_vaes(void);

/* Writes every metric in the Prometheus text exposition format. */
void metrics_render(FILE *out);

#endif
