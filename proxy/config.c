/*
 * config.c - INI -> validated struct config (see config.h).
 *
 * inih does the tokenising. It has no notion of line numbers in its handler
 * (Debian builds it without INI_HANDLER_LINENO), so we feed it through our own
 * line reader and read the current line number from there. The same reader
 * catches over-long lines, which inih would otherwise split silently into a
 * second, bogus line.
 */
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ini.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

/* inih's line buffer is 200 bytes including CR, LF and NUL. */
#define MAX_LINE     197
#define MAX_FILE     (1024 * 1024)
#define MAX_SECTIONS 256

struct reader {
    const char *p;
    int line;
    int cont_ok; /* the previous line was key = value (or its continuation) */
};

struct parse {
    struct config *cfg;
    const char *file;
    struct reader rd;
    int errors;
    /* Which keys were seen in the current section (bit per key index). */
    char cur_section[128];
    uint64_t seen;
    struct upstream_cfg *up;
    struct listener_cfg *li;
    int in_global;
    int global_line;
    int bad_section;
};

static void perr(struct parse *p, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void perr(struct parse *p, int line, const char *fmt, ...)
{
    va_list ap;

    if (line > 0)
        fprintf(stderr, "%s:%d: ", p->file, line);
    else
        fprintf(stderr, "%s: ", p->file);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    p->errors++;
}

static int begin_section(struct parse *p, const char *section);

static char *reader(char *str, int num, void *stream)
{
    struct parse *p = stream;
    struct reader *r = &p->rd;
    const char *nl, *c;
    size_t len, content;

    if (*r->p == '\0')
        return NULL;
    r->line++;
    /* inih skips a UTF-8 byte-order mark; so must our section detection. */
    if (r->line == 1 && strncmp(r->p, "\xEF\xBB\xBF", 3) == 0)
        r->p += 3;
    nl = strchr(r->p, '\n');
    len = nl ? (size_t)(nl - r->p) + 1 : strlen(r->p);
    content = len;
    if (content > 0 && r->p[content - 1] == '\n')
        content--;
    if (content > 0 && r->p[content - 1] == '\r')
        content--;
    /* Whatever we reject is handed to inih as a comment, so that it neither
     * misparses the rest of a long line nor stops at the first error. */
    if (content > MAX_LINE || len > (size_t)num - 1) {
        perr(p, r->line,
             "line longer than %d characters (a list can go on: repeat the key, or continue "
             "on an indented line)",
             MAX_LINE);
        goto comment;
    }
    memcpy(str, r->p, len);
    str[len] = '\0';
    r->p += len;
    for (c = str; *c == ' ' || *c == '\t'; c++)
        ;
    if (*c == '\0' || *c == '\n' || *c == '\r' || *c == ';' || *c == '#') {
        r->cont_ok = 0;
        return str;
    }
    /* An indented line right after a key = value line continues its value
     * (inih hands it to the handler as the same key again). */
    if (c > str && r->cont_ok)
        return str;
    r->cont_ok = 0;
    if (*c == '[') {
        /* Section headers are handled here rather than in the handler, so
         * that an empty section, or one repeated right after itself, is seen. */
        const char *close = strchr(c, ']');
        char name[128];
        if (close == NULL) {
            perr(p, r->line, "syntax error: '[' without ']'");
            goto comment_consumed;
        }
        snprintf(name, sizeof(name), "%.*s", (int)(close - c - 1), c + 1);
        begin_section(p, name);
        return str;
    }
    if (strpbrk(c, "=:") == NULL) {
        perr(p, r->line, "syntax error: expected 'key = value', '[section]' or a comment");
        goto comment_consumed;
    }
    r->cont_ok = 1;
    return str;
comment:
    r->p += len;
comment_consumed:
    str[0] = ';';
    str[1] = '\0';
    return str;
}

static char *xstrdup(const char *s)
{
    char *d = strdup(s);

    if (d == NULL) {
        perror("smtpbridge: out of memory");
        exit(1);
    }
    return d;
}

static void *xrealloc(void *ptr, size_t n, size_t size)
{
    void *q;

    if (n != 0 && size > SIZE_MAX / n)
        q = NULL;
    else
        q = realloc(ptr, n * size);
    if (q == NULL) {
        perror("smtpbridge: out of memory");
        exit(1);
    }
    return q;
}

static int parse_bool(const char *v, int *out)
{
    static const char *const yes[] = {"yes", "on", "true", "1"};
    static const char *const no[] = {"no", "off", "false", "0"};

    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(v, yes[i]) == 0) {
            *out = 1;
            return 0;
        }
        if (strcasecmp(v, no[i]) == 0) {
            *out = 0;
            return 0;
        }
    }
    return -1;
}

static int parse_duration(const char *v, double *out)
{
    char *end;
    double d;

    errno = 0;
    d = strtod(v, &end);
    if (end == v || errno != 0 || !(d >= 0)) /* !(d >= 0) also catches NaN */
        return -1;
    if (*end == '\0' || strcmp(end, "s") == 0)
        ;
    else if (strcmp(end, "ms") == 0)
        d /= 1000.0;
    else if (strcmp(end, "m") == 0)
        d *= 60.0;
    else if (strcmp(end, "h") == 0)
        d *= 3600.0;
    else
        return -1;
    if (d < 0.001 || d > 86400.0 * 7)
        return -1;
    *out = d;
    return 0;
}

static int parse_uint(const char *v, unsigned max, unsigned *out)
{
    char *end;
    unsigned long n;

    if (*v < '0' || *v > '9')
        return -1;
    errno = 0;
    n = strtoul(v, &end, 10);
    if (*end != '\0' || errno != 0 || n > max)
        return -1;
    *out = (unsigned)n;
    return 0;
}

