"""Several addresses per upstream: tried in order, with connect and greeting
failover, each address checked against its own host name; DNS answers that
arrive after a reload without blocking the loop.

What is observed: the client's session (a message stored by the real
upstream, or a 421), which upstream saw a connection (and the SNI it got),
and the event=upstream_retry / upstream_failed / session_end log lines.
"""

import os
import signal
import socket
import subprocess
import threading
import time

import pytest

import bridgelib as bl
from bridgelib import TF, free_port
from scripted_upstream import BlackholeListener, ScriptedUpstream, good_script
from test_operations import (edit, full_session, get, hup_and_wait, metrics,  # noqa: F401
                             ops_bridge, pubdir, tls_client, wait_events, write_config)
from test_upstream_failures import client_gets_421


def closed_port():
    """A loopback port with nothing listening (connect is refused)."""
    return free_port()


def session_ends(d):
    return d.events("session_end")


def test_first_address_refused_second_serves(make_bridge, upstream, certs):
    first = "127.0.0.1:%d" % closed_port()
    admin = ("127.0.0.1", free_port())
    d = make_bridge("%s, %s" % (first, upstream.address),
                    global_opts={"admin": "%s:%d" % admin})
    full_session(certs, d.addr("smtps"), tag="failover-refused")
    assert metrics(admin)["smtpbridge_upstream_failovers_total"] == 1
    stored = upstream.wait_messages(1)
    assert len(stored) == 1 and b"failover-refused" in stored[0][1], stored
    retry = d.wait_log(r"event=upstream_retry")
    assert "upstream=%s" % first in retry and "stage=connect" in retry, retry
    assert "Connection refused" in retry, retry
    end = d.wait_log(r"event=session_end")
    assert "upstream=%s " % upstream.address in end, end


def test_first_address_hangs_connect_timeout_then_second(make_bridge, upstream, certs):
    bh = BlackholeListener().start()
    try:
        if not bh.probe_hangs():
            pytest.skip("could not make a hanging connect on loopback")
        d = make_bridge("%s,%s" % (bh.address, upstream.address),
                        upstream_opts={"connect_timeout": "1s"})
        t0 = time.monotonic()
        full_session(certs, d.addr("smtps"), tag="failover-timeout")
        dt = time.monotonic() - t0
        assert dt >= 0.9, dt               # the first address had its full second
        assert dt < 6 * TF, dt
        retry = d.wait_log(r"event=upstream_retry")
        assert "upstream=%s" % bh.address in retry and "timeout connecting" in retry, retry
        assert len(upstream.wait_messages(1)) == 1
    finally:
        bh.stop()


@pytest.mark.parametrize("how", ["421-greeting", "close", "silent"])
def test_greeting_failure_fails_over(make_bridge, upstream, certs, how):
    """A server that is up but not serving (421 busy, closes, never greets)
    is skipped: it was told nothing and the client saw nothing of it."""
    script = {"421-greeting": [("send", b"421 4.3.2 busy, go away\r\n"), ("close",)],
              "close": [("close",)],
              "silent": [("hang", 5)]}[how]
    bad = ScriptedUpstream(script, cert=os.path.join(certs, "upstream.pem"),
                           key=os.path.join(certs, "upstream.key"), drain_timeout=1.0).start()
    try:
        d = make_bridge("%s, %s" % (bad.address, upstream.address),
                        upstream_opts={"reply_timeout": "1s"})
        full_session(certs, d.addr("smtps"), tag="failover-" + how)
        assert len(upstream.wait_messages(1)) == 1
        retry = d.wait_log(r"event=upstream_retry")
        assert "upstream=%s" % bad.address in retry and "stage=greeting" in retry, retry
        bad.wait_done(5)
        # the proxy said nothing to the failed server (no EHLO, no PROXY)
        assert bad.conn(0).pre_tls == b"", bad.conn(0).pre_tls
    finally:
        bad.stop()


def test_all_addresses_fail_gives_421_naming_the_list(make_bridge, certs):
    a, b = "127.0.0.1:%d" % closed_port(), "127.0.0.1:%d" % closed_port()
    d = make_bridge("%s, %s" % (a, b), health="light")
    r, rest, closed, dt = client_gets_421(d, certs)
    assert r.code == 421 and r.lines[0].startswith("421 4.4.1"), r
    assert closed
    retry = d.wait_log(r"event=upstream_retry")
    assert "upstream=%s" % a in retry, retry
    fail = d.wait_log(r"event=upstream_failed")
    assert "upstream=%s " % b in fail and "stage=connect" in fail, fail


