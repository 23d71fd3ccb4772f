"""OCSP stapling from files (listener key ocsp_response), and certificates
chosen by SNI when the ClientHello arrives in pieces.

The responses are made here with `openssl ocsp` from a throw-away index
(the test CA signs them); what a client gets is read with
`openssl s_client -status`, which prints the stapled response.
"""

import datetime
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

import bridgelib as bl
from bridgelib import free_port
from test_operations import (hup_and_wait, ops_bridge, pem_cert_sha, pubdir,  # noqa: F401
                             sha, write_config)
from test_sni import SNI_CERTS, quit_, sni_listener_opts, _wrap


def own_wolfssl():
    """Stapling needs the project's wolfSSL (its leak fixes); with Debian's
    library the daemon refuses ocsp_response."""
    cp = bl.run([bl.BIN, "-V"], timeout=20)
    return b"the project's build" in cp.stdout


needs_own = pytest.mark.skipif(not own_wolfssl(), reason="stapling needs the project's wolfSSL")


def openssl(*args, **kw):
    return subprocess.run(["openssl"] + list(args), capture_output=True, timeout=30, **kw)


def cert_field(path, opt):
    return openssl("x509", "-in", path, "-noout", opt).stdout.decode().strip().split("=", 1)[1]


def make_ocsp(certs, name, out, status="good", ndays=7):
    """A DER OCSP response for certs/NAME.pem signed by the test CA."""
    work = out + ".d"
    os.makedirs(work, exist_ok=True)
    pem = os.path.join(certs, name + ".pem")
    serial = cert_field(pem, "-serial")
    end = datetime.datetime.strptime(cert_field(pem, "-enddate"), "%b %d %H:%M:%S %Y %Z")
    subj = openssl("x509", "-in", pem, "-noout", "-subject", "-nameopt",
                   "compat").stdout.decode().strip().split("=", 1)[1]
    flag, rev = ("V", "") if status == "good" else ("R", "200101000000Z")
    with open(os.path.join(work, "index.txt"), "w") as f:
        f.write("%s\t%s\t%s\t%s\tunknown\t%s\n" % (flag, end.strftime("%y%m%d%H%M%SZ"), rev,
                                                    serial, subj))
    cp = openssl("ocsp", "-index", os.path.join(work, "index.txt"),
                 "-rsigner", os.path.join(certs, "ca.pem"),
                 "-rkey", os.path.join(certs, "ca.key"),
                 "-CA", os.path.join(certs, "ca.pem"), "-issuer", os.path.join(certs, "ca.pem"),
                 "-cert", pem, "-respout", out, "-ndays", str(ndays), "-no_nonce")
    assert cp.returncode == 0 and os.path.getsize(out) > 0, cp.stderr
    shutil.rmtree(work)
    os.chmod(out, 0o644)
    return out


def chain(certs, name, dst):
    """NAME's certificate followed by its issuer (stapling needs the issuer)."""
    with open(dst, "w") as f:
        for n in (name, "ca"):
            with open(os.path.join(certs, n + ".pem")) as g:
                f.write(g.read())
    os.chmod(dst, 0o644)
    return dst


def staple(addr, sni="localhost", version="-tls1_3", certs=None):
    """(stapled serial or None, leaf subject CN) as openssl s_client sees them."""
    cp = subprocess.run(["openssl", "s_client", "-connect", "%s:%d" % addr, version, "-status",
                         "-servername", sni, "-CAfile", os.path.join(certs, "ca.pem")],
                        input=b"", capture_output=True, timeout=20)
    out = cp.stdout.decode(errors="replace")
    assert "CONNECTED" in out and "Verify return code: 0 (ok)" in out, out + cp.stderr.decode()
    m = re.search(r"OCSP Response Data:.*?Serial Number: ([0-9A-F]+).*?Cert Status: (\w+)", out,
                  re.S)
    cn = re.search(r"^subject=.*CN = ([^\n,]+)", out, re.M).group(1)
    if "OCSP response: no response sent" in out or m is None:
        return None, cn
    return (m.group(1), m.group(2)), cn


@pytest.fixture
def ocsp_files(pubdir, certs):
    d = os.path.join(pubdir, "ocsp")
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o755)
    return d


@needs_own
@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_response_is_stapled(make_bridge, upstream, certs, ocsp_files, version):
    resp = make_ocsp(certs, "proxy", os.path.join(ocsp_files, "proxy.der"))
    opts = {"cert": chain(certs, "proxy", os.path.join(ocsp_files, "proxy-chain.pem")),
            "ocsp_response": resp}
    d = make_bridge(upstream.address, listener_opts={"smtps": opts, "sub": opts})
    got, cn = staple(d.addr("smtps"), version=version, certs=certs)
    assert got == (cert_field(os.path.join(certs, "proxy.pem"), "-serial"), "good"), got
    assert cn == "localhost"
    assert "event=ocsp_not_stapled" not in d.log()


