"""Adversarial cases from ../shared/SECURITY.md not covered elsewhere:
command and response injection variants, stripping variants, state across
the TLS switch, pre-TLS parsing abuse, after-TLS record/half-close/RST
handling, client-facing TLS (TLS 1.0, renegotiation) and the auth gate.

Each test asserts on what the client received, what the upstream saw, and
that the daemon is still healthy afterwards (a normal session works and its
fd count is back to the baseline taken before the attack)."""

import base64
import os
import re
import socket
import ssl
import subprocess
import threading
import time

import pytest

import bridgelib as bl
from bridgelib import (PASSWORD, TF, USER, MemTLS, RawClient, assert_healthy,
                       client_ctx, fd_count, rst_close)
from scripted_upstream import (DEFAULT_CAPS, ScriptedUpstream, ScriptError, _ConnIO,
                               ehlo_reply, good_script, prelude)

GREET = b"220 upstream.test ESMTP scripted\r\n"


def plain_b64(user, pw):
    return base64.b64encode(b"\0" + user.encode() + b"\0" + pw.encode())


AUTH_OK = b"AUTH PLAIN " + plain_b64(USER, PASSWORD)


# ---------------------------------------------------------------- helpers

class ExtIO(_ConnIO):
    """Scripted-upstream connection with a few extra steps:
    ("pause", secs)        sleep WITHOUT reading (a slow reader)
    ("read_data",)         read DATA lines up to "."; c.data_bytes = count
    ("stream", nbytes)     send a multi-line 214 reply of about nbytes
    """

    linger = False

    def close(self):
        # ("linger",): before closing, read until the proxy's EOF (bounded),
        # so that unread bytes (its close_notify) do not turn our close into
        # an RST, which would discard our last reply in the proxy's kernel
        # receive queue -- a real server flushes and reads to EOF as well.
        if self.linger and not self.closed:
            self.linger = False
            try:
                self.drain(3.0)
            except Exception:  # noqa: BLE001
                pass
        super().close()

    def run_step(self, step):
        op = step[0]
        if op == "linger":
            self.linger = True
            return True
        if op == "pause":
            time.sleep(step[1])
            return True
        if op == "read_data":
            n = 0
            for _ in range(10 ** 7):
                line = self.read_line(self.up.step_timeout)
                if line is None:
                    raise ScriptError("EOF/timeout inside DATA after %d bytes" % n)
                if line in (b".\r\n", b".\n"):
                    break
                n += len(line)
            self.c.data_bytes = n
            return True
        if op == "await_bytes":
            # ("await_bytes", n): record until n more raw bytes arrived (the
            # proxy's ClientHello, say), without consuming them as lines
            start = len(self.c.pre_tls) + len(self.c.post_tls)
            deadline = time.monotonic() + self.up.step_timeout
            while (len(self.c.pre_tls) + len(self.c.post_tls) - start < step[1]
                   and time.monotonic() < deadline and not self.eof):
                self._recv_some(min(0.1, deadline - time.monotonic()))
            self.buf.clear()
            return True
        if op == "stream":
            line = b"214-" + b"h" * 70 + b"\r\n"
            chunk = line * 800
            self.sock.settimeout(30 * TF)
            sent = 0
            try:
                while sent < step[1]:
                    self.sock.sendall(chunk)
                    sent += len(chunk)
                self.sock.sendall(b"214 end of help\r\n")
            except (OSError, ssl.SSLError) as e:
                raise ScriptError("stream failed after %d bytes: %s" % (sent, e))
            self.c.streamed = sent
            self.sock.settimeout(1.0)
            return True
        return super().run_step(step)


class ExtUpstream(ScriptedUpstream):
    def _run_conn(self, sock, c, script):   # as ScriptedUpstream, with ExtIO
        io = ExtIO(sock, c, self)
        try:
            for step in script:
                if self._stop.is_set():
                    break
                if not io.run_step(step):
                    break
            c.script_done = True
            if not io.closed:
                io.drain(self.drain_timeout)
        except ScriptError as e:
            c.script_error = str(e)
            if not io.closed:
                io.drain(self.drain_timeout)
        except Exception as e:  # noqa: BLE001
            c.script_error = "%s: %s" % (type(e).__name__, e)
        finally:
            io.close()
            c.end_time = time.monotonic()
            c.done.set()


def tls_prelude():
    """Up to and including the upstream's side of TLS."""
    return prelude() + [("expect", b"STARTTLS"), ("send", b"220 2.0.0 Ready\r\n"),
                        ("starttls",)]


def post_tls_caps():
    return ehlo_reply(["upstream.test", "PIPELINING", "AUTH PLAIN LOGIN", "8BITMIME"])


def session_ends(d):
    return d.events("session_end")


def wait_session_end(d, n, timeout=10.0):
    deadline = time.monotonic() + timeout * TF
    while time.monotonic() < deadline:
        ev = session_ends(d)
        if len(ev) >= n:
            return ev
        time.sleep(0.05)
    raise AssertionError("expected %d session_end lines, log:\n%s" % (n, d.log()[-3000:]))


def wait_until(pred, timeout, what):
    deadline = time.monotonic() + timeout * TF
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for " + what)


def implicit_client(d, certs, **kw):
    c = RawClient(*d.addr("smtps"), tls_ctx=client_ctx(certs), **kw)
    assert c.read_reply().code == 220
    return c


def starttls_client(d, certs):
    c = RawClient(*d.addr("sub"))
    assert c.read_reply().code == 220
    assert c.cmd("EHLO client.test").code == 250
    assert c.cmd("STARTTLS").code == 220
    c.starttls(client_ctx(certs))
    return c


