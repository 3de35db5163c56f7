import ArgumentParser
import Foundation
import Logging
import ServiceLifecycle
import VmpoolDriver
import VmpoolReconciler
import VmpoolService
import VmpoolStore

extension Vmpool {
    /// Converges every applied pool: one pass for cron, or a loop with `--every`.
    struct Reconcile: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Converge the host to the pools last applied (one pass, or a loop with --every).")

        @OptionGroup var options: GlobalOptions

        @Option(
            parsing: .unconditional, help: "Run as a service: a pass every DURATION (30s, 5m) until SIGTERM or SIGINT.",
            transform: duration("--every", allowZero: false))
        var every: Duration?

        @OptionGroup var execution: ExecutionOptions

        @OptionGroup var format: OutputOptions

        @Option(help: "With --every: serve the lease API and /metrics on host:port or unix:PATH.")
        var listen: String?

        @Option(
            name: .customLong("token-file"),
            help: "Bearer token the HTTP API requires (a file of mode 0600); needed to listen beyond loopback.")
        var tokenFile: String?

        func validate() throws {
            if let listen {
                guard every != nil else { throw ValidationError("--listen needs --every (the service)") }
                guard let address = ListenAddress(listen) else {
                    throw ValidationError("--listen: expected host:port or unix:PATH, got \"\(listen)\"")
                }
                if !address.isLocal && tokenFile == nil {
                    throw ValidationError(
                        "--listen \(listen) is reachable from other hosts: give --token-file (or listen on 127.0.0.1 or unix:PATH)"
                    )
                }
            } else if tokenFile != nil {
                throw ValidationError("--token-file needs --listen")
            }
        }

        func run() async throws {
            let parallel = execution.parallel
            guard let interval = every else {
                let session = try await Session(
                    options, locking: "reconcile", parallelism: parallel, showProgress: true)
                let cancellation = Cancellation()
                let reconciler = session.reconciler
                let result = try await withShutdownSignals(cancellation) {
                    try await reconciler.reconcile(cancellation: cancellation)
                }
                session.progress?.finish()
                try report(result, output: format.output, pools: [])
                return
            }
            // The service takes the state dir lock for each pass, not for its whole life.
            let session = try await Session(options, locking: nil, parallelism: parallel)
            var service = ReconcileService(
                reconciler: session.reconciler, interval: interval, logger: session.logger,
                stateDirectory: session.stateDirectory, wake: try Wake.Listener(directory: session.stateDirectory))
            var services: [ServiceGroupConfiguration.ServiceConfiguration] = []
            if let listen, let address = ListenAddress(listen) {
                let token = try tokenFile.map { try BearerToken.read($0) }
                let metrics = ServiceMetrics()
                service.metrics = metrics
                let reconciler = session.reconciler
                let server = APIServer(
                    leases: Leases(
                        store: session.store, driver: reconciler.driver, stateDirectory: session.stateDirectory),
                    store: session.store, metrics: metrics, token: token, logger: session.logger,
                    observe: { try await reconciler.observe(depth: .hypervisor) })
                services.append(.init(service: server.application(listening: address)))
                session.logger.notice("serving the lease API and /metrics on \(address)")
            }
            services.insert(.init(service: service), at: 0)
            let group = ServiceGroup(
                configuration: ServiceGroupConfiguration(
                    services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: session.logger))
            try await group.run()
        }
    }
}
