/*
 * smtp.h - pure SMTP parsing: command lines, replies, EHLO capability lists.
 *
 * Nothing here does I/O or allocates; every function works on a caller's
 * buffer and is safe on arbitrary bytes (it is fuzzed).
 */
#ifndef SMTPBRIDGE_SMTP_H
#define SMTPBRIDGE_SMTP_H

#include <stddef.h>

/* RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF. */
#define SMTP_MAX_COMMAND_LINE 512
/* RFC 5321 4.5.3.1.5: a reply line is at most 512 octets including CRLF. We
 * accept longer reply lines from upstreams up to this bound (some servers
 * send long EHLO lines), and refuse anything longer. */
#define SMTP_MAX_REPLY_LINE 4096
/* Most lines we accept in one multi-line reply (an EHLO reply has ~15). */
#define SMTP_MAX_REPLY_LINES 100

enum smtp_verb {
    SMTP_VERB_UNKNOWN = 0,
    SMTP_VERB_EHLO,
    SMTP_VERB_HELO,
    SMTP_VERB_STARTTLS,
    SMTP_VERB_NOOP,
    SMTP_VERB_RSET,
    SMTP_VERB_QUIT,
    SMTP_VERB_AUTH,
    SMTP_VERB_MAIL,
    SMTP_VERB_RCPT,
    SMTP_VERB_DATA,
    SMTP_VERB_BDAT,
    SMTP_VERB_VRFY,
    SMTP_VERB_EXPN,
    SMTP_VERB_HELP,
    SMTP_VERB_XCLIENT,
};

/*
 * smtp_find_line(buf, len, &linelen):
 * Looks for the end of the first line in buf[0..len). A line ends at LF
 * (CRLF or bare LF). Returns 1 and sets *linelen to the length including the
 * LF; returns 0 if no LF is present (need more bytes).
 */
int smtp_find_line(const char *buf, size_t len, size_t *linelen);

struct smtp_command {
    enum smtp_verb verb;
    const char *arg; /* points into the caller's line; NULL if none */
    size_t arg_len;  /* argument length without trailing spaces / CRLF */
};

/*
 * smtp_parse_command(line, len, &cmd):
 * Parses one complete command line (as found by smtp_find_line, terminator
 * included). The verb is matched case-insensitively and must be followed by
 * a space or the end of line. Returns NULL on success, or a static string
 * naming why the line is malformed (NUL byte, bare CR, too long, ...). An
 * unknown verb is not an error: cmd->verb is SMTP_VERB_UNKNOWN.
 */
const char *smtp_parse_command(const char *line, size_t len, struct smtp_command *cmd);

/* Printable name of a verb ("EHLO", ...; "unknown" for SMTP_VERB_UNKNOWN). */
const char *smtp_verb_name(enum smtp_verb verb);

enum smtp_reply_status {
    SMTP_REPLY_INCOMPLETE = 0, /* need more bytes */
    SMTP_REPLY_COMPLETE = 1,   /* a whole reply is at the start of buf */
    SMTP_REPLY_ERROR = -1,     /* malformed: *err names the problem */
};

struct smtp_reply {
    int code;     /* 3-digit reply code, 200..599 */
    size_t len;   /* bytes of the whole reply, last CRLF included */
    size_t lines; /* number of lines */
};

/*
 * smtp_parse_reply(buf, len, &reply, &err):
 * Parses the (possibly multi-line, RFC 5321 4.2.1) reply at the start of buf.
 * Every line must be "DDD-text" or "DDD text" (or exactly "DDD") with the same
 * code on every line, the first digit 2..5 and the second 0..5 (RFC 5321
 * 4.2), lines at most SMTP_MAX_REPLY_LINE
 * bytes and at most SMTP_MAX_REPLY_LINES lines. Lines may end in CRLF or bare
 * LF. Returns SMTP_REPLY_COMPLETE with *reply filled, SMTP_REPLY_INCOMPLETE,
 * or SMTP_REPLY_ERROR with *err set to a static description.
 */
enum smtp_reply_status smtp_parse_reply(const char *buf, size_t len, struct smtp_reply *reply,
                                        const char **err);

/*
 * smtp_ehlo_has(reply, len, keyword):
 * Returns 1 if the complete EHLO reply reply[0..len) advertises keyword as an
 * exact, case-insensitive extension keyword on a line of its own ("250-KW",
 * "250 KW", or "250-KW params"); the first line (the greeting name) is never
 * a keyword line. "XSTARTTLS", "STARTTLSX" and "250-host STARTTLS" do not
 * match "STARTTLS". Returns 0 otherwise.
 */
int smtp_ehlo_has(const char *reply, size_t len, const char *keyword);

/*
 * smtp_ehlo_filter(in, len, out, outcap, drop, add, &outlen):
 * Rewrites a complete, valid EHLO reply: removes every line whose keyword is
 * `drop` (if not NULL), appends a line advertising `add` (if not NULL and not
 * already present), and fixes the continuation markers so that exactly the
 * last line uses "DDD ". Line terminators are kept as received; an added line
 * ends in CRLF. out must not overlap in. Returns 0 and sets *outlen, or -1 if
 * the input is not a valid complete reply or out is too small.
 */
int smtp_ehlo_filter(const char *in, size_t len, char *out, size_t outcap, const char *drop,
                     const char *add, size_t *outlen);

/*
 * smtp_xtext(in, out, cap): RFC 3461 4 xtext encoding (used by XCLIENT
 * attribute values): bytes outside '!'..'~' and '+' and '=' become "+HH".
 * out is always NUL-terminated; returns its length (truncated to fit).
 */
size_t smtp_xtext(const char *in, char *out, size_t cap);

/* SASL mechanisms whose user name the proxy can log (RFC 4954, 4616). */
enum smtp_sasl { SASL_OTHER = 0, SASL_PLAIN, SASL_LOGIN, SASL_CRAM_MD5, SASL_XOAUTH2 };

/* smtp_sasl_mech(name, len): the mechanism named by an AUTH argument's first
 * word (case-insensitive); SASL_OTHER for anything else. */
enum smtp_sasl smtp_sasl_mech(const char *name, size_t len);

/*
 * smtp_base64_decode(in, len, out, cap): decodes standard base64 (padding
 * optional, no whitespace). Returns the decoded length, or -1 on a bad
 * character, bad length or if out is too small.
 */
long smtp_base64_decode(const char *in, size_t len, unsigned char *out, size_t cap);

/*
 * smtp_sasl_user(mech, b64, len, user, cap): extracts the authentication
 * identity from a base64 SASL response: PLAIN "authzid NUL authcid NUL
 * password" -> authcid; LOGIN (the first response) -> all of it; CRAM-MD5
 * "user digest" -> user; XOAUTH2 "user=NAME^A..." -> NAME. The password is
 * never copied out. user is NUL-terminated and holds only printable ASCII
 * (others replaced by '?'). Returns 0, or -1 if nothing could be extracted.
 */
int smtp_sasl_user(enum smtp_sasl mech, const char *b64, size_t len, char *user, size_t cap);

#endif
