import CVmpoolSys
import Foundation
import Logging
import Synchronization
import VmpoolDriver
import VmpoolSpec

/// The real hypervisor: one QEMU process per VM, controlled over QMP, guests answering
/// through the vmpool agent.
public final class QemuDriver: HypervisorDriver {
    public let name = "qemu"
    public let configuration: QemuConfiguration
    let paths: QemuPaths
    let logger: Logger
    private let accelerator = Mutex<ResolvedAccelerator?>(nil)
    /// The host's cgroup layout, detected once (confined VMs only).
    private let cgroupLayout = Mutex<Result<CgroupLayout, DriverError>?>(nil)
    /// Who QEMU runs as, decided when the driver is made.
    let confinement: Confinement
    /// The network walls, where VMs are confined; `nil` then means nft is missing (a launch
    /// fails rather than run a VM unwalled).
    let walls: NetworkWalls?
    private let sandboxSupport = Mutex<Bool?>(nil)

    public init(configuration: QemuConfiguration, logger: Logger) throws(DriverError) {
        self.configuration = configuration
        self.paths = QemuPaths(configuration: configuration)
        self.logger = logger
        confinement = try Confinement.resolve(configuration)
        if case .none(let reason) = confinement {
            logger.debug("VMs are not confined: \(reason)")
            walls = nil
        } else {
            let stateDirectory = paths.stateDirectory
            walls = (QemuProcess.resolve("nft") ?? ["/usr/sbin/nft", "/sbin/nft"].first { access($0, X_OK) == 0 })
                .map { NetworkWalls(stateDirectory: stateDirectory, nft: $0) }
        }
        let longest = paths.longestSocketPath
        guard longest <= 107 else {
            throw DriverError(
                .hostUnsupported,
                "the state dir path is too long for QEMU's Unix sockets (\(longest) of 107 bytes);"
                    + " use a state dir of at most \(107 - (longest - paths.stateDirectory.utf8.count)) characters")
        }
        for dir in [paths.runRoot, paths.templateRoot] {
            try PrivateDirectory.make(dir)
        }
    }

    /// The accelerator, probed on first use with the kernel about to boot. Blocking (the
    /// probe boots a kernel): call it from `Blocking.run` only.
    func accelerator(kernel: String) -> ResolvedAccelerator {
        accelerator.withLock { value in
            if let value { return value }
            let resolved = AcceleratorProbe.resolve(
                configuration.accelerator, binary: configuration.binary, paths: paths, kernel: kernel,
                confinement: confinement)
            logger.debug("accelerator: \(resolved.rawValue)")
            value = resolved
            return resolved
        }
    }

    /// Whether this QEMU accepts vmpool's `-sandbox` options (it lacks them when built without
    /// seccomp); asked once, with `-version`, which QEMU handles after parsing the options before it.
    /// Blocking (it runs QEMU): call it from `Blocking.run` only.
    var sandboxSupported: Bool {
        sandboxSupport.withLock { value in
            if let value { return value }
            let supported =
                QemuProcess.resolve(configuration.binary).map { path in
                    (try? Spawn.run(path, ["-sandbox", QemuVM.sandboxOptions, "-version"]))?.status == 0
                } ?? false
            if !supported { logger.notice("this QEMU has no seccomp sandbox; starting VMs without -sandbox") }
            value = supported
            return supported
        }
    }

    /// A handle on one VM. Starting a VM needs the accelerator and sandbox (`kernel` given),
    /// which may probe the host: then this blocks and must run inside `Blocking.run`.
    func vm(_ id: String, pid: Int32? = nil, kernel: String? = nil) -> QemuVM {
        var machine = QemuVM(
            id: id, paths: paths, configuration: configuration,
            accelerator: kernel.map { accelerator(kernel: $0) } ?? .tcg,
            pid: pid ?? QemuProcess.readPid(paths.pidFile(id)))
        machine.sandbox = kernel != nil && configuration.sandbox && sandboxSupported
        machine.confinement = confinement
        machine.walls = walls
        machine.cgroups = cgroups(accelerator: machine.accelerator)
        return machine
    }

