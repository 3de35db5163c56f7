import ArgumentParser
import CVmpoolSys
import Foundation
import VmpoolCopy
import VmpoolDriver

extension Vmpool {
    /// Copies files and directories between the host and a VM, like `docker cp`.
    struct Cp: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "cp",
            abstract: "Copy files or directories between the host and a VM (VM:PATH on one side).",
            discussion: """
                When DST is an existing directory, SRC is copied into it; otherwise SRC is copied to DST's \
                name. A copy is all or nothing: it is made under a temporary name next to the destination \
                and renamed into place when complete. A directory is never merged into an existing one.

                Files, directories and symlinks are copied (symlinks as symlinks), with their permission \
                bits and modification times. A copy out of a guest trusts nothing the guest sends: \
                setuid, setgid and sticky bits and the guest's owners are dropped, device nodes and fifos \
                are skipped with a warning, and a name outside the requested entry or through a symlink \
                fails the copy. The copy streams a tar archive through the guest agent: the guest needs \
                sh and tar (the default image and the Debian image have them).
                """)

        @OptionGroup var options: GlobalOptions

        @Argument(help: "Source: a host path or VM:PATH.")
        var source: String

        @Argument(help: "Destination: a host path or VM:PATH.")
        var destination: String

        /// `VM:PATH`, where VM is a VM id (no slash before the colon).
        static func remote(_ text: String) -> (vm: String, path: String)? {
            guard let colon = text.firstIndex(of: ":"), !text[..<colon].contains("/"), colon != text.startIndex else {
                return nil
            }
            return (String(text[..<colon]), String(text[text.index(after: colon)...]))
        }

        func validate() throws {
            switch (Self.remote(source), Self.remote(destination)) {
            case (nil, nil): throw ValidationError("one of SRC and DST must be VM:PATH")
            case (.some, .some):
                throw ValidationError("copying between two VMs is not supported; copy through the host")
            case (.some(let remote), nil), (nil, .some(let remote)):
                if remote.path.isEmpty { throw ValidationError("VM:PATH needs a path after the colon") }
            }
        }

        func run() async throws {
            let source = self.source
            let destination = self.destination
            let vm = Self.remote(source)?.vm ?? Self.remote(destination)!.vm
            // SIGINT, SIGTERM and SIGHUP go into a pipe that the copy's own threads poll: they stop
            // within a poll, never waiting for a task or a dispatch source to be scheduled.
            let signals: [Int32] = [SIGINT, SIGTERM, SIGHUP]
            let interrupt = vmpool_trap_signals(signals, Int32(signals.count))
            let code = await GuestCommand.run(
                options: options, vm: vm, entering: "cp", trapsSignals: interrupt < 0
            ) { access, record in
                let warnings =
                    if let from = Self.remote(source) {
                        try await CopyTransfer.fromGuest(
                            access, record.ref, path: from.path, to: destination, interrupt: interrupt)
                    } else {
                        try await CopyTransfer.toGuest(
                            access, record.ref, from: source, path: Self.remote(destination)!.path,
                            interrupt: interrupt)
                    }
                for warning in warnings { printError("vmpool: \(warning)") }
                return 0
            }
            if code != 0 { throw ExitCode(code == GuestCommand.vmpoolFailed ? 1 : code) }
        }
    }
}
