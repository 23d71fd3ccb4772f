"""Loopback ports for tests: shared by the integration and e2e suites."""

import socket

# Ports this process has handed out. Binding to port 0 twice in a row can
# return the same port (the first socket is closed, so the kernel may pick it
# again): CI once got one port for both listeners of a daemon, which then
# refused its configuration ("is also used by"). A port is handed out once
# per test process; 64,000 calls would be needed to exhaust the range.
_ports_given = set()


def free_port(host="127.0.0.1"):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(1000):
        s = socket.socket(fam, socket.SOCK_STREAM)
        try:
            s.bind((host, 0))
            port = s.getsockname()[1]
        finally:
            s.close()
        if port not in _ports_given:
            _ports_given.add(port)
            return port
    raise RuntimeError("free_port: no port left that this process has not handed out")
