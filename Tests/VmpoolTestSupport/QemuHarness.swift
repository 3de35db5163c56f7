import Foundation

/// Where the QEMU integration tests find what they need, and whether they must run.
public enum QemuEnvironment {
    /// `VMPOOL_TEST_KERNEL`, else a kernel scripts/fetch-kernel left in `.cache/kernel`.
    public static let kernel: String? = {
        if let path = ProcessInfo.processInfo.environment["VMPOOL_TEST_KERNEL"], !path.isEmpty { return path }
        let cache = repositoryRoot + "/.cache/kernel"
        let packages = ((try? FileManager.default.contentsOfDirectory(atPath: cache)) ?? []).sorted().reversed()
        for package in packages {
            let boot = cache + "/" + package + "/boot"
            if let kernel = ((try? FileManager.default.contentsOfDirectory(atPath: boot)) ?? [])
                .first(where: { $0.hasPrefix("vmlinuz-") })
            {
                return boot + "/" + kernel
            }
        }
        return nil
    }()

    public static let qemuInstalled = FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-system-x86_64")
    public static let busyboxInstalled = FileManager.default.isExecutableFile(atPath: "/bin/busybox")

    /// CI sets VMPOOL_REQUIRE_QEMU=1: there a missing part is a failure, never a skip.
    public static let required = ProcessInfo.processInfo.environment["VMPOOL_REQUIRE_QEMU"] == "1"

    /// Whether the integration tests run; when they do not, `skipReason` says why.
    public static var available: Bool { required || skipReason == nil }

    /// Why a test of KVM itself (the accelerator probe) cannot run here, or `nil`. Not a part
    /// CI must have: without KVM every other QEMU test still runs, under TCG.
    public static var kvmSkipReason: String? {
        access("/dev/kvm", F_OK) == 0 ? nil : "no /dev/kvm on this machine: the KVM probe is not run here"
    }

    public static var skipReason: String? {
        if !qemuInstalled { return "qemu-system-x86_64 is not installed (scripts/test installs it)" }
        if !busyboxInstalled { return "busybox-static is not installed (scripts/test installs it)" }
        if kernel == nil { return "no guest kernel: run scripts/fetch-kernel or set VMPOOL_TEST_KERNEL" }
        return nil
    }
}

/// A state dir with the default guest image built, driven through the `vmpool` binary on QEMU.
public struct QemuSandbox {
    public let dir: TemporaryDirectory
    public let binary: VmpoolBinary
    public var state: String { dir.path + "/s" }

    public init() throws {
        dir = TemporaryDirectory(prefix: "vmq")
        binary = VmpoolBinary(environment: ["VMPOOL_DRIVER": "qemu", "VMPOOL_ACCEL": "tcg"])
        guard let kernel = QemuEnvironment.kernel else {
            throw SandboxError("no guest kernel: \(QemuEnvironment.skipReason ?? "")")
        }
        let built = try binary.run(["image", "build", "--kernel", kernel, "--state-dir", state])
        guard built.status == 0 else { throw SandboxError("image build failed: \(built.stderr)") }
    }

    @discardableResult
    public func run(_ arguments: [String], environment: [String: String] = [:]) throws -> CommandResult {
        try binary.run(arguments + ["--state-dir", state], environment: environment)
    }

    /// `vmpool get vms -o json`.
    public func vms(pool: String? = nil) throws -> [[String: Any]] {
        var arguments = ["get", "vms", "-o", "json"]
        if let pool { arguments += ["--pool", pool] }
        let result = try run(arguments)
        guard result.status == 0 else { throw SandboxError("get vms failed: \(result.stderr)") }
        return (try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [[String: Any]]) ?? []
    }

    /// `vmpool exec VM -- ARGV` with optional standard input.
    @discardableResult
    public func exec(_ vm: String, _ argv: [String], input: String? = nil, options: [String] = []) throws
        -> CommandResult
    {
        try binary.run(["exec", vm, "--state-dir", state] + options + ["--"] + argv, input: input)
    }

    /// The ids of the VMs of `pool`, oldest first.
    public func ids(pool: String? = nil) throws -> [String] {
        try vms(pool: pool).compactMap { $0["id"] as? String }
    }

    /// Whether `vm`'s QEMU runs under TCG (software emulation), from its command line.
    public func underTCG(_ vm: String) throws -> Bool {
        let pid = try vms().first { $0["id"] as? String == vm }?["pid"] as? Int
        let data = pid.flatMap { FileManager.default.contents(atPath: "/proc/\($0)/cmdline") } ?? Data()
        return String(decoding: data, as: UTF8.self).contains("-accel\u{0}tcg")
    }

    /// Processes whose command line names this sandbox's run dir: the QEMUs vmpool started here.
    public func qemuProcesses() -> [Int32] {
        let marker = state + "/run/"
        return ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { entry in
            guard let pid = Int32(entry),
                let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"),
                String(decoding: data, as: UTF8.self).contains(marker)
            else { return nil }
            let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
            return stat.contains(") Z") ? nil : pid
        }
    }

    /// Stops every VM (delete of every pool) and removes the directory.
    public func tearDown() {
        if let pools = try? run(["get", "pools", "-o", "json"]),
            let list = try? JSONSerialization.jsonObject(with: Data(pools.stdout.utf8)) as? [[String: Any]]
        {
            let names = list.compactMap { $0["name"] as? String }
            if !names.isEmpty { _ = try? run(["delete"] + names) }
        }
        for pid in qemuProcesses() { kill(pid, SIGKILL) }
        dir.remove()
    }

    /// Writes a manifest for `spec` into the sandbox.
    public func write(_ text: String, as name: String = "pool.yaml") -> String {
        dir.write(name, text)
    }
}

public struct SandboxError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
