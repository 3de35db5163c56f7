import VmpoolSpec
import CVmpoolSys
import Foundation
import VmpoolDriver

/// What a VM's cgroup allows: its vCPUs' worth of CPU time, its memory plus QEMU's own, a
/// bounded number of tasks, and an io weight.
public struct CgroupLimits: Sendable, Hashable {
    /// vCPUs present; the CPU quota is this many CPUs (times `cpuPercent`).
    public var vcpus: Int
    /// The vCPU ceiling (`maxVcpus`); the task bound counts it, so that a CPU plugged before
    /// the limits are updated still gets its thread.
    public var maxVcpus: Int
    /// Guest memory plugged, MiB; the memory limit is this plus QEMU's overhead. Raise it
    /// (`update`) before plugging memory: the guest may touch a new DIMM at once.
    public var memoryMiB: Int
    /// `spec.limits.cpu`: each vCPU gets this share of a host CPU, 1...100 (nil: 100).
    public var cpuPercent: Int?
    /// `spec.limits.ioWeight` (v2 `io.weight` 1...10000, v1 `blkio.weight` clamped to
    /// 10...1000; nil: the kernel's default weight).
    public var ioWeight: Int?

    /// A clone's template memory, MiB (its memory file's size); nil for a VM not cloned.
    ///
    /// A clone maps its template's memory file on tmpfs privately. Where the template never
    /// wrote a page (or vmpool gave a zero page back), the file has a hole; the clone's first
    /// touch of it allocates the page in the shared file, charged to the clone's cgroup and,
    /// without swap, never reclaimed, before the clone's own copy is made. So a clone whose
    /// guest uses all its memory is charged up to this much more (measured: a 256 MiB clone
    /// that touched everything, 129 MiB of the template's file besides its own 197 MiB). The
    /// pages stay in the file and the next clones share them, so the host's total is still
    /// bounded by one template file per template.
    public var templateMemoryMiB: Int?

    /// `maxVcpus` defaults to (and is never below) `vcpus`.
    public init(
        vcpus: Int, maxVcpus: Int? = nil, memoryMiB: Int, cpuPercent: Int? = nil, ioWeight: Int? = nil,
        templateMemoryMiB: Int? = nil
    ) {
        self.vcpus = vcpus
        self.maxVcpus = max(vcpus, maxVcpus ?? vcpus)
        self.memoryMiB = memoryMiB
        self.templateMemoryMiB = templateMemoryMiB
        self.cpuPercent = cpuPercent
        self.ioWeight = ioWeight
    }

    /// The CFS period, µs (the kernel's default).
    public static let cpuPeriod = 100_000

    /// CPU time allowed per period, µs: vcpus × period × percent / 100, at least the kernel's
    /// 1 ms minimum.
    public var cpuQuota: Int {
        max(1000, vcpus * Self.cpuPeriod * min(100, max(1, cpuPercent ?? 100)) / 100)
    }
}

/// A VM's cgroup(s), ready for its process: the descriptors the child of vmpool's fork writes
/// "0" into (`vmpool_cgroup_join`) after fork and before exec, so that QEMU runs every
/// instruction inside its limits.
///
/// The descriptors are open `O_WRONLY | O_CLOEXEC` on each hierarchy's `cgroup.procs` (one on
/// v2; one per hierarchy on v1), so exec closes them in the child; the parent closes them with
/// `close()` once the child has joined (or on deinit).
public final class CgroupHandle: @unchecked Sendable {
    /// One per hierarchy, in the order of `directories`.
    public let procsDescriptors: [Int32]
    /// The VM's cgroup directories.
    public let directories: [String]
    private let lock = NSLock()
    private var closed = false

    init(procsDescriptors: [Int32], directories: [String]) {
        self.procsDescriptors = procsDescriptors
        self.directories = directories
    }

    deinit { close() }

    /// Closes the descriptors (the child has joined, or will not be started); idempotent.
    public func close() {
        lock.lock()
        defer { lock.unlock() }
        guard !closed else { return }
        closed = true
        for fd in procsDescriptors { Glibc.close(fd) }
    }

    /// Moves a running process (all its threads) into the VM's cgroups: a VM started before
    /// vmpool managed cgroups, adopted. Memory it already holds stays charged where it was.
    public func join(pid: Int32) throws(DriverError) {
        let text = Array("\(pid)".utf8)
        for (index, fd) in procsDescriptors.enumerated() {
            let written = text.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            guard written == text.count else {
                let error = written < 0 ? errno : EIO
                throw DriverError(
                    .io, "cannot move process \(pid) into \(directories[index]): \(CgroupFiles.describe(error))")
            }
        }
    }
}

