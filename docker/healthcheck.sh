#!/bin/bash
# Container HEALTHCHECK. With the admin endpoint (ADMIN_LISTEN, on by default
# at 127.0.0.1:9465 in a generated configuration, or `admin =` in a mounted
# one): GET /healthz must answer 200 (it answers 503 while draining).
# Without it: a TCP connect to the first listen address. Exit 0 healthy.
set -u
run=${SMTPBRIDGE_RUNDIR:-/run/smtpbridge}

split() { # split ADDR -> sets host, port (wildcards probed on loopback)
    port=${1##*:}
    host=${1%:*}
    case "$host" in
    0.0.0.0 | '') host=127.0.0.1 ;;
    '[::]') host=::1 ;;
    \[*\]) host=${host#[}; host=${host%]} ;;
    esac
}

admin=$(head -n1 "$run/admin" 2>/dev/null)
if [ -n "$admin" ]; then
    split "$admin"
    exec 3<>"/dev/tcp/$host/$port" 2>/dev/null || exit 1
    printf 'GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
    read -r -t 5 status <&3 || exit 1
    case "$status" in "HTTP/1."[01]" 200"*) exit 0 ;; *) exit 1 ;; esac
fi
addr=$(head -n1 "$run/listen" 2>/dev/null) || exit 1
[ -n "$addr" ] || exit 1
split "$addr"
exec 3<>"/dev/tcp/$host/$port" 2>/dev/null || exit 1
exit 0
