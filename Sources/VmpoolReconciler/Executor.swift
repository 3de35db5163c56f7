import Foundation
import Logging
import Metrics
import VmpoolDriver
import VmpoolPlanner
import VmpoolSpec
import VmpoolStore

/// The outcome of one action.
public struct ActionResult: Sendable, Hashable {
    public enum Outcome: String, Sendable, Hashable {
        case ok
        case failed
    }

    public var action: Action
    public var outcome: Outcome
    public var error: String?
    /// The driver's failure kind, when a driver call failed.
    public var code: DriverError.Code?
    /// The VM the action made (create, clone, replace).
    public var createdVM: String?
    /// The failure will not go away by retrying (a missing image file).
    public var terminal: Bool
    /// Why an action that succeeded changed nothing (a lease took its VM meanwhile).
    public var note: String?

    public init(
        action: Action, outcome: Outcome, error: String? = nil, code: DriverError.Code? = nil,
        createdVM: String? = nil, terminal: Bool = false, note: String? = nil
    ) {
        self.note = note
        self.action = action
        self.outcome = outcome
        self.error = error
        self.code = code
        self.createdVM = createdVM
        self.terminal = terminal
    }
}

extension Reconciler {
    /// Runs a plan with bounded parallelism. An action whose dependency failed is not run;
    /// every other action runs even when unrelated ones fail.
    public func execute(_ plan: Plan, input: PlanInput, cancellation: Cancellation) async -> [ActionResult] {
        guard !plan.isEmpty else { return [] }
        let pools = Dictionary(uniqueKeysWithValues: input.desired.map { ($0.spec.name, $0) })
        let leased = Set(input.vms.filter { $0.lease != nil }.map(\.id))
        let deadline = configuration.timeout.map { ContinuousClock.now.advanced(by: $0) }
        var scheduler = ActionScheduler(plan.actions)
        await withTaskGroup(of: ChildTaskResult.self) { group in
            var running = 0
            while true {
                while running < configuration.parallelism, let index = scheduler.next() {
                    let action = plan.actions[index]
                    if cancellation.isCancelled || deadline.map({ ContinuousClock.now >= $0 }) == true {
                        let why =
                            cancellation.isCancelled ? "not started: shutting down" : "not started: --timeout reached"
                        scheduler.record(
                            index, ActionResult(action: action, outcome: .failed, error: why), skipReason: why)
                        continue
                    }
                    running += 1
                    group.addTask {
                        .finished(
                            index: index,
                            result: await self.run(
                                action, pool: pools[action.pool],
                                plannedLeased: action.vm.map(leased.contains) ?? false,
                                cancellation: cancellation, deadline: deadline))
                    }
                }
                guard let child = await group.next() else { break }
                switch child {
                case .finished(let index, let result):
                    running -= 1
                    scheduler.record(index, result, skipReason: "not run: an action it depends on failed")
                    configuration.progress?(
                        PassProgress(
                            done: scheduler.finished.count,
                            failed: scheduler.finished.filter { $0.outcome == .failed }.count,
                            total: plan.actions.count, last: result))
                }
            }
        }
        return scheduler.results
    }

    /// Runs one action; it is interrupted (and its half-done work undone) when the pass is
    /// aborted or its `--timeout` deadline passes.
    func run(
        _ action: Action, pool: DesiredPool?, plannedLeased: Bool, cancellation: Cancellation,
        deadline: ContinuousClock.Instant?
    ) async -> ActionResult {
        await withTaskGroup(of: ActionResult?.self) { group in
            group.addTask { await self.run(action, pool: pool, plannedLeased: plannedLeased) }
            group.addTask {
                while !cancellation.isAborted && deadline.map({ ContinuousClock.now < $0 }) ?? true {
                    try? await Task.sleep(for: .milliseconds(100))
                    if Task.isCancelled { return nil }
                }
                return nil
            }
            let started = ContinuousClock.now
            var result: ActionResult?
            while let next = await group.next() {
                if let next {
                    result = next
                    group.cancelAll()
                } else if result == nil {
                    // Aborted or out of time: interrupt the action and wait for its undo.
                    group.cancelAll()
                }
            }
            let final = result ?? ActionResult(action: action, outcome: .failed, error: "not run")
            let dimensions = [("kind", action.kind.rawValue), ("outcome", final.outcome.rawValue)]
            Counter(label: "vmpool_actions_total", dimensions: dimensions).increment()
            Timer(label: "vmpool_action_duration_seconds", dimensions: dimensions)
                .record(duration: ContinuousClock.now - started)
            return final
        }
    }

