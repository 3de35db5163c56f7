import CVmpoolSys
import Foundation
import VmpoolDriver

/// A blocking, line-oriented Unix socket client with deadlines on every read.
///
/// QMP and the guest agent are both newline-delimited request/response protocols on Unix
/// sockets; a few hundred bytes each way. Blocking I/O with `poll` deadlines is the
/// simplest correct client; callers run it off the cooperative thread pool (`Blocking`).
final class LineSocket {
    private var fd: Int32
    private var buffer: [UInt8] = []
    let path: String

    init(path: String) throws(DriverError) {
        self.path = path
        let fd = vmpool_unix_connect(path)
        guard fd >= 0 else {
            let reason = String(cString: strerror(errno))
            throw DriverError(.io, "cannot connect to \(path): \(reason)")
        }
        self.fd = fd
    }

    deinit { close() }

    func close() {
        if fd >= 0 {
            Glibc.close(fd)
            fd = -1
        }
    }

    /// Writes all of `text`, optionally passing `attach` as an SCM_RIGHTS file descriptor.
    func send(_ text: String, attach: Int32? = nil) throws(DriverError) {
        var bytes = Array(text.utf8)
        var offset = 0
        if let attach {
            let sent = bytes.withUnsafeBytes { vmpool_send_with_fd(fd, $0.baseAddress, $0.count, attach) }
            guard sent > 0 else { throw DriverError(.io, "cannot send to \(path): \(String(cString: strerror(errno)))") }
            offset = sent
        }
        while offset < bytes.count {
            let sent = bytes.withUnsafeMutableBytes { raw in
                Glibc.send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
            }
            if sent < 0 {
                if errno == EINTR { continue }
                throw DriverError(.io, "cannot send to \(path): \(String(cString: strerror(errno)))")
            }
            offset += sent
        }
    }

    /// The next line (without its newline), or a timeout error at `deadline`.
    func readLine(until deadline: ContinuousClock.Instant) throws(DriverError) -> String {
        while true {
            if let newline = buffer.firstIndex(of: 0x0A) {
                var line = Array(buffer[..<newline])
                buffer.removeFirst(newline + 1)
                if line.last == 0x0D { line.removeLast() }
                return String(decoding: line, as: UTF8.self)
            }
            let remaining = deadline - .now
            guard remaining > .zero else { throw DriverError(.timeout, "no answer on \(path) in time") }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ms = Int32(clamping: remaining.milliseconds + 1)
            let ready = poll(&pfd, 1, ms)
            if ready < 0 {
                if errno == EINTR { continue }
                throw DriverError(.io, "poll on \(path) failed: \(String(cString: strerror(errno)))")
            }
            if ready == 0 { continue }
            let count = withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 8192) { chunk in
                let count = recv(fd, chunk.baseAddress, chunk.count, 0)
                if count > 0 { buffer.append(contentsOf: chunk[0..<count]) }
                return count
            }
            if count < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                throw DriverError(.io, "read on \(path) failed: \(String(cString: strerror(errno)))")
            }
            if count == 0 { throw DriverError(.io, "\(path) closed the connection") }
        }
    }

    /// Discards anything already received.
    func drain() {
        buffer.removeAll()
        var chunk = [UInt8](repeating: 0, count: 4096)
        while recv(fd, &chunk, chunk.count, Int32(MSG_DONTWAIT)) > 0 {}
    }
}

/// Runs blocking work on a dispatch queue, so socket waits never hold a cooperative thread.
enum Blocking {
    private static let queue = DispatchQueue(label: "vmpool.blocking", attributes: .concurrent)

    static func run<T: Sendable>(_ body: @escaping @Sendable () throws(DriverError) -> T) async throws(DriverError)
        -> T
    {
        let result: Result<T, DriverError> = await withCheckedContinuation { continuation in
            queue.async {
                do throws(DriverError) {
                    continuation.resume(returning: .success(try body()))
                } catch {
                    continuation.resume(returning: .failure(error))
                }
            }
        }
        return try result.get()
    }
}
