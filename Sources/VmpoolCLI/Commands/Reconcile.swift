import ArgumentParser
import Foundation
import Logging
import ServiceLifecycle
import VmpoolDriver
import VmpoolReconciler
import VmpoolStore

extension Vmpool {
    /// Converges every applied pool: one pass for cron, or a loop with `--every`.
    struct Reconcile: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Converge the host to the pools last applied (one pass, or a loop with --every).")

        @OptionGroup var options: GlobalOptions

        @Option(help: "Run as a service: a pass every DURATION (30s, 5m) until SIGTERM or SIGINT.")
        var every: String?

        @Option(help: "Actions to run at once.")
        var parallel: Int = 4

        func validate() throws {
            if parallel < 1 || parallel > 256 { throw ValidationError("--parallel: expected 1 to 256, got \(parallel)") }
            if let interval = try parseDuration(every, option: "--every"), interval <= .zero {
                throw ValidationError("--every: expected a duration above zero")
            }
        }

        func run() async throws {
            guard let interval = try parseDuration(every, option: "--every") else {
                let session = try await Session(options, locking: "reconcile", parallelism: parallel)
                let cancellation = Cancellation()
                let reconciler = session.reconciler
                let result = try await withShutdownSignals(cancellation) {
                    try await reconciler.reconcile(cancellation: cancellation)
                }
                try report(result, output: .text, pools: [])
                return
            }
            // The service takes the state dir lock for each pass, not for its whole life.
            let session = try await Session(options, locking: nil, parallelism: parallel)
            let service = ReconcileService(
                reconciler: session.reconciler, interval: interval, logger: session.logger,
                stateDirectory: session.stateDirectory, wake: try Wake.Listener(directory: session.stateDirectory))
            let group = ServiceGroup(
                configuration: ServiceGroupConfiguration(
                    services: [.init(service: service)], gracefulShutdownSignals: [.sigterm, .sigint],
                    logger: session.logger))
            try await group.run()
        }
    }
}
