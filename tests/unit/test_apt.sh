#!/usr/bin/env bash
# scripts/apt.sh against a stand-in apt-get on PATH (no network, no root):
# apt_update waits while another apt holds the lists' lock, stops at once on
# any other error, gives up after APT_LOCK_WAIT; apt_install passes dpkg's
# lock timeout.
set -uo pipefail

top=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
check() { # check NAME CONDITION...
    local name=$1
    shift
    if "$@"; then echo "ok   $name"; else echo "FAIL $name"; fails=$((fails + 1)); fi
}

# The stand-in: records each call's arguments in calls; exits with the code
# and prints the line given by the next line of script (then 0 / nothing).
mkdir -p "$tmp/bin"
cat >"$tmp/bin/apt-get" <<'EOF'
#!/usr/bin/env bash
echo "$*" >>"$STUB_DIR/calls"
n=$(wc -l <"$STUB_DIR/calls")
line=$(sed -n "${n}p" "$STUB_DIR/script")
[ -z "$line" ] && exit 0
echo "${line#* }" >&2
exit "${line%% *}"
EOF
chmod +x "$tmp/bin/apt-get"
export PATH="$tmp/bin:$PATH" STUB_DIR="$tmp" APT_LOCK_POLL=0
lock='100 E: Could not get lock /var/lib/apt/lists/lock. It is held by process 4242 (apt-get)'

run() { # run SCRIPT-LINES... : resets the stand-in, then calls apt_update
    : >"$tmp/calls"
    printf '%s\n' "$@" >"$tmp/script"
    (. "$top/scripts/apt.sh" && apt_update -o Dir::X=y) 2>"$tmp/err"
}
calls() { wc -l <"$tmp/calls"; }

APT_LOCK_WAIT=300 run "$lock" "$lock"
check "update: waits while the lists' lock is held, then succeeds" [ $? = 0 ]
check "update: three calls (two refused, one taken)" [ "$(calls)" = 3 ]
check "update: says that it waits" grep -q "waiting for another apt" "$tmp/err"
check "update: passes the caller's options before the verb" \
    grep -qx -- "-o Dir::X=y -q update" "$tmp/calls"

APT_LOCK_WAIT=300 run "100 E: The repository 'x' does not have a Release file."
check "update: another error fails at once" [ $? = 1 ]
check "update: ... after one call" [ "$(calls)" = 1 ]
check "update: ... and shows apt's message" grep -q "does not have a Release file" "$tmp/err"

APT_LOCK_POLL=1 APT_LOCK_WAIT=2 run "$lock" "$lock" "$lock" "$lock" "$lock" "$lock"
check "update: gives up when the lock is held past APT_LOCK_WAIT" [ $? = 1 ]
check "update: ... after three calls (0, 1 and 2 s)" [ "$(calls)" = 3 ]
check "update: ... naming the lock" grep -q "still holds the package lists' lock after 2s" "$tmp/err"

: >"$tmp/calls"
: >"$tmp/script"
(. "$top/scripts/apt.sh" && APT_LOCK_WAIT=77 apt_install pkg-a pkg-b)
check "install: succeeds" [ $? = 0 ]
check "install: waits for dpkg's lock, no Recommends" \
    grep -qx -- "-o DPkg::Lock::Timeout=77 -y -qq --no-install-recommends install pkg-a pkg-b" "$tmp/calls"

# apt_ensure: dpkg-query reports the packages listed in $tmp/installed as
# installed; id -u prints $STUB_UID.
cat >"$tmp/bin/dpkg-query" <<'STUB'
#!/usr/bin/env bash
p=${*: -1}
grep -qx -- "$p" "$STUB_DIR/installed" || { echo "dpkg-query: no packages found matching $p" >&2; exit 1; }
echo "install ok installed"
STUB
cat >"$tmp/bin/id" <<'STUB'
#!/bin/sh
echo "${STUB_UID:-0}"
STUB
chmod +x "$tmp/bin/dpkg-query" "$tmp/bin/id"
printf '%s\n' have-a have-b >"$tmp/installed"
ensure() { # ensure SCRIPT-LINES... -- PACKAGES...: calls apt_ensure
    : >"$tmp/calls"
    : >"$tmp/script"
    while [ "$1" != -- ]; do
        echo "$1" >>"$tmp/script"
        shift
    done
    shift
    (. "$top/scripts/apt.sh" && apt_ensure who "$@") >"$tmp/out" 2>"$tmp/err"
}

ensure -- have-a have-b
check "ensure: all installed: succeeds" [ $? = 0 ]
check "ensure: ... without calling apt-get" [ "$(calls)" = 0 ]

ensure -- have-a new-x have-b new-y new-x
check "ensure: installs what is missing" [ $? = 0 ]
check "ensure: ... each once, after a refresh" diff <(printf '%s\n' "-q update" \
    "-o DPkg::Lock::Timeout=300 -y -qq --no-install-recommends install new-x new-y") "$tmp/calls"
check "ensure: ... and names them" grep -qx "who: installing missing Debian packages: new-x new-y" "$tmp/err"

ensure "100 E: Failed to fetch something" -- new-x
check "ensure: a failed refresh still tries the install" [ $? = 0 ]
check "ensure: ... which ran" grep -q "install new-x" "$tmp/calls"
check "ensure: ... and the failure is reported" grep -q "who: apt-get update failed" "$tmp/err"

ensure "0 ok" "100 E: Unable to locate package new-x" -- new-x
check "ensure: a failed install fails" [ $? = 1 ]
check "ensure: ... saying so" \
    grep -q "who: cannot install new-x" "$tmp/err"
check "ensure: ... apt's message" grep -q "Unable to locate package new-x" "$tmp/err"

STUB_UID=1000 ensure -- have-a new-x
check "ensure: not root: fails" [ $? = 1 ]
check "ensure: ... without calling apt-get" [ "$(calls)" = 0 ]
check "ensure: ... and says how to install" grep -qx "install them with: sudo apt-get install new-x" "$tmp/err"

echo "test_apt: $fails failed"
[ "$fails" = 0 ]
