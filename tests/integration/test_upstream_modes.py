"""Upstream tls = implicit and tls = none against the real upstream."""

import os

import pytest

import bridgelib as bl
from bridgelib import PASSWORD, USER, make_message, smtp_ssl


@pytest.fixture
def make_upstream(certs, tmp_path):
    from upstream import UpstreamServer
    started = []

    def factory(**kw):
        srv = UpstreamServer(host="127.0.0.1", port=0,
                             cert=os.path.join(certs, "upstream.pem"),
                             key=os.path.join(certs, "upstream.key"), users=bl.USERS,
                             maildir=str(tmp_path / ("mail-%d" % len(started))), **kw)
        srv.start()
        started.append(srv)
        return srv

    yield factory
    for s in started:
        s.stop()


def _send(d, certs, subject):
    s = smtp_ssl(certs, *d.addr("smtps"))
    s.login(USER, PASSWORD)
    msg = make_message(subject)
    assert s.sendmail("a@client.test", ["b@dest.test"], msg) == {}
    s.quit()
    return msg


def test_upstream_implicit_tls(make_bridge, make_upstream, certs):
    up = make_upstream(implicit=True)
    d = make_bridge(up.address, upstream_opts={"tls": "implicit"})
    msg = _send(d, certs, "implicit upstream")
    meta, body = up.wait_messages(1)[0]
    assert body == msg and meta["tls"] in ("TLSv1.2", "TLSv1.3")
    assert up.sni_names == ["localhost"]
    d.stop()
    assert d.returncode == 0


def test_upstream_implicit_bad_cert(make_bridge, make_upstream, certs):
    from upstream import UpstreamServer
    up = make_upstream(implicit=True)
    # re-point at a server with the wrong-name certificate
    bad = UpstreamServer(host="127.0.0.1", port=0,
                         cert=os.path.join(certs, "upstream-wrongname.pem"),
                         key=os.path.join(certs, "upstream-wrongname.key"),
                         users=bl.USERS, maildir=up.maildir + "-bad", implicit=True).start()
    try:
        d = make_bridge(bad.address, upstream_opts={"tls": "implicit"}, health="light")
        with bl.RawClient(*d.addr("smtps"), tls_ctx=bl.client_ctx(certs)) as c:
            c.read_reply()
            r = c.cmd("EHLO c.test")
            assert r.code == 421 and r.lines[0].startswith("421 4."), r
        d.wait_log(r"event=upstream_failed")
        assert bad.ehlo_names() == []
        d.stop()
    finally:
        bad.stop()


def test_upstream_plaintext_none(make_bridge, make_upstream, certs):
    up = make_upstream(require_tls=False)
    d = make_bridge(up.address, upstream_opts={"tls": "none"})
    msg = _send(d, certs, "plaintext upstream")
    meta, body = up.wait_messages(1)[0]
    assert body == msg
    assert meta["tls"] is None                        # really plaintext
    assert [e for e in up.events if e["event"] == "starttls"] == []
    d.stop()
    assert d.returncode == 0
