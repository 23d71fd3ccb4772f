"""Real mail clients through the proxy to the real (aiosmtpd) upstream."""

import os
import shutil
import smtplib

import pytest

import bridgelib as bl
from bridgelib import PASSWORD, USER, describe, make_message, run, smtp_ssl, smtp_starttls


def _send_smtplib(s, subject):
    s.login(USER, PASSWORD)
    msg = make_message(subject)
    refused = s.sendmail("alice@client.test", ["bob@dest.test"], msg)
    assert refused == {}
    s.quit()
    return msg


def _check_one(upstream, body, rcpt=("bob@dest.test",), sender="alice@client.test"):
    msgs = upstream.wait_messages(1)
    assert len(msgs) == 1, "upstream stored %d messages" % len(msgs)
    meta, stored = msgs[0]
    assert stored == body
    assert meta["mail_from"] == sender
    assert meta["rcpt_tos"] == list(rcpt)
    assert meta["auth_user"] == USER
    assert meta["tls"] in ("TLSv1.2", "TLSv1.3"), meta
    return meta


def test_smtplib_implicit(bridge, upstream, certs):
    host, port = bridge.addr("smtps")
    s = smtp_ssl(certs, host, port)
    msg = _send_smtplib(s, "smtplib implicit")
    meta = _check_one(upstream, msg)
    # the upstream saw the client's own EHLO name, after TLS only
    assert meta["ehlo_names"] == [bl.PROXY_HOSTNAME, "client.test"], meta


def test_smtplib_starttls(bridge, upstream, certs):
    host, port = bridge.addr("sub")
    s = smtp_starttls(certs, host, port)
    msg = _send_smtplib(s, "smtplib starttls")
    _check_one(upstream, msg)


@pytest.mark.parametrize("listener", ["smtps", "sub"])
def test_smtplib_auth_failure_code_from_upstream(bridge, upstream, certs, listener):
    host, port = bridge.addr(listener)
    s = smtp_ssl(certs, host, port) if listener == "smtps" else smtp_starttls(certs, host, port)
    with pytest.raises(smtplib.SMTPAuthenticationError) as ei:
        s.login(USER, "wrong-password")
    # aiosmtpd's own reply, relayed verbatim
    assert ei.value.smtp_code == 535
    assert b"5.7.8 Authentication credentials invalid" in ei.value.smtp_error
    # MAIL without AUTH: the upstream's 530 reaches the client
    code, text = s.mail("alice@client.test")
    assert code == 530, (code, text)
    s.quit()
    assert upstream.messages() == []
    auths = [e for e in upstream.events if e["event"] == "auth"]
    assert auths and auths[-1]["success"] is False


@pytest.mark.parametrize("mode", ["tls-on-connect", "tls"])
def test_swaks(bridge, upstream, certs, mode):
    lst = "smtps" if mode == "tls-on-connect" else "sub"
    host, port = bridge.addr(lst)
    cp = run(["swaks", "--server", host, "--port", str(port), "--" + mode,
              "--tls-verify", "--tls-ca-path", os.path.join(certs, "ca.pem"),
              "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD,
              "--ehlo", "swaks.test", "--from", "alice@client.test",
              "--to", "bob@dest.test", "--header", "Subject: swaks " + mode,
              "--body", "swaks body"], timeout=30)
    assert cp.returncode == 0, describe(cp)
    msgs = upstream.wait_messages(1)
    assert len(msgs) == 1
    meta, body = msgs[0]
    assert b"Subject: swaks " + mode.encode() in body
    assert meta["auth_user"] == USER and meta["ehlo"] == "swaks.test"
    # the upstream's own final reply (with its queue id) reached swaks
    assert "queued as %06d-" % meta["id"] in cp.stdout.decode(), describe(cp)


@pytest.mark.parametrize("scheme", ["smtps", "smtp"])
def test_curl(bridge, upstream, certs, tmp_path, scheme):
    lst = "smtps" if scheme == "smtps" else "sub"
    host, port = bridge.addr(lst)
    msg = make_message("curl " + scheme, b"curl body\r\n")
    f = tmp_path / "msg.eml"
    f.write_bytes(msg)
    cmd = ["curl", "-sS", "--max-time", "20", "--cacert", os.path.join(certs, "ca.pem"),
           "%s://localhost:%d" % (scheme, port), "--mail-from", "alice@client.test",
           "--mail-rcpt", "bob@dest.test", "--upload-file", str(f),
           "--user", "%s:%s" % (USER, PASSWORD)]
    if scheme == "smtp":
        cmd.insert(1, "--ssl-reqd")
    cp = run(cmd, timeout=30)
    assert cp.returncode == 0, describe(cp)
    _check_one(upstream, msg)