def base_fds(d, certs, full=True):
    """fd count of an idle daemon after one warm-up session."""
    assert_healthy(d, certs, None, full=full)
    time.sleep(0.2)
    return fd_count(d.proc.pid)


# ================================================================ command injection

INJECT_CMDS = [AUTH_OK, b"MAIL FROM:<attacker@evil.test>", b"RCPT TO:<victim@dest.test>"]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n\n"], ids=["bare-lf", "mixed"])
def test_injection_credential_theft_same_write_bare_lf(bridge, upstream, certs, eol):
    fds = base_fds(bridge, certs)
    n0 = upstream.connections
    payload = b"STARTTLS" + eol + eol.join(INJECT_CMDS) + eol
    with RawClient(*bridge.addr("sub")) as c:
        c.read_reply()
        assert c.cmd("EHLO inj.test").code == 250
        c.send(payload)
        data, closed = c.read_until_close(5)
    assert closed, data
    assert re.match(rb"^(220 [^\r\n]*\r\n)?421 4\.7\.0[^\r\n]*\r\n$", data), data
    bridge.wait_log(r"event=starttls_injection")
    assert upstream.connections == n0
    assert_healthy(bridge, certs, fds)


@pytest.mark.parametrize("wait_220", [True, False], ids=["after-220", "before-220"])
@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "bare-lf"])
def test_injection_credential_theft_second_segment(bridge, upstream, certs, wait_220, eol):
    """The injected AUTH/MAIL/RCPT arrive in a second TCP segment (after the
    client read our 220, or right behind STARTTLS). They either trip the
    injection check or are fed to the TLS handshake, which must fail: no SMTP
    reply to them, no upstream connection."""
    fds = base_fds(bridge, certs)
    n0 = upstream.connections
    with RawClient(*bridge.addr("sub")) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.read_reply()
        assert c.cmd("EHLO inj.test").code == 250
        c.send(b"STARTTLS" + eol)
        if wait_220:
            r = c.read_reply()
            assert r.lines[0].startswith("220 2.0.0"), r
        c.send(eol.join(INJECT_CMDS) + eol)
        data, closed = c.read_until_close(8)
    assert closed, data
    for code in (b"235", b"250", b"334", b"354", b"530"):
        assert code not in data, data
    if not wait_220:
        assert data.startswith(b"220 2.0.0") or data.startswith(b"421 4.7.0"), data
    end = wait_session_end(bridge, 2)[-1]
    assert "handshake" in end["reason"] or "injection" in end["reason"], end["_line"]
    assert end["upstream"] == "-", end["_line"]
    time.sleep(0.3)
    assert upstream.connections == n0
    assert_healthy(bridge, certs, fds)


# ================================================================ response injection

def test_response_injection_second_segment_after_220(scripted_bridge, certs):
    """The upstream's 220 to STARTTLS, then (in a later segment, after the
    proxy has sent its ClientHello) a forged '235': the handshake fails, the
    client gets 421, the upstream sees nothing but the ClientHello."""
    d, up = scripted_bridge(
        prelude() + [("expect", b"STARTTLS"), ("send", b"220 2.0.0 Ready\r\n"),
                     ("await_bytes", 5), ("send", b"235 2.7.0 ok\r\n250 AUTH PLAIN\r\n"),
                     ("hang", 3)], cls=ExtUpstream)
    with implicit_client(d, certs) as c:
        r = c.cmd("EHLO client-secret.test")
        rest, closed = c.read_until_close(5)
    assert r.code == 421 and r.lines[0].startswith("421 4."), r
    assert closed and rest == b"", rest
    d.wait_log(r"event=upstream_failed.*stage=tls")
    conn = up.wait_done(10)
    after = conn.bytes_after(b"STARTTLS")
    assert after[:1] == b"\x16", after[:50]            # only TLS handshake bytes
    for word in (b"EHLO", b"AUTH", b"MAIL", b"QUIT", b"client-secret"):
        assert word not in after + bytes(conn.after_tls_fail), after
    assert conn.post_tls == b""
    assert up.connection_count == 1


@pytest.mark.parametrize("extra", [
    ehlo_reply(DEFAULT_CAPS),
    b"220 2.0.0 Ready to start TLS\r\n",
], ids=["ehlo-reply", "starttls-220"])
def test_response_injection_glued_to_greeting(scripted_bridge, certs, extra):
    """The upstream pipelines its later replies behind the greeting: bytes
    after a dialogue reply fail the session (README: 421 4.4.2)."""
    d, up = scripted_bridge([("send", GREET + extra), ("hang", 3)])
    with implicit_client(d, certs) as c:
        r = c.cmd("EHLO c.test")
        rest, closed = c.read_until_close(5)
    assert r.code == 421 and r.lines[0].startswith("421 4."), r
    assert closed and rest == b""
    d.wait_log(r"event=upstream_failed")
    conn = up.wait_done(10)
    assert b"STARTTLS" not in bytes(conn.pre_tls), conn
    assert conn.post_tls == b"" and not conn.tls_started


# ================================================================ stripping (extra variants)

