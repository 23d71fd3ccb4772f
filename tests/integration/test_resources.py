"""Client-facing TLS floor, session caps, bounded memory."""

import os
import socket
import ssl
import time

import pytest

import bridgelib as bl
from bridgelib import PASSWORD, USER, RawClient, client_ctx, make_message, smtp_ssl

# Peak RSS allowed for the daemon (MiB). Sanitizer builds: set
# SMTPBRIDGE_MAX_RSS_MB=0 to skip the check (shadow memory inflates RSS).
MAX_RSS_MB = int(os.environ.get("SMTPBRIDGE_MAX_RSS_MB", "64"))


def rss_kb(pid, field="VmHWM"):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def tls11_ctx(certs):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(certs, "ca.pem"))
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    return ctx


def test_client_tls11_refused_by_default(bridge, upstream, certs):
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with RawClient(*bridge.addr("smtps"), tls_ctx=tls11_ctx(certs)) as c:
            c.read_reply()
    assert upstream.connections == 0


def test_client_tls11_allowed_when_listener_opts_in(make_bridge, upstream, certs):
    d = make_bridge(upstream.address, listener_opts={"smtps": {"min_tls": "1.1"}})
    assert "min_tls" in d.log() or "1.1" in d.log(), "no start-up warning for min_tls 1.1"
    with RawClient(*d.addr("smtps"), tls_ctx=tls11_ctx(certs)) as c:
        assert c.sock.version() == "TLSv1.1"
        assert c.read_reply().code == 220
        assert c.cmd("EHLO legacy.test").code == 250
        assert c.cmd("QUIT").code == 221


def test_max_sessions_per_ip(make_bridge, upstream, certs):
    d = make_bridge(upstream.address, global_opts={"max_sessions_per_ip": "2"})
    held = []
    try:
        for _ in range(2):
            c = RawClient(*d.addr("sub"))
            assert c.read_reply().code == 220
            held.append(c)
        c3 = RawClient(*d.addr("sub"))
        held.append(c3)
        data, closed = c3.read_until_close(5)
        assert data.startswith(b"421 4.7.0"), data
        assert closed
    finally:
        for c in held:
            c.close()
    time.sleep(0.3)      # slots are released: the teardown health check works


def test_unread_pipelined_noops_bounded(make_bridge, upstream, certs):
    """~200k NOOPs whose replies are never read: the proxy must stop reading
    (backpressure) or close; memory stays bounded; the command deadline ends
    the session (checked in the log: the kernel may still be delivering
    queued replies to us after the proxy closed)."""
    d = make_bridge(upstream.address, global_opts={"command_timeout": "2s"})
    s = socket.create_connection(d.addr("sub"), timeout=5)
    s.setblocking(False)
    blob = b"NOOP\r\n" * 10000
    t0 = time.monotonic()
    sent = 0
    try:
        while sent < 20 * len(blob) and time.monotonic() - t0 < 5:
            try:
                sent += s.send(blob)
            except BlockingIOError:
                time.sleep(0.05)
            except OSError:
                break
        line = d.wait_log(r"event=session_end.*listener=sub", timeout=8)
        assert "timeout" in line or "error" in line, line
    finally:
        s.close()
    assert d.alive()
    if MAX_RSS_MB:
        assert rss_kb(d.proc.pid) < MAX_RSS_MB * 1024, rss_kb(d.proc.pid)


@pytest.mark.slow
@pytest.mark.deadline(150)
def test_memory_flat_during_large_message(bridge, upstream, certs):
    """Peak RSS after a 30 MB message stays small (bounded buffers)."""
    if not MAX_RSS_MB:
        pytest.skip("SMTPBRIDGE_MAX_RSS_MB=0")
    body = (b"x" * 76 + b"\r\n") * (30 * 1024 * 1024 // 78)
    msg = make_message("memory", body)
    s = smtp_ssl(certs, *bridge.addr("smtps"), timeout=60)
    s.login(USER, PASSWORD)
    assert s.sendmail("a@client.test", ["b@dest.test"], msg) == {}
    s.quit()
    assert len(upstream.wait_messages(1, timeout=30)) == 1
    hwm = rss_kb(bridge.proc.pid)
    assert hwm < MAX_RSS_MB * 1024, "daemon peak RSS %d KiB" % hwm
