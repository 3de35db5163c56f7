"""A real vmpool host for the plugin's tests: a throwaway state dir under /tmp with the default
busybox guest image, a small template pool applied, and `vmpool reconcile --every` serving it
(it refills the pool as tests lease VMs, and serves the HTTP API on a loopback port). At the
end the pool is deleted and no QEMU process of the state dir may be left.

VMPOOL_BIN names the vmpool binary (default: the repository's .build/debug/vmpool);
VMPOOL_TEST_KERNEL the guest kernel. With VMPOOL_REQUIRE_QEMU=1 a missing part fails the
tests instead of skipping them.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
VMPOOL = os.path.abspath(os.environ.get("VMPOOL_BIN", os.path.join(ROOT, ".build/debug/vmpool")))
KERNEL = os.environ.get("VMPOOL_TEST_KERNEL")
REQUIRED = os.environ.get("VMPOOL_REQUIRE_QEMU") == "1"
POOL = "examples"
IDLE = "idle"
MANIFEST = f"""\
apiVersion: vmpool/v1
kind: Pool
metadata:
  name: {POOL}
spec:
  size: 4
  vcpus: 1
  memory: 256Mi
  boot: template
---
# never has a ready VM: a lease of it waits
apiVersion: vmpool/v1
kind: Pool
metadata:
  name: {IDLE}
spec:
  size: 0
  vcpus: 1
  memory: 128Mi
"""

# The example module is run by the tests, as a user's suite, never collected with them.
collect_ignore = ["example"]


def eventually(condition, seconds=120, what="the condition", interval=0.2):
    """Polls `condition` until it returns a true value (returned), failing after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds}s waiting for {what}")
        time.sleep(interval)


def missing():
    """Why a real vmpool host cannot run here, or None."""
    if not os.path.exists("/usr/bin/qemu-system-x86_64"):
        return "qemu-system-x86_64 is not installed (scripts/test installs it)"
    if not KERNEL or not os.path.exists(KERNEL):
        return "no guest kernel: VMPOOL_TEST_KERNEL is not set or missing (scripts/test sets it)"
    if not os.access(VMPOOL, os.X_OK):
        return f"no vmpool binary at {VMPOOL} (set VMPOOL_BIN)"
    return None


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Host:
    """The state dir, its pool and its service."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="vmpt-", dir="/tmp")
        self.state = os.path.join(self.dir, "s")
        self.pool = POOL
        self.bin = VMPOOL
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}"
        self.service = None

    def vmpool(self, *args, check=True, timeout=600):
        result = subprocess.run(
            [self.bin, *args, "--state-dir", self.state], capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            pytest.fail(f"vmpool {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def up(self):
        self.vmpool("image", "build", "--kernel", KERNEL)
        manifest = os.path.join(self.dir, "pool.yaml")
        with open(manifest, "w") as file:
            file.write(MANIFEST)
        self.vmpool("apply", "-f", manifest, "--timeout", "300s")
        self.log = open(os.path.join(self.dir, "service.log"), "ab")
        self.service = subprocess.Popen(
            [self.bin, "reconcile", "--state-dir", self.state, "--every", "2s", "--listen", f"127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        eventually(self._serving, seconds=60, what="the service's API")

    def _serving(self):
        if self.service.poll() is not None:
            pytest.fail(f"vmpool reconcile exited {self.service.returncode}; see {self.log.name}")
        try:
            with urllib.request.urlopen(self.api + "/v1/vms", timeout=5) as answer:
                return answer.status == 200
        except OSError:
            return False

    def vms(self):
        return json.loads(self.vmpool("get", "vms", "-o", "json").stdout)

    def leased(self):
        """The VMs that are leased now."""
        return [vm for vm in self.vms() if vm.get("lease")]

    def events(self, kind):
        events = json.loads(self.vmpool("events", "--pool", self.pool, "-o", "json").stdout)
        return [event for event in events if event["kind"] == kind]

    def pool_status(self):
        """The pool as `get pools -o json` shows it."""
        return json.loads(self.vmpool("get", "pools", self.pool, "-o", "json").stdout)[0]

    def has_command(self, name):
        return subprocess.run([self.bin, name, "--help"], capture_output=True).returncode == 0

    def served_paths(self):
        with urllib.request.urlopen(self.api + "/openapi.json", timeout=10) as answer:
            return set(json.load(answer).get("paths", {}))

    def qemu_processes(self):
        """Live processes whose command line names this state dir's run dir."""
        return self.processes((self.state + "/run/").encode())

    def processes(self, marker):
        """Live processes whose command line holds `marker` (bytes)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as file:
                    if marker not in file.read():
                        continue
                with open(f"/proc/{entry}/stat") as file:
                    if ") Z" in file.read():
                        continue
            except OSError:
                continue
            pids.append(int(entry))
        return pids

    def down(self):
        """Stops the service, deletes the pool and checks that no QEMU process is left."""
        if self.service is not None and self.service.poll() is None:
            self.service.send_signal(signal.SIGTERM)
            try:
                self.service.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait()
        deleted = self.vmpool("delete", self.pool, IDLE, "--ignore-not-found", "--timeout", "300s", check=False)
        left = self.qemu_processes()
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)
        assert deleted.returncode == 0, deleted.stderr
        assert not left, f"QEMU processes of {self.state} left after delete: {left}"


@pytest.fixture(scope="session")
def host():
    reason = missing()
    if reason:
        if REQUIRED:
            pytest.fail(f"VMPOOL_REQUIRE_QEMU=1, but {reason}")
        pytest.skip(reason)
    made = Host()
    try:
        made.up()
        yield made
    finally:
        made.down()


def run_example(host, *args, env=None, select=None, timeout=900):
    """Runs the example suite (tests/example) as a user would, with pytest in a process of its
    own; returns the completed process and its outcomes by test id (from its JUnit XML)."""
    import xml.etree.ElementTree as ElementTree

    report = os.path.join(host.dir, f"junit-{time.monotonic_ns()}.xml")
    command = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", os.path.join(HERE, "example", "pytest.ini"),
        "--rootdir", os.path.join(HERE, "example"), f"--junitxml={report}", "-rA",
        "--vmpool-bin", host.bin, "--vmpool-state-dir", host.state, *args, os.path.join(HERE, "example"),
    ]
    if select:
        command += ["-k", select]
    ran = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    outcomes = {}
    if os.path.exists(report):
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            name = f"{case.get('classname')}.{case.get('name')}"
            kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
            outcomes[name] = kinds[0] if kinds else "passed"
    return ran, outcomes
