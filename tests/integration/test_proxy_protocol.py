"""PROXY protocol (both directions) and XCLIENT toward the upstream.

Listener keys: accept_proxy = yes, proxy_from = CIDRs (the load balancers
trusted to say who the client is; allow_from then applies to the header's
source). Upstream keys: proxy_protocol = off|v1|v2 (a header ahead of
everything, TLS included), xclient = yes (XCLIENT ADDR/PORT after the
upstream's post-TLS EHLO, when advertised).

Daemons with an accept_proxy listener get health=None at teardown (the
conftest health check speaks no PROXY protocol); each test runs its own
sessions instead.
"""

import os
import socket
import ssl
import struct
import time

import pytest

import bridgelib as bl
from bridgelib import TF, RawClient, client_ctx, free_port
from scripted_upstream import (POST_TLS_CAPS, ScriptedUpstream, ehlo_reply,
                               good_script, prelude)

GREET = b"220 upstream.test ESMTP scripted\r\n"
V2SIG = b"\r\n\r\n\x00\r\nQUIT\n"
XCLIENT_OK = b"220 upstream.test XCLIENT-GREETING-SECRET\r\n"


# ---------------------------------------------------------------- helpers

def pp_v1(src, sport, dst, dport):
    fam = "TCP6" if ":" in src else "TCP4"
    return ("PROXY %s %s %s %d %d\r\n" % (fam, src, dst, sport, dport)).encode()


def pp_v2(src, sport, dst, dport, tlvs=b""):
    if ":" in src:
        body = (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
                + struct.pack("!HH", sport, dport))
        fp = 0x21
    else:
        body = (socket.inet_pton(socket.AF_INET, src) + socket.inet_pton(socket.AF_INET, dst)
                + struct.pack("!HH", sport, dport))
        fp = 0x11
    body += tlvs
    return V2SIG + bytes([0x21, fp]) + struct.pack("!H", len(body)) + body


def pp_v2_local():
    return V2SIG + b"\x20\x00\x00\x00"


def parse_pp(b):
    """A PROXY header (exactly its bytes) -> dict(version, local, src, dst)
    with (ip, port) tuples; addresses normalised through inet_ntop."""
    assert b is not None, "no PROXY header received"
    if b.startswith(b"PROXY "):
        assert b.endswith(b"\r\n") and b.count(b"\r\n") == 1, b
        f = b[:-2].decode("ascii").split(" ")
        if f[1] == "UNKNOWN":
            return {"version": 1, "local": True}
        assert len(f) == 6 and f[1] in ("TCP4", "TCP6"), b
        fam = socket.AF_INET if f[1] == "TCP4" else socket.AF_INET6
        norm = [socket.inet_ntop(fam, socket.inet_pton(fam, a)) for a in f[2:4]]
        return {"version": 1, "local": False, "family": f[1],
                "src": (norm[0], int(f[4])), "dst": (norm[1], int(f[5]))}
    assert b[:12] == V2SIG, b
    vc, fp, ln = b[12], b[13], struct.unpack("!H", b[14:16])[0]
    assert len(b) == 16 + ln, b
    assert vc >> 4 == 2, b
    if vc & 0xF == 0 or fp >> 4 == 0:
        return {"version": 2, "local": True}
    assert fp in (0x11, 0x21), b
    if fp == 0x11:
        a, p = socket.AF_INET, 4
    else:
        a, p = socket.AF_INET6, 16
    src = socket.inet_ntop(a, b[16:16 + p])
    dst = socket.inet_ntop(a, b[16 + p:16 + 2 * p])
    sport, dport = struct.unpack("!HH", b[16 + 2 * p:20 + 2 * p])
    return {"version": 2, "local": False, "family": "TCP4" if fp == 0x11 else "TCP6",
            "src": (src, sport), "dst": (dst, dport)}


def lb_listeners(proxy_from="127.0.0.1/32", host="127.0.0.1", **extra):
    """An implicit and a starttls listener that expect a PROXY header."""
    out = {}
    for name, mode in (("lb_smtps", "implicit"), ("lb_sub", "starttls")):
        kv = {"listen": bl.hostport(host, free_port(host)), "mode": mode,
              "accept_proxy": "yes", "proxy_from": proxy_from}
        kv.update(extra)
        out[name] = kv
    return out


def connect(d, listener):
    host, port = d.addr(listener)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(10 * TF)
    s.connect((host, port))
    return s


