import Foundation
import Synchronization
import Logging
import VmpoolPlanner
import VmpoolSpec
import VmpoolStore

/// This host's part in a cluster of hosts sharing one PostgreSQL store.
///
/// Each pass a member checks in (joins, or heartbeats), and the one member holding the
/// store's placer lock declares silent hosts dead and places every pool's VMs on the live
/// hosts; then each host converges only its share. A host declared dead while it was cut
/// off learns it on its next write (its epoch is stale), rejoins, and stops the copies it
/// still runs: their records are gone, so its recovery sees them as orphans.
public final class ClusterMember: Sendable {
    public let store: StateStore
    /// How long a host may go without a heartbeat before its VMs are placed elsewhere.
    public let hostTimeout: Duration
    /// What this host offers; `nil` for a member that only places (apply from any host).
    public let capacity: HostCapacity?
    let logger: Logger
    /// Whether the last placing found this member the placer.
    private let placing = Mutex(false)

    public init(store: StateStore, hostTimeout: Duration, capacity: HostCapacity?, logger: Logger) {
        self.store = store
        self.hostTimeout = hostTimeout
        self.capacity = capacity
        self.logger = logger
    }

    /// Joins the cluster, or heartbeats; a host that was declared dead rejoins. Returns
    /// `true` when it had been declared dead.
    @discardableResult
    public func checkIn() throws(StoreError) -> Bool {
        guard let capacity else { return false }
        if store.hasJoined {
            do {
                try store.heartbeat()
                return false
            } catch  where error.code == .fenced {
                // Rejoin below.
            }
        }
        let wasDead = try store.join(capacity: capacity)
        if wasDead {
            logger.warning(
                "this host was declared dead while cut off; its VMs were placed elsewhere; the copies it runs are stopped",
                metadata: ["host": "\(store.host)"])
        }
        return wasDead
    }

    /// Heartbeats every quarter of the host timeout until cancelled, so that a long pass
    /// (a template build) is not taken for a dead host.
    public func heartbeats() -> Task<Void, Never> {
        let interval = max(Duration.milliseconds(100), hostTimeout / 4)
        return Task { [self] in
            while !Task.isCancelled {
                try? await Task.sleep(for: interval)
                if Task.isCancelled { break }
                do {
                    try store.heartbeat()
                } catch {
                    logger.warning("heartbeat failed: \(error)", metadata: ["host": "\(store.host)"])
                }
            }
        }
    }

    /// What placing found: whether this member is the placer, and what it changed.
    public struct PlacementReport: Sendable {
        public var placer: Bool
        public var fenced: [String] = []
        public var changed: Bool = false
        public var unplaced: [String: Int] = [:]
    }

    /// When this member holds the placer lock (or can take it): declares hosts silent for
    /// longer than the host timeout dead, and places every pool on the live hosts.
    public func placeIfPlacer(now: Date = Date()) throws(StoreError) -> PlacementReport {
        let placer = try store.tryBecomePlacer()
        placing.withLock { $0 = placer }
        guard placer else { return PlacementReport(placer: false) }
        var report = PlacementReport(placer: true)
        for host in try store.hosts() where host.fencedAt == nil && !host.isAlive(timeout: hostTimeout, now: now) {
            let silent = Int(now.timeIntervalSince(host.heartbeatAt))
            try store.fence(host.name, reason: "no heartbeat for \(silent)s")
            report.fenced.append(host.name)
            logger.warning("declared a silent host dead; its VMs are placed again", metadata: ["host": "\(host.name)"])
        }
        let pools = try store.pools().filter { !$0.deleting }.map(\.spec)
        let (current, result) = try propose(pools, now: now)
        report.unplaced = result.unplaced
        let before = try store.unplaced()
        guard Set(result.shares) != Set(current) || before != result.unplaced.filter({ $0.value > 0 }) else {
            return report
        }
        report.changed = true
        var events: [Event] = []
        let oldByPool = Dictionary(grouping: current, by: \.pool)
        let newByPool = Dictionary(grouping: result.shares, by: \.pool)
        for pool in pools.map(\.name).sorted() {
            let old = Set(oldByPool[pool] ?? [])
            let new = Set(newByPool[pool] ?? [])
            let unplaced = result.unplaced[pool] ?? 0
            if old != new {
                let text = (newByPool[pool] ?? []).map {
                    "\($0.host) \($0.size)" + ($0.warm > 0 ? "+\($0.warm) warm" : "")
                }
                events.append(
                    Event(
                        pool: pool, kind: "placed",
                        message: text.isEmpty ? "on no host" : "on " + text.joined(separator: ", ")))
            }
            if unplaced > 0 && before[pool] != unplaced {
                events.append(
                    Event(
                        pool: pool, kind: "unplaced",
                        message: "\(unplaced) VM\(unplaced == 1 ? "" : "s") fit on no live host's declared capacity"))
            }
        }
        try store.writePlacement(
            result.shares.map { PlacementRecord(pool: $0.pool, host: $0.host, size: $0.size, warm: $0.warm) },
            unplaced: result.unplaced, events: events)
        return report
    }

    /// For the placer: how long until the next live host would count as silent, so that
    /// its service looks again then rather than up to a whole interval later. `nil` for
    /// other members, or with no other live host.
    public func untilNextSilence(now: Date = Date()) -> Duration? {
        guard placing.withLock({ $0 }), let hosts = try? store.hosts() else { return nil }
        let expiries = hosts.filter { $0.name != store.host && $0.isAlive(timeout: hostTimeout, now: now) }.map {
            $0.heartbeatAt.addingTimeInterval(hostTimeout.seconds).timeIntervalSince(now)
        }
        // Just past the moment, so that the host counts as silent when the pass looks.
        return expiries.min().map { .milliseconds(Int(max(0, $0) * 1000) + 50) }
    }

    /// Where `pools` would be placed now: the shares recorded today, and what placing `pools`
    /// on the live hosts (sticky to those shares) gives. Changes nothing.
    public func propose(_ pools: [PoolSpec], now: Date = Date()) throws(StoreError) -> (
        current: [Placer.Share], proposed: Placer.Result
    ) {
        let leased = try store.leasedUsage()
        let live = try store.hosts().filter { $0.isAlive(timeout: hostTimeout, now: now) }.map { host in
            Placer.Host(
                name: host.name, vcpus: host.capacity.vcpus, memoryMiB: host.capacity.memoryMiB,
                usedVcpus: leased[host.name]?.vcpus ?? 0, usedMemoryMiB: leased[host.name]?.memoryMiB ?? 0)
        }
        let current = try store.placements().map {
            Placer.Share(pool: $0.pool, host: $0.host, size: $0.size, warm: $0.warm)
        }
        return (current, Placer.place(pools: pools.map(Placer.Pool.init), hosts: live, current: current))
    }

    /// `pools` as this host must run them: its share of each pool's VMs and warm spares.
    public func localShare(of pools: [PoolSpec]) throws(StoreError) -> [PoolSpec] {
        let mine = Dictionary(
            uniqueKeysWithValues: try store.placements().filter { $0.host == store.host }.map { ($0.pool, $0) })
        return pools.map { spec in
            var local = spec
            local.size = mine[spec.name]?.size ?? 0
            local.warm = mine[spec.name]?.warm ?? 0
            return local
        }
    }
}
