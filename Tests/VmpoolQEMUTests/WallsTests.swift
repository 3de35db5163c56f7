import Foundation
import Synchronization
import Testing
import VmpoolTestSupport

/// The walls around every VM, tried from inside real guests and from the host: nothing a guest,
/// a lease client or a copied file does reaches past its VM.
@Suite(
    "Walls around every VM on real QEMU", .serialized,
    .enabled(if: QemuEnvironment.available, "\(QemuEnvironment.skipReason ?? "")"))
struct WallsTests {
    /// This suite's pools: template-booted unless it says otherwise.
    func pool(_ name: String, size: Int, boot: String = "template", extra: String = "") -> String {
        poolYAML(name, size: size, boot: boot, extra: extra)
    }

    func apply(_ box: QemuSandbox, _ text: String, name: String = "pool.yaml") throws {
        let result = try box.run(["apply", "-f", box.write(text, as: name)])
        #expect(result.status == 0, "apply failed: \(result.stdout)\n\(result.stderr)")
    }

    /// A VM someone entered while nobody held it (here: exec wrote a marker into every free VM)
    /// is never leased: a lease gets none of them, the next pass replaces them new before old,
    /// and the VM a lease then hands out has no marker.
    @Test func aVMEnteredWhileFreeIsNeverLeased() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        try apply(box, pool("fresh", size: 2))
        let entered = try box.ids(pool: "fresh")
        #expect(entered.count == 2)
        for vm in entered {
            let wrote = try box.exec(vm, ["sh", "-c", "echo planted > /root/marker"])
            #expect(wrote.status == 0, "\(wrote.stderr)")
        }
        let refused = try box.run(["lease", "fresh", "--holder", "job"])
        #expect(refused.status == 1, "a lease took an entered VM: \(refused.stdout)")
        let rows = try box.vms(pool: "fresh")
        for vm in entered {
            let row = rows.first { $0["id"] as? String == vm }
            #expect((row?["problem"] as? String)?.contains("entered by exec") == true, "\(row ?? [:])")
        }
        let events = try box.run(["events", "--pool", "fresh"])
        #expect(events.stdout.contains("entered"), "\(events.stdout)")