def tls_after_header(sock, certs, header):
    """Send header + the TLS ClientHello in ONE write, then finish the
    handshake. Returns a MemTLS (read_reply/cmd) over sock."""
    m = bl.MemTLS(sock, client_ctx(certs))
    try:
        m.obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = m.out.read()
    assert hello[:1] == b"\x16", hello[:8]
    sock.sendall(header + hello)
    m.handshake()
    return m


def implicit_session_via_header(d, certs, header, listener="lb_smtps", quit=True):
    """PROXY header + ClientHello in one write, then greeting, EHLO, QUIT.
    Returns our (ip, port) as the balancer."""
    s = connect(d, listener)
    try:
        me = s.getsockname()[:2]
        m = tls_after_header(s, certs, header)
        g = m.read_reply()
        assert g.code == 220 and bl.PROXY_HOSTNAME in g.text, g
        e = m.cmd("EHLO client.test")
        assert e.code == 250, e
        if quit:
            assert m.cmd("QUIT").code == 221
        return me
    finally:
        s.close()


def starttls_session_via_header(d, certs, header, listener="lb_sub"):
    """PROXY header + the first command in ONE write, then the pre-TLS
    dialogue, STARTTLS, EHLO, QUIT. Returns our (ip, port)."""
    host, port = d.addr(listener)
    with RawClient(host, port) as c:
        me = c.sock.getsockname()[:2]
        c.send(header + b"EHLO pre.test\r\n")
        g = c.read_reply()
        assert g.code == 220 and bl.PROXY_HOSTNAME in g.text, g
        e = c.read_reply()
        assert e.code == 250 and "STARTTLS" in e.keywords(), e
        assert c.cmd("STARTTLS").code == 220
        c.starttls(client_ctx(certs))
        assert c.cmd("EHLO client.test").code == 250
        assert c.cmd("QUIT").code == 221
    return me


def session_end_via(d, me, timeout=5.0):
    """The session_end event whose via= is our address (ip:port)."""
    via = bl.hostport(me[0], me[1])
    d.wait_log(r"event=session_end .*via=%s " % via.replace("[", r"\[").replace("]", r"\]"),
               timeout=timeout)
    ev = [e for e in d.events("session_end") if e.get("via") == via]
    assert len(ev) == 1, ev
    return ev[0]


def session_end_client(d, client, timeout=5.0):
    d.wait_log(r"event=session_end client=%s " % client.replace("[", r"\[").replace("]", r"\]"),
               timeout=timeout)
    ev = [e for e in d.events("session_end") if e.get("client") == client]
    assert len(ev) == 1, ev
    return ev[0]


def read_all(sock, timeout=3.0):
    """(bytes received, closed?) until EOF/reset or timeout."""
    deadline = time.monotonic() + timeout * TF
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return data, False
        except OSError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


@pytest.fixture
def lb_bridge(make_bridge, upstream):
    """lb_bridge(proxy_from=..., global_opts=..., **listener keys) -> daemon
    with lb_smtps / lb_sub (accept_proxy) in front of the real upstream."""
    def factory(proxy_from="127.0.0.1/32", global_opts=None, host="127.0.0.1", **extra):
        return make_bridge(upstream.address, listeners=lb_listeners(proxy_from, host, **extra),
                           global_opts=global_opts, health=None)
    return factory


@pytest.fixture
def scripted(make_bridge, certs):
    """scripted(script, upstream_opts=..., listeners=..., **ScriptedUpstream kw)
    -> (daemon, scripted upstream)."""
    ups = []

    def factory(script, upstream_opts=None, listeners=None, global_opts=None, **kw):
        kw.setdefault("drain_timeout", 1.5)
        up = ScriptedUpstream(script, cert=os.path.join(certs, "upstream.pem"),
                              key=os.path.join(certs, "upstream.key"), **kw).start()
        ups.append(up)
        opts = {"reply_timeout": "3s", "connect_timeout": "2s"}
        opts.update(upstream_opts or {})
        accept_proxy = any(kv.get("accept_proxy") == "yes" for kv in (listeners or {}).values())
        d = make_bridge(up.address, upstream_opts=opts, listeners=listeners,
                        global_opts=global_opts, health=None if accept_proxy else "light")
        return d, up

    yield factory
    for up in ups:
        up.stop()


