"""Protocol tests of the vmpool guest agent (Sources/VmpoolImage/Guest/agent).

The agent is compiled once with gcc and run on the host in its testing mode
(`vmpool-agent --fd NAME=N ...`), serving socketpairs instead of virtio-serial ports.
Whatever could change the host (clock, host name, /etc, sysfs, network) runs only inside a
user, mount, UTS and network namespace (`unshare`), with /etc bound to a temporary directory
and a fake /sys/devices/system; those tests are skipped, with the reason, where unprivileged
namespaces are unavailable.

    python3 -m pytest -q Tests/Agent
"""

import hashlib
import os
import random
import re
import select
import shutil
import struct
import subprocess
import threading
import time

import pytest

from agentproto import Agent, command_payload, compile_agent, frame

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# The agent's source directory: every .c file in it is compiled into the one executable.
SOURCES = os.environ.get("VMPOOL_AGENT_SOURCES") or os.path.join(ROOT, "Sources", "VmpoolImage", "Guest", "agent")
MiB = 1 << 20


@pytest.fixture(scope="session")
def agent_bin(tmp_path_factory):
    if not shutil.which(os.environ.get("CC", "gcc")):
        pytest.fail("gcc is required to build the agent")
    out = tmp_path_factory.mktemp("agent") / "vmpool-agent"
    return compile_agent(SOURCES, str(out))


@pytest.fixture
def agent(agent_bin):
    a = Agent(agent_bin)
    yield a
    if a.proc.poll() is None:
        rc, err = a.close()
        assert rc == 0, f"agent exited {rc}: {err}"
    else:
        a.kill()
        pytest.fail(f"the agent died during the test (status {a.proc.returncode})")


