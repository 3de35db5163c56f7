import VmpoolSpec
import CVmpoolSys
import Foundation
import VmpoolDriver

/// One command in a guest, on one of the agent's exec ports: the host side of `H`, `C`, `I`,
/// `K`, `W`, `P` frames out and `H`, `S`, `O`, `E`, `X` frames in.
///
/// Each exec port serves one command at a time; a session takes a free port under its
/// host-side lock, so several execs on one VM run at once (up to `QemuVM.execPorts`) and
/// never take the control port the reconciler uses. Every session starts in-band: an `H`
/// frame with a fresh token, which the agent echoes once it has ended whatever the port ran
/// before; what came before the echo is an older session's and is dropped. So a port freed
/// a moment ago can be taken again at once, whenever the guest sees the notices of QEMU's
/// connect and disconnect.
///
/// Every wait is bounded: the echo (`Limits.handshake`), the command's start
/// (`Limits.start`), and after a kill (an interrupt, `--timeout`, a start that took too
/// long) the command's end (`Limits.killGrace`); past that the session gives up and closes
/// the port, and the agent kills what is left once it sees the host gone.
final class ExecSession {
    /// Deadlines of a session; the defaults suit a loaded TCG guest.
    struct Limits: Sendable {
        /// For the agent's echo of the session start, on one port.
        var handshake: Duration = .seconds(5)
        /// For the echo on any port: a port that did not answer is given up for another one.
        var handshakeTotal: Duration = .seconds(10)
        /// For the command to start (`S`) once requested.
        var start: Duration = .seconds(30)
        /// For the command's end (`X`) once it was killed.
        var killGrace: Duration = .seconds(1)
        /// Between `P` frames that tell the agent the host is still there.
        var keepalive: Duration = .seconds(1)
        /// For a free exec port.
        var portWait: Duration = .seconds(120)
        /// Of silence from the guest before the VM's run state is looked at.
        var watch: Duration = .seconds(2)
    }

    private let channel: Channel
    private let lock: ChannelLock?
    let vm: String
    let limits: Limits

    /// A session on an already connected channel (tests).
    init(channel: Channel, vm: String, limits: Limits = Limits()) {
        self.channel = channel
        self.lock = nil
        self.vm = vm
        self.limits = limits
    }

    /// Takes the first free exec port of `vm` (waiting up to `limits.portWait` for one) and
    /// starts a session on it. A port whose agent does not echo within `limits.handshake` is
    /// left for another, up to `limits.handshakeTotal`.
    init(paths: QemuPaths, vm: String, limits: Limits = Limits()) throws(DriverError) {
        self.vm = vm
        self.limits = limits
        let portDeadline = ContinuousClock.now + limits.portWait
        var handshakeDeadline: ContinuousClock.Instant?
        var silent: Set<Int> = []
        while true {
            // Least recently used first: the agent had the longest to see its last host leave.
            for port in Self.portsByLastUse(paths: paths, vm: vm) where !silent.contains(port) {
                let path = paths.execSocket(vm, port: port)
                let name = "the guest agent's exec port \(port)"
                guard access(path, F_OK) == 0,
                    let lock = ChannelLock.tryTake(path: path + ".lock", name: name, vm: vm)
                else { continue }
                let channel: Channel
                do {
                    channel = try Channel(path: path, name: name, vm: vm, deadline: .now + .seconds(2))
                } catch {
                    lock.release()
                    if error.code == .busy { continue }
                    throw error
                }
                let total = handshakeDeadline ?? (.now + limits.handshakeTotal)
                handshakeDeadline = total
                do {
                    try Self.handshake(channel, until: min(total, .now + limits.handshake))
                    self.channel = channel
                    self.lock = lock
                    return
                } catch {
                    channel.close()
                    lock.touch()
                    lock.release()
                    guard error.code == .timeout, ContinuousClock.now < total else {
                        if error.code == .timeout {
                            throw DriverError(
                                .timeout,
                                "the guest agent did not answer on its exec ports within "
                                    + DurationText.format(limits.handshakeTotal), vm: vm)
                        }
                        throw error
                    }
                    silent.insert(port)
                }
            }
            guard ContinuousClock.now < portDeadline else {
                throw DriverError(.busy, "every exec port of the VM is in use; try again later", vm: vm)
            }
            if silent.count == QemuVM.execPorts { silent = [] }
            try Interrupt.sleep(.milliseconds(20))
        }
    }

    deinit { close() }

    func close() {
        channel.close()
        if let lock {
            lock.touch()
            lock.release()
        }
    }