def tls_client(d, certs, listener="smtps"):
    c = RawClient(*d.addr(listener), tls_ctx=client_ctx(certs))
    g = c.read_reply()
    assert g.code == 220, g
    return c


# ------------------------------------------------ (a) accepting a header

@pytest.mark.parametrize("version", ["v1", "v2"])
def test_implicit_header_and_clienthello_in_one_write(lb_bridge, certs, version):
    d = lb_bridge()
    src = ("192.0.2.1", 56324)
    lport = d.port("lb_smtps")
    hdr = (pp_v1 if version == "v1" else pp_v2)(src[0], src[1], "198.51.100.2", lport)
    me = implicit_session_via_header(d, certs, hdr)
    ev = session_end_via(d, me)
    assert ev["client"] == "192.0.2.1:56324", ev["_line"]
    assert ev["via"] == "127.0.0.1:%d" % me[1], ev["_line"]
    assert ev["listener"] == "lb_smtps"
    assert ev["client_tls"] in ("TLSv1.2", "TLSv1.3"), ev["_line"]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_starttls_header_and_first_command_in_one_write(lb_bridge, certs, version):
    d = lb_bridge()
    hdr = (pp_v1 if version == "v1" else pp_v2)("2001:db8::7", 4242, "2001:db8::25", 587)
    me = starttls_session_via_header(d, certs, hdr)
    ev = session_end_via(d, me)
    assert ev["client"] == "[2001:db8::7]:4242", ev["_line"]
    assert ev["listener"] == "lb_sub"


def test_v2_header_with_tlvs(lb_bridge, certs):
    """TLVs after the addresses are skipped as part of the header: the
    ClientHello right behind them is intact."""
    d = lb_bridge()
    tlvs = b"\x01\x00\x02h2" + b"\x04\x00\x05zzzzz" + b"\x02\x00\x0bexample.org"
    hdr = pp_v2("203.0.113.5", 1025, "198.51.100.2", 465, tlvs)
    me = implicit_session_via_header(d, certs, hdr)
    assert session_end_via(d, me)["client"] == "203.0.113.5:1025"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_byte_by_byte(lb_bridge, certs, version):
    """A header that arrives one byte per segment is assembled, and the
    command behind the last byte is kept."""
    d = lb_bridge()
    hdr = (pp_v1 if version == "v1" else pp_v2)("192.0.2.44", 3333, "198.51.100.2", 587)
    host, port = d.addr("lb_sub")
    with RawClient(host, port) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in hdr[:-1]:
            c.send(bytes([b]))
            time.sleep(0.01)
        c.send(hdr[-1:] + b"EHLO pre.test\r\n")
        assert c.read_reply().code == 220
        assert c.read_reply().code == 250
        assert c.cmd("QUIT").code == 221
    session_end_client(d, "192.0.2.44:3333")


# ------------------------------------------------ (b) refusing a header

@pytest.mark.parametrize("data", [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1 99999\r\nEHLO x\r\n",
    b"PROXY TCP4 ::1 ::2 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\rX",
    b"proxy TCP4 192.0.2.1 198.51.100.2 1 2\r\n",
    b"EHLO client.test\r\n",
    V2SIG + b"\x21\x12\x00\x0c" + bytes(12),          # UDP
    V2SIG + b"\x11\x11\x00\x0c" + bytes(12),          # version 1 in v2 form
    V2SIG + b"\x21\x11\x02\x09",                      # 16 + 521 bytes: too long
    b"\x16\x03\x01\x00\x05hello",                     # a ClientHello, no header
], ids=["bad-port", "family-mismatch", "cr-without-lf", "lowercase", "smtp", "v2-udp",
        "v2-bad-version", "v2-too-long", "tls-without-header"])
@pytest.mark.parametrize("listener", ["lb_smtps", "lb_sub"])
def test_malformed_header_closes(lb_bridge, upstream, certs, data, listener):
    d = lb_bridge()
    s = connect(d, listener)
    with s:
        s.sendall(data)
        got, closed = read_all(s, 3)
    assert closed, "connection not closed after %r" % data
    assert got == b"", "sent something before/instead of closing: %r" % got
    line = d.wait_log(r"event=proxy_rejected")
    assert "reason=" in line and "via=127.0.0.1:" in line, line
    assert upstream.connections == 0


