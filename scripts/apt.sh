# Sourced by deps.sh and wolfssl.sh: apt-get calls that wait for another apt
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
