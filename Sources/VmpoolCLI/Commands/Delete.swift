import ArgumentParser
import VmpoolReconciler
import VmpoolStore

extension Vmpool {
    /// Stops a pool's VMs, removes its template and forgets it.
    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stop the VMs of pools and forget the pools.")

        @OptionGroup var options: GlobalOptions

        @Argument(help: "Pool names.")
        var pools: [String] = []

        @Option(name: .shortAndLong, help: "Output format: text or json.")
        var output: OutputFormat = .text

        func validate() throws {
            if pools.isEmpty { throw ValidationError("name at least one pool to delete") }
        }

        func run() async throws {
            let session = try await Session(options, locking: "delete")
            let known = Set(try session.store.pools().map(\.spec.name))
            if let missing = pools.first(where: { !known.contains($0) }) {
                throw CommandFailure(description: "no pool named \"\(missing)\" has been applied")
            }
            let cancellation = Cancellation()
            let reconciler = session.reconciler
            let names = Set(pools)
            let result = try await withShutdownSignals(cancellation) {
                try await reconciler.delete(names, cancellation: cancellation)
            }
            Wake.send(directory: session.stateDirectory)
            try report(result, output: output, pools: [])
        }
    }
}
