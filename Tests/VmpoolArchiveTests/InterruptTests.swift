import Foundation
import Testing
import VmpoolArchive
import VmpoolTestSupport

/// A copy's threads wait on pipes that a guest may never move again; they must stop soon after
/// they are asked to, by a signal pipe or by their flag (set when their task is cancelled).
///
/// The work runs on plain threads here, as `OffPool` runs it: these tests must not depend on a
/// free thread of Swift's pool, which the suite's long blocking tests may all hold.
@Suite("Interrupting blocked copies")
struct InterruptTests {
    /// Runs `body` on a thread of its own; the result is ready once `done` is signalled.
    final class Worker: @unchecked Sendable {
        let done = DispatchSemaphore(value: 0)
        private(set) var error: (any Error)?

        init(_ body: @escaping @Sendable () throws -> Void) {
            Thread { [self] in
                do { try body() } catch { self.error = error }
                done.signal()
            }.start()
        }

        /// Waits up to `seconds` for the work to end; false if it did not.
        func end(within seconds: Double) -> Bool { done.wait(timeout: .now() + seconds) == .success }
    }

    @Test func aReaderOnASilentPipeStopsOnceTheInterruptPipeIsReadable() throws {
        let stream = try StreamPipe.make()
        let signals = try StreamPipe.make()
        defer { [stream.read, stream.write, signals.read, signals.write].forEach { close($0) } }
        let cancel = CancelFlag(interrupt: signals.read)
        let reader = Worker { _ = try TarReader(fd: stream.read, cancel: cancel).next() }
        var byte: UInt8 = 15
        #expect(write(signals.write, &byte, 1) == 1)
        #expect(reader.end(within: 1), "the reader did not stop within 1 s of the signal")
        #expect((reader.error as? ArchiveError)?.code == .cancelled, "\(String(describing: reader.error))")
    }

    @Test func aWriterToAFullPipeStopsWhenItsFlagIsSet() throws {
        let stream = try StreamPipe.make()
        defer { [stream.read, stream.write].forEach { close($0) } }
        setNonblocking(stream.write)
        let cancel = CancelFlag()
        let writer = Worker {
            let writer = TarWriter(fd: stream.write, cancel: cancel)
            let block = [UInt8](repeating: 1, count: 1 << 20)
            // Far more than the pipe holds: the writer ends up waiting for a reader.
            for _ in 0..<64 { try block.withUnsafeBytes { try writer.appendData($0) } }
        }
        // Waits (up to 30 s) until the pipe holds all it can: the writer is then blocked on it.
        let capacity = fcntl(stream.write, 1032)  // F_GETPIPE_SZ, which Glibc does not export to Swift
        var queued: Int32 = 0
        _ = eventually(timeout: .seconds(30)) {
            _ = ioctl(stream.read, UInt(FIONREAD), &queued)
            return queued >= capacity
        }
        #expect(queued == capacity, "the writer never filled the pipe (\(queued) of \(capacity) bytes)")
        #expect(!writer.end(within: 0), "the writer to a full pipe ended by itself")
        cancel.cancel()
        #expect(writer.end(within: 1), "the writer did not stop within 1 s of its flag")
        #expect((writer.error as? ArchiveError)?.code == .cancelled, "\(String(describing: writer.error))")
    }
}
