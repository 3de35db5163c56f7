import Foundation
import Testing
import VmpoolArchive

/// A copy's threads wait on pipes that a guest may never move again; they must stop soon after
/// they are asked to, by a signal pipe or by their task's cancellation.
@Suite("Interrupting blocked copies")
struct InterruptTests {
    /// A pipe that nobody writes to, and a reader blocked on it.
    func silentPipe() throws -> StreamPipe { try StreamPipe.make() }

    @Test func aReaderOnASilentPipeStopsOnceTheInterruptPipeIsReadable() async throws {
        let stream = try silentPipe()
        let signals = try silentPipe()
        defer { [stream.read, stream.write, signals.read, signals.write].forEach { close($0) } }
        let started = ContinuousClock.now
        async let outcome: ArchiveError.Code? = {
            do {
                _ = try await OffPool.run(interrupt: signals.read) { cancel in
                    try TarReader(fd: stream.read, cancel: cancel).next()
                }
                return nil
            } catch let error as ArchiveError {
                return error.code
            } catch {
                return nil
            }
        }()
        var byte: UInt8 = 15
        #expect(write(signals.write, &byte, 1) == 1)
        #expect(await outcome == .cancelled)
        #expect(ContinuousClock.now - started < .seconds(1))
    }

    @Test func aWriterToAFullPipeStopsWhenItsTaskIsCancelled() async throws {
        let stream = try silentPipe()
        defer { [stream.read, stream.write].forEach { close($0) } }
        setNonblocking(stream.write)
        let task = Task {
            try await OffPool.run { cancel in
                let writer = TarWriter(fd: stream.write, cancel: cancel)
                let block = [UInt8](repeating: 1, count: 1 << 20)
                // Far more than the pipe holds: the writer ends up waiting for a reader.
                for _ in 0..<64 { try block.withUnsafeBytes { try writer.appendData($0) } }
            }
        }
        // Wait until the pipe is full (the writer is blocked), then cancel.
        let deadline = ContinuousClock.now + .seconds(30)
        var queued: Int32 = 0
        while ContinuousClock.now < deadline {
            _ = ioctl(stream.read, UInt(FIONREAD), &queued)
            if queued >= 64 << 10 { break }
            await Task.yield()
        }
        #expect(queued >= 64 << 10, "the writer never filled the pipe")
        let cancelled = ContinuousClock.now
        task.cancel()
        do {
            try await task.value
            Issue.record("the writer finished without a reader")
        } catch let error as ArchiveError {
            #expect(error.code == .cancelled)
        }
        #expect(ContinuousClock.now - cancelled < .seconds(1))
    }
}
