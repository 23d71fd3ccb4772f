"""Helpers for the smtpbridge integration suite: daemon control, config
generation, raw SMTP clients, log parsing. Imported by conftest.py and tests."""

import os
import re
import select
import shlex
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
TOOLS = os.path.join(REPO, "tests", "tools")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)
from ports import free_port  # noqa: E402,F401  (re-exported to the tests)

BIN = os.path.abspath(os.environ.get("SMTPBRIDGE_BIN", os.path.join(REPO, "build", "smtpbridge")))
PY = "/usr/bin/python3"
PROXY_HOSTNAME = "proxy.test"
USER, PASSWORD = "alice", "s3cret-pw"
USERS = {USER: PASSWORD, "bob": "hunter2"}
# Slow (sanitizer) builds may set SMTPBRIDGE_TIME_FACTOR=3 to stretch waits.
TF = float(os.environ.get("SMTPBRIDGE_TIME_FACTOR", "1"))
SANITIZER_PATTERNS = ("ERROR: AddressSanitizer", "runtime error:",
                      "ERROR: LeakSanitizer", "WARNING: ThreadSanitizer")
# SMTPBRIDGE_WRAPPER: a command prefix for the daemon (split with shlex), e.g.
# "valgrind --error-exitcode=99 --leak-check=full -q" (make test-valgrind).
WRAPPER = shlex.split(os.environ.get("SMTPBRIDGE_WRAPPER", ""))
# Memory (RSS) bounds only mean something for a plain build run directly:
# sanitizers and valgrind inflate RSS. SMTPBRIDGE_MAX_RSS_MB=0 also disables.
RSS_CHECKS = (os.environ.get("SMTPBRIDGE_MAX_RSS_MB", "64") != "0" and not WRAPPER
              and "/asan" not in BIN)
# Exit status valgrind uses for "errors found" (--error-exitcode=99).
WRAPPER_ERROR_EXIT = 99
# Memcheck reports that fail a test (the leak lines only appear when there is
# a leak: -q suppresses the summary otherwise).
VALGRIND_PATTERNS = (re.compile(r"are definitely lost in loss record"),
                     re.compile(r"definitely lost: [1-9]"),
                     re.compile(r"Invalid (read|write|free)"),
                     re.compile(r"Mismatched free"),
                     re.compile(r"Conditional jump or move depends on uninitialised"),
                     re.compile(r"Use of uninitialised value"),
                     re.compile(r"Syscall param .* (uninitialised|unaddressable)"),
                     re.compile(r"Source and destination overlap"))


