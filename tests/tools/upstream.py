#!/usr/bin/python3
"""A real STARTTLS + AUTH submission server for smtpbridge tests and `make run`.

Built on aiosmtpd (Debian 12: 1.4.3). Standalone:

    /usr/bin/python3 tests/tools/upstream.py --listen 127.0.0.1:2587 \
        --cert certs/upstream.pem --key certs/upstream.key \
        --users alice:secret,bob:hunter2 --maildir /tmp/mail \
        [--require-tls yes|no] [--implicit] [--hostname NAME] [--verbose]

Prints `READY` (and `LISTENING host port`) on stdout once the socket is bound.
Stops cleanly on SIGTERM / SIGINT (exit 0).

Behaviour:
  * STARTTLS offered; with --require-tls yes (default) every command other
    than EHLO/HELO/NOOP/RSET/QUIT/STARTTLS before TLS gets 530, and AUTH is
    only offered/accepted after TLS.  --implicit: TLS from the first byte.
  * AUTH PLAIN and LOGIN against --users; MAIL before AUTH -> 530.
  * PIPELINING, 8BITMIME and SIZE are advertised; DATA lines up to 64 KiB
    accepted (aiosmtpd's default is RFC's 1001), messages up to 64 MiB.
  * Each accepted message is stored in --maildir as NNNNNN-<ts>.eml (the raw
    DATA bytes after dot-unstuffing, i.e. envelope.original_content) plus a
    NNNNNN-<ts>.json sidecar: mail_from, rcpt_tos, peer, ehlo (the EHLO name
    in force for this transaction), ehlo_names (all EHLO/HELO names seen on
    the connection, in order), tls, auth_user, size, sha256.
  * Every connection event is appended to --maildir/events.jsonl
    ({"event": "connect"|"ehlo"|"helo"|"starttls"|"auth"|"message"|
    "disconnect", "conn": N, ...}) so that tests can check, e.g., that no
    connection happened, or which EHLO names reached the upstream.

Importable:

    from upstream import UpstreamServer
    srv = UpstreamServer(host="127.0.0.1", port=0, cert=..., key=...,
                         users={"alice": "secret"}, maildir=...)
    srv.start()            # runs its own event loop in a daemon thread
    srv.port               # the bound port
    srv.messages()         # list of (meta dict, bytes) in arrival order
    srv.events             # list of event dicts (same as events.jsonl)
    srv.stop()
"""

import argparse
import asyncio
import hashlib
import itertools
import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
import warnings

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

DATA_SIZE_LIMIT = 64 * 1024 * 1024
LINE_LENGTH_LIMIT = 64 * 1024

# Implicit-TLS mode necessarily sets auth_require_tls=False (aiosmtpd cannot
# tell that the transport is already TLS); the warning is noise there.
warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")


def _tls_version(transport):
    try:
        obj = transport.get_extra_info("ssl_object")
        return obj.version() if obj is not None else None
    except Exception:
        return None


