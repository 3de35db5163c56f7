import CVmpoolSys
import Foundation
import VmpoolArchive
import VmpoolDriver
import VmpoolSpec

/// Prepares a running guest as its pool asks (SPEC §11), through the agent's exec ports:
/// copies `files` in, runs each `setup` step (each must exit 0), then waits for the `ready`
/// check. A template VM is prepared before its memory is saved, a cold VM after it boots; a
/// clone only waits for the check, since its services came with the template's memory.
///
/// Every step's output goes to `log` (a host file, kept for `describe`); a failure is a
/// `DriverError` naming the step, its exit status and the tail of its stderr.
struct GuestPreparation {
    let paths: QemuPaths
    let vm: String
    /// The host file the steps' output is appended to; `nil`: kept nowhere.
    let log: String?
    /// Says why the VM stopped under a step (a full disk), as exec does.
    let stopped: () -> String?

    /// A setup step may run this long (a package install under TCG is minutes, not hours).
    static let stepTimeout: Duration = .seconds(1800)
    /// The stderr shown in an error: its last lines, at most this many bytes.
    static let tailBytes = 1024

    func prepare(_ preparation: Preparation) throws(DriverError) {
        let logFD = openLog()
        defer { if logFD >= 0 { close(logFD) } }
        for (index, file) in preparation.files.enumerated() {
            try copy(file, index: index, log: logFD)
        }
        for (index, step) in preparation.setup.enumerated() {
            let what = "setup step \(index + 1) (\(Self.quote(step.display)))"
            note(logFD, "== \(what)\n")
            let (outcome, tail) = try run(step.argv, timeout: Self.stepTimeout, log: logFD)
            guard outcome == .exited(0) else { throw failure(what, outcome, tail) }
        }
        if let ready = preparation.ready { try awaitReady(ready, log: logFD) }
    }

    /// Waits until `check` holds (its command exits 0 and its port listens), up to its timeout.
    func awaitReady(_ check: ReadyCheck, log: Int32? = nil) throws(DriverError) {
        let logFD = log ?? openLog()
        defer { if log == nil, logFD >= 0 { close(logFD) } }
        let deadline = ContinuousClock.now + .seconds(check.timeoutSeconds)
        var last = "it was not tried"
        var tries = 0
        while true {
            tries += 1
            var holds = true
            let left = max(deadline - .now, .seconds(1))
            if let exec = check.exec {
                let (outcome, tail) = try run(exec.argv, timeout: min(left, .seconds(60)), log: tries == 1 ? logFD : -1)
                if outcome != .exited(0) {
                    holds = false
                    last = "\(Self.quote(exec.display)) \(Self.describe(outcome))" + (tail.isEmpty ? "" : ": \(tail)")
                }
            }
            if holds, let port = check.port {
                let (outcome, _) = try run(
                    ["/bin/sh", "-c", Self.listening, "sh", String(format: "%04X", port)],
                    timeout: min(left, .seconds(30)),
                    log: -1)
                if outcome != .exited(0) {
                    holds = false
                    last = "nothing listens on guest TCP port \(port)"
                }
            }
            if holds { return }
            if ContinuousClock.now >= deadline {
                throw DriverError(
                    .timeout, "the ready check did not hold within \(check.timeoutSeconds) s: \(last)", vm: vm)
            }
            var none = pollfd(fd: -1, events: 0, revents: 0)
            _ = poll(&none, 0, Int32(min(250 * tries, 1000)))
        }
    }

    /// Exits 0 when a TCP socket (IPv4 or IPv6) listens on the port given as 4 hex digits:
    /// read from the kernel's tables, so it needs no tool the guest may lack.
    static let listening = """
        for t in /proc/net/tcp /proc/net/tcp6; do
        \t[ -r "$t" ] || continue
        \twhile read -r _ local _ state _; do
        \t\tcase "$local:$state" in *:"$1":0A) exit 0 ;; esac
        \tdone < "$t"
        done
        exit 1
        """

