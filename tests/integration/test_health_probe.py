"""GET /healthz?upstream and /healthz?upstream=NAME: the optional upstream
probe of the admin endpoint (proxy/probe.c).

Every test drives a real daemon against scripted upstreams and checks what
can be seen from outside: the HTTP status and body, what each upstream
received (and how many connections), the log lines, and that the event loop
keeps serving SMTP sessions while a probe waits.
"""

import os
import re
import signal
import socket
import threading
import time

import pytest

import bridgelib as bl
from bridgelib import TF, RawClient, free_port
from scripted_upstream import (DEFAULT_CAPS, ScriptedUpstream, ehlo_reply, good_script,
                               prelude)

NO_STARTTLS_CAPS = [c for c in DEFAULT_CAPS if c != "STARTTLS"]
QUIT_221 = [("expect", b"QUIT"), ("send", b"221 2.0.0 Bye\r\n")]
OK_LINE = re.compile(r"^upstream (\S+) (\S+) ok \d+\.\dms$")
V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


# ---------------------------------------------------------------- helpers

def http_get(addr, path, timeout=10):
    """GET path over HTTP/1.0: (status, body bytes, seconds taken)."""
    t0 = time.monotonic()
    s = socket.create_connection(addr, timeout=timeout * TF)
    data = b""
    try:
        s.sendall(b"GET " + path.encode() + b" HTTP/1.0\r\nHost: x\r\n\r\n")
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
    assert m, "not an HTTP response: %r" % data[:300]
    # one answer per connection, from one process
    assert data.count(b"HTTP/1.") == 1, "more than one response: %r" % data[:600]
    return int(m.group(1)), body, time.monotonic() - t0


def lines_of(body):
    return body.decode().splitlines()


def admin_addr():
    return ("127.0.0.1", free_port())


def scripted(certs, script=None, cert="upstream", **kw):
    kw.setdefault("drain_timeout", 1.0)
    return ScriptedUpstream(script, cert=os.path.join(certs, cert + ".pem"),
                            key=os.path.join(certs, cert + ".key"), **kw).start()


def up_opts(certs, address, **kw):
    """Keys of an [upstream NAME] section for a scripted upstream."""
    u = {"address": address, "tls": "starttls", "ca_file": os.path.join(certs, "ca.pem"),
         "server_name": "localhost", "connect_timeout": "2s", "reply_timeout": "2s"}
    u.update(kw)
    return u


def commands(conn):
    """The command lines an upstream connection received: [(phase, verb)]."""
    return [(ph, ln.strip().split(b" ")[0].upper().decode()) for ph, ln in conn.lines]


def metrics(addr):
    code, body, _ = http_get(addr, "/metrics")
    assert code == 200, body[:300]
    return body.decode()


@pytest.fixture
def ups():
    """Scripted upstreams started by a test, stopped after its daemons."""
    started = []
    yield started
    for u in started:
        u.stop()


@pytest.fixture
def probe_bridge(make_bridge, certs, ups):
    """probe_bridge(script or ScriptedUpstream, upstream_opts=..., ...) ->
    (daemon, admin address, scripted upstream): the default [upstream] is the
    scripted one, the admin endpoint is on, and the teardown check does not
    involve the upstream."""

    def factory(script=None, upstream_opts=None, global_opts=None, cert="upstream",
                health="light", **kw):
        up = script if isinstance(script, ScriptedUpstream) else \
            scripted(certs, script or good_script(), cert=cert, **kw)
        ups.append(up)
        admin = admin_addr()
        g = {"admin": "%s:%d" % admin, "drain_timeout": "2s"}
        g.update(global_opts or {})
        o = {"connect_timeout": "2s", "reply_timeout": "2s"}
        o.update(upstream_opts or {})
        d = make_bridge(up.address, upstream_opts=o, global_opts=g, health=health)
        return d, admin, up

    return factory


# ---------------------------------------------------------------- tests