    /// The VMs' cgroups, where VMs are confined (the layout detected on first use; a host
    /// where cgroups cannot be managed fails each launch with what is missing).
    func cgroups(accelerator: ResolvedAccelerator) -> VMCgroups? {
        guard case .users = confinement, configuration.cgroups else { return nil }
        let layout = cgroupLayout.withLock { layout in
            if let layout { return layout }
            let detected = CgroupLayout.detect()
            layout = detected
            return detected
        }
        return VMCgroups(
            stateDirectory: configuration.stateDirectory,
            translationCacheMiB: accelerator == .tcg ? configuration.tcgCacheMiB : nil, layout: layout)
    }

    /// The name, machine id and network a VM's guest is given at boot or after a clone.
    static func identity(of id: String, network: NetworkAssignment?) -> AgentClient.Identity {
        AgentClient.Identity(
            hostname: VMID.hostname(of: id), machineID: AgentClient.entropyHex(bytes: 16),
            network: network?.guestConfiguration)
    }

    /// The NIC of a VM (or template, or standby) with `shape`'s network.
    static func nic(_ shape: NetworkShape?, vm: String) -> NICAttachment? {
        guard let shape else { return nil }
        switch shape.mode {
        case .none: return nil
        case .user: return NICAttachment(backend: .user, mac: NetworkAssignment.mac(for: vm))
        case .bridge:
            return NICAttachment(
                backend: .tap(
                    name: NetworkAssignment.tapName(for: vm), bridge: shape.bridge ?? NetworkSpec.defaultBridge),
                mac: NetworkAssignment.mac(for: vm))
        }
    }

    // MARK: - HypervisorDriver

    public func create(_ request: LaunchRequest) async throws(DriverError) -> LaunchedVM {
        let bootTimeout = configuration.bootTimeout
        return try await Blocking.run { () throws(DriverError) -> LaunchedVM in
            var machine = self.vm(request.id, kernel: request.shape.image.kernel)
            do throws(DriverError) {
                var spec = MachineSpec(
                    shape: request.shape, memory: .anonymous, incoming: false,
                    disks: Overlay.overBases(request.shape.disks, scratch: true) {
                        self.paths.overlay(request.id, disk: $0)
                    },
                    nic: Self.nic(request.shape.network, vm: request.id), pool: request.pool,
                    address: request.network?.address, limits: request.walls.limits)
                if let mac = request.network?.mac { spec.nic?.mac = mac }
                try machine.start(spec)
                try machine.forwardPorts(request.network)
                try machine.awaitBoot(
                    identity: Self.identity(of: request.id, network: request.network), timeout: bootTimeout)
                if let preparation = request.shape.preparation {
                    try self.preparation(of: machine, log: self.paths.setupLog(request.id)).prepare(preparation)
                }
                if request.state == .paused { try machine.pause() }
            } catch {
                Undo.run { machine.stop() }
                throw error
            }
            return LaunchedVM(pid: machine.pid, shape: request.shape)
        }
    }