    /// Runs one action, journaling each driver call before it happens. `plannedLeased` says
    /// whether the plan saw its VM leased: an action on a VM whose lease came or went since
    /// does nothing (the VM is its holder's now, or stopping), and the next pass plans anew.
    func run(_ action: Action, pool: DesiredPool?, plannedLeased: Bool) async -> ActionResult {
        var logger = self.logger
        logger[metadataKey: "pool"] = "\(action.pool)"
        if let vm = action.vm { logger[metadataKey: "vm"] = "\(vm)" }
        logger.info("\(action.kind.rawValue): \(action.reason)")
        let started = ContinuousClock.now
        do {
            let created = try await perform(action, pool: pool, plannedLeased: plannedLeased, logger: logger)
            var metadata: Logger.Metadata = ["took_ms": "\((ContinuousClock.now - started).milliseconds)"]
            if let created { metadata["created"] = "\(created)" }
            logger.info("\(action.kind.rawValue) done", metadata: metadata)
            return ActionResult(action: action, outcome: .ok, createdVM: created)
        } catch is LeasedMeanwhile {
            let note = "its VM's lease changed while the pass ran; left to the next pass"
            logger.info("\(action.kind.rawValue) skipped: \(note)")
            return ActionResult(action: action, outcome: .ok, note: note)
        } catch let error as DriverError {
            logger.error("\(action.kind.rawValue) failed: \(error)")
            return ActionResult(
                action: action, outcome: .failed, error: error.description, code: error.code,
                terminal: error.isTerminal)
        } catch {
            logger.error("\(action.kind.rawValue) failed: \(error)")
            return ActionResult(action: action, outcome: .failed, error: "\(error)")
        }
    }

    /// An action's VM was leased, or its lease ended, after the plan was made.
    struct LeasedMeanwhile: Error {}

    private func perform(_ action: Action, pool: DesiredPool?, plannedLeased: Bool, logger: Logger) async throws
        -> String?
    {
        switch action.kind {
        case .create, .clone:
            guard let pool else { throw DriverError(.notFound, "pool \(action.pool) is not desired") }
            return try await launch(
                pool, state: action.state ?? .running, slot: action.slot.map { "\(action.pool)#\($0)" }, logger: logger)
        case .replace:
            guard let pool, let old = try record(action.vm) else {
                throw DriverError(.notFound, "VM \(action.vm ?? "?") is not recorded")
            }
            // Journaled first, so that no lease takes the VM being replaced; it runs on until
            // its replacement does (a crash meanwhile leaves it running).
            guard
                let (current, journal) = try store.beginOnVM(
                    old.id, operation: "stop", plannedLeased: plannedLeased)
            else { throw LeasedMeanwhile() }
            let created: String
            do {
                created = try await launch(
                    pool, state: action.state ?? .running, slot: "replacement of \(old.id)", logger: logger)
            } catch {
                try? store.finish(journal, outcome: .failed, error: "\(error)")
                throw error
            }
            var stopping = current
            stopping.state = .stopping
            try store.saveVM(stopping)
            try await stop(stopping, journal: journal, reason: "replaced by \(created)")
            return created
        case .buildTemplate:
            guard let pool else { throw DriverError(.notFound, "pool \(action.pool) is not desired") }
            try await buildTemplate(pool)
            return nil
        case .resume:
            try await journaled(action, plannedLeased: plannedLeased) { record in
                try await driver.resume(record.ref)
                record.state = .running
            }
            return nil
        case .pause:
            try await journaled(action, plannedLeased: plannedLeased) { record in
                try await driver.pause(record.ref)
                record.state = .paused
            }
            return nil
        case .hotplugCPU:
            try await journaled(action, plannedLeased: plannedLeased) { record in
                guard let change = action.vcpus else { return }
                try await driver.hotplugCPUs(record.ref, shape: record.shape, to: change.to)
                record.shape.vcpus = change.to
            }
            return nil
        case .hotplugMemory:
            try await journaled(action, plannedLeased: plannedLeased) { record in
                guard let change = action.memoryMiB else { return }
                try await driver.hotplugMemory(record.ref, shape: record.shape, to: change.to)
                record.shape.memoryMiB = change.to
            }
            return nil
        case .stop:
            guard let id = action.vm else { return nil }
            guard
                let (record, journal) = try store.beginOnVM(
                    id, operation: "stop", plannedLeased: plannedLeased, stopping: true)
            else {
                if try store.vm(id) == nil { return nil }
                throw LeasedMeanwhile()
            }
            try await stop(record, journal: journal, reason: action.reason)
            return nil
        case .deleteTemplate:
            guard let id = action.template else { return nil }
            try await removeTemplate(id, pool: action.pool, reason: action.reason)
            return nil
        case .deletePool:
            for standby in try store.standbys() where standby.pool == action.pool {
                await stopStandby(standby, reason: "pool is deleted")
            }
            for template in try store.templates() where template.ref.pool == action.pool {
                try await driver.deleteTemplate(id: template.ref.id)
            }
            if try !store.vms(pool: action.pool).isEmpty {
                throw DriverError(.invalidState, "pool \(action.pool) still has VMs")
            }
            // On a cluster, the last host to stop its VMs of the pool forgets it.
            if try store.allVMs(pool: action.pool).isEmpty { try store.deletePool(action.pool) }
            return nil
        }
    }

