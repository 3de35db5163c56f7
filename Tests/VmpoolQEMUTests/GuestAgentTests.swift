import CVmpoolSys
import Foundation
import Synchronization
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

        func client() -> AgentClient { AgentClient(channel: Channel(connected: dup(control), name: "ctl"), vm: "test") }
        func session() -> ExecSession {
            ExecSession(channel: Channel(connected: dup(exec), name: "exec.0"), vm: "test")
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
        let session = agent.session()
        try session.handshake()
        let outcome = try session.run(request, streams: ExecStreams(stdin: stdin, stdout: stdout, stderr: stderr))
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
    @Test func aSessionStartEndsWhatAnEarlierSessionLeftOnThePort() throws {
        let agent = try Agent()
        // An earlier host started a command that floods its output, and left without reading.
        let raw = dup(agent.exec)
        defer { close(raw) }
        let marker = "vmpool-flood-\(UInt32.random(in: 0...UInt32.max))"
        let flood = AgentFrame.encode(
            AgentFrame.command, ExecSession.commandPayload(ExecRequest(argv: ["yes", marker])))
        flood.withUnsafeBytes { _ = write(raw, $0.baseAddress, $0.count) }
        // The next session on the same port: its echo comes after the flood's output, which is
        // skipped; the flood is killed; nothing of it follows.
        let (outcome, out, err) = try run(agent, ExecRequest(argv: ["echo", "after"]))
        #expect(outcome == .exited(0))
        #expect(String(decoding: out, as: UTF8.self) == "after\n")
        #expect(err.isEmpty)
        // (The agent in its testing mode runs commands on this host.)
        let deadline = ContinuousClock.now + .seconds(5)
        while !Self.processes(containing: marker).isEmpty, ContinuousClock.now < deadline { usleep(10_000) }
        #expect(Self.processes(containing: marker).isEmpty, "the earlier command still runs")
    }

    /// Pids of this host's processes whose command line contains `text`.
    static func processes(containing text: String) -> [Int32] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { entry in
            guard let pid = Int32(entry), let data = FileManager.default.contents(atPath: "/proc/\(entry)/cmdline")
            else { return nil }
            return String(decoding: data, as: UTF8.self).contains(text) ? pid : nil
        }
    }

    /// Limits short enough for a test: what is being checked is that each wait ends.
    static let shortLimits = ExecSession.Limits(
        handshake: .milliseconds(300), handshakeTotal: .milliseconds(300), start: .milliseconds(400),
        killGrace: .milliseconds(300), keepalive: .milliseconds(100), portWait: .seconds(1))

    @Test func noEchoOfTheSessionStartIsATimeout() throws {
        let agent = try ScriptedAgent(.noEcho)
        let session = ExecSession(channel: agent.channel, vm: "test", limits: Self.shortLimits)
        let started = ContinuousClock.now
        do {
            try session.handshake()
            Issue.record("a session started without the agent's echo")
        } catch {
            #expect(error.code == .timeout, "\(error)")
        }
        #expect(ContinuousClock.now - started < .seconds(2))
    }

    @Test func anAgentFromBeforeTheSessionStartStillRunsCommands() throws {
        let agent = try ScriptedAgent(.beforeSessionStart)
        let session = ExecSession(channel: agent.channel, vm: "test", limits: Self.shortLimits)
        try session.handshake()
        #expect(try session.run(ExecRequest(argv: ["true"]), streams: agent.streams) == .exited(3))
    }

    @Test func aCommandThatNeverStartsIsKilledAtTheStartDeadline() throws {
        let agent = try ScriptedAgent(.noStart)
        let session = ExecSession(channel: agent.channel, vm: "test", limits: Self.shortLimits)
        try session.handshake()
        let started = ContinuousClock.now
        do {
            let outcome = try session.run(ExecRequest(argv: ["true"]), streams: agent.streams)
            Issue.record("a command that never started ended as \(outcome)")
        } catch {
            #expect(error.code == .timeout && error.message.contains("did not start"), "\(error)")
        }
        let took = ContinuousClock.now - started
        #expect(took >= .milliseconds(400) && took < .seconds(2), "\(took)")
        #expect(agent.waitForKill(), "no kill was sent for the command")
    }

    @Test func anInterruptedSessionGivesUpWithinTheKillGrace() throws {
        let interrupt = Interrupt()
        // The agent starts the command, then never answers again; the interrupt comes as the
        // command starts.
        let agent = try ScriptedAgent(.neverEnds, onStart: { interrupt.request() })
        let session = ExecSession(channel: agent.channel, vm: "test", limits: Self.shortLimits)
        Interrupt.current = interrupt
        defer { Interrupt.current = nil }
        try session.handshake()
        let started = ContinuousClock.now
        do {
            let outcome = try session.run(ExecRequest(argv: ["sleep", "100"]), streams: agent.streams)
            Issue.record("an interrupted session that got no end ended as \(outcome)")
        } catch {
            #expect(error.code == .cancelled, "\(error)")
        }
        let took = ContinuousClock.now - started
        #expect(took >= .milliseconds(300) && took < .seconds(2), "\(took)")
        #expect(agent.waitForKill(), "no kill was sent for the command")
    }

    @Test func aTimeoutEndsTheSessionEvenWhenTheAgentNeverConfirms() throws {
        let agent = try ScriptedAgent(.neverEnds)
        let session = ExecSession(channel: agent.channel, vm: "test", limits: Self.shortLimits)
        try session.handshake()
        let started = ContinuousClock.now
        let outcome = try session.run(
            ExecRequest(argv: ["sleep", "100"], timeout: .milliseconds(200)), streams: agent.streams)
        #expect(outcome == .timedOut)
        let took = ContinuousClock.now - started
        #expect(took >= .milliseconds(500) && took < .seconds(2), "\(took)")
        #expect(agent.waitForKill())
        #expect(agent.presenceFrames > 0, "no P frame told the agent that the host was still there")
    }
}

