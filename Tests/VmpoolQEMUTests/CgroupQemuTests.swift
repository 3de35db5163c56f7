import CVmpoolSys
import Foundation
import Testing
import VmpoolDriver
import VmpoolImage
import VmpoolTestSupport

@testable import VmpoolQEMU

/// QEMU VMs started into their cgroups the way the launch path will start them: vmpool forks,
/// the child joins through the descriptors `prepare` returned, then execs QEMU (with today's
/// `-daemonize`, the daemonized QEMU inherits the cgroup).
final class CgroupQemu: @unchecked Sendable {
    static let image: Result<BootImage, SandboxError> = {
        guard let kernel = QemuEnvironment.kernel else { return .failure(SandboxError("no guest kernel")) }
        let output = TemporaryDirectory(prefix: "vmcgimg").path
        do {
            return .success(try GuestImage.build(kernel: kernel, busybox: "/bin/busybox", output: output))
        } catch {
            return .failure(SandboxError("image build failed: \(error)"))
        }
    }()

    let state = TemporaryDirectory(prefix: "vmcgq")
    let configuration: QemuConfiguration
    let cgroups: VMCgroups
    let paths: QemuPaths
    private(set) var started: [QemuVM] = []

    init() {
        configuration = QemuConfiguration(stateDirectory: state.path + "/s", accelerator: .tcg)
        cgroups = VMCgroups(configuration: configuration, accelerator: .tcg)
        paths = QemuPaths(configuration: configuration)
        mkdir(configuration.stateDirectory, 0o700)
        mkdir(paths.runRoot, 0o700)
        mkdir(paths.templateRoot, 0o700)
        mkdir(paths.memoryRoot, 0o700)
    }

    func shape(vcpus: Int = 1, memoryMiB: Int) throws -> VMShape {
        VMShape(
            vcpus: vcpus, memoryMiB: memoryMiB, maxVcpus: vcpus, maxMemoryMiB: memoryMiB, image: try Self.image.get())
    }

    /// Starts QEMU in `vm`'s cgroup with `limits`, through the launch path VMs take (QEMU as
    /// root here: these tests are about the cgroup, not the uid), and returns once it answers.
    func launch(
        _ id: String, shape: VMShape, limits: CgroupLimits, memory: MemoryMode = .anonymous, incoming: Bool = false,
        disks: [DiskAttachment] = []
    ) throws -> QemuVM {
        var vm = QemuVM(id: id, paths: paths, configuration: configuration, accelerator: .tcg, pid: nil)
        vm.sandbox = true
        vm.cgroups = cgroups
        var machine = MachineSpec(shape: shape, memory: memory, incoming: incoming, disks: disks)
        machine.cgroupLimits = limits
        do {
            try vm.start(machine)
        } catch {
            throw SandboxError("QEMU for \(id): \(error)")
        }
        started.append(vm)
        return vm
    }

    static func identity(_ id: String) -> AgentClient.Identity {
        AgentClient.Identity(hostname: id, machineID: String(repeating: "ab", count: 16), network: nil)
    }

    func boot(_ id: String, shape: VMShape, limits: CgroupLimits, disks: [DiskAttachment] = []) throws -> QemuVM {
        let vm = try launch(id, shape: shape, limits: limits, disks: disks)
        try vm.awaitBoot(identity: Self.identity(id), timeout: .seconds(180))
        return vm
    }

    /// A template VM booted, saved and stopped, then a clone of it restored: both in cgroups.
    func clone(_ id: String, shape: VMShape, limits: CgroupLimits) throws -> QemuVM {
        let template = id + "-tpl"
        let memoryFile = paths.memoryFile(template: template)
        let stateFile = paths.stateFile(template: template)
        let source = try launch(template, shape: shape, limits: limits, memory: .templateShared(memoryFile))
        try source.awaitBoot(identity: Self.identity(template), timeout: .seconds(180))
        try source.save(to: stateFile)
        source.stop()
        try cgroups.remove(vm: template, kill: true)
        let vm = try launch(id, shape: shape, limits: limits, memory: .clonePrivate(memoryFile), incoming: true)
        try vm.restore(from: stateFile, identity: Self.identity(id), timeout: .seconds(60))
        return vm
    }

