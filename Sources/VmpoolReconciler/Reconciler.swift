import Foundation
import Logging
import Synchronization
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
    /// The pass's deadline (`--timeout`): no action starts after it, and running ones are
    /// interrupted and undone.
    public var timeout: Duration?
    /// Standbys kept per template pool: hypervisor processes started ahead of clones, so
    /// that a clone skips the hypervisor's start-up (`VMPOOL_STANDBY`; 0 turns it off).
    public var standbys: Int
    /// Told after each action finishes (a live progress line on a terminal).
    public var progress: (@Sendable (PassProgress) -> Void)?
    /// This host's part in a cluster sharing a PostgreSQL store: a pass checks in, places
    /// (when this host is the placer), and converges this host's share of each pool.
    public var cluster: ClusterMember?

    public init(parallelism: Int = 4, defaultImage: BootImage? = nil, timeout: Duration? = nil, standbys: Int = 2) {
        self.parallelism = max(1, parallelism)
        self.defaultImage = defaultImage
        self.timeout = timeout
        self.standbys = max(0, standbys)
    }
}

/// How a pool's pass ended.
public enum PoolOutcome: Sendable, Hashable {
    /// Nothing left to do.
    case converged
    /// Nothing failed, but the world moved meanwhile (a lease took a VM, a VM died): run
    /// again soon, without backing off.
    case requeue
    /// An action failed; retrying may help (with backoff).
    case retry(String)
    /// An action failed in a way no retry fixes until the pool's spec changes.
    case terminal(String)
}

/// How far a pass's actions have got.
public struct PassProgress: Sendable {
    public var done: Int
    public var failed: Int
    public var total: Int
    public var last: ActionResult
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

        /// The pass stopped early (shutdown, `--timeout`): work it would have done is left.
        public var interrupted = false

        /// How each pool of the pass ended, for a service to schedule the next try by
        /// (controller-runtime's `Result` and `TerminalError`).
        public func outcome(of pool: String) -> PoolOutcome {
            let failures = results.filter { $0.action.pool == pool && $0.outcome == .failed }
            if let terminal = failures.first(where: \.terminal) { return .terminal(terminal.error ?? "failed") }
            if let failure = failures.first { return .retry(failure.error ?? "failed") }
            if remaining.actions.contains(where: { $0.pool == pool }) { return .requeue }
            return .converged
        }

