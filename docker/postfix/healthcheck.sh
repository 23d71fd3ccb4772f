#!/bin/bash
# HEALTHCHECK of the compose stack's Postfix: 587 must greet with 220. With
# PROXY_PROTOCOL=yes it first needs a PROXY header (v1, from loopback).
exec 3<>/dev/tcp/127.0.0.1/587 || exit 1
case "${PROXY_PROTOCOL:-no}" in
yes | true | on | 1) printf 'PROXY TCP4 127.0.0.1 127.0.0.1 40000 587\r\n' >&3 ;;
esac
read -r -t 4 line <&3 || exit 1
printf 'QUIT\r\n' >&3
case "$line" in 220*) exit 0 ;; *) exit 1 ;; esac