def test_curl_auth_failure(bridge, upstream, certs, tmp_path):
    host, port = bridge.addr("smtps")
    f = tmp_path / "msg.eml"
    f.write_bytes(make_message("x"))
    cp = run(["curl", "-sS", "-v", "--max-time", "20", "--cacert",
              os.path.join(certs, "ca.pem"), "smtps://localhost:%d" % port,
              "--mail-from", "a@b.test", "--mail-rcpt", "c@d.test",
              "--upload-file", str(f), "--user", "%s:nope" % USER], timeout=30)
    assert cp.returncode == 67, describe(cp)       # CURLE_LOGIN_DENIED
    assert b"< 535 5.7.8" in cp.stderr, describe(cp)
    assert upstream.messages() == []


def _s_client(args, stdin, timeout=20):
    return run(["openssl", "s_client", "-ign_eof", "-verify_return_error",
                "-verify_hostname", "localhost"] + args, input=stdin, timeout=timeout)


def test_openssl_s_client_implicit(bridge, upstream, certs):
    host, port = bridge.addr("smtps")
    cp = _s_client(["-connect", "%s:%d" % (host, port), "-CAfile",
                    os.path.join(certs, "ca.pem"), "-crlf", "-quiet"],
                   b"EHLO sclient.test\nQUIT\n")
    out = cp.stdout.decode("utf-8", "replace")
    lines = out.splitlines()
    assert lines and lines[0].startswith("220 " + bl.PROXY_HOSTNAME), describe(cp)
    assert "ESMTP" in lines[0]
    ehlo = [ln for ln in lines if ln.startswith("250")]
    assert ehlo and ehlo[0].startswith("250-upstream.test"), out
    assert any(ln[4:].startswith("AUTH ") for ln in ehlo), out
    assert not any(ln[4:].upper().startswith("STARTTLS") for ln in ehlo), out
    assert any(ln.startswith("221") for ln in lines), out
    assert "upstream.test ESMTP" not in out and "smtpbridge-test-upstream" not in out


def test_openssl_s_client_starttls(bridge, upstream, certs):
    host, port = bridge.addr("sub")
    # -starttls smtp: s_client does the pre-TLS EHLO+STARTTLS itself and
    # prints the pre-TLS dialogue to stdout (not with -quiet).
    cp = _s_client(["-connect", "%s:%d" % (host, port), "-starttls", "smtp",
                    "-name", "sclient-pre.test", "-CAfile",
                    os.path.join(certs, "ca.pem"), "-crlf", "-quiet"],
                   b"EHLO sclient.test\nQUIT\n")
    out = cp.stdout.decode("utf-8", "replace")
    # rc may be 1 when the server closes without close_notify; the handshake
    # itself aborts on any verification error (-verify_return_error).
    assert b"verify error" not in cp.stderr, describe(cp)
    lines = out.splitlines()
    ehlo = [ln for ln in lines if ln.startswith("250")]
    assert ehlo and ehlo[0].startswith("250-upstream.test"), describe(cp)
    assert any(ln[4:].startswith("AUTH ") for ln in ehlo), out
    assert not any(ln[4:].upper().startswith("STARTTLS") for ln in ehlo), out
    assert any(ln.startswith("221") for ln in lines), out
    assert upstream.ehlo_names() == [bl.PROXY_HOSTNAME, "sclient.test"]


@pytest.mark.skipif(shutil.which("msmtp") is None, reason="msmtp not installed")
@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_msmtp(bridge, upstream, certs, tmp_path, mode):
    lst = "smtps" if mode == "implicit" else "sub"
    host, port = bridge.addr(lst)
    rc = tmp_path / "msmtprc"
    rc.write_text("\n".join([
        "account default", "host localhost", "port %d" % port, "auth plain",
        "user " + USER, "password " + PASSWORD, "from alice@client.test",
        "domain msmtp.test", "tls on",
        "tls_starttls %s" % ("off" if mode == "implicit" else "on"),
        "tls_trust_file " + os.path.join(certs, "ca.pem"),
        "timeout 15", "logfile " + str(tmp_path / "msmtp.log"), ""]))
    rc.chmod(0o600)
    msg = make_message("msmtp " + mode, b"msmtp body\r\n")
    cp = run(["msmtp", "-C", str(rc), "bob@dest.test"], input=msg, timeout=30)
    assert cp.returncode == 0, describe(cp)
    msgs = upstream.wait_messages(1)
    assert len(msgs) == 1
    meta, body = msgs[0]
    # msmtp may add Date/Message-ID headers; the rest must be intact
    assert b"Subject: msmtp " + mode.encode() + b"\r\n" in body
    assert body.endswith(b"\r\n\r\nmsmtp body\r\n")
    assert meta["ehlo"] == "msmtp.test" and meta["auth_user"] == USER
