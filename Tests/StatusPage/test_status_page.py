"""The status page in a real browser (headless Chromium) against a service running real QEMU
VMs: signing in with the form, a lease made meanwhile appearing through the live update, no
request leaving the page's origin, and a screenshot kept as an artifact.

Run by scripts/test. VMPOOL_BIN picks the binary (default .build/debug/vmpool),
VMPOOL_ARTIFACTS where the screenshot goes (default .ci/artifacts).
"""
import json
import os
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from browser import Browser, chromium_binary, wait_for_service

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
VMPOOL = os.environ.get("VMPOOL_BIN") or os.path.join(ROOT, ".build", "debug", "vmpool")
ARTIFACTS = os.environ.get("VMPOOL_ARTIFACTS") or os.path.join(ROOT, ".ci", "artifacts")
KERNEL = os.environ.get("VMPOOL_TEST_KERNEL")
REQUIRED = os.environ.get("VMPOOL_REQUIRE_QEMU") == "1"


def missing():
    """Why this test cannot run here, or None."""
    if not os.path.exists("/usr/bin/qemu-system-x86_64"):
        return "qemu-system-x86_64 is not installed (scripts/test installs it)"
    if not KERNEL or not os.path.exists(KERNEL):
        return "no guest kernel: VMPOOL_TEST_KERNEL is not set or missing (scripts/test sets it)"
    if chromium_binary() is None:
        return "chromium is not installed (scripts/test installs it)"
    return None


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def vmpool(state, *args, timeout=300):
    result = subprocess.run([VMPOOL, *args, "--state-dir", state], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"vmpool {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


class Service:
    """`vmpool reconcile --every 2s --listen` with a token, on a state dir with one real QEMU
    VM ready."""

    def __init__(self, directory):
        self.state = os.path.join(directory, "state")
        vmpool(self.state, "image", "build", "--kernel", KERNEL)
        manifest = os.path.join(directory, "web.yaml")
        with open(manifest, "w") as out:
            out.write("apiVersion: vmpool/v1\nkind: Pool\nmetadata:\n  name: web\n"
                      "spec:\n  size: 1\n  vcpus: 1\n  memory: 128Mi\n")
        vmpool(self.state, "apply", "-f", manifest, "--timeout", "240s")
        self.token = "page-token-" + os.urandom(12).hex()
        token_file = os.path.join(directory, "token")
        with open(os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as out:
            out.write(self.token + "\n")
        self.origin = f"http://127.0.0.1:{free_port()}"
        self.process = subprocess.Popen(
            [VMPOOL, "reconcile", "--every", "2s", "--listen", self.origin.removeprefix("http://"),
             "--token-file", token_file, "--state-dir", self.state],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_service(self.origin, self.process)
        except (RuntimeError, AssertionError) as error:
            self.stop()
            raise RuntimeError(f"{error}: {self.process.stderr.read()}") from error

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        subprocess.run([VMPOOL, "delete", "web", "--state-dir", self.state], capture_output=True, timeout=300)


@pytest.fixture
def service():
    why = missing()
    if why:
        if REQUIRED:
            pytest.fail(f"VMPOOL_REQUIRE_QEMU=1, but {why}")
        pytest.skip(why)
    with tempfile.TemporaryDirectory(prefix="vmpool-page-") as directory:
        running = Service(directory)
        try:
            yield running
        finally:
            running.stop()
        left = subprocess.run(["pgrep", "-f", running.state], capture_output=True, text=True).stdout.split()
        assert not left, f"QEMU processes of the test's state dir outlived it: {left}"


def test_a_lease_shows_up_live_and_nothing_leaves_the_origin(service):
    browser = Browser()
    try:
        page = browser.open(service.origin + "/")
        page.wait_for("document.querySelector('form[action=\"/ui/login\"] input[name=token]') !== null", 30,
                      "the sign-in form")
        page.evaluate(f"document.querySelector('input[name=token]').value = {json.dumps(service.token)};"
                      " document.querySelector('form').submit(); true")
        page.wait_for("document.querySelector('main#status h2') !== null", 30, "the page after signing in")
        assert page.evaluate("document.querySelector('main .vms') !== null"), "the VM table is shown"
        page.wait_for("document.getElementById('live').className === 'live'", 30, "a first live update")
        # A mark in this document: a reload would lose it, a live update keeps it.
        page.evaluate("window.vmpoolMark = 'same document'; true")

        holder = "browser <u>job</u> \"7\""
        leased = vmpool(service.state, "lease", "web", "--holder", holder, "--ttl", "10m").strip()
        started = time.monotonic()
        page.wait_for(
            "Array.from(document.querySelectorAll('main .vms td')).some(td => td.textContent.startsWith("
            + json.dumps(holder) + "))", 60, f"the lease of {leased} on the page")
        print(f"lease {leased} shown {time.monotonic() - started:.1f}s after `vmpool lease` returned")
        assert page.evaluate("window.vmpoolMark") == "same document", "shown by the live update, not a reload"
        assert page.evaluate("document.querySelectorAll('main u').length") == 0, "the holder's markup stays text"
        assert leased in page.evaluate("document.querySelector('main .vms').textContent")

        os.makedirs(ARTIFACTS, exist_ok=True)
        shot = os.path.join(ARTIFACTS, "status-page.png")
        page.screenshot(shot)
        assert os.path.getsize(shot) > 10_000, "the screenshot has content"
        print(f"screenshot: {shot}")

        page.drain()
        urls = page.requested()
        strangers = [url for url in urls if not url.startswith(service.origin + "/")]
        assert not strangers, f"requests that left {service.origin}: {strangers}"
        paths = {url.removeprefix(service.origin).split("?")[0] for url in urls}
        assert {"/", "/ui/login", "/ui/status.css", "/ui/status.js", "/ui/live"} <= paths, paths
        problems = [p for p in page.problems() if "401" not in p]  # the form itself answers 401
        assert not problems, f"errors in the page: {problems}"
        print(f"{len(urls)} requests, all to {service.origin}; {len(paths)} paths")
        page.close()
        vmpool(service.state, "release", leased)
    finally:
        browser.close()
