#!/usr/bin/env bash
# Builds the project's own static wolfSSL from Debian's wolfssl source package.
# Usage: scripts/wolfssl.sh [OUTDIR]          (default OUTDIR: build/wolfssl)
#
# Result: OUTDIR/lib/libwolfssl.a and OUTDIR/include/wolfssl/... (with the
# options.h the proxy must compile against). OUTDIR/.stamp records the source
# version and configure flags; when it matches and the library exists, the
# script exits at once.
#
# The source is fetched with apt's ordinary source download, through a private
# apt configuration under build/apt/ whose entries are the system's enabled
# `deb` entries turned into `deb-src` ones; /etc/apt is only read.
# As root, missing build tools are installed with apt-get.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$top/build/wolfssl}
case "$out" in /*) ;; *) out="$(pwd)/$out" ;; esac
apt_dir="$top/build/apt"
src_dir="$top/build/wolfssl-src"
log="$top/build/wolfssl.log"

die() { echo "wolfssl.sh: $*" >&2; exit 1; }

# Lean, project-specific configuration (issue 6). --enable-ip-alt-name: the
# proxy checks IP SANs of IP-literal upstreams (without it: "peer ip address
# mismatch"). --disable-dh: no DHE suites in the proxy's cipher lists.
# TLS 1.0/1.1 are compiled in but the proxy sets minimum versions and cipher
# lists explicitly, so they are only offered when a listener asks for them.
flags=(
    --enable-static --disable-shared
    --enable-aesni --enable-intelasm --enable-sp --enable-sp-asm
    --enable-tls13 --enable-oldtls --enable-tlsv10
    --enable-sni --enable-alpn --enable-session-ticket --enable-supportedcurves
    --enable-ocsp --enable-ocspstapling
    --enable-curve25519 --enable-chacha --enable-poly1305 --enable-aesgcm
    --enable-opensslextra --enable-ip-alt-name --enable-altcertchains
    --enable-harden --disable-dh --enable-cryptocb
    --disable-examples --disable-crypttests --disable-benchmark --disable-oldnames
    # getrandom(2) instead of opening /dev/urandom for every RNG (twice per
    # handshake, seen with strace in the benchmark).
    # HAVE_SBLIM_SFCB: wolfSSL compiles wolfSSL_CTX_set_servername_callback,
    # wolfSSL_set_SSL_CTX and wolfSSL_get_servername (certificates chosen by
    # SNI) only with OPENSSL_ALL or one of the application-compatibility
    # macros. This one (sblim-sfcb) only opens those API blocks in ssl.c,
    # pk.c and x509.c -- no behaviour and no per-session field changes --
    # where OPENSSL_ALL would enlarge every session and the build.
    "CPPFLAGS=-DWOLFSSL_GETRANDOM -DHAVE_SBLIM_SFCB"
)
# Our own fixes to wolfSSL, applied on top of Debian's patches (each file
# says what it fixes and why); they are part of the stamp, so changing one
# rebuilds the library.
patches=("$top"/scripts/wolfssl-patches/*.patch)
want_stamp="flags: ${flags[*]} patches: $(cat "${patches[@]}" | sha256sum | cut -c1-16)"

# ---- cached? ----
cached() {
    [ -f "$out/lib/libwolfssl.a" ] && [ -f "$out/.stamp" ] &&
        [ -f "$out/include/wolfssl/options.h" ] &&
        [ "$(sed -n 2p "$out/.stamp")" = "$want_stamp" ]
}
cached && exit 0

mkdir -p "$top/build"
# Parallel callers (e.g. two make runs) wait for one build instead of racing.
exec 9>"$top/build/.wolfssl.lock"
flock 9
cached && exit 0
: >"$log"

# ---- build tools ----
# shellcheck source=scripts/apt.sh
. "$top/scripts/apt.sh"
apt_ensure wolfssl.sh dpkg-dev autoconf automake libtool make gcc patch || exit 1

# ---- private apt configuration: the system's entries as deb-src ----
# Writes converted copies of the enabled source files; files with other
# suffixes (e.g. *.disabled-*) are ignored, exactly as apt itself does.
mk_apt_conf() {
    local f n
    rm -rf "$apt_dir/sources.list.d"
    mkdir -p "$apt_dir/sources.list.d" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    : >"$apt_dir/sources.list"
    # One-line format: 'deb [opts] uri suite comp...' -> 'deb-src ...'.
    conv_list() { sed -n -E 's/^[[:space:]]*deb([[:space:]])/deb-src\1/p' "$1"; }
    # deb822: in 'Types:' replace the 'deb' token by 'deb-src' (once).
    conv_sources() {
        awk '
            BEGIN { IGNORECASE = 1 }
            /^Types:/ {
                n = split(substr($0, 7), t, /[ \t]+/); s = ""; seen = 0
                for (i = 1; i <= n; i++) {
                    if (t[i] == "") continue
                    if (t[i] == "deb" || t[i] == "deb-src") { if (seen) continue; t[i] = "deb-src"; seen = 1 }
                    s = s " " t[i]
                }
                print "Types:" s; next
            }
            { print }' "$1"
    }
    [ -f /etc/apt/sources.list ] && conv_list /etc/apt/sources.list >"$apt_dir/sources.list"
    for f in /etc/apt/sources.list.d/*; do
        [ -f "$f" ] || continue
        n=$(basename "$f")
        case "$n" in
        *.list) conv_list "$f" >"$apt_dir/sources.list.d/$n" ;;
        *.sources) conv_sources "$f" >"$apt_dir/sources.list.d/$n" ;;
        esac
    done
}

apt_opts=()
set_apt_opts() {
    apt_opts=(
        -o "Dir::Etc::SourceList=$apt_dir/sources.list"
        -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
        -o "Dir::State::Lists=$apt_dir/lists"
        -o "Dir::Cache=$apt_dir/cache"
        -o "APT::Sandbox::User=root"
    )
}

# Source version: the one of the installed libwolfssl-dev, if the archive
# still has it; otherwise the newest available.
pick_version() {
    local inst avail
    avail=$(apt-cache "${apt_opts[@]}" showsrc wolfssl 2>/dev/null |
        sed -n 's/^Version: //p' | sort -u)
    [ -n "$avail" ] || return 1
    inst=$(dpkg-query -W -f='${Version}' libwolfssl-dev 2>/dev/null || true)
    if [ -n "$inst" ] && grep -qxF "$inst" <<<"$avail"; then
        echo "$inst"
    else
        local best="" v
        for v in $avail; do
            if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
        done
        echo "$best"
    fi
}

fetch_source() {
    local inst
    # Already unpacked and matching the installed libwolfssl-dev: no network.
    inst=$(dpkg-query -W -f='${Version}' libwolfssl-dev 2>/dev/null || true)
    if [ -n "$inst" ] && [ -f "$src_dir/.version" ] && [ "$(cat "$src_dir/.version")" = "$inst" ] &&
        [ -f "$src_dir/src/configure.ac" ]; then
        return 0
    fi
    mk_apt_conf
    set_apt_opts
    [ -s "$apt_dir/sources.list" ] || [ -n "$(ls -A "$apt_dir/sources.list.d")" ] ||
        die "no enabled apt sources in /etc/apt to derive deb-src entries from"
    apt-get "${apt_opts[@]}" -q update >>"$log" 2>&1 ||
        die "apt-get update with the private deb-src list failed (see $log)"
    ver=$(pick_version) || die "no 'wolfssl' source package in the apt sources (see $log)"
    if [ -f "$src_dir/.version" ] && [ "$(cat "$src_dir/.version")" = "$ver" ] &&
        [ -f "$src_dir/src/configure.ac" ]; then
        return 0
    fi
    rm -rf "$src_dir"
    mkdir -p "$src_dir/dl"  # (.autoreconf goes with it)
    (cd "$src_dir/dl" && apt-get "${apt_opts[@]}" -q --download-only source "wolfssl=$ver") \
        >>"$log" 2>&1 || die "apt-get source wolfssl=$ver failed (see $log)"
    local dsc=("$src_dir"/dl/wolfssl_*.dsc)
    [ -f "${dsc[0]}" ] || die "apt-get source downloaded no .dsc (see $log)"
    dpkg-source -x "${dsc[0]}" "$src_dir/src" >>"$log" 2>&1 ||
        die "dpkg-source -x $(basename "${dsc[0]}") failed (see $log)"
    echo "$ver" >"$src_dir/.version"
}

echo "wolfssl.sh: getting Debian's wolfssl source package" >&2
fetch_source
ver=$(cat "$src_dir/.version")

# ---- configure, build, install ----
echo "wolfssl.sh: building wolfSSL $ver (static, x86-64 assembly) into $out" >&2
# The Debian patches touch configure.ac and Makefile.am: regenerate once.
if [ ! -f "$src_dir/.autoreconf" ]; then
    (cd "$src_dir/src" && autoreconf -fi) >>"$log" 2>&1 || die "autoreconf failed (see $log)"
    touch "$src_dir/.autoreconf"
fi
work="$src_dir/work"
rm -rf "$work"
cp -a "$src_dir/src" "$work"
cd "$work"
for p in "${patches[@]}"; do
    patch -p1 --forward --quiet <"$p" >>"$log" 2>&1 || die "cannot apply $p (see $log)"
done
./configure --prefix="$out" "${flags[@]}" >>"$log" 2>&1 || die "configure failed (see $log)"
# Flags this version does not know are only warned about by configure.
if grep -q "unrecognized options" "$log"; then
    die "configure does not know: $(grep -m1 'unrecognized options' "$log" | sed 's/.*unrecognized options: //')"
fi
make -j"$(nproc)" >>"$log" 2>&1 || die "make failed (see $log)"
# Remove only what an earlier `make install` wrote (OUTDIR may be a shared prefix).
rm -rf "${out:?}/include/wolfssl" "$out/share/doc/wolfssl" "$out/.stamp"
rm -f "$out"/lib/libwolfssl.* "$out/lib/pkgconfig/wolfssl.pc" "$out/bin/wolfssl-config"
make install >>"$log" 2>&1 || die "make install failed (see $log)"
[ -f "$out/lib/libwolfssl.a" ] || die "make install produced no $out/lib/libwolfssl.a"
printf 'wolfssl %s\n%s\n' "$ver" "$want_stamp" >"$out/.stamp"
echo "wolfssl.sh: done: $out/lib/libwolfssl.a" >&2