/// The limits in force on a VM's cgroup as the kernel reports them, for `describe vm`.
public struct CgroupReport: Sendable, Equatable {
    /// v1 or v2, as the limits are spelt differently.
    public var version: CgroupLayout.Version
    /// The VM's cgroup directories, one per hierarchy.
    public var directories: [String]
    /// µs per `cpuPeriod`; nil: no quota.
    public var cpuQuota: Int?
    /// µs; the quota's unit.
    public var cpuPeriod: Int?
    /// Bytes; nil: no limit.
    public var memoryLimit: Int?
    /// v2 `memory.swap.max`, v1 memsw limit minus the memory limit; nil: unknown or unlimited.
    public var swapLimit: Int?
    /// Bytes charged now (v2 `memory.current`, v1 `memory.usage_in_bytes`).
    public var memoryUsage: Int?
    /// The most memory charged at once (v2 `memory.peak`, v1 `memory.max_usage_in_bytes`).
    public var memoryPeak: Int?
    /// nil: no limit.
    public var pidsLimit: Int?
    /// Tasks (threads) now.
    public var pidsCurrent: Int?
    /// nil: the io weight cannot be set on this host (no io controller, no blkio.weight).
    public var ioWeight: Int?
    /// Processes the kernel killed for the memory limit (v2 counts a group kill's victim twice).
    public var oomKills: Int
    /// Times a task of the VM waited for the CPU quota to refill.
    public var throttledPeriods: Int?

    /// One line each, in a fixed order: the walls `describe vm` shows.
    public var summary: [(key: String, value: String)] {
        func mib(_ bytes: Int?) -> String { bytes.map { "\($0 >> 20) MiB" } ?? "unlimited" }
        var lines: [(String, String)] = [("cgroup", "\(version.rawValue) " + directories.joined(separator: " "))]
        if let cpuQuota, let cpuPeriod {
            let percent = cpuQuota * 100 / max(1, cpuPeriod)
            lines.append(("cpu", "\(cpuQuota) µs per \(cpuPeriod) µs (\(percent)% of one CPU)"))
        } else {
            lines.append(("cpu", "unlimited"))
        }
        lines.append(
            (
                "memory",
                mib(memoryLimit) + (memoryUsage.map { ", \($0 >> 20) MiB used" } ?? "")
                    + (memoryPeak.map { " (peak \($0 >> 20) MiB)" } ?? "")
            ))
        if let swapLimit { lines.append(("swap", mib(swapLimit))) }
        lines.append(("pids", (pidsLimit.map(String.init) ?? "unlimited") + (pidsCurrent.map { ", \($0) now" } ?? "")))
        lines.append(("io weight", ioWeight.map(String.init) ?? "not available"))
        lines.append(("oom kills", String(oomKills)))
        return lines
    }
}

/// What `sweep` did.
public struct CgroupSweep: Sendable, Equatable {
    /// VM cgroups removed (their names: the run-dir hash of the VM id).
    public var removed: [String] = []
    /// VM cgroups of VMs not alive that still hold processes, left in place (`kill: false`).
    public var busy: [String] = []
}

/// One cgroup per VM, under `vmpool/STATE/VM` in each hierarchy (see `CgroupLayout` for
/// where `vmpool/` goes): STATE is a hash of the state dir, so two state dirs never share or
/// sweep each other's cgroups; VM is the VM's run-dir name (`QemuPaths.hash` of its id).
///
/// The qemu driver calls `prepare` before it forks QEMU and hands the descriptors to the
/// child; `update` after a hotplug or a changed `spec.limits`; `oomKilled` then `remove` once
/// a VM's process is gone; `sweep` after a crash. Calls are blocking file operations.
public struct VMCgroups: Sendable {
    /// The layout detected (or given), or why cgroups cannot be managed here.
    public let layout: Result<CgroupLayout, DriverError>
    /// The state dir's level, `vmpool/STATE`, in each hierarchy's base.
    let stateLevel: String
    /// TCG translation cache per VM, MiB; nil under KVM.
    let translationCacheMiB: Int?
    /// The calls that change cgroups; tests put a kernel's behaviour over a fake root.
    var system = CgroupSystemCalls.kernel

