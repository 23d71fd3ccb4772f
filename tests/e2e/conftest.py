"""Fixtures for the real-MTA end-to-end suite (tests/e2e).

Run:  /usr/bin/python3 -m pytest -q tests/e2e        (as root; `make test-e2e`)
Env:  SMTPBRIDGE_BIN  daemon binary (default <repo>/build/smtpbridge)
      E2E_KEEP=1      keep the Postfix/Dovecot directory (/tmp/smtpbridge-e2e-*)

One private Postfix + Dovecot instance (tests/e2e/mta.py) and one smtpbridge
daemon serve the whole session; both are torn down at the end.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import mta as mta_mod  # noqa: E402

TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("SMTPBRIDGE_BIN", os.path.join(TOP, "build", "smtpbridge"))
USERS = {"alice": "secret-alice", "carol": "secret-carol"}
MAILBOXES = ["bob@e2e.test", "dave@e2e.test"]
CLIENT_TOOLS = ["swaks", "curl", "msmtp", "openssl", "procps", "haproxy"]


def pytest_configure(config):
    config.addinivalue_line("markers", "deadline(seconds): per-test time limit")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    m = item.get_closest_marker("deadline")
    secs = m.args[0] if m else 60

    def handler(signum, frame):
        raise TimeoutError("%s exceeded %ds" % (item.nodeid, secs))

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(secs)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="session")
def certs():
    mta_mod.ensure_packages(CLIENT_TOOLS)
    d = os.path.join(TOP, "build", "e2e", "certs")
    subprocess.run(["bash", os.path.join(TOP, "tests", "tools", "mkcerts.sh"), d],
                   check=True, stdout=subprocess.DEVNULL)
    return d


@pytest.fixture(scope="session")
def mta(certs):
    if os.geteuid() != 0:
        pytest.skip("the e2e suite runs a private Postfix and Dovecot: run as root")
    m = mta_mod.MTA(os.path.join(certs, "upstream.pem"), os.path.join(certs, "upstream.key"),
                    USERS, MAILBOXES)
    try:
        m.start()
        yield m
    finally:
        m.stop()
        m.cleanup()


class Bridge:
    """One smtpbridge daemon. Listeners (name -> extra config lines):

      smtps  implicit TLS  -> submission (STARTTLS + SASL)
      alt    STARTTLS      -> submission
      open   STARTTLS, auth gate off (allow_from 127.0.0.0/8) -> submission
      pp     STARTTLS, gate off -> `trusted` (PROXY v2 to Postfix)
      xc     STARTTLS, gate off -> `xclient` (XCLIENT to Postfix)
      lb     STARTTLS, accept_proxy from 127.0.0.1 (a load balancer) -> `trusted`
    """

    def __init__(self, certs, mta, listeners=None, name="proxy"):
        self.dir = tempfile.mkdtemp(prefix="smtpbridge-e2e-%s-" % name)
        self.ca = os.path.join(certs, "ca.pem")
        cert, key = os.path.join(certs, "proxy.pem"), os.path.join(certs, "proxy.key")
        if listeners is None:
            listeners = {
                "smtps": "mode = implicit",
                "alt": "mode = starttls",
                "open": "mode = starttls\nrequire_auth = no\nallow_from = 127.0.0.0/8",
                "pp": "mode = starttls\nrequire_auth = no\nallow_from = 127.0.0.0/8\n"
                      "upstream = trusted",
                "xc": "mode = starttls\nrequire_auth = no\nallow_from = 127.0.0.0/8\n"
                      "upstream = xclient",
                "lb": "mode = starttls\naccept_proxy = yes\nproxy_from = 127.0.0.1\n"
                      "upstream = trusted",
            }
        self.ports = {n: mta_mod.free_port() for n in listeners}
        text = """\
[global]
hostname = bridge.e2e.test
user = nobody
log_level = info
max_sessions_per_ip = 100

[upstream]
address = 127.0.0.1:{sub}
tls = starttls
ca_file = {ca}

; Postfix trusting 127.0.0.1 (the proxy): the real client is passed with PROXY v2
[upstream trusted]
address = 127.0.0.1:{trusted}
ca_file = {ca}
proxy_protocol = v2

; ... or with XCLIENT after TLS
[upstream xclient]
address = 127.0.0.1:{xclient}
ca_file = {ca}
xclient = yes
""".format(sub=mta.submission, trusted=mta.trusted, xclient=mta.xclient, ca=self.ca)
        for n, extra in listeners.items():
            text += "\n[listener %s]\nlisten = 127.0.0.1:%d\ncert = %s\nkey = %s\n%s\n" % (
                n, self.ports[n], cert, key, extra)
        self.conf = os.path.join(self.dir, "smtpbridge.conf")
        with open(self.conf, "w") as f:
            f.write(text)
        r = subprocess.run([BIN, "-t", "-c", self.conf], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        self.stderr_path = os.path.join(self.dir, "smtpbridge.stderr")
        self.proc = subprocess.Popen([BIN, "-c", self.conf], stdout=subprocess.DEVNULL,
                                     stderr=open(self.stderr_path, "w"))
        for port in self.ports.values():
            end = time.monotonic() + 10
            while True:
                assert self.proc.poll() is None, self.log()
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < end, "proxy not listening on %d" % port
                    time.sleep(0.05)

    def log(self):
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode

    def cleanup(self):
        if not os.environ.get("E2E_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def bridge(certs, mta):
    if not os.access(BIN, os.X_OK):
        pytest.fail("no smtpbridge binary at %s (run make, or set SMTPBRIDGE_BIN)" % BIN)
    b = Bridge(certs, mta)
    try:
        yield b
    finally:
        rc = b.stop()
        b.cleanup()
        assert rc == 0, "smtpbridge did not exit 0 on SIGTERM (rc=%r)" % rc
