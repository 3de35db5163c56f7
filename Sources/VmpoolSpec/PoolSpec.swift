/// How a pool's VMs come to life.
public enum BootMode: String, Codable, Sendable, CaseIterable {
    /// Each VM boots its kernel from scratch: slow, no shared memory.
    case cold
    /// Each VM is restored from a saved template VM whose memory it maps copy-on-write.
    case template
}

/// The run state a pool's serving VMs must be in.
public enum DesiredState: String, Codable, Sendable, CaseIterable {
    case running
    case paused
}

/// The kernel, initrd and command line a pool's VMs boot.
///
/// `nil` fields in a pool spec mean "the default guest image"; the reconciler resolves
/// them to concrete paths before a VM is created, so that a changed default image is a
/// visible change of shape.
public struct ImageSpec: Codable, Sendable, Hashable {
    /// `nil`: the default guest image's kernel and initrd (with this spec's cmdline, e.g. to
    /// boot a root disk with `root=/dev/vda`).
    public var kernel: String?
    public var initrd: String?
    public var cmdline: String?

    public init(kernel: String?, initrd: String? = nil, cmdline: String? = nil) {
        self.kernel = kernel
        self.initrd = initrd
        self.cmdline = cmdline
    }
}

/// A virtio disk of every VM of a pool: the VM writes to its own copy-on-write overlay.
public struct DiskSpec: Codable, Sendable, Hashable {
    /// `^[a-z0-9-]{1,32}$`, unique in the pool.
    public var name: String
    /// Base image (qcow2 or raw), absolute; never written. `nil`: an empty disk.
    public var image: String?
    /// Virtual size in MiB; at least the image's. `nil`: the image's own size.
    public var sizeMiB: Int?

    public init(name: String, image: String? = nil, sizeMiB: Int? = nil) {
        self.name = name
        self.image = image
        self.sizeMiB = sizeMiB
    }
}

/// How a pool's VMs reach and are reached.
public enum NetworkMode: String, Codable, Sendable, CaseIterable {
    /// QEMU user-mode networking; guest ports forwarded from 127.0.0.1.
    case user
    /// A tap per VM on a Linux bridge, an address per VM from the subnet.
    case bridge
    /// No NIC.
    case none
}

/// A pool's network as the manifest asks for it.
public struct NetworkSpec: Codable, Sendable, Hashable {
    public var mode: NetworkMode
    /// Guest TCP ports forwarded from a free 127.0.0.1 port each (user mode).
    public var ports: [Int]
    /// The bridge's name (bridge mode).
    public var bridge: String?
    /// IPv4 CIDR the VMs' addresses come from (bridge mode).
    public var subnet: String?
    /// Where the VMs may connect to (user and bridge mode); applied in place, never a replace.
    public var egress: EgressPolicy
    /// Bridge mode: the VMs do not reach each other either. Applied in place.
    public var isolate: Bool

    public init(
        mode: NetworkMode = .user, ports: [Int] = [], bridge: String? = nil, subnet: String? = nil,
        egress: EgressPolicy = .all, isolate: Bool = false
    ) {
        self.mode = mode
        self.ports = ports
        self.bridge = bridge
        self.subnet = subnet
        self.egress = egress
        self.isolate = isolate
    }

    /// The default bridge name.
    public static let defaultBridge = "vmpool0"

    enum CodingKeys: String, CodingKey { case mode, ports, bridge, subnet, egress, isolate }

