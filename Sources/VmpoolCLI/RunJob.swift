import CVmpoolSys
import Foundation
import VmpoolArchive
import VmpoolCopy
import VmpoolDriver
import VmpoolReconciler
import VmpoolSpec
import VmpoolStore

/// The steps of `vmpool run`: lease a VM, copy in, run the command, copy out, release. Every
/// step after the lease ends in the release, whatever happened before it; a signal (SIGINT,
/// SIGTERM, SIGHUP) stops the step in progress, skips the rest but the release, and makes the
/// exit status 128 + its number.
struct RunJob {
    /// One `--in SRC:VMPATH` or `--out VMPATH:DST`.
    struct Transfer: Sendable, Equatable {
        var host: String
        var guest: String

        /// `SRC:VMPATH`, split at the last colon (a guest path has none); `nil` when a side is empty.
        init?(input text: String) {
            guard let colon = text.lastIndex(of: ":") else { return nil }
            host = String(text[..<colon])
            guest = String(text[text.index(after: colon)...])
            if host.isEmpty || guest.isEmpty { return nil }
        }

        /// `VMPATH:DST`, split at the first colon (a guest path has none); `nil` when a side is empty.
        init?(output text: String) {
            guard let colon = text.firstIndex(of: ":") else { return nil }
            guest = String(text[..<colon])
            host = String(text[text.index(after: colon)...])
            if host.isEmpty || guest.isEmpty { return nil }
        }
    }

    /// What a run did, for its exit status and `-o json`.
    struct Report: Sendable {
        var vm: String?
        var pool: String
        var status: Int32 = GuestCommand.vmpoolFailed
        /// vmpool's own failures, as printed on stderr.
        var errors: [String] = []
        var lease: Duration = .zero
        var input: Duration = .zero
        var command: Duration = .zero
        var output: Duration = .zero
        var release: Duration = .zero
        /// The last byte of the command's stdout, when it was relayed (`-o json`).
        var lastByte: UInt8?

        var json: [String: JSONValue] {
            let ms = { (duration: Duration) in JSONValue.int(Int(duration.milliseconds)) }
            return [
                "id": vm.map { .string($0) } ?? .null, "pool": .string(pool), "exitStatus": .int(Int(status)),
                "errors": .array(errors.map { .string($0) }),
                "timingsMs": .object([
                    "lease": ms(lease), "in": ms(input), "cmd": ms(command), "out": ms(output),
                    "release": ms(release),
                ]),
            ]
        }

        /// The object `-o json` prints: one line, on a line of its own after the command's output,
        /// so that a script finds it as the last line of stdout.
        func jsonLine() throws -> String {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            let text = String(decoding: try encoder.encode(JSONValue.object(json)), as: UTF8.self)
            return (lastByte.map { $0 == UInt8(ascii: "\n") } ?? true ? "" : "\n") + text
        }

        /// Prints a failure of vmpool's own and keeps it for the report.
        mutating func fail(_ message: String) {
            printError("vmpool run: \(message)")
            errors.append(message)
        }
    }

    let options: GlobalOptions
    let pool: String
    let holder: String
    let ttl: Duration
    let wait: Duration
    let inputs: [Transfer]
    let outputs: [Transfer]
    let request: ExecRequest
    /// Whether the command's stdout goes through vmpool (`-o json`, whose object must start a line).
    let relaysStdout: Bool

    /// Runs the steps; the exit status is 128 + the first signal that came, if one did.
    func run() async -> Report {
        var report = Report(pool: pool)
        // SIGINT, SIGTERM and SIGHUP go into a pipe that every step watches (never read until
        // the end, so each watcher sees it): the lease wait, the copies and the command stop
        // within a poll, and the release still runs.
        let signals: [Int32] = [SIGINT, SIGTERM, SIGHUP]
        let interrupt = vmpool_trap_signals(signals, Int32(signals.count))
        guard interrupt >= 0 else {
            report.fail("cannot trap signals: \(String(cString: strerror(errno)))")
            return report
        }
        // A reader of stdout that went away fails the command's output (it is killed), never
        // vmpool itself: the VM is still released.
        signal(SIGPIPE, SIG_IGN)
        await steps(interrupt: interrupt, into: &report)
        report.status = Self.finalStatus(report.status, interrupt: interrupt)
        return report
    }

