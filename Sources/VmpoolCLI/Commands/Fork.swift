import ArgumentParser
import Foundation
import VmpoolDriver
import VmpoolReconciler
import VmpoolStore

extension Vmpool {
    /// Copies a running leased VM into new VMs leased to the caller: how a job branches.
    struct ForkCommand: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "fork",
            abstract: "Copy a running leased VM, memory, disks and devices, into new leased VMs.",
            discussion: """
                Each fork starts from the VM's current state, with its own host name, machine id, MAC and \
                address, forwarded ports, clock, RNG and VM generation id. The VM is paused only while its \
                state is saved, then runs on unchanged; nothing written later in one VM is seen by another. \
                The forks are leased like `vmpool lease`'s VMs (to --holder, else to the VM's own holder) \
                and stopped by `vmpool release` or their --ttl. Prints their ids (with -o json, an array \
                of objects shaped like lease -o json's).

                Only a leased VM can be forked: a pool's unleased VMs are the pool's. The forks share the \
                saved memory copy-on-write: it is freed when the last of them stops.
                """)

        @OptionGroup var options: GlobalOptions

        @Argument(help: "The leased VM to copy.", completion: Completions.vms)
        var vm: String

        @Option(help: "How many copies to make (1 to \(Leases.maxForks)).")
        var count = 1

        @Option(
            parsing: .unconditional, help: "Release each fork by itself after this long (30m, 2h).",
            transform: duration("--ttl", allowZero: false))
        var ttl: Duration?

        @Option(help: "The holder of the VM to fork, checked; the forks are leased to it (default: the VM's holder).")
        var holder: String?

        @Option(name: .shortAndLong, help: "Output format: text or json.")
        var output: OutputFormat = .text

        func validate() throws {
            guard (1...Leases.maxForks).contains(count) else {
                throw ValidationError("--count: expected 1 to \(Leases.maxForks), got \(count)")
            }
            if let holder, let problem = Leases.holderProblem(holder) {
                throw ValidationError("--holder: \(problem)")
            }
        }

        func run() async throws {
            let session = try await Session(options, locking: nil, create: false)
            let leases = Leases(
                store: session.store, driver: session.reconciler.driver, stateDirectory: session.stateDirectory)
            let output = self.output
            do {
                let made = try await leases.fork(
                    vm, count: count, ttl: ttl, holder: holder
                ) { made in
                    for failure in made.failures { printError("vmpool: a fork did not start: \(failure)") }
                    switch output {
                    case .text: printOut(made.vms.map(\.id).joined(separator: "\n"))
                    case .json: printOut(try JSONOutput.encode(made.vms.map { Leases.json($0) }))
                    }
                }
                if !made.failures.isEmpty { throw ExitCode.failure }
            } catch let failure as Leases.ForkFailure {
                throw CommandFailure(description: failure.description)
            } catch let error as DriverError {
                throw CommandFailure(description: "cannot fork \(vm): \(error.message)")
            }
        }
    }
}
