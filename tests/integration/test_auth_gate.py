"""The auth gate (listener require_auth, default yes) and allow_from.

config/smtpbridge.conf: after TLS the proxy follows the dialogue until the
upstream accepts AUTH (235) and refuses MAIL/RCPT/DATA before that with
"530 5.7.0 Authentication required"; then it splices. `require_auth = no` is
allowed only together with allow_from. allow_from: others are disconnected at
accept."""

import base64
import os
import socket
import time

import pytest

import bridgelib as bl
from bridgelib import (BIN, PASSWORD, USER, RawClient, client_ctx, describe,
                       free_port, run)
from scripted_upstream import ScriptedUpstream, good_script

AUTH_OK = b"AUTH PLAIN " + base64.b64encode(b"\0" + USER.encode() + b"\0" + PASSWORD.encode())
AUTH_BAD = b"AUTH PLAIN " + base64.b64encode(b"\0" + USER.encode() + b"\0wrong")


@pytest.fixture
def scripted_good(make_bridge, certs):
    up = ScriptedUpstream(good_script(), cert=os.path.join(certs, "upstream.pem"),
                          key=os.path.join(certs, "upstream.key"), drain_timeout=1).start()
    d = make_bridge(up.address, health="light")
    yield d, up
    up.stop()


def test_mail_before_auth_never_reaches_upstream(scripted_good, certs):
    d, up = scripted_good
    with RawClient(*d.addr("smtps"), tls_ctx=client_ctx(certs)) as c:
        c.read_reply()
        assert c.cmd("EHLO gate.test").code == 250
        for cmd in ("MAIL FROM:<a@b.test>", "RCPT TO:<c@d.test>", "DATA"):
            r = c.cmd(cmd)
            assert r.code == 530 and r.lines[0].startswith("530 5.7.0"), (cmd, r)
        assert c.cmd("QUIT").code == 221
    conn = up.wait_done(5)
    assert b"MAIL" not in conn.post_tls and b"RCPT" not in conn.post_tls, conn.post_tls
    assert b"DATA" not in conn.post_tls


def test_failed_auth_keeps_gate_closed(bridge, upstream, certs):
    with RawClient(*bridge.addr("smtps"), tls_ctx=client_ctx(certs)) as c:
        c.read_reply()
        assert c.cmd("EHLO gate.test").code == 250
        r = c.cmd(AUTH_BAD)
        assert r.code == 535, r                       # the upstream's own reply
        assert c.cmd("MAIL FROM:<a@b.test>").code == 530
        assert c.cmd(AUTH_OK).code == 235
        assert c.cmd("MAIL FROM:<a@b.test>").code == 250   # now spliced
        assert c.cmd("QUIT").code == 221


def test_pipelined_auth_and_mail_after_tls(bridge, upstream, certs):
    """AUTH and MAIL in one write: MAIL must wait for the 235 (or be refused),
    never pass the gate before the upstream accepted AUTH."""
    with RawClient(*bridge.addr("smtps"), tls_ctx=client_ctx(certs)) as c:
        c.read_reply()
        assert c.cmd("EHLO gate.test").code == 250
        c.send(AUTH_BAD + b"\r\nMAIL FROM:<a@b.test>\r\n")
        r1, r2 = c.read_reply(), c.read_reply()
        assert r1.code == 535, r1
        assert r2.code == 530, r2
        assert c.cmd("QUIT").code == 221


def test_require_auth_no_needs_allow_from(certs, tmp_path):
    if not os.access(BIN, os.X_OK):
        pytest.skip("no binary")
    conf = tmp_path / "c.conf"
    conf.write_text(bl.render_config([
        ("global", {"hostname": "proxy.test"}),
        ("upstream", {"address": "127.0.0.1:%d" % free_port(), "ca_file": certs + "/ca.pem"}),
        ("listener smtps", {"listen": "127.0.0.1:%d" % free_port(), "mode": "implicit",
                            "cert": certs + "/proxy.pem", "key": certs + "/proxy.key",
                            "require_auth": "no"}),
    ]))
    cp = run([BIN, "-t", "-c", str(conf)], timeout=20)
    assert cp.returncode == 1, describe(cp)
    assert b"require_auth" in cp.stderr, describe(cp)


def test_allow_from_disconnects_others(make_bridge, upstream, certs):
    d = make_bridge(upstream.address, listener_opts={"sub": {"allow_from": "10.0.0.0/8"}},
                    health=None)
    s = socket.create_connection(d.addr("sub"), timeout=5)
    try:
        s.settimeout(5)
        data = b""
        try:
            for _ in range(10):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        assert not data.startswith(b"220"), data
    finally:
        s.close()
    # the other listener is unaffected
    with RawClient(*d.addr("smtps"), tls_ctx=client_ctx(certs)) as c:
        assert c.read_reply().code == 220
    time.sleep(0.2)