def children(pid):
    """Pids of the direct children of `pid`."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until(predicate, timeout=5.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# --------------------------------------------------------------------------------------------
# Build


def test_static_and_small(agent_bin):
    data = open(agent_bin, "rb").read()
    assert len(data) < 2 * MiB, f"agent is {len(data)} bytes"
    assert data[:4] == b"\x7fELF"
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    assert 3 not in types, "the agent has a PT_INTERP: it is not static"


def test_usage_errors(agent_bin):
    for args in (["--bogus"], ["--fd"], ["--fd", "ctl"], ["--fd", "ctl=99"], ["--fd", "=3"]):
        p = subprocess.run([agent_bin] + args, capture_output=True, timeout=5)
        assert p.returncode == 2, args


# --------------------------------------------------------------------------------------------
# Control requests


def host_online_cpus():
    text = open("/sys/devices/system/cpu/online").read().strip()
    n = 0
    for part in text.split(","):
        a, _, b = part.partition("-")
        n += int(b) - int(a) + 1 if b else 1
    return n


def host_online_mem_mib():
    base = "/sys/devices/system/memory"
    try:
        block = int(open(f"{base}/block_size_bytes").read(), 16)
    except FileNotFoundError:
        return None
    blocks = 0
    for e in os.listdir(base):
        if re.fullmatch(r"memory\d+", e):
            try:
                if open(f"{base}/{e}/state").read().startswith("online"):
                    blocks += 1
            except OSError:
                pass
    return blocks * block // MiB


INFO = re.compile(r"ok cpus=(\d+) memMiB=(\d+) time=(\d+)\.(\d{6})")


def test_ping_and_info(agent):
    c = agent["ctl"]
    assert c.request("ping") == "ok pong"
    m = INFO.fullmatch(c.request("info"))
    assert m, "info answer unparsable"
    assert int(m[1]) == host_online_cpus()
    expected = host_online_mem_mib()
    if expected is not None:
        assert int(m[2]) == expected
    assert abs(int(m[3]) - time.time()) < 5


def test_request_errors(agent):
    c = agent["ctl"]
    assert c.request("bogus") == "error unknown command"
    assert c.request("") == "error missing command"
    # Answers carry the request's id, whatever it is, and every port answers.
    c.send("Q", "abc ping")
    assert c.read_frame() == ("A", b"abc ok pong")
    assert agent["exec.1"].request("ping") == "ok pong"
    # Blank requests get no answer; the next one does.
    c.send("Q", "   ")
    c.send("Q", "")
    assert c.request("ping") == "ok pong"
    # A long id is echoed, truncated to a bounded answer.
    c.send("Q", "x" * 100000 + " ping")
    ftype, payload = c.read_frame()
    assert ftype == "A" and len(payload) <= 4096 and payload.startswith(b"xxxx")


def test_frames_split_byte_by_byte(agent):
    c = agent["ctl"]
    data = frame("Q", "7 ping") + frame("Q", "8 ping")
    for b in data:
        c.send_raw(bytes([b]))
    assert c.read_frame() == ("A", b"7 ok pong")
    assert c.read_frame() == ("A", b"8 ok pong")


def test_many_requests_in_one_write(agent):
    c = agent["ctl"]
    n = 3000
    c.send_raw(b"".join(frame("Q", f"{i} ping") for i in range(n)))
    for i in range(n):
        assert c.read_frame() == ("A", f"{i} ok pong".encode())


def test_input_without_command_is_ignored(agent):
    c = agent["exec.0"]
    c.send("I", b"stray stdin")
    c.send("I")
    c.send("K", "9")
    c.send("W", "24x80")
    c.send("Z", b"unknown frame type")
    assert c.request("ping") == "ok pong"


# --------------------------------------------------------------------------------------------
# Namespaced agent: clock, host name, machine id, network, sysfs


NS_SETUP = r"""
set -e
etc=$1; shift
# A fake /sys/devices/system: CPUs 0-1 online, 2 offline; 128 MiB blocks, 0-1 online, 2 offline.
mount -t tmpfs tmpfs /sys/devices/system
s=/sys/devices/system
mkdir -p $s/cpu/cpu0 $s/cpu/cpu1 $s/cpu/cpu2 $s/memory/memory0 $s/memory/memory1 $s/memory/memory2
echo 0-1 >$s/cpu/online
echo 1 >$s/cpu/cpu1/online
echo 0 >$s/cpu/cpu2/online
echo 8000000 >$s/memory/block_size_bytes
echo online >$s/memory/memory0/state
echo online >$s/memory/memory1/state
echo offline >$s/memory/memory2/state
mount --bind "$etc" /etc
hostname original
ip link add v0 type dummy 2>/dev/null || ip link add v0 type veth peer name v1 2>/dev/null || :
exec "$@"
"""


def namespaces_available():
    if not shutil.which("unshare"):
        return "unshare is not installed"
    p = subprocess.run(["unshare", "-Urm", "--uts", "--net", "true"], capture_output=True, text=True)
    if p.returncode != 0:
        return f"unprivileged user namespaces unavailable: {p.stderr.strip()}"
    return None


@pytest.fixture
def ns_agent(agent_bin, tmp_path):
    why = namespaces_available()
    if why:
        print(f"skipping: {why}")
        pytest.skip(why)
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("ld.so.cache", "passwd", "group"):
        if os.path.exists(f"/etc/{name}"):
            shutil.copy(f"/etc/{name}", etc / name)
    (etc / "hostname").write_text("original\n")
    (etc / "machine-id").write_text("")
    wrapper = ["unshare", "-Urm", "--uts", "--net", "sh", "-c", NS_SETUP, "sh", str(etc)]
    a = Agent(agent_bin, wrapper=wrapper)
    a.etc = etc
    yield a
    if a.proc.poll() is None:
        rc, err = a.close()
        assert rc == 0, f"agent exited {rc}: {err}"
    else:
        a.kill()
        pytest.fail(f"the agent died during the test (status {a.proc.returncode})")


def sh(ch, script):
    r = ch.run(["sh", "-c", script])
    assert r.exit == "exit 0", r
    return r.stdout.decode()


def test_online_and_info_from_sysfs(ns_agent):
    c = ns_agent["ctl"]
    m = INFO.fullmatch(c.request("info"))
    assert m and (int(m[1]), int(m[2])) == (2, 256)
    m = INFO.fullmatch(c.request("online"))
    assert m and int(m[2]) == 384, m and m[0]  # memory2 came online
    states = sh(c, "cat /sys/devices/system/cpu/cpu1/online /sys/devices/system/cpu/cpu2/online "
                   "/sys/devices/system/memory/memory2/state")
    assert states.split()[:2] == ["1", "1"]
    assert states.split()[2].startswith("online")


def test_info_falls_back_to_memtotal(ns_agent):
    c = ns_agent["ctl"]
    sh(c, "rm -r /sys/devices/system/memory")
    memtotal = int(re.search(r"MemTotal:\s+(\d+)", open("/proc/meminfo").read())[1]) // 1024
    m = INFO.fullmatch(c.request("info"))
    assert m and int(m[2]) == memtotal


def test_time_and_seed_validation(ns_agent):
    c = ns_agent["ctl"]
    for bad in ("time", "time abc", "time -5", "time 5.x", "time 5x", "time 1e9", "time 99999999999999999999"):
        assert c.request(bad) == "error invalid time", bad
    for bad in ("seed", "seed zz", "seed abc", "seed " + "ab" * 513):
        assert c.request(bad) == "error invalid hex", bad
    # The clock belongs to the initial user namespace: a valid time is refused, cleanly.
    assert c.request("time 1700000000.5").startswith("error cannot set the clock")
    # Seeding falls back to an uncredited write where RNDADDENTROPY is not allowed.
    assert c.request("seed " + "ab" * 32) == "ok"


HELLO_INVALID = [
    ("time=abc", "error invalid time"),
    ("seed=xyz", "error invalid hex"),
    ("seed=abc", "error invalid hex"),
    ("name=Upper", "error invalid name"),
    ("name=-dash", "error invalid name"),
    ("name=dash-", "error invalid name"),
    ("name=" + "a" * 64, "error invalid name"),
    ("name=a_b", "error invalid name"),
    ("name=", "error invalid name"),
    ("machine=1234", "error invalid machine id"),
    ("machine=" + "g" * 32, "error invalid machine id"),
    ("net=v0", "error invalid net"),
    ("net=v0,52:54:00:12:34:5,10.0.0.2/24,-", "error invalid net"),
    ("net=v0,53:54:00:12:34:56,10.0.0.2/24,-", "error invalid net"),  # multicast MAC
    ("net=v0,52:54:00:12:34:56,10.0.0.2/33,-", "error invalid net"),
    ("net=v0,52:54:00:12:34:56,10.0.0.2,-", "error invalid net"),
    ("net=v0,52:54:00:12:34:56,10.0.0.2/24,10.0.0", "error invalid net"),
    ("net=v0,52:54:00:12:34:56,10.0.0.2/24,-,extra", "error invalid net"),
    ("net=" + "i" * 16 + ",52:54:00:12:34:56,10.0.0.2/24,-", "error invalid net"),
    ("colour=blue", "error unknown key colour"),
]


@pytest.mark.parametrize("bad,answer", HELLO_INVALID)
def test_hello_validation_applies_nothing(ns_agent, bad, answer):
    c = ns_agent["ctl"]
    # Every valid setting comes before the invalid one: none may take effect.
    good = "seed=00ff name=changed machine=0123456789abcdef0123456789ABCDEF net=v0,52:54:00:12:34:56,10.9.9.2/24,-"
    assert c.request(f"hello {good} {bad}") == answer
    assert sh(c, "hostname").strip() == "original"
    assert (ns_agent.etc / "hostname").read_text() == "original\n"
    assert (ns_agent.etc / "machine-id").read_text() == ""
    assert "10.9.9.2" not in sh(c, "ip -4 addr")


def test_hello_identity(ns_agent):
    c = ns_agent["ctl"]
    etc = ns_agent.etc
    inode = (etc / "machine-id").stat().st_ino
    assert c.request("hello seed=0011aabb name=vm-7 machine=0123456789ABCDEF0123456789abcdef") == "ok pong"
    assert sh(c, "hostname").strip() == "vm-7"
    assert (etc / "hostname").read_text() == "vm-7\n"
    assert (etc / "machine-id").read_text() == "0123456789abcdef0123456789abcdef\n"
    assert (etc / "machine-id").stat().st_ino != inode, "machine-id not replaced by rename"
    assert not [n for n in os.listdir(etc) if "tmp" in n], os.listdir(etc)
    # Without /etc/hostname and /etc/machine-id, only the kernel's host name changes.
    os.unlink(etc / "hostname")
    os.unlink(etc / "machine-id")
    assert c.request("hello name=other machine=" + "f" * 32) == "ok pong"
    assert sh(c, "hostname").strip() == "other"
    assert not (etc / "hostname").exists() and not (etc / "machine-id").exists()


def test_hello_applies_in_order(ns_agent):
    c = ns_agent["ctl"]
    # time is applied first; here it fails (no CAP_SYS_TIME), so the name is not applied.
    answer = c.request(f"hello time={time.time():.6f} name=late")
    assert answer.startswith("error cannot set the clock"), answer
    assert sh(c, "hostname").strip() == "original"
    # The older positional form still parses.
    assert c.request("hello 1700000000.25 00ff").startswith("error cannot set the clock")
    assert c.request("hello abc 00ff") == "error invalid time"
    assert c.request("hello 1.0 zz") == "error invalid hex"


def test_hello_network(ns_agent):
    c = ns_agent["ctl"]
    if "v0" not in sh(c, "ip -o link"):
        pytest.skip("neither a dummy nor a veth interface can be created in a namespace here")
    sh(c, "ip addr add 192.168.77.7/24 dev v0 && ip addr add 192.168.78.7/24 dev v0")
    assert c.request("hello net=v0,52:54:00:ab:cd:ef,10.1.2.3/24,10.1.2.1") == "ok pong"
    link = sh(c, "ip -o link show v0")
    assert "52:54:00:ab:cd:ef" in link and ",UP" in link
    addrs = sh(c, "ip -o -4 addr show dev v0")
    assert "10.1.2.3/24" in addrs and "brd 10.1.2.255" in addrs
    assert "192.168.77.7" not in addrs and "192.168.78.7" not in addrs
    routes = sh(c, "ip -4 route show default")
    assert "default via 10.1.2.1 dev v0" in routes, routes
    # Again, with another gateway: the default route is replaced, the address replaced.
    assert c.request("hello net=v0,52:54:00:ab:cd:01,10.1.3.4/16,10.1.0.1") == "ok pong"
    assert "10.1.2.3" not in sh(c, "ip -o -4 addr show dev v0")
    assert sh(c, "ip -4 route show default").count("default") == 1
    assert "via 10.1.0.1" in sh(c, "ip -4 route show default")
    # No gateway.
    assert c.request("hello net=v0,52:54:00:ab:cd:02,10.2.0.9/30,-") == "ok pong"
    assert "10.2.0.9/30" in sh(c, "ip -o -4 addr show dev v0")
    # The address it already has is kept (a clone of a user-mode template); the others go.
    sh(c, "ip addr add 192.168.79.7/24 dev v0")
    assert c.request("hello net=v0,52:54:00:ab:cd:03,10.2.0.9/30,-") == "ok pong"
    addrs = sh(c, "ip -o -4 addr show dev v0")
    assert addrs.count("10.2.0.9/30") == 1 and "192.168.79.7" not in addrs, addrs
    assert "52:54:00:ab:cd:03" in sh(c, "ip -o link show v0")
    # The same address with another prefix is replaced.
    assert c.request("hello net=v0,52:54:00:ab:cd:03,10.2.0.9/29,-") == "ok pong"
    addrs = sh(c, "ip -o -4 addr show dev v0")
    assert "10.2.0.9/29" in addrs and "10.2.0.9/30" not in addrs, addrs
    # A missing interface is reported.
    assert c.request("hello net=nope0,52:54:00:ab:cd:02,10.2.0.9/30,-") == "error net: no interface nope0"


# --------------------------------------------------------------------------------------------
# Commands


def test_exit_codes(agent, tmp_path):
    c = agent["exec.0"]
    r = c.run(["true"])
    assert r.exit == "exit 0" and r.pid > 0
    assert [t for t, _ in r.frames] == ["S", "X"]
    assert c.run(["false"]).exit == "exit 1"
    assert c.run(["sh", "-c", "exit 3"]).exit == "exit 3"
    assert c.run(["sh", "-c", "kill -TERM $$"]).exit == "signal 15"
    r = c.run(["vmpool-no-such-command"])
    assert r.exit.startswith("error 127 ") and r.pid is None, r
    assert c.run(["/nonexistent/bin/x"]).code == 127
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    r = c.run([str(script)])
    assert r.exit.startswith("error 126 ") and "Permission denied" in r.exit, r
    assert c.run([str(tmp_path)]).code == 126  # a directory
    r = c.run(["pwd"], cwd="/nonexistent-dir")
    assert r.exit.startswith("error 126 ") and "No such file" in r.exit, r
    # The port serves the next command after each of these.
    assert c.run(["true"]).exit == "exit 0"


def test_bad_requests(agent):
    c = agent["exec.0"]
    cases = [
        b"",                               # nothing
        b"e" + b"A=1\0",                   # no argv
        b"atrue",                          # unterminated
        b"atrue\0q?\0",                    # unknown tag
        b"atrue\0eNOEQUALS\0",             # env without '='
        b"atrue\0t24by80\0",               # bad tty size
        b"atrue\0t0x80\0",
        b"atrue\0i2\0",                    # bad stdin flag
        b"atrue\0d\0",                     # empty directory
    ]
    for payload in cases:
        c.send("C", payload)
        ftype, text = c.read_frame()
        assert ftype == "X" and text.startswith(b"error 125 "), (payload, text)
    assert c.run(["true"]).exit == "exit 0"


def test_environment_and_directory(agent, tmp_path):
    c = agent["exec.0"]
    env = dict(line.split("=", 1) for line in c.run(["env"]).stdout.decode().splitlines())
    assert env == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
    r = c.run(["env"], env={"HOME": "/tmp", "FOO": "a=b c", "EMPTY": ""})
    env = dict(line.split("=", 1) for line in r.stdout.decode().splitlines())
    assert env["HOME"] == "/tmp" and env["FOO"] == "a=b c" and env["EMPTY"] == ""
    assert c.run(["pwd"]).stdout == b"/\n"
    assert c.run(["pwd"], cwd=str(tmp_path)).stdout == f"{tmp_path}\n".encode()
    # argv is searched in the command's own PATH.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "hello-vmpool").write_text("#!/bin/sh\necho from-path \"$@\"\n")
    (bindir / "hello-vmpool").chmod(0o755)
    assert c.run(["hello-vmpool"]).code == 127
    r = c.run(["hello-vmpool", "x y"], env={"PATH": f"{bindir}:/usr/bin:/bin"})
    assert r.stdout == b"from-path x y\n"


def test_own_session(agent):
    c = agent["exec.0"]
    r = c.run(["sh", "-c", "cat /proc/self/stat"])
    fields = r.stdout.decode().rsplit(") ", 1)[1].split()
    pgrp, session = int(fields[2]), int(fields[3])
    assert pgrp == session and pgrp != os.getpgrp()
    # The agent runs as SCHED_BATCH; its commands as SCHED_OTHER (policy 0, field 41).
    assert int(fields[38]) == 0
    with open(f"/proc/{agent.pid}/stat") as f:
        assert int(f.read().rsplit(") ", 1)[1].split()[38]) == 3  # SCHED_BATCH


def test_binary_safe_output(agent, tmp_path):
    c = agent["exec.0"]
    data = bytes(range(256)) * 1000
    f = tmp_path / "bytes"
    f.write_bytes(data)
    r = c.run(["cat", str(f)])
    assert r.exit == "exit 0" and bytes(r.stdout) == data
    r = c.run(["sh", "-c", f"cat {f} >&2"])
    assert bytes(r.stderr) == data and r.stdout == b""
    # Every frame fits the 64 KiB limit.
    assert max(n for t, n in r.frames) <= 64 << 10


def test_ten_mib_stream(agent, tmp_path):
    c = agent["exec.0"]
    f = tmp_path / "random"
    f.write_bytes(os.urandom(10 * MiB))
    h = hashlib.sha256()
    r = c.run(["cat", str(f)], sink=lambda t, p: h.update(p))
    assert r.exit == "exit 0"
    assert h.hexdigest() == hashlib.sha256(f.read_bytes()).hexdigest()


def test_stdout_and_stderr_separate(agent):
    c = agent["exec.0"]
    r = c.run(["sh", "-c", "echo a; echo b >&2; echo c; echo d >&2"])
    assert (r.stdout, r.stderr) == (b"a\nc\n", b"b\nd\n")
    r = c.run(["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' o & head -c 2000000 /dev/zero | tr '\\0' e >&2; wait"])
    assert r.stdout == b"o" * 3000000 and r.stderr == b"e" * 2000000
    # Every output byte comes before X.
    assert r.frames[-1][0] == "X"


def test_stdin(agent):
    c = agent["exec.0"]
    data = bytes(range(256)) * 4096 + os.urandom(3 * MiB)
    r = c.run(["cat"], stdin=data, chunk=100000)
    assert r.exit == "exit 0" and bytes(r.stdout) == data
    r = c.run(["wc", "-c"], stdin=b"x" * 12345)
    assert r.stdout.strip() == b"12345"
    # Without stdin requested, stdin is /dev/null: cat ends at once, I frames are dropped.
    c.send("C", command_payload(["cat"]))
    c.send("I", b"ignored")
    res = None
    while res is None:
        t, p = c.read_frame()
        assert t in "SX", (t, p)
        res = p if t == "X" else None
    assert res == b"exit 0"
    # A command that stops reading: the rest of its stdin is dropped.
    r = c.run(["head", "-c", "10"], stdin=b"y" * (4 * MiB))
    assert r.exit == "exit 0" and r.stdout == b"y" * 10
    # Empty stdin.
    assert c.run(["cat"], stdin=b"").stdout == b""


def test_stdin_then_control_on_same_port(agent):
    c = agent["exec.0"]
    c.send("C", command_payload(["cat"], stdin=True))
    assert c.read_frame()[0] == "S"
    c.send("I", b"abc")
    assert c.request("ping") == "ok pong"
    c.send("I", b"def")
    c.send("I")
    out = b""
    while True:
        t, p = c.read_frame()
        if t == "X":
            break
        out += p
    assert out == b"abcdef" and p == b"exit 0"


def test_kill(agent):
    c = agent["exec.0"]
    started = time.monotonic()
    r = c.run(["sleep", "100"], on_start=lambda res: c.send("K", "15"), timeout=10)
    assert r.exit == "signal 15" and time.monotonic() - started < 5
    r = c.run(["sh", "-c", "trap '' TERM; sleep 100 & wait"],
              on_start=lambda res: (time.sleep(0.2), c.send("K", "9")), timeout=10)
    assert r.exit == "signal 9"
    # The whole process group: background children die with it, so X is not held up.
    r = c.run(["sh", "-c", "sleep 100 & sleep 100"], on_start=lambda res: (time.sleep(0.2), c.send("K", "9")),
              timeout=10)
    assert r.exit == "signal 9"
    # Bad signal numbers are ignored.
    for bad in ("0", "65", "x", "-9", ""):
        c.send("C", command_payload(["sleep", "100"]))
        assert c.read_frame()[0] == "S"
        c.send("K", bad)
        assert c.request("ping") == "ok pong"
        c.send("K", "9")
        assert c.read_frame() == ("X", b"signal 9")


def test_busy(agent):
    c = agent["exec.0"]
    c.send("C", command_payload(["sleep", "100"]))
    assert c.read_frame()[0] == "S"
    c.send("C", command_payload(["true"]))
    assert c.read_frame() == ("X", b"error 125 busy")
    # The other port is free.
    assert agent["exec.1"].run(["true"]).exit == "exit 0"
    c.send("K", "9")
    assert c.read_frame() == ("X", b"signal 9")


def test_background_process_delays_exit(agent):
    c = agent["exec.0"]
    started = time.monotonic()
    r = c.run(["sh", "-c", "(sleep 1; echo late) & echo early"], timeout=10)
    assert r.exit == "exit 0" and r.stdout == b"early\nlate\n"
    assert time.monotonic() - started >= 0.9
    # A background process that lets go of the pipes does not.
    started = time.monotonic()
    r = c.run(["sh", "-c", "sleep 3 >/dev/null 2>&1 & echo early"], timeout=10)
    assert r.exit == "exit 0" and time.monotonic() - started < 2.5


def test_no_zombies(agent):
    c = agent["exec.0"]
    for _ in range(20):
        assert c.run(["true"]).exit == "exit 0"
    # A daemon that outlives its command is reaped by the agent (a subreaper) when it ends.
    assert c.run(["sh", "-c", "setsid sleep 0.3 >/dev/null 2>&1 </dev/null &"]).exit == "exit 0"
    assert wait_until(lambda: children(agent.pid) == [], 5), children(agent.pid)


def test_pty(agent):
    c = agent["exec.0"]
    r = c.run(["tty"], tty="24x80")
    assert r.exit == "exit 0" and re.fullmatch(rb"/dev/pts/\d+\r\n", bytes(r.stdout)), r
    assert r.stderr == b""
    r = c.run(["sh", "-c", "stty size; echo $TERM; echo err >&2"], tty="30x100")
    assert bytes(r.stdout).split() == [b"30", b"100", b"xterm", b"err"]
    r = c.run(["sh", "-c", "echo $TERM"], tty="30x100", env={"TERM": "vt100"})
    assert r.stdout.strip() == b"vt100"
    # Resize while running: the line that lets the command go on follows the resize, and the
    # agent handles frames in the order they come (sent up front, it could overtake it).
    r = c.run(["sh", "-c", "read line; stty size"], tty="24x80", stdin=b"", close_stdin=False,
              on_start=lambda res: (c.send("W", "40x132"), c.send("I", b"go\n")))
    assert bytes(r.stdout).split()[-2:] == [b"40", b"132"], r
    # An empty I sends EOF.
    r = c.run(["cat"], tty="24x80", stdin=b"hello\n")
    assert r.exit == "exit 0" and b"hello" in r.stdout
    # The session's controlling terminal: job control signals reach the command.
    r = c.run(["sh", "-c", "kill -INT $$; sleep 5"], tty="24x80")
    assert r.exit == "signal 2"


def test_concurrent_execs_and_control(agent):
    """Two commands stream at once on two ports while the control port answers."""
    c = agent["ctl"]
    results = {}

    def stream(name, nbytes):
        h = hashlib.sha256()
        ch = agent[name]
        r = ch.run(["head", "-c", str(nbytes), "/dev/urandom"], sink=lambda t, p: h.update(p), timeout=60)
        results[name] = (r.exit, sum(n for t, n in r.frames if t == "O"))

    threads = [threading.Thread(target=stream, args=(n, 64 * MiB)) for n in ("exec.0", "exec.1")]
    for t in threads:
        t.start()
    worst = 0.0
    pings = 0
    while any(t.is_alive() for t in threads):
        t0 = time.monotonic()
        assert c.request("ping", timeout=5) == "ok pong"
        worst = max(worst, time.monotonic() - t0)
        pings += 1
    for t in threads:
        t.join()
    assert results == {"exec.0": ("exit 0", 64 * MiB), "exec.1": ("exit 0", 64 * MiB)}
    assert pings > 0 and worst < 1.0, (pings, worst)


def test_control_answers_while_host_does_not_read(agent):
    """A port whose host stops reading stalls its command, not the agent."""
    e = agent["exec.0"]
    e.send("C", command_payload(["yes"]))
    time.sleep(0.5)  # the output ring and the pipe fill up
    c = agent["ctl"]
    for _ in range(20):
        t0 = time.monotonic()
        assert c.request("ping", timeout=5) == "ok pong"
        assert time.monotonic() - t0 < 0.5
    assert agent["exec.1"].run(["echo", "ok"]).stdout == b"ok\n"
    e.send("K", "9")
    while True:
        t, p = e.read_frame(timeout=10)
        if t == "X":
            break
    assert p == b"signal 9"


def test_host_disconnect_kills_command(agent):
    e = agent["exec.0"]
    e.send("C", command_payload(["sh", "-c", "sleep 100 & echo $!; exec sleep 100"]))
    t, p = e.read_frame()
    assert t == "S"
    pid = int(p)
    t, p = e.read_frame()
    assert t == "O"
    background = int(p)
    e.close()  # the session ends
    assert wait_until(lambda: not alive(pid) and not alive(background), 5)
    assert agent["ctl"].request("ping") == "ok pong"
    assert wait_until(lambda: children(agent.pid) == [], 5)
    del agent.channels["exec.0"]


# --------------------------------------------------------------------------------------------
# In-band sessions (H frames)


@pytest.fixture
def noticed(agent_bin):
    """An agent with one exec port whose host notices the test gives (`notice`), and a short
    --host-gone-ms."""
    a = Agent(agent_bin, names=("exec.0",), notices=True, host_gone_ms=GONE_MS)
    yield a
    if a.proc.poll() is None:
        rc, err = a.close()
        assert rc == 0, f"agent exited {rc}: {err}"
    else:
        a.kill()
        pytest.fail(f"the agent died during the test (status {a.proc.returncode})")


GONE_MS = 300


def keep_sending(ch, seconds, pid):
    """Sends P frames every 50 ms for `seconds`, as a waiting host does, checking that `pid`
    lives on and that nothing comes back; returns the frames that came."""
    got = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ch.send("P")
        assert alive(pid), "the command was killed while its host was still sending"
        r, _, _ = select.select([ch.sock], [], [], 0.05)
        if r:
            ch._fill(time.monotonic() + 1)
            while (f := ch.poll_frame()):
                got.append(f)
    return got


def test_session_start_is_echoed(agent):
    c = agent["exec.0"]
    token = c.open_session()
    assert c.skipped == b""
    assert c.run(["echo", "hi"]).stdout == b"hi\n"
    # A second session on the same connection, and P frames, which get no answer.
    c.send("P")
    assert c.open_session("second-session_token") == "second-session_token" != token
    assert c.run(["true"]).exit == "exit 0"
    # Tokens that are too short, too long or have other characters are ignored: the ping
    # sent after them is answered first.
    for bad in (b"", b"short", b"a" * 65, b"with space", b"tab\tinside", b"\xff" * 16):
        c.send("H", bad)
        c.send("Q", "7 ping")
        assert c.read_frame() == ("A", b"7 ok pong"), bad


def test_session_start_ends_the_previous_command(agent):
    c = agent["exec.0"]
    c.open_session()
    c.send("C", command_payload(["sh", "-c", "sleep 100 & exec yes"]))
    t, p = c.read_frame()
    assert t == "S"
    pid = int(p)
    assert c.read_frame()[0] == "O"
    # The host goes on without reading the rest: the next session starts on the port.
    c.open_session()
    assert wait_until(lambda: not alive(pid), 5), "the earlier session's command still runs"
    # Nothing of the earlier session comes after the echo, and its process group is gone.
    r = c.run(["echo", "after"])
    assert r.exit == "exit 0" and r.stdout == b"after\n" and [t for t, _ in r.frames] == ["S", "O", "X"], r
    assert wait_until(lambda: children(agent.pid) == [], 5), children(agent.pid)


def test_stale_disconnect_notice_does_not_end_the_next_session(noticed):
    """The disconnect notice of the port's previous host arrives after the next host's session
    started: its command runs on."""
    c = noticed["exec.0"]
    c.open_session()
    assert c.run(["true"]).exit == "exit 0"  # the first host's session ended in-band
    c.open_session()  # the next host, on the same port at once
    c.send("C", command_payload(["sh", "-c", "read line; echo got $line"], stdin=True))
    t, p = c.read_frame()
    assert t == "S"
    pid = int(p)
    noticed.notice("exec.0", "down")  # late: the first host's
    assert keep_sending(c, 4 * GONE_MS / 1000, pid) == []
    noticed.notice("exec.0", "up")  # the second host's connect
    c.send("I", b"hello\n")
    frames = []
    while not frames or frames[-1][0] != "X":
        frames.append(c.read_frame(timeout=10))
    assert frames == [("O", b"got hello\n"), ("X", b"exit 0")]
    # Both notices handled together (the agent saw neither): nothing changes either.
    c.open_session()
    c.send("C", command_payload(["sh", "-c", "read line; echo got $line"], stdin=True))
    t, p = c.read_frame()
    pid = int(p)
    noticed.notice("exec.0", "down")
    noticed.notice("exec.0", "up")
    assert keep_sending(c, 0.1, pid) == []
    # Silent for longer than --host-gone-ms: the host shows as connected, so the command lives.
    deadline = time.monotonic() + 3 * GONE_MS / 1000
    while time.monotonic() < deadline:
        assert alive(pid)
        select.select([c.sock], [], [], 0.05)
    c.send("I", b"again\n")
    assert c.read_frame(timeout=10) == ("O", b"got again\n")
    assert c.read_frame(timeout=10) == ("X", b"exit 0")


def test_vanished_host_has_its_command_killed(noticed):
    c = noticed["exec.0"]
    c.open_session()
    c.send("C", command_payload(["sh", "-c", "sleep 100 & echo started; exec sleep 100"]))
    t, p = c.read_frame()
    assert t == "S"
    pid = int(p)
    assert c.read_frame() == ("O", b"started\n")
    gone = time.monotonic()
    noticed.notice("exec.0", "down")  # and the host sends nothing more
    assert wait_until(lambda: not alive(pid), 10), "the command of a vanished host still runs"
    assert time.monotonic() - gone >= GONE_MS / 1000 * 0.9
    assert wait_until(lambda: children(noticed.pid) == [], 5), children(noticed.pid)
    # The next host finds the port ready, with none of the old session's frames after its echo.
    noticed.notice("exec.0", "up")
    c.open_session()
    r = c.run(["echo", "next"])
    assert r.exit == "exit 0" and r.stdout == b"next\n" and [t for t, _ in r.frames] == ["S", "O", "X"], r


def test_a_frame_cut_short_is_skipped_up_to_the_next_session(noticed):
    c = noticed["exec.0"]
    c.open_session()
    c.send("C", command_payload(["cat"], stdin=True))
    t, p = c.read_frame()
    assert t == "S"
    pid = int(p)
    c.send_raw(frame("I", b"x" * 1000)[:300])  # the host dies in the middle of a frame
    noticed.notice("exec.0", "down")
    assert wait_until(lambda: not alive(pid), 10)
    noticed.notice("exec.0", "up")
    # What the next host's H follows: the rest of the cut frame, and things that look like
    # the start of an H but are not one.
    junk = (b"y" * 500 + b"H\0\0\0\x05short" + b"H\0\0\0\x10" + b"!" * 16 + b"H\0\0\0\x20" + b"ok" * 3 +
            frame("C", command_payload(["touch", "/nonexistent/must-not-run"])) + frame("Q", "9 ping"))
    c.send_raw(junk)
    c.open_session()
    # Before the echo: only what cat wrote back before its host vanished.
    skipped = c.skipped
    while skipped:
        ftype, length = struct.unpack(">BI", skipped[:5])
        assert chr(ftype) == "O" and set(skipped[5:5 + length]) == {ord("x")}, skipped[:100]
        skipped = skipped[5 + length:]
    assert c.run(["echo", "in step"]).stdout == b"in step\n"


def test_oversized_frame_in_a_session_skips_to_the_next_session(agent):
    c = agent["exec.0"]
    c.open_session()
    c.send_raw(b"I" + struct.pack(">I", MiB + 1) + b"z" * 5000 + frame("Q", "6 ping"))
    assert c.read_frame() == ("A", b"0 error frame too large")
    token = os.urandom(16).hex()
    c.send("H", token)
    assert c.read_frame() == ("H", token.encode()), "the ping in the skipped input was answered"
    assert c.run(["echo", "ok"]).stdout == b"ok\n"


# --------------------------------------------------------------------------------------------
# Hostile input


def test_oversized_frame(agent):
    c = agent["exec.0"]
    # Exactly 1 MiB is accepted.
    payload = b"5 ping" + b" " * (MiB - 6)
    c.send("Q", payload)
    assert c.read_frame() == ("A", b"5 ok pong")
    # One more byte is not; the session then ignores its input.
    c.send_raw(frame("Q", b"").replace(b"\0\0\0\0", struct.pack(">I", MiB + 1)))
    assert c.read_frame() == ("A", b"0 error frame too large")
    c.send_raw(b"z" * 100000 + frame("Q", "6 ping"))
    with pytest.raises(TimeoutError):
        c.read_frame(timeout=0.5)
    # Other ports are unaffected; a huge length on one of them too.
    x = agent["exec.1"]
    x.send_raw(b"C\xff\xff\xff\xff")
    assert x.read_frame() == ("A", b"0 error frame too large")
    assert agent["ctl"].request("ping") == "ok pong"


def test_fuzz(agent_bin):
    """Random frames, truncated frames and huge lengths never crash the agent."""
    rng = random.Random(1234)
    names = ["ctl"] + [f"f{i}" for i in range(24)]
    a = Agent(agent_bin, names=names)
    try:
        for name in names[1:]:
            ch = a[name]
            blob = bytearray()
            for _ in range(rng.randint(1, 60)):
                kind = rng.random()
                ftype = rng.choice(b"QCIKWAXSZ\0\xff")
                if kind < 0.6:
                    body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
                    if ftype == ord("C"):
                        body = b"atrue\0" + body  # argv[0] stays harmless
                    elif ftype == ord("Q"):
                        body = rng.choice([b"1 ", b"2 hello ", b"3 seed ", b"4 time "]) + body
                        body = body.replace(b"name=", b"n").replace(b"net=", b"n").replace(b"machine=", b"m")
                        body = body.replace(b"time", b"tim")  # no clock setting on the host
                        if b"hello" in body or b"seed" in body or b"online" in body:
                            body = b"1 ping"
                    blob += frame(ftype, body)
                elif kind < 0.8:
                    blob += bytes([ftype]) + struct.pack(">I", rng.choice([0, 1, 65536, MiB, MiB + 1, 2**31, 2**32 - 1]))
                else:
                    blob += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 50)))
            if rng.random() < 0.5:
                blob = blob[:rng.randint(0, len(blob))]  # truncated
            try:
                ch.send_raw(bytes(blob), timeout=5)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass
            # Drain a little, then end the session.
            try:
                while True:
                    ch.read_frame(timeout=0.05)
            except (TimeoutError, EOFError, Exception):
                pass
            ch.close()
            assert a.proc.poll() is None, "the agent died"
            assert a["ctl"].request("ping", timeout=5) == "ok pong"
        for n in names[1:]:
            del a.channels[n]
        rc, err = a.close()
        assert rc == 0, err
    finally:
        a.kill()


def test_bounded_memory_with_slow_reader(agent):
    """100 MiB of output to a host that reads slowly: the agent's memory stays small."""
    c = agent["exec.0"]
    total = 100 * MiB
    c.send("C", command_payload(["head", "-c", str(total), "/dev/zero"]))
    got = 0
    rss_slow = 0
    started = time.monotonic()
    sock = c.sock
    while True:
        # The first 2 seconds: 64 KiB every 10 ms (~6 MiB/s); then as fast as possible.
        slow = time.monotonic() - started < 2
        f = c.poll_frame()
        if f:
            t, p = f
            if t == "O":
                got += len(p)
            elif t == "X":
                assert p == b"exit 0"
                break
            continue
        if slow:
            time.sleep(0.01)
            rss_slow = max(rss_slow, int(agent.status()["VmRSS"].split()[0]))
        select.select([sock], [], [], 10)
        data = sock.recv(64 << 10 if slow else 1 << 20)
        assert data, "agent closed the port"
        c.buf.extend(data)
    assert got == total
    hwm = int(agent.status()["VmHWM"].split()[0])
    assert hwm < 8 * 1024, f"agent peak RSS {hwm} kB"
    assert rss_slow < 8 * 1024


def test_commands_start_with_default_signal_dispositions(agent_bin):
    # Started with SIGINT and SIGQUIT ignored (as a shell's background job is), the agent
    # still gives its commands every signal at its default: kill -INT ends the command.
    a = Agent(agent_bin, wrapper=("sh", "-c", "trap '' INT QUIT; exec \"$0\" \"$@\""))
    try:
        for tty in (None, "24x80"):
            r = a["exec.0"].run(["sh", "-c", "kill -INT $$; sleep 5"], tty=tty)
            assert r.exit == "signal 2", (tty, r)
            r = a["exec.0"].run(["sh", "-c", "kill -QUIT $$; sleep 5"], tty=tty)
            assert r.exit.startswith("signal 3"), (tty, r)
    finally:
        rc, err = a.close()
        assert rc == 0, f"agent exited {rc}: {err}"