    /// Runs `script` under `sh -c` in the guest; its exit status, stdout and stderr.
    func exec(_ vm: QemuVM, _ script: String, timeout: Duration = .seconds(120)) throws -> (
        outcome: ExecOutcome, stdout: String, stderr: String
    ) {
        let out = TemporaryDirectory(prefix: "vmcgx")
        defer { out.remove() }
        let stdout = open(out.path + "/o", O_WRONLY | O_CREAT | O_CLOEXEC, 0o600)
        let stderr = open(out.path + "/e", O_WRONLY | O_CREAT | O_CLOEXEC, 0o600)
        defer {
            close(stdout)
            close(stderr)
        }
        let session = try ExecSession(paths: paths, vm: vm.id)
        defer { session.close() }
        let outcome = try session.run(
            ExecRequest(argv: ["sh", "-c", script], timeout: timeout),
            streams: ExecStreams(stdin: -1, stdout: stdout, stderr: stderr))
        return (
            outcome, (try? String(contentsOfFile: out.path + "/o", encoding: .utf8)) ?? "",
            (try? String(contentsOfFile: out.path + "/e", encoding: .utf8)) ?? ""
        )
    }

    func tearDown() {
        for vm in started {
            vm.stop()
            try? cgroups.remove(vm: vm.id, kill: true)
        }
        cgroups.sweep(alive: [], kill: true)
        try? FileManager.default.removeItem(atPath: paths.memoryRoot)
        state.remove()
    }

    /// Memory of a QEMU process, MiB: RSS (and its anonymous, file and shmem parts) and PSS.
    struct ProcessMemory: CustomStringConvertible {
        var rss = 0
        var anon = 0
        var file = 0
        var shmem = 0
        var pss = 0

        init(pid: Int32) {
            let status = String(decoding: QemuProcess.readProcFile("/proc/\(pid)/status") ?? [], as: UTF8.self)
            let rollup = String(decoding: QemuProcess.readProcFile("/proc/\(pid)/smaps_rollup") ?? [], as: UTF8.self)
            func kib(_ text: String, _ key: String) -> Int {
                let line = text.split(separator: "\n").first { $0.hasPrefix(key + ":") } ?? ""
                return (Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0) / 1024
            }
            rss = kib(status, "VmRSS")
            anon = kib(status, "RssAnon")
            file = kib(status, "RssFile")
            shmem = kib(status, "RssShmem")
            pss = kib(rollup, "Pss")
            // smaps: a header line per mapping ("start-end perms ..."), then "Size:", "Rss:", ...
            let smaps = String(
                decoding: QemuProcess.readProcFile("/proc/\(pid)/smaps", limit: 64 << 20) ?? [], as: UTF8.self)
            var largest = (size: 0, rss: 0)
            var size = 0
            var executable = false
            for line in smaps.split(separator: "\n") {
                let parts = line.split(separator: " ", omittingEmptySubsequences: true)
                if !line.contains(":") || parts.first?.contains("-") == true && parts.count >= 5 {
                    executable = parts.count > 1 && parts[1] == "rwxp"
                }
                if line.hasPrefix("Size:") { size = Int(parts[1]) ?? 0 }
                if line.hasPrefix("Rss:") {
                    let rss = Int(parts[1]) ?? 0
                    if size > largest.size { largest = (size, rss) }
                    // TCG's code buffer: the one writable and executable anonymous mapping.
                    if executable { translationCache += rss / 1024 }
                }
            }
            guestRAM = largest.rss / 1024
        }

        /// Resident in the largest mapping (the guest's RAM), and the rest: QEMU's own.
        var guestRAM = 0
        /// Resident in TCG's translation cache.
        var translationCache = 0
        var qemu: Int { rss - guestRAM }

        var description: String {
            "RSS \(rss) (anon \(anon), file \(file), shmem \(shmem); guest RAM \(guestRAM), QEMU's own \(qemu) of"
                + " which TCG cache \(translationCache)) PSS \(pss)"
        }
    }

    /// Threads of a process.
    static func threads(_ pid: Int32) -> Int {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task").count) ?? 0
    }

