#!/usr/bin/env bash
# Installs the Debian 12 packages a step needs, if any are missing.
# Usage: scripts/deps.sh build|test|run [...]
# As root, missing packages are installed with apt-get; otherwise the
# missing names are printed and the script fails. The Docker image's build
# stage calls this same script.
set -euo pipefail

build_pkgs="gcc make pkg-config libc6-dev libwolfssl-dev libssl-dev libev-dev libinih-dev ca-certificates"
# Packages are installed without their Recommends, so list what a tool only
# recommends but we need: swaks speaks TLS only with libnet-ssleay-perl.
run_pkgs="openssl python3 python3-aiosmtpd swaks libnet-ssleay-perl"
test_pkgs="python3 python3-pytest python3-aiosmtpd swaks libnet-ssleay-perl curl msmtp openssl clang \
libclang-rt-14-dev llvm valgrind clang-format iproute2 procps faketime"

want=""
for step in "$@"; do
    case "$step" in
    build) want="$want $build_pkgs" ;;
    run) want="$want $build_pkgs $run_pkgs" ;;
    test) want="$want $build_pkgs $test_pkgs" ;;
    *) echo "deps.sh: unknown step '$step' (build|test|run)" >&2; exit 2 ;;
    esac
done

# shellcheck source=scripts/apt.sh
. "$(dirname "$0")/apt.sh"
# shellcheck disable=SC2086
apt_ensure smtpbridge $want