def test_healthy_starttls_upstream(probe_bridge):
    d, admin, up = probe_bridge(good_script())
    code, body, _ = http_get(admin, "/healthz?upstream")
    assert code == 200, body
    (line,) = lines_of(body)
    m = OK_LINE.match(line)
    assert m and m.group(1) == "default" and m.group(2) == up.address, line
    c = up.wait_done(5)
    assert c.script_error is None, c
    # the real dialogue: EHLO and STARTTLS in plaintext, verified TLS, QUIT
    assert commands(c) == [("plain", "EHLO"), ("plain", "STARTTLS"), ("tls", "QUIT")], c.lines
    assert c.lines[0][1] == b"EHLO %s\r\n" % bl.PROXY_HOSTNAME.encode()
    assert c.tls_version is not None and c.sni == "localhost", c
    assert up.connection_count == 1
    assert 'smtpbridge_upstream_probe_ok{upstream="default"} 1' in metrics(admin)


def test_plain_healthz_does_not_dial(probe_bridge):
    d, admin, up = probe_bridge(good_script())
    for path in ("/healthz", "/healthz?", "/healthz?verbose", "/healthz?upstreams"):
        code, body, _ = http_get(admin, path)
        assert (code, body) == (200, b"ok\n"), (path, code, body)
    time.sleep(0.5 * TF)
    assert up.connection_count == 0, "plain /healthz dialled the upstream"
    assert "smtpbridge_upstream_probe_ok" not in metrics(admin)


def test_upstream_down_is_connection_refused(make_bridge, certs):
    port = free_port()
    admin = admin_addr()
    make_bridge("127.0.0.1:%d" % port, upstream_opts={"connect_timeout": "2s"},
                global_opts={"admin": "%s:%d" % admin}, health=None)
    code, body, took = http_get(admin, "/healthz?upstream")
    assert code == 503, body
    (line,) = lines_of(body)
    assert line.startswith("upstream default 127.0.0.1:%d failed: " % port), line
    assert "connection refused" in line.lower(), line
    assert took < 2 * TF, "a refused connect took %.2fs" % took


def test_no_starttls_advertised(probe_bridge):
    d, admin, up = probe_bridge(prelude(caps=NO_STARTTLS_CAPS) + QUIT_221)
    code, body, _ = http_get(admin, "/healthz?upstream")
    assert code == 503, body
    assert "failed: no STARTTLS in the EHLO reply" in body.decode(), body
    c = up.wait_done(5)
    # refused, but still polite: QUIT, and never a STARTTLS it did not offer
    assert commands(c) == [("plain", "EHLO"), ("plain", "QUIT")], c.lines
    assert c.script_error is None, c


@pytest.mark.parametrize("cert,why", [
    ("upstream-wrongname", "peer subject name mismatch"),
    ("upstream-untrusted", "certificate verification failed: unable to verify the first "
                           "certificate (its issuer is not in ca_file)"),
    ("upstream-expired", "certificate verification failed: certificate has expired"),
], ids=["wrongname", "untrusted", "expired"])
def test_bad_certificate_fails_verification(probe_bridge, cert, why):
    """The handshake checks the chain and the name as sessions do; the
    reason is the one a session would log."""
    d, admin, up = probe_bridge(good_script(), cert=cert)
    code, body, _ = http_get(admin, "/healthz?upstream")
    assert code == 503, body
    text = body.decode()
    assert "failed: TLS handshake (name localhost) failed: " in text and why in text, text
    c = up.wait_done(5)
    assert c.tls_started and c.tls_version is None, c
    # nothing in plaintext after the failed handshake
    assert bytes(c.after_tls_fail) == b"", c.after_tls_fail


@pytest.mark.deadline(90)
def test_hanging_upstream_times_out_without_blocking_sessions(make_bridge, upstream, certs,
                                                              ups):
    """A probe of an upstream that never greets ends after reply_timeout
    with 503, and meanwhile sessions through the proxy work."""
    hang = scripted(certs, [("hang", 20)])
    ups.append(hang)
    admin = admin_addr()
    listeners = {
        "smtps": {"listen": "127.0.0.1:%d" % free_port(), "mode": "implicit"},
        "slowl": {"listen": "127.0.0.1:%d" % free_port(), "mode": "implicit",
                  "upstream": "slow"},
    }
    extra = [("upstream slow", up_opts(certs, hang.address, reply_timeout="3s"))]
    d = make_bridge(upstream.address, listeners=listeners, extra=extra,
                    global_opts={"admin": "%s:%d" % admin})
    result = {}

    def probe():
        try:
            result["r"] = http_get(admin, "/healthz?upstream=slow", timeout=20)
        except Exception as e:  # noqa: BLE001 - shown by the main thread
            result["r"] = e
        result["at"] = time.monotonic()

    t = threading.Thread(target=probe)
    t.start()
    hang.conn(0, timeout=5 * TF)           # the probe is connected and waiting
    s = bl.smtp_ssl(certs, *d.addr("smtps"))
    code, _ = s.ehlo("during-probe.test")
    assert code == 250
    s.login(bl.USER, bl.PASSWORD)
    assert s.sendmail("alice@client.test", ["bob@dest.test"], bl.make_message("p")) == {}
    s.quit()
    session_done = time.monotonic()
    t.join(15 * TF)
    assert not t.is_alive(), "no answer to the probe"
    assert not isinstance(result["r"], Exception), result["r"]
    code, body, took = result["r"]
    assert session_done < result["at"], "the session waited for the probe"
    assert code == 503, body
    (line,) = lines_of(body)
    assert line.startswith("upstream slow %s failed: timeout waiting for the greeting"
                           % hang.address), line
    assert 3.0 <= took < 3.0 + 2 * TF, "answered after %.2fs (reply_timeout 3s)" % took
    assert len(upstream.wait_messages(1)) == 1