def hostport(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


# --------------------------------------------------------------------------
# config


def render_config(sections):
    """sections: list of (section header, {key: value}) -> INI text."""
    out = []
    for header, kv in sections:
        out.append("[%s]" % header)
        for k, v in kv.items():
            if v is None:
                continue
            out.append("%s = %s" % (k, v))
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------
# logs

_KV = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_log_line(line):
    d = {}
    for k, v in _KV.findall(line):
        if v.startswith('"') and v.endswith('"') and len(v) >= 2:
            v = v[1:-1]
        d[k] = v
    return d


def log_events(text, event=None):
    out = []
    for line in text.splitlines():
        d = parse_log_line(line)
        if event is None or d.get("event") == event:
            d["_line"] = line
            out.append(d)
    return out


# --------------------------------------------------------------------------
# daemon


class Daemon:
    def __init__(self, tmpdir, sections, name="smtpbridge"):
        self.tmpdir = str(tmpdir)
        self.conf = os.path.join(self.tmpdir, name + ".conf")
        self.stderr_path = os.path.join(self.tmpdir, name + ".stderr")
        self.stdout_path = os.path.join(self.tmpdir, name + ".stdout")
        self.sections = sections
        self.proc = None
        # A command prefix for this daemon only (before WRAPPER); it must
        # exec the rest, so that the daemon keeps the pid tests signal.
        self.prefix = []
        self.stopped = False
        self.returncode = None
        self.listeners = {}          # name -> (mode, [(host, port)])
        for header, kv in sections:
            if header.startswith("listener "):
                addrs = []
                for a in kv.get("listen", "").split(","):
                    a = a.strip()
                    if a:
                        h, _, p = a.rpartition(":")
                        addrs.append((h.strip("[]"), int(p)))
                self.listeners[header.split(None, 1)[1]] = (kv.get("mode"), addrs)
        with open(self.conf, "w") as f:
            f.write(render_config(sections))

    def addr(self, listener):
        return self.listeners[listener][1][0]

    def port(self, listener):
        return self.listeners[listener][1][0][1]

    def start(self, timeout=10.0):
        self._err = open(self.stderr_path, "ab")
        self._out = open(self.stdout_path, "ab")
        self.proc = subprocess.Popen(self.prefix + WRAPPER + [BIN, "-c", self.conf],
                                     stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=self._err, cwd=self.tmpdir)
        deadline = time.monotonic() + timeout * TF
        while time.monotonic() < deadline:
            if "event=ready" in self.log():
                return self
            if self.proc.poll() is not None:
                raise AssertionError("smtpbridge exited with %s before ready; stderr:\n%s"
                                     % (self.proc.returncode, self.log()[-4000:]))
            time.sleep(0.02)
        raise AssertionError("smtpbridge not ready within %.1fs; stderr:\n%s"
                             % (timeout * TF, self.log()[-4000:]))

    def log(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def events(self, event=None):
        return log_events(self.log(), event)

    def wait_log(self, pattern, timeout=5.0, start=0):
        """Wait until regex `pattern` matches a log line; return the match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout * TF
        while True:
            text = self.log()[start:]
            for line in text.splitlines():
                m = rx.search(line)
                if m:
                    return line
            if time.monotonic() >= deadline:
                raise AssertionError("no log line matching %r within %.1fs; log tail:\n%s"
                                     % (pattern, timeout * TF, text[-3000:]))
            time.sleep(0.05)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout=10.0):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout * TF)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                self.returncode = "killed after SIGTERM timeout"
                self.stopped = True
                self._close_files()
                return self.returncode
        self.returncode = self.proc.returncode
        self.stopped = True
        self._close_files()
        return self.returncode

    def _close_files(self):
        for f in (getattr(self, "_err", None), getattr(self, "_out", None)):
            if f is not None:
                f.close()

    def sanitizer_report(self):
        text = self.log()
        for pat in SANITIZER_PATTERNS:
            i = text.find(pat)
            if i >= 0:
                return text[max(0, i - 200):i + 3000]
        for rx in VALGRIND_PATTERNS:
            m = rx.search(text)
            if m:
                return text[max(0, m.start() - 200):m.start() + 3000]
        if WRAPPER and self.returncode == WRAPPER_ERROR_EXIT:
            return ("wrapper %r exited %d (its error exit code); stderr tail:\n%s"
                    % (" ".join(WRAPPER), WRAPPER_ERROR_EXIT, text[-3000:]))
        return None


# --------------------------------------------------------------------------
# clients


def client_ctx(certs, verify=True):
    if verify:
        ctx = ssl.create_default_context(cafile=os.path.join(certs, "ca.pem"))
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def smtp_ssl(certs, host, port, timeout=10):
    return smtplib.SMTP_SSL(host, port, timeout=timeout * TF,
                            context=client_ctx(certs), local_hostname="client.test")


def smtp_starttls(certs, host, port, timeout=10):
    s = smtplib.SMTP(host, port, timeout=timeout * TF, local_hostname="client.test")
    s.ehlo("client.test")
    s.starttls(context=client_ctx(certs))
    return s


class Reply:
    def __init__(self, lines, raw):
        self.lines = lines           # list of str without CRLF
        self.raw = raw
        self.code = int(lines[-1][:3]) if lines and lines[-1][:3].isdigit() else None

    @property
    def text(self):
        return "\n".join(self.lines)

    def keywords(self):
        """EHLO keywords (first word of each line after the first), upper."""
        return [ln[4:].split(" ")[0].upper() for ln in self.lines[1:]]

    def __repr__(self):
        return "Reply(%r)" % (self.raw,)


class RawClient:
    """A byte-exact SMTP client over a plain socket that can switch to TLS."""

    def __init__(self, host, port, timeout=10.0, tls_ctx=None, server_hostname="localhost"):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.settimeout(timeout * TF)
        self.sock.connect((host, port))
        self.timeout = timeout * TF
        self.buf = b""
        self.received = b""
        if tls_ctx is not None:
            self.sock = tls_ctx.wrap_socket(self.sock, server_hostname=server_hostname)

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("reply deadline")
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed; buffered %r" % self.buf)
        self.buf += data
        self.received += data

    def read_line(self, timeout=None):
        deadline = time.monotonic() + (timeout * TF if timeout else self.timeout)
        while b"\n" not in self.buf:
            self._fill(deadline)
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def read_reply(self, timeout=None):
        deadline = time.monotonic() + (timeout * TF if timeout else self.timeout)
        lines = []
        raw = b""
        for _ in range(100000):
            while b"\n" not in self.buf:
                self._fill(deadline)
            line, _, self.buf = self.buf.partition(b"\n")
            raw += line + b"\n"
            s = line.rstrip(b"\r").decode("utf-8", "replace")
            lines.append(s)
            if len(s) < 4 or s[3] != "-":
                break
        return Reply(lines, raw)

    def cmd(self, line, timeout=None):
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.read_reply(timeout)

    def starttls(self, ctx, server_hostname="localhost"):
        assert self.buf == b"", "plaintext buffered before TLS: %r" % self.buf
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)

    def read_until_close(self, timeout=5.0):
        """Read everything until EOF; returns (data, closed: bool)."""
        deadline = time.monotonic() + timeout * TF
        data = self.buf
        self.buf = b""
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return data, False
            except (ConnectionResetError, ssl.SSLError, OSError):
                return data, True
            if not chunk:
                return data, True
            data += chunk
        return data, False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def closed_within(sock, timeout):
    """True if the peer closes `sock` within timeout (data read is discarded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([sock], [], [], max(0, deadline - time.monotonic()))
        if not r:
            return False
        try:
            d = sock.recv(65536)
        except (ConnectionResetError, OSError):
            return True
        if not d:
            return True
    return False


def run(cmd, timeout=30, input=None, env=None):
    """subprocess.run with a timeout; returns CompletedProcess (text)."""
    return subprocess.run(cmd, input=input, capture_output=True, timeout=timeout * TF,
                          env=env)


def describe(cp):
    return "cmd: %s\nrc=%s\nstdout:\n%s\nstderr:\n%s" % (
        " ".join(shlex.quote(str(c)) for c in cp.args), cp.returncode,
        _s(cp.stdout)[-3000:], _s(cp.stderr)[-3000:])


def _s(b):
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else (b or "")


def make_message(subject="test", body=b"Hello.\r\n", extra_headers=b""):
    return (b"From: <alice@client.test>\r\nTo: <bob@dest.test>\r\nSubject: "
            + subject.encode() + b"\r\n" + extra_headers + b"\r\n" + body)


def dot_stuff(data):
    """RFC 5321 transparency for a CRLF message; returns DATA payload + end."""
    lines = data.split(b"\r\n")
    out = [(b"." + ln) if ln.startswith(b".") else ln for ln in lines]
    payload = b"\r\n".join(out)
    if not payload.endswith(b"\r\n"):
        payload += b"\r\n"
    return payload + b".\r\n"


# --------------------------------------------------------------------------
# process inspection and attack helpers (test_attacks/test_limits/...)


def proc_status(pid):
    """/proc/PID/status as a dict of str -> str."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def rss_now_kb(pid):
    """Current resident set size (VmRSS) in KiB."""
    return int(proc_status(pid)["VmRSS"].split()[0])


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def cpu_seconds(pid):
    """utime + stime of a process, in seconds (/proc/PID/stat)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    # fields[0] is state (field 3); utime/stime are fields 14/15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_fds(pid, target, timeout=5.0):
    """Wait until the process has at most `target` fds; return the count."""
    deadline = time.monotonic() + timeout * TF
    n = fd_count(pid)
    while n > target and time.monotonic() < deadline:
        time.sleep(0.05)
        n = fd_count(pid)
    return n


def rst_close(sock):
    """Close with an RST (SO_LINGER 0) instead of a FIN."""
    import struct
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class MemTLS:
    """A TLS client over a raw socket with ssl.MemoryBIO, so that the test
    decides exactly which TLS records go into which TCP segment, and can
    half-close the TCP connection (shutdown(SHUT_WR)) and keep reading."""

    def __init__(self, sock, ctx, server_hostname="localhost", timeout=10.0):
        self.sock = sock
        self.timeout = timeout * TF
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=server_hostname)
        self.plain = b""
        self.eof = False

    def _flush(self):
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def _recv_raw(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("MemTLS deadline")
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            self.inc.write_eof()
            self.eof = True
        else:
            self.inc.write(data)
        return data

    def handshake(self):
        deadline = time.monotonic() + self.timeout
        for _ in range(1000):
            try:
                self.obj.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                if not self._recv_raw(deadline):
                    raise EOFError("EOF during handshake")
        raise AssertionError("handshake did not finish")

    def records(self, *chunks):
        """Encrypt each chunk as its own write (its own record) and return
        the raw bytes without sending them."""
        for ch in chunks:
            self.obj.write(ch)
        return self.out.read()

    def send(self, *chunks):
        self.sock.sendall(self.records(*chunks))

    def _pump(self, deadline):
        """Decrypt what is buffered, else receive once; False at EOF."""
        got = False
        while True:
            try:
                d = self.obj.read(65536)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.eof = True
                return False
            if not d:
                self.eof = True
                return False
            self.plain += d
            got = True
        if got:
            return True
        if self.eof:
            return False
        if not self._recv_raw(deadline):
            # give the BIO a chance to report the EOF
            try:
                d = self.obj.read(65536)
                self.plain += d
            except (ssl.SSLError, ssl.SSLWantReadError):
                pass
            return False
        return True

    def read_reply(self, timeout=None):
        deadline = time.monotonic() + (timeout * TF if timeout else self.timeout)
        lines = []
        raw = b""
        for _ in range(100000):
            while b"\n" not in self.plain:
                if not self._pump(deadline) and b"\n" not in self.plain:
                    raise EOFError("closed; buffered %r" % self.plain)
            line, _, self.plain = self.plain.partition(b"\n")
            raw += line + b"\n"
            s = line.rstrip(b"\r").decode("utf-8", "replace")
            lines.append(s)
            if len(s) < 4 or s[3] != "-":
                break
        return Reply(lines, raw)

    def cmd(self, line, timeout=None):
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.read_reply(timeout)

    def read_until_close(self, timeout=5.0):
        deadline = time.monotonic() + timeout * TF
        try:
            while self._pump(deadline):
                pass
            closed = True
        except socket.timeout:
            closed = False
        except (ConnectionResetError, OSError):
            closed = True
        data, self.plain = self.plain, b""
        return data, closed


def assert_healthy(d, certs, fd_base=None, full=True, listener=None):
    """After an attack: the daemon is alive, a normal session works (full:
    through the upstream on the implicit listener; otherwise a pre-TLS
    dialogue on the starttls one), and its fd count returns to fd_base."""
    assert d.alive(), "daemon died (rc=%s); stderr tail:\n%s" % (
        d.proc.returncode, d.log()[-3000:])
    if fd_base is not None:
        n = wait_fds(d.proc.pid, fd_base, timeout=10)
        assert n <= fd_base, "daemon holds %d fds, baseline %d: %s" % (
            n, fd_base, sorted(os.listdir("/proc/%d/fd" % d.proc.pid)))
    if full:
        s = smtp_ssl(certs, *d.addr(listener or "smtps"))
        code, _ = s.ehlo("after-attack.test")
        assert code == 250, code
        assert s.noop()[0] == 250
        s.quit()
    else:
        with RawClient(*d.addr(listener or "sub")) as c:
            assert c.read_reply().code == 220
            assert c.cmd("EHLO after-attack.test").code == 250
            assert c.cmd("QUIT").code == 221
    if fd_base is not None:
        n = wait_fds(d.proc.pid, fd_base, timeout=10)
        assert n <= fd_base, "daemon holds %d fds after a normal session, baseline %d" % (
            n, fd_base)
