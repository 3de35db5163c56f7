"""Host side of the vmpool agent protocol, for the tests and scripts/agent-smoke.

Frames in both directions: 1 byte type, 4 bytes big-endian payload length, payload.
A `Channel` wraps one connected stream socket: a socketpair end in the tests (the agent's
--fd testing mode), or a QEMU virtio-serial chardev socket in the smoke test.
"""

import os
import select
import socket
import struct
import subprocess
import time

HEADER = struct.Struct(">BI")
MAX_FROM_GUEST = 64 << 10


class ProtocolError(Exception):
    pass


def frame(ftype, payload=b""):
    if isinstance(ftype, str):
        ftype = ord(ftype)
    if isinstance(payload, str):
        payload = payload.encode()
    return HEADER.pack(ftype, len(payload)) + payload


def command_payload(argv, env=None, cwd=None, tty=None, stdin=False):
    """The payload of a C frame."""
    out = bytearray()

    def entry(tag, value):
        if isinstance(value, str):
            value = value.encode()
        out.extend(tag.encode() + value + b"\0")

    for a in argv:
        entry("a", a)
    for k, v in (env or {}).items():
        entry("e", f"{k}={v}")
    if cwd is not None:
        entry("d", cwd)
    if tty is not None:
        entry("t", tty)
    if stdin:
        entry("i", "1")
    return bytes(out)


class Result:
    def __init__(self):
        self.pid = None
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.exit = None  # "exit N", "signal N" or "error CODE MESSAGE"
        self.frames = []  # (type, length) of every frame, in order

    @property
    def code(self):
        """The exit code as a shell would give it: N, 128+N for a signal, CODE for an error."""
        if self.exit is None:
            return None
        word, rest = self.exit.split(" ", 1)
        if word == "exit":
            return int(rest)
        if word == "signal":
            return 128 + int(rest)
        return int(rest.split(" ", 1)[0])

    def __repr__(self):
        return f"Result(pid={self.pid}, exit={self.exit!r}, stdout={bytes(self.stdout[:200])!r}, stderr={bytes(self.stderr[:200])!r})"


