import CVmpoolSys
import Foundation
import Testing
import VmpoolDriver
import VmpoolTestSupport

@testable import VmpoolImage

/// The compiled guest agent, run on the host against a pseudo-terminal standing in for the
/// VM's serial port. (Commands that change the clock are checked inside real VMs instead.)
@Suite("Guest agent protocol")
struct GuestAgentTests {
    final class Agent {
        let process: RunningCommand
        let master: Int32
        var buffer: [UInt8] = []

        init() throws {
            let binary = try GuestImage.compileAgent(compiler: ProcessInfo.processInfo.environment["CC"] ?? "cc")
            let path = NSTemporaryDirectory() + "vmpool-agent-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            guard FileManager.default.createFile(atPath: path, contents: binary, attributes: [.posixPermissions: 0o700])
            else { throw CocoaError(.fileWriteUnknown) }
            var name = [CChar](repeating: 0, count: 128)
            master = vmpool_open_pty(&name, name.count)
            guard master >= 0 else { throw CocoaError(.fileReadUnknown) }
            let slave = String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            process = try RunningCommand(path: path, arguments: [slave], environment: [:])
            // Until the agent has put the terminal in raw mode, the pty echoes; wait for a pong.
            for attempt in 0..<50 where request("0\(attempt) ping") != "0\(attempt) ok pong" {
                usleep(100_000)
            }
            unlink(path)
        }

        deinit {
            process.kill()
            _ = process.wait()
            close(master)
        }

        /// Sends a request and returns the first answer line carrying its id.
        func request(_ line: String, timeout: TimeInterval = 5) -> String {
            _ = line.withCString { write(master, $0, strlen($0)) }
            _ = "\n".withCString { write(master, $0, 1) }
            let id = line.split(separator: " ").first.map(String.init) ?? ""
            let deadline = Date().addingTimeInterval(timeout)
            while Date() < deadline {
                if let newline = buffer.firstIndex(of: 0x0A) {
                    let answer = String(decoding: buffer[..<newline], as: UTF8.self)
                        .trimmingCharacters(in: .whitespacesAndNewlines)
                    buffer.removeFirst(newline + 1)
                    if answer.hasPrefix(id + " ") { return answer }
                    continue
                }
                var pfd = pollfd(fd: master, events: Int16(POLLIN), revents: 0)
                if poll(&pfd, 1, 100) > 0 {
                    var chunk = [UInt8](repeating: 0, count: 512)
                    let count = read(master, &chunk, chunk.count)
                    if count > 0 { buffer += chunk[0..<count] }
                }
            }
            return "(no answer)"
        }
    }

    @Test func answersEachRequestByItsId() throws {
        let agent = try Agent()
        #expect(agent.request("7 ping") == "7 ok pong")
        let info = agent.request("8 info")
        #expect(info.hasPrefix("8 ok cpus="))
        #expect(info.contains(" memMiB="))
        #expect(info.contains(" time="))
        #expect(agent.request("9 frobnicate") == "9 error unknown command")
        #expect(agent.request("10") == "10 error missing command")
        #expect(agent.request("11 time soon") == "11 error invalid time")
        #expect(agent.request("12 seed xyz") == "12 error invalid hex")
        #expect(agent.request("14 ping") == "14 ok pong", "the agent keeps answering after errors")
    }

    @Test func anOverlongLineIsDroppedAndTheAgentRecovers() throws {
        let agent = try Agent()
        _ = String(repeating: "x", count: 5000).withCString { write(agent.master, $0, strlen($0)) }
        _ = "\n".withCString { write(agent.master, $0, 1) }
        usleep(100_000)
        #expect(agent.request("15 ping") == "15 ok pong")
    }

    @Test func theAgentIsAStaticExecutable() throws {
        let binary = try GuestImage.compileAgent(compiler: ProcessInfo.processInfo.environment["CC"] ?? "cc")
        #expect(GuestImage.isStaticELF(binary))
        #expect(binary.count < 2 << 20, "the agent grew to \(binary.count) bytes")
    }
}
