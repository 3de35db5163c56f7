import Foundation
import Testing
import VmpoolDriver
import VmpoolStore
import VmpoolTestSupport

@testable import VmpoolQEMU

/// The Debian guest and per-VM networking, on real QEMU.
@Suite(
    "Debian guest and networking on real QEMU", .serialized,
    .enabled(if: QemuEnvironment.available, "\(QemuEnvironment.skipReason ?? "")"))
struct GuestNetworkTests {
    /// The Debian root disk scripts/test builds (`vmpool image build --rootfs debian`).
    static let debianDisk = ProcessInfo.processInfo.environment["VMPOOL_TEST_DEBIAN"]

    /// A one-pool manifest: 1 vCPU, `memory`, `boot`, then `lines` of the spec as given.
    static func pool(
        _ name: String, size: Int, memory: String = "256Mi", boot: String = "template", _ lines: String...
    ) -> String {
        poolYAML(name, size: size, memory: memory, boot: boot, extra: lines.map { "  " + $0 + "\n" }.joined())
    }

    func apply(_ box: QemuSandbox, _ text: String, name: String = "pool.yaml", through prefix: [String] = []) throws
        -> CommandResult
    {
        let file = box.write(text, as: name)
        let result: CommandResult
        if prefix.isEmpty {
            result = try box.run(["apply", "-f", file])
        } else {
            result = try RunningCommand(
                path: prefix[0],
                arguments: Array(prefix.dropFirst()) + [
                    box.binary.path, "apply", "-f", file, "--state-dir", box.state,
                ],
                // `ip netns exec` mounts a /sys of its own, with no cgroup file system in it.
                environment: box.binary.environment.merging(["VMPOOL_CGROUPS": "0"]) { $1 }
            ).wait()
        }
        #expect(result.status == 0, "apply failed: \(result.stdout)\n\(result.stderr)")
        return result
    }