def test_no_failover_after_a_certificate_failure(make_bridge, upstream, certs):
    """A certificate that does not verify is a security signal, not an outage:
    the session ends with 421 and the next address is not tried."""
    from scripted_upstream import prelude
    bad = ScriptedUpstream(prelude() + [("expect", b"STARTTLS"), ("send", b"220 go ahead\r\n"),
                                        ("starttls",), ("serve",)],
                           cert=os.path.join(certs, "upstream-wrongname.pem"),
                           key=os.path.join(certs, "upstream-wrongname.key"), drain_timeout=1.0).start()
    try:
        before = upstream.connections
        d = make_bridge("%s, %s" % (bad.address, upstream.address), health="light")
        r, rest, closed, dt = client_gets_421(d, certs)
        assert r.code == 421, r
        fail = d.wait_log(r"event=upstream_failed")
        assert "stage=tls" in fail and "upstream=%s " % bad.address in fail, fail
        assert "event=upstream_retry" not in d.log()
        time.sleep(0.3)
        assert upstream.connections == before
    finally:
        bad.stop()


def test_each_address_is_checked_against_its_own_name(make_bridge, upstream, certs):
    """Without server_name, the backup's certificate must carry the backup's
    own host name (here: localhost, sent as SNI)."""
    port = upstream.address.rsplit(":", 1)[1]
    first = "127.0.0.1:%d" % closed_port()
    d = make_bridge("%s, localhost:%s" % (first, port), upstream_opts={"server_name": None})
    full_session(certs, d.addr("smtps"), tag="own-name")
    assert upstream.sni_names[-1] == "localhost", upstream.sni_names
    end = d.wait_log(r"event=session_end")
    assert "upstream=localhost:%s " % port in end, end
    # -t shows the list and that no single server_name applies
    cp = bl.run([bl.BIN, "-t", "-c", d.conf], timeout=20)
    assert cp.returncode == 0, bl.describe(cp)
    assert "address = %s, localhost:%s" % (first, port) in cp.stdout.decode(), cp.stdout
    assert "# server_name: unset" in cp.stdout.decode(), cp.stdout


def test_explicit_server_name_applies_to_every_address(make_bridge, certs):
    """server_name = upstream.test: the certificate of the second address is
    checked for that name (the scripted upstream's cert has it; the SNI
    shows which name was asked for)."""
    up = ScriptedUpstream(good_script(), cert=os.path.join(certs, "upstream.pem"),
                          key=os.path.join(certs, "upstream.key"), drain_timeout=1.0).start()
    try:
        d = make_bridge("127.0.0.1:%d, %s" % (closed_port(), up.address),
                        upstream_opts={"server_name": "upstream.test"}, health="light")
        host, port = d.addr("smtps")
        c, greet = tls_client(certs, (host, port))
        with c:
            assert c.cmd("EHLO sni.test").code == 250
        up.wait_done(5)
        assert up.conn(0).sni == "upstream.test", up.conn(0).sni
    finally:
        up.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_to_a_new_name_resolves_in_the_background(ops_bridge, upstream, certs, workers):
    """A reload that introduces a name the running daemon never resolved
    does not resolve it in an event loop: the new runtime asks glibc's
    resolver thread and sessions wait for the answer. With workers, the
    master (which serves no mail) resolves it once before forking the new
    workers, so they and its /healthz?upstream probe have the addresses."""
    admin = ("127.0.0.1", free_port())
    d = ops_bridge(global_opts={"workers": str(workers), "admin": "%s:%d" % admin,
                                "max_sessions_per_ip": "0"})
    if workers > 1:
        wait_events(d, "worker_ready", workers)
    port = upstream.address.rsplit(":", 1)[1]
    full_session(certs, d.addr("smtps"), tag="before")
    sections = edit(d.sections, "upstream", address="localhost:%s" % port,
                    server_name="localhost")
    write_config(d, sections)
    hup_and_wait(d)
    if workers > 1:
        wait_events(d, "worker_ready", 2 * workers)
    full_session(certs, d.addr("smtps"), tag="after")
    if workers == 1:
        # the single process's own loop asked glibc's resolver thread
        line = d.wait_log(r"event=resolved upstream=localhost:%s" % port)
        assert "addresses=" in line, line
    end = wait_events(d, "session_end", 2)[1]
    assert end.get("upstream") == "localhost:%s" % port, end
    assert len(upstream.wait_messages(2)) == 2
    # the admin endpoint (the master, with workers) probes the new name
    code, _, body, _, _ = get(admin, "/healthz?upstream")
    assert code == 200, body
    assert b":%s ok" % port.encode() in body, body


