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
static int to_syslog;

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
    fwrite(line, 1, (size_t)n, stderr);
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