    @Test(
        .enabled(
            if: debianDisk != nil || QemuEnvironment.required,
            "VMPOOL_TEST_DEBIAN is not set (scripts/test builds the Debian disk)"))
    func debianBootsColdAndFromATemplateWithItsOwnIdentity() throws {
        let disk = try #require(Self.debianDisk, "scripts/test sets VMPOOL_TEST_DEBIAN")
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let spec = { (name: String, size: Int, boot: String) in
            Self.pool(
                name, size: size, memory: "512Mi", boot: boot,
                #"image: {cmdline: "console=ttyS0 quiet root=/dev/vda"}"#,
                "disks:", "  - {name: root, image: \(disk), size: 4Gi}", "network: {ports: [8000]}")
        }
        // The template was saved once udev's idle workers had exited (udevd ends them 3 s after
        // its queue empties): a clone resumed with them would spend its first seconds reaping
        // them, about 6 MiB of guest memory copied and 4 MiB of translated code per clone.
        _ = try apply(box, spec("deb", 2, "template"))
        for clone in try box.ids(pool: "deb") {
            let workers = try box.exec(
                clone,
                ["sh", "-c", "u=$(systemctl show -p MainPID --value systemd-udevd) && cat /proc/$u/task/$u/children"])
            #expect(workers.status == 0, "\(clone): \(workers.stderr)")
            #expect(
                workers.stdout.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty,
                "\(clone) resumed with udev workers: \(workers.stdout)")
        }
        _ = try apply(box, spec("deb", 2, "template") + "\n---\n" + spec("debcold", 1, "cold"))
        // Each VM, clones included, answers on its own forwarded port from a server in the guest.
        for vm in try box.vms() {
            let id = try #require(vm["id"] as? String)
            let port = try #require((vm["ports"] as? [String: Int])?["8000"])
            let served = try box.exec(
                id,
                ["sh", "-c", "setsid -f python3 -m http.server 8000 --directory /etc </dev/null >/dev/null 2>&1"])
            #expect(served.status == 0, "\(served.stderr)")
            var body = ""
            _ = eventually {
                body = (try? httpGet(port: port, path: "/hostname")) ?? ""
                return body.contains(id)
            }
            #expect(body.contains(id), "\(id) on 127.0.0.1:\(port): \(body)")
        }
        var names = Set<String>()
        var machines = Set<String>()
        for vm in try box.ids() {
            let python = try box.exec(vm, ["python3", "-c", "import sys; print(sys.version_info.major)"])
            #expect(python.stdout == "3\n", "\(vm): \(python.stdout)\(python.stderr)")
            #expect(try box.exec(vm, ["hostname"]).stdout == vm + "\n")
            #expect(try box.exec(vm, ["cat", "/etc/hostname"]).stdout == vm + "\n")
            let layout = try box.exec(vm, ["cat", "/proc/self/personality"]).stdout
            #expect(layout == (try box.underTCG(vm) ? "00040000\n" : "00000000\n"), "\(vm): \(layout)")
            machines.insert(try box.exec(vm, ["cat", "/etc/machine-id"]).stdout)
            names.insert(try box.exec(vm, ["hostname"]).stdout)
            let size = try box.exec(vm, ["cat", "/sys/block/vda/size"]).stdout
            #expect(size == "\(4 << 21)\n", "\(vm): the root disk is 4 GiB: \(size)")
            let guest =
                Double(try box.exec(vm, ["date", "+%s.%N"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
            #expect(abs(guest - Date().timeIntervalSince1970) < 2)
        }
        #expect(names.count == 3 && machines.count == 3, "machine ids: \(machines)")
        // The template was saved quiet: its console login had finished, so no clone logs one
        // under its own name after the restore.
        for clone in try box.ids(pool: "deb") {
            let logins = try box.exec(
                clone, ["sh", "-c", "journalctl -o short --no-pager | grep -F ' \(clone) login[' || true"])
            #expect(logins.stdout.isEmpty, "\(clone) logged in after its restore: \(logins.stdout)")
        }
        // cp both ways, logs and the interactive console work on the Debian guest too.
        let clone = try #require(try box.ids(pool: "deb").last)
        var bytes = [UInt8](repeating: 0, count: 3 << 20)
        for index in bytes.indices { bytes[index] = UInt8(truncatingIfNeeded: index &* 2_654_435_761 >> 7) }
        let source = box.dir.write("payload.bin", "")
        FileManager.default.createFile(atPath: source, contents: Data(bytes))
        chmod(source, 0o640)
        #expect(try box.run(["cp", source, "\(clone):/root/payload.bin"]).status == 0)
        #expect(try box.exec(clone, ["stat", "-c", "%a %s", "/root/payload.bin"]).stdout == "640 \(bytes.count)\n")
        #expect(try box.run(["cp", "\(clone):/root/payload.bin", box.dir.path + "/back.bin"]).status == 0)
        #expect(FileManager.default.contents(atPath: box.dir.path + "/back.bin") == Data(bytes))
        // GNU tar reports a short write without its reason: a full Debian disk is still said plainly.
        let small = try box.exec(
            clone,
            ["sh", "-c", "mkdir -p /mnt/small && mount -t tmpfs -o size=1m tmpfs /mnt/small && ls -A /mnt/small"])
        #expect(small.status == 0 && small.stdout.isEmpty, "\(small.stderr)")
        let full = try box.run(["cp", source, "\(clone):/mnt/small/"])
        #expect(
            full.stderr == "vmpool: no space left on device in the guest (/mnt/small); nothing was copied\n",
            "\(full.stderr)")
        #expect(try box.exec(clone, ["ls", "-A", "/mnt/small"]).stdout.isEmpty)
        let marker = "deb-log-\(UInt32.random(in: 0...UInt32.max))"
        _ = try box.exec(clone, ["sh", "-c", "echo \(marker) > /dev/ttyS0"])
        #expect(try box.run(["logs", clone, "--tail", "5"]).stdout.contains(marker))
        let typed = "console-\(UInt32.random(in: 0...UInt32.max))"
        let console = try box.binary.run(
            ["console", clone, "--state-dir", box.state],
            input: "\recho \(typed)-$(hostname)\r" + String(UnicodeScalar(0x1D)))
        #expect(console.status == 0, "\(console.stderr)")
        #expect(console.stdout.contains("\(typed)-\(clone)"), "console: \(console.stdout.suffix(400))")
        // The base image is never written.
        let before = try FileManager.default.attributesOfItem(atPath: disk)[.modificationDate] as? Date
        _ = try box.exec(try box.ids()[0], ["sh", "-c", "echo data > /root/written; sync"])
        let after = try FileManager.default.attributesOfItem(atPath: disk)[.modificationDate] as? Date
        #expect(before == after)
    }

    @Test func userModeForwardsAPortToAListenerInTheGuest() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        _ = try apply(box, Self.pool("web", size: 2, "network: {ports: [8080, 22]}"))
        var hostPorts = Set<Int>()
        for vm in try box.vms() {
            let id = try #require(vm["id"] as? String)
            let ports = try #require(vm["ports"] as? [String: Int])
            #expect(vm["address"] as? String == "127.0.0.1")
            #expect(Set(ports.keys) == ["8080", "22"])
            hostPorts.formUnion(ports.values)
            let served = try box.exec(
                id, ["sh", "-c", "mkdir -p /www && echo hello-$(hostname) > /www/index.html && httpd -p 8080 -h /www"])
            #expect(served.status == 0, "\(served.stderr)")
            let body = try httpGet(port: try #require(ports["8080"]))
            #expect(body.contains("hello-\(id)"), "\(body)")
        }
        #expect(hostPorts.count == 4, "no two VMs share a forwarded port")
        // The text views say the same: where the VM is reached and which port is which.
        let listed = try box.run(["get", "vms"]).stdout
        for vm in try box.vms() {
            let id = try #require(vm["id"] as? String)
            let ports = try #require(vm["ports"] as? [String: Int])
            let mapping = "22→\(ports["22"] ?? 0),8080→\(ports["8080"] ?? 0)"
            let line = listed.split(separator: "\n").first { $0.hasPrefix(id) } ?? ""
            #expect(line.contains("127.0.0.1") && line.contains(mapping), "get vms: \(line)")
            let described = try box.run(["describe", "vm", id]).stdout
            #expect(described.contains("Address:     127.0.0.1"), "\(described)")
            #expect(described.contains("Ports:       \(mapping)"), "\(described)")
        }
        #expect(try box.run(["delete", "web"]).status == 0)
        #expect(
            try StateStore(directory: box.state).allocations().ports.isEmpty, "forwarded ports are freed with their VMs"
        )
        for port in hostPorts { #expect(LocalPorts.isFree(port), "port \(port) is still taken after delete") }
    }

    @Test(.enabled(if: geteuid() == 0, "bridge mode needs root (network namespaces, taps)"))
    func bridgedClonesReachEachOtherButNotTheHost() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let namespace = try TestNamespace(box, suffix: "b")
        defer { namespace.remove(deleting: ["lab"]) }
        let size = 16
        let lab = { (size: Int) in
            Self.pool("lab", size: size, "network: {mode: bridge, bridge: vmptest0, subnet: 10.88.0.0/24}")
        }
        _ = try apply(box, lab(size), through: namespace.prefix)
        let vms = try box.vms()
        let addresses = vms.compactMap { $0["address"] as? String }
        #expect(addresses.count == size && Set(addresses).count == size, "addresses: \(addresses)")
        #expect(addresses.allSatisfy { $0.hasPrefix("10.88.0.") && $0 != "10.88.0.1" })
        let listed = try box.run(["get", "vms"]).stdout
        var macs = Set<String>()
        var answered = 0
        for (index, vm) in vms.enumerated() {
            let id = try #require(vm["id"] as? String)
            // Through the agent itself: `vmpool exec` would mark these free VMs entered.
            macs.insert(try agentExec(box, id, ["cat", "/sys/class/net/eth0/address"]).stdout)
            #expect(
                try agentExec(box, id, ["ip", "-4", "-o", "addr", "show", "eth0"]).stdout.contains(
                    addresses[index] + "/24"))
            // Every other clone by its own address: one line per answer; the host (the bridge's
            // address) answers none: it is behind the walls.
            let others = addresses.enumerated().filter { $0.offset != index }.map(\.element) + ["10.88.0.1"]
            let pings = try agentExec(
                box, id,
                [
                    "sh", "-c",
                    "for a in \(others.joined(separator: " ")); do ping -c 1 -W 3 $a >/dev/null && echo ok $a"
                        + " || echo lost $a; done",
                ])
            let lost = pings.stdout.split(separator: "\n").filter { !$0.hasPrefix("ok ") }
            #expect(lost == ["lost 10.88.0.1"], "\(id) at \(addresses[index]): \(lost)")
            answered += pings.stdout.split(separator: "\n").count - lost.count
            #expect(
                try namespace.run(["busybox", "ping", "-c", "1", "-W", "3", addresses[index]]).status == 0,
                "the host cannot reach \(id)")
            let line = listed.split(separator: "\n").first { $0.hasPrefix(id) } ?? ""
            #expect(line.contains(" \(addresses[index]) "), "get vms: \(line)")
            let described = try box.run(["describe", "vm", id]).stdout
            #expect(described.contains("Address:     \(addresses[index])/24 via 10.88.0.1"), "\(described)")
        }
        #expect(macs.count == size, "MACs: \(macs)")
        #expect(
            answered == size * (size - 1), "\(answered) of \(size * (size - 1)) pings answered (\(size) x \(size - 1))")
        // An address given again, to a new clone: the host, which knew the stopped VM at it,
        // reaches the newcomer at once (the MAC follows the address, so what it knew holds).
        _ = try apply(box, lab(size - 1), through: namespace.prefix)
        _ = try apply(box, lab(size), through: namespace.prefix)
        let newcomer = try #require(
            try box.vms().first { !vms.map { $0["id"] as? String }.contains($0["id"] as? String) })
        let reused = try #require(newcomer["address"] as? String)
        #expect(addresses.contains(reused), "the newcomer got \(reused), not a freed address")
        #expect(
            try namespace.run(["busybox", "ping", "-c", "1", "-W", "1", reused]).status == 0,
            "the host cannot reach the new clone at the reused address \(reused)")
        #expect(try namespace.run(["ip", "link", "show", "vmptest0"]).status == 0)
        #expect(try namespace.run([box.binary.path, "delete", "lab", "--state-dir", box.state]).status == 0)
        #expect(
            try namespace.run(["ip", "link", "show", "vmptest0"]).status != 0,
            "the bridge vmpool made is removed with its last pool")
        let links = try namespace.run(["ip", "-o", "link"]).stdout
        #expect(!links.contains("vmp"), "a tap was left: \(links)")
    }

    /// `mode: none` and no `network` key: no NIC in the guest (clones and cold VMs), none on
    /// QEMU's command line, no address or ports shown.
    @Test func aPoolWithoutANetworkHasNoNIC() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        _ = try apply(
            box,
            Self.pool("plain", size: 1) + "---\n" + Self.pool("none", size: 1, boot: "cold", "network: {mode: none}")
                + "---\n" + Self.pool("nonetpl", size: 1, "network: {mode: none}"))
        let vms = try box.vms()
        #expect(vms.count == 3)
        for vm in vms {
            let id = try #require(vm["id"] as? String)
            let links = try box.exec(id, ["ls", "/sys/class/net"])
            #expect(links.stdout == "lo\n", "\(id) has links \(links.stdout)\(links.stderr)")
            #expect(vm["address"] is NSNull && (vm["ports"] as? [String: Int])?.isEmpty == true, "\(vm)")
            let pid = try #require(vm["pid"] as? Int)
            let argv = String(
                decoding: FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") ?? Data(), as: UTF8.self)
            #expect(!argv.isEmpty && !argv.contains("netdev") && !argv.contains("virtio-net"), "\(id): \(argv)")
            let described = try box.run(["describe", "vm", id]).stdout
            #expect(!described.contains("Network:") && !described.contains("Address:"), "\(described)")
        }
    }

    /// A subnet that overlaps a route the host already has is a located error at validate,
    /// plan and apply; nothing is made.
    @Test(.enabled(if: geteuid() == 0, "needs root (a network namespace with a route in it)"))
    func aSubnetOverlappingAHostRouteIsRefused() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let namespace = try TestNamespace(box, suffix: "r")
        defer { namespace.remove(deleting: []) }
        for command in [
            ["link", "add", "vmpr0", "type", "bridge"], ["address", "add", "10.89.0.1/24", "dev", "vmpr0"],
            ["link", "set", "vmpr0", "up"],
        ] {
            #expect(try namespace.run(["ip"] + command).status == 0)
        }
        let file = box.write(
            Self.pool("lab", size: 1, "network: {mode: bridge, bridge: vmptest1, subnet: 10.89.0.128/25}"),
            as: "overlap.yaml")
        for command in ["validate", "plan", "apply"] {
            let result = try namespace.run([box.binary.path, command, "-f", file, "--state-dir", box.state])
            #expect(result.status == 1, "\(command) exited \(result.status)")
            #expect(
                result.stderr.contains("overlap.yaml:9:53:") && result.stderr.contains("spec.network.subnet")
                    && result.stderr.contains("10.89.0.0/24"),
                "\(command): \(result.stderr)")
        }
        #expect(try namespace.run(["ip", "link", "show", "vmptest1"]).status != 0, "a bridge was made")
        #expect(try StateStore(directory: box.state).pools().isEmpty)
        #expect(box.qemuProcesses().isEmpty)
    }

    /// Bridge mode without CAP_NET_ADMIN: one error naming what is missing, and nothing half
    /// made (no bridge, no tap without a VM, no VM without its tap, no address held).
    @Test(.enabled(if: geteuid() == 0, "needs root to take CAP_NET_ADMIN away in a network namespace"))
    func bridgeModeWithoutThePrivilegeIsOneClearError() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let namespace = try TestNamespace(box, suffix: "p")
        defer { namespace.remove(deleting: ["lab"]) }
        let file = box.write(
            Self.pool("lab", size: 2, boot: "cold", "network: {mode: bridge, bridge: vmptest2, subnet: 10.87.0.0/24}"))
        let unprivileged = [
            "/usr/bin/setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin", "--",
            box.binary.path, "apply", "-f", file, "--state-dir", box.state,
        ]
        func nothingHalfMade(_ what: String) throws {
            let links = try namespace.run(["ip", "-o", "link"]).stdout
            #expect(!links.contains("vmpt"), "\(what): a link was left: \(links)")
            let store = try StateStore(directory: box.state)
            #expect(try store.vms().isEmpty, "\(what): a VM was recorded")
            let (ports, addresses) = try store.allocations()
            #expect(ports.isEmpty && addresses.isEmpty, "\(what): \(ports) \(addresses) still held")
            #expect(box.qemuProcesses().isEmpty, "\(what): QEMU runs")
        }
        // No bridge yet: making it is refused.
        let first = try namespace.run(unprivileged)
        #expect(first.status == 1)
        #expect(first.stderr.contains("CAP_NET_ADMIN"), "\(first.stderr)")
        try nothingHalfMade("without a bridge")
        // The bridge is there (made by an administrator): the taps are refused.
        for command in [
            ["link", "add", "vmptest2", "type", "bridge"], ["address", "add", "10.87.0.1/24", "dev", "vmptest2"],
            ["link", "set", "vmptest2", "up"],
        ] {
            #expect(try namespace.run(["ip"] + command).status == 0)
        }
        let second = try namespace.run(unprivileged)
        #expect(second.status == 1)
        #expect(second.stderr.contains("CAP_NET_ADMIN") && second.stderr.contains("tap"), "\(second.stderr)")
        _ = try namespace.run(["ip", "link", "del", "vmptest2"])
        try nothingHalfMade("with the bridge")
        // With the privilege, the same manifest works.
        #expect(try namespace.run([box.binary.path, "apply", "-f", file, "--state-dir", box.state]).status == 0)
        #expect(try box.vms().compactMap { $0["address"] as? String }.count == 2)
    }
}

