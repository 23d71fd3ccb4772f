"""Fixtures for the smtpbridge integration suite.

Run:  /usr/bin/python3 -m pytest -q tests/integration
Env:  SMTPBRIDGE_BIN          daemon binary (default <repo>/build/smtpbridge);
                              point it at a sanitizer build to run the same suite
      SMTPBRIDGE_TIME_FACTOR  stretch all waits/deadlines (e.g. 3 for ASan/valgrind)
      SMTPBRIDGE_LOG_LEVEL    log_level written into generated configs (info)

Every test gets its own ports and tmp dir; the daemon's stderr is kept in the
test's tmp dir (smtpbridge.stderr). At teardown each daemon that the test did
not stop itself must still serve a session, must exit 0 on SIGTERM, and its
stderr must not contain sanitizer reports.

Per-test deadline: @pytest.mark.deadline(SECONDS) (default 60) enforced with
SIGALRM on setup, call and teardown separately, so no plugin is needed.
"""

import os
import signal
import subprocess

import pytest

import bridgelib as bl
from bridgelib import (BIN, TF, Daemon, RawClient, client_ctx, free_port,
                       smtp_ssl)

DEFAULT_DEADLINE = 60


# ---------------------------------------------------------------- deadlines

class TestDeadlineExceeded(Exception):
    pass


def pytest_configure(config):
    config.addinivalue_line("markers", "deadline(seconds): per-phase time limit")
    config.addinivalue_line("markers", "slow: slow test (20 MB message, ...)")
    # TLS 1.0/1.1 contexts are built on purpose (legacy-client/upstream tests)
    config.addinivalue_line("filterwarnings",
                            "ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
    config.addinivalue_line("filterwarnings",
                            "ignore:Requiring AUTH while not requiring TLS:UserWarning")


def _deadline_for(item):
    m = item.get_closest_marker("deadline")
    secs = m.args[0] if m and m.args else DEFAULT_DEADLINE
    return max(1, int(secs * TF))


def _alarm(item, phase):
    secs = _deadline_for(item)

    def handler(signum, frame):
        raise TestDeadlineExceeded("%s: %s exceeded %ds" % (item.nodeid, phase, secs))

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(secs)
    return old


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    old = _alarm(item, "setup")
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    old = _alarm(item, "call")
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    old = _alarm(item, "teardown")
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", os.path.join(bl.TOOLS, "mkcerts.sh"), str(d)],
                   check=True, timeout=60)
    return str(d)


@pytest.fixture
def upstream(certs, tmp_path):
    """The real aiosmtpd STARTTLS+AUTH upstream, in-process."""
    from upstream import UpstreamServer
    srv = UpstreamServer(host="127.0.0.1", port=0,
                         cert=os.path.join(certs, "upstream.pem"),
                         key=os.path.join(certs, "upstream.key"),
                         users=bl.USERS, maildir=str(tmp_path / "mail"))
    srv.start()
    yield srv
    srv.stop()


def require_binary():
    if not (os.path.isfile(BIN) and os.access(BIN, os.X_OK)):
        pytest.skip("daemon binary %s not built yet (run make)" % BIN)


def health_check(d, certs, mode):
    """Raise AssertionError if daemon `d` no longer serves sessions."""
    if not d.alive():
        raise AssertionError("daemon died (rc=%s); stderr tail:\n%s"
                             % (d.proc.returncode, d.log()[-3000:]))
    if mode is None:
        return
    implicit = [n for n, (m, _) in d.listeners.items() if m == "implicit"]
    starttls = [n for n, (m, _) in d.listeners.items() if m == "starttls"]
    if mode == "full":
        if implicit:
            host, port = d.addr(implicit[0])
            s = smtp_ssl(certs, host, port)
        else:
            host, port = d.addr(starttls[0])
            s = bl.smtp_starttls(certs, host, port)
        code, _ = s.ehlo("health.test")
        assert code == 250, "health check: EHLO -> %s" % code
        code, _ = s.noop()
        assert code == 250, "health check: NOOP -> %s" % code
        s.quit()
        return
    # light: no upstream involvement
    for n in starttls:
        host, port = d.addr(n)
        with RawClient(host, port) as c:
            assert c.read_reply().code == 220
            assert c.cmd("EHLO health.test").code == 250
            assert c.cmd("QUIT").code == 221
    for n in implicit:
        host, port = d.addr(n)
        with RawClient(host, port, tls_ctx=client_ctx(certs)) as c:
            assert c.read_reply().code == 220


