import CVmpoolSys
import Foundation
import VmpoolDriver
import VmpoolSpec

/// Where a VM's RAM comes from.
enum MemoryMode {
    /// Anonymous memory: a cold-booted VM.
    case anonymous
    /// A file on tmpfs mapped shared: the template VM, whose RAM clones will map.
    case templateShared(String)
    /// The template's file mapped private, copy-on-write: a clone.
    case clonePrivate(String)
    /// A copy of the template's file of the clone's own (`template.shareMemory: false`): no
    /// page is shared with the template or another clone.
    case cloneCopy(String)

    var isClone: Bool {
        switch self {
        case .clonePrivate, .cloneCopy: true
        case .anonymous, .templateShared: false
        }
    }
}

/// A disk as QEMU opens it: the VM's own copy-on-write overlay, made when the VM starts.
struct DiskAttachment: Sendable, Hashable {
    /// Its name in the pool (the guest sees it as the serial, /dev/disk/by-id/virtio-NAME).
    var name: String
    /// The overlay (qcow2) the VM writes to.
    var path: String
    /// What the overlay is made over, nearest first: a base image, or a template's frozen disk
    /// and the base under it; empty: an empty disk.
    var backingChain: [BackingFile] = []
    var backing: String? { backingChain.first?.path }
    /// The virtual size, MiB (`nil`: the backing file's).
    var sizeMiB: Int?
    /// The virtual size in bytes, where it need not be whole MiB (a fork's stand-in disks).
    var sizeBytes: UInt64?
    /// A VM's disk lives and dies with its QEMU process (a stopped or lost VM's overlays are
    /// removed, never booted again), so the guest's flushes need not reach the host's disk:
    /// QEMU skips them. A template's disk is not scratch: clones are made from it.
    var scratch = false
}

/// A file a disk is made over, and its format.
struct BackingFile: Sendable, Hashable {
    var path: String
    var format: String
}

/// A NIC as QEMU sees it.
struct NICAttachment: Sendable, Hashable {
    enum Backend: Sendable, Hashable {
        /// QEMU user-mode networking; forwards are added over QMP once the VM runs.
        case user
        /// A tap device vmpool makes on `bridge` when the VM starts and removes when it stops.
        case tap(name: String, bridge: String)
    }
    var backend: Backend
    var mac: String
}

/// Everything QEMU's command line is built from, apart from the VM's identity and paths.
struct MachineSpec {
    var shape: VMShape
    var memory: MemoryMode
    /// Started with `-S -incoming defer`, to receive a template's state.
    var incoming: Bool
    var disks: [DiskAttachment] = []
    var nic: NICAttachment?
    /// The pool, whose walls the VM's traffic goes through.
    var pool = ""
    /// Bridge mode: the address the VM is given, known to the walls before its guest runs.
    var address: String?
    /// What the pool lowers the VM's cgroup limits to.
    var limits = ResourceLimits()
    /// Limits given whole instead of derived from the shape (tests of the limits themselves).
    var cgroupLimits: CgroupLimits?
    /// The id of the RAM file's memory backend, which names the RAM block a migration
    /// matches: `QemuVM.ramID` for templates and clones; a fork of a cold-booted VM uses the
    /// name QEMU gives anonymous RAM (`QemuVM.anonymousRAMID`).
    var ramID = QemuVM.ramID
    /// Every page of the RAM file allocated and mapped at start (a fork's helper: the pages an
    /// incoming migration reads and writes are then there, not faulted in one by one while the
    /// source stands paused).
    var preallocate = false
}

/// The descriptor numbers, in QEMU, of the files and sockets vmpool opened and passed to it:
/// QEMU opens nothing of the state dir by name (it could not: the state dir is root's, 0700).
struct QemuFiles {
    /// The chardev id of each socket QEMU serves (qmp, qmpo, hvc, ctl, x0...) and its listening descriptor.
    var sockets: [String: Int32] = [:]
    var kernel: Int32?
    var initrd: Int32?
    /// The RAM file of a template or clone.
    var memory: Int32?
    /// The tap device, attached by vmpool (QEMU needs no access to /dev/net/tun).
    var tap: Int32?
    /// Each disk's chain, top (the VM's overlay, written) first, then what it is made over (read only).
    var disks: [[DiskLayer]] = []
    /// A descriptor of /dev/null whose fd set describes the VM's run dir: the run dir in QEMU's
    /// command line is what marks the process as this state dir's.
    var marker: Int32 = 3

    struct DiskLayer {
        var fd: Int32
        var format: String
    }
}

/// One QEMU VM and the operations Kata's virtcontainers VM offers: start, pause, save,
/// resume, stop, add CPUs and memory, bring them online in the guest, reseed its RNG, sync
/// its clock, report its status. Every call is blocking; the driver runs them off the
/// cooperative pool.
struct QemuVM {
    let id: String
    let paths: QemuPaths
    let configuration: QemuConfiguration
    let accelerator: ResolvedAccelerator
    /// Known once started.
    var pid: Int32?
    /// Start QEMU with `-sandbox` (configured on, and this QEMU has seccomp).
    var sandbox = false
    /// Who QEMU runs as (a uid of its own per VM, as root).
    var confinement: Confinement = .none(reason: "not started")
    /// The network walls (confined VMs).
    var walls: NetworkWalls?
    /// The VM's cgroup (confined VMs).
    var cgroups: VMCgroups?