    public func buildTemplate(_ template: TemplateRef) async throws(DriverError) {
        try PrivateDirectory.make(paths.memoryRoot)
        let memoryFile = paths.memoryFile(template: template.id)
        let stateFile = paths.stateFile(template: template.id)
        let bootTimeout = configuration.bootTimeout
        let disks = Overlay.overBases(template.key.disks, scratch: false) {
            self.paths.templateDisk(template: template.id, disk: $0)
        }
        try await Blocking.run { () throws(DriverError) in
            var machine = self.vm(template.id, kernel: template.key.image.kernel)
            defer { Undo.run { machine.stop() } }
            unlink(memoryFile)
            for disk in disks { unlink(disk.path) }
            do throws(DriverError) {
                // The template's disks are written while it boots and frozen when its memory is
                // saved: clones start from exactly the disk their memory knows.
                try machine.start(
                    MachineSpec(
                        shape: template.key.shape, memory: .templateShared(memoryFile), incoming: false, disks: disks,
                        nic: Self.nic(template.key.network, vm: template.id), pool: template.pool))
                let agent = try machine.agent()
                defer { agent.close() }
                try agent.waitReady(timeout: bootTimeout)
                // A NIC comes up once, in the template: its clones only change MAC and address.
                if template.key.network != nil {
                    try agent.hello(
                        identity: AgentClient.Identity(
                            hostname: VMID.hostname(of: template.id), machineID: AgentClient.entropyHex(bytes: 16),
                            network: "eth0,\(NetworkAssignment.mac(for: template.id)),-,-"),
                        timeout: .seconds(30))
                }
                agent.close()
                if let preparation = template.key.preparation {
                    let log = self.paths.setupLog(template: template.id)
                    unlink(log)
                    try self.preparation(of: machine, log: log).prepare(preparation)
                }
                try Self.settle(machine, paths: self.paths, timeout: bootTimeout)
                try machine.save(to: stateFile + ".tmp")
                guard rename(stateFile + ".tmp", stateFile) == 0 else {
                    throw DriverError(.io, "cannot move the template state into place", vm: template.id)
                }
                ConsoleLog.keep(machine, as: self.paths.bootLog(template: template.id))
            } catch {
                unlink(memoryFile)
                unlink(stateFile + ".tmp")
                unlink(self.paths.bootLog(template: template.id))
                for disk in disks { unlink(disk.path) }
                throw error
            }
        }
        let freed = try await Blocking.run { () throws(DriverError) in Self.freeZeroPages(memoryFile) }
        if let freed { logger.debug("template \(template.id): \(freed >> 20) MiB of zero pages given back") }
    }

    /// Runs a pool's preparation in `machine` through its agent.
    func preparation(of machine: QemuVM, log: String?) -> GuestPreparation {
        GuestPreparation(
            paths: paths, vm: machine.id, log: log,
            stopped: { machine.status(depth: .hypervisor, agentTimeout: .seconds(1)).fault })
    }

    /// Gives back the pages of a saved template's memory file that hold only zeros (28 of 139
    /// MiB for the Debian template): tmpfs keeps every page it was given until the file goes,
    /// and a hole reads as the same zeros, to clones mapping the file and to restores. Best
    /// effort: the bytes given back, or nil.
    static func freeZeroPages(_ path: String) -> Int64? {
        let fd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        let result = vmpool_punch_zero_pages(fd)
        return result >= 0 ? Int64(result) : nil
    }

    public func clone(_ request: LaunchRequest, from template: TemplateRef) async throws(DriverError) -> LaunchedVM {
        try await restore(request, from: template)
    }

