import VmpoolSpec

/// The concrete boot image of a VM: paths resolved, default filled in.
public struct BootImage: Codable, Sendable, Hashable {
    public var kernel: String
    public var initrd: String?
    public var cmdline: String

    public init(kernel: String, initrd: String?, cmdline: String) {
        self.kernel = kernel
        self.initrd = initrd
        self.cmdline = cmdline
    }
}

/// Everything that decides what a VM is, apart from its run state.
public struct VMShape: Codable, Sendable, Hashable {
    public var vcpus: Int
    public var memoryMiB: Int
    public var maxVcpus: Int
    public var maxMemoryMiB: Int
    public var image: BootImage

    public init(vcpus: Int, memoryMiB: Int, maxVcpus: Int, maxMemoryMiB: Int, image: BootImage) {
        self.vcpus = vcpus
        self.memoryMiB = memoryMiB
        self.maxVcpus = maxVcpus
        self.maxMemoryMiB = maxMemoryMiB
        self.image = image
    }

    /// The shape a pool asks for, given its resolved image.
    public init(pool: PoolSpec, image: BootImage) {
        self.init(
            vcpus: pool.vcpus, memoryMiB: pool.memoryMiB, maxVcpus: pool.maxVcpus,
            maxMemoryMiB: pool.maxMemoryMiB, image: image)
    }

    /// Two shapes a template clone can be made between: everything but hotplugged amounts.
    public var templateKey: TemplateKey {
        TemplateKey(
            vcpus: vcpus, memoryMiB: memoryMiB, maxVcpus: maxVcpus, maxMemoryMiB: maxMemoryMiB, image: image)
    }
}

/// What a template must match to serve a pool: clones inherit all of it.
public struct TemplateKey: Codable, Sendable, Hashable {
    public var vcpus: Int
    public var memoryMiB: Int
    public var maxVcpus: Int
    public var maxMemoryMiB: Int
    public var image: BootImage

    public init(vcpus: Int, memoryMiB: Int, maxVcpus: Int, maxMemoryMiB: Int, image: BootImage) {
        self.vcpus = vcpus
        self.memoryMiB = memoryMiB
        self.maxVcpus = maxVcpus
        self.maxMemoryMiB = maxMemoryMiB
        self.image = image
    }

    /// The shape of the template VM itself (and of a clone before any hotplug).
    public var shape: VMShape {
        VMShape(vcpus: vcpus, memoryMiB: memoryMiB, maxVcpus: maxVcpus, maxMemoryMiB: maxMemoryMiB, image: image)
    }
}

/// The run state of a VM as vmpool records it.
public enum VMState: String, Codable, Sendable, CaseIterable {
    /// Recorded before the hypervisor process starts; not yet answering.
    case creating
    case running
    case paused
    /// A stop was started and has not been confirmed.
    case stopping
    /// The VM died, or an operation on it failed and left it unusable.
    case failed
}
