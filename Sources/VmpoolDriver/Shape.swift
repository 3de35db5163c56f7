import VmpoolSpec

/// The concrete boot image of a VM: paths resolved, default filled in.
public struct BootImage: Codable, Sendable, Hashable {
    public var kernel: String
    public var initrd: String?
    public var cmdline: String
    /// What the files are (size and modification time of kernel and initrd), so that a file
    /// replaced under the same path is a new image; `nil` when not known (sim images).
    public var fingerprint: String?

    public init(kernel: String, initrd: String?, cmdline: String, fingerprint: String? = nil) {
        self.kernel = kernel
        self.initrd = initrd
        self.cmdline = cmdline
        self.fingerprint = fingerprint
    }
}

/// A disk as every VM of a pool gets it: its own copy-on-write overlay over `base`.
public struct DiskShape: Codable, Sendable, Hashable {
    public var name: String
    /// The base image, resolved to its real path; `nil`: an empty disk.
    public var base: String?
    /// `qcow2` or `raw`, as read from the base image.
    public var format: String?
    /// What the base is (size, modification time, inode), so that a changed base is a new disk.
    public var fingerprint: String?
    /// The virtual size, MiB.
    public var sizeMiB: Int

    public init(name: String, base: String?, format: String?, fingerprint: String?, sizeMiB: Int) {
        self.name = name
        self.base = base
        self.format = format
        self.fingerprint = fingerprint
        self.sizeMiB = sizeMiB
    }
}

/// A VM's NIC as the pool asks for it.
public struct NetworkShape: Codable, Sendable, Hashable {
    public var mode: NetworkMode
    /// Guest TCP ports forwarded from 127.0.0.1 (user mode).
    public var ports: [Int]
    public var bridge: String?
    public var subnet: String?

    public init(mode: NetworkMode, ports: [Int] = [], bridge: String? = nil, subnet: String? = nil) {
        self.mode = mode
        self.ports = ports
        self.bridge = bridge
        self.subnet = subnet
    }

    public init?(_ spec: NetworkSpec?) {
        guard let spec, spec.mode != .none else { return nil }
        self.init(mode: spec.mode, ports: spec.ports, bridge: spec.bridge, subnet: spec.subnet)
    }
}

/// Everything that decides what a VM is, apart from its run state.
public struct VMShape: Codable, Sendable, Hashable {
    public var vcpus: Int
    public var memoryMiB: Int
    public var maxVcpus: Int
    public var maxMemoryMiB: Int
    public var image: BootImage
    public var disks: [DiskShape]
    public var network: NetworkShape?
    /// A clone maps its template's memory copy-on-write (`true`, also for VMs that boot cold),
    /// or has a private copy of it (`template.shareMemory: false`). Not part of the template's
    /// key: a change replaces the clones, not the template.
    public var sharesTemplateMemory: Bool
    /// Files, setup and ready check run in the VM (or its template) before it is ready.
    public var preparation: Preparation?

    public init(
        vcpus: Int, memoryMiB: Int, maxVcpus: Int, maxMemoryMiB: Int, image: BootImage, disks: [DiskShape] = [],
        network: NetworkShape? = nil, sharesTemplateMemory: Bool = true, preparation: Preparation? = nil
    ) {
        self.vcpus = vcpus
        self.memoryMiB = memoryMiB
        self.maxVcpus = maxVcpus
        self.maxMemoryMiB = maxMemoryMiB
        self.image = image
        self.disks = disks
        self.network = network
        self.sharesTemplateMemory = sharesTemplateMemory
        self.preparation = preparation
    }

    /// The shape a pool asks for, given its resolved image, disks and preparation. The pool's
    /// walls (egress, isolation, limits) are not part of it: they change in place.
    public init(pool: PoolSpec, image: BootImage, disks: [DiskShape] = [], preparation: Preparation? = nil) {
        self.init(
            vcpus: pool.vcpus, memoryMiB: pool.memoryMiB, maxVcpus: pool.maxVcpus,
            maxMemoryMiB: pool.maxMemoryMiB, image: image, disks: disks, network: NetworkShape(pool.network),
            sharesTemplateMemory: pool.sharesTemplateMemory, preparation: preparation)
    }

    /// Two shapes a template clone can be made between: everything but hotplugged amounts.
    public var templateKey: TemplateKey {
        TemplateKey(
            vcpus: vcpus, memoryMiB: memoryMiB, maxVcpus: maxVcpus, maxMemoryMiB: maxMemoryMiB, image: image,
            disks: disks, network: network, preparation: preparation)
    }