    /// Starts `request`'s VM from a saved template: a pool's (`clone`), or a fork's snapshot of
    /// a running VM, whose disks may lie over the source's own template (`underlay`), whose RAM
    /// block may be named otherwise (`ramID`), and whose guest was ready when it was saved.
    func restore(
        _ request: LaunchRequest, from template: TemplateRef, underlay: String? = nil, ramID: String = QemuVM.ramID,
        awaitsReady: Bool = true
    ) async throws(DriverError) -> LaunchedVM {
        let (memoryFile, stateFile) = try savedFiles(of: template, underlay: underlay, for: request.id)
        let timeout = configuration.restoreTimeout
        let logger = self.logger
        return try await Blocking.run { () throws(DriverError) -> LaunchedVM in
            var machine = self.vm(request.id, kernel: template.key.image.kernel)
            do throws(DriverError) {
                var phases = PhaseClock()
                // A standby maps the template's memory shared: a clone that must not share it
                // starts anew.
                if !request.shape.sharesTemplateMemory, machine.pid != nil {
                    Undo.run { machine.stop() }
                    machine.pid = nil
                }
                if let pid = machine.pid, QemuProcess.isRunning(pid, vm: machine.id, runRoot: machine.paths.runRoot) {
                    // A standby's uid is in its pool's walls already; a bridged one learns its address.
                    if let address = request.network?.address, let walls = self.walls,
                        let uid = QemuProcess.owner(pid)
                    {
                        try walls.add(
                            NetworkWalls.Member(
                                uid: uid, pool: request.pool, tap: NetworkAssignment.tapName(for: request.id),
                                address: address), vm: request.id)
                    }
                    phases.mark("standby")
                } else {
                    var spec = self.cloneMachine(
                        template, memoryFile: memoryFile, vm: request.id, address: request.network?.address,
                        underlay: underlay)
                    spec.ramID = ramID
                    spec.limits = request.walls.limits
                    if !request.shape.sharesTemplateMemory { spec.memory = .cloneCopy(memoryFile) }
                    try machine.start(spec)
                    phases.mark("qemu")
                }
                try machine.forwardPorts(request.network)
                let restored = try machine.restore(
                    from: stateFile, identity: Self.identity(of: request.id, network: request.network), timeout: timeout
                )
                if awaitsReady, let ready = template.key.preparation?.ready {
                    try self.preparation(of: machine, log: nil).awaitReady(ready)
                    phases.mark("ready")
                }
                logger.debug(
                    "clone phases: \(PhaseClock.describe(phases.phases + restored))", metadata: ["vm": "\(request.id)"])
                if request.state == .paused { try machine.pause() }
            } catch {
                Undo.run { machine.stop() }
                throw error
            }
            // The template's shape, and how the clone holds its memory (not the template's to say).
            var shape = template.key.shape
            shape.sharesTemplateMemory = request.shape.sharesTemplateMemory
            return LaunchedVM(pid: machine.pid, shape: shape)
        }
    }

    public func prestart(id: String, pool: String, from template: TemplateRef) async throws(DriverError) -> Int32? {
        let (memoryFile, _) = try savedFiles(of: template, for: id)
        return try await Blocking.run { () throws(DriverError) -> Int32? in
            var machine = self.vm(id, kernel: template.key.image.kernel)
            do throws(DriverError) {
                try machine.start(self.cloneMachine(template, memoryFile: memoryFile, vm: id))
            } catch {
                Undo.run { machine.stop() }
                throw error
            }
            return machine.pid
        }
    }

