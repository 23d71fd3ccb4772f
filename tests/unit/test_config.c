/*
 * test_config.c - unit tests for the configuration parser (proxy/config.c).
 *
 * Build (see Makefile, build/unit/test_config):
 *   cc -std=c17 -Wall -Wextra -Werror -Wshadow -Wconversion -D_GNU_SOURCE -Iproxy \
 *      -fsanitize=address,undefined tests/unit/test_config.c proxy/config.c \
 *      proxy/log.c -linih -o build/unit/test_config
 *
 * Self-contained: CHECK counts failures and prints file:line; the program
 * ends with one line "N passed, N failed" and exits non-zero on any failure.
 * Run from the repository root (it reads config/smtpbridge.conf).
 *
 * Config texts are printf formats in which "@C@", "@K@" and "@D@" are then
 * replaced by the paths of a readable certificate file, a readable key file
 * and the temporary directory holding them (config.c only checks that the
 * files are readable). Everything config_parse_string() writes to stderr is
 * captured into g_err so that messages can be asserted on.
 */
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "check.h"

static char g_dir[64];
static char g_cert[128], g_key[128];
static char g_err[32768];

/* ------------------------------------------------------------------------ */
/* helpers                                                                  */
/* ------------------------------------------------------------------------ */

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");

    if (f == NULL) {
        perror(path);
        exit(2);
    }
    fputs(text, f);
    fclose(f);
}

/* Replaces every @C@, @K@, @D@ in s; returns a malloc'd string. */
static char *expand(const char *s)
{
    size_t cap = strlen(s) * 4 + 1024, o = 0;
    char *out = malloc(cap);

    if (out == NULL)
        exit(2);
    while (*s) {
        const char *rep = NULL;
        if (strncmp(s, "@C@", 3) == 0)
            rep = g_cert;
        else if (strncmp(s, "@K@", 3) == 0)
            rep = g_key;
        else if (strncmp(s, "@D@", 3) == 0)
            rep = g_dir;
        if (rep != NULL) {
            size_t l = strlen(rep);
            if (o + l + 1 >= cap) {
                cap = cap * 2 + l;
                out = realloc(out, cap);
                if (out == NULL)
                    exit(2);
            }
            memcpy(out + o, rep, l);
            o += l;
            s += 3;
        } else {
            if (o + 2 >= cap) {
                cap *= 2;
                out = realloc(out, cap);
                if (out == NULL)
                    exit(2);
            }
            out[o++] = *s++;
        }
    }
    out[o] = '\0';
    return out;
}

/* config_parse_string(text, "test.conf") with stderr captured into g_err. */
static struct config *parse_raw(const char *text)
{
    struct config *cfg;
    FILE *t = tmpfile();
    int saved;
    size_t n;

    if (t == NULL) {
        perror("tmpfile");
        exit(2);
    }
    fflush(stderr);
    saved = dup(2);
    dup2(fileno(t), 2);
    cfg = config_parse_string(text, "test.conf");
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    rewind(t);
    n = fread(g_err, 1, sizeof(g_err) - 1, t);
    g_err[n] = '\0';
    fclose(t);
    return cfg;
}

static struct config *vparse(const char *fmt, va_list ap)
{
    char *buf = NULL, *text;
    struct config *cfg;

    if (vasprintf(&buf, fmt, ap) < 0)
        exit(2);
    text = expand(buf);
    free(buf);
    cfg = parse_raw(text);
    free(text);
    return cfg;
}

