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
            let code = await GuestCommand.run(options: options, vm: vm, requireRunning: false, entering: nil) {
                access, record in
                var history = try await access.consoleLog(record.ref)
                if history.isEmpty, let hint = Self.emptyCloneHint(record) { printError(hint) }
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
        /// console is gone with the template's process. `nil` for a VM that booted itself.
        static func emptyCloneHint(_ record: VMRecord) -> String? {
            guard let template = record.templateID else { return nil }
            return "vmpool logs: \(record.id) was cloned from template \(template) of pool \(record.pool), so its boot"
                + " output belongs to the template, whose console is not kept; this log holds only what the guest"
                + " printed after the clone, and it has printed nothing yet (vmpool describe pool \(record.pool)"
                + " shows the template; a boot: cold VM logs its own boot)"
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
