"""Operations: SIGHUP reload, SIGTERM/SIGINT drain, the admin endpoint
(/healthz, /metrics), workers, JSON logs, upstream TLS resumption, and the
per-client cap behind a PROXY-protocol balancer.

Every test drives a real daemon with sessions in flight and checks what can
be observed from outside: bytes a client received, what the upstream stored
(sha256 of the message), log lines, /proc, exit codes.

A single-process daemon reloads as `user` (nobody) after dropping
privileges, so the configuration, certificates, keys and CA bundle of the
reload tests live in a world-readable directory (pytest's tmp dirs are under
/tmp/pytest-of-root, mode 0700).
"""

import base64
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import tempfile
import threading
import time

import pytest

import bridgelib as bl
from bridgelib import (PASSWORD, TF, USER, RawClient, client_ctx, dot_stuff, free_port,
                       make_message)
from scripted_upstream import ScriptedUpstream, prelude

# after QUIT the upstream's 221 and close can beat the client's close
# A session whose client sent QUIT ends "client quit", whichever side
# closed first (the upstream's 221 says the client asked).
QUIT_REASONS = ("client quit",)
# SubjectPublicKeyInfo algorithm OIDs (DER): rsaEncryption, id-ecPublicKey
RSA_OID = bytes.fromhex("06092a864886f70d010101")
EC_OID = bytes.fromhex("06072a8648ce3d0201")
NOBODY_UID = pwd.getpwnam("nobody").pw_uid


# ---------------------------------------------------------------- helpers

def sha(b):
    return hashlib.sha256(b).hexdigest()


def auth_plain(user=USER, password=PASSWORD):
    return b"AUTH PLAIN " + base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())


def tls_client(certs, addr, timeout=10):
    """Implicit-TLS client with the greeting read: (RawClient, greeting Reply)."""
    c = RawClient(*addr, tls_ctx=client_ctx(certs), timeout=timeout)
    return c, c.read_reply()


def authed(certs, addr):
    """TLS up, EHLO, AUTH 235: (client, greeting)."""
    c, greet = tls_client(certs, addr)
    assert greet.code == 220, greet
    assert c.cmd("EHLO ops.test").code == 250
    r = c.cmd(auth_plain())
    assert r.code == 235, r
    return c, greet


def begin_data(c):
    assert c.cmd("MAIL FROM:<alice@client.test>").code == 250
    assert c.cmd("RCPT TO:<bob@dest.test>").code == 250
    r = c.cmd("DATA")
    assert r.code == 354, r


def big_message(tag, nlines=400):
    body = b"".join(b"%s line %05d %s\r\n" % (tag.encode(), i, b"x" * 60) for i in range(nlines))
    return make_message(tag, body)


def full_session(certs, addr, tag="msg"):
    """AUTH + one message + QUIT through the proxy; returns the message."""
    msg = make_message(tag, b"body of " + tag.encode() + b"\r\n")
    c, _ = authed(certs, addr)
    with c:
        begin_data(c)
        c.send(dot_stuff(msg))
        r = c.read_reply()
        assert r.code == 250, r
        assert c.cmd("QUIT").code == 221
    return msg


def greeting(certs, addr):
    c, g = tls_client(certs, addr)
    with c:
        c.cmd("QUIT")
    return g


def wait_for(pred, timeout, what, step=0.05):
    deadline = time.monotonic() + timeout * TF
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout * TF, what))
        time.sleep(step)


def count_events(d, event):
    return len(d.events(event))


def wait_events(d, event, n, timeout=5):
    return wait_for(lambda: count_events(d, event) >= n and d.events(event), timeout,
                    "%d x event=%s; log tail:\n%s" % (n, event, d.log()[-2000:]))


def wait_exit(d, timeout):
    try:
        return d.proc.wait(timeout * TF)
    except Exception:  # noqa: BLE001
        raise AssertionError("daemon still running %.1fs later; log tail:\n%s"
                             % (timeout * TF, d.log()[-3000:]))


def connect_refused(addr, timeout=2):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(addr)
    except ConnectionRefusedError:
        return True
    finally:
        s.close()
    return False


def peer_cert_sha(certs, addr):
    c = RawClient(*addr, tls_ctx=client_ctx(certs))
    with c:
        der = c.sock.getpeercert(binary_form=True)
        assert c.read_reply().code == 220
    return sha(der)


def pem_cert_sha(path):
    with open(path) as f:
        return sha(ssl.PEM_cert_to_DER_cert(f.read()))


def copy_public(src, dst):
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dst)


def relisteners(sections):
    out = {}
    for header, kv in sections:
        if header.startswith("listener "):
            addrs = []
            for a in kv.get("listen", "").split(","):
                a = a.strip()
                if a:
                    h, _, p = a.rpartition(":")
                    addrs.append((h.strip("[]"), int(p)))
            out[header.split(None, 1)[1]] = (kv.get("mode"), addrs)
    return out


def write_config(d, sections):
    """Replace the daemon's config file atomically (and what the teardown
    health check knows about its listeners)."""
    d.sections = sections
    d.listeners = relisteners(sections)
    tmp = d.conf + ".tmp"
    with open(tmp, "w") as f:
        f.write(bl.render_config(sections))
    os.chmod(tmp, 0o644)
    os.replace(tmp, d.conf)


def edit(sections, header, **kv):
    out = []
    for h, v in sections:
        v = dict(v)
        if h == header:
            v.update(kv)
        out.append((h, v))
    return out


def hup_and_wait(d, ok=True, timeout=5):
    start = len(d.log())
    d.signal(signal.SIGHUP)
    pat = r"event=reload_done" if ok else r"event=reload_failed"
    line = d.wait_log(pat, timeout=timeout, start=start)
    if ok:
        assert "event=reload_failed" not in d.log()[start:], d.log()[start:]
    return line, start


def http(addr, raw, timeout=5):
    """One raw HTTP exchange: (status code or None, headers, body, closed, raw)."""
    s = socket.create_connection(addr, timeout=timeout)
    data, closed = b"", False
    try:
        try:
            s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass
        deadline = time.monotonic() + timeout * TF
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", lines[0]) if lines and lines[0] else None
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(b":")
        headers[k.strip().lower().decode()] = v.strip().decode()
    return (int(m.group(1)) if m else None), headers, body, closed, data


def get(addr, path):
    return http(addr, b"GET " + path.encode() + b" HTTP/1.0\r\nHost: x\r\n\r\n")


_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$")


def metrics(addr):
    code, headers, body, closed, raw = get(addr, "/metrics")
    assert code == 200, raw[:500]
    assert headers.get("content-type", "").startswith("text/plain"), headers
    out = {}
    for ln in body.decode().splitlines():
        if not ln or ln.startswith("#"):
            continue
        m = _SERIES.match(ln)
        assert m, "not Prometheus text: %r" % ln
        out[m.group(1)] = float(m.group(2))
    return out


