import CVmpoolSys
import Foundation
import Synchronization
import VmpoolDriver

/// A Unix socket to one of a VM's channels (a QMP monitor, an agent port, the console), with
/// a deadline on every connect, read and write. Errors name the channel as users know it
/// (`name`, with the VM), never the socket's path in the state dir.
///
/// The socket is non-blocking and every wait is a `poll` bounded by the caller's deadline and
/// by the current job's interrupt (`Interrupt`): a guest that never reads its port, or a
/// server whose one client slot is taken, fails the operation in time instead of wedging the
/// process that holds the state dir lock.
final class Channel {
    private(set) var fd: Int32
    private var buffer: [UInt8] = []
    private var bufferStart = 0
    /// What the channel is, for messages: "the guest agent's exec port 3".
    let name: String
    let vm: String?

    /// Connects, retrying while the server's backlog is full, until `deadline`.
    init(path: String, name: String, vm: String?, deadline: ContinuousClock.Instant) throws(DriverError) {
        self.name = name
        self.vm = vm
        while true {
            let fd = vmpool_unix_connect_flags(path, Int32(SOCK_NONBLOCK.rawValue))
            if fd >= 0 {
                self.fd = fd
                return
            }
            let code = errno
            guard code == EAGAIN || code == EINTR else {
                throw DriverError(.io, "cannot connect to \(name): \(String(cString: strerror(code)))", vm: vm)
            }
            guard ContinuousClock.now < deadline else {
                throw DriverError(.busy, "\(name) is busy: another client holds it", vm: vm)
            }
            try Interrupt.check()
            usleep(5_000)
        }
    }

    /// Wraps an already connected socket (tests: one end of a socketpair served by the agent).
    init(connected fd: Int32, name: String, vm: String? = nil) {
        self.fd = fd
        self.name = name
        self.vm = vm
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
    }

    deinit { close() }

    func close() {
        if fd >= 0 {
            Glibc.close(fd)
            fd = -1
        }
    }

