/*
 * splice.c - the two-way pump once the session is handed off: every byte
 * read from one side is released to the other untouched. Each direction has
 * one bounded buffer (conn.in of its source); when it is full the source is
 * not read (client_wants_read/upstream_wants_read see no room), so memory
 * never grows with message size. Half-close is forwarded per direction.
 */
#include "session.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"

#define R_IDLE     "421 4.4.2 Idle timeout, closing connection\r\n"
#define R_BAD_BDAT "421 4.7.0 Malformed BDAT command, closing connection\r\n"

/*
 * The command watcher. With `xclient = yes` the upstream trusts XCLIENT
 * from the proxy's address, so a client must never get an XCLIENT line
 * through -- not even after AUTH, when the session is otherwise spliced
 * (Postfix accepts XCLIENT at any time outside a transaction, and it resets
 * the session with whatever address it names). The watcher follows command
 * boundaries in the client's byte stream without copying it: command lines,
 * DATA bodies up to the "." line, BDAT chunks by their size. Its only
 * effect is to hold back bytes at a DATA or XCLIENT line until the replies
 * to everything before it have come back (the client waits for those
 * replies anyway, RFC 2920 3.1). Replies are counted on the way back.
 */
static int verb_is(const char *p, size_t n, const char *verb)
{
    size_t l = strlen(verb);

    return n > l && strncasecmp(p, verb, l) == 0 && (p[l] == ' ' || p[l] == '\r' || p[l] == '\n');
}

/* The three-digit code a reply line starts with, or 0. */
static int reply_code(const char *head, unsigned len)
{
    if (len < 4 || head[0] < '2' || head[0] > '5' || head[1] < '0' || head[1] > '9' ||
        head[2] < '0' || head[2] > '9')
        return 0;
    return (head[0] - '0') * 100 + (head[1] - '0') * 10 + (head[2] - '0');
}

/* Scans the upstream's new bytes for complete replies. Runs in every
 * spliced session, watcher or not: replies are a few bytes each way, and
 * the last one's code says why an upstream closed (221 answers QUIT). */
static void watch_replies(struct session *s)
{
    struct conn *u = &s->u;
    const char *p = u->in.data + u->in.off;

    for (uint32_t i = u->pass; i < u->in.len; i++) {
        char ch = p[i];
        if (s->w_rpos < 4)
            s->w_rhead[s->w_rpos] = ch;
        s->w_rpos++;
        if (ch != '\n')
            continue;
        /* A reply ends with a line whose fourth byte is not '-'. */
        if (s->w_rpos < 5 || s->w_rhead[3] != '-') {
            if (s->w_outstanding > 0)
                s->w_outstanding--;
            s->w_last_code = reply_code(s->w_rhead, s->w_rpos);
            if (s->w_outstanding == 0 && s->w_hold == WHOLD_DATA) {
                s->w_hold = WHOLD_NONE;
                s->w_state = s->w_last_code == 354 ? WST_BODY : WST_CMD;
                s->w_bol = 1;
            }
        }
        s->w_rpos = 0;
    }
}

/* Approves the client's new bytes up to the next point that must wait.
 * Returns -1 if the session was ended. */