def children(pid):
    """PIDs whose parent is `pid` (live or zombie)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(name))
    return sorted(out)


def pid_alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def sid_owner(sid):
    """Session ids are (per process base) + n: the first 6 hex digits tell
    the serving process apart."""
    return sid[:6]


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def pubdir(certs):
    """A world-readable copy of the certificates the daemon (re)loads as nobody."""
    d = tempfile.mkdtemp(prefix="smtpbridge-ops-", dir="/tmp")
    os.chmod(d, 0o755)
    for n in ("ca", "proxy", "rsa-proxy"):
        copy_public(os.path.join(certs, n + ".pem"), os.path.join(d, n + ".pem"))
        copy_public(os.path.join(certs, n + ".key"), os.path.join(d, n + ".key"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ops_bridge(make_bridge, upstream, pubdir):
    """Like make_bridge, but config, certs and CA in `pubdir` so that a
    reload by the unprivileged daemon can read them."""

    def factory(listeners=None, global_opts=None, upstream_opts=None, extra=None,
                health="full", start=True, upstream_addr=None):
        if listeners is None:
            listeners = {
                "smtps": {"listen": "127.0.0.1:%d" % free_port(), "mode": "implicit"},
                "sub": {"listen": "127.0.0.1:%d" % free_port(), "mode": "starttls"},
            }
        lopts = {n: {"cert": os.path.join(pubdir, "proxy.pem"),
                     "key": os.path.join(pubdir, "proxy.key")} for n in listeners}
        u = {"ca_file": os.path.join(pubdir, "ca.pem")}
        u.update(upstream_opts or {})
        d = make_bridge(upstream_addr or upstream.address, listeners=listeners,
                        listener_opts=lopts, global_opts=global_opts, upstream_opts=u,
                        extra=extra, health=health, start=False)
        d.conf = os.path.join(pubdir, "smtpbridge.conf")
        write_config(d, d.sections)
        if start:
            d.start()
        return d

    return factory


# ======================================================= 1. SIGHUP reload

def test_reload_hostname_new_sessions_and_inflight_session_finishes(ops_bridge, upstream,
                                                                    certs):
    d = ops_bridge()
    smtps = d.addr("smtps")
    assert greeting(certs, smtps).lines[0].startswith("220 %s " % bl.PROXY_HOSTNAME)

    # a session in the middle of DATA when the reload happens
    msg = big_message("inflight")
    payload = dot_stuff(msg)
    half = len(payload) // 2
    c, _ = authed(certs, smtps)
    with c:
        begin_data(c)
        c.send(payload[:half])

        write_config(d, edit(d.sections, "global", hostname="reloaded.test"))
        line, start = hup_and_wait(d)
        assert d.alive()

        g = greeting(certs, smtps)
        assert g.lines[0].startswith("220 reloaded.test "), g
        # the starttls listener too, and its pre-TLS EHLO
        with RawClient(*d.addr("sub")) as p:
            assert p.read_reply().lines[0].startswith("220 reloaded.test "), p.received
            r = p.cmd("EHLO x.test")
            assert r.lines[0].startswith("250-reloaded.test") or \
                r.lines[0].startswith("250 reloaded.test"), r

        c.send(payload[half:])
        r = c.read_reply()
        assert r.code == 250, r
        assert c.cmd("QUIT").code == 221

    msgs = upstream.wait_messages(1)
    assert len(msgs) == 1, msgs
    assert sha(msgs[0][1]) == sha(msg), (len(msgs[0][1]), len(msg))
    inflight = wait_for(lambda: [e for e in d.events("session_end") if e.get("user") == USER],
                        5, "the in-flight session's session_end")
    ends = d.events("session_end")
    assert inflight[0]["reason"] in QUIT_REASONS, \
        [e["_line"] for e in ends]
    # and a full new session works on the new config
    full_session(certs, smtps, "after-reload")
    assert len(upstream.wait_messages(2)) == 2


def test_reload_rotates_certificate_without_refusing_connections(ops_bridge, pubdir, certs):
    d = ops_bridge()
    smtps = d.addr("smtps")
    ec_sha = pem_cert_sha(os.path.join(pubdir, "proxy.pem"))
    rsa_sha = pem_cert_sha(os.path.join(pubdir, "rsa-proxy.pem"))
    assert ec_sha != rsa_sha
    assert peer_cert_sha(certs, smtps) == ec_sha
    with open(os.path.join(pubdir, "proxy.pem")) as f:
        assert EC_OID in ssl.PEM_cert_to_DER_cert(f.read())

    # the renewal: new files at the same paths
    copy_public(os.path.join(pubdir, "rsa-proxy.pem"), os.path.join(pubdir, "proxy.pem"))
    copy_public(os.path.join(pubdir, "rsa-proxy.key"), os.path.join(pubdir, "proxy.key"))

    stop = threading.Event()
    stats = {"ok": 0, "refused": 0, "other": []}

    def hammer():
        deadline = time.monotonic() + 15 * TF
        for _ in range(5000):
            if stop.is_set() or time.monotonic() > deadline:
                break
            for addr in (smtps, d.addr("sub")):
                s = socket.socket()
                s.settimeout(2)
                try:
                    s.connect(addr)
                    stats["ok"] += 1
                except ConnectionRefusedError:
                    stats["refused"] += 1
                except OSError as e:
                    stats["other"].append(repr(e))
                finally:
                    s.close()
            time.sleep(0.005)

    t = threading.Thread(target=hammer, daemon=True)
    t.start()
    try:
        time.sleep(0.2)
        hup_and_wait(d)
        time.sleep(0.3)
    finally:
        stop.set()
        t.join(10)
    assert stats["refused"] == 0 and not stats["other"], stats
    assert stats["ok"] > 10, stats

    assert peer_cert_sha(certs, smtps) == rsa_sha
    c = RawClient(*smtps, tls_ctx=client_ctx(certs))
    with c:
        der = c.sock.getpeercert(binary_form=True)
        assert c.read_reply().code == 220
    assert RSA_OID in der and EC_OID not in der, "new certificate's key is not RSA"
    # the STARTTLS listener rotated too
    with RawClient(*d.addr("sub")) as p:
        assert p.read_reply().code == 220
        assert p.cmd("EHLO x.test").code == 250
        assert p.cmd("STARTTLS").code == 220
        p.starttls(client_ctx(certs))
        assert sha(p.sock.getpeercert(binary_form=True)) == rsa_sha


def test_reload_invalid_config_keeps_old_one(ops_bridge, certs):
    d = ops_bridge()
    smtps = d.addr("smtps")
    before = greeting(certs, smtps).lines[0]
    good = d.sections
    bad = edit(good, "global", hostname="never.test")
    bad = edit(bad, "listener sub", mode="bogus")
    write_config(d, bad)
    line, start = hup_and_wait(d, ok=False)
    assert "level=error" in line, line
    time.sleep(0.2)
    assert d.alive()
    assert "event=reload_done" not in d.log()[start:]
    assert greeting(certs, smtps).lines[0] == before
    with RawClient(*d.addr("sub")) as p:
        assert p.read_reply().lines[0].startswith("220 %s " % bl.PROXY_HOSTNAME)
    # teardown: full session on the old config (restore what the helper knows)
    d.listeners = relisteners(good)


def test_reload_removed_listener_address_is_refused(ops_bridge, upstream, certs):
    """The removed address refuses at once, even while a session of the old
    runtime (on that very listener) is still in flight; a newly listed
    address is bound."""
    d = ops_bridge()
    sub = d.addr("sub")
    added = ("127.0.0.1", free_port())
    msg = big_message("removed-listener")
    c = bl.smtp_starttls(certs, *sub)
    try:
        c.login(USER, PASSWORD)
        new = [(h, kv) for h, kv in d.sections if h != "listener sub"]
        new.append(("listener added", {"listen": "%s:%d" % added, "mode": "starttls",
                                       "cert": dict(d.sections)["listener sub"]["cert"],
                                       "key": dict(d.sections)["listener sub"]["key"]}))
        write_config(d, new)
        hup_and_wait(d)
        assert connect_refused(sub), \
            "connection to the removed listener %s:%d not refused after reload" % sub
        with RawClient(*added) as p:
            assert p.read_reply().code == 220
        # the in-flight session on the removed listener still finishes
        assert c.sendmail("alice@client.test", ["bob@dest.test"], msg) == {}
        c.quit()
    finally:
        c.close()
    assert sha(upstream.wait_messages(1)[0][1]) == sha(msg)
    assert connect_refused(sub)
    # the kept listener still serves (same socket)
    assert greeting(certs, d.addr("smtps")).code == 220


# ======================================================= 2. drain

def test_sigterm_drain_lets_inflight_session_finish(ops_bridge, upstream, certs):
    admin = ("127.0.0.1", free_port())
    d = ops_bridge(global_opts={"drain_timeout": "3s", "admin": "%s:%d" % admin})
    smtps = d.addr("smtps")
    assert get(admin, "/healthz")[0] == 200
    msg = big_message("drain")
    payload = dot_stuff(msg)
    half = len(payload) // 2
    c, _ = authed(certs, smtps)
    with c:
        begin_data(c)
        c.send(payload[:half])
        start = len(d.log())
        t_sig = time.monotonic()
        d.signal(signal.SIGTERM)
        d.wait_log(r"event=drain signal=TERM", start=start)
        # stop accepting at once: refused, not queued
        assert connect_refused(smtps), "smtps still accepting after SIGTERM"
        assert connect_refused(d.addr("sub")), "sub still accepting after SIGTERM"
        code, _, body, _, raw = get(admin, "/healthz")
        assert code == 503, raw
        time.sleep(0.5)
        assert d.alive(), "exited with a session in flight"
        c.send(payload[half:])
        r = c.read_reply()
        assert r.code == 250, r
        assert c.cmd("QUIT").code == 221
    rc = wait_exit(d, 2.5)
    t_exit = time.monotonic() - t_sig
    assert rc == 0, d.log()[-2000:]
    assert t_exit < 3.0, "exit %.2fs after SIGTERM: waited for drain_timeout" % t_exit
    assert "event=drain_expired" not in d.log()
    d.stop()
    msgs = upstream.wait_messages(1)
    assert len(msgs) == 1 and sha(msgs[0][1]) == sha(msg)


def test_sigterm_drain_timeout_sends_421_to_idle_session(ops_bridge, certs):
    d = ops_bridge(global_opts={"drain_timeout": "1s"})
    c, g = tls_client(certs, d.addr("smtps"))
    with c:
        assert g.code == 220
        assert c.cmd("EHLO idle.test").code == 250
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        r = c.read_reply(timeout=6)
        dt = time.monotonic() - t0
        assert r.lines[0].startswith("421 4.3.2"), r
        assert 0.8 <= dt <= 3.0, "421 after %.2fs (drain_timeout 1s)" % dt
        rest, closed = c.read_until_close(5)
        assert closed and rest == b"", rest
    rc = wait_exit(d, 1 + 4)
    assert rc == 0
    assert time.monotonic() - t0 < 1 + 4 * TF
    assert d.events("drain_expired"), d.log()[-2000:]
    d.stop()


def test_sigint_sends_421_at_once(ops_bridge, certs):
    d = ops_bridge(global_opts={"drain_timeout": "30s"})
    c, g = tls_client(certs, d.addr("smtps"))
    with c:
        assert g.code == 220
        assert c.cmd("EHLO idle.test").code == 250
        t0 = time.monotonic()
        d.signal(signal.SIGINT)
        r = c.read_reply(timeout=5)
        dt = time.monotonic() - t0
        assert r.lines[0].startswith("421 4.3.2"), r
        assert dt < 1.0 * TF, "421 only after %.2fs" % dt
        c.read_until_close(5)
    rc = wait_exit(d, 5)
    assert rc == 0
    assert time.monotonic() - t0 < 5 * TF
    assert d.wait_log(r"event=drain signal=INT")
    d.stop()


# ======================================================= 3. admin endpoint

NO_STARTTLS_CAPS = ["upstream.test", "PIPELINING", "SIZE 67108864", "8BITMIME"]


def test_admin_metrics_and_healthz(make_bridge, upstream, certs):
    bad_up = ScriptedUpstream(prelude(caps=NO_STARTTLS_CAPS) + [("hang", 3)],
                              cert=os.path.join(certs, "upstream.pem"),
                              key=os.path.join(certs, "upstream.key"),
                              drain_timeout=1).start()
    try:
        admin = ("127.0.0.1", free_port())
        listeners = {
            "smtps": {"listen": "127.0.0.1:%d" % free_port(), "mode": "implicit"},
            "bad": {"listen": "127.0.0.1:%d" % free_port(), "mode": "implicit",
                    "upstream": "noTLS"},
        }
        extra = [("upstream noTLS", {"address": bad_up.address, "tls": "starttls",
                                     "ca_file": os.path.join(certs, "ca.pem"),
                                     "server_name": "localhost", "reply_timeout": "3s",
                                     "connect_timeout": "2s"})]
        d = make_bridge(upstream.address, listeners=listeners, extra=extra,
                        global_opts={"admin": "%s:%d" % admin})

        code, headers, body, closed, raw = get(admin, "/healthz")
        assert code == 200 and body == b"ok\n", raw
        assert closed, "admin connection not closed after the response"
        m0 = metrics(admin)
        assert m0.get("smtpbridge_draining") == 0, m0

        # one successful session, one failed AUTH, one refused upstream
        full_session(certs, d.addr("smtps"), "metrics")
        c, _ = tls_client(certs, d.addr("smtps"))
        with c:
            assert c.cmd("EHLO m.test").code == 250
            r = c.cmd(auth_plain(password="wrong-password"))
            assert r.code == 535, r
            # QUIT behind the AUTH gate: relayed, but "abandoned", not "completed"
            assert c.cmd("QUIT").code == 221
        c, g = tls_client(certs, d.addr("bad"))
        with c:
            assert g.code == 220
            r = c.cmd("EHLO m.test")
            assert r.code == 421, r
            c.read_until_close(5)

        def settled():
            m = metrics(admin)
            return m if (m.get('smtpbridge_sessions_active{listener="smtps"}') == 0 and
                         m.get('smtpbridge_sessions_active{listener="bad"}') == 0) else None
        m = wait_for(settled, 5, "sessions_active back to 0")
        want = {
            'smtpbridge_sessions_total{listener="smtps"}': 2,
            'smtpbridge_sessions_total{listener="bad"}': 1,
            'smtpbridge_sessions_ended_total{listener="smtps",reason="completed"}': 1,
            'smtpbridge_sessions_ended_total{listener="smtps",reason="abandoned"}': 1,
            'smtpbridge_sessions_ended_total{listener="bad",reason="upstream_error"}': 1,
            'smtpbridge_auth_total{result="success"}': 1,
            'smtpbridge_auth_total{result="failure"}': 1,
        }
        got = {k: m.get(k) for k in want}
        assert got == want, "\n".join("%s %s" % kv for kv in sorted(m.items()))
        assert m["smtpbridge_upstream_dial_seconds_count"] >= 1
        assert m['smtpbridge_upstream_dial_seconds_bucket{le="+Inf"}'] == \
            m["smtpbridge_upstream_dial_seconds_count"]
        assert m['smtpbridge_bytes_total{direction="client_to_upstream"}'] > 0
        assert m['smtpbridge_bytes_total{direction="upstream_to_client"}'] > 0

        # the HTTP surface
        code, _, _, closed, raw = get(admin, "/nope")
        assert code == 404 and closed, raw
        code, _, _, closed, raw = http(admin, b"POST /metrics HTTP/1.0\r\nContent-Length: 0"
                                              b"\r\n\r\n")
        assert code == 405 and closed, raw
        code, _, _, closed, raw = http(admin, b"GET /healthz HTTP/1.0\r\nX-Big: "
                                       + b"a" * 4096 + b"\r\n\r\n")
        assert (code == 431 or (code is None and closed)), raw[:300]
        # one response per connection, even with a second request queued
        code, _, body, closed, raw = http(admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                                                 b"Connection: keep-alive\r\n\r\n"
                                                 b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert code == 200 and closed and raw.count(b"HTTP/1.") == 1, raw
        assert d.alive()
    finally:
        bad_up.stop()


# ======================================================= 4. workers

def worker_pids(d, n, timeout=5):
    return wait_for(lambda: (lambda k: k if len(k) == n and all(pid_alive(p) for p in k)
                             else None)([p for p in children(d.proc.pid) if pid_alive(p)]),
                    timeout, "%d live workers under %d (now %s)"
                    % (n, d.proc.pid, children(d.proc.pid)))


def test_workers_supervision_reload_and_stop(ops_bridge, upstream, certs):
    admin = ("127.0.0.1", free_port())
    d = ops_bridge(global_opts={"workers": "2", "admin": "%s:%d" % admin,
                                "max_sessions_per_ip": "0"})
    smtps = d.addr("smtps")
    wait_events(d, "worker_ready", 2)
    master = d.proc.pid
    ws = worker_pids(d, 2)
    assert bl.proc_status(master)["Uid"].split()[0] == "0"
    for w in ws:
        assert bl.proc_status(w)["Uid"].split()[1] == str(NOBODY_UID), bl.proc_status(w)
    ready = {int(e["pid"]) for e in d.events("worker_ready")}
    assert ready == set(ws), (ready, ws)

    # sessions are spread over both workers
    n = 0
    owners = set()
    for n in range(1, 31):
        full_session(certs, smtps, "w%d" % n)
        if n >= 10:
            ends = wait_events(d, "session_end", n)
            owners = {sid_owner(e["sid"]) for e in ends}
            if len(owners) == 2:
                break
    assert len(owners) == 2, "all %d sessions served by one worker: %s" % (
        n, [e["_line"] for e in d.events("session_end")][:3])
    assert len(upstream.wait_messages(n)) == n
    # the master's /metrics adds up both workers
    m = wait_for(lambda: (lambda m: m if m.get('smtpbridge_sessions_active{listener="smtps"}')
                          == 0 else None)(metrics(admin)), 5, "sessions_active 0")
    assert m['smtpbridge_sessions_total{listener="smtps"}'] == n, m
    assert m['smtpbridge_sessions_ended_total{listener="smtps",reason="completed"}'] == n
    assert m['smtpbridge_auth_total{result="success"}'] == n

    # a worker killed: logged, replaced, service continues
    victim = ws[0]
    start = len(d.log())
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    d.wait_log(r"event=worker_died pid=%d signal=9" % victim, start=start)
    line = d.wait_log(r"event=worker_started pid=\d+", start=start, timeout=2.5)
    assert time.monotonic() - t0 < 2.5 * TF
    replacement = int(parse(line)["pid"])
    assert replacement != victim
    ws2 = worker_pids(d, 2)
    assert victim not in ws2 and replacement in ws2, (ws2, victim, replacement)
    full_session(certs, smtps, "after-kill")
    n += 1

    # reload: new workers on the new config, old ones drain (one of them
    # carries a session in the middle of DATA) and exit
    msg = big_message("w-reload")
    payload = dot_stuff(msg)
    c, _ = authed(certs, smtps)
    with c:
        begin_data(c)
        c.send(payload[:len(payload) // 2])
        write_config(d, edit(d.sections, "global", hostname="reloaded.test"))
        line, start = hup_and_wait(d)
        assert "workers=2" in line, line
        new = wait_for(lambda: (lambda k: k if len(k) == 2 else None)(
            [int(e["pid"]) for e in bl.log_events(d.log()[start:], "worker_ready")]),
            5, "2 new workers ready")
        assert not set(new) & set(ws2)
        assert greeting(certs, smtps).lines[0].startswith("220 reloaded.test ")
        time.sleep(0.3)
        assert any(pid_alive(p) for p in ws2), "old workers gone with a session in flight"
        c.send(payload[len(payload) // 2:])
        r = c.read_reply()
        assert r.code == 250, r
        assert c.cmd("QUIT").code == 221
    n += 1
    wait_for(lambda: not any(pid_alive(p) for p in ws2), 5, "old workers %s to exit" % ws2)
    for p in ws2:
        d.wait_log(r"event=worker_exited pid=%d status=0" % p, start=start)
    assert sorted(worker_pids(d, 2)) == sorted(new)
    msgs = upstream.wait_messages(n)
    assert len(msgs) == n and sha(msgs[-1][1]) == sha(msg)

    # stop: master exits 0, no worker left
    rc = d.stop()
    assert rc == 0, d.log()[-2000:]
    for p in new:
        assert not os.path.exists("/proc/%d" % p), "worker %d still exists" % p


def parse(line):
    return bl.parse_log_line(line)


def socket_owner(client_sock, pids):
    """Which of `pids` holds the server side of `client_sock` (via the
    socket inode in /proc/net/tcp whose remote end is the client's port)."""
    lport = client_sock.getsockname()[1]
    inodes = set()
    with open("/proc/net/tcp") as f:
        for ln in f.readlines()[1:]:
            fl = ln.split()
            if int(fl[2].split(":")[1], 16) == lport:
                inodes.add("socket:[%s]" % fl[9])
    for pid in pids:
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) in inodes:
                    return pid
            except OSError:
                pass
    return None