    /// seccomp filter options: QEMU may neither start a program nor change its uid (vmpool starts
    /// it detached and already as its VM's uid), nor use obsolete calls or change its scheduling.
    static let sandboxOptions = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

    /// The RAM block id shared by template and clones; migration matches blocks by it.
    static let ramID = "vmpool.ram"
    /// The RAM block of a VM started without a RAM file (the pc machine's default RAM id).
    static let anonymousRAMID = "pc.ram"

    /// Exec ports per VM: execs and copies that can run at once (more wait for a free one).
    static let execPorts = 8

    /// Size of the console ring that keeps a VM's latest serial output in QEMU's memory.
    static let consoleRingBytes = 256 << 10

    // MARK: - Command line

    /// The QEMU argument vector, from small parts. Every value from a manifest is its own argv
    /// element or a JSON value; paths inside `key=value` option lists are comma-escaped.
    func arguments(_ machine: MachineSpec, files: QemuFiles) -> [String] {
        identityArguments(files) + acceleratorArguments()
            + memoryArguments(
                machine.shape, machine.memory, files, ramID: machine.ramID, preallocate: machine.preallocate)
            + bootArguments(machine.shape, machine.memory, files) + channelArguments(files) + consoleArguments()
            + diskArguments(machine.disks, files) + nicArguments(machine.nic, tap: files.tap)
            + processArguments(incoming: machine.incoming)
    }

    func identityArguments(_ files: QemuFiles) -> [String] {
        [
            "-name", "guest=\(id)", "-nodefaults", "-no-user-config", "-display", "none",
            "-add-fd", "fd=\(files.marker),set=0,opaque=vmpool:\(QemuOpts.escape(paths.vmDirectory(id)))",
        ]
    }

    func acceleratorArguments() -> [String] {
        switch accelerator {
        case .tcg:
            // qemu64 with an Intel family 6 identity: Linux then trusts the TSC as constant and
            // skips the delay-loop calibration on every hotplugged CPU (TCG refuses +invtsc).
            // Measured: CPU hotplug 238/140/151 ms with plain qemu64, 155/48/58 ms with this.
            return [
                "-accel", "tcg,tb-size=\(configuration.tcgCacheMiB)", "-cpu",
                "qemu64,vendor=GenuineIntel,family=6,model=15",
            ]
        case .kvm:
            return ["-accel", "kvm", "-cpu", "host"]
        }
    }

    func memoryArguments(
        _ shape: VMShape, _ memory: MemoryMode, _ files: QemuFiles, ramID: String = Self.ramID,
        preallocate: Bool = false
    ) -> [String] {
        var args: [String] = []
        var machine = "pc"
        var memoryOption = "size=\(shape.memoryMiB)M"
        if shape.maxMemoryMiB > shape.memoryMiB {
            let slots = max(1, min(32, (shape.maxMemoryMiB - shape.memoryMiB) / 128))
            memoryOption += ",slots=\(slots),maxmem=\(shape.maxMemoryMiB)M"
        }
        switch memory {
        case .anonymous:
            break
        case .templateShared, .clonePrivate, .cloneCopy:
            // A template writes its file; a clone's own copy is written as its RAM too.
            var shared = true
            if case .clonePrivate = memory { shared = false }
            // QEMU opens the file by a name; /proc/self/fd names the descriptor it was given.
            args += [
                "-object",
                QemuOpts.json([
                    "qom-type": "memory-backend-file", "id": ramID, "size": shape.memoryMiB << 20,
                    "mem-path": "/proc/self/fd/\(files.memory ?? -1)", "share": shared, "prealloc": preallocate,
                ]),
            ]
            machine += ",memory-backend=\(ramID)"
        }
        args += ["-machine", machine, "-m", memoryOption]
        if let firmware = configuration.firmware { args += ["-bios", firmware] }
        args += ["-smp", "cpus=\(shape.vcpus),maxcpus=\(shape.maxVcpus)"]
        return args
    }

    func bootArguments(_ shape: VMShape, _ memory: MemoryMode, _ files: QemuFiles) -> [String] {
        // A clone's kernel is in the template's RAM already; loading it again costs 10 ms and
        // 13 MiB per clone.
        if memory.isClone { return ["-no-reboot"] }
        var args = ["-kernel", "/proc/self/fd/\(files.kernel ?? -1)"]
        if let initrd = files.initrd { args += ["-initrd", "/proc/self/fd/\(initrd)"] }
        return args + ["-append", shape.image.cmdline]
    }

