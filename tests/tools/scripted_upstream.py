"""A scripted, misbehaving fake upstream for smtpbridge integration tests.

Raw sockets, one thread per connection, loopback only. Every connection runs
a *script*: a list of steps. Every byte received is recorded, split into
what arrived before our side of TLS started (`pre_tls`) and after it
(`post_tls`, decrypted). After the script ends the connection keeps being
read (bounded by `drain_timeout`) so that anything the proxy sends after a
failure is still recorded -- tests assert it is empty.

Steps (tuples; first item is the op):

    ("send", b"...")            send raw bytes (over TLS once TLS is up)
    ("expect", b"EHLO")         read one line (LF-terminated); record it; the
                                line must start with the prefix (case-
                                insensitive) or the script fails and the
                                connection is closed
    ("expect_line",)            read any one line
    ("starttls",)               server-side TLS handshake with this
                                upstream's context (cert/key/versions)
    ("trickle", b"...", secs)   send one byte every `secs` seconds
    ("sleep", secs)             do nothing for a while (still recording)
    ("hang", secs)              never answer; read and record until the peer
                                closes or `secs` elapse
    ("close",)                  close the connection now (script ends)
    ("shutdown_wr",)            half-close (send FIN), keep reading
    ("rst",)                    close with RST (SO_LINGER 0)
    ("proxy_header",)           read a PROXY protocol header (v1 line or v2
                                binary) and nothing more -- bytes after it
                                (a ClientHello) stay queued; stored in
                                c.proxy_header (and recorded in pre_tls);
                                anything else first fails the script
    ("serve",)                  act as a minimal SMTP server until QUIT/EOF:
                                EHLO -> multi-line 250 (self.ehlo_caps),
                                DATA -> 354 ... 250, QUIT -> 221, other -> 250

Helpers build common scripts:

    prelude(greeting=..., caps=[...])      greeting, EHLO, caps incl. STARTTLS
    good_script()                         full STARTTLS + TLS + ("serve",)

Usage:

    up = ScriptedUpstream(script, cert=certs/"upstream.pem",
                          key=certs/"upstream.key").start()
    ... point the proxy at up.address ...
    up.wait_done(5)
    c = up.conn(0)            # or up.conns list; up.connected -> bool
    c.pre_tls, c.post_tls, c.tls_version, c.tls_error, c.sni, c.lines,
    c.script_error, c.closed_by_peer, c.after_tls_fail
    up.stop()
"""

import select
import socket
import ssl
import struct
import threading
import time

DEFAULT_CAPS = ["upstream.test", "PIPELINING", "SIZE 67108864", "8BITMIME",
                "STARTTLS", "ENHANCEDSTATUSCODES"]
POST_TLS_CAPS = ["upstream.test", "PIPELINING", "SIZE 67108864", "8BITMIME",
                 "AUTH PLAIN LOGIN", "ENHANCEDSTATUSCODES"]


def ehlo_reply(caps):
    out = []
    for i, c in enumerate(caps):
        sep = " " if i == len(caps) - 1 else "-"
        out.append("250%s%s\r\n" % (sep, c))
    return "".join(out).encode()


def prelude(greeting=b"220 upstream.test ESMTP scripted\r\n", caps=None):
    """Steps up to and including the upstream's EHLO reply."""
    return [("send", greeting), ("expect", b"EHLO"),
            ("send", ehlo_reply(caps or DEFAULT_CAPS))]


def good_script(greeting=b"220 upstream.test ESMTP scripted\r\n"):
    return prelude(greeting) + [("expect", b"STARTTLS"),
                                ("send", b"220 2.0.0 Ready to start TLS\r\n"),
                                ("starttls",), ("serve",)]


class ScriptError(Exception):
    pass


class Conn:
    """What happened on one accepted connection."""

    def __init__(self, index, peer):
        self.index = index
        self.peer = peer
        self.pre_tls = bytearray()
        self.post_tls = bytearray()
        self.lines = []          # (phase, line bytes) consumed by expect/serve
        self.proxy_header = None  # bytes of a ("proxy_header",) step
        self.tls_started = False
        self.tls_version = None
        self.tls_cipher = None
        self.tls_error = None
        self.after_tls_fail = bytearray()   # raw bytes read after a failed handshake
        self.sni = None
        self.script_error = None
        self.script_done = False
        self.closed_by_peer = False
        self.done = threading.Event()
        self.start_time = time.monotonic()
        self.end_time = None

    @property
    def all_bytes(self):
        return bytes(self.pre_tls) + bytes(self.post_tls)

    def bytes_after(self, marker_line):
        """Pre-TLS bytes received after the first line starting with marker."""
        data = bytes(self.pre_tls)
        idx = data.upper().find(marker_line.upper())
        if idx < 0:
            return None
        nl = data.find(b"\n", idx)
        return data[nl + 1:] if nl >= 0 else b""

    def __repr__(self):
        return ("<Conn %d pre_tls=%r post_tls=%d bytes tls=%s err=%s script_error=%s>"
                % (self.index, bytes(self.pre_tls[:300]), len(self.post_tls),
                   self.tls_version, self.tls_error, self.script_error))