def test_truncated_header_then_close(lb_bridge, upstream, certs):
    d = lb_bridge()
    for part in (b"PROXY TCP4 192.0.2.1 19", V2SIG + b"\x21\x11\x00\x0c" + bytes(5)):
        s = connect(d, "lb_smtps")
        me = s.getsockname()[:2]
        with s:
            s.sendall(part)
            s.shutdown(socket.SHUT_WR)
            got, closed = read_all(s, 3)
        assert closed and got == b"", (got, closed)
        ev = session_end_client(d, "127.0.0.1:%d" % me[1])
        assert "PROXY header" in ev["reason"], ev["_line"]
    assert upstream.connections == 0


def test_untrusted_balancer_closed_at_accept(make_bridge, upstream, certs):
    """proxy_from = 10.0.0.0/8: 127.0.0.1 may not send a header; even a
    well-formed one is not read."""
    d = make_bridge(upstream.address, listeners=lb_listeners("10.0.0.0/8"), health=None)
    for listener in ("lb_smtps", "lb_sub"):
        s = connect(d, listener)
        with s:
            s.sendall(pp_v1("192.0.2.1", 1234, "198.51.100.2", 465) + b"EHLO x\r\n")
            got, closed = read_all(s, 3)
        assert closed and got == b"", (listener, got, closed)
        d.wait_log(r"event=reject listener=%s cap=proxy_from" % listener)
    assert upstream.connections == 0
    assert d.events("proxy_header") == []


def test_plain_listener_does_not_take_headers(bridge, upstream, certs):
    """Without accept_proxy a header is just a bad first command."""
    with RawClient(*bridge.addr("sub")) as c:
        assert c.read_reply().code == 220
        c.send(pp_v1("192.0.2.1", 1234, "198.51.100.2", 587))
        r = c.read_reply()
        assert r.code in (500, 530), r
        assert c.cmd("QUIT").code == 221


# ------------------------------------------------ (c) header timeout

@pytest.mark.parametrize("sent", [b"", b"PROXY TCP4 192.0.2.1", V2SIG[:7]],
                         ids=["nothing", "partial-v1", "partial-v2"])
def test_no_header_within_handshake_timeout(lb_bridge, upstream, certs, sent):
    d = lb_bridge(global_opts={"handshake_timeout": "1s"})
    s = connect(d, "lb_smtps")
    me = s.getsockname()[:2]
    with s:
        t0 = time.monotonic()
        if sent:
            s.sendall(sent)
        got, closed = read_all(s, 5)
        dt = time.monotonic() - t0
    assert closed and got == b"", (got, closed)
    assert 0.7 <= dt <= 3.0 * TF, dt
    ev = session_end_client(d, "127.0.0.1:%d" % me[1])
    assert "PROXY header" in ev["reason"], ev["_line"]
    assert upstream.connections == 0


def test_trickled_header_bounded_by_handshake_timeout(lb_bridge, upstream, certs):
    """One byte every 200 ms: progress does not extend the deadline."""
    d = lb_bridge(global_opts={"handshake_timeout": "1s"})
    hdr = pp_v1("192.0.2.1", 1234, "198.51.100.2", 465)
    s = connect(d, "lb_smtps")
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.monotonic()
    closed = False
    with s:
        for b in hdr:
            try:
                s.sendall(bytes([b]))
            except OSError:
                closed = True
                break
            got, closed = read_all(s, 0.2)
            if closed:
                break
    dt = time.monotonic() - t0
    assert closed, "still open after the whole header was trickled (%.1fs)" % dt
    assert dt <= 3.0 * TF, dt


# ------------------------------------------------ (d) allow_from on the header

def test_allow_from_applies_to_header_source(lb_bridge, upstream, certs):
    d = lb_bridge(allow_from="127.0.0.0/8")
    lport = d.port("lb_smtps")
    # The balancer (127.0.0.1) is in allow_from, the client it names is not.
    s = connect(d, "lb_smtps")
    with s:
        s.sendall(pp_v2("192.0.2.1", 5555, "198.51.100.2", lport) + b"\x16\x03\x01\x00\x00")
        got, closed = read_all(s, 3)
    assert closed and got == b"", (got, closed)
    line = d.wait_log(r"event=reject listener=lb_smtps cap=allow_from")
    assert "client=192.0.2.1:5555" in line, line
    ev = session_end_client(d, "192.0.2.1:5555")
    assert "allow_from" in ev["reason"], ev["_line"]
    # A client inside allow_from, through the same balancer: served.
    me = implicit_session_via_header(d, certs, pp_v1("127.0.0.9", 6666, "127.0.0.1", lport))
    assert session_end_via(d, me)["client"] == "127.0.0.9:6666"
    assert upstream.connections == 1