/// A network namespace of the test's own, with loopback up; vmpool runs inside it so that
/// bridges, taps and packets stay there.
struct TestNamespace {
    let name: String
    let box: QemuSandbox
    var prefix: [String] { ["/usr/sbin/ip", "netns", "exec", name] }

    init(_ box: QemuSandbox, suffix: String) throws {
        self.box = box
        name = "vmpt\(getpid() % 100_000)\(suffix)"
        _ = try RunningCommand(path: "/usr/sbin/ip", arguments: ["netns", "del", name], environment: [:]).wait()
        let added = try RunningCommand(path: "/usr/sbin/ip", arguments: ["netns", "add", name], environment: [:])
            .wait()
        guard added.status == 0 else { throw SandboxError("ip netns add \(name): \(added.stderr)") }
        _ = try run(["ip", "link", "set", "lo", "up"])
    }

    /// Runs a command in the namespace; vmpool there puts VMs in no cgroup (`ip netns exec`
    /// mounts a /sys of its own, with no cgroup file system in it).
    func run(_ arguments: [String]) throws -> CommandResult {
        try RunningCommand(
            path: prefix[0], arguments: Array(prefix.dropFirst()) + arguments,
            environment: box.binary.environment.merging(["VMPOOL_CGROUPS": "0"]) { $1 }
        ).wait()
    }

