"""Client-facing TLS: several certificates per listener chosen by SNI, and
session resumption for clients (tickets that every worker and every reload
accepts).

Observed from outside: which certificate the client received (its DER hash,
or a handshake that verifies the expected host name), whether Python's ssl
reports the session as reused, and the sni= / client_resumed= fields of the
session_end log line.
"""

import datetime
import os
import socket
import ssl
import time

import pytest

import bridgelib as bl
from bridgelib import RawClient, free_port
from test_operations import (hup_and_wait, metrics, ops_bridge, pem_cert_sha,  # noqa: F401
                             pubdir, sha, sid_owner, wait_events)

SNI_CERTS = ("proxy", "sni-mail", "sni-wild", "sni-cn")


def sni_listener_opts(certs, names=SNI_CERTS):
    # one file per line: an indented line continues the list
    return {"cert": ",\n    ".join(os.path.join(certs, n + ".pem") for n in names),
            "key": ",\n    ".join(os.path.join(certs, n + ".key") for n in names)}


@pytest.fixture
def sni_bridge(make_bridge, upstream, certs):
    opts = sni_listener_opts(certs)
    return make_bridge(upstream.address, listener_opts={"smtps": opts, "sub": opts})


def ctx_for(certs, name=None, max_version=None):
    """A client context verifying the chain; the name is not checked (a name
    no certificate carries gets the default one): tests compare the DER."""
    ctx = ssl.create_default_context(cafile=os.path.join(certs, "ca.pem"))
    ctx.check_hostname = False
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def handshake(d, certs, listener, sni, max_version=None):
    """TLS with the given SNI (None: no SNI) on an implicit or STARTTLS
    listener; returns (sha of the peer certificate DER, client)."""
    host, port = d.addr(listener)
    ctx = ctx_for(certs, sni, max_version)
    if listener == "smtps":
        raw = socket.create_connection((host, port), timeout=10)
        c = _wrap(ctx.wrap_socket(raw, server_hostname=sni))
        assert c.read_reply().code == 220
    else:
        c = RawClient(host, port, timeout=10)
        assert c.read_reply().code == 220
        assert c.cmd("EHLO sni.test").code == 250
        assert c.cmd("STARTTLS").code == 220
        c.starttls(ctx, server_hostname=sni)
    der = c.sock.getpeercert(binary_form=True)
    return sha(der), c


class _wrap:
    """Minimal reply reader around an already wrapped socket."""

    def __init__(self, s):
        self.sock = s
        self.buf = b""

    def read_reply(self):
        while True:
            lines = self.buf.split(b"\r\n")
            for i, ln in enumerate(lines[:-1]):
                if len(ln) >= 4 and ln[3:4] == b" ":
                    reply = b"\r\n".join(lines[:i + 1])
                    self.buf = b"\r\n".join(lines[i + 1:])
                    return bl.Reply([x.decode() for x in reply.split(b"\r\n")], reply)
            data = self.sock.recv(4096)
            if not data:
                raise EOFError
            self.buf += data

    def cmd(self, line):
        self.sock.sendall(line.encode() + b"\r\n")
        return self.read_reply()

    def close(self):
        self.sock.close()


def quit_(c):
    try:
        c.cmd("QUIT")
    finally:
        c.close()


@pytest.mark.parametrize("listener", ["smtps", "sub"])
@pytest.mark.parametrize("sni,expect", [
    ("mail.sni.test", "sni-mail"),          # second certificate, exact SAN
    ("MAIL.SNI.Test", "sni-mail"),          # names compare case-insensitively
    ("rsa.sni.test", "sni-wild"),           # RSA certificate, exact SAN
    ("x.wild.test", "sni-wild"),            # wildcard SAN
    ("cn.sni.test", "sni-cn"),              # no SAN: its CN
    ("localhost", "proxy"),                 # the default's own name
    ("a.b.wild.test", "proxy"),             # a wildcard covers one label only
    ("unknown.test", "proxy"),              # no match: the default
    (None, "proxy"),                        # no SNI: the default
])
def test_certificate_chosen_by_sni(sni_bridge, certs, listener, sni, expect):
    got, c = handshake(sni_bridge, certs, listener, sni)
    quit_(c)
    assert got == pem_cert_sha(os.path.join(certs, expect + ".pem")), (sni, expect)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_sni_switch_between_key_types_in_both_versions(sni_bridge, certs, version):
    """The default is ECDSA, sni-wild is RSA: the switch must pick a suite
    and signature the new key can make, in TLS 1.2 and 1.3."""
    for sni, expect in (("rsa.sni.test", "sni-wild"), ("mail.sni.test", "sni-mail")):
        got, c = handshake(sni_bridge, certs, "smtps", sni, max_version=version)
        assert c.sock.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2",
                                    ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        quit_(c)
        assert got == pem_cert_sha(os.path.join(certs, expect + ".pem"))