    /// Waits until a guest whose init is systemd has finished booting and gone quiet, so that a
    /// template is saved idle and its clones do not each redo the rest of the boot. systemd
    /// counts a unit started when its process is, so "running" can come while a console
    /// login is still halfway through (PAM, the shell's profile): each clone would finish it,
    /// seconds of CPU under TCG right when it should answer. udevd keeps its idle workers 3 s
    /// after its queue empties, so the wait also lasts until they have exited (at most 60 s,
    /// however loaded the host; a template whose workers outlive that is not saved, and the
    /// build fails with that reason, to be retried):
    /// a template saved with them made every clone reap ten processes right after its restore,
    /// 6 MiB of copied guest memory and 4 MiB of translated code per clone. Then `sync`, so no
    /// clone writes back the template's dirty pages. Quiet: the guest's CPU idle at least 85%
    /// of two half-second samples in a row (at most 30 s). Other guests (the busybox initramfs)
    /// are booted once their agent answers.
    static func settle(_ machine: QemuVM, paths: QemuPaths, timeout: Duration) throws(DriverError) {
        var limits = ExecSession.Limits()
        limits.portWait = .seconds(10)
        let session = try ExecSession(paths: paths, vm: machine.id, limits: limits)
        defer { session.close() }
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { close(null) }
        let script =
            "[ -d /run/systemd/system ] && command -v systemctl >/dev/null || exit 0;"
            + " systemctl is-system-running --wait >/dev/null 2>&1;"
            + " u=$(systemctl show -p MainPID --value systemd-udevd 2>/dev/null); n=0;"
            + " while [ -n \"$u\" ] && [ \"$u\" != 0 ] && [ -n \"$(cat /proc/$u/task/$u/children 2>/dev/null)\" ]"
            + " && [ $n -lt 240 ]; do sleep 0.25; n=$((n + 1)); done;"
            + " [ $n -lt 240 ] || exit 3; sync;"
            + " read -r _ u n s i w q f t _ </proc/stat; all=$((u+n+s+i+w+q+f+t)); idle=$i; quiet=0; tries=0;"
            + " while [ $quiet -lt 2 ] && [ $tries -lt 60 ]; do sleep 0.5;"
            + " read -r _ u n s i w q f t _ </proc/stat; now=$((u+n+s+i+w+q+f+t));"
            + " if [ $((now - all)) -gt 0 ] && [ $(((i - idle) * 100 / (now - all))) -ge 85 ];"
            + " then quiet=$((quiet + 1)); else quiet=0; fi;"
            + " all=$now; idle=$i; tries=$((tries + 1)); done; exit 0"
        let outcome = try session.run(
            ExecRequest(argv: ["/bin/sh", "-c", script], timeout: timeout),
            streams: ExecStreams(stdin: null, stdout: null, stderr: null))
        if outcome == .exited(3) {
            throw DriverError(
                .timeout,
                "the template did not settle: udev's workers were still running 60 s after its queue emptied;"
                    + " it is not saved, and the next pass builds it again", vm: machine.id)
        }
    }

    /// What a clone (or its standby) of `template` runs with: the template's memory file
    /// mapped private, and its own overlays over the template's frozen disks.
    func cloneMachine(
        _ template: TemplateRef, memoryFile: String, vm: String, address: String? = nil, underlay: String? = nil
    ) -> MachineSpec {
        MachineSpec(
            shape: template.key.shape, memory: .clonePrivate(memoryFile), incoming: true,
            disks: Overlay.overTemplate(
                template.key.disks, template: template.id, underlay: underlay, paths: paths, vm: vm),
            nic: Self.nic(template.key.network, vm: vm), pool: template.pool, address: address)
    }

    /// A template's memory, device-state and disk files, which a clone or standby needs present.
    private func savedFiles(of template: TemplateRef, underlay: String? = nil, for vm: String) throws(DriverError)
        -> (memory: String, state: String)
    {
        let memory = paths.memoryFile(template: template.id)
        let state = paths.stateFile(template: template.id)
        let disks = template.key.disks.flatMap { disk in
            ([template.id] + (underlay.map { [$0] } ?? [])).map { paths.templateDisk(template: $0, disk: disk.name) }
        }
        guard ([memory, state] + disks).allSatisfy({ access($0, R_OK) == 0 }) else {
            throw DriverError(.notFound, "template \(template.id) has no saved state", vm: vm)
        }
        return (memory, state)
    }

    public func pause(_ vm: VMRef) async throws(DriverError) {
        let machine = self.vm(vm.id, pid: vm.pid)
        try await Blocking.run { () throws(DriverError) in try machine.pause() }
    }

    public func resume(_ vm: VMRef) async throws(DriverError) {
        let machine = self.vm(vm.id, pid: vm.pid)
        try await Blocking.run { () throws(DriverError) in try machine.resume() }
    }

    public func hotplugCPUs(_ vm: VMRef, shape: VMShape, to vcpus: Int) async throws(DriverError) {
        let machine = self.vm(vm.id, pid: vm.pid)
        try await Blocking.run { () throws(DriverError) in try machine.addCPUs(to: vcpus, maxVcpus: shape.maxVcpus) }
    }