def test_workers_killed_worker_sessions_leave_the_gauge(ops_bridge, certs):
    """A worker killed with a session open: the client's connection goes,
    and once nothing is open, smtpbridge_sessions_active is 0 again."""
    admin = ("127.0.0.1", free_port())
    d = ops_bridge(global_opts={"workers": "2", "admin": "%s:%d" % admin})
    wait_events(d, "worker_ready", 2)
    ws = worker_pids(d, 2)
    c, _ = authed(certs, d.addr("smtps"))
    with c:
        owner = wait_for(lambda: socket_owner(c.sock, ws), 2, "the worker serving the session")
        m = metrics(admin)
        assert m['smtpbridge_sessions_active{listener="smtps"}'] == 1, m
        start = len(d.log())
        os.kill(owner, signal.SIGKILL)
        d.wait_log(r"event=worker_died pid=%d signal=9" % owner, start=start)
        data, closed = c.read_until_close(3)
        assert closed, "session of the killed worker still open"
    d.wait_log(r"event=worker_started", start=start, timeout=2.5)
    worker_pids(d, 2)
    full_session(certs, d.addr("smtps"), "after-kill")
    deadline = time.monotonic() + 3 * TF
    while True:
        active = metrics(admin)['smtpbridge_sessions_active{listener="smtps"}']
        if active == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert active == 0, ("smtpbridge_sessions_active{listener=\"smtps\"} = %g with no session "
                         "open: the killed worker's session is never subtracted" % active)


