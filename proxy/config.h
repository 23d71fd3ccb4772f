/*
 * config.h - the INI configuration, parsed with inih into validated structs.
 *
 * config_load() reports every problem it finds on stderr as
 * "FILE:LINE: [section] key 'name': problem" and returns NULL if there was
 * any; a returned config is complete (defaults filled in) and consistent.
 */
#ifndef SMTPBRIDGE_CONFIG_H
#define SMTPBRIDGE_CONFIG_H

#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "log.h"

enum upstream_tls { UPSTREAM_TLS_STARTTLS = 0, UPSTREAM_TLS_IMPLICIT, UPSTREAM_TLS_NONE };
enum listener_mode { LISTENER_IMPLICIT = 0, LISTENER_STARTTLS };
/* Which library computes RSA signatures (rsa_backend.h). */
enum rsa_backend { RSA_BACKEND_AUTO = 0, RSA_BACKEND_WOLFSSL, RSA_BACKEND_OPENSSL };
/* Which code encrypts and decrypts AES-GCM records (cryptodev.h). */
enum aes_gcm { AES_GCM_AUTO = 0, AES_GCM_WOLFSSL };

/* TLS versions as minor numbers: 1.1 -> 11, 1.2 -> 12, 1.3 -> 13. */
#define TLS_V10 10
#define TLS_V11 11
#define TLS_V12 12
#define TLS_V13 13

/* Most keys a section can have (bounds the key_line arrays). */
#define CONFIG_MAX_KEYS 32

struct cidr {
    int family; /* AF_INET or AF_INET6 */
    uint8_t addr[16];
    unsigned bits;
};

/* One entry of an upstream's address list. */
struct upstream_addr {
    char *spec; /* "host:port" as written */
    char *host; /* brackets removed */
    char *port;
    char *server_name; /* the name its certificate must carry (server_name, else host) */
};

/* Most certificate/key pairs one listener may have. */
#define LISTENER_MAX_CERTS 64

/* Most addresses one upstream may list. */
#define UPSTREAM_MAX_ADDRS 16

struct upstream_cfg {
    char *name;                  /* "" for the default [upstream] */
    int line;                    /* line of the section header */
    char *address;               /* as written: one or more "host:port", comma-separated */
    struct upstream_addr *addrs; /* tried in this order (failover) */
    size_t naddrs;
    enum upstream_tls tls;
    char *server_name; /* as set, or NULL: each address's own host */
    char *ca_file;
    int verify;
    char *cert, *key;
    int min_tls;
    double connect_timeout, reply_timeout;
    int proxy_protocol;            /* 0 off, 1 v1, 2 v2: header sent before the greeting */
    int xclient;                   /* send XCLIENT ADDR/PORT after TLS if advertised */
    int key_line[CONFIG_MAX_KEYS]; /* where each key was set (0: default) */
};

struct listener_cfg {
    char *name;
    int line;
    char **listen; /* "host:port" strings as written */
    size_t nlisten;
    enum listener_mode mode;
    char *cert, *key;     /* as written: comma-separated lists */
    char **certs, **keys; /* pairs; the first is the default, the others go by SNI */
    size_t ncerts, nkeys;
    char *ocsp;   /* ocsp_response as written, or NULL */
    char **ocsps; /* one per cert: a DER OCSP response file to staple, or "-" */
    size_t nocsp;
    int min_tls;
    struct cidr *allow; /* allow_plaintext_from */
    size_t nallow;
    struct cidr *allow_from; /* who may connect at all (empty: everyone) */
    size_t nallow_from;
    int require_auth; /* the auth gate: MAIL refused until the upstream said 235 */
    int accept_proxy; /* a PROXY v1/v2 header is required from proxy_from */
    struct cidr *proxy_from;
    size_t nproxy_from;
    char *upstream_name; /* NULL: the default upstream */
    struct upstream_cfg *upstream;
    int key_line[CONFIG_MAX_KEYS];
};

struct config {
    char *path;
    char *hostname;
    char *user, *group;
    char *admin; /* host:port of the metrics/health endpoint, or NULL */
    char *workers_str;
    unsigned workers; /* processes serving; 0 = one per CPU ("auto") */
    int run_as_root;
    enum log_level log_level;
    int log_json; /* log_format = json */
    int syslog;
    unsigned max_sessions, max_sessions_per_ip;
    size_t buffer_size;
    size_t tls_batch_memory; /* record I/O blocks per process (conn.c); 0: off */
    enum rsa_backend rsa_backend;
    enum aes_gcm aes_gcm;
    double handshake_timeout, command_timeout, idle_timeout, drain_timeout;
    unsigned max_errors;
    struct upstream_cfg *upstreams;
    size_t nupstreams;
    struct listener_cfg *listeners;
    size_t nlisteners;
    int key_line[CONFIG_MAX_KEYS];
};

/*
 * config_load(path): reads and validates the file. Certificate and key files
 * are checked to exist and be readable here; whether they parse and match is
 * checked when TLS contexts are built (tls.c). Returns a config to be freed
 * with config_free(), or NULL after printing every error found.
 */
struct config *config_load(const char *path);

/* config_parse_string(text, name): as config_load, from memory (tests, fuzzing). */
struct config *config_parse_string(const char *text, const char *name);

/* The line where a listener's key was set (its section header if unset). */
int config_listener_line(const struct listener_cfg *li, const char *key);

/* Frees everything config_load() allocated. NULL is a no-op. */
void config_free(struct config *cfg);

/* Writes the effective configuration (defaults included) as INI. */
void config_dump(const struct config *cfg, FILE *out);

/*
 * config_parse_cidr(s, &out): "10.0.0.0/8", "fd00::/8" or a bare address
 * (host route). Host bits beyond the prefix must be zero. Returns 0 or -1.
 */
int config_parse_cidr(const char *s, struct cidr *out);

/* cidr_match(c, sa): does the socket address fall inside c? (v4-mapped v6
 * addresses match IPv4 networks.) */
int cidr_match(const struct cidr *c, const struct sockaddr_storage *sa);

/* Does sa fall inside any of the n networks of v? (0 for an empty list.) */
int cidr_list_match(const struct cidr *v, size_t n, const struct sockaddr_storage *sa);

/*
 * config_split_hostport(s, &host, &port): "host:port" or "[v6]:port" into two
 * malloc'd strings. Returns 0, or -1 with nothing allocated.
 */
int config_split_hostport(const char *s, char **host, char **port);

#endif