def parse_hostport(text):
    """'127.0.0.1:25' | '[::1]:25' | 'localhost:25' -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("bad address %r" % text)
        return host, int(rest[1:])
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("bad address %r" % text)
    return host, int(port)


def parse_users(text):
    users = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, pw = item.partition(":")
        if not sep:
            raise ValueError("bad --users entry %r (want user:pass)" % item)
        users[user] = pw
    return users


class _BigLineSMTP(SMTP):
    """aiosmtpd SMTP with long DATA lines allowed and connection bookkeeping."""

    line_length_limit = LINE_LENGTH_LIMIT

    def __init__(self, handler, *, server_state, **kw):
        self._state = server_state
        self._conn_id = None
        self._ehlo_names = []
        super().__init__(handler, **kw)

    def connection_made(self, transport):
        first = self._conn_id is None
        if first:
            self._conn_id = self._state.next_conn_id()
            peer = transport.get_extra_info("peername")
            self._state.event("connect", self._conn_id, peer=_fmt_peer(peer))
        super().connection_made(transport)
        self.session.conn_id = self._conn_id
        self.session.ehlo_names = self._ehlo_names
        if not first:
            self._state.event("starttls", self._conn_id,
                              tls=_tls_version(self.transport))

    async def smtp_STARTTLS(self, arg):
        # aiosmtpd 1.4 would happily nest a second TLS layer; real MSAs refuse.
        if self._tls_protocol is not None or self.transport.get_extra_info("ssl_object"):
            await self.push("503 5.5.1 TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    def connection_lost(self, error):
        if self._conn_id is not None and not getattr(self, "_lost_logged", False):
            self._lost_logged = True
            self._state.event("disconnect", self._conn_id)
        super().connection_lost(error)


def _fmt_peer(peer):
    if not peer:
        return None
    host, port = peer[0], peer[1]
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


class ServerState:
    """Shared, thread-safe bookkeeping for one upstream instance."""

    def __init__(self, maildir, users):
        self.maildir = maildir
        self.users = dict(users)
        self._lock = threading.Lock()
        self._conn_ids = itertools.count(1)
        self._msg_ids = itertools.count(1)
        self.events = []
        self.sni_names = []
        self.connections = 0
        os.makedirs(maildir, exist_ok=True)
        self._events_path = os.path.join(maildir, "events.jsonl")

    def next_conn_id(self):
        with self._lock:
            self.connections += 1
            return next(self._conn_ids)

    def next_msg_id(self):
        with self._lock:
            return next(self._msg_ids)

    def event(self, event_name, conn, **kw):
        ev = {"event": event_name, "conn": conn, "time": time.time()}
        ev.update(kw)
        with self._lock:
            self.events.append(ev)
            try:
                with open(self._events_path, "a") as f:
                    f.write(json.dumps(ev) + "\n")
            except OSError:
                pass

    # aiosmtpd authenticator(server, session, envelope, mechanism, auth_data)
    def authenticator(self, server, session, envelope, mechanism, auth_data):
        ok = False
        user = None
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", "replace")
            pw = auth_data.password.decode("utf-8", "replace")
            ok = user in self.users and self.users[user] == pw
        self.event("auth", getattr(session, "conn_id", None), mechanism=mechanism,
                   user=user, success=ok)
        if ok:
            return AuthResult(success=True, handled=False, auth_data=user)
        return AuthResult(success=False, handled=False)


class Handler:
    def __init__(self, state, advertise_pipelining=True):
        self.state = state
        self.advertise_pipelining = advertise_pipelining

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        session.ehlo_names.append(hostname)
        self.state.event("ehlo", session.conn_id, name=hostname,
                         tls=_tls_version(server.transport))
        if self.advertise_pipelining:
            # insert before the final "250 HELP" line
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_HELO(self, server, session, envelope, hostname):
        session.host_name = hostname
        session.ehlo_names.append(hostname)
        self.state.event("helo", session.conn_id, name=hostname,
                         tls=_tls_version(server.transport))
        return "250 %s" % server.hostname

    async def handle_DATA(self, server, session, envelope):
        data = envelope.original_content
        if data is None:
            data = b""
        n = self.state.next_msg_id()
        base = "%06d-%d" % (n, int(time.time() * 1000))
        tls = _tls_version(server.transport)
        auth_user = session.auth_data if isinstance(session.auth_data, str) else None
        meta = {
            "id": n,
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "mail_options": list(envelope.mail_options or []),
            "peer": _fmt_peer(session.peer),
            "ehlo": session.host_name,
            "ehlo_names": list(session.ehlo_names),
            "tls": tls,
            "auth_user": auth_user,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "conn": session.conn_id,
        }
        d = self.state.maildir
        tmp = os.path.join(d, ".tmp-" + base)
        with open(tmp + ".eml", "wb") as f:
            f.write(data)
        with open(tmp + ".json", "w") as f:
            json.dump(meta, f, indent=1)
        # .eml first, then .json: a reader that sees the sidecar sees the body.
        os.rename(tmp + ".eml", os.path.join(d, base + ".eml"))
        os.rename(tmp + ".json", os.path.join(d, base + ".json"))
        self.state.event("message", session.conn_id, id=n, size=len(data))
        return "250 2.0.0 Ok: queued as %s" % base


def make_tls_context(cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class UpstreamServer:
    """A runnable upstream. start() in a background thread, or serve_forever()."""

    def __init__(self, host="127.0.0.1", port=0, cert=None, key=None, users=None,
                 maildir=None, require_tls=True, implicit=False,
                 hostname="upstream.test", pipelining=True, timeout=60):
        if maildir is None:
            raise ValueError("maildir is required")
        if (cert is None or key is None) and (implicit or require_tls):
            raise ValueError("cert and key are required for TLS")
        self.host = host
        self.port = port
        self.cert = cert
        self.key = key
        self.implicit = implicit
        self.require_tls = require_tls
        self.hostname = hostname
        self.timeout = timeout
        self.state = ServerState(maildir, users or {})
        self.handler = Handler(self.state, advertise_pipelining=pipelining)
        self.tls_context = make_tls_context(cert, key) if cert and key else None
        if self.tls_context is not None:
            def _sni(sslobj, name, ctx, _state=self.state):
                with _state._lock:
                    _state.sni_names.append(name)
                return None
            self.tls_context.sni_callback = _sni
        self._loop = None
        self._server = None
        self._thread = None
        self._ready = threading.Event()
        self._error = None

    # -- accessors for tests ------------------------------------------------
    @property
    def maildir(self):
        return self.state.maildir

    @property
    def events(self):
        with self.state._lock:
            return list(self.state.events)

    @property
    def connections(self):
        return self.state.connections

    @property
    def sni_names(self):
        with self.state._lock:
            return list(self.state.sni_names)

    def ehlo_names(self):
        return [e["name"] for e in self.events if e["event"] in ("ehlo", "helo")]

    def messages(self):
        """[(meta, body_bytes)] in arrival order."""
        out = []
        d = self.state.maildir
        for name in sorted(os.listdir(d)):
            if name.endswith(".json") and not name.startswith("."):
                with open(os.path.join(d, name)) as f:
                    meta = json.load(f)
                with open(os.path.join(d, name[:-5] + ".eml"), "rb") as f:
                    body = f.read()
                out.append((meta, body))
        return out

    def wait_messages(self, n, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = self.messages()
            if len(msgs) >= n:
                return msgs
            time.sleep(0.05)
        return self.messages()

    @property
    def address(self):
        return ("[%s]:%d" % (self.host, self.port) if ":" in self.host
                else "%s:%d" % (self.host, self.port))

    # -- server --------------------------------------------------------------
    def _factory(self):
        if self.implicit:
            kw = dict(tls_context=None, require_starttls=False,
                      auth_require_tls=False)
        else:
            kw = dict(tls_context=self.tls_context,
                      require_starttls=bool(self.require_tls and self.tls_context),
                      auth_require_tls=bool(self.require_tls))
        return _BigLineSMTP(
            self.handler, server_state=self.state,
            hostname=self.hostname, ident="smtpbridge-test-upstream",
            data_size_limit=DATA_SIZE_LIMIT, decode_data=False,
            auth_required=True, authenticator=self.state.authenticator,
            timeout=self.timeout, loop=self._loop, **kw)

    async def _start_server(self):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._server = await self._loop.create_server(
            self._factory, host=self.host, port=self.port, family=family,
            ssl=self.tls_context if self.implicit else None,
            reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    def _run(self):
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start_server())
        except BaseException as e:  # report bind errors to start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            try:
                self._server.close()
                self._loop.run_until_complete(self._server.wait_closed())
                pending = asyncio.all_tasks(self._loop)
                for t in pending:
                    t.cancel()
                if pending:
                    self._loop.run_until_complete(
                        asyncio.wait(pending, timeout=2))
            except Exception:
                pass
            self._loop.close()

    def start(self, timeout=10.0):
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_quiet_exception_handler)
        self._thread = threading.Thread(target=self._run, name="upstream",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("upstream did not start within %.1fs" % timeout)
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout=5.0):
        if self._loop is None or self._thread is None:
            return
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _quiet_exception_handler(loop, context):
    # Client aborts, failed handshakes and the like are normal in tests.
    exc = context.get("exception")
    if isinstance(exc, (ssl.SSLError, ConnectionError, OSError,
                        asyncio.CancelledError)):
        return
    if logging.getLogger("upstream").isEnabledFor(logging.DEBUG):
        loop.default_exception_handler(context)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT or [V6]:PORT")
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--users", default="", help="user:pass[,user2:pass2]")
    ap.add_argument("--maildir", required=True)
    ap.add_argument("--require-tls", choices=("yes", "no"), default="yes")
    ap.add_argument("--implicit", action="store_true",
                    help="TLS from the first byte (port 465 style)")
    ap.add_argument("--hostname", default="upstream.test")
    ap.add_argument("--no-pipelining", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.verbose:
        logging.getLogger("mail.log").setLevel(logging.CRITICAL)
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        host, port = parse_hostport(args.listen)
        users = parse_users(args.users)
    except ValueError as e:
        ap.error(str(e))

    srv = UpstreamServer(host=host, port=port, cert=args.cert, key=args.key,
                         users=users, maildir=args.maildir,
                         require_tls=(args.require_tls == "yes"),
                         implicit=args.implicit, hostname=args.hostname,
                         pipelining=not args.no_pipelining)
    try:
        srv.start()
    except Exception as e:
        print("upstream: cannot start: %s" % e, file=sys.stderr)
        return 1

    stop = threading.Event()

    def _sig(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, _sig)
    signal.signal(signal.SIGINT, _sig)
    print("LISTENING %s %d" % (host, srv.port), flush=True)
    print("READY", flush=True)
    while not stop.is_set():
        stop.wait(1.0)
    srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
