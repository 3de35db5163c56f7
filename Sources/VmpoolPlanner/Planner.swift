import Foundation
import VmpoolDriver
import VmpoolSpec

/// Decides what to do: a pure function from (desired pools, observed VMs) to a plan.
///
/// Level-based: it looks only at the current desired and observed state, so planning a
/// converged system yields an empty plan, and a plan that was cut short is simply
/// planned again from what it left.
public enum Planner {
    public static func plan(_ input: PlanInput) -> Plan {
        var builder = PlanBuilder()
        // Leased VMs are their holders': they count toward no pool (so the pool refills), and
        // only an expired lease stops one.
        let vmsByPool = Dictionary(grouping: input.vms.filter { $0.lease == nil }, by: \.pool)
        let pruned = input.prune.subtracting(input.desired.map(\.spec.name))
        for vm in input.vms.sorted(by: PoolPlanner.oldestFirst) where !pruned.contains(vm.pool) {
            guard let lease = vm.lease, let expires = lease.expiresAt, expires <= input.now else { continue }
            builder.add(
                Action(
                    .stop, pool: vm.pool, vm: vm.id,
                    reason: "the lease of \(lease.holder) expired at \(Self.timestamp(expires))"))
        }
        let desiredNames = Set(input.desired.map(\.spec.name))
        for pool in input.desired.sorted(by: { $0.spec.name < $1.spec.name }) {
            var planner = PoolPlanner(
                pool: pool, vms: vmsByPool[pool.spec.name] ?? [], template: input.templates[pool.spec.name])
            planner.plan(into: &builder)
            if pool.spec.boot != .template {
                for id in input.allTemplates[pool.spec.name] ?? [] {
                    builder.add(
                        Action(
                            .deleteTemplate, pool: pool.spec.name, template: id,
                            reason: "the pool boots cold now; its template and standbys go"))
                }
            }
        }
        let everyVMByPool = Dictionary(grouping: input.vms, by: \.pool)
        for name in input.prune.subtracting(desiredNames).sorted() {
            let stops = (everyVMByPool[name] ?? []).sorted(by: PoolPlanner.oldestFirst).map { vm in
                builder.add(Action(.stop, pool: name, vm: vm.id, reason: input.pruneReason))
            }
            builder.add(Action(.deletePool, pool: name, reason: input.pruneReason, dependsOn: stops))
        }
        return builder.plan
    }
}

extension Planner {
    static func timestamp(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        return formatter.string(from: date)
    }
}

/// Accumulates actions, handing out the indices dependencies refer to.
struct PlanBuilder {
    private(set) var plan = Plan()

    @discardableResult
    mutating func add(_ action: Action) -> Int {
        plan.actions.append(action)
        return plan.actions.count - 1
    }
}

/// How well an existing VM fits the pool's shape.
enum Fit: Hashable {
    case exact
    case hotplug(vcpus: Action.Change?, memoryMiB: Action.Change?)
    case replace(String)

    init(have: VMShape, want: VMShape) {
        if have.image != want.image {
            self = .replace("the image changed")
        } else if have.disks != want.disks {
            self = .replace("disks changed: " + Self.describe(have.disks, want.disks))
        } else if have.network != want.network {
            self = .replace("the network changed")
        } else if have.preparation != want.preparation {
            self = .replace(Preparation.describe(have.preparation, want.preparation))
        } else if have.sharesTemplateMemory != want.sharesTemplateMemory {
            self = .replace(
                want.sharesTemplateMemory
                    ? "template memory is shared now (template.shareMemory)"
                    : "template memory is private now (template.shareMemory: false)")
        } else if have.maxVcpus != want.maxVcpus {
            self = .replace("maxVcpus changes \(have.maxVcpus) → \(want.maxVcpus)")
        } else if have.maxMemoryMiB != want.maxMemoryMiB {
            self = .replace(
                "maxMemory changes \(MemoryQuantity.format(have.maxMemoryMiB)) → "
                    + MemoryQuantity.format(want.maxMemoryMiB))
        } else if have.vcpus > want.vcpus {
            self = .replace("vcpus \(have.vcpus) → \(want.vcpus) cannot shrink in place")
        } else if have.memoryMiB > want.memoryMiB {
            self = .replace(
                "memory \(MemoryQuantity.format(have.memoryMiB)) → \(MemoryQuantity.format(want.memoryMiB))"
                    + " cannot shrink in place")
        } else if (want.memoryMiB - have.memoryMiB) % SpecLimits.memoryBlockMiB != 0 {
            self = .replace(
                "memory grows by \(want.memoryMiB - have.memoryMiB) MiB, not a multiple of the"
                    + " \(SpecLimits.memoryBlockMiB) MiB hotplug block")
        } else {
            let cpu = have.vcpus < want.vcpus ? Action.Change(from: have.vcpus, to: want.vcpus) : nil
            let memory =
                have.memoryMiB < want.memoryMiB ? Action.Change(from: have.memoryMiB, to: want.memoryMiB) : nil
            self = cpu == nil && memory == nil ? .exact : .hotplug(vcpus: cpu, memoryMiB: memory)
        }
    }

