"""STARTTLS command injection (client -> proxy): bytes after the STARTTLS line
close the session with 421 4.7.0; nothing is relayed; the upstream is never
dialled."""

import base64
import re
import socket
import ssl
import time

import pytest

from bridgelib import PASSWORD, USER, RawClient, client_ctx

AUTH = b"AUTH PLAIN " + base64.b64encode(b"\0" + USER.encode() + b"\0" + PASSWORD.encode())

# The proxy may or may not send its 220 before noticing the extra bytes; what
# matters is the 421 4.7.0 and the close.
RX_421 = re.compile(rb"^(220 [^\r\n]*\r\n)?421 4\.7\.0[^\r\n]*\r\n$")


@pytest.mark.parametrize("payload", [
    b"STARTTLS\r\nRSET\r\n",
    b"STARTTLS\nRSET\n",
    b"STARTTLS\r\n" + AUTH + b"\r\nMAIL FROM:<attacker@evil.test>\r\nRCPT TO:<victim@dest.test>\r\n",
    b"STARTTLS\r\n\r\n",
    b"STARTTLS\r\nX",
], ids=["crlf", "bare-lf", "credential-theft", "empty-line", "one-byte"])
def test_starttls_injection_same_write(bridge, upstream, certs, payload):
    with RawClient(*bridge.addr("sub")) as c:
        c.read_reply()
        assert c.cmd("EHLO inj.test").code == 250
        c.send(payload)
        data, closed = c.read_until_close(5)
    assert closed, "session still open after injection; got %r" % data
    assert RX_421.match(data), data
    time.sleep(0.3)
    assert upstream.connections == 0, upstream.events
    assert bridge.alive()


def test_starttls_injection_second_segment(bridge, upstream, certs):
    """The injected line arrives in a second TCP segment before the client
    could have read the 220: it must never be executed or relayed either way
    (it will be fed to the TLS handshake, which fails, or dropped)."""
    with RawClient(*bridge.addr("sub")) as c:
        c.read_reply()
        assert c.cmd("EHLO inj.test").code == 250
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.send(b"STARTTLS\r\n")
        c.send(b"RSET\r\n")
        data, closed = c.read_until_close(12)
    assert closed, data
    assert data.startswith(b"220 ") or data.startswith(b"421 4.7.0"), data
    assert b"250" not in data, data                 # RSET was never answered
    time.sleep(0.3)
    assert upstream.connections == 0


def test_injected_bytes_not_carried_into_tls(bridge, upstream, certs):
    """A client that sends STARTTLS, waits for 220, then handshakes and EHLOs
    normally gets a clean session: sanity check that the normal path works
    (complements the injection tests)."""
    with RawClient(*bridge.addr("sub")) as c:
        c.read_reply()
        assert c.cmd("EHLO x.test").code == 250
        assert c.cmd("STARTTLS").code == 220
        c.starttls(client_ctx(certs))
        assert c.cmd("EHLO y.test").code == 250
        assert c.cmd("QUIT").code == 221
    assert upstream.ehlo_names()[-1] == "y.test"


def test_tls_client_hello_to_plaintext_port(bridge, upstream, certs):
    """A TLS ClientHello sent to the STARTTLS port is just a bad command."""
    with RawClient(*bridge.addr("sub")) as c:
        c.read_reply()
        ctx = client_ctx(certs)
        try:
            ctx.wrap_socket(c.sock, server_hostname="localhost")
            ok = True
        except (ssl.SSLError, OSError):
            ok = False
        assert not ok
    time.sleep(0.2)
    assert upstream.connections == 0


def test_plaintext_to_implicit_port(bridge, upstream, certs):
    s = socket.create_connection(bridge.addr("smtps"), timeout=5)
    try:
        s.sendall(b"EHLO plain.test\r\nMAIL FROM:<a@b.test>\r\n")
        data = b""
        try:
            for _ in range(20):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        assert b"250" not in data and b"220 " not in data, data
    finally:
        s.close()
    time.sleep(0.2)
    assert upstream.connections == 0


def test_http_request_to_plaintext_port(bridge, upstream):
    with RawClient(*bridge.addr("sub")) as c:
        c.read_reply()
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data, closed = c.read_until_close(3)
        assert b"HTTP/" not in data
        assert all(ln[:3] in (b"530", b"500", b"502", b"421", b"")
                   for ln in data.split(b"\r\n")), data
    assert upstream.connections == 0
