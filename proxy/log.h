/*
 * log.h - key=value log lines to stderr (and optionally syslog).
 *
 * Every line: "<UTC time> level=<l> [sid=<id>] <fields>". Callers pass the
 * fields as a printf format; values with spaces are quoted by the caller with
 * log_quote(). Nothing a client or upstream sent is logged verbatim except
 * through log_quote(), which also truncates, and no AUTH payload is ever
 * passed to the logger.
 */
#ifndef SMTPBRIDGE_LOG_H
#define SMTPBRIDGE_LOG_H

#include <stddef.h>
#include <stdint.h>

enum log_level { LOG_LVL_DEBUG = 0, LOG_LVL_INFO, LOG_LVL_WARNING, LOG_LVL_ERROR };

/* Sets the threshold and whether to copy lines to syslog (facility mail). */
void log_init(enum log_level threshold, int use_syslog);

/* Writes stderr lines as one JSON object each instead of key=value. */
void log_set_json(int on);

/* Parses "debug|info|warning|error"; returns 0 and sets *out, or -1. */
int log_level_parse(const char *s, enum log_level *out);

/* Is a line at `level` going to be written? (skip costly formatting) */
int log_enabled(enum log_level level);

/* Writes one line. sid 0 means "not about a session". */
void log_msg(enum log_level level, uint64_t sid, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/*
 * log_quote(dst, dstlen, src, srclen): writes src as a double-quoted value
 * into dst (always NUL-terminated), escaping '"' and '\\', replacing control
 * and 8-bit bytes with '?', and truncating to fit. Returns dst.
 */
char *log_quote(char *dst, size_t dstlen, const char *src, size_t srclen);

#endif