    /// Writes all of `bytes` by `deadline`, optionally passing `attach` as an SCM_RIGHTS descriptor.
    func send(_ bytes: [UInt8], attach: Int32? = nil, deadline: ContinuousClock.Instant) throws(DriverError) {
        var offset = 0
        var attachment = attach
        while offset < bytes.count {
            let sent = bytes.withUnsafeBytes { raw -> Int in
                let base = raw.baseAddress! + offset
                if let fd = attachment { return vmpool_send_with_fd(self.fd, base, raw.count - offset, fd) }
                return Glibc.send(self.fd, base, raw.count - offset, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
            }
            if sent > 0 {
                offset += sent
                attachment = nil
                continue
            }
            let code = errno
            guard sent < 0, code == EAGAIN || code == EINTR else {
                throw DriverError(.io, "cannot send to \(name): \(String(cString: strerror(code)))", vm: vm)
            }
            try wait(for: Int16(POLLOUT), until: deadline, doing: "writing to")
        }
    }

    /// Sends what the socket takes now of `bytes`, without waiting; returns how many it took.
    func sendAvailable(_ bytes: ArraySlice<UInt8>) throws(DriverError) -> Int {
        while true {
            let sent = bytes.withUnsafeBytes { raw in
                Glibc.send(fd, raw.baseAddress, raw.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
            }
            if sent >= 0 { return sent }
            let code = errno
            if code == EINTR { continue }
            if code == EAGAIN { return 0 }
            throw DriverError(.io, "cannot send to \(name): \(String(cString: strerror(code)))", vm: vm)
        }
    }

    func send(_ text: String, attach: Int32? = nil, deadline: ContinuousClock.Instant) throws(DriverError) {
        try send(Array(text.utf8), attach: attach, deadline: deadline)
    }

    /// The next line without its newline; a line longer than `limit` bytes is a protocol error.
    func readLine(until deadline: ContinuousClock.Instant, limit: Int = 8 << 20) throws(DriverError) -> String {
        var scanned = bufferStart
        while true {
            if let newline = buffer[scanned...].firstIndex(of: 0x0A) {
                var end = newline
                if end > bufferStart, buffer[end - 1] == 0x0D { end -= 1 }
                let line = String(decoding: buffer[bufferStart..<end], as: UTF8.self)
                consume(upTo: newline + 1)
                return line
            }
            scanned = buffer.count
            guard buffer.count - bufferStart <= limit else {
                throw DriverError(.protocolError, "\(name) sent a line longer than \(limit) bytes", vm: vm)
            }
            try fill(until: deadline)
        }
    }

    /// The next frame: a type byte, a 4-byte big-endian length and that many payload bytes.
    /// A length above `limit` is a protocol error (a guest cannot make the host buffer more).
    func readFrame(until deadline: ContinuousClock.Instant, limit: Int) throws(DriverError) -> (UInt8, [UInt8]) {
        try need(5, until: deadline)
        let length = try frameLength(limit: limit)
        try need(5 + length, until: deadline)
        return takeFrame(length: length)
    }

    /// A complete frame that is buffered already, or `nil`; never waits.
    func bufferedFrame(limit: Int) throws(DriverError) -> (UInt8, [UInt8])? {
        guard buffer.count - bufferStart >= 5 else { return nil }
        let length = try frameLength(limit: limit)
        guard buffer.count - bufferStart >= 5 + length else { return nil }
        return takeFrame(length: length)
    }

    private func frameLength(limit: Int) throws(DriverError) -> Int {
        var length = 0
        for index in 1...4 { length = length << 8 | Int(buffer[bufferStart + index]) }
        guard length <= limit else {
            throw DriverError(
                .protocolError, "\(name) sent a frame of \(length) bytes; at most \(limit) are accepted", vm: vm)
        }
        return length
    }

    private func takeFrame(length: Int) -> (UInt8, [UInt8]) {
        let type = buffer[bufferStart]
        let payload = Array(buffer[(bufferStart + 5)..<(bufferStart + 5 + length)])
        consume(upTo: bufferStart + 5 + length)
        return (type, payload)
    }

    /// Reads what the socket holds now into the buffer, without waiting (at most 64 KiB);
    /// returns whether anything came. The end of the connection is an error.
    @discardableResult
    func receiveAvailable() throws(DriverError) -> Bool {
        try fill(until: nil)
    }

    /// Reads and drops input up to and including the first occurrence of one of `markers`,
    /// by `deadline`; returns which one it was. Input before it is never kept beyond the
    /// longest marker's length.
    func skip(throughFirstOf markers: [[UInt8]], until deadline: ContinuousClock.Instant) throws(DriverError) -> Int {
        precondition(!markers.isEmpty && markers.allSatisfy { !$0.isEmpty })
        let keep = markers.map(\.count).max()! - 1
        while true {
            let window = buffer[bufferStart...]
            let found = markers.enumerated().compactMap { index, marker in
                Self.find(marker, in: window).map { (at: $0, index: index, count: marker.count) }
            }
            if let first = found.min(by: { $0.at < $1.at }) {
                consume(upTo: first.at + first.count)
                return first.index
            }
            consume(upTo: max(bufferStart, buffer.count - keep))
            try fill(until: deadline)
        }
    }

    private static func find(_ marker: [UInt8], in bytes: ArraySlice<UInt8>) -> Int? {
        guard bytes.count >= marker.count else { return nil }
        var at = bytes.startIndex
        while at <= bytes.endIndex - marker.count {
            guard let first = bytes[at...].firstIndex(of: marker[0]), first <= bytes.endIndex - marker.count else {
                return nil
            }
            if bytes[first..<(first + marker.count)].elementsEqual(marker) { return first }
            at = first + 1
        }
        return nil
    }

    /// Whether a complete frame or line may be waiting without blocking: bytes are buffered or
    /// the socket is readable.
    func readable(within timeout: Duration) throws(DriverError) -> Bool {
        if bufferStart < buffer.count { return true }
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let ready = poll(&pfd, 1, Int32(clamping: timeout.milliseconds))
        if ready < 0 && errno != EINTR {
            throw DriverError(.io, "poll on \(name) failed: \(String(cString: strerror(errno)))", vm: vm)
        }
        return ready > 0
    }

    private func need(_ count: Int, until deadline: ContinuousClock.Instant) throws(DriverError) {
        while buffer.count - bufferStart < count { try fill(until: deadline) }
    }

    private func consume(upTo end: Int) {
        bufferStart = end
        if bufferStart == buffer.count {
            buffer.removeAll(keepingCapacity: true)
            bufferStart = 0
        } else if bufferStart > 1 << 16 {
            buffer.removeFirst(bufferStart)
            bufferStart = 0
        }
    }

    /// Reads once into the buffer, waiting until `deadline` for input (`nil`: not at all);
    /// returns whether anything came.
    @discardableResult
    private func fill(until deadline: ContinuousClock.Instant?) throws(DriverError) -> Bool {
        while true {
            let count = withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 65536) { chunk -> Int in
                let count = recv(fd, chunk.baseAddress, chunk.count, Int32(MSG_DONTWAIT))
                if count > 0 { buffer.append(contentsOf: chunk[0..<count]) }
                return count
            }
            if count > 0 { return true }
            if count == 0 { throw DriverError(.io, "\(name) closed the connection", vm: vm) }
            let code = errno
            if code == EINTR { continue }
            guard code == EAGAIN else {
                throw DriverError(.io, "reading from \(name) failed: \(String(cString: strerror(code)))", vm: vm)
            }
            guard let deadline else { return false }
            try wait(for: Int16(POLLIN), until: deadline, doing: "reading from")
        }
    }

    /// Polls for `events` in slices, so that an interrupt ends the wait within 50 ms.
    private func wait(for events: Int16, until deadline: ContinuousClock.Instant, doing what: String)
        throws(DriverError)
    {
        while true {
            try Interrupt.check()
            let remaining = deadline - .now
            guard remaining > .zero else { throw DriverError(.timeout, "timed out \(what) \(name)", vm: vm) }
            var pfd = pollfd(fd: fd, events: events, revents: 0)
            let ready = poll(&pfd, 1, Int32(clamping: min(remaining.milliseconds + 1, 50)))
            if ready > 0 { return }
            if ready < 0 && errno != EINTR {
                throw DriverError(.io, "poll on \(name) failed: \(String(cString: strerror(errno)))", vm: vm)
            }
        }
    }
}

/// Asks the blocking work of one job to stop: set when the task that waits for it is
/// cancelled (a second SIGTERM, `--timeout`); every wait in the qemu driver checks it.
final class Interrupt: Sendable {
    private let flag = Atomic<Bool>(false)