    /// Lease, copy in, command, copy out, release: every step after the lease ends in the release.
    private func steps(interrupt: Int32, into report: inout Report) async {
        let signalled: @Sendable () -> Bool = { CancelFlag(interrupt: interrupt).isCancelled }
        if let problem = preflight() {
            report.fail(problem)
            return
        }
        let session: Session
        let access: any GuestAccess
        do {
            session = try await Session(options, locking: nil, create: false)
            guard let guest = session.reconciler.driver as? any GuestAccess else {
                throw CommandFailure(
                    description: "the \(session.reconciler.driver.name) driver runs no guests; this needs --driver qemu"
                )
            }
            access = guest
        } catch {
            report.fail(Self.describe(error))
            return
        }
        let leases = Leases(
            store: session.store, driver: session.reconciler.driver, stateDirectory: session.stateDirectory)

        var clock = ContinuousClock.now
        let record: VMRecord
        do {
            record = try await leases.take(
                pool: pool, holder: holder, ttl: ttl, wait: wait, abandoned: signalled)
        } catch {
            report.lease = ContinuousClock.now - clock
            if !signalled() { report.fail(Self.describe(error)) }
            return
        }
        report.vm = record.id
        report.lease = ContinuousClock.now - clock

        var vmGone = false
        if record.host != session.store.host {
            report.fail(
                "VM \(record.id) of pool \(pool) runs on host \(record.host), not on \(session.store.host): "
                    + "run this there")
        } else {
            clock = ContinuousClock.now
            let copiedIn = await copyIn(access, record.ref, interrupt: interrupt, into: &report)
            report.input = ContinuousClock.now - clock
            if copiedIn && !signalled() {
                clock = ContinuousClock.now
                vmGone = await runCommand(access, record, leases: leases, interrupt: interrupt, into: &report)
                report.command = ContinuousClock.now - clock
                if !signalled() {
                    clock = ContinuousClock.now
                    await copyOut(access, record.ref, vmGone: vmGone, interrupt: interrupt, into: &report)
                    report.output = ContinuousClock.now - clock
                }
            }
        }

        clock = ContinuousClock.now
        do {
            try await leases.release(record.id)
        } catch {
            report.fail("releasing VM \(record.id) failed: \(Self.describe(error)); its lease ends at its ttl")
            if report.status == 0 { report.status = GuestCommand.vmpoolFailed }
        }
        report.release = ContinuousClock.now - clock
    }