static int parse_size(const char *v, size_t *out)
{
    char *end;
    unsigned long long n;

    if (*v < '0' || *v > '9')
        return -1;
    errno = 0;
    n = strtoull(v, &end, 10);
    if (errno != 0 || n > (1ULL << 40))
        return -1;
    if (*end == 'k' || *end == 'K')
        n *= 1024, end++;
    else if (*end == 'm' || *end == 'M')
        n *= 1024 * 1024, end++;
    if (*end != '\0')
        return -1;
    *out = (size_t)n;
    return 0;
}

static int parse_tls_version(const char *v, int *out)
{
    if (strcmp(v, "1.0") == 0)
        *out = TLS_V10;
    else if (strcmp(v, "1.1") == 0)
        *out = TLS_V11;
    else if (strcmp(v, "1.2") == 0)
        *out = TLS_V12;
    else if (strcmp(v, "1.3") == 0)
        *out = TLS_V13;
    else
        return -1;
    return 0;
}

int config_split_hostport(const char *s, char **host, char **port)
{
    const char *colon, *h, *he;
    char *end;
    unsigned long n;

    if (s[0] == '[') {
        he = strchr(s, ']');
        if (he == NULL || he[1] != ':')
            return -1;
        h = s + 1;
        colon = he + 1;
    } else {
        colon = strrchr(s, ':');
        if (colon == NULL || memchr(s, ':', (size_t)(colon - s)) != NULL)
            return -1;
        h = s;
        he = colon;
    }
    if (he == h || colon[1] == '\0')
        return -1;
    errno = 0;
    n = strtoul(colon + 1, &end, 10);
    if (*end != '\0' || errno != 0 || n == 0 || n > 65535 || colon[1] < '0' || colon[1] > '9')
        return -1;
    *host = strndup(h, (size_t)(he - h));
    *port = xstrdup(colon + 1);
    if (*host == NULL) {
        free(*port);
        return -1;
    }
    return 0;
}

int config_parse_cidr(const char *s, struct cidr *out)
{
    char buf[64];
    const char *slash = strchr(s, '/');
    size_t alen = slash ? (size_t)(slash - s) : strlen(s);
    unsigned bits, maxbits;

    if (alen == 0 || alen >= sizeof(buf))
        return -1;
    memcpy(buf, s, alen);
    buf[alen] = '\0';
    memset(out, 0, sizeof(*out));
    if (inet_pton(AF_INET, buf, out->addr) == 1) {
        out->family = AF_INET;
        maxbits = 32;
    } else if (inet_pton(AF_INET6, buf, out->addr) == 1) {
        out->family = AF_INET6;
        maxbits = 128;
    } else {
        return -1;
    }
    bits = maxbits;
    if (slash != NULL && parse_uint(slash + 1, maxbits, &bits) == -1)
        return -1;
    out->bits = bits;
    /* Host bits set ("10.1.2.3/8") are almost always a typo: refuse them. */
    for (unsigned i = bits; i < maxbits; i++)
        if (out->addr[i / 8] & (0x80 >> (i % 8)))
            return -1;
    return 0;
}

int cidr_match(const struct cidr *c, const struct sockaddr_storage *sa)
{
    const uint8_t *a;
    static const uint8_t v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    unsigned full, rest;

    if (sa->ss_family == AF_INET) {
        if (c->family != AF_INET)
            return 0;
        a = (const uint8_t *)&((const struct sockaddr_in *)sa)->sin_addr;
    } else if (sa->ss_family == AF_INET6) {
        a = ((const struct sockaddr_in6 *)sa)->sin6_addr.s6_addr;
        if (c->family == AF_INET) {
            if (memcmp(a, v4mapped, 12) != 0)
                return 0;
            a += 12;
        }
    } else {
        return 0;
    }
    full = c->bits / 8;
    rest = c->bits % 8;
    if (memcmp(a, c->addr, full) != 0)
        return 0;
    if (rest && ((a[full] ^ c->addr[full]) & (0xff00 >> rest) & 0xff))
        return 0;
    return 1;
}

int cidr_list_match(const struct cidr *v, size_t n, const struct sockaddr_storage *sa)
{
    for (size_t i = 0; i < n; i++)
        if (cidr_match(&v[i], sa))
            return 1;
    return 0;
}

static size_t split_commas(const char *v, char ***items);
static void free_list(char **items, size_t n);

/* Splits a comma-separated list, trimming blanks; calls fn for each item. */
static int for_each_item(struct parse *p, const char *key, const char *v,
                         int (*fn)(struct parse *, const char *, const char *))
{
    char **items;
    size_t n = split_commas(v, &items);
    int rc = 0;

    for (size_t i = 0; i < n; i++)
        if (fn(p, key, items[i]) == -1)
            rc = -1;
    free_list(items, n);
    if (n == 0) {
        perr(p, p->rd.line, "[%s] key '%s': empty list", p->cur_section, key);
        rc = -1;
    }
    return rc;
}

static int add_listen(struct parse *p, const char *key, const char *item)
{
    struct listener_cfg *li = p->li;
    char *h, *port;

    if (config_split_hostport(item, &h, &port) == -1) {
        perr(p, p->rd.line, "[%s] key '%s': '%s' is not host:port or [v6]:port", p->cur_section,
             key, item);
        return -1;
    }
    free(h);
    free(port);
    li->listen = xrealloc(li->listen, li->nlisten + 1, sizeof(char *));
    li->listen[li->nlisten++] = xstrdup(item);
    return 0;
}

