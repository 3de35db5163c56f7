import Foundation
import VmpoolDriver
import VmpoolPlanner
import VmpoolSpec
import VmpoolStore

/// The store's records together with what the hypervisor says about each.
public struct Observation: Sendable {
    public var pools: [StoredPool]
    public var records: [VMRecord]
    public var statuses: [String: VMStatus]
    public var templates: [TemplateRecord]
    /// Templates whose saved state the driver has.
    public var templatesPresent: Set<String>
    /// How far the driver was asked: `.hypervisor` for observers, `.guest` for the lock holder.
    public var depth: StatusDepth

    /// The planner's view of every recorded VM.
    public var observedVMs: [ObservedVM] {
        records.map { record in
            let status = statuses[record.id] ?? .gone
            var shape = record.shape
            if status.liveness == .alive {
                shape.vcpus = status.vcpus ?? shape.vcpus
                shape.memoryMiB = status.memoryMiB ?? shape.memoryMiB
            }
            return ObservedVM(
                id: record.id, pool: record.pool, condition: Self.condition(record, status), shape: shape,
                boot: record.boot, createdAt: record.createdAt,
                lease: record.lease.map { LeaseTerm(holder: $0.holder, expiresAt: $0.expiresAt) })
        }
    }

    /// The current (newest ready) template of each pool.
    public var observedTemplates: [String: ObservedTemplate] {
        var result: [String: ObservedTemplate] = [:]
        for template in templates where template.state == .ready {
            result[template.ref.pool] = ObservedTemplate(
                ref: template.ref, usable: templatesPresent.contains(template.ref.id))
        }
        return result
    }

    static func condition(_ record: VMRecord, _ status: VMStatus) -> ObservedVM.Condition {
        switch record.state {
        case .creating: return .broken("creation did not finish")
        case .stopping: return .broken("a stop did not finish")
        case .running, .paused: break
        }
        // Stopped or killed by the hypervisor or the host (a disk write found no space, the VM's
        // memory limit): broken, never a spare, and said why.
        if let fault = status.fault { return .broken(fault) }
        switch status.liveness {
        case .gone: return .broken("the VM's process is gone")
        case .hung: return .broken("the hypervisor does not answer")
        case .alive: break
        }
        // A VM someone entered while no one held it is not fresh: it is never leased.
        if let entered = record.entered, record.lease == nil {
            return .broken("entered by \(entered.by) while not leased")
        }
        if status.running == false { return .paused }
        // A busy agent channel (another client holds it) is not a dead guest.
        if status.agent == .silent { return .broken("the guest agent does not answer") }
        return .running
    }

    /// Those of `names` that are still applied pools.
    public func storedNames(_ names: Set<String>) -> Set<String> {
        names.intersection(pools.map(\.spec.name))
    }

    /// Per pool, one pass over the VMs whatever the number of pools:
    /// `ready` counts VMs in the pool's desired state (up to `size` for paused pools),
    /// `warm` the paused spares beyond them, `vms` every VM recorded.
    public func readiness() -> [String: Readiness] {
        let specs = Dictionary(uniqueKeysWithValues: pools.map { ($0.spec.name, $0.spec) })
        var result: [String: Readiness] = [:]
        for vm in observedVMs {
            var counts = result[vm.pool] ?? Readiness()
            counts.vms += 1
            if vm.lease != nil {
                counts.leased += 1
                result[vm.pool] = counts
                continue
            }
            switch vm.condition {
            case .running where specs[vm.pool]?.state == .running: counts.ready += 1
            case .paused where specs[vm.pool]?.state == .paused: counts.ready += 1
            case .paused: counts.warm += 1
            case .running, .broken: break
            }
            result[vm.pool] = counts
        }
        for (name, counts) in result where specs[name]?.state == .paused && counts.ready > specs[name]!.size {
            result[name] = Readiness(
                ready: specs[name]!.size, warm: counts.warm + counts.ready - specs[name]!.size, vms: counts.vms,
                leased: counts.leased)
        }
        return result
    }
}

