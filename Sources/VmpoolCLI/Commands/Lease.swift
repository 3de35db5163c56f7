import ArgumentParser
import Foundation
import VmpoolDriver
import VmpoolReconciler
import VmpoolStore

extension Vmpool {
    /// Hands one ready VM of a pool to the caller alone; the pool refills.
    struct LeaseCommand: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "lease",
            abstract: "Take one ready VM of a pool for yourself alone; the pool refills.",
            discussion: """
                Prints the VM's id (or, with -o json, its id, pool, address, ports, holder and expiry). A \
                leased VM no longer counts toward its pool and is never handed to anyone else; `vmpool \
                release VM` stops it, and so does the first pass after its --ttl.
                """)

        @OptionGroup var options: GlobalOptions

        @Argument(help: "The pool to take a VM from.", completion: Completions.pools)
        var pool: String

        @Option(
            parsing: .unconditional, help: "Release the VM by itself after this long (30m, 2h).",
            transform: duration("--ttl", allowZero: false))
        var ttl: Duration?

        @Option(
            parsing: .unconditional,
            help: "Wait up to this long for a ready VM (default: fail at once when none is ready).",
            transform: duration("--wait"))
        var wait: Duration?

        @Option(help: "Who holds the lease, as shown by get vms (default: USER@HOST).")
        var holder: String?

        @Flag(
            help:
                "Run one pass after taking the VM, so the pool is refilled before this returns (needs the state dir lock)."
        )
        var refill = false

        @Option(name: .shortAndLong, help: "Output format: text or json.")
        var output: OutputFormat = .text

        func validate() throws {
            if let holder, let problem = Leases.holderProblem(holder) {
                throw ValidationError("--holder: \(problem)")
            }
        }

        func run() async throws {
            let session = try await Session(options, locking: nil, create: false)
            let leases = Leases(
                store: session.store, driver: session.reconciler.driver, stateDirectory: session.stateDirectory)
            // The lease is the caller's once its id is printed: a vmpool killed before that
            // leaves a lease the next pass ends.
            _ = try await leases.take(
                pool: pool, holder: holder ?? Leases.defaultHolder(), ttl: ttl,
                wait: wait ?? .zero
            ) { record in
                if refill {
                    let locked = try await Session(options, locking: "lease --refill")
                    _ = try await locked.reconciler.reconcile(only: [pool])
                }
                switch output {
                case .text: printOut(record.id)
                case .json: printOut(try JSONOutput.encode(Leases.json(record)))
                }
            }
        }
    }

    /// Ends leases: their VMs are stopped.
    struct Release: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "release", abstract: "End leases: stop the leased VMs.")

        @OptionGroup var options: GlobalOptions

        @Argument(help: "Leased VM ids.", completion: Completions.vms)
        var vms: [String] = []

        func validate() throws {
            if vms.isEmpty { throw ValidationError("name at least one leased VM to release") }
        }

        func run() async throws {
            let session = try await Session(options, locking: nil, create: false)
            let leases = Leases(
                store: session.store, driver: session.reconciler.driver, stateDirectory: session.stateDirectory)
            var failed = false
            for id in vms {
                do {
                    try await leases.release(id)
                    printOut("released \(id)")
                } catch {
                    printError("vmpool: \(error)")
                    failed = true
                }
            }
            if failed { throw ExitCode.failure }
        }
    }
}
