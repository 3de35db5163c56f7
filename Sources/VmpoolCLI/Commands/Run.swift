import ArgumentParser
import Foundation
import VmpoolDriver
import VmpoolReconciler
import VmpoolSpec

extension Vmpool {
    /// One command in a fresh VM of a pool, like `docker run --rm`: lease, copy in, run, copy
    /// out, release. One command is a CI job.
    struct Run: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "run",
            abstract: "Run one command in a fresh VM of a pool: lease it, copy in, run, copy out, release it.",
            discussion: """
                Leases a ready VM of POOL, copies each --in into it (as `vmpool cp`), runs the command \
                there (an argument vector, as `vmpool exec`: stdout and stderr streamed unchanged), copies \
                each --out back, also when the command failed, and releases the VM (it is stopped; the \
                pool refills).

                Exit status: the command's; 128+N when a signal ended it (137 after --timeout); 126 when \
                it could not be run, 127 when it was not found; 125 when vmpool itself failed (no ready \
                VM, a --in that could not be copied, the VM died under the command). A --out that cannot \
                be copied is reported on stderr; it turns a command's 0 into 125 and leaves any other \
                status as it was.

                The VM is released on every path: the command fails or times out, the VM dies, a copy \
                fails, or run gets SIGINT, SIGTERM or SIGHUP (the command in the guest is killed, --out is \
                not copied, and run exits with 128+N). Only a run killed outright (SIGKILL) leaves its VM \
                to the lease's ttl, which the next pass ends: without --ttl it is the --timeout plus 15m, \
                else 1h, so a command that may run longer than 1h needs --timeout or --ttl.

                A guest path never contains a colon: --in splits at its last colon, --out at its first. \
                With -o json, one object is printed at the end, after the command's own stdout: id, pool, \
                exitStatus, errors (vmpool's own failures, as printed on stderr) and timingsMs (lease, \
                in, cmd, out, release; 0 for a step that did not run).
                """)

        @OptionGroup var options: GlobalOptions

        @Argument(help: "The pool to take a VM from.", completion: Completions.pools)
        var pool: String

        @Option(
            parsing: .unconditional,
            help: "Release the VM by itself after this long, should run be killed (default: --timeout + 15m, else 1h).",
            transform: duration("--ttl", allowZero: false))
        var ttl: Duration?

        @Option(
            parsing: .unconditional,
            help: "Wait up to this long for a ready VM (default: fail at once when none is ready).",
            transform: duration("--wait"))
        var wait: Duration?

        @Option(
            name: .customLong("in"),
            help: "Copy a host file or directory into the VM before the command (SRC:VMPATH, repeatable).")
        var inputs: [String] = []

        @Option(
            name: .customLong("out"),
            help: "Copy a file or directory of the VM to the host after the command (VMPATH:DST, repeatable).")
        var outputs: [String] = []

        @OptionGroup var guest: GuestCommandOptions

        @Option(help: "Who holds the lease, as shown by get vms (default: run:USER@HOST).")
        var holder: String?

        @Option(name: .shortAndLong, help: "Output format: text or json (json: one object after the command's output).")
        var output: OutputFormat = .text

        @Argument(parsing: .postTerminator, help: "The command and its arguments, after --.")
        var command: [String] = []

        /// The margin a default ttl gives beyond `--timeout`, for the copies around the command.
        static let ttlMargin: Duration = .seconds(15 * 60)
        /// The ttl of a run with neither `--ttl` nor `--timeout`.
        static let defaultTTL: Duration = .seconds(3600)

        func validate() throws {
            if command.isEmpty {
                throw ValidationError("give the command to run after --: vmpool run POOL -- CMD [ARG...]")
            }
            for text in inputs where RunJob.Transfer(input: text) == nil {
                throw ValidationError(
                    "--in: expected SRC:VMPATH (a host path, a colon, a path in the VM), got \"\(text)\"")
            }
            for text in outputs where RunJob.Transfer(output: text) == nil {
                throw ValidationError(
                    "--out: expected VMPATH:DST (a path in the VM, a colon, a host path), got \"\(text)\"")
            }
            if let holder, let problem = Leases.holderProblem(holder) {
                throw ValidationError("--holder: \(problem)")
            }
        }

        func run() async throws {
            let job = RunJob(
                options: options, pool: pool,
                holder: holder ?? "run:" + Leases.defaultHolder(),
                ttl: ttl ?? guest.timeout.map { $0 + Self.ttlMargin } ?? Self.defaultTTL, wait: wait ?? .zero,
                inputs: inputs.compactMap { RunJob.Transfer(input: $0) },
                outputs: outputs.compactMap { RunJob.Transfer(output: $0) },
                request: ExecRequest(
                    argv: command, environment: guest.env, directory: guest.workdir, timeout: guest.timeout),
                relaysStdout: output == .json)
            let report = await job.run()
            // A stdout whose reader is gone has already failed the command; the object is dropped.
            if output == .json {
                _ = try? FileHandle.standardOutput.write(
                    contentsOf: Data((TerminalText.safe(try report.jsonLine()) + "\n").utf8))
            }
            throw ExitCode(report.status)
        }
    }
}
