import Foundation
import VmpoolDriver

/// The accelerator a VM actually runs with.
enum ResolvedAccelerator: String, Sendable {
    case kvm
    case tcg
}

/// Decides `--accel auto`: KVM only where it really runs guest code.
///
/// Some hosts have a /dev/kvm on which QEMU starts but the guest never executes (nested
/// virtualisation that hangs). The probe boots the firmware under KVM with QEMU's debug
/// console and waits briefly for SeaBIOS's first line on it; silence means TCG. The answer
/// is cached in the state dir per host boot, so the probe costs once.
enum AcceleratorProbe {
    static let probeTime: Duration = .milliseconds(1500)

    static func resolve(_ requested: Accelerator, binary: String, stateDirectory: String) -> ResolvedAccelerator {
        switch requested {
        case .kvm: return .kvm
        case .tcg: return .tcg
        case .auto: break
        }
        guard access("/dev/kvm", R_OK | W_OK) == 0 else { return .tcg }
        let cache = stateDirectory + "/accel"
        let bootID = (try? String(contentsOfFile: "/proc/sys/kernel/random/boot_id", encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines) ?? "unknown"
        if let text = try? String(contentsOfFile: cache, encoding: .utf8) {
            let parts = text.split(separator: " ").map { $0.trimmingCharacters(in: .whitespacesAndNewlines) }
            if parts.count == 2, parts[1] == bootID, let value = ResolvedAccelerator(rawValue: parts[0]) {
                return value
            }
        }
        let result: ResolvedAccelerator = kvmRunsGuests(binary: binary) ? .kvm : .tcg
        try? "\(result.rawValue) \(bootID)\n".write(toFile: cache, atomically: true, encoding: .utf8)
        return result
    }

    /// Boots SeaBIOS under KVM and watches the debug console for output.
    static func kvmRunsGuests(binary: String) -> Bool {
        guard let path = QemuProcess.resolve(binary) else { return false }
        let log = NSTemporaryDirectory() + "vmpool-kvm-probe-\(getpid()).log"
        defer { unlink(log) }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = [
            "-accel", "kvm", "-machine", "pc", "-nodefaults", "-no-user-config", "-display", "none", "-m", "16",
            "-chardev", "file,id=dbg,path=\(QemuOpts.escape(log))", "-device", "isa-debugcon,iobase=0x402,chardev=dbg",
        ]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        guard (try? process.run()) != nil else { return false }
        let deadline = ContinuousClock.now + probeTime
        var saw = false
        while ContinuousClock.now < deadline, process.isRunning {
            if let size = try? FileManager.default.attributesOfItem(atPath: log)[.size] as? Int, size > 0 {
                saw = true
                break
            }
            usleep(20_000)
        }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        return saw
    }
}
