"""Each client-side deadline fires (1 s values)."""

import base64
import socket
import time

import pytest

from bridgelib import TF, PASSWORD, USER, RawClient, client_ctx, closed_within, smtp_ssl


def test_handshake_timeout_silent_tcp(make_bridge, upstream, certs):
    d = make_bridge(upstream.address, global_opts={"handshake_timeout": "1s"})
    s = socket.create_connection(d.addr("smtps"), timeout=5)
    t0 = time.monotonic()
    try:
        assert closed_within(s, 4.0), "implicit port: silent client not closed"
    finally:
        s.close()
    assert 0.7 <= time.monotonic() - t0 <= 4.0 * TF
    assert upstream.connections == 0


def test_handshake_timeout_partial_client_hello(make_bridge, upstream, certs):
    d = make_bridge(upstream.address, global_opts={"handshake_timeout": "1s"})
    s = socket.create_connection(d.addr("smtps"), timeout=5)
    try:
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00")
        t0 = time.monotonic()
        assert closed_within(s, 4.0)
        assert time.monotonic() - t0 <= 4.0 * TF
    finally:
        s.close()


def test_handshake_timeout_slow_trickle(make_bridge, upstream, certs):
    """A deadline, not an idle timer: one byte every 0.2 s still gets cut."""
    d = make_bridge(upstream.address, global_opts={"handshake_timeout": "1s"})
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40
    s = socket.create_connection(d.addr("smtps"), timeout=5)
    t0 = time.monotonic()
    closed = False
    try:
        for i in range(len(hello)):
            try:
                s.sendall(hello[i:i + 1])
            except OSError:
                closed = True
                break
            if closed_within(s, 0.2):
                closed = True
                break
        assert closed, "trickling handshake not cut"
        assert time.monotonic() - t0 <= 4.0 * TF
    finally:
        s.close()


def test_handshake_timeout_after_starttls(make_bridge, upstream, certs):
    d = make_bridge(upstream.address, global_opts={"handshake_timeout": "1s"})
    with RawClient(*d.addr("sub")) as c:
        c.read_reply()
        assert c.cmd("STARTTLS").code == 220
        t0 = time.monotonic()
        assert closed_within(c.sock, 4.0)
        assert time.monotonic() - t0 >= 0.7


def test_command_timeout_pre_tls(make_bridge, upstream, certs):
    d = make_bridge(upstream.address, global_opts={"command_timeout": "1s"})
    with RawClient(*d.addr("sub")) as c:
        c.read_reply()
        t0 = time.monotonic()
        r = c.read_reply(timeout=5)
        dt = time.monotonic() - t0
        assert r.code == 421 and r.lines[0].startswith("421 4.4.2"), r
        assert 0.7 <= dt <= 4.0 * TF, dt
        data, closed = c.read_until_close(3)
        assert closed and data == b""


def test_command_timeout_is_a_deadline(make_bridge, upstream, certs):
    """Trickling a command one byte at a time does not extend the deadline."""
    d = make_bridge(upstream.address, global_opts={"command_timeout": "1s"})
    with RawClient(*d.addr("sub")) as c:
        c.read_reply()
        t0 = time.monotonic()
        got = b""
        for ch in b"NOOP and a lot of trickled text that never ends":
            try:
                c.sock.sendall(bytes([ch]))
            except OSError:
                break
            c.sock.settimeout(0.25)
            try:
                chunk = c.sock.recv(4096)
                if not chunk:
                    break
                got += chunk
            except socket.timeout:
                pass
            if b"421" in got:
                break
        dt = time.monotonic() - t0
        assert got.startswith(b"421 4.4.2"), got
        assert dt <= 4.0 * TF, dt


def test_command_timeout_first_ehlo_after_tls(make_bridge, upstream, certs):
    d = make_bridge(upstream.address, global_opts={"command_timeout": "1s"})
    with RawClient(*d.addr("smtps"), tls_ctx=client_ctx(certs)) as c:
        c.read_reply()
        t0 = time.monotonic()
        r = c.read_reply(timeout=5)
        assert r.code == 421 and r.lines[0].startswith("421 4.4.2"), r
        assert 0.7 <= time.monotonic() - t0 <= 4.0 * TF
        data, closed = c.read_until_close(3)
        assert closed


def test_idle_timeout_after_splice(make_bridge, upstream, certs):
    d = make_bridge(upstream.address, global_opts={"idle_timeout": "1s"})
    with RawClient(*d.addr("smtps"), tls_ctx=client_ctx(certs)) as c:
        c.read_reply()
        assert c.cmd("EHLO idle.test").code == 250
        # AUTH: certainly spliced now (whatever the proxy does with EHLO/NOOP)
        assert c.cmd(b"AUTH PLAIN " + base64.b64encode(
            b"\0" + USER.encode() + b"\0" + PASSWORD.encode())).code == 235
        t0 = time.monotonic()
        r = c.read_reply(timeout=6)
        dt = time.monotonic() - t0
        assert r.code == 421 and r.lines[0].startswith("421 4.4.2"), r
        assert 0.7 <= dt <= 4.0 * TF, dt
        data, closed = c.read_until_close(3)
        assert closed
    # the upstream connection is closed as well
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if any(e["event"] == "disconnect" for e in upstream.events):
            break
        time.sleep(0.05)
    assert any(e["event"] == "disconnect" for e in upstream.events), upstream.events
    line = d.wait_log(r"event=session_end")
    assert "reason=" in line


def test_activity_keeps_spliced_session_alive(make_bridge, upstream, certs):
    """idle_timeout is an idle timer: a session with traffic every 0.4 s lives
    past 1 s."""
    d = make_bridge(upstream.address, global_opts={"idle_timeout": "1s"})
    s = smtp_ssl(certs, *d.addr("smtps"))
    s.ehlo("busy.test")
    for _ in range(6):
        time.sleep(0.4)
        assert s.noop()[0] == 250
    s.login(USER, PASSWORD)
    s.quit()


def test_command_timeout_before_auth_after_tls(make_bridge, upstream, certs):
    """With the auth gate (require_auth = yes, the default) the session is
    not spliced until AUTH succeeds: the command deadline applies after the
    first post-TLS EHLO, idle_timeout does not."""
    d = make_bridge(upstream.address, global_opts={"idle_timeout": "30s",
                                                   "command_timeout": "1s"})
    with RawClient(*d.addr("smtps"), tls_ctx=client_ctx(certs)) as c:
        c.read_reply()
        assert c.cmd("EHLO slow.test").code == 250
        t0 = time.monotonic()
        try:
            r = c.read_reply(timeout=5)
        except socket.timeout:
            pytest.fail("no 421 within 5 s after EHLO with command_timeout=1s")
        dt = time.monotonic() - t0
        assert r.code == 421 and r.lines[0].startswith("421 4.4.2"), r
        assert dt <= 4.0 * TF, dt