    /// Two QMP monitors (the lock holder's, and one observers share under a host-side lock)
    /// and the agent's virtio-serial ports: control, then one per concurrent exec, plus an
    /// interactive console (hvc0).
    func channelArguments(_ files: QemuFiles) -> [String] {
        func socket(_ chardev: String) -> String {
            "socket,id=\(chardev),fd=\(files.sockets[chardev] ?? -1),server=on,wait=off"
        }
        var args = [
            "-chardev", socket("qmp"), "-mon", "chardev=qmp,mode=control",
            "-chardev", socket("qmpo"), "-mon", "chardev=qmpo,mode=control",
            "-device", "virtio-serial-pci,id=vser0,max_ports=\(Self.execPorts + 4)",
            "-chardev", socket("hvc"),
            "-device", "virtconsole,bus=vser0.0,nr=0,chardev=hvc,name=org.vmpool.console",
            "-chardev", socket("ctl"),
            "-device", "virtserialport,bus=vser0.0,chardev=ctl,name=org.vmpool.ctl",
        ]
        for port in 0..<Self.execPorts {
            args += [
                "-chardev", socket("x\(port)"),
                "-device", "virtserialport,bus=vser0.0,chardev=x\(port),name=org.vmpool.exec.\(port)",
            ]
        }
        // A new generation id per VM (clones included): guest kernels with the driver reseed.
        return args + ["-device", "vmgenid,guid=auto"]
    }

    /// The serial console (ttyS0) goes into a ring in QEMU's memory: bounded whatever the guest
    /// prints; `vmpool logs` drains it into a capped file.
    func consoleArguments() -> [String] {
        ["-chardev", "ringbuf,id=console,size=\(Self.consoleRingBytes)", "-serial", "chardev:console"]
    }

    /// Each disk as a chain of nodes over the descriptors QEMU was given (`-add-fd`, one fd set
    /// per file, set 0 being the run dir marker): its overlay written, the layers under it read
    /// only. The chain is spelled out to the end, so QEMU never opens a backing file by the name
    /// an image's header gives.
    func diskArguments(_ disks: [DiskAttachment], _ files: QemuFiles) -> [String] {
        var args: [String] = []
        var set = 1
        for (index, disk) in disks.enumerated() {
            let layers = index < files.disks.count ? files.disks[index] : []
            var backing: Any = NSNull()
            var sets: [Int] = []
            for (depth, layer) in layers.enumerated().reversed() {
                sets.append(set)
                args += ["-add-fd", "fd=\(layer.fd),set=\(set)"]
                var node: [String: Any] = [
                    "driver": layer.format,
                    "file": ["driver": "file", "filename": "/dev/fdset/\(set)", "aio": "threads"],
                ]
                set += 1
                if layer.format == "qcow2" { node["backing"] = backing }
                if depth == 0 {
                    node["node-name"] = "disk\(index)"
                    node["discard"] = "unmap"
                    node["cache"] = ["no-flush": disk.scratch]
                } else {
                    node["read-only"] = true
                }
                backing = node
            }
            args += [
                "-blockdev", QemuOpts.json(backing as? [String: Any] ?? [:]),
                "-device", "virtio-blk-pci,drive=disk\(index),id=vd\(index),serial=\(disk.name)",
            ]
        }
        return args
    }

    func nicArguments(_ nic: NICAttachment?, tap: Int32? = nil) -> [String] {
        guard let nic else { return [] }
        let netdev: String
        switch nic.backend {
        case .user: netdev = "user,id=net0"
        case .tap(let name, _):
            netdev =
                tap.map { "tap,id=net0,fd=\($0)" }
                ?? "tap,id=net0,ifname=\(QemuOpts.escape(name)),script=no,downscript=no"
        }
        return ["-netdev", netdev, "-device", "virtio-net-pci,netdev=net0,id=nic0,mac=\(nic.mac)"]
    }

    func processArguments(incoming: Bool) -> [String] {
        var args: [String] = []
        if incoming { args += ["-S", "-incoming", "defer"] }
        if sandbox { args += ["-sandbox", Self.sandboxOptions] }
        return args
    }

    // MARK: - Start