def test_named_upstream_selection_and_unknown_name(make_bridge, certs, ups):
    first = scripted(certs, good_script())
    second = scripted(certs, good_script())
    ups.extend([first, second])
    admin = admin_addr()
    listeners = {
        "smtps": {"listen": "127.0.0.1:%d" % free_port(), "mode": "implicit"},
        "sub": {"listen": "127.0.0.1:%d" % free_port(), "mode": "starttls",
                "upstream": "second"},
    }
    d = make_bridge(first.address, listeners=listeners,
                    extra=[("upstream second", up_opts(certs, second.address))],
                    global_opts={"admin": "%s:%d" % admin}, health="light")
    code, body, _ = http_get(admin, "/healthz?upstream=second")
    answered = time.monotonic()
    assert code == 200, body
    (line,) = lines_of(body)
    assert OK_LINE.match(line) and line.startswith("upstream second %s " % second.address), line
    assert first.connection_count == 0 and second.connection_count == 1
    # every upstream in use: the second comes from the cache (if this runs
    # within the 2 s; slow sanitizer builds may miss it)
    cached = time.monotonic() - answered < 1.5
    code, body, _ = http_get(admin, "/healthz?upstream")
    assert code == 200, body
    got = sorted(OK_LINE.match(ln).group(1) for ln in lines_of(body))
    assert got == ["default", "second"], body
    assert first.connection_count == 1
    assert second.connection_count == (1 if cached else 2)
    # the unnamed [upstream] is "default"; percent-encoding is decoded
    code, body, _ = http_get(admin, "/healthz?x=1&upstream=%64efault")
    assert code == 200 and lines_of(body)[0].startswith("upstream default "), body
    seen = (first.connection_count, second.connection_count)
    code, body, _ = http_get(admin, "/healthz?upstream=nope")
    assert code == 404, body
    assert body == b"no upstream called 'nope'\n", body
    time.sleep(0.2 * TF)
    assert (first.connection_count, second.connection_count) == seen


def test_results_cached_and_requests_coalesced(probe_bridge):
    slow_good = [("sleep", 0.5)] + good_script()
    d, admin, up = probe_bridge(slow_good, max_connections=8)
    # concurrent requests share the one probe in flight
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        http_get(admin, "/healthz?upstream"))) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10 * TF)
    answered = time.monotonic()
    assert [r[0] for r in results] == [200] * 5, results
    assert up.connection_count == 1
    # and for 2 s after it, the result is reused (checked if this runs in
    # time: slow sanitizer builds may miss the window)
    if time.monotonic() - answered < 1.5:
        code, body, _ = http_get(admin, "/healthz?upstream")
        assert code == 200 and up.connection_count == 1, body
    up.wait_done(5 * TF)
    n = up.connection_count
    time.sleep(2.2)
    code, body, _ = http_get(admin, "/healthz?upstream")
    assert code == 200, body
    assert up.connection_count == n + 1


