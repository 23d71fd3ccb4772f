"""Misbehaving upstreams (scripted): every failure -> `421 4.x` to the client,
an `event=upstream_failed ... reason=` log line, and the upstream gets nothing
more -- in particular no plaintext after a failed STARTTLS step."""

import os
import re
import ssl
import time

import pytest

import bridgelib as bl
from bridgelib import TF, RawClient, client_ctx, free_port
from scripted_upstream import (DEFAULT_CAPS, BlackholeListener, ScriptedUpstream,
                               ehlo_reply, good_script, prelude)

GREET = b"220 upstream.test ESMTP scripted\r\n"
STARTTLS_STEPS = [("expect", b"STARTTLS")]


@pytest.fixture
def scripted(make_bridge, certs):
    """scripted(script, cert="upstream", upstream_opts=..., **ScriptedUpstream kw)
    -> (daemon, scripted upstream)"""
    ups = []

    def factory(script, cert="upstream", upstream_opts=None, global_opts=None,
                **kw):
        kw.setdefault("drain_timeout", 2.0)
        up = ScriptedUpstream(script, cert=os.path.join(certs, cert + ".pem"),
                              key=os.path.join(certs, cert + ".key"), **kw).start()
        ups.append(up)
        opts = {"reply_timeout": "2s", "connect_timeout": "2s"}
        opts.update(upstream_opts or {})
        d = make_bridge(up.address, upstream_opts=opts, global_opts=global_opts,
                        health="light")
        return d, up

    yield factory
    for up in ups:
        up.stop()


def client_gets_421(d, certs, listener="smtps", timeout=10):
    """Open a client session, EHLO after TLS; return (reply, data after it,
    closed?, seconds from EHLO to reply)."""
    host, port = d.addr(listener)
    if listener == "smtps":
        c = RawClient(host, port, tls_ctx=client_ctx(certs), timeout=timeout)
        assert c.read_reply().code == 220
    else:
        c = RawClient(host, port, timeout=timeout)
        assert c.read_reply().code == 220
        assert c.cmd("EHLO pre.test").code == 250
        assert c.cmd("STARTTLS").code == 220
        c.starttls(client_ctx(certs))
    with c:
        t0 = time.monotonic()
        r = c.cmd("EHLO client-secret.test", timeout=timeout)
        dt = time.monotonic() - t0
        rest, closed = c.read_until_close(5)
    return r, rest, closed, dt


def assert_failed(d, up, r, rest, closed, allow_quit=False, after=None):
    assert r.code == 421 and r.lines[0].startswith("421 4."), r
    assert closed, "session not closed after 421 (extra %r)" % rest
    assert rest == b"", rest
    line = d.wait_log(r"event=upstream_failed")
    assert "reason=" in line, line
    assert "level=warn" in line or "level=warning" in line or "level=error" in line, line
    c = up.wait_done(10)
    # nothing more than the allowed bytes after the failing step
    if after is not None:
        extra = c.bytes_after(after)
        assert extra is not None, "upstream never saw %r: %r" % (after, c)
        allowed = (b"", b"QUIT\r\n") if allow_quit else (b"",)
        assert extra in allowed, "upstream got bytes after %r: %r" % (after, extra)
    assert c.post_tls == b"", c
    assert b"client-secret" not in c.all_bytes + bytes(c.after_tls_fail)
    time.sleep(0.3)
    assert up.connection_count == 1, "proxy dialled the upstream again (fallback?)"
    return c


# ------------------------------------------------------------------ greeting

@pytest.mark.parametrize("greeting", [
    b"554 5.3.2 go away\r\n",
    b"HTTP/1.1 400 Bad Request\r\n\r\n",
    b"2200 too long a code\r\n",
    b"620 not a code\r\n",
    b"220-multi\r\n250 code changed inside reply\r\n",
], ids=["554", "http", "2200", "620", "code-change"])
def test_bad_greeting(scripted, certs, greeting):
    d, up = scripted([("send", greeting), ("hang", 3)])
    r, rest, closed, _ = client_gets_421(d, certs)
    c = assert_failed(d, up, r, rest, closed)
    assert bytes(c.pre_tls) in (b"", b"QUIT\r\n"), c


