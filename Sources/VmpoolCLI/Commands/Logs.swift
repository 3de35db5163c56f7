import ArgumentParser
import CVmpoolSys
import Foundation
import VmpoolDriver
import VmpoolStore

extension Vmpool {
    /// The serial console's output of a VM, bounded on disk.
    struct Logs: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "logs",
            abstract: "Print a VM's serial console output (the last MiB or so is kept).")

        @OptionGroup var options: GlobalOptions

        @Option(help: "Print only the last N lines.")
        var tail: Int?

        @Flag(name: .shortAndLong, help: "Keep printing new output until interrupted.")
        var follow = false

        @Argument(help: "The VM's id.", completion: Completions.vms)
        var vm: String

        func validate() throws {
            if let tail, tail < 0 {
                throw ValidationError("--tail: expected a number of lines, 0 or more, got \(tail)")
            }
        }

        func run() async throws {
            let tail = self.tail
            let follow = self.follow
            if let code = await Self.templateLog(options: options, id: vm, tail: tail) {
                if code != 0 { throw ExitCode.failure }
                return
            }
            let code = await GuestCommand.run(options: options, vm: vm, requireRunning: false, entering: nil) {
                access, record in
                var history = try await access.consoleLog(record.ref)
                if history.isEmpty,
                    let hint = Self.emptyCloneHint(
                        record, templateLogKept: record.templateID.flatMap(access.bootLog(ofTemplate:)) != nil)
                {
                    printError(hint)
                }
                if let tail { history = Self.lastLines(history, tail) }
                try Self.emit(history)
                while follow {
                    let new = try await access.consoleDrain(record.ref)
                    try Self.emit(new)
                    try await Task.sleep(for: .milliseconds(200))
                }
                return 0
            }
            if code != 0 { throw ExitCode(code > 128 ? code : 1) }
        }

        /// Writes console output to stdout as the guest wrote it into a pipe or file; on a
        /// terminal, with every control sequence but colour changes escaped
        /// (`TerminalText.safeConsole`). A reader that stops reading holds it up only until the
        /// task is cancelled (a signal).
        static func emit(_ output: [UInt8]) throws {
            guard !output.isEmpty else { return }
            let bytes = isatty(1) == 1 ? TerminalText.safeConsole(output) : output
            var info = stat()
            let mayBlock = fstat(1, &info) != 0 || (info.st_mode & S_IFMT) != S_IFREG
            var offset = 0
            while offset < bytes.count {
                if mayBlock {
                    var pfd = pollfd(fd: 1, events: Int16(POLLOUT), revents: 0)
                    if poll(&pfd, 1, 50) <= 0 {
                        try Task.checkCancellation()
                        continue
                    }
                }
                let length = mayBlock ? min(bytes.count - offset, Int(PIPE_BUF)) : bytes.count - offset
                let written = bytes.withUnsafeBytes { Glibc.write(1, $0.baseAddress! + offset, length) }
                if written < 0 {
                    if errno == EINTR || errno == EAGAIN { continue }
                    throw CommandFailure(description: "cannot write to stdout: \(String(cString: strerror(errno)))")
                }
                offset += written
            }
        }

        /// Why a clone's log is empty: it never booted; its template did, and the template's
        /// boot output is kept with the template (`vmpool logs TEMPLATE`) until the template is
        /// rebuilt. `nil` for a VM that booted itself.
        static func emptyCloneHint(_ record: VMRecord, templateLogKept: Bool) -> String? {
            guard let template = record.templateID else { return nil }
            let intro =
                "vmpool logs: VM \(record.id) was cloned from template \(template) and has printed nothing since;"
                + " its boot output is the template's"
            guard templateLogKept else {
                return intro + ", and that template has been replaced since (its log went with it;"
                    + " vmpool describe pool \(record.pool) shows the current one)"
            }
            return intro + ": vmpool logs \(template)"
        }

        /// `logs` of a template's id: its boot, kept from before its save (a saved template
        /// prints nothing more, so `--follow` has nothing to wait for). `nil` when `id` names no
        /// template of this host, so that it is looked up as a VM; else the exit status.
        static func templateLog(options: GlobalOptions, id: String, tail: Int?) async -> Int32? {
            guard let session = try? await Session(options, locking: nil, create: false),
                (try? session.store.vm(id)) == .some(nil),
                let template = try? session.store.templates().first(where: { $0.ref.id == id })
            else { return nil }
            do {
                guard let access = session.reconciler.driver as? any GuestAccess else {
                    let driver = session.reconciler.driver.name
                    throw CommandFailure(description: "the \(driver) driver runs no guests; this needs --driver qemu")
                }
                guard let path = access.bootLog(ofTemplate: id), let data = FileManager.default.contents(atPath: path)
                else {
                    throw CommandFailure(
                        description: template.state == .building
                            ? "template \(id) is being built; its boot output is kept once its memory is saved"
                            : "template \(id) has no boot output kept (it was saved by an older vmpool)")
                }
                var bytes = [UInt8](data)
                if let tail { bytes = lastLines(bytes, tail) }
                try emit(bytes)
                return 0
            } catch {
                printError("vmpool: \(error)")
                return 1
            }
        }

        static func lastLines(_ bytes: [UInt8], _ count: Int) -> [UInt8] {
            guard count > 0 else { return [] }
            var newlines = 0
            var index = bytes.endIndex
            if bytes.last == 0x0A { index -= 1 }
            while index > bytes.startIndex {
                index -= 1
                if bytes[index] == 0x0A {
                    newlines += 1
                    if newlines == count { return Array(bytes[(index + 1)...]) }
                }
            }
            return bytes
        }
    }

    /// The VM's interactive console.
    struct Console: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "console",
            abstract: "Attach to a VM's interactive console; Ctrl-] detaches.")

        @OptionGroup var options: GlobalOptions

        @Argument(help: "The VM's id.", completion: Completions.vms)
        var vm: String

        func run() async throws {
            let id = vm
            let code = await GuestCommand.run(options: options, vm: vm, entering: "console") { access, record in
                printError("Connected to the console of \(id); Ctrl-] detaches.")
                let terminal = RawTerminal.enter()
                defer { terminal?.restore() }
                try await access.attachConsole(record.ref, streams: ExecStreams(), detach: 0x1D)
                terminal?.restore()
                printError("\nDetached from \(id).")
                return 0
            }
            if code != 0 { throw ExitCode(code > 128 ? code : 1) }
        }
    }
}
