import VmpoolSpec
import Foundation
import Logging
import Metrics
import ServiceLifecycle
import VmpoolDriver
import VmpoolReconciler
import VmpoolService
import VmpoolStatus
import VmpoolStore

/// `reconcile --every`: a pass per interval until graceful shutdown.
///
/// The state dir lock is held only while a pass runs, so `apply`, `delete` and `lease` work
/// meanwhile; they wake the service (`Wake`), whose next pass then starts at once.
/// A pool whose pass fails is retried with exponential backoff (interval × 2ⁿ, at most 10
/// minutes); a terminal failure (a missing image file) waits the full 10 minutes. Other
/// pools keep their own schedule, so one broken pool never holds up the rest.
struct ReconcileService: Service {
    let reconciler: Reconciler
    let interval: Duration
    let logger: Logger
    /// Where the lock lives.
    let stateDirectory: String
    let wake: Wake.Listener
    /// On a shared store: the other hosts' change notices, which wake this service too.
    var changes: (any ChangeWatch)?
    /// Set with `--listen`: pool gauges and pass durations are recorded after each pass.
    var metrics: ServiceMetrics?
    /// Set with `--listen`: what the status page's charts draw, sampled after each pass.
    var history: PoolHistory?
    static let maxBackoff: Duration = .seconds(600)

    func run() async throws {
        var backoff = Backoff(interval: interval, maximum: Self.maxBackoff)
        let cancellation = Cancellation()
        var requeued = 0
        while !Task.isShuttingDownGracefully {
            let started = ContinuousClock.now
            // A wake (an apply, a delete, a lease) makes every pool due: the change may be what
            // a backed-off pool was waiting for.
            let woken = wake.drain()
            if changes?.drain() == true || woken { backoff.reset() }
            var again = false
            await withGracefulShutdownHandler {
                guard let lock = await takeLock() else { return }
                again = await pass(&backoff, cancellation: cancellation)
                withExtendedLifetime(lock) {}
                await recordMetrics(since: started)
            } onGracefulShutdown: {
                cancellation.cancel()
            }
            if Task.isShuttingDownGracefully || Task.isCancelled { break }
            // Run again at once while pools keep moving, but not forever in a row.
            requeued = again ? requeued + 1 : 0
            if again && requeued <= 5 { continue }
            let elapsed = ContinuousClock.now - started
            guard elapsed < interval else { continue }
            // The placer looks again when a host would turn silent, not an interval later.
            let wait = min(interval - elapsed, reconciler.configuration.cluster?.untilNextSilence() ?? interval)
            if await wake.wait(
                upTo: wait, also: { changes?.drain() == true }, stop: { Task.isShuttingDownGracefully })
            {
                // Woken: every pool is due again (a change may have fixed a failing one).
                backoff.reset()
                logger.debug("woken: running a pass now")
            }
        }
        logger.notice("reconcile loop stopped")
    }

    private func recordMetrics(since started: ContinuousClock.Instant) async {
        guard let metrics else { return }
        Timer(label: "vmpool_pass_duration_seconds").record(duration: ContinuousClock.now - started)
        guard let observation = try? await reconciler.observe(depth: .hypervisor) else { return }
        let standbys = (try? await reconciler.liveStandbyCounts()) ?? [:]
        // One count of the pools' VMs for the gauges and for the status page's hour.
        let readiness = observation.readiness()
        metrics.record(observation, readiness: readiness, standbys: standbys)
        if let history {
            let waiters = (try? reconciler.store.leaseWaiters()) ?? [:]
            var counts: [String: (ready: Int, size: Int, waiting: Int)] = [:]
            for pool in observation.pools {
                counts[pool.spec.name] = (
                    readiness[pool.spec.name]?.ready ?? 0, pool.spec.size, waiters[pool.spec.name] ?? 0
                )
            }
            history.record(counts)
        }
    }

    /// Waits for the state dir lock, without blocking a thread, until shutdown.
    private func takeLock() async -> StateLock? {
        var reported = false
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            do {
                switch try StateLock.tryAcquire(directory: stateDirectory, command: "reconcile --every") {
                case .success(let lock): return lock
                case .failure(let busy):
                    if !reported {
                        logger.info(
                            "waiting for the state dir lock (held by \(busy.holder.map { "\($0)" } ?? "another vmpool"))"
                        )
                        reported = true
                    }
                }
            } catch {
                logger.error("cannot take the state dir lock: \(error)")
                return nil
            }
            try? await Task.sleep(for: .milliseconds(50))
        }
        return nil
    }

    private func retryLater(_ pool: String, _ why: String, _ wait: Duration) {
        logger.warning(
            "pool not converged; retrying later",
            metadata: ["pool": "\(pool)", "retry_in": "\(DurationText.format(wait))", "error": "\(why)"])
    }

    /// Returns whether to run again at once (a pool moved while the pass ran).
    private func pass(_ backoff: inout Backoff, cancellation: Cancellation) async -> Bool {
        var requeue = false
        do {
            let pools = try reconciler.store.pools().map(\.spec.name)
            let due = Set(pools.filter { backoff.isDue($0) })
            guard !due.isEmpty else {
                // Nothing to converge here, but a cluster's host still checks in and places.
                if let cluster = reconciler.configuration.cluster {
                    try cluster.checkIn()
                    _ = try cluster.placeIfPlacer()
                }
                return false
            }
            let result = try await reconciler.reconcile(only: due, cancellation: cancellation)
            for pool in due {
                switch result.outcome(of: pool) {
                case .converged:
                    backoff.succeeded(pool)
                case .requeue:
                    backoff.succeeded(pool)
                    requeue = true
                case .retry(let why):
                    retryLater(pool, why, backoff.failed(pool, terminal: false))
                case .terminal(let why):
                    retryLater(pool, why, backoff.failed(pool, terminal: true))
                }
            }
            if !result.plan.isEmpty || !result.recovery.isEmpty {
                logger.info(
                    "pass done",
                    metadata: [
                        "actions": "\(result.plan.actions.count)", "converged": "\(result.converged)",
                        "orphans_stopped": "\(result.recovery.orphansStopped.count)",
                    ])
            }
        } catch {
            logger.error("reconcile pass failed: \(error)")
        }
        return requeue
    }
}

/// Per-pool retry schedule.
struct Backoff {
    let interval: Duration
    let maximum: Duration
    private var failures: [String: Int] = [:]
    private var notBefore: [String: ContinuousClock.Instant] = [:]

    init(interval: Duration, maximum: Duration) {
        self.interval = interval
        self.maximum = maximum
    }

    func isDue(_ pool: String, now: ContinuousClock.Instant = .now) -> Bool {
        notBefore[pool].map { now >= $0 } ?? true
    }

    /// Records a failure and returns how long the pool now waits.
    mutating func failed(_ pool: String, terminal: Bool, now: ContinuousClock.Instant = .now) -> Duration {
        let count = (failures[pool] ?? 0) + 1
        failures[pool] = count
        let wait = terminal ? maximum : min(maximum, interval * (1 << min(count, 20)))
        notBefore[pool] = now.advanced(by: wait)
        return wait
    }

    mutating func succeeded(_ pool: String) {
        failures[pool] = nil
        notBefore[pool] = nil
    }

    /// Makes every pool due now, keeping failure counts.
    mutating func reset() { notBefore = [:] }
}