    func request() { flag.store(true, ordering: .relaxed) }
    var isRequested: Bool { flag.load(ordering: .relaxed) }

    /// The interrupt of the job running on this thread (set by `Blocking.run`).
    static var current: Interrupt? {
        get { Thread.current.threadDictionary[key] as? Interrupt }
        set { Thread.current.threadDictionary[key] = newValue }
    }
    private static let key = "vmpool.interrupt"

    /// Throws when the current job was asked to stop.
    static func check() throws(DriverError) {
        if current?.isRequested == true { throw DriverError(.cancelled, "interrupted: the operation was cancelled") }
    }

    /// Sleeps up to `duration`, ending early (with an error) when interrupted.
    static func sleep(_ duration: Duration) throws(DriverError) {
        let deadline = ContinuousClock.now + duration
        while true {
            try check()
            let remaining = deadline - .now
            if remaining <= .zero { return }
            usleep(UInt32(clamping: min(remaining.milliseconds, 50) * 1000))
        }
    }
}

/// Runs blocking work on a dispatch queue, so socket waits never hold a cooperative thread.
/// Cancelling the awaiting task interrupts the work's waits.
enum Blocking {
    private static let queue = DispatchQueue(label: "vmpool.blocking", attributes: .concurrent)

    static func run<T: Sendable>(_ body: @escaping @Sendable () throws(DriverError) -> T) async throws(DriverError)
        -> T
    {
        let interrupt = Interrupt()
        let result: Result<T, DriverError> = await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                queue.async {
                    Interrupt.current = interrupt
                    defer { Interrupt.current = nil }
                    do throws(DriverError) {
                        continuation.resume(returning: .success(try body()))
                    } catch {
                        continuation.resume(returning: .failure(error))
                    }
                }
            }
        } onCancel: {
            interrupt.request()
        }
        return try result.get()
    }

    /// Runs non-throwing blocking work off the cooperative pool.
    static func runQuietly(_ body: @escaping @Sendable () -> Void) async {
        _ = try? await run { () throws(DriverError) in body() }
    }
}