    var needsReplace: Bool {
        if case .replace = self { return true }
        return false
    }

    /// `root (base image changed), scratch (added)`.
    static func describe(_ have: [DiskShape], _ want: [DiskShape]) -> String {
        var changes: [String] = []
        let old = Dictionary(have.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        let new = Dictionary(want.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        for disk in want {
            guard let before = old[disk.name] else {
                changes.append("\(disk.name) added")
                continue
            }
            if before.base != disk.base || before.fingerprint != disk.fingerprint {
                changes.append("\(disk.name)'s base image changed")
            } else if before.sizeMiB != disk.sizeMiB {
                changes.append("\(disk.name) resized")
            }
        }
        for disk in have where new[disk.name] == nil { changes.append("\(disk.name) removed") }
        if changes.isEmpty { changes.append("order changed") }
        return changes.joined(separator: ", ")
    }
}

/// Plans one pool.
struct PoolPlanner {
    let pool: DesiredPool
    let vms: [ObservedVM]
    let template: ObservedTemplate?
    private var spec: PoolSpec { pool.spec }

    init(pool: DesiredPool, vms: [ObservedVM], template: ObservedTemplate?) {
        self.pool = pool
        self.vms = vms
        self.template = template
    }

    static func oldestFirst(_ a: ObservedVM, _ b: ObservedVM) -> Bool {
        (a.createdAt, a.id) < (b.createdAt, b.id)
    }

    static func newestFirst(_ a: ObservedVM, _ b: ObservedVM) -> Bool {
        oldestFirst(b, a)
    }

    /// Plans the pool in five steps: its template, scale-down, run states, replacements of
    /// broken VMs, then each kept VM's changes and the new VMs.
    mutating func plan(into builder: inout PlanBuilder) {
        let newDeps = planTemplate(into: &builder).map { [$0] } ?? []
        let fits = Dictionary(
            uniqueKeysWithValues: vms.filter { !$0.isBroken }.map { ($0.id, Fit(have: $0.shape, want: pool.shape)) })
        let (kept, stops) = scaleDown(fits)
        var states = runStates(of: kept, fits)
        for (vm, reason) in stops { builder.add(Action(.stop, pool: spec.name, vm: vm.id, reason: reason)) }
        replaceBroken(into: &builder, slots: &states.newSlots, dependsOn: newDeps)
        for vm in kept.sorted(by: Self.oldestFirst) {
            change(vm, fit: fits[vm.id] ?? .exact, states: states, into: &builder, dependsOn: newDeps)
        }
        addNew(states.newSlots, after: kept.count, into: &builder, dependsOn: newDeps)
    }

    /// VMs that cannot stay in place sort before the others, newest first within each.
    private func doomedFirst(_ fits: [String: Fit]) -> (ObservedVM, ObservedVM) -> Bool {
        { a, b in
            let ra = fits[a.id]?.needsReplace ?? false
            let rb = fits[b.id]?.needsReplace ?? false
            return ra != rb ? ra : Self.newestFirst(a, b)
        }
    }

    private var wantPaused: Int { spec.state == .paused ? spec.totalVMs : spec.warm }

    /// Scale down: paused VMs beyond the warm count first, then the newest (those that must
    /// be replaced anyway before those that fit). Returns the VMs kept and the stops.
    private func scaleDown(_ fits: [String: Fit]) -> (kept: [ObservedVM], stops: [(ObservedVM, String)]) {
        var good = vms.filter { !$0.isBroken }
        let total = spec.totalVMs
        var stops: [(ObservedVM, String)] = []
        guard good.count > total else { return (good, []) }
        var surplus = good.count - total
        let order = doomedFirst(fits)
        let paused = good.filter { $0.condition == .paused }.sorted(by: order)
        for vm in paused.prefix(min(surplus, max(0, paused.count - wantPaused))) {
            stops.append((vm, "scale down: more than \(wantPaused) paused VMs"))
            surplus -= 1
        }
        let stopped = Set(stops.map(\.0.id))
        for vm in good.filter({ !stopped.contains($0.id) }).sorted(by: order).prefix(surplus) {
            stops.append((vm, "scale down: \(good.count) → \(total) VMs"))
        }
        let allStopped = Set(stops.map(\.0.id))
        good.removeAll { allStopped.contains($0.id) }
        return (good, stops)
    }

    /// Which kept VMs resume or pause, and the states of the VMs to make.
    struct RunStates {
        var resumes: Set<String> = []
        var pauses: Set<String> = []
        /// The state of each new VM, in order: running ones first.
        var newSlots: [DesiredState] = []
    }

    private func runStates(of kept: [ObservedVM], _ fits: [String: Fit]) -> RunStates {
        let running = kept.filter { $0.condition == .running }
        let paused = kept.filter { $0.condition == .paused }
        var resumes: [ObservedVM] = []
        var pauses: [ObservedVM] = []
        var newRunning = 0
        var newPaused = 0
        switch spec.state {
        case .running:
            if running.count > spec.size {
                pauses = Array(running.sorted(by: doomedFirst(fits)).prefix(running.count - spec.size))
            } else if running.count < spec.size {
                let need = spec.size - running.count
                // Warm spares that fit resume first, oldest first.
                let readyFirst = paused.sorted { a, b in
                    let ra = fits[a.id]?.needsReplace ?? false
                    let rb = fits[b.id]?.needsReplace ?? false
                    return ra != rb ? rb : Self.oldestFirst(a, b)
                }
                resumes = Array(readyFirst.prefix(need))
                newRunning = need - resumes.count
            }
            newPaused = max(0, spec.warm - (paused.count - resumes.count + pauses.count))
        case .paused:
            pauses = running
            newPaused = spec.totalVMs - kept.count
        }
        return RunStates(
            resumes: Set(resumes.map(\.id)), pauses: Set(pauses.map(\.id)),
            newSlots: Array(repeating: .running, count: newRunning) + Array(repeating: .paused, count: newPaused))
    }

    /// Broken VMs are replaced while new VMs are wanted (each replacement takes a slot), and
    /// stopped beyond that.
    private func replaceBroken(into builder: inout PlanBuilder, slots: inout [DesiredState], dependsOn: [Int]) {
        for vm in vms.filter(\.isBroken).sorted(by: Self.oldestFirst) {
            guard case .broken(let why) = vm.condition else { continue }
            if slots.isEmpty {
                builder.add(Action(.stop, pool: spec.name, vm: vm.id, reason: "\(why); not needed"))
            } else {
                let state = slots.removeFirst()
                builder.add(
                    Action(.replace, pool: spec.name, vm: vm.id, state: state, reason: why, dependsOn: dependsOn))
            }
        }
    }

    /// A kept VM: replaced when it cannot be changed in place, else resumed, hotplugged and
    /// paused in that order, each step after the one before.
    private func change(
        _ vm: ObservedVM, fit: Fit, states: RunStates, into builder: inout PlanBuilder, dependsOn: [Int]
    ) {
        let name = spec.name
        let resume = states.resumes.contains(vm.id)
        let pause = states.pauses.contains(vm.id)
        switch fit {
        case .replace(let why):
            let finalState: DesiredState =
                resume ? .running : pause ? .paused : (vm.condition == .running ? .running : .paused)
            builder.add(Action(.replace, pool: name, vm: vm.id, state: finalState, reason: why, dependsOn: dependsOn))
        case .exact:
            if resume { builder.add(Action(.resume, pool: name, vm: vm.id, reason: resumeReason)) }
            if pause { builder.add(Action(.pause, pool: name, vm: vm.id, reason: pauseReason)) }
        case .hotplug(let cpu, let memory):
            var previous: Int?
            func chain(_ action: Action) {
                var action = action
                if let previous { action.dependsOn = [previous] }
                previous = builder.add(action)
            }
            if resume { chain(Action(.resume, pool: name, vm: vm.id, reason: resumeReason)) }
            if let cpu {
                chain(
                    Action(
                        .hotplugCPU, pool: name, vm: vm.id, vcpus: cpu,
                        reason: "vcpus \(cpu.from) → \(cpu.to) (ceiling \(spec.maxVcpus))"))
            }
            if let memory {
                chain(
                    Action(
                        .hotplugMemory, pool: name, vm: vm.id, memoryMiB: memory,
                        reason: "memory \(MemoryQuantity.format(memory.from)) → "
                            + "\(MemoryQuantity.format(memory.to)) (ceiling "
                            + "\(MemoryQuantity.format(spec.maxMemoryMiB)))"))
            }
            if pause { chain(Action(.pause, pool: name, vm: vm.id, reason: pauseReason)) }
        }
    }

    /// The VMs still to make, numbered after those kept (`slot`).
    private func addNew(_ slots: [DesiredState], after kept: Int, into builder: inout PlanBuilder, dependsOn: [Int]) {
        let kind: Action.Kind = spec.boot == .template ? .clone : .create
        // "VM 7 of 10 (8 running + 2 warm)", and for a warm spare "..., a warm spare": the slot
        // counts every VM of the pool, so the total is size + warm, not one state's count.
        let wanted = "\(spec.size) \(spec.state.rawValue)" + (spec.warm > 0 ? " + \(spec.warm) warm" : "")
        for (offset, state) in slots.enumerated() {
            let spare = state == .paused && spec.state == .running ? ", a warm spare" : ""
            var action = Action(
                kind, pool: spec.name, state: state,
                reason: "VM \(kept + offset + 1) of \(spec.totalVMs) (\(wanted))\(spare)", dependsOn: dependsOn)
            action.slot = kept + offset + 1
            builder.add(action)
        }
    }

    private var resumeReason: String { "\(spec.size) running VMs wanted; a warm spare is resumed first" }
    private var pauseReason: String {
        spec.state == .paused ? "pool state is paused" : "\(spec.size) running VMs wanted; kept as a warm spare"
    }

    /// Plans a template (re)build for template pools that need a VM; returns its index for
    /// clones to wait on. A pool of no VMs builds nothing (templates are built on first need).
    private func planTemplate(into builder: inout PlanBuilder) -> Int? {
        guard spec.boot == .template, spec.totalVMs > 0 else { return nil }
        let want = pool.shape.templateKey
        let reason: String
        if let template {
            if template.usable && template.ref.key == want { return nil }
            reason =
                template.usable
                ? "template is stale: " + Self.describe(template.ref.key, want)
                : "template state is missing"
        } else {
            reason = "pool has no template yet"
        }
        return builder.add(Action(.buildTemplate, pool: spec.name, reason: reason))
    }

    static func describe(_ have: TemplateKey, _ want: TemplateKey) -> String {
        var changes: [String] = []
        if have.image != want.image { changes.append("image changed") }
        if have.disks != want.disks { changes.append("disks changed") }
        if have.network != want.network { changes.append("network changed") }
        if have.preparation != want.preparation {
            changes.append(Preparation.describe(have.preparation, want.preparation))
        }
        if have.layout != want.layout { changes.append("saved by another vmpool version") }
        if have.vcpus != want.vcpus { changes.append("vcpus \(have.vcpus) → \(want.vcpus)") }
        if have.memoryMiB != want.memoryMiB {
            changes.append(
                "memory \(MemoryQuantity.format(have.memoryMiB)) → \(MemoryQuantity.format(want.memoryMiB))")
        }
        if have.maxVcpus != want.maxVcpus { changes.append("maxVcpus \(have.maxVcpus) → \(want.maxVcpus)") }
        if have.maxMemoryMiB != want.maxMemoryMiB {
            changes.append(
                "maxMemory \(MemoryQuantity.format(have.maxMemoryMiB)) → \(MemoryQuantity.format(want.maxMemoryMiB))")
        }
        return changes.joined(separator: ", ")
    }
}