def test_workers_sigterm_drains_sessions_and_exits(ops_bridge, upstream, certs):
    admin = ("127.0.0.1", free_port())
    d = ops_bridge(global_opts={"workers": "2", "admin": "%s:%d" % admin,
                                "drain_timeout": "1s"})
    wait_events(d, "worker_ready", 2)
    ws = worker_pids(d, 2)
    smtps = d.addr("smtps")
    msg = big_message("w-drain")
    payload = dot_stuff(msg)
    busy, _ = authed(certs, smtps)
    idle, g = tls_client(certs, smtps)
    with busy, idle:
        assert g.code == 220 and idle.cmd("EHLO idle.test").code == 250
        begin_data(busy)
        busy.send(payload[:len(payload) // 2])
        start = len(d.log())
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        d.wait_log(r"event=drain signal=TERM", start=start)
        wait_for(lambda: connect_refused(smtps, 1), 2, "smtps refusing after SIGTERM")
        assert get(admin, "/healthz")[0] == 503
        busy.send(payload[len(payload) // 2:])
        r = busy.read_reply()
        assert r.code == 250, r
        r = idle.read_reply(timeout=5)
        assert r.lines[0].startswith("421 4.3.2"), r
        assert time.monotonic() - t0 >= 0.8
        busy.read_until_close(5)
    rc = wait_exit(d, 6)
    assert rc == 0, d.log()[-2000:]
    d.stop()
    for p in ws:
        assert not os.path.exists("/proc/%d" % p), "worker %d still exists" % p
    assert sha(upstream.wait_messages(1)[0][1]) == sha(msg)


def test_second_sigterm_closes_everything_at_once(ops_bridge, certs):
    d = ops_bridge(global_opts={"drain_timeout": "30s"})
    c, g = tls_client(certs, d.addr("smtps"))
    with c:
        assert c.cmd("EHLO idle.test").code == 250
        start = len(d.log())
        d.signal(signal.SIGTERM)
        d.wait_log(r"event=drain signal=TERM", start=start)
        time.sleep(0.2)
        assert d.alive()
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        data, closed = c.read_until_close(3)
        assert closed and data == b"", data
    assert wait_exit(d, 3) == 0
    assert time.monotonic() - t0 < 3 * TF
    assert d.events("shutdown_now")
    d.stop()


# ======================================================= 5. JSON logs

def start_json(d, timeout=10):
    import subprocess
    d._err = open(d.stderr_path, "ab")
    d._out = open(d.stdout_path, "ab")
    d.proc = subprocess.Popen(bl.WRAPPER + [bl.BIN, "-c", d.conf], stdin=subprocess.DEVNULL,
                              stdout=d._out, stderr=d._err, cwd=d.tmpdir)
    wait_for(lambda: '"event":"ready"' in d.log() or d.proc.poll() is not None, timeout,
             "JSON ready line; log:\n%s" % d.log()[-2000:])
    assert d.proc.poll() is None, d.log()


def test_json_log_format(make_bridge, upstream, certs):
    d = make_bridge(upstream.address, global_opts={"log_format": "json"}, start=False)
    start_json(d)
    full_session(certs, d.addr("smtps"), "json")
    c, _ = tls_client(certs, d.addr("smtps"))
    with c:
        assert c.cmd("EHLO j.test").code == 250
        r = c.cmd(auth_plain(user='we"ird\\us\ter\x01', password="nope"))
        assert r.code == 535, r
        assert c.cmd("QUIT").code == 221
    # a plaintext client on the TLS port: a TLS error with a quoted reason
    s = socket.create_connection(d.addr("smtps"), timeout=5)
    s.sendall(b"EHLO \"quoted\" \\ name\r\n")
    bl.closed_within(s, 5)
    s.close()
    wait_for(lambda: d.log().count('"event":"session_end"') >= 3, 5, "3 session_end")
    rc = d.stop()
    assert rc == 0
    objs = []
    for i, ln in enumerate(d.log().splitlines()):
        try:
            o = json.loads(ln)
        except ValueError as e:
            raise AssertionError("stderr line %d is not JSON (%s): %r" % (i + 1, e, ln))
        assert isinstance(o, dict), ln
        assert "ts" in o and "level" in o, ln
        objs.append(o)
    ends = [o for o in objs if o.get("event") == "session_end"]
    assert len(ends) >= 3, objs
    for o in ends:
        for k in ("client", "listener", "reason", "bytes_c2u"):
            assert k in o, o
        assert o["listener"] == "smtps"
        assert o["client"].startswith("127.0.0.1:")
    assert any(o["reason"] in QUIT_REASONS and int(o["bytes_c2u"]) > 0 for o in ends), ends
    assert any(o.get("event") == "exit" for o in objs)
    fails = [o for o in objs if o.get("event") == "auth_failed"]
    assert fails and fails[0]["user"] == 'we"ird\\us?er?', fails


def test_reload_switches_log_format_at_once(ops_bridge, certs):
    d = ops_bridge()
    start = len(d.log())
    write_config(d, edit(d.sections, "global", log_format="json"))
    d.signal(signal.SIGHUP)
    d.wait_log(r'"event":"reload_done"', start=start)
    full_session(certs, d.addr("smtps"), "json-after-reload")
    wait_for(lambda: '"event":"session_end"' in d.log()[start:], 5, "a JSON session_end")
    after = d.log()[start:].splitlines()
    i = next(k for k, ln in enumerate(after) if '"event":"reload_done"' in ln)
    for ln in after[i:]:
        assert isinstance(json.loads(ln), dict), ln


# ======================================================= 6. upstream TLS resumption

def test_upstream_tls_resumption(make_bridge, upstream, certs):
    d = make_bridge(upstream.address)
    smtps = d.addr("smtps")
    full_session(certs, smtps, "first")
    e1 = wait_events(d, "session_end", 1)[-1]
    assert e1.get("upstream_tls") == "TLSv1.3", e1["_line"]
    assert "upstream_resumed" not in e1, e1["_line"]
    full_session(certs, smtps, "second")
    e2 = wait_events(d, "session_end", 2)[-1]
    assert e2.get("upstream_resumed") == "yes", e2["_line"]

    # clients that leave right after the greeting must not spoil later dials
    for i in range(3):
        c, g = tls_client(certs, smtps)
        assert g.code == 220
        c.close()
        wait_events(d, "session_end", 3 + i)
    full_session(certs, smtps, "after-early-quits")
    full_session(certs, smtps, "and-again")
    msgs = upstream.wait_messages(4)
    assert len(msgs) == 4
    ends = wait_events(d, "session_end", 7)
    assert all(e["reason"] in QUIT_REASONS for e in ends[-2:]), [e["_line"] for e in ends]
    assert any(e.get("upstream_resumed") == "yes" for e in ends[-2:]), \
        [e["_line"] for e in ends[-2:]]


# ======================================================= 7. PROXY header + per-IP cap

def pp_v1(src, sport, dst="127.0.0.1", dport=2525):
    return ("PROXY TCP4 %s %s %d %d\r\n" % (src, dst, sport, dport)).encode()


def test_per_ip_cap_applies_to_real_client_behind_balancer(make_bridge, upstream, certs):
    lb = ("127.0.0.1", free_port())
    d = make_bridge(upstream.address,
                    listeners={"lb": {"listen": "%s:%d" % lb, "mode": "starttls",
                                      "accept_proxy": "yes", "proxy_from": "127.0.0.1/32"}},
                    global_opts={"max_sessions_per_ip": "2"}, health=None)

    def open_as(client_ip, sport):
        c = RawClient(*lb, timeout=5)
        c.send(pp_v1(client_ip, sport, dport=lb[1]))
        return c

    held = []
    try:
        for i in range(2):
            c = open_as("192.0.2.7", 40000 + i)
            held.append(c)
            assert c.read_reply().code == 220, c.received
        start = len(d.log())
        third = open_as("192.0.2.7", 40002)
        with third:
            data, closed = third.read_until_close(5)
            assert closed and b"220" not in data, data
        line = d.wait_log(r"cap=max_sessions_per_ip", start=start)
        assert "client=192.0.2.7" in line and "via=127.0.0.1" in line, line
    finally:
        for c in held:
            c.close()
    wait_events(d, "session_end", 3)

    # three different clients from the same balancer: all served at once
    held = []
    try:
        for i, ip in enumerate(("192.0.2.7", "192.0.2.8", "192.0.2.9")):
            c = open_as(ip, 41000 + i)
            held.append(c)
            r = c.read_reply()
            assert r.code == 220, (ip, c.received)
        for c in held:
            assert c.cmd("EHLO lb.test").code == 250
        assert len(d.events("reject")) == 1, [e["_line"] for e in d.events("reject")]
    finally:
        for c in held:
            c.close()


# ======================================================= 8. RSA backend

RSA_COUNTER = "smtpbridge_rsa_openssl_signatures_total"


def rsa_bridge(ops_bridge, pubdir, certs, backend, workers=None, cert="rsa-proxy", env=None):
    """A daemon whose listeners use an RSA certificate, with an admin
    endpoint and `env` added to its environment; returns (daemon, admin
    address)."""
    for n in (cert, "rsa-proxy"):
        copy_public(os.path.join(certs, n + ".pem"), os.path.join(pubdir, n + ".pem"))
        copy_public(os.path.join(certs, n + ".key"), os.path.join(pubdir, n + ".key"))
    copy_public(os.path.join(pubdir, cert + ".pem"), os.path.join(pubdir, "proxy.pem"))
    copy_public(os.path.join(pubdir, cert + ".key"), os.path.join(pubdir, "proxy.key"))
    admin = ("127.0.0.1", free_port())
    g = {"rsa_backend": backend, "admin": "%s:%d" % admin}
    if workers:
        g.update({"workers": str(workers), "max_sessions_per_ip": "0"})
    d = ops_bridge(global_opts=g, start=False)
    if env:
        d.prefix = ["env"] + ["%s=%s" % kv for kv in env.items()]
    d.start()
    if workers:
        wait_events(d, "worker_ready", workers)
    return d, admin


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        return set(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))


def under_valgrind():
    return any("valgrind" in w for w in bl.WRAPPER)  # valgrind's CPU has no AVX-512


def cpu_has_ifma():
    """What rsa_backend = auto asks of the CPU."""
    return cpu_flags() >= {"avx512f", "avx512ifma", "avx512vl"} and not under_valgrind()


def assert_auto_kept_wolfssl(d, admin, certs, pem, ifma_says):
    """d (rsa_backend = auto, certificate `pem`) logged its choice, which
    is `ifma_says` on an IFMA CPU, and signed a handshake without libcrypto."""
    line = d.wait_log(r"event=rsa_backend ")
    if cpu_has_ifma():
        assert ifma_says in line, line
    else:
        assert "by wolfSSL (rsa_backend = auto: the CPU has no AVX-512 IFMA)" in line, line
    assert peer_cert_sha(certs, d.addr("smtps")) == pem_cert_sha(pem)
    assert metrics(admin)[RSA_COUNTER] == 0


def assert_one_libcrypto_signature(d, admin, certs, pem):
    """One handshake with d's implicit-TLS listener, its certificate `pem`,
    signed by libcrypto (its self-test handshakes signed before)."""
    base = metrics(admin)[RSA_COUNTER]
    assert base >= 1, "the self-test handshakes"
    assert peer_cert_sha(certs, d.addr("smtps")) == pem_cert_sha(pem)
    assert metrics(admin)[RSA_COUNTER] == base + 1


def s_client_pkcs1(certs, addr):
    """A TLS 1.2 handshake that allows only PKCS#1 v1.5 RSA signatures (the
    ServerKeyExchange path, not TLS 1.3's RSA-PSS CertificateVerify), the
    certificate verified; returns openssl's output."""
    cp = bl.run(["openssl", "s_client", "-connect", "%s:%d" % addr, "-tls1_2",
                 "-sigalgs", "RSA+SHA256", "-CAfile", os.path.join(certs, "ca.pem"),
                 "-verify_return_error", "-brief"], input=b"", timeout=20)
    out = cp.stdout.decode(errors="replace") + cp.stderr.decode(errors="replace")
    assert cp.returncode == 0, out
    assert "Verification: OK" in out, out
    assert re.search(r"^(Peer )?Signature type: RSA$", out, re.M), out  # not RSA-PSS
    return out


def test_rsa_backend_openssl_signs_every_handshake(ops_bridge, pubdir, certs, upstream):
    d, admin = rsa_bridge(ops_bridge, pubdir, certs, "openssl")
    line = d.wait_log(r"event=rsa_backend ")
    assert "by OpenSSL" in line and "rsa_backend = openssl" in line, line
    base = metrics(admin)[RSA_COUNTER]
    assert base >= 1, "the self-test handshake signs too"
    rsa_sha = pem_cert_sha(os.path.join(pubdir, "rsa-proxy.pem"))
    # TLS 1.3 (RSA-PSS CertificateVerify), verified by the client against the CA
    for i in range(3):
        assert peer_cert_sha(certs, d.addr("smtps")) == rsa_sha
    # a whole session relays the message
    msg = full_session(certs, d.addr("smtps"), "rsa-openssl")
    assert sha(upstream.wait_messages(1)[0][1]) == sha(msg)
    # TLS 1.2 ECDHE-RSA (the ServerKeyExchange signature), over STARTTLS
    with RawClient(*d.addr("sub")) as p:
        assert p.read_reply().code == 220
        assert p.cmd("EHLO x.test").code == 250
        assert p.cmd("STARTTLS").code == 220
        ctx = client_ctx(certs)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        p.starttls(ctx)
        assert p.sock.version() == "TLSv1.2", p.sock.version()
        assert sha(p.sock.getpeercert(binary_form=True)) == rsa_sha
        assert p.cmd("EHLO x.test").code == 250
    s_client_pkcs1(certs, d.addr("smtps"))
    m = metrics(admin)
    assert m[RSA_COUNTER] == base + 6, (base, m[RSA_COUNTER])
    assert "rsa_backend_error" not in d.log()


def test_rsa_backend_wolfssl_keeps_libcrypto_out(ops_bridge, pubdir, certs):
    d, admin = rsa_bridge(ops_bridge, pubdir, certs, "wolfssl")
    line = d.wait_log(r"event=rsa_backend ")
    assert "by wolfSSL (rsa_backend = wolfssl)" in line, line
    rsa_sha = pem_cert_sha(os.path.join(pubdir, "rsa-proxy.pem"))
    for i in range(3):
        assert peer_cert_sha(certs, d.addr("smtps")) == rsa_sha
    assert metrics(admin)[RSA_COUNTER] == 0


def test_rsa_backend_auto_follows_the_cpu(ops_bridge, pubdir, certs):
    """auto: libcrypto only where OpenSSL has its AVX-512 IFMA code, and
    then only for 2048-bit keys; this RSA-3072 listener stays with wolfSSL
    everywhere."""
    d, admin = rsa_bridge(ops_bridge, pubdir, certs, "auto", cert="rsa3072-proxy")
    assert_auto_kept_wolfssl(d, admin, certs, os.path.join(pubdir, "rsa3072-proxy.pem"),
                             "RSA-2048 private-key operations by OpenSSL")
    if cpu_has_ifma():
        # and an RSA-2048 listener on the same CPU is signed by libcrypto
        d2, admin2 = rsa_bridge(ops_bridge, pubdir, certs, "auto")
        assert_one_libcrypto_signature(d2, admin2, certs, os.path.join(pubdir, "rsa-proxy.pem"))


def test_rsa_backend_auto_leaves_an_openssl_ia32cap_mask_alone(ops_bridge, pubdir, certs):
    """OPENSSL_ia32cap set (here as operators set it to keep OpenSSL off
    AVX-512 IFMA: leaf-7 EBX bit 21 masked) makes auto keep RSA-2048 with
    wolfSSL, and says why; rsa_backend = openssl still uses libcrypto."""
    mask = {"OPENSSL_ia32cap": ":~0x200000"}
    d, admin = rsa_bridge(ops_bridge, pubdir, certs, "auto", env=mask)
    assert_auto_kept_wolfssl(d, admin, certs, os.path.join(pubdir, "rsa-proxy.pem"),
                             "by wolfSSL (rsa_backend = auto: OPENSSL_ia32cap is set")
    d.stop()
    d2, admin2 = rsa_bridge(ops_bridge, pubdir, certs, "openssl", env=mask)
    assert "rsa_backend = openssl" in d2.wait_log(r"event=rsa_backend ")
    assert_one_libcrypto_signature(d2, admin2, certs, os.path.join(pubdir, "rsa-proxy.pem"))


def test_rsa_backend_failed_reload_keeps_the_running_choice(ops_bridge, pubdir, certs):
    """A reload that fails while building its TLS contexts (a key that does
    not match its certificate) leaves the running choice in force: no
    event=rsa_backend for the refused configuration, and the RSA-3072
    listener is still signed by libcrypto (rsa_backend = openssl), although
    the refused file said auto (RSA-2048 only)."""
    d, admin = rsa_bridge(ops_bridge, pubdir, certs, "openssl", cert="rsa3072-proxy")
    good = d.sections
    bad = edit(good, "global", rsa_backend="auto")
    bad = edit(bad, "listener sub", key=os.path.join(pubdir, "rsa-proxy.key"))
    write_config(d, bad)
    line, start = hup_and_wait(d, ok=False)
    assert "event=rsa_backend " not in d.log()[start:], d.log()[start:]
    before = metrics(admin)[RSA_COUNTER]
    assert peer_cert_sha(certs, d.addr("smtps")) == pem_cert_sha(
        os.path.join(pubdir, "rsa3072-proxy.pem"))
    assert metrics(admin)[RSA_COUNTER] == before + 1
    d.listeners = relisteners(good)


def test_rsa_backend_in_workers_and_across_a_key_change(ops_bridge, pubdir, certs, upstream):
    """Each worker signs with its own libcrypto key (forked from a master
    that used it in the self-test); a reload to an RSA-3072 key is signed
    with the new key, not a held copy of the old one."""
    d, admin = rsa_bridge(ops_bridge, pubdir, certs, "openssl", workers=2)
    smtps = d.addr("smtps")
    rsa_sha = pem_cert_sha(os.path.join(pubdir, "rsa-proxy.pem"))
    owners = set()
    n = 0
    for n in range(1, 31):
        full_session(certs, smtps, "w%d" % n)
        if n >= 6:
            owners = {sid_owner(e["sid"]) for e in wait_events(d, "session_end", n)}
            if len(owners) == 2:
                break
    assert len(owners) == 2, "all sessions served by one worker"
    assert len(upstream.wait_messages(n)) == n
    assert peer_cert_sha(certs, smtps) == rsa_sha
    before = metrics(admin)[RSA_COUNTER]
    assert before >= n + 1, (before, n)

    copy_public(os.path.join(certs, "rsa3072-proxy.pem"), os.path.join(pubdir, "proxy.pem"))
    copy_public(os.path.join(certs, "rsa3072-proxy.key"), os.path.join(pubdir, "proxy.key"))
    hup_and_wait(d)
    wait_events(d, "worker_ready", 4)
    new_sha = pem_cert_sha(os.path.join(certs, "rsa3072-proxy.pem"))
    for i in range(4):
        # the client checks the signature against the new certificate's key
        assert peer_cert_sha(certs, smtps) == new_sha
    full_session(certs, smtps, "after-reload")
    assert metrics(admin)[RSA_COUNTER] >= before + 5
    assert "rsa_backend_error" not in d.log()


def test_upstream_client_certificate_signed_by_rsa_backend(make_bridge, upstream, certs):
    """An upstream that requires a client certificate: without `cert`/`key`
    in [upstream] the session gets a 421; with an RSA pair the proxy
    authenticates, and with rsa_backend = openssl libcrypto signs its
    CertificateVerify (the listeners are ECDSA: nothing else is RSA)."""
    upstream.tls_context.load_verify_locations(os.path.join(certs, "ca.pem"))
    upstream.tls_context.verify_mode = ssl.CERT_REQUIRED

    bare = make_bridge(upstream.address, health=None)
    with RawClient(*bare.addr("smtps"), tls_ctx=client_ctx(certs)) as c:
        replies = [c.read_reply()]
        for line in ("EHLO ops.test", auth_plain()):
            if replies[-1].code == 421:
                break
            replies.append(c.cmd(line))
    assert replies[-1].code == 421, replies
    # TLS 1.3: the upstream refuses after the proxy's Finished. A server
    # that sends its alert (116 certificate_required) gets it named in the
    # reason; this Python upstream closes without one arriving.
    bare.wait_log(r'event=session_end .*reason="upstream closed the connection')
    assert upstream.messages() == []

    admin = ("127.0.0.1", free_port())
    d = make_bridge(upstream.address,
                    global_opts={"rsa_backend": "openssl", "admin": "%s:%d" % admin},
                    upstream_opts={"cert": os.path.join(certs, "rsa-client.pem"),
                                   "key": os.path.join(certs, "rsa-client.key")})
    assert metrics(admin)[RSA_COUNTER] == 0
    msg = full_session(certs, d.addr("smtps"), "client-cert")
    assert sha(upstream.wait_messages(1)[0][1]) == sha(msg)
    assert metrics(admin)[RSA_COUNTER] >= 1


# ======================================================= 9. AES-GCM by VAES

GCM_COUNTER = "smtpbridge_aes_gcm_vaes_records_total"


def cpu_has_vaes():
    """What gcm_vaes_usable() asks of the CPU; valgrind's CPU has none of
    it, so under valgrind wolfSSL does AES-GCM."""
    return not under_valgrind() and cpu_flags() >= {"avx2", "aes", "pclmulqdq", "vaes",
                                                     "vpclmulqdq"}


class MemTLS:
    """An implicit-TLS client whose TLS records pass through the test's
    hands (ssl.MemoryBIO), so that a test can change a byte of one."""

    def __init__(self, certs, addr):
        self.sock = socket.create_connection(addr, timeout=10 * TF)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = client_ctx(certs).wrap_bio(self.inc, self.out, server_hostname="localhost")
        self.buf = b""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._feed()
        self._flush()

    def _flush(self, tamper=None):
        data = self.out.read()
        if data:
            self.sock.sendall(tamper(data) if tamper else data)

    def _feed(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("closed")
        self.inc.write(data)

    def send(self, data, tamper=None):
        self.obj.write(data)
        self._flush(tamper)

    def reply(self):
        while True:
            lines = self.buf.split(b"\r\n")
            for i, ln in enumerate(lines[:-1]):
                if len(ln) < 4 or ln[3:4] != b"-":
                    self.buf = b"\r\n".join(lines[i + 1:])
                    return int(ln[:3])
            try:
                self.buf += self.obj.read(65536)
            except ssl.SSLWantReadError:
                self._feed()

    def cmd(self, line):
        self.send(line + b"\r\n")
        return self.reply()


def gcm_bridge(ops_bridge, setting=None):
    admin = ("127.0.0.1", free_port())
    g = {"admin": "%s:%d" % admin}
    if setting:
        g["aes_gcm"] = setting
    d = ops_bridge(global_opts=g)
    return d, admin, d.wait_log(r"event=aes_gcm ")


def relay_big(certs, addr, tag, tls12=False):
    """AUTH and one ~550 KB message, over implicit TLS (TLS 1.3) or over
    STARTTLS with TLS 1.2 and AES-128-GCM; returns the message."""
    msg = big_message(tag, nlines=6000)
    if tls12:
        c = RawClient(*addr)
        assert c.read_reply().code == 220
        assert c.cmd("EHLO ops.test").code == 250
        assert c.cmd("STARTTLS").code == 220
        ctx = client_ctx(certs)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
        c.starttls(ctx)
        assert c.sock.version() == "TLSv1.2" and "AES128-GCM" in c.sock.cipher()[0], c.sock.cipher()
        assert c.cmd("EHLO ops.test").code == 250
        assert c.cmd(auth_plain()).code == 235
    else:
        c, _ = authed(certs, addr)
    with c:
        begin_data(c)
        c.send(dot_stuff(msg))
        r = c.read_reply(timeout=30)
        assert r.code == 250, r
        assert c.cmd("QUIT").code == 221
    return msg


def test_aes_gcm_auto_relays_bulk_data_byte_for_byte(ops_bridge, certs, upstream):
    """aes_gcm = auto (the default): on a CPU with VAES the records of a
    big message are decrypted (client leg) and encrypted (upstream leg) by
    gcm_vaes.c, and OpenSSL at both ends (the client, the upstream) accepts
    every byte and tag: TLS 1.3 with AES-256-GCM, TLS 1.2 with AES-128-GCM.
    Elsewhere wolfSSL does it, and the log says why."""
    d, admin, line = gcm_bridge(ops_bridge)
    vaes = cpu_has_vaes()
    if vaes:
        assert "AES-GCM by VAES/VPCLMULQDQ" in line and "aes_gcm = auto" in line, line
    else:
        assert "AES-GCM by wolfSSL (aes_gcm = auto: the CPU has no VAES/VPCLMULQDQ)" in line, line
    base = metrics(admin)[GCM_COUNTER]
    m1 = relay_big(certs, d.addr("smtps"), "gcm-tls13")
    mid = metrics(admin)[GCM_COUNTER]
    m2 = relay_big(certs, d.addr("sub"), "gcm-tls12", tls12=True)
    got = upstream.wait_messages(2)
    assert [sha(b) for _, b in got] == [sha(m1), sha(m2)]
    end = metrics(admin)[GCM_COUNTER]
    if vaes:
        # ~550 KB each way through 16 KiB records: decrypted once, encrypted once
        want = 2 * len(m1) // 16384
        assert mid - base >= want * 0.9, (base, mid, want)
        assert end - mid >= want * 0.9, (mid, end, want)
    else:
        assert end == base == 0
    assert "event=tls_failure" not in d.log() and "error" not in d.log().lower()


def test_aes_gcm_wolfssl_setting_keeps_it_in_wolfssl(ops_bridge, certs, upstream):
    d, admin, line = gcm_bridge(ops_bridge, "wolfssl")
    assert "AES-GCM by wolfSSL (aes_gcm = wolfssl)" in line, line
    msg = relay_big(certs, d.addr("smtps"), "gcm-wolfssl")
    assert sha(upstream.wait_messages(1)[0][1]) == sha(msg)
    assert metrics(admin)[GCM_COUNTER] == 0


def test_aes_gcm_tampered_record_is_refused_and_nothing_is_relayed(ops_bridge, certs,
                                                                    upstream):
    """One changed bit in a client's record of message data: the record is
    refused (its tag does not match), the session ends, and the upstream
    gets no message; the bytes of that record are not forwarded."""
    d, admin, _ = gcm_bridge(ops_bridge)
    c = MemTLS(certs, d.addr("smtps"))
    assert c.reply() == 220
    assert c.cmd(b"EHLO ops.test") == 250
    assert c.cmd(auth_plain()) == 235
    assert c.cmd(b"MAIL FROM:<alice@client.test>") == 250
    assert c.cmd(b"RCPT TO:<bob@dest.test>") == 250
    assert c.cmd(b"DATA") == 354
    base = metrics(admin)[GCM_COUNTER]

    def flip(rec):
        assert len(rec) > 8000, len(rec)  # one record: the 8 KB write
        b = bytearray(rec)
        b[4000] ^= 0x04
        return bytes(b)

    c.send(make_message("tampered", b"y" * 8100 + b"\r\n") + b".\r\n", tamper=flip)
    with pytest.raises((EOFError, ssl.SSLError, ConnectionError)):
        for _ in range(100):
            c.reply()
    line = d.wait_log(r"event=session_end ")
    assert 'reason="client read failed: TLS read: AES-GCM Authentication check fail' in line, line
    # the commands before DATA went through, no byte of the refused record
    assert int(re.search(r"bytes_c2u=(\d+)", line).group(1)) < 1000, line
    time.sleep(0.3 * TF)
    assert upstream.messages() == []
    if cpu_has_vaes():
        assert metrics(admin)[GCM_COUNTER] == base + 1


# ======================================================= 10. TLS alerts in reasons

def test_client_alert_is_named_in_the_reason(make_bridge, upstream, certs):
    """A client that does not trust the proxy's certificate ends the
    handshake with a fatal alert (48 unknown_ca); the session's reason
    names it, so the operator knows which side refused and why. TLS 1.2:
    under TLS 1.3 the client's alert is encrypted with its handshake key,
    and wolfSSL 5.5.4 reports "parse error on header (-306)" instead of
    reading it."""
    d = make_bridge(upstream.address)
    ctx = ssl.create_default_context(cafile=os.path.join(certs, "other-ca.pem"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLCertVerificationError):
        RawClient(*d.addr("smtps"), tls_ctx=ctx)
    line = d.wait_log(r"event=session_end ")
    assert re.search(r'reason="client TLS handshake failed: received alert fatal error '
                     r'\(-313\) \(the peer\'s TLS alert: 48 unknown_ca\)"', line), line
    assert upstream.messages() == []