class SilentResolver:
    """A DNS server on 127.9.9.9:53 that reads queries and never answers,
    and a resolv.conf naming only it; `prefix` runs a command in a private
    mount namespace where that file is /etc/resolv.conf, so only the
    daemon's lookups go there (nothing leaves loopback)."""

    ADDR = "127.9.9.9"

    def __init__(self, tmpdir, timeout):
        self.conf = os.path.join(str(tmpdir), "resolv.conf")
        with open(self.conf, "w") as f:
            f.write("nameserver %s\noptions timeout:%d attempts:1\n" % (self.ADDR, timeout))
        os.chmod(self.conf, 0o644)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.queries = 0

    def start(self):
        try:
            self.sock.bind((self.ADDR, 53))
        except OSError as e:
            pytest.skip("cannot bind %s:53: %s" % (self.ADDR, e))
        self.sock.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        r = subprocess.run(["unshare", "-m", "sh", "-c",
                            'mount --bind "$0" /etc/resolv.conf && exec cat /etc/resolv.conf',
                            self.conf], capture_output=True, timeout=10)
        if r.returncode != 0 or self.ADDR.encode() not in r.stdout:
            self.stop()
            pytest.skip("no private mount namespace here: %r" % r.stderr[-200:])
        return self

    @property
    def prefix(self):
        return ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
                self.conf]

    def _read(self):
        while self.running:
            try:
                self.sock.recvfrom(4096)
                self.queries += 1
            except OSError:
                pass

    def stop(self):
        self.running = False
        self.thread.join(2)
        self.sock.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_to_a_name_that_never_resolves(ops_bridge, upstream, certs, tmp_path, workers):
    """A reload to a name whose resolver never answers. One process: the
    reload is done at once (the lookup runs in glibc's resolver thread) and
    a session waiting for the first answer (UP_RESOLVING) is bounded by
    connect_timeout: 421 after about 1 s, naming what it waited for. With
    workers, the master resolves the name before forking, so the reload
    takes the resolver's own timeout (2 s here) while the old workers keep
    serving; its answer is a failure, so the new workers ask again and
    their sessions wait the same way. Either way a reload back to an
    address serves mail at once: the old runtime's lookup, still running,
    is abandoned rather than waited for. So is one still running at
    SIGTERM, after at most a second."""
    dns = SilentResolver(tmp_path, 30 if workers == 1 else 2).start()
    try:
        d = ops_bridge(global_opts={"workers": str(workers), "max_sessions_per_ip": "0"},
                       upstream_opts={"connect_timeout": "1s"}, start=False)
        d.prefix = dns.prefix
        d.start()
        if workers > 1:
            wait_events(d, "worker_ready", workers)
        full_session(certs, d.addr("smtps"), tag="before")
        n0 = upstream.connections
        good = d.sections
        port = upstream.address.rsplit(":", 1)[1]
        name = "never.smtpbridge.test:%s" % port
        write_config(d, edit(good, "upstream", address=name, server_name="localhost"))
        t0 = time.monotonic()
        hup_and_wait(d, timeout=15)
        took = time.monotonic() - t0
        if workers == 1:
            assert took < 1.0 * TF, "the reload waited for DNS (%.1fs)" % took
        else:
            assert took >= 1.5, "the master did not wait for the lookup (%.1fs)" % took
            wait_events(d, "worker_ready", 2 * workers)
            # the master's answer was a failure: the new workers ask again
        r, rest, closed, dt = client_gets_421(d, certs)
        assert 0.8 <= dt <= 5 * TF, dt
        reason = "timeout resolving %s (1s)" % name
        assert r.code == 421 and r.lines[0].startswith("421 4."), r
        assert closed and rest == b"", (closed, rest)
        line = d.wait_log(r"event=upstream_failed")
        assert reason in line, line
        assert dns.queries > 0, "the daemon never asked the silent resolver"
        assert upstream.connections == n0, (n0, upstream.connections)
        write_config(d, good)
        hup_and_wait(d)
        if workers > 1:
            wait_events(d, "worker_ready", 3 * workers)
        full_session(certs, d.addr("smtps"), tag="after")
        assert len(upstream.wait_messages(2)) == 2
        if workers == 1:
            # SIGTERM with a lookup running: the exit gives it at most 1 s
            # (resolver_settle), not the resolver's 30 s
            write_config(d, edit(good, "upstream", address=name, server_name="localhost"))
            hup_and_wait(d)
            t0 = time.monotonic()
            assert d.stop(timeout=20) == 0
            took = time.monotonic() - t0
            assert took < 5 * TF, "SIGTERM waited for DNS (%.1fs)" % took
    finally:
        dns.stop()
