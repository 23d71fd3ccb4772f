/*
 * probe.h - the upstream check behind GET /healthz?upstream: one short SMTP
 * conversation per upstream (connect, optional PROXY header, greeting, EHLO,
 * STARTTLS and a verified TLS handshake as the upstream's `tls` demands,
 * QUIT), run in the event loop without ever blocking it.
 *
 * Results are cached per upstream for PROBE_CACHE_SECONDS, and requests that
 * arrive while a probe of the same upstream is in flight wait for that one,
 * so a load balancer polling often costs the MTA at most one connection per
 * upstream every PROBE_CACHE_SECONDS.
 */
#ifndef SMTPBRIDGE_PROBE_H
#define SMTPBRIDGE_PROBE_H

#include <stddef.h>
#include <stdio.h>

#define PROBE_CACHE_SECONDS 2.0

struct runtime;
struct probe_req;

struct probe_answer {
    int status; /* 200 (every upstream checked is fine), 503, or 404 (no such name) */
    char *body; /* one line per upstream; malloc'd (NULL when out of memory) */
    size_t len;
};

/* Called once a pending request is answered. The answer (and its body) belongs
 * to probe.c and is valid only during the call. */
typedef void (*probe_done_fn)(void *arg, const struct probe_answer *ans);

/*
 * probe_request(rt, name, done, arg, &now): checks the upstream of rt called
 * name ("default" is the unnamed [upstream] unless a section has that name),
 * or, with name NULL, every upstream some listener of rt uses. Takes cached
 * results younger than PROBE_CACHE_SECONDS, joins probes in flight, starts
 * the others. Returns NULL when the answer is already known: it is then in
 * *now, whose body the caller frees. Otherwise returns a pending request:
 * done(arg, answer) is called from the event loop when every probe it waits
 * for has finished, which is never later than probe_req_wait(req) seconds
 * from now; its done is never called from inside probe_request() (other
 * requests' may be, when a probe started here fails at once).
 */
struct probe_req *probe_request(struct runtime *rt, const char *name, probe_done_fn done, void *arg,
                                struct probe_answer *now);

/* The most seconds from now that a pending request can wait (each probe is
 * bounded by its connect_timeout per address and reply_timeout per step). */
double probe_req_wait(const struct probe_req *req);

/* Forgets a pending request (its client went away): done is not called.
 * The probes it started run on (their results are cached). */
void probe_cancel(struct probe_req *req);

/* Writes the smtpbridge_upstream_probe_ok gauge (one series per upstream
 * probed so far) in the Prometheus text format. */
void probe_render_metrics(FILE *out);

/* Stops every probe at once (no QUIT), forgets pending requests without
 * answering them, and frees everything. Also used in a freshly forked
 * worker, which must not drive the master's probe sockets. */
void probe_shutdown(void);

#endif