        public var converged: Bool {
            !interrupted && remaining.isEmpty && results.allSatisfy { $0.outcome == .ok }
        }
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
        if let cluster = configuration.cluster {
            try cluster.checkIn()
            _ = try cluster.placeIfPlacer()
        }
        let stored = try store.pools().filter { names?.contains($0.spec.name) ?? true }
        let deleting = Set(stored.filter(\.deleting).map(\.spec.name))
        var pools = stored.filter { !$0.deleting }.map(\.spec)
        if let cluster = configuration.cluster { pools = try cluster.localShare(of: pools) }
        return try await converge(pools, prune: deleting, cancellation: cancellation)
    }

    /// Stops every VM of `names` and forgets the pools. The caller holds the state dir lock.
    public func delete(_ names: Set<String>, cancellation: Cancellation = Cancellation()) async throws(StoreError)
        -> PassResult
    {
        try await converge([], prune: names, pruneReason: "pool is deleted", cancellation: cancellation)
    }

    /// What `plan` shows: a read-only plan from the current state. `depth` is `.guest` when
    /// the caller holds the state dir lock (the plan is then exactly what apply would do),
    /// `.hypervisor` while another vmpool works on the state dir.
    public func preview(_ pools: [PoolSpec], prune: Set<String>, depth: StatusDepth) async throws(StoreError)
        -> Plan
    {
        let observation = try await observe(depth: depth)
        return Planner.plan(planInput(desired: pools, prune: prune, observation: observation))
    }

    private func converge(
        _ pools: [PoolSpec], prune: Set<String>, pruneReason: String? = nil, cancellation: Cancellation
    ) async throws(StoreError) -> PassResult {
        try store.markDeleting(prune)
        let recovery = try await recover()
        let observation = try await observe(depth: .guest, leased: false)
        try syncRecords(observation)
        await applyWalls(observation)
        var input = planInput(desired: pools, prune: prune, observation: observation)
        if let pruneReason { input.pruneReason = pruneReason }
        let plan = Planner.plan(input)
        var results = await execute(plan, input: input, cancellation: cancellation)
        results += unresolvedImages(pools)
        try await refillStandbys(input.desired, startNew: !cancellation.isCancelled)
        try await collectGarbage(pools)
        // A pass that found nothing to do and repaired nothing has nothing left to do: no
        // second look at every VM (a no-op apply or cron pass asks each VM once).
        let remaining: Plan
        if plan.isEmpty && recovery.isEmpty {
            remaining = Plan()
        } else {
            let after = try await observe(depth: .guest, leased: false)
            // The last pool is gone: its walls go too (a state dir with nothing in it leaves
            // nothing in the host's firewall).
            if try store.pools().isEmpty { await applyWalls(after) }
            var next = planInput(desired: pools, prune: after.storedNames(prune), observation: after)
            if let pruneReason { next.pruneReason = pruneReason }
            remaining = Planner.plan(next)
        }
        var result = PassResult(recovery: recovery, plan: plan, results: results, remaining: remaining)
        result.interrupted = cancellation.isCancelled
        return result
    }

    /// Writes every stored pool's walls, with the VMs that run, before anything is launched. A
    /// failure is logged and left to the launches, which refuse to start a VM whose walls
    /// cannot be set.
    private func applyWalls(_ observation: Observation) async {
        do {
            let policies = try store.pools().map { pool in
                WallPolicy(
                    pool: pool.spec.name, walls: pool.spec.walls,
                    bridge: pool.spec.network?.mode == .bridge
                        ? pool.spec.network?.bridge ?? NetworkSpec.defaultBridge : nil)
            }
            let members = observation.records.map {
                WallMember(
                    id: $0.id, pool: $0.pool, network: $0.network, shape: $0.shape,
                    mapsTemplate: $0.boot == .template && $0.shape.sharesTemplateMemory)
            }
            let bridges = Dictionary(try store.bridges().map { ($0.name, $0.subnet) }, uniquingKeysWith: { a, _ in a })
            try await driver.applyWalls(policies, members: members, bridges: bridges)
        } catch {
            logger.error("cannot set the network walls: \(error)")
        }
    }

    /// Pools that cannot be planned because files they name are missing or unusable.
    private func unresolvedImages(_ pools: [PoolSpec]) -> [ActionResult] {
        pools.compactMap { pool in
            guard case .failure(let problem) = desiredPool(pool) else { return nil }
            return ActionResult(
                action: Action(.create, pool: pool.name, reason: "the pool's image files must be usable"),
                outcome: .failed, error: problem.message, code: .imageMissing, terminal: true)
        }
    }

    /// Brings records in line with what the hypervisor reports (paused or resized behind our back).
    private func syncRecords(_ observation: Observation) throws(StoreError) {
        for record in observation.records where record.state == .running || record.state == .paused {
            guard let status = observation.statuses[record.id] else { continue }
            if let fault = status.fault {
                // Said once, in an event and the record; the planner replaces the VM.
                guard record.lastError != fault else { continue }
                var faulted = record
                faulted.lastError = fault
                try store.saveVM(faulted)
                try store.record(
                    Event(
                        pool: record.pool, vm: record.id, kind: "fault",
                        message: fault
                            + (record.lease == nil ? "; the pool replaces it" : "; its holder should release it")
                    ))
                continue
            }
            guard status.liveness == .alive else { continue }
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

    /// Removes the templates of pools that are no longer applied at all (their delete finished
    /// without them, or the store lost the pool): the planner handles every applied pool.
    ///
    /// Bridges vmpool made go once no applied pool names them and no VM is on them; a bridge
    /// that was there before vmpool is left alone (and only forgotten).
    private func collectGarbage(_ pools: [PoolSpec]) async throws(StoreError) {
        let stored = try store.pools()
        let known = Set(stored.map(\.spec.name))
        for template in try store.templates() where !known.contains(template.ref.pool) {
            try? await driver.deleteTemplate(id: template.ref.id)
            try store.deleteTemplate(template.ref.id)
        }
        let wanted = Set(stored.compactMap { $0.spec.network?.mode == .bridge ? $0.spec.network?.bridge : nil })
        let bridges = try store.bridges()
        guard bridges.contains(where: { !wanted.contains($0.name) }) else { return }
        let inUse = Set(try store.vms().compactMap { $0.network?.bridge })
        for bridge in bridges where !wanted.contains(bridge.name) && !inUse.contains(bridge.name) {
            if bridge.createdByVmpool { await driver.removeBridge(bridge.name) }
            try store.forgetBridge(bridge.name)
            try store.record(
                Event(
                    pool: "", kind: "bridge-removed",
                    message:
                        "bridge \(bridge.name): no pool uses it\(bridge.createdByVmpool ? "" : " (not made by vmpool; left in place)")"
                ))
        }
    }
}

/// Asks a pass to stop: `cancel` (first SIGTERM/SIGINT) starts nothing new and lets running
/// actions finish; `abort` (a second signal) also interrupts running actions, which undo what
/// they half made.
public final class Cancellation: Sendable {
    private let cancelled = Atomic<Bool>(false)
    private let aborted = Atomic<Bool>(false)
    public init() {}
    public func cancel() { cancelled.store(true, ordering: .relaxed) }
    public func abort() {
        cancelled.store(true, ordering: .relaxed)
        aborted.store(true, ordering: .relaxed)
    }
    public var isCancelled: Bool { cancelled.load(ordering: .relaxed) }
    public var isAborted: Bool { aborted.load(ordering: .relaxed) }
}