    public func hotplugMemory(_ vm: VMRef, shape: VMShape, to memoryMiB: Int) async throws(DriverError) {
        guard memoryMiB <= shape.maxMemoryMiB else {
            throw DriverError(
                .limitExceeded, "cannot grow memory to \(memoryMiB) MiB: the ceiling is \(shape.maxMemoryMiB) MiB",
                vm: vm.id)
        }
        let machine = self.vm(vm.id, pid: vm.pid)
        try await Blocking.run { () throws(DriverError) in try machine.addMemory(to: memoryMiB) }
    }

    public func stop(_ vm: VMRef) async throws(DriverError) {
        let machine = self.vm(vm.id, pid: vm.pid)
        let walls = self.walls
        await Blocking.runQuietly {
            let uid = machine.pid.flatMap { QemuProcess.owner($0) }
            Undo.run { machine.stop() }
            if let walls, let uid, let pool = VMID.pool(of: vm.id) {
                walls.remove(NetworkWalls.Member(uid: uid, pool: pool))
            }
        }
    }

    public func deleteTemplate(id: String) async throws(DriverError) {
        unlink(paths.memoryFile(template: id))
        unlink(paths.stateFile(template: id))
        unlink(paths.stateFile(template: id) + ".tmp")
        unlink(paths.setupLog(template: id))
        unlink(paths.bootLog(template: id))
        unlink(paths.bootLog(template: id) + ".tmp")
        let files = (try? FileManager.default.contentsOfDirectory(atPath: paths.templateRoot)) ?? []
        for file in files where file.hasPrefix(id + ".disk-") { unlink(paths.templateRoot + "/" + file) }
        rmdir(paths.memoryRoot)  // only succeeds once the last template is gone
        let machine = vm(id)
        await Blocking.runQuietly { Undo.run { machine.stop() } }
    }

    public func prepareNetwork(_ shape: NetworkShape) async throws(DriverError) -> Bool {
        guard shape.mode == .bridge, let name = shape.bridge, let subnet = shape.subnet.flatMap(IPv4Subnet.init) else {
            return false
        }
        return try await Blocking.run { () throws(DriverError) -> Bool in
            try HostNetwork.ensureBridge(name, subnet: subnet)
        }
    }

    public func removeBridge(_ name: String) async {
        await Blocking.runQuietly { HostNetwork.removeBridge(name) }
    }

    public func templateExists(_ template: TemplateRef) async -> Bool {
        (try? savedFiles(of: template, for: template.id)) != nil
    }

    public func status(of vms: [VMRef], depth: StatusDepth) async -> [String: VMStatus] {
        await withTaskGroup(of: (String, VMStatus).self) { group in
            for ref in vms {
                let machine = vm(ref.id, pid: ref.pid)
                group.addTask {
                    let status =
                        (try? await Blocking.run { () throws(DriverError) in machine.status(depth: depth) }) ?? .gone
                    return (ref.id, status)
                }
            }
            var result: [String: VMStatus] = [:]
            for await (id, status) in group { result[id] = status }
            return result
        }
    }

    public func discover() async -> [DiscoveredVM] {
        let paths = self.paths
        let binary = QemuProcess.resolve(configuration.binary)
        let users: VMUsers? =
            if case .users(let users) = confinement { users } else { nil }
        return
            (try? await Blocking.run { () throws(DriverError) in
                QemuProcess.discover(runRoot: paths.runRoot, binary: binary, users: users)
            }) ?? []
    }

