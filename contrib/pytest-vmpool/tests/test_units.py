"""The parts that need no VM: holder text, durations, the tar streams of the files endpoint
(read as hostile), and the shape of the API client's requests against an in-process fake
(the real API is exercised by test_plugin.py::test_api_mode)."""

import base64
import io
import json
import os
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pytest_vmpool import VmpoolError
from pytest_vmpool.api import ApiBackend
from pytest_vmpool.tarstream import pack, unpack
from pytest_vmpool.text import duration, holder, seconds
from pytest_vmpool.vm import Leases


def test_holder_is_stripped_and_cut():
    assert holder("pytest:t.py::test[a\x1b[31m\nb\u202ec]") == "pytest:t.py::test[a[31mbc]"
    long = holder("pytest:" + "é" * 500)
    assert len(long) == 200 and long.startswith("pytest:é")
    assert holder("\x00\x01") == "pytest"


def test_durations():
    assert [duration(v, "x") for v in ("30s", "1m30s", "1.5h", "500ms", "0", 0, 2, 1.5)] == [
        "30s", "1m30s", "1.5h", "500ms", "0", "0", "2s", "1500ms"]
    assert seconds("1m30s") == 90 and seconds("500ms") == 0.5 and seconds("1.5h") == 5400
    for bad in ("soon", "", "-1s", "1d", "s", -1, True, None, float("nan")):
        with pytest.raises(VmpoolError, match="x:"):
            duration(bad, "x")


