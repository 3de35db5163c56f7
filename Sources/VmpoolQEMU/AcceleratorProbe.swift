import CVmpoolSys
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
        _ requested: Accelerator, binary: String, paths: QemuPaths, kernel: String, confinement: Confinement
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
        let result: ResolvedAccelerator =
            bootsKernel(qemu: path, kernel: kernel, paths: paths, confinement: confinement) ? .kvm : .tcg
        try? "\(result.rawValue) \(key)\n".write(toFile: cache, atomically: true, encoding: .utf8)
        return result
    }

    /// Boots `kernel` under `accel` (KVM; TCG in tests) for at most `probeTime`, watching for
    /// "Linux version". QEMU
    /// runs as confined as a VM's (its own uid, the sandbox, descriptors only): the kernel in a
    /// memfd, the serial console on one end of a socket pair.
    static func bootsKernel(
        qemu: String, kernel: String, paths: QemuPaths, confinement: Confinement, accel: String = "kvm",
        within: Duration = probeTime
    ) -> Bool {
        let dir = paths.vmDirectory(probeID)
        try? FileManager.default.removeItem(atPath: dir)
        guard (try? PrivateDirectory.make(paths.runRoot)) != nil, mkdir(dir, 0o700) == 0 else { return false }
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var plan = LaunchPlan()
        defer { plan.closeAll() }
        var pair: [Int32] = [0, 0]
        let source = open(kernel, O_RDONLY | O_CLOEXEC)
        guard source >= 0,
            socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0
        else {
            if source >= 0 { close(source) }
            return false
        }
        let copy = vmpool_memfd_copy(source, "vmpool-probe-kernel")
        close(source)
        defer { close(pair[0]) }
        guard copy >= 0 else {
            close(pair[1])
            return false
        }
        if case .users(let users) = confinement, let user = try? users.claim(for: probeID) {
            plan.user = user
            _ = plan.pass(user.lock)
        }
        let marker = plan.pass(open("/dev/null", O_RDONLY | O_CLOEXEC))
        let kernelFD = plan.pass(copy)
        let serial = plan.pass(pair[1])
        let arguments = [
            "-name", "guest=\(probeID)", "-add-fd", "fd=\(marker),set=0,opaque=vmpool:\(QemuOpts.escape(dir))",
            "-accel", accel, "-machine", "pc", "-cpu", "qemu64", "-nodefaults", "-no-user-config", "-display", "none",
            "-m", "256", "-kernel", "/proc/self/fd/\(kernelFD)", "-append", "earlyprintk=ttyS0 console=ttyS0",
            "-chardev", "socket,id=serial,fd=\(serial)", "-serial", "chardev:serial",
            "-sandbox", QemuVM.sandboxOptions,
        ]
        guard let pid = try? plan.launch(qemu, arguments, vm: probeID) else { return false }
        plan.closeAll()
        defer {
            kill(pid, SIGKILL)
            _ = QemuProcess.waitForExit(pid, vm: probeID, runRoot: paths.runRoot, timeout: .seconds(5))
        }
        let deadline = ContinuousClock.now + within
        var output: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while ContinuousClock.now < deadline {
            var pfd = pollfd(fd: pair[0], events: Int16(POLLIN), revents: 0)
            guard poll(&pfd, 1, 50) > 0 else { continue }
            let count = read(pair[0], &chunk, chunk.count)
            guard count > 0 else { return false }
            if output.count < 1 << 20 { output += chunk[0..<count] }
            if String(decoding: output, as: UTF8.self).contains("Linux version") { return true }
        }
        return false
    }
}