@pytest.mark.parametrize("reply", [
    b"250 STARTTLS\r\n",                                     # only line = domain
    ehlo_reply(["upstream.test", "AUTH STARTTLS", "8BITMIME"]),   # a parameter
    ehlo_reply(["upstream.test", "X-STARTTLS", "8BITMIME"]),
    ehlo_reply(["upstream.test", "START TLS"]),
], ids=["single-line", "as-parameter", "x-prefixed", "split"])
def test_stripping_variants(scripted_bridge, certs, reply):
    d, up = scripted_bridge([("send", GREET), ("expect", b"EHLO"), ("send", reply),
                             ("hang", 3)])
    with implicit_client(d, certs) as c:
        r = c.cmd("EHLO c.test")
        rest, closed = c.read_until_close(5)
    assert r.code == 421 and r.lines[0].startswith("421 4."), r
    assert closed and rest == b""
    conn = up.wait_done(10)
    assert conn.bytes_after(b"EHLO") in (b"", b"QUIT\r\n"), conn
    assert conn.post_tls == b"" and not conn.tls_started


# ================================================================ state across the switch

def test_auth_gate_pre_tls_auth_not_carried_over(bridge, upstream, certs):
    """Valid credentials sent before TLS are refused (530) and do not
    authenticate the TLS session: MAIL after TLS still hits the gate."""
    fds = base_fds(bridge, certs)
    n0 = upstream.connections
    n_auth = len([e for e in upstream.events if e["event"] == "auth"])
    with RawClient(*bridge.addr("sub")) as c:
        c.read_reply()
        assert c.cmd("EHLO pre.test").code == 250
        r = c.cmd(AUTH_OK)
        assert r.code == 530, r
        assert c.cmd("STARTTLS").code == 220
        c.starttls(client_ctx(certs))
        assert c.cmd("EHLO post.test").code == 250
        for cmd in ("MAIL FROM:<a@client.test>", "RCPT TO:<b@dest.test>", "DATA", "BDAT 5 LAST"):
            r = c.cmd(cmd)
            assert r.code == 530 and r.lines[0].startswith("530 5.7.0 Authentication required"), \
                (cmd, r)
        assert c.cmd(AUTH_OK).code == 235
        assert c.cmd("MAIL FROM:<a@client.test>").code == 250
        assert c.cmd("QUIT").code == 221
    auths = [e for e in upstream.events if e["event"] == "auth"][n_auth:]
    assert len(auths) == 1 and auths[0]["success"], auths     # only the post-TLS one
    assert_healthy(bridge, certs, fds)


def test_pre_tls_dialogue_never_reaches_upstream(scripted_bridge, certs):
    """Every pre-TLS token (EHLO/HELO names, MAIL, AUTH, NOOP argument) stays
    with the proxy: the upstream's bytes are exactly the proxy's own EHLO +
    STARTTLS, then (in TLS) the client's post-TLS commands."""
    d, up = scripted_bridge(good_script())
    with RawClient(*d.addr("sub")) as c:
        c.read_reply()
        assert c.cmd("EHLO pre-secret-ehlo.test").code == 250
        assert c.cmd("HELO pre-secret-helo.test").code == 250
        assert c.cmd("MAIL FROM:<pre-secret-mail@x.test>").code == 530
        assert c.cmd(b"AUTH PLAIN " + plain_b64("pre-secret-user", "pre-secret-pw")).code == 530
        assert c.cmd("NOOP pre-secret-noop").code == 250
        assert c.cmd("RSET").code == 250
        assert c.cmd("STARTTLS").code == 220
        c.starttls(client_ctx(certs))
        e = c.cmd("EHLO post.test")
        assert e.code == 250 and "pre-secret" not in e.text
        assert c.cmd("QUIT").code == 221
    conn = up.wait_done(10)
    assert bytes(conn.pre_tls) == b"EHLO %s\r\nSTARTTLS\r\n" % bl.PROXY_HOSTNAME.encode()
    assert bytes(conn.post_tls) == b"EHLO post.test\r\nQUIT\r\n", conn.post_tls
    assert b"pre-secret" not in conn.all_bytes
    assert "pre-secret" not in d.log()          # never logged either


# ================================================================ pre-TLS parsing

@pytest.mark.parametrize("line,codes", [
    (b"NO\x00OP", (500,)),
    (b"NOOP\x00", (500,)),
    (b"\x00" * 40, (500,)),
    (b"NOOP\rRSET", (500,)),
    (b"EHLO a\rb.test", (500,)),
    (b"\r\r\r", (500,)),
    (b"MA\xc9L FROM:<a@b.test>", (500, 530)),
    (b"\xff\xfe\xfd\xfc", (500, 530)),
    (b"MAIL FROM:<\xe9\xe8@b.test>", (500, 530)),
    (b"EHLO \xc3\xa9t\xc3\xa9.test", (250, 500, 501)),
    (b"NOOP \x80\x81\x82", (250, 500, 501)),
], ids=["nul-in-verb", "nul-trailing", "all-nul", "bare-cr", "bare-cr-ehlo", "only-cr",
        "8bit-verb", "8bit-garbage", "8bit-mail", "utf8-ehlo", "8bit-noop-arg"])
def test_pre_tls_odd_bytes(bridge, upstream, certs, line, codes):
    with RawClient(*bridge.addr("sub")) as c:
        c.read_reply()
        r = c.cmd(line)
        assert r.code in codes and len(r.lines) in (1, 3), (line, r)
        # no echo of client input
        odd = [bytes([b]) for b in line if b < 0x20 or b >= 0x7f]
        for b in odd:
            assert b not in r.raw.rstrip(b"\r\n").replace(b"\r\n", b""), r
        # the session survives and is in sync
        assert c.cmd("NOOP").code == 250
        assert c.cmd("EHLO again.test").code == 250
        assert c.cmd("QUIT").code == 221
    assert upstream.connections == 0


