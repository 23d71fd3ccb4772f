#!/usr/bin/env bash
# tests/docker/test_image.sh -- build the container image and test it from its
# own filesystem (`make test-docker`). No Docker engine is needed:
#
#   1. packages: podman, debootstrap, swaks, aiosmtpd, openssl, libcap2-bin;
#   2. base image `debian:bookworm-slim`: used when present; otherwise imported
#      from a `debootstrap --variant=minbase bookworm` root file system made
#      from this machine's own apt mirror (read from /etc/apt at run time) and
#      cached as build/docker/bookworm-minbase.tar;
#   3. `podman build --isolation chroot --format docker -f docker/Dockerfile .`;
#   4. the image's metadata (user, ports, HEALTHCHECK, entrypoint);
#   5. `podman image mount` + a private overlay + chroot, in a private network
#      and mount namespace (so 465 is free and nothing leaks): user, CA bundle,
#      ldd, file capability; the entrypoint's config generation, `-t`, errors;
#      then the daemon as user smtpbridge (binding 465 needs the file
#      capability) in front of tests/tools/upstream.py run on the host side,
#      and real messages sent with swaks from the host through both listeners.
#
# Env: IMAGE (default smtpbridge:test), KEEP=1 keeps the work directory.
# Prints "N passed, N failed" and exits non-zero on any failure.
set -euo pipefail

top=$(cd "$(dirname "$0")/../.." && pwd)
cache=$top/build/docker
IMAGE=${IMAGE:-smtpbridge:test}
BASE=docker.io/library/debian:bookworm-slim
self=$top/tests/docker/test_image.sh

pass=0 fail=0
ok() { pass=$((pass + 1)); echo "  ok   $*"; }
bad() { fail=$((fail + 1)); echo "  FAIL $*"; }
check() { # check DESCRIPTION command...
    local d=$1; shift
    if "$@" >/dev/null 2>&1; then ok "$d"; else bad "$d"; fi
}
t0=$(date +%s)
elapsed() { echo "$(($(date +%s) - t0))s"; }

