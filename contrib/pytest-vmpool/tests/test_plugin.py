"""The plugin on real QEMU VMs: the example suite (example/test_example.py) run as a user's,
in a pytest of its own, and checked from outside through `vmpool get vms` and `events`."""

import importlib.util
import os
import signal
import subprocess
import sys

import pytest

from conftest import HERE, eventually, run_example

EXAMPLE = "test_example"
FAILING = {f"{EXAMPLE}.test_deliberately_failing": "failure", f"{EXAMPLE}.test_error_after_lease": "error"}
XDIST = importlib.util.find_spec("xdist") is not None


def expected(outcomes, fork):
    """What every test of the example must have ended as."""
    want = {}
    for name in outcomes:
        if name.endswith(("test_interrupted", "test_waiting_for_a_vm")):
            want[name] = "skipped"
        elif name.endswith("test_fork") and not fork:
            want[name] = "deselected"
        else:
            want[name] = FAILING.get(name, "passed")
    return want


def recorded(directory):
    """VM id -> the test that received it, as the example recorded them."""
    return {name: open(os.path.join(directory, name)).read() for name in os.listdir(directory)}


def check_released(host, vms):
    """None of `vms` is leased or running any more, and each was released."""
    eventually(lambda: not host.leased(), seconds=60, what="no VM leased")
    ids = {vm["id"] for vm in host.vms()}
    assert not ids & set(vms), f"VMs still there after their tests: {sorted(ids & set(vms))}"
    released = {event["vm"] for event in host.events("released")}
    assert set(vms) <= released, f"no release event for {sorted(set(vms) - released)}"


def run_suite(host, tmp_path, *args):
    record = tmp_path / "record"
    record.mkdir()
    fork = host.has_command("fork")
    ran, outcomes = run_example(
        host, *args, env={"VMPOOL_EXAMPLE_RECORD": str(record)}, select=None if fork else "not test_fork"
    )
    assert outcomes, ran.stdout + ran.stderr
    want = expected(outcomes, fork)
    assert {name: kind for name, kind in outcomes.items()} == {
        name: kind for name, kind in want.items() if kind != "deselected"
    }, ran.stdout + ran.stderr
    assert ran.returncode == 1, ran.stdout + ran.stderr  # the two deliberate failures
    vms = recorded(record)
    # 4 parametrized + lease, exec, copy, failing, error (+ fork's source and 3 copies)
    assert len(vms) == 9 + (4 if fork else 0), vms
    check_released(host, vms)
    return ran, outcomes, vms


def test_example_suite(host, tmp_path):
    """Each test a fresh VM with distinct ids; exec, copies, the marker's ttl; the failing
    test and the one whose set-up errors have their VMs released like the rest."""
    ran, _, _ = run_suite(host, tmp_path)
    print(ran.stdout.splitlines()[-1])
    assert "this test fails on purpose" in ran.stdout


@pytest.mark.skipif(not XDIST, reason="pytest-xdist is not installed")
def test_example_suite_on_four_workers(host, tmp_path):
    """The same suite on 4 xdist workers: each leases its own VMs."""
    ran, _, _ = run_suite(host, tmp_path, "-n", "4")
    assert "4 workers" in ran.stdout or "created: 4/4 workers" in ran.stdout, ran.stdout


def test_fork_needs_the_fork_command(host):
    """Reports plainly whether the fork test ran: it needs `vmpool fork` in the binary."""
    if not host.has_command("fork"):
        pytest.skip(f"{host.bin} has no fork command: test_example.py::test_fork was not run")


def interruptible(host, record, test):
    """The example's `test` in a pytest of its own, started to be interrupted."""
    command = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", os.path.join(HERE, "example", "pytest.ini"),
        "--rootdir", os.path.join(HERE, "example"), "--vmpool-bin", host.bin, "--vmpool-state-dir", host.state,
        "-k", test, os.path.join(HERE, "example"),
    ]
    env = {**os.environ, "VMPOOL_EXAMPLE_RECORD": str(record), "VMPOOL_EXAMPLE_INTERRUPT": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_interrupted_session_releases(host, tmp_path):
    """Ctrl-C in the middle of a test ends the session and still releases its VM."""
    record = tmp_path / "record"
    record.mkdir()
    session = interruptible(host, record, "test_interrupted")
    try:
        vm = eventually(lambda: os.listdir(record), seconds=300, what="the test's VM")[0]
        assert any(leased["id"] == vm for leased in host.leased())
        session.send_signal(signal.SIGINT)
        out, _ = session.communicate(timeout=120)
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
    assert session.returncode == 2, out  # pytest's "interrupted"
    assert "KeyboardInterrupt" in out, out
    check_released(host, [vm])


def test_interrupted_while_leasing(host, tmp_path):
    """Ctrl-C while a lease waits for a VM ends the session at once and leaves no vmpool
    process waiting on behalf of a session that is gone."""
    session = interruptible(host, tmp_path, "test_waiting_for_a_vm")
    leasing = f"lease\0--state-dir\0{host.state}\0idle\0".encode()
    try:
        eventually(lambda: host.processes(leasing), seconds=120, what="vmpool lease waiting")
        session.send_signal(signal.SIGINT)
        out, _ = session.communicate(timeout=60)
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
    assert session.returncode == 2, out
    eventually(lambda: not host.processes(leasing), seconds=30, what="the waiting vmpool lease to end")
    assert not host.leased()


def test_no_pool_is_a_usage_error(host, tmp_path):
    """A test with no pool errors with a message saying how to name one, and leases nothing."""
    (tmp_path / "test_nopool.py").write_text("def test_it(vmpool_vm):\n    pass\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", str(tmp_path / "pytest.ini"),
         "--vmpool-bin", host.bin, "--vmpool-state-dir", host.state, str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert ran.returncode == 1, ran.stdout
    assert "no pool for vmpool_vm" in ran.stdout, ran.stdout
    assert not host.leased()


def test_bad_duration_is_refused(host, tmp_path):
    (tmp_path / "test_it.py").write_text("def test_it():\n    pass\n")
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--vmpool-ttl", "soon", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert ran.returncode == 4, ran.stdout + ran.stderr  # usage error
    assert "vmpool_ttl: expected a duration" in ran.stderr, ran.stderr


def test_api_mode(host, tmp_path):
    """The same plugin through the service's HTTP API (VMPOOL_API). Leases and releases run
    on every binary; exec, files and fork only where the service serves them."""
    paths = host.served_paths()
    guest = {"/v1/vms/{vm}/exec", "/v1/vms/{vm}/files"} <= paths
    fork = "/v1/vms/{vm}/forks" in paths
    record = tmp_path / "record"
    record.mkdir()
    select = None
    if not guest:
        select = "test_lease or test_error_after_lease"
    elif not fork:
        select = "not test_fork"
    ran, outcomes = run_example(
        host, env={"VMPOOL_API": host.api, "VMPOOL_EXAMPLE_RECORD": str(record)}, select=select
    )
    assert "vmpool: the vmpool API at " + host.api in ran.stdout, ran.stdout
    want = {name: kind for name, kind in expected(outcomes, fork).items() if kind != "deselected"}
    assert outcomes == want, ran.stdout + ran.stderr
    vms = recorded(record)
    assert vms and all(vm.startswith(host.pool + "-") for vm in vms), vms
    check_released(host, vms)
    if not guest:
        pytest.skip("the service serves no exec/files endpoints: only leases were run through the API")