def test_eof_right_after_accept(scripted, certs):
    d, up = scripted([("close",)])
    assert_failed(d, up, *client_gets_421(d, certs)[:3])


def test_eof_mid_reply(scripted, certs):
    d, up = scripted([("send", GREET), ("expect", b"EHLO"),
                      ("send", b"250-upstream.test\r\n250-PIPE"), ("close",)])
    assert_failed(d, up, *client_gets_421(d, certs)[:3])


# ------------------------------------------------------------------ EHLO reply

@pytest.mark.parametrize("reply", [
    ehlo_reply(["upstream.test", "PIPELINING", "AUTH PLAIN LOGIN", "8BITMIME"]),
    ehlo_reply(["upstream.test", "XSTARTTLS", "AUTH PLAIN"]),
    ehlo_reply(["upstream.test", "STARTTLSX", "AUTH PLAIN"]),
    ehlo_reply(["upstream.test STARTTLS", "AUTH PLAIN"]),
    b"502 5.5.1 EHLO not implemented\r\n",
    b"250-upstream.test\r\n550-STARTTLS\r\n250 AUTH PLAIN\r\n",
], ids=["missing", "XSTARTTLS", "STARTTLSX", "in-first-line", "502", "code-change"])
def test_ehlo_without_starttls(scripted, certs, reply):
    d, up = scripted([("send", GREET), ("expect", b"EHLO"), ("send", reply), ("hang", 3)])
    r, rest, closed, _ = client_gets_421(d, certs)
    c = assert_failed(d, up, r, rest, closed, allow_quit=True, after=b"EHLO")
    assert b"STARTTLS" not in c.bytes_after(b"EHLO")
    assert b"HELO" not in c.bytes_after(b"EHLO")


def test_oversized_ehlo_reply(scripted, certs):
    """10,000-line EHLO reply: larger than buffer_size -> fail, bounded."""
    big = b"".join(b"250-X%05d\r\n" % i for i in range(10000)) + b"250 STARTTLS\r\n"
    d, up = scripted([("send", GREET), ("expect", b"EHLO"), ("send", big), ("hang", 3)])
    r, rest, closed, _ = client_gets_421(d, certs)
    assert_failed(d, up, r, rest, closed, allow_quit=True, after=b"EHLO")


def test_one_mib_reply_line(scripted, certs):
    d, up = scripted([("send", b"220 " + b"x" * (1 << 20) + b"\r\n"), ("hang", 3)])
    r, rest, closed, _ = client_gets_421(d, certs)
    c = assert_failed(d, up, r, rest, closed)
    assert bytes(c.pre_tls) in (b"", b"QUIT\r\n"), c


# ------------------------------------------------------------------ STARTTLS reply

@pytest.mark.parametrize("reply", [
    b"454 4.7.0 TLS not available due to temporary reason\r\n",
    b"250 2.0.0 sure\r\n",
    b"354 go ahead\r\n",
    b"220-Ready\r\n",                                    # incomplete reply, then silence
], ids=["454", "250", "354", "incomplete-220"])
def test_starttls_refused(scripted, certs, reply):
    d, up = scripted(prelude() + STARTTLS_STEPS + [("send", reply), ("hang", 4)])
    r, rest, closed, _ = client_gets_421(d, certs)
    assert_failed(d, up, r, rest, closed, after=b"STARTTLS")


@pytest.mark.parametrize("reply", [
    b"220 2.0.0 Ready\r\n250-evil\r\n250 AUTH PLAIN\r\n",
    b"220 2.0.0 Ready\r\n235 2.7.0 ok\r\n",
    b"220 2.0.0 Ready\r\nX",
], ids=["250-evil", "235", "one-byte"])
def test_bytes_after_starttls_220(scripted, certs, reply):
    """Response injection: anything after the 220 -> fail, no handshake."""
    d, up = scripted(prelude() + STARTTLS_STEPS + [("send", reply), ("hang", 4)])
    r, rest, closed, _ = client_gets_421(d, certs)
    assert_failed(d, up, r, rest, closed, after=b"STARTTLS")


# ------------------------------------------------------------------ TLS / certificates