    /// Starts an in-band session: sends `H` with a fresh token and drops what the port holds
    /// up to the agent's echo, which is byte for byte the frame sent. A `Q ping` with a fresh
    /// id goes with it: an agent older than `H` skips the `H` and answers only the ping, and
    /// the session then goes on without the in-band start (as sessions did before it).
    static func handshake(_ channel: Channel, until deadline: ContinuousClock.Instant) throws(DriverError) {
        let echo = AgentFrame.encode(AgentFrame.session, Array(AgentClient.entropyHex(bytes: 16).utf8))
        let id = "h" + AgentClient.entropyHex(bytes: 8)
        let ping = AgentFrame.encode(AgentFrame.query, Array("\(id) ping".utf8))
        let pong = AgentFrame.encode(AgentFrame.answer, Array("\(id) ok pong".utf8))
        try channel.send(echo + ping, deadline: deadline)
        // An agent that knows H answers the ping after the echo; the answer is skipped later.
        _ = try channel.skip(throughFirstOf: [echo, pong], until: deadline)
    }

    /// Starts a session on a channel made with `init(channel:vm:)`.
    func handshake() throws(DriverError) {
        try Self.handshake(channel, until: .now + limits.handshake)
    }

    /// Exec ports ordered by when their lock was last released, oldest first.
    static func portsByLastUse(paths: QemuPaths, vm: String) -> [Int] {
        let used: [(Int, Double)] = (0..<QemuVM.execPorts).map { port in
            var info = stat()
            let path = paths.execSocket(vm, port: port) + ".lock"
            guard stat(path, &info) == 0 else { return (port, 0) }
            return (port, Double(info.st_mtim.tv_sec) + Double(info.st_mtim.tv_nsec) / 1e9)
        }
        return used.sorted { ($0.1, $0.0) < ($1.1, $1.0) }.map(\.0)
    }

    /// The `C` frame's payload: tagged, NUL-terminated entries.
    static func commandPayload(_ request: ExecRequest) -> [UInt8] {
        var payload: [UInt8] = []
        func entry(_ tag: Character, _ value: String) {
            payload.append(tag.asciiValue!)
            payload += Array(value.utf8)
            payload.append(0)
        }
        for arg in request.argv { entry("a", arg) }
        for pair in request.environment { entry("e", pair) }
        if let directory = request.directory { entry("d", directory) }
        if let tty = request.tty { entry("t", "\(tty.rows)x\(tty.columns)") }
        if request.stdin { entry("i", "1") }
        return payload
    }

    /// Why a session stopped waiting for its command on its own.
    private enum Ending {
        case interrupted
        case timedOut
        case notStarted
        case outputFailed(DriverError)
    }

    /// Frames waiting to go out, sent as the socket takes them: the loop never blocks on a
    /// guest that does not read, and a frame is never left half sent while the loop runs.
    private struct Outbox {
        private var bytes: [UInt8] = []
        private var start = 0
        /// Where each queued frame ends, counted in bytes queued since the session began.
        private var frameEnds: [Int] = []
        private var queued = 0
        private var sent = 0
        /// The end of the last frame sent whole.
        private var boundary = 0
        var count: Int { bytes.count - start }

        mutating func append(_ type: UInt8, _ payload: [UInt8]) {
            bytes += AgentFrame.encode(type, payload)
            queued += 5 + payload.count
            frameEnds.append(queued)
        }

        /// Drops the frames not begun yet (stdin nobody needs once the command is killed); the
        /// frame in progress is kept, so that what follows starts on a frame boundary.
        mutating func dropUnbegun() {
            let keep = sent == boundary ? sent : frameEnds.first { $0 > sent } ?? queued
            bytes.removeLast(queued - keep)
            queued = keep
            frameEnds.removeAll { $0 > keep }
        }

        /// Sends what the socket takes; returns whether anything went.
        mutating func flush(to channel: Channel) throws(DriverError) -> Bool {
            guard count > 0 else { return false }
            let taken = try channel.sendAvailable(bytes[start...])
            start += taken
            sent += taken
            if let done = frameEnds.last(where: { $0 <= sent }) { boundary = done }
            frameEnds.removeAll { $0 <= sent }
            if start == bytes.count {
                bytes.removeAll(keepingCapacity: true)
                start = 0
            } else if start > 1 << 18 {
                bytes.removeFirst(start)
                start = 0
            }
            return taken > 0
        }
    }

    /// Stdin is read only while less than this waits to go out.
    private static let outboxHighWater = 256 << 10