        let reconciled = try box.run(["reconcile"])
        #expect(reconciled.status == 0, "\(reconciled.stdout)\(reconciled.stderr)")
        let fresh = try box.ids(pool: "fresh")
        #expect(fresh.count == 2 && Set(fresh).isDisjoint(with: entered), "replaced: \(entered) -> \(fresh)")
        let leased = try box.run(["lease", "fresh", "--holder", "job"])
        #expect(leased.status == 0, "\(leased.stderr)")
        let vm = leased.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let marker = try box.exec(vm, ["sh", "-c", "test -e /root/marker && echo present || echo absent"])
        #expect(marker.stdout == "absent\n", "the leased VM \(vm): \(marker.stdout)\(marker.stderr)")
        // The holder may enter its own VM: that marks nothing, and the lease stands.
        #expect(try box.vms(pool: "fresh").first { $0["id"] as? String == vm }?["problem"] is NSNull)
    }

    /// Tries every way out of a user-mode guest to the host: its loopback through slirp's
    /// 10.0.2.2, its own non-loopback address, vmpool's HTTP API, the PostgreSQL store, and a
    /// link-local address; each must fail while egress to a network outside the host (a
    /// namespace this test made) and the forwarded port keep working. The same tries from a
    /// VM of a state dir with the walls off succeed, so each check could fail.
    @Test func aUserModeGuestReachesNothingOfTheHost() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let outside = try OutsideNetwork(box, suffix: "w")
        defer { outside.remove() }
        let listener = try HostListener()
        defer { listener.stop() }
        let api = try SimService()
        defer { api.stop() }
        let pool = pool("probe", size: 1, extra: "  network: {mode: user, ports: [8080]}")
        try apply(box, pool)
        let vm = try #require(try box.ids(pool: "probe").first)
        var targets: [(name: String, host: String, port: Int)] = [
            ("the host's loopback (10.0.2.2)", "10.0.2.2", listener.port),
            ("the host's own address \(listener.hostAddress)", listener.hostAddress, listener.port),
            ("vmpool's HTTP API", "10.0.2.2", api.port),
            ("a link-local address", OutsideNetwork.linkLocal, outside.port),
        ]
        if let store = ProcessInfo.processInfo.environment["VMPOOL_TEST_POSTGRES"],
            let port = URLComponents(string: store)?.port
        {
            targets.append(("the PostgreSQL store", "10.0.2.2", port))
        } else {
            print("walls: no PostgreSQL server in this run (VMPOOL_TEST_POSTGRES unset); the store is not tried")
        }
        var escaped: [String] = []
        for target in targets {
            let reached = try Self.reaches(box, vm, target.host, target.port)
            if reached { escaped.append(target.name) }
        }
        #expect(escaped.isEmpty, "the guest reached \(escaped)")
        #expect(listener.accepted == 0, "the host's listener saw \(listener.accepted) connections")
        #expect(try api.leases() == 0, "a lease was taken over the API from inside a guest")
        print(
            "walls: \(targets.count - escaped.count) of \(targets.count) ways to the host were closed: \(targets.map(\.name))"
        )
        // Egress outside the host, and the forwarded port into the guest, still work.
        #expect(try Self.reaches(box, vm, outside.address, outside.port), "egress to \(outside.address) was cut")

        // The same tries with the walls off reach the host: the checks above can fail.
        let open = try QemuSandbox()
        defer { open.tearDown() }
        let unwalled = ["VMPOOL_WALLS": "0"]
        let applied = try open.run(["apply", "-f", open.write(pool)], environment: unwalled)
        #expect(applied.status == 0, "\(applied.stderr)")
        let other = try #require(try open.ids(pool: "probe").first)
        #expect(try Self.reaches(open, other, "10.0.2.2", listener.port), "without walls the host's loopback answers")
        #expect(
            try Self.reaches(open, other, OutsideNetwork.linkLocal, outside.port), "without walls link-local answers")
    }

    /// `template.shareMemory: false`: each clone runs on a private copy of the template's memory
    /// (a memfd of its own), maps nothing of the template's file, and works; the pool keeps
    /// no standbys (they would map the file).
    @Test func clonesThatMustNotShareMemoryGetACopyOfTheirOwn() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        try apply(box, pool("private", size: 2, extra: "  template: {shareMemory: false}"))
        let vms = try box.vms(pool: "private")
        #expect(vms.count == 2)
        for vm in vms {
            let id = try #require(vm["id"] as? String)
            let pid = try #require(vm["pid"] as? Int)
            let maps = (try? String(contentsOfFile: "/proc/\(pid)/maps", encoding: .utf8)) ?? ""
            #expect(!maps.contains(".mem"), "\(id) maps the template's memory file")
            #expect(maps.contains("memfd:vmpool-ram"), "\(id) has no memory copy of its own")
            let hostname = try box.exec(id, ["cat", "/proc/sys/kernel/hostname"])
            #expect(hostname.stdout == id + "\n", "\(hostname.stdout)\(hostname.stderr)")
        }
        let standbys = try box.run(["describe", "pool", "private"])
        #expect(standbys.stdout.contains("Standbys:    0 ready"), "\(standbys.stdout)")
        // The sharing pool next to it maps the file, as before.
        try apply(box, pool("shared", size: 1), name: "shared.yaml")
        let shared = try #require(try box.vms(pool: "shared").first?["pid"] as? Int)
        let maps = (try? String(contentsOfFile: "/proc/\(shared)/maps", encoding: .utf8)) ?? ""
        #expect(maps.contains(".mem"), "a sharing clone maps the template's file")
    }

    /// A pool's egress changes in place: the same running VM reaches a network outside the host
    /// with `egress: all`, nothing with `none`, only the listed network and port with a list.
    @Test func egressChangesApplyToRunningVMs() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let outside = try OutsideNetwork(box, suffix: "e")
        defer { outside.remove() }
        let other = try HostListener()
        defer { other.stop() }
        func egress(_ value: String) -> String {
            pool("out", size: 1, extra: "  network: {mode: user, egress: \(value)}")
        }
        try apply(box, egress("all"))
        let vm = try #require(try box.ids(pool: "out").first)
        // Leased, so that these checks do not make it a VM to replace.
        #expect(try box.run(["lease", "out", "--holder", "egress-test"]).stdout.contains(vm))
        #expect(try Self.reaches(box, vm, outside.address, outside.port), "egress all")
        try apply(box, egress("none"))
        #expect(try box.ids(pool: "out").contains(vm), "the VM was kept")
        #expect(try !Self.reaches(box, vm, outside.address, outside.port), "egress none still reached out")
        try apply(box, egress("[\(outside.address)/32:\(outside.port)]"))
        #expect(try box.ids(pool: "out").contains(vm))
        #expect(try Self.reaches(box, vm, outside.address, outside.port), "the listed network and port")
        try apply(box, egress("[\(outside.address)/32:\(outside.port + 1)]"))
        #expect(try !Self.reaches(box, vm, outside.address, outside.port), "a port that is not listed")
    }

    /// Two pools on one bridge do not reach each other; a pool with `isolate: true` does not
    /// reach even its own VMs; the host reaches all of them.
    @Test(.enabled(if: geteuid() == 0, "bridge mode needs root"))
    func poolsOnABridgeAreWalledFromEachOther() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let net = "network: {mode: bridge, bridge: vmpwall0, subnet: 10.89.0.0/24"
        let text = [
            pool("red", size: 2, extra: "  \(net)}"), pool("blue", size: 1, extra: "  \(net)}"),
            pool("lone", size: 2, extra: "  \(net), isolate: true}"),
        ].joined(separator: "\n---\n")
        try apply(box, text)
        defer { _ = try? box.run(["delete", "red", "blue", "lone"]) }
        let vms = try box.vms()
        func addresses(_ pool: String) -> [(id: String, address: String)] {
            vms.filter { $0["pool"] as? String == pool }.compactMap { vm in
                guard let id = vm["id"] as? String, let address = vm["address"] as? String else { return nil }
                return (id, address)
            }
        }
        let red = addresses("red")
        let blue = addresses("blue")
        let lone = addresses("lone")
        #expect(red.count == 2 && blue.count == 1 && lone.count == 2)
        func pings(_ from: String, _ to: String) throws -> Bool {
            try agentExec(box, from, ["ping", "-c", "1", "-W", "2", to]).status == 0
        }
        var broken: [String] = []
        if try !pings(red[0].id, red[1].address) { broken.append("red to red was cut") }
        if try pings(red[0].id, blue[0].address) { broken.append("red reached blue") }
        if try pings(blue[0].id, red[1].address) { broken.append("blue reached red") }
        if try pings(lone[0].id, lone[1].address) { broken.append("an isolated VM reached its pool's other VM") }
        if try pings(lone[0].id, red[0].address) { broken.append("an isolated VM reached red") }
        // A VM cannot pass for another: with blue's address, red's VM still reaches nothing of blue.
        let spoofed = try agentExec(
            box, red[0].id,
            [
                "sh", "-c",
                "ip addr add \(blue[0].address)/32 dev eth0 && ping -c 1 -W 2 -I \(blue[0].address) \(red[1].address)",
            ])
        if spoofed.status == 0 { broken.append("a spoofed address got through") }
        #expect(broken.isEmpty, "\(broken)")
        print("walls: bridge checks failed: \(broken.count) of 6 (\(broken))")
    }

    /// QEMU runs as a uid of its own per VM, never root, under the full seccomp sandbox with
    /// no_new_privs; a VM's uid can open nothing of another VM: not its files by path, not its
    /// descriptors through /proc.
    @Test func eachQEMUIsItsOwnUnprivilegedUserAndReachesNoOtherVMsFiles() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        try apply(box, pool("priv", size: 2, extra: "  disks: [{name: data, size: 64Mi}]"))
        let vms = try box.vms(pool: "priv")
        let pids = vms.compactMap { $0["pid"] as? Int }
        #expect(pids.count == 2)
        var uids: [uid_t] = []
        for pid in pids {
            let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
            func field(_ name: String) -> String {
                status.split(separator: "\n").first { $0.hasPrefix(name + ":") }.map {
                    String($0.dropFirst(name.count + 1)).trimmingCharacters(in: .whitespaces)
                } ?? ""
            }
            let uid = uid_t(field("Uid").split(separator: "\t").first ?? "") ?? 0
            uids.append(uid)
            #expect(uid != 0, "QEMU \(pid) runs as root")
            #expect(field("Seccomp") == "2", "QEMU \(pid) has no seccomp filter")
            #expect(field("NoNewPrivs") == "1")
            #expect(field("CapEff") == "0000000000000000", "QEMU \(pid) has capabilities: \(field("CapEff"))")
            let cmdline = String(
                decoding: FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") ?? Data(), as: UTF8.self)
            #expect(cmdline.contains("spawn=deny") && cmdline.contains("elevateprivileges=deny"))
        }
        #expect(Set(uids).count == 2, "two VMs share a uid: \(uids)")
        // As the first VM's uid, try the second VM's overlay by path and by its QEMU's descriptors.
        let target = pids[1]
        let overlay = try #require(
            FileManager.default.enumerator(atPath: box.state + "/run")?.compactMap { $0 as? String }.first {
                $0.hasSuffix("disk-data.qcow2")
            })
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(target)/fd")) ?? []
        #expect(!fds.isEmpty)
        var opened: [String] = []
        for path in [box.state + "/run/" + overlay] + fds.map({ "/proc/\(target)/fd/\($0)" }) {
            let result = try RunningCommand(
                path: "/usr/bin/setpriv",
                arguments: [
                    "--reuid=\(uids[0])", "--regid=\(uids[0])", "--clear-groups", "--", "/bin/sh", "-c",
                    "exec 3<\"$1\"", "sh", path,
                ], environment: ["PATH": "/usr/bin:/bin"]
            ).wait()
            if result.status == 0 { opened.append(path) }
        }
        #expect(opened.isEmpty, "VM \(uids[0]) opened another VM's \(opened)")
        print("walls: another VM's uid opened \(opened.count) of \(fds.count + 1) of a VM's files and descriptors")
    }

    /// A guest that spins both its vCPUs and fills its memory stays inside its cgroup: its
    /// QEMU's CPU time stays within its quota, its memory within its limit, nothing is killed
    /// outside it, and the VM next to it keeps answering.
    @Test(.enabled(if: geteuid() == 0, "cgroups need root"))
    func aGuestThatSpinsAndFillsItsMemoryIsContained() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        try apply(box, pool("noisy", size: 2).replacingOccurrences(of: "vcpus: 1", with: "vcpus: 2"))
        let leased = try (0..<2).map { _ in
            try box.run(["lease", "noisy", "--holder", "hostile"]).stdout.trimmingCharacters(
                in: .whitespacesAndNewlines)
        }
        let (noisy, neighbour) = (leased[0], leased[1])
        let pid = try #require(try box.vms().first { $0["id"] as? String == noisy }?["pid"] as? Int)
        let describe = try box.run(["describe", "vm", noisy]).stdout
        let limitLine = describe.split(separator: "\n").first { $0.contains("memory: ") && $0.contains("MiB") }
        let limitMiB = limitLine.flatMap { line in
            line.split(separator: " ").firstIndex(of: "memory:").flatMap { Int(line.split(separator: " ")[$0 + 1]) }
        }
        #expect(limitMiB != nil, "describe shows no memory limit: \(describe)")
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        func cpuSeconds() -> Double {
            let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
            let fields = stat.split(separator: ")").last?.split(separator: " ") ?? []
            return fields.count > 13 ? (Double(fields[11]) ?? 0) / ticks + (Double(fields[12]) ?? 0) / ticks : 0
        }
        func rssMiB() -> Int {
            let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
            let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            return (fields.count > 1 ? Int(fields[1]) ?? 0 : 0) / 1024
        }
        // Both vCPUs spin, and the guest fills most of its memory (a tmpfs, which no guest
        // process owns: the guest's own OOM killer would pick the agent).
        let hostile = try box.binary.start([
            "exec", noisy, "--state-dir", box.state, "--", "sh", "-c",
            "mkdir -p /tmp/fill && mount -t tmpfs -o size=1g fill /tmp/fill"
                + " && dd if=/dev/zero of=/tmp/fill/zeros bs=1M count=128 2>/dev/null;"
                + " for i in 1 2; do (while :; do :; done) & done; sleep 600",
        ])
        defer {
            hostile.kill(SIGKILL)
            _ = hostile.wait()
        }
        // Wait until it has filled its memory and spins: QEMU above 180 MiB, and busier than
        // most of a CPU over a second (an idle guest takes a twentieth; the host's other work
        // shares its two CPUs).
        let deadline = Date().addingTimeInterval(120)
        var spinning = false
        while Date() < deadline && !spinning {
            let before = cpuSeconds()
            let sampled = Date()
            _ = try box.exec(neighbour, ["true"])
            while Date().timeIntervalSince(sampled) < 1 { _ = try box.exec(neighbour, ["true"]) }
            let rate = (cpuSeconds() - before) / Date().timeIntervalSince(sampled)
            spinning = rssMiB() >= 180 && rate >= 0.8
        }
        #expect(spinning, "the hostile guest never filled its memory and spun (\(rssMiB()) MiB)")
        let startCPU = cpuSeconds()
        let started = Date()
        var answered = 0
        var tried = 0
        while Date().timeIntervalSince(started) < 5 {
            tried += 1
            if try box.exec(neighbour, ["true"]).status == 0 { answered += 1 }
        }
        let elapsed = Date().timeIntervalSince(started)
        let used = cpuSeconds() - startCPU
        #expect(answered == tried, "the neighbour answered \(answered) of \(tried) execs while the other VM spun")
        // Two vCPUs' quota is two CPUs: within it, with a tenth of a CPU for timing slack.
        #expect(used <= elapsed * 2.1, "QEMU used \(used) s of CPU in \(elapsed) s")
        let rss = rssMiB()
        if let limitMiB { #expect(rss <= limitMiB, "QEMU holds \(rss) MiB over its \(limitMiB) MiB limit") }
        print(
            "walls: a spinning, filling VM used \(String(format: "%.2f", used)) s of CPU in \(String(format: "%.2f", elapsed)) s,"
                + " holds \(rss) MiB (limit \(limitMiB ?? 0) MiB); its neighbour answered \(answered) of \(tried)")
    }

    /// Whether the guest's `nc` gets the listener's greeting from HOST:PORT within 5 s.
    static func reaches(_ box: QemuSandbox, _ vm: String, _ host: String, _ port: Int) throws -> Bool {
        let result = try box.exec(vm, ["sh", "-c", "nc -w 5 \(host) \(port) </dev/null"])
        return result.stdout.contains("vmpool-listener")
    }
}