    /// Detects the layout of this host.
    public init(stateDirectory: String, translationCacheMiB: Int?) {
        self.init(
            stateDirectory: stateDirectory, translationCacheMiB: translationCacheMiB, layout: CgroupLayout.detect())
    }

    /// With a layout of the caller's: another cgroup file system root, a fake one in tests.
    public init(stateDirectory: String, translationCacheMiB: Int?, layout: Result<CgroupLayout, DriverError>) {
        let absolute = URL(fileURLWithPath: stateDirectory).standardizedFileURL.path
        self.stateLevel = "vmpool/" + QemuPaths.hash(absolute, hexDigits: 12)
        self.translationCacheMiB = translationCacheMiB
        self.layout = layout
    }

    /// The driver's: TCG's cache counts in the memory limit only under TCG.
    init(configuration: QemuConfiguration, accelerator: ResolvedAccelerator) {
        self.init(
            stateDirectory: configuration.stateDirectory,
            translationCacheMiB: accelerator == .tcg ? configuration.tcgCacheMiB : nil)
    }

    /// Why cgroups cannot be managed here (nil: they can); `prepare` throws the same error.
    public var unavailable: DriverError? {
        if case .failure(let error) = layout { return error }
        return nil
    }

    // MARK: - Limits

    /// QEMU's memory beyond the guest's, MiB: what the cgroup is charged for besides guest RAM.
    ///
    /// Measured with QEMU 7.2 (Debian 12) under TCG with `tb-size=64`, the default initramfs
    /// guest booted cold, then made to touch all its free memory at once (`dd bs=AVAILABLE`),
    /// in its own v1 memory cgroup (charge = `memory.max_usage_in_bytes`; "own" = QEMU's RSS
    /// outside the guest RAM mapping):
    ///
    /// | guest | vCPUs | charge | guest RAM resident | charged beyond it | TCG cache resident | own RSS (file) |
    /// | --- | --- | --- | --- | --- | --- | --- |
    /// | 256 MiB | 1 | 336 MiB | 252 MiB | 84 MiB | 48 MiB | 97 MiB (15) |
    /// | 1 GiB | 1 | 1038 MiB | 950 MiB | 88 MiB | 50 MiB | 100 MiB (15) |
    /// | 256 MiB | 4 | 343 MiB | 254 MiB | 89 MiB | 25 MiB | 103 MiB (15) |
    ///
    /// Beyond the TCG cache, QEMU's anonymous memory is about 35 MiB with one vCPU (13 MiB of it
    /// the kernel and initrd it keeps for the firmware, heap, device state) and about 10 MiB
    /// more per vCPU (each vCPU thread's malloc arena and stack); page tables and other kernel
    /// memory about 3 MiB; its binary and libraries (15 MiB) are shared page cache, charged to
    /// whoever read them first and reclaimable. The TCG cache fills up to its size as the guest
    /// runs new code, so it counts whole. Worst case so far: 88 - 50 + 64 = 102 MiB (1 vCPU),
    /// 89 - 25 + 64 = 128 MiB (4 vCPUs). A clone without a guest kernel copy measured less
    /// (42 MiB own, 14 of it TCG cache). The formula, with room for disks' caches, migration
    /// buffers, hotplugged devices and a heap that grows: 64 MiB + 12 MiB per vCPU + the TCG
    /// cache, i.e. 140 MiB for one vCPU (38 MiB above the worst measured), 176 MiB for four.
    public func memoryOverheadMiB(vcpus: Int) -> Int {
        Self.qemuOverheadFixedMiB + Self.qemuOverheadPerVcpuMiB * vcpus + (translationCacheMiB ?? 0)
    }

    /// See `memoryOverheadMiB`.
    static let qemuOverheadFixedMiB = 64
    static let qemuOverheadPerVcpuMiB = 12

    /// The memory limit, bytes.
    public func memoryLimit(_ limits: CgroupLimits) -> Int {
        (limits.memoryMiB + memoryOverheadMiB(vcpus: limits.maxVcpus) + (limits.templateMemoryMiB ?? 0)) << 20
    }