    /// Runs the command and streams until it ends. `resize` is polled for a new window size
    /// (pty sessions); the job's `Interrupt` asks to stop: the command is killed (SIGKILL, its
    /// process group) and its end awaited for at most `limits.killGrace`.
    /// `stopped` is asked, after `limits.watch` without a frame from the guest, whether the
    /// hypervisor stopped the VM (a disk write found no space): its reason ends the session,
    /// which would otherwise wait on a guest that cannot run.
    func run(
        _ request: ExecRequest, streams: ExecStreams, resize: () -> (rows: Int, columns: Int)? = { nil },
        stopped: () -> String? = { nil }
    ) throws(DriverError) -> ExecOutcome {
        if request.argv.isEmpty || request.argv.contains(where: { $0.utf8.contains(0) }) {
            return .notRun(code: 125, message: "the command and its arguments must be non-empty text without NUL bytes")
        }
        var outbox = Outbox()
        outbox.append(AgentFrame.command, Self.commandPayload(request))
        let begin = ContinuousClock.now
        let timeoutAt = request.timeout.map { begin + $0 }
        let startBy = begin + limits.start
        var stdinOpen = request.stdin
        var started = false
        var ending: Ending?
        var giveUpAt: ContinuousClock.Instant?
        var lastSent = begin
        var lastHeard = begin
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let now = ContinuousClock.now
            if ending == nil {
                if Interrupt.current?.isRequested == true {
                    ending = .interrupted
                } else if let timeoutAt, now >= timeoutAt {
                    ending = .timedOut
                } else if !started, now >= startBy {
                    ending = .notStarted
                }
                if ending != nil {
                    outbox.dropUnbegun()
                    outbox.append(AgentFrame.signal, Array("\(SIGKILL)".utf8))
                    giveUpAt = now + limits.killGrace
                    stdinOpen = false
                }
            }
            if let giveUpAt, let ending, now >= giveUpAt { return try finish(ending, exit: nil) }
            if ending == nil, let size = resize() {
                outbox.append(AgentFrame.window, Array("\(size.rows)x\(size.columns)".utf8))
            }
            if outbox.count == 0, now - lastSent >= limits.keepalive { outbox.append(AgentFrame.presence, []) }

            var fds = [pollfd(fd: channel.fd, events: Int16(POLLIN), revents: 0)]
            if outbox.count > 0 { fds[0].events |= Int16(POLLOUT) }
            let readStdin = stdinOpen && outbox.count < Self.outboxHighWater
            if readStdin { fds.append(pollfd(fd: streams.stdin, events: Int16(POLLIN), revents: 0)) }
            var wait = 50
            if let giveUpAt { wait = min(wait, max(0, Int((giveUpAt - now).milliseconds) + 1)) }
            if poll(&fds, nfds_t(fds.count), Int32(wait)) < 0 && errno != EINTR {
                throw DriverError(.io, "poll failed: \(String(cString: strerror(errno)))", vm: vm)
            }
            if fds[0].revents & Int16(POLLOUT) != 0 || outbox.count > 0 {
                if try outbox.flush(to: channel) { lastSent = .now }
            }
            if readStdin, fds[1].revents != 0 {
                let count = read(streams.stdin, &buffer, buffer.count)
                if count > 0 {
                    outbox.append(AgentFrame.stdin, Array(buffer[0..<count]))
                } else if count == 0 || (errno != EINTR && errno != EAGAIN) {
                    outbox.append(AgentFrame.stdin, [])
                    stdinOpen = false
                }
            }
            if fds[0].revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
                try channel.receiveAvailable()
                lastHeard = .now
            } else if ending == nil, ContinuousClock.now - lastHeard >= limits.watch {
                lastHeard = .now
                if let reason = stopped() {
                    throw DriverError(
                        .processExited, "\(reason) while the command ran; the next pass replaces the VM", vm: vm)
                }
            }
            while let (type, payload) = try channel.bufferedFrame(limit: AgentFrame.maxFromGuest) {
                switch type {
                case AgentFrame.stdout, AgentFrame.stderr:
                    if case .outputFailed = ending { continue }
                    do throws(DriverError) {
                        try LocalOutput.write(payload, to: type == AgentFrame.stdout ? streams.stdout : streams.stderr)
                    } catch {
                        if ending == nil {
                            outbox.dropUnbegun()
                            outbox.append(AgentFrame.signal, Array("\(SIGKILL)".utf8))
                            giveUpAt = .now + limits.killGrace
                            stdinOpen = false
                        }
                        ending = .outputFailed(error)
                    }
                case AgentFrame.started: started = true
                case AgentFrame.exit:
                    let outcome = Self.outcome(String(decoding: payload.prefix(400), as: UTF8.self))
                    guard let ending else { return outcome }
                    return try finish(ending, exit: outcome)
                default: break
                }
            }
        }
    }

    /// The result of a session that killed its command: `exit` is the command's end, when it
    /// came in time.
    private func finish(_ ending: Ending, exit: ExecOutcome?) throws(DriverError) -> ExecOutcome {
        switch ending {
        case .timedOut:
            return .timedOut
        case .interrupted:
            if let exit { return exit }
            throw DriverError(
                .cancelled,
                "interrupted; the guest agent did not confirm the command's end within "
                    + "\(DurationText.format(limits.killGrace)) (it kills it once it sees vmpool gone)", vm: vm)
        case .notStarted:
            if let exit, case .notRun = exit { return exit }
            throw DriverError(
                .timeout,
                "the command did not start within \(DurationText.format(limits.start)); it was killed", vm: vm)
        case .outputFailed(let error):
            throw error
        }
    }

    /// Parses an `X` frame: `exit N`, `signal N` or `error CODE MESSAGE`.
    static func outcome(_ text: String) -> ExecOutcome {
        let parts = text.split(separator: " ", maxSplits: 2).map(String.init)
        switch parts.first {
        case "exit": return .exited(Int32(parts.count > 1 ? parts[1] : "") ?? 125)
        case "signal": return .signalled(Int32(parts.count > 1 ? parts[1] : "") ?? 9)
        case "error":
            let code = Int32(parts.count > 1 ? parts[1] : "") ?? 125
            return .notRun(code: [125, 126, 127].contains(code) ? code : 125, message: parts.count > 2 ? parts[2] : "")
        default: return .notRun(code: 125, message: "the guest agent ended the command oddly: \(text.prefix(100))")
        }
    }
}

