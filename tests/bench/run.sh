#!/usr/bin/env bash
# tests/bench/run.sh - `make bench`: smtpbridge side by side with a stunnel
# chain and hitch -> stunnel, same load, same sink, same certificates.
#
# Targets (every one ends at the same sink, tests/bench/sink.c):
#   a  direct   loadgen --implicit TLS--> sink (no proxy)
#   b  bridge   loadgen --implicit TLS--> smtpbridge --STARTTLS, verified--> sink
#   c  stunnel  loadgen --implicit TLS--> stunnel server service --plain-->
#               stunnel client service (protocol = smtp, verified) --> sink
#   d  hitch    loadgen --implicit TLS--> hitch --plain--> stunnel client
#               service (protocol = smtp, verified) --> sink
# Scenarios: new-ec / new-rsa (one 1 KB message per connection, ECDSA P-256 or
# RSA-2048 certificates everywhere), reuse (100 x 1 KB per connection), 1mb
# (1 MiB messages), latency (one connection, messages one after another), idle
# (N sessions held with TLS up on both legs).
#
# Measured per run: the CPU (utime+stime from /proc/PID/stat) of every process
# of the proxy under test, before/after the load; for idle, the PSS (and RSS)
# from /proc/PID/smaps_rollup before/with the sessions. Each figure is the
# median of BENCH_REPS runs. Output: build/bench/raw.txt (every run),
# build/bench/results.txt (the table), printed at the end.
#
# Environment: BENCH_QUICK=1 (smoke run, ~2 min), BENCH_REPS (default 3, 1
# when quick), BENCH_NEW, BENCH_NEW_RSA, BENCH_REUSE_CONNS, BENCH_MB_CONNS,
# BENCH_LAT_MSGS, BENCH_IDLE (sessions), BENCH_MAXT (seconds per load run),
# BENCH_PORT_BASE (default 21000), BENCH_TARGETS (default "a b c d"),
# BENCH_SCENARIOS (default "new-ec new-rsa reuse 1mb latency idle idle-big"),
# BENCH_IDLE_BIG (idle-big: smtpbridge alone with 2 workers, default 15000
# sessions; one process may hold 20,000 descriptors here, 2 per session).
# For experiments: BENCH_SB_BIN (the smtpbridge binary, default
# build/smtpbridge), BENCH_SB_GLOBAL (lines added to its [global] section).
set -euo pipefail

top=$(cd "$(dirname "$0")/../.." && pwd)
B=$top/build/bench
C=$B/certs
mkdir -p "$B"
cd "$top"

QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then
    REPS=${BENCH_REPS:-1}
    N_NEW=${BENCH_NEW:-400} N_NEW_RSA=${BENCH_NEW_RSA:-200} N_REUSE=${BENCH_REUSE_CONNS:-20}
    N_MB=${BENCH_MB_CONNS:-4} N_LAT=${BENCH_LAT_MSGS:-500} N_IDLE=${BENCH_IDLE:-1000}
    N_IDLE_BIG=${BENCH_IDLE_BIG:-2000}
else
    REPS=${BENCH_REPS:-3}
    N_NEW=${BENCH_NEW:-2000} N_NEW_RSA=${BENCH_NEW_RSA:-1000} N_REUSE=${BENCH_REUSE_CONNS:-100}
    N_MB=${BENCH_MB_CONNS:-40} N_LAT=${BENCH_LAT_MSGS:-3000} N_IDLE=${BENCH_IDLE:-10000}
    N_IDLE_BIG=${BENCH_IDLE_BIG:-15000}
fi
MAXT=${BENCH_MAXT:-120}
PB=${BENCH_PORT_BASE:-21000}
TARGETS=${BENCH_TARGETS:-"a b c d"}
SCENARIOS=${BENCH_SCENARIOS:-"new-ec new-rsa reuse 1mb latency idle idle-big"}
HZ=$(getconf CLK_TCK)