# =====================================================================
# Inside: private net + mount namespace. $1=image mount point, $2=work dir
# =====================================================================
if [ "${1:-}" = --inside ]; then
    mnt=$2 work=$3
    d_pid="" up_pid=""
    trap 'for p in $d_pid $up_pid; do kill "$p" 2>/dev/null; done; echo "$pass $fail" >"$work/result"' EXIT
    ip link set lo up
    root=$work/root
    mkdir -p "$root" "$work/upper" "$work/ovl" "$work/mail"
    mount -t overlay overlay -o "lowerdir=$mnt,upperdir=$work/upper,workdir=$work/ovl" "$root"
    mount --rbind /dev "$root/dev"
    mount -t proc proc "$root/proc"
    mount -t tmpfs tmpfs "$root/tmp"

    echo "== image file system"
    check "user smtpbridge exists" grep -q '^smtpbridge:' "$root/etc/passwd"
    uid=$(awk -F: '$1 == "smtpbridge" { print $3 }' "$root/etc/passwd")
    gid=$(awk -F: '$1 == "smtpbridge" { print $4 }' "$root/etc/passwd")
    check "user smtpbridge has the documented uid/gid 465 (${uid:-?}/${gid:-?})" \
        test "${uid:-0}:${gid:-0}" = 465:465
    check "CA bundle present" test -s "$root/etc/ssl/certs/ca-certificates.crt"
    check "CA bundle holds certificates" \
        bash -c "[ \$(grep -c 'BEGIN CERTIFICATE' '$root/etc/ssl/certs/ca-certificates.crt') -gt 100 ]"
    chroot "$root" ldd /usr/local/bin/smtpbridge >"$work/ldd.txt" 2>&1 || true
    if [ -s "$work/ldd.txt" ] && ! grep -q 'not found' "$work/ldd.txt" && grep -q libc.so "$work/ldd.txt"; then
        ok "ldd: every shared library present"
    else
        bad "ldd: $(tr '\n' ' ' <"$work/ldd.txt")"
    fi
    check "wolfSSL linked statically (no libwolfssl.so)" bash -c "! grep -q libwolfssl '$work/ldd.txt'"
    caps=$(getcap "$root/usr/local/bin/smtpbridge" 2>&1 || true)
    case "$caps" in
    *cap_net_bind_service=ep*) ok "file capability: $caps" ;;
    *) bad "file capability cap_net_bind_service=ep missing: '$caps'" ;;
    esac
    check "binary runs in the image (-V)" chroot "$root" /usr/local/bin/smtpbridge -V
    check "/run/smtpbridge owned by smtpbridge" \
        bash -c "[ \$(stat -c %u '$root/run/smtpbridge') = '$uid' ]"
    check "no compiler in the runtime image" bash -c "[ ! -e '$root/usr/bin/gcc' ] && [ ! -e '$root/usr/bin/cc' ]"

    # Certificates as a volume would bring them: keys readable by the group only.
    bash "$top/tests/tools/mkcerts.sh" "$cache/certs" >/dev/null
    install -d -o 0 -g "$gid" -m 0750 "$root/etc/smtpbridge/certs"
    install -o 0 -g "$gid" -m 0644 "$cache/certs/proxy.pem" "$root/etc/smtpbridge/certs/fullchain.pem"
    install -o 0 -g "$gid" -m 0640 "$cache/certs/proxy.key" "$root/etc/smtpbridge/certs/privkey.pem"
    install -o 0 -g "$gid" -m 0644 "$cache/certs/ca.pem" "$root/etc/smtpbridge/certs/upstream-ca.pem"

    # The container's environment: nothing from ours leaks in.
    inimg() { # inimg USER VAR=... -- command...
        local user=$1; shift
        local envs=()
        while [ "$1" != -- ]; do envs+=("$1"); shift; done
        shift
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/nonexistent \
            "${envs[@]}" chroot --userspec="$user" "$root" "$@"
    }
    ENVS=(UPSTREAM=127.0.0.1:10587 UPSTREAM_CA_FILE=/etc/smtpbridge/certs/upstream-ca.pem
        HOSTNAME_SMTP=bridge.test LOG_LEVEL=info)

    echo "== entrypoint: configuration from environment variables"
    inimg smtpbridge:smtpbridge "${ENVS[@]}" ALLOW_FROM=127.0.0.0/8 -- \
        /usr/local/bin/docker-entrypoint.sh config >"$work/gen.conf" 2>"$work/gen.err" || true
    check "generated: upstream address" grep -qx 'address = 127.0.0.1:10587' "$work/gen.conf"
    check "generated: upstream CA file" grep -qx 'ca_file = /etc/smtpbridge/certs/upstream-ca.pem' "$work/gen.conf"
    check "generated: implicit listener on 465" grep -qx 'listen = 0.0.0.0:465' "$work/gen.conf"
    check "generated: starttls listener on 2525" grep -qx 'listen = 0.0.0.0:2525' "$work/gen.conf"
    check "generated: hostname" grep -qx 'hostname = bridge.test' "$work/gen.conf"
    check "generated: allow_from on both listeners" \
        bash -c "[ \$(grep -cx 'allow_from = 127.0.0.0/8' '$work/gen.conf') = 2 ]"
    check "generated: no 'user =' when started non-root" bash -c "! grep -q '^user' '$work/gen.conf'"
    check "generated: admin endpoint on loopback by default" grep -qx 'admin = 127.0.0.1:9465' "$work/gen.conf"
    inimg smtpbridge:smtpbridge "${ENVS[@]}" PROXY_FROM=10.0.0.0/24 UPSTREAM_PROXY_PROTOCOL=v2 \
        UPSTREAM_XCLIENT=no ADMIN_LISTEN=off WORKERS=2 LOG_FORMAT=json -- \
        /usr/local/bin/docker-entrypoint.sh config >"$work/gen2.conf" 2>&1 || true
    check "generated: PROXY_FROM -> accept_proxy on both listeners" \
        bash -c "[ \$(grep -cx 'proxy_from = 10.0.0.0/24' '$work/gen2.conf') = 2 ] && [ \$(grep -cx 'accept_proxy = yes' '$work/gen2.conf') = 2 ]"
    check "generated: upstream proxy_protocol, xclient, workers, log_format, no admin" \
        bash -c "grep -qx 'proxy_protocol = v2' '$work/gen2.conf' && grep -qx 'xclient = no' '$work/gen2.conf' && grep -qx 'workers = 2' '$work/gen2.conf' && grep -qx 'log_format = json' '$work/gen2.conf' && ! grep -q '^admin' '$work/gen2.conf'"
    inimg 0:0 "${ENVS[@]}" -- /usr/local/bin/docker-entrypoint.sh config >"$work/gen-root.conf" 2>&1 || true
    check "generated as root: drops to user smtpbridge" grep -qx 'user = smtpbridge' "$work/gen-root.conf"
    inimg smtpbridge:smtpbridge "${ENVS[@]}" -- /usr/local/bin/docker-entrypoint.sh check \
        >"$work/check.out" 2>"$work/check.err" && rc=0 || rc=$?
    if [ $rc = 0 ] && grep -q 'configuration OK' "$work/check.err" && grep -q '^\[listener alt\]' "$work/check.out"; then
        ok "entrypoint check: smtpbridge -t accepts the generated configuration"
    else
        bad "entrypoint check rc=$rc: $(cat "$work/check.err")"
    fi
    inimg smtpbridge:smtpbridge -- /usr/local/bin/docker-entrypoint.sh >/dev/null 2>"$work/e1" && rc=0 || rc=$?
    check "no UPSTREAM and no config: refused (rc=$rc)" bash -c "[ $rc = 64 ] && grep -q UPSTREAM '$work/e1'"
    inimg smtpbridge:smtpbridge "${ENVS[@]}" $'HOSTNAME_SMTP=x\n[listener evil]' -- \
        /usr/local/bin/docker-entrypoint.sh >/dev/null 2>&1 && rc=0 || rc=$?
    check "line break in a variable: refused (rc=$rc)" test "$rc" = 64
    inimg smtpbridge:smtpbridge "${ENVS[@]}" TLS_KEY=/etc/smtpbridge/certs/missing.pem -- \
        /usr/local/bin/docker-entrypoint.sh >/dev/null 2>"$work/e3" && rc=0 || rc=$?
    check "missing key file: -t fails, daemon not started (rc=$rc)" \
        bash -c "[ $rc = 78 ] && grep -q 'missing.pem' '$work/e3'"
    inimg smtpbridge:smtpbridge "${ENVS[@]}" UPSTREAM_TLS=bogus -- \
        /usr/local/bin/docker-entrypoint.sh >/dev/null 2>"$work/e4" && rc=0 || rc=$?
    check "bad UPSTREAM_TLS: -t fails naming the key (rc=$rc)" \
        bash -c "[ $rc = 78 ] && grep -q 'tls' '$work/e4'"

    echo "== entrypoint: mounted configuration file"
    sed -e 's/^hostname = .*/hostname = mounted.test/' "$work/gen.conf" >"$root/etc/smtpbridge/smtpbridge.conf"
    chmod 0644 "$root/etc/smtpbridge/smtpbridge.conf"
    inimg smtpbridge:smtpbridge UPSTREAM=ignored.example:1 -- /usr/local/bin/docker-entrypoint.sh config \
        >"$work/mounted.out" 2>&1 || true
    check "a mounted /etc/smtpbridge/smtpbridge.conf wins over variables" \
        grep -qx 'hostname = mounted.test' "$work/mounted.out"
    rm -f "$root/etc/smtpbridge/smtpbridge.conf"

    echo "== docker/kubernetes/configmap.yaml: its environment passes the entrypoint's check"
    install -o 0 -g "$gid" -m 0644 "$cache/certs/proxy.pem" "$root/etc/smtpbridge/certs/tls.crt"
    install -o 0 -g "$gid" -m 0640 "$cache/certs/proxy.key" "$root/etc/smtpbridge/certs/tls.key"
    mapfile -t K8SENV < <(/usr/bin/python3 -c '
import sys, yaml
d = yaml.safe_load(open(sys.argv[1]))["data"]
d["UPSTREAM"] = "127.0.0.1:10587"   # no DNS in this namespace
d["UPSTREAM_CA_FILE"] = "/etc/smtpbridge/certs/upstream-ca.pem"
for k, v in d.items():
    print("%s=%s" % (k, v))' "$top/docker/kubernetes/configmap.yaml")
    inimg smtpbridge:smtpbridge "${K8SENV[@]}" -- /usr/local/bin/docker-entrypoint.sh check \
        >"$work/k8s.out" 2>"$work/k8s.err" && rc=0 || rc=$?
    if [ $rc = 0 ] && grep -q 'listen = 0.0.0.0:10465' "$work/k8s.out"; then
        ok "kubernetes environment: configuration OK, listens on 10465/12525"
    else
        bad "kubernetes environment rc=$rc: $(cat "$work/k8s.err")"
    fi

    echo "== daemon from the image, as user smtpbridge, in front of a test upstream"
    /usr/bin/python3 "$top/tests/tools/upstream.py" --listen 127.0.0.1:10587 \
        --cert "$cache/certs/upstream.pem" --key "$cache/certs/upstream.key" \
        --users alice:secret --maildir "$work/mail" >"$work/upstream.out" 2>"$work/upstream.err" &
    up_pid=$!
    for _ in $(seq 100); do grep -q READY "$work/upstream.out" 2>/dev/null && break; sleep 0.1; done
    check "test upstream started" grep -q READY "$work/upstream.out"

    # Not through inimg (a function runs in a subshell when backgrounded):
    # $! must be the process that becomes the daemon.
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/nonexistent \
        "${ENVS[@]}" chroot --userspec=smtpbridge:smtpbridge "$root" /usr/local/bin/docker-entrypoint.sh \
        >"$work/daemon.out" 2>"$work/daemon.err" &
    d_pid=$!
    for _ in $(seq 100); do
        (exec 3<>/dev/tcp/127.0.0.1/465) 2>/dev/null && (exec 3<>/dev/tcp/127.0.0.1/2525) 2>/dev/null && break
        kill -0 "$d_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$d_pid" 2>/dev/null; then
        ok "daemon running as non-root, bound 465 and 2525"
    else
        bad "daemon did not start: $(tail -5 "$work/daemon.err")"
    fi
    exe=$(readlink "/proc/$d_pid/exe" 2>/dev/null || true)
    check "entrypoint exec'd the daemon (pid $d_pid is smtpbridge: $exe)" bash -c "[[ '$exe' == */smtpbridge ]]"
    duid=$(awk '/^Uid:/ { print $2 }' "/proc/$d_pid/status" 2>/dev/null || true)
    check "daemon runs as uid $uid (is: ${duid:-?})" test "${duid:-x}" = "$uid"
    check "HEALTHCHECK command reports healthy (GET /healthz on the admin endpoint)" \
        inimg smtpbridge:smtpbridge -- /usr/local/bin/smtpbridge-healthcheck
    check "admin /healthz answers 200 from the host side" \
        bash -c "curl -sf --max-time 5 http://127.0.0.1:9465/healthz | grep -q ok"
    kill -HUP "$d_pid" 2>/dev/null || true
    for _ in $(seq 50); do grep -q 'event=reload_done' "$work/daemon.err" && break; sleep 0.1; done
    check "SIGHUP reaches the daemon: configuration and certificates reloaded" \
        grep -q 'event=reload_done' "$work/daemon.err"

    body="Subject: image test\n\nsent through the image $(date +%s%N)\n"
    sw=(swaks --auth PLAIN --auth-user alice --auth-password secret --from alice@example.com
        --to bob@example.net --tls-verify --tls-ca-path "$cache/certs/ca.pem"
        --data "$body" --timeout 20)
    check "swaks through 465 (implicit TLS, verified) -> 250" \
        "${sw[@]}" --server 127.0.0.1:465 --tls-on-connect
    check "swaks through 2525 (STARTTLS, verified) -> 250" \
        "${sw[@]}" --server 127.0.0.1:2525 --tls
    n=$(ls "$work/mail"/*.eml 2>/dev/null | wc -l)
    check "the upstream stored both messages (has $n)" test "$n" = 2
    check "message content arrived" grep -lq 'sent through the image' "$work/mail"/000001-*.eml
    swaks --server 127.0.0.1:465 --tls-on-connect --auth PLAIN --auth-user alice \
        --auth-password wrong --from a@example.com --to b@example.net --timeout 20 \
        >"$work/wrongpw.out" 2>&1 || true
    check "wrong password: the upstream's 535 reaches the client" grep -q '<~\* *535' "$work/wrongpw.out"

    kill -TERM "$d_pid" 2>/dev/null || true
    rc=0
    wait "$d_pid" || rc=$?
    check "SIGTERM: daemon exits 0 (rc=$rc)" test "$rc" = 0
    check "logs on stderr: session_end lines" grep -q 'event=session_end' "$work/daemon.err"
    check "nothing on stdout" test ! -s "$work/daemon.out"
    kill "$up_pid" 2>/dev/null || true
    wait "$up_pid" 2>/dev/null || true
    d_pid="" up_pid=""

    # -----------------------------------------------------------------
    # The compose stack (docker/compose.yaml), without an engine: the
    # Postfix image (docker/postfix) and the smtpbridge image, each run from
    # its own file system, with compose's environment.
    pmnt=${4:-}
    if [ -n "$pmnt" ]; then
        echo "== compose stack: smtpbridge image -> docker/postfix image (Postfix + Dovecot SASL)"
        proot=$work/proot
        mkdir -p "$proot" "$work/pupper" "$work/povl"
        mount -t overlay overlay -o "lowerdir=$pmnt,upperdir=$work/pupper,workdir=$work/povl" "$proot"
        mount --rbind /dev "$proot/dev"
        mount -t proc proc "$proot/proc"
        mkdir -p "$proot/certs"
        cp "$cache/certs/upstream.pem" "$cache/certs/upstream.key" "$cache/certs/ca.pem" "$proot/certs/"
        stack_stop() { # Postfix's master (PID 1 of that container) and Dovecot
            local dp
            if [ -n "${pf_pid:-}" ]; then
                kill -TERM "$pf_pid" 2>/dev/null || true
                wait "$pf_pid" 2>/dev/null || true
            fi
            for dp in $(cat "$proot/var/spool/postfix/pid/master.pid" "$proot/run/dovecot/master.pid" 2>/dev/null); do
                kill "$dp" 2>/dev/null || true
            done
            pf_pid=""
            return 0
        }
        trap 'stack_stop; for p in $d_pid $up_pid; do kill "$p" 2>/dev/null; done; echo "$pass $fail" >"$work/result"' EXIT
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            MAIL_DOMAIN=example.test SMTP_USERS=alice:change-me PROXY_PROTOCOL=yes \
            TLS_CERT=/certs/upstream.pem TLS_KEY=/certs/upstream.key \
            chroot "$proot" /usr/local/bin/postfix-entrypoint.sh >"$work/postfix.out" 2>&1 &
        pf_pid=$!
        got=""
        for _ in $(seq 150); do
            env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin PROXY_PROTOCOL=yes \
                chroot "$proot" /usr/local/bin/postfix-healthcheck 2>/dev/null &&
                got=220 && break
            kill -0 "$pf_pid" 2>/dev/null || break
            sleep 0.2
        done
        if [ "$got" = 220 ]; then ok "postfix image: its HEALTHCHECK (PROXY header + 220 on 587) passes"; else
            bad "postfix image did not start: $(tail -5 "$work/postfix.out")"; fi
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/nonexistent \
            UPSTREAM=127.0.0.1:587 UPSTREAM_TLS=starttls UPSTREAM_SERVER_NAME=upstream.test \
            UPSTREAM_CA_FILE=/etc/smtpbridge/certs/upstream-ca.pem HOSTNAME_SMTP=smtpbridge.example.test \
            UPSTREAM_PROXY_PROTOCOL=v2 \
            chroot --userspec=smtpbridge:smtpbridge "$root" /usr/local/bin/docker-entrypoint.sh \
            >/dev/null 2>"$work/daemon2.err" &
        d_pid=$!
        for _ in $(seq 100); do
            (exec 3<>/dev/tcp/127.0.0.1/465) 2>/dev/null && break
            kill -0 "$d_pid" 2>/dev/null || break
            sleep 0.1
        done
        # The client on 127.0.0.2: Postfix must log that, not the proxy's 127.0.0.1.
        sw=(swaks --local-interface 127.0.0.2 --auth PLAIN --auth-user alice --from alice@example.test
            --to alice@example.test --tls-verify --tls-ca-path "$cache/certs/ca.pem" --timeout 20)
        "${sw[@]}" --auth-password change-me --server 127.0.0.1:465 --tls-on-connect \
            --header "Subject: stack 465" >"$work/stack1.out" 2>&1 && rc=0 || rc=$?
        check "465 -> smtpbridge -> postfix:587: queued by Postfix (rc=$rc)" \
            grep -q '<~ *250 2.0.0 Ok: queued as' "$work/stack1.out"
        "${sw[@]}" --auth-password change-me --server 127.0.0.1:2525 --tls \
            --header "Subject: stack 2525" >"$work/stack2.out" 2>&1 && rc=0 || rc=$?
        check "2525 -> smtpbridge -> postfix:587: queued by Postfix (rc=$rc)" \
            grep -q '<~ *250 2.0.0 Ok: queued as' "$work/stack2.out"
        md=$proot/var/mail/vhosts/example.test/alice/Maildir/new
        for _ in $(seq 100); do [ "$(ls "$md" 2>/dev/null | wc -l)" -ge 2 ] && break; sleep 0.1; done
        check "both delivered into the Maildir volume" bash -c "[ \$(ls '$md' | wc -l) = 2 ]"
        check "delivered mail came through TLS + SASL" \
            bash -c "cat '$md'/* | grep -q 'Authenticated sender: alice'"
        "${sw[@]}" --auth-password wrong --server 127.0.0.1:465 --tls-on-connect \
            >"$work/stack3.out" 2>&1 || true
        check "wrong password: Postfix's 535 5.7.8 reaches the client" grep -q '<~\* *535 5.7.8' "$work/stack3.out"
        check "Postfix log (stdout) shows the real client 127.0.0.2 (PROXY v2) and SASL user" \
            grep -q '\[127.0.0.2\], sasl_method=PLAIN, sasl_username=alice' "$work/postfix.out"
        kill -TERM "$d_pid" 2>/dev/null || true
        wait "$d_pid" 2>/dev/null || true
        d_pid=""
        mp=$(cat "$proot/var/spool/postfix/pid/master.pid" 2>/dev/null | tr -d ' ' || true)
        dp=$(cat "$proot/run/dovecot/master.pid" 2>/dev/null || true)
        kill -TERM "$pf_pid" 2>/dev/null || true
        rc=0
        wait "$pf_pid" 2>/dev/null || rc=$?
        pf_pid=""
        for _ in $(seq 50); do kill -0 "${mp:-0}" 2>/dev/null || kill -0 "${dp:-0}" 2>/dev/null || break; sleep 0.1; done
        if [ -n "$mp" ] && [ -n "$dp" ] && ! kill -0 "$mp" 2>/dev/null && ! kill -0 "$dp" 2>/dev/null && [ "$rc" = 0 ]; then
            ok "postfix image: SIGTERM stops Postfix's master and Dovecot, exit 0"
        else
            bad "postfix image: SIGTERM left master=${mp:-?} dovecot=${dp:-?} (rc=$rc)"
            for p in $mp $dp; do kill "$p" 2>/dev/null || true; done
        fi
    fi

    exit 0
fi

# =====================================================================
# Outside
# =====================================================================
[ "$(id -u)" = 0 ] || { echo "test_image.sh: must run as root (podman, chroot, mounts)" >&2; exit 1; }

need=""
for p in podman debootstrap swaks python3-aiosmtpd python3-yaml curl openssl libcap2-bin iproute2 util-linux; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need="$need $p"
done
if [ -n "$need" ]; then
    echo "test_image.sh: installing$need" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || apt-get update
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $need >/dev/null
fi
mkdir -p "$cache"

# This machine's Debian mirror: the first URI of the enabled entry for the
# release itself (not -updates/-security), read from the apt sources now.
mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk '
            function flush() { if (uri != "" && suites ~ /(^| )bookworm( |$)/ && types ~ /(^| )deb( |$)/ && enabled != "no") { print uri; exit } uri = ""; suites = ""; types = ""; enabled = "" }
            /^[ \t]*$/ { flush(); next }
            tolower($1) == "types:" { $1 = ""; types = $0 " " }
            tolower($1) == "uris:" { uri = $2 }
            tolower($1) == "suites:" { $1 = ""; suites = $0 " " }
            tolower($1) == "enabled:" { enabled = tolower($2) }
            END { flush() }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } if ($(i+1) == "bookworm") { print $i; exit } }' "$f"
    done
}

echo "== base image $BASE"
tb=$(date +%s)
if podman image exists "$BASE"; then
    echo "  present"
else
    tarball=$cache/bookworm-minbase.tar
    if [ ! -s "$tarball" ]; then
        url=$(mirror | head -n1)
        [ -n "$url" ] || { echo "test_image.sh: no bookworm entry in /etc/apt sources" >&2; exit 1; }
        rootfs=$cache/rootfs
        rm -rf "$rootfs"
        echo "  debootstrap --variant=minbase bookworm (this machine's mirror; first run only)"
        debootstrap --variant=minbase bookworm "$rootfs" "$url" >"$cache/debootstrap.log" 2>&1 ||
            { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
        # The machine's apt sources as configured (release, updates, security),
        # like the official image's deb822 file; no package lists or archives.
        if ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
            rm -f "$rootfs/etc/apt/sources.list"
            for f in /etc/apt/sources.list.d/*.sources; do
                grep -qi 'debian' "$f" && cp "$f" "$rootfs/etc/apt/sources.list.d/"
            done
        fi
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
        echo "slim-from-debootstrap" >"$rootfs/etc/hostname"
        tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    podman import -q "$tarball" "$BASE" >/dev/null
    echo "  imported from $tarball ($(($(date +%s) - tb))s)"
fi

echo "== podman build $IMAGE"
tb=$(date +%s)
if ! podman build --isolation chroot --format docker --pull=never \
    --ignorefile "$top/docker/Dockerfile.dockerignore" \
    -t "$IMAGE" -f "$top/docker/Dockerfile" "$top" >"$cache/build.log" 2>&1; then
    tail -30 "$cache/build.log"
    echo "0 passed, 1 failed"
    exit 1
fi
ok "image built ($(($(date +%s) - tb))s, log build/docker/build.log)"
PIMAGE=${PIMAGE:-smtpbridge-postfix:test}
tb=$(date +%s)
if podman build --isolation chroot --format docker --pull=never \
    --ignorefile "$top/docker/postfix/Dockerfile.dockerignore" \
    -t "$PIMAGE" -f "$top/docker/postfix/Dockerfile" "$top" >"$cache/build-postfix.log" 2>&1; then
    ok "postfix image built ($(($(date +%s) - tb))s, log build/docker/build-postfix.log)"
    pimage_ok=1
else
    tail -20 "$cache/build-postfix.log"
    bad "postfix image (docker/postfix/Dockerfile) did not build"
    pimage_ok=""
fi

echo "== image metadata"
insp() { podman image inspect --format "$1" "$IMAGE" 2>/dev/null; }
check "runs as user smtpbridge" bash -c "[ '$(insp '{{.Config.User}}')' = smtpbridge:smtpbridge ]"
ports=$(insp '{{range $k, $v := .Config.ExposedPorts}}{{$k}} {{end}}')
check "EXPOSE 465 and 2525 ($ports)" bash -c "[[ '$ports' == *465/tcp* && '$ports' == *2525/tcp* ]]"
hc=$(insp '{{.Config.Healthcheck}}')
check "HEALTHCHECK set ($hc)" bash -c "[[ '$hc' == *smtpbridge-healthcheck* ]]"
ep=$(insp '{{.Config.Entrypoint}}')
check "ENTRYPOINT is the entrypoint script ($ep)" bash -c "[[ '$ep' == *docker-entrypoint.sh* ]]"
size=$(insp '{{.Size}}')
echo "  image size: $((size / 1024 / 1024)) MiB"

work=$(mktemp -d "$cache/run.XXXXXX")
mnt=$(podman image mount "$IMAGE")
pmnt=""
[ -z "$pimage_ok" ] || pmnt=$(podman image mount "$PIMAGE")
cleanup() {
    podman image unmount "$IMAGE" >/dev/null 2>&1 || true
    [ -z "$pmnt" ] || podman image unmount "$PIMAGE" >/dev/null 2>&1 || true
    [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
# Private network (own loopback: 465 is free, nothing on the host is reached)
# and private mounts (the overlay and binds vanish with the namespace).
unshare --net --mount --propagation private -- "$self" --inside "$mnt" "$work" "$pmnt" || bad "inside phase crashed"
if [ -f "$work/result" ]; then
    read -r p f <"$work/result"
    pass=$((pass + p)) fail=$((fail + f))
else
    bad "inside phase reported nothing"
fi
echo "test-docker: $(elapsed)"
echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