NO_SAN_MATCH = "no subjectAltName DNS entry matches the configured server_name"
NO_ISSUER = "unable to verify the first certificate (its issuer is not in ca_file) (21)"


@pytest.mark.parametrize("cert,server_name,why", [
    ("upstream-selfsigned", "localhost", NO_ISSUER),
    ("upstream-wrongname", "localhost", "peer subject name mismatch"),
    ("upstream-expired", "localhost", "certificate has expired (10)"),
    ("upstream-untrusted", "localhost", NO_ISSUER),
    ("upstream-cnonly", "localhost", NO_SAN_MATCH),
    ("upstream-wildcard", "upstream.test", NO_SAN_MATCH),
    ("upstream", "upstream.test.evil", "peer subject name mismatch"),
], ids=["selfsigned", "wrongname", "expired", "untrusted", "cnonly", "partial-wildcard",
        "name-mismatch"])
def test_bad_certificate(scripted, certs, cert, server_name, why):
    """The client gets a 421 and the upstream never sees a command after
    the failed handshake; the log names the reason in words (wolfSSL's own
    string for a verification result is "unknown error number")."""
    d, up = scripted(good_script(), cert=cert,
                     upstream_opts={"server_name": server_name})
    r, rest, closed, _ = client_gets_421(d, certs)
    c = assert_failed(d, up, r, rest, closed)
    assert c.tls_started, c
    assert c.tls_version is None or c.tls_error, c     # never a usable session
    assert c.lines == [("plain", b"EHLO %s\r\n" % bl.PROXY_HOSTNAME.encode()),
                       ("plain", b"STARTTLS\r\n")], c.lines
    junk = bytes(c.after_tls_fail)
    for word in (b"EHLO", b"HELO", b"MAIL", b"AUTH", b"QUIT", b"RCPT"):
        assert word not in junk, junk
    line = d.wait_log(r"event=upstream_failed")
    assert re.search(r"reason=", line)
    assert why in line, line
    assert "unknown error number" not in line, line


def test_tls11_only_upstream(scripted, certs):
    d, up = scripted(good_script(), tls_min=ssl.TLSVersion.TLSv1,
                     tls_max=ssl.TLSVersion.TLSv1_1, ciphers="DEFAULT:@SECLEVEL=0")
    r, rest, closed, _ = client_gets_421(d, certs)
    c = assert_failed(d, up, r, rest, closed)
    assert c.tls_error, c


def test_upstream_min_tls_13(scripted, certs):
    d, up = scripted(good_script(), tls_max=ssl.TLSVersion.TLSv1_2,
                     upstream_opts={"min_tls": "1.3"})
    r, rest, closed, _ = client_gets_421(d, certs)
    c = assert_failed(d, up, r, rest, closed)
    assert c.tls_error, c


def test_verify_no_still_requires_tls(scripted, certs):
    """verify = no accepts the self-signed cert but never allows plaintext."""
    d, up = scripted(good_script(), cert="upstream-selfsigned",
                     upstream_opts={"verify": "no"})
    host, port = d.addr("smtps")
    with RawClient(host, port, tls_ctx=client_ctx(certs)) as c:
        c.read_reply()
        assert c.cmd("EHLO c.test").code == 250
        assert c.cmd("QUIT").code == 221
    conn = up.wait_done(5)
    assert conn.tls_version in ("TLSv1.2", "TLSv1.3")
    assert conn.lines[2:] == [("tls", b"EHLO c.test\r\n"), ("tls", b"QUIT\r\n")]
    # and no-STARTTLS upstream still fails with verify = no
    d2, up2 = scripted(prelude(caps=["upstream.test", "AUTH PLAIN"]) + [("hang", 3)],
                       upstream_opts={"verify": "no"})
    r, rest, closed, _ = client_gets_421(d2, certs)
    assert_failed(d2, up2, r, rest, closed, allow_quit=True, after=b"EHLO")


