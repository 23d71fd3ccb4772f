#!/usr/bin/env bash
# `make run`: the proxy on the example configuration, in front of a local demo
# upstream (a real STARTTLS + AUTH submission server from the test tooling,
# with a generated CA), or in front of $UPSTREAM (host:port, verified against
# the system CA store). Everything it writes is under build/run/.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
run="$top/build/run"
SMTPS_PORT=${SMTPS_PORT:-465}
STARTTLS_PORT=${STARTTLS_PORT:-2525}
DEMO_UPSTREAM_PORT=${DEMO_UPSTREAM_PORT:-10587}
mkdir -p "$run/mail"
bash "$top/tests/tools/mkcerts.sh" "$run/certs" >/dev/null

up_pid=""
cleanup() { [ -n "$up_pid" ] && kill "$up_pid" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if [ -n "${UPSTREAM:-}" ]; then
    address="$UPSTREAM"
    ca_file="/etc/ssl/certs/ca-certificates.crt"
else
    address="127.0.0.1:$DEMO_UPSTREAM_PORT"
    ca_file="$run/certs/ca.pem"
    /usr/bin/python3 "$top/tests/tools/upstream.py" --listen "$address" \
        --cert "$run/certs/upstream.pem" --key "$run/certs/upstream.key" \
        --users demo:demo --maildir "$run/mail" >"$run/upstream.out" 2>"$run/upstream.log" &
    up_pid=$!
    for _ in $(seq 100); do
        grep -q READY "$run/upstream.out" 2>/dev/null && break
        kill -0 "$up_pid" 2>/dev/null || { cat "$run/upstream.log" >&2; exit 1; }
        sleep 0.1
    done
    grep -q READY "$run/upstream.out" || { echo "demo upstream did not start" >&2; exit 1; }
fi

# The example configuration, with this machine's paths and ports.
sed -e "s|^address = .*|address = $address|" \
    -e "s|^user = smtpbridge|user = nobody|" \
    -e "s|^ca_file = .*|ca_file = $ca_file|" \
    -e "s|/etc/smtpbridge/fullchain.pem|$run/certs/proxy.pem|" \
    -e "s|/etc/smtpbridge/privkey.pem|$run/certs/proxy.key|" \
    -e "s|^listen = 0.0.0.0:465, \[::\]:465|listen = 127.0.0.1:$SMTPS_PORT|" \
    -e "s|^listen = 0.0.0.0:2525, \[::\]:2525|listen = 127.0.0.1:$STARTTLS_PORT|" \
    "$top/config/smtpbridge.conf" >"$run/smtpbridge.conf"
bin="${SMTPBRIDGE_BIN:-$top/build/smtpbridge}"
"$bin" -t -c "$run/smtpbridge.conf" >/dev/null

user=demo pass=demo
where="Messages the demo upstream accepts are stored in $run/mail/"
if [ -n "${UPSTREAM:-}" ]; then user="YOUR-USER" pass="YOUR-PASSWORD" where=""; fi
cat <<MSG

smtpbridge demo: implicit TLS on 127.0.0.1:$SMTPS_PORT, STARTTLS on 127.0.0.1:$STARTTLS_PORT
upstream: $address${UPSTREAM:+ (certificate verified against the system CA store)}
configuration: $run/smtpbridge.conf

Send a test mail (in another terminal):
  swaks --server 127.0.0.1:$SMTPS_PORT --tls-on-connect --auth PLAIN \\
        --auth-user $user --auth-password $pass --from $user@example.com --to someone@example.com
  swaks --server 127.0.0.1:$STARTTLS_PORT --tls --auth PLAIN \\
        --auth-user $user --auth-password $pass --from $user@example.com --to someone@example.com
$where
Stop with Ctrl-C.

MSG
"$bin" -c "$run/smtpbridge.conf" &
px=$!
wait "$px"
