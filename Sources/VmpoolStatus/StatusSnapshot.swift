import Foundation
import VmpoolDriver
import VmpoolReconciler
import VmpoolStore

/// What the status page shows, read once per render: the pools with their counts, template
/// and last error; every VM with its state, lease and address; the hosts of a shared store;
/// the newest events. Built from an observation (the records with what the hypervisor says),
/// so it agrees with `get` and `describe`.
public struct StatusSnapshot: Sendable {
    public struct Pool: Sendable {
        public var name: String
        public var size: Int
        public var warm: Int
        /// The desired state of its VMs: running or paused.
        public var state: String
        public var boot: String
        public var readiness: Readiness
        public var standbys: Int
        /// Callers queued for a lease now.
        public var waiting: Int
        public var template: Template?
        public var lastError: Problem?
        public var deleting: Bool
        public var history: [PoolHistory.Sample]

        public var isFull: Bool { readiness.ready >= size }
    }

    public struct Template: Sendable {
        public var id: String
        /// `ready`, `building` (its first build), `rebuilding` (a newer one builds beside the
        /// ready one) or `missing` (recorded ready, its saved state gone).
        public var state: String
        /// When it was saved (ready, missing) or when its build started.
        public var since: Date
    }

    public struct Problem: Sendable {
        public var at: Date?
        public var vm: String?
        public var text: String
    }

    public struct VM: Sendable {
        public var id: String
        public var pool: String
        public var state: String
        public var problem: String?
        public var pid: Int32?
        public var address: String?
        public var ports: String
        public var lease: Lease?
        public var boot: String
        public var createdAt: Date
        public var host: String
    }

    public struct Host: Sendable {
        public var name: String
        /// `ready`, `silent` (late, not declared dead yet) or `dead`.
        public var state: String
        public var vms: Int
        public var usedVcpus: Int
        public var vcpus: Int
        public var usedMemoryMiB: Int
        public var memoryMiB: Int
        public var heartbeatAt: Date
    }

    public var generatedAt: Date
    /// The host serving the page.
    public var host: String
    /// Whether the store is shared by several hosts (PostgreSQL).
    public var shared: Bool
    public var pools: [Pool]
    public var vms: [VM]
    public var hosts: [Host]
    /// Newest first.
    public var events: [Event]

    public init(
        generatedAt: Date, host: String, shared: Bool, pools: [Pool], vms: [VM], hosts: [Host], events: [Event]
    ) {
        self.generatedAt = generatedAt
        self.host = host
        self.shared = shared
        self.pools = pools
        self.vms = vms
        self.hosts = hosts
        self.events = events
    }

    /// Event kinds that report something going wrong, for a pool's last error.
    static let failureKinds: Set<String> = [
        "launch-failed", "template-failed", "fork-failed", "fault", "host-lost", "unplaced",
    ]

