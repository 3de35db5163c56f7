import Foundation

/// Who holds a state dir's lock, as written into the lock file by the holder.
public struct LockHolder: Codable, Sendable, Hashable, CustomStringConvertible {
    public var pid: Int32
    public var command: String
    public var since: Date

    public init(pid: Int32, command: String, since: Date) {
        self.pid = pid
        self.command = command
        self.since = since
    }

    public var description: String {
        let formatter = ISO8601DateFormatter()
        return "pid \(pid) (\(command)) since \(formatter.string(from: since))"
    }
}

/// The one-reconciler-per-state-dir lock.
///
/// An `flock(2)` on `<state-dir>/lock`: the kernel drops it when its holder dies, so a lock
/// left by a killed vmpool is taken by the next run with no manual step. The holder's pid,
/// command and start time are written into the file for waiters to report.
public final class StateLock: Sendable {
    private let fd: Int32
    public let holder: LockHolder

    /// Waits up to `timeout` seconds for the lock. `onWait` is called once, with the current
    /// holder, if the lock is busy.
    public static func acquire(
        directory: String, command: String, timeout: Double,
        onWait: (LockHolder?) -> Void = { _ in }
    ) throws(StoreError) -> StateLock {
        try StateDirectory.prepare(directory)
        let path = directory + "/lock"
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw StoreError(.stateDir, "cannot open the lock file \(path): \(String(cString: strerror(errno)))")
        }
        let deadline = Date().addingTimeInterval(timeout)
        var waited = false
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            guard errno == EWOULDBLOCK || errno == EINTR else {
                close(fd)
                throw StoreError(.stateDir, "cannot lock \(path): \(String(cString: strerror(errno)))")
            }
            let current = readHolder(fd)
            if !waited {
                onWait(current)
                waited = true
            }
            if Date() >= deadline {
                close(fd)
                let who = current.map { "; it is held by \($0)" } ?? ""
                throw StoreError(
                    .locked,
                    "another vmpool is working on \(directory)\(who); waited \(formatSeconds(timeout))"
                        + " (--lock-timeout)")
            }
            usleep(50_000)
        }
        let holder = LockHolder(pid: getpid(), command: command, since: Date())
        if let data = try? JSONEncoder().encode(holder) {
            _ = ftruncate(fd, 0)
            _ = data.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        }
        return StateLock(fd: fd, holder: holder)
    }

    /// Takes the lock only if it is free at once. Otherwise returns who holds it (when known).
    public static func tryAcquire(directory: String, command: String) throws(StoreError) -> Result<
        StateLock, Busy
    > {
        do {
            return .success(try acquire(directory: directory, command: command, timeout: 0))
        } catch  where error.code == .locked {
            let fd = open(directory + "/lock", O_RDONLY | O_CLOEXEC)
            defer { if fd >= 0 { close(fd) } }
            return .failure(Busy(holder: fd >= 0 ? readHolder(fd) : nil))
        }
    }

    /// The lock is held by another vmpool.
    public struct Busy: Error, Sendable {
        public var holder: LockHolder?
    }

    private init(fd: Int32, holder: LockHolder) {
        self.fd = fd
        self.holder = holder
    }

    deinit {
        _ = ftruncate(fd, 0)
        close(fd)
    }

    private static func readHolder(_ fd: Int32) -> LockHolder? {
        var buffer = [UInt8](repeating: 0, count: 4096)
        let count = pread(fd, &buffer, buffer.count, 0)
        guard count > 0 else { return nil }
        return try? JSONDecoder().decode(LockHolder.self, from: Data(buffer[0..<count]))
    }

    private static func formatSeconds(_ seconds: Double) -> String {
        seconds == seconds.rounded() ? "\(Int(seconds))s" : String(format: "%.1fs", seconds)
    }
}
