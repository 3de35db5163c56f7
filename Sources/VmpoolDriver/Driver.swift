import VmpoolSpec

/// Identifies one VM to a driver. Drivers derive their own paths from the id.
public struct VMRef: Codable, Sendable, Hashable {
    public var id: String
    public var pool: String
    /// Host process id where the driver runs one (qemu); `nil` for the sim driver.
    public var pid: Int32?

    public init(id: String, pool: String, pid: Int32? = nil) {
        self.id = id
        self.pool = pool
        self.pid = pid
    }
}

/// A saved template VM that clones are restored from.
public struct TemplateRef: Codable, Sendable, Hashable {
    public var id: String
    public var pool: String
    public var key: TemplateKey

    public init(id: String, pool: String, key: TemplateKey) {
        self.id = id
        self.pool = pool
        self.key = key
    }
}

/// What a driver needs to start a VM.
public struct LaunchRequest: Sendable {
    public var id: String
    public var pool: String
    public var shape: VMShape
    /// The state the VM must be in when the call returns; paused VMs are booted, then paused.
    public var state: DesiredState

    public init(id: String, pool: String, shape: VMShape, state: DesiredState) {
        self.id = id
        self.pool = pool
        self.shape = shape
        self.state = state
    }
}

/// A VM as a driver started it.
public struct LaunchedVM: Sendable, Hashable {
    public var pid: Int32?
    public var shape: VMShape

    public init(pid: Int32?, shape: VMShape) {
        self.pid = pid
        self.shape = shape
    }
}

/// What the hypervisor says about a VM, regardless of what the store believes.
public struct VMStatus: Sendable, Hashable {
    public enum Liveness: String, Sendable, Hashable {
        /// The process runs and the hypervisor answers.
        case alive
        /// No such VM, or its process is gone.
        case gone
        /// The process runs but does not answer its control channel.
        case hung
    }

    public var liveness: Liveness
    /// `running` or `paused` as the hypervisor reports it; `nil` when not alive.
    public var running: Bool?
    /// The guest agent answered (only asked of running VMs; paused VMs cannot answer).
    public var agentAnswers: Bool?
    /// CPUs and memory the hypervisor has plugged, when it can tell.
    public var vcpus: Int?
    public var memoryMiB: Int?

    public init(
        liveness: Liveness, running: Bool? = nil, agentAnswers: Bool? = nil, vcpus: Int? = nil,
        memoryMiB: Int? = nil
    ) {
        self.liveness = liveness
        self.running = running
        self.agentAnswers = agentAnswers
        self.vcpus = vcpus
        self.memoryMiB = memoryMiB
    }

    public static let gone = VMStatus(liveness: .gone)
}

/// A hypervisor process or VM the driver finds on the host for this state dir.
public struct DiscoveredVM: Sendable, Hashable {
    public var id: String
    public var pid: Int32?

    public init(id: String, pid: Int32?) {
        self.id = id
        self.pid = pid
    }
}

/// The hypervisor seam: every operation the reconciler needs, nothing about how.
///
/// Implementations must make each call all-or-nothing from the caller's point of view: a
/// `create` that throws leaves no process, socket or file behind; a `stop` of a VM that is
/// already gone succeeds.
public protocol HypervisorDriver: Sendable {
    /// `qemu` or `sim`, as shown to users.
    var name: String { get }

    /// Boots a VM from its kernel and waits until its guest agent answers.
    func create(_ request: LaunchRequest) async throws(DriverError) -> LaunchedVM
    /// Boots a VM to be a template, saves it, and stops it; its memory file stays for clones.
    func buildTemplate(_ template: TemplateRef) async throws(DriverError)
    /// Restores a VM from a template and waits until its agent answers (clock and RNG refreshed).
    /// When a standby was prestarted under `request.id`, it is used instead of starting anew.
    func clone(_ request: LaunchRequest, from template: TemplateRef) async throws(DriverError) -> LaunchedVM
    /// Starts a standby for a template: the hypervisor process of a future clone, waiting with
    /// nothing restored yet, so that `clone` under the same id skips the hypervisor's start-up
    /// (Kata's VM cache). Returns its process id, where there is a process.
    func prestart(id: String, pool: String, from template: TemplateRef) async throws(DriverError) -> Int32?
    func pause(_ vm: VMRef) async throws(DriverError)
    /// Resumes a paused VM and refreshes its clock.
    func resume(_ vm: VMRef) async throws(DriverError)
    /// Plugs CPUs until the guest has `vcpus` online.
    func hotplugCPUs(_ vm: VMRef, shape: VMShape, to vcpus: Int) async throws(DriverError)
    /// Plugs memory until the guest has `memoryMiB` online.
    func hotplugMemory(_ vm: VMRef, shape: VMShape, to memoryMiB: Int) async throws(DriverError)
    /// Stops a VM and removes everything it left; succeeds when it is already gone.
    func stop(_ vm: VMRef) async throws(DriverError)
    /// Removes a template's saved state; succeeds when it is already gone.
    func deleteTemplate(_ template: TemplateRef) async throws(DriverError)
    /// Whether a template's saved state is present and usable.
    func templateExists(_ template: TemplateRef) async -> Bool
    /// The hypervisor's view of each VM, keyed by id.
    func status(of vms: [VMRef]) async -> [String: VMStatus]
    /// VMs this driver started for this state dir, whether or not the store knows them.
    func discover() async -> [DiscoveredVM]
    /// Ids of the templates whose saved state this driver finds for this state dir.
    func discoverTemplates() async -> [String]
}

/// Why a driver operation failed.
public struct DriverError: Error, Sendable, CustomStringConvertible {
    /// Stable failure kinds; tests compare these, not messages.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Kind: String, Hashable, Sendable {
            case launchFailed, timeout, protocolError, notFound, invalidState, limitExceeded, injectedFault
            case imageMissing, hostUnsupported, io
        }
        private let kind: Kind
        private init(_ kind: Kind) { self.kind = kind }

        /// The hypervisor process did not start.
        public static let launchFailed = Code(.launchFailed)
        /// The hypervisor or the guest agent did not answer in time.
        public static let timeout = Code(.timeout)
        /// The control channel answered something unexpected or an error.
        public static let protocolError = Code(.protocolError)
        /// No such VM or template.
        public static let notFound = Code(.notFound)
        /// The operation is not legal in the VM's current state (resume of a running VM).
        public static let invalidState = Code(.invalidState)
        /// A hotplug beyond the VM's ceiling.
        public static let limitExceeded = Code(.limitExceeded)
        /// The sim driver failed the operation on purpose (`VMPOOL_SIM_FAIL`).
        public static let injectedFault = Code(.injectedFault)
        /// A kernel or initrd file is missing: retrying will not help until the pool changes.
        public static let imageMissing = Code(.imageMissing)
        /// The host lacks something the driver needs (QEMU not installed).
        public static let hostUnsupported = Code(.hostUnsupported)
        /// A file or socket operation failed.
        public static let io = Code(.io)

        public var description: String { kind.rawValue }
    }

    public var code: Code
    public var message: String
    public var vm: String?

    public init(_ code: Code, _ message: String, vm: String? = nil) {
        self.code = code
        self.message = message
        self.vm = vm
    }

    /// Errors no retry can fix; the reconciler stops retrying the pool until its spec changes.
    public var isTerminal: Bool { code == .imageMissing || code == .hostUnsupported }

    public var description: String { vm.map { "\($0): \(message)" } ?? message }
}