    /// The snapshot of `observation`. `standbyCounts`: the ready standbys whose process lives;
    /// `failures`: the newest events of `failureKinds` (each pool's last error), when read
    /// apart from `events`;
    /// `hosts` the shared store's hosts (empty on a store of one host); `events` newest last,
    /// as the store gives them.
    public init(
        observation: Observation, standbyCounts: [String: Int], hosts: [HostRecord], hostTimeout: Duration?,
        events: [Event], failures: [Event]? = nil, waiters: [String: Int], history: PoolHistory?, host: String,
        now: Date = Date()
    ) {
        let readiness = observation.readiness()
        let templates = Dictionary(grouping: observation.templates, by: \.ref.pool)
        var lastErrors: [String: Problem] = [:]
        for event in (failures ?? events).reversed()
        where Self.failureKinds.contains(event.kind) && lastErrors[event.pool] == nil {
            lastErrors[event.pool] = Problem(at: event.at, vm: event.vm, text: event.message)
        }
        let rows = VMRow.rows(observation)
        // A VM being created or stopped now is not a failure; one that is failed says why.
        for row in rows.reversed() where row.state == "failed" {
            guard lastErrors[row.record.pool] == nil, let problem = row.problem ?? row.record.lastError else {
                continue
            }
            lastErrors[row.record.pool] = Problem(at: nil, vm: row.record.id, text: problem)
        }
        pools = observation.pools.sorted { $0.spec.name < $1.spec.name }.map { stored in
            let spec = stored.spec
            return Pool(
                name: spec.name, size: spec.size, warm: spec.warm, state: spec.state.rawValue,
                boot: spec.boot.rawValue, readiness: readiness[spec.name] ?? Readiness(),
                standbys: standbyCounts[spec.name] ?? 0, waiting: waiters[spec.name] ?? 0,
                template: Self.template(templates[spec.name] ?? [], present: observation.templatesPresent),
                lastError: lastErrors[spec.name], deleting: stored.deleting,
                history: history?.samples(spec.name, now: now) ?? [])
        }
        vms = rows.sorted {
            ($0.record.pool, $0.record.createdAt, $0.record.id) < ($1.record.pool, $1.record.createdAt, $1.record.id)
        }
        .map { row in
            VM(
                id: row.record.id, pool: row.record.pool, state: row.state, problem: row.problem,
                pid: row.record.pid, address: row.address, ports: row.portsText, lease: row.record.lease,
                boot: row.record.boot.rawValue, createdAt: row.record.createdAt, host: row.record.host)
        }
        let byHost = Dictionary(grouping: observation.records, by: \.host)
        self.hosts = hosts.map { record in
            let placed = byHost[record.name] ?? []
            let alive = hostTimeout.map { record.isAlive(timeout: $0, now: now) } ?? true
            return Host(
                name: record.name, state: record.fencedAt != nil ? "dead" : alive ? "ready" : "silent",
                vms: placed.count, usedVcpus: placed.reduce(0) { $0 + $1.shape.vcpus }, vcpus: record.capacity.vcpus,
                usedMemoryMiB: placed.reduce(0) { $0 + $1.shape.memoryMiB }, memoryMiB: record.capacity.memoryMiB,
                heartbeatAt: record.heartbeatAt)
        }
        self.generatedAt = now
        self.host = host
        self.shared = !hosts.isEmpty
        self.events = events.reversed()
    }

    /// The pool's template as the page shows it: the newest ready one, or the one building.
    static func template(_ records: [TemplateRecord], present: Set<String>) -> Template? {
        let ready = records.filter { $0.state == .ready }.max {
            ($0.savedAt ?? $0.createdAt) < ($1.savedAt ?? $1.createdAt)
        }
        let building = records.filter { $0.state == .building }.max { $0.createdAt < $1.createdAt }
        if let building {
            return Template(
                id: building.ref.id, state: ready == nil ? "building" : "rebuilding", since: building.createdAt)
        }
        guard let ready else { return nil }
        return Template(
            id: ready.ref.id, state: present.contains(ready.ref.id) ? "ready" : "missing",
            since: ready.savedAt ?? ready.createdAt)
    }
}

extension StatusSnapshot {
    /// How many of the newest failure events a snapshot reads for the pools' last errors.
    public static let failuresRead = 500

    /// Reads a snapshot of the whole store (every host's VMs on a shared store) as the
    /// service sees it now.
    public static func read(reconciler: Reconciler, history: PoolHistory?) async throws -> StatusSnapshot {
        let store = reconciler.store
        let observation = try await reconciler.observe(depth: .hypervisor, allHosts: true)
        let cluster = reconciler.configuration.cluster
        return StatusSnapshot(
            observation: observation, standbyCounts: try await reconciler.liveStandbyCounts(),
            hosts: cluster == nil ? [] : try store.hosts(), hostTimeout: cluster?.hostTimeout,
            events: try store.events(limit: StatusPage.maxEvents),
            failures: try store.events(kinds: failureKinds, limit: failuresRead), waiters: try store.leaseWaiters(),
            history: history,
            host: store.host.isEmpty ? ProcessInfo.processInfo.hostName : store.host)
    }
}
