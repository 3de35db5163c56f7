import Foundation
import Synchronization

/// The last hour of each pool, as the service saw it: after every pass, how many VMs were
/// ready against the pool's size and how many callers were waiting for a lease; after every
/// lease the service handed out, how long the caller waited. It lives in the service's
/// memory (a restarted service starts a new hour) and is what the page's charts draw.
///
/// Samples closer than `spacing` are merged (the newest ready count, the most waiting, the
/// longest wait), so a pool keeps at most an hour / spacing of them whatever the pass rate.
public final class PoolHistory: Sendable {
    /// One stretch of `spacing` of a pool's life.
    public struct Sample: Sendable, Hashable {
        public var at: Date
        public var ready: Int
        public var size: Int
        /// The most callers seen waiting for a lease of the pool.
        public var waiting: Int
        /// Leases handed out by the service, and the longest wait among them (seconds).
        public var leases: Int
        public var longestWait: Double

        public init(at: Date, ready: Int, size: Int, waiting: Int = 0, leases: Int = 0, longestWait: Double = 0) {
            self.at = at
            self.ready = ready
            self.size = size
            self.waiting = waiting
            self.leases = leases
            self.longestWait = longestWait
        }
    }

    public static let window: TimeInterval = 3600
    public let spacing: TimeInterval
    private let pools = Mutex<[String: [Sample]]>([:])

    public init(spacing: Duration = .seconds(30)) {
        self.spacing = Double(spacing.components.seconds) + Double(spacing.components.attoseconds) * 1e-18
    }

    /// What a pass found: `ready` of `size`, `waiting` callers queued for a lease. Pools not
    /// named (deleted) are forgotten.
    public func record(_ counts: [String: (ready: Int, size: Int, waiting: Int)], at now: Date = Date()) {
        pools.withLock { pools in
            for name in pools.keys where counts[name] == nil { pools[name] = nil }
            for (name, count) in counts {
                update(&pools[name, default: []], now) { sample in
                    sample.ready = count.ready
                    sample.size = count.size
                    sample.waiting = max(sample.waiting, count.waiting)
                }
            }
        }
    }

    /// A lease of `pool` the service handed out after `waited` seconds.
    public func recordLease(pool: String, waited: Double, at now: Date = Date()) {
        pools.withLock { pools in
            update(&pools[pool, default: []], now) { sample in
                sample.leases += 1
                sample.longestWait = max(sample.longestWait, waited)
            }
        }
    }

    /// The pool's samples of the last hour, oldest first.
    public func samples(_ pool: String, now: Date = Date()) -> [Sample] {
        pools.withLock { pools in
            (pools[pool] ?? []).filter { now.timeIntervalSince($0.at) <= Self.window }
        }
    }

    /// Merges into the newest sample when it is younger than `spacing`, else starts one from
    /// the newest's counts; drops what is older than the window.
    private func update(_ samples: inout [Sample], _ now: Date, _ change: (inout Sample) -> Void) {
        if let last = samples.last, now.timeIntervalSince(last.at) < spacing {
            change(&samples[samples.count - 1])
        } else {
            var sample = Sample(at: now, ready: samples.last?.ready ?? 0, size: samples.last?.size ?? 0)
            change(&sample)
            samples.append(sample)
        }
        if let first = samples.first, now.timeIntervalSince(first.at) > Self.window {
            samples.removeAll { now.timeIntervalSince($0.at) > Self.window }
        }
    }
}
