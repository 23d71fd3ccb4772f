"""The shipped fail2ban filter (config/fail2ban-filter.conf) against the
daemon's real auth_failed lines: one match per failed AUTH, with the
client's address, and none for successful logins or other lines -- also
when the SASL user name tries to forge log fields or lines."""

import base64
import configparser
import os
import re
import shutil
import socket
import subprocess

import pytest

import bridgelib as bl
from bridgelib import PASSWORD, USER, RawClient, client_ctx, free_port

FILTER = os.path.join(bl.REPO, "config", "fail2ban-filter.conf")

HOSTILE_USERS = [
    "bob",
    'x" ip=6.6.6.6 user="y',
    "eve\n2026-12-01T00:00:00.000Z level=warning sid=1 event=auth_failed ip=6.6.6.6 user=",
]


def failregex():
    cp = configparser.RawConfigParser()
    cp.read(FILTER)
    lines = [ln.strip() for ln in cp.get("Definition", "failregex").splitlines() if ln.strip()]
    return [re.compile(ln.replace("<HOST>", r"(?P<host>\S+)")) for ln in lines]


def have_ipv6():
    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


def fail_auth(d, listener, certs, user, mech):
    host, port = d.addr(listener)
    with RawClient(host, port, tls_ctx=client_ctx(certs)) as c:
        assert c.read_reply().code == 220
        assert c.cmd("EHLO f2b.test").code == 250
        if mech == "plain":
            r = c.cmd(b"AUTH PLAIN " + base64.b64encode(
                b"\0" + user.encode() + b"\0not-the-password"))
        else:
            assert c.cmd("AUTH LOGIN").code == 334
            assert c.cmd(base64.b64encode(user.encode())).code == 334
            r = c.cmd(base64.b64encode(b"not-the-password"))
        assert r.code == 535, r
        assert c.cmd("QUIT").code == 221


@pytest.fixture
def f2b_log(make_bridge, upstream, certs):
    listeners = {"smtps": {"listen": "127.0.0.1:%d" % free_port(), "mode": "implicit"},
                 "sub": {"listen": "127.0.0.1:%d" % free_port(), "mode": "starttls"}}
    v6 = have_ipv6()
    if v6:
        listeners["smtps6"] = {"listen": "[::1]:%d" % free_port("::1"), "mode": "implicit"}
    d = make_bridge(upstream.address, listeners=listeners,
                    global_opts={"max_errors": "50"})
    expected = []
    for i, user in enumerate(HOSTILE_USERS):
        fail_auth(d, "smtps", certs, user, "plain" if i % 2 == 0 else "login")
        expected.append("127.0.0.1")
    if v6:
        fail_auth(d, "smtps6", certs, "carol", "login")
        expected.append("::1")
    # a success must not count
    s = bl.smtp_ssl(certs, *d.addr("smtps"))
    s.login(USER, PASSWORD)
    s.quit()
    d.wait_log(r"event=auth_ok")
    for _ in range(100):
        if len(d.events("session_end")) >= len(expected) + 1:
            break
        import time
        time.sleep(0.05)
    assert len(d.events("auth_failed")) == len(expected), d.log()[-3000:]
    return d, expected


def test_fail2ban_filter_python_translation(f2b_log):
    d, expected = f2b_log
    rxs = failregex()
    hosts = []
    for line in d.log().splitlines():
        for rx in rxs:
            m = rx.search(line)
            if m:
                hosts.append(m.group("host"))
                assert "event=auth_failed" in line, line
                break
    assert sorted(hosts) == sorted(expected), (hosts, d.log()[-3000:])
    assert "6.6.6.6" not in hosts


def test_fail2ban_regex_matches_real_log(f2b_log, tmp_path):
    if shutil.which("fail2ban-regex") is None:
        pytest.skip("fail2ban-regex not installed (apt-get install fail2ban)")
    d, expected = f2b_log
    log = tmp_path / "daemon.log"
    log.write_text(d.log())
    cp = subprocess.run(["fail2ban-regex", "-o", "ip", str(log), FILTER],
                        capture_output=True, timeout=60)
    assert cp.returncode == 0, cp.stderr.decode()
    hosts = cp.stdout.decode().split()
    if sorted(hosts) != sorted(expected):
        full = subprocess.run(["fail2ban-regex", str(log), FILTER], capture_output=True,
                              timeout=60).stdout.decode()
        pytest.fail("fail2ban-regex found %r, want %r\n%s" % (hosts, expected, full[-4000:]),
                    pytrace=False)
