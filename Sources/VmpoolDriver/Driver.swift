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
    /// What the VM's NIC was given (recorded before the call).
    public var network: NetworkAssignment?
    /// What names the launch before the VM has an id: the pool and the VM's place in it
    /// (the sim driver's reproducible faults are keyed by it).
    public var slot: String
    /// The pool's egress, isolation and limits as they are when the VM starts. They are not
    /// part of `shape`: a pool whose walls change keeps its VMs, and the driver applies the
    /// new walls to them in place.
    public var walls: Walls

    public init(
        id: String, pool: String, shape: VMShape, state: DesiredState, network: NetworkAssignment? = nil,
        slot: String? = nil, walls: Walls = Walls()
    ) {
        self.id = id
        self.pool = pool
        self.shape = shape
        self.state = state
        self.network = network
        self.slot = slot ?? id
        self.walls = walls
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

    /// Whether the guest agent answered, when it was asked.
    public enum Agent: Sendable, Hashable {
        case answers
        /// Another client holds the agent's channel: not a sign of a dead guest.
        case busy
        case silent
    }

    public var liveness: Liveness
    /// `running` or `paused` as the hypervisor reports it; `nil` when not alive.
    public var running: Bool?
    /// The guest agent's answer (only asked of running VMs at `.guest` depth; paused VMs cannot answer).
    public var agent: Agent?
    /// CPUs and memory the VM has: what the guest has online where the agent told (`.guest`),
    /// else what the hypervisor plugged, when it can tell.
    public var vcpus: Int?
    public var memoryMiB: Int?
    /// Why the hypervisor stopped the VM on its own (an I/O error, a guest panic): the VM is
    /// not paused but broken, whatever `running` says.
    public var fault: String?

    public init(
        liveness: Liveness, running: Bool? = nil, agent: Agent? = nil, vcpus: Int? = nil, memoryMiB: Int? = nil,
        fault: String? = nil
    ) {
        self.liveness = liveness
        self.running = running
        self.agent = agent
        self.vcpus = vcpus
        self.memoryMiB = memoryMiB
        self.fault = fault
    }

    public static let gone = VMStatus(liveness: .gone)
}

/// How far a status query reaches.
public enum StatusDepth: Sendable, Hashable {
    /// Process and hypervisor only, through an observer's channel: what `get` and `plan` use,
    /// never disturbing a running apply.
    case hypervisor
    /// Also the guest agent: CPUs and memory the guest has online, and whether it answers.
    case guest
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
    /// Stops a VM and removes everything it left (its process, files, tap device); succeeds
    /// when it is already gone.
    func stop(_ vm: VMRef) async throws(DriverError)
    /// Removes a template's saved state (by id alone, so that recovery can remove state that
    /// has no record); succeeds when it is already gone.
    func deleteTemplate(id: String) async throws(DriverError)
    /// Whether a template's saved state is present and usable.
    func templateExists(_ template: TemplateRef) async -> Bool
    /// Makes what VMs of `shape`'s network need on the host (bridge mode: the bridge, with the
    /// subnet's first address); returns whether something was made now, so that it is removed
    /// when no pool uses it any more.
    func prepareNetwork(_ shape: NetworkShape) async throws(DriverError) -> Bool
    /// Removes a bridge vmpool made.
    func removeBridge(_ name: String) async
    /// The hypervisor's view of each VM, keyed by id. `.guest` also asks each running guest's
    /// agent what it has online; only the holder of the state dir lock asks that, since the
    /// agent's channel is its own. `.hypervisor` uses only channels that observers may share.
    func status(of vms: [VMRef], depth: StatusDepth) async -> [String: VMStatus]
    /// VMs this driver started for this state dir, whether or not the store knows them.
    func discover() async -> [DiscoveredVM]
    /// Ids of the templates whose saved state this driver finds for this state dir.
    func discoverTemplates() async -> [String]
    /// Puts every VM that runs behind its pool's walls (SPEC §10), as `policies` say now: the
    /// reconciler calls it at every pass, so a change of a pool's egress reaches running VMs.
    /// `bridges` are this store's bridges and their subnets.
    func confinement(of vm: VMRef) async -> [(String, String)]
    func applyWalls(_ policies: [WallPolicy], members: [WallMember], bridges: [String: String])
        async throws(DriverError)
}

extension HypervisorDriver {
    /// What confines a running VM's process, for `describe vm`: each line a name and what it
    /// is (the user it runs as, its sandbox, its cgroup's limits). Empty where nothing does.
    public func confinement(of vm: VMRef) async -> [(String, String)] { [] }

