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

    public init(mode: NetworkMode = .user, ports: [Int] = [], bridge: String? = nil, subnet: String? = nil) {
        self.mode = mode
        self.ports = ports
        self.bridge = bridge
        self.subnet = subnet
    }

    /// The default bridge name.
    public static let defaultBridge = "vmpool0"
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

    public init(
        name: String, labels: [String: String] = [:], size: Int, vcpus: Int, memoryMiB: Int,
        maxVcpus: Int? = nil, maxMemoryMiB: Int? = nil, boot: BootMode = .cold,
        state: DesiredState = .running, warm: Int = 0, image: ImageSpec? = nil, disks: [DiskSpec] = [],
        network: NetworkSpec? = nil, placement: Placement = .spread
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
    }

    /// Every VM of the pool, serving and warm.
    public var totalVMs: Int { size + warm }

    /// The NIC the VMs have, if any.
    public var nic: NetworkSpec? { network?.mode == NetworkMode.none ? nil : network }

    enum CodingKeys: String, CodingKey {
        case name, labels, size, vcpus, memoryMiB, maxVcpus, maxMemoryMiB, boot, state, warm, image, disks, network
        case placement
    }

    /// Reads specs stored before disks, network and placement existed as having none.
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
}
