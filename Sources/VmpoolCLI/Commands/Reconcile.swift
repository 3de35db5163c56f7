import ArgumentParser
import Foundation
import Logging
import ServiceLifecycle
import VmpoolDriver
import VmpoolReconciler
import VmpoolService
import VmpoolStatus
import VmpoolSpec
import VmpoolStore

extension Vmpool {
    /// Converges every applied pool: one pass for cron, or a loop with `--every`.
    struct Reconcile: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "reconcile",
            abstract: "Converge the host to the pools last applied (one pass, or a loop with --every).")

        @OptionGroup var options: GlobalOptions

        @Option(
            parsing: .unconditional, help: "Run as a service: a pass every DURATION (30s, 5m) until SIGTERM or SIGINT.",
            transform: duration("--every", allowZero: false))
        var every: Duration?

        @OptionGroup var execution: ExecutionOptions

        @OptionGroup var format: OutputOptions

        @Option(help: "With --every: serve the status page, the lease API and /metrics on host:port or unix:PATH.")
        var listen: String?

        @Option(
            help: ArgumentHelp(
                "On a shared store: what this host offers the cluster's VMs, vcpus=N,memory=SIZE (env VMPOOL_CAPACITY; default: the machine's CPUs and memory).",
                valueName: "vcpus=N,memory=SIZE"))
        var capacity: String?

        @Option(
            name: .customLong("token-file"),
            help: "Bearer token the HTTP API requires (a file of mode 0600); needed to listen beyond loopback.")
        var tokenFile: String?

        /// `--capacity`, else `VMPOOL_CAPACITY`, else what the machine has.
        func resolvedCapacity() throws -> HostCapacity {
            try HostCapacity.resolve(flag: capacity, environment: options.environment)
        }

        func validate() throws {
            _ = try resolvedCapacity()
            if let listen {
                guard every != nil else { throw ValidationError("--listen needs --every (the service)") }
                guard ListenAddress(listen) != nil else {
                    throw ValidationError("--listen: expected host:port or unix:PATH, got \"\(listen)\"")
                }
            } else if tokenFile != nil {
                throw ValidationError("--token-file needs --listen")
            }
        }

        func run() async throws {
            let parallel = execution.parallel
            guard let interval = every else {
                let session = try await Session(
                    options, locking: "reconcile", parallelism: parallel, showProgress: true,
                    capacity: try resolvedCapacity())
                let cancellation = Cancellation()
                let reconciler = session.reconciler
                let heartbeats = session.cluster?.heartbeats()
                defer { heartbeats?.cancel() }
                let result = try await withShutdownSignals(cancellation) {
                    try await reconciler.reconcile(cancellation: cancellation)
                }
                session.progress?.finish()
                try report(result, output: format.output, pools: [])
                return
            }
            // The address is resolved and checked once, before anything else: whether it is
            // local is judged from the addresses it resolved to, and those are what is bound.
            let bound = try listen.flatMap(ListenAddress.init).map { address throws(ServiceError) in
                try address.resolve()
            }
            if let bound, !bound.isLocal, tokenFile == nil {
                throw CommandFailure(
                    description: "--listen \(bound) is reachable from other hosts: give --token-file (or listen on"
                        + " 127.0.0.1 or unix:PATH)")
            }
            try bound?.claim()
            let token = try tokenFile.map { try BearerToken.read($0) }
            // The service takes the state dir lock for each pass, not for its whole life.
            let session = try await Session(
                options, locking: nil, parallelism: parallel, capacity: try resolvedCapacity())
            let heartbeats = session.cluster?.heartbeats()
            defer { heartbeats?.cancel() }
            var service = ReconcileService(
                reconciler: session.reconciler, interval: interval, logger: session.logger,
                stateDirectory: session.stateDirectory, wake: try Wake.Listener(directory: session.stateDirectory),
                changes: session.cluster != nil ? session.store.watchChanges() : nil)
            var services: [ServiceGroupConfiguration.ServiceConfiguration] = []
            if let address = bound {
                let metrics = ServiceMetrics()
                let history = PoolHistory()
                service.metrics = metrics
                service.history = history
                let reconciler = session.reconciler
                let server = APIServer(
                    leases: Leases(
                        store: session.store, driver: reconciler.driver, stateDirectory: session.stateDirectory),
                    store: session.store, metrics: metrics, token: token, logger: session.logger,
                    status: StatusService(history: history) {
                        try await StatusSnapshot.read(reconciler: reconciler, history: history)
                    },
                    observe: { try await reconciler.observe(depth: .hypervisor, allHosts: true) })
                services.append(.init(service: server.application(listening: address)))
                session.logger.notice("serving the status page, the lease API and /metrics on \(address)")
            }
            services.insert(.init(service: service), at: 0)
            let group = ServiceGroup(
                configuration: ServiceGroupConfiguration(
                    services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: session.logger))
            try await group.run()
        }
    }
}