/// Writing to vmpool's own stdout and stderr (a terminal, a file, a pipe to a slow reader)
/// without ever blocking past an interrupt.
enum LocalOutput {
    /// Writes all of `bytes`, or stops early (dropping the rest) when the current job is
    /// interrupted while the descriptor takes nothing. On a descriptor that may block (a pipe,
    /// a terminal) it writes at most PIPE_BUF bytes after each readiness check, so no single
    /// write waits for a reader.
    static func write(_ bytes: [UInt8], to fd: Int32) throws(DriverError) {
        var info = stat()
        let regular = fstat(fd, &info) == 0 && (info.st_mode & S_IFMT) == S_IFREG
        let nonBlocking = fcntl(fd, F_GETFL) & O_NONBLOCK != 0
        let chunk = regular || nonBlocking ? Int.max : Int(PIPE_BUF)
        var offset = 0
        while offset < bytes.count {
            if !regular {
                var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                let ready = poll(&pfd, 1, 50)
                if ready == 0 || (ready < 0 && errno == EINTR) {
                    if Interrupt.current?.isRequested == true { return }
                    continue
                }
            }
            let length = min(bytes.count - offset, chunk)
            let written = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + offset, length) }
            if written < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                // The reader went away (a closed pipe): the output has nowhere to go.
                throw DriverError(.io, "cannot write the command's output: \(String(cString: strerror(errno)))")
            }
            offset += written
        }
    }
}

extension QemuDriver: GuestAccess {
    public func setupLog(of id: String, template: Bool) -> String? {
        let path = template ? paths.setupLog(template: id) : paths.setupLog(id)
        return access(path, R_OK) == 0 ? path : nil
    }

    public func bootLog(ofTemplate id: String) -> String? {
        let path = paths.bootLog(template: id)
        return access(path, R_OK) == 0 ? path : nil
    }

    public func exec(_ vm: VMRef, _ request: ExecRequest, streams: ExecStreams) async throws(DriverError)
        -> ExecOutcome
    {
        let paths = self.paths
        let process = VMProcess(paths: paths, vm: vm)
        let machine = self.vm(vm.id, pid: vm.pid)
        return try await Blocking.run { () throws(DriverError) -> ExecOutcome in
            do throws(DriverError) {
                let session = try ExecSession(paths: paths, vm: vm.id)
                defer { session.close() }
                return try session.run(
                    request, streams: streams, resize: request.tty == nil ? { nil } : TerminalSize.takeChange,
                    stopped: { machine.status(depth: .hypervisor, agentTimeout: .seconds(1)).fault })
            } catch {
                throw process.explain(error, during: "the command ran")
            }
        }
    }
}