log() { echo "bench: $*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }

# ---- file descriptors: every process here inherits the hard limit ----
ulimit -n "$(ulimit -Hn)"
fdmax=$(ulimit -n)
# The proxy holds two sockets per session (client and upstream), so the idle
# scenario is capped by the descriptor limit (raising the hard limit needs
# CAP_SYS_RESOURCE).
idle_cap=$(((fdmax - 600) / 2))
if [ "$N_IDLE" -gt "$idle_cap" ]; then
    log "idle sessions capped at $idle_cap (ulimit -Hn = $fdmax; 2 fds per proxied session)"
    N_IDLE=$idle_cap
fi

# ---- packages ----
missing=""
command -v stunnel4 >/dev/null || missing="$missing stunnel4"
command -v hitch >/dev/null || [ -x /usr/sbin/hitch ] || missing="$missing hitch"
if [ -n "$missing" ]; then
    [ "$(id -u)" = 0 ] || die "missing:$missing (apt-get install$missing)"
    log "installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends $missing >"$B/apt.log" 2>&1 ||
        { apt-get update -qq >>"$B/apt.log" 2>&1 || true
          apt-get install -y -qq --no-install-recommends $missing >>"$B/apt.log" 2>&1; } ||
        die "cannot install$missing (see $B/apt.log)"
fi
HITCH=$(command -v hitch || echo /usr/sbin/hitch)
HITCH_USER=_hitch
getent passwd "$HITCH_USER" >/dev/null || HITCH_USER=nobody

# ---- tools ----
WOLF=$top/build/wolfssl
for t in loadgen sink; do
    if [ ! -x "$B/$t" ] || [ "tests/bench/$t.c" -nt "$B/$t" ] || [ "$WOLF/lib/libwolfssl.a" -nt "$B/$t" ]; then
        log "building $t"
        ${CC:-cc} -std=c17 -O2 -g -Wall -Wextra -Werror -D_GNU_SOURCE -I"$WOLF/include" \
            "tests/bench/$t.c" -o "$B/$t" "$WOLF/lib/libwolfssl.a" -lev -lm -lpthread
    fi
done
[ -x build/smtpbridge ] || die "build/smtpbridge missing (run make)"

# ---- certificates: ECDSA P-256 (proxy, upstream) and RSA-2048 (rsa-proxy) ----
bash tests/tools/mkcerts.sh "$C" >/dev/null
for v in ec rsa; do
    if [ $v = ec ]; then crt=$C/proxy.pem key=$C/proxy.key; else crt=$C/rsa-proxy.pem key=$C/rsa-proxy.key; fi
    cat "$crt" "$key" >"$B/hitch-$v.pem"
    chmod 644 "$B/hitch-$v.pem"
done
# The sink: ECDSA "upstream" certificate, or the RSA one for the RSA variant.
front_cert() { if [ "$1" = ec ]; then echo "$C/proxy.pem $C/proxy.key"; else echo "$C/rsa-proxy.pem $C/rsa-proxy.key"; fi; }
sink_cert() { if [ "$1" = ec ]; then echo "$C/upstream.pem $C/upstream.key"; else echo "$C/rsa-proxy.pem $C/rsa-proxy.key"; fi; }

# ---- ports ----
# variant offset: ec +0, rsa +100
P_SINK=0 P_SINK_IMPL=1 P_BRIDGE=2 P_STUNNEL=3 P_STUNNEL2=4 P_HITCH=5 P_HITCH2=6
port() { local off=0; [ "$2" = rsa ] && off=100; echo $((PB + off + $1)); }
for v in ec rsa; do
    for p in 0 1 2 3 4 5 6; do
        pp=$(port $p $v)
        [ -z "$(ss -Hltn "sport = :$pp")" ] || die "port $pp busy (set BENCH_PORT_BASE)"
    done
done

wait_port() {  # wait_port PORT PID
    for _ in $(seq 100); do
        [ -n "$(ss -Hltn "sport = :$1")" ] && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

# ---- process bookkeeping (only processes started here are ever signalled) ----
SINK_PIDS=()
TPIDS=()  # main pids of the target under test
cleanup() {
    local p
    for p in "${TPIDS[@]}" "${SINK_PIDS[@]}" ${LG_PID:-}; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

descendants() {  # pids and all their descendants
    local p
    for p in "$@"; do
        echo "$p"
        descendants $(pgrep -P "$p" || true)
    done
}
cpu_ticks() {
    local t=0 p line
    for p in "$@"; do
        read -r line <"/proc/$p/stat" || continue
        local a=(${line##*) })
        t=$((t + a[11] + a[12]))
    done
    echo $t
}
mem_kb() {  # "PSS RSS" in KB, summed
    local p
    for p in "$@"; do cat "/proc/$p/smaps_rollup" 2>/dev/null; done |
        awk '/^Pss:/{p+=$2} /^Rss:/{r+=$2} END{printf "%d %d\n", p, r}'
}

start_sinks() {
    local v cert
    for v in ec rsa; do
        cert=($(sink_cert $v))
        "$B/sink" -p "$(port $P_SINK $v)" -i "$(port $P_SINK_IMPL $v)" -c "${cert[0]}" -k "${cert[1]}" \
            -T 3600 >"$B/sink-$v.out" 2>"$B/sink-$v.log" &
        SINK_PIDS+=($!)
        wait_port "$(port $P_SINK $v)" $! || die "sink did not start (see $B/sink-$v.log)"
    done
}

# start_target T VARIANT: sets TPIDS and TPORT
start_target() {
    local t=$1 v=$2 fc
    fc=($(front_cert $v))
    TPIDS=()
    case $t in
    a)
        TPORT=$(port $P_SINK_IMPL $v)
        return 0
        ;;
    b)
        TPORT=$(port $P_BRIDGE $v)
        cat >"$B/smtpbridge-$v.conf" <<EOF
; generated by tests/bench/run.sh
[global]
hostname = bench.local
user = nobody
log_level = warning
max_sessions = 20000
max_sessions_per_ip = 0
${BENCH_SB_GLOBAL:-}

[upstream]
address = 127.0.0.1:$(port $P_SINK $v)
tls = starttls
server_name = localhost
ca_file = $C/ca.pem
verify = yes

[listener bench]
listen = 127.0.0.1:$TPORT
mode = implicit
cert = ${fc[0]}
key = ${fc[1]}
EOF
        "${BENCH_SB_BIN:-build/smtpbridge}" -c "$B/smtpbridge-$v.conf" >>"$B/smtpbridge.log" 2>&1 &
        TPIDS=($!)
        ;;
    c)
        TPORT=$(port $P_STUNNEL $v)
        # Two stunnel processes, one per service, as such chains are usually
        # deployed (one process would need 4 descriptors per session).
        cat >"$B/stunnel-in-$v.conf" <<EOF
; generated by tests/bench/run.sh: stunnel chain, server service
foreground = yes
pid =
debug = warning
output = $B/stunnel-chain.log
[smtps-in]
accept = 127.0.0.1:$TPORT
connect = 127.0.0.1:$(port $P_STUNNEL2 $v)
cert = ${fc[0]}
key = ${fc[1]}
EOF
        cat >"$B/stunnel-out-$v.conf" <<EOF
; generated by tests/bench/run.sh: stunnel chain, client service (verifies the sink)
foreground = yes
pid =
debug = warning
output = $B/stunnel-chain.log
[smtp-out]
client = yes
accept = 127.0.0.1:$(port $P_STUNNEL2 $v)
connect = 127.0.0.1:$(port $P_SINK $v)
protocol = smtp
verifyChain = yes
CAfile = $C/ca.pem
checkHost = localhost
sni = localhost
EOF
        stunnel4 "$B/stunnel-out-$v.conf" >>"$B/stunnel-chain.out" 2>&1 &
        TPIDS=($!)
        wait_port "$(port $P_STUNNEL2 $v)" "${TPIDS[0]}" || die "stunnel (client service) did not start"
        stunnel4 "$B/stunnel-in-$v.conf" >>"$B/stunnel-chain.out" 2>&1 &
        TPIDS+=($!)
        ;;
    d)
        TPORT=$(port $P_HITCH $v)
        cat >"$B/stunnel-client-$v.conf" <<EOF
; generated by tests/bench/run.sh: stunnel client service behind hitch
foreground = yes
pid =
debug = warning
output = $B/stunnel-client.log
[smtp-out]
client = yes
accept = 127.0.0.1:$(port $P_HITCH2 $v)
connect = 127.0.0.1:$(port $P_SINK $v)
protocol = smtp
verifyChain = yes
CAfile = $C/ca.pem
checkHost = localhost
sni = localhost
EOF
        cat >"$B/hitch-$v.conf" <<EOF
# generated by tests/bench/run.sh
frontend = "[127.0.0.1]:$TPORT"
backend = "[127.0.0.1]:$(port $P_HITCH2 $v)"
pem-file = "$B/hitch-$v.pem"
workers = 1
daemon = off
quiet = on
syslog = off
user = "$HITCH_USER"
tls-protos = TLSv1.2 TLSv1.3
EOF
        stunnel4 "$B/stunnel-client-$v.conf" >>"$B/stunnel-client.out" 2>&1 &
        TPIDS=($!)
        wait_port "$(port $P_HITCH2 $v)" "${TPIDS[0]}" || die "stunnel (client) did not start"
        "$HITCH" --config="$B/hitch-$v.conf" >>"$B/hitch.log" 2>&1 &
        TPIDS+=($!)
        ;;
    esac
    wait_port "$TPORT" "${TPIDS[-1]}" || die "target $t did not start (see $B/*.log)"
    sleep 0.2 # hitch forks its worker after binding
}

stop_target() {
    local p
    for p in "${TPIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${TPIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    TPIDS=()
}

loadgen() {  # loadgen PORT ARGS...
    local port=$1
    shift
    "$B/loadgen" -t "127.0.0.1:$port" -a "$C/ca.pem" -S localhost -T "$MAXT" "$@"
}

RAW=$B/raw.txt
: >"$RAW"

# run_load SCENARIO TARGET VARIANT REP ARGS...
run_load() {
    local sc=$1 t=$2 v=$3 rep=$4
    shift 4
    start_target "$t" "$v"
    loadgen "$TPORT" -c 5 -k 20 -n 1 >/dev/null 2>>"$B/loadgen.log" || true # warm-up
    local pids=() c0=0 c1=0 res rc=0
    if [ ${#TPIDS[@]} -gt 0 ]; then pids=($(descendants "${TPIDS[@]}")); c0=$(cpu_ticks "${pids[@]}"); fi
    res=$(loadgen "$TPORT" "$@" 2>>"$B/loadgen.log") || rc=$?
    if [ ${#TPIDS[@]} -gt 0 ]; then c1=$(cpu_ticks "${pids[@]}"); fi
    local cpu_ms=NA
    [ ${#TPIDS[@]} -gt 0 ] && cpu_ms=$(((c1 - c0) * 1000 / HZ))
    echo "scenario=$sc target=$t rep=$rep rc=$rc cpu_ms=$cpu_ms ${res#RESULT }" >>"$RAW"
    log "$sc/$t#$rep: rc=$rc cpu_ms=$cpu_ms $(echo "${res#RESULT }" | cut -d' ' -f1-7)"
    stop_target
}

run_idle() {  # run_idle TARGET VARIANT REP [SCENARIO N EXTRA_GLOBAL]
    local t=$1 v=$2 rep=$3 sc=${4:-idle} n=${5:-$N_IDLE}
    BENCH_SB_GLOBAL="${BENCH_SB_GLOBAL:-}${6:+
$6}" start_target "$t" "$v"
    loadgen "$TPORT" -c 5 -k 20 -n 1 >/dev/null 2>>"$B/loadgen.log" || true # warm-up
    sleep 0.5
    local pids=() m0 m1 out=$B/idle.out rc=0
    pids=($(descendants "${TPIDS[@]}"))
    m0=($(mem_kb "${pids[@]}"))
    local c0
    c0=$(cpu_ticks "${pids[@]}")
    : >"$out"
    "$B/loadgen" -t "127.0.0.1:$TPORT" -a "$C/ca.pem" -S localhost -T "$MAXT" -I "$n" -P 64 \
        >"$out" 2>>"$B/loadgen.log" &
    LG_PID=$!
    local deadline=$((SECONDS + MAXT + 5))
    while ! grep -q '^READY' "$out" && kill -0 "$LG_PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do
        sleep 0.2
    done
    sleep 1
    pids=($(descendants "${TPIDS[@]}"))
    m1=($(mem_kb "${pids[@]}"))
    local c1
    c1=$(cpu_ticks "${pids[@]}")
    kill -USR1 "$LG_PID" 2>/dev/null || true
    wait "$LG_PID" || rc=$?
    LG_PID=
    local held
    held=$(sed -n 's/^READY //p' "$out")
    held=${held:-0}
    local pss=NA rss=NA
    if [ "$held" -gt 0 ]; then
        pss=$(awk -v a="${m0[0]}" -v b="${m1[0]}" -v n="$held" 'BEGIN{printf "%.2f", (b-a)/n}')
        rss=$(awk -v a="${m0[1]}" -v b="${m1[1]}" -v n="$held" 'BEGIN{printf "%.2f", (b-a)/n}')
    fi
    local res
    res=$(grep '^RESULT' "$out" || echo "RESULT")
    echo "scenario=$sc target=$t rep=$rep rc=$rc cpu_ms=$(((c1 - c0) * 1000 / HZ)) held=$held pss_kb=$pss rss_kb=$rss pss0=${m0[0]} pss1=${m1[0]} ${res#RESULT }" >>"$RAW"
    log "$sc/$t#$rep: held=$held pss/session=${pss} KB rss/session=${rss} KB (before ${m0[0]} KB, with ${m1[0]} KB)"
    stop_target
}

start_sinks
log "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
log "reps=$REPS new=$N_NEW new-rsa=$N_NEW_RSA reuse=${N_REUSE}x100 1mb=${N_MB}x10 latency=$N_LAT idle=$N_IDLE"
t_start=$SECONDS
for sc in $SCENARIOS; do
    for rep in $(seq "$REPS"); do
        for t in $TARGETS; do
            case $sc in
            new-ec) run_load "$sc" "$t" ec "$rep" -c 20 -k "$N_NEW" -n 1 -s 1024 ;;
            new-rsa) run_load "$sc" "$t" rsa "$rep" -c 20 -k "$N_NEW_RSA" -n 1 -s 1024 ;;
            reuse) run_load "$sc" "$t" ec "$rep" -c 10 -k "$N_REUSE" -n 100 -s 1024 ;;
            1mb) run_load "$sc" "$t" ec "$rep" -c 4 -k "$N_MB" -n 10 -s 1048576 ;;
            latency) run_load "$sc" "$t" ec "$rep" -c 1 -k 1 -n "$N_LAT" -s 1024 ;;
            idle) [ "$t" = a ] || run_idle "$t" ec "$rep" ;;
            idle-big) [ "$t" != b ] || run_idle "$t" ec "$rep" idle-big "$N_IDLE_BIG" "workers = 2" ;;
            esac
        done
    done
done
log "load runs took $((SECONDS - t_start)) s"

/usr/bin/python3 tests/bench/report.py "$RAW" \
    --machine "$(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')" \
    --params "reps=$REPS new=$N_NEW new-rsa=$N_NEW_RSA reuse=${N_REUSE}x100x1KB 1mb=${N_MB}x10x1MiB latency=1x${N_LAT} idle=$N_IDLE idle-big=$N_IDLE_BIG" \
    >"$B/results.txt"
cat "$B/results.txt"
