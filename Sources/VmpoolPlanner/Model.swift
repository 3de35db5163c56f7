import Foundation
import VmpoolDriver
import VmpoolSpec

/// A VM as the observer saw it: the store's record merged with the hypervisor's answer.
public struct ObservedVM: Sendable, Hashable {
    /// What a VM can be used for right now.
    public enum Condition: Sendable, Hashable {
        case running
        case paused
        /// Not usable: dead, hung, not answering, or a record left by an unfinished operation.
        case broken(String)
    }

    public var id: String
    public var pool: String
    public var condition: Condition
    /// The shape as the hypervisor reports it where it can (drift shows here), else as recorded.
    public var shape: VMShape
    public var boot: BootMode
    public var createdAt: Date
    /// Set while the VM is leased: it belongs to its holder, not to its pool, until released
    /// or (at `expiresAt`) expired.
    public var lease: LeaseTerm?

    public init(
        id: String, pool: String, condition: Condition, shape: VMShape, boot: BootMode, createdAt: Date,
        lease: LeaseTerm? = nil
    ) {
        self.id = id
        self.pool = pool
        self.condition = condition
        self.shape = shape
        self.boot = boot
        self.createdAt = createdAt
        self.lease = lease
    }

    var isBroken: Bool {
        if case .broken = condition { return true }
        return false
    }
}

/// A lease as the planner sees it.
public struct LeaseTerm: Sendable, Hashable {
    public var holder: String
    public var expiresAt: Date?

    public init(holder: String, expiresAt: Date?) {
        self.holder = holder
        self.expiresAt = expiresAt
    }
}

/// A pool's template as observed.
public struct ObservedTemplate: Sendable, Hashable {
    public var ref: TemplateRef
    /// Its saved state is present and complete.
    public var usable: Bool

    public init(ref: TemplateRef, usable: Bool) {
        self.ref = ref
        self.usable = usable
    }
}

/// A pool to converge, with its image resolved to concrete files.
public struct DesiredPool: Sendable, Hashable {
    public var spec: PoolSpec
    public var shape: VMShape

    public init(spec: PoolSpec, shape: VMShape) {
        self.spec = spec
        self.shape = shape
    }
}

/// Everything the planner decides from. Nothing else: planning is a pure function of this.
public struct PlanInput: Sendable {
    /// Pools to converge.
    public var desired: [DesiredPool]
    /// Every VM of every pool the store knows, with its observed condition.
    public var vms: [ObservedVM]
    /// The current (newest ready) template of each pool, by pool name.
    public var templates: [String: ObservedTemplate]
    /// Every recorded template of each pool, ready or not, oldest first: those of a pool that
    /// no longer boots from a template are removed.
    public var allTemplates: [String: [String]]
    /// Pools to delete (applied earlier, absent from the input, `--prune` given).
    public var prune: Set<String>
    /// Why they are deleted, in the words `plan` shows.
    public var pruneReason: String = "pool is not in the input (--prune)"
    /// The time leases are judged against (expired ones are stopped).
    public var now: Date = Date()

    public init(
        desired: [DesiredPool], vms: [ObservedVM], templates: [String: ObservedTemplate] = [:],
        allTemplates: [String: [String]]? = nil, prune: Set<String> = []
    ) {
        self.desired = desired
        self.vms = vms
        self.templates = templates
        self.allTemplates = allTemplates ?? templates.mapValues { [$0.ref.id] }
        self.prune = prune
    }
}

/// One step of a plan.
public struct Action: Sendable, Hashable, Codable {
    public enum Kind: String, Sendable, Hashable, Codable, CaseIterable {
        case create
        case clone
        case buildTemplate = "build-template"
        case resume
        case pause
        case hotplugCPU = "hotplug-cpu"
        case hotplugMemory = "hotplug-memory"
        case replace
        case stop
        case deletePool = "delete-pool"
        /// Removes a template (and its standbys) that the pool no longer boots from.
        case deleteTemplate = "delete-template"
    }

    /// A change of an amount, for hotplug actions.
    public struct Change: Sendable, Hashable, Codable {
        public var from: Int
        public var to: Int

        public init(from: Int, to: Int) {
            self.from = from
            self.to = to
        }
    }

    public var kind: Kind
    public var pool: String
    /// The existing VM the action touches; `nil` for create, clone, build-template, delete-pool.
    public var vm: String?
    /// The template a delete-template removes.
    public var template: String?
    /// The state a VM made by this action ends in (create, clone, replace).
    public var state: DesiredState?
    /// CPU count before and after (hotplug-cpu).
    public var vcpus: Change?
    /// Memory in MiB before and after (hotplug-memory).
    public var memoryMiB: Change?
    /// Why the planner chose this, in words a user reads in `plan`.
    public var reason: String
    /// Indices of actions that must succeed first.
    public var dependsOn: [Int]
    /// For a new VM: its place in the pool (`N` of "N of M"), which names it before it has an id.
    public var slot: Int?

    public init(
        _ kind: Kind, pool: String, vm: String? = nil, template: String? = nil, state: DesiredState? = nil,
        vcpus: Change? = nil, memoryMiB: Change? = nil, reason: String, dependsOn: [Int] = []
    ) {
        self.kind = kind
        self.pool = pool
        self.vm = vm
        self.template = template
        self.state = state
        self.vcpus = vcpus
        self.memoryMiB = memoryMiB
        self.reason = reason
        self.dependsOn = dependsOn
    }
}

/// An ordered list of actions with their dependencies.
public struct Plan: Sendable, Hashable {
    public var actions: [Action]

    public init(actions: [Action] = []) {
        self.actions = actions
    }

    public var isEmpty: Bool { actions.isEmpty }

    /// Action counts by kind, every kind present (zero where none).
    public var summary: [Action.Kind: Int] {
        var counts = Dictionary(uniqueKeysWithValues: Action.Kind.allCases.map { ($0, 0) })
        for action in actions { counts[action.kind, default: 0] += 1 }
        return counts
    }
}
