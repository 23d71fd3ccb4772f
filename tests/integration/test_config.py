"""Command line and configuration checking (-t, -V, --help, start-up errors)."""

import os
import re
import signal

import pytest

import bridgelib as bl
from bridgelib import BIN, describe, free_port, run


@pytest.fixture
def binary():
    if not (os.path.isfile(BIN) and os.access(BIN, os.X_OK)):
        pytest.skip("daemon binary %s not built yet" % BIN)
    return BIN


def good_lines(certs, port1=None, port2=None):
    """A valid config as a list of lines (1-based line N is lines[N-1])."""
    return [
        "[global]",                                             # 1
        "hostname = proxy.test",                                # 2
        "user = nobody",                                        # 3
        "",                                                     # 4
        "[upstream]",                                           # 5
        "address = 127.0.0.1:%d" % free_port(),                 # 6
        "tls = starttls",                                       # 7
        "ca_file = %s/ca.pem" % certs,                          # 8
        "server_name = localhost",                              # 9
        "",                                                     # 10
        "[listener smtps]",                                     # 11
        "listen = 127.0.0.1:%d" % (port1 or free_port()),       # 12
        "mode = implicit",                                      # 13
        "cert = %s/proxy.pem" % certs,                          # 14
        "key = %s/proxy.key" % certs,                           # 15
        "",                                                     # 16
        "[listener alt]",                                       # 17
        "listen = 127.0.0.1:%d" % (port2 or free_port()),       # 18
        "mode = starttls",                                      # 19
        "cert = %s/proxy.pem" % certs,                          # 20
        "key = %s/proxy.key" % certs,                           # 21
        "",
    ]