    enum CodingKeys: String, CodingKey {
        case vcpus, memoryMiB, maxVcpus, maxMemoryMiB, image, disks, network, sharesTemplateMemory, preparation
    }

    /// Reads shapes recorded before disks, networks and private template memory existed as
    /// having none (and sharing).
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        vcpus = try c.decode(Int.self, forKey: .vcpus)
        memoryMiB = try c.decode(Int.self, forKey: .memoryMiB)
        maxVcpus = try c.decode(Int.self, forKey: .maxVcpus)
        maxMemoryMiB = try c.decode(Int.self, forKey: .maxMemoryMiB)
        image = try c.decode(BootImage.self, forKey: .image)
        disks = try c.decodeIfPresent([DiskShape].self, forKey: .disks) ?? []
        network = try c.decodeIfPresent(NetworkShape.self, forKey: .network)
        sharesTemplateMemory = try c.decodeIfPresent(Bool.self, forKey: .sharesTemplateMemory) ?? true
        preparation = try c.decodeIfPresent(Preparation.self, forKey: .preparation)
    }

    /// `sharesTemplateMemory` is written only when false and `preparation` only when there is
    /// one, so shapes that use neither read as before.
    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(vcpus, forKey: .vcpus)
        try c.encode(memoryMiB, forKey: .memoryMiB)
        try c.encode(maxVcpus, forKey: .maxVcpus)
        try c.encode(maxMemoryMiB, forKey: .maxMemoryMiB)
        try c.encode(image, forKey: .image)
        try c.encode(disks, forKey: .disks)
        try c.encodeIfPresent(network, forKey: .network)
        if !sharesTemplateMemory { try c.encode(false, forKey: .sharesTemplateMemory) }
        try c.encodeIfPresent(preparation, forKey: .preparation)
    }
}

/// What a template must match to serve a pool: clones inherit all of it.
public struct TemplateKey: Codable, Sendable, Hashable {
    public var vcpus: Int
    public var memoryMiB: Int
    public var maxVcpus: Int
    public var maxMemoryMiB: Int
    public var image: BootImage
    public var disks: [DiskShape]
    /// The clone's NIC device must be the template's; forwards and addresses are per VM.
    public var network: NetworkShape?
    /// The hypervisor's device layout the template was saved with (`nil`: before layouts had
    /// versions); a template of another layout cannot be restored.
    public var layout: Int?
    /// What the template VM was prepared with before its memory was saved.
    public var preparation: Preparation?

    public init(
        vcpus: Int, memoryMiB: Int, maxVcpus: Int, maxMemoryMiB: Int, image: BootImage, disks: [DiskShape] = [],
        network: NetworkShape? = nil, layout: Int? = TemplateKey.currentLayout, preparation: Preparation? = nil
    ) {
        self.preparation = preparation
        self.vcpus = vcpus
        self.memoryMiB = memoryMiB
        self.maxVcpus = maxVcpus
        self.maxMemoryMiB = maxMemoryMiB
        self.image = image
        self.disks = disks
        self.network = network
        self.layout = layout
    }

    /// The device layout this vmpool saves templates with (QEMU: monitors, virtio-serial
    /// ports, vmgenid, the console ring).
    public static let currentLayout = 2

    /// The shape of the template VM itself (and of a clone before any hotplug).
    public var shape: VMShape {
        VMShape(
            vcpus: vcpus, memoryMiB: memoryMiB, maxVcpus: maxVcpus, maxMemoryMiB: maxMemoryMiB, image: image,
            disks: disks, network: network, preparation: preparation)
    }

    enum CodingKeys: String, CodingKey {
        case vcpus, memoryMiB, maxVcpus, maxMemoryMiB, image, disks, network, layout, preparation
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        vcpus = try c.decode(Int.self, forKey: .vcpus)
        memoryMiB = try c.decode(Int.self, forKey: .memoryMiB)
        maxVcpus = try c.decode(Int.self, forKey: .maxVcpus)
        maxMemoryMiB = try c.decode(Int.self, forKey: .maxMemoryMiB)
        image = try c.decode(BootImage.self, forKey: .image)
        disks = try c.decodeIfPresent([DiskShape].self, forKey: .disks) ?? []
        network = try c.decodeIfPresent(NetworkShape.self, forKey: .network)
        layout = try c.decodeIfPresent(Int.self, forKey: .layout)
        preparation = try c.decodeIfPresent(Preparation.self, forKey: .preparation)
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
}
