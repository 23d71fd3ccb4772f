"""The proxy's own dialogue: greeting, pre-TLS commands, EHLO rewriting,
plaintext exception, limits."""

import re
import time

import pytest

import bridgelib as bl
from bridgelib import (PASSWORD, USER, RawClient, client_ctx, make_message,
                       smtp_ssl)

GREETING_RX = re.compile(r"^220 %s ESMTP" % re.escape(bl.PROXY_HOSTNAME))


def test_greeting_is_proxys_own(bridge, upstream, certs):
    with RawClient(*bridge.addr("sub")) as c:
        g = c.read_reply()
        assert GREETING_RX.match(g.lines[0]), g
        assert len(g.lines) == 1
        assert c.cmd("QUIT").code == 221
    with RawClient(*bridge.addr("smtps"), tls_ctx=client_ctx(certs)) as c:
        g = c.read_reply()
        assert GREETING_RX.match(g.lines[0]), g
        assert "upstream.test" not in g.text and "smtpbridge-test-upstream" not in g.text
        ehlo = c.cmd("EHLO client.test")
        assert ehlo.code == 250
        # upstream pre-TLS greeting never shown; post-TLS reply is upstream's
        assert "smtpbridge-test-upstream" not in c.received.decode("latin-1")
        assert c.cmd("QUIT").code == 221


def test_pre_tls_ehlo_lists_starttls_not_auth(bridge, upstream, certs):
    with RawClient(*bridge.addr("sub")) as c:
        c.read_reply()
        e = c.cmd("EHLO pre-tls-secret-name.test")
        assert e.code == 250, e
        kws = e.keywords()
        assert "STARTTLS" in kws, e
        assert not any(k.startswith("AUTH") for k in kws), e
        assert e.lines[0].startswith("250-" + bl.PROXY_HOSTNAME) or \
            e.lines[0].startswith("250 " + bl.PROXY_HOSTNAME), e
        assert "pre-tls-secret-name" not in e.text  # no echo of client input
        assert c.cmd("STARTTLS").code == 220
        c.starttls(client_ctx(certs))
        e2 = c.cmd("EHLO post-tls.test")
        assert e2.code == 250, e2
        kws2 = e2.keywords()
        assert "STARTTLS" not in kws2, e2
        assert any(k == "AUTH" for k in kws2), e2
        assert e2.lines[0].startswith("250-upstream.test"), e2   # upstream's reply
        assert c.cmd(b"AUTH PLAIN " + __import__("base64").b64encode(
            b"\0" + USER.encode() + b"\0" + PASSWORD.encode())).code == 235
        assert c.cmd("QUIT").code == 221
    # The upstream never sees the pre-TLS EHLO name.
    names = upstream.ehlo_names()
    assert "pre-tls-secret-name.test" not in names
    assert names == [bl.PROXY_HOSTNAME, "post-tls.test"], names
    # ... and saw the proxy's own EHLO before TLS, the client's only after
    ev = [(e["name"], bool(e["tls"])) for e in upstream.events if e["event"] == "ehlo"]
    assert ev == [(bl.PROXY_HOSTNAME, False), ("post-tls.test", True)], ev


def test_implicit_ehlo_reply_has_auth_not_starttls(bridge, upstream, certs):
    with RawClient(*bridge.addr("smtps"), tls_ctx=client_ctx(certs)) as c:
        c.read_reply()
        e = c.cmd("EHLO client.test")
        kws = e.keywords()
        assert "STARTTLS" not in kws and "AUTH" in kws, e
        # the rest of the upstream's capability list is verbatim
        assert [k for k in kws] == ["SIZE", "8BITMIME", "AUTH", "PIPELINING", "HELP"], e


def test_pre_tls_commands(bridge, upstream, certs):
    with RawClient(*bridge.addr("sub")) as c:
        c.read_reply()
        assert c.cmd("HELO old.test").code == 250
        assert c.cmd("NOOP").code == 250
        assert c.cmd("RSET").code == 250
        assert c.cmd("EHLO x.test").code == 250
        for cmd in ["MAIL FROM:<a@b.test>", "RCPT TO:<c@d.test>", "DATA",
                    "AUTH PLAIN AGFsaWNlAHg=", "VRFY root", "XCLIENT ADDR=1.2.3.4",
                    "HELP", "BDAT 10 LAST"]:
            r = c.cmd(cmd)
            assert r.code == 530 and r.lines[0].startswith("530 5.7.0"), (cmd, r)
            assert "Must issue a STARTTLS command first" in r.text, (cmd, r)
        q = c.cmd("QUIT")
        assert q.code == 221
        data, closed = c.read_until_close(3)
        assert closed
    assert upstream.connections == 0


