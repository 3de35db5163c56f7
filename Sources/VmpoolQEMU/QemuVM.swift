import Foundation
import VmpoolDriver

/// Where a VM's RAM comes from.
enum MemoryMode {
    /// Anonymous memory: a cold-booted VM.
    case anonymous
    /// A file on tmpfs mapped shared: the template VM, whose RAM clones will map.
    case templateShared(String)
    /// The template's file mapped private, copy-on-write: a clone.
    case clonePrivate(String)

    var isClone: Bool {
        if case .clonePrivate = self { return true }
        return false
    }
}

/// A disk as QEMU opens it: the VM's own copy-on-write overlay, made when the VM starts.
struct DiskAttachment: Sendable, Hashable {
    /// Its name in the pool (the guest sees it as the serial, /dev/disk/by-id/virtio-NAME).
    var name: String
    /// The overlay (qcow2) the VM writes to.
    var path: String
    /// What the overlay is made over: a base image, or a template's frozen disk; `nil`: empty.
    var backing: String?
    var backingFormat: String?
    /// The virtual size, MiB (`nil`: the backing file's).
    var sizeMiB: Int?
    /// A VM's disk lives and dies with its QEMU process (a stopped or lost VM's overlays are
    /// removed, never booted again), so the guest's flushes need not reach the host's disk:
    /// QEMU skips them. A template's disk is not scratch: clones are made from it.
    var scratch = false
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

    /// seccomp filter options: spawn and elevateprivileges stay allowed (see `arguments`).
    static let sandboxOptions = "on,obsolete=deny,resourcecontrol=deny"

    /// The RAM block id shared by template and clones; migration matches blocks by it.
    static let ramID = "vmpool.ram"

    /// Exec ports per VM: execs and copies that can run at once (more wait for a free one).
    static let execPorts = 8

    /// Size of the console ring that keeps a VM's latest serial output in QEMU's memory.
    static let consoleRingBytes = 256 << 10

    // MARK: - Command line

    /// The QEMU argument vector, from small parts. Every value from a manifest is its own argv
    /// element or a JSON value; paths inside `key=value` option lists are comma-escaped.
    func arguments(_ machine: MachineSpec) -> [String] {
        identityArguments() + acceleratorArguments() + memoryArguments(machine.shape, machine.memory)
            + bootArguments(machine.shape, machine.memory) + channelArguments() + consoleArguments()
            + diskArguments(machine.disks) + nicArguments(machine.nic) + processArguments(incoming: machine.incoming)
    }

    func identityArguments() -> [String] {
        ["-name", "guest=\(id)", "-nodefaults", "-no-user-config", "-display", "none"]
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

    func memoryArguments(_ shape: VMShape, _ memory: MemoryMode) -> [String] {
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
        case .templateShared(let file), .clonePrivate(let file):
            var shared = false
            if case .templateShared = memory { shared = true }
            args += [
                "-object",
                QemuOpts.json([
                    "qom-type": "memory-backend-file", "id": Self.ramID, "size": shape.memoryMiB << 20,
                    "mem-path": file, "share": shared, "prealloc": false,
                ]),
            ]
            machine += ",memory-backend=\(Self.ramID)"
        }
        args += ["-machine", machine, "-m", memoryOption]
        if let firmware = configuration.firmware { args += ["-bios", firmware] }
        args += ["-smp", "cpus=\(shape.vcpus),maxcpus=\(shape.maxVcpus)"]
        return args
    }

    func bootArguments(_ shape: VMShape, _ memory: MemoryMode) -> [String] {
        // A clone's kernel is in the template's RAM already; loading it again costs 10 ms and
        // 13 MiB per clone.
        if memory.isClone { return ["-no-reboot"] }
        var args = ["-kernel", shape.image.kernel]
        if let initrd = shape.image.initrd { args += ["-initrd", initrd] }
        return args + ["-append", shape.image.cmdline]
    }

