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
                environment: box.binary.environment
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
            """
            apiVersion: vmpool/v1
            kind: Pool
            metadata: {name: \(name)}
            spec:
              size: \(size)
              vcpus: 1
              memory: 512Mi
              boot: \(boot)
              image: {cmdline: "console=ttyS0 quiet root=/dev/vda"}
              disks:
                - {name: root, image: \(disk), size: 4Gi}
            """
        }
        _ = try apply(box, spec("deb", 2, "template") + "\n---\n" + spec("debcold", 1, "cold"))
        var names = Set<String>()
        var machines = Set<String>()
        for vm in try box.ids() {
            let python = try box.exec(vm, ["python3", "-c", "import sys; print(sys.version_info.major)"])
            #expect(python.stdout == "3\n", "\(vm): \(python.stdout)\(python.stderr)")
            #expect(try box.exec(vm, ["hostname"]).stdout == vm + "\n")
            machines.insert(try box.exec(vm, ["cat", "/etc/machine-id"]).stdout)
            names.insert(try box.exec(vm, ["hostname"]).stdout)
            let size = try box.exec(vm, ["cat", "/sys/block/vda/size"]).stdout
            #expect(size == "\(4 << 21)\n", "\(vm): the root disk is 4 GiB: \(size)")
            let guest =
                Double(try box.exec(vm, ["date", "+%s.%N"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
            #expect(abs(guest - Date().timeIntervalSince1970) < 2)
        }
        #expect(names.count == 3 && machines.count == 3, "machine ids: \(machines)")
        // The base image is never written.
        let before = try FileManager.default.attributesOfItem(atPath: disk)[.modificationDate] as? Date
        _ = try box.exec(try box.ids()[0], ["sh", "-c", "echo data > /root/written; sync"])
        let after = try FileManager.default.attributesOfItem(atPath: disk)[.modificationDate] as? Date
        #expect(before == after)
    }

    @Test func userModeForwardsAPortToAListenerInTheGuest() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        _ = try apply(
            box,
            """
            apiVersion: vmpool/v1
            kind: Pool
            metadata: {name: web}
            spec:
              size: 2
              vcpus: 1
              memory: 256Mi
              boot: template
              network: {ports: [8080, 22]}
            """)
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
        #expect(try box.run(["delete", "web"]).status == 0)
        #expect(
            try StateStore(directory: box.state).allocations().ports.isEmpty, "forwarded ports are freed with their VMs"
        )
        for port in hostPorts { #expect(LocalPorts.isFree(port), "port \(port) is still taken after delete") }
    }

    @Test(.enabled(if: geteuid() == 0, "bridge mode needs root (network namespaces, taps)"))
    func bridgedClonesReachEachOtherAndTheHostByTheirOwnAddresses() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let namespace = "vmpt\(getpid() % 100_000)"
        _ = try RunningCommand(path: "/usr/sbin/ip", arguments: ["netns", "add", namespace], environment: [:]).wait()
        defer {
            _ = try? RunningCommand(
                path: "/usr/sbin/ip",
                arguments: ["netns", "exec", namespace, box.binary.path, "delete", "lab", "--state-dir", box.state],
                environment: box.binary.environment
            ).wait()
            _ = try? RunningCommand(path: "/usr/sbin/ip", arguments: ["netns", "del", namespace], environment: [:])
                .wait()
        }
        let inside = ["/usr/sbin/ip", "netns", "exec", namespace]
        func run(_ arguments: [String]) throws -> CommandResult {
            try RunningCommand(
                path: inside[0], arguments: Array(inside.dropFirst()) + arguments, environment: box.binary.environment
            ).wait()
        }
        _ = try apply(
            box,
            """
            apiVersion: vmpool/v1
            kind: Pool
            metadata: {name: lab}
            spec:
              size: 2
              vcpus: 1
              memory: 256Mi
              boot: template
              network: {mode: bridge, bridge: vmptest0, subnet: 10.88.0.0/24}
            """, through: inside)
        let vms = try box.vms()
        let addresses = vms.compactMap { $0["address"] as? String }
        #expect(Set(addresses).count == 2 && addresses.allSatisfy { $0.hasPrefix("10.88.0.") && $0 != "10.88.0.1" })
        var macs = Set<String>()
        for (index, vm) in vms.enumerated() {
            let id = try #require(vm["id"] as? String)
            macs.insert(try box.exec(id, ["cat", "/sys/class/net/eth0/address"]).stdout)
            #expect(
                try box.exec(id, ["ip", "-4", "-o", "addr", "show", "eth0"]).stdout.contains(addresses[index] + "/24"))
            let other = addresses[1 - index]
            #expect(try box.exec(id, ["ping", "-c", "1", "-W", "3", other]).status == 0, "\(id) cannot reach \(other)")
            #expect(
                try box.exec(id, ["ping", "-c", "1", "-W", "3", "10.88.0.1"]).status == 0, "\(id) cannot reach the host"
            )
            #expect(
                try run(["busybox", "ping", "-c", "1", "-W", "3", addresses[index]]).status == 0,
                "the host cannot reach \(id)")
        }
        #expect(macs.count == 2)
        #expect(try run(["ip", "link", "show", "vmptest0"]).status == 0)
        #expect(try run([box.binary.path, "delete", "lab", "--state-dir", box.state]).status == 0)
        #expect(
            try run(["ip", "link", "show", "vmptest0"]).status != 0,
            "the bridge vmpool made is removed with its last pool")
        let links = try run(["ip", "-o", "link"]).stdout
        #expect(!links.contains("vmp"), "a tap was left: \(links)")
    }
}

/// `GET /` on 127.0.0.1:`port` with a raw socket; the response as text.
func httpGet(port: Int) throws -> String {
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
    let request = "GET / HTTP/1.0\r\nHost: vm\r\n\r\n"
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