@needs_own
@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_each_sni_certificate_gets_its_own_response(make_bridge, upstream, certs, ocsp_files,
                                                    version):
    """TLS 1.3 builds the staple while parsing the ClientHello: the session
    must already be on the SNI-selected certificate then."""
    names = ("proxy", "sni-mail")
    opts = {"cert": ",\n ".join(chain(certs, n, os.path.join(ocsp_files, n + "-chain.pem"))
                                for n in names),
            "key": ",\n ".join(os.path.join(certs, n + ".key") for n in names),
            "ocsp_response": ",\n ".join(make_ocsp(certs, n, os.path.join(ocsp_files, n + ".der"))
                                         for n in names)}
    d = make_bridge(upstream.address, listener_opts={"smtps": opts, "sub": opts})
    for sni, name, cn in (("localhost", "proxy", "localhost"),
                          ("mail.sni.test", "sni-mail", "mail.sni.test"),
                          ("other.test", "proxy", "localhost")):
        got, got_cn = staple(d.addr("smtps"), sni=sni, version=version, certs=certs)
        assert got_cn == cn, (sni, got_cn)
        assert got == (cert_field(os.path.join(certs, name + ".pem"), "-serial"), "good"), \
            (sni, got)


@needs_own
@pytest.mark.parametrize("what", ["garbage", "other-certificate", "no-issuer-in-chain",
                                  "revoked"])
def test_unusable_response_is_not_stapled_and_tls_still_works(make_bridge, upstream, certs,
                                                              ocsp_files, what):
    path = os.path.join(ocsp_files, what + ".der")
    cert = chain(certs, "proxy", os.path.join(ocsp_files, "proxy-chain.pem"))
    if what == "garbage":
        with open(path, "wb") as f:
            f.write(os.urandom(300))
        os.chmod(path, 0o644)
    elif what == "other-certificate":
        make_ocsp(certs, "sni-mail", path)
    elif what == "no-issuer-in-chain":
        make_ocsp(certs, "proxy", path)
        cert = os.path.join(certs, "proxy.pem")
    else:
        make_ocsp(certs, "proxy", path, status="revoked")
    opts = {"cert": cert, "ocsp_response": path}
    d = make_bridge(upstream.address, listener_opts={"smtps": opts, "sub": opts})
    line = d.wait_log(r"event=ocsp_not_stapled")
    assert "ocsp_response=%s" % path in line, line
    if what == "no-issuer-in-chain":
        assert "issuing CA must follow the certificate" in line, line
    for version in ("-tls1_2", "-tls1_3"):
        got, cn = staple(d.addr("smtps"), version=version, certs=certs)
        assert got is None, got
        assert cn == "localhost"


@needs_own
def test_reload_picks_up_a_refreshed_response(ops_bridge, certs, ocsp_files, pubdir):
    path = os.path.join(ocsp_files, "proxy.der")
    with open(path, "wb") as f:
        f.write(b"not yet")
    os.chmod(path, 0o644)
    opts = {"cert": chain(certs, "proxy", os.path.join(ocsp_files, "proxy-chain.pem")),
            "ocsp_response": path}
    d = ops_bridge(listeners={"smtps": dict({"listen": "127.0.0.1:%d" % free_port(),
                                             "mode": "implicit"}, **opts)})
    # ops_bridge's listener_opts set cert/key to pubdir copies: put ours back
    sections = [(h, dict(v, **opts) if h == "listener smtps" else v) for h, v in d.sections]
    write_config(d, sections)
    hup_and_wait(d)
    got, _ = staple(d.addr("smtps"), certs=certs)
    assert got is None
    make_ocsp(certs, "proxy", path + ".new")
    os.replace(path + ".new", path)
    hup_and_wait(d)
    got, _ = staple(d.addr("smtps"), certs=certs)
    assert got is not None and got[1] == "good", got


@pytest.mark.skipif(own_wolfssl(), reason="only the system library refuses stapling")
def test_system_wolfssl_refuses_stapling(make_bridge, upstream, certs, ocsp_files):
    resp = make_ocsp(certs, "proxy", os.path.join(ocsp_files, "proxy.der"))
    d = make_bridge(upstream.address, start=False, listener_opts={"smtps": {
        "cert": chain(certs, "proxy", os.path.join(ocsp_files, "proxy-chain.pem")),
        "ocsp_response": resp}})
    cp = bl.run([bl.BIN, "-t", "-c", d.conf], timeout=20)
    err = cp.stderr.decode()
    assert cp.returncode != 0 and "needs the project's wolfSSL build" in err, err


