#!/bin/bash
# Entrypoint of the compose stack's Postfix: users, domain, TLS files, then
# Dovecot (SASL) in the background and Postfix in the foreground.
set -euo pipefail
MAIL_DOMAIN=${MAIL_DOMAIN:-example.test}
TLS_CERT=${TLS_CERT:-/certs/upstream.pem}
TLS_KEY=${TLS_KEY:-/certs/upstream.key}

[ "${1:-}" = "" ] || exec "$@"

postconf -e "mydomain = $MAIL_DOMAIN" "myhostname = ${MAIL_HOSTNAME:-mail.$MAIL_DOMAIN}" \
    "virtual_mailbox_domains = $MAIL_DOMAIN" \
    "smtpd_tls_cert_file = $TLS_CERT" "smtpd_tls_key_file = $TLS_KEY"
# PROXY_PROTOCOL=yes: the submission service expects a PROXY header (v1/v2)
# on every connection -- smtpbridge with UPSTREAM_PROXY_PROTOCOL=v2 -- and
# then logs, limits and decides relaying by the real client address.
case "${PROXY_PROTOCOL:-no}" in
yes | true | on | 1) postconf -P "submission/inet/smtpd_upstream_proxy_protocol=haproxy" ;;
*) postconf -PX "submission/inet/smtpd_upstream_proxy_protocol" 2>/dev/null || true ;;
esac
if [ -n "${RELAYHOST:-}" ]; then
    postconf -e "relayhost = $RELAYHOST" "defer_transports ="
fi

# SASL users: a mounted passwd-file wins; else SMTP_USERS=user:pw,...
if [ -n "${SMTP_USERS:-}" ] && [ ! -s /etc/dovecot/users ]; then
    : >/etc/dovecot/users
    IFS=, read -ra pairs <<<"$SMTP_USERS"
    for p in "${pairs[@]}"; do
        printf '%s:{PLAIN}%s\n' "${p%%:*}" "${p#*:}" >>/etc/dovecot/users
    done
    chown root:dovecot /etc/dovecot/users
    chmod 0640 /etc/dovecot/users
fi
[ -s /etc/dovecot/users ] || { echo "postfix-entrypoint: set SMTP_USERS=user:password" >&2; exit 64; }
# Each SASL user gets a mailbox user@MAIL_DOMAIN.
cut -d: -f1 /etc/dovecot/users | while read -r u; do
    case "$u" in *@*) a=$u ;; *) a=$u@$MAIL_DOMAIN ;; esac
    echo "$a ${a#*@}/${a%@*}/Maildir/"
done >/etc/postfix/vmailbox

install -d -o postfix -g postfix /var/spool/postfix/private
dovecot
for _ in $(seq 50); do [ -S /var/spool/postfix/private/auth ] && break; sleep 0.1; done
postfix check
# `postfix start-fg` keeps its master as a child of this shell, not as PID 1:
# forward docker stop (SIGTERM) as a proper `postfix stop`, and stop Dovecot.
stop() {
    postfix stop || true
    doveadm stop 2>/dev/null || kill "$(cat /run/dovecot/master.pid 2>/dev/null)" 2>/dev/null || true
    exit 0
}
trap stop TERM INT
postfix start-fg &
wait $!
