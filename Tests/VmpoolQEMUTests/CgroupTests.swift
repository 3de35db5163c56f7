import CVmpoolSys
import Foundation
import Testing
import VmpoolDriver
import VmpoolTestSupport

@testable import VmpoolQEMU

/// Where vmpool's cgroups go, decided from /proc/self/mountinfo and /proc/self/cgroup texts.
@Suite("cgroup layout")
struct CgroupLayoutTests {
    /// This development machine: v1 controllers, a cgroup2 mount without them, and the memory
    /// cgroup of the process runner.
    static let hybridMounts = """
        31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
        32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
        33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
        35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
        38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
        39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
        40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
        41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
        """
    static let hybridOwn = """
        9:name=systemd:/
        8:pids:/
        7:blkio:/
        4:memory:/process_api/fafc
        2:cpuacct:/
        1:cpu:/
        0::/
        """

    /// Debian 12: cgroup v2 only, systemd enables every controller at the root.
    static let debianMounts = """
        25 23 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
        """
    static let allControllers = "cpuset cpu io memory hugetlb pids rdma misc"

    func files(_ contents: [String: String]) -> (read: (String) -> String?, exists: (String) -> Bool) {
        ({ contents[$0] }, { contents[$0] != nil })
    }

    @Test func aHybridHostUsesTheV1HierarchiesUnderItsOwnCgroups() throws {
        let fs = files([
            "/sys/fs/cgroup/unified/cgroup.controllers": "hugetlb",
            "/sys/fs/cgroup/blkio/blkio.weight": "500",
        ])
        let layout = try CgroupLayout.detect(
            mountinfo: Self.hybridMounts, ownCgroups: Self.hybridOwn, read: fs.read, exists: fs.exists
        ).get()
        #expect(layout.version == .v1)
        #expect(
            layout.hierarchies == [
                .init(controllers: ["cpu"], base: "/sys/fs/cgroup/cpu"),
                .init(controllers: ["memory"], base: "/sys/fs/cgroup/memory/process_api/fafc"),
                .init(controllers: ["pids"], base: "/sys/fs/cgroup/pids"),
                .init(controllers: ["blkio"], base: "/sys/fs/cgroup/blkio"),
            ])
        // Without a weight file (no CFQ or BFQ), blkio has nothing to offer.
        let noWeight = files(["/sys/fs/cgroup/unified/cgroup.controllers": "hugetlb"])
        let without = try CgroupLayout.detect(
            mountinfo: Self.hybridMounts, ownCgroups: Self.hybridOwn, read: noWeight.read, exists: noWeight.exists
        ).get()
        #expect(without.hierarchies.map(\.controllers) == [["cpu"], ["memory"], ["pids"]])
    }

    @Test func coMountedV1ControllersShareOneCgroup() throws {
        let mounts = """
            32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
            35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
            39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
            """
        let own = "3:cpu,cpuacct:/user.slice\n5:memory:/user.slice/user-0.slice\n6:pids:/user.slice/user-0.slice\n"
        let fs = files([:])
        let layout = try CgroupLayout.detect(mountinfo: mounts, ownCgroups: own, read: fs.read, exists: fs.exists).get()
        #expect(layout.hierarchies.first == .init(controllers: ["cpu"], base: "/sys/fs/cgroup/cpu,cpuacct/user.slice"))
        #expect(layout.hierarchies.count == 3)
    }

    @Test func onV2TheParentIsASiblingOfVmpoolsOwnCgroup() throws {
        let fs = files([
            "/sys/fs/cgroup/system.slice/cgroup.controllers": Self.allControllers,
            "/sys/fs/cgroup/system.slice/vmpool.service/cgroup.type": "domain",
        ])
        let layout = try CgroupLayout.detect(
            mountinfo: Self.debianMounts, ownCgroups: "0::/system.slice/vmpool.service\n", read: fs.read,
            exists: fs.exists
        ).get()
        #expect(layout.version == .v2)
        #expect(
            layout.hierarchies == [
                .init(controllers: ["cpu", "memory", "pids", "io"], base: "/sys/fs/cgroup/system.slice")
            ])
    }

    @Test func onV2AtTheRootTheParentIsAChild() throws {
        let fs = files(["/sys/fs/cgroup/cgroup.controllers": "cpu memory pids"])
        let layout = try CgroupLayout.detect(
            mountinfo: Self.debianMounts, ownCgroups: "0::/\n", read: fs.read, exists: fs.exists
        ).get()
        #expect(layout.hierarchies == [.init(controllers: ["cpu", "memory", "pids"], base: "/sys/fs/cgroup")])
    }

    @Test func theTopOfACgroupNamespaceThatIsNotTheRootIsRefusedWithAReason() throws {
        // A container with its own cgroup namespace: "/" has a cgroup.type, so it is not the root.
        let fs = files(["/sys/fs/cgroup/cgroup.controllers": Self.allControllers, "/sys/fs/cgroup/cgroup.type": ""])
        let result = CgroupLayout.detect(
            mountinfo: Self.debianMounts, ownCgroups: "0::/\n", read: fs.read, exists: fs.exists)
        guard case .failure(let error) = result else {
            Issue.record("a namespaced top cgroup was accepted: \(result)")
            return
        }
        #expect(error.code == .hostUnsupported)
        #expect(error.message.contains("top cgroup"), "\(error.message)")
    }

    @Test func missingControllersAreNamedForBothVersions() throws {
        let mounts = Self.hybridMounts.split(separator: "\n").filter { !$0.contains("/cpu ") && !$0.contains("pids") }
            .joined(separator: "\n")
        let fs = files(["/sys/fs/cgroup/unified/cgroup.controllers": "hugetlb"])
        let result = CgroupLayout.detect(
            mountinfo: mounts, ownCgroups: Self.hybridOwn, read: fs.read, exists: fs.exists)
        guard case .failure(let error) = result else {
            Issue.record("accepted without cpu and pids: \(result)")
            return
        }
        #expect(error.code == .hostUnsupported)
        #expect(error.message.contains("the cpu, memory, pids controllers are not available in /sys/fs/cgroup/unified"))
        #expect(error.message.contains("no cgroup v1 hierarchy for cpu, pids is mounted"), "\(error.message)")
    }

    @Test func mountsOfASubtreeAndEscapedPathsMapToDirectories() throws {
        // A container without a cgroup namespace sees its own subtree bind-mounted.
        let mounts = #"""
            50 40 0:22 /docker/abc /sys/fs/cgroup\040x rw - cgroup2 cgroup2 rw
            """#
        let fs = files([
            "/sys/fs/cgroup x/cgroup.controllers": "cpu memory pids", "/sys/fs/cgroup x/sub/cgroup.type": "",
        ])
        let layout = try CgroupLayout.detect(
            mountinfo: mounts, ownCgroups: "0::/docker/abc/sub\n", read: fs.read, exists: fs.exists
        ).get()
        #expect(layout.hierarchies.first?.base == "/sys/fs/cgroup x")
        // A cgroup outside the mount (or the namespace) has no directory.
        let mount = try #require(CgroupLayout.Mount.parse(mounts).first)
        #expect(mount.directory(of: "/other") == nil)
        #expect(mount.directory(of: "/../outside") == nil)
        #expect(mount.directory(of: "/docker/abc") == "/sys/fs/cgroup x")
    }

    @Test func thisHostIsDetectedAsTheProcessSeesIt() throws {
        let own = CgroupLayout.OwnCgroups.parse(CgroupFiles.read("/proc/self/cgroup") ?? "")
        let result = CgroupLayout.detect()
        print("cgroup layout of this host: \(result)")
        guard case .success(let layout) = result else {
            #expect(!CgroupEnvironment.required, "CI needs cgroups: \(result)")
            return
        }
        if layout.version == .v1 {
            let memory = try #require(own.legacy.first { $0.controllers.contains("memory") }?.path)
            let base = try #require(layout.hierarchies.first { $0.controllers.contains("memory") }?.base)
            #expect(base.hasSuffix(memory == "/" ? "/memory" : memory), "memory base \(base), own \(memory)")
        }
        #expect(Set(layout.hierarchies.flatMap(\.controllers)).isSuperset(of: ["cpu", "memory", "pids"]))
    }
}

/// Every v2 step over a fake cgroup file system root: paths, subtree_control, the limit files.
@Suite("cgroup v2 on a fake root")
struct CgroupV2FakeRootTests {
    let limits = CgroupLimits(vcpus: 2, maxVcpus: 4, memoryMiB: 256, cpuPercent: 50, ioWeight: 300)

    @Test func prepareEnablesControllersDownToTheVMAndWritesEveryLimit() throws {
        let fake = FakeCgroup2()
        defer { fake.directory.remove() }
        let cgroups = fake.cgroups(stateDirectory: "/var/lib/vmpool")
        let handle = try cgroups.prepare(vm: "web-000001", limits: limits)
        defer { handle.close() }
        let state = "/vmpool/" + QemuPaths.hash("/var/lib/vmpool", hexDigits: 12)
        let vm = state + "/" + QemuPaths.hash("web-000001", hexDigits: 12)
        #expect(handle.directories == [fake.root + vm])
        #expect(handle.procsDescriptors.count == 1)
        let memory = (256 + cgroups.memoryOverheadMiB(vcpus: 4)) << 20
        #expect(
            fake.operations == [
                .write("/cgroup.subtree_control", "+cpu +memory +pids +io"), .mkdir("/vmpool"),
                .write("/vmpool/cgroup.subtree_control", "+cpu +memory +pids +io"), .mkdir(state),
                .write(state + "/cgroup.subtree_control", "+cpu +memory +pids +io"), .mkdir(vm),
                .write(vm + "/cpu.max", "100000 100000"), .write(vm + "/memory.max", String(memory)),
                .write(vm + "/memory.swap.max", "0"), .write(vm + "/memory.oom.group", "1"),
                .write(vm + "/pids.max", String(VMCgroups.pidsLimit(limits))), .write(vm + "/io.weight", "default 300"),
            ])
        let report = try #require(cgroups.describe(vm: "web-000001"))
        #expect(report.version == .v2)
        #expect(report.cpuQuota == 100_000 && report.cpuPeriod == 100_000)
        #expect(report.memoryLimit == memory)
        #expect(report.swapLimit == 0)
        #expect(report.pidsLimit == VMCgroups.pidsLimit(limits))
        #expect(report.ioWeight == 300)
        #expect(report.oomKills == 0)
        #expect(report.summary.map(\.key) == ["cgroup", "cpu", "memory", "swap", "pids", "io weight", "oom kills"])
        #expect(report.summary[1].value == "100000 µs per 100000 µs (100% of one CPU)")

        // A second VM only adds its own cgroup: the levels above already give the controllers.
        fake.clearOperations()
        let second = try cgroups.prepare(vm: "web-000002", limits: CgroupLimits(vcpus: 1, memoryMiB: 128))
        second.close()
        let vm2 = state + "/" + QemuPaths.hash("web-000002", hexDigits: 12)
        #expect(fake.operations.first == .mkdir(vm2), "\(fake.operations)")
        #expect(fake.operations.contains(.write(vm2 + "/io.weight", "default 100")))
        #expect(fake.operations.contains(.write(vm2 + "/cpu.max", "100000 100000")))
    }

    @Test func aBaseHoldingProcessesCannotGiveControllersAndSaysWhy() throws {
        let fake = FakeCgroup2()
        defer { fake.directory.remove() }
        // vmpool's own cgroup (not the root, holding vmpool) as the base: what the sibling rule avoids.
        _ = fake.calls.write(fake.root + "/cgroup.subtree_control", "+cpu +memory +pids")
        _ = fake.calls.mkdir(fake.root + "/session.scope")
        fake.put(fake.root + "/session.scope/cgroup.procs", "4242\n")
        let cgroups = fake.cgroups(stateDirectory: "/s", base: "/session.scope")
        #expect {
            _ = try cgroups.prepare(vm: "a", limits: limits)
        } throws: { error in
            let error = error as? DriverError
            return error?.code == .hostUnsupported && error?.message.contains("holds processes") == true
        }
        #expect(!CgroupFiles.exists(fake.root + "/session.scope/vmpool"))
        // Its parent (the root here) can: the sibling placement.
        let sibling = fake.cgroups(stateDirectory: "/s")
        try sibling.prepare(vm: "a", limits: limits).close()
        #expect(CgroupFiles.exists(sibling.directories(vm: "a")[0] + "/cpu.max"))
    }

    @Test func withoutTheIoControllerTheWeightIsNotAvailable() throws {
        let fake = FakeCgroup2(controllers: ["cpu", "memory", "pids"])
        defer { fake.directory.remove() }
        let cgroups = fake.cgroups(stateDirectory: "/s")
        try cgroups.prepare(vm: "a", limits: limits).close()
        #expect(!fake.operations.contains { $0.description.contains("io") }, "\(fake.operations)")
        #expect(try #require(cgroups.describe(vm: "a")).ioWeight == nil)
        #expect(
            try #require(cgroups.describe(vm: "a")).summary.last { $0.key == "io weight" }?.value == "not available")
    }

    @Test func updateRewritesTheLimitsInPlace() throws {
        let fake = FakeCgroup2()
        defer { fake.directory.remove() }
        let cgroups = fake.cgroups(stateDirectory: "/s")
        try cgroups.prepare(vm: "a", limits: limits).close()
        fake.clearOperations()
        let grown = CgroupLimits(vcpus: 3, maxVcpus: 4, memoryMiB: 768)
        try cgroups.update(vm: "a", limits: grown)
        #expect(!fake.operations.contains { if case .mkdir = $0 { return true } else { return false } })
        let report = try #require(cgroups.describe(vm: "a"))
        #expect(report.cpuQuota == 300_000)
        #expect(report.memoryLimit == (768 + cgroups.memoryOverheadMiB(vcpus: 4)) << 20)
        #expect(report.ioWeight == 100, "a weight no longer asked for goes back to the default")
        #expect {
            try cgroups.update(vm: "b", limits: grown)
        } throws: { ($0 as? DriverError)?.code == .notFound }
    }

    @Test func oomKillsAreReadFromMemoryEvents() throws {
        let fake = FakeCgroup2()
        defer { fake.directory.remove() }
        let cgroups = fake.cgroups(stateDirectory: "/s")
        try cgroups.prepare(vm: "a", limits: limits).close()
        try cgroups.prepare(vm: "b", limits: limits).close()
        #expect(!cgroups.oomKilled(vm: "a"))
        fake.put(
            cgroups.directories(vm: "a")[0] + "/memory.events",
            "low 0\nhigh 0\nmax 17\noom 1\noom_kill 1\noom_group_kill 1\n")
        #expect(cgroups.oomKilled(vm: "a"))
        #expect(!cgroups.oomKilled(vm: "b"))
        #expect(!cgroups.oomKilled(vm: "never-prepared"))
    }

    @Test func removeKillsThroughCgroupKillOnlyWhenAsked() throws {
        let fake = FakeCgroup2()
        defer { fake.directory.remove() }
        let cgroups = fake.cgroups(stateDirectory: "/s")
        try cgroups.prepare(vm: "a", limits: limits).close()
        let directory = cgroups.directories(vm: "a")[0]
        fake.put(directory + "/cgroup.procs", "999999\n")
        #expect {
            try cgroups.remove(vm: "a")
        } throws: { ($0 as? DriverError)?.code == .invalidState }
        #expect(CgroupFiles.exists(directory))
        try cgroups.remove(vm: "a", kill: true)
        #expect(
            fake.operations.suffix(2) == [
                .write(fake.relative(directory) + "/cgroup.kill", "1"), .rmdir(fake.relative(directory)),
            ])
        #expect(!CgroupFiles.exists(directory))
        try cgroups.remove(vm: "a")  // already gone: fine
    }

    @Test func twoStateDirsNeverTouchEachOther() throws {
        let fake = FakeCgroup2()
        defer { fake.directory.remove() }
        let one = fake.cgroups(stateDirectory: "/srv/one")
        let two = fake.cgroups(stateDirectory: "/srv/two")
        try one.prepare(vm: "web-000001", limits: limits).close()
        try two.prepare(vm: "web-000001", limits: limits).close()
        #expect(one.directories(vm: "web-000001") != two.directories(vm: "web-000001"))
        let swept = one.sweep(alive: [])
        #expect(swept.removed == [VMCgroups.name(vm: "web-000001")])
        #expect(CgroupFiles.exists(two.directories(vm: "web-000001")[0]))
        #expect(!CgroupFiles.exists((one.directories(vm: "web-000001")[0] as NSString).deletingLastPathComponent))
        // The same state dir spelt differently is the same level.
        let same = fake.cgroups(stateDirectory: "/srv/two/./")
        #expect(same.directories(vm: "x") == two.directories(vm: "x"))
    }

    @Test func theUnusableLayoutIsThrownByPrepareAndNothingElseFails() throws {
        let error = DriverError(.hostUnsupported, "no controllers")
        let cgroups = VMCgroups(stateDirectory: "/s", translationCacheMiB: 64, layout: .failure(error))
        #expect(cgroups.unavailable?.code == .hostUnsupported)
        #expect {
            _ = try cgroups.prepare(vm: "a", limits: limits)
        } throws: { ($0 as? DriverError)?.message == "no controllers" }
        try cgroups.remove(vm: "a")
        #expect(cgroups.sweep(alive: []) == CgroupSweep())
        #expect(!cgroups.oomKilled(vm: "a"))
        #expect(cgroups.describe(vm: "a") == nil)
    }

    @Test func cpuQuotaFollowsVcpusAndPercent() {
        #expect(CgroupLimits(vcpus: 1, memoryMiB: 64).cpuQuota == 100_000)
        #expect(CgroupLimits(vcpus: 4, memoryMiB: 64).cpuQuota == 400_000)
        #expect(CgroupLimits(vcpus: 4, memoryMiB: 64, cpuPercent: 50).cpuQuota == 200_000)
        #expect(CgroupLimits(vcpus: 1, memoryMiB: 64, cpuPercent: 1).cpuQuota == 1000)
        #expect(CgroupLimits(vcpus: 2, memoryMiB: 64, cpuPercent: 250).cpuQuota == 200_000, "never above the vCPUs")
        #expect(CgroupLimits(vcpus: 3, maxVcpus: 2, memoryMiB: 64).maxVcpus == 3)
    }
}

/// The real cgroups of this host (v1 here; v2 where the host has it), with throwaway processes
/// joined through the descriptors `prepare` returns.
@Suite(
    "cgroups of this host", .serialized,
    .enabled(if: CgroupEnvironment.available, "\(CgroupEnvironment.skipReason ?? "")"))
struct HostCgroupTests {
    let limits = CgroupLimits(vcpus: 2, maxVcpus: 4, memoryMiB: 256, cpuPercent: 50, ioWeight: 300)

    /// A VMCgroups for a fresh state dir; its cgroups are swept (killing) at the end.
    func withCgroups(_ body: (VMCgroups) throws -> Void) throws {
        let state = TemporaryDirectory(prefix: "vmcg")
        let cgroups = VMCgroups(stateDirectory: state.path, translationCacheMiB: 64)
        defer {
            cgroups.sweep(alive: [], kill: true)
            state.remove()
        }
        try body(cgroups)
    }

    func value(_ directory: String, _ file: String) -> String? {
        CgroupFiles.read(directory + "/" + file)?.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// The directory of the hierarchy that has `controller`.
    func directory(_ cgroups: VMCgroups, _ vm: String, _ controller: String) throws -> String {
        let layout = try cgroups.layout.get()
        let index = try #require(layout.hierarchies.firstIndex { $0.controllers.contains(controller) })
        return cgroups.directories(vm: vm)[index]
    }

    func expectLimits(_ cgroups: VMCgroups, _ vm: String, _ limits: CgroupLimits) throws {
        let layout = try cgroups.layout.get()
        let cpu = try directory(cgroups, vm, "cpu")
        let memory = try directory(cgroups, vm, "memory")
        let pids = try directory(cgroups, vm, "pids")
        let bytes = cgroups.memoryLimit(limits)
        switch layout.version {
        case .v1:
            #expect(value(cpu, "cpu.cfs_period_us") == "100000")
            #expect(value(cpu, "cpu.cfs_quota_us") == String(limits.cpuQuota))
            #expect(value(memory, "memory.limit_in_bytes") == String(bytes))
            if CgroupFiles.exists(memory + "/memory.memsw.limit_in_bytes") {
                #expect(value(memory, "memory.memsw.limit_in_bytes") == String(bytes))
            }
            if let blkio = layout.hierarchies.firstIndex(where: { $0.controllers.contains("blkio") }) {
                let weight = value(cgroups.directories(vm: vm)[blkio], "blkio.weight")
                #expect(weight == String(min(1000, max(10, limits.ioWeight ?? 500))))
            }
        case .v2:
            #expect(value(cpu, "cpu.max") == "\(limits.cpuQuota) 100000")
            #expect(value(memory, "memory.max") == String(bytes))
            #expect(value(memory, "memory.swap.max").map { $0 == "0" } ?? true)
        }
        #expect(value(pids, "pids.max") == String(VMCgroups.pidsLimit(limits)))
        let report = try #require(cgroups.describe(vm: vm))
        #expect(report.cpuQuota == limits.cpuQuota)
        #expect(report.memoryLimit == bytes)
        #expect(report.pidsLimit == VMCgroups.pidsLimit(limits))
    }

    @Test func aProcessJoinsThroughTheDescriptorsAndEveryLimitReadsBack() throws {
        try withCgroups { cgroups in
            let handle = try cgroups.prepare(vm: "web-000001", limits: limits)
            let sleeper = try JoinedProcess("/bin/sleep", ["sleep", "600"], handle: handle)
            handle.close()
            defer { sleeper.stop() }
            for directory in handle.directories {
                #expect(VMCgroups.processes(directory) == [sleeper.pid], "\(directory)")
            }
            print("cgroups of a joined process: \(sleeper.cgroups)")
            let suffix =
                "/vmpool/" + cgroups.stateLevel.split(separator: "/")[1] + "/" + VMCgroups.name(vm: "web-000001")
            #expect(sleeper.cgroups.filter { $0.hasSuffix(suffix) }.count == handle.directories.count)
            try expectLimits(cgroups, "web-000001", limits)
            let report = try #require(cgroups.describe(vm: "web-000001"))
            print("describe: \(report.summary.map { "\($0.key): \($0.value)" }.joined(separator: "; "))")
            #expect(report.pidsCurrent == 1)
            #expect((report.memoryUsage ?? 0) > 0)
            #expect(!cgroups.oomKilled(vm: "web-000001"))
        }
    }

    @Test func updateRaisesAndLowersEveryLimitInPlace() throws {
        try withCgroups { cgroups in
            let handle = try cgroups.prepare(vm: "a", limits: limits)
            let sleeper = try JoinedProcess("/bin/sleep", ["sleep", "600"], handle: handle)
            handle.close()
            defer { sleeper.stop() }
            let grown = CgroupLimits(vcpus: 3, maxVcpus: 4, memoryMiB: 1024)
            try cgroups.update(vm: "a", limits: grown)
            try expectLimits(cgroups, "a", grown)
            // Lower again: on v1 the memory limit goes down before memsw may.
            let shrunk = CgroupLimits(vcpus: 1, maxVcpus: 1, memoryMiB: 128, cpuPercent: 10, ioWeight: 5)
            try cgroups.update(vm: "a", limits: shrunk)
            try expectLimits(cgroups, "a", shrunk)
            #expect(VMCgroups.processes(handle.directories[0]) == [sleeper.pid], "the process stayed")
            #expect {
                try cgroups.update(vm: "never-prepared", limits: grown)
            } throws: { ($0 as? DriverError)?.code == .notFound }
        }
    }

    @Test func removeRefusesWhileAProcessRemainsAndKillsOnlyWhenAsked() throws {
        try withCgroups { cgroups in
            let handle = try cgroups.prepare(vm: "a", limits: limits)
            let sleeper = try JoinedProcess("/bin/sleep", ["sleep", "600"], handle: handle)
            handle.close()
            defer { sleeper.stop() }
            #expect {
                try cgroups.remove(vm: "a")
            } throws: { ($0 as? DriverError)?.code == .invalidState }
            #expect(kill(sleeper.pid, 0) == 0, "not killed unless asked")
            #expect(handle.directories.allSatisfy(CgroupFiles.exists))
            try cgroups.remove(vm: "a", kill: true)
            #expect(sleeper.wait() == 128 + SIGKILL)
            for directory in handle.directories { #expect(!CgroupFiles.exists(directory), "\(directory) is left") }
            #expect(cgroups.describe(vm: "a") == nil)
            // A process that exits by itself: its cgroup goes without killing anything.
            let again = try cgroups.prepare(vm: "a", limits: limits)
            let short = try JoinedProcess("/bin/true", ["true"], handle: again)
            again.close()
            #expect(short.wait() == 0)
            try cgroups.remove(vm: "a")
            for directory in again.directories { #expect(!CgroupFiles.exists(directory)) }
        }
    }

    @Test func anExitedProcessNotYetReapedIsWaitedForNotRefused() throws {
        try withCgroups { cgroups in
            let handle = try cgroups.prepare(vm: "a", limits: limits)
            let exited = try JoinedProcess("/bin/true", ["true"], handle: handle)
            handle.close()
            defer { exited.stop() }
            #expect(eventually { VMCgroups.hasExited(exited.pid) })
            let listed = VMCgroups.processes(handle.directories[0])
            print("an exited, unreaped process is \(listed.isEmpty ? "not " : "")listed in cgroup.procs")
            if !listed.isEmpty {
                // Listed until reaped: remove waits for it instead of refusing (.invalidState).
                #expect {
                    try cgroups.remove(vm: "a", timeout: .milliseconds(50))
                } throws: { error in
                    let error = error as? DriverError
                    return error?.code == .timeout && error?.message.contains("not yet reaped") == true
                }
            }
            #expect(exited.wait() == 0)
            try cgroups.remove(vm: "a")
            for directory in handle.directories { #expect(!CgroupFiles.exists(directory)) }
        }
    }

    @Test func sweepAfterACrashRemovesTheCgroupsOfEveryVMNotAlive() throws {
        try withCgroups { cgroups in
            // A crash: cgroups prepared, one VM's process still running, no handle kept.
            let other = TemporaryDirectory(prefix: "vmcg2")
            let neighbour = VMCgroups(stateDirectory: other.path, translationCacheMiB: 64)
            defer {
                neighbour.sweep(alive: [], kill: true)
                other.remove()
            }
            try neighbour.prepare(vm: "b", limits: limits).close()
            for vm in ["a", "b", "c"] { try cgroups.prepare(vm: vm, limits: limits).close() }
            let handle = try cgroups.prepare(vm: "c", limits: limits)
            let leaked = try JoinedProcess("/bin/sleep", ["sleep", "600"], handle: handle)
            handle.close()
            defer { leaked.stop() }
            let first = cgroups.sweep(alive: ["a"])
            #expect(first.removed == [VMCgroups.name(vm: "b")])
            #expect(first.busy == [VMCgroups.name(vm: "c")])
            #expect(kill(leaked.pid, 0) == 0)
            let second = cgroups.sweep(alive: ["a"], kill: true)
            #expect(second.removed == [VMCgroups.name(vm: "c")])
            #expect(leaked.wait() == 128 + SIGKILL)
            #expect(cgroups.directories(vm: "a").allSatisfy(CgroupFiles.exists))
            #expect(!cgroups.directories(vm: "b").contains(where: CgroupFiles.exists))
            // Another state dir's VM of the same name is not touched.
            #expect(neighbour.directories(vm: "b").allSatisfy(CgroupFiles.exists))
            let last = cgroups.sweep(alive: [])
            #expect(last.removed == [VMCgroups.name(vm: "a")])
            let levels = cgroups.directories(vm: "a").map { ($0 as NSString).deletingLastPathComponent }
            for level in levels { #expect(!CgroupFiles.exists(level), "the state dir's level \(level) is left") }
        }
    }

    @Test func aStaleCgroupIsReplacedUnlessItsProcessLives() throws {
        try withCgroups { cgroups in
            let handle = try cgroups.prepare(vm: "a", limits: limits)
            let sleeper = try JoinedProcess("/bin/sleep", ["sleep", "600"], handle: handle)
            handle.close()
            defer { sleeper.stop() }
            #expect {
                _ = try cgroups.prepare(vm: "a", limits: limits)
            } throws: { ($0 as? DriverError)?.code == .invalidState }
            sleeper.stop()
            try cgroups.prepare(vm: "a", limits: CgroupLimits(vcpus: 1, memoryMiB: 64)).close()
            try expectLimits(cgroups, "a", CgroupLimits(vcpus: 1, memoryMiB: 64))
        }
    }

    @Test func aChildThatCannotJoinIsNotStarted() throws {
        try withCgroups { cgroups in
            let handle = try cgroups.prepare(vm: "a", limits: limits)
            // A descriptor that is not open for writing: the join fails before exec.
            let readOnly = open(handle.directories[0] + "/cgroup.procs", O_RDONLY | O_CLOEXEC)
            defer { close(readOnly) }
            #expect(throws: SandboxError.self) {
                _ = try JoinedProcess("/bin/sleep", ["sleep", "600"], descriptors: [readOnly])
            }
            handle.close()
            #expect(VMCgroups.processes(handle.directories[0]).isEmpty)
            var failed: Int32 = -1
            let fds: [Int32] = [-1]
            #expect(vmpool_cgroup_join(fds, 1, &failed) == -1)
            #expect(errno == EBADF && failed == 0)
        }
    }
}

/// cgroup v2's structure on this host's real cgroup2 mount: on a v1 host its cpu, memory and
/// pids controllers are bound to v1 and cannot be enabled, so a controller that is free
/// (hugetlb) stands in for them. What this covers on a real kernel: creating the levels,
/// enabling a controller down to the VM, the no-internal-processes rule that puts the parent
/// beside vmpool's own cgroup, joining through the descriptors, cgroup.kill, remove and sweep.
/// The v2 limit files themselves are written on a real v2 kernel by `CgroupQemuTests`.
@Suite(
    "cgroup v2 structure on this host's cgroup2 mount", .serialized,
    .enabled(
        if: geteuid() == 0 && (CgroupEnvironment.unified != nil || CgroupEnvironment.required),
        "needs root and a cgroup2 mount with a free controller"))
struct HostCgroup2Tests {
    @Test func theParentGoesBesideACgroupThatHoldsProcessesAndEverythingIsRemoved() throws {
        let (mount, controller) = try #require(CgroupEnvironment.unified)
        let name = "vmpool-test-" + String(UInt32.random(in: 0...UInt32.max), radix: 16)
        let top = mount + "/" + name
        let rootControllers = CgroupFiles.read(mount + "/cgroup.subtree_control") ?? ""
        let enabledHere = !rootControllers.contains(controller)
        if enabledHere { #expect(CgroupFiles.write(mount + "/cgroup.subtree_control", "+" + controller) == nil) }
        #expect(mkdir(top, 0o755) == 0)
        #expect(mkdir(top + "/own", 0o755) == 0)
        // The systemd slice or the container above vmpool's own cgroup gives it the controller.
        #expect(CgroupFiles.write(top + "/cgroup.subtree_control", "+" + controller) == nil)
        let procs = open(top + "/own/cgroup.procs", O_WRONLY | O_CLOEXEC)
        // "vmpool's own cgroup": a process in top/own.
        let own = try JoinedProcess("/bin/sleep", ["sleep", "600"], descriptors: [procs])
        close(procs)
        let state = TemporaryDirectory(prefix: "vmcg2")
        defer {
            own.stop()
            rmdir(top + "/own")
            rmdir(top + "/vmpool")
            rmdir(top)
            if enabledHere { _ = CgroupFiles.write(mount + "/cgroup.subtree_control", "-" + controller) }
            state.remove()
        }
        func cgroups(base: String) -> VMCgroups {
            VMCgroups(
                stateDirectory: state.path, translationCacheMiB: 64,
                layout: .success(
                    CgroupLayout(version: .v2, hierarchies: [.init(controllers: [controller], base: base)])))
        }
        let limits = CgroupLimits(vcpus: 1, memoryMiB: 64)
        // As a child of the cgroup holding a process: the kernel refuses (EBUSY).
        #expect {
            _ = try cgroups(base: top + "/own").prepare(vm: "a", limits: limits)
        } throws: { error in
            let error = error as? DriverError
            return error?.code == .hostUnsupported && error?.message.contains("holds processes") == true
        }
        // Where detection puts it: beside (the sibling rule).
        let detected = try CgroupLayout.detect(
            mountinfo: CgroupFiles.read("/proc/self/mountinfo") ?? "", ownCgroups: "0::/\(name)/own\n",
            read: { CgroupFiles.read($0).map { _ in "cpu memory pids" } }, exists: CgroupFiles.exists
        ).get()
        #expect(detected.hierarchies.first?.base == top)
        let sibling = cgroups(base: top)
        defer { sibling.sweep(alive: [], kill: true) }
        let handle = try sibling.prepare(vm: "a", limits: limits)
        let vmDirectory = try #require(handle.directories.first)
        var level = top
        for part in sibling.stateLevel.split(separator: "/") {
            level += "/" + part
            #expect(CgroupFiles.read(level + "/cgroup.subtree_control")?.contains(controller) == true, "\(level)")
        }
        #expect(CgroupFiles.read(vmDirectory + "/cgroup.controllers")?.contains(controller) == true)
        let joined = try JoinedProcess("/bin/sleep", ["sleep", "600"], handle: handle)
        handle.close()
        defer { joined.stop() }
        let path = String(vmDirectory.dropFirst(mount.count))
        #expect(joined.cgroups.contains(path), "\(joined.cgroups)")
        #expect(VMCgroups.processes(vmDirectory) == [joined.pid])
        #expect {
            try sibling.remove(vm: "a")
        } throws: { ($0 as? DriverError)?.code == .invalidState }
        #expect(CgroupFiles.exists(vmDirectory + "/cgroup.kill"), "this kernel has cgroup.kill")
        try sibling.remove(vm: "a", kill: true)
        #expect(joined.wait() == 128 + SIGKILL)
        #expect(!CgroupFiles.exists(vmDirectory))
        #expect(kill(own.pid, 0) == 0, "vmpool's own cgroup is untouched")
        // A crashed run's cgroup, swept.
        try sibling.prepare(vm: "b", limits: limits).close()
        #expect(sibling.sweep(alive: []).removed == [VMCgroups.name(vm: "b")])
        #expect(!CgroupFiles.exists(top + "/" + sibling.stateLevel))
    }
}
