#!/usr/bin/env bash
# run.sh SECONDS - build every tests/fuzz/fuzz_*.c target into build/fuzz/
# and run each for SECONDS on a temporary copy of its seed corpus
# (tests/fuzz/corpus/<target>/), so runs never grow the committed corpus.
# Exits non-zero if a build fails or any target finds a crash; crashing
# inputs are kept in build/fuzz/artifacts/<target>/.
#
# Adding a target: create tests/fuzz/fuzz_NAME.c and one line below.
set -u

# Extra source files each target links (paths relative to the repo root).
declare -A EXTRA_SRCS=(
    [fuzz_command]="proxy/smtp.c"
    [fuzz_reply]="proxy/smtp.c"
    [fuzz_ehlo]="proxy/smtp.c"
    [fuzz_config]="proxy/config.c proxy/log.c"
    [fuzz_proxy]="proxy/proxyproto.c"
    [fuzz_hello]="-Ibuild/wolfssl/include -DSMTPBRIDGE_OWN_WOLFSSL=1 proxy/tls.c proxy/cryptodev.c proxy/gcm_vaes.c proxy/rsa_backend.c proxy/metrics.c proxy/log.c"
    [fuzz_gcm]="-Ibuild/wolfssl/include proxy/gcm_vaes.c"
)
# Optional extra libraries per target (linked after the sources).
declare -A EXTRA_LIBS=(
    [fuzz_config]="-linih"
    [fuzz_hello]="build/wolfssl/lib/libwolfssl.a -lcrypto -lm -lpthread"
    [fuzz_gcm]="build/wolfssl/lib/libwolfssl.a -lm -lpthread"
)
# Optional extra libFuzzer flags per target.
declare -A EXTRA_ARGS=(
    [fuzz_command]="-max_len=2048"
    [fuzz_reply]="-max_len=16384"
    [fuzz_ehlo]="-max_len=16384"
    [fuzz_proxy]="-max_len=1024"
    [fuzz_hello]="-max_len=17000"
    [fuzz_gcm]="-max_len=17000"
)

if [ $# -ne 1 ] || ! [[ $1 =~ ^[0-9]+$ ]]; then
    echo "usage: $0 SECONDS" >&2
    exit 2
fi
secs=$1
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root" || exit 2
CC=${CC:-clang}
CFLAGS="-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -Iproxy"
out=build/fuzz
mkdir -p "$out"
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

status=0
summary=()
shopt -s nullglob
targets=(tests/fuzz/fuzz_*.c)
if [ ${#targets[@]} -eq 0 ]; then
    echo "no fuzz targets found" >&2
    exit 2
fi
for src in "${targets[@]}"; do
    name=$(basename "$src" .c)
    if [ -z "${EXTRA_SRCS[$name]+set}" ]; then
        echo "$name: no EXTRA_SRCS entry in $0" >&2
        summary+=("$name: NOT CONFIGURED")
        status=1
        continue
    fi
    echo "== $name: build"
    # shellcheck disable=SC2086  # word splitting of the flag/source lists
    if ! $CC $CFLAGS "$src" ${EXTRA_SRCS[$name]} ${EXTRA_LIBS[$name]-} -o "$out/$name"; then
        summary+=("$name: BUILD FAILED")
        status=1
        continue
    fi
    corpus="$tmp/$name/corpus"
    artifacts="$out/artifacts/$name"
    mkdir -p "$corpus" "$artifacts"
    if [ -d "tests/fuzz/corpus/$name" ]; then
        cp -R "tests/fuzz/corpus/$name/." "$corpus/"
    fi
    log="$out/$name.log"
    echo "== $name: run ${secs}s (log: $log)"
    # shellcheck disable=SC2086
    "$out/$name" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$artifacts/" \
        ${EXTRA_ARGS[$name]-} "$corpus" >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    if [ $rc -ne 0 ]; then
        echo "!! $name: exit $rc; last lines of $log:" >&2
        tail -n 30 "$log" >&2
        summary+=("$name: CRASH (exit $rc, ${execs:-?} execs, artifacts in $artifacts)")
        status=1
    else
        summary+=("$name: ok (${execs:-?} execs)")
    fi
done

echo "== summary"
printf '%s\n' "${summary[@]}"
exit $status