    /// utime + stime of a process (all its threads), seconds.
    static func cpuSeconds(_ pid: Int32) -> Double {
        guard let stat = QemuProcess.readProcFile("/proc/\(pid)/stat"),
            let close = stat.lastIndex(of: UInt8(ascii: ")"))
        else { return 0 }
        let fields = String(decoding: stat[(close + 2)...], as: UTF8.self).split(separator: " ")
        // After "pid (comm) ": state is field 3, utime 14 and stime 15.
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        return ((Double(fields[11]) ?? 0) + (Double(fields[12]) ?? 0)) / ticks
    }
}

/// A vCPU's thread, from `query-cpus-fast`.
struct CPUThread: Decodable {
    let threadID: Int

    enum CodingKeys: String, CodingKey {
        case threadID = "thread-id"
    }
}

/// A value shared with a thread.
final class Locked<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: Value

    init(_ value: Value) { stored = value }

    var value: Value {
        lock.lock()
        defer { lock.unlock() }
        return stored
    }

    func set(_ value: Value) {
        lock.lock()
        stored = value
        lock.unlock()
    }
}

/// Real QEMU VMs held to their cgroups' limits, on this host's cgroups.
@Suite(
    "QEMU in its cgroup", .serialized,
    .enabled(
        if: (QemuEnvironment.available && CgroupEnvironment.available),
        "\(QemuEnvironment.skipReason ?? CgroupEnvironment.skipReason ?? "")"))
struct CgroupQemuTests {
    /// The memory charged to a VM's cgroup now and at its peak, MiB.
    func charge(_ cgroups: VMCgroups, _ vm: String) throws -> (now: Int, peak: Int) {
        let report = try #require(cgroups.describe(vm: vm))
        return ((report.memoryUsage ?? 0) >> 20, (report.memoryPeak ?? 0) >> 20)
    }

    /// Touches all the guest's free memory at once (dd's buffer of all that is available), so
    /// that QEMU has every guest page it will ever have.
    static let touchAllMemory =
        "avail=$(awk '/MemAvailable/ {print int($2 / 1024) - 24}' /proc/meminfo); "
        + "dd if=/dev/zero of=/dev/null bs=${avail}M count=1 2>&1; echo touched ${avail}M"

    @Test(arguments: [(256, 1, false), (1024, 1, false), (256, 4, false), (256, 1, true), (1024, 1, true)])
    func aGuestThatTouchedAllItsMemoryStaysWithinItsLimit(memoryMiB: Int, vcpus: Int, cloned: Bool) throws {
        let host = CgroupQemu()
        defer { host.tearDown() }
        let shape = try host.shape(vcpus: vcpus, memoryMiB: memoryMiB)
        let limits = CgroupLimits(
            vcpus: vcpus, memoryMiB: memoryMiB, templateMemoryMiB: cloned ? memoryMiB : nil)
        let id = (cloned ? "clone-" : "cold-") + "\(memoryMiB)-\(vcpus)"
        let vm =
            cloned ? try host.clone(id, shape: shape, limits: limits) : try host.boot(id, shape: shape, limits: limits)
        let pid = try #require(vm.pid)
        let booted = (try charge(host.cgroups, id), CgroupQemu.ProcessMemory(pid: pid))
        let result = try host.exec(vm, Self.touchAllMemory)
        #expect(result.outcome == .exited(0), "\(result.stdout) \(result.stderr)")
        let touched = (try charge(host.cgroups, id), CgroupQemu.ProcessMemory(pid: pid))
        let stat = CgroupFiles.keyed(
            CgroupFiles.read(
                host.cgroups.directories(vm: id)[
                    try host.cgroups.layout.get().hierarchies.firstIndex { $0.controllers.contains("memory") }!]
                    + "/memory.stat"))
        print(
            "memory.stat \(id): "
                + ["rss", "cache", "shmem", "mapped_file", "anon", "file", "kernel", "pagetables"].compactMap { key in
                    stat[key].map { "\(key) \($0 >> 20)" }
                }.joined(separator: ", "))
        let allowance = host.cgroups.memoryOverheadMiB(vcpus: vcpus)
        print(
            "memory \(id): guest \(memoryMiB) MiB, limit \(host.cgroups.memoryLimit(limits) >> 20) MiB;"
                + " booted: charge \(booted.0.now) MiB, \(booted.1);"
                + " all touched (\(result.stdout.split(separator: "\n").last ?? "")): charge \(touched.0.now) MiB, peak"
                + " \(touched.0.peak) MiB, \(touched.1); charged beyond the guest RAM resident"
                + " \(touched.0.peak - touched.1.guestRAM) MiB (allowance \(allowance) MiB"
                + (cloned ? " + the template's \(memoryMiB) MiB" : "") + "); threads \(CgroupQemu.threads(pid))")
        #expect(!host.cgroups.oomKilled(vm: id))
        #expect(QemuProcess.isRunning(pid, vm: id, runRoot: host.paths.runRoot))
        // The guest's pages are charged here: the peak is near guest memory plus QEMU's part,
        // and within the limit with room.
        #expect(touched.0.peak >= memoryMiB * 3 / 4, "the guest's memory was not charged to its cgroup")
        let limitMiB = host.cgroups.memoryLimit(limits) >> 20
        #expect(touched.0.peak + 16 <= limitMiB, "less than 16 MiB of room under the limit")
        if !cloned {
            // With TCG's cache full (it fills as the guest runs new code), QEMU's part still fits.
            let worst = touched.0.peak - touched.1.guestRAM + 64 - touched.1.translationCache
            print("memory \(id): QEMU's part with a full TCG cache \(worst) MiB, allowance \(allowance) MiB")
            #expect(worst + 16 <= allowance, "QEMU's worst part \(worst) MiB leaves less than 16 MiB of \(allowance)")
        }
    }