def test_draining_answers_503_without_dialling(probe_bridge):
    d, admin, up = probe_bridge(good_script(), global_opts={"drain_timeout": "5s"})
    # an open (pre-TLS) session keeps the draining daemon alive
    c = RawClient(*d.addr("sub"))
    with c:
        assert c.read_reply().code == 220
        assert c.cmd("EHLO drain.test").code == 250
        start = len(d.log())
        d.signal(signal.SIGTERM)
        d.wait_log(r"event=drain signal=TERM", start=start)
        code, body, _ = http_get(admin, "/healthz?upstream")
        assert (code, body) == (503, b"draining\n")
        code, body, _ = http_get(admin, "/healthz?upstream=default")
        assert (code, body) == (503, b"draining\n")
    time.sleep(0.3 * TF)
    assert up.connection_count == 0, "probed while draining"
    assert d.stop() == 0


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_header_first(probe_bridge, version):
    d, admin, up = probe_bridge([("proxy_header",)] + good_script(),
                                upstream_opts={"proxy_protocol": version})
    code, body, _ = http_get(admin, "/healthz?upstream")
    assert code == 200, body
    c = up.wait_done(5)
    assert c.script_error is None, c
    want = b"PROXY UNKNOWN\r\n" if version == "v1" else V2_LOCAL
    assert c.proxy_header == want, c.proxy_header


def test_implicit_tls_upstream(probe_bridge):
    script = [("starttls",), ("send", b"220 upstream.test ESMTP\r\n"), ("expect", b"EHLO"),
              ("send", ehlo_reply(NO_STARTTLS_CAPS))] + QUIT_221
    d, admin, up = probe_bridge(script, upstream_opts={"tls": "implicit"})
    code, body, _ = http_get(admin, "/healthz?upstream")
    assert code == 200, body
    c = up.wait_done(5)
    assert commands(c) == [("tls", "EHLO"), ("tls", "QUIT")], c.lines
    assert c.tls_version is not None and c.sni == "localhost"


def test_plaintext_upstream(probe_bridge):
    d, admin, up = probe_bridge(prelude(caps=NO_STARTTLS_CAPS) + QUIT_221,
                                upstream_opts={"tls": "none"})
    code, body, _ = http_get(admin, "/healthz?upstream")
    assert code == 200, body
    c = up.wait_done(5)
    assert commands(c) == [("plain", "EHLO"), ("plain", "QUIT")], c.lines


def test_refused_greeting_and_response_injection(probe_bridge, certs, ups):
    d, admin, up = probe_bridge([("send", b"554 5.3.2 go away\r\n")] + QUIT_221)
    code, body, _ = http_get(admin, "/healthz?upstream")
    assert code == 503 and b"failed: the greeting was 554, not 220" in body, body
    assert up.wait_done(5).script_error is None
    inj = prelude() + [("expect", b"STARTTLS"),
                       ("send", b"220 2.0.0 Ready\r\n250 injected\r\n"), ("hang", 3)]
    d2, admin2, up2 = probe_bridge(inj)
    code, body, _ = http_get(admin2, "/healthz?upstream")
    assert code == 503 and b"(response injection)" in body, body


@pytest.mark.deadline(90)
def test_failure_logged_once_per_transition(make_bridge, certs, ups):
    port = free_port()
    admin = admin_addr()
    d = make_bridge("127.0.0.1:%d" % port, upstream_opts={"connect_timeout": "2s"},
                    global_opts={"admin": "%s:%d" % admin, "log_level": "debug"},
                    health=None)
    for i in range(2):
        if i:
            time.sleep(2.2)
        assert http_get(admin, "/healthz?upstream")[0] == 503
    assert len(d.events("upstream_probe")) == 2, d.log()[-2000:]
    failed = d.events("upstream_probe_failed")
    assert len(failed) == 1 and "level=warning" in failed[0]["_line"], failed
    # the upstream comes up on that port
    up = ScriptedUpstream(good_script(), cert=os.path.join(certs, "upstream.pem"),
                          key=os.path.join(certs, "upstream.key"), port=port,
                          drain_timeout=1).start()
    ups.append(up)
    time.sleep(2.2)
    assert http_get(admin, "/healthz?upstream")[0] == 200
    ok = d.events("upstream_probe_ok")
    assert len(ok) == 1 and "level=warning" in ok[0]["_line"], d.log()[-2000:]
    assert len(d.events("upstream_probe_failed")) == 1


@pytest.mark.deadline(90)
def test_workers_master_probes(probe_bridge):
    d, admin, up = probe_bridge(good_script(), global_opts={"workers": "2"})
    d.wait_log(r"event=worker_ready", timeout=10)
    code, body, _ = http_get(admin, "/healthz?upstream")
    assert code == 200, body
    assert OK_LINE.match(lines_of(body)[0]), body
    c = up.wait_done(5)
    assert commands(c) == [("plain", "EHLO"), ("plain", "STARTTLS"), ("tls", "QUIT")], c.lines
    assert up.connection_count == 1
    assert 'smtpbridge_upstream_probe_ok{upstream="default"} 1' in metrics(admin)
    assert http_get(admin, "/healthz")[:2] == (200, b"ok\n")


