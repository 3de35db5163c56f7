import Foundation
import Logging
import ServiceLifecycle
import VmpoolDriver
import VmpoolReconciler

/// `reconcile --every`: a pass per interval until graceful shutdown.
///
/// A pool whose pass fails is retried with exponential backoff (interval × 2ⁿ, at most 10
/// minutes); a terminal failure (a missing image file) waits the full 10 minutes. Other
/// pools keep their own schedule, so one broken pool never holds up the rest.
struct ReconcileService: Service {
    let reconciler: Reconciler
    let interval: Duration
    let logger: Logger
    static let maxBackoff: Duration = .seconds(600)

    func run() async throws {
        var backoff = Backoff(interval: interval, maximum: Self.maxBackoff)
        let cancellation = Cancellation()
        while !Task.isShuttingDownGracefully {
            let started = ContinuousClock.now
            await withGracefulShutdownHandler {
                await pass(&backoff, cancellation: cancellation)
            } onGracefulShutdown: {
                cancellation.cancel()
            }
            let elapsed = ContinuousClock.now - started
            guard elapsed < interval else { continue }
            try? await Task.sleep(for: interval - elapsed)
            if Task.isCancelled { break }
        }
        logger.notice("reconcile loop stopped")
    }

    private func pass(_ backoff: inout Backoff, cancellation: Cancellation) async {
        do {
            let pools = try reconciler.store.pools().map(\.spec.name)
            let due = Set(pools.filter { backoff.isDue($0) })
            guard !due.isEmpty else { return }
            let result = try await reconciler.reconcile(only: due, cancellation: cancellation)
            var failed: [String: Bool] = [:]
            for item in result.results where item.outcome == .failed {
                failed[item.action.pool] = (failed[item.action.pool] ?? false) || item.terminal
            }
            for action in result.remaining.actions where failed[action.pool] == nil { failed[action.pool] = false }
            for pool in due {
                if let terminal = failed[pool] {
                    let wait = backoff.failed(pool, terminal: terminal)
                    logger.warning(
                        "pool not converged; retrying later",
                        metadata: ["pool": "\(pool)", "retry_in": "\(DurationText.format(wait))"])
                } else {
                    backoff.succeeded(pool)
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
}