/// A guest agent that keeps to the protocol only up to a point, played by a thread on one end
/// of a socketpair: it echoes the session start (or not), starts the command (or not), and
/// never ends it. It notes the kills and presence frames it gets.
final class ScriptedAgent {
    enum Stage: Sendable {
        case noEcho, noStart, neverEnds
        /// An agent from before H: it skips the H, answers pings, and runs commands to the end.
        case beforeSessionStart
    }

    /// What the agent got, shared with its thread.
    final class Record: Sendable {
        let state = Mutex<(kills: [String], presence: Int)>(([], 0))
    }

    let channel: Channel
    let streams: ExecStreams
    private let guest: Int32
    private let record = Record()
    private let null: Int32

    init(_ stage: Stage, onStart: @escaping @Sendable () -> Void = {}) throws {
        var fds: [Int32] = [0, 0]
        try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        channel = Channel(connected: fds[0], name: "scripted exec port")
        guest = fds[1]
        null = open("/dev/null", O_RDWR)
        streams = ExecStreams(stdin: null, stdout: null, stderr: null)
        let guest = self.guest
        let record = self.record
        Thread.detachNewThread {
            while let (type, payload) = Self.readFrame(guest) {
                switch type {
                case AgentFrame.session where stage != .noEcho && stage != .beforeSessionStart:
                    Self.send(guest, AgentFrame.encode(type, payload))
                case AgentFrame.query where stage == .beforeSessionStart:
                    let id = String(decoding: payload, as: UTF8.self).split(separator: " ").first ?? ""
                    Self.send(guest, AgentFrame.encode(AgentFrame.answer, Array("\(id) ok pong".utf8)))
                case AgentFrame.command where stage == .beforeSessionStart:
                    Self.send(guest, AgentFrame.encode(AgentFrame.started, Array("4242".utf8)))
                    Self.send(guest, AgentFrame.encode(AgentFrame.stdout, Array("old\n".utf8)))
                    Self.send(guest, AgentFrame.encode(AgentFrame.exit, Array("exit 3".utf8)))
                case AgentFrame.command where stage == .neverEnds:
                    Self.send(guest, AgentFrame.encode(AgentFrame.started, Array("4242".utf8)))
                    onStart()
                case AgentFrame.signal:
                    record.state.withLock { $0.kills.append(String(decoding: payload, as: UTF8.self)) }
                case AgentFrame.presence:
                    record.state.withLock { $0.presence += 1 }
                default:
                    break
                }
            }
        }
    }

    deinit {
        channel.close()
        close(guest)
        close(null)
    }

    var presenceFrames: Int { record.state.withLock { $0.presence } }

    /// Whether a SIGKILL for the command arrived, waiting up to 2 s for it.
    func waitForKill() -> Bool {
        let deadline = ContinuousClock.now + .seconds(2)
        while ContinuousClock.now < deadline {
            if record.state.withLock({ $0.kills.contains("9") }) { return true }
            usleep(10_000)
        }
        return false
    }

    private static func readFrame(_ fd: Int32) -> (UInt8, [UInt8])? {
        guard let header = readExactly(fd, 5) else { return nil }
        let length = header[1...4].reduce(0) { $0 << 8 | Int($1) }
        guard let payload = readExactly(fd, length) else { return nil }
        return (header[0], payload)
    }

    private static func readExactly(_ fd: Int32, _ count: Int) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + got, count - got) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return nil }
            got += n
        }
        return bytes
    }

    private static func send(_ fd: Int32, _ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    }
}
