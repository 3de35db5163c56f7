import Synchronization
import Foundation
import Logging
import VmpoolDriver
import VmpoolPlanner
import VmpoolSpec
import VmpoolStore

/// How a reconciler runs; every field has a default that suits a small host.
public struct ReconcilerConfiguration: Sendable {
    /// Actions run at once (`--parallel`).
    public var parallelism: Int
    /// The image of pools that name none; `nil` when no default image is built.
    public var defaultImage: BootImage?
    /// No new action starts after this much time (`--timeout`); running ones finish.
    public var timeout: Duration?
    /// Standbys kept per template pool: hypervisor processes started ahead of clones, so
    /// that a clone skips the hypervisor's start-up (`VMPOOL_STANDBY`; 0 turns it off).
    public var standbys: Int

    public init(parallelism: Int = 4, defaultImage: BootImage? = nil, timeout: Duration? = nil, standbys: Int = 2) {
        self.parallelism = max(1, parallelism)
        self.defaultImage = defaultImage
        self.timeout = timeout
        self.standbys = max(0, standbys)
    }
}

/// Drives the hypervisor until it matches the desired pools: observe, recover, plan, execute.
public final class Reconciler: Sendable {
    public let store: StateStore
    public let driver: any HypervisorDriver
    public let configuration: ReconcilerConfiguration
    let logger: Logger

    public init(
        store: StateStore, driver: any HypervisorDriver, configuration: ReconcilerConfiguration = .init(),
        logger: Logger
    ) {
        self.store = store
        self.driver = driver
        self.configuration = configuration
        self.logger = logger
    }

    /// What one apply or reconcile pass did.
    public struct PassResult: Sendable {
        public var recovery: RecoveryReport
        public var plan: Plan
        public var results: [ActionResult]
        /// Actions a fresh plan still finds after executing; empty when converged.
        public var remaining: Plan

        public var converged: Bool { remaining.isEmpty && results.allSatisfy { $0.outcome == .ok } }
    }

    /// Records `pools` as desired, then converges them (and deletes `prune` pools).
    /// The caller holds the state dir lock.
    public func apply(
        _ pools: [PoolSpec], prune: Set<String>, cancellation: Cancellation = Cancellation()
    ) async throws(StoreError) -> PassResult {
        try store.applyDesired(pools)
        return try await converge(pools, prune: prune, cancellation: cancellation)
    }

    /// Converges every stored pool. The caller holds the state dir lock.
    public func reconcile(
        only names: Set<String>? = nil, cancellation: Cancellation = Cancellation()
    ) async throws(StoreError) -> PassResult {
        let stored = try store.pools().filter { names?.contains($0.spec.name) ?? true }
        let deleting = Set(stored.filter(\.deleting).map(\.spec.name))
        let pools = stored.filter { !$0.deleting }.map(\.spec)
        return try await converge(pools, prune: deleting, cancellation: cancellation)
    }

    /// Stops every VM of `names` and forgets the pools. The caller holds the state dir lock.
    public func delete(_ names: Set<String>, cancellation: Cancellation = Cancellation()) async throws(StoreError)
        -> PassResult
    {
        try await converge([], prune: names, cancellation: cancellation)
    }

    /// What `plan` shows: a read-only plan from the current state. Takes no lock.
    public func preview(_ pools: [PoolSpec], prune: Set<String>) async throws(StoreError) -> Plan {
        let observation = try await observe()
        return Planner.plan(planInput(desired: pools, prune: prune, observation: observation))
    }

    private func converge(_ pools: [PoolSpec], prune: Set<String>, cancellation: Cancellation)
        async throws(StoreError) -> PassResult
    {
        try store.markDeleting(prune)
        let recovery = try await recover()
        let observation = try await observe()
        try syncRecords(observation)
        let input = planInput(desired: pools, prune: prune, observation: observation)
        let plan = Planner.plan(input)
        var results = await execute(plan, input: input, cancellation: cancellation)
        results += unresolvedImages(pools)
        if !cancellation.isCancelled { try await refillStandbys(input.desired) }
        try await collectGarbage(pools)
        let after = try await observe()
        let remaining = Planner.plan(planInput(desired: pools, prune: after.storedNames(prune), observation: after))
        return PassResult(recovery: recovery, plan: plan, results: results, remaining: remaining)
    }

    /// Pools that cannot be planned because no image is available for them.
    private func unresolvedImages(_ pools: [PoolSpec]) -> [ActionResult] {
        pools.filter { resolveImage($0) == nil }.map { pool in
            ActionResult(
                action: Action(.create, pool: pool.name, reason: "pool needs the default guest image"),
                outcome: .failed,
                error: "no default guest image is built; run `vmpool image build` or give spec.image", terminal: true)
        }
    }

    /// Brings records in line with what the hypervisor reports (paused or resized behind our back).
    private func syncRecords(_ observation: Observation) throws(StoreError) {
        for record in observation.records where record.state == .running || record.state == .paused {
            guard let status = observation.statuses[record.id], status.liveness == .alive else { continue }
            var updated = record
            if let running = status.running { updated.state = running ? .running : .paused }
            updated.shape.vcpus = status.vcpus ?? record.shape.vcpus
            updated.shape.memoryMiB = status.memoryMiB ?? record.shape.memoryMiB
            if updated != record {
                try store.saveVM(updated)
                try store.record(
                    Event(
                        pool: record.pool, vm: record.id, kind: "drift",
                        message: "hypervisor reports \(updated.state.rawValue), \(updated.shape.vcpus) vcpus,"
                            + " \(updated.shape.memoryMiB) MiB; record said \(record.state.rawValue),"
                            + " \(record.shape.vcpus) vcpus, \(record.shape.memoryMiB) MiB"))
            }
        }
    }

    /// Removes templates no desired pool uses any more (a pool switched to cold boot).
    private func collectGarbage(_ pools: [PoolSpec]) async throws(StoreError) {
        let templatePools = Set(pools.filter { $0.boot == .template }.map(\.name))
        let known = Set(try store.pools().map(\.spec.name))
        for template in try store.templates()
        where known.contains(template.ref.pool) && !templatePools.contains(template.ref.pool)
            && pools.contains(where: { $0.name == template.ref.pool })
        {
            try? await driver.deleteTemplate(template.ref)
            try store.deleteTemplate(template.ref.id)
            try store.record(
                Event(pool: template.ref.pool, kind: "template-removed", message: "pool no longer boots from a template"))
        }
    }
}

/// A flag that asks running work to start nothing new; set on SIGTERM/SIGINT or timeout.
public final class Cancellation: Sendable {
    private let flag = Atomic<Bool>(false)
    public init() {}
    public func cancel() { flag.store(true, ordering: .relaxed) }
    public var isCancelled: Bool { flag.load(ordering: .relaxed) }
}