/// A TCP listener on every address of the host (0.0.0.0) that greets each client with
/// "vmpool-listener" and counts them.
final class HostListener: @unchecked Sendable {
    let port: Int
    let fd: Int32
    private let count = Mutex(0)
    private let done = Atomic<Bool>(false)
    /// A non-loopback IPv4 address of this host.
    let hostAddress: String

    var accepted: Int { count.withLock { $0 } }

    init() throws {
        let socketFD = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        fd = socketFD
        var one: Int32 = 1
        setsockopt(socketFD, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(socketFD, $0, length) == 0 && listen(socketFD, 16) == 0 && getsockname(socketFD, $0, &length) == 0
            }
        }
        guard bound else { throw SandboxError("cannot listen: \(String(cString: strerror(errno)))") }
        port = Int(UInt16(bigEndian: address.sin_port))
        hostAddress = Self.nonLoopbackAddress() ?? "127.0.0.1"
        Thread.detachNewThread { [self] in
            while !done.load(ordering: .relaxed) {
                var pfd = pollfd(fd: socketFD, events: Int16(POLLIN), revents: 0)
                guard poll(&pfd, 1, 100) > 0 else { continue }
                let client = accept(socketFD, nil, nil)
                guard client >= 0 else { continue }
                count.withLock { $0 += 1 }
                _ = "vmpool-listener\n".withCString { send(client, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
                close(client)
            }
        }
    }

    func stop() {
        done.store(true, ordering: .relaxed)
        close(fd)
    }

    static func nonLoopbackAddress() -> String? {
        var list: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&list) == 0, let first = list else { return nil }
        defer { freeifaddrs(list) }
        var entry: UnsafeMutablePointer<ifaddrs>? = first
        while let current = entry {
            defer { entry = current.pointee.ifa_next }
            guard let addr = current.pointee.ifa_addr, addr.pointee.sa_family == sa_family_t(AF_INET) else { continue }
            let name = String(cString: current.pointee.ifa_name)
            guard name != "lo", !name.hasPrefix("vmp"), !name.hasPrefix("veth") else { continue }
            var text = [CChar](repeating: 0, count: 64)
            var sin = addr.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_addr }
            inet_ntop(AF_INET, &sin, &text, 64)
            return String(cString: text)
        }
        return nil
    }
}