def write(tmp_path, lines, name="test.conf"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def check(binary, conf):
    return run([binary, "-t", "-c", conf], timeout=20)


def test_good_config(binary, certs, tmp_path):
    conf = write(tmp_path, good_lines(certs))
    cp = check(binary, conf)
    assert cp.returncode == 0, describe(cp)
    out = (cp.stdout + cp.stderr).decode("utf-8", "replace").lower()
    assert "ok" in out, describe(cp)


def test_shipped_example_config_parses(binary, certs, tmp_path):
    """config/smtpbridge.conf with cert paths pointed at test certs."""
    src = open(os.path.join(bl.REPO, "config", "smtpbridge.conf")).read()
    src = src.replace("/etc/smtpbridge/fullchain.pem", certs + "/proxy.pem")
    src = src.replace("/etc/smtpbridge/privkey.pem", certs + "/proxy.key")
    src = src.replace("user = smtpbridge", "user = nobody")
    if not os.path.exists("/etc/ssl/certs/ca-certificates.crt"):
        src = src.replace("/etc/ssl/certs/ca-certificates.crt", certs + "/ca.pem")
    conf = tmp_path / "example.conf"
    conf.write_text(src)
    cp = check(binary, str(conf))
    assert cp.returncode == 0, describe(cp)


def test_upstream_tls_none_is_valid(binary, certs, tmp_path):
    lines = good_lines(certs)
    lines[6] = "tls = none"
    cp = check(binary, write(tmp_path, lines))
    assert cp.returncode == 0, describe(cp)


def _bad(binary, tmp_path, lines, lineno, key):
    conf = write(tmp_path, lines)
    cp = check(binary, conf)
    err = cp.stderr.decode("utf-8", "replace")
    assert cp.returncode == 1, describe(cp)
    want = "%s:%d:" % (conf, lineno)
    assert want in err, "want %r in stderr\n%s" % (want, describe(cp))
    assert re.search(r"key '%s'" % re.escape(key), err), describe(cp)
    # the same config refuses to start the daemon (exit 1, message on stderr)
    cp2 = run([binary, "-c", conf], timeout=20)
    assert cp2.returncode == 1, describe(cp2)
    assert cp2.stderr.strip(), describe(cp2)
    return err


def test_unknown_key(binary, certs, tmp_path):
    lines = good_lines(certs)
    lines.insert(3, "bogus_key = 1")           # becomes line 4
    _bad(binary, tmp_path, lines, 4, "bogus_key")


def test_unknown_key_in_listener(binary, certs, tmp_path):
    lines = good_lines(certs)
    lines.insert(13, "colour = blue")          # line 14, in [listener smtps]
    _bad(binary, tmp_path, lines, 14, "colour")


def test_bad_mode(binary, certs, tmp_path):
    lines = good_lines(certs)
    lines[12] = "mode = bogus"                 # line 13
    _bad(binary, tmp_path, lines, 13, "mode")


def test_missing_cert_file(binary, certs, tmp_path):
    lines = good_lines(certs)
    lines[13] = "cert = %s/does-not-exist.pem" % tmp_path       # line 14
    conf = write(tmp_path, lines)
    cp = check(binary, conf)
    err = cp.stderr.decode("utf-8", "replace")
    assert cp.returncode == 1, describe(cp)
    assert "does-not-exist.pem" in err or "key 'cert'" in err, describe(cp)
    assert "%s:14:" % conf in err, describe(cp)


def test_key_does_not_match_cert(binary, certs, tmp_path):
    lines = good_lines(certs)
    lines[14] = "key = %s/upstream.key" % certs                  # line 15
    cp = check(binary, write(tmp_path, lines))
    assert cp.returncode == 1, describe(cp)


def test_listener_without_listen(binary, certs, tmp_path):
    lines = good_lines(certs)
    del lines[17]                              # [listener alt] has no listen
    conf = write(tmp_path, lines)
    cp = check(binary, conf)
    err = cp.stderr.decode("utf-8", "replace")
    assert cp.returncode == 1, describe(cp)
    assert "'listen'" in err and conf + ":" in err, describe(cp)
    # names the section (line 17) or the end of the section
    assert re.search(re.escape(conf) + r":(1[7-9]|2[0-1]):", err), describe(cp)


def test_duplicate_listener_name(binary, certs, tmp_path):
    lines = good_lines(certs)
    lines[16] = "[listener smtps]"             # line 17 duplicates line 11
    conf = write(tmp_path, lines)
    cp = check(binary, conf)
    err = cp.stderr.decode("utf-8", "replace")
    assert cp.returncode == 1, describe(cp)
    assert "%s:17:" % conf in err or "%s:18:" % conf in err, describe(cp)
    assert "smtps" in err, describe(cp)


@pytest.mark.parametrize("lineno,line,key", [
    (13, None, "min_tls"),                     # listener min_tls = 0.9
    (7, "tls = sometimes", "tls"),
    (3, "log_level = chatty", "log_level"),
    (2, None, "handshake_timeout"),
    (2, None, "buffer_size"),
    (2, None, "max_errors"),
    (12, "listen = 127.0.0.1:99999", "listen"),
    (12, "listen = 127.0.0.1", "listen"),
    (6, "address = nowhere", "address"),
    (9, None, "verify"),
    (19, None, "allow_plaintext_from"),
], ids=["min_tls-0.9", "tls", "log_level", "duration", "buffer_size", "max_errors",
        "port-range", "no-port", "address", "bool", "cidr"])
def test_bad_values(binary, certs, tmp_path, lineno, line, key):
    lines = good_lines(certs)
    extra = {
        "min_tls": "min_tls = 0.9",
        "handshake_timeout": "handshake_timeout = 10 parsecs",
        "buffer_size": "buffer_size = 1k",
        "max_errors": "max_errors = -3",
        "verify": "verify = maybe",
        "allow_plaintext_from": "allow_plaintext_from = 300.1.2.0/8",
    }
    if line is None:
        # insert the bad line so that it becomes line `lineno + 1`
        lines.insert(lineno, extra[key])
        lineno += 1
    else:
        lines[lineno - 1] = line
    _bad(binary, tmp_path, lines, lineno, key)


def test_listener_min_tls_10_depends_on_the_library(binary, certs, tmp_path):
    """min_tls = 1.0 is valid configuration; whether the TLS library can
    speak TLS 1.0 is checked when the listener's context is built: our own
    wolfSSL build can, Debian's packaged one cannot -- then -t fails and
    names the key and the reason."""
    lines = good_lines(certs)
    lines.insert(15, "min_tls = 1.0")          # line 16, in [listener smtps]
    conf = write(tmp_path, lines)
    cp = check(binary, conf)
    if cp.returncode == 0:
        return
    err = cp.stderr.decode("utf-8", "replace")
    assert cp.returncode == 1, describe(cp)
    assert "key 'min_tls'" in err and "not supported by this wolfSSL build" in err, describe(cp)


def test_missing_upstream_address(binary, certs, tmp_path):
    lines = good_lines(certs)
    del lines[5]
    cp = check(binary, write(tmp_path, lines))
    assert cp.returncode == 1, describe(cp)
    assert "'address'" in cp.stderr.decode(), describe(cp)


def test_missing_config_file(binary, tmp_path):
    cp = run([binary, "-t", "-c", str(tmp_path / "nope.conf")], timeout=20)
    assert cp.returncode == 1, describe(cp)
    assert b"nope.conf" in cp.stderr, describe(cp)


def test_version_and_help(binary):
    cp = run([binary, "-V"], timeout=10)
    assert cp.returncode == 0, describe(cp)
    assert re.search(rb"\d+\.\d+", cp.stdout + cp.stderr), describe(cp)
    cp = run([binary, "--help"], timeout=10)
    assert cp.returncode == 0, describe(cp)
    assert b"-c" in cp.stdout + cp.stderr and b"-t" in cp.stdout + cp.stderr, describe(cp)


def test_port_in_use_fails_startup(binary, certs, tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        lines = good_lines(certs, port1=s.getsockname()[1])
        cp = run([binary, "-c", write(tmp_path, lines)], timeout=20)
        assert cp.returncode == 1, describe(cp)
        assert cp.stderr.strip(), describe(cp)
    finally:
        s.close()


def test_sigterm_exit_zero(make_bridge, upstream):
    d = make_bridge(upstream.address, health=None)
    assert d.stop() == 0, d.log()[-2000:]