def test_good_scripted_upstream_control(scripted, certs):
    """Positive control for the scripted harness: a well-behaved script works,
    the proxy's upstream dialogue is exactly EHLO <hostname>, STARTTLS, and
    the SNI is the configured server_name."""
    d, up = scripted(good_script())
    host, port = d.addr("smtps")
    with RawClient(host, port, tls_ctx=client_ctx(certs)) as c:
        c.read_reply()
        e = c.cmd("EHLO c.test")
        assert e.code == 250 and "AUTH" in e.keywords() and "STARTTLS" not in e.keywords()
        assert c.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").code == 235
        assert c.cmd("MAIL FROM:<a@b.test>").code == 250
        assert c.cmd("QUIT").code == 221
    conn = up.wait_done(5)
    assert bytes(conn.pre_tls) == b"EHLO %s\r\nSTARTTLS\r\n" % bl.PROXY_HOSTNAME.encode()
    assert bytes(conn.post_tls) == (b"EHLO c.test\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"
                                    b"MAIL FROM:<a@b.test>\r\nQUIT\r\n")
    assert conn.sni == "localhost"


# ------------------------------------------------------------------ reachability & deadlines

def test_upstream_unreachable(make_bridge, certs):
    port = free_port()          # nothing listens there
    d = make_bridge("127.0.0.1:%d" % port, health="light")
    r, rest, closed, dt = client_gets_421(d, certs)
    assert r.code == 421 and r.lines[0].startswith("421 4."), r
    assert closed
    line = d.wait_log(r"event=upstream_failed")
    assert "reason=" in line


def test_upstream_connect_timeout(make_bridge, certs):
    bh = BlackholeListener().start()
    try:
        if not bh.probe_hangs():
            pytest.skip("could not make a hanging connect on loopback")
        d = make_bridge(bh.address, upstream_opts={"connect_timeout": "1s"},
                        health="light")
        r, rest, closed, dt = client_gets_421(d, certs)
        assert r.code == 421 and r.lines[0].startswith("421 4."), r
        assert 0.7 <= dt <= 4.0 * TF, dt
        line = d.wait_log(r"event=upstream_failed")
        assert "reason=" in line
    finally:
        bh.stop()


@pytest.mark.parametrize("where", ["greeting", "ehlo", "starttls"])
def test_upstream_reply_timeout(scripted, certs, where):
    script = {"greeting": [("hang", 6)],
              "ehlo": [("send", GREET), ("expect", b"EHLO"), ("hang", 6)],
              "starttls": prelude() + STARTTLS_STEPS + [("hang", 6)]}[where]
    d, up = scripted(script, upstream_opts={"reply_timeout": "1s"})
    r, rest, closed, dt = client_gets_421(d, certs)
    after = {"greeting": None, "ehlo": b"EHLO", "starttls": b"STARTTLS"}[where]
    assert_failed(d, up, r, rest, closed, allow_quit=(where != "starttls"), after=after)
    assert 0.7 <= dt <= 4.0 * TF, dt


def test_upstream_trickling_greeting_is_a_deadline(scripted, certs):
    """One byte every 0.3 s: the 1 s reply deadline must still fire."""
    d, up = scripted([("trickle", b"220 upstream.test ESMTP trickling very slowly\r\n", 0.3)],
                     upstream_opts={"reply_timeout": "1s"})
    r, rest, closed, dt = client_gets_421(d, certs)
    assert r.code == 421 and r.lines[0].startswith("421 4."), r
    assert dt <= 4.0 * TF, dt
    d.wait_log(r"event=upstream_failed")


def test_upstream_tls_handshake_stall(scripted, certs):
    """Upstream says 220 to STARTTLS, then never speaks TLS."""
    d, up = scripted(prelude() + STARTTLS_STEPS +
                     [("send", b"220 2.0.0 Ready\r\n"), ("hang", 6)],
                     upstream_opts={"reply_timeout": "1s"})
    r, rest, closed, dt = client_gets_421(d, certs)
    assert r.code == 421 and r.lines[0].startswith("421 4."), r
    assert dt <= 4.0 * TF, dt
    d.wait_log(r"event=upstream_failed")
    c = up.wait_done(10)
    extra = c.bytes_after(b"STARTTLS")
    # only a TLS ClientHello (record type 0x16) may follow, never SMTP text
    assert extra == b"" or extra[:1] == b"\x16", extra