@pytest.mark.deadline(90)
def test_client_gone_and_exit_with_probe_in_flight(probe_bridge):
    """A waiting client that disconnects, and a stop while a probe waits:
    nothing leaks (the sanitizer builds check), the exit is clean."""
    d, admin, up = probe_bridge([("hang", 20)], upstream_opts={"reply_timeout": "10s"})
    gone = socket.create_connection(admin, timeout=5 * TF)
    gone.sendall(b"GET /healthz?upstream HTTP/1.0\r\n\r\n")
    up.conn(0, timeout=5 * TF)
    gone.close()
    waiting = socket.create_connection(admin, timeout=5 * TF)
    waiting.sendall(b"GET /healthz?upstream HTTP/1.0\r\n\r\n")
    time.sleep(0.3 * TF)
    assert up.connection_count == 1, "the second request did not join the probe in flight"
    assert d.stop() == 0
    waiting.settimeout(5 * TF)
    assert waiting.recv(100) == b"", "an answer although the probe never finished"
    waiting.close()
    c = up.wait_done(5)
    assert c.closed_by_peer


@pytest.mark.deadline(90)
def test_workers_respawn_during_probe(probe_bridge):
    """A worker forked while the master waits for a probe drops the master's
    probe and admin sockets at once: the answer still comes from the master,
    the HTTP connection and the upstream connection close when the master
    closes them."""
    d, admin, up = probe_bridge([("hang", 20)], global_opts={"workers": "2"},
                                upstream_opts={"reply_timeout": "3s"})
    d.wait_log(r"event=worker_ready", timeout=10)
    workers = [int(e["pid"]) for e in d.events("worker_ready")]
    result = {}

    def probe():
        try:
            result["r"] = http_get(admin, "/healthz?upstream", timeout=20)
        except Exception as e:  # noqa: BLE001 - shown by the main thread
            result["r"] = e

    t = threading.Thread(target=probe)
    t.start()
    up.conn(0, timeout=5 * TF)
    start = len(d.log())
    os.kill(workers[0], signal.SIGKILL)
    d.wait_log(r"event=worker_started", start=start, timeout=5)
    t.join(15 * TF)
    assert not t.is_alive(), "no end to the HTTP answer (a worker holds the connection?)"
    assert not isinstance(result["r"], Exception), result["r"]
    code, body, took = result["r"]
    assert code == 503 and b"timeout waiting for the greeting" in body, body
    assert took < 3.0 + 2 * TF, took
    c = up.wait_done(3 * TF)
    assert c.closed_by_peer and c.end_time - c.start_time < 3.0 + 2 * TF, c
    assert up.connection_count == 1


@pytest.mark.deadline(90)
def test_reload_probes_the_new_upstream(make_bridge, certs, ups):
    """After SIGHUP the probe uses the new runtime, and a cached result for
    the old address is not reused. (Workers mode: the master, which reloads,
    keeps the privileges to read the test's private config.)"""
    dead = free_port()
    admin = admin_addr()
    d = make_bridge("127.0.0.1:%d" % dead, global_opts={"admin": "%s:%d" % admin,
                                                       "workers": "2"}, health=None)
    d.wait_log(r"event=worker_ready", timeout=10)
    code, body, _ = http_get(admin, "/healthz?upstream")
    assert code == 503 and b"connection refused" in body.lower(), body
    live = scripted(certs, good_script())
    ups.append(live)
    sections = [(h, dict(kv)) for h, kv in d.sections]
    for h, kv in sections:
        if h == "upstream":
            kv["address"] = live.address
    with open(d.conf, "w") as f:
        f.write(bl.render_config(sections))
    d.sections = sections
    start = len(d.log())
    d.signal(signal.SIGHUP)
    d.wait_log(r"event=reload_done", start=start, timeout=10)
    code, body, _ = http_get(admin, "/healthz?upstream")
    assert code == 200, body
    assert lines_of(body)[0].startswith("upstream default %s ok " % live.address), body
    assert live.connection_count == 1
