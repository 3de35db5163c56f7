"""Many hosts on one PostgreSQL store: three `vmpool reconcile --every` services on the sim
driver, each in a network namespace of its own that reaches the database over a veth pair.

Needs root (namespaces), iproute2, psql and a PostgreSQL server listening on the veth
addresses: scripts/test runs this under `scripts/postgres --listen '*' --trust 10.231.0.0/16`.
VMPOOL_BIN names the vmpool binary (default .build/debug/vmpool).
"""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
import urllib.parse
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VMPOOL = os.environ.get("VMPOOL_BIN", os.path.join(ROOT, ".build/debug/vmpool"))
ADMIN = os.environ.get("VMPOOL_TEST_POSTGRES")
HOSTS = ["h1", "h2", "h3"]
TIMEOUT = "3s"  # --host-timeout of every host
PASS = "300ms"  # --every of every host

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not ADMIN,
    reason="needs root (network namespaces) and VMPOOL_TEST_POSTGRES (scripts/postgres)",
)


def sh(*args, check=True, **kwargs):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kwargs)


def port():
    return urllib.parse.urlparse(ADMIN).port


class Namespaces:
    """h1..h3: namespace vmpt-hN, host side 10.231.N.1 on veth vmpt-hN, inside 10.231.N.2."""

    def __init__(self):
        self.made = []

    def up(self):
        for n, host in enumerate(HOSTS, start=1):
            ns = f"vmpt-{host}"
            sh("ip", "netns", "del", ns, check=False)
            sh("ip", "link", "del", ns, check=False)
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "link", "add", ns, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "addr", "add", f"10.231.{n}.1/24", "dev", ns)
            sh("ip", "link", "set", ns, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"10.231.{n}.2/24", "dev", "eth0")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")

    def down(self):
        for ns in self.made:
            sh("ip", "netns", "del", ns, check=False)
            sh("ip", "link", "del", ns, check=False)

    @staticmethod
    def cut(host):
        sh("ip", "link", "set", f"vmpt-{host}", "down")

    @staticmethod
    def heal(host):
        sh("ip", "link", "set", f"vmpt-{host}", "up")


@pytest.fixture(scope="module")
def namespaces():
    spaces = Namespaces()
    try:
        spaces.up()
        yield spaces
    finally:
        spaces.down()