def archive(*members):
    """A tar stream of (TarInfo, bytes or None) members."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    out.seek(0)
    return out


def entry(name, kind=tarfile.REGTYPE, link="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    return info


def test_unpack_a_tree(tmp_path):
    stream = archive(
        (entry("d", tarfile.DIRTYPE, mode=0o755), None),
        (entry("d/a", mode=0o4755), b"alpha"),
        (entry("d/sub/b"), b"beta"),
        (entry("d/hard", tarfile.LNKTYPE, link="d/a"), None),
        (entry("d/sub/up", tarfile.SYMTYPE, link="../a"), None),
    )
    assert unpack(stream, tmp_path) == str(tmp_path / "d")
    assert (tmp_path / "d" / "a").read_bytes() == b"alpha"
    assert (tmp_path / "d" / "a").stat().st_mode & 0o7777 == 0o755  # setuid dropped
    assert (tmp_path / "d" / "sub" / "b").read_bytes() == b"beta"
    assert (tmp_path / "d" / "hard").stat().st_ino == (tmp_path / "d" / "a").stat().st_ino
    assert os.readlink(tmp_path / "d" / "sub" / "up") == "../a"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".vmpool-cp-")]


def test_unpack_renames_to_a_new_name(tmp_path):
    (tmp_path / "old.txt").write_text("old")
    unpack(archive((entry("f"), b"new")), tmp_path / "old.txt")
    assert (tmp_path / "old.txt").read_text() == "new"


@pytest.mark.parametrize(
    "members, message",
    [
        ([(entry("/etc/x"), b"x")], "absolute"),
        ([(entry("d", tarfile.DIRTYPE), None), (entry("d/../../x"), b"x")], "'..'"),
        ([(entry("d", tarfile.DIRTYPE), None), (entry("e/x"), b"x")], "outside its entry"),
        ([(entry("d", tarfile.DIRTYPE), None), (entry("d/l", tarfile.SYMTYPE, link="/etc"), None)], "outside the copy"),
        ([(entry("d", tarfile.DIRTYPE), None), (entry("d/l", tarfile.SYMTYPE, link="../d2"), None)], "outside the copy"),
        ([(entry("d", tarfile.DIRTYPE), None), (entry("d/l", tarfile.SYMTYPE, link="."), None),
          (entry("d/l/x"), b"x")], "through a symlink"),
        # a link whose text stays inside but that resolves through another link to outside
        ([(entry("d", tarfile.DIRTYPE), None), (entry("d/a/b", tarfile.DIRTYPE), None),
          (entry("d/a/b/c", tarfile.SYMTYPE, link="../.."), None),
          (entry("d/q", tarfile.SYMTYPE, link="a/b/c/../../.."), None)], "outside the copy"),
        ([(entry("d", tarfile.DIRTYPE), None), (entry("d/h", tarfile.LNKTYPE, link="etc/passwd"), None)], "no earlier file"),
        ([(entry("d", tarfile.DIRTYPE), None), (entry("d/dev", tarfile.CHRTYPE), None)], "device or fifo"),
        ([(entry("d", tarfile.DIRTYPE), None), (entry("d/p", tarfile.FIFOTYPE), None)], "device or fifo"),
        ([(entry("l", tarfile.SYMTYPE, link="x"), None)], "is a symlink"),
        ([(entry("f"), b"1"), (entry("f"), b"2")], "twice"),
    ],
)
def test_unpack_refuses(tmp_path, members, message):
    (tmp_path / "keep").write_text("kept")
    with pytest.raises(VmpoolError, match=message):
        unpack(archive(*members), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["keep"], "a refused copy leaves nothing behind"


def test_unpack_never_merges_into_a_directory(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(VmpoolError, match="existing directory"):
        unpack(archive((entry("d", tarfile.DIRTYPE), None), (entry("d/x"), b"x")), tmp_path)
    assert os.listdir(tmp_path / "d") == []


def test_unpack_damaged(tmp_path):
    with pytest.raises(VmpoolError, match="damaged|empty"):
        unpack(io.BytesIO(b"\x01" * 1024), tmp_path)


def test_pack_round_trip(tmp_path):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "f").write_text("f")
    os.symlink("sub/f", tmp_path / "src" / "link")
    spool = io.BytesIO()
    assert pack(str(tmp_path / "src"), spool) == "src"
    (tmp_path / "out").mkdir()
    unpack(spool, tmp_path / "out")
    assert (tmp_path / "out" / "src" / "sub" / "f").read_text() == "f"
    assert os.readlink(tmp_path / "out" / "src" / "link") == "sub/f"
    with pytest.raises(VmpoolError, match="no such file"):
        pack(str(tmp_path / "missing"), io.BytesIO())


class Fake(BaseHTTPRequestHandler):
    """Records each request and answers what the test put in `answers` for its path."""

    requests = []
    answers = {}

    def log_message(self, *args):
        pass

    def _serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        Fake.requests.append((self.command, self.path, dict(self.headers), body))
        status, kind, payload = Fake.answers.get((self.command, self.path.split("?")[0]), (404, "json", {"error": "no"}))
        data = json.dumps(payload).encode() if kind == "json" else payload
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if kind == "json" else "application/x-tar")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _serve


@pytest.fixture
def fake():
    Fake.requests, Fake.answers = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def lease_json(vm):
    return {"id": vm, "pool": "p", "address": None, "ports": {"22": 4022}, "holder": "h", "expiresAt": None}


def test_api_requests(fake, tmp_path):
    Fake.answers = {
        ("POST", "/v1/pools/p/leases"): (201, "json", lease_json("p-1")),
        ("POST", "/v1/vms/p-1/forks"): (201, "json", [lease_json("p-2"), lease_json("p-3")]),
        ("POST", "/v1/vms/p-1/exec"): (200, "json", {"exitStatus": 3, "stdout": base64.b64encode(b"o\x00").decode(),
                                                    "stderr": "", "truncated": False}),
        ("PUT", "/v1/vms/p-1/files"): (204, "raw", b""),
        ("GET", "/v1/vms/p-1/files"): (200, "raw", archive((entry("got"), b"data")).getvalue()),
        ("DELETE", "/v1/leases/p-1"): (204, "raw", b""),
        ("DELETE", "/v1/leases/p-2"): (204, "raw", b""),
        ("DELETE", "/v1/leases/p-3"): (204, "raw", b""),
    }
    leases = Leases(ApiBackend(fake, "secret-token"), ttl="1h", wait="2m")
    vm = leases.lease("p", "pytest:t")
    assert (vm.id, vm.ports) == ("p-1", {"22": 4022})
    ran = vm.exec("sh", "-c", "x", input=b"in", env={"K": "V"}, workdir="/w", timeout=30)
    assert (ran.status, ran.stdout, ran.stderr) == (3, b"o\x00", b"")
    (tmp_path / "f").write_text("up")
    vm.cp_in(tmp_path / "f", "/guest/f")
    vm.cp_out("/guest/got", tmp_path / "got")
    assert (tmp_path / "got").read_text() == "data"
    assert [fork.id for fork in vm.fork(count=2)] == ["p-2", "p-3"]
    vm.release()
    vm.release()  # a second release does nothing

    shapes = [(method, path) for method, path, _, _ in Fake.requests]
    assert shapes == [
        ("POST", "/v1/pools/p/leases"), ("POST", "/v1/vms/p-1/exec"), ("PUT", "/v1/vms/p-1/files?path=%2Fguest%2Ff"),
        ("GET", "/v1/vms/p-1/files?path=%2Fguest%2Fgot"), ("POST", "/v1/vms/p-1/forks"),
        ("DELETE", "/v1/leases/p-3"), ("DELETE", "/v1/leases/p-2"), ("DELETE", "/v1/leases/p-1"),
    ]
    assert all(headers.get("Authorization") == "Bearer secret-token" for _, _, headers, _ in Fake.requests)
    bodies = [json.loads(body) if body and method != "PUT" else body for method, _, _, body in Fake.requests]
    assert bodies[0] == {"holder": "pytest:t", "ttl": "1h", "wait": "2m"}
    assert bodies[1] == {"argv": ["sh", "-c", "x"], "env": {"K": "V"}, "workdir": "/w",
                         "stdin": base64.b64encode(b"in").decode(), "timeout": "30s"}
    assert bodies[4] == {"count": 2, "ttl": "1h", "holder": "pytest:t"}
    with tarfile.open(fileobj=io.BytesIO(bodies[2])) as sent:
        assert [(m.name, sent.extractfile(m).read()) for m in sent.getmembers()] == [("f", b"up")]
    assert Fake.requests[2][2]["Content-Type"] == "application/x-tar"


def test_api_errors_say_what_the_service_said(fake):
    Fake.answers = {("POST", "/v1/pools/p/leases"): (409, "json", {"error": "no VM of pool p is ready"})}
    leases = Leases(ApiBackend(fake), ttl="1h", wait="0")
    with pytest.raises(VmpoolError, match="HTTP 409: no VM of pool p is ready"):
        leases.lease("p", "h")
    with pytest.raises(VmpoolError, match="cannot reach"):
        Leases(ApiBackend("http://127.0.0.1:1"), ttl="1h", wait="0").lease("p", "h")
    with pytest.raises(VmpoolError, match="http:// or https://"):
        ApiBackend("ftp://x")


def test_api_fork_of_the_wrong_count_releases_what_it_got(fake):
    Fake.answers = {
        ("POST", "/v1/pools/p/leases"): (201, "json", lease_json("p-1")),
        ("POST", "/v1/vms/p-1/forks"): (201, "json", [lease_json("p-2")]),
        ("DELETE", "/v1/leases/p-2"): (204, "raw", b""),
    }
    vm = Leases(ApiBackend(fake), ttl="1h", wait="0").lease("p", "h")
    with pytest.raises(VmpoolError, match="1 leases for 3 asked"):
        vm.fork(count=3)
    assert ("DELETE", "/v1/leases/p-2") in [(m, p) for m, p, _, _ in Fake.requests]


FAKE_VMPOOL = """#!/bin/sh
# Records its arguments, one line per call, and answers as vmpool's command line does.
printf '%s\\n' "$*" >> "$0.calls"
case "$1" in
lease) echo '{"id": "p-1", "pool": "p", "address": null, "ports": {}, "holder": "h", "expiresAt": null}' ;;
fork)
    echo '[{"id": "p-2", "pool": "p", "address": null, "ports": {}, "holder": "h", "expiresAt": null}]'
    echo 'vmpool: a fork did not start: p-3: cannot start QEMU' >&2
    exit 1 ;;
