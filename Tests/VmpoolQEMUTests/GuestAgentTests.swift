import CVmpoolSys
import Foundation
import Testing
import VmpoolDriver
import VmpoolTestSupport

@testable import VmpoolImage
@testable import VmpoolQEMU

/// vmpool's own clients (`AgentClient`, `ExecSession`) against the compiled guest agent, run on
/// the host in its testing mode on socketpairs. The agent's protocol in depth is tested by
/// Tests/Agent (pytest); real VMs are tested by the integration suites.
@Suite("Guest agent and vmpool's clients")
struct GuestAgentTests {
    /// The agent compiled from the source embedded in vmpool, once per run.
    static let binary: String? = {
        guard let data = try? GuestImage.compileAgent(compiler: ProcessInfo.processInfo.environment["CC"] ?? "cc")
        else { return nil }
        let path = NSTemporaryDirectory() + "vmpool-agent-\(getpid())"
        FileManager.default.createFile(atPath: path, contents: data, attributes: [.posixPermissions: 0o700])
        atexit { if let path = GuestAgentTests.binary { unlink(path) } }
        return path
    }()

    /// A running agent serving a control port and one exec port.
    final class Agent {
        let pid: Int32
        let control: Int32
        let exec: Int32

        init() throws {
            let binary = try #require(GuestAgentTests.binary, "the agent must compile (gcc, libc6-dev)")
            var ctl: [Int32] = [0, 0]
            var exe: [Int32] = [0, 0]
            guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &ctl) == 0,
                socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &exe) == 0
            else { throw CocoaError(.fileReadUnknown) }
            // The agent's ends become its descriptors 3 and 4.
            let keep = [ctl[1], exe[1]]
            pid = withCStrings([binary, "--fd", "ctl=3", "--fd", "exec.0=4"]) { args in
                keep.withUnsafeBufferPointer { vmpool_spawn_inherit(binary, args, $0.baseAddress) }
            }
            close(ctl[1])
            close(exe[1])
            control = ctl[0]
            exec = exe[0]
        }

        deinit {
            close(control)
            close(exec)
            _ = vmpool_wait(pid)
        }

        func client() -> AgentClient { AgentClient(channel: Channel(connected: dup(control), path: "ctl"), vm: "test") }
        func session() -> ExecSession {
            ExecSession(channel: Channel(connected: dup(exec), path: "exec.0"), vm: "test")
        }
    }

    /// Runs `request` and returns its outcome with what it wrote.
    func run(_ agent: Agent, _ request: ExecRequest, input: [UInt8]? = nil) throws -> (ExecOutcome, [UInt8], [UInt8]) {
        let out = TemporaryDirectory()
        defer { out.remove() }
        let stdout = open(out.path + "/out", O_RDWR | O_CREAT, 0o600)
        let stderr = open(out.path + "/err", O_RDWR | O_CREAT, 0o600)
        var stdin = open("/dev/null", O_RDONLY)
        if let input {
            FileManager.default.createFile(atPath: out.path + "/in", contents: Data(input))
            close(stdin)
            stdin = open(out.path + "/in", O_RDONLY)
        }
        defer {
            for fd in [stdout, stderr, stdin] { close(fd) }
        }
        let outcome = try agent.session().run(
            request, streams: ExecStreams(stdin: stdin, stdout: stdout, stderr: stderr))
        let o = [UInt8](FileManager.default.contents(atPath: out.path + "/out") ?? Data())
        let e = [UInt8](FileManager.default.contents(atPath: out.path + "/err") ?? Data())
        return (outcome, o, e)
    }

    @Test func controlRequestsAnswerThroughTheClient() throws {
        let agent = try Agent()
        let client = agent.client()
        try client.waitReady(timeout: .seconds(5))
        let info = try client.info()
        #expect(info.cpus >= 1)
        #expect(info.memoryMiB > 0)
        #expect(abs((info.time ?? 0) - Date().timeIntervalSince1970) < 5)
        #expect(throws: DriverError.self) { try client.request("frobnicate", timeout: .seconds(2)) }
        #expect(try client.request("ping", timeout: .seconds(2)) == "pong", "it keeps answering after an error")
    }

    @Test func execStreamsOutputSeparatelyAndBinarySafe() throws {
        let agent = try Agent()
        let all = (0...255).map { String(format: "\\%03o", $0) }.joined()
        let (outcome, out, err) = try run(
            agent, ExecRequest(argv: ["sh", "-c", "printf '\(all)'; echo oops >&2; exit 3"]))
        #expect(outcome == .exited(3))
        #expect(out == Array(0...255))
        #expect(err == Array("oops\n".utf8))
    }

    @Test func exitStatusesFollowDockerExec() throws {
        let agent = try Agent()
        #expect(try run(agent, ExecRequest(argv: ["true"])).0.exitStatus == 0)
        #expect(try run(agent, ExecRequest(argv: ["no-such-command-vmpool"])).0.exitStatus == 127)
        let dir = TemporaryDirectory()
        defer { dir.remove() }
        let notExecutable = dir.write("data.txt", "just data\n")
        #expect(try run(agent, ExecRequest(argv: [notExecutable])).0.exitStatus == 126)
        #expect(try run(agent, ExecRequest(argv: ["sh", "-c", "kill -9 $$"])).0.exitStatus == 137)
    }

    @Test func stdinIsForwardedToTheEnd() throws {
        let agent = try Agent()
        var bytes = [UInt8](repeating: 0, count: 3 << 20)
        for index in bytes.indices { bytes[index] = UInt8(truncatingIfNeeded: index &* 31 &+ index >> 9) }
        let (outcome, out, _) = try run(agent, ExecRequest(argv: ["cat"], stdin: true), input: bytes)
        #expect(outcome == .exited(0))
        #expect(out == bytes)
    }

    @Test func aTimeoutKillsTheCommand() throws {
        let agent = try Agent()
        let started = ContinuousClock.now
        let (outcome, _, _) = try run(agent, ExecRequest(argv: ["sleep", "30"], timeout: .milliseconds(300)))
        #expect(outcome == .timedOut)
        #expect(ContinuousClock.now - started < .seconds(5))
    }

    @Test func environmentAndDirectoryReachTheCommand() throws {
        let agent = try Agent()
        let (outcome, out, _) = try run(
            agent,
            ExecRequest(
                argv: ["sh", "-c", "echo $GREETING; pwd"], environment: ["GREETING=hi there"], directory: "/tmp"))
        #expect(outcome == .exited(0))
        #expect(String(decoding: out, as: UTF8.self) == "hi there\n/tmp\n")
    }
}