def test_sni_is_logged(sni_bridge, certs):
    got, c = handshake(sni_bridge, certs, "smtps", "mail.sni.test")
    quit_(c)
    end = sni_bridge.wait_log(r'event=session_end .*sni="mail\.sni\.test"')
    assert "listener=smtps" in end


def test_config_errors_for_certificate_lists(make_bridge, upstream, certs):
    d = make_bridge(upstream.address, start=False,
                    listener_opts={"smtps": {
                        "cert": "%s, %s" % (os.path.join(certs, "proxy.pem"),
                                            os.path.join(certs, "sni-mail.pem")),
                        "key": os.path.join(certs, "proxy.key")}})
    cp = bl.run([bl.BIN, "-t", "-c", d.conf], timeout=20)
    err = cp.stderr.decode()
    assert cp.returncode != 0
    assert "key 'key': 1 key file(s) for 2 certificate(s)" in err, err

    # a key that belongs to another certificate of the list
    d = make_bridge(upstream.address, start=False,
                    listener_opts={"smtps": {
                        "cert": "%s, %s" % (os.path.join(certs, "proxy.pem"),
                                            os.path.join(certs, "sni-mail.pem")),
                        "key": "%s, %s" % (os.path.join(certs, "proxy.key"),
                                           os.path.join(certs, "sni-cn.key"))}})
    cp = bl.run([bl.BIN, "-t", "-c", d.conf], timeout=20)
    err = cp.stderr.decode()
    assert cp.returncode != 0
    assert "sni-cn.key" in err and ("does not match" in err or "cannot complete" in err), err


# ------------------------------------------------------------ resumption

def resume_round(d, certs, listener, n, max_version=None, sni=None):
    """One full handshake, then n resumptions with its session; returns the
    list of session_reused flags of the n."""
    host, port = d.addr(listener)
    ctx = ctx_for(certs, sni, max_version)

    def connect(session=None):
        raw = socket.create_connection((host, port), timeout=10)
        s = ctx.wrap_socket(raw, server_hostname=sni, session=session)
        w = _wrap(s)
        assert w.read_reply().code == 220   # TLS 1.3 tickets arrive with it
        return w

    first = connect()
    first.cmd("NOOP")                    # TLS 1.3: the ticket is read by now
    sess = first.sock.session
    quit_(first)
    assert sess is not None
    reused = []
    for _ in range(n):
        w = connect(sess)
        reused.append(w.sock.session_reused)
        quit_(w)
    return reused


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_session_resumption(make_bridge, upstream, certs, version):
    admin = ("127.0.0.1", free_port())
    d = make_bridge(upstream.address, global_opts={"admin": "%s:%d" % admin})
    reused = resume_round(d, certs, "smtps", 3, max_version=version)
    assert all(reused), reused
    assert metrics(admin)["smtpbridge_client_tls_resumed_total"] == 3
    wait_events(d, "session_end", 4)
    ends = d.events("session_end")
    assert sum(1 for e in ends if e.get("client_resumed") == "yes") == 3, \
        [e["_line"] for e in ends]


def test_resumption_with_an_sni_selected_certificate(sni_bridge, certs):
    reused = resume_round(sni_bridge, certs, "smtps", 2, sni="mail.sni.test")
    assert all(reused), reused


def test_resumption_across_workers_and_reload(ops_bridge, certs):
    """Tickets are accepted by every worker (each has the same key
    schedule) and still after a reload."""
    d = ops_bridge(global_opts={"workers": "2", "max_sessions_per_ip": "0"})
    wait_events(d, "worker_ready", 2)
    # The workers share the listening socket and the kernel picks which one
    # accepts, so one may win many times in a row: go on, up to 64
    # resumptions, until both have resumed. (This test failed once in a
    # full local run, message lost; this assertion is the only one that
    # depends on the kernel's choice, but 20 runs under CPU load did not
    # reproduce it.)
    owners, total = set(), 0
    for _ in range(4):
        reused = resume_round(d, certs, "smtps", 16)
        assert all(reused), reused
        total += 17
        ends = wait_events(d, "session_end", total)
        owners = {sid_owner(e["sid"]) for e in ends if e.get("client_resumed") == "yes"}
        if len(owners) == 2:
            break
    assert len(owners) == 2, "resumed sessions all on one worker: %s" % owners

    host, port = d.addr("smtps")
    ctx = ctx_for(certs)
    raw = socket.create_connection((host, port), timeout=10)
    w = _wrap(ctx.wrap_socket(raw))
    assert w.read_reply().code == 220
    w.cmd("NOOP")
    sess = w.sock.session
    quit_(w)
    hup_and_wait(d)
    wait_events(d, "worker_ready", 4)
    raw = socket.create_connection((host, port), timeout=10)
    w = _wrap(ctx.wrap_socket(raw, session=sess))
    assert w.read_reply().code == 220
    assert w.sock.session_reused
    quit_(w)


FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def test_ticket_keys_roll_over_every_hour(make_bridge, upstream, certs, pubdir):
    """The ticket key schedule moves once an hour and accepts the previous
    hour's key: a ticket made two seconds before the hour still resumes
    two seconds after it. When the clock jumps 20 years ahead the daemon
    keeps answering and the tickets it then issues resume (the ratchet
    caught up consistently). Not observable here: that a ticket two hours
    old is refused by the key schedule, since wolfSSL's own lifetime check
    (3600 s) refuses it first. The daemon's clock is libfaketime's, frozen
    at what a file the test rewrites says; the client's is real."""
    if not os.path.exists(FAKETIME):
        pytest.skip("libfaketime is not installed (Debian package faketime)")
    if bl.WRAPPER or "/asan" in bl.BIN:
        pytest.skip("libfaketime cannot be preloaded under a sanitizer or valgrind")
    clock = os.path.join(pubdir, "clock")   # read by the daemon as nobody

    def set_clock(text):
        with open(clock, "w") as f:
            f.write(text + "\n")
        os.chmod(clock, 0o644)

    def fmt(t):
        return t.strftime("%Y-%m-%d %H:%M:%S")

    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    hour = now.replace(minute=0, second=0, microsecond=0) + datetime.timedelta(hours=2)
    set_clock(fmt(hour - datetime.timedelta(seconds=2)))
    d = make_bridge(upstream.address, start=False)
    d.prefix = ["env", "LD_PRELOAD=" + FAKETIME, "FAKETIME_TIMESTAMP_FILE=" + clock,
                "FAKETIME_NO_CACHE=1", "FAKETIME_DONT_FAKE_MONOTONIC=1", "TZ=UTC"]
    d.start()
    stamp = (hour - datetime.timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%S")
    assert stamp in d.log(), "the daemon does not run on the fake clock:\n" + d.log()[-800:]
    host, port = d.addr("smtps")
    ctx = ctx_for(certs)

    def session(resume=None, reply=250):
        raw = socket.create_connection((host, port), timeout=10)
        w = _wrap(ctx.wrap_socket(raw, session=resume))
        assert w.read_reply().code == 220
        # TLS 1.3: the ticket is read by the time NOOP's reply is
        assert w.cmd("NOOP").code == reply
        reused, sess = w.sock.session_reused, w.sock.session
        if reply == 250:
            quit_(w)
        else:
            w.close()
        return reused, sess

    reused, before = session()
    assert not reused
    assert session(before)[0], "a ticket of this hour was refused"
    set_clock(fmt(hour + datetime.timedelta(seconds=2)))
    assert session(before)[0], "a ticket of the previous hour was refused"
    # 20 years on, the upstream's certificate has expired for the daemon:
    # NOOP gets 421 (the client's handshake and ticket come before that)
    set_clock(fmt(hour + datetime.timedelta(days=7305)))
    t0 = time.monotonic()
    reused, late = session(before, reply=421)
    assert time.monotonic() - t0 < 5 * bl.TF
    assert not reused, "a ticket 20 years old resumed"
    assert session(late, reply=421)[0], "a ticket made after the jump was refused"
    assert "certificate has expired" in d.wait_log(r"event=upstream_failed")
    set_clock("+0")   # real time again, for the health check at teardown


@pytest.mark.parametrize("one_write", [False, True])
def test_sni_behind_a_proxy_protocol_balancer(make_bridge, upstream, certs, one_write):
    """accept_proxy + several certificates: the PROXY header is consumed
    exactly, then the ClientHello behind it (in the same write or not)
    selects the certificate."""
    opts = sni_listener_opts(certs)
    listeners = {"lb": dict({"listen": "127.0.0.1:%d" % free_port(), "mode": "implicit",
                             "accept_proxy": "yes", "proxy_from": "127.0.0.1/32"}, **opts)}
    d = make_bridge(upstream.address, listeners=listeners, health=None)
    hdr = b"PROXY TCP4 192.0.2.9 198.51.100.2 40000 465\r\n"
    ctx = ctx_for(certs)
    raw = socket.create_connection(d.addr("lb"), timeout=10)
    if one_write:
        # the header rides in front of the ClientHello in one send
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(inc, out, server_hostname="mail.sni.test")
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        raw.sendall(hdr + out.read())
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if out.pending:
                    raw.sendall(out.read())
                data = raw.recv(65536)
                assert data, "closed during the handshake"
                inc.write(data)
        if out.pending:
            raw.sendall(out.read())
        der = obj.getpeercert(binary_form=True)
        raw.close()
    else:
        raw.sendall(hdr)
        w = _wrap(ctx.wrap_socket(raw, server_hostname="mail.sni.test"))
        assert w.read_reply().code == 220
        der = w.sock.getpeercert(binary_form=True)
        quit_(w)
    assert sha(der) == pem_cert_sha(os.path.join(certs, "sni-mail.pem"))
    end = d.wait_log(r"event=session_end .*client=192\.0\.2\.9:40000")
    assert 'sni="mail.sni.test"' in end, end