    /// The task bound: QEMU's threads (under its seccomp filter it cannot fork).
    ///
    /// A QEMU has a thread per vCPU (MTTCG), the main loop, RCU and a few helpers, and for
    /// disks with `aio=threads` a worker pool of up to 64 threads that grows with requests in
    /// flight (and a migration thread while a template is saved). Measured (two virtio disks,
    /// 16 direct writers and readers per disk in the guest): 6 threads idle and 9 at most with
    /// one vCPU, 9 idle and 18 at most with four. The bound allows the pool's 64 and the fixed
    /// threads twice over, plus a thread per vCPU up to `maxVcpus`: a guest cannot push QEMU
    /// past it by its own doing, and a QEMU turned into a fork bomb stops within a few hundred.
    public static func pidsLimit(_ limits: CgroupLimits) -> Int {
        pidsFixed + limits.maxVcpus
    }

    static let pidsFixed = 128

    // MARK: - Lifecycle

    /// Creates the VM's cgroup(s) (and their parents), writes `limits`, and opens each
    /// hierarchy's `cgroup.procs` for the child to join. A cgroup left from an earlier attempt
    /// is reused. Throws `.hostUnsupported` when cgroups cannot be managed here (not root, a
    /// read-only cgroup file system, controllers missing), `.io` when the kernel refuses a limit.
    public func prepare(vm: String, limits: CgroupLimits) throws(DriverError) -> CgroupHandle {
        let layout = try self.layout.get()
        var descriptors: [Int32] = []
        var directories: [String] = []
        do throws(DriverError) {
            for hierarchy in layout.hierarchies {
                let directory = try create(vm: vm, in: hierarchy, version: layout.version)
                try write(limits, to: directory, controllers: hierarchy.controllers, version: layout.version, vm: vm)
                let fd = open(directory + "/cgroup.procs", O_WRONLY | O_CLOEXEC)
                guard fd >= 0 else {
                    throw Self.failure("cannot open \(directory)/cgroup.procs", errno, vm: vm)
                }
                descriptors.append(fd)
                directories.append(directory)
            }
        } catch {
            for fd in descriptors { close(fd) }
            try? remove(vm: vm)
            throw error
        }
        return CgroupHandle(procsDescriptors: descriptors, directories: directories)
    }

    /// Writes `limits` over the VM's running cgroup(s): a hotplug (call it before plugging
    /// memory), a changed `spec.limits`.
    public func update(vm: String, limits: CgroupLimits) throws(DriverError) {
        let layout = try self.layout.get()
        for hierarchy in layout.hierarchies {
            let directory = self.directory(vm: vm, in: hierarchy)
            guard CgroupFiles.exists(directory) else {
                throw DriverError(.notFound, "the VM has no cgroup \(directory)", vm: vm)
            }
            try write(limits, to: directory, controllers: hierarchy.controllers, version: layout.version, vm: vm)
        }
    }

    /// Removes the VM's cgroup(s) once its process is gone. With `kill`, whatever is still in
    /// them is killed first (v2 `cgroup.kill` where the kernel has it); without, a cgroup that
    /// still holds a process is an error (`.invalidState`) and is left. A cgroup already gone is fine.
    public func remove(vm: String, kill: Bool = false, timeout: Duration = .seconds(5)) throws(DriverError) {
        guard case .success(let layout) = self.layout else { return }
        let name = Self.name(vm: vm)
        for hierarchy in layout.hierarchies {
            try removeCgroup(hierarchy.base + "/" + stateLevel + "/" + name, kill: kill, timeout: timeout, vm: vm)
        }
    }

    /// Removes every VM cgroup of this state dir whose VM is not in `alive`, and the state
    /// dir's level once empty: nothing leaks after a crash. A cgroup that still holds a
    /// process is killed first with `kill`, else left and listed as busy.
    @discardableResult
    public func sweep(alive: Set<String>, kill: Bool = false) -> CgroupSweep {
        guard case .success(let layout) = self.layout else { return CgroupSweep() }
        let keep = Set(alive.map(Self.name(vm:)))
        var result = CgroupSweep()
        var removed: Set<String> = []
        var busy: Set<String> = []
        for hierarchy in layout.hierarchies {
            let level = hierarchy.base + "/" + stateLevel
            for name in CgroupFiles.children(level) where !keep.contains(name) {
                do throws(DriverError) {
                    try removeCgroup(level + "/" + name, kill: kill, timeout: .seconds(5), vm: nil)
                    removed.insert(name)
                } catch {
                    busy.insert(name)
                }
            }
            if CgroupFiles.children(level).isEmpty { _ = system.rmdir(level) }
        }
        result.busy = busy.sorted()
        result.removed = removed.subtracting(busy).sorted()
        return result
    }

