import CVmpoolSys
import Foundation
import Glibc
import Synchronization

/// A stop request that blocking loops poll (every 100 ms at most), so that work on a pipe ends
/// soon after the task waiting for it is cancelled, even when the other end never moves again.
/// It can also watch a descriptor (a signal pipe, see `vmpool_trap_signals`): once that is
/// readable, the work stops at once, without waiting for any task to be scheduled.
public final class CancelFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    /// Readable when the work must stop; -1 for none. Never read from, so every waiter sees it.
    public let interrupt: Int32

    public init(interrupt: Int32 = -1) { self.interrupt = interrupt }

    public func cancel() { flag.store(true, ordering: .relaxed) }

    public var isCancelled: Bool {
        if flag.load(ordering: .relaxed) { return true }
        guard interrupt >= 0 else { return false }
        var pfd = pollfd(fd: interrupt, events: Int16(POLLIN), revents: 0)
        return poll(&pfd, 1, 0) > 0
    }

    func check() throws(ArchiveError) {
        if isCancelled { throw ArchiveError(.cancelled, "interrupted: the copy was cancelled") }
    }
}

/// Waits until `fd` is ready for `events`, waking every 100 ms to look at `cancel` and at once
/// when its interrupt descriptor becomes readable.
func waitReady(_ fd: Int32, _ events: Int32, cancel: CancelFlag) throws(ArchiveError) {
    while true {
        try cancel.check()
        var fds = [pollfd(fd: fd, events: Int16(events), revents: 0)]
        if cancel.interrupt >= 0 { fds.append(pollfd(fd: cancel.interrupt, events: Int16(POLLIN), revents: 0)) }
        let ready = poll(&fds, nfds_t(fds.count), 100)
        if ready > 0 && fds[0].revents != 0 { return }
        if ready < 0 && errno != EINTR {
            throw ArchiveError(.hostIO, "poll failed: \(plainErrno(errno))", errno: errno)
        }
    }
}

/// Waits until `fd` is readable (data, or its end): returns normally then, and throws
/// `.cancelled` if `cancel` is asked or its interrupt descriptor becomes readable first.
public func waitReadable(_ fd: Int32, cancel: CancelFlag) throws(ArchiveError) {
    try waitReady(fd, POLLIN, cancel: cancel)
}

/// Reads up to `buffer.count` bytes from `fd` (a pipe, a file); 0 at its end. A blocking read
/// only follows a poll that saw data, so cancellation is seen within 100 ms.
public func readSome(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, cancel: CancelFlag)
    throws(ArchiveError) -> Int
{
    while true {
        try waitReady(fd, POLLIN, cancel: cancel)
        let count = read(fd, buffer.baseAddress, buffer.count)
        if count >= 0 { return count }
        if errno == EINTR || errno == EAGAIN { continue }
        throw ArchiveError(.hostIO, "cannot read the archive stream: \(plainErrno(errno))", errno: errno)
    }
}

/// Writes all of `bytes` to `fd` (best non-blocking: see `setNonblocking`, else a write to a
/// pipe nobody drains cannot see `cancel`); a reader that went away is `.streamClosed` (SIGPIPE
/// must be ignored by the process).
public func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, cancel: CancelFlag) throws(ArchiveError) {
    var offset = 0
    while offset < bytes.count {
        try waitReady(fd, POLLOUT, cancel: cancel)
        let written = write(fd, bytes.baseAddress! + offset, bytes.count - offset)
        if written >= 0 {
            offset += written
        } else if errno == EPIPE {
            throw ArchiveError(.streamClosed, "the other end of the copy stopped reading", errno: EPIPE)
        } else if errno != EINTR && errno != EAGAIN {
            throw ArchiveError(.hostIO, "cannot write the archive stream: \(plainErrno(errno))", errno: errno)
        }
    }
}

/// Makes writes to `fd` return at once when the pipe is full, so that a writer waits in `poll`,
/// where it sees cancellation, never inside `write`.
public func setNonblocking(_ fd: Int32) {
    let flags = fcntl(fd, F_GETFL)
    if flags >= 0 { _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK) }
}

/// A pipe whose ends are closed on exec, with a 1 MiB buffer where the kernel allows (fewer
/// wake-ups per MiB copied).
public struct StreamPipe: Sendable {
    public let read: Int32
    public let write: Int32

    public static func make() throws(ArchiveError) -> StreamPipe {
        var fds: [Int32] = [0, 0]
        guard vmpool_pipe_cloexec(&fds) == 0 else {
            throw ArchiveError(.hostIO, "cannot create a pipe: \(plainErrno(errno))", errno: errno)
        }
        _ = vmpool_set_pipe_size(fds[1], 1 << 20)
        return StreamPipe(read: fds[0], write: fds[1])
    }
}

/// Runs blocking work (a pipe's reader or writer) on a thread of its own; cancelling the
/// awaiting task sets the work's `CancelFlag`.
///
/// Not a dispatch queue: on Linux a queue made with `DispatchQueue(label:attributes: .concurrent)`
/// runs its work on the same default-QoS threads as Swift's cooperative pool (one per core), so
/// two blocked readers on a 2-core machine stall every task, signal handling included.
public enum OffPool {
    /// Runs `body`; its flag also watches `interrupt` (-1: none).
    public static func run<T: Sendable>(
        interrupt: Int32 = -1, _ body: @escaping @Sendable (CancelFlag) throws -> T
    ) async throws -> T {
        let flag = CancelFlag(interrupt: interrupt)
        let result: Result<T, any Error> = await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let thread = Thread { continuation.resume(returning: Result { try body(flag) }) }
                thread.name = "vmpool-copy"
                thread.start()
            }
        } onCancel: {
            flag.cancel()
        }
        return try result.get()
    }
}