    public func confinement(of vm: VMRef) async -> [(String, String)] {
        guard let pid = vm.pid, QemuProcess.isRunning(pid, vm: vm.id, runRoot: paths.runRoot) else { return [] }
        var lines: [(String, String)] = []
        let status = String(decoding: QemuProcess.readProcFile("/proc/\(pid)/status", limit: 8192) ?? [], as: UTF8.self)
        func field(_ name: String) -> String? {
            status.split(separator: "\n").first { $0.hasPrefix(name + ":") }.map {
                String($0.dropFirst(name.count + 1)).trimmingCharacters(in: .whitespaces)
            }
        }
        if let uid = QemuProcess.owner(pid) {
            switch confinement {
            case .users(let users) where users.contains(uid):
                lines.append(("user", "uid \(uid), its own (from \(users.user)'s range)"))
            case .users, .none:
                lines.append(("user", uid == 0 ? "root" : "uid \(uid)"))
            }
        }
        var sandbox: [String] = []
        if field("Seccomp") == "2" { sandbox.append("seccomp (QEMU's -sandbox: no spawn, no privileges)") }
        if field("NoNewPrivs") == "1" { sandbox.append("no new privileges") }
        if field("CapEff").map({ $0.allSatisfy { $0 == "0" } }) == true { sandbox.append("no capabilities") }
        if !sandbox.isEmpty { lines.append(("sandbox", sandbox.joined(separator: ", "))) }
        if let walls { lines.append(("network", "behind its pool's walls (nftables table \(walls.table))")) }
        let accelerator = self.accelerator.withLock { $0 } ?? .tcg
        if let report = cgroups(accelerator: accelerator)?.describe(vm: vm.id) {
            lines += report.summary.map { ($0.key, $0.value) }
        }
        return lines
    }

    public func applyWalls(_ policies: [WallPolicy], members: [WallMember], bridges: [String: String])
        async throws(DriverError)
    {
        guard case .users(let users) = confinement else { return }
        guard let walls else {
            throw DriverError(
                .hostUnsupported,
                "nftables (nft) is not installed: the network walls around VMs need it (apt install nftables;"
                    + " VMPOOL_WALLS=0 runs VMs without any walls)")
        }
        // No launch makes its uid known or its cgroup meanwhile (forks launch without the lock).
        let launchLock = try await Blocking.run { () throws(DriverError) -> ChannelLock in
            try ChannelLock(
                path: self.paths.launchLock, name: "the state dir's launch lock", until: .now + .seconds(60), vm: nil)
        }
        defer { launchLock.release() }
        let live = await discover()
        let starting = startingVMs(users).filter { vm in !live.contains { $0.id == vm.id } }
        if policies.isEmpty && live.isEmpty && starting.isEmpty {
            // Nothing left to wall in: the tables go, so that removed state dirs leave no rules.
            try await Blocking.run { () throws(DriverError) in try walls.apply(walls.removal) }
            return
        }
        let addresses = Dictionary(
            members.map { ($0.id, $0.network?.address) }, uniquingKeysWith: { first, _ in first })
        let state = NetworkWalls.State(
            policies: policies,
            members: (live.map { vm in (vm.id, vm.pid.flatMap(QemuProcess.owner)) } + starting.map { ($0.id, $0.uid) })
                .compactMap { id, uid in
                    guard let uid, users.contains(uid), let pool = VMID.pool(of: id) else { return nil }
                    let tap = NetworkAssignment.tapName(for: id)
                    return NetworkWalls.Member(
                        uid: uid, pool: pool, tap: HostNetwork.linkExists(tap) ? tap : nil,
                        address: addresses[id] ?? nil)
                }, bridges: bridges, resolvers: NetworkWalls.resolvers())
        try await Blocking.run { () throws(DriverError) in try walls.apply(walls.script(state)) }
        // Each VM's cgroup: the pool's limits now (a change applies in place), its vCPUs after
        // a hotplug; the cgroups of VMs that are gone (a crash) go.
        if let cgroups = cgroups(accelerator: .tcg), cgroups.unavailable == nil {
            let limits = Dictionary(policies.map { ($0.pool, $0.walls.limits) }, uniquingKeysWith: { a, _ in a })
            let accelerator = self.accelerator.withLock { $0 } ?? .tcg
            let sized = self.cgroups(accelerator: accelerator) ?? cgroups
            await Blocking.runQuietly {
                for member in members {
                    guard let shape = member.shape, live.contains(where: { $0.id == member.id }) else { continue }
                    try? sized.update(
                        vm: member.id,
                        limits: QemuVM.cgroupLimits(
                            shape, member.mapsTemplate ? .clonePrivate("") : .anonymous,
                            limits[member.pool] ?? ResourceLimits()))
                }
                sized.sweep(alive: Set(live.map(\.id) + starting.map(\.id)), kill: true)
            }
        }
    }