# ------------------------------------------------ (e) LOCAL / UNKNOWN

@pytest.mark.parametrize("hdr", [pp_v2_local(), V2SIG + b"\x21\x00\x00\x00",
                                 b"PROXY UNKNOWN\r\n"],
                         ids=["v2-local", "v2-af-unspec", "v1-unknown"])
def test_local_header_uses_balancer_address(lb_bridge, certs, hdr):
    d = lb_bridge()
    me = implicit_session_via_header(d, certs, hdr)
    ev = session_end_via(d, me)
    assert ev["client"] == "127.0.0.1:%d" % me[1], ev["_line"]


# ------------------------------------------------ (f) header toward the upstream

def _upstream_header_script(tls):
    if tls == "implicit":
        return [("proxy_header",), ("starttls",), ("send", GREET), ("serve",)]
    return [("proxy_header",)] + good_script()


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_upstream_gets_header_first(scripted, certs, version, tls):
    d, up = scripted(_upstream_header_script(tls),
                     upstream_opts={"proxy_protocol": version, "tls": tls})
    with tls_client(d, certs) as c:
        me = c.sock.getsockname()[:2]
        assert c.cmd("EHLO client.test").code == 250
        assert c.cmd("QUIT").code == 221
    conn = up.wait_done(10)
    assert conn.script_error is None, conn
    h = parse_pp(conn.proxy_header)
    assert h["version"] == int(version[1]) and not h["local"], h
    assert h["family"] == "TCP4", h
    assert h["src"] == ("127.0.0.1", me[1]), h
    assert h["dst"] == ("127.0.0.1", d.port("smtps")), h
    pre = bytes(conn.pre_tls)
    assert pre.startswith(conn.proxy_header), pre
    if tls == "implicit":
        # Nothing in plaintext but the header; the handshake right after it
        # succeeded, so the ClientHello came after the header.
        assert pre == conn.proxy_header, pre
        assert conn.tls_version is not None
    else:
        assert pre[len(conn.proxy_header):].startswith(b"EHLO %s\r\n"
                                                       % bl.PROXY_HOSTNAME.encode()), pre
        assert conn.lines[0] == ("plain", b"EHLO %s\r\n" % bl.PROXY_HOSTNAME.encode())
    assert [ln for ph, ln in conn.lines if ph == "tls"][:1] == [b"EHLO client.test\r\n"]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_upstream_header_ipv6_client(scripted, certs, version):
    port = free_port("::1")
    listeners = {"smtps6": {"listen": "[::1]:%d" % port, "mode": "implicit"}}
    d, up = scripted(_upstream_header_script("starttls"), listeners=listeners,
                     upstream_opts={"proxy_protocol": version})
    with tls_client(d, certs, "smtps6") as c:
        me = c.sock.getsockname()[:2]
        assert c.cmd("EHLO client.test").code == 250
        assert c.cmd("QUIT").code == 221
    conn = up.wait_done(10)
    assert conn.script_error is None, conn
    h = parse_pp(conn.proxy_header)
    assert h["family"] == "TCP6", h
    assert h["src"] == ("::1", me[1]) and h["dst"] == ("::1", port), h


# ------------------------------------------------ (g) end to end

@pytest.mark.parametrize("client_src,family", [(("203.0.113.9", 40000), "TCP4"),
                                               (("2001:db8::9", 40001), "TCP6")])
def test_original_client_forwarded_to_upstream(scripted, certs, client_src, family):
    listeners = lb_listeners()
    d, up = scripted(_upstream_header_script("starttls"), listeners=listeners,
                     upstream_opts={"proxy_protocol": "v1"})
    dst = "198.51.100.25" if family == "TCP4" else "2001:db8::25"
    hdr = pp_v2(client_src[0], client_src[1], dst, 465)
    me = implicit_session_via_header(d, certs, hdr)
    conn = up.wait_done(10)
    assert conn.script_error is None, conn
    h = parse_pp(conn.proxy_header)
    assert h["version"] == 1 and h["family"] == family, h
    assert h["src"] == client_src, h
    assert h["dst"] == (dst, 465), h
    assert "via=127.0.0.1:%d" % me[1] in session_end_via(d, me)["_line"]