    /// Drivers without guests (sim) have nothing to wall in.
    public func applyWalls(_ policies: [WallPolicy], members: [WallMember], bridges: [String: String])
        async throws(DriverError)
    {}
}

/// Why a driver operation failed.
public struct DriverError: Error, Sendable, CustomStringConvertible {
    /// Stable failure kinds; tests compare these, not messages.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Kind: String, Hashable, Sendable {
            case launchFailed, timeout, protocolError, notFound, invalidState, limitExceeded, injectedFault
            case imageMissing, hostUnsupported, io, busy, cancelled, processExited, setupFailed
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
        /// Another client holds a channel that serves one at a time; not a sign of a dead VM.
        public static let busy = Code(.busy)
        /// The operation was interrupted (shutdown, `--timeout`) and undone.
        public static let cancelled = Code(.cancelled)
        /// The VM's hypervisor process exited under the operation; the next pass replaces the VM.
        public static let processExited = Code(.processExited)
        /// A step of the pool's preparation (a file copy, a setup command) failed in the guest.
        public static let setupFailed = Code(.setupFailed)

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

/// A command to run in a guest (`vmpool exec`): an argument vector, never a shell line.
public struct ExecRequest: Sendable {
    public var argv: [String]
    /// `KEY=VALUE` pairs added to the guest's default environment.
    public var environment: [String]
    /// Working directory in the guest; `nil`: `/`.
    public var directory: String?
    /// Forward the caller's standard input.
    public var stdin: Bool
    /// A pseudo-terminal of this size (rows, columns); `nil`: pipes, stdout and stderr apart.
    public var tty: (rows: Int, columns: Int)?
    /// Kill the command (SIGKILL) after this long.
    public var timeout: Duration?

    public init(
        argv: [String], environment: [String] = [], directory: String? = nil, stdin: Bool = false,
        tty: (rows: Int, columns: Int)? = nil, timeout: Duration? = nil
    ) {
        self.argv = argv
        self.environment = environment
        self.directory = directory
        self.stdin = stdin
        self.tty = tty
        self.timeout = timeout
    }
}

/// Where a guest command's streams go on the host: file descriptors the caller owns.
public struct ExecStreams: Sendable {
    public var stdin: Int32
    public var stdout: Int32
    public var stderr: Int32

    public init(stdin: Int32 = 0, stdout: Int32 = 1, stderr: Int32 = 2) {
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
    }
}

/// How a guest command ended.
public enum ExecOutcome: Sendable, Hashable {
    case exited(Int32)
    case signalled(Int32)
    /// It could not run: 126 (not executable), 127 (not found), 125 (the agent failed).
    case notRun(code: Int32, message: String)
    /// Killed at its `timeout`.
    case timedOut

    /// The exit status `vmpool exec` reports, as `docker exec` does.
    public var exitStatus: Int32 {
        switch self {
        case .exited(let code): code
        case .signalled(let signal): 128 + signal
        case .notRun(let code, _): code
        case .timedOut: 128 + 9
        }
    }
}

/// What is inside a VM: commands through the guest agent, the serial console's output, the
/// interactive console. A driver without guests (sim) does not conform.
public protocol GuestAccess: Sendable {
    /// Runs `request` in the running VM `vm`, streaming its output to `streams` as it comes.
    func exec(_ vm: VMRef, _ request: ExecRequest, streams: ExecStreams) async throws(DriverError) -> ExecOutcome
    /// The serial console's output kept on disk (bounded), after taking in what is new.
    func consoleLog(_ vm: VMRef) async throws(DriverError) -> [UInt8]
    /// Takes in the serial console's new output and returns it (for `logs --follow`).
    func consoleDrain(_ vm: VMRef) async throws(DriverError) -> [UInt8]
    /// Connects `streams` to the VM's interactive console until `detach` is read from
    /// `streams.stdin` or the VM goes away.
    func attachConsole(_ vm: VMRef, streams: ExecStreams, detach: UInt8) async throws(DriverError)
    /// The host file holding the output of the setup steps of template `id` (or, when
    /// `template` is false, of the cold VM `id`), if it has one.
    func setupLog(of id: String, template: Bool) -> String?
    /// The host file holding template `id`'s serial console output up to its save (the boot
    /// its clones share but never print themselves), if it has one.
    func bootLog(ofTemplate id: String) -> String?
}