exec) printf 'no such VM\\n' >&2; exit 125 ;;
esac
"""


def test_cli_commands_and_a_fork_that_partly_failed(tmp_path):
    """The command lines the plugin runs, and what it does with vmpool's failures: a fork
    that made one copy of two gives that copy back; exec's 125 is an error, not a status."""
    from pytest_vmpool.cli import CliBackend

    fake = tmp_path / "vmpool"
    fake.write_text(FAKE_VMPOOL)
    fake.chmod(0o755)
    vm = Leases(CliBackend(str(fake), "/tmp/s"), ttl="1h", wait="2m").lease("p", "pytest:t\n")
    with pytest.raises(VmpoolError, match="vmpool fork p-1 failed: vmpool: a fork did not start"):
        vm.fork(count=2)
    with pytest.raises(VmpoolError, match=r"vmpool exec p-1 failed \(exit 125\): no such VM"):
        vm.exec("true", env={"A": "1"}, timeout=5)
    vm.release()
    assert (tmp_path / "vmpool.calls").read_text().splitlines() == [
        "lease --state-dir /tmp/s p --ttl 1h --wait 2m --holder pytest:t -o json",
        "fork --state-dir /tmp/s p-1 --count 2 --ttl 1h --holder pytest:t -o json",
        "release --state-dir /tmp/s p-2",
        "exec --state-dir /tmp/s p-1 -e A=1 --timeout 5s -- true",
        "release --state-dir /tmp/s p-1",
    ]