class Channel:
    def __init__(self, sock):
        self.sock = sock
        self.sock.setblocking(False)
        self.buf = bytearray()
        self.next_id = 1

    @classmethod
    def connect_unix(cls, path, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return cls(s)
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self):
        self.sock.close()

    def fileno(self):
        return self.sock.fileno()

    def send(self, ftype, payload=b"", timeout=30.0):
        self.send_raw(frame(ftype, payload), timeout)

    def send_raw(self, data, timeout=30.0):
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            try:
                n = self.sock.send(view)
                view = view[n:]
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("send timed out")
                select.select([], [self.sock], [], left)

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no frame from the agent in time")
        r, _, _ = select.select([self.sock], [], [], left)
        if not r:
            raise TimeoutError("no frame from the agent in time")
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        if not data:
            raise EOFError("the agent closed the connection")
        self.buf.extend(data)

    def poll_frame(self):
        """A complete buffered frame, or None."""
        if len(self.buf) < HEADER.size:
            return None
        ftype, length = HEADER.unpack_from(self.buf)
        if length > MAX_FROM_GUEST:
            raise ProtocolError(f"frame of {length} bytes from the agent (type {chr(ftype)!r})")
        if len(self.buf) < HEADER.size + length:
            return None
        payload = bytes(self.buf[HEADER.size:HEADER.size + length])
        del self.buf[:HEADER.size + length]
        return chr(ftype), payload

    def read_frame(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            f = self.poll_frame()
            if f:
                return f
            self._fill(deadline)

    def open_session(self, token=None, timeout=30.0):
        """Starts an in-band session: sends H with a fresh token and skips everything the agent
        sends before its echo (an older session's output). Returns the token."""
        token = token or os.urandom(16).hex()
        self.send("H", token)
        echo = frame("H", token)
        deadline = time.monotonic() + timeout
        while True:
            at = self.buf.find(echo)
            if at >= 0:
                skipped = bytes(self.buf[:at])
                del self.buf[:at + len(echo)]
                self.skipped = skipped
                return token
            self._fill(deadline)

    def request(self, command, timeout=30.0):
        """Sends `ID COMMAND` as a Q frame; returns the answer after the id ("ok pong")."""
        rid = str(self.next_id)
        self.next_id += 1
        self.send("Q", f"{rid} {command}")
        deadline = time.monotonic() + timeout
        while True:
            ftype, payload = self.read_frame(max(0.001, deadline - time.monotonic()))
            if ftype != "A":
                continue
            text = payload.decode(errors="replace")
            got_id, _, rest = text.partition(" ")
            if got_id == rid:
                return rest

    def run(self, argv, env=None, cwd=None, tty=None, stdin=None, timeout=60.0, sink=None, on_start=None,
            close_stdin=True, chunk=256 << 10):
        """Runs a command and collects its output.

        stdin: bytes to forward (then an empty I frame unless close_stdin is false), or None.
        sink(type, payload): called for every O/E payload instead of collecting it.
        on_start(result): called once S arrives.
        """
        res = Result()
        self.send("C", command_payload(argv, env, cwd, tty, stdin is not None))
        pending = bytearray()
        if stdin is not None:
            data = memoryview(stdin)
            for i in range(0, len(data), chunk):
                pending += frame("I", bytes(data[i:i + chunk]))
            if close_stdin:
                pending += frame("I")
        deadline = time.monotonic() + timeout
        while True:
            f = self.poll_frame()
            if f:
                ftype, payload = f
                res.frames.append((ftype, len(payload)))
                if ftype == "S":
                    res.pid = int(payload)
                    if on_start:
                        on_start(res)
                elif ftype in "OE":
                    if sink:
                        sink(ftype, payload)
                    else:
                        (res.stdout if ftype == "O" else res.stderr).extend(payload)
                elif ftype == "X":
                    res.exit = payload.decode(errors="replace")
                    # Stdin the command did not read still goes out: a frame cut in the
                    # middle would swallow the next request (the agent drops the rest).
                    if pending:
                        self.send_raw(bytes(pending))
                    return res
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"command {argv!r} did not finish: {res!r}")
            r, w, _ = select.select([self.sock], [self.sock] if pending else [], [], left)
            if w:
                try:
                    n = self.sock.send(pending[:1 << 20])
                    del pending[:n]
                except BlockingIOError:
                    pass
            if r:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise EOFError(f"the agent closed the connection during {argv!r}: {res!r}")
                self.buf.extend(data)


class Agent:
    """A vmpool-agent process in testing mode, serving socketpairs."""

    def __init__(self, binary, names=("ctl", "exec.0", "exec.1"), wrapper=(), env=None, notices=False,
                 host_gone_ms=None):
        self.channels = {}
        child_fds = []
        args = []
        self.notices = None
        if notices:
            # Lines `NAME down|up` stand for the virtio driver's host notices.
            self.notices, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            child_fds.append(guest)
            args += ["--notices", str(guest.fileno())]
        if host_gone_ms is not None:
            args += ["--host-gone-ms", str(host_gone_ms)]
        for name in names:
            host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.channels[name] = Channel(host)
            child_fds.append(guest)
            args += ["--fd", f"{name}={guest.fileno()}"]
        self.proc = subprocess.Popen(list(wrapper) + [binary] + args, pass_fds=[g.fileno() for g in child_fds],
                                     stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        for g in child_fds:
            g.close()

    def __getitem__(self, name):
        return self.channels[name]

    def notice(self, name, what):
        """Tells the agent that port NAME's host is now `down` or `up`, as the driver would."""
        self.notices.sendall(f"{name} {what}\n".encode())

    @property
    def pid(self):
        return self.proc.pid

    def status(self):
        """/proc/PID/status as a dict."""
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
        return out

    def close(self, timeout=10):
        """Closes every channel; the agent must then exit 0 by itself."""
        for ch in self.channels.values():
            ch.close()
        if self.notices:
            self.notices.close()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the agent did not exit after its channels closed")
        err = self.proc.stderr.read().decode(errors="replace")
        self.proc.stderr.close()
        return rc, err

    def kill(self):
        if self.notices:
            self.notices.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


def compile_agent(directory, output, cc=None):
    """Compiles every .c file in `directory` (the agent's sources) into the static `output`."""
    cc = cc or os.environ.get("CC", "gcc")
    sources = sorted(os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(".c"))
    if not sources:
        raise RuntimeError(f"no .c files in {directory}")
    cmd = [cc, "-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror", "-o", output] + sources
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return output
