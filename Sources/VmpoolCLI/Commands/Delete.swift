import ArgumentParser
import VmpoolReconciler
import VmpoolStore

extension Vmpool {
    /// Stops a pool's VMs, removes its template and forgets it.
    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "delete", abstract: "Stop the VMs of pools and forget the pools.")

        @OptionGroup var options: GlobalOptions

        @Argument(help: "Pool names.", completion: Completions.pools)
        var pools: [String] = []

        @Flag(name: .customLong("ignore-not-found"), help: "Succeed for pools that are not applied (teardown traps).")
        var ignoreNotFound = false

        @Option(name: .shortAndLong, help: "Output format: text or json.")
        var output: OutputFormat = .text

        /// The pass's deadline here; on a shared store, how long to wait for the hosts.
        @OptionGroup var timeout: TimeoutOption

        func validate() throws {
            if pools.isEmpty { throw ValidationError("name at least one pool to delete") }
        }

        func run() async throws {
            if ignoreNotFound, (try? options.stateDirectory(create: false)) == nil { return }
            let session =
                options.sharedStore
                ? try await Session(options, locking: nil, create: false)
                : try await Session(
                    options, locking: "delete", create: false, timeout: timeout.timeout, showProgress: true)
            let known = Set(try session.store.pools().map(\.spec.name))
            var names = pools
            if ignoreNotFound {
                names = pools.filter { known.contains($0) }
                if names.isEmpty {
                    printOut(
                        "Nothing to delete: \(pools.joined(separator: ", ")) \(pools.count == 1 ? "is" : "are") not applied."
                    )
                    return
                }
            } else if let missing = pools.first(where: { !known.contains($0) }) {
                throw CommandFailure(description: "no pool named \"\(missing)\" has been applied")
            }
            if let cluster = session.cluster {
                try await ClusterApply.delete(
                    session, cluster: cluster, names: Set(names), timeout: timeout.timeout, output: output)
                return
            }
            let cancellation = Cancellation()
            let reconciler = session.reconciler
            let deleted = Set(names)
            let result = try await withShutdownSignals(cancellation) {
                try await reconciler.delete(deleted, cancellation: cancellation)
            }
            session.progress?.finish()
            Wake.send(directory: session.stateDirectory)
            try report(result, output: output, pools: [])
        }
    }
}