def test_starttls_inside_tls_refused(bridge, upstream, certs):
    with RawClient(*bridge.addr("smtps"), tls_ctx=client_ctx(certs)) as c:
        c.read_reply()
        r = c.cmd("STARTTLS")
        assert r.code == 503 and r.lines[0].startswith("503 5.5.1"), r
        assert c.cmd("EHLO c.test").code == 250
        # spliced now: the upstream answers (our upstream refuses with 503)
        assert c.cmd("STARTTLS").code == 503
        assert c.cmd("NOOP").code == 250
        assert c.cmd("QUIT").code == 221
    with RawClient(*bridge.addr("sub")) as c:
        c.read_reply()
        assert c.cmd("STARTTLS").code == 220
        c.starttls(client_ctx(certs))
        r = c.cmd("STARTTLS")
        assert r.code == 503 and r.lines[0].startswith("503 5.5.1"), r
        assert c.cmd("EHLO c.test").code == 250
        assert c.cmd("QUIT").code == 221


def test_max_errors(make_bridge, upstream, certs):
    d = make_bridge(upstream.address, global_opts={"max_errors": "3"})
    with RawClient(*d.addr("sub")) as c:
        c.read_reply()
        replies = []
        for _ in range(6):
            try:
                replies.append(c.cmd("MAIL FROM:<a@b.test>"))
            except (EOFError, ConnectionError):
                break
            if replies[-1].code == 421:
                break
        codes = [r.code for r in replies]
        assert codes[-1] == 421 and replies[-1].lines[0].startswith("421 4.7.0"), replies
        assert 3 <= len(codes) <= 4, codes
        assert all(x == 530 for x in codes[:-1]), codes
        data, closed = c.read_until_close(3)
        assert closed
    assert upstream.connections == 0


def test_long_line_pre_tls(bridge, upstream):
    with RawClient(*bridge.addr("sub")) as c:
        c.read_reply()
        r = c.cmd(b"NOOP " + b"a" * 600)
        assert r.lines[0].startswith("500 5.5.2"), r
        # the session survives and is in sync: the tail was not taken as a command
        assert c.cmd("NOOP").code == 250
        assert c.cmd("QUIT").code == 221


def test_huge_line_without_newline_pre_tls(make_bridge, upstream):
    """10 MiB with no newline: memory stays bounded (the proxy may discard and
    keep reading), the over-long line is answered with 500 5.5.2 (or the
    session is closed with 421) and at the latest the command deadline ends
    the session."""
    d = make_bridge(upstream.address, global_opts={"command_timeout": "3s"})
    with RawClient(*d.addr("sub")) as c:
        c.read_reply()
        got = b""
        c.sock.setblocking(False)
        chunk = b"A" * 65536
        t0 = time.monotonic()
        for _ in range(160):
            if time.monotonic() - t0 > 8:
                break
            try:
                c.sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                break
            try:
                got += c.sock.recv(65536)
            except BlockingIOError:
                pass
            except OSError:
                break
        c.sock.setblocking(True)
        try:
            c.sock.sendall(b"\r\n")
        except OSError:
            pass
        c.buf = got
        data, closed = c.read_until_close(6)
    assert closed, "session not closed by the command deadline: %r" % data[:200]
    assert data.startswith(b"500 5.5.2") or data.startswith(b"421 4."), data[:200]
    assert d.alive()
    assert upstream.connections == 0


def test_allowed_plaintext_client(make_bridge, upstream, certs):
    d = make_bridge(upstream.address,
                    listener_opts={"sub": {"allow_plaintext_from": "127.0.0.0/8, ::1/128"}})
    with RawClient(*d.addr("sub")) as c:
        g = c.read_reply()
        assert GREETING_RX.match(g.lines[0]), g
        e = c.cmd("EHLO printer.lan")
        assert e.code == 250
        kws = e.keywords()
        assert "STARTTLS" in kws and "AUTH" in kws, e     # relayed + STARTTLS added
        assert e.lines[0].startswith("250-upstream.test"), e
        import base64
        assert c.cmd(b"AUTH PLAIN " + base64.b64encode(
            b"\0" + USER.encode() + b"\0" + PASSWORD.encode())).code == 235
        assert c.cmd("MAIL FROM:<printer@lan.test>").code == 250
        assert c.cmd("RCPT TO:<bob@dest.test>").code == 250
        assert c.cmd("DATA").code == 354
        msg = make_message("from printer")
        c.send(bl.dot_stuff(msg))
        assert c.read_reply().code == 250
        assert c.cmd("QUIT").code == 221
    meta, body = upstream.wait_messages(1)[0]
    assert body == msg and meta["ehlo_names"][-1] == "printer.lan"
    # upstream leg still TLS
    assert meta["tls"] in ("TLSv1.2", "TLSv1.3")


