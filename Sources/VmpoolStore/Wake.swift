import Foundation

/// Wakes a `reconcile --every` service on the same state dir when something changed that it
/// should converge now rather than at its next tick (an apply, a delete, a lease).
///
/// The service binds a Unix datagram socket at `<state-dir>/wake`; others send it one byte,
/// best effort: no service, no wake, nothing fails.
public enum Wake {
    public static func path(_ directory: String) -> String { directory + "/wake" }

    /// Tells a running service to run a pass now.
    public static func send(directory: String) {
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return }
        defer { close(fd) }
        var address = sockaddr_un()
        guard fill(&address, path(directory)) else { return }
        var byte: UInt8 = 1
        _ = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                sendto(fd, &byte, 1, Int32(MSG_DONTWAIT), $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
    }

    static func fill(_ address: inout sockaddr_un, _ path: String) -> Bool {
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return false }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return true
    }

    /// The service's end: receives wakes.
    public final class Listener: @unchecked Sendable {
        private let fd: Int32
        private let path: String

        /// Binds `<state-dir>/wake`. Fails when another live service has it bound.
        public init(directory: String) throws(StoreError) {
            path = Wake.path(directory)
            fd = socket(
                AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            guard fd >= 0 else { throw StoreError(.stateDir, "cannot create the wake socket") }
            var address = sockaddr_un()
            guard Wake.fill(&address, path) else {
                close(fd)
                throw StoreError(.stateDir, "the state dir path is too long for \(path)")
            }
            func bindIt() -> Int32 {
                withUnsafePointer(to: &address) { pointer in
                    pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                    }
                }
            }
            if bindIt() != 0 {
                // A socket file left by a service that died: nobody receives on it.
                guard errno == EADDRINUSE, !Self.someoneListens(path) else {
                    close(fd)
                    throw StoreError(
                        .locked, "another reconcile service is running on this state dir (\(path) is bound)")
                }
                unlink(path)
                guard bindIt() == 0 else {
                    close(fd)
                    throw StoreError(.stateDir, "cannot bind \(path): \(String(cString: strerror(errno)))")
                }
            }
            chmod(path, 0o600)
        }

        deinit {
            close(fd)
            unlink(path)
        }

        private static func someoneListens(_ path: String) -> Bool {
            let probe = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard probe >= 0 else { return false }
            defer { close(probe) }
            var address = sockaddr_un()
            guard Wake.fill(&address, path) else { return false }
            let result = withUnsafePointer(to: &address) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(probe, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                }
            }
            return result == 0
        }

        /// Waits up to `duration` for a wake, or for `also` (another source of wakes, such as
        /// a shared store's change notices); `true` when one came. Wakes that came meanwhile
        /// are all consumed: many changes, one pass. `stop` ends the wait early (shutdown).
        public func wait(upTo duration: Duration, also: () -> Bool = { false }, stop: () -> Bool = { false }) async
            -> Bool
        {
            let deadline = ContinuousClock.now + duration
            while true {
                if drain() || also() { return true }
                let remaining = deadline - .now
                if remaining <= .zero || Task.isCancelled || stop() { return false }
                try? await Task.sleep(for: min(remaining, .milliseconds(50)))
            }
        }

        /// Consumes pending wakes; `true` when there was one.
        @discardableResult
        public func drain() -> Bool {
            var woke = false
            var byte: UInt8 = 0
            while recv(fd, &byte, 1, Int32(MSG_DONTWAIT)) >= 0 { woke = true }
            return woke
        }
    }
}
