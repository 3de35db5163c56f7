"""A user's test suite on vmpool VMs, run by ../test_plugin.py in a pytest of its own.

Each test gets a fresh VM (`vmpool_vm`); pytest.ini names the pool. Every VM a test received
is recorded in VMPOOL_EXAMPLE_RECORD (a directory, one file per VM id holding the test's id),
so that the run can be checked from outside: distinct VMs, none left leased.
test_deliberately_failing and test_error_after_lease fail on purpose; test_interrupted runs
and test_waiting_for_a_vm only when asked (VMPOOL_EXAMPLE_INTERRUPT), to be interrupted.
"""

import datetime
import os
import threading

import pytest

from pytest_vmpool import CommandFailed

RECORD = os.environ.get("VMPOOL_EXAMPLE_RECORD")


@pytest.fixture
def vm(vmpool_vm, request):
    if RECORD:
        with open(os.path.join(RECORD, vmpool_vm.id), "w") as file:
            file.write(request.node.nodeid)
    return vmpool_vm


@pytest.mark.parametrize("n", range(4))
def test_fresh_vm(vm, n):
    """Each test's VM is its own: its hostname is its id, and nothing an earlier test wrote
    is there."""
    assert vm.exec("cat", "/proc/sys/kernel/hostname", check=True).text.strip() == vm.id
    assert vm.exec("ls", "/root/written-by-a-test").status != 0
    vm.exec("sh", "-c", f"echo {n} > /root/written-by-a-test", check=True)


@pytest.mark.vmpool(pool="examples", ttl="10m")
def test_lease(vm):
    """The lease as vmpool gave it; the marker's ttl bounds it."""
    assert vm.pool == "examples"
    assert vm.holder == "pytest:test_example.py::test_lease"
    expires = datetime.datetime.fromisoformat(vm.expires_at.replace("Z", "+00:00"))
    left = expires - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(minutes=5) < left <= datetime.timedelta(minutes=10)


def test_exec(vm):
    ran = vm.exec("sh", "-c", "printf out; printf err >&2; exit 3")
    assert (ran.status, ran.stdout, ran.stderr, ran.text) == (3, b"out", b"err", "out")
    # stdin and output are bytes, unchanged
    assert vm.exec("cat", input=bytes(range(256))).stdout == bytes(range(256))
    assert vm.exec("sh", "-c", 'echo "$GREETING"', env={"GREETING": "hello vm"}).text == "hello vm\n"
    assert vm.exec("pwd", workdir="/tmp").text == "/tmp\n"
    assert vm.exec("no-such-command").status == 127
    with pytest.raises(CommandFailed) as failed:
        vm.exec("sh", "-c", "echo why >&2; exit 4", check=True)
    assert failed.value.result.status == 4 and "why" in str(failed.value)
    assert vm.exec("sleep", "60", timeout="1s").status == 137


def test_copy(vm, tmp_path):
    """A file and a directory in and out again, contents and modes kept."""
    source = tmp_path / "in.txt"
    source.write_bytes(b"\x00binary\xffdata\n" * 1000)
    vm.cp_in(source, "/root/copied.txt")
    assert vm.exec("wc", "-c", "/root/copied.txt").text.split()[0] == "13000"

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha\n")
    (tree / "sub" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (tree / "sub" / "run.sh").chmod(0o755)
    vm.exec("mkdir", "-p", "/work", check=True)
    vm.cp_in(tree, "/work")  # an existing directory: the tree goes into it
    assert vm.exec("/work/tree/sub/run.sh").text == "ran\n"
    vm.exec("sh", "-c", "echo made in the guest > /work/tree/sub/new.txt", check=True)

    vm.cp_out("/root/copied.txt", tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_bytes() == source.read_bytes()
    vm.cp_out("/work/tree", tmp_path / "back")
    assert (tmp_path / "back" / "a.txt").read_text() == "alpha\n"
    assert (tmp_path / "back" / "sub" / "new.txt").read_text() == "made in the guest\n"
    assert os.access(tmp_path / "back" / "sub" / "run.sh", os.X_OK)


def test_fork(vm):
    """Three copies see what the source wrote before the fork; a write in one is not seen by
    the others or the source."""
    vm.exec("sh", "-c", "echo before > /root/state", check=True)
    forks = vm.fork(count=3)
    assert len({fork.id for fork in forks} | {vm.id}) == 4
    if RECORD:
        for fork in forks:
            with open(os.path.join(RECORD, fork.id), "w") as file:
                file.write("fork of " + vm.id)
    for fork in forks:
        assert fork.exec("cat", "/root/state", check=True).text == "before\n"
        assert fork.exec("cat", "/proc/sys/kernel/hostname", check=True).text.strip() == fork.id
    forks[0].exec("sh", "-c", "echo after > /root/state", check=True)
    assert forks[1].exec("cat", "/root/state").text == "before\n"
    assert vm.exec("cat", "/root/state").text == "before\n"


def test_deliberately_failing(vm):
    """Fails on purpose: its VM must be released all the same."""
    vm.exec("true", check=True)
    assert vm.exec("false").status == 0, "this test fails on purpose"


@pytest.fixture
def broken_setup(vm):
    raise RuntimeError("a fixture after the lease fails on purpose")


def test_error_after_lease(broken_setup):
    """Errors in set-up on purpose, after its VM was leased: the VM is released."""


@pytest.mark.skipif(not os.environ.get("VMPOOL_EXAMPLE_INTERRUPT"), reason="run to be interrupted")
def test_interrupted(vm):
    """Waits for the session to be interrupted (Ctrl-C); its VM is released on the way out."""
    threading.Event().wait(600)


@pytest.mark.skipif(not os.environ.get("VMPOOL_EXAMPLE_INTERRUPT"), reason="run to be interrupted")
@pytest.mark.vmpool(pool="idle", wait="10m")
def test_waiting_for_a_vm(vm):
    """Its pool never has a ready VM: the session is interrupted while the lease waits."""
    pytest.fail("a VM of a pool of size 0 was leased")