    /// What makes the run fail before it leases anything: a `--in` source that is not there, a
    /// `--out` destination whose directory is not there. `nil` when there is none.
    func preflight() -> String? {
        for input in inputs {
            var info = stat()
            if lstat(input.host, &info) != 0 {
                return "--in \(input.host): \(String(cString: strerror(errno))) on the host; nothing was leased"
            }
        }
        for output in outputs {
            var isDirectory: ObjCBool = false
            if FileManager.default.fileExists(atPath: output.host, isDirectory: &isDirectory), isDirectory.boolValue {
                continue
            }
            let parent = output.host.hasSuffix("/") ? output.host : (output.host as NSString).deletingLastPathComponent
            let directory = parent.isEmpty ? "." : parent
            guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory), isDirectory.boolValue
            else { return "--out \(output.host): no such directory on the host: \(directory); nothing was leased" }
        }
        return nil
    }

    /// Copies every `--in` in order; false once one failed (the command is not run).
    private func copyIn(_ access: any GuestAccess, _ vm: VMRef, interrupt: Int32, into report: inout Report) async
        -> Bool
    {
        for input in inputs {
            do {
                let warnings = try await CopyTransfer.toGuest(
                    access, vm, from: input.host, path: input.guest, interrupt: interrupt)
                for warning in warnings { printError("vmpool run: --in \(input.host): \(warning)") }
            } catch {
                if CancelFlag(interrupt: interrupt).isCancelled { return false }
                report.fail("--in \(input.host): \(Self.describe(error)); the command was not run")
                return false
            }
        }
        return true
    }

    /// Runs the command, its streams on vmpool's own, until it ends or a signal comes; returns
    /// whether the VM was found gone after a failure.
    private func runCommand(
        _ access: any GuestAccess, _ record: VMRecord, leases: Leases, interrupt: Int32, into report: inout Report
    ) async -> Bool {
        let request = self.request
        let result: Result<ExecOutcome, any Error>
        do {
            let done = try StreamPipe.make()
            let relay = relaysStdout ? try StreamPipe.make() : nil
            let streams = ExecStreams(stdout: relay?.write ?? 1)
            (result, report.lastByte) = await withTaskGroup(of: Part.self) { group in
                group.addTask {
                    defer {
                        close(done.write)
                        if let relay { close(relay.write) }
                    }
                    return .exec(await capture { try await access.exec(record.ref, request, streams: streams) })
                }
                group.addTask {
                    if case .interrupted = await CopyTransfer.watch(interrupt, until: done.read) { return .interrupted }
                    return .finished
                }
                if let relay {
                    group.addTask { .relayed((try? await OffPool.run { _ in Self.relay(relay.read) }) ?? nil) }
                }
                var result: Result<ExecOutcome, any Error> = .failure(CancellationError())
                var last: UInt8?
                for await part in group {
                    switch part {
                    case .exec(let outcome): result = outcome
                    case .interrupted: group.cancelAll()
                    case .relayed(let byte): last = byte
                    case .finished: break
                    }
                }
                return (result, last)
            }
        } catch {
            report.fail(Self.describe(error))
            return false
        }
        if CancelFlag(interrupt: interrupt).isCancelled { return false }
        let name = request.argv[0]
        switch result {
        case .success(.notRun(let code, let message)):
            printError("vmpool run: \(name): \(message)")
            report.status = code
        case .success(.timedOut):
            printError(
                "vmpool run: \(name) was killed after --timeout \(request.timeout.map(DurationText.format) ?? "")")
            report.status = ExecOutcome.timedOut.exitStatus
        case .success(let outcome):
            report.status = outcome.exitStatus
        case .failure(let error):
            let status = await leases.driver.status(of: [record.ref], depth: .hypervisor)[record.id]
            let gone = status?.liveness != .alive
            var message = Self.describe(error)
            if gone, let expiry = try? leases.store.vm(record.id)?.lease?.expiresAt, expiry <= Date() {
                message += " (its lease's ttl, \(DurationText.format(ttl)), had run out: give run a longer --ttl)"
            } else if gone, (try? leases.store.vm(record.id)) == nil {
                message += " (its lease had ended: give run a longer --ttl)"
            }
            report.fail(message)
            report.status = GuestCommand.vmpoolFailed
            return gone
        }
        return false
    }

    /// Copies every `--out` back, each on its own: one that fails is reported and the others
    /// are still copied. A command that succeeded then counts as failed (125).
    private func copyOut(
        _ access: any GuestAccess, _ vm: VMRef, vmGone: Bool, interrupt: Int32, into report: inout Report
    ) async {
        guard !outputs.isEmpty else { return }
        if vmGone {
            report.fail(
                "--out not copied (\(outputs.map(\.guest).joined(separator: ", "))): the VM is gone")
            if report.status == 0 { report.status = GuestCommand.vmpoolFailed }
            return
        }
        for output in outputs {
            do {
                let warnings = try await CopyTransfer.fromGuest(
                    access, vm, path: output.guest, to: output.host, interrupt: interrupt)
                for warning in warnings { printError("vmpool run: --out \(output.guest): \(warning)") }
            } catch {
                if CancelFlag(interrupt: interrupt).isCancelled { return }
                report.fail("--out \(output.guest): \(Self.describe(error))")
                if report.status == 0 { report.status = GuestCommand.vmpoolFailed }
            }
        }
    }

    /// What one child of the command's task group reports.
    private enum Part: Sendable {
        case exec(Result<ExecOutcome, any Error>)
        /// A signal came before the command ended.
        case interrupted
        /// The command ended first.
        case finished
        /// The command's stdout ended; the last byte it wrote, if any.
        case relayed(UInt8?)
    }

    /// Copies `fd` to stdout until its end, and returns the last byte that went out, so that
    /// `-o json`'s object starts on a line of its own. A stdout that fails (a reader gone)
    /// closes `fd`: the command's next write fails, as it would on vmpool's own stdout.
    static func relay(_ fd: Int32) -> UInt8? {
        defer { close(fd) }
        var last: UInt8?
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 { return last }
            var offset = 0
            while offset < count {
                let written = buffer.withUnsafeBytes { write(1, $0.baseAddress! + offset, count - offset) }
                if written >= 0 {
                    offset += written
                } else if errno == EAGAIN {
                    var pfd = pollfd(fd: 1, events: Int16(POLLOUT), revents: 0)
                    _ = poll(&pfd, 1, 100)
                } else if errno != EINTR {
                    return last
                }
            }
            last = buffer[count - 1]
        }
    }

    /// 128 + the first signal that came, else `status`.
    static func finalStatus(_ status: Int32, interrupt: Int32) -> Int32 {
        var byte: UInt8 = 0
        return read(interrupt, &byte, 1) == 1 ? 128 + Int32(byte) : status
    }

    /// One line for an error of any layer.
    static func describe(_ error: any Error) -> String {
        switch error {
        case let error as CommandFailure: error.description
        case let error as CopyFailure: error.description
        case let error as DriverError: error.description
        case let error as Leases.Failure: error.description
        case let error as CustomStringConvertible: error.description
        default: "\(error)"
        }
    }
}