def test_config_errors(make_bridge, upstream, certs, tmp_path):
    d = make_bridge(upstream.address, start=False, listener_opts={"smtps": {
        "cert": "%s, %s" % (os.path.join(certs, "proxy.pem"), os.path.join(certs, "sni-mail.pem")),
        "key": "%s, %s" % (os.path.join(certs, "proxy.key"), os.path.join(certs, "sni-mail.key")),
        "ocsp_response": os.path.join(certs, "ca.pem")}})
    cp = bl.run([bl.BIN, "-t", "-c", d.conf], timeout=20)
    err = cp.stderr.decode()
    assert cp.returncode != 0
    assert "key 'ocsp_response': 1 file(s) for 2 certificate(s)" in err, err
    d = make_bridge(upstream.address, start=False, listener_opts={"smtps": {
        "ocsp_response": str(tmp_path / "missing.der")}})
    cp = bl.run([bl.BIN, "-t", "-c", d.conf], timeout=20)
    err = cp.stderr.decode()
    assert cp.returncode != 0 and "key 'ocsp_response': cannot read" in err, err
    # '-' : this certificate has none
    d = make_bridge(upstream.address, start=False, listener_opts={"smtps": {
        "ocsp_response": "-"}})
    cp = bl.run([bl.BIN, "-t", "-c", d.conf], timeout=20)
    assert cp.returncode == 0, cp.stderr.decode()


# ------------------------------------------- ClientHello in several pieces

class SlowRelay:
    """Forwards one client connection to the daemon, the client's first
    bytes (the ClientHello) a few at a time with pauses."""

    def __init__(self, target, chunk=40, pause=0.02, first=600):
        self.target, self.chunk, self.pause, self.first = target, chunk, pause, first
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(1)
        self.addr = self.lsock.getsockname()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        c, _ = self.lsock.accept()
        u = socket.create_connection(self.target)
        u.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def down():
            try:
                while True:
                    b = u.recv(65536)
                    if not b:
                        break
                    c.sendall(b)
            except OSError:
                pass
            finally:
                try:
                    c.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        threading.Thread(target=down, daemon=True).start()
        sent = 0
        try:
            while True:
                b = c.recv(self.chunk if sent < self.first else 65536)
                if not b:
                    break
                u.sendall(b)
                sent += len(b)
                if sent < self.first:
                    time.sleep(self.pause)
        except OSError:
            pass
        finally:
            try:
                u.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def test_sni_hello_arriving_in_pieces(make_bridge, upstream, certs):
    opts = sni_listener_opts(certs)
    d = make_bridge(upstream.address, listener_opts={"smtps": opts, "sub": opts})
    for sni, name in (("mail.sni.test", "sni-mail"), ("x.wild.test", "sni-wild")):
        relay = SlowRelay(d.addr("smtps"))
        ctx = ssl.create_default_context(cafile=os.path.join(certs, "ca.pem"))
        raw = socket.create_connection(relay.addr, timeout=10)
        w = _wrap(ctx.wrap_socket(raw, server_hostname=sni))
        assert w.read_reply().code == 220
        assert sha(w.sock.getpeercert(binary_form=True)) == \
            pem_cert_sha(os.path.join(certs, name + ".pem"))
        quit_(w)


def test_not_tls_on_an_sni_listener_is_a_clean_failure(make_bridge, upstream, certs):
    opts = sni_listener_opts(certs)
    d = make_bridge(upstream.address, listener_opts={"smtps": opts, "sub": opts})
    s = socket.create_connection(d.addr("smtps"), timeout=10)
    s.sendall(b"EHLO plain.test\r\n")
    s.settimeout(10)
    data = b""
    try:
        while True:
            b = s.recv(4096)
            if not b:
                break
            data += b
    except OSError:
        pass
    s.close()
    assert b"250" not in data
    line = d.wait_log(r"event=session_end .*client TLS handshake failed")
    assert "listener=smtps" in line
    _ = SNI_CERTS


@needs_own
@pytest.mark.parametrize("size", [0, 64 * 1024 + 1])
def test_response_file_size_limits(make_bridge, upstream, certs, ocsp_files, size):
    path = os.path.join(ocsp_files, "size-%d.der" % size)
    with open(path, "wb") as f:
        f.write(b"\x30" * size)
    os.chmod(path, 0o644)
    d = make_bridge(upstream.address, start=False, listener_opts={"smtps": {
        "cert": chain(certs, "proxy", os.path.join(ocsp_files, "proxy-chain.pem")),
        "ocsp_response": path}})
    cp = bl.run([bl.BIN, "-t", "-c", d.conf], timeout=20)
    err = cp.stderr.decode()
    assert cp.returncode != 0, err
    assert "key 'ocsp_response': cannot read '%s' (a DER OCSP response of 1 byte to 64 KiB)" \
        % path in err, err


def test_partial_hello_on_an_sni_listener_times_out(make_bridge, upstream, certs):
    """CP_HELLO waits for a whole first record only until handshake_timeout."""
    opts = sni_listener_opts(certs)
    d = make_bridge(upstream.address, listener_opts={"smtps": opts, "sub": opts},
                    global_opts={"handshake_timeout": "1s"})
    s = socket.create_connection(d.addr("smtps"), timeout=10)
    s.sendall(b"\x16\x03\x01\x02\x00")   # a record header announcing 512 bytes, then nothing
    t0 = time.monotonic()
    s.settimeout(10)
    try:
        assert s.recv(100) == b""
    except ConnectionResetError:
        pass
    dt = time.monotonic() - t0
    s.close()
    assert 0.8 <= dt <= 5 * bl.TF, dt
    line = d.wait_log(r"event=session_end .*client TLS handshake timeout \(1s\)")
    assert "listener=smtps" in line