static int add_cidr(struct parse *p, const char *key, const char *item)
{
    struct listener_cfg *li = p->li;
    struct cidr c, **v = &li->allow;
    size_t *n = &li->nallow;

    if (config_parse_cidr(item, &c) == -1) {
        perr(p, p->rd.line, "[%s] key '%s': '%s' is not a network (address/prefix, host bits zero)",
             p->cur_section, key, item);
        return -1;
    }
    if (strcmp(key, "allow_from") == 0) {
        v = &li->allow_from;
        n = &li->nallow_from;
    } else if (strcmp(key, "proxy_from") == 0) {
        v = &li->proxy_from;
        n = &li->nproxy_from;
    }
    *v = xrealloc(*v, *n + 1, sizeof(struct cidr));
    (*v)[(*n)++] = c;
    return 0;
}

static void set_str(char **dst, const char *v)
{
    free(*dst);
    *dst = xstrdup(v);
}

/* K_STRLIST: a comma-separated string that more lines may extend -- the key
 * repeated, or an indented continuation line (inih passes it as the same
 * key again): lines are limited to 197 characters and lists of file paths
 * are long. */
enum key_kind {
    K_STR,
    K_BOOL,
    K_DURATION,
    K_UINT,
    K_SIZE,
    K_TLSVER,
    K_LIST,
    K_LEVEL,
    K_ENUM,
    K_STRLIST
};

/* What a bad value of each kind should have looked like. */
static const char *const kind_help[] = {
    [K_STR] = "a value",
    [K_BOOL] = "yes or no",
    [K_DURATION] = "a duration like 30s, 500ms, 5m (0.001s..7 days)",
    [K_UINT] = "a whole number",
    [K_SIZE] = "a size like 16k",
    [K_TLSVER] = "1.0, 1.1, 1.2 or 1.3",
    [K_LIST] = "a list",
    [K_LEVEL] = "debug, info, warning or error",
    [K_ENUM] = "one of the allowed words",
    [K_STRLIST] = "a list",
};

struct keydef {
    const char *name;
    enum key_kind kind;
    size_t off;
    unsigned max;             /* K_UINT */
    const char *const *words; /* K_ENUM, NULL-terminated */
};

static const char *const tls_words[] = {"starttls", "implicit", "none", NULL};
static const char *const mode_words[] = {"implicit", "starttls", NULL};
static const char *const pp_words[] = {"off", "v1", "v2", NULL};
static const char *const format_words[] = {"text", "json", NULL};
static const char *const rsa_words[] = {"auto", "wolfssl", "openssl", NULL};
static const char *const gcm_words[] = {"auto", "wolfssl", NULL};

#define G(f) offsetof(struct config, f)
#define U(f) offsetof(struct upstream_cfg, f)
#define L(f) offsetof(struct listener_cfg, f)

static const struct keydef global_keys[] = {
    {"hostname", K_STR, G(hostname), 0, NULL},
    {"user", K_STR, G(user), 0, NULL},
    {"group", K_STR, G(group), 0, NULL},
    {"admin", K_STR, G(admin), 0, NULL},
    {"workers", K_STR, G(workers_str), 0, NULL},
    {"run_as_root", K_BOOL, G(run_as_root), 0, NULL},
    {"log_level", K_LEVEL, G(log_level), 0, NULL},
    {"syslog", K_BOOL, G(syslog), 0, NULL},
    {"log_format", K_ENUM, G(log_json), 0, format_words},
    {"max_sessions", K_UINT, G(max_sessions), 1000000, NULL},
    {"max_sessions_per_ip", K_UINT, G(max_sessions_per_ip), 1000000, NULL},
    {"buffer_size", K_SIZE, G(buffer_size), 0, NULL},
    {"tls_batch_memory", K_SIZE, G(tls_batch_memory), 0, NULL},
    {"rsa_backend", K_ENUM, G(rsa_backend), 0, rsa_words},
    {"aes_gcm", K_ENUM, G(aes_gcm), 0, gcm_words},
    {"handshake_timeout", K_DURATION, G(handshake_timeout), 0, NULL},
    {"command_timeout", K_DURATION, G(command_timeout), 0, NULL},
    {"idle_timeout", K_DURATION, G(idle_timeout), 0, NULL},
    {"drain_timeout", K_DURATION, G(drain_timeout), 0, NULL},
    {"max_errors", K_UINT, G(max_errors), 1000, NULL},
    {NULL, 0, 0, 0, NULL},
};

