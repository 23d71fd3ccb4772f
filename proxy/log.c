/*
 * log.c - key=value logging (see log.h).
 */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <syslog.h>
#include <sys/time.h>
#include <time.h>

static enum log_level threshold = LOG_LVL_INFO;
static int to_syslog, as_json;

void log_set_json(int on)
{
    as_json = on;
}

/* Appends s[0..n) to a JSON string (quotes not included). */
static size_t json_str(char *out, size_t o, size_t cap, const char *s, size_t n)
{
    for (size_t i = 0; i < n && o + 7 < cap; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            out[o++] = '\\';
            out[o++] = (char)c;
        } else if (c < 0x20) {
            o += (size_t)snprintf(out + o, cap - o, "\\u%04x", c);
        } else {
            out[o++] = (char)c;
        }
    }
    return o;
}

/*
 * Rewrites a "k=v k2=\"quoted v\"" line (our own format, after the time
 * stamp) as a JSON object; words without '=' are gathered under "msg".
 */
static size_t to_json(const char *ts, const char *kv, char *out, size_t cap)
{
    size_t o = 0;
    const char *p = kv;

    o += (size_t)snprintf(out, cap, "{\"ts\":\"%s\"", ts);
    while (*p && o + 16 < cap) {
        while (*p == ' ')
            p++;
        if (*p == '\0')
            break;
        const char *eq = p, *end;
        while (*eq && *eq != '=' && *eq != ' ')
            eq++;
        if (*eq != '=') {
            /* a bare word */
            o += (size_t)snprintf(out + o, cap - o, ",\"msg\":\"");
            o = json_str(out, o, cap, p, (size_t)(eq - p));
            if (o + 2 < cap)
                out[o++] = '"';
            p = eq;
            continue;
        }
        out[o++] = ',';
        out[o++] = '"';
        o = json_str(out, o, cap, p, (size_t)(eq - p));
        if (o + 3 >= cap)
            break;
        out[o++] = '"';
        out[o++] = ':';
        out[o++] = '"';
        if (eq[1] == '"') {
            /* quoted value: up to the unescaped closing quote */
            const char *v = eq + 2;
            for (end = v; *end && *end != '"'; end++)
                if (*end == '\\' && end[1])
                    end++;
            for (const char *c = v; c < end && o + 8 < cap; c++) {
                if (*c == '\\' && c + 1 < end)
                    c++;
                o = json_str(out, o, cap, c, 1);
            }
            p = *end ? end + 1 : end;
        } else {
            for (end = eq + 1; *end && *end != ' '; end++)
                ;
            o = json_str(out, o, cap, eq + 1, (size_t)(end - eq - 1));
            p = end;
        }
        if (o + 2 < cap)
            out[o++] = '"';
    }
    if (o + 2 >= cap)
        o = cap - 3;
    out[o++] = '}';
    out[o++] = '\n';
    return o;
}

static const char *const level_names[] = {"debug", "info", "warning", "error"};

void log_init(enum log_level level, int use_syslog)
{
    threshold = level;
    if (use_syslog && !to_syslog)
        openlog("smtpbridge", LOG_PID | LOG_NDELAY, LOG_MAIL);
    else if (!use_syslog && to_syslog)
        closelog();
    to_syslog = use_syslog;
}

int log_level_parse(const char *s, enum log_level *out)
{
    for (size_t i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++) {
        if (strcmp(s, level_names[i]) == 0) {
            *out = (enum log_level)i;
            return 0;
        }
    }
    return -1;
}

int log_enabled(enum log_level level)
{
    return level >= threshold;
}

void log_msg(enum log_level level, uint64_t sid, const char *fmt, ...)
{
    char line[2048], ts[32];
    struct timeval tv;
    struct tm tm;
    va_list ap;
    int n, m;

    if (level < threshold)
        return;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
    if (sid != 0)
        n = snprintf(line, sizeof(line), "%s.%03dZ level=%s sid=%08llx ", ts,
                     (int)(tv.tv_usec / 1000), level_names[level], (unsigned long long)sid);
    else
        n = snprintf(line, sizeof(line), "%s.%03dZ level=%s ", ts, (int)(tv.tv_usec / 1000),
                     level_names[level]);
    va_start(ap, fmt);
    m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        m = 0;
    n += m;
    if ((size_t)n > sizeof(line) - 2)
        n = (int)sizeof(line) - 2;
    line[n++] = '\n';
    /* One write per line so that lines from several processes never mix. */
    if (as_json) {
        char js[4096], stamp[40];
        line[n - 1] = '\0';
        snprintf(stamp, sizeof(stamp), "%s.%03dZ", ts, (int)(tv.tv_usec / 1000));
        size_t jn = to_json(stamp, line + 25, js, sizeof(js));
        line[n - 1] = '\n';
        fwrite(js, 1, jn, stderr);
    } else {
        fwrite(line, 1, (size_t)n, stderr);
    }
    fflush(stderr);
    if (to_syslog) {
        static const int prio[] = {LOG_DEBUG, LOG_INFO, LOG_WARNING, LOG_ERR};
        /* syslog adds its own time stamp; skip ours. */
        syslog(prio[level], "%.*s", n - 1 - 25, line + 25);
    }
}

char *log_quote(char *dst, size_t dstlen, const char *src, size_t srclen)
{
    size_t o = 0;

    if (dstlen < 3) {
        if (dstlen > 0)
            dst[0] = '\0';
        return dst;
    }
    dst[o++] = '"';
    for (size_t i = 0; i < srclen && o + 4 < dstlen; i++) {
        unsigned char c = (unsigned char)src[i];
        if (c == '"' || c == '\\') {
            dst[o++] = '\\';
            dst[o++] = (char)c;
        } else if (c < 0x20 || c >= 0x7f) {
            dst[o++] = '?';
        } else {
            dst[o++] = (char)c;
        }
    }
    dst[o++] = '"';
    dst[o] = '\0';
    return dst;
}