    @Test func aGuestThatFillsItsMemoryHasItsQemuKilledByItsCgroupAlone() throws {
        let host = CgroupQemu()
        defer { host.tearDown() }
        // A neighbour VM's cgroup with a process in it: it is not touched.
        let neighbourHandle = try host.cgroups.prepare(vm: "neighbour", limits: CgroupLimits(vcpus: 1, memoryMiB: 64))
        let neighbour = try JoinedProcess("/bin/sleep", ["sleep", "600"], handle: neighbourHandle)
        neighbourHandle.close()
        defer { neighbour.stop() }
        // A 512 MiB guest in a cgroup sized for 128 MiB of guest memory.
        let vm = try host.boot(
            "hog", shape: try host.shape(memoryMiB: 512), limits: CgroupLimits(vcpus: 1, memoryMiB: 128))
        let pid = try #require(vm.pid)
        #expect(!host.cgroups.oomKilled(vm: "hog"))
        let logStart = KernelLog.records()?.last?.sequence
        let fill =
            "mkdir -p /mnt/fill && mount -t tmpfs -o size=400M none /mnt/fill && dd if=/dev/zero of=/mnt/fill/x bs=1M count=380"
        do {
            let result = try host.exec(vm, fill, timeout: .seconds(120))
            Issue.record("the guest filled 380 MiB and lived: \(result)")
        } catch {
            print("the exec ended with the VM: \(error)")
        }
        let gone = eventually(timeout: .seconds(30)) {
            !QemuProcess.isRunning(pid, vm: "hog", runRoot: host.paths.runRoot)
        }
        #expect(gone, "QEMU \(pid) still runs")
        #expect(host.cgroups.oomKilled(vm: "hog"), "the VM's cgroup saw no OOM kill")
        let report = try #require(host.cgroups.describe(vm: "hog"))
        print("after the OOM kill: \(report.summary.map { "\($0.key): \($0.value)" }.joined(separator: "; "))")
        // (v2 counts a group kill's victim twice; the kernel log below says who was killed.)
        #expect(report.oomKills >= 1)
        #expect(report.directories.allSatisfy { VMCgroups.processes($0).allSatisfy(VMCgroups.hasExited) })
        #expect(kill(neighbour.pid, 0) == 0, "the neighbour was killed")
        #expect(!host.cgroups.oomKilled(vm: "neighbour"))
        // The kernel's own account: the OOM killer ran for the VM's cgroup and chose QEMU there,
        // and no system-wide OOM kill happened meanwhile.
        if let logStart, let records = KernelLog.records() {
            let kills = records.filter { $0.sequence > logStart && $0.message.hasPrefix("oom-kill:") }
            print("kernel: " + kills.map(\.message).joined(separator: " | "))
            let memory = try #require(
                try host.cgroups.layout.get().hierarchies.firstIndex { $0.controllers.contains("memory") })
            let vmCgroup = report.directories[memory]
            let ours = kills.filter { kill in
                vmCgroup.hasSuffix(KernelLog.field(kill.message, "oom_memcg") ?? "?")
            }
            #expect(ours.count == 1, "\(kills.map(\.message))")
            #expect(ours.allSatisfy { $0.message.contains("constraint=CONSTRAINT_MEMCG") })
            #expect(ours.allSatisfy { KernelLog.field($0.message, "task") == "qemu-system-x86" })
            #expect(ours.allSatisfy { vmCgroup.hasSuffix(KernelLog.field($0.message, "task_memcg") ?? "?") })
            #expect(!kills.contains { $0.message.contains("constraint=CONSTRAINT_NONE") }, "a system-wide OOM kill")
        } else {
            print("the kernel log (/dev/kmsg) is not readable: the OOM killer's own account is not checked")
        }
        try host.cgroups.remove(vm: "hog")
    }

    @Test func aGuestSpinningEveryVcpuIsHeldToItsCpuQuota() throws {
        let host = CgroupQemu()
        defer { host.tearDown() }
        // Two vCPUs at 10 %: 0.2 of a host CPU, whatever the guest does.
        let limits = CgroupLimits(vcpus: 2, memoryMiB: 256, cpuPercent: 10)
        let vm = try host.boot("spin", shape: try host.shape(vcpus: 2, memoryMiB: 256), limits: limits)
        let pid = try #require(vm.pid)
        // Ends with the VM at tearDown, if not before.
        let spin = Thread {
            _ = try? host.exec(vm, "(while :; do :; done) & (while :; do :; done) & wait", timeout: .seconds(90))
        }
        spin.start()
        func throttled() -> Int { host.cgroups.describe(vm: "spin")?.throttledPeriods ?? 0 }
        // Measure from the first throttled period (both vCPUs spinning) over 40 periods (4 s).
        #expect(eventually(timeout: .seconds(60)) { throttled() > 0 }, "never throttled: the guest did not spin")
        let (startCPU, startWall, startThrottled) = (CgroupQemu.cpuSeconds(pid), ContinuousClock.now, throttled())
        #expect(eventually(timeout: .seconds(60)) { throttled() >= startThrottled + 40 })
        let wall = Double((ContinuousClock.now - startWall).milliseconds) / 1000
        let used = CgroupQemu.cpuSeconds(pid) - startCPU
        let share = used / wall
        print(
            "cpu: \(String(format: "%.2f", used)) s of CPU in \(String(format: "%.2f", wall)) s"
                + " (\(String(format: "%.3f", share)) CPUs; quota 0.20), throttled periods \(throttled() - startThrottled)"
        )
        #expect(share <= 0.2 * 1.15 + 0.02, "QEMU used \(share) CPUs against a quota of 0.2")
    }

    @Test func threadsOfAQemuWithDisksUnderLoadStayWellBelowThePidsLimit() throws {
        let host = CgroupQemu()
        defer { host.tearDown() }
        var report: [String] = []
        for vcpus in [1, 4] {
            let id = "threads-\(vcpus)"
            let disks = (0..<2).map { index in
                DiskAttachment(
                    name: "d\(index)", path: host.paths.overlay(id, disk: "d\(index)"), sizeMiB: 256, scratch: true)
            }
            let limits = CgroupLimits(vcpus: vcpus, memoryMiB: 256)
            let vm = try host.boot(
                id, shape: try host.shape(vcpus: vcpus, memoryMiB: 256), limits: limits, disks: disks)
            let pid = try #require(vm.pid)
            let idle = CgroupQemu.threads(pid)
            // A thread per vCPU (as QEMU reports them), whatever else comes and goes.
            let qmp = try vm.qmp()
            let cpus = try qmp.execute("query-cpus-fast", returning: [CPUThread].self)
            qmp.close()
            let tasks = Set((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? [])
            #expect(cpus.count == vcpus)
            #expect(cpus.allSatisfy { tasks.contains(String($0.threadID)) }, "\(cpus) \(tasks)")
            var most = idle
            // 16 direct (uncached) writers and then readers on each disk at once: every request
            // in flight can take a worker of the aio=threads pool (at most 64).
            let outcome = Locked<ExecOutcome?>(nil)
            let load = Thread {
                let result = try? host.exec(
                    vm,
                    "for d in /dev/vda /dev/vdb; do for i in $(seq 16); do"
                        + " (dd if=/dev/zero of=$d bs=64k count=64 seek=$((i * 64)) oflag=direct 2>/dev/null;"
                        + " dd if=$d of=/dev/null bs=64k count=64 skip=$((i * 64)) iflag=direct 2>/dev/null) & done; done;"
                        + " wait",
                    timeout: .seconds(120))
                outcome.set(result?.outcome)
            }
            load.start()
            let pidsMax = try #require(host.cgroups.describe(vm: id)?.pidsLimit)
            // Sampled while the load runs.
            #expect(
                eventually(timeout: .seconds(180)) {
                    most = max(most, CgroupQemu.threads(pid))
                    return load.isFinished
                })
            #expect(outcome.value == .exited(0), "the disk load did not run")
            report.append("\(vcpus) vCPU(s): \(idle) threads idle, \(most) at most under disk load")
            #expect(most < pidsMax, "\(most) threads reached pids.max \(pidsMax)")
        }
        print("threads: " + report.joined(separator: "; ") + "; pids.max is \(VMCgroups.pidsFixed) + maxVcpus")
    }

    /// cgroup v2's limit files on a real v2 kernel: the guest's. What vmpool writes over a fake
    /// v2 root is replayed in the guest's own cgroup2 mount (all controllers free there); the
    /// kernel must accept every write, enforce the limits on a process in the VM cgroup, and its
    /// files must read back through VMCgroups.
    @Test func theV2WritesAreAcceptedAndEnforcedByARealV2Kernel() throws {
        let host = CgroupQemu()
        defer { host.tearDown() }
        let vm = try host.boot(
            "v2", shape: try host.shape(memoryMiB: 512), limits: CgroupLimits(vcpus: 1, memoryMiB: 512))
        let mount = try host.exec(
            vm,
            "mount -t cgroup2 none /sys/fs/cgroup && cat /sys/fs/cgroup/cgroup.controllers && cat /proc/self/cgroup")
        #expect(mount.outcome == .exited(0), "\(mount.stderr)")
        print("guest cgroup2: \(mount.stdout.replacingOccurrences(of: "\n", with: " | "))")
        let controllers = mount.stdout.split(separator: "\n").first?.split(separator: " ").map(String.init) ?? []
        #expect(Set(controllers).isSuperset(of: ["cpu", "memory", "pids", "io"]))

        // The guest's agent runs in its root cgroup: the parent is a child of it.
        let fake = FakeCgroup2(controllers: controllers)
        defer { fake.directory.remove() }
        let cgroups = fake.cgroups(stateDirectory: "/var/lib/vmpool")
        // 16 MiB of guest memory: a limit of 16 MiB plus QEMU's allowance, 20 % of one CPU.
        let limits = CgroupLimits(vcpus: 1, memoryMiB: 16, cpuPercent: 20, ioWeight: 50)
        let handle = try cgroups.prepare(vm: "inner", limits: limits)
        handle.close()
        let directory = "/sys/fs/cgroup" + fake.relative(handle.directories[0])
        func replay(_ operations: [FakeCgroup2.Operation]) -> String {
            operations.map { operation in
                switch operation {
                case .mkdir(let path):
                    return "mkdir /sys/fs/cgroup\(path) || { echo 'refused: \(operation)'; exit 1; }"
                case .write(let path, let value):
                    return "printf '%s' '\(value)' > /sys/fs/cgroup\(path) || { echo 'refused: \(operation)'; exit 1; }"
                case .rmdir(let path):
                    return
                        "n=0; until rmdir /sys/fs/cgroup\(path); do n=$((n + 1)); [ $n -lt 500 ] || exit 1; usleep 10000; done"
                }
            }.joined(separator: "\n")
        }
        let prepared = try host.exec(vm, replay(fake.operations))
        #expect(prepared.outcome == .exited(0), "the kernel refused a write: \(prepared.stdout) \(prepared.stderr)")

        // Enforced: memory (a tmpfs fill beyond the limit is OOM-killed), cpu (throttled), pids.
        let memoryLimitMiB = cgroups.memoryLimit(limits) >> 20
        let enforce = try host.exec(
            vm,
            """
            cd \(directory)
            mkdir -p /mnt/fill && mount -t tmpfs -o size=300M none /mnt/fill
            sh -c 'echo 0 > cgroup.procs; exec dd if=/dev/zero of=/mnt/fill/x bs=1M count=\(memoryLimitMiB + 40)' 2>/dev/null
            echo "dd: $?"
            umount /mnt/fill
            sh -c 'echo 0 > cgroup.procs; exec timeout 2 sh -c "while :; do :; done"'
            sh -c 'echo 0 > cgroup.procs; i=0; while [ $i -lt 400 ]; do sleep 600 & i=$((i + 1)); done' >/dev/null 2>&1
            echo 1 > cgroup.kill
            n=0; while grep -q . cgroup.procs; do n=$((n + 1)); [ $n -lt 500 ] || exit 1; usleep 10000; done
            for f in memory.events cpu.stat pids.events cpu.max memory.max memory.swap.max memory.oom.group pids.max io.weight memory.current memory.peak pids.current; do
              echo "== $f"; cat $f
            done
            """)
        #expect(enforce.outcome == .exited(0), "\(enforce.stdout) \(enforce.stderr)")
        // Each file as the guest kernel wrote it.
        var files: [String: String] = [:]
        var current: String?
        for line in enforce.stdout.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("== ") {
                current = String(line.dropFirst(3))
                files[current!] = ""
            } else if let name = current {
                files[name]! += line + "\n"
            }
        }
        print(
            "guest v2 cgroup after enforcement: \(enforce.stdout.split(separator: "\n").prefix(3).joined(separator: " | ")) ..."
        )
        #expect(enforce.stdout.contains("dd: 137"), "dd was not killed: \(enforce.stdout)")
        #expect(CgroupFiles.keyed(files["cpu.stat"])["nr_throttled"] ?? 0 > 0, "\(files["cpu.stat"] ?? "")")
        #expect(CgroupFiles.keyed(files["pids.events"])["max"] ?? 0 > 0, "\(files["pids.events"] ?? "")")
        // vmpool reads the real files as the guest kernel wrote them.
        for (name, text) in files where !text.isEmpty { fake.put(handle.directories[0] + "/" + name, text) }
        #expect(cgroups.oomKilled(vm: "inner"), "\(files["memory.events"] ?? "")")
        let report = try #require(cgroups.describe(vm: "inner"))
        print("describe (guest v2 files): \(report.summary.map { "\($0.key): \($0.value)" }.joined(separator: "; "))")
        #expect(report.cpuQuota == 20_000 && report.cpuPeriod == 100_000)
        #expect(report.memoryLimit == cgroups.memoryLimit(limits))
        #expect(report.swapLimit == 0)
        #expect(report.pidsLimit == VMCgroups.pidsLimit(limits))
        #expect(report.ioWeight == 50)
        // With memory.oom.group, the kernel counts the victim once as the victim and once as a
        // member of the group it kills: 2 for one dd.
        #expect(report.oomKills >= 1, "\(files["memory.events"] ?? "")")
        #expect(CgroupFiles.keyed(files["memory.events"])["oom_group_kill"] == 1, "\(files["memory.events"] ?? "")")
        #expect((report.throttledPeriods ?? 0) > 0)

        // Removal with a process left: cgroup.kill, then rmdir, on the real kernel.
        let left = try host.exec(
            vm,
            "sh -c 'echo 0 > \(directory)/cgroup.procs; exec sleep 600' >/dev/null 2>&1 &\n"
                + "n=0; until grep -q . \(directory)/cgroup.procs; do n=$((n + 1)); [ $n -lt 500 ] || exit 1; usleep 10000; done"
        )
        #expect(left.outcome == .exited(0))
        fake.put(handle.directories[0] + "/cgroup.procs", "1\n")
        fake.clearOperations()
        try cgroups.remove(vm: "inner", kill: true)
        #expect(cgroups.sweep(alive: []).removed.isEmpty)
        let removed = try host.exec(vm, replay(fake.operations) + "\n[ ! -e \(directory) ] && echo removed")
        #expect(removed.stdout.contains("removed"), "\(fake.operations) \(removed.stdout) \(removed.stderr)")
    }
}