def test_pre_tls_commands_split_across_segments(bridge, upstream, certs):
    """Commands arriving a few bytes per TCP segment (CR and LF apart, too)
    are reassembled; STARTTLS split that way still leads to a clean TLS
    session, and nothing of it is taken as injected bytes."""
    with RawClient(*bridge.addr("sub")) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.read_reply()
        for part in (b"EH", b"LO split", b".test\r", b"\n"):
            c.send(part)
            time.sleep(0.05)
        assert c.read_reply().code == 250
        for part in (b"NO", b"OP\r", b"\nRS", b"ET\r\n"):
            c.send(part)
            time.sleep(0.05)
        assert c.read_reply().code == 250 and c.read_reply().code == 250
        for part in (b"STAR", b"TTLS", b"\r", b"\n"):
            c.send(part)
            time.sleep(0.05)
        assert c.read_reply().lines[0].startswith("220 2.0.0")
        c.starttls(client_ctx(certs))
        assert c.cmd("EHLO after.test").code == 250
        assert c.cmd(AUTH_OK).code == 235
        assert c.cmd("QUIT").code == 221
    assert bridge.events("starttls_injection") == []


def test_pre_tls_25_bad_commands_pipelined(bridge, upstream, certs):
    """25 bad commands in one write: answered in order until max_errors (10)
    is reached, then 421 4.7.0 and close; nothing after that is answered."""
    fds = base_fds(bridge, certs)
    n0 = upstream.connections
    bad = [b"MAIL FROM:<a@b.test>", b"XYZZY", b"NO\x00OP", b"AUTH LOGIN", b"GET / HTTP/1.0"]
    payload = b"".join(bad[i % len(bad)] + b"\r\n" for i in range(25))
    with RawClient(*bridge.addr("sub")) as c:
        c.read_reply()
        c.send(payload)
        data, closed = c.read_until_close(5)
    assert closed, data
    lines = data.split(b"\r\n")
    assert lines[-1] == b""
    lines = lines[:-1]
    # ten refused commands (the tenth may or may not get its own reply
    # before the 421), then nothing more
    assert 10 <= len(lines) <= 11, lines
    assert all(ln[:3] in (b"500", b"530") for ln in lines[:-1]), lines
    assert lines[-1].startswith(b"421 4.7.0"), lines
    end = wait_session_end(bridge, 2)[-1]
    assert "too many errors" in end["reason"], end["_line"]
    assert upstream.connections == n0
    assert_healthy(bridge, certs, fds)


# ================================================================ after TLS

def test_several_tls_records_in_one_segment(bridge, upstream, certs):
    """Five commands as five TLS records (one split across two records) in a
    single TCP write: every one is answered, in order, gate included."""
    fds = base_fds(bridge, certs)
    n0 = upstream.connections
    sock = socket.create_connection(bridge.addr("smtps"), timeout=10 * TF)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = MemTLS(sock, client_ctx(certs))
    try:
        t.handshake()
        assert t.read_reply().code == 220
        blob = t.records(b"EHLO records.test\r\n", b"NOOP\r\n", AUTH_OK + b"\r\n",
                         b"MA", b"IL FROM:<alice@client.test>\r\n",
                         b"RCPT TO:<bob@dest.test>\r\nDATA\r\n")
        assert blob.count(b"\x17\x03\x03") >= 6, "expected >= 6 records"
        sock.sendall(blob)
        codes = [t.read_reply().code for _ in range(6)]
        assert codes == [250, 250, 235, 250, 250, 354], codes
        t.send(bl.dot_stuff(bl.make_message("records")))
        assert t.read_reply().code == 250
        assert t.cmd("QUIT").code == 221
    finally:
        sock.close()
    assert len(upstream.wait_messages(1)) == 1
    assert_healthy(bridge, certs, fds)


@pytest.mark.deadline(90)
def test_slow_client_reader_upstream_streams(scripted_bridge, certs):
    """After the splice the upstream sends ~20 MB (a huge HELP reply) while
    the client does not read for 3 s: the proxy applies backpressure and its
    memory stays flat; then every byte arrives."""
    nbytes = 20 * 1024 * 1024
    stream = tls_prelude() + [
        ("expect", b"EHLO"), ("send", post_tls_caps()),
        ("expect", b"AUTH"), ("send", b"235 2.7.0 ok\r\n"),
        ("expect", b"HELP"), ("stream", nbytes), ("serve",)]
    d, up = scripted_bridge(None, cls=ExtUpstream, scripts=[good_script(), stream],
                            max_connections=8, step_timeout=30)
    assert_healthy(d, certs, None, full=True)          # warm-up (connection 0)
    time.sleep(0.3)
    rss0 = bl.rss_now_kb(d.proc.pid)
    with implicit_client(d, certs, timeout=60) as c:
        assert c.cmd("EHLO slow.test").code == 250
        assert c.cmd(AUTH_OK).code == 235
        c.send(b"HELP\r\n")
        time.sleep(3)
        rss_mid = bl.rss_now_kb(d.proc.pid)
        total = 0
        got_end = False
        deadline = time.monotonic() + 60 * TF
        tail = b""
        while time.monotonic() < deadline:
            chunk = c.sock.recv(65536)
            if not chunk:
                break
            total += len(chunk)
            tail = (tail + chunk)[-64:]
            if tail.endswith(b"214 end of help\r\n"):
                got_end = True
                break
        rss_end = bl.rss_now_kb(d.proc.pid)
        c.buf = b""
        assert got_end, "stream incomplete: %d bytes" % total
        assert c.cmd("QUIT").code == 221
    conn = up.wait_done(10, i=1)
    assert total == conn.streamed + len(b"214 end of help\r\n"), (total, conn.streamed)
    print("slow client reader: RSS %d -> %d (paused) -> %d KiB" % (rss0, rss_mid, rss_end))
    if bl.RSS_CHECKS:
        assert rss_mid - rss0 < 4096, (rss0, rss_mid)
        assert rss_end - rss0 < 4096, (rss0, rss_end)