def test_allowed_plaintext_client_may_still_starttls(make_bridge, upstream, certs):
    d = make_bridge(upstream.address,
                    listener_opts={"sub": {"allow_plaintext_from": "127.0.0.1/32"}})
    s = bl.smtp_starttls(certs, *d.addr("sub"))
    s.login(USER, PASSWORD)
    assert s.sendmail("a@client.test", ["b@dest.test"], make_message("tls anyway")) == {}
    s.quit()
    assert len(upstream.wait_messages(1)) == 1


def test_plaintext_not_allowed_for_other_networks(make_bridge, upstream, certs):
    d = make_bridge(upstream.address,
                    listener_opts={"sub": {"allow_plaintext_from": "10.0.0.0/8"}})
    with RawClient(*d.addr("sub")) as c:
        c.read_reply()
        e = c.cmd("EHLO printer.lan")
        assert e.lines[0].startswith("250-" + bl.PROXY_HOSTNAME), e
        assert not any(k.startswith("AUTH") for k in e.keywords()), e
        for cmd in ["AUTH PLAIN AGFsaWNlAHNlY3JldA==", "MAIL FROM:<a@b.test>"]:
            r = c.cmd(cmd)
            assert r.code == 530, (cmd, r)
        assert c.cmd("QUIT").code == 221
    time.sleep(0.2)
    assert upstream.connections == 0


def test_session_end_log_line(bridge, upstream, certs):
    s = smtp_ssl(certs, *bridge.addr("smtps"))
    s.login(USER, PASSWORD)
    s.sendmail("a@client.test", ["b@dest.test"], make_message("log"))
    s.quit()
    line = bridge.wait_log(r"event=session_end.*listener=smtps")
    d = bl.parse_log_line(line)
    for k in ("sid", "client", "listener", "client_tls", "upstream", "upstream_tls",
              "bytes_c2u", "bytes_u2c", "duration_ms", "reason"):
        assert k in d, (k, line)
    assert d["client"].startswith("127.0.0.1:")
    assert d["upstream"] == upstream.address
    assert d["client_tls"] in ("TLSv1.2", "TLSv1.3") and d["upstream_tls"] in ("TLSv1.2", "TLSv1.3")
    assert int(d["bytes_c2u"]) > 0 and int(d["bytes_u2c"]) > 0


def test_sni_sent_upstream(bridge, upstream, certs):
    s = smtp_ssl(certs, *bridge.addr("smtps"))
    s.ehlo("x.test")
    s.quit()
    assert upstream.sni_names == ["localhost"]


def test_idle_tcp_and_unfinished_handshake_do_not_dial_upstream(bridge, upstream, certs):
    import socket
    socks = []
    for lst in ("smtps", "sub"):
        s = socket.create_connection(bridge.addr(lst), timeout=5)
        socks.append(s)
    # a partial ClientHello on the implicit port
    s = socket.create_connection(bridge.addr("smtps"), timeout=5)
    s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    socks.append(s)
    # pre-TLS dialogue on the STARTTLS port, no STARTTLS
    c = RawClient(*bridge.addr("sub"))
    c.read_reply()
    assert c.cmd("EHLO x.test").code == 250
    assert c.cmd("NOOP").code == 250
    time.sleep(1.0)
    assert upstream.connections == 0
    for s in socks:
        s.close()
    c.close()
    # (A completed client handshake may dial: DESIGN.md "Dial the upstream
    # once the client is on TLS".)


def test_named_upstream(make_bridge, upstream, certs, tmp_path):
    """[upstream NAME] + listener `upstream = NAME`."""
    d = make_bridge("127.0.0.1:1",        # default upstream: unreachable
                    listener_opts={"smtps": {"upstream": "real"}},
                    extra=[("upstream real", {
                        "address": upstream.address, "tls": "starttls",
                        "ca_file": certs + "/ca.pem", "server_name": "localhost"})],
                    health=None)
    s = smtp_ssl(certs, *d.addr("smtps"))
    s.login(USER, PASSWORD)
    assert s.sendmail("a@client.test", ["b@dest.test"], make_message("named")) == {}
    s.quit()
    assert len(upstream.wait_messages(1)) == 1


def test_rsa_server_certificate(make_bridge, upstream, certs):
    d = make_bridge(upstream.address, listener_opts={
        "smtps": {"cert": certs + "/rsa-proxy.pem", "key": certs + "/rsa-proxy.key"}})
    with RawClient(*d.addr("smtps"), tls_ctx=client_ctx(certs)) as c:
        assert c.read_reply().code == 220
        assert c.cmd("QUIT").code == 221
