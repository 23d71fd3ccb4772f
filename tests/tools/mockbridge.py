#!/usr/bin/python3
"""mockbridge -- a small Python model of smtpbridge, used ONLY to develop and
self-check the integration suite before/independently of the C daemon:

    SMTPBRIDGE_BIN=tests/tools/mockbridge.py /usr/bin/python3 -m pytest -q tests/integration

It implements the session behaviour from DESIGN.md (greeting, pre-TLS dialogue,
STARTTLS injection check, upstream EHLO/STARTTLS/verified TLS, EHLO reply
rewrite, splice, deadlines, key=value logs). It does NOT validate configs in
depth (-t only parses), has no caps, no PROXY/XCLIENT. Not for production.
"""

import configparser
import ipaddress
import os
import re
import select
import signal
import socket
import ssl
import sys
import threading
import time

VERSION = "mockbridge 0.1"
_sid = [0]
_sid_lock = threading.Lock()


def log(level, **kv):
    parts = ["%s level=%s" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z", level)]
    for k, v in kv.items():
        v = str(v)
        if v == "" or re.search(r'[\s"]', v):
            v = '"%s"' % v.replace('"', '\\"')
        parts.append("%s=%s" % (k, v))
    sys.stderr.write(" ".join(parts) + "\n")
    sys.stderr.flush()


def dur(v):
    m = re.fullmatch(r"\s*(\d+)\s*(ms|s|m|h)?\s*", v)
    if not m:
        raise ValueError("bad duration %r" % v)
    n = int(m.group(1))
    return n / 1000.0 if m.group(2) == "ms" else n * {"s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]


def split_addr(a):
    a = a.strip()
    if a.startswith("["):
        h, _, p = a[1:].partition("]")
        return h, int(p[1:])
    h, _, p = a.rpartition(":")
    return h, int(p)


class Fail(Exception):
    pass


class Deadline:
    def __init__(self, secs):
        self.t = time.monotonic() + secs

    def left(self):
        return self.t - time.monotonic()


class Line:
    """Buffered reader on a (possibly TLS) socket with deadlines."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def fill(self, dl):
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            d = self.sock.recv(65536)
        else:
            left = dl.left()
            if left <= 0:
                raise socket.timeout()
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                raise socket.timeout()
            self.sock.settimeout(max(0.05, dl.left()))
            d = self.sock.recv(65536)
        if not d:
            raise EOFError()
        self.buf += d

    def line(self, dl, maxlen=None):
        while b"\n" not in self.buf:
            if maxlen and len(self.buf) > maxlen:
                raise OverflowError()
            self.fill(dl)
        ln, _, self.buf = self.buf.partition(b"\n")
        if maxlen and len(ln) > maxlen:
            raise OverflowError()
        return ln + b"\n"

    def reply(self, dl, maxbytes):
        lines = []
        total = 0
        code = None
        while True:
            ln = self.line(dl, maxbytes)
            total += len(ln)
            if total > maxbytes:
                raise Fail("reply too large")
            s = ln.rstrip(b"\r\n")
            if len(s) < 3 or not s[:3].isdigit() or (len(s) > 3 and s[3:4] not in b" -"):
                raise Fail("malformed reply %r" % s[:40])
            if code is None:
                code = s[:3]
            elif s[:3] != code:
                raise Fail("reply code changed")
            lines.append(s)
            if len(s) == 3 or s[3:4] == b" ":
                return int(code), lines


class Session(threading.Thread):
    def __init__(self, cfg, lst, sock, peer):
        super().__init__(daemon=True)
        self.cfg, self.lst, self.csock, self.peer = cfg, lst, sock, peer
        with _sid_lock:
            _sid[0] += 1
            self.sid = "%08x" % _sid[0]
        self.usock = None
        self.reason = "?"
        self.client_tls = self.upstream_tls = "-"
        self.c2u = self.u2c = 0
        self.errors = 0
        self.t0 = time.monotonic()
        g = cfg["global"]
        self.host = g.get("hostname", socket.gethostname())
        self.hs_to = dur(g.get("handshake_timeout", "10s"))
        self.cmd_to = dur(g.get("command_timeout", "60s"))
        self.idle_to = dur(g.get("idle_timeout", "5m"))
        self.max_err = int(g.get("max_errors", "10"))
        self.bufsize = 16384
        un = lst.get("upstream")
        self.up = cfg["upstream " + un] if un else cfg["upstream"]

    def csend(self, b):
        self.csock.sendall(b)

    def run(self):
        try:
            self.session()
        except Fail as e:
            self.reason = str(e)
        except (EOFError, ConnectionError, ssl.SSLError, OSError) as e:
            self.reason = "client: %s" % (type(e).__name__)
        finally:
            for s in (self.csock, self.usock):
                try:
                    if s:
                        s.close()
                except OSError:
                    pass
            cpeer = "%s:%d" % (self.peer[0], self.peer[1]) if ":" not in self.peer[0] else "[%s]:%d" % self.peer[:2]
            log("info", sid=self.sid, event="session_end", client=cpeer,
                listener=self.lst.name.split(None, 1)[1], client_tls=self.client_tls,
                upstream=self.up.get("address"), upstream_tls=self.upstream_tls,
                bytes_c2u=self.c2u, bytes_u2c=self.u2c,
                duration_ms=int((time.monotonic() - self.t0) * 1000), reason=self.reason)

    def server_ctx(self):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.lst["cert"], self.lst["key"])
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def client_tls_wrap(self):
        self.csock.settimeout(self.hs_to)
        try:
            self.csock = self.server_ctx().wrap_socket(self.csock, server_side=True)
        except (socket.timeout, ssl.SSLError, OSError) as e:
            raise Fail("client handshake: %s" % type(e).__name__)
        self.client_tls = self.csock.version()

    def session(self):
        mode = self.lst["mode"]
        if mode == "implicit":
            self.client_tls_wrap()
        self.csend(b"220 %s ESMTP\r\n" % self.host.encode())
        rd = Line(self.csock)
        allowed = False
        for net in [n.strip() for n in self.lst.get("allow_plaintext_from", "").split(",") if n.strip()]:
            try:
                if ipaddress.ip_address(self.peer[0]) in ipaddress.ip_network(net, strict=False):
                    allowed = True
            except ValueError:
                pass
        if mode == "starttls" and not allowed:
            rd = self.pretls(rd)
        # first command after TLS (or from an allowed plaintext client)
        while True:
            try:
                ln = rd.line(Deadline(self.cmd_to), 512)
            except socket.timeout:
                self.csend(b"421 4.4.2 %s command timeout\r\n" % self.host.encode())
                raise Fail("command timeout")
            except OverflowError:
                raise Fail("line too long")
            verb = ln.strip().split(b" ")[0].upper()
            if verb in (b"EHLO", b"HELO"):
                break
            if verb == b"QUIT":
                self.csend(b"221 2.0.0 Bye\r\n")
                raise Fail("client quit")
            if verb == b"STARTTLS" and (mode == "implicit" or self.client_tls != "-"):
                self.csend(b"503 5.5.1 TLS already active\r\n")
            elif verb == b"STARTTLS" and allowed:
                if rd.buf:
                    self.csend(b"421 4.7.0 pipelining after STARTTLS\r\n")
                    raise Fail("starttls injection")
                self.csend(b"220 2.0.0 Ready to start TLS\r\n")
                self.client_tls_wrap()
                rd = Line(self.csock)
            elif verb in (b"NOOP", b"RSET"):
                self.csend(b"250 2.0.0 OK\r\n")
            else:
                self.csend(b"503 5.5.1 EHLO first\r\n")
        ur = self.dial()
        self.usock.sendall(ln)
        self.c2u += len(ln)
        code, lines = ur.reply(Deadline(dur(self.up.get("reply_timeout", "30s"))), self.bufsize)
        lines = [l for i, l in enumerate(lines) if i == 0 or l[4:].upper() != b"STARTTLS"]
        if allowed and self.client_tls == "-" and code == 250:
            lines.insert(len(lines), lines[-1][:4] + b"STARTTLS")
        out = b"".join(l[:3] + (b" " if i == len(lines) - 1 else b"-") + l[4:] + b"\r\n"
                       for i, l in enumerate(lines))
        self.csend(out)
        self.u2c += len(out)
        if rd.buf:
            self.usock.sendall(rd.buf)
            self.c2u += len(rd.buf)
        if ur.buf:
            self.csend(ur.buf)
        self.splice()

    def pretls(self, rd):
        while True:
            try:
                ln = rd.line(Deadline(self.cmd_to), 512)
            except socket.timeout:
                self.csend(b"421 4.4.2 %s command timeout\r\n" % self.host.encode())
                raise Fail("command timeout")
            except OverflowError:
                self.csend(b"500 5.5.2 line too long\r\n")
                self.errors += 1
                # discard up to the next newline
                raise Fail("line too long")
            if len(ln) > 512:
                self.csend(b"500 5.5.2 line too long\r\n")
                self.errors += 1
                continue
            verb = ln.strip().split(b" ")[0].upper()
            if verb == b"EHLO":
                self.csend(b"250-%s\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 STARTTLS\r\n" % self.host.encode())
            elif verb == b"HELO":
                self.csend(b"250 %s\r\n" % self.host.encode())
            elif verb in (b"NOOP", b"RSET"):
                self.csend(b"250 2.0.0 OK\r\n")
            elif verb == b"QUIT":
                self.csend(b"221 2.0.0 Bye\r\n")
                raise Fail("client quit")
            elif verb == b"STARTTLS":
                if rd.buf:
                    self.csend(b"421 4.7.0 pipelining after STARTTLS\r\n")
                    raise Fail("starttls injection")
                self.csend(b"220 2.0.0 Ready to start TLS\r\n")
                self.client_tls_wrap()
                return Line(self.csock)
            else:
                self.errors += 1
                if self.errors >= self.max_err:
                    self.csend(b"421 4.7.0 too many errors\r\n")
                    raise Fail("too many errors")
                self.csend(b"530 5.7.0 Must issue a STARTTLS command first\r\n")

    def dial(self):
        up = self.up
        addr = up.get("address")
        rto = dur(up.get("reply_timeout", "30s"))
        try:
            h, p = split_addr(addr)
            fam = socket.AF_INET6 if ":" in h else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(dur(up.get("connect_timeout", "10s")))
            self.usock = s
            s.connect((h, p))
            ur = Line(s)
            code, _ = ur.reply(Deadline(rto), self.bufsize)
            if code != 220:
                raise Fail("greeting %d" % code)
            s.sendall(b"EHLO %s\r\n" % self.host.encode())
            code, lines = ur.reply(Deadline(rto), self.bufsize)
            if code != 250 or not any(l[4:].upper() == b"STARTTLS" for l in lines[1:]):
                raise Fail("no STARTTLS")
            if up.get("tls", "starttls") == "none":
                return ur
            s.sendall(b"STARTTLS\r\n")
            code, _ = ur.reply(Deadline(rto), self.bufsize)
            if code != 220:
                raise Fail("STARTTLS refused %d" % code)
            if ur.buf:
                raise Fail("bytes after STARTTLS 220")
            ctx = ssl.create_default_context(cafile=up.get("ca_file"))
            if up.get("verify", "yes") in ("no", "off", "false", "0"):
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            ctx.minimum_version = (ssl.TLSVersion.TLSv1_3 if up.get("min_tls") == "1.3"
                                   else ssl.TLSVersion.TLSv1_2)
            s.settimeout(rto)
            s = ctx.wrap_socket(s, server_hostname=up.get("server_name", h))
            self.usock = s
            self.upstream_tls = s.version()
            return Line(s)
        except Fail as e:
            reason = str(e)
        except socket.timeout:
            reason = "timeout"
        except EOFError:
            reason = "eof"
        except (ssl.SSLError, OSError) as e:
            reason = "%s" % e
        log("warning", sid=self.sid, event="upstream_failed", upstream=addr, reason=reason)
        try:
            self.csend(b"421 4.4.2 %s upstream unavailable\r\n" % self.host.encode())
        except OSError:
            pass
        raise Fail("upstream: " + reason)

    def splice(self):
        socks = [self.csock, self.usock]
        last = time.monotonic()
        while True:
            ready = [s for s in socks if isinstance(s, ssl.SSLSocket) and s.pending()]
            if not ready:
                r, _, _ = select.select(socks, [], [], 0.1)
                ready = r
            if not ready:
                if time.monotonic() - last > self.idle_to:
                    self.csend(b"421 4.4.2 %s idle timeout\r\n" % self.host.encode())
                    raise Fail("idle timeout")
                continue
            last = time.monotonic()
            for s in ready:
                try:
                    d = s.recv(65536)
                except ssl.SSLWantReadError:
                    continue
                if not d:
                    raise Fail("client closed" if s is self.csock else "upstream closed")
                if s is self.csock:
                    self.usock.sendall(d)
                    self.c2u += len(d)
                else:
                    self.csock.sendall(d)
                    self.u2c += len(d)


class SectionProxy(dict):
    name = ""


def load(path):
    cp = configparser.ConfigParser(inline_comment_prefixes=(" ;",), interpolation=None,
                                   strict=True)
    with open(path) as f:
        cp.read_file(f)
    cfg = {}
    for sec in cp.sections():
        d = SectionProxy(cp[sec])
        d.name = sec
        cfg[sec] = d
    cfg.setdefault("global", SectionProxy())
    return cfg


def main():
    args = sys.argv[1:]
    if "-V" in args:
        print(VERSION)
        return 0
    if "--help" in args or "-h" in args:
        print("usage: mockbridge [-t] -c FILE")
        return 0
    conf = args[args.index("-c") + 1]
    try:
        cfg = load(conf)
    except Exception as e:  # noqa
        sys.stderr.write("%s: %s\n" % (conf, e))
        return 1
    if "-t" in args:
        print("configuration OK")
        return 0
    socks = []
    try:
        for name, sec in cfg.items():
            if not name.startswith("listener "):
                continue
            for a in sec["listen"].split(","):
                h, p = split_addr(a)
                fam = socket.AF_INET6 if ":" in h else socket.AF_INET
                s = socket.socket(fam, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((h, p))
                s.listen(64)
                socks.append((s, sec))
    except OSError as e:
        sys.stderr.write("cannot bind: %s\n" % e)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    log("info", event="ready")
    while not stop.is_set():
        r, _, _ = select.select([s for s, _ in socks], [], [], 0.2)
        for s in r:
            sec = dict((id(x), y) for x, y in socks)[id(s)]
            cs, peer = s.accept()
            Session(cfg, sec, cs, peer).start()
    log("info", event="shutdown")
    return 0


if __name__ == "__main__":
    sys.exit(main())