    /// Starts QEMU; the process is running and its sockets listen when this returns.
    mutating func start(_ machine: MachineSpec) throws(DriverError) {
        let needed =
            machine.memory.isClone ? [] : [machine.shape.image.kernel, machine.shape.image.initrd].compactMap { $0 }
        for path in needed where access(path, R_OK) != 0 {
            throw DriverError(.imageMissing, "image file \(path) does not exist or is not readable", vm: id)
        }
        let dir = paths.vmDirectory(id)
        try? FileManager.default.removeItem(atPath: dir)
        guard mkdir(dir, 0o700) == 0, chmod(dir, 0o700) == 0 else {
            throw DriverError(.io, "cannot create \(dir): \(String(cString: strerror(errno)))", vm: id)
        }
        for disk in machine.disks where access(disk.path, F_OK) != 0 {
            try Overlay.create(disk, qemuImg: configuration.qemuImg, vm: id)
        }
        var plan = LaunchPlan()
        defer { plan.closeAll() }
        var launchLock: ChannelLock?
        defer { launchLock?.release() }
        if case .users(let users) = confinement {
            launchLock = try ChannelLock(
                path: paths.launchLock, name: "the state dir's launch lock", until: .now + .seconds(60), vm: id)
            let user = try users.claim(for: id)
            plan.user = user
            // Held by the VM's process for its life: the uid is its own until it exits.
            _ = plan.pass(user.lock)
            // Whose uid it is, while it is held: a pass that rewrites the walls or sweeps the
            // cgroups meanwhile (a fork starts VMs without the state dir lock) keeps this VM's.
            try? "\(user.uid) \(id)\n".write(toFile: paths.uidFile(id), atomically: false, encoding: .utf8)
        }
        if case .tap(let name, let bridge) = machine.nic?.backend {
            try HostNetwork.createTap(name, bridge: bridge, vm: id, user: plan.user.map { "\($0.uid)" })
        }
        // Before the guest runs, its traffic must meet its pool's walls.
        if let user = plan.user {
            guard let walls else {
                throw DriverError(
                    .hostUnsupported,
                    "nftables (nft) is not installed: the network walls around VMs need it (apt install nftables;"
                        + " VMPOOL_WALLS=0 runs VMs without any walls)", vm: id)
            }
            var tap: String?
            if case .tap(let name, _) = machine.nic?.backend { tap = name }
            try walls.add(
                NetworkWalls.Member(uid: user.uid, pool: machine.pool, tap: tap, address: machine.address), vm: id)
        }
        let files = try openFiles(machine, into: &plan)
        var cgroup: CgroupHandle?
        defer { cgroup?.close() }
        if let cgroups {
            cgroup = try cgroups.prepare(
                vm: id, limits: machine.cgroupLimits ?? Self.cgroupLimits(machine.shape, machine.memory, machine.limits)
            )
            plan.cgroupProcs = cgroup!.procsDescriptors
        }
        launchLock?.release()
        plan.log = Glibc.open(paths.qemuLog(id), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard let binary = QemuProcess.resolve(configuration.binary) else {
            throw DriverError(
                .hostUnsupported, "QEMU (\(configuration.binary)) is not installed; install qemu-system-x86", vm: id)
        }
        let pid = try plan.launch(binary, arguments(machine, files: files), vm: id)
        self.pid = pid
        try? "\(pid)\n".write(toFile: paths.pidFile(id), atomically: false, encoding: .utf8)
        chmod(paths.pidFile(id), 0o600)
        try awaitMonitor(pid: pid, timeout: configuration.bootTimeout)
        // QEMU read the kernel before its monitor answered; its copy can go.
        for fd in plan.emptiedAfterStart { ftruncate(fd, 0) }
    }

    /// A VM's cgroup limits: its vCPUs and memory (the ceiling: the guest cannot use more than
    /// is plugged, and a hotplug then needs no new limit), lowered as the pool says. A clone
    /// that maps its template's file is charged for the holes it fills there, up to the
    /// template's size (measured: see `VMCgroups.memoryOverheadMiB`).
    static func cgroupLimits(_ shape: VMShape, _ memory: MemoryMode, _ limits: ResourceLimits) -> CgroupLimits {
        var templateMiB: Int?
        if case .clonePrivate = memory { templateMiB = shape.memoryMiB }
        return CgroupLimits(
            vcpus: shape.vcpus, maxVcpus: shape.maxVcpus, memoryMiB: shape.maxMemoryMiB, cpuPercent: limits.cpuPercent,
            ioWeight: limits.ioWeight, templateMemoryMiB: templateMiB)
    }

    /// Opens what QEMU needs and hands it over: the listening sockets of its monitors and
    /// channels (bound here, at the paths clients connect to), the kernel and initrd, the RAM
    /// file, each disk's chain. Files QEMU reopens by /proc/self/fd must let its uid open them:
    /// the kernel and initrd are readable by all (vmpool's own are; another is copied into a
    /// memfd), the RAM file writable by all (QEMU opens it read-write even to map it private);
    /// only a holder of the descriptor can reach them, since the directories they are in are
    /// root's alone, and no QEMU can read another uid's /proc/PID/fd.
    private func openFiles(_ machine: MachineSpec, into plan: inout LaunchPlan) throws(DriverError) -> QemuFiles {
        var files = QemuFiles()
        files.marker = try plan.open("/dev/null", O_RDONLY, vm: id)
        let chardevs: [(String, String)] =
            [
                ("qmp", paths.qmpSocket(id)), ("qmpo", paths.observerSocket(id)), ("hvc", paths.consoleSocket(id)),
                ("ctl", paths.agentSocket(id)),
            ] + (0..<Self.execPorts).map { ("x\($0)", paths.execSocket(id, port: $0)) }
        for (chardev, path) in chardevs {
            unlink(path)
            let fd = vmpool_unix_listen(path, 8)
            guard fd >= 0 else {
                throw DriverError(.io, "cannot listen on \(path): \(String(cString: strerror(errno)))", vm: id)
            }
            chmod(path, 0o600)
            files.sockets[chardev] = plan.pass(fd)
        }
        if !machine.memory.isClone {
            files.kernel = try readableByQEMU(machine.shape.image.kernel, emptied: true, into: &plan)
            // QEMU maps the initrd for the VM's life (to hand it to the guest at each boot): its
            // copy stays, 3.4 MiB for vmpool's own.
            files.initrd = try machine.shape.image.initrd.map { path throws(DriverError) in
                try readableByQEMU(path, emptied: false, into: &plan)
            }
        }
        switch machine.memory {
        case .anonymous:
            break
        case .templateShared(let file):
            files.memory = try plan.open(file, O_RDWR | O_CREAT | O_EXCL, mode: 0o666, vm: id)
            // QEMU sizes only a file it created itself; mapped beyond its end, RAM would fault.
            guard fchmod(plan.fds.last!, 0o666) == 0,
                ftruncate(plan.fds.last!, off_t(machine.shape.memoryMiB) << 20) == 0
            else {
                throw DriverError(.io, "cannot size the RAM file \(file): \(String(cString: strerror(errno)))", vm: id)
            }
        case .clonePrivate(let file):
            files.memory = try plan.open(file, O_RDWR, vm: id)
        case .cloneCopy(let file):
            // A memfd: it goes with QEMU, whatever ends it, and anyone holding it may open it.
            let source = Glibc.open(file, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
            guard source >= 0 else {
                throw DriverError(.notFound, "template memory \(file): \(String(cString: strerror(errno)))", vm: id)
            }
            defer { close(source) }
            let copy = vmpool_memfd_copy_sparse(source, "vmpool-ram")
            guard copy >= 0 else {
                throw DriverError(.io, "cannot copy the template's memory: \(String(cString: strerror(errno)))", vm: id)
            }
            files.memory = plan.pass(copy)
        }
        if case .tap(let name, _) = machine.nic?.backend {
            let fd = vmpool_tap_open(name)
            guard fd >= 0 else {
                throw DriverError(.io, "cannot attach to tap \(name): \(String(cString: strerror(errno)))", vm: id)
            }
            files.tap = plan.pass(fd)
        }
        for disk in machine.disks {
            var layers = [QemuFiles.DiskLayer(fd: try plan.open(disk.path, O_RDWR, vm: id), format: "qcow2")]
            for backing in disk.backingChain {
                layers.append(
                    QemuFiles.DiskLayer(fd: try plan.open(backing.path, O_RDONLY, vm: id), format: backing.format))
            }
            files.disks.append(layers)
        }
        return files
    }

    /// A descriptor QEMU can reopen by /proc/self/fd. Confined, a copy in a memfd (which anyone
    /// holding it may open, whatever the file's mode: the state dir's files are root's, 0600);
    /// `emptied`: emptied once QEMU has read it (`start`), since QEMU keeps the descriptor.
    private func readableByQEMU(_ path: String, emptied: Bool, into plan: inout LaunchPlan) throws(DriverError)
        -> Int32
    {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw DriverError(
                .imageMissing, "image file \(path) is not readable: \(String(cString: strerror(errno)))", vm: id)
        }
        if case .none = confinement { return plan.pass(fd) }
        defer { close(fd) }
        let copy = vmpool_memfd_copy(fd, "vmpool-image")
        guard copy >= 0 else {
            throw DriverError(.io, "cannot copy \(path): \(String(cString: strerror(errno)))", vm: id)
        }
        if emptied { plan.emptiedAfterStart.append(copy) }
        return plan.pass(copy)
    }

    /// Waits for QEMU's monitor to greet: QEMU has initialised and serves its sockets. A QEMU
    /// that exits first fails the start with what it said.
    private func awaitMonitor(pid: Int32, timeout: Duration) throws(DriverError) {
        let deadline = ContinuousClock.now + timeout
        while true {
            guard QemuProcess.isRunning(pid, vm: id, runRoot: paths.runRoot) else {
                let said = (try? String(contentsOfFile: paths.qemuLog(id), encoding: .utf8)) ?? ""
                throw DriverError(
                    .launchFailed,
                    "QEMU exited at start: \(said.trimmingCharacters(in: .whitespacesAndNewlines).suffix(2000))", vm: id
                )
            }
            do throws(DriverError) {
                let qmp = try QMPClient(
                    path: paths.qmpSocket(id), vm: id,
                    timeout: min(.seconds(1), max(deadline - .now, .milliseconds(50))))
                qmp.close()
                return
            } catch {
                guard ContinuousClock.now < deadline else {
                    throw DriverError(
                        .timeout, "QEMU did not answer within \(DurationText.format(timeout)) of its start", vm: id)
                }
                try Interrupt.check()
            }
        }
    }

    /// The control monitor: only the holder of the state dir lock uses it.
    func qmp(timeout: Duration = .seconds(5)) throws(DriverError) -> QMPClient {
        try QMPClient(path: paths.qmpSocket(id), vm: id, timeout: timeout)
    }

    /// The observers' monitor, taken under its host-side lock so observers queue rather than
    /// steal each other's connection. `nil` (with the lock released) when busy past `timeout`.
    func observerQMP(timeout: Duration) throws(DriverError) -> (QMPClient, ChannelLock) {
        let deadline = ContinuousClock.now + timeout
        let name = "the VM's observers' QMP monitor"
        let lock = try ChannelLock(path: paths.observerSocket(id) + ".lock", name: name, until: deadline, vm: id)
        do {
            return (
                try QMPClient(
                    path: paths.observerSocket(id), name: name, vm: id,
                    timeout: max(deadline - .now, .milliseconds(100))), lock
            )
        } catch {
            lock.release()
            throw error
        }
    }

    func agent(timeout: Duration = .seconds(5)) throws(DriverError) -> AgentClient {
        try AgentClient(path: paths.agentSocket(id), vm: id, timeout: timeout)
    }

    // MARK: - Run state

    func pause() throws(DriverError) {
        let qmp = try qmp()
        defer { qmp.close() }
        try qmp.execute("stop")
    }

    /// Resumes and steps the guest clock, which stood still while paused.
    func resume() throws(DriverError) {
        let qmp = try qmp()
        defer { qmp.close() }
        try qmp.execute("cont")
        let agent = try agent()
        defer { agent.close() }
        try agent.waitReady(timeout: .seconds(10), interval: .milliseconds(100))
        try agent.syncTime()
    }

    /// Pauses the VM and writes its device state to `stateFile`; RAM in a shared memory
    /// backend is skipped (`x-ignore-shared`), since it already is in its file.
    func save(to stateFile: String) throws(DriverError) {
        let qmp = try qmp()
        defer { qmp.close() }
        try qmp.execute("stop")
        try qmp.execute(
            "migrate-set-capabilities", ["capabilities": [["capability": "x-ignore-shared", "state": true]]])
        unlink(stateFile)
        let fd = open(stateFile, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw DriverError(.io, "cannot create \(stateFile): \(String(cString: strerror(errno)))", vm: id)
        }
        defer { close(fd) }
        try qmp.execute("getfd", ["fdname": "vmpool-migration"], attaching: fd)
        try qmp.execute("migrate", ["uri": "fd:vmpool-migration"])
        try waitForMigration(qmp, timeout: .seconds(60))
    }

    /// Restores device state from `stateFile` into a VM started with `-incoming defer`,
    /// then runs it and gives it what a clone must not share with its template: the clock,
    /// the RNG, its name and machine id, its network identity.
    @discardableResult
    func restore(from stateFile: String, identity: AgentClient.Identity, timeout: Duration) throws(DriverError)
        -> [(String, Duration)]
    {
        var phases = PhaseClock()
        let qmp = try qmp()
        defer { qmp.close() }
        try qmp.execute(
            "migrate-set-capabilities", ["capabilities": [["capability": "x-ignore-shared", "state": true]]])
        let fd = open(stateFile, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else {
            throw DriverError(.notFound, "template state \(stateFile) is missing", vm: id)
        }
        defer { close(fd) }
        let agent = try agent()
        defer { agent.close() }
        phases.mark("connect")
        try qmp.execute("getfd", ["fdname": "vmpool-migration"], attaching: fd)
        try qmp.execute("migrate-incoming", ["uri": "fd:vmpool-migration"])
        let deadline = ContinuousClock.now + timeout
        while true {
            let state = try qmp.execute("query-status", returning: StatusInfo.self).status
            if state != "inmigrate" {
                guard state == "prelaunch" || state == "paused" || state == "running" else {
                    throw DriverError(.protocolError, "restore ended in state \(state)", vm: id)
                }
                break
            }
            guard ContinuousClock.now < deadline else {
                throw DriverError(.timeout, "restoring the template state took longer than \(timeout)", vm: id)
            }
            try Interrupt.sleep(.milliseconds(1))
        }
        phases.mark("restore")
        try qmp.execute("cont")
        try agent.hello(identity: identity, setClock: configuration.clockSync, timeout: timeout)
        phases.mark("agent")
        return phases.phases
    }

    /// Waits for a cold-booted guest's agent and gives the guest its identity.
    func awaitBoot(identity: AgentClient.Identity, timeout: Duration) throws(DriverError) {
        let agent = try agent()
        defer { agent.close() }
        try agent.waitReady(timeout: timeout)
        try agent.hello(identity: identity, timeout: .seconds(10))
    }

    @discardableResult
    func waitForMigration(_ qmp: QMPClient, timeout: Duration) throws(DriverError) -> MigrationInfo {
        let deadline = ContinuousClock.now + timeout
        while true {
            let info = try qmp.execute("query-migrate", returning: MigrationInfo.self)
            switch info.status {
            case "completed":
                return info
            case "failed", "cancelled":
                throw DriverError(
                    .protocolError, "saving the VM failed: \(info.errorDesc ?? "unknown reason")", vm: id)
            default:
                guard ContinuousClock.now < deadline else {
                    throw DriverError(.timeout, "saving the VM took longer than \(timeout)", vm: id)
                }
                try Interrupt.sleep(.milliseconds(2))
            }
        }
    }

    // MARK: - Hotplug

    /// Plugs CPUs one at a time, lowest free slot first, until `target` are present, each
    /// brought online by the guest before the next is plugged; CPUs plugged earlier that the
    /// guest never brought online are brought online too.
    func addCPUs(to target: Int, maxVcpus: Int) throws(DriverError) {
        guard target <= maxVcpus else {
            throw DriverError(.limitExceeded, "cannot plug \(target) CPUs: the VM's ceiling is \(maxVcpus)", vm: id)
        }
        try whileRunning { qmp throws(DriverError) in
            let agent = try agent()
            defer { agent.close() }
            while true {
                let slots = try qmp.execute("query-hotpluggable-cpus", returning: [HotpluggableCPU].self)
                let present = slots.filter { $0.qomPath != nil }.count
                guard present < target else { break }
                guard
                    let slot = slots.filter({ $0.qomPath == nil }).min(by: {
                        $0.order.lexicographicallyPrecedes($1.order)
                    })
                else {
                    throw DriverError(.limitExceeded, "no free CPU slot for CPU \(present + 1)", vm: id)
                }
                var arguments: [String: Any] = ["driver": slot.type, "id": "cpu-\(slot.slotName)"]
                for (key, value) in slot.props { arguments[key] = value }
                try qmp.execute("device_add", arguments)
                _ = try onlineUntil(agent, what: "CPU") { $0.cpus >= present + 1 }
            }
            _ = try onlineUntil(agent, what: "CPU") { $0.cpus >= target }
        }
    }

    /// Plugs memory as one DIMM until the guest has `targetMiB` online, then has the guest
    /// bring it online; memory plugged earlier but offline is brought online first.
    func addMemory(to targetMiB: Int) throws(DriverError) {
        try whileRunning { qmp throws(DriverError) in
            let agent = try agent()
            defer { agent.close() }
            let plugged = try qmp.execute("query-memory-size-summary", returning: MemorySizeSummary.self).totalMiB
            let addMiB = targetMiB - plugged
            if addMiB > 0 {
                let suffix = String(UInt32.random(in: 0...UInt32.max), radix: 16)
                try qmp.execute(
                    "object-add", ["qom-type": "memory-backend-ram", "id": "mem-\(suffix)", "size": addMiB << 20])
                do throws(DriverError) {
                    try qmp.execute(
                        "device_add", ["driver": "pc-dimm", "id": "dimm-\(suffix)", "memdev": "mem-\(suffix)"])
                } catch {
                    try? qmp.execute("object-del", ["id": "mem-\(suffix)"])
                    throw error
                }
            }
            _ = try onlineUntil(agent, what: "memory") { $0.memoryMiB >= targetMiB }
        }
    }

    /// Asks the guest to online new devices until `done` holds: ACPI delivers a hotplugged
    /// device to the guest some milliseconds after `device_add` returns.
    private func onlineUntil(
        _ agent: AgentClient, what: String, timeout: Duration = .seconds(10), _ done: (AgentClient.Info) -> Bool
    ) throws(DriverError) -> AgentClient.Info {
        let deadline = ContinuousClock.now + timeout
        while true {
            let info = try agent.online()
            if done(info) { return info }
            guard ContinuousClock.now < deadline else {
                throw DriverError(
                    .timeout,
                    "the guest did not bring the new \(what) online (it reports \(info.cpus) CPUs,"
                        + " \(info.memoryMiB) MiB)", vm: id)
            }
            try Interrupt.sleep(.milliseconds(10))
        }
    }

    /// Runs `body` with the VM running; a paused VM is resumed for it and paused again,
    /// since only a running guest can bring devices online.
    private func whileRunning(_ body: (QMPClient) throws(DriverError) -> Void) throws(DriverError) {
        let qmp = try qmp()
        defer { qmp.close() }
        let wasRunning = try qmp.execute("query-status", returning: StatusInfo.self).running
        if !wasRunning { try qmp.execute("cont") }
        defer { if !wasRunning { try? qmp.execute("stop") } }
        try body(qmp)
    }

    // MARK: - Status and stop

    /// Process, then hypervisor, then (`.guest`, running VMs) the agent.
    ///
    /// `.hypervisor` asks the observers' monitor in one round trip and never touches the
    /// agent: an apply running meanwhile keeps its channels. `.guest` (the lock holder) asks
    /// the control monitor and the agent, and tells a busy agent channel from a silent guest.
    func status(depth: StatusDepth, agentTimeout: Duration = .seconds(2)) -> VMStatus {
        guard let pid, QemuProcess.isRunning(pid, vm: id, runRoot: paths.runRoot) else {
            // Its cgroup outlives it until the VM is stopped: it tells a memory limit's kill.
            if cgroups?.oomKilled(vm: id) == true {
                return VMStatus(
                    liveness: .gone, fault: "QEMU was killed by its memory limit (its cgroup's OOM killer)")
            }
            return .gone
        }
        let qmp: QMPClient
        var observerLock: ChannelLock?
        do throws(DriverError) {
            switch depth {
            case .guest:
                qmp = try self.qmp(timeout: .seconds(3))
            case .hypervisor:
                (qmp, observerLock) = try observerQMP(timeout: .seconds(2))
            }
        } catch {
            // A monitor another client holds is not a dead VM; one that refuses us is hung.
            return VMStatus(liveness: error.code == .busy ? .alive : .hung)
        }
        defer {
            qmp.close()
            observerLock?.release()
        }
        let answers: (StatusInfo, Int, Int)
        do throws(DriverError) {
            let status = try qmp.send("query-status")
            let cpus = try qmp.send("query-cpus-fast")
            let memory = try qmp.send("query-memory-size-summary")
            answers = (
                try qmp.receive(status, as: StatusInfo.self, command: "query-status", timeout: .seconds(3)),
                try qmp.receive(cpus, as: [QMPIgnored].self, command: "query-cpus-fast", timeout: .seconds(3)).count,
                try qmp.receive(memory, as: MemorySizeSummary.self, command: "query-memory-size-summary").totalMiB
            )
        } catch {
            return VMStatus(liveness: .hung)
        }
        var status = VMStatus(
            liveness: .alive, running: answers.0.running, vcpus: answers.1, memoryMiB: answers.2)
        status.fault = fault(answers.0.status, qmp)
        guard depth == .guest, answers.0.running else { return status }
        do throws(DriverError) {
            let agent = try agent(timeout: agentTimeout)
            defer { agent.close() }
            let info = try agent.info(timeout: agentTimeout)
            status.agent = .answers
            // What the guest has online counts: a CPU plugged but never onlined is not converged.
            status.vcpus = min(info.cpus, answers.1)
            status.memoryMiB = min(Self.roundToBlocks(info.memoryMiB), answers.2)
        } catch {
            status.agent = error.code == .busy || agentChannelHasOtherClient(qmp) ? .busy : .silent
        }
        return status
    }

    /// Why QEMU stopped the VM on its own, from its run state: an I/O error (with the disk, from
    /// `query-block`; QEMU stops a VM whose disk write found no space), an internal error, a
    /// guest panic; `nil` for running, paused and the states of a VM being set up.
    func fault(_ state: String, _ qmp: QMPClient) -> String? {
        switch state {
        case "io-error":
            let devices = (try? qmp.execute("query-block", returning: [BlockInfo].self)) ?? []
            let failed = devices.compactMap { device -> String? in
                guard let io = device.ioStatus, io != "ok", let qdev = device.qdev else { return nil }
                // vd0, vd1... are the guest's vda, vdb...
                let index = qdev.split(separator: "/").first { $0.hasPrefix("vd") }.flatMap { Int($0.dropFirst(2)) }
                let disk = index.map { "vd" + String(UnicodeScalar(UInt8(97 + min($0, 25)))) } ?? qdev
                return io == "nospace" ? "no space left on the host for disk \(disk)" : "an I/O error on disk \(disk)"
            }
            return "QEMU stopped the VM: " + (failed.isEmpty ? "an I/O error" : failed.joined(separator: ", "))
        case "internal-error": return "QEMU stopped the VM on an internal error"
        case "guest-panicked": return "the guest kernel panicked"
        case "shutdown": return "the guest shut down"
        default: return nil
        }
    }

    /// Whether someone other than us holds the agent's socket (QEMU serves one client; our
    /// own connection waits in the backlog, so a connected client is someone else).
    private func agentChannelHasOtherClient(_ qmp: QMPClient) -> Bool {
        guard let chardevs = try? qmp.execute("query-chardev", returning: [ChardevInfo].self) else { return false }
        return chardevs.first { $0.label == "ctl" }?.hasClient ?? false
    }

    /// Memory online as the guest counts it, rounded to whole 128 MiB blocks: the first block
    /// of a small guest can be partly reserved by firmware.
    static func roundToBlocks(_ mib: Int) -> Int {
        let block = 128
        return (mib + block / 2) / block * block
    }

    /// Forwards the VM's guest ports from 127.0.0.1 (user-mode networking), set once it runs:
    /// a clone's forwards are its own, not its template's.
    func forwardPorts(_ network: NetworkAssignment?) throws(DriverError) {
        guard let network, network.mode == .user, !network.ports.isEmpty else { return }
        let qmp = try qmp()
        defer { qmp.close() }
        for (guest, host) in network.ports.sorted(by: { $0.key < $1.key }) {
            let answer = try qmp.execute(
                "human-monitor-command", ["command-line": "hostfwd_add net0 tcp:127.0.0.1:\(host)-:\(guest)"],
                returning: String.self)
            let text = answer.trimmingCharacters(in: .whitespacesAndNewlines)
            guard text.isEmpty else {
                throw DriverError(
                    .launchFailed, "cannot forward 127.0.0.1:\(host) to guest port \(guest): \(text)", vm: id)
            }
        }
    }

    /// `quit`, then SIGKILL after the grace period; removes the run dir and tap either way.
    func stop() {
        let pid = self.pid ?? QemuProcess.readPid(paths.pidFile(id))
        if let pid, QemuProcess.isRunning(pid, vm: id, runRoot: paths.runRoot) {
            if let qmp = try? qmp(timeout: .seconds(2)) {
                try? qmp.execute("quit", timeout: .seconds(2))
                qmp.close()
            }
            if !QemuProcess.waitForExit(pid, vm: id, runRoot: paths.runRoot, timeout: configuration.stopGrace) {
                QemuProcess.kill(pid, vm: id, runRoot: paths.runRoot)
            }
        }
        try? FileManager.default.removeItem(atPath: paths.vmDirectory(id))
        HostNetwork.removeTap(NetworkAssignment.tapName(for: id))
        try? cgroups?.remove(vm: id, kill: true)
    }
}

/// Durations of the named phases of an operation, for debug logs.
struct PhaseClock {
    private var last = ContinuousClock.now
    private(set) var phases: [(String, Duration)] = []

    mutating func mark(_ name: String) {
        let now = ContinuousClock.now
        phases.append((name, now - last))
        last = now
    }

    static func describe(_ phases: [(String, Duration)]) -> String {
        phases.map { name, duration in
            "\(name)=\(duration.milliseconds)ms"
        }.joined(separator: " ")
    }
}
