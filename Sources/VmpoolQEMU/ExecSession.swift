import CVmpoolSys
import Foundation
import VmpoolDriver

/// One command in a guest, on one of the agent's exec ports: the host side of `C`, `I`, `K`,
/// `W` frames out and `S`, `O`, `E`, `X` frames in.
///
/// Each exec port serves one command at a time; a session takes a free port under its
/// host-side lock, so several execs on one VM run at once (up to `QemuVM.execPorts`) and
/// never take the control port the reconciler uses.
final class ExecSession {
    private let channel: Channel
    private let lock: ChannelLock?
    let vm: String

    /// A session on an already connected channel (tests).
    init(channel: Channel, vm: String) {
        self.channel = channel
        self.lock = nil
        self.vm = vm
    }

    /// Takes the first free exec port of `vm`, waiting up to `timeout` for one.
    init(paths: QemuPaths, vm: String, timeout: Duration = .seconds(30)) throws(DriverError) {
        self.vm = vm
        let deadline = ContinuousClock.now + timeout
        while true {
            // Least recently used first: a port whose last client went away abruptly is taken
            // last, so that the guest has seen that client leave before a new one comes.
            for port in Self.portsByLastUse(paths: paths, vm: vm) {
                let path = paths.execSocket(vm, port: port)
                guard access(path, F_OK) == 0, let lock = ChannelLock.tryTake(path: path + ".lock", vm: vm) else {
                    continue
                }
                do {
                    channel = try Channel(path: path, deadline: min(deadline, .now + .seconds(2)))
                    self.lock = lock
                    return
                } catch {
                    lock.release()
                    if error.code != .busy { throw error }
                }
            }
            guard ContinuousClock.now < deadline else {
                throw DriverError(.busy, "every exec port of the VM is in use; try again later", vm: vm)
            }
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

    /// Starts the command and streams until it ends. `resize` is polled for a new window size
    /// (pty sessions); `interrupt` for a local request to stop (forwarded as SIGTERM, then SIGKILL).
    func run(
        _ request: ExecRequest, streams: ExecStreams, resize: () -> (rows: Int, columns: Int)? = { nil }
    ) throws(DriverError) -> ExecOutcome {
        if request.argv.isEmpty || request.argv.contains(where: { $0.utf8.contains(0) }) {
            return .notRun(code: 125, message: "the command and its arguments must be non-empty text without NUL bytes")
        }
        try channel.send(
            AgentFrame.encode(AgentFrame.command, Self.commandPayload(request)), deadline: .now + .seconds(10))
        let deadline = request.timeout.map { ContinuousClock.now + $0 }
        var stdinOpen = request.stdin
        var killed = false
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            if let deadline, !killed, ContinuousClock.now >= deadline {
                try signal(SIGKILL)
                killed = true
            }
            if Interrupt.current?.isRequested == true, !killed {
                Undo.run { try? self.signal(SIGKILL) }
                killed = true
            }
            if let size = resize() {
                try channel.send(
                    AgentFrame.encode(AgentFrame.window, Array("\(size.rows)x\(size.columns)".utf8)),
                    deadline: .now + .seconds(5))
            }
            var fds = [pollfd(fd: channel.fd, events: Int16(POLLIN), revents: 0)]
            if stdinOpen { fds.append(pollfd(fd: streams.stdin, events: Int16(POLLIN), revents: 0)) }
            let ready = poll(&fds, nfds_t(fds.count), 50)
            if ready < 0 && errno != EINTR {
                throw DriverError(.io, "poll failed: \(String(cString: strerror(errno)))", vm: vm)
            }
            if stdinOpen, fds.count > 1, fds[1].revents != 0 {
                let count = read(streams.stdin, &buffer, buffer.count)
                if count > 0 {
                    try channel.send(
                        AgentFrame.encode(AgentFrame.stdin, Array(buffer[0..<count])), deadline: .now + .seconds(60))
                } else if count == 0 || (errno != EINTR && errno != EAGAIN) {
                    try channel.send(AgentFrame.encode(AgentFrame.stdin, []), deadline: .now + .seconds(10))
                    stdinOpen = false
                }
            }
            while try channel.readable(within: .zero) {
                let (type, payload) = try channel.readFrame(until: .now + .seconds(10), limit: AgentFrame.maxFromGuest)
                switch type {
                case AgentFrame.stdout: try Self.write(payload, to: streams.stdout)
                case AgentFrame.stderr: try Self.write(payload, to: streams.stderr)
                case AgentFrame.started: break
                case AgentFrame.exit:
                    let outcome = Self.outcome(String(decoding: payload.prefix(400), as: UTF8.self))
                    if killed, let deadline, ContinuousClock.now >= deadline { return .timedOut }
                    return outcome
                default: break
                }
            }
        }
    }

    func signal(_ number: Int32) throws(DriverError) {
        try channel.send(AgentFrame.encode(AgentFrame.signal, Array("\(number)".utf8)), deadline: .now + .seconds(5))
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

    /// Writes all of `bytes` to a local descriptor, unchanged (binary-safe).
    static func write(_ bytes: [UInt8], to fd: Int32) throws(DriverError) {
        var offset = 0
        while offset < bytes.count {
            let written = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + offset, $0.count - offset) }
            if written < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN {
                    var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                    _ = poll(&pfd, 1, 100)
                    continue
                }
                // The reader went away (a closed pipe): the output has nowhere to go.
                throw DriverError(.io, "cannot write the command's output: \(String(cString: strerror(errno)))")
            }
            offset += written
        }
    }
}

extension QemuDriver: GuestAccess {
    public func exec(_ vm: VMRef, _ request: ExecRequest, streams: ExecStreams) async throws(DriverError)
        -> ExecOutcome
    {
        let paths = self.paths
        return try await Blocking.run { () throws(DriverError) -> ExecOutcome in
            let session = try ExecSession(paths: paths, vm: vm.id)
            defer { session.close() }
            return try session.run(
                request, streams: streams, resize: request.tty == nil ? { nil } : TerminalSize.takeChange)
        }
    }
}