    /// Deletes `pools` from inside (so their taps and bridges go there), then the namespace.
    func remove(deleting pools: [String]) {
        if !pools.isEmpty { _ = try? run([box.binary.path, "delete"] + pools + ["--state-dir", box.state]) }
        _ = try? RunningCommand(path: "/usr/sbin/ip", arguments: ["netns", "del", name], environment: [:]).wait()
    }
}

/// Runs `argv` in `vm` straight through its agent's exec port, as the guest's own processes
/// would: `vmpool exec` would mark a VM nobody holds entered, and the next pass replace it.
func agentExec(_ box: QemuSandbox, _ vm: String, _ argv: [String]) throws -> (status: Int32, stdout: String) {
    let paths = QemuPaths(configuration: QemuConfiguration(stateDirectory: box.state))
    let session = try ExecSession(paths: paths, vm: vm)
    defer { session.close() }
    let file = NSTemporaryDirectory() + "vmpool-agent-exec-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    let out = open(file, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    let null = open("/dev/null", O_RDWR | O_CLOEXEC)
    defer {
        close(out)
        close(null)
        unlink(file)
    }
    let outcome = try session.run(
        ExecRequest(argv: argv, timeout: .seconds(120)), streams: ExecStreams(stdin: null, stdout: out, stderr: null))
    let text = (try? String(contentsOfFile: file, encoding: .utf8)) ?? ""
    return (outcome.exitStatus, text)
}

/// `GET path` on 127.0.0.1:`port` with a raw socket; the response as text.
func httpGet(port: Int, path: String = "/") throws -> String {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = in_port_t(UInt16(port).bigEndian)
    address.sin_addr.s_addr = in_addr_t(UInt32(0x7F00_0001).bigEndian)
    var timeout = timeval(tv_sec: 10, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
        }
    }
    guard connected == 0 else { throw SandboxError("cannot connect to 127.0.0.1:\(port)") }
    let request = "GET \(path) HTTP/1.0\r\nHost: vm\r\n\r\n"
    _ = request.withCString { send(fd, $0, strlen($0), 0) }
    var response: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let count = recv(fd, &chunk, chunk.count, 0)
        if count <= 0 { break }
        response += chunk[0..<count]
    }
    return String(decoding: response, as: UTF8.self)
}