class ScriptedUpstream:
    def __init__(self, script=None, *, cert=None, key=None, host="127.0.0.1",
                 port=0, scripts=None, max_connections=4, tls_min=None,
                 tls_max=None, ciphers=None, step_timeout=10.0,
                 drain_timeout=3.0, ehlo_caps=None):
        """script: steps for every connection; scripts: list of per-connection
        scripts (index i for the i-th connection; the last one repeats)."""
        if scripts is None:
            scripts = [script if script is not None else good_script()]
        self.scripts = scripts
        self.host = host
        self.port = port
        self.cert = cert
        self.key = key
        self.max_connections = max_connections
        self.step_timeout = step_timeout
        self.drain_timeout = drain_timeout
        self.ehlo_caps = ehlo_caps or POST_TLS_CAPS
        self.conns = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = []
        self._lsock = None
        self._ctx = None
        if cert and key:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            if ciphers:
                ctx.set_ciphers(ciphers)
            if tls_min is not None:
                ctx.minimum_version = tls_min
            if tls_max is not None:
                ctx.maximum_version = tls_max
            ctx.load_cert_chain(cert, key)
            ctx.sni_callback = self._sni_cb
            self._ctx = ctx
        self._sni_by_obj = {}

    # -- public ------------------------------------------------------------
    @property
    def address(self):
        return ("[%s]:%d" % (self.host, self.port) if ":" in self.host
                else "%s:%d" % (self.host, self.port))

    @property
    def connected(self):
        with self._lock:
            return len(self.conns) > 0

    @property
    def connection_count(self):
        with self._lock:
            return len(self.conns)

    def conn(self, i=0, timeout=10.0):
        """The i-th connection, waiting up to timeout for it to arrive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.conns) > i:
                    return self.conns[i]
            time.sleep(0.02)
        raise AssertionError("scripted upstream: no connection #%d within %.1fs"
                             % (i, timeout))

    def wait_done(self, timeout=10.0, i=0):
        c = self.conn(i, timeout)
        if not c.done.wait(timeout):
            raise AssertionError("scripted upstream: connection #%d not finished "
                                 "within %.1fs: %r" % (i, timeout, c))
        return c

    def start(self):
        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(16)
        s.settimeout(0.2)
        self._lsock = s
        self.port = s.getsockname()[1]
        t = threading.Thread(target=self._accept_loop, name="scripted-accept",
                             daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self, timeout=5.0):
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        if self._lsock is not None:
            try:
                self._lsock.close()
            except OSError:
                pass
            self._lsock = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- internals -----------------------------------------------------------
    def _sni_cb(self, sslobj, name, ctx):
        self._sni_by_obj[id(sslobj)] = name
        return None

    def _accept_loop(self):
        accepted = 0
        while not self._stop.is_set() and accepted < self.max_connections:
            try:
                cs, peer = self._lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                c = Conn(len(self.conns), peer)
                self.conns.append(c)
            script = self.scripts[min(c.index, len(self.scripts) - 1)]
            t = threading.Thread(target=self._run_conn, args=(cs, c, script),
                                 name="scripted-conn-%d" % c.index, daemon=True)
            t.start()
            self._threads.append(t)
            accepted += 1
        # Over the limit: stop listening so that further dials are refused.
        try:
            self._lsock.close()
        except OSError:
            pass

    def _run_conn(self, sock, c, script):
        io = _ConnIO(sock, c, self)
        try:
            for step in script:
                if self._stop.is_set():
                    break
                if not io.run_step(step):
                    break
            c.script_done = True
            if not io.closed:
                io.drain(self.drain_timeout)
        except ScriptError as e:
            c.script_error = str(e)
            if not io.closed:
                io.drain(self.drain_timeout)
        except Exception as e:  # noqa: BLE001 - record everything
            c.script_error = "%s: %s" % (type(e).__name__, e)
        finally:
            io.close()
            c.end_time = time.monotonic()
            c.done.set()


class _ConnIO:
    def __init__(self, sock, c, up):
        self.raw = sock
        self.sock = sock
        self.c = c
        self.up = up
        self.tls = False
        self.tls_failed = False
        self.buf = bytearray()    # post-TLS unconsumed plaintext
        self.closed = False
        self.eof = False

    # recording ----------------------------------------------------------------
    def _record(self, data):
        if self.tls_failed:
            self.c.after_tls_fail += data
        elif self.tls:
            self.c.post_tls += data
        else:
            self.c.pre_tls += data

    def _recv_some(self, timeout, peek_line=False):
        """Receive into self.buf. Pre-TLS with peek_line: take bytes from the
        kernel only up to and including the next LF, so that bytes after the
        line stay queued (they could be a TLS ClientHello). Returns False on
        EOF/timeout."""
        if self.eof:
            return False
        if self.tls and self.sock.pending():
            data = self.sock.recv(65536)
        else:
            r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
            if not r:
                return False
            try:
                if peek_line and not self.tls:
                    peek = self.sock.recv(65536, socket.MSG_PEEK)
                    if not peek:
                        data = b""
                    else:
                        nl = peek.find(b"\n")
                        n = nl + 1 if nl >= 0 else len(peek)
                        data = self.sock.recv(n)
                else:
                    data = self.sock.recv(65536)
            except (ssl.SSLWantReadError, socket.timeout):
                return True
            except (ConnectionError, ssl.SSLError, OSError):
                data = b""
        if not data:
            self.eof = True
            self.c.closed_by_peer = True
            return False
        self._record(data)
        self.buf += data
        return True

    def read_line(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl + 1])
                del self.buf[:nl + 1]
                self.c.lines.append(("tls" if self.tls else "plain", line))
                return line
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                return None
            self._recv_some(min(left, 0.5), peek_line=True)

    def send(self, data):
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as e:
            raise ScriptError("send failed: %s" % e)

    def drain(self, timeout):
        """Keep recording whatever arrives until EOF or timeout."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._recv_some(min(0.2, deadline - time.monotonic()))
            self.buf.clear()

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        try:
            self.raw.close()
        except OSError:
            pass

    # steps ------------------------------------------------------------------
    def run_step(self, step):
        op = step[0]
        to = self.up.step_timeout
        if op == "send":
            self.send(step[1])
        elif op == "expect":
            line = self.read_line(to)
            if line is None:
                raise ScriptError("expected %r, got EOF/timeout" % step[1])
            if not line.upper().startswith(step[1].upper()):
                raise ScriptError("expected %r, got %r" % (step[1], line))
        elif op == "expect_line":
            if self.read_line(to) is None:
                raise ScriptError("expected a line, got EOF/timeout")
        elif op == "starttls":
            self.starttls(to)
        elif op == "trickle":
            data, interval = step[1], step[2]
            for i in range(len(data)):
                self.send(data[i:i + 1])
                self._sleep_recording(interval)
                if self.eof:
                    break
        elif op == "sleep":
            self._sleep_recording(step[1])
        elif op == "hang":
            self.drain(step[1])
        elif op == "close":
            self.c.script_done = True
            self.close()
            return False
        elif op == "rst":
            self.c.script_done = True
            try:
                self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.close()
            return False
        elif op == "shutdown_wr":
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        elif op == "proxy_header":
            self.read_proxy_header(to)
        elif op == "serve":
            self.serve(to)
        else:
            raise ScriptError("unknown step %r" % (op,))
        return True

    PROXY_V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"

    def _peek_until(self, deadline, done):
        """Queued bytes (not consumed) once done(data) is true; whatever is
        queued at EOF or at the deadline otherwise."""
        data = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.sock], [], [],
                                    max(0.0, min(0.2, deadline - time.monotonic())))
            if not r:
                continue
            try:
                peek = self.sock.recv(4096, socket.MSG_PEEK)
            except OSError:
                return data
            if not peek or len(peek) == len(data) and data:
                # EOF, or nothing new yet (peeked bytes keep the socket
                # readable): avoid a busy loop
                if not peek:
                    return data
                time.sleep(0.01)
                continue
            data = peek
            if done(data):
                return data
        return data

    def _take(self, n):
        """Consume exactly n bytes that _peek_until has shown to be queued."""
        out = bytearray()
        for _ in range(n + 1):
            if len(out) >= n:
                break
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                break
            out += chunk
        self._record(bytes(out))
        return bytes(out)

    def read_proxy_header(self, timeout):
        if self.tls or self.buf:
            raise ScriptError("proxy_header step must come first, before TLS")
        deadline = time.monotonic() + timeout
        sig = self.PROXY_V2_SIG

        def done(d):
            if d[:1] == b"P":
                return b"\r\n" in d or len(d) >= 108
            if d[:12] == sig:
                return len(d) >= 16 and len(d) >= 16 + (d[14] << 8 | d[15])
            return not sig.startswith(d)

        data = self._peek_until(deadline, done)
        if data.startswith(b"PROXY ") and b"\r\n" in data[:108]:
            hdr = self._take(data.index(b"\r\n") + 2)
        elif data[:12] == sig and len(data) >= 16 and \
                len(data) >= 16 + (data[14] << 8 | data[15]):
            hdr = self._take(16 + (data[14] << 8 | data[15]))
        else:
            raise ScriptError("expected a PROXY header, got %r" % data[:200])
        self.c.proxy_header = hdr

    def _sleep_recording(self, secs):
        deadline = time.monotonic() + secs
        while time.monotonic() < deadline and not self.eof:
            if self._recv_some(min(0.1, deadline - time.monotonic())):
                pass
        # keep received bytes available to a later expect
        return

    def starttls(self, timeout):
        if self.up._ctx is None:
            raise ScriptError("starttls step but no cert/key configured")
        if self.buf:
            # Bytes already consumed from the kernel after the STARTTLS line
            # (should never happen: we only take whole lines pre-TLS).
            raise ScriptError("plaintext left before TLS: %r" % bytes(self.buf))
        self.c.tls_started = True
        # wrap a dup() so that self.raw stays usable if the handshake fails
        dup = self.raw.dup()
        dup.settimeout(timeout)
        try:
            s = self.up._ctx.wrap_socket(dup, server_side=True,
                                         do_handshake_on_connect=False)
            s.do_handshake()
        except (ssl.SSLError, OSError) as e:
            try:
                dup.close()
            except OSError:
                pass
            self.c.tls_error = "%s: %s" % (type(e).__name__, e)
            # Keep reading the raw socket: a fallback to plaintext would show
            # up in c.after_tls_fail.
            self.tls_failed = True
            raise ScriptError("TLS handshake failed: %s" % e)
        self.sock = s
        self.tls = True
        self.c.tls_version = s.version()
        self.c.tls_cipher = s.cipher()[0] if s.cipher() else None
        self.c.sni = self.up._sni_by_obj.pop(id(s), None)
        s.settimeout(1.0)

    def serve(self, timeout):
        """Minimal SMTP server (post-TLS or plaintext)."""
        while True:
            line = self.read_line(timeout)
            if line is None:
                return
            cmd = line.strip().split(b" ", 1)[0].upper()
            if cmd in (b"EHLO",):
                self.send(ehlo_reply(self.up.ehlo_caps))
            elif cmd == b"HELO":
                self.send(b"250 upstream.test\r\n")
            elif cmd == b"AUTH":
                self.send(b"235 2.7.0 Authentication successful\r\n")
            elif cmd == b"DATA":
                self.send(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                while True:
                    dl = self.read_line(timeout)
                    if dl is None:
                        return
                    if dl in (b".\r\n", b".\n"):
                        break
                self.send(b"250 2.0.0 Ok: queued as SCRIPTED\r\n")
            elif cmd == b"QUIT":
                self.send(b"221 2.0.0 Bye\r\n")
                self.close()
                return
            else:
                self.send(b"250 2.0.0 Ok\r\n")


class BlackholeListener:
    """A loopback listening socket whose accept queue is full, so that a new
    connect() gets no SYN-ACK and hangs until the dialler's own timeout.

    Linux accepts backlog+1 connections on a listen(0) socket; we fill the
    queue from our side and never accept()."""

    def __init__(self, host="127.0.0.1"):
        self.host = host
        self.lsock = None
        self.fillers = []
        self.port = None

    def start(self, max_fill=8):
        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.lsock = socket.socket(fam, socket.SOCK_STREAM)
        self.lsock.bind((self.host, 0))
        self.lsock.listen(0)
        self.port = self.lsock.getsockname()[1]
        for _ in range(max_fill):
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect((self.host, self.port))
            except BlockingIOError:
                pass
            self.fillers.append(s)
            _, w, _ = select.select([], [s], [], 0.3)
            if not w:
                break          # this one is hanging: the queue is full
        return self

    def probe_hangs(self, timeout=0.5):
        """True if a fresh connect does not complete within timeout."""
        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect((self.host, self.port))
            return False
        except (socket.timeout, OSError):
            return True
        finally:
            s.close()

    @property
    def address(self):
        return ("[%s]:%d" % (self.host, self.port) if ":" in self.host
                else "%s:%d" % (self.host, self.port))

    def stop(self):
        for s in self.fillers:
            try:
                s.close()
            except OSError:
                pass
        self.fillers = []
        if self.lsock is not None:
            self.lsock.close()
            self.lsock = None