    /// Whether the kernel killed a process of the VM's cgroup for its memory limit (v2
    /// `memory.events` `oom_kill`, v1 `memory.oom_control` `oom_kill`). Read it before `remove`.
    public func oomKilled(vm: String) -> Bool {
        oomKills(vm: vm) > 0
    }

    func oomKills(vm: String) -> Int {
        guard case .success(let layout) = self.layout,
            let hierarchy = layout.hierarchies.first(where: { $0.controllers.contains("memory") })
        else { return 0 }
        let directory = self.directory(vm: vm, in: hierarchy)
        let file = layout.version == .v2 ? "/memory.events" : "/memory.oom_control"
        return CgroupFiles.keyed(CgroupFiles.read(directory + file))["oom_kill"] ?? 0
    }

    /// The limits in force, as the kernel reports them; nil when the VM has no cgroup.
    public func describe(vm: String) -> CgroupReport? {
        guard case .success(let layout) = self.layout else { return nil }
        func directory(_ controller: String) -> String? {
            layout.hierarchies.first { $0.controllers.contains(controller) }.map { self.directory(vm: vm, in: $0) }
        }
        let directories = layout.hierarchies.map { self.directory(vm: vm, in: $0) }
        guard directories.allSatisfy(CgroupFiles.exists) else { return nil }
        func value(_ controller: String, _ file: String) -> String? {
            directory(controller).flatMap { CgroupFiles.read($0 + "/" + file) }?
                .trimmingCharacters(in: .whitespacesAndNewlines)
        }
        func number(_ text: String?) -> Int? { text.flatMap { Int($0) } }
        var report = CgroupReport(
            version: layout.version, directories: directories, oomKills: oomKills(vm: vm))
        report.pidsLimit = number(value("pids", "pids.max"))
        report.pidsCurrent = number(value("pids", "pids.current"))
        switch layout.version {
        case .v2:
            let cpu = (value("cpu", "cpu.max") ?? "").split(separator: " ")
            if cpu.count == 2, let quota = Int(cpu[0]), let period = Int(cpu[1]) {
                (report.cpuQuota, report.cpuPeriod) = (quota, period)
            }
            report.memoryLimit = number(value("memory", "memory.max"))
            report.swapLimit = number(value("memory", "memory.swap.max"))
            report.memoryUsage = number(value("memory", "memory.current"))
            report.memoryPeak = number(value("memory", "memory.peak"))
            if let weight = value("io", "io.weight")?.split(separator: "\n").first(where: { $0.hasPrefix("default ") })
            {
                report.ioWeight = Int(weight.dropFirst(8))
            }
            report.throttledPeriods = CgroupFiles.keyed(value("cpu", "cpu.stat"))["nr_throttled"]
        case .v1:
            if let quota = number(value("cpu", "cpu.cfs_quota_us")), quota > 0 {
                (report.cpuQuota, report.cpuPeriod) = (quota, number(value("cpu", "cpu.cfs_period_us")))
            }
            let unlimited = Int.max / 4096 * 4096
            let memory = number(value("memory", "memory.limit_in_bytes"))
            report.memoryLimit = memory == unlimited ? nil : memory
            if let memory, let memsw = number(value("memory", "memory.memsw.limit_in_bytes")), memsw != unlimited {
                report.swapLimit = memsw - memory
            }
            report.memoryUsage = number(value("memory", "memory.usage_in_bytes"))
            report.memoryPeak = number(value("memory", "memory.max_usage_in_bytes"))
            report.ioWeight = number(value("blkio", "blkio.weight") ?? value("blkio", "blkio.bfq.weight"))
            report.throttledPeriods = CgroupFiles.keyed(value("cpu", "cpu.stat"))["nr_throttled"]
        }
        return report
    }

    /// The VM's cgroup directories (whether or not they exist).
    public func directories(vm: String) -> [String] {
        guard case .success(let layout) = self.layout else { return [] }
        return layout.hierarchies.map { directory(vm: vm, in: $0) }
    }

    // MARK: - Parts

    /// A VM's cgroup name: its run dir's (12 hex digits of a hash of the id).
    static func name(vm: String) -> String { QemuPaths.hash(vm, hexDigits: 12) }

    func directory(vm: String, in hierarchy: CgroupLayout.Hierarchy) -> String {
        hierarchy.base + "/" + stateLevel + "/" + Self.name(vm: vm)
    }

