/*
 * proxyproto.h - the PROXY protocol (HAProxy's proxy-protocol.txt, v1 text
 * and v2 binary): parsing a header a trusted load balancer put in front of a
 * client's connection, and building one for the upstream. Pure: no I/O.
 */
#ifndef SMTPBRIDGE_PROXYPROTO_H
#define SMTPBRIDGE_PROXYPROTO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/* Longest header we accept: v1 is at most 107 bytes; v2 is 16 + a length we
 * cap (TLVs included) so that reading it stays bounded. */
#define PP_MAX_HEADER 536

struct pp_result {
    int local;                   /* v2 LOCAL (a health check): no addresses */
    struct sockaddr_storage src; /* the client, as the balancer saw it */
    struct sockaddr_storage dst; /* the address the client connected to */
    int version;                 /* 1 or 2 */
};

/*
 * pp_parse(buf, len, &res, &err): parses the header at the start of buf.
 * Returns the header's length (> 0) with res filled, 0 if more bytes are
 * needed (len is a prefix of a possible header), or -1 with err naming the
 * problem (not a PROXY header, malformed, unsupported family, too long).
 * "UNKNOWN" (v1) and LOCAL / AF_UNSPEC (v2) set res->local.
 */
int pp_parse(const uint8_t *buf, size_t len, struct pp_result *res, const char **err);

/*
 * pp_build(version, src, dst, out, cap): a header saying that src connected
 * to dst (both AF_INET or both AF_INET6; v4-mapped IPv6 addresses are sent
 * as IPv4). Returns its length, or 0 if out is too small or the families are
 * unsupported (then a v1 "UNKNOWN" / v2 LOCAL header is the caller's choice).
 */
size_t pp_build(int version, const struct sockaddr_storage *src, const struct sockaddr_storage *dst,
                uint8_t *out, size_t cap);

/*
 * pp_build_local(version, out, cap): a header that carries no addresses: v1
 * "PROXY UNKNOWN\r\n" or a v2 LOCAL command (what a load balancer's own
 * health check sends; the receiver keeps the connection's real addresses).
 * Returns its length, or 0 if out is too small or version is not 1 or 2.
 */
size_t pp_build_local(int version, uint8_t *out, size_t cap);

#endif
