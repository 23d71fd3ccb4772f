"""A private, throw-away Postfix + Dovecot (SASL only) instance on loopback.

Nothing system-wide is used or changed: Postfix runs with `postfix -c DIR`
(its own main.cf/master.cf, queue_directory, data_directory and maillog_file
under one temporary directory); Dovecot runs in the foreground with its own
config, base_dir and passwd-file and offers only its auth socket to Postfix.
No service listens anywhere but 127.0.0.1 on the ports given, and mail is
delivered only into Maildirs under the temporary directory (virtual
delivery); everything else (relay to outside domains) is discarded.

Services (master.cf):
  submission     STARTTLS required, SASL AUTH via Dovecot,
                 smtpd_relay_restrictions = permit_sasl_authenticated, reject;
                 mynetworks does NOT contain 127.0.0.1, so a proxy on loopback
                 is not trusted.
  trusted        "an MTA that trusts its proxy": mynetworks = 127.0.0.1/32
                 (the proxy), relay for mynetworks or SASL, and a PROXY header
                 required on every connection (smtpd_upstream_proxy_protocol),
                 so the real client address decides (smtpbridge's upstream
                 `proxy_protocol = v2`).
  xclient        the same trust, with XCLIENT allowed from 127.0.0.1
                 (smtpd_authorized_xclient_hosts; smtpbridge's `xclient = yes`).
                 Without XCLIENT, the proxy itself would be trusted to relay.
Test clients use other loopback addresses (127.0.0.2, ...) as "real" clients.
"""

import os
import pwd
import grp
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PACKAGES = ["postfix", "dovecot-core"]