    /// `vmpool/`, `vmpool/STATE/` and `vmpool/STATE/VM/`; on v2 with the controllers enabled
    /// for the children of the base and of each level but the VM's.
    private func create(vm: String, in hierarchy: CgroupLayout.Hierarchy, version: CgroupLayout.Version)
        throws(DriverError) -> String
    {
        var directory = hierarchy.base
        if version == .v2 { try enable(hierarchy.controllers, in: directory, vm: vm) }
        // A cgroup left by an earlier attempt goes first, so that its counters (OOM kills)
        // start from zero; one that still holds a process is not this VM's to take.
        try removeCgroup(self.directory(vm: vm, in: hierarchy), kill: false, timeout: .seconds(1), vm: vm)
        for level in stateLevel.split(separator: "/") + [Substring(Self.name(vm: vm))] {
            directory += "/" + level
            if let error = system.mkdir(directory), error != EEXIST {
                throw Self.failure("cannot create the cgroup \(directory)", error, vm: vm)
            }
            if version == .v2 && level != Substring(Self.name(vm: vm)) {
                try enable(hierarchy.controllers, in: directory, vm: vm)
            }
        }
        return directory
    }

    /// Adds `controllers` to `directory`'s `cgroup.subtree_control` where they are missing.
    private func enable(_ controllers: [String], in directory: String, vm: String) throws(DriverError) {
        let enabled = Set(
            (CgroupFiles.read(directory + "/cgroup.subtree_control") ?? "").split(whereSeparator: \.isWhitespace)
                .map(String.init))
        let missing = controllers.filter { !enabled.contains($0) }
        guard !missing.isEmpty else { return }
        if let error = system.write(
            directory + "/cgroup.subtree_control", missing.map { "+" + $0 }.joined(separator: " "))
        {
            let what =
                "cannot enable the \(missing.joined(separator: ", ")) controllers for the children of \(directory)"
            guard error != EBUSY else {
                throw DriverError(
                    .hostUnsupported,
                    what + ": it holds processes (in cgroup v2 a cgroup other than the root cannot both hold"
                        + " processes and give controllers to its children)", vm: vm)
            }
            throw Self.failure(what, error, vm: vm)
        }
    }

    /// Writes every limit of `limits` this hierarchy carries.
    private func write(
        _ limits: CgroupLimits, to directory: String, controllers: [String], version: CgroupLayout.Version,
        vm: String
    ) throws(DriverError) {
        func set(_ file: String, _ value: String, optional: Bool = false) throws(DriverError) {
            let path = directory + "/" + file
            if optional && !CgroupFiles.exists(path) { return }
            if let error = system.write(path, value) {
                throw Self.failure("cannot write \(value) to \(path)", error, vm: vm)
            }
        }
        let memory = memoryLimit(limits)
        let pids = Self.pidsLimit(limits)
        switch version {
        case .v2:
            if controllers.contains("cpu") { try set("cpu.max", "\(limits.cpuQuota) \(CgroupLimits.cpuPeriod)") }
            if controllers.contains("memory") {
                try set("memory.max", String(memory))
                try set("memory.swap.max", "0", optional: true)
                // An OOM kill takes the whole VM, not one of its processes.
                try set("memory.oom.group", "1", optional: true)
            }
            if controllers.contains("pids") { try set("pids.max", String(pids)) }
            if controllers.contains("io") {
                try set("io.weight", "default \(min(10000, max(1, limits.ioWeight ?? 100)))", optional: true)
            }
        case .v1:
            if controllers.contains("cpu") {
                try set("cpu.cfs_period_us", String(CgroupLimits.cpuPeriod))
                try set("cpu.cfs_quota_us", String(limits.cpuQuota))
            }
            if controllers.contains("memory") {
                // memsw (memory + swap) may never be below the memory limit: raise it first,
                // lower it last; equal to it, the VM gets no swap.
                let hasMemsw = CgroupFiles.exists(directory + "/memory.memsw.limit_in_bytes")
                let current =
                    Int(
                        (CgroupFiles.read(directory + "/memory.limit_in_bytes") ?? "").trimmingCharacters(
                            in: .whitespacesAndNewlines)) ?? 0
                if hasMemsw && memory > current { try set("memory.memsw.limit_in_bytes", String(memory)) }
                try set("memory.limit_in_bytes", String(memory))
                if hasMemsw && memory <= current { try set("memory.memsw.limit_in_bytes", String(memory)) }
            }
            if controllers.contains("pids") { try set("pids.max", String(pids)) }
            if controllers.contains("blkio") {
                if CgroupFiles.exists(directory + "/blkio.weight") {
                    try set("blkio.weight", String(min(1000, max(10, limits.ioWeight ?? 500))))
                } else {
                    try set("blkio.bfq.weight", String(min(1000, max(1, limits.ioWeight ?? 100))), optional: true)
                }
            }
        }
    }

