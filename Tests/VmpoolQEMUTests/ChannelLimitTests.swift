import Foundation
import Testing
import VmpoolDriver

@testable import VmpoolQEMU

/// What a guest sends is bounded on the host: a line or a frame longer than its limit is a
/// protocol error, never a buffer that grows without end.
@Suite("Channel input limits")
struct ChannelLimitTests {
    /// A connected pair: the channel on one end, the raw descriptor of the "guest" on the other.
    func pair() throws -> (Channel, Int32) {
        var fds: [Int32] = [0, 0]
        try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        return (Channel(connected: fds[0], name: "test-channel"), fds[1])
    }

    func send(_ fd: Int32, _ bytes: [UInt8]) {
        bytes.withUnsafeBytes { _ = write(fd, $0.baseAddress, $0.count) }
    }

    @Test func aLineLongerThanItsLimitIsAProtocolError() throws {
        let (channel, guest) = try pair()
        defer { close(guest) }
        send(guest, Array(repeating: UInt8(ascii: "x"), count: 100))
        do {
            _ = try channel.readLine(until: .now + .seconds(2), limit: 16)
            Issue.record("a 100-byte line was accepted under a 16-byte limit")
        } catch {
            #expect(error.code == .protocolError && "\(error)".contains("longer than 16 bytes"), "\(error)")
        }
        // Under the limit, lines come through.
        let (small, other) = try pair()
        defer { close(other) }
        send(other, Array("hello\n".utf8))
        #expect(try small.readLine(until: .now + .seconds(2), limit: 16) == "hello")
    }

    @Test func aFrameLongerThanItsLimitIsRefusedBeforeItIsRead() throws {
        let (channel, guest) = try pair()
        defer { close(guest) }
        // Type "O", a length of 16 MiB, and no payload: refused on the header alone.
        send(guest, [UInt8(ascii: "O"), 0x01, 0x00, 0x00, 0x00])
        do {
            _ = try channel.readFrame(until: .now + .seconds(2), limit: 1 << 20)
            Issue.record("a 16 MiB frame was accepted under a 1 MiB limit")
        } catch {
            #expect(error.code == .protocolError && "\(error)".contains("16777216 bytes"), "\(error)")
        }
    }
}
