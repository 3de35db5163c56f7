import VmpoolSpec
import ArgumentParser
import Foundation
import UnixSignals
import VmpoolDriver
import VmpoolStore

extension Vmpool {
    /// Runs a command in a VM through its guest agent, like `docker exec`.
    struct Exec: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "exec",
            abstract: "Run a command in a VM through its guest agent.",
            discussion: """
                The command is an argument vector, not a shell line (run `sh -c '...'` for one). Its stdout \
                and stderr are streamed unchanged; vmpool exits with its exit status, 128+N when a signal \
                ended it, 125 when vmpool itself failed (no such VM, VM not running), 126 when the command \
                could not be run and 127 when it was not found.

                On a guest under software emulation (TCG) the command starts without address-space \
                randomization: TCG caches translated code by address, and a randomized process has its \
                libraries translated again at every start (a start takes about three times as long). \
                `-e VMPOOL_ASLR=1` keeps it on.
                """)

        @OptionGroup var options: GlobalOptions

        @Flag(name: .shortAndLong, help: "Forward standard input to the command.")
        var interactive = false

        @Flag(name: .shortAndLong, help: "Give the command a pseudo-terminal.")
        var tty = false

        @OptionGroup var guest: GuestCommandOptions

        @Argument(help: "The VM's id (see `vmpool get vms`).", completion: Completions.vms)
        var vm: String

        @Argument(parsing: .postTerminator, help: "The command and its arguments, after --.")
        var command: [String] = []

        func validate() throws {
            if command.isEmpty {
                throw ValidationError("give the command to run after --: vmpool exec VM -- CMD [ARG...]")
            }
        }

        func run() async throws {
            let argv = command
            let tty = self.tty
            let timeout = guest.timeout
            let request = ExecRequest(
                argv: argv, environment: guest.env, directory: guest.workdir, stdin: interactive,
                tty: tty ? (TerminalSize.current() ?? (24, 80)) : nil,
                timeout: timeout)
            let code = await GuestCommand.run(options: options, vm: vm, entering: "exec") { access, record in
                let terminal = tty ? RawTerminal.enter() : nil
                defer { terminal?.restore() }
                if tty { TerminalSize.watch() }
                let outcome = try await access.exec(record.ref, request, streams: ExecStreams())
                switch outcome {
                case .notRun(let code, let message):
                    printError("vmpool exec: \(argv[0]): \(message)")
                    return code
                case .timedOut:
                    printError(
                        "vmpool exec: \(argv[0]) was killed after --timeout \(timeout.map(DurationText.format) ?? "")")
                    return outcome.exitStatus
                default:
                    return outcome.exitStatus
                }
            }
            throw ExitCode(code)
        }
    }
}

/// The frame of every command that works inside a VM (`exec`, `cp`, `logs`, `console`): find
/// the VM, check that it runs, and turn vmpool's own failures into exit status 125 with a
/// one-line reason, as `docker exec` does.
enum GuestCommand {
    static let vmpoolFailed: Int32 = 125

    /// `entering` names a command that reaches into the guest (exec, cp, console): on a VM
    /// nobody leased, it is recorded first, and the VM is never leased after (`markEntered`).
    static func run(
        options: GlobalOptions, vm id: String, requireRunning: Bool = true, entering: String?,
        trapsSignals: Bool = true,
        _ body: @escaping @Sendable (any GuestAccess, VMRecord) async throws -> Int32
    ) async -> Int32 {
        do {
            let session = try await Session(options, locking: nil, create: false)
            guard let record = try session.store.vm(id) else {
                throw CommandFailure(description: "no VM named \"\(id)\" (see vmpool get vms)")
            }
            guard record.host == session.store.host else {
                throw CommandFailure(
                    description: "VM \(id) runs on host \(record.host), not on \(session.store.host): run this there"
                        + " (vmpool get vms shows each VM's host)")
            }
            guard let access = session.reconciler.driver as? any GuestAccess else {
                throw CommandFailure(
                    description: "the \(session.reconciler.driver.name) driver runs no guests; this needs --driver qemu"
                )
            }
            if requireRunning {
                let status = await session.reconciler.driver.status(of: [record.ref], depth: .hypervisor)[record.id]
                if let fault = status?.fault {
                    throw CommandFailure(description: "VM \(id) is stopped: \(fault); the next pass replaces it")
                }
                guard record.state == .running, status?.liveness == .alive, status?.running != false else {
                    let state =
                        status?.liveness == .gone
                        ? "not running (its process is gone)"
                        : status?.running == false ? "paused" : record.state.rawValue
                    throw CommandFailure(description: "VM \(id) is \(state); it must be running")
                }
            }
            if let entering, record.lease == nil { try session.store.markEntered(record.id, by: entering) }
            // `trapsSignals: false`: the body has trapped the signals itself (cp).
            guard trapsSignals else { return try await body(access, record) }
            return try await withSignalsInterrupting { try await body(access, record) }
        } catch let error as CommandFailure {
            printError("vmpool: \(error.description)")
        } catch let error as DriverError {
            printError("vmpool: \(error.description)")
        } catch {
            printError("vmpool: \(error)")
        }
        return vmpoolFailed
    }

    /// How the first of `withSignalsInterrupting`'s two tasks ended.
    private enum Finish: Sendable {
        case signal(Int32)
        case body(Result<Int32, any Error>)
    }

    /// Runs `body`; SIGINT, SIGTERM or SIGHUP cancel it (the command in the guest is killed and
    /// the terminal restored) instead of killing vmpool outright, and vmpool then exits with
    /// 128 + the signal's number, as a shell reports a command a signal ended. The driver
    /// bounds what `body` may still wait for (about a second), so the exit follows at once.
    static func withSignalsInterrupting(_ body: @escaping @Sendable () async throws -> Int32) async throws -> Int32 {
        let finish = await withTaskGroup(of: Finish?.self) { group -> Finish in
            group.addTask {
                for await signal in await UnixSignalsSequence(trapping: .sigint, .sigterm, .sighup) {
                    return .signal(signal.rawValue)
                }
                return nil
            }
            group.addTask {
                do { return .body(.success(try await body())) } catch { return .body(.failure(error)) }
            }
            var first: Finish?
            while let next = await group.next() {
                group.cancelAll()
                if first == nil, let next { first = next }
            }
            return first ?? .signal(SIGINT)
        }
        switch finish {
        case .signal(let number): return 128 + number
        case .body(let result): return try result.get()
        }
    }
}

/// The local terminal in raw mode for the length of a pty session.
struct RawTerminal {
    private let saved: termios

    /// Puts stdin's terminal in raw mode; `nil` when stdin is not a terminal.
    static func enter() -> RawTerminal? {
        guard isatty(0) == 1 else { return nil }
        var attributes = termios()
        guard tcgetattr(0, &attributes) == 0 else { return nil }
        let saved = attributes
        cfmakeraw(&attributes)
        tcsetattr(0, TCSANOW, &attributes)
        return RawTerminal(saved: saved)
    }

    func restore() {
        var attributes = saved
        tcsetattr(0, TCSANOW, &attributes)
    }
}