    /// VMs being started now, by another vmpool as the case may be (a fork takes no lock):
    /// their uid is held, their process not yet found by `discover`.
    func startingVMs(_ users: VMUsers) -> [(id: String, uid: uid_t)] {
        let dirs = (try? FileManager.default.contentsOfDirectory(atPath: paths.runRoot)) ?? []
        return dirs.compactMap { dir in
            guard let text = try? String(contentsOfFile: paths.runRoot + "/" + dir + "/uid", encoding: .utf8)
            else { return nil }
            let fields = text.split(separator: " ")
            guard fields.count == 2, let uid = uid_t(fields[0]), users.contains(uid), VMUsers.isHeld(uid) else {
                return nil
            }
            let id = fields[1].trimmingCharacters(in: .whitespacesAndNewlines)
            // The file is in the VM's own run dir, named by its id: another name is not believed.
            guard paths.vmDirectory(id) == paths.runRoot + "/" + dir else { return nil }
            return (id, uid)
        }
    }

    public func discoverTemplates() async -> [String] {
        let files = (try? FileManager.default.contentsOfDirectory(atPath: paths.templateRoot)) ?? []
        let memory = (try? FileManager.default.contentsOfDirectory(atPath: paths.memoryRoot)) ?? []
        var ids: [String] = files.filter { $0.hasSuffix(".state") }.map { String($0.dropLast(6)) }
        ids += files.filter { $0.hasSuffix(".state.tmp") }.map { String($0.dropLast(10)) }
        ids += files.filter { $0.hasSuffix(".setup.log") }.map { String($0.dropLast(10)) }
        // A boot log, or its temporary copy, is a template's too (a build killed while keeping it).
        ids += files.filter { $0.hasSuffix(".boot.log") }.map { String($0.dropLast(9)) }
        ids += files.filter { $0.hasSuffix(".boot.log.tmp") }.map { String($0.dropLast(13)) }
        for file in files {
            if let range = file.range(of: ".disk-") { ids.append(String(file[..<range.lowerBound])) }
        }
        ids += memory.filter { $0.hasSuffix(".mem") }.map { String($0.dropLast(4)) }
        return Array(Set(ids)).sorted()
    }
}

/// Undo work runs to the end even when the job that needs it was interrupted: a VM that was
/// being started is stopped and its files removed, never left half made.
enum Undo {
    static func run(_ body: () -> Void) {
        let interrupt = Interrupt.current
        Interrupt.current = nil
        defer { Interrupt.current = interrupt }
        body()
    }
}

/// Directories only this user may enter, checked before use: a directory another local user
/// created in its place (on a shared /dev/shm), or a symlink, is refused, not used.
enum PrivateDirectory {
    static func make(_ path: String) throws(DriverError) {
        if mkdir(path, 0o700) != 0 && errno != EEXIST {
            throw DriverError(.io, "cannot create \(path): \(String(cString: strerror(errno)))")
        }
        var info = stat()
        guard lstat(path, &info) == 0 else {
            throw DriverError(.io, "cannot inspect \(path): \(String(cString: strerror(errno)))")
        }
        guard info.st_mode & S_IFMT == S_IFDIR else {
            throw DriverError(.hostUnsupported, "\(path) is not a directory (a symlink?); refusing to use it")
        }
        guard info.st_uid == geteuid() else {
            throw DriverError(
                .hostUnsupported, "\(path) belongs to uid \(info.st_uid), not to this user; refusing to use it")
        }
        if info.st_mode & 0o7777 != 0o700, chmod(path, 0o700) != 0 {
            throw DriverError(.io, "cannot make \(path) private: \(String(cString: strerror(errno)))")
        }
    }
}