    /// The one shape of an action on an existing VM: journaled before the driver call, the
    /// VM's new facts and the journal's close written together after it (or the failure).
    private func journaled(
        _ action: Action, plannedLeased: Bool, _ body: (inout VMRecord) async throws -> Void
    ) async throws {
        guard let id = action.vm, try store.vm(id) != nil else { throw DriverError(.notFound, "VM is not recorded") }
        guard
            let (record, journal) = try store.beginOnVM(
                id, operation: action.kind.rawValue, plannedLeased: plannedLeased)
        else { throw LeasedMeanwhile() }
        var updated = record
        do {
            try await body(&updated)
        } catch {
            try store.finish(journal, outcome: .failed, error: "\(error)")
            throw error
        }
        try store.finish(
            journal, outcome: .ok, updating: updated,
            event: Event(pool: record.pool, vm: record.id, kind: action.kind.rawValue, message: action.reason))
    }

    private func record(_ id: String?) throws -> VMRecord? {
        guard let id else { return nil }
        return try store.vm(id)
    }

    /// Creates or clones one VM: recorded (state `creating`) and journaled before the driver
    /// runs, so a crash at any instant leaves a record the next pass undoes.
    private func launch(_ pool: DesiredPool, state: DesiredState, slot: String?, logger: Logger) async throws -> String
    {
        try await ensureNetwork(pool.shape.network)
        var template: TemplateRef?
        if pool.spec.boot == .template {
            template = Self.currentTemplate(of: pool, among: try store.templates())
            guard template != nil else { throw DriverError(.notFound, "pool \(pool.spec.name) has no usable template") }
        }
        let (record, journal) = try recordLaunch(pool, template: template)
        let id = record.id
        let request = LaunchRequest(
            id: id, pool: pool.spec.name, shape: pool.shape, state: state, network: record.network, slot: slot,
            walls: pool.spec.walls)
        let launched: LaunchedVM
        do {
            if let template {
                launched = try await driver.clone(request, from: template)
            } else {
                launched = try await driver.create(request)
            }
        } catch {
            try? await driver.stop(record.ref)
            try store.finish(
                journal, outcome: .failed, error: error.description, deletingVM: id,
                event: Event(pool: record.pool, vm: id, kind: "launch-failed", message: error.description))
            throw error
        }
        var done = record
        done.state = state == .running ? .running : .paused
        done.pid = launched.pid
        done.shape = launched.shape
        try store.finish(
            journal, outcome: .ok, updating: done,
            event: Event(
                pool: record.pool, vm: id, kind: template == nil ? "created" : "cloned",
                message: "\(done.state.rawValue), \(done.shape.vcpus) vcpus, \(done.shape.memoryMiB) MiB"))
        return id
    }