def until_354():
    """Upstream script: STARTTLS, EHLO, AUTH, MAIL, RCPT, DATA up to 354."""
    return tls_prelude() + [
        ("expect", b"EHLO"), ("send", post_tls_caps()),
        ("expect", b"AUTH"), ("send", b"235 2.7.0 ok\r\n"),
        ("expect", b"MAIL"), ("send", b"250 ok\r\n"),
        ("expect", b"RCPT"), ("send", b"250 ok\r\n"),
        ("expect", b"DATA"), ("send", b"354 go\r\n")]


@pytest.mark.deadline(90)
def test_slow_upstream_reader_client_uploads(scripted_bridge, certs):
    """The client uploads ~20 MB while the upstream reads nothing for 3 s:
    memory stays flat, then the whole message arrives."""
    body_lines = 20 * 1024 * 1024 // 78
    script = until_354() + [
        ("pause", 3), ("read_data",), ("send", b"250 2.0.0 queued as SLOW\r\n"), ("serve",)]
    d, up = scripted_bridge(None, cls=ExtUpstream, scripts=[good_script(), script],
                            max_connections=8, step_timeout=30)
    assert_healthy(d, certs, None, full=True)
    time.sleep(0.3)
    rss0 = bl.rss_now_kb(d.proc.pid)
    with implicit_client(d, certs, timeout=60) as c:
        assert c.cmd("EHLO up.test").code == 250
        assert c.cmd(AUTH_OK).code == 235
        assert c.cmd("MAIL FROM:<a@b.test>").code == 250
        assert c.cmd("RCPT TO:<c@d.test>").code == 250
        assert c.cmd("DATA").code == 354
        payload = (b"y" * 76 + b"\r\n") * body_lines + b".\r\n"
        err = []

        def upload():
            try:
                c.sock.sendall(payload)
            except OSError as e:
                err.append(e)
        th = threading.Thread(target=upload, daemon=True)
        th.start()
        time.sleep(2.5)
        rss_mid = bl.rss_now_kb(d.proc.pid)
        th.join(60 * TF)
        assert not th.is_alive() and not err, err
        r = c.read_reply(timeout=60)
        assert r.code == 250 and "SLOW" in r.text, r
        rss_end = bl.rss_now_kb(d.proc.pid)
        assert c.cmd("QUIT").code == 221
    conn = up.wait_done(10, i=1)
    assert conn.data_bytes == len(payload) - 3, (conn.data_bytes, len(payload))
    print("slow upstream reader: RSS %d -> %d (paused) -> %d KiB" % (rss0, rss_mid, rss_end))
    if bl.RSS_CHECKS:
        assert rss_mid - rss0 < 4096, (rss0, rss_mid)
        assert rss_end - rss0 < 4096, (rss0, rss_end)


@pytest.mark.deadline(90)
def test_half_close_after_upload_behind_slow_upstream(scripted_bridge, certs):
    """The client sends a 4 MB message and QUIT and half-closes at once,
    while the upstream reads nothing for 2 s. The proxy queues TLS records
    before sending them (write-behind), so its half-close must follow them:
    the upstream receives the whole message, then QUIT, then EOF; the client
    gets 250 and 221, then the close. (Fails if the half-close is sent
    before the queued records. Whether the socket is still full when the
    client's FIN is read, which defers the half-close, depends on the
    kernel's buffer sizes, so that case is not forced here.)"""
    body_lines = 4 * 1024 * 1024 // 78
    script = until_354() + [
        ("pause", 2), ("read_data",), ("send", b"250 2.0.0 queued as HALF\r\n"),
        ("expect", b"QUIT"), ("send", b"221 2.0.0 bye\r\n"), ("hang", 10)]
    d, up = scripted_bridge(None, cls=ExtUpstream, scripts=[good_script(), script],
                            max_connections=8, step_timeout=30)
    assert_healthy(d, certs, None, full=True)          # warm-up (connection 0)
    payload = (b"h" * 76 + b"\r\n") * body_lines + b".\r\n"
    sock = socket.create_connection(d.addr("smtps"), timeout=30 * TF)
    t = MemTLS(sock, client_ctx(certs), timeout=30)
    try:
        t.handshake()
        assert t.read_reply().code == 220
        assert t.cmd("EHLO half.test").code == 250
        assert t.cmd(AUTH_OK).code == 235
        assert t.cmd("MAIL FROM:<a@b.test>").code == 250
        assert t.cmd("RCPT TO:<c@d.test>").code == 250
        assert t.cmd("DATA").code == 354
        blob = t.records(payload, b"QUIT\r\n")   # encrypted here: one thread per SSLObject
        err = []

        def upload():
            try:
                sock.sendall(blob)
                sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                err.append(e)
        th = threading.Thread(target=upload, daemon=True)
        th.start()
        r = t.read_reply(timeout=60)
        assert r.code == 250 and "HALF" in r.text, r
        assert t.read_reply(timeout=10).code == 221
        th.join(10 * TF)
        assert not th.is_alive() and not err, err
        rest, closed = t.read_until_close(10)
        assert closed and rest == b"", rest
    finally:
        sock.close()
    conn = up.wait_done(20, i=1)
    assert conn.script_error is None, conn.script_error
    assert conn.data_bytes == len(payload) - 3, (conn.data_bytes, len(payload))
    assert conn.closed_by_peer, "the upstream never saw the proxy's half-close"


