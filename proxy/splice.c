/*
 * splice.c - the two-way pump once the session is handed off: every byte
 * read from one side is released to the other untouched. Each direction has
 * one bounded buffer (conn.in of its source); when it is full the source is
 * not read (client_wants_read/upstream_wants_read see no room), so memory
 * never grows with message size. Half-close is forwarded per direction.
 */
#include "session.h"

#include "log.h"

#define R_IDLE "421 4.4.2 Idle timeout, closing connection\r\n"

void splice_enter(struct session *s)
{
    s->cphase = CP_SPLICE;
    s->await = AWAIT_NONE;
    s->c.pass = s->c.in.len;
    s->u.pass = s->u.in.len;
    conn_deadline(&s->u, 0);
    /* One timer for both directions: it fires after idle_timeout and then
     * checks when the last byte moved (cheaper than re-arming per byte). */
    conn_deadline(&s->c, s->cfg->idle_timeout);
    slog(s, LOG_LVL_DEBUG, "event=splice");
}

int splice_step(struct session *s)
{
    struct conn *c = &s->c, *u = &s->u;

    c->pass = c->in.len;
    u->pass = u->in.len;
    if (c->failed) {
        session_close(s, "client connection failed: %s", c->errmsg);
        return 0;
    }
    if (u->failed && u->in.len == 0) {
        session_close(s, "upstream connection failed: %s", u->errmsg);
        return 0;
    }
    /* The upstream is done: whatever it said last (a 221, a final "250
     * queued as") goes to the client before we close. */
    if (u->eof && u->in.len == 0 && c->out_len == 0) {
        session_close(s, c->eof ? "client quit" : "upstream closed connection");
        return 0;
    }
    /* The client is done sending: pass the half-close on and keep reading
     * the upstream's answer until it closes too (or the idle timer fires). */
    if (c->eof && c->in.len == 0 && !u->shut) {
        conn_shutdown_write(u);
        return 1;
    }
    return 0;
}

void splice_idle_check(struct session *s)
{
    ev_tstamp idle = ev_now(EV_DEFAULT) - s->last_activity;

    if (idle < s->cfg->idle_timeout) {
        conn_deadline(&s->c, s->cfg->idle_timeout - idle);
        return;
    }
    session_end_kind(s, END_TIMEOUT);
    session_finish(s, R_IDLE, "idle timeout (%gs)", s->cfg->idle_timeout);
}