@pytest.fixture
def make_bridge(certs, tmp_path, upstream):
    """Factory: make_bridge(upstream_addr, ...) -> started Daemon.

    Depends on `upstream` so that the real upstream outlives the daemons
    (their teardown health check goes through it).

    upstream_addr: "host:port" of the default [upstream]
    upstream_opts: dict merged into [upstream]
    listeners:     dict name -> dict of listener keys (replaces defaults)
    listener_opts: dict name -> dict merged into the default listeners
    global_opts:   dict merged into [global]
    extra:         list of (header, dict) sections appended
    health:        "full" (a real session through the upstream), "light"
                   (pre-TLS/handshake only) or None (only "still alive")
    start:         False to only write the config (returns unstarted Daemon)
    """
    daemons = []
    require_binary()

    def factory(upstream_addr, upstream_opts=None, listeners=None,
                listener_opts=None, global_opts=None, extra=None,
                health="full", start=True, name=None):
        if name is None:
            name = "smtpbridge" if not daemons else "smtpbridge-%d" % len(daemons)
        g = {"hostname": bl.PROXY_HOSTNAME,
             "log_level": os.environ.get("SMTPBRIDGE_LOG_LEVEL", "info"),
             "handshake_timeout": "5s", "command_timeout": "10s",
             "idle_timeout": "30s"}
        if os.geteuid() == 0:
            g["user"] = "nobody"   # the daemon refuses to serve as root
        g.update(global_opts or {})
        u = {"address": upstream_addr, "tls": "starttls",
             "ca_file": os.path.join(certs, "ca.pem"), "server_name": "localhost",
             "connect_timeout": "5s", "reply_timeout": "5s"}
        u.update(upstream_opts or {})
        if listeners is None:
            listeners = {
                "smtps": {"listen": "127.0.0.1:%d" % free_port(), "mode": "implicit"},
                "sub": {"listen": "127.0.0.1:%d" % free_port(), "mode": "starttls"},
            }
        sections = [("global", g), ("upstream", u)]
        for lname, lkv in listeners.items():
            kv = {"cert": os.path.join(certs, "proxy.pem"),
                  "key": os.path.join(certs, "proxy.key")}
            kv.update(lkv)
            kv.update((listener_opts or {}).get(lname, {}))
            sections.append(("listener " + lname, kv))
        sections.extend(extra or [])
        d = Daemon(tmp_path, sections, name=name)
        d.health = health
        daemons.append(d)
        if start:
            d.start()
        return d

    yield factory

    problems = []
    for d in daemons:
        if d.proc is None:
            continue
        if not d.stopped:
            try:
                health_check(d, certs, d.health)
            except Exception as e:  # noqa: BLE001
                problems.append("post-test health check failed: %r\nstderr tail:\n%s"
                                % (e, d.log()[-2000:]))
            rc = d.stop()
            if rc != 0:
                problems.append("SIGTERM: exit status %r (want 0); stderr tail:\n%s"
                                % (rc, d.log()[-2000:]))
        rep = d.sanitizer_report()
        if rep:
            problems.append("sanitizer report in %s:\n%s" % (d.stderr_path, rep))
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def bridge(make_bridge, upstream):
    """A daemon with an implicit (smtps) and a starttls (sub) listener in front
    of the real upstream."""
    return make_bridge(upstream.address)


@pytest.fixture
def scripted_bridge(make_bridge, certs):
    """scripted_bridge(script, cert="upstream", upstream_opts=..., global_opts=...,
    listener_opts=..., cls=ScriptedUpstream, **kw) -> (daemon, scripted upstream).
    The daemon's teardown health check is "light" (no upstream involved)."""
    from scripted_upstream import ScriptedUpstream
    ups = []

    def factory(script, cert="upstream", upstream_opts=None, global_opts=None,
                listener_opts=None, cls=ScriptedUpstream, health="light", **kw):
        kw.setdefault("drain_timeout", 2.0)
        up = cls(script, cert=os.path.join(certs, cert + ".pem"),
                 key=os.path.join(certs, cert + ".key"), **kw).start()
        ups.append(up)
        opts = {"reply_timeout": "3s", "connect_timeout": "2s"}
        opts.update(upstream_opts or {})
        d = make_bridge(up.address, upstream_opts=opts, global_opts=global_opts,
                        listener_opts=listener_opts, health=health)
        return d, up

    yield factory
    for up in ups:
        up.stop()