    /// Kills what is left in `directory` when asked, then removes it, waiting up to `timeout`
    /// for killed processes to leave. A process that has exited but not been reaped yet (a
    /// zombie; v1 lists them until their parent reaps them) is waited for, never refused.
    private func removeCgroup(_ directory: String, kill: Bool, timeout: Duration, vm: String?) throws(DriverError) {
        guard CgroupFiles.exists(directory) else { return }
        let deadline = ContinuousClock.now + timeout
        var killed = false
        while true {
            let pids = Self.processes(directory)
            // Read twice: a process may exit between reading cgroup.procs and its /proc entry.
            let live =
                pids.filter { !Self.hasExited($0) }.isEmpty
                ? [] : Self.processes(directory).filter { !Self.hasExited($0) }
            if !live.isEmpty {
                guard kill else {
                    throw DriverError(
                        .invalidState,
                        "the cgroup \(directory) still holds processes \(live.map(String.init).joined(separator: " "))",
                        vm: vm)
                }
                if !killed && CgroupFiles.exists(directory + "/cgroup.kill") {
                    _ = system.write(directory + "/cgroup.kill", "1")
                } else {
                    for pid in live { Glibc.kill(pid, SIGKILL) }
                }
                killed = true
            } else if pids.isEmpty {
                let error = system.rmdir(directory)
                if error == nil || error == ENOENT { return }
                if error != EBUSY { throw Self.failure("cannot remove the cgroup \(directory)", error!, vm: vm) }
            }
            guard ContinuousClock.now < deadline else {
                throw DriverError(
                    .timeout,
                    "the cgroup \(directory) still holds processes after \(DurationText.format(timeout))"
                        + (live.isEmpty ? " (exited, not yet reaped by their parent)" : ""), vm: vm)
            }
            usleep(2_000)
        }
    }

    /// Whether `pid` is a zombie: it has exited and waits for its parent. A pid this process
    /// cannot see (another pid namespace) counts as running.
    static func hasExited(_ pid: Int32) -> Bool {
        guard let stat = QemuProcess.readProcFile("/proc/\(pid)/stat", limit: 4096),
            let close = stat.lastIndex(of: UInt8(ascii: ")"))
        else { return false }
        let state = stat[(close + 1)...].first { $0 != UInt8(ascii: " ") }
        return state == UInt8(ascii: "Z") || state == UInt8(ascii: "X")
    }

    /// The processes in a cgroup (`cgroup.procs`).
    static func processes(_ directory: String) -> [Int32] {
        (CgroupFiles.read(directory + "/cgroup.procs") ?? "").split(separator: "\n").compactMap { Int32($0) }
    }

    /// A refused operation as a driver error: no right to manage cgroups is a host limitation.
    static func failure(_ what: String, _ error: Int32, vm: String?) -> DriverError {
        switch error {
        case EACCES, EPERM, EROFS:
            return DriverError(
                .hostUnsupported,
                "\(what): \(CgroupFiles.describe(error)) (vmpool must run as root, or in a cgroup delegated to its user)",
                vm: vm)
        default:
            return DriverError(.io, "\(what): \(CgroupFiles.describe(error))", vm: vm)
        }
    }
}

/// The calls that change cgroups, each returning the errno of a refusal or nil. The kernel's by
/// default; a test gives a plain directory a cgroup file system's behaviour with its own.
struct CgroupSystemCalls: Sendable {
    var mkdir: @Sendable (String) -> Int32?
    var rmdir: @Sendable (String) -> Int32?
    var write: @Sendable (String, String) -> Int32?

    static let kernel = CgroupSystemCalls(
        mkdir: { Glibc.mkdir($0, 0o755) == 0 ? nil : errno },
        rmdir: { Glibc.rmdir($0) == 0 ? nil : errno },
        write: { CgroupFiles.write($0, $1) })
}
