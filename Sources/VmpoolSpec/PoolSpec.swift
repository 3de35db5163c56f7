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
    public var kernel: String
    public var initrd: String?
    public var cmdline: String?

    public init(kernel: String, initrd: String? = nil, cmdline: String? = nil) {
        self.kernel = kernel
        self.initrd = initrd
        self.cmdline = cmdline
    }
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

    public init(
        name: String, labels: [String: String] = [:], size: Int, vcpus: Int, memoryMiB: Int,
        maxVcpus: Int? = nil, maxMemoryMiB: Int? = nil, boot: BootMode = .cold,
        state: DesiredState = .running, warm: Int = 0, image: ImageSpec? = nil
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
    }

    /// Every VM of the pool, serving and warm.
    public var totalVMs: Int { size + warm }
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
}