class Cluster:
    """A database of its own, three host services, and a client in the root namespace."""

    def __init__(self, capacity="vcpus=8,memory=8Gi"):
        self.database = "vmpool_cluster_" + uuid.uuid4().hex[:10]
        sh("psql", "-q", "-d", ADMIN, "-c", f"CREATE DATABASE {self.database}")
        self.dir = tempfile.mkdtemp(prefix="vmpool-cluster.")
        self.shm = set(os.listdir("/dev/shm"))
        self.capacity = capacity
        self.services = {}
        self.logs = {}

    def url(self, address="127.0.0.1"):
        return f"postgres://vmpool@{address}:{port()}/{self.database}"

    def state(self, host):
        return os.path.join(self.dir, host)

    def start(self, host, capacity=None, driver="sim"):
        n = HOSTS.index(host) + 1
        log = open(os.path.join(self.dir, f"{host}.log"), "ab")
        self.logs[host] = log.name
        self.services[host] = subprocess.Popen(
            [
                "ip", "netns", "exec", f"vmpt-{host}", VMPOOL, "reconcile", "--every", PASS,
                "--host", host, "--host-timeout", TIMEOUT, "--capacity", capacity or self.capacity,
                "--store", self.url(f"10.231.{n}.1"), "--state-dir", self.state(host), "--driver", driver,
            ],
            stdout=log, stderr=subprocess.STDOUT,
            # `ip netns exec` mounts a /sys of its own, with no cgroup file system in it.
            env=dict(os.environ, VMPOOL_CGROUPS="0"),
        )

    def kill(self, host, sig=signal.SIGKILL):
        process = self.services.pop(host)
        process.send_signal(sig)
        process.wait(timeout=30)

    def vmpool(self, *args, check=True, timeout=120):
        result = subprocess.run(
            [VMPOOL, *args, "--store", self.url(), "--state-dir", os.path.join(self.dir, "client"), "--driver", "sim"],
            capture_output=True, text=True, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"vmpool {' '.join(args)}: exit {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def on(self, host, *args):
        """`vmpool ARGS` run on `host`: in its namespace, with its state dir."""
        n = HOSTS.index(host) + 1
        return subprocess.run(
            ["ip", "netns", "exec", f"vmpt-{host}", VMPOOL, args[0], "--store", self.url(f"10.231.{n}.1"),
             "--host", host, "--state-dir", self.state(host), *args[1:]],
            capture_output=True, text=True, timeout=120, env=dict(os.environ, VMPOOL_CGROUPS="0"),
        )

    def apply(self, text, *args, check=True, timeout="60s"):
        path = os.path.join(self.dir, f"m-{uuid.uuid4().hex[:6]}.yaml")
        with open(path, "w") as f:
            f.write(text)
        return self.vmpool("apply", "-f", path, "--timeout", timeout, *args, check=check, timeout=600)

    def vms(self):
        return json.loads(self.vmpool("get", "vms", "-o", "json").stdout)

    def hosts(self):
        return {h["name"]: h for h in json.loads(self.vmpool("get", "hosts", "-o", "json").stdout)}

    def by_host(self, pool=None):
        counts = {}
        for vm in self.vms():
            if pool is None or vm["pool"] == pool:
                counts[vm["host"]] = counts.get(vm["host"], 0) + 1
        return counts

    def simulated(self, host):
        """The VMs the sim hypervisor of `host` runs (what its state dir holds), by id."""
        path = os.path.join(self.state(host), "sim.sqlite")
        if not os.path.exists(path):
            return set()
        with sqlite3.connect(path) as db:
            return {row[0] for row in db.execute("SELECT id FROM simvm")}

    def events(self, kind):
        return [e for e in json.loads(self.vmpool("events", "-o", "json").stdout) if e["kind"] == kind]

    def eventually(self, check, seconds=30, what="condition"):
        deadline = time.monotonic() + seconds
        last = None
        while time.monotonic() < deadline:
            try:
                last = check()
                if last:
                    return last
            except AssertionError as error:
                last = error
            time.sleep(0.2)
        raise AssertionError(f"{what} not reached within {seconds}s (last: {last})")

    def close(self):
        for host in list(self.services):
            self.kill(host, signal.SIGTERM)
        # VMs outlive the services that started them (QEMU on the qemu driver): end them too.
        for host in HOSTS:
            for pid in sh("ip", "netns", "pids", f"vmpt-{host}", check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        sh("psql", "-q", "-d", ADMIN, "-c", f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)", check=False)
        # Template memory the qemu driver keeps in /dev/shm, one folder per state dir.
        for name in set(os.listdir("/dev/shm")) - self.shm:
            if name.startswith("vmpool-"):
                shutil.rmtree(os.path.join("/dev/shm", name), ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def dump(self):
        for host, path in self.logs.items():
            with open(path) as f:
                print(f"--- {host} ---\n" + "".join(f.readlines()[-40:]))


@pytest.fixture
def cluster(namespaces, request):
    c = Cluster()
    failed = request.session.testsfailed
    try:
        yield c
    finally:
        if request.session.testsfailed > failed:
            c.dump()
        c.close()


def pool(name, size, warm=0, vcpus=1, memory="256Mi", placement="spread"):
    return (
        f"apiVersion: vmpool/v1\nkind: Pool\nmetadata:\n  name: {name}\nspec:\n  size: {size}\n  warm: {warm}\n"
        f"  vcpus: {vcpus}\n  memory: {memory}\n  boot: template\n  placement: {placement}\n"
    )


def start_all(cluster, capacity=None):
    for host in HOSTS:
        cluster.start(host, capacity)
    cluster.eventually(lambda: all(h["state"] == "ready" for h in cluster.hosts().values()) and len(cluster.hosts()) == 3,
                       what="three hosts joined")


def assert_no_duplicates(cluster):
    """Every VM is recorded once, on one host, and each host's hypervisor runs exactly its records."""
    vms = cluster.vms()
    ids = [vm["id"] for vm in vms]
    assert len(ids) == len(set(ids)), f"a VM is recorded twice: {ids}"
    for host in HOSTS:
        recorded = {vm["id"] for vm in vms if vm["host"] == host}
        running = cluster.simulated(host)
        assert running == recorded, f"{host} runs {sorted(running)} but the store gives it {sorted(recorded)}"


def test_spread_and_pack(cluster):
    start_all(cluster)
    cluster.apply(pool("web", 6))
    assert cluster.by_host("web") == {"h1": 2, "h2": 2, "h3": 2}
    # 8 vcpus a host, web takes 2 of each: pack puts 3 VMs of 2 vcpus on h1, then h2.
    both = pool("web", 6) + "---\n" + pool("batch", 6, vcpus=2, placement="pack")
    path = os.path.join(cluster.dir, "both.yaml")
    with open(path, "w") as f:
        f.write(both)
    # plan, from any host, shows the placement the apply will make, and changes nothing.
    planned = cluster.vmpool("plan", "-f", path, "--detailed-exitcode", check=False)
    assert planned.returncode == 2, planned.stdout + planned.stderr
    assert "+   create" in planned.stdout and "h1: 0 → 3 VMs" in planned.stdout, planned.stdout
    shown = json.loads(cluster.vmpool("plan", "-f", path, "-o", "json", check=False).stdout)
    batch = next(p for p in shown["pools"] if p["pool"] == "batch")
    assert batch["change"] == "create" and batch["unplaced"] == 0
    assert {h: c["planned"] for h, c in batch["hosts"].items()} == {"h1": 3, "h2": 3}
    assert "batch" not in cluster.by_host(), "plan placed nothing"
    cluster.apply(both)
    assert cluster.by_host("web") == {"h1": 2, "h2": 2, "h3": 2}, "placed VMs stay where they are"
    assert cluster.by_host("batch") == {"h1": 3, "h2": 3}
    cluster.eventually(lambda: assert_no_duplicates(cluster) or True, what="hypervisors match the store")
    again = cluster.vmpool("plan", "-f", path, "--detailed-exitcode", check=False)
    assert again.returncode == 0 and again.stdout.startswith("No changes."), again.stdout + again.stderr


def test_a_killed_hosts_vms_come_back_on_the_others(cluster):
    start_all(cluster)
    cluster.apply(pool("web", 6))
    assert cluster.by_host("web") == {"h1": 2, "h2": 2, "h3": 2}
    killed = time.monotonic()
    cluster.kill("h2")
    cluster.eventually(
        lambda: cluster.by_host("web") in ({"h1": 3, "h3": 3},) and cluster.hosts()["h2"]["state"] == "dead",
        seconds=30, what="h2's VMs placed on h1 and h3")
    cluster.eventually(
        lambda: json.loads(cluster.vmpool("get", "pools", "-o", "json").stdout)[0]["ready"] == 6, what="6 ready")
    print(f"killed host's VMs ready elsewhere after {time.monotonic() - killed:.1f}s (host-timeout {TIMEOUT})")
    assert cluster.events("host-lost"), "the loss is an event"
    # h2 comes back: it rejoins, stops the copies it still has, and takes nothing back.
    assert cluster.simulated("h2"), "the killed host's hypervisor still has its VMs"
    cluster.start("h2")
    cluster.eventually(lambda: cluster.hosts()["h2"]["state"] == "ready", what="h2 rejoined")
    cluster.eventually(lambda: not cluster.simulated("h2"), what="h2's stale copies stopped")
    assert sum(cluster.by_host("web").values()) == 6
    assert_no_duplicates(cluster)


def test_a_host_cut_off_longer_than_the_timeout_is_fenced_and_heals_without_duplicates(cluster):
    start_all(cluster)
    cluster.apply(pool("web", 6))
    # The hardest host to lose: the placer, whose database session holds the placer lock
    # until the server notices the host is gone.
    cut = cluster.eventually(lambda: placer(cluster), what="a placer")
    others = sorted(set(HOSTS) - {cut})
    Namespaces.cut(cut)
    try:
        cluster.eventually(lambda: cluster.by_host("web") == {others[0]: 3, others[1]: 3}, seconds=30,
                           what=f"{cut}'s VMs placed on {others[0]} and {others[1]}")
        assert cluster.hosts()[cut]["state"] == "dead"
        assert cluster.simulated(cut), f"cut off, {cut} still runs its copies (it cannot know yet)"
        time.sleep(1)
    finally:
        Namespaces.heal(cut)
    cluster.eventually(lambda: not cluster.simulated(cut), seconds=30, what=f"{cut} stopped its stale copies")
    cluster.eventually(lambda: cluster.hosts()[cut]["state"] == "ready", what=f"{cut} rejoined")
    assert cluster.events("host-rejoined")
    assert sum(cluster.by_host("web").values()) == 6
    assert_no_duplicates(cluster)


def placer(cluster):
    """The host whose database session holds the placer lock."""
    query = (
        "SELECT client_addr FROM pg_locks JOIN pg_stat_activity USING (pid) WHERE locktype = 'advisory'"
        " AND granted AND (classid::bigint << 32 | objid::bigint) = 8533600492849987587"
        f" AND datname = '{cluster.database}'"
    )
    address = sh("psql", "-tA", "-d", ADMIN, "-c", query).stdout.strip()
    for n, host in enumerate(HOSTS, start=1):
        if address == f"10.231.{n}.2":
            return host
    return None


def test_the_placers_host_killed_while_placing(cluster):
    start_all(cluster)
    cluster.apply(pool("web", 3))
    first = cluster.eventually(lambda: placer(cluster), what="a placer")
    # A new pool is recorded, and the placer dies as it places it.
    path = os.path.join(cluster.dir, "more.yaml")
    with open(path, "w") as f:
        f.write(pool("web", 3) + "---\n" + pool("more", 6))
    applying = subprocess.Popen(
        [VMPOOL, "apply", "-f", path, "--timeout", "60s", "--store", cluster.url(),
         "--state-dir", os.path.join(cluster.dir, "client"), "--driver", "sim"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    cluster.kill(first)
    out, err = applying.communicate(timeout=90)
    assert applying.returncode == 0, out + err
    second = cluster.eventually(lambda: placer(cluster), what="another placer")
    assert second != first
    live = [h for h in HOSTS if h != first]
    cluster.eventually(lambda: set(cluster.by_host()) == set(live) and sum(cluster.by_host().values()) == 9,
                       seconds=30, what="every VM on the live hosts")
    for host in live:
        recorded = {vm["id"] for vm in cluster.vms() if vm["host"] == host}
        cluster.eventually(lambda: cluster.simulated(host) == recorded, what=f"{host} runs its records")


def test_capacity_exhausted_is_reported_not_half_placed_silently(cluster):
    for host in HOSTS:
        cluster.start(host, "vcpus=2,memory=2Gi")
    cluster.eventually(lambda: len(cluster.hosts()) == 3, what="three hosts joined")
    result = cluster.apply(pool("big", 8), check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 VMs of big fit on no live host" in result.stderr, result.stderr
    assert sum(cluster.by_host("big").values()) == 6, "what fits runs"
    described = cluster.vmpool("describe", "pool", "big").stdout
    assert "2 VMs fit on no live host" in described, described
    assert cluster.events("unplaced")


QEMU_KERNEL = os.environ.get("VMPOOL_TEST_KERNEL")
# CI sets VMPOOL_REQUIRE_QEMU=1 (as for the Swift QEMU tests): there a missing part is a
# failure, never a skip.
QEMU_REQUIRED = os.environ.get("VMPOOL_REQUIRE_QEMU") == "1"


def qemu_missing():
    """Why the real-QEMU test cannot run here, or None."""
    if not os.path.exists("/usr/bin/qemu-system-x86_64"):
        return "qemu-system-x86_64 is not installed (scripts/test installs it)"
    if not QEMU_KERNEL or not os.path.exists(QEMU_KERNEL):
        return "no guest kernel: VMPOOL_TEST_KERNEL is not set or missing (scripts/test sets it)"
    return None


@pytest.mark.skipif(not QEMU_REQUIRED and qemu_missing() is not None, reason=str(qemu_missing()))
def test_two_hosts_on_real_qemu(cluster):
    """Two hosts run real QEMU VMs of one pool; one host dies (its service and its QEMU
    processes killed at once, as a power loss would) and its VM boots on the other."""
    missing = qemu_missing()
    if missing:
        pytest.fail(f"VMPOOL_REQUIRE_QEMU=1, but {missing}")
    for host in ("h1", "h2"):
        built = sh(VMPOOL, "image", "build", "--kernel", QEMU_KERNEL, "--state-dir", cluster.state(host), check=False)
        assert built.returncode == 0, built.stderr
        cluster.start(host, "vcpus=2,memory=1Gi", driver="qemu")
    cluster.eventually(lambda: len(cluster.hosts()) == 2, what="two hosts joined")
    cluster.apply(pool("web", 2), timeout="300s")
    cluster.eventually(lambda: cluster.by_host("web") == {"h1": 1, "h2": 1}, seconds=120, what="one VM a host")
    cluster.eventually(lambda: json.loads(cluster.vmpool("get", "pools", "-o", "json").stdout)[0]["ready"] == 2,
                       seconds=240, what="2 ready VMs")
    on = {vm["host"]: vm["id"] for vm in cluster.vms()}
    # A host names the other host for the other's VM (refused before the VM counts as entered),
    # and each host execs in its own VM (which is then replaced: entered while not leased).
    other = cluster.on("h1", "exec", on["h2"], "--", "true")
    assert other.returncode != 0 and "runs on host h2" in other.stderr, other.stderr
    for host, vm in on.items():
        ran = cluster.on(host, "exec", vm, "--", "cat", "/proc/sys/kernel/hostname")
        assert ran.returncode == 0, ran.stderr

    # h2 loses power: everything in its namespace dies together.
    pids = sh("ip", "netns", "pids", "vmpt-h2").stdout.split()
    assert len(pids) >= 2, f"h2 runs its service and a QEMU process: {pids}"
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    cluster.services.pop("h2").wait(timeout=30)
    killed = time.monotonic()
    cluster.eventually(lambda: cluster.by_host("web") == {"h1": 2}, seconds=60, what="h2's VM placed on h1")
    cluster.eventually(lambda: json.loads(cluster.vmpool("get", "pools", "-o", "json").stdout)[0]["ready"] == 2,
                       seconds=240, what="2 ready VMs on h1")
    print(f"dead host's QEMU VM ready on h1 after {time.monotonic() - killed:.1f}s (host-timeout {TIMEOUT})")
    # A VM entered above may be replaced between the listing and the exec: list again until
    # every VM listed answers.
    cluster.eventually(
        lambda: all(cluster.on("h1", "exec", vm["id"], "--", "true").returncode == 0 for vm in cluster.vms()),
        seconds=240, what="every VM on h1 answers exec")