    /// Reads specs stored before egress and isolate existed as having the defaults.
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        mode = try c.decode(NetworkMode.self, forKey: .mode)
        ports = try c.decode([Int].self, forKey: .ports)
        bridge = try c.decodeIfPresent(String.self, forKey: .bridge)
        subnet = try c.decodeIfPresent(String.self, forKey: .subnet)
        egress = try c.decodeIfPresent(EgressPolicy.self, forKey: .egress) ?? .all
        isolate = try c.decodeIfPresent(Bool.self, forKey: .isolate) ?? false
    }

    /// Defaults are left out, so that a spec that does not use a field stores as it did before
    /// the field existed (the store compares stored specs as text).
    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(mode, forKey: .mode)
        try c.encode(ports, forKey: .ports)
        try c.encodeIfPresent(bridge, forKey: .bridge)
        try c.encodeIfPresent(subnet, forKey: .subnet)
        if egress != .all { try c.encode(egress, forKey: .egress) }
        if isolate { try c.encode(isolate, forKey: .isolate) }
    }
}

/// A host file or directory copied into the template VM (or each cold VM) before setup runs.
public struct TemplateFile: Codable, Sendable, Hashable {
    /// Host path, absolute (a manifest's relative path is resolved against its directory).
    public var src: String
    /// Absolute guest path the file or directory is copied to (its parents are made).
    public var dst: String

    public init(src: String, dst: String) {
        self.src = src
        self.dst = dst
    }
}

/// One setup command, run in the guest; it must exit 0.
public struct SetupStep: Codable, Sendable, Hashable {
    /// The argument vector; a string step of the manifest is `/bin/sh -c LINE`.
    public var argv: [String]

    public init(argv: [String]) {
        self.argv = argv
    }

    /// A string step: `line` under `/bin/sh -c`.
    public init(shell line: String) {
        self.argv = ["/bin/sh", "-c", line]
    }

    /// The step as the manifest wrote it, for messages.
    public var display: String {
        if argv.count == 3, argv[0] == "/bin/sh", argv[1] == "-c" { return argv[2] }
        return argv.joined(separator: " ")
    }
}

/// What must hold before a template's memory is saved, and in each VM before it counts as
/// ready: a command that exits 0, a guest TCP port that accepts a connection, or both.
public struct ReadyCheck: Codable, Sendable, Hashable {
    public var exec: SetupStep?
    public var port: Int?
    /// How long the check may take to hold, seconds.
    public var timeoutSeconds: Int

    public init(exec: SetupStep? = nil, port: Int? = nil, timeoutSeconds: Int = ReadyCheck.defaultTimeoutSeconds) {
        self.exec = exec
        self.port = port
        self.timeoutSeconds = timeoutSeconds
    }

    public static let defaultTimeoutSeconds = 300
}

/// How a pool's VMs are prepared and how its template serves its clones (SPEC §11). `files`,
/// `setup` and `ready` run in the template VM before its memory is saved, or in each VM of a
/// pool that boots cold; `shareMemory` is for `boot: template` only.
public struct TemplateSpec: Codable, Sendable, Hashable {
    /// Clones map the template's memory copy-on-write (the default); `false`: each clone gets a
    /// private copy, so no page is shared between VMs. Changing it replaces the clones, not
    /// the template.
    public var shareMemory: Bool
    /// Copied in first, in order.
    public var files: [TemplateFile]
    /// Run in order after the files; each must exit 0.
    public var setup: [SetupStep]
    /// Must hold before the save and in each VM before it is ready.
    public var ready: ReadyCheck?

    public init(
        shareMemory: Bool = true, files: [TemplateFile] = [], setup: [SetupStep] = [], ready: ReadyCheck? = nil
    ) {
        self.shareMemory = shareMemory
        self.files = files
        self.setup = setup
        self.ready = ready
    }

    /// Every field at its default.
    public var isDefault: Bool { self == TemplateSpec() }

    /// Whether the VMs are prepared at all (files, setup or a ready check).
    public var prepares: Bool { !files.isEmpty || !setup.isEmpty || ready != nil }

