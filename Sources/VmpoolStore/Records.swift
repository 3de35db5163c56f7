import Foundation
import VmpoolDriver
import VmpoolSpec

/// A pool as last applied.
public struct StoredPool: Sendable, Hashable {
    public var spec: PoolSpec
    /// Bumped each time an apply changes the spec; VMs remember the generation they were made for.
    public var generation: Int
    public var updatedAt: Date
    /// A delete or prune of this pool started and has not finished.
    public var deleting: Bool

    public init(spec: PoolSpec, generation: Int, updatedAt: Date, deleting: Bool = false) {
        self.spec = spec
        self.generation = generation
        self.updatedAt = updatedAt
        self.deleting = deleting
    }
}

/// A VM as vmpool recorded it.
public struct VMRecord: Sendable, Hashable {
    public var id: String
    public var pool: String
    public var state: VMState
    public var boot: BootMode
    public var shape: VMShape
    public var pid: Int32?
    public var templateID: String?
    public var createdAt: Date
    public var updatedAt: Date
    public var lastError: String?
    /// What the VM's NIC was given (ports forwarded, address); `nil` without a NIC.
    public var network: NetworkAssignment?
    /// Who holds the VM, when it is leased: it no longer counts toward its pool.
    public var lease: Lease?
    /// The host that runs it; empty on a single-host store.
    public var host: String
    /// Set when someone entered the VM (`exec`, `cp`, `console`) while it was not leased: it
    /// is never leased after that, and the next pass replaces it.
    public var entered: Entry?

    /// Who entered a VM, and when.
    public struct Entry: Sendable, Hashable {
        /// The command: exec, cp or console.
        public var by: String
        public var at: Date

        public init(by: String, at: Date) {
            self.by = by
            self.at = at
        }
    }

    public init(
        id: String, pool: String, state: VMState, boot: BootMode, shape: VMShape, pid: Int32? = nil,
        templateID: String? = nil, createdAt: Date, updatedAt: Date? = nil, lastError: String? = nil,
        network: NetworkAssignment? = nil, lease: Lease? = nil, host: String = "", entered: Entry? = nil
    ) {
        self.host = host
        self.entered = entered
        self.network = network
        self.lease = lease
        self.id = id
        self.pool = pool
        self.state = state
        self.boot = boot
        self.shape = shape
        self.pid = pid
        self.templateID = templateID
        self.createdAt = createdAt
        self.updatedAt = updatedAt ?? createdAt
        self.lastError = lastError
    }

    public var ref: VMRef { VMRef(id: id, pool: pool, pid: pid) }
}

/// A pool's template as recorded.
public struct TemplateRecord: Sendable, Hashable {
    public enum State: String, Sendable, Hashable {
        /// Recorded before the build started; not usable.
        case building
        case ready
    }

    public var ref: TemplateRef
    public var state: State
    /// When the build was recorded, before it started.
    public var createdAt: Date
    /// When its state was saved and it became ready; `nil` while it is building.
    public var savedAt: Date?

    public init(ref: TemplateRef, state: State, createdAt: Date, savedAt: Date? = nil) {
        self.ref = ref
        self.state = state
        self.createdAt = createdAt
        self.savedAt = savedAt
    }
}

/// One driver call, written before the call and closed after it.
public struct JournalEntry: Sendable, Hashable {
    public enum Outcome: String, Sendable, Hashable {
        case ok
        case failed
        /// A later pass found it unfinished and finished or undid it.
        case recovered
    }

    public var id: Int64
    public var operation: String
    public var pool: String
    public var vm: String?
    public var template: String?
    public var startedAt: Date
    public var finishedAt: Date?
    public var outcome: Outcome?
    public var error: String?
    /// The vmpool process that made the call.
    public var ownerPID: Int32
}

/// Something that happened to a pool or VM, kept for `vmpool` users to read back.
public struct Event: Sendable, Hashable {
    /// The store's sequence number (set on events read back).
    public var id: Int64?
    public var at: Date
    public var pool: String
    public var vm: String?
    public var kind: String
    public var message: String

    public init(at: Date = Date(), pool: String, vm: String? = nil, kind: String, message: String) {
        self.at = at
        self.pool = pool
        self.vm = vm
        self.kind = kind
        self.message = message
    }
}

/// Why a store operation failed.
public struct StoreError: Error, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Kind: String, Hashable, Sendable {
            case stateDir, database, locked, corrupt, exhausted, notFound, conflict, newerSchema, badLocation,
                unavailable, fenced
        }
        private let kind: Kind
        private init(_ kind: Kind) { self.kind = kind }

        /// The state dir cannot be created or has the wrong owner or mode.
        public static let stateDir = Code(.stateDir)
        /// The database failed a statement.
        public static let database = Code(.database)
        /// The cluster declared this host dead; it must rejoin before it writes again.
        public static let fenced = Code(.fenced)
        /// `--store` does not name a store vmpool can use.
        public static let badLocation = Code(.badLocation)
        /// The database cannot be reached, or did not answer in time.
        public static let unavailable = Code(.unavailable)
        /// Another vmpool holds the state dir lock past the timeout.
        public static let locked = Code(.locked)
        /// A stored row cannot be decoded.
        public static let corrupt = Code(.corrupt)
        /// Nothing is left to allocate (host ports, addresses).
        public static let exhausted = Code(.exhausted)
        /// No such VM, pool or lease.
        public static let notFound = Code(.notFound)
        /// The store was written by a newer vmpool.
        public static let newerSchema = Code(.newerSchema)
        /// The change contradicts the store's state (a VM leased already, not leased).
        public static let conflict = Code(.conflict)

        public var description: String { kind.rawValue }
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }
}

/// A hypervisor process started ahead of a clone, waiting for a template's state.
public struct StandbyRecord: Sendable, Hashable {
    public var id: String
    public var pool: String
    public var template: String
    public var pid: Int32?
    /// Started and waiting; a standby recorded but not ready was interrupted while starting.
    public var ready: Bool
    public var createdAt: Date

    public var ref: VMRef { VMRef(id: id, pool: pool, pid: pid) }
}

/// A VM handed to one consumer (`vmpool lease`).
public struct Lease: Codable, Sendable, Hashable {
    public var holder: String
    public var leasedAt: Date
    /// When the next pass releases it (stops the VM); `nil`: never by itself.
    public var expiresAt: Date?

    public init(holder: String, leasedAt: Date, expiresAt: Date?) {
        self.holder = holder
        self.leasedAt = leasedAt
        self.expiresAt = expiresAt
    }
}

/// What a VM about to launch needs allocated with its record.
public struct NetworkRequest: Sendable, Hashable {
    public var mode: NetworkMode
    /// Guest ports to forward from 127.0.0.1 (user mode).
    public var ports: [Int]
    public var bridge: String?
    public var subnet: IPv4Subnet?

    public init(_ shape: NetworkShape) {
        mode = shape.mode
        ports = shape.ports
        bridge = shape.bridge
        subnet = shape.subnet.flatMap(IPv4Subnet.init)
    }
}