/// A pool's VMs by what they are ready for.
public struct Readiness: Sendable, Hashable {
    /// In the pool's desired state and answering.
    public var ready = 0
    /// Paused spares beyond the serving VMs.
    public var warm = 0
    /// Recorded, whatever their condition.
    public var vms = 0
    /// Handed to holders: no longer the pool's.
    public var leased = 0

    public init(ready: Int = 0, warm: Int = 0, vms: Int = 0, leased: Int = 0) {
        self.ready = ready
        self.warm = warm
        self.vms = vms
        self.leased = leased
    }
}

extension Reconciler {
    /// Reads the store and asks the driver about every recorded VM and template. Observers
    /// (`get`, a `plan` during an apply) ask at `.hypervisor` depth; the lock holder at `.guest`.
    /// A pass leaves out the leased VMs' status (`leased: false`): they are their holders',
    /// and the planner decides about them from the clock alone.
    ///
    /// `allHosts` (what `get` and `describe` show on a cluster) adds the other hosts' VMs,
    /// whose condition is what their records say: their own hosts watch them.
    public func observe(depth: StatusDepth, leased: Bool = true, allHosts: Bool = false) async throws(StoreError)
        -> Observation
    {
        let pools = try store.pools()
        let records = allHosts ? try store.allVMs() : try store.vms()
        let templates = try store.templates()
        let local = records.filter { $0.host == store.host }
        let asked = leased ? local : local.filter { $0.lease == nil }
        var statuses = await driver.status(of: asked.map(\.ref), depth: depth)
        for record in records where record.host != store.host {
            statuses[record.id] = VMStatus(liveness: .alive, running: record.state == .running)
        }
        var present = Set<String>()
        for template in templates where template.state == .ready {
            if await driver.templateExists(template.ref) { present.insert(template.ref.id) }
        }
        return Observation(
            pools: pools, records: records, statuses: statuses, templates: templates, templatesPresent: present,
            depth: depth)
    }

    /// The planner's input for `pools`, with images resolved, from an observation.
    public func planInput(desired pools: [PoolSpec], prune: Set<String>, observation: Observation) -> PlanInput {
        let desired = pools.compactMap { spec -> DesiredPool? in try? desiredPool(spec).get() }
        let allTemplates = Dictionary(grouping: observation.templates, by: \.ref.pool).mapValues { $0.map(\.ref.id) }
        return PlanInput(
            desired: desired, vms: observation.observedVMs, templates: observation.observedTemplates,
            allTemplates: allTemplates, prune: prune)
    }

    /// Why a pool cannot be planned now: files it names are missing or not what they must be.
    public struct Unresolvable: Error, Sendable {
        public var message: String
    }

    /// A pool with everything it names resolved to what it really is: image files to real
    /// paths with their identity (so that another spelling of a path is the same image, and a
    /// rewritten file a new one), disk images read and checked.
    public func desiredPool(_ spec: PoolSpec) -> Result<DesiredPool, Unresolvable> {
        guard let image = resolveImage(spec) else {
            return .failure(
                Unresolvable(message: "no default guest image is built; run `vmpool image build` or give spec.image"))
        }
        let (disks, problems) = DiskImages.resolve(spec.disks)
        if let (field, problem) = problems.first {
            return .failure(Unresolvable(message: "\(field): \(problem.message)"))
        }
        let preparation: Preparation?
        do { preparation = try Preparation.resolve(spec.template) } catch {
            return .failure(Unresolvable(message: error.description))
        }
        return .success(
            DesiredPool(
                spec: spec,
                shape: VMShape(
                    pool: spec, image: DiskImages.resolve(image), disks: disks, preparation: preparation)))
    }

    /// The concrete image a pool boots: its own, or the default guest image (with the pool's
    /// cmdline when it gives one).
    public func resolveImage(_ spec: PoolSpec) -> BootImage? {
        guard let image = spec.image else { return configuration.defaultImage }
        guard let kernel = image.kernel else {
            guard var base = configuration.defaultImage else { return nil }
            if let cmdline = image.cmdline { base.cmdline = cmdline }
            return base
        }
        return BootImage(
            kernel: kernel, initrd: image.initrd,
            cmdline: image.cmdline ?? configuration.defaultImage?.cmdline ?? "console=ttyS0")
    }
}