    enum CodingKeys: String, CodingKey { case shareMemory, files, setup, ready }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        shareMemory = try c.decodeIfPresent(Bool.self, forKey: .shareMemory) ?? true
        files = try c.decodeIfPresent([TemplateFile].self, forKey: .files) ?? []
        setup = try c.decodeIfPresent([SetupStep].self, forKey: .setup) ?? []
        ready = try c.decodeIfPresent(ReadyCheck.self, forKey: .ready)
    }

    /// Files, setup and ready are left out when empty, so that a spec that does not use them
    /// stores as it did before they existed.
    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(shareMemory, forKey: .shareMemory)
        if !files.isEmpty { try c.encode(files, forKey: .files) }
        if !setup.isEmpty { try c.encode(setup, forKey: .setup) }
        try c.encodeIfPresent(ready, forKey: .ready)
    }
}

/// Where a pool's VMs go when several hosts share one store.
public enum Placement: String, Codable, Sendable, CaseIterable {
    /// Across hosts, evenly.
    case spread
    /// Onto as few hosts as fit.
    case pack
}

/// One pool as a manifest asks for it, with every default filled in.
public struct PoolSpec: Codable, Sendable, Hashable {
    public var name: String
    public var labels: [String: String]
    /// VMs that must exist and be in `state`.
    public var size: Int
    public var vcpus: Int
    public var memoryMiB: Int
    /// Ceiling for CPU hotplug; VMs are started with this many possible CPUs.
    public var maxVcpus: Int
    /// Ceiling for memory hotplug; VMs are started with this much addressable memory.
    public var maxMemoryMiB: Int
    public var boot: BootMode
    public var state: DesiredState
    /// Extra VMs kept booted and paused, resumed first when the pool grows.
    public var warm: Int
    /// `nil` means the default guest image.
    public var image: ImageSpec?
    /// Virtio disks, in order (vda, vdb, ...).
    public var disks: [DiskSpec]
    /// `nil`: no NIC (as `mode: none`).
    public var network: NetworkSpec?
    public var placement: Placement
    /// Lowered per-VM resource limits; applied in place, never a replace.
    public var limits: ResourceLimits
    /// The template's options (`boot: template` only; the defaults otherwise).
    public var template: TemplateSpec

    public init(
        name: String, labels: [String: String] = [:], size: Int, vcpus: Int, memoryMiB: Int,
        maxVcpus: Int? = nil, maxMemoryMiB: Int? = nil, boot: BootMode = .cold,
        state: DesiredState = .running, warm: Int = 0, image: ImageSpec? = nil, disks: [DiskSpec] = [],
        network: NetworkSpec? = nil, placement: Placement = .spread, limits: ResourceLimits = ResourceLimits(),
        template: TemplateSpec = TemplateSpec()
    ) {
        self.name = name
        self.labels = labels
        self.size = size
        self.vcpus = vcpus
        self.memoryMiB = memoryMiB
        self.maxVcpus = maxVcpus ?? vcpus
        self.maxMemoryMiB = maxMemoryMiB ?? memoryMiB
        self.boot = boot
        self.state = state
        self.warm = warm
        self.image = image
        self.disks = disks
        self.network = network
        self.placement = placement
        self.limits = limits
        self.template = template
    }

    /// Every VM of the pool, serving and warm.
    public var totalVMs: Int { size + warm }

    /// The NIC the VMs have, if any.
    public var nic: NetworkSpec? { network?.mode == NetworkMode.none ? nil : network }

    /// What the driver fences each VM in with beyond its shape; none of it replaces a VM when
    /// it changes. A VM without a NIC has no egress.
    public var walls: Walls {
        Walls(egress: nic?.egress ?? EgressPolicy.none, isolate: nic?.isolate ?? false, limits: limits)
    }

    /// Whether clones map the template's memory (always, for pools that boot cold).
    public var sharesTemplateMemory: Bool { boot != .template || template.shareMemory }

    enum CodingKeys: String, CodingKey {
        case name, labels, size, vcpus, memoryMiB, maxVcpus, maxMemoryMiB, boot, state, warm, image, disks, network
        case placement, limits, template
    }