    /// Copies one host file or tree to `file.dst` in the guest: a tar stream of it under the
    /// destination's name, unpacked in the destination's directory (made first).
    private func copy(_ file: Preparation.File, index: Int, log: Int32) throws(DriverError) {
        let what = "template.files[\(index)] (\(file.src) → \(file.dst))"
        note(log, "== \(what)\n")
        let stream = vmpool_memfd("vmpool-files")
        guard stream >= 0 else { throw DriverError(.io, "\(what): \(String(cString: strerror(errno)))", vm: vm) }
        defer { close(stream) }
        let name = (file.dst as NSString).lastPathComponent
        let parent = (file.dst as NSString).deletingLastPathComponent
        do {
            let archiver = try TreeArchiver(path: file.src, display: file.src)
            let writer = TarWriter(fd: stream)
            _ = try archiver.write(as: Array(name.utf8), to: writer)
            try writer.finish()
        } catch let error as ArchiveError {
            throw DriverError(.io, "\(what): \(error.message)", vm: vm)
        } catch {
            throw DriverError(.io, "\(what): \(error)", vm: vm)
        }
        lseek(stream, 0, SEEK_SET)
        let script = "mkdir -p -- \"$1\" && cd -- \"$1\" && exec tar -x -f -"
        let (outcome, tail) = try run(
            ["/bin/sh", "-c", script, "sh", parent.isEmpty ? "/" : parent], timeout: Self.stepTimeout, log: log,
            stdin: stream)
        guard outcome == .exited(0) else { throw failure(what, outcome, tail) }
    }

    /// Runs `argv` in the guest: stdout to `log`, stderr to `log` and kept for its tail.
    private func run(_ argv: [String], timeout: Duration, log: Int32, stdin: Int32? = nil) throws(DriverError)
        -> (ExecOutcome, String)
    {
        let errors = vmpool_memfd("vmpool-stderr")
        guard errors >= 0 else { throw DriverError(.io, "cannot keep a step's stderr", vm: vm) }
        defer { close(errors) }
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { close(null) }
        let session = try ExecSession(paths: paths, vm: vm)
        defer { session.close() }
        let outcome = try session.run(
            ExecRequest(argv: argv, stdin: stdin != nil, timeout: timeout),
            streams: ExecStreams(stdin: stdin ?? null, stdout: log >= 0 ? log : null, stderr: errors),
            stopped: stopped)
        let size = lseek(errors, 0, SEEK_END)
        if log >= 0, size > 0 {
            var offset: off_t = 0
            _ = sendfile(log, errors, &offset, Int(size))
        }
        var tail = [UInt8](repeating: 0, count: Int(min(size, off_t(Self.tailBytes))))
        if !tail.isEmpty { _ = pread(errors, &tail, tail.count, size - off_t(tail.count)) }
        return (outcome, Self.tail(tail, cut: size > off_t(Self.tailBytes)))
    }

    private func failure(_ what: String, _ outcome: ExecOutcome, _ tail: String) -> DriverError {
        DriverError(
            .setupFailed, "\(what) \(Self.describe(outcome))" + (tail.isEmpty ? "" : "; its stderr ends: \(tail)"),
            vm: vm)
    }

    static func describe(_ outcome: ExecOutcome) -> String {
        switch outcome {
        case .exited(let code): "exited with status \(code)"
        case .signalled(let signal): "was killed by signal \(signal)"
        case .notRun(_, let message): "could not run: \(message)"
        case .timedOut: "did not end in time and was killed"
        }
    }

    /// The last lines of a step's stderr as one line: newlines as ` ⏎ `, a cut start marked.
    static func tail(_ bytes: [UInt8], cut: Bool) -> String {
        var text = String(decoding: bytes, as: UTF8.self)
        if cut, let newline = text.firstIndex(of: "\n") { text = "…" + text[text.index(after: newline)...] }
        return text.trimmingCharacters(in: .whitespacesAndNewlines).replacingOccurrences(of: "\n", with: " ⏎ ")
    }

    static func quote(_ text: String) -> String {
        text.count > 80 ? String(text.prefix(80)) + "…" : text
    }

    private func openLog() -> Int32 {
        guard let log else { return -1 }
        return open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0o600)
    }

    private func note(_ fd: Int32, _ text: String) {
        guard fd >= 0 else { return }
        _ = Array(text.utf8).withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    }
}
