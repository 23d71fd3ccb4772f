/*
 * admin.h - the optional admin listener: GET /metrics (Prometheus text) and
 * GET /healthz (200 while serving, 503 while draining; with ?upstream or
 * ?upstream=NAME also a probe of the upstreams, probe.h). HTTP/1.0, one
 * request per connection, bounded in size and time.
 */
#ifndef SMTPBRIDGE_ADMIN_H
#define SMTPBRIDGE_ADMIN_H

struct runtime;

/* Binds the admin address ("host:port"). Returns 0, or -1 after logging. */
int admin_bind(const char *spec);

/* Starts serving on the bound socket. *rtp is the serving runtime, read at
 * each request (a reload replaces it), whose upstreams /healthz?upstream
 * probes. */
void admin_start(struct runtime **rtp);

/* From now on /healthz answers 503 (the process is draining). */
void admin_set_draining(void);

/* Stops serving and closes the socket and every admin connection, and
 * stops every upstream probe (probe_shutdown). */
void admin_stop(void);

#endif