    /// Reads specs stored before disks, network, placement, limits and template existed as
    /// having none.
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        labels = try c.decode([String: String].self, forKey: .labels)
        size = try c.decode(Int.self, forKey: .size)
        vcpus = try c.decode(Int.self, forKey: .vcpus)
        memoryMiB = try c.decode(Int.self, forKey: .memoryMiB)
        maxVcpus = try c.decode(Int.self, forKey: .maxVcpus)
        maxMemoryMiB = try c.decode(Int.self, forKey: .maxMemoryMiB)
        boot = try c.decode(BootMode.self, forKey: .boot)
        state = try c.decode(DesiredState.self, forKey: .state)
        warm = try c.decode(Int.self, forKey: .warm)
        image = try c.decodeIfPresent(ImageSpec.self, forKey: .image)
        disks = try c.decodeIfPresent([DiskSpec].self, forKey: .disks) ?? []
        network = try c.decodeIfPresent(NetworkSpec.self, forKey: .network)
        placement = try c.decodeIfPresent(Placement.self, forKey: .placement) ?? .spread
        limits = try c.decodeIfPresent(ResourceLimits.self, forKey: .limits) ?? ResourceLimits()
        template = try c.decodeIfPresent(TemplateSpec.self, forKey: .template) ?? TemplateSpec()
    }

    /// Limits and template are left out at their defaults, so that a spec that does not use
    /// them stores as it did before they existed (the store compares stored specs as text).
    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(name, forKey: .name)
        try c.encode(labels, forKey: .labels)
        try c.encode(size, forKey: .size)
        try c.encode(vcpus, forKey: .vcpus)
        try c.encode(memoryMiB, forKey: .memoryMiB)
        try c.encode(maxVcpus, forKey: .maxVcpus)
        try c.encode(maxMemoryMiB, forKey: .maxMemoryMiB)
        try c.encode(boot, forKey: .boot)
        try c.encode(state, forKey: .state)
        try c.encode(warm, forKey: .warm)
        try c.encodeIfPresent(image, forKey: .image)
        try c.encode(disks, forKey: .disks)
        try c.encodeIfPresent(network, forKey: .network)
        try c.encode(placement, forKey: .placement)
        if !limits.isEmpty { try c.encode(limits, forKey: .limits) }
        if !template.isDefault { try c.encode(template, forKey: .template) }
    }
}

/// Limits of the manifest format, shared by validation, the schema and the drivers.
public enum SpecLimits {
    public static let maxPoolSize = 1000
    public static let maxWarm = 1000
    public static let maxVcpus = 64
    public static let minMemoryMiB = 64
    /// Seven digits of MiB; enough for any host this tool targets, small enough never to overflow.
    public static let maxMemoryMiB = 9_999_999
    public static let maxMemoryGiB = 9_999
    public static let maxPathLength = 4096
    public static let maxCmdlineLength = 2048
    public static let maxLabelValueLength = 256
    /// Memory hotplug adds whole Linux memory blocks of this size.
    public static let memoryBlockMiB = 128
    /// Disks per pool (virtio-blk devices vda..vdp).
    public static let maxDisks = 16
    /// Disk sizes: 1 MiB to 64 TiB.
    public static let maxDiskMiB = 64 << 20
    /// Forwarded ports per pool.
    public static let maxPorts = 32
    /// Egress rules per pool.
    public static let maxEgressRules = 64
    /// Files, setup steps and arguments of one step or check.
    public static let maxTemplateFiles = 64
    public static let maxSetupSteps = 64
    public static let maxStepArguments = 256
    /// A setup line or argument, in characters (Unicode scalars, as JSON Schema counts).
    public static let maxStepText = 16_384
    /// `template.ready.timeout`: 1 s to 1 h.
    public static let readyTimeoutSeconds = 1...3600
    /// `limits.ioWeight`: cgroup v2 `io.weight`'s range.
    public static let ioWeight = 1...10_000
    /// `limits.cpu`, percent of the VM's vCPUs.
    public static let cpuPercent = 1...100
}