def test_local_header_forwards_balancer_address(scripted, certs):
    d, up = scripted(_upstream_header_script("starttls"), listeners=lb_listeners(),
                     upstream_opts={"proxy_protocol": "v2"})
    me = implicit_session_via_header(d, certs, pp_v2_local())
    conn = up.wait_done(10)
    h = parse_pp(conn.proxy_header)
    assert h["src"] == ("127.0.0.1", me[1]), h
    assert h["dst"] == ("127.0.0.1", d.port("lb_smtps")), h


# ------------------------------------------------ (h) XCLIENT

def xclient_script(answer=XCLIENT_OK, advertise=True, tls="starttls"):
    caps = POST_TLS_CAPS + (["XCLIENT ADDR PORT NAME HELO PROTO"] if advertise else [])
    if tls == "implicit":
        head = [("starttls",), ("send", GREET)]
    else:
        head = prelude() + [("expect", b"STARTTLS"), ("send", b"220 2.0.0 Ready\r\n"),
                            ("starttls",)]
    steps = head + [("expect", b"EHLO " + bl.PROXY_HOSTNAME.encode()),
                    ("send", ehlo_reply(caps))]
    if not advertise:
        return steps + [("serve",)]
    steps.append(("expect", b"XCLIENT "))
    if answer.startswith(b"220"):
        return steps + [("send", answer), ("serve",)]
    return steps + [("send", answer), ("hang", 3)]


def tls_lines(conn):
    return [ln for ph, ln in conn.lines if ph == "tls"]


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_xclient_sent_after_post_tls_ehlo(scripted, certs, tls):
    d, up = scripted(xclient_script(tls=tls), upstream_opts={"xclient": "yes", "tls": tls})
    with tls_client(d, certs) as c:
        me = c.sock.getsockname()[:2]
        e = c.cmd("EHLO client.test")
        assert e.code == 250, e
        assert c.cmd("NOOP").code == 250
        assert c.cmd("QUIT").code == 221
        seen = c.received
    conn = up.wait_done(10)
    assert conn.script_error is None, conn
    assert tls_lines(conn)[:3] == [
        b"EHLO %s\r\n" % bl.PROXY_HOSTNAME.encode(),
        b"XCLIENT ADDR=127.0.0.1 PORT=%d\r\n" % me[1],
        b"EHLO client.test\r\n"], tls_lines(conn)
    # The XCLIENT greeting is for the proxy, never for the client.
    assert b"XCLIENT-GREETING-SECRET" not in seen, seen
    assert seen.count(b"220 ") == 1, seen


def test_xclient_ipv6_client(scripted, certs):
    port = free_port("::1")
    listeners = {"smtps6": {"listen": "[::1]:%d" % port, "mode": "implicit"}}
    d, up = scripted(xclient_script(), listeners=listeners, upstream_opts={"xclient": "yes"})
    with tls_client(d, certs, "smtps6") as c:
        me = c.sock.getsockname()[:2]
        assert c.cmd("EHLO client.test").code == 250
        assert c.cmd("QUIT").code == 221
    conn = up.wait_done(10)
    assert conn.script_error is None, conn
    assert tls_lines(conn)[1] == b"XCLIENT ADDR=IPV6:::1 PORT=%d\r\n" % me[1], tls_lines(conn)


@pytest.mark.parametrize("client_src,addr", [(("203.0.113.9", 40000), b"203.0.113.9"),
                                             (("2001:db8::9", 40001), b"IPV6:2001:db8::9")])
def test_xclient_carries_proxy_header_client(scripted, certs, client_src, addr):
    d, up = scripted(xclient_script(), listeners=lb_listeners(),
                     upstream_opts={"xclient": "yes"})
    dst = "198.51.100.25" if ":" not in client_src[0] else "2001:db8::25"
    implicit_session_via_header(d, certs, pp_v2(client_src[0], client_src[1], dst, 465))
    conn = up.wait_done(10)
    assert conn.script_error is None, conn
    assert tls_lines(conn)[1] == b"XCLIENT ADDR=%s PORT=%d\r\n" % (addr, client_src[1]), \
        tls_lines(conn)


