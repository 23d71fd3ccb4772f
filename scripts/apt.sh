# Sourced by deps.sh, wolfssl.sh and tests/e2e/mta.py: installs missing
# Debian packages, with apt-get calls that wait for another apt
# (unattended-upgrades or cloud-init on a fresh machine) instead of failing.
#
# DPkg::Lock::Timeout makes `apt-get install` wait for dpkg's lock, but
# `apt-get update` takes a different one, the package lists' lock
# (/var/lib/apt/lists/lock), and apt 2.6 has no option to wait for it: it
# fails at once with "Could not get lock". apt_update retries while that is
# the error, for up to APT_LOCK_WAIT seconds (default 300, the same as the
# install's wait), and fails at once on any other error.

APT_LOCK_WAIT=${APT_LOCK_WAIT:-300}
APT_LOCK_POLL=${APT_LOCK_POLL:-5}

# apt_update [apt-get options...]: refreshes the package lists; apt's output
# goes to stderr only when it fails.
apt_update() {
    local out waited=0
    while :; do
        if out=$(apt-get "$@" -q update 2>&1); then
            return 0
        fi
        case "$out" in
        *"Could not get lock"* | *"Unable to lock directory"*) ;;
        *)
            printf '%s\n' "$out" >&2
            return 1
            ;;
        esac
        if [ "$waited" -ge "$APT_LOCK_WAIT" ]; then
            printf '%s\n' "$out" >&2
            echo "apt-get update: another apt still holds the package lists' lock after ${waited}s" >&2
            return 1
        fi
        [ "$waited" -eq 0 ] && echo "apt-get update: waiting for another apt to release its lock (up to ${APT_LOCK_WAIT}s)" >&2
        sleep "$APT_LOCK_POLL"
        waited=$((waited + APT_LOCK_POLL))
    done
}

# apt_install PACKAGE...: installs without Recommends, waiting up to
# APT_LOCK_WAIT seconds for dpkg's lock.
apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT" -y -qq \
        --no-install-recommends install "$@"
}

# apt_ensure WHO PACKAGE...: installs those of the packages that are not
# installed. As another user than root it names them and fails. A failed
# package-list refresh is reported, and the install is tried with the lists
# as they are (apt then names any package it cannot find). WHO prefixes the
# messages.
apt_ensure() {
    local who=$1 missing="" p
    shift
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
            case " $missing " in *" $p "*) ;; *) missing="$missing $p" ;; esac
        fi
    done
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "$who: missing Debian packages:$missing" >&2
        echo "install them with: sudo apt-get install$missing" >&2
        return 1
    fi
    echo "$who: installing missing Debian packages:$missing" >&2
    # An old or empty package list cannot find anything: refresh it once.
    apt_update || echo "$who: apt-get update failed (above); installing from the package lists as they are" >&2
    # shellcheck disable=SC2086
    apt_install $missing >/dev/null || {
        echo "$who: cannot install$missing (apt-get's message is above)" >&2
        return 1
    }
}