static struct config *parse(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static struct config *parse(const char *fmt, ...)
{
    va_list ap;
    struct config *cfg;

    va_start(ap, fmt);
    cfg = vparse(fmt, ap);
    va_end(ap);
    return cfg;
}

/* Number of lines written to stderr by the last parse. */
static int n_err_lines(void)
{
    int n = 0;

    for (const char *c = g_err; *c; c++)
        if (*c == '\n')
            n++;
    return n;
}

/* Is there an error line "test.conf:LINE: ..." ("test.conf: ..." for 0) ..." containing needle? */
static int err_has(int line, const char *needle)
{
    char prefix[64];
    const char *l = g_err;

    /* Problems without a line (missing sections, [global] checks on keys
     * that were not set) are reported as "test.conf: ...". */
    if (line > 0)
        snprintf(prefix, sizeof(prefix), "test.conf:%d: ", line);
    else
        snprintf(prefix, sizeof(prefix), "test.conf: ");
    while (*l) {
        const char *nl = strchr(l, '\n');
        size_t len = nl ? (size_t)(nl - l) : strlen(l);
        char one[1024];
        snprintf(one, sizeof(one), "%.*s", (int)len, l);
        if (strncmp(one, prefix, strlen(prefix)) == 0 && strstr(one, needle) != NULL)
            return 1;
        l += len;
        if (*l == '\n')
            l++;
    }
    fprintf(stderr, "  expected an error \"%s...%s\"; stderr was:\n%s", prefix, needle,
            g_err[0] ? g_err : "  (nothing)\n");
    return 0;
}

/* The config is rejected with an error at `line` mentioning `needle`. */
static int rejects(int line, const char *needle, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int rejects(int line, const char *needle, const char *fmt, ...)
{
    va_list ap;
    struct config *cfg;

    va_start(ap, fmt);
    cfg = vparse(fmt, ap);
    va_end(ap);
    if (cfg != NULL) {
        fprintf(stderr, "  expected rejection (line %d, \"%s\"), but the config was accepted\n",
                line, needle);
        config_free(cfg);
        return 0;
    }
    return err_has(line, needle);
}

/* The config is accepted, with nothing on stderr. */
static int accepts(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int accepts(const char *fmt, ...)
{
    va_list ap;
    struct config *cfg;

    va_start(ap, fmt);
    cfg = vparse(fmt, ap);
    va_end(ap);
    if (cfg == NULL || g_err[0] != '\0') {
        fprintf(stderr, "  expected acceptance; stderr was:\n%s", g_err);
        config_free(cfg);
        return 0;
    }
    config_free(cfg);
    return 1;
}

/*
 * BASE: a minimal valid configuration, 8 lines. The upstream section header
 * is line 1, the listener's line 4; a line appended after BASE is line 9 and
 * belongs to [listener a].
 */
#define BASE                                                                                       \
    "[upstream]\n"                                                                                 \
    "address = mail.example.com:587\n"                                                             \
    "ca_file = @C@\n"                                                                              \
    "[listener a]\n"                                                                               \
    "listen = 127.0.0.1:2525\n"                                                                    \
    "mode = starttls\n"                                                                            \
    "cert = @C@\n"                                                                                 \
    "key = @K@\n"

/* One [global] line (line 2) before BASE (upstream at 3, listener at 6). */
#define GLOBAL "[global]\n%s\n" BASE

/* One extra upstream line (line 4); the listener starts at line 5. */
#define UPSTREAM                                                                                   \
    "[upstream]\n"                                                                                 \
    "address = mail.example.com:587\n"                                                             \
    "ca_file = @C@\n"                                                                              \
    "%s\n"                                                                                         \
    "[listener a]\n"                                                                               \
    "listen = 127.0.0.1:2525\n"                                                                    \
    "mode = starttls\n"                                                                            \
    "cert = @C@\n"                                                                                 \
    "key = @K@\n"

/* A listener (header at line 4) whose mode line (line 6) is given. */
#define LISTENER_MODE                                                                              \
    "[upstream]\n"                                                                                 \
    "address = mail.example.com:587\n"                                                             \
    "ca_file = @C@\n"                                                                              \
    "[listener a]\n"                                                                               \
    "listen = 127.0.0.1:2525\n"                                                                    \
    "%s\n"                                                                                         \
    "cert = @C@\n"                                                                                 \
    "key = @K@\n"

/* ------------------------------------------------------------------------ */
/* defaults                                                                 */
/* ------------------------------------------------------------------------ */

static void test_defaults(void)
{
    struct config *cfg = parse(BASE);

    CHECK(cfg != NULL);
    CHECK(g_err[0] == '\0');
    if (cfg == NULL)
        return;
    CHECK(strcmp(cfg->path, "test.conf") == 0);
    CHECK(cfg->hostname != NULL && cfg->hostname[0] != '\0');
    CHECK(cfg->user == NULL && cfg->group == NULL);
    CHECK(cfg->log_level == LOG_LVL_INFO);
    CHECK(cfg->syslog == 0);
    CHECK(cfg->max_sessions == 1000);
    CHECK(cfg->max_sessions_per_ip == 20);
    CHECK(cfg->buffer_size == 16384);
    CHECK(cfg->handshake_timeout == 10);
    CHECK(cfg->command_timeout == 60);
    CHECK(cfg->idle_timeout == 300);
    CHECK(cfg->max_errors == 10);
    CHECK(cfg->rsa_backend == RSA_BACKEND_AUTO);

    CHECK(cfg->nupstreams == 1);
    if (cfg->nupstreams == 1) {
        struct upstream_cfg *u = &cfg->upstreams[0];
        CHECK(strcmp(u->name, "") == 0);
        CHECK(u->line == 1);
        CHECK(strcmp(u->address, "mail.example.com:587") == 0);
        CHECK(u->naddrs == 1);
        CHECK(strcmp(u->addrs[0].spec, "mail.example.com:587") == 0);
        CHECK(strcmp(u->addrs[0].host, "mail.example.com") == 0);
        CHECK(strcmp(u->addrs[0].port, "587") == 0);
        CHECK(u->tls == UPSTREAM_TLS_STARTTLS);
        CHECK(u->server_name == NULL);
        CHECK(strcmp(u->addrs[0].server_name, "mail.example.com") == 0);
        CHECK(strcmp(u->ca_file, g_cert) == 0);
        CHECK(u->verify == 1);
        CHECK(u->cert == NULL && u->key == NULL);
        CHECK(u->min_tls == TLS_V12);
        CHECK(u->connect_timeout == 10);
        CHECK(u->reply_timeout == 30);
    }
    CHECK(cfg->nlisteners == 1);
    if (cfg->nlisteners == 1) {
        struct listener_cfg *li = &cfg->listeners[0];
        CHECK(strcmp(li->name, "a") == 0);
        CHECK(li->line == 4);
        CHECK(li->nlisten == 1 && strcmp(li->listen[0], "127.0.0.1:2525") == 0);
        CHECK(li->mode == LISTENER_STARTTLS);
        CHECK(strcmp(li->cert, g_cert) == 0);
        CHECK(strcmp(li->key, g_key) == 0);
        CHECK(li->min_tls == TLS_V12);
        CHECK(li->nallow == 0 && li->allow == NULL);
        CHECK(li->nallow_from == 0 && li->allow_from == NULL);
        CHECK(li->require_auth == 1);
        CHECK(li->upstream_name == NULL);
        CHECK(li->upstream == &cfg->upstreams[0]);
    }
    config_free(cfg);

    /* ca_file default (not checked for readability when verify = no). */
    cfg = parse("[upstream]\naddress = h:25\nverify = no\n[listener a]\nlisten = 127.0.0.1:25\n"
                "mode = implicit\ncert = @C@\nkey = @K@\n");
    CHECK(cfg != NULL);
    if (cfg != NULL) {
        CHECK(strcmp(cfg->upstreams[0].ca_file, "/etc/ssl/certs/ca-certificates.crt") == 0);
        CHECK(cfg->upstreams[0].verify == 0);
        CHECK(cfg->listeners[0].mode == LISTENER_IMPLICIT);
    }
    config_free(cfg);

    /* server_name: default is the host without brackets; explicit wins. */
    cfg = parse("[upstream]\naddress = [::1]:465\nca_file = @C@\n[listener a]\n"
                "listen = 127.0.0.1:25\nmode = implicit\ncert = @C@\nkey = @K@\n");
    CHECK(cfg != NULL);
    if (cfg != NULL) {
        CHECK(strcmp(cfg->upstreams[0].addrs[0].host, "::1") == 0);
        CHECK(strcmp(cfg->upstreams[0].addrs[0].port, "465") == 0);
        CHECK(strcmp(cfg->upstreams[0].addrs[0].server_name, "::1") == 0);
    }
    config_free(cfg);
    cfg = parse(UPSTREAM, "server_name = smtp.example.com");
    CHECK(cfg != NULL);
    if (cfg != NULL) {
        CHECK(strcmp(cfg->upstreams[0].server_name, "smtp.example.com") == 0);
        CHECK(strcmp(cfg->upstreams[0].addrs[0].server_name, "smtp.example.com") == 0);
    }
    config_free(cfg);

    /* Several addresses: tried in order, each checked for its own host name
     * unless server_name is set; the list is normalised (no blanks). */
    cfg = parse("[upstream]\naddress = mx1.example.com:587 ,\t[::1]:2587,10.0.0.1:25\n"
                "ca_file = @C@\n[listener a]\nlisten = 127.0.0.1:25\nmode = implicit\n"
                "cert = @C@\nkey = @K@\n");
    CHECK(cfg != NULL);
    if (cfg != NULL) {
        struct upstream_cfg *u = &cfg->upstreams[0];
        CHECK(u->naddrs == 3);
        CHECK(strcmp(u->address, "mx1.example.com:587,[::1]:2587,10.0.0.1:25") == 0);
        if (u->naddrs == 3) {
            CHECK(strcmp(u->addrs[0].server_name, "mx1.example.com") == 0);
            CHECK(strcmp(u->addrs[1].spec, "[::1]:2587") == 0);
            CHECK(strcmp(u->addrs[1].host, "::1") == 0);
            CHECK(strcmp(u->addrs[1].port, "2587") == 0);
            CHECK(strcmp(u->addrs[2].server_name, "10.0.0.1") == 0);
        }
    }
    config_free(cfg);
    /* A repeated address line extends the list (so does a continuation). */
    cfg = parse(UPSTREAM, "address = a.example:25, b.example:25\nserver_name = mx.example");
    CHECK(cfg != NULL && cfg->upstreams[0].naddrs == 3);
    if (cfg != NULL && cfg->upstreams[0].naddrs == 3)
        CHECK(strcmp(cfg->upstreams[0].addrs[2].spec, "b.example:25") == 0);
    config_free(cfg);
    cfg = parse("[upstream]\naddress = a.example:25,\n  b.example:25\nca_file = @C@\n"
                "[listener a]\nlisten = 127.0.0.1:25\nmode = implicit\n"
                "cert = @C@,\n       @C@\nkey = @K@\nkey = @K@\n");
    CHECK(cfg != NULL);
    if (cfg != NULL) {
        CHECK(cfg->upstreams[0].naddrs == 2);
        CHECK(cfg->listeners[0].ncerts == 2 && cfg->listeners[0].nkeys == 2);
        CHECK(strcmp(cfg->upstreams[0].address, "a.example:25,b.example:25") == 0);
    }
    config_free(cfg);
    CHECK(rejects(9, "key 'key': 1 key file(s) for 2 certificate(s)",
                  "[upstream]\naddress = a.example:25\nca_file = @C@\n"
                  "[listener a]\nlisten = 127.0.0.1:25\nmode = implicit\n"
                  "cert = @C@,\n       @C@\nkey = @K@\n"));
    {
        /* 65 certificate/key pairs (one per line): one more than allowed. */
        static char big[65 * 24 + 256];
        size_t o = (size_t)snprintf(big, sizeof(big),
                                    "[upstream]\naddress = a.example:25\nca_file = @C@\n"
                                    "[listener a]\nlisten = 127.0.0.1:25\nmode = implicit\n");
        for (int i = 0; i < 65; i++)
            o += (size_t)snprintf(big + o, sizeof(big) - o, "cert = @C@\nkey = @K@\n");
        CHECK(rejects(7, "key 'cert': more than 64 certificates", "%s", big));
    }
    CHECK(rejects(8, "line longer than 197 characters (a list can go on",
                  "[upstream]\naddress = a.example:25\nca_file = @C@\n"
                  "[listener a]\nlisten = 127.0.0.1:25\nmode = implicit\n"
                  "key = @K@\ncert = @C@, %0200d\n",
                  0));
    CHECK(accepts("[upstream]\naddress = a.example:25, b.example:25\nserver_name = mx.example\n"
                  "ca_file = @C@\n[listener a]\nlisten = 127.0.0.1:25\nmode = implicit\n"
                  "cert = @C@\nkey = @K@\n"));
    cfg = parse("[upstream]\naddress = a.example:25, b.example:25\nserver_name = mx.example\n"
                "ca_file = @C@\n[listener a]\nlisten = 127.0.0.1:25\nmode = implicit\n"
                "cert = @C@\nkey = @K@\n");
    CHECK(cfg != NULL);
    if (cfg != NULL && cfg->upstreams[0].naddrs == 2)
        CHECK(strcmp(cfg->upstreams[0].addrs[1].server_name, "mx.example") == 0);
    config_free(cfg);
    CHECK(rejects(2, "'b.example' is not host:port",
                  "[upstream]\naddress = a.example:25, b.example\nca_file = @C@\n"
                  "[listener a]\nlisten = 127.0.0.1:25\nmode = implicit\ncert = @C@\n"
                  "key = @K@\n"));
    CHECK(rejects(2, "no address given",
                  "[upstream]\naddress = , ,\nca_file = @C@\n"
                  "[listener a]\nlisten = 127.0.0.1:25\nmode = implicit\ncert = @C@\n"
                  "key = @K@\n"));
    CHECK(rejects(2, "more than 16 addresses",
                  "[upstream]\naddress = a:1,b:1,c:1,d:1,e:1,f:1,g:1,h:1,i:1,j:1,k:1,l:1,m:1,"
                  "n:1,o:1,p:1,q:1\nca_file = @C@\n"
                  "[listener a]\nlisten = 127.0.0.1:25\nmode = implicit\ncert = @C@\n"
                  "key = @K@\n"));

    /* Global string keys, inline and '#' comments, CRLF line ends. */
    cfg = parse("# comment\n[global]\n; comment\nhostname = proxy.example.net\nuser = mail ; the "
                "user\ngroup = mail\n" BASE);
    CHECK(cfg != NULL);
    if (cfg != NULL) {
        CHECK(strcmp(cfg->hostname, "proxy.example.net") == 0);
        CHECK(strcmp(cfg->user, "mail") == 0);
        CHECK(strcmp(cfg->group, "mail") == 0);
    }
    config_free(cfg);
    CHECK(accepts("[upstream]\r\naddress = h:25\r\nca_file = @C@\r\n[listener a]\r\n"
                  "listen = 127.0.0.1:25\r\nmode = implicit\r\ncert = @C@\r\nkey = @K@\r\n"));
    /* No newline at the end of the last line. */
    CHECK(accepts("%s", BASE "min_tls = 1.3"));
    /* Sections in any order; [global] last. */
    CHECK(accepts("[listener a]\nlisten = 127.0.0.1:25\nmode = implicit\ncert = @C@\n"
                  "key = @K@\n[upstream]\naddress = h:25\nca_file = @C@\n[global]\nsyslog = no\n"));

    CHECK(rejects(2, "hostname", GLOBAL, "hostname ="));
    CHECK(rejects(2, "hostname", GLOBAL, "hostname = a b"));
    CHECK(rejects(2, "user", GLOBAL, "user ="));

    config_free(NULL); /* no-op */
    CHECK(1);
}

/* The shipped example: every key "shown with its default value". */
static void test_example_file(void)
{
    FILE *f = fopen("config/smtpbridge.conf", "r");
    char *text, *exp;
    size_t n, cap = 1 << 16;
    struct config *cfg, *def;

    CHECK(f != NULL);
    if (f == NULL)
        return;
    text = calloc(1, cap);
    if (text == NULL)
        exit(2);
    n = fread(text, 1, cap - 1, f);
    fclose(f);
    text[n] = '\0';
    /* Point the file names at files that exist. */
    exp = malloc(cap * 2);
    if (exp == NULL)
        exit(2);
    {
        static const char *const from[] = {"/etc/smtpbridge/fullchain.pem",
                                           "/etc/smtpbridge/privkey.pem",
                                           "/etc/ssl/certs/ca-certificates.crt"};
        const char *to[] = {"@C@", "@K@", "@C@"};
        const char *s = text;
        size_t o = 0;
        while (*s) {
            size_t i;
            for (i = 0; i < 3; i++)
                if (strncmp(s, from[i], strlen(from[i])) == 0)
                    break;
            if (i < 3) {
                memcpy(exp + o, to[i], 3);
                o += 3;
                s += strlen(from[i]);
            } else {
                exp[o++] = *s++;
            }
        }
        exp[o] = '\0';
    }
    free(text);
    text = expand(exp);
    free(exp);
    cfg = parse_raw(text);
    free(text);
    CHECK(cfg != NULL);
    if (g_err[0])
        fprintf(stderr, "  example config: %s", g_err);
    def = parse(BASE);
    if (cfg != NULL && def != NULL) {
        CHECK(cfg->log_level == def->log_level);
        CHECK(cfg->syslog == def->syslog);
        CHECK(cfg->max_sessions == def->max_sessions);
        CHECK(cfg->max_sessions_per_ip == def->max_sessions_per_ip);
        CHECK(cfg->buffer_size == def->buffer_size);
        CHECK(cfg->handshake_timeout == def->handshake_timeout);
        CHECK(cfg->command_timeout == def->command_timeout);
        CHECK(cfg->idle_timeout == def->idle_timeout);
        CHECK(cfg->max_errors == def->max_errors);
        CHECK(cfg->nupstreams == 1);
        CHECK(cfg->nlisteners == 2);
        struct upstream_cfg *u = &cfg->upstreams[0], *du = &def->upstreams[0];
        CHECK(u->tls == du->tls);
        CHECK(u->verify == du->verify);
        CHECK(u->min_tls == du->min_tls);
        CHECK(u->connect_timeout == du->connect_timeout);
        CHECK(u->reply_timeout == du->reply_timeout);
        CHECK(strcmp(u->addrs[0].server_name, "127.0.0.1") == 0);
        CHECK(cfg->listeners[0].min_tls == def->listeners[0].min_tls);
        CHECK(cfg->listeners[0].nlisten == 2);
        CHECK(cfg->listeners[0].mode == LISTENER_IMPLICIT);
        CHECK(cfg->listeners[1].mode == LISTENER_STARTTLS);
        CHECK(cfg->listeners[1].upstream == u);
        CHECK(cfg->listeners[0].require_auth == 1 && cfg->listeners[1].require_auth == 1);
        CHECK(cfg->listeners[0].nallow_from == 0 && cfg->listeners[1].nallow == 0);
    }
    config_free(cfg);
    config_free(def);
}

/* ------------------------------------------------------------------------ */
/* value syntax                                                             */
/* ------------------------------------------------------------------------ */

static double global_duration(const char *v)
{
    struct config *cfg = parse(GLOBAL, v);
    double d = cfg ? cfg->handshake_timeout : -999;

    config_free(cfg);
    return d;
}

static void test_durations(void)
{
    CHECK(global_duration("handshake_timeout = 500ms") == 0.5);
    CHECK(global_duration("handshake_timeout = 2m") == 120);
    CHECK(global_duration("handshake_timeout = 1h") == 3600);
    CHECK(global_duration("handshake_timeout = 30") == 30);
    CHECK(global_duration("handshake_timeout = 30s") == 30);
    CHECK(global_duration("handshake_timeout = 1.5s") == 1.5);
    CHECK(global_duration("handshake_timeout = 1ms") == 0.001);
    CHECK(global_duration("handshake_timeout = 604800") == 604800); /* 7 days */
    CHECK(global_duration("handshake_timeout = 168h") == 604800);

    CHECK(rejects(2, "handshake_timeout", GLOBAL, "handshake_timeout = 0"));
    CHECK(rejects(2, "handshake_timeout", GLOBAL, "handshake_timeout = 0s"));
    CHECK(rejects(2, "handshake_timeout", GLOBAL, "handshake_timeout = -1"));
    CHECK(rejects(2, "handshake_timeout", GLOBAL, "handshake_timeout = 5x"));
    CHECK(rejects(2, "handshake_timeout", GLOBAL, "handshake_timeout = 5 s"));
    CHECK(rejects(2, "handshake_timeout", GLOBAL, "handshake_timeout = 5sec"));
    CHECK(rejects(2, "handshake_timeout", GLOBAL, "handshake_timeout = 1d"));
    CHECK(rejects(2, "handshake_timeout", GLOBAL, "handshake_timeout = s"));
    CHECK(rejects(2, "handshake_timeout", GLOBAL, "handshake_timeout ="));
    CHECK(rejects(2, "handshake_timeout", GLOBAL, "handshake_timeout = 0.5ms"));
    CHECK(rejects(2, "handshake_timeout", GLOBAL, "handshake_timeout = 604801"));
    CHECK(rejects(2, "handshake_timeout", GLOBAL, "handshake_timeout = inf"));
    CHECK(rejects(2, "handshake_timeout", GLOBAL, "handshake_timeout = 1e999"));
    /* BUG: strtod accepts "nan"; NaN fails every range comparison, so a NaN
     * deadline is accepted (d < 0.001 || d > 7 days is false for NaN). */
    CHECK(rejects(2, "handshake_timeout", GLOBAL, "handshake_timeout = nan"));
    CHECK(rejects(2, "idle_timeout", GLOBAL, "idle_timeout = NaNms"));
    CHECK(rejects(4, "connect_timeout", UPSTREAM, "connect_timeout = nan"));

    CHECK(rejects(2, "command_timeout", GLOBAL, "command_timeout = 10q"));
    CHECK(rejects(2, "idle_timeout", GLOBAL, "idle_timeout = -5m"));
    {
        struct config *cfg = parse(UPSTREAM, "connect_timeout = 2m");
        CHECK(cfg && cfg->upstreams[0].connect_timeout == 120);
        config_free(cfg);
        cfg = parse(UPSTREAM, "reply_timeout = 250ms");
        CHECK(cfg && cfg->upstreams[0].reply_timeout == 0.25);
        config_free(cfg);
    }
    CHECK(rejects(4, "reply_timeout", UPSTREAM, "reply_timeout = 0"));
}

static void test_sizes_and_numbers(void)
{
    struct config *cfg;
    static const struct {
        const char *v;
        size_t want;
    } good[] = {{"16k", 16384},  {"4k", 4096},       {"4096", 4096}, {"1m", 1048576},
                {"1M", 1048576}, {"1024k", 1048576}, {"64K", 65536}, {"1048576", 1048576}};

    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        cfg = parse("[global]\nbuffer_size = %s\n" BASE, good[i].v);
        CHECK(cfg != NULL && cfg->buffer_size == good[i].want);
        config_free(cfg);
    }
    /* Out of range: reported by validation, at the key's line. */
    CHECK(rejects(2, "buffer_size", GLOBAL, "buffer_size = 4095"));
    CHECK(rejects(2, "buffer_size", GLOBAL, "buffer_size = 0"));
    CHECK(rejects(2, "buffer_size", GLOBAL, "buffer_size = 2m"));
    CHECK(rejects(2, "buffer_size", GLOBAL, "buffer_size = 1025k"));
    CHECK(rejects(2, "buffer_size", GLOBAL, "buffer_size = 1099511627776"));
    /* Bad syntax: reported at the line. */
    CHECK(rejects(2, "buffer_size", GLOBAL, "buffer_size = 16kb"));
    CHECK(rejects(2, "buffer_size", GLOBAL, "buffer_size = 16 k"));
    CHECK(rejects(2, "buffer_size", GLOBAL, "buffer_size = k"));
    CHECK(rejects(2, "buffer_size", GLOBAL, "buffer_size = -16k"));
    CHECK(rejects(2, "buffer_size", GLOBAL, "buffer_size = 1g"));
    CHECK(rejects(2, "buffer_size", GLOBAL, "buffer_size = 99999999999999999999999"));
    CHECK(rejects(2, "buffer_size", GLOBAL, "buffer_size = 1099511627777"));
    CHECK(rejects(2, "buffer_size", GLOBAL, "buffer_size ="));
    /* tls_batch_memory: 0 (off) up to 1024m; 64m by default. */
    cfg = parse("%s", BASE);
    CHECK(cfg != NULL && cfg->tls_batch_memory == 64 * 1048576);
    config_free(cfg);
    cfg = parse("[global]\ntls_batch_memory = 0\n" BASE);
    CHECK(cfg != NULL && cfg->tls_batch_memory == 0);
    config_free(cfg);
    cfg = parse("[global]\ntls_batch_memory = 1024m\n" BASE);
    CHECK(cfg != NULL && cfg->tls_batch_memory == 1073741824);
    config_free(cfg);
    CHECK(rejects(2, "tls_batch_memory", GLOBAL, "tls_batch_memory = 1025m"));
    CHECK(rejects(2, "tls_batch_memory", GLOBAL, "tls_batch_memory = lots"));

    cfg = parse(GLOBAL, "max_sessions = 0");
    CHECK(cfg != NULL && cfg->max_sessions == 0);
    config_free(cfg);
    cfg = parse(GLOBAL, "max_sessions = 1000000");
    CHECK(cfg != NULL && cfg->max_sessions == 1000000);
    config_free(cfg);
    cfg = parse(GLOBAL, "max_sessions_per_ip = 3");
    CHECK(cfg != NULL && cfg->max_sessions_per_ip == 3);
    config_free(cfg);
    cfg = parse(GLOBAL, "max_errors = 1000");
    CHECK(cfg != NULL && cfg->max_errors == 1000);
    config_free(cfg);
    CHECK(rejects(2, "max_sessions", GLOBAL, "max_sessions = 1000001"));
    CHECK(rejects(2, "max_sessions", GLOBAL, "max_sessions = -1"));
    CHECK(rejects(2, "max_sessions", GLOBAL, "max_sessions = +5"));
    CHECK(rejects(2, "max_sessions", GLOBAL, "max_sessions = 1.5"));
    CHECK(rejects(2, "max_sessions", GLOBAL, "max_sessions = 1k"));
    CHECK(rejects(2, "max_sessions", GLOBAL, "max_sessions = 99999999999999999999999"));
    CHECK(rejects(2, "max_sessions_per_ip", GLOBAL, "max_sessions_per_ip = x"));
    CHECK(rejects(2, "max_errors", GLOBAL, "max_errors = 1001"));
    CHECK(rejects(2, "[global] key 'max_errors': must be at least 1", GLOBAL, "max_errors = 0"));
    CHECK(rejects(2, "whole number", GLOBAL, "max_errors ="));
}

static void test_booleans(void)
{
    static const struct {
        const char *v;
        int want;
    } good[] = {{"yes", 1},   {"no", 0}, {"on", 1}, {"off", 0}, {"true", 1},
                {"false", 0}, {"1", 1},  {"0", 0},  {"YES", 1}, {"Off", 0}};
    struct config *cfg;

    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        cfg = parse("[global]\nsyslog = %s\n" BASE, good[i].v);
        CHECK(cfg != NULL && cfg->syslog == good[i].want);
        config_free(cfg);
        cfg = parse(UPSTREAM, good[i].want ? "verify = yes" : "verify = no");
        CHECK(cfg != NULL && cfg->upstreams[0].verify == good[i].want);
        config_free(cfg);
    }
    CHECK(rejects(2, "syslog", GLOBAL, "syslog = 2"));
    CHECK(rejects(2, "syslog", GLOBAL, "syslog = y"));
    CHECK(rejects(2, "syslog", GLOBAL, "syslog = yess"));
    CHECK(rejects(2, "yes or no", GLOBAL, "syslog ="));
    CHECK(rejects(4, "verify", UPSTREAM, "verify = maybe"));
}

static void test_enums(void)
{
    struct config *cfg;

    /* upstream tls */
    cfg = parse(UPSTREAM, "tls = starttls");
    CHECK(cfg && cfg->upstreams[0].tls == UPSTREAM_TLS_STARTTLS);
    config_free(cfg);
    cfg = parse(UPSTREAM, "tls = implicit");
    CHECK(cfg && cfg->upstreams[0].tls == UPSTREAM_TLS_IMPLICIT);
    config_free(cfg);
    cfg = parse(UPSTREAM, "tls = none");
    CHECK(cfg && cfg->upstreams[0].tls == UPSTREAM_TLS_NONE);
    config_free(cfg);
    CHECK(rejects(4, "tls", UPSTREAM, "tls = ssl"));
    CHECK(rejects(4, "starttls | implicit | none", UPSTREAM, "tls = yes"));
    CHECK(rejects(4, "tls", UPSTREAM, "tls ="));
    /* tls = none: no file is checked (ca_file, cert, key). */
    CHECK(accepts("[upstream]\naddress = h:25\ntls = none\nca_file = @D@/missing\n"
                  "[listener a]\nlisten = 127.0.0.1:25\nmode = implicit\ncert = @C@\nkey = @K@\n"));

    /* listener mode */
    cfg = parse(LISTENER_MODE, "mode = implicit");
    CHECK(cfg && cfg->listeners[0].mode == LISTENER_IMPLICIT);
    config_free(cfg);
    cfg = parse(LISTENER_MODE, "mode = starttls");
    CHECK(cfg && cfg->listeners[0].mode == LISTENER_STARTTLS);
    config_free(cfg);
    CHECK(rejects(6, "mode", LISTENER_MODE, "mode = plain"));
    CHECK(rejects(6, "implicit | starttls", LISTENER_MODE, "mode = none"));
    CHECK(rejects(6, "mode", LISTENER_MODE, "mode ="));

    /* min_tls, upstream: 1.2 | 1.3 */
    cfg = parse(UPSTREAM, "min_tls = 1.3");
    CHECK(cfg && cfg->upstreams[0].min_tls == TLS_V13);
    config_free(cfg);
    cfg = parse(UPSTREAM, "min_tls = 1.2");
    CHECK(cfg && cfg->upstreams[0].min_tls == TLS_V12);
    config_free(cfg);
    CHECK(rejects(4, "min_tls", UPSTREAM, "min_tls = 1.1"));
    CHECK(rejects(4, "min_tls", UPSTREAM, "min_tls = 1.0"));
    CHECK(rejects(4, "min_tls", UPSTREAM, "min_tls = 1.4"));
    CHECK(rejects(4, "min_tls", UPSTREAM, "min_tls = 12"));
    CHECK(rejects(4, "min_tls", UPSTREAM, "min_tls = tls1.2"));
    CHECK(rejects(4, "min_tls", UPSTREAM, "min_tls ="));

    /* min_tls, listener: 1.0 | 1.1 | 1.2 | 1.3 (whether the TLS library can
     * do 1.0 is checked when the context is built, not here) */
    cfg = parse(BASE "min_tls = 1.1\n");
    CHECK(cfg && cfg->listeners[0].min_tls == TLS_V11);
    config_free(cfg);
    cfg = parse(BASE "min_tls = 1.3\n");
    CHECK(cfg && cfg->listeners[0].min_tls == TLS_V13);
    config_free(cfg);
    cfg = parse(BASE "min_tls = 1.0\n");
    CHECK(cfg && cfg->listeners[0].min_tls == TLS_V10);
    config_free(cfg);
    CHECK(rejects(9, "min_tls", BASE "min_tls = 1.4\n"));
    CHECK(rejects(9, "min_tls", BASE "min_tls = 1.2.0\n"));

    /* log_level */
    static const struct {
        const char *v;
        enum log_level want;
    } lv[] = {{"debug", LOG_LVL_DEBUG},
              {"info", LOG_LVL_INFO},
              {"warning", LOG_LVL_WARNING},
              {"error", LOG_LVL_ERROR}};
    for (size_t i = 0; i < 4; i++) {
        cfg = parse("[global]\nlog_level = %s\n" BASE, lv[i].v);
        CHECK(cfg && cfg->log_level == lv[i].want);
        config_free(cfg);
    }
    /* inline comment after a value */
    cfg = parse(GLOBAL, "log_level = debug ; chatty");
    CHECK(cfg && cfg->log_level == LOG_LVL_DEBUG);
    config_free(cfg);
    CHECK(rejects(2, "log_level", GLOBAL, "log_level = warn"));
    CHECK(rejects(2, "log_level", GLOBAL, "log_level = trace"));
    CHECK(rejects(2, "debug, info, warning or error", GLOBAL, "log_level = 3"));
    CHECK(rejects(2, "log_level", GLOBAL, "log_level ="));
}

/* ------------------------------------------------------------------------ */
/* structure                                                                */
/* ------------------------------------------------------------------------ */

static void test_structure(void)
{
    struct config *cfg;

    /* unknown key, in each kind of section */
    CHECK(rejects(2, "'foo': unknown key", GLOBAL, "foo = 1"));
    CHECK(rejects(4, "'listen': unknown key", UPSTREAM, "listen = 127.0.0.1:25"));
    CHECK(rejects(9, "'address': unknown key", BASE "address = h:25\n"));
    CHECK(rejects(2, "[global] key 'Syslog'", GLOBAL, "Syslog = yes"));

    /* unknown section: one error; its keys are skipped silently */
    CHECK(rejects(1, "[bogus]: unknown section", "[bogus]\nx = 1\ny = 2\n" BASE));
    CHECK(n_err_lines() == 1);
    CHECK(rejects(9, "[upstreams]: unknown section", BASE "[upstreams]\n"));
    CHECK(rejects(9, "[listener]: unknown section", BASE "[listener]\n"));
    CHECK(rejects(9, "unknown section", BASE "[Global]\n"));

    /* key before any section */
    CHECK(rejects(1, "key 'syslog' outside of any section", "syslog = yes\n" BASE));

    /* duplicate key */
    CHECK(rejects(3, "[global] key 'syslog': set twice",
                  "[global]\nsyslog = yes\nsyslog = no\n" BASE));
    CHECK(rejects(9, "key 'mode': set twice", BASE "mode = implicit\n"));
    CHECK(rejects(8, "key 'key': 1 key file(s) for 2 certificate(s)", BASE "cert = @C@\n"));

    /* duplicate sections */
    CHECK(rejects(9, "[listener a]: section defined twice (first at line 4)",
                  BASE "[listener a]\nlisten = 127.0.0.2:25\nmode = implicit\n"
                       "cert = @C@\nkey = @K@\n"));
    CHECK(rejects(9, "[listener  a]: section defined twice", BASE "[listener  a]\n"));
    CHECK(rejects(9, "[upstream]: section defined twice (first at line 1)",
                  BASE "[upstream]\naddress = other:25\n"));
    CHECK(rejects(11, "section defined twice (first at line 9)",
                  BASE "[upstream x]\naddress = h:1\n[upstream x]\naddress = h:2\n"));
    /* the duplicate's keys are not applied to the first section */
    CHECK(rejects(9, "defined twice", BASE "[listener a]\nmode = implicit\n"));
    CHECK(n_err_lines() == 1);

    /* a listener needs a name */
    CHECK(rejects(9, "a listener needs a name", BASE "[listener ]\n"));
    CHECK(rejects(9, "a listener needs a name", BASE "[listener   ]\nmode = x\n"));
    CHECK(n_err_lines() == 1);

    /* missing required keys (reported at the section header) */
    CHECK(rejects(1, "missing required key 'address'",
                  "[upstream]\nca_file = @C@\n[listener a]\nlisten = 127.0.0.1:25\n"
                  "mode = implicit\ncert = @C@\nkey = @K@\n"));
    CHECK(rejects(4, "missing required key 'listen'",
                  "[upstream]\naddress = h:25\nca_file = @C@\n[listener a]\nmode = implicit\n"
                  "cert = @C@\nkey = @K@\n"));
    CHECK(rejects(4, "missing required key 'mode'",
                  "[upstream]\naddress = h:25\nca_file = @C@\n[listener a]\n"
                  "listen = 127.0.0.1:25\ncert = @C@\nkey = @K@\n"));
    CHECK(rejects(4, "missing required key 'cert'",
                  "[upstream]\naddress = h:25\nca_file = @C@\n[listener a]\n"
                  "listen = 127.0.0.1:25\nmode = implicit\nkey = @K@\n"));
    CHECK(rejects(4, "missing required key 'key'",
                  "[upstream]\naddress = h:25\nca_file = @C@\n[listener a]\n"
                  "listen = 127.0.0.1:25\nmode = implicit\ncert = @C@\n"));
    /* all four listener keys missing: four errors */
    CHECK(rejects(4, "missing required key",
                  "[upstream]\naddress = h:25\nca_file = @C@\n"
                  "[listener a]\n"));
    CHECK(n_err_lines() == 4);
    CHECK(rejects(0, "no [upstream] section",
                  "[listener a]\nlisten = 127.0.0.1:25\nmode = implicit\ncert = @C@\n"
                  "key = @K@\n"));
    CHECK(rejects(0, "no [listener NAME] section",
                  "[upstream]\naddress = h:25\n"
                  "ca_file = @C@\n"));
    CHECK(rejects(0, "no [upstream] section", "%s", ""));
    CHECK(err_has(0, "no [listener NAME] section"));

    /* unreadable files: the errno text is shown */
    CHECK(rejects(7, "key 'cert': cannot read '",
                  "[upstream]\naddress = h:25\nca_file = @C@\n[listener a]\n"
                  "listen = 127.0.0.1:25\nmode = implicit\ncert = @D@/missing.pem\nkey = @K@\n"));
    CHECK(err_has(7, "missing.pem': No such file or directory"));
    CHECK(rejects(8, "key 'key': cannot read",
                  "[upstream]\naddress = h:25\nca_file = @C@\n"
                  "[listener a]\nlisten = 127.0.0.1:25\n"
                  "mode = implicit\ncert = @C@\n"
                  "key = @D@/missing.pem\n"));
    CHECK(rejects(3, "No such file or directory",
                  "[upstream]\naddress = h:25\nca_file = @D@/nope\n[listener a]\n"
                  "listen = 127.0.0.1:25\nmode = implicit\ncert = @C@\nkey = @K@\n"));
    /* verify = no: the CA file is not needed */
    CHECK(accepts("[upstream]\naddress = h:25\nca_file = @D@/nope\nverify = no\n[listener a]\n"
                  "listen = 127.0.0.1:25\nmode = implicit\ncert = @C@\nkey = @K@\n"));
    /* upstream client certificate: both or neither, and readable */
    cfg = parse("[upstream]\naddress = h:25\nca_file = @C@\ncert = @C@\nkey = @K@\n"
                "[listener a]\nlisten = 127.0.0.1:25\nmode = implicit\ncert = @C@\nkey = @K@\n");
    CHECK(cfg && cfg->upstreams[0].cert && strcmp(cfg->upstreams[0].key, g_key) == 0);
    config_free(cfg);
    CHECK(rejects(1, "'cert' and 'key' must be set together", UPSTREAM, "cert = @C@"));
    CHECK(rejects(1, "'cert' and 'key' must be set together", UPSTREAM, "key = @K@"));
    CHECK(rejects(4, "key 'cert': cannot read",
                  "[upstream]\naddress = h:25\nca_file = @C@\ncert = @D@/x\nkey = @K@\n"
                  "[listener a]\nlisten = 127.0.0.1:25\nmode = implicit\ncert = @C@\nkey = @K@\n"));

    /* a syntax error line */
    CHECK(rejects(9, "syntax error", BASE "this is not a key\n"));
    CHECK(rejects(9, "syntax error", BASE "[listener b\n"));
}

static void test_upstreams(void)
{
    struct config *cfg;

    /* listener -> missing named upstream */
    CHECK(rejects(9, "key 'upstream': no section [upstream other]", BASE "upstream = other\n"));
    CHECK(rejects(9, "key 'upstream'", BASE "upstream =\n"));

    /* [upstream NAME] + upstream = NAME, with no unnamed upstream */
    cfg = parse("[upstream relay]\naddress = relay.example:465\ntls = implicit\nca_file = @C@\n"
                "[listener a]\nlisten = 127.0.0.1:465\nmode = implicit\ncert = @C@\n"
                "key = @K@\nupstream = relay\n");
    CHECK(cfg != NULL);
    if (cfg != NULL) {
        CHECK(cfg->nupstreams == 1);
        CHECK(strcmp(cfg->upstreams[0].name, "relay") == 0);
        CHECK(cfg->upstreams[0].line == 1);
        CHECK(strcmp(cfg->listeners[0].upstream_name, "relay") == 0);
        CHECK(cfg->listeners[0].upstream == &cfg->upstreams[0]);
    }
    config_free(cfg);

    /* named + unnamed, two listeners each picking one */
    cfg = parse(BASE "[upstream  second]\naddress = [2001:db8::1]:587\nca_file = @C@\n"
                     "[listener b]\nlisten = [::1]:2525\nmode = starttls\ncert = @C@\n"
                     "key = @K@\nupstream = second\n");
    CHECK(cfg != NULL);
    if (cfg != NULL && cfg->nupstreams == 2 && cfg->nlisteners == 2) {
        CHECK(strcmp(cfg->upstreams[1].name, "second") == 0);
        CHECK(cfg->upstreams[1].line == 9);
        CHECK(strcmp(cfg->upstreams[1].addrs[0].host, "2001:db8::1") == 0);
        CHECK(cfg->listeners[0].upstream == &cfg->upstreams[0]);
        CHECK(cfg->listeners[1].upstream == &cfg->upstreams[1]);
    } else {
        CHECK(0);
    }
    config_free(cfg);

    /* no unnamed upstream, and a listener without `upstream =` */
    CHECK(rejects(4, "no unnamed [upstream] section",
                  "[upstream x]\naddress = h:25\nca_file = @C@\n[listener a]\n"
                  "listen = 127.0.0.1:25\nmode = implicit\ncert = @C@\nkey = @K@\n"));
    CHECK(rejects(3, "section defined twice (first at line 1)",
                  "[upstream]\naddress = h:25\n[upstream ]\n" BASE));

    /* bad upstream addresses (reported at the 'address' line) */
    static const char *const bad[] = {"nocolon", ":25",   "h:0",    "h:70000", "::1:25", "[::1]25",
                                      "h:",      "h:25x", "[::1]:", "[]:25",   "h:-1"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        CHECK(rejects(2, "key 'address'",
                      "[upstream]\naddress = %s\nca_file = @C@\n[listener a]\n"
                      "listen = 127.0.0.1:25\nmode = implicit\ncert = @C@\nkey = @K@\n",
                      bad[i]));
}

static void test_listen_and_cidr_keys(void)
{
    struct config *cfg;

    /* repeated list keys append; items are trimmed */
    cfg = parse(BASE "listen = [::1]:25 ,  0.0.0.0:465\nlisten=[::]:587\n"
                     "allow_plaintext_from = 10.0.0.0/8, fd00::/8\n"
                     "allow_plaintext_from = 1.2.3.4\n");
    CHECK(cfg != NULL);
    if (cfg != NULL) {
        struct listener_cfg *li = &cfg->listeners[0];
        CHECK(li->nlisten == 4);
        if (li->nlisten == 4) {
            CHECK(strcmp(li->listen[0], "127.0.0.1:2525") == 0);
            CHECK(strcmp(li->listen[1], "[::1]:25") == 0);
            CHECK(strcmp(li->listen[2], "0.0.0.0:465") == 0);
            CHECK(strcmp(li->listen[3], "[::]:587") == 0);
        }
        CHECK(li->nallow == 3);
        if (li->nallow == 3) {
            CHECK(li->allow[0].family == AF_INET && li->allow[0].bits == 8);
            CHECK(li->allow[0].addr[0] == 10);
            CHECK(li->allow[1].family == AF_INET6 && li->allow[1].bits == 8);
            CHECK(li->allow[1].addr[0] == 0xfd);
            CHECK(li->allow[2].family == AF_INET && li->allow[2].bits == 32);
            CHECK(memcmp(li->allow[2].addr, "\x01\x02\x03\x04", 4) == 0);
        }
    }
    config_free(cfg);

    /* bad listen items (reported at the line) */
    static const char *const bad[] = {"nocolon", ":25",    "h:0",   "h:70000", "::1:25",
                                      "[::1]25", "[::1]:", "[]:25", "h:+25",   "[::1:25"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        CHECK(rejects(9, "key 'listen'", BASE "listen = %s\n", bad[i]));
    CHECK(rejects(9, "'nocolon' is not host:port", BASE "listen = nocolon\n"));
    CHECK(rejects(9, "key 'listen': empty list", BASE "listen = ,\n"));
    CHECK(rejects(9, "key 'listen': empty list", BASE "listen =\n"));
    /* each bad item is reported */
    CHECK(rejects(9, "'x'", BASE "listen = x, 127.0.0.9:25, y\n"));
    CHECK(err_has(9, "'y'"));
    CHECK(n_err_lines() == 2);

    /* same address in two listeners */
    CHECK(rejects(10, "127.0.0.1:2525 is also used by [listener a]",
                  BASE "[listener b]\nlisten = 127.0.0.1:2525\nmode = implicit\ncert = @C@\n"
                       "key = @K@\n"));

    /* allow_plaintext_from */
    CHECK(rejects(7, "key 'allow_plaintext_from': only meaningful on a starttls listener",
                  LISTENER_MODE, "mode = implicit\nallow_plaintext_from = 10.0.0.0/8"));
    CHECK(rejects(9, "allow_plaintext_from",
                  "[upstream]\naddress = h:25\nca_file = @C@\n[listener a]\n"
                  "listen = 127.0.0.1:25\nmode = implicit\ncert = @C@\nkey = @K@\n"
                  "allow_plaintext_from = 10.0.0.0/8\n"));
    static const char *const badnet[] = {"10.1.2.3/8", "10.0.0.0/33", "fd00::1/8",  "fd00::/129",
                                         "garbage",    "10.0.0.0/",   "10.0.0.0/x", "/8",
                                         "10.0.0/8",   "1.2.3.4/-1",  "1.2.3.4/ 8", "10.0.0.0/+8"};
    for (size_t i = 0; i < sizeof(badnet) / sizeof(badnet[0]); i++)
        CHECK(rejects(9, "key 'allow_plaintext_from'", BASE "allow_plaintext_from = %s\n",
                      badnet[i]));
    CHECK(rejects(9, "'10.1.2.3/8' is not a network", BASE "allow_plaintext_from = 10.1.2.3/8\n"));
    CHECK(rejects(9, "empty list", BASE "allow_plaintext_from =\n"));

    /* allow_from: own list (repeatable), any mode; separate from
     * allow_plaintext_from */
    cfg = parse("[upstream]\naddress = h:25\nca_file = @C@\n[listener a]\n"
                "listen = 127.0.0.1:25\nmode = implicit\ncert = @C@\nkey = @K@\n"
                "allow_from = 192.168.10.0/24\nallow_from = fd00::/8, 10.1.2.3\n");
    CHECK(cfg != NULL);
    if (cfg != NULL) {
        struct listener_cfg *li = &cfg->listeners[0];
        CHECK(li->nallow_from == 3 && li->nallow == 0);
        if (li->nallow_from == 3) {
            CHECK(li->allow_from[0].family == AF_INET && li->allow_from[0].bits == 24);
            CHECK(li->allow_from[1].family == AF_INET6 && li->allow_from[1].bits == 8);
            CHECK(li->allow_from[2].bits == 32 && li->allow_from[2].addr[3] == 3);
        }
    }
    config_free(cfg);
    cfg = parse(BASE "allow_from = 10.0.0.0/8\nallow_plaintext_from = 10.1.0.0/16\n");
    CHECK(cfg != NULL && cfg->listeners[0].nallow_from == 1 && cfg->listeners[0].nallow == 1);
    if (cfg != NULL && cfg->listeners[0].nallow == 1)
        CHECK(cfg->listeners[0].allow[0].bits == 16 && cfg->listeners[0].allow_from[0].bits == 8);
    config_free(cfg);
    CHECK(rejects(9, "key 'allow_from': '10.1.2.3/8' is not a network",
                  BASE "allow_from = 10.1.2.3/8\n"));
    CHECK(rejects(9, "key 'allow_from'", BASE "allow_from = garbage\n"));
    CHECK(rejects(9, "key 'allow_from': empty list", BASE "allow_from = , ,\n"));

    /* require_auth: yes by default; no only together with allow_from */
    cfg = parse(BASE "require_auth = no\nallow_from = 192.168.10.0/24\n");
    CHECK(cfg != NULL && cfg->listeners[0].require_auth == 0);
    config_free(cfg);
    cfg = parse(BASE "require_auth = yes\n");
    CHECK(cfg != NULL && cfg->listeners[0].require_auth == 1);
    config_free(cfg);
    CHECK(rejects(9, "key 'require_auth': 'no' needs 'allow_from'", BASE "require_auth = no\n"));
    CHECK(
        rejects(9, "require_auth", BASE "require_auth = off\nallow_plaintext_from = 10.0.0.0/8\n"));
    CHECK(rejects(9, "key 'require_auth': bad value", BASE "require_auth = maybe\n"));
    CHECK(rejects(10, "key 'require_auth': set twice",
                  BASE "require_auth = yes\nrequire_auth = no\n"));
    CHECK(rejects(4, "'require_auth': unknown key", UPSTREAM, "require_auth = no"));
}

static void test_lines_and_errors(void)
{
    char long197[256], long198[256];

    memset(long197, 'x', sizeof(long197));
    long197[0] = ';';
    long197[197] = '\0';
    memset(long198, 'x', sizeof(long198));
    long198[0] = ';';
    long198[198] = '\0';

    /* 197 characters is fine (also as a key line) */
    CHECK(accepts(BASE "%s\n", long197));
    {
        char v[256];
        snprintf(v, sizeof(v), "hostname = %.186s", long197 + 1);
        CHECK(strlen(v) == 197);
        struct config *cfg = parse(GLOBAL, v);
        CHECK(cfg != NULL && strlen(cfg->hostname) == 186);
        config_free(cfg);
    }
    /* 198: too long, reported with its line number; parsing continues, and
     * later errors keep their own line numbers */
    CHECK(rejects(9, "line longer than 197 characters", BASE "%s\nsyslog = yes\nmode = implicit\n",
                  long198));
    CHECK(err_has(10, "'syslog': unknown key"));
    CHECK(err_has(11, "'mode': set twice"));
    CHECK(n_err_lines() == 3);
    /* a too-long key line is dropped whole: its value is not misparsed */
    {
        char v[512];
        snprintf(v, sizeof(v), "hostname = %s", long198);
        CHECK(rejects(2, "line longer", GLOBAL, v));
        CHECK(n_err_lines() == 1);
    }
    /* a very long line */
    {
        char huge[5000];
        memset(huge, 'a', sizeof(huge) - 1);
        huge[sizeof(huge) - 1] = '\0';
        CHECK(rejects(9, "line longer", BASE "%s\nfoo = 1\n", huge));
        CHECK(err_has(10, "'foo': unknown key"));
        CHECK(n_err_lines() == 2);
    }

    /* rsa_backend: the three words, and a clear error for anything else */
    {
        struct config *c = parse("[global]\nrsa_backend = openssl\n" BASE);
        CHECK(c != NULL && c->rsa_backend == RSA_BACKEND_OPENSSL);
        config_free(c);
        c = parse("[global]\nrsa_backend = wolfssl\n" BASE);
        CHECK(c != NULL && c->rsa_backend == RSA_BACKEND_WOLFSSL);
        config_free(c);
    }
    CHECK(rejects(2, "[global] key 'rsa_backend'", "[global]\nrsa_backend = fast\n" BASE));
    CHECK(err_has(2, "expected auto | wolfssl | openssl"));

    /* aes_gcm: auto by default, wolfssl, and nothing else (there is no
     * word that forces VAES: on a CPU without it that would be SIGILL) */
    {
        struct config *c = parse(BASE);
        CHECK(c != NULL && c->aes_gcm == AES_GCM_AUTO);
        config_free(c);
        c = parse("[global]\naes_gcm = wolfssl\n" BASE);
        CHECK(c != NULL && c->aes_gcm == AES_GCM_WOLFSSL);
        config_free(c);
    }
    CHECK(rejects(2, "[global] key 'aes_gcm'", "[global]\naes_gcm = vaes\n" BASE));
    CHECK(err_has(2, "expected auto | wolfssl"));

    /* every error is reported, not just the first */
    CHECK(rejects(2, "'syslog'",
                  "[global]\nsyslog = maybe\nmax_errors = x\nlog_level = loud\n"
                  "bogus = 1\n" BASE "mode = x\nlisten = y\n"));
    CHECK(err_has(3, "'max_errors'"));
    CHECK(err_has(4, "'log_level'"));
    CHECK(err_has(5, "'bogus'"));
    CHECK(err_has(14, "'mode'"));
    CHECK(err_has(15, "'listen'"));
    CHECK(n_err_lines() == 6);

    /* every error from validation too */
    CHECK(rejects(1, "address",
                  "[upstream]\nmin_tls = 1.1\nca_file = @C@\n[listener a]\n"
                  "[listener b]\nlisten = 127.0.0.1:25\nmode = implicit\n"
                  "cert = @C@\nkey = @K@\nmin_tls = 1.0\n"));
    CHECK(err_has(2, "min_tls"));
    CHECK(err_has(4, "'listen'"));
    CHECK(err_has(4, "'mode'"));
    CHECK(err_has(4, "'cert'"));
    CHECK(err_has(4, "'key'"));
    CHECK(n_err_lines() == 6);

    /* two syntax errors: both are problems the parser found (config.h:
     * "reports every problem it finds") */
    CHECK(rejects(9, "syntax error", BASE "oops\nagain\n"));
    CHECK(err_has(10, "syntax error"));

    /* A file saved with a UTF-8 byte order mark: inih skips the BOM, the
     * section must still be recognised. */
    CHECK(accepts("\xEF\xBB\xBF" BASE));
}

/* ------------------------------------------------------------------------ */
/* config_parse_cidr, cidr_match, config_split_hostport                    */
/* ------------------------------------------------------------------------ */

static struct sockaddr_storage sa(const char *ip)
{
    struct sockaddr_storage ss;

    memset(&ss, 0, sizeof(ss));
    if (strchr(ip, ':') != NULL) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
        s6->sin6_family = AF_INET6;
        if (inet_pton(AF_INET6, ip, &s6->sin6_addr) != 1)
            abort();
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
        s4->sin_family = AF_INET;
        if (inet_pton(AF_INET, ip, &s4->sin_addr) != 1)
            abort();
    }
    return ss;
}

static int match(const char *net, const char *ip)
{
    struct cidr c;
    struct sockaddr_storage ss = sa(ip);

    if (config_parse_cidr(net, &c) != 0) {
        fprintf(stderr, "  cannot parse %s\n", net);
        return -1;
    }
    return cidr_match(&c, &ss);
}

static void test_cidr(void)
{
    struct cidr c;

    CHECK(config_parse_cidr("10.0.0.0/8", &c) == 0);
    CHECK(c.family == AF_INET && c.bits == 8 && c.addr[0] == 10 && c.addr[1] == 0);
    CHECK(config_parse_cidr("fd00::/8", &c) == 0);
    CHECK(c.family == AF_INET6 && c.bits == 8 && c.addr[0] == 0xfd);
    CHECK(config_parse_cidr("1.2.3.4", &c) == 0);
    CHECK(c.family == AF_INET && c.bits == 32);
    CHECK(config_parse_cidr("2001:db8::1", &c) == 0);
    CHECK(c.family == AF_INET6 && c.bits == 128);
    CHECK(config_parse_cidr("0.0.0.0/0", &c) == 0 && c.bits == 0);
    CHECK(config_parse_cidr("::/0", &c) == 0 && c.bits == 0);
    CHECK(config_parse_cidr("10.0.0.128/25", &c) == 0 && c.bits == 25);
    CHECK(config_parse_cidr("1.2.3.4/32", &c) == 0 && c.bits == 32);
    CHECK(config_parse_cidr("::ffff:10.0.0.0/104", &c) == 0 && c.family == AF_INET6);

    CHECK(config_parse_cidr("10.1.2.3/8", &c) == -1);
    CHECK(config_parse_cidr("10.0.0.128/24", &c) == -1);
    CHECK(config_parse_cidr("1.2.3.4/33", &c) == -1);
    CHECK(config_parse_cidr("fd00::/129", &c) == -1);
    CHECK(config_parse_cidr("fd00::1/127", &c) == -1);
    CHECK(config_parse_cidr("garbage", &c) == -1);
    CHECK(config_parse_cidr("", &c) == -1);
    CHECK(config_parse_cidr("/8", &c) == -1);
    CHECK(config_parse_cidr("10.0.0.0/", &c) == -1);
    CHECK(config_parse_cidr("10.0.0.0/8/8", &c) == -1);
    CHECK(config_parse_cidr("10.0.0.0/-0", &c) == -1);
    CHECK(config_parse_cidr("10.0.0.0/4294967304", &c) == -1);
    CHECK(config_parse_cidr("[::1]", &c) == -1);
    CHECK(config_parse_cidr(
              "0000:0000:0000:0000:0000:0000:0000:0000:0000:0000:0000:0000:0000:0000/8", &c) == -1);

    /* IPv4 */
    CHECK(match("10.0.0.0/8", "10.1.2.3") == 1);
    CHECK(match("10.0.0.0/8", "10.255.255.255") == 1);
    CHECK(match("10.0.0.0/8", "11.0.0.1") == 0);
    CHECK(match("10.0.0.0/8", "9.255.255.255") == 0);
    CHECK(match("192.168.10.0/24", "192.168.10.200") == 1);
    CHECK(match("192.168.10.0/24", "192.168.11.1") == 0);
    CHECK(match("10.0.0.128/25", "10.0.0.200") == 1);
    CHECK(match("10.0.0.128/25", "10.0.0.127") == 0);
    CHECK(match("172.16.0.0/12", "172.31.255.1") == 1);
    CHECK(match("172.16.0.0/12", "172.32.0.1") == 0);
    CHECK(match("1.2.3.4", "1.2.3.4") == 1);
    CHECK(match("1.2.3.4", "1.2.3.5") == 0);
    CHECK(match("0.0.0.0/0", "203.0.113.9") == 1);
    /* IPv6 */
    CHECK(match("fd00::/8", "fd12:3456::1") == 1);
    CHECK(match("fd00::/8", "fe80::1") == 0);
    CHECK(match("2001:db8::/33", "2001:db8:7fff::1") == 1);
    CHECK(match("2001:db8::/33", "2001:db8:8000::1") == 0);
    CHECK(match("::1", "::1") == 1);
    CHECK(match("::1", "::2") == 0);
    CHECK(match("::/0", "2001:db8::1") == 1);
    /* family mismatch */
    CHECK(match("fd00::/8", "10.0.0.1") == 0);
    CHECK(match("10.0.0.0/8", "fd00::1") == 0);
    CHECK(match("0.0.0.0/0", "2001:db8::1") == 0);
    /* v4-mapped v6 peer against v4 networks */
    CHECK(match("10.0.0.0/8", "::ffff:10.1.2.3") == 1);
    CHECK(match("10.0.0.0/8", "::ffff:11.1.2.3") == 0);
    CHECK(match("1.2.3.4", "::ffff:1.2.3.4") == 1);
    CHECK(match("0.0.0.0/0", "::ffff:8.8.8.8") == 1);
    CHECK(match("10.0.0.0/8", "::10.1.2.3") == 0);       /* v4-compatible: not mapped */
    CHECK(match("10.0.0.0/8", "64:ff9b::a01:203") == 0); /* NAT64: not mapped */
    /* an unknown address family never matches */
    {
        struct sockaddr_storage ss;
        memset(&ss, 0, sizeof(ss));
        ss.ss_family = AF_UNIX;
        CHECK(config_parse_cidr("0.0.0.0/0", &c) == 0);
        CHECK(cidr_match(&c, &ss) == 0);
        CHECK(config_parse_cidr("::/0", &c) == 0);
        CHECK(cidr_match(&c, &ss) == 0);
    }
}

static int split_is(const char *s, const char *host, const char *port)
{
    char *h = NULL, *p = NULL;
    int ok;

    if (config_split_hostport(s, &h, &p) != 0)
        return 0;
    ok = h && p && strcmp(h, host) == 0 && strcmp(p, port) == 0;
    if (!ok)
        fprintf(stderr, "  split %s -> '%s' '%s'\n", s, h ? h : "(null)", p ? p : "(null)");
    free(h);
    free(p);
    return ok;
}

static int split_fails(const char *s)
{
    char *sentinel = (char *)"unchanged";
    char *h = sentinel, *p = sentinel;
    int rc = config_split_hostport(s, &h, &p);

    if (rc == 0) {
        free(h);
        free(p);
        return 0;
    }
    return rc == -1 && h == sentinel && p == sentinel;
}

static void test_split_hostport(void)
{
    CHECK(split_is("h:25", "h", "25"));
    CHECK(split_is("mail.example.com:587", "mail.example.com", "587"));
    CHECK(split_is("127.0.0.1:1", "127.0.0.1", "1"));
    CHECK(split_is("0.0.0.0:65535", "0.0.0.0", "65535"));
    CHECK(split_is("[::1]:25", "::1", "25"));
    CHECK(split_is("[::]:465", "::", "465"));
    CHECK(split_is("[fe80::1%eth0]:25", "fe80::1%eth0", "25"));

    CHECK(split_fails(""));
    CHECK(split_fails("nocolon"));
    CHECK(split_fails(":25"));
    CHECK(split_fails("h:"));
    CHECK(split_fails("h:0"));
    CHECK(split_fails("h:65536"));
    CHECK(split_fails("h:70000"));
    CHECK(split_fails("h:99999999999999999999999"));
    CHECK(split_fails("h:25x"));
    CHECK(split_fails("h:-1"));
    CHECK(split_fails("h:+25"));
    CHECK(split_fails("h: 25"));
    CHECK(split_fails("::1:25"));
    CHECK(split_fails("[::1]25"));
    CHECK(split_fails("[::1]:"));
    CHECK(split_fails("[::1:25"));
    CHECK(split_fails("[]:25"));
    CHECK(split_fails("[::1]:0"));
    CHECK(split_fails("[::1]:25:26"));
}

/* ------------------------------------------------------------------------ */
/* inputs found by fuzzing (tests/fuzz/fuzz_config.c)                      */
/* ------------------------------------------------------------------------ */

static void test_fuzz_regressions(void)
{
    /* No crash found yet (two 60 s runs, ~1.1M execs each). Add each crashing input here.
     * Meanwhile: config_dump() on an accepted config must not crash. */
    struct config *cfg = parse(BASE "allow_plaintext_from = 10.0.0.0/8, fd00::/8\n"
                                    "allow_from = ::/0, 0.0.0.0/0\nrequire_auth = no\n");
    FILE *devnull = fopen("/dev/null", "w");

    CHECK(cfg != NULL && devnull != NULL);
    if (cfg != NULL && devnull != NULL)
        config_dump(cfg, devnull);
    if (devnull)
        fclose(devnull);
    config_free(cfg);
}

int main(void)
{
    char tmpl[] = "/tmp/test_config.XXXXXX";

    if (mkdtemp(tmpl) == NULL) {
        perror("mkdtemp");
        return 2;
    }
    snprintf(g_dir, sizeof(g_dir), "%s", tmpl);
    snprintf(g_cert, sizeof(g_cert), "%s/cert.pem", g_dir);
    snprintf(g_key, sizeof(g_key), "%s/key.pem", g_dir);
    write_file(g_cert, "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n");
    write_file(g_key, "-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n");

    test_defaults();
    test_example_file();
    test_durations();
    test_sizes_and_numbers();
    test_booleans();
    test_enums();
    test_structure();
    test_upstreams();
    test_listen_and_cidr_keys();
    test_lines_and_errors();
    test_cidr();
    test_split_hostport();
    test_fuzz_regressions();

    unlink(g_cert);
    unlink(g_key);
    rmdir(g_dir);

    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed == 0 ? 0 : 1;
}