static int watch_commands(struct session *s)
{
    struct conn *c = &s->c;
    const char *p = c->in.data + c->in.off;
    uint32_t i = c->pass;

    while (i < c->in.len && s->w_hold == WHOLD_NONE) {
        const char *q = p + i;
        uint32_t left = c->in.len - i;
        if (s->w_state == WST_BDAT) {
            uint64_t take = s->w_bdat < left ? s->w_bdat : left;
            i += (uint32_t)take;
            s->w_bdat -= take;
            if (s->w_bdat == 0)
                s->w_state = WST_CMD;
            continue;
        }
        const char *lf = memchr(q, '\n', left);
        uint32_t ll = lf ? (uint32_t)(lf - q) + 1 : left;
        if (s->w_state == WST_BODY) {
            /* The body ends at a line that is just "." (bare LF tolerated,
             * as Postfix does); that line gets a reply. */
            if (s->w_bol && lf && (ll == 2 || (ll == 3 && q[1] == '\r')) && q[0] == '.') {
                s->w_state = WST_CMD;
                s->w_outstanding++;
            }
            s->w_bol = lf != NULL;
            i += ll;
            continue;
        }
        /* WST_CMD: decide at the start of a line, once it is complete. */
        if (!s->w_inline) {
            if (lf == NULL) {
                /* No verb we care about is longer than this: a long
                 * partial line can go; its end is found later. */
                if (left < SMTP_MAX_COMMAND_LINE)
                    break;
                s->w_inline = 1;
                i += ll;
                continue;
            }
            if (verb_is(q, ll, "XCLIENT")) {
                s->w_hold = WHOLD_XCLIENT;
                break;
            }
            s->w_outstanding++;
            if (verb_is(q, ll, "DATA")) {
                i += ll;
                s->w_hold = WHOLD_DATA;
                break;
            }
            if (verb_is(q, ll, "BDAT")) {
                char *end;
                unsigned long long n = strtoull(q + 5, &end, 10);
                if (end == q + 5 || n > (1ULL << 40)) {
                    session_finish(s, R_BAD_BDAT, "malformed BDAT command");
                    return -1;
                }
                s->w_bdat = n;
                s->w_state = n ? WST_BDAT : WST_CMD;
            }
            i += ll;
            continue;
        }
        /* The rest of a long line. */
        if (lf != NULL)
            s->w_inline = 0;
        i += ll;
    }
    c->pass = i;
    /* An XCLIENT line waits until everything before it is answered and
     * flushed, then gets our refusal in its place. */
    if (s->w_hold == WHOLD_XCLIENT && c->pass == 0 && s->w_outstanding == 0 && s->u.in.len == 0 &&
        c->out_len == 0) {
        const char *lf = memchr(p, '\n', c->in.len);
        slog(s, LOG_LVL_WARNING, "event=client_xclient_refused client=%s", s->peer_str);
        conn_consume(c, (uint32_t)(lf - p) + 1);
        conn_queue(c, R_NO_XCLIENT, strlen(R_NO_XCLIENT));
        s->w_hold = WHOLD_NONE;
        client_count_error(s);
        return s->closing == CLOSE_NO ? 1 : -1;
    }
    return 0;
}

void splice_enter(struct session *s)
{
    s->cphase = CP_SPLICE;
    s->await = AWAIT_NONE;
    s->watch = 0;
    if (s->li->up->cfg->xclient)
        s->watch = 1;
    s->w_state = WST_CMD;
    s->c.pass = s->watch ? 0 : s->c.in.len;
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
    int progress = 0;

    watch_replies(s);
    if (s->watch) {
        u->pass = u->in.len;
        int r = watch_commands(s);
        if (r < 0)
            return 0;
        progress = r;
    } else {
        c->pass = c->in.len;
        u->pass = u->in.len;
    }
    if (c->failed) {
        session_close(s, "client connection failed: %s", c->errmsg);
        return 0;
    }
    if (u->failed && u->in.len == 0) {
        session_close(s, "upstream connection failed: %s", u->errmsg);
        return 0;
    }
    /* The upstream is done: whatever it said last (a 221, a final "250
     * queued as") goes to the client before we close. After a 221 the
     * client asked to quit, whichever side closed first; otherwise the
     * reason names the upstream's last reply (a 421 timeout, say). */
    if (u->eof && u->in.len == 0 && c->out_len == 0 && conn_push(c) != 0) {
        if (c->eof || s->w_last_code == 221)
            session_close(s, "client quit");
        else if (s->w_last_code != 0)
            session_close(s, "upstream closed connection after a %d reply", s->w_last_code);
        else
            session_close(s, "upstream closed connection");
        return 0;
    }
    /* The client is done sending: pass the half-close on and keep reading
     * the upstream's answer until it closes too (or the idle timer fires). */
    if (c->eof && c->in.len == 0 && !u->shut) {
        conn_shutdown_write(u);
        return 1;
    }
    return progress;
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
