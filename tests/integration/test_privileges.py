"""Privileges: started as root the daemon binds and loads keys, then drops to
`user` (initgroups/setgid/setuid, verified); it refuses to serve as root
unless `run_as_root = yes`; unknown users/groups are configuration errors."""

import grp
import os
import pwd
import shutil
import socket

import pytest

import bridgelib as bl
from bridgelib import BIN, RawClient, client_ctx, describe, run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def ids(pid):
    st = bl.proc_status(pid)
    uids = [int(x) for x in st["Uid"].split()]
    gids = [int(x) for x in st["Gid"].split()]
    groups = [int(x) for x in st["Groups"].split()]
    return uids, gids, groups


def privileged_port():
    """A free loopback port below 1024 (only root can bind it)."""
    for port in range(990, 600, -7):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    pytest.skip("no free port below 1024")


def test_privileges_dropped_to_nobody(make_bridge, upstream, certs, tmp_path):
    """Bind a port < 1024 and load a root-only key, then run as nobody with
    no root group left anywhere (real, effective, saved, supplementary)."""
    key = tmp_path / "root-only.key"
    shutil.copy(os.path.join(certs, "proxy.key"), key)
    os.chown(key, 0, 0)
    os.chmod(key, 0o600)
    port = privileged_port()
    d = make_bridge(upstream.address, global_opts={"user": "nobody"},
                    listener_opts={"smtps": {"listen": "127.0.0.1:%d" % port,
                                             "key": str(key)}})
    nobody = pwd.getpwnam("nobody")
    uids, gids, groups = ids(d.proc.pid)
    assert uids == [nobody.pw_uid] * 4, uids
    assert gids == [nobody.pw_gid] * 4, gids
    assert 0 not in groups and 0 not in gids and 0 not in uids, groups
    line = d.wait_log(r"event=privileges_dropped")
    ev = bl.parse_log_line(line)
    assert (ev["user"], int(ev["uid"]), int(ev["gid"])) == \
        ("nobody", nobody.pw_uid, nobody.pw_gid), line
    # the privileged port serves, with the key loaded before the drop
    with RawClient("127.0.0.1", port, tls_ctx=client_ctx(certs)) as c:
        assert c.read_reply().code == 220
        assert c.cmd("EHLO priv.test").code == 250
        assert c.cmd("QUIT").code == 221
    st = os.stat(str(key))
    assert st.st_uid == 0 and st.st_mode & 0o077 == 0


def test_group_option(make_bridge, upstream, certs):
    group = "daemon" if _has_group("daemon") else "nogroup"
    d = make_bridge(upstream.address, global_opts={"user": "nobody", "group": group})
    gid = grp.getgrnam(group).gr_gid
    uids, gids, groups = ids(d.proc.pid)
    assert uids == [pwd.getpwnam("nobody").pw_uid] * 4, uids
    assert gids == [gid] * 4, gids
    assert 0 not in groups, groups
    assert "gid=%d" % gid in d.wait_log(r"event=privileges_dropped")


def _has_group(name):
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def test_refuses_root_without_user(make_bridge, upstream, certs):
    d = make_bridge(upstream.address, global_opts={"user": None}, start=False)
    cp = run([BIN, "-c", d.conf], timeout=20)
    assert cp.returncode == 1, describe(cp)
    err = cp.stderr.decode()
    assert "refusing to run as root" in err and "user" in err, describe(cp)
    assert "event=ready" not in err, describe(cp)


def test_run_as_root_yes_runs_with_warning(make_bridge, upstream, certs):
    d = make_bridge(upstream.address, global_opts={"user": None, "run_as_root": "yes"})
    uids, _, _ = ids(d.proc.pid)
    assert uids[1] == 0, uids
    warn = d.wait_log(r"event=config_warning.*run_as_root")
    assert "level=warning" in warn, warn
    assert d.events("privileges_dropped") == []


@pytest.mark.parametrize("key,value", [("user", "no-such-user-xyz"),
                                       ("group", "no-such-group-xyz")])
def test_unknown_user_or_group(make_bridge, upstream, certs, key, value):
    opts = {"user": "nobody", key: value}
    d = make_bridge(upstream.address, global_opts=opts, start=False)
    cp = run([BIN, "-t", "-c", d.conf], timeout=20)
    assert cp.returncode == 1, describe(cp)
    assert ("key '%s'" % key).encode() in cp.stderr and value.encode() in cp.stderr, \
        describe(cp)
    # starting for real fails the same way, before serving
    cp2 = run([BIN, "-c", d.conf], timeout=20)
    assert cp2.returncode == 1, describe(cp2)
    assert ("key '%s'" % key).encode() in cp2.stderr and value.encode() in cp2.stderr, \
        describe(cp2)
    assert b"event=ready" not in cp2.stderr