    /// Records the VM about to be launched, with its journal entry: a ready standby of the
    /// template when there is one (the VM takes its id and process), else a fresh id.
    private func recordLaunch(_ pool: DesiredPool, template: TemplateRef?) throws -> (VMRecord, Int64) {
        var record = VMRecord(
            id: VMID.vm(pool: pool.spec.name), pool: pool.spec.name, state: .creating, boot: pool.spec.boot,
            shape: pool.shape, templateID: template?.id, createdAt: Date())
        let network = pool.shape.network.map(NetworkRequest.init)
        if let template,
            let claimed = try store.claimStandby(
                template: template.id, for: record, network: network, portIsFree: LocalPorts.isFree)
        {
            return claimed
        }
        while true {
            if let begun = try store.beginLaunch(
                record, operation: template == nil ? "create" : "clone", network: network,
                portIsFree: LocalPorts.isFree)
            {
                return begun
            }
            record.id = VMID.vm(pool: pool.spec.name)
        }
    }

    /// Stops a VM `beginOnVM` marked stopping and journaled, and forgets it.
    private func stop(_ record: VMRecord, journal: Int64, reason: String) async throws {
        do {
            try await driver.stop(record.ref)
        } catch {
            try store.finish(journal, outcome: .failed, error: error.description)
            throw error
        }
        try store.finish(
            journal, outcome: .ok, deletingVM: record.id,
            event: Event(pool: record.pool, vm: record.id, kind: "stopped", message: reason))
    }

    /// Makes what a network needs on the host (a bridge), recording a bridge vmpool made so
    /// that it goes when no pool uses it any more.
    func ensureNetwork(_ shape: NetworkShape?) async throws {
        guard let shape, shape.mode == .bridge, let bridge = shape.bridge, let subnet = shape.subnet else { return }
        let made = try await driver.prepareNetwork(shape)
        try store.recordBridge(bridge, subnet: subnet, createdByVmpool: made)
        if made {
            try store.record(Event(pool: "", kind: "bridge-created", message: "bridge \(bridge) with \(subnet)"))
        }
    }

    /// Builds a new template, then retires the pool's older ones (running clones keep their
    /// mapping of the old memory file; new clones use the new template).
    private func buildTemplate(_ pool: DesiredPool) async throws {
        try await ensureNetwork(pool.shape.network)
        let ref = TemplateRef(
            id: VMID.template(pool: pool.spec.name), pool: pool.spec.name, key: pool.shape.templateKey)
        let older = try store.templates().filter { $0.ref.pool == pool.spec.name }
        let journal = try store.beginTemplate(TemplateRecord(ref: ref, state: .building, createdAt: Date()))
        do {
            try await driver.buildTemplate(ref)
        } catch {
            try? await driver.deleteTemplate(id: ref.id)
            try store.deleteTemplate(ref.id)
            try store.finish(
                journal, outcome: .failed, error: error.description,
                event: Event(
                    pool: pool.spec.name, kind: "template-failed",
                    message: "template \(ref.id): \((error as? DriverError)?.message ?? error.description)"))
            throw error
        }
        try store.markTemplateReady(ref.id)
        try store.finish(
            journal, outcome: .ok,
            event: Event(pool: pool.spec.name, kind: "template-built", message: "template \(ref.id) saved"))
        for old in older {
            try? await driver.deleteTemplate(id: old.ref.id)
            try store.deleteTemplate(old.ref.id)
        }
    }

    /// Removes a template: its standbys first (they map its memory), then its saved state,
    /// then its record.
    func removeTemplate(_ id: String, pool: String, reason: String) async throws {
        for standby in try store.standbys() where standby.template == id {
            await stopStandby(standby, reason: reason)
        }
        try await driver.deleteTemplate(id: id)
        try store.deleteTemplate(id)
        try store.record(Event(pool: pool, kind: "template-removed", message: "template \(id): \(reason)"))
    }
}