    /// Two QMP monitors (the lock holder's, and one observers share under a host-side lock)
    /// and the agent's virtio-serial ports: control, then one per concurrent exec, plus an
    /// interactive console (hvc0).
    func channelArguments() -> [String] {
        var args = [
            "-chardev", socket("qmp", paths.qmpSocket(id)), "-mon", "chardev=qmp,mode=control",
            "-chardev", socket("qmpo", paths.observerSocket(id)), "-mon", "chardev=qmpo,mode=control",
            "-device", "virtio-serial-pci,id=vser0,max_ports=\(Self.execPorts + 4)",
            "-chardev", socket("hvc", paths.consoleSocket(id)),
            "-device", "virtconsole,bus=vser0.0,nr=0,chardev=hvc,name=org.vmpool.console",
            "-chardev", socket("ctl", paths.agentSocket(id)),
            "-device", "virtserialport,bus=vser0.0,chardev=ctl,name=org.vmpool.ctl",
        ]
        for port in 0..<Self.execPorts {
            args += [
                "-chardev", socket("x\(port)", paths.execSocket(id, port: port)),
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

    func diskArguments(_ disks: [DiskAttachment]) -> [String] {
        disks.enumerated().flatMap { index, disk in
            [
                "-blockdev",
                QemuOpts.json([
                    "driver": "qcow2", "node-name": "disk\(index)", "discard": "unmap",
                    "cache": ["no-flush": disk.scratch],
                    "file": ["driver": "file", "filename": disk.path, "aio": "threads"],
                ]),
                "-device", "virtio-blk-pci,drive=disk\(index),id=vd\(index),serial=\(disk.name)",
            ]
        }
    }

    func nicArguments(_ nic: NICAttachment?) -> [String] {
        guard let nic else { return [] }
        let netdev: String
        switch nic.backend {
        case .user: netdev = "user,id=net0"
        case .tap(let name, _): netdev = "tap,id=net0,ifname=\(QemuOpts.escape(name)),script=no,downscript=no"
        }
        return ["-netdev", netdev, "-device", "virtio-net-pci,netdev=net0,id=nic0,mac=\(nic.mac)"]
    }

    func processArguments(incoming: Bool) -> [String] {
        var args = ["-pidfile", paths.pidFile(id), "-daemonize"]
        if incoming { args += ["-S", "-incoming", "defer"] }
        if sandbox {
            // spawn and elevateprivileges stay allowed: -daemonize forks and calls setsid after
            // the filter is installed, and -runas drops privileges then.
            args += ["-sandbox", Self.sandboxOptions]
        }
        if let user = configuration.runAs { args += ["-runas", user] }
        return args
    }

    private func socket(_ chardev: String, _ path: String) -> String {
        "socket,id=\(chardev),path=\(QemuOpts.escape(path)),server=on,wait=off"
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
        if case .tap(let name, let bridge) = machine.nic?.backend {
            try HostNetwork.createTap(name, bridge: bridge, vm: id, user: configuration.runAs)
        }
        try QemuProcess.launch(
            binary: configuration.binary, arguments: arguments(machine), vm: id, timeout: configuration.bootTimeout)
        guard let pid = QemuProcess.readPid(paths.pidFile(id)) else {
            throw DriverError(.launchFailed, "QEMU started but wrote no pid file", vm: id)
        }
        self.pid = pid
        // QEMU's -daemonize sets umask 027; keep what it created private to this user.
        for file in paths.createdByQEMU(id) { chmod(file, 0o600) }
        if case .templateShared(let file) = machine.memory { chmod(file, 0o600) }
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

    private func waitForMigration(_ qmp: QMPClient, timeout: Duration) throws(DriverError) {
        let deadline = ContinuousClock.now + timeout
        while true {
            let info = try qmp.execute("query-migrate", returning: MigrationInfo.self)
            switch info.status {
            case "completed":
                return
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
        guard let pid, QemuProcess.isRunning(pid, vm: id, runRoot: paths.runRoot) else { return .gone }
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