def test_client_rst_mid_data(bridge, upstream, certs):
    """Client sends half a message, then RST: the daemon logs the session
    end, closes its upstream connection, stores nothing, stays healthy."""
    fds = base_fds(bridge, certs)
    n0 = upstream.connections
    n_disc = len([e for e in upstream.events if e["event"] == "disconnect"])
    c = implicit_client(bridge, certs)
    assert c.cmd("EHLO abort.test").code == 250
    assert c.cmd(AUTH_OK).code == 235
    assert c.cmd("MAIL FROM:<alice@client.test>").code == 250
    assert c.cmd("RCPT TO:<bob@dest.test>").code == 250
    assert c.cmd("DATA").code == 354
    c.send(b"Subject: aborted\r\n\r\n" + (b"z" * 76 + b"\r\n") * 2000)
    time.sleep(0.3)
    port = c.sock.getsockname()[1]
    rst_close(c.sock)
    line = bridge.wait_log(r"event=session_end client=127\.0\.0\.1:%d " % port)
    ev = bl.parse_log_line(line)
    assert ev["reason"].startswith("client"), line
    wait_until(lambda: len([e for e in upstream.events if e["event"] == "disconnect"]) > n_disc,
               5, "the upstream connection to be closed")
    time.sleep(0.3)
    assert upstream.messages() == []
    assert_healthy(bridge, certs, fds)


RST_PHASES = ["pre-tls", "mid-handshake", "after-tls", "upstream-dialogue",
              "follow", "mid-splice"]


@pytest.mark.parametrize("phase", RST_PHASES)
def test_client_rst_at_each_phase(scripted_bridge, certs, phase):
    if phase == "upstream-dialogue":
        first = [("sleep", 3)] + good_script()          # slow greeting
    else:
        first = good_script()
    d, up = scripted_bridge(None, scripts=[first, good_script()], max_connections=8)
    fds = fd_count(d.proc.pid)
    if phase == "pre-tls":
        s = socket.create_connection(d.addr("sub"), timeout=5)
        assert s.recv(100).startswith(b"220")
        s.sendall(b"EHLO x.test\r\n")
        time.sleep(0.2)
        rst_close(s)
    elif phase == "mid-handshake":
        s = socket.create_connection(d.addr("smtps"), timeout=5)
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(20))
        time.sleep(0.2)
        rst_close(s)
    else:
        c = implicit_client(d, certs)
        if phase == "upstream-dialogue":
            time.sleep(0.5)
            assert up.connected
        elif phase == "follow":
            assert c.cmd("EHLO x.test").code == 250
        elif phase == "mid-splice":
            assert c.cmd("EHLO x.test").code == 250
            assert c.cmd(AUTH_OK).code == 235
            assert c.cmd("MAIL FROM:<a@b.test>").code == 250
            c.send(b"RCPT TO:<c@d.test>\r\n")
        time.sleep(0.2)
        rst_close(c.sock)
    ends = wait_session_end(d, 1)
    assert len(ends) == 1, ends
    if phase in ("pre-tls", "mid-handshake"):
        assert ends[0]["upstream"] == "-", ends[0]["_line"]
        time.sleep(0.3)
        assert up.connection_count == 0
    else:
        conn = up.conn(0)
        wait_until(lambda: conn.closed_by_peer or conn.done.is_set(), 10,
                   "the proxy to close its upstream connection")
        if phase == "upstream-dialogue":
            assert conn.all_bytes == b"", conn          # nothing was sent upstream
    assert_healthy(d, certs, fds)


def test_half_close_pre_tls_gets_221(bridge, upstream, certs):
    fds = base_fds(bridge, certs)
    with RawClient(*bridge.addr("sub")) as c:
        c.read_reply()
        c.send(b"QUIT\r\n")
        c.sock.shutdown(socket.SHUT_WR)
        data, closed = c.read_until_close(5)
    assert data.startswith(b"221 2.0.0"), data
    assert closed
    assert_healthy(bridge, certs, fds)


@pytest.mark.parametrize("where", ["follow", "spliced", "after-data"])
def test_half_close_still_gets_final_reply(scripted_bridge, certs, where):
    """QUIT (or the end of DATA plus QUIT) then a TCP shutdown(SHUT_WR) with
    no close_notify: the client still receives the upstream's final replies
    before the proxy closes. (Scripted upstream: aiosmtpd itself drops its
    221 once it sees the forwarded half-close.)"""
    d, up = scripted_bridge(good_script()[:-1] + [("linger",), ("serve",)], cls=ExtUpstream)
    fds = fd_count(d.proc.pid)
    sock = socket.create_connection(d.addr("smtps"), timeout=10 * TF)
    t = MemTLS(sock, client_ctx(certs))
    try:
        t.handshake()
        assert t.read_reply().code == 220
        assert t.cmd("EHLO half.test").code == 250
        tail = b"QUIT\r\n"
        expect = [221]
        if where in ("spliced", "after-data"):
            assert t.cmd(AUTH_OK).code == 235
            assert t.cmd("MAIL FROM:<alice@client.test>").code == 250
        if where == "after-data":
            assert t.cmd("RCPT TO:<bob@dest.test>").code == 250
            assert t.cmd("DATA").code == 354
            tail = bl.dot_stuff(bl.make_message("half-close")) + b"QUIT\r\n"
            expect = [250, 221]
        t.send(tail)
        sock.shutdown(socket.SHUT_WR)
        got = [t.read_reply().code for _ in expect]
        assert got == expect, got
        rest, closed = t.read_until_close(5)
        assert closed and rest == b"", rest
    finally:
        sock.close()
    conn = up.wait_done(10)
    assert conn.lines[-1] == ("tls", b"QUIT\r\n"), conn.lines[-3:]
    end = wait_session_end(d, 1)[-1]
    assert end["reason"] == "client quit", end["_line"]
    assert_healthy(d, certs, fds)


