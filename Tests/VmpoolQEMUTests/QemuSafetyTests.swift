import Foundation
import Testing
import VmpoolDriver
import VmpoolStore
import VmpoolTestSupport

@testable import VmpoolQEMU

/// What the review found on real QEMU: observers that disturbed an apply, a busy channel
/// taken for a dead VM, a stalled guest that wedged apply, state dir spellings, the KVM probe
/// and the template memory directory.
@Suite(
    "Safety on real QEMU", .serialized,
    .enabled(if: QemuEnvironment.available, "\(QemuEnvironment.skipReason ?? "")"))
struct QemuSafetyTests {
    /// This suite's pools: template-booted unless it says otherwise.
    func pool(_ name: String, size: Int, boot: String = "template", extra: String = "") -> String {
        poolYAML(name, size: size, boot: boot, extra: extra)
    }

    @Test func observersDuringAnApplyNeitherDisturbItNorMisreport() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        #expect(try box.run(["apply", "-f", box.write(pool("steady", size: 3))]).status == 0)
        let steady = Set(try box.ids(pool: "steady"))
        // A slow apply (cold boots) while get and plan run in a loop beside it.
        let slow = try box.binary.start([
            "apply", "-f", box.write(pool("slow", size: 2, boot: "cold"), as: "slow.yaml"), "--state-dir", box.state,
        ])
        var observations = 0
        var misreports: [String] = []
        while kill(slow.pid, 0) == 0 {
            for vm in try box.vms(pool: "steady") where vm["state"] as? String != "running" {
                misreports.append("\(vm["id"] ?? "?") shown \(vm["state"] ?? "?")")
            }
            let plan = try box.run(["plan", "-f", box.dir.path + "/pool.yaml", "--detailed-exitcode"])
            if plan.status != 0 { misreports.append("plan of the steady pool: \(plan.stdout)") }
            observations += 1
            if observations > 200 { break }
        }
        let result = slow.wait()
        #expect(result.status == 0, "the apply was disturbed: \(result.stdout)\n\(result.stderr)")
        #expect(observations >= 3, "the observers ran \(observations) times")
        #expect(misreports.isEmpty, "\(misreports.prefix(5))")
        #expect(Set(try box.ids(pool: "steady")) == steady, "no steady VM was replaced")
    }

    @Test func aBusyAgentChannelIsNotADeadVM() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        #expect(try box.run(["apply", "-f", box.write(pool("held", size: 1))]).status == 0)
        let vm = try #require(try box.ids().first)
        // Someone else connects to the agent's control socket and keeps it.
        let paths = QemuPaths(configuration: QemuConfiguration(stateDirectory: box.state))
        let holder = try Channel(
            path: paths.agentSocket(vm), name: "the control port", vm: vm, deadline: .now + .seconds(5))
        defer { holder.close() }
        usleep(200_000)
        let reconcile = try box.run(["reconcile"])
        #expect(reconcile.status == 0, "\(reconcile.stdout)\n\(reconcile.stderr)")
        #expect(
            !reconcile.stdout.contains("replace"),
            "a healthy VM whose agent channel was busy was replaced: \(reconcile.stdout)")
        #expect(try box.ids() == [vm])
    }

    @Test func aGuestThatNeverAnswersFailsTheActionAtTheBootTimeout() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        // The initramfs runs a shell instead of its init: the agent never starts.
        let file = box.write(
            pool("mute", size: 1, boot: "cold", extra: "  image: {cmdline: \"console=ttyS0 rdinit=/bin/sh\"}"))
        let started = Date()
        let result = try box.run(["apply", "-f", file], environment: ["VMPOOL_BOOT_TIMEOUT": "6s"])
        let took = Date().timeIntervalSince(started)
        #expect(result.status == 1)
        #expect(result.stdout.contains("did not answer"), "\(result.stdout)")
        #expect(took < 30, "apply took \(took) s")
        #expect(box.qemuProcesses().isEmpty, "the half-booted VM was left running")
        // The lock is free: another command gets it at once (and fails on the mute guest itself).
        let next = try box.run(["reconcile", "--lock-timeout", "1s"], environment: ["VMPOOL_BOOT_TIMEOUT": "1s"])
        #expect(!next.stderr.contains("another vmpool is working"), "\(next.stderr)")
        // A second SIGTERM interrupts a boot that would otherwise wait for its timeout.
        let waiting = try box.binary.start(
            ["apply", "-f", file, "--state-dir", box.state], environment: ["VMPOOL_BOOT_TIMEOUT": "120s"])
        // Signalled once its guest is booting (its QEMU runs), when it would wait 120 s.
        #expect(eventually(timeout: .seconds(30)) { !box.qemuProcesses().isEmpty }, "the apply started no QEMU")
        let signalled = Date()
        waiting.kill(SIGTERM)
        // The second once the first was taken (two pending SIGTERMs would be one).
        let shuttingDown = eventually(timeout: .seconds(10)) {
            ((try? String(contentsOfFile: waiting.errPath, encoding: .utf8)) ?? "").contains("signal again")
        }
        #expect(shuttingDown, "the first SIGTERM was not taken as a shutdown")
        waiting.kill(SIGTERM)
        let interrupted = waiting.wait()
        #expect(Date().timeIntervalSince(signalled) < 15, "two SIGTERMs took \(Date().timeIntervalSince(signalled)) s")
        #expect(interrupted.status == 1)
        #expect(box.qemuProcesses().isEmpty)
        #expect(try StateStore(directory: box.state).vms().isEmpty)
    }

    /// A template build whose guest is frozen (its QEMU SIGSTOPped as it boots) fails at the
    /// boot timeout with the half-built template gone and the lock free.
    @Test func aTemplateBuildFrozenWithSIGSTOPFailsAtTheBootTimeout() throws {
        let box = try QemuSandbox()
        defer {
            for pid in box.qemuProcesses() { kill(pid, SIGCONT) }
            box.tearDown()
        }
        let file = box.write(pool("frozen", size: 1))
        let started = Date()
        let applying = try box.binary.start(
            ["apply", "-f", file, "--state-dir", box.state], environment: ["VMPOOL_BOOT_TIMEOUT": "6s"])
        var frozen: [Int32] = []
        while frozen.isEmpty && Date().timeIntervalSince(started) < 30 {
            frozen = box.qemuProcesses()
            usleep(20_000)
        }
        #expect(!frozen.isEmpty, "no QEMU started")
        for pid in frozen { kill(pid, SIGSTOP) }
        let result = applying.wait()
        let took = Date().timeIntervalSince(started)
        #expect(result.status == 1, "\(result.stdout)\(result.stderr)")
        #expect(result.stdout.contains("did not answer"), "\(result.stdout)")
        #expect(took < 40, "apply took \(took) s with a 6 s boot timeout")
        // The lock is free, and the next pass leaves no frozen QEMU behind.
        let next = try box.run(["reconcile", "--lock-timeout", "1s"])
        #expect(!next.stderr.contains("another vmpool is working"), "\(next.stderr)")
        #expect(!box.qemuProcesses().contains(where: frozen.contains), "a frozen QEMU was left behind")
    }

    /// What counts is what the guest has online: a CPU QEMU has plugged but the guest holds
    /// offline is not converged; the plan says so and apply brings it online.
    @Test func aCPUTheGuestHoldsOfflineIsNotConverged() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let file = box.write(
            pool("cpu", size: 1, boot: "cold").replacingOccurrences(of: "vcpus: 1", with: "vcpus: 2\n  maxVcpus: 2"))
        #expect(try box.run(["apply", "-f", file]).status == 0)
        let vm = try #require(try box.ids().first)
        // Straight through the agent's exec port, as the guest itself would: `vmpool exec` would
        // mark the VM entered, and the pass would replace it instead.
        let offline = try agentExec(box, vm, ["sh", "-c", "echo 0 > /sys/devices/system/cpu/cpu1/online"])
        #expect(offline.status == 0)
        let plan = try box.run(["plan", "-f", file, "--detailed-exitcode"])
        #expect(plan.status == 2 && plan.stdout.contains("hotplug-cpu \(vm)"), "\(plan.stdout)")
        #expect(try box.run(["apply", "-f", file]).status == 0)
        let online = try agentExec(box, vm, ["cat", "/sys/devices/system/cpu/online"])
        #expect(online.stdout == "0-1\n", "\(online.stdout)")
        let after = try box.run(["plan", "-f", file, "--detailed-exitcode"])
        #expect(after.status == 0, "\(after.stdout)\(after.stderr)")
    }

    /// SIGTERM at any point of an apply that switches a template pool to cold boot: an exit 0
    /// means the switch is done (no template standby runs, plan is clean), and one reconcile
    /// finishes what an interrupted one left.
    @Test func aSIGTERMDuringASwitchToColdBootLeavesNoStandbys() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let template = box.write(pool("sw", size: 1), as: "template.yaml")
        let cold = box.write(pool("sw", size: 1, boot: "cold"), as: "cold.yaml")
        func settled(_ what: String) throws {
            #expect(try StateStore(directory: box.state).standbys().isEmpty, "\(what): standbys left")
            #expect(box.qemuProcesses().count == 1, "\(what): QEMU \(box.qemuProcesses()) for one cold VM")
            let plan = try box.run(["plan", "-f", cold, "--detailed-exitcode"])
            #expect(plan.status == 0, "\(what): \(plan.stdout)")
        }
        for delay: UInt32 in [50_000, 150_000, 500_000, 1_000_000, 2_000_000] {
            #expect(try box.run(["apply", "-f", template]).status == 0)
            #expect(try StateStore(directory: box.state).standbys().count == 2)
            let applying = try box.binary.start(["apply", "-f", cold, "--state-dir", box.state])
            usleep(delay)
            applying.kill(SIGTERM)
            let result = applying.wait()
            if result.status == 0 { try settled("exit 0 after SIGTERM at \(delay / 1000) ms") }
            let recorded = try StateStore(directory: box.state).pools().first?.spec.boot
            #expect(try box.run(["reconcile"]).status == 0)
            if recorded == .template {
                // Stopped before it recorded the switch: the pool is still what was applied
                // before, template and standbys included, and nothing is left half-done.
                #expect(result.status != 0, "an apply that recorded nothing exited 0")
                #expect(try StateStore(directory: box.state).standbys().count == 2)
                let again = try box.run(["reconcile"])
                #expect(again.stdout.contains("No changes"), "after SIGTERM at \(delay / 1000) ms: \(again.stdout)")
                #expect(try box.run(["apply", "-f", cold]).status == 0)
            }
            try settled("reconcile after SIGTERM at \(delay / 1000) ms (switch recorded: \(recorded == .cold))")
        }
    }

    /// `get pools` counts only standbys whose QEMU runs.
    @Test func standbysWhoseQEMUIsGoneAreNotCounted() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        #expect(try box.run(["apply", "-f", box.write(pool("spare", size: 1))]).status == 0)
        func counted() throws -> Int {
            let listed = try box.run(["get", "pools", "-o", "json"])
            let pools = try JSONSerialization.jsonObject(with: Data(listed.stdout.utf8)) as? [[String: Any]]
            return pools?.first?["standbys"] as? Int ?? -1
        }
        let standbys = try StateStore(directory: box.state).standbys().filter(\.ready)
        let before = try counted()
        #expect(standbys.count == 2 && before == 2)
        let killed = try #require(standbys.first?.pid)
        kill(killed, SIGKILL)
        #expect(
            try eventually(timeout: .seconds(30)) { try counted() == 1 }, "a standby whose QEMU was killed is counted")
    }

    @Test func everySpellingOfTheStateDirNamesTheSameVMs() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let file = box.write(pool("spelled", size: 2))
        #expect(try box.run(["apply", "-f", file]).status == 0)
        let link = box.dir.path + "/link"
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: box.state)
        for spelling in [box.state + "/", box.dir.path + "//s", box.dir.path + "/./s", link] {
            let plan = try box.binary.run(["plan", "-f", file, "--state-dir", spelling, "--detailed-exitcode"])
            #expect(plan.status == 0, "state dir spelled \(spelling): \(plan.stdout)")
            let reconcile = try box.binary.run(["reconcile", "--state-dir", spelling])
            #expect(reconcile.stdout.contains("No changes"), "\(spelling): \(reconcile.stdout)")
        }
        #expect(box.qemuProcesses().count == 4, "2 VMs and 2 standbys, no more")
    }

    @Test(.enabled(if: QemuEnvironment.kvmSkipReason == nil, "\(QemuEnvironment.kvmSkipReason ?? "")"))
    func theKVMProbeKilledHalfwayIsStoppedByTheNextRun() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let file = box.write(pool("probe", size: 1, boot: "cold"))
        let first = try box.binary.start(
            ["apply", "-f", file, "--state-dir", box.state], environment: ["VMPOOL_ACCEL": "auto"])
        // Killed while the probe's QEMU runs (its run dir is on its command line).
        let probeDirectory = QemuPaths(configuration: QemuConfiguration(stateDirectory: box.state))
            .vmDirectory(AcceleratorProbe.probeID)
        let probing = eventually(timeout: .seconds(60)) {
            !GuestAgentTests.processes(containing: probeDirectory).isEmpty || first.wait(timeout: .zero) != nil
        }
        first.kill(SIGKILL)
        #expect(first.wait().status == 128 + SIGKILL, "apply ended before the probe was seen")
        #expect(probing, "no KVM probe within 60 s")
        let repair = try box.run(["reconcile"], environment: ["VMPOOL_ACCEL": "tcg"])
        #expect(repair.status == 0, "\(repair.stderr)")
        let store = try StateStore(directory: box.state)
        let recorded = Set(try store.vms().compactMap(\.pid) + store.standbys().compactMap(\.pid))
        // Any QEMU booting this state dir's kernel, wherever its other files are.
        let kernel = box.state + "/image/vmlinuz"
        let booting = Set(
            ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { entry -> Int32? in
                guard let pid = Int32(entry), let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"),
                    String(decoding: data, as: UTF8.self).contains(kernel),
                    !((try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? "").contains(") Z")
                else { return nil }
                return pid
            })
        #expect(booting.isSubset(of: recorded), "a QEMU that is no VM's was left: \(booting.subtracting(recorded))")
    }

    @Test func aProcessOfAnotherUserOrProgramIsNeverTakenForAVM() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        #expect(try box.run(["apply", "-f", box.write(pool("mine", size: 0))]).status == 0)
        let paths = QemuPaths(configuration: QemuConfiguration(stateDirectory: box.state))
        // A shell whose arguments look like a VM of this state dir.
        let decoy = try RunningCommand(
            path: "/bin/sh", arguments: ["-c", "sleep 30", "-name", "guest=mine-abcdef", paths.runRoot + "/x/q"],
            environment: [:])
        defer {
            decoy.kill()
            _ = decoy.wait()
        }
        // The configured QEMU itself, run by another user, with this state dir's run path in
        // its command line (root only: runuser).
        var other: RunningCommand?
        if geteuid() == 0 {
            other = try RunningCommand(
                path: "/usr/sbin/runuser",
                arguments: [
                    "-u", "nobody", "--", "/usr/bin/qemu-system-x86_64", "-machine", "none", "-display", "none",
                    "-nodefaults", "-S", "-name", "guest=mine-fedcba", "-L", paths.runRoot + "/y",
                ], environment: [:])
        }
        defer {
            // runuser does not pass SIGKILL on: its QEMU is killed by pid.
            for pid in qemuOf(uid: 65534) { kill(pid, SIGKILL) }
            other?.kill()
            _ = other?.wait()
        }
        // runuser starts QEMU after a fork and PAM: wait for it with a deadline.
        if geteuid() == 0 {
            #expect(
                eventually(timeout: .seconds(30)) { qemuOf(uid: 65534).count == 1 },
                "the other user's QEMU did not start")
        }
        let others = qemuOf(uid: 65534)
        #expect(try box.run(["reconcile"]).status == 0)
        #expect(kill(decoy.pid, 0) == 0, "reconcile killed a process that is not one of its QEMUs")
        for pid in others {
            #expect(kill(pid, 0) == 0, "reconcile killed another user's QEMU (pid \(pid))")
        }
    }

    /// QEMU processes running as `uid`.
    func qemuOf(uid: uid_t) -> [Int32] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { entry in
            guard let pid = Int32(entry),
                let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
                status.contains("Name:\tqemu-system-x86"),
                status.split(separator: "\n").contains(where: { $0.hasPrefix("Uid:\t\(uid)\t") })
            else { return nil }
            return pid
        }
    }

    @Test(.enabled(if: geteuid() == 0, "needs root to make a directory of another user"))
    func aTemplateMemoryDirectoryOfAnotherUserIsRefused() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let paths = QemuPaths(configuration: QemuConfiguration(stateDirectory: box.state))
        try? FileManager.default.removeItem(atPath: paths.memoryRoot)
        mkdir(paths.memoryRoot, 0o777)
        chown(paths.memoryRoot, 65534, 65534)
        defer { try? FileManager.default.removeItem(atPath: paths.memoryRoot) }
        let result = try box.run(["apply", "-f", box.write(pool("shm", size: 1))])
        #expect(result.status == 1)
        #expect(result.stdout.contains("belongs to uid 65534"), "\(result.stdout)")
        // A symlink planted in its place is refused too.
        rmdir(paths.memoryRoot)
        symlink("/tmp", paths.memoryRoot)
        let linked = try box.run(["apply", "-f", box.dir.path + "/pool.yaml"])
        #expect(linked.status == 1)
        #expect(linked.stdout.contains("not a directory"), "\(linked.stdout)")
        unlink(paths.memoryRoot)
    }
}