static const struct keydef upstream_keys[] = {
    {"address", K_STRLIST, U(address), 0, NULL},
    {"tls", K_ENUM, U(tls), 0, tls_words},
    {"server_name", K_STR, U(server_name), 0, NULL},
    {"ca_file", K_STR, U(ca_file), 0, NULL},
    {"verify", K_BOOL, U(verify), 0, NULL},
    {"cert", K_STR, U(cert), 0, NULL},
    {"key", K_STR, U(key), 0, NULL},
    {"min_tls", K_TLSVER, U(min_tls), 0, NULL},
    {"connect_timeout", K_DURATION, U(connect_timeout), 0, NULL},
    {"reply_timeout", K_DURATION, U(reply_timeout), 0, NULL},
    {"proxy_protocol", K_ENUM, U(proxy_protocol), 0, pp_words},
    {"xclient", K_BOOL, U(xclient), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static const struct keydef listener_keys[] = {
    {"listen", K_LIST, 0, 0, NULL},
    {"mode", K_ENUM, L(mode), 0, mode_words},
    {"cert", K_STRLIST, L(cert), 0, NULL},
    {"key", K_STRLIST, L(key), 0, NULL},
    {"ocsp_response", K_STRLIST, L(ocsp), 0, NULL},
    {"min_tls", K_TLSVER, L(min_tls), 0, NULL},
    {"allow_plaintext_from", K_LIST, 0, 0, NULL},
    {"allow_from", K_LIST, 0, 0, NULL},
    {"require_auth", K_BOOL, L(require_auth), 0, NULL},
    {"accept_proxy", K_BOOL, L(accept_proxy), 0, NULL},
    {"proxy_from", K_LIST, 0, 0, NULL},
    {"upstream", K_STR, L(upstream_name), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

/* key_line[] and the `seen` bit mask are indexed by position in these tables. */
#define NKEYS(t) (sizeof(t) / sizeof((t)[0]) - 1)
_Static_assert(NKEYS(global_keys) <= CONFIG_MAX_KEYS, "raise CONFIG_MAX_KEYS");
_Static_assert(NKEYS(upstream_keys) <= CONFIG_MAX_KEYS, "raise CONFIG_MAX_KEYS");
_Static_assert(NKEYS(listener_keys) <= CONFIG_MAX_KEYS, "raise CONFIG_MAX_KEYS");

static int set_key(struct parse *p, const struct keydef *k, char *base, const char *v)
{
    void *field = base + k->off;

    switch (k->kind) {
    case K_STR:
        if (*v == '\0')
            return -1;
        set_str(field, v);
        return 0;
    case K_STRLIST:
        if (*v == '\0')
            return -1;
        if (*(char **)field == NULL) {
            set_str(field, v);
        } else {
            char **f = field;
            size_t ol = strlen(*f), vl = strlen(v);
            char *n = xrealloc(*f, ol + vl + 3, 1);
            memcpy(n + ol, ", ", 2);
            memcpy(n + ol + 2, v, vl + 1);
            *f = n;
        }
        return 0;
    case K_BOOL:
        return parse_bool(v, field);
    case K_DURATION:
        return parse_duration(v, field);
    case K_UINT:
        return parse_uint(v, k->max, field);
    case K_SIZE:
        return parse_size(v, field);
    case K_TLSVER:
        return parse_tls_version(v, field);
    case K_LEVEL:
        return log_level_parse(v, field);
    case K_ENUM:
        for (int i = 0; k->words[i]; i++) {
            if (strcmp(v, k->words[i]) == 0) {
                *(int *)field = i;
                return 0;
            }
        }
        return -1;
    case K_LIST:
        if (strcmp(k->name, "listen") == 0)
            return for_each_item(p, k->name, v, add_listen) == -1 ? -2 : 0;
        return for_each_item(p, k->name, v, add_cidr) == -1 ? -2 : 0;
    }
    return -1;
}

static void enum_help(const struct keydef *k, char *buf, size_t len)
{
    size_t o = 0;

    buf[0] = '\0';
    for (int i = 0; k->words[i] && o < len; i++)
        o += (size_t)snprintf(buf + o, len - o, "%s%s", i ? " | " : "", k->words[i]);
}

static int begin_section(struct parse *p, const char *section)
{
    struct config *cfg = p->cfg;
    const char *name;

    snprintf(p->cur_section, sizeof(p->cur_section), "%s", section);
    p->seen = 0;
    p->up = NULL;
    p->li = NULL;
    p->in_global = 0;
    p->bad_section = 0;
    if (strcmp(section, "global") == 0) {
        if (p->global_line) {
            perr(p, p->rd.line, "[global]: section defined twice (first at line %d)",
                 p->global_line);
            p->bad_section = 1;
            return -1;
        }
        p->global_line = p->rd.line;
        p->in_global = 1;
        return 0;
    }
    if (strncmp(section, "upstream", 8) == 0 && (section[8] == '\0' || section[8] == ' ')) {
        name = section[8] ? section + 9 : "";
        while (*name == ' ')
            name++;
        for (size_t i = 0; i < cfg->nupstreams; i++) {
            if (strcmp(cfg->upstreams[i].name, name) == 0) {
                perr(p, p->rd.line, "[%s]: section defined twice (first at line %d)", section,
                     cfg->upstreams[i].line);
                p->bad_section = 1;
                return -1;
            }
        }
        if (cfg->nupstreams >= MAX_SECTIONS) {
            perr(p, p->rd.line, "[%s]: too many upstream sections", section);
            p->bad_section = 1;
            return -1;
        }
        cfg->upstreams = xrealloc(cfg->upstreams, cfg->nupstreams + 1, sizeof(*cfg->upstreams));
        p->up = &cfg->upstreams[cfg->nupstreams++];
        memset(p->up, 0, sizeof(*p->up));
        p->up->name = xstrdup(name);
        p->up->line = p->rd.line;
        p->up->tls = UPSTREAM_TLS_STARTTLS;
        p->up->verify = 1;
        p->up->min_tls = TLS_V12;
        p->up->connect_timeout = 10;
        p->up->reply_timeout = 30;
        return 0;
    }
    if (strncmp(section, "listener ", 9) == 0) {
        name = section + 9;
        while (*name == ' ')
            name++;
        if (*name == '\0') {
            perr(p, p->rd.line, "[%s]: a listener needs a name: [listener NAME]", section);
            p->bad_section = 1;
            return -1;
        }
        for (size_t i = 0; i < cfg->nlisteners; i++) {
            if (strcmp(cfg->listeners[i].name, name) == 0) {
                perr(p, p->rd.line, "[%s]: section defined twice (first at line %d)", section,
                     cfg->listeners[i].line);
                p->bad_section = 1;
                return -1;
            }
        }
        if (cfg->nlisteners >= MAX_SECTIONS) {
            perr(p, p->rd.line, "[%s]: too many listener sections", section);
            p->bad_section = 1;
            return -1;
        }
        cfg->listeners = xrealloc(cfg->listeners, cfg->nlisteners + 1, sizeof(*cfg->listeners));
        p->li = &cfg->listeners[cfg->nlisteners++];
        memset(p->li, 0, sizeof(*p->li));
        p->li->name = xstrdup(name);
        p->li->line = p->rd.line;
        p->li->mode = (enum listener_mode) - 1;
        p->li->min_tls = TLS_V12;
        p->li->require_auth = 1;
        return 0;
    }
    perr(p, p->rd.line,
         "[%s]: unknown section (expected [global], [upstream], [upstream NAME] or "
         "[listener NAME])",
         section);
    p->bad_section = 1;
    return -1;
}

static int handler(void *user, const char *section, const char *name, const char *value)
{
    struct parse *p = user;
    const struct keydef *keys;
    char *base;
    int *lines;
    int rc;

    (void)section;
    section = p->cur_section;
    if (p->bad_section)
        return 1;
    if (p->in_global) {
        keys = global_keys;
        base = (char *)p->cfg;
        lines = p->cfg->key_line;
    } else if (p->up) {
        keys = upstream_keys;
        base = (char *)p->up;
        lines = p->up->key_line;
    } else if (p->li) {
        keys = listener_keys;
        base = (char *)p->li;
        lines = p->li->key_line;
    } else {
        perr(p, p->rd.line, "key '%s' outside of any section (put it under [global])", name);
        return 1;
    }
    for (size_t i = 0; keys[i].name; i++) {
        if (strcmp(keys[i].name, name) != 0)
            continue;
        if ((p->seen & (1ULL << i)) && keys[i].kind != K_LIST && keys[i].kind != K_STRLIST) {
            perr(p, p->rd.line, "[%s] key '%s': set twice in this section", section, name);
            return 1;
        }
        p->seen |= 1ULL << i;
        if (lines[i] == 0)
            lines[i] = p->rd.line;
        rc = set_key(p, &keys[i], base, value);
        if (rc == -1) {
            char help[128];
            const char *want = kind_help[keys[i].kind];
            if (keys[i].kind == K_ENUM) {
                enum_help(&keys[i], help, sizeof(help));
                want = help;
            }
            char q[200];
            log_quote(q, sizeof(q), value, strlen(value));
            perr(p, p->rd.line, "[%s] key '%s': bad value %s, expected %s", section, name, q, want);
        }
        return 1;
    }
    perr(p, p->rd.line, "[%s] key '%s': unknown key", section, name);
    return 1;
}

/* The line where a key was set, or the fallback (its section's header). */
static int key_at(const int *lines, const struct keydef *keys, const char *name, int fallback)
{
    for (size_t i = 0; keys[i].name; i++)
        if (strcmp(keys[i].name, name) == 0)
            return lines[i] ? lines[i] : fallback;
    return fallback;
}

#define G_AT(k) key_at(cfg->key_line, global_keys, (k), 0)
#define U_AT(k) key_at(u->key_line, upstream_keys, (k), u->line)
#define L_AT(k) key_at(li->key_line, listener_keys, (k), li->line)

/* Splits a comma-separated value into trimmed, non-empty, malloc'd items. */
static size_t split_commas(const char *v, char ***items)
{
    char *copy = xstrdup(v), *save = NULL, *item;
    size_t n = 0;

    *items = NULL;
    for (item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        while (*item == ' ' || *item == '\t')
            item++;
        size_t l = strlen(item);
        while (l > 0 && (item[l - 1] == ' ' || item[l - 1] == '\t'))
            item[--l] = '\0';
        if (l == 0)
            continue;
        *items = xrealloc(*items, n + 1, sizeof(char *));
        (*items)[n++] = xstrdup(item);
    }
    free(copy);
    return n;
}

static void free_list(char **items, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(items[i]);
    free(items);
}

/*
 * address = host:port[, host:port ...]: the upstream's addresses in the order
 * they are tried. Each one's certificate must carry server_name if that is
 * set, else the address's own host name (a backup MX usually has its own).
 */
static void parse_addresses(struct parse *p, struct upstream_cfg *u, const char *sec)
{
    char **items;
    size_t n = split_commas(u->address, &items);

    for (size_t i = 0; i < n; i++) {
        struct upstream_addr a = {0};
        if (config_split_hostport(items[i], &a.host, &a.port) == -1) {
            perr(p, U_AT("address"), "[%s] key 'address': '%s' is not host:port or [v6]:port", sec,
                 items[i]);
            continue;
        }
        if (u->naddrs == UPSTREAM_MAX_ADDRS) {
            perr(p, U_AT("address"), "[%s] key 'address': more than %d addresses", sec,
                 UPSTREAM_MAX_ADDRS);
            free(a.host);
            free(a.port);
            break;
        }
        a.spec = xstrdup(items[i]);
        a.server_name = xstrdup(u->server_name ? u->server_name : a.host);
        u->addrs = xrealloc(u->addrs, u->naddrs + 1, sizeof(*u->addrs));
        u->addrs[u->naddrs++] = a;
    }
    if (n == 0)
        perr(p, U_AT("address"), "[%s] key 'address': no address given", sec);
    free_list(items, n);
    /* Logs quote nothing in upstream=...: the list, normalised, has no blank. */
    if (u->naddrs > 0) {
        size_t len = 0;
        for (size_t i = 0; i < u->naddrs; i++)
            len += strlen(u->addrs[i].spec) + 1;
        free(u->address);
        u->address = xrealloc(NULL, len, 1);
        u->address[0] = '\0';
        for (size_t i = 0; i < u->naddrs; i++) {
            if (i)
                strcat(u->address, ",");
            strcat(u->address, u->addrs[i].spec);
        }
    }
}

static void check_readable(struct parse *p, int line, const char *section, const char *key,
                           const char *path);

/*
 * cert = a.pem[, b.pem ...] and key = a.key[, b.key ...]: pairs, the first
 * the default; the others are chosen by the name a client asks for (SNI).
 */
static void parse_certs(struct parse *p, struct listener_cfg *li, const char *sec)
{
    char **keys;
    size_t nkeys;

    li->ncerts = split_commas(li->cert, &li->certs);
    nkeys = split_commas(li->key, &keys);
    if (li->ncerts == 0)
        perr(p, L_AT("cert"), "[%s] key 'cert': no file given", sec);
    else if (li->ncerts != nkeys)
        perr(p, L_AT("key"),
             "[%s] key 'key': %zu key file(s) for %zu certificate(s) (they go in pairs, in "
             "the same order)",
             sec, nkeys, li->ncerts);
    else if (li->ncerts > LISTENER_MAX_CERTS)
        perr(p, L_AT("cert"), "[%s] key 'cert': more than %d certificates", sec,
             LISTENER_MAX_CERTS);
    li->keys = keys;
    for (size_t i = 0; i < li->ncerts; i++)
        check_readable(p, L_AT("cert"), sec, "cert", li->certs[i]);
    for (size_t i = 0; i < nkeys; i++)
        check_readable(p, L_AT("key"), sec, "key", keys[i]);
    li->nkeys = nkeys;
    if (li->ocsp == NULL)
        return;
    li->nocsp = split_commas(li->ocsp, &li->ocsps);
    if (li->nocsp != li->ncerts)
        perr(p, L_AT("ocsp_response"),
             "[%s] key 'ocsp_response': %zu file(s) for %zu certificate(s) (one per 'cert', in "
             "the same order; '-' for a certificate without one)",
             sec, li->nocsp, li->ncerts);
    for (size_t i = 0; i < li->nocsp; i++)
        if (strcmp(li->ocsps[i], "-") != 0)
            check_readable(p, L_AT("ocsp_response"), sec, "ocsp_response", li->ocsps[i]);
}

static void check_readable(struct parse *p, int line, const char *section, const char *key,
                           const char *path)
{
    struct stat st;

    if (path == NULL)
        return;
    if (access(path, R_OK) == -1)
        perr(p, line, "[%s] key '%s': cannot read '%s': %s", section, key, path, strerror(errno));
    else if (stat(path, &st) == 0 && !S_ISREG(st.st_mode))
        perr(p, line, "[%s] key '%s': '%s' is not a regular file", section, key, path);
}

static void validate(struct parse *p)
{
    struct config *cfg = p->cfg;
    char sec[160];

    cfg->workers = 1;
    if (cfg->workers_str != NULL) {
        if (strcmp(cfg->workers_str, "auto") == 0)
            cfg->workers = 0;
        else if (parse_uint(cfg->workers_str, 256, &cfg->workers) == -1 || cfg->workers == 0)
            perr(p, G_AT("workers"),
                 "[global] key 'workers': bad value '%s', expected auto or 1..256",
                 cfg->workers_str);
    }
    if (cfg->admin != NULL) {
        char *h, *pt;
        if (config_split_hostport(cfg->admin, &h, &pt) == -1) {
            perr(p, G_AT("admin"), "[global] key 'admin': '%s' is not host:port", cfg->admin);
        } else {
            free(h);
            free(pt);
        }
    }
    if (cfg->max_errors == 0)
        perr(p, G_AT("max_errors"), "[global] key 'max_errors': must be at least 1");
    if (cfg->buffer_size < 4096 || cfg->buffer_size > 1024 * 1024)
        perr(p, G_AT("buffer_size"), "[global] key 'buffer_size': must be between 4k and 1m");
    if (cfg->tls_batch_memory > 1024UL * 1024 * 1024)
        perr(p, G_AT("tls_batch_memory"), "[global] key 'tls_batch_memory': must be at most 1024m");
    if (cfg->nupstreams == 0)
        perr(p, 0, "no [upstream] section: where should mail go?");
    if (cfg->nlisteners == 0)
        perr(p, 0, "no [listener NAME] section: nothing to listen on");
    for (size_t i = 0; i < cfg->nupstreams; i++) {
        struct upstream_cfg *u = &cfg->upstreams[i];
        snprintf(sec, sizeof(sec), "upstream%s%s", u->name[0] ? " " : "", u->name);
        if (u->address == NULL)
            perr(p, u->line, "[%s]: missing required key 'address'", sec);
        else
            parse_addresses(p, u, sec);
        if (u->ca_file == NULL)
            u->ca_file = xstrdup("/etc/ssl/certs/ca-certificates.crt");
        if (u->min_tls < TLS_V12)
            perr(p, U_AT("min_tls"), "[%s] key 'min_tls': the upstream floor cannot be below 1.2",
                 sec);
        if ((u->cert == NULL) != (u->key == NULL))
            perr(p, u->line, "[%s]: 'cert' and 'key' must be set together", sec);
        if (u->tls != UPSTREAM_TLS_NONE) {
            if (u->verify)
                check_readable(p, U_AT("ca_file"), sec, "ca_file", u->ca_file);
            check_readable(p, U_AT("cert"), sec, "cert", u->cert);
            check_readable(p, U_AT("key"), sec, "key", u->key);
        }
    }
    for (size_t i = 0; i < cfg->nlisteners; i++) {
        struct listener_cfg *li = &cfg->listeners[i];
        snprintf(sec, sizeof(sec), "listener %s", li->name);
        if (li->nlisten == 0)
            perr(p, li->line, "[%s]: missing required key 'listen'", sec);
        if ((int)li->mode == -1)
            perr(p, li->line, "[%s]: missing required key 'mode' (implicit | starttls)", sec);
        if (li->cert == NULL)
            perr(p, li->line, "[%s]: missing required key 'cert'", sec);
        if (li->key == NULL)
            perr(p, li->line, "[%s]: missing required key 'key'", sec);
        if (li->cert != NULL && li->key != NULL)
            parse_certs(p, li, sec);
        if (!li->require_auth && li->nallow_from == 0)
            perr(p, L_AT("require_auth"),
                 "[%s] key 'require_auth': 'no' needs 'allow_from' networks (the listener "
                 "would otherwise let anyone send mail as the proxy)",
                 sec);
        if (li->accept_proxy && li->nproxy_from == 0)
            perr(p, L_AT("accept_proxy"),
                 "[%s] key 'accept_proxy': needs 'proxy_from' (the load balancers allowed to "
                 "say who the client is)",
                 sec);
        if (!li->accept_proxy && li->nproxy_from > 0)
            perr(p, L_AT("proxy_from"), "[%s] key 'proxy_from': set 'accept_proxy = yes' too", sec);
        if (li->nallow > 0 && li->mode == LISTENER_IMPLICIT)
            perr(p, L_AT("allow_plaintext_from"),
                 "[%s] key 'allow_plaintext_from': only meaningful on a starttls listener", sec);
        const char *want = li->upstream_name ? li->upstream_name : "";
        for (size_t j = 0; j < cfg->nupstreams; j++)
            if (strcmp(cfg->upstreams[j].name, want) == 0)
                li->upstream = &cfg->upstreams[j];
        if (li->upstream == NULL && cfg->nupstreams > 0) {
            if (li->upstream_name)
                perr(p, L_AT("upstream"), "[%s] key 'upstream': no section [upstream %s]", sec,
                     want);
            else
                perr(p, li->line,
                     "[%s]: no unnamed [upstream] section; set 'upstream = NAME' to pick one", sec);
        }
        for (size_t k = 0; k < li->nlisten; k++)
            for (size_t m = 0; m < k; m++)
                if (strcmp(li->listen[k], li->listen[m]) == 0)
                    perr(p, L_AT("listen"), "[%s] key 'listen': %s is listed twice", sec,
                         li->listen[k]);
        for (size_t k = 0; k < li->nlisten; k++)
            for (size_t j = 0; j < i; j++)
                for (size_t m = 0; m < cfg->listeners[j].nlisten; m++)
                    if (strcmp(li->listen[k], cfg->listeners[j].listen[m]) == 0)
                        perr(p, L_AT("listen"),
                             "[%s] key 'listen': %s is also used by [listener %s]", sec,
                             li->listen[k], cfg->listeners[j].name);
    }
    if (cfg->hostname == NULL) {
        char h[256];
        if (gethostname(h, sizeof(h)) == -1 || h[0] == '\0')
            snprintf(h, sizeof(h), "localhost");
        h[sizeof(h) - 1] = '\0';
        cfg->hostname = xstrdup(h);
    }
    for (const char *c = cfg->hostname; *c; c++) {
        if (*c <= ' ' || *c >= 0x7f) {
            perr(p, G_AT("hostname"),
                 "[global] key 'hostname': must not contain spaces or control characters");
            break;
        }
    }
}

static struct config *parse_text(const char *text, const char *name)
{
    struct parse p;
    struct config *cfg = calloc(1, sizeof(*cfg));
    int rc;

    if (cfg == NULL)
        return NULL;
    cfg->path = xstrdup(name);
    cfg->log_level = LOG_LVL_INFO;
    cfg->max_sessions = 1000;
    cfg->max_sessions_per_ip = 20;
    cfg->buffer_size = 16 * 1024;
    cfg->tls_batch_memory = 64 * 1024 * 1024;
    cfg->handshake_timeout = 10;
    cfg->command_timeout = 60;
    cfg->idle_timeout = 300;
    cfg->drain_timeout = 30;
    cfg->max_errors = 10;

    memset(&p, 0, sizeof(p));
    p.cfg = cfg;
    p.file = name;
    p.rd.p = text;
    rc = ini_parse_stream(reader, &p, handler, &p);
    if (rc > 0)
        perr(&p, rc, "syntax error (expected [section], key = value, or a comment)");
    else if (rc < 0)
        perr(&p, 0, "cannot parse (out of memory)");
    if (p.errors == 0)
        validate(&p);
    if (p.errors > 0) {
        config_free(cfg);
        return NULL;
    }
    return cfg;
}

int config_listener_line(const struct listener_cfg *li, const char *key)
{
    return key_at(li->key_line, listener_keys, key, li->line);
}

struct config *config_parse_string(const char *text, const char *name)
{
    return parse_text(text, name);
}

struct config *config_load(const char *path)
{
    FILE *f = fopen(path, "rb");
    char *text;
    size_t n;
    struct config *cfg;

    if (f == NULL) {
        fprintf(stderr, "%s: cannot open: %s\n", path, strerror(errno));
        return NULL;
    }
    text = malloc(MAX_FILE + 1);
    if (text == NULL) {
        fclose(f);
        return NULL;
    }
    n = fread(text, 1, MAX_FILE + 1, f);
    fclose(f);
    if (n > MAX_FILE) {
        fprintf(stderr, "%s: larger than %d bytes\n", path, MAX_FILE);
        free(text);
        return NULL;
    }
    text[n] = '\0';
    if (strlen(text) != n) {
        fprintf(stderr, "%s: contains a NUL byte\n", path);
        free(text);
        return NULL;
    }
    cfg = parse_text(text, path);
    free(text);
    return cfg;
}

void config_free(struct config *cfg)
{
    if (cfg == NULL)
        return;
    for (size_t i = 0; i < cfg->nupstreams; i++) {
        struct upstream_cfg *u = &cfg->upstreams[i];
        free(u->name);
        free(u->address);
        for (size_t j = 0; j < u->naddrs; j++) {
            free(u->addrs[j].spec);
            free(u->addrs[j].host);
            free(u->addrs[j].port);
            free(u->addrs[j].server_name);
        }
        free(u->addrs);
        free(u->server_name);
        free(u->ca_file);
        free(u->cert);
        free(u->key);
    }
    for (size_t i = 0; i < cfg->nlisteners; i++) {
        struct listener_cfg *li = &cfg->listeners[i];
        free(li->name);
        for (size_t j = 0; j < li->nlisten; j++)
            free(li->listen[j]);
        free(li->listen);
        free(li->cert);
        free(li->key);
        free_list(li->certs, li->ncerts);
        free_list(li->keys, li->nkeys);
        free(li->ocsp);
        free_list(li->ocsps, li->nocsp);
        free(li->allow);
        free(li->allow_from);
        free(li->proxy_from);
        free(li->upstream_name);
    }
    free(cfg->upstreams);
    free(cfg->listeners);
    free(cfg->path);
    free(cfg->hostname);
    free(cfg->user);
    free(cfg->group);
    free(cfg->admin);
    free(cfg->workers_str);
    free(cfg);
}

static const char *tls_name(int v)
{
    switch (v) {
    case TLS_V10:
        return "1.0";
    case TLS_V11:
        return "1.1";
    case TLS_V13:
        return "1.3";
    default:
        return "1.2";
    }
}

static void dump_cidrs(const char *key, const struct cidr *v, size_t n, FILE *out)
{
    char a[INET6_ADDRSTRLEN];

    if (n == 0)
        return;
    fprintf(out, "%s = ", key);
    for (size_t i = 0; i < n; i++) {
        inet_ntop(v[i].family, v[i].addr, a, sizeof(a));
        fprintf(out, "%s%s/%u", i ? ", " : "", a, v[i].bits);
    }
    fputc('\n', out);
}

void config_dump(const struct config *cfg, FILE *out)
{
    static const char *const lvl[] = {"debug", "info", "warning", "error"};

    fprintf(out, "[global]\nhostname = %s\n", cfg->hostname);
    if (cfg->user)
        fprintf(out, "user = %s\n", cfg->user);
    if (cfg->group)
        fprintf(out, "group = %s\n", cfg->group);
    if (cfg->run_as_root)
        fprintf(out, "run_as_root = yes\n");
    if (cfg->admin)
        fprintf(out, "admin = %s\n", cfg->admin);
    if (cfg->workers)
        fprintf(out, "workers = %u\n", cfg->workers);
    else
        fprintf(out, "workers = auto\n");
    fprintf(out,
            "log_level = %s\nlog_format = %s\nsyslog = %s\nmax_sessions = %u\nmax_sessions_per_ip "
            "= %u\n"
            "buffer_size = %zu\ntls_batch_memory = %zu\nrsa_backend = %s\naes_gcm = "
            "%s\nhandshake_timeout = %gs\n"
            "command_timeout = %gs\n"
            "idle_timeout = %gs\ndrain_timeout = %gs\nmax_errors = %u\n",
            lvl[cfg->log_level], format_words[cfg->log_json], cfg->syslog ? "yes" : "no",
            cfg->max_sessions, cfg->max_sessions_per_ip, cfg->buffer_size, cfg->tls_batch_memory,
            rsa_words[cfg->rsa_backend], gcm_words[cfg->aes_gcm], cfg->handshake_timeout,
            cfg->command_timeout, cfg->idle_timeout, cfg->drain_timeout, cfg->max_errors);
    for (size_t i = 0; i < cfg->nupstreams; i++) {
        const struct upstream_cfg *u = &cfg->upstreams[i];
        fprintf(out, "\n[upstream%s%s]\naddress = ", u->name[0] ? " " : "", u->name);
        for (size_t j = 0; j < u->naddrs; j++)
            fprintf(out, "%s%s", j ? ", " : "", u->addrs[j].spec);
        fprintf(out, "\ntls = %s\n", tls_words[u->tls]);
        if (u->server_name || u->naddrs == 1)
            fprintf(out, "server_name = %s\n", u->addrs[0].server_name);
        else
            fprintf(out, "# server_name: unset, each address's host name is checked\n");
        fprintf(out, "ca_file = %s\nverify = %s\n", u->ca_file, u->verify ? "yes" : "no");
        if (u->cert)
            fprintf(out, "cert = %s\nkey = %s\n", u->cert, u->key);
        fprintf(out, "min_tls = %s\nconnect_timeout = %gs\nreply_timeout = %gs\n",
                tls_name(u->min_tls), u->connect_timeout, u->reply_timeout);
        fprintf(out, "proxy_protocol = %s\nxclient = %s\n", pp_words[u->proxy_protocol],
                u->xclient ? "yes" : "no");
    }
    for (size_t i = 0; i < cfg->nlisteners; i++) {
        const struct listener_cfg *li = &cfg->listeners[i];
        fprintf(out, "\n[listener %s]\nlisten = ", li->name);
        for (size_t j = 0; j < li->nlisten; j++)
            fprintf(out, "%s%s", j ? ", " : "", li->listen[j]);
        fprintf(out, "\nmode = %s\ncert = %s\nkey = %s\nmin_tls = %s\n", mode_words[li->mode],
                li->cert, li->key, tls_name(li->min_tls));
        if (li->ocsp)
            fprintf(out, "ocsp_response = %s\n", li->ocsp);
        fprintf(out, "require_auth = %s\n", li->require_auth ? "yes" : "no");
        dump_cidrs("allow_from", li->allow_from, li->nallow_from, out);
        if (li->accept_proxy) {
            fprintf(out, "accept_proxy = yes\n");
            dump_cidrs("proxy_from", li->proxy_from, li->nproxy_from, out);
        }
        dump_cidrs("allow_plaintext_from", li->allow, li->nallow, out);
        if (li->upstream_name)
            fprintf(out, "upstream = %s\n", li->upstream_name);
    }
}
