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

    // MARK: - Start

    /// The QEMU argument vector. Every value from a manifest is its own argv element or a
    /// JSON value; paths inside `key=value` option lists are comma-escaped.
    func arguments(shape: VMShape, memory: MemoryMode, incoming: Bool) -> [String] {
        var args = ["-name", "guest=\(id)", "-nodefaults", "-no-user-config", "-display", "none"]
        switch accelerator {
        case .tcg:
            // qemu64 with an Intel family 6 identity: Linux then trusts the TSC as constant and
            // skips the delay-loop calibration on every hotplugged CPU (TCG refuses +invtsc).
            // Measured: CPU hotplug 238/140/151 ms with plain qemu64, 155/48/58 ms with this.
            args += [
                "-accel", "tcg,tb-size=\(configuration.tcgCacheMiB)", "-cpu",
                "qemu64,vendor=GenuineIntel,family=6,model=15",
            ]
        case .kvm:
            args += ["-accel", "kvm", "-cpu", "host"]
        }
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
        if case .clonePrivate = memory {
            // A clone's kernel is in the template's RAM already; loading it again costs
            // 10 ms and 13 MiB per clone.
            args += ["-no-reboot"]
        } else {
            args += ["-kernel", shape.image.kernel]
            if let initrd = shape.image.initrd { args += ["-initrd", initrd] }
            args += ["-append", shape.image.cmdline]
        }
        args += [
            "-chardev", "socket,id=qmp,path=\(QemuOpts.escape(paths.qmpSocket(id))),server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-chardev", "file,id=console,path=\(QemuOpts.escape(paths.consoleLog(id)))",
            "-serial", "chardev:console",
            "-chardev", "socket,id=agent,path=\(QemuOpts.escape(paths.agentSocket(id))),server=on,wait=off",
            "-serial", "chardev:agent",
            "-pidfile", paths.pidFile(id), "-daemonize",
        ]
        if incoming { args += ["-S", "-incoming", "defer"] }
        if sandbox {
            // spawn and elevateprivileges stay allowed: -daemonize forks and calls setsid after
            // the filter is installed, and -runas drops privileges then.
            args += ["-sandbox", Self.sandboxOptions]
        }
        if let user = configuration.runAs { args += ["-runas", user] }
        return args
    }

    /// Starts QEMU; the process is running and its sockets listen when this returns.
    mutating func start(shape: VMShape, memory: MemoryMode, incoming: Bool) throws(DriverError) {
        var needed = [shape.image.kernel, shape.image.initrd].compactMap { $0 }
        if case .clonePrivate = memory { needed = [] }
        for path in needed where access(path, R_OK) != 0 {
            throw DriverError(.imageMissing, "image file \(path) does not exist or is not readable", vm: id)
        }
        let dir = paths.vmDirectory(id)
        try? FileManager.default.removeItem(atPath: dir)
        guard mkdir(dir, 0o700) == 0 else {
            throw DriverError(.io, "cannot create \(dir): \(String(cString: strerror(errno)))", vm: id)
        }
        try QemuProcess.launch(
            binary: configuration.binary, arguments: arguments(shape: shape, memory: memory, incoming: incoming), vm: id)
        guard let pid = QemuProcess.readPid(paths.pidFile(id)) else {
            throw DriverError(.launchFailed, "QEMU started but wrote no pid file", vm: id)
        }
        self.pid = pid
        // QEMU's -daemonize sets umask 027; keep what it created private to this user.
        for file in [paths.qmpSocket(id), paths.agentSocket(id), paths.consoleLog(id), paths.pidFile(id)] {
            chmod(file, 0o600)
        }
        if case .templateShared(let file) = memory { chmod(file, 0o600) }
    }

    func qmp(timeout: Duration = .seconds(5)) throws(DriverError) -> QMPClient {
        try QMPClient(path: paths.qmpSocket(id), vm: id, timeout: timeout)
    }

    func agent() throws(DriverError) -> AgentClient {
        try AgentClient(path: paths.agentSocket(id), vm: id)
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
        let fd = open(stateFile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw DriverError(.io, "cannot create \(stateFile): \(String(cString: strerror(errno)))", vm: id)
        }
        defer { close(fd) }
        try qmp.execute("getfd", ["fdname": "vmpool-migration"], attaching: fd)
        try qmp.execute("migrate", ["uri": "fd:vmpool-migration"])
        try waitForMigration(qmp, timeout: .seconds(60))
    }

    /// Restores device state from `stateFile` into a VM started with `-incoming defer`,
    /// then runs it and refreshes what a clone must not share with its template: the
    /// clock and the RNG.
    @discardableResult
    func restore(from stateFile: String, timeout: Duration) throws(DriverError) -> [(String, Duration)] {
        var phases = PhaseClock()
        let qmp = try qmp()
        defer { qmp.close() }
        try qmp.execute(
            "migrate-set-capabilities", ["capabilities": [["capability": "x-ignore-shared", "state": true]]])
        let fd = open(stateFile, O_RDONLY | O_CLOEXEC)
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
            let status = try qmp.execute("query-status") as? [String: Any]
            let state = status?["status"] as? String ?? ""
            if state != "inmigrate" {
                guard state == "prelaunch" || state == "paused" || state == "running" else {
                    throw DriverError(.protocolError, "restore ended in state \(state)", vm: id)
                }
                break
            }
            guard ContinuousClock.now < deadline else {
                throw DriverError(.timeout, "restoring the template state took longer than \(timeout)", vm: id)
            }
            usleep(1_000)
        }
        phases.mark("restore")
        try qmp.execute("cont")
        try agent.hello(timeout: timeout)
        phases.mark("agent")
        return phases.phases
    }

    private func waitForMigration(_ qmp: QMPClient, timeout: Duration) throws(DriverError) {
        let deadline = ContinuousClock.now + timeout
        while true {
            let info = try qmp.execute("query-migrate") as? [String: Any]
            switch info?["status"] as? String {
            case "completed":
                return
            case "failed", "cancelled":
                let why = info?["error-desc"] as? String ?? "unknown reason"
                throw DriverError(.protocolError, "saving the VM failed: \(why)", vm: id)
            default:
                guard ContinuousClock.now < deadline else {
                    throw DriverError(.timeout, "saving the VM took longer than \(timeout)", vm: id)
                }
                usleep(2_000)
            }
        }
    }

    // MARK: - Hotplug

    /// Plugs CPUs one at a time, lowest free slot first, until `target` are present, each
    /// brought online by the guest before the next is plugged.
    func addCPUs(to target: Int, maxVcpus: Int) throws(DriverError) {
        guard target <= maxVcpus else {
            throw DriverError(.limitExceeded, "cannot plug \(target) CPUs: the VM's ceiling is \(maxVcpus)", vm: id)
        }
        try whileRunning { qmp throws(DriverError) in
            let agent = try agent()
            defer { agent.close() }
            while true {
                guard let slots = try qmp.execute("query-hotpluggable-cpus") as? [[String: Any]] else {
                    throw DriverError(.protocolError, "query-hotpluggable-cpus answered nothing usable", vm: id)
                }
                let present = slots.filter { $0["qom-path"] != nil }.count
                guard present < target else { break }
                let free = slots.filter { $0["qom-path"] == nil }.compactMap { slot -> ([Int], String, [String: Any])? in
                    guard let type = slot["type"] as? String, let props = slot["props"] as? [String: Any] else {
                        return nil
                    }
                    return (Self.slotOrder(props), type, props)
                }.sorted { $0.0.lexicographicallyPrecedes($1.0) }
                guard let (_, type, props) = free.first else {
                    throw DriverError(.limitExceeded, "no free CPU slot for CPU \(present + 1)", vm: id)
                }
                var arguments: [String: Any] = ["driver": type, "id": "cpu-\(Self.slotName(props))"]
                for (key, value) in props { arguments[key] = value }
                try qmp.execute("device_add", arguments)
                _ = try onlineUntil(agent, what: "CPU") { $0.cpus >= present + 1 }
            }
        }
    }

    /// Plugs `addMiB` of memory as one DIMM, then has the guest bring it online.
    func addMemory(_ addMiB: Int) throws(DriverError) {
        guard addMiB > 0 else { return }
        try whileRunning { qmp throws(DriverError) in
            let agent = try agent()
            defer { agent.close() }
            let before = try agent.info()
            let suffix = String(UInt32.random(in: 0...UInt32.max), radix: 16)
            try qmp.execute(
                "object-add", ["qom-type": "memory-backend-ram", "id": "mem-\(suffix)", "size": addMiB << 20])
            do throws(DriverError) {
                try qmp.execute("device_add", ["driver": "pc-dimm", "id": "dimm-\(suffix)", "memdev": "mem-\(suffix)"])
            } catch {
                _ = try? qmp.execute("object-del", ["id": "mem-\(suffix)"])
                throw error
            }
            _ = try onlineUntil(agent, what: "memory") { $0.memoryMiB >= before.memoryMiB + addMiB * 9 / 10 }
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
                    .timeout, "the guest did not bring the new \(what) online (it reports \(info.cpus) CPUs,"
                        + " \(info.memoryMiB) MiB)", vm: id)
            }
            usleep(10_000)
        }
    }

    /// Runs `body` with the VM running; a paused VM is resumed for it and paused again,
    /// since only a running guest can bring devices online.
    private func whileRunning(_ body: (QMPClient) throws(DriverError) -> Void) throws(DriverError) {
        let qmp = try qmp()
        defer { qmp.close() }
        let status = try qmp.execute("query-status") as? [String: Any]
        let wasRunning = (status?["running"] as? Bool) ?? false
        if !wasRunning { try qmp.execute("cont") }
        defer { if !wasRunning { _ = try? qmp.execute("stop") } }
        try body(qmp)
    }

    private static func slotOrder(_ props: [String: Any]) -> [Int] {
        ["socket-id", "core-id", "thread-id"].map { (props[$0] as? NSNumber)?.intValue ?? 0 }
    }

    /// `s1-c0-t0`: unique per CPU slot, so device ids never collide with earlier plugs.
    private static func slotName(_ props: [String: Any]) -> String {
        ["socket-id", "core-id", "thread-id"].map { key in
            "\(key.first!)\((props[key] as? NSNumber)?.intValue ?? 0)"
        }.joined(separator: "-")
    }

    // MARK: - Status and stop

    /// Process, hypervisor and (for running VMs) agent, asked in that order.
    func status(agentTimeout: Duration = .seconds(2)) -> VMStatus {
        guard let pid, QemuProcess.isRunning(pid, vm: id, runRoot: paths.runRoot) else { return .gone }
        guard let qmp = try? qmp(timeout: .seconds(3)) else { return VMStatus(liveness: .hung) }
        defer { qmp.close() }
        guard let status = try? qmp.execute("query-status", timeout: .seconds(3)) as? [String: Any] else {
            return VMStatus(liveness: .hung)
        }
        let running = status["running"] as? Bool ?? false
        let cpus = (try? qmp.execute("query-cpus-fast") as? [Any])?.count
        var memory: Int?
        if let summary = try? qmp.execute("query-memory-size-summary") as? [String: Any] {
            let base = (summary["base-memory"] as? Int) ?? 0
            let plugged = (summary["plugged-memory"] as? Int) ?? 0
            memory = (base + plugged) >> 20
        }
        var answers: Bool?
        if running {
            if let agent = try? agent() {
                answers = (try? agent.request("ping", timeout: agentTimeout)) != nil
                agent.close()
            } else {
                answers = false
            }
        }
        return VMStatus(liveness: .alive, running: running, agentAnswers: answers, vcpus: cpus, memoryMiB: memory)
    }

    /// `quit`, then SIGKILL after the grace period; removes the run dir either way.
    func stop() {
        let pid = self.pid ?? QemuProcess.readPid(paths.pidFile(id))
        if let pid, QemuProcess.isRunning(pid, vm: id, runRoot: paths.runRoot) {
            if let qmp = try? qmp(timeout: .seconds(2)) {
                _ = try? qmp.execute("quit", timeout: .seconds(2))
                qmp.close()
            }
            if !QemuProcess.waitForExit(pid, vm: id, runRoot: paths.runRoot, timeout: configuration.stopGrace) {
                QemuProcess.kill(pid, vm: id, runRoot: paths.runRoot)
            }
        }
        try? FileManager.default.removeItem(atPath: paths.vmDirectory(id))
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