def test_upstream_closes_right_after_final_250(scripted_bridge, certs):
    """The upstream sends '250 queued' and closes at once (no QUIT dialogue):
    the client still receives the 250, then the close."""
    script = until_354() + [
        ("read_data",), ("send", b"250 2.0.0 Ok: queued as CLOSEAFTER\r\n"), ("close",)]
    d, up = scripted_bridge(script, cls=ExtUpstream)
    with implicit_client(d, certs) as c:
        assert c.cmd("EHLO c.test").code == 250
        assert c.cmd(AUTH_OK).code == 235
        assert c.cmd("MAIL FROM:<a@b.test>").code == 250
        assert c.cmd("RCPT TO:<c@d.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(bl.dot_stuff(bl.make_message("close after")))
        r = c.read_reply()
        assert r.code == 250 and "CLOSEAFTER" in r.text, r
        rest, closed = c.read_until_close(5)
    assert closed and rest == b"", rest
    end = wait_session_end(d, 1)[-1]
    assert end["reason"] == "upstream closed connection after a 250 reply", end["_line"]


@pytest.mark.parametrize("xclient", ["no", "yes"])
def test_upstream_closing_a_session_itself_is_named_with_its_reply(scripted_bridge, certs,
                                                                   xclient):
    """An upstream that ends a spliced session itself (here a 421 after
    MAIL, as a server timing out does) is not a quit: the client gets the
    421, and the reason names it. The same with the XCLIENT watcher on."""
    script = tls_prelude() + [("expect", b"EHLO")]
    if xclient == "yes":
        script += [
            ("send", ehlo_reply(["upstream.test", "PIPELINING", "AUTH PLAIN", "XCLIENT ADDR PORT"])),
            ("expect", b"XCLIENT "), ("send", b"220 upstream.test ESMTP\r\n"),
            ("expect", b"EHLO")]
    script += [
        ("send", post_tls_caps()),
        ("expect", b"AUTH"), ("send", b"235 2.7.0 ok\r\n"),
        ("expect", b"MAIL"), ("send", b"421 4.4.2 mx.test Error: timeout exceeded\r\n"),
        ("close",)]
    d, up = scripted_bridge(script, upstream_opts={"xclient": xclient})
    with implicit_client(d, certs) as c:
        assert c.cmd("EHLO c.test").code == 250
        assert c.cmd(AUTH_OK).code == 235
        r = c.cmd("MAIL FROM:<a@b.test>")
        assert r.code == 421 and "timeout exceeded" in r.text, r
        rest, closed = c.read_until_close(5)
    assert closed and rest == b"", rest
    end = wait_session_end(d, 1)[-1]
    assert end["reason"] == "upstream closed connection after a 421 reply", end["_line"]


def test_upstream_closing_mid_reply_keeps_the_last_complete_one(scripted_bridge, certs):
    """EOF in the middle of a reply line: the client gets the bytes that
    came, and the reason names the last complete reply (the partial line
    is no reply), here the 250 to MAIL."""
    script = tls_prelude() + [
        ("expect", b"EHLO"), ("send", post_tls_caps()),
        ("expect", b"AUTH"), ("send", b"235 2.7.0 ok\r\n"),
        ("expect", b"MAIL"), ("send", b"250 ok\r\n"),
        ("expect", b"RCPT"), ("send", b"55"), ("close",)]
    d, up = scripted_bridge(script)
    with implicit_client(d, certs) as c:
        assert c.cmd("EHLO c.test").code == 250
        assert c.cmd(AUTH_OK).code == 235
        assert c.cmd("MAIL FROM:<a@b.test>").code == 250
        c.send(b"RCPT TO:<c@d.test>\r\n")
        rest, closed = c.read_until_close(5)
    assert closed and rest == b"55", rest
    end = wait_session_end(d, 1)[-1]
    assert end["reason"] == "upstream closed connection after a 250 reply", end["_line"]


def test_upstream_closing_before_any_spliced_reply_is_named_bare(scripted_bridge, certs):
    """The splice begins after AUTH; an upstream that closes before any
    reply in it ends the session "upstream closed connection" (the 235
    relayed before the splice is not counted as its last reply)."""
    script = tls_prelude() + [
        ("expect", b"EHLO"), ("send", post_tls_caps()),
        ("expect", b"AUTH"), ("send", b"235 2.7.0 ok\r\n"), ("close",)]
    d, up = scripted_bridge(script)
    with implicit_client(d, certs) as c:
        assert c.cmd("EHLO c.test").code == 250
        assert c.cmd(AUTH_OK).code == 235
        rest, closed = c.read_until_close(5)
    assert closed and rest == b"", rest
    end = wait_session_end(d, 1)[-1]
    assert end["reason"] == "upstream closed connection", end["_line"]


# ================================================================ client-facing TLS

def tls10_ctx(certs):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(certs, "ca.pem"))
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1
    return ctx


@pytest.mark.parametrize("listener", ["smtps", "sub"])
def test_client_tls10_refused_by_default(bridge, upstream, certs, listener):
    fds = base_fds(bridge, certs)
    n0 = upstream.connections
    with pytest.raises((ssl.SSLError, ConnectionError, OSError, EOFError)):
        if listener == "smtps":
            with RawClient(*bridge.addr("smtps"), tls_ctx=tls10_ctx(certs)) as c:
                c.read_reply()
        else:
            with RawClient(*bridge.addr("sub")) as c:
                c.read_reply()
                assert c.cmd("STARTTLS").code == 220
                c.starttls(tls10_ctx(certs))
                c.cmd("EHLO old.test")
    end = wait_session_end(bridge, 2)[-1]
    assert "handshake" in end["reason"], end["_line"]
    assert upstream.connections == n0
    assert_healthy(bridge, certs, fds)