def ensure_packages(extra=()):
    """Install Postfix and dovecot-core (and `extra`) if missing.

    Postfix is preseeded with "No configuration", so installing it writes no
    /etc/postfix/main.cf and starts no system mail service."""
    want = list(PACKAGES) + list(extra)
    missing = []
    for p in want:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p],
                           capture_output=True, text=True)
        if "install ok installed" not in r.stdout:
            missing.append(p)
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError("missing Debian packages: %s (run as root)" % " ".join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Installing must not start system services (postfix, dovecot, haproxy):
    # a policy-rc.d that says "no" for the time of the install, unless the
    # machine already has one.
    policy = "/usr/sbin/policy-rc.d"
    own_policy = not os.path.exists(policy)
    if own_policy:
        with open(policy, "w") as f:
            f.write("#!/bin/sh\n# temporary, tests/e2e/mta.py\nexit 101\n")
        os.chmod(policy, 0o755)
    try:
        _apt_install(missing, env)
    finally:
        if own_policy:
            os.unlink(policy)


def _apt_install(missing, env):
    subprocess.run(["debconf-set-selections"], check=True, env=env,
                   input="postfix postfix/main_mailer_type select No configuration\n",
                   text=True)
    # scripts/apt.sh: the same calls as the build's, which wait for another
    # apt's locks instead of failing (a fresh machine's unattended-upgrades).
    apt_sh = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts", "apt.sh")
    r = subprocess.run(["bash", "-c", '. "$0"; apt_ensure mta.py "$@"', apt_sh] + missing,
                       env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("apt-get install %s failed:\n%s" % (" ".join(missing), r.stderr))


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from ports import free_port  # noqa: E402,F401  (used here and by conftest)


def wait_greeting(port, timeout=20.0):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(512).startswith(b"220"):
                    return
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError("no 220 greeting on 127.0.0.1:%d (%s)" % (port, last))


MASTER_CF = """\
# private e2e instance: no chroot, loopback only
127.0.0.1:{submission} inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_tls_auth_only=yes
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_client_restrictions=
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
127.0.0.1:{trusted} inet n - n - - smtpd
  -o syslog_name=postfix/trusted
  -o smtpd_upstream_proxy_protocol=haproxy
  -o mynetworks=127.0.0.1/32
  -o smtpd_tls_security_level=encrypt
  -o smtpd_tls_auth_only=yes
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_relay_restrictions=permit_mynetworks,permit_sasl_authenticated,reject_unauth_destination
127.0.0.1:{xclient} inet n - n - - smtpd
  -o syslog_name=postfix/xclient
  -o smtpd_authorized_xclient_hosts=127.0.0.1
  -o mynetworks=127.0.0.1/32
  -o smtpd_tls_security_level=encrypt
  -o smtpd_tls_auth_only=yes
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_relay_restrictions=permit_mynetworks,permit_sasl_authenticated,reject_unauth_destination
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
# private e2e instance (tests/e2e/mta.py)
compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
myhostname = mta.e2e.test
mydomain = e2e.test
myorigin = e2e.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
# The proxy (127.0.0.1) is deliberately NOT a trusted network.
mynetworks = 192.0.2.0/24
# Mail from loopback is not "local" either: no header rewriting.
local_header_rewrite_clients =
alias_maps =
alias_database =
local_recipient_maps =
biff = no
append_dot_mydomain = no
smtpd_banner = $myhostname ESMTP
# Delivery: only into Maildirs under {d}/vmail; nothing ever leaves.
virtual_mailbox_domains = e2e.test
virtual_mailbox_base = {d}/vmail
virtual_mailbox_maps = texthash:{d}/etc/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = 1
default_transport = discard:outside mail discarded by the e2e instance
relay_transport = discard:outside mail discarded by the e2e instance
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_security_level = may
smtpd_tls_loglevel = 1
smtpd_tls_received_header = yes
smtpd_sasl_authenticated_header = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = {d}/dovecot/run/auth-client
smtpd_sasl_security_options = noanonymous
broken_sasl_auth_clients = no
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
message_size_limit = 52428800
virtual_mailbox_limit = 0
"""

DOVECOT_CONF = """\
# private e2e instance (tests/e2e/mta.py): SASL for Postfix only
base_dir = {d}/dovecot/run
state_dir = {d}/dovecot/state
instance_name = smtpbridge-e2e-{tag}
protocols =
listen = 127.0.0.1
log_path = {d}/dovecot/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/dovecot/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home=/nonexistent
}}
service auth {{
  unix_listener auth-client {{
    mode = 0660
    user = postfix
    group = postfix
  }}
}}
service anvil {{
  chroot =
}}
"""


class MTA:
    """Postfix submission + Dovecot SASL, private to one directory."""

    def __init__(self, cert, key, users, mailboxes):
        self.d = tempfile.mkdtemp(prefix="smtpbridge-e2e-")
        os.chmod(self.d, 0o755)  # postfix/dovecot users must reach their dirs
        self.cert, self.key = cert, key
        self.users = dict(users)
        self.mailboxes = list(mailboxes)
        self.submission = free_port()
        self.trusted = free_port()
        self.xclient = free_port()
        self.dovecot = None
        self.postfix_started = False
        nobody = pwd.getpwnam("nobody")
        self.uid, self.gid = nobody.pw_uid, grp.getgrnam("nogroup").gr_gid

    # ------------------------------------------------------------ set-up
    def _write(self, rel, text, mode=0o644):
        p = os.path.join(self.d, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(text)
        os.chmod(p, mode)
        return p

    def start(self):
        d = self.d
        # TLS key readable by the postfix daemons (they read it as root at
        # start anyway; copy so the test PKI's permissions do not matter).
        cert = os.path.join(d, "etc", "tls.pem")
        key = os.path.join(d, "etc", "tls.key")
        os.makedirs(os.path.join(d, "etc"))
        shutil.copy(self.cert, cert)
        shutil.copy(self.key, key)
        os.chmod(key, 0o600)
        fmt = dict(d=d, uid=self.uid, gid=self.gid, cert=cert, key=key,
                   submission=self.submission, trusted=self.trusted,
                   xclient=self.xclient, tag=os.path.basename(d))
        self._write("etc/main.cf", MAIN_CF.format(**fmt))
        self._write("etc/master.cf", MASTER_CF.format(**fmt))
        self._write("etc/vmailbox", "".join(
            "%s %s/Maildir/\n" % (m, m.split("@")[0]) for m in self.mailboxes))
        os.makedirs(os.path.join(d, "vmail"))
        os.chown(os.path.join(d, "vmail"), self.uid, self.gid)
        os.makedirs(os.path.join(d, "spool"))  # root-owned; postfix makes the rest
        os.makedirs(os.path.join(d, "data"))
        os.chown(os.path.join(d, "data"), pwd.getpwnam("postfix").pw_uid, -1)
        # Dovecot: passwd-file with plaintext passwords (test users only).
        self._write("dovecot/dovecot.conf", DOVECOT_CONF.format(**fmt))
        self._write("dovecot/passwd", "".join(
            "%s:{PLAIN}%s\n" % (u, p) for u, p in self.users.items()), 0o640)
        os.chown(os.path.join(d, "dovecot/passwd"), -1, grp.getgrnam("dovecot").gr_gid)
        for sub in ("dovecot/run", "dovecot/state"):
            os.makedirs(os.path.join(d, sub))
        self.dovecot = subprocess.Popen(
            ["dovecot", "-F", "-c", os.path.join(d, "dovecot/dovecot.conf")],
            stdout=open(os.path.join(d, "dovecot.stdout"), "w"), stderr=subprocess.STDOUT)
        sock = os.path.join(d, "dovecot/run/auth-client")
        end = time.monotonic() + 20
        while not os.path.exists(sock):
            if self.dovecot.poll() is not None or time.monotonic() > end:
                raise RuntimeError("dovecot did not start:\n" + self.log("dovecot.stdout")
                                   + self.log("dovecot/dovecot.log"))
            time.sleep(0.05)
        r = self.postfix("check")
        if r.returncode != 0:
            raise RuntimeError("postfix check failed:\n" + r.stdout + r.stderr)
        r = self.postfix("start")
        if r.returncode != 0:
            raise RuntimeError("postfix start failed:\n" + r.stdout + r.stderr + self.maillog())
        self.postfix_started = True
        for port in (self.submission, self.xclient):
            wait_greeting(port)
        return self

    def postfix(self, *args):
        env = dict(os.environ)
        env.pop("MAIL_CONFIG", None)
        cmd = ["postfix", "-c", os.path.join(self.d, "etc")] + list(args)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
        if r.returncode != 0 and not (r.stdout + r.stderr).strip():
            # postfix prints its fatal errors only to a terminal: get one.
            t = subprocess.run(["script", "-qec", " ".join(cmd), "/dev/null"],
                               capture_output=True, text=True, env=env, timeout=60)
            r.stdout = t.stdout
        return r

    # ------------------------------------------------------------ tear-down
    def stop(self):
        if self.postfix_started:
            self.postfix("stop")
            pidf = os.path.join(self.d, "spool", "pid", "master.pid")
            end = time.monotonic() + 10
            while os.path.exists(pidf) and time.monotonic() < end:
                time.sleep(0.1)
            try:  # still there: end this instance's master, by its own pid
                pid = int(open(pidf).read().split()[0])
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass
            self.postfix_started = False
        if self.dovecot is not None and self.dovecot.poll() is None:
            self.dovecot.terminate()
            try:
                self.dovecot.wait(10)
            except subprocess.TimeoutExpired:
                self.dovecot.kill()
                self.dovecot.wait()
        self.dovecot = None

    def cleanup(self):
        if not os.environ.get("E2E_KEEP"):
            shutil.rmtree(self.d, ignore_errors=True)

    # ------------------------------------------------------------ inspection
    def log(self, rel):
        try:
            with open(os.path.join(self.d, rel), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def maillog(self):
        return self.log("maillog")

    def maildir_files(self, user):
        new = os.path.join(self.d, "vmail", user, "Maildir", "new")
        try:
            return sorted(os.path.join(new, n) for n in os.listdir(new))
        except FileNotFoundError:
            return []

    def wait_log(self, needle, timeout=15.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if needle in self.maillog():
                return True
            time.sleep(0.1)
        return False

    def wait_delivery(self, user, queue_id, timeout=20.0):
        """The Maildir file of the message Postfix queued as `queue_id`
        (found by its Received header `id QUEUEID`)."""
        end = time.monotonic() + timeout
        tag = (" id %s" % queue_id).encode()
        while time.monotonic() < end:
            for p in self.maildir_files(user):
                with open(p, "rb") as f:
                    data = f.read()
                head = data.split(b"\n\n", 1)[0]
                if tag + b"\n" in head or tag + b";" in head or tag + b" " in head:
                    return p, data
            time.sleep(0.1)
        raise AssertionError("message %s not delivered to %s within %ss; maillog:\n%s"
                             % (queue_id, user, timeout, self.maillog()[-3000:]))