def test_xclient_refused_fails_session(scripted, certs):
    d, up = scripted(xclient_script(answer=b"550 5.7.0 Not authorized\r\n"),
                     upstream_opts={"xclient": "yes"})
    with tls_client(d, certs) as c:
        r = c.cmd("EHLO client-secret.test")
        assert r.code == 421 and r.lines[0].startswith("421 4."), r
        rest, closed = c.read_until_close(5)
        assert closed and rest == b"", rest
    line = d.wait_log(r"event=upstream_failed")
    assert "stage=xclient" in line, line
    conn = up.wait_done(10)
    post = bytes(conn.post_tls)
    i = post.find(b"XCLIENT ")
    assert i >= 0, post
    after = post[post.index(b"\n", i) + 1:]
    assert after == b"", "upstream got bytes after its XCLIENT refusal: %r" % after
    assert b"client-secret" not in conn.all_bytes


def test_xclient_not_advertised(scripted, certs):
    d, up = scripted(xclient_script(advertise=False), upstream_opts={"xclient": "yes"})
    with tls_client(d, certs) as c:
        assert c.cmd("EHLO client.test").code == 250
        assert c.cmd("QUIT").code == 221
    line = d.wait_log(r"event=xclient_unavailable")
    assert "upstream=" in line, line
    conn = up.wait_done(10)
    assert conn.script_error is None, conn
    assert tls_lines(conn)[:2] == [b"EHLO %s\r\n" % bl.PROXY_HOSTNAME.encode(),
                                   b"EHLO client.test\r\n"], tls_lines(conn)
    assert b"XCLIENT" not in bytes(conn.post_tls)


def test_xclient_off_sends_no_extra_ehlo(scripted, certs):
    d, up = scripted(good_script())
    with tls_client(d, certs) as c:
        assert c.cmd("EHLO client.test").code == 250
        assert c.cmd("QUIT").code == 221
    conn = up.wait_done(10)
    assert tls_lines(conn)[:1] == [b"EHLO client.test\r\n"], tls_lines(conn)


# ------------------------------------------------ (i) a client's own XCLIENT

@pytest.mark.parametrize("xclient", ["no", "yes"])
@pytest.mark.parametrize("listener", ["smtps", "sub"])
def test_client_xclient_after_tls_refused(scripted, certs, xclient, listener):
    script = xclient_script() if xclient == "yes" else good_script()
    d, up = scripted(script, upstream_opts={"xclient": xclient})
    if listener == "smtps":
        c = tls_client(d, certs)
    else:
        c = RawClient(*d.addr("sub"))
        assert c.read_reply().code == 220
        assert c.cmd("STARTTLS").code == 220
        c.starttls(client_ctx(certs))
    with c:
        for line in ("XCLIENT ADDR=1.2.3.4", "EHLO client.test", "xclient ADDR=1.2.3.4 PORT=1"):
            r = c.cmd(line)
            if line.startswith("EHLO"):
                assert r.code == 250, r
            else:
                assert r.code == 550 and r.lines[0].startswith("550 5.7.1"), (line, r)
        assert c.cmd("NOOP").code == 250
        assert c.cmd("QUIT").code == 221
    conn = up.wait_done(10)
    client_part = bytes(conn.post_tls)
    if xclient == "yes":
        ours = b"XCLIENT ADDR=127.0.0.1 PORT="
        assert client_part.count(b"XCLIENT") == 1 and ours in client_part, client_part
    else:
        assert b"XCLIENT" not in client_part.upper(), client_part
    assert b"1.2.3.4" not in client_part, client_part


def test_client_xclient_after_auth_splice_never_reaches_upstream(scripted, certs):
    """With xclient = yes the upstream trusts XCLIENT from the proxy's
    address. Once AUTH succeeds the session is spliced, and a client's own
    XCLIENT would arrive from that trusted address: it must not reach the
    upstream either (client.c: "Only the proxy may speak XCLIENT to the
    upstream")."""
    d, up = scripted(xclient_script(), upstream_opts={"xclient": "yes"})
    with tls_client(d, certs) as c:
        assert c.cmd("EHLO client.test").code == 250
        assert c.cmd(b"AUTH PLAIN AGFsaWNlAHMzY3JldC1wdw==").code == 235
        r = c.cmd("XCLIENT ADDR=1.2.3.4")
        c.cmd("QUIT")
    conn = up.wait_done(10)
    assert b"1.2.3.4" not in bytes(conn.post_tls), (
        "client's XCLIENT reached the upstream after the splice (reply %r): %r"
        % (r, [ln for ln in tls_lines(conn) if b"XCLIENT" in ln.upper()]))
