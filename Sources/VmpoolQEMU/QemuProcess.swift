import Foundation
import VmpoolDriver

/// A VM's QEMU process as the commands that work inside the VM see it: when a channel to the
/// VM fails, whether the VM itself is gone, which users must hear instead of what the socket saw.
struct VMProcess: Sendable {
    let vm: String
    let pid: Int32?
    let runRoot: String

    init(paths: QemuPaths, vm: VMRef) {
        self.vm = vm.id
        self.pid = vm.pid ?? QemuProcess.readPid(paths.pidFile(vm.id))
        self.runRoot = paths.runRoot
    }

    /// Whether the process is gone; one that is exiting (its sockets closed already) is given
    /// up to `grace` to go.
    func exited(grace: Duration) -> Bool {
        guard let pid else { return false }
        return QemuProcess.waitForExit(pid, vm: vm, runRoot: runRoot, timeout: grace)
    }

    /// `error` as the user should see it: when the VM's process exited, that, and what happens
    /// next. Its exit status is not known here: QEMU runs daemonized, a child of init.
    func explain(_ error: DriverError, during what: String) -> DriverError {
        let transport: [DriverError.Code] = [.io, .timeout, .protocolError, .notFound]
        guard transport.contains(error.code), let pid else { return error }
        guard exited(grace: error.code == .io ? .seconds(1) : .zero) else { return error }
        return DriverError(
            .processExited,
            "the VM's process (QEMU, pid \(pid)) exited while \(what); the next reconcile pass replaces the VM",
            vm: vm)
    }
}

/// Starting, finding and ending QEMU processes.
enum QemuProcess {
    /// An executable path for `binary`, searching PATH when it has no slash.
    static func resolve(_ binary: String) -> String? {
        if binary.contains("/") { return access(binary, X_OK) == 0 ? binary : nil }
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        for dir in path.split(separator: ":") {
            let candidate = "\(dir)/\(binary)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    static func readPid(_ path: String) -> Int32? {
        guard let bytes = readProcFile(path, limit: 64) else { return nil }
        return Int32(String(decoding: bytes, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// The NUL-separated command line of a process, or `nil` when it is gone.
    static func commandLine(_ pid: Int32) -> [String]? {
        guard let bytes = readProcFile("/proc/\(pid)/cmdline"), !bytes.isEmpty else { return nil }
        return bytes.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
    }

    /// Reads a small /proc file with plain read(2). /proc files report size 0, and
    /// Foundation's file readers kept memory per call when polled every second from a
    /// long-running reconcile; this reader keeps nothing.
    static func readProcFile(_ path: String, limit: Int = 1 << 20) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var result: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while result.count < limit {
            let count = read(fd, &chunk, chunk.count)
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { break }
            result += chunk[0..<count]
        }
        return result
    }

    /// Numeric entries of /proc: every process id.
    static func processIDs() -> [Int32] {
        guard let dir = opendir("/proc") else { return [] }
        defer { closedir(dir) }
        var pids: [Int32] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if let pid = Int32(name) { pids.append(pid) }
        }
        return pids
    }

    /// The VM id a QEMU command line was started for under `runRoot`, if it is one of ours.
    static func vmID(in arguments: [String], runRoot: String) -> String? {
        let marker = QemuOpts.escape(runRoot) + "/"
        guard arguments.contains(where: { $0.contains(marker) }) else { return nil }
        guard let index = arguments.firstIndex(of: "-name"), index + 1 < arguments.count else { return nil }
        let value = arguments[index + 1]
        guard value.hasPrefix("guest=") else { return nil }
        return String(value.dropFirst(6).prefix { $0 != "," })
    }

    /// Whether `pid` is alive and is the QEMU of `vm` under `runRoot` (guards against pid reuse).
    static func isRunning(_ pid: Int32, vm: String, runRoot: String) -> Bool {
        guard let arguments = commandLine(pid) else { return false }
        guard vmID(in: arguments, runRoot: runRoot) == vm else { return false }
        return !isZombie(pid)
    }

    static func isZombie(_ pid: Int32) -> Bool {
        guard let stat = readProcFile("/proc/\(pid)/stat"), let close = stat.lastIndex(of: UInt8(ascii: ")")) else {
            return true
        }
        let state = stat[(close + 1)...].first { $0 != UInt8(ascii: " ") }
        return state == UInt8(ascii: "Z") || state == UInt8(ascii: "X")
    }

    /// Every QEMU process started for this state dir: its run dir is in its command line, it
    /// runs as this user or as a VM uid, and its executable is `binary`. A process of another
    /// user or program that merely mentions the path is never taken for one of ours.
    static func discover(runRoot: String, binary: String?, users: VMUsers?) -> [DiscoveredVM] {
        let executable = binary.flatMap(realPath)
        var found: [DiscoveredVM] = []
        for pid in processIDs() {
            guard pid != getpid(), let arguments = commandLine(pid),
                let id = vmID(in: arguments, runRoot: runRoot), !isZombie(pid),
                let uid = owner(pid), uid == geteuid() || users?.contains(uid) == true
            else { continue }
            if let executable, let exe = self.executable(pid), exe != executable { continue }
            found.append(DiscoveredVM(id: id, pid: pid))
        }
        return found.sorted { $0.id < $1.id }
    }

    /// The real uid of a process, from /proc/PID/status.
    static func owner(_ pid: Int32) -> uid_t? {
        guard let bytes = readProcFile("/proc/\(pid)/status", limit: 8192) else { return nil }
        let text = String(decoding: bytes, as: UTF8.self)
        guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("Uid:") }) else { return nil }
        return line.split(whereSeparator: { $0 == "\t" || $0 == " " }).dropFirst().first.flatMap { uid_t($0) }
    }

    /// The executable of a process (without a " (deleted)" suffix left by a package upgrade).
    static func executable(_ pid: Int32) -> String? {
        var buffer = [CChar](repeating: 0, count: 4096)
        let count = readlink("/proc/\(pid)/exe", &buffer, buffer.count - 1)
        guard count > 0 else { return nil }
        let path = String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return path.hasSuffix(" (deleted)") ? String(path.dropLast(10)) : path
    }

    static func realPath(_ path: String) -> String? {
        guard let resolved = realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    /// Waits for `pid` to go away; returns false at the deadline.
    static func waitForExit(_ pid: Int32, vm: String, runRoot: String, timeout: Duration) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while isRunning(pid, vm: vm, runRoot: runRoot) {
            if ContinuousClock.now >= deadline { return false }
            usleep(5_000)
        }
        return true
    }

    /// SIGKILL, only if `pid` is still this VM's QEMU.
    static func kill(_ pid: Int32, vm: String, runRoot: String) {
        guard isRunning(pid, vm: vm, runRoot: runRoot) else { return }
        _ = Glibc.kill(pid, SIGKILL)
        _ = waitForExit(pid, vm: vm, runRoot: runRoot, timeout: .seconds(5))
    }
}
