import Foundation
import VmpoolDriver

/// The accelerator a VM actually runs with.
enum ResolvedAccelerator: String, Sendable {
    case kvm
    case tcg
}

/// Decides `--accel auto`: KVM only where it really runs guests.
///
/// Some hosts have a /dev/kvm on which QEMU starts and even runs the firmware, but the Linux
/// guest never gets past its early setup (nested virtualisation that hangs). The probe boots
/// the guest kernel under KVM with an early serial console and waits briefly for the
/// kernel's banner; silence means TCG. Under TCG the banner appears in about 0.3 s, so the
/// wait is short. The answer is cached in the state dir per host boot and kernel.
enum AcceleratorProbe {
    static let probeTime: Duration = .milliseconds(1500)

    /// The probe runs like a VM of this state dir (its run dir is in its command line), so a
    /// vmpool killed while probing leaves a process the next run finds and stops as an orphan.
    static let probeID = "kvm-probe"

    static func resolve(
        _ requested: Accelerator, binary: String, paths: QemuPaths, kernel: String
    ) -> ResolvedAccelerator {
        switch requested {
        case .kvm: return .kvm
        case .tcg: return .tcg
        case .auto: break
        }
        guard access("/dev/kvm", R_OK | W_OK) == 0, let path = QemuProcess.resolve(binary) else { return .tcg }
        let cache = paths.stateDirectory + "/accel"
        let bootID =
            (try? String(contentsOfFile: "/proc/sys/kernel/random/boot_id", encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines) ?? "unknown"
        let key = bootID + " " + QemuPaths.hash(kernel, hexDigits: 12)
        if let text = try? String(contentsOfFile: cache, encoding: .utf8) {
            let line = text.trimmingCharacters(in: .whitespacesAndNewlines)
            if let space = line.firstIndex(of: " "), String(line[line.index(after: space)...]) == key,
                let value = ResolvedAccelerator(rawValue: String(line[..<space]))
            {
                return value
            }
        }
        let result: ResolvedAccelerator = kvmBootsKernel(qemu: path, kernel: kernel, paths: paths) ? .kvm : .tcg
        try? "\(result.rawValue) \(key)\n".write(toFile: cache, atomically: true, encoding: .utf8)
        return result
    }

    /// Boots `kernel` under KVM for at most `probeTime`, watching for "Linux version".
    static func kvmBootsKernel(qemu: String, kernel: String, paths: QemuPaths) -> Bool {
        let dir = paths.vmDirectory(probeID)
        try? FileManager.default.removeItem(atPath: dir)
        guard mkdir(dir, 0o700) == 0 else { return false }
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let log = dir + "/log"
        guard
            let child = try? Spawn.start(
                qemu,
                [
                    "-name", "guest=\(probeID)", "-accel", "kvm", "-machine", "pc", "-cpu", "qemu64", "-nodefaults",
                    "-no-user-config", "-display", "none", "-m", "256", "-kernel", kernel,
                    "-append", "earlyprintk=ttyS0 console=ttyS0", "-serial", "file:" + QemuOpts.escape(log),
                ])
        else { return false }
        defer {
            kill(child.pid, SIGKILL)
            _ = Spawn.wait(child)
        }
        let deadline = ContinuousClock.now + probeTime
        while ContinuousClock.now < deadline {
            if let data = FileManager.default.contents(atPath: log),
                String(decoding: data, as: UTF8.self).contains("Linux version")
            {
                return true
            }
            var status: Int32 = 0
            if waitpid(child.pid, &status, WNOHANG) == child.pid { return false }
            usleep(20_000)
        }
        return false
    }
}