/// A network outside the host: a namespace behind a veth pair, with a listener at an
/// ordinary address and at the link-local metadata address, routed from the host.
struct OutsideNetwork {
    static let linkLocal = "169.254.169.254"
    let namespace: TestNamespace
    let address: String
    let port = 8471
    let host: String
    let veth: String

    init(_ box: QemuSandbox, suffix: String) throws {
        namespace = try TestNamespace(box, suffix: suffix)
        let n = Int(getpid() % 200) + 20
        address = "10.231.\(n).2"
        host = "10.231.\(n).1"
        veth = "vmpo\(getpid() % 100_000)"
        let ip = "/usr/sbin/ip"
        func run(_ arguments: [String]) throws {
            let result = try RunningCommand(path: ip, arguments: arguments, environment: [:]).wait()
            guard result.status == 0 else {
                throw SandboxError("ip \(arguments.joined(separator: " ")): \(result.stderr)")
            }
        }
        _ = try? RunningCommand(path: ip, arguments: ["link", "del", veth], environment: [:]).wait()
        try run(["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace.name])
        try run(["address", "add", "\(host)/30", "dev", veth])
        try run(["link", "set", veth, "up"])
        try run(["route", "replace", "\(Self.linkLocal)/32", "via", address])
        for command in [
            ["ip", "address", "add", "\(address)/30", "dev", "eth0"],
            ["ip", "address", "add", "\(Self.linkLocal)/32", "dev", "lo"],
            ["ip", "link", "set", "eth0", "up"], ["ip", "route", "add", "default", "via", host],
        ] {
            let result = try namespace.run(command)
            guard result.status == 0 else { throw SandboxError("\(command): \(result.stderr)") }
        }
        // A greeting on every address of the namespace.
        let server =
            "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            + "s.bind(('0.0.0.0', \(port))); s.listen(16)\nwhile True:\n    c, _ = s.accept(); c.sendall(b'vmpool-listener\\n'); c.close()\n"
        listener = try RunningCommand(
            path: ip, arguments: ["netns", "exec", namespace.name, "python3", "-c", server],
            environment: ProcessInfo.processInfo.environment)
        // Up when the host reaches it.
        let deadline = Date().addingTimeInterval(20)
        var up = false
        while Date() < deadline && !up {
            let probe = try RunningCommand(
                path: "/usr/bin/env",
                arguments: [
                    "python3", "-c",
                    "import socket,sys; s=socket.create_connection(('\(address)', \(port)), 1); sys.exit(0 if b'vmpool' in s.recv(64) else 1)",
                ], environment: ProcessInfo.processInfo.environment
            ).wait()
            up = probe.status == 0
        }
        guard up else { throw SandboxError("the outside listener did not come up") }
    }

    let listener: RunningCommand

    func remove() {
        listener.kill(SIGKILL)
        _ = listener.wait()
        _ = try? RunningCommand(
            path: "/usr/sbin/ip", arguments: ["route", "del", "\(Self.linkLocal)/32"], environment: [:]
        ).wait()
        _ = try? RunningCommand(path: "/usr/sbin/ip", arguments: ["link", "del", veth], environment: [:]).wait()
        namespace.remove(deleting: [])
    }
}

/// `vmpool reconcile --every 1s --listen 127.0.0.1:PORT` on a sim state dir with one pool:
/// the lease API a guest must not reach.
final class SimService {
    let dir = TemporaryDirectory()
    let port: Int
    let command: RunningCommand
    let binary = VmpoolBinary(environment: ["VMPOOL_DRIVER": "sim"])

    init() throws {
        let manifest = dir.write(
            "pool.yaml",
            "apiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: web}\nspec: {size: 1, vcpus: 1, memory: 64Mi}\n")
        _ = try binary.run(["apply", "-f", manifest, "--state-dir", dir.path + "/s"])
        port = Int.random(in: 20000...29999)
        command = try binary.start([
            "reconcile", "--every", "1s", "--listen", "127.0.0.1:\(port)", "--state-dir", dir.path + "/s",
        ])
        let deadline = Date().addingTimeInterval(20)
        var up = false
        while Date() < deadline && !up {
            let probe = try RunningCommand(
                path: "/usr/bin/env",
                arguments: ["python3", "-c", "import socket; socket.create_connection(('127.0.0.1', \(port)), 1)"],
                environment: ProcessInfo.processInfo.environment
            ).wait()
            up = probe.status == 0
        }
        guard up else { throw SandboxError("the API did not come up on \(port)") }
    }

    /// VMs leased in the sim state dir.
    func leases() throws -> Int {
        let result = try binary.run(["get", "vms", "-o", "json", "--state-dir", dir.path + "/s"])
        let rows = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [[String: Any]] ?? []
        return rows.filter { $0["lease"] is [String: Any] }.count
    }

    func stop() {
        command.kill(SIGTERM)
        _ = command.wait()
        dir.remove()
    }
}