def test_client_renegotiation_refused(bridge, upstream, certs):
    """openssl s_client on TLS 1.2 asks for a renegotiation ('R'): the proxy
    must not renegotiate (wolfSSL is built without it): the connection is
    refused/closed or the request ignored, and the daemon stays healthy."""
    fds = base_fds(bridge, certs)
    n0 = upstream.connections
    host, port = bridge.addr("smtps")
    p = subprocess.Popen(["openssl", "s_client", "-tls1_2", "-connect", "%s:%d" % (host, port),
                          "-CAfile", os.path.join(certs, "ca.pem"), "-servername", "localhost",
                          "-crlf"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(1.0 * TF)
        p.stdin.write(b"EHLO reneg.test\n")
        p.stdin.flush()
        time.sleep(0.8 * TF)
        p.stdin.write(b"R\n")
        p.stdin.flush()
        time.sleep(1.5 * TF)
        try:
            p.stdin.write(b"NOOP\n")
            p.stdin.flush()
            time.sleep(0.8 * TF)
            p.stdin.write(b"QUIT\n")
            p.stdin.flush()
        except BrokenPipeError:
            pass
        out, _ = p.communicate(timeout=10 * TF)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    text = out.decode("utf-8", "replace")
    assert "Protocol  : TLSv1.2" in text or "TLSv1.2" in text, text[-3000:]
    assert "RENEGOTIATING" in text, text[-3000:]
    # A completed renegotiation prints a second certificate chain / verify
    # result after RENEGOTIATING; neither may appear.
    after = text.split("RENEGOTIATING", 1)[1]
    assert "depth=" not in after and "verify return:1" not in after, after[-2000:]
    end = wait_session_end(bridge, 2)[-1]
    print("renegotiation: session_end reason=%s" % end["reason"])
    assert_healthy(bridge, certs, fds)


# ================================================================ auth gate

def auth_gate_session(d, certs, steps):
    """steps: list of (bytes to send, expected code). Returns the replies."""
    out = []
    with implicit_client(d, certs) as c:
        assert c.cmd("EHLO gate.test").code == 250
        for data, code in steps:
            r = c.cmd(data)
            assert r.code == code, (data, r)
            out.append(r)
        assert c.cmd("MAIL FROM:<alice@client.test>").code == 250
        assert c.cmd("QUIT").code == 221
    return out


@pytest.mark.parametrize("mech", ["login", "plain-initial", "plain-no-initial"])
def test_auth_gate_mechanisms(bridge, upstream, certs, mech):
    b = lambda s: base64.b64encode(s.encode())        # noqa: E731
    steps = {
        "login": [(b"AUTH LOGIN", 334), (b(USER), 334), (b(PASSWORD), 235)],
        "plain-initial": [(AUTH_OK, 235)],
        "plain-no-initial": [(b"AUTH PLAIN", 334), (plain_b64(USER, PASSWORD), 235)],
    }[mech]
    auth_gate_session(bridge, certs, steps)
    ok = bridge.wait_log(r"event=auth_ok")
    assert bl.parse_log_line(ok)["ip"] == "127.0.0.1"
    assert 'user="%s"' % USER in ok, ok
    end = bridge.wait_log(r"event=session_end.*listener=smtps")
    assert 'user="%s"' % USER in end, end
    assert bridge.events("auth_failed") == []
    log = bridge.log()
    for secret in (PASSWORD.encode(), base64.b64encode(PASSWORD.encode()),
                   plain_b64(USER, PASSWORD)):
        assert secret.decode() not in log


@pytest.mark.parametrize("mech", ["plain", "login"])
def test_auth_gate_failure_logged_once_without_password(make_bridge, upstream, certs, mech):
    d = make_bridge(upstream.address, global_opts={"log_level": "debug"})
    bad_pw = "Wr0ng-Pa55-%s-XYZ" % mech
    with implicit_client(d, certs) as c:
        assert c.cmd("EHLO gate.test").code == 250
        if mech == "plain":
            r = c.cmd(b"AUTH PLAIN " + plain_b64("bob", bad_pw))
        else:
            assert c.cmd("AUTH LOGIN").code == 334
            assert c.cmd(base64.b64encode(b"bob")).code == 334
            r = c.cmd(base64.b64encode(bad_pw.encode()))
        assert r.code == 535, r
        assert c.cmd("MAIL FROM:<a@b.test>").code == 530
        assert c.cmd("QUIT").code == 221
    d.wait_log(r"event=session_end.*listener=smtps")
    fails = d.events("auth_failed")
    assert len(fails) == 1, fails
    assert re.search(r' level=warning sid=[0-9a-f]+ event=auth_failed ip=127\.0\.0\.1 '
                     r'user="bob" code=535$', fails[0]["_line"]), fails[0]["_line"]
    end = bl.parse_log_line(d.wait_log(r"event=session_end.*listener=smtps"))
    assert end["user"] == "-", end
    log = d.log()
    for secret in (bad_pw.encode(), base64.b64encode(bad_pw.encode()),
                   plain_b64("bob", bad_pw), base64.b64encode(b"\0bob\0" + bad_pw.encode())[:16]):
        assert secret.decode() not in log, secret
    assert "Wr0ng" not in log
