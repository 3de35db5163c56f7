import Foundation
import VmpoolDriver
import VmpoolSpec

/// A fresh private directory under the system temp dir, removed by `remove()`.
public struct TemporaryDirectory: Sendable {
    public let path: String

    public init(prefix: String = "vmpool-test") {
        let template = NSTemporaryDirectory() + "\(prefix)-XXXXXX"
        var bytes = Array(template.utf8CString)
        let made = bytes.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        path = made.map { String(cString: $0) } ?? (NSTemporaryDirectory() + "\(prefix)-\(UUID().uuidString)")
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    public func remove() { try? FileManager.default.removeItem(atPath: path) }

    /// Writes `contents` to `name` inside the directory and returns its path.
    @discardableResult
    public func write(_ name: String, _ contents: String) -> String {
        let file = path + "/" + name
        try? FileManager.default.createDirectory(
            atPath: (file as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: file, contents: Data(contents.utf8))
        return file
    }

    /// Names of the entries in the directory (not recursive).
    public var entries: [String] { ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).sorted() }
}

/// Pool specs for tests, with the defaults a manifest would get.
public func pool(
    _ name: String = "web", size: Int = 3, vcpus: Int = 1, memoryMiB: Int = 256, maxVcpus: Int? = 4,
    maxMemoryMiB: Int? = 1024, boot: BootMode = .cold, state: DesiredState = .running, warm: Int = 0
) -> PoolSpec {
    PoolSpec(
        name: name, size: size, vcpus: vcpus, memoryMiB: memoryMiB, maxVcpus: maxVcpus, maxMemoryMiB: maxMemoryMiB,
        boot: boot, state: state, warm: warm)
}

/// The image tests give VMs when they do not care which.
public let testImage = BootImage(kernel: "sim:kernel", initrd: "sim:initrd", cmdline: "console=ttyS0")

/// A manifest document for `spec`, as a user would write it.
public func manifest(_ spec: PoolSpec) -> String {
    var lines = [
        "apiVersion: vmpool/v1", "kind: Pool", "metadata:", "  name: \(spec.name)", "spec:",
        "  size: \(spec.size)", "  vcpus: \(spec.vcpus)", "  memory: \(spec.memoryMiB)Mi",
        "  maxVcpus: \(spec.maxVcpus)", "  maxMemory: \(spec.maxMemoryMiB)Mi", "  boot: \(spec.boot.rawValue)",
        "  state: \(spec.state.rawValue)", "  warm: \(spec.warm)",
    ]
    if let image = spec.image {
        lines.append("  image:")
        if let kernel = image.kernel { lines.append("    kernel: \(kernel)") }
        if let initrd = image.initrd { lines.append("    initrd: \(initrd)") }
        if let cmdline = image.cmdline { lines.append("    cmdline: \"\(cmdline)\"") }
    }
    if !spec.disks.isEmpty {
        lines.append("  disks:")
        for disk in spec.disks {
            lines.append("    - name: \(disk.name)")
            if let image = disk.image { lines.append("      image: \(image)") }
            if let size = disk.sizeMiB { lines.append("      size: \(size)Mi") }
        }
    }
    if let network = spec.network {
        lines += ["  network:", "    mode: \(network.mode.rawValue)"]
        if !network.ports.isEmpty {
            lines.append("    ports: [\(network.ports.map(String.init).joined(separator: ", "))]")
        }
        if let bridge = network.bridge { lines.append("    bridge: \(bridge)") }
        if let subnet = network.subnet { lines.append("    subnet: \(subnet)") }
        switch network.egress {
        case .all: break
        case .none: lines.append("    egress: none")
        case .allow(let rules): lines.append("    egress: [\(rules.map { "\"\($0)\"" }.joined(separator: ", "))]")
        }
        if network.isolate { lines.append("    isolate: true") }
    }
    if !spec.limits.isEmpty {
        lines.append("  limits:")
        if let cpu = spec.limits.cpuPercent { lines.append("    cpu: \(cpu)%") }
        if let weight = spec.limits.ioWeight { lines.append("    ioWeight: \(weight)") }
    }
    if !spec.template.isDefault { lines += ["  template:", "    shareMemory: \(spec.template.shareMemory)"] }
    return lines.joined(separator: "\n") + "\n"
}

/// The repository root, found from this file's location.
public let repositoryRoot: String = {
    var url = URL(fileURLWithPath: #filePath)
    while url.path != "/" {
        url.deleteLastPathComponent()
        if FileManager.default.fileExists(atPath: url.path + "/Package.swift") { return url.path }
    }
    return FileManager.default.currentDirectoryPath
}()
