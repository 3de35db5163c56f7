import Foundation
import Testing
import VmpoolDriver
import VmpoolTestSupport

@testable import VmpoolQEMU

/// Real QEMU VMs, booted and cloned through the `vmpool` binary, checked from the host and
/// from inside the guest through its agent.
@Suite(
    "qemu driver on real QEMU", .serialized,
    .enabled(if: QemuEnvironment.available, "\(QemuEnvironment.skipReason ?? "")"))
struct QemuIntegrationTests {
    func manifest(
        _ name: String, size: Int, vcpus: Int = 1, memory: String = "256Mi", boot: String = "cold",
        state: String = "running", extra: String = ""
    ) -> String {
        """
        apiVersion: vmpool/v1
        kind: Pool
        metadata: {name: \(name)}
        spec:
          size: \(size)
          vcpus: \(vcpus)
          memory: \(memory)
          maxVcpus: 4
          maxMemory: 1Gi
          boot: \(boot)
          state: \(state)
        \(extra)
        """
    }

    func paths(_ box: QemuSandbox) -> QemuPaths {
        QemuPaths(configuration: QemuConfiguration(stateDirectory: box.state))
    }

    func agentInfo(_ box: QemuSandbox, vm: String) throws -> AgentClient.Info {
        let agent = try AgentClient(path: paths(box).agentSocket(vm), vm: vm)
        defer { agent.close() }
        return try agent.info()
    }

    func runState(_ box: QemuSandbox, vm: String) throws -> String? {
        let qmp = try QMPClient(path: paths(box).qmpSocket(vm), vm: vm)
        defer { qmp.close() }
        return try qmp.execute("query-status", returning: StatusInfo.self).status
    }

    func apply(_ box: QemuSandbox, _ text: String) throws -> CommandResult {
        let result = try box.run(["apply", "-f", box.write(text)])
        #expect(result.status == 0, "apply failed: \(result.stdout)\n\(result.stderr)")
        return result
    }

    @Test func aColdPoolOfTwoBootsAndItsAgentsAnswer() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        _ = try apply(box, manifest("cold", size: 2))
        let vms = try box.vms()
        #expect(vms.count == 2)
        for vm in vms {
            #expect(vm["state"] as? String == "running")
            let pid = try #require(vm["pid"] as? Int)
            #expect(kill(Int32(pid), 0) == 0, "qemu pid \(pid) is not alive")
            let info = try agentInfo(box, vm: try #require(vm["id"] as? String))
            #expect(info.cpus == 1)
        }
        #expect(Set(box.qemuProcesses().map(Int.init)) == Set(vms.compactMap { $0["pid"] as? Int }))
        let plan = try box.run(["plan", "-f", box.write(manifest("cold", size: 2)), "--detailed-exitcode"])
        #expect(plan.status == 0, "a second apply would change something: \(plan.stdout)")
    }

    @Test func templateClonesMapTheTemplateMemoryFile() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let result = try apply(box, manifest("tpl", size: 3, boot: "template"))
        #expect(result.stdout.contains("build-template"))
        let memoryRoot = paths(box).memoryRoot
        let files = try FileManager.default.contentsOfDirectory(atPath: memoryRoot).filter { $0.hasSuffix(".mem") }
        #expect(files.count == 1)
        let memoryFile = memoryRoot + "/" + (files.first ?? "")
        // The template's all-zero pages were given back after its save (about 22 of 118 MiB for
        // this guest before); a clone's read of a hole can put one back, hence a bound, not zero.
        let zeros = try TemplateMemoryTests.zeroPages(memoryFile)
        #expect(zeros < 256, "the template memory file holds \(zeros) pages of zeros")
        let vms = try box.vms()
        #expect(vms.count == 3)
        // Three clones and two standbys; the template VM itself does not keep running.
        #expect(box.qemuProcesses().count == 5)
        for vm in vms {
            #expect(vm["boot"] as? String == "template")
            let pid = try #require(vm["pid"] as? Int)
            let maps = try String(contentsOfFile: "/proc/\(pid)/maps", encoding: .utf8)
            #expect(maps.contains(memoryFile), "clone \(pid) does not map \(memoryFile)")
            let id = try #require(vm["id"] as? String)
            let info = try agentInfo(box, vm: id)
            #expect(info.cpus == 1)
            // The clone's clock was set from the host, not left at the template's save time.
            let skew = abs((info.time ?? 0) - Date().timeIntervalSince1970)
            #expect(skew < 1, "clone clock is \(skew) s off")
        }
        let again = try box.run([
            "plan", "-f", box.write(manifest("tpl", size: 3, boot: "template")), "--detailed-exitcode",
        ])
        #expect(again.status == 0)
    }

    @Test func hotpluggedCPUsAndMemoryAreOnlineInTheGuest() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        _ = try apply(box, manifest("grow", size: 1))
        let id = try #require(try box.vms().first?["id"] as? String)
        let before = try agentInfo(box, vm: id)
        let result = try apply(box, manifest("grow", size: 1, vcpus: 3, memory: "512Mi"))
        #expect(result.stdout.contains("hotplug-cpu"))
        #expect(result.stdout.contains("hotplug-memory"))
        #expect(!result.stdout.contains("replace"))
        let after = try agentInfo(box, vm: id)
        #expect(before.cpus == 1)
        #expect(after.cpus == 3)
        #expect(after.memoryMiB >= before.memoryMiB + 250, "guest memory \(before.memoryMiB) → \(after.memoryMiB) MiB")
        let vm = try #require(try box.vms().first)
        #expect(vm["vcpus"] as? Int == 3)
        #expect(vm["memoryMiB"] as? Int == 512)
    }

    @Test func pauseAndResume() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        _ = try apply(box, manifest("pr", size: 1))
        let id = try #require(try box.vms().first?["id"] as? String)
        _ = try apply(box, manifest("pr", size: 1, state: "paused"))
        #expect(try runState(box, vm: id) == "paused")
        #expect(try box.vms().first?["state"] as? String == "paused")
        _ = try apply(box, manifest("pr", size: 1, state: "running"))
        #expect(try runState(box, vm: id) == "running")
        #expect(try agentInfo(box, vm: id).cpus == 1)
    }

    /// Whether `pid` has ended: gone, or a zombie waiting for its parent.
    static func ended(_ pid: Int32) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8) else { return true }
        return stat.split(separator: ")").last?.split(separator: " ").first == "Z"
    }

    @Test func aKilledQemuIsReplacedByTheNextReconcile() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        _ = try apply(box, manifest("heal", size: 2))
        let before = try box.vms()
        let victim = try #require(before.first)
        let pid = try #require(victim["pid"] as? Int)
        kill(Int32(pid), SIGKILL)
        #expect(eventually { Self.ended(Int32(pid)) }, "the killed QEMU \(pid) is still running")
        let plan = try box.run(["plan", "-f", box.write(manifest("heal", size: 2))])
        #expect(plan.stdout.contains("replace"), "plan shows the repair first: \(plan.stdout)")
        let result = try box.run(["reconcile"])
        #expect(result.status == 0, "\(result.stdout)\n\(result.stderr)")
        let after = try box.vms()
        #expect(after.count == 2)
        #expect(!after.contains { $0["id"] as? String == victim["id"] as? String })
        #expect(after.allSatisfy { $0["state"] as? String == "running" })
        #expect(box.qemuProcesses().count == 2)
    }

    @Test func deleteLeavesNoProcessSocketOrMemoryFile() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        _ = try apply(box, manifest("gone", size: 2, boot: "template"))
        #expect(box.qemuProcesses().count == 4, "two clones and two standbys")
        let result = try box.run(["delete", "gone"])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(box.qemuProcesses().isEmpty)
        let runDir = (try? FileManager.default.contentsOfDirectory(atPath: box.state + "/run")) ?? []
        #expect(runDir.isEmpty, "left in run/: \(runDir)")
        let memory = (try? FileManager.default.contentsOfDirectory(atPath: paths(box).memoryRoot)) ?? []
        #expect(memory.isEmpty, "left in the memory dir: \(memory)")
        let templates = (try? FileManager.default.contentsOfDirectory(atPath: box.state + "/templates")) ?? []
        #expect(templates.isEmpty)
    }

    @Test func autoAcceleratorDecidesQuickly() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let kernel = try #require(QemuEnvironment.kernel)
        let started = ContinuousClock.now
        let configuration = QemuConfiguration(stateDirectory: box.state)
        let paths = QemuPaths(configuration: configuration)
        let confinement = try Confinement.resolve(configuration)
        let accel = AcceleratorProbe.resolve(
            .auto, binary: "qemu-system-x86_64", paths: paths, kernel: kernel, confinement: confinement)
        let elapsed = ContinuousClock.now - started
        #expect(elapsed < .seconds(5), "the probe took \(elapsed)")
        if accel == .kvm {
            #expect(
                AcceleratorProbe.bootsKernel(
                    qemu: "/usr/bin/qemu-system-x86_64", kernel: kernel, paths: paths, confinement: confinement))
        }
        let cached = try String(contentsOfFile: box.state + "/accel", encoding: .utf8)
        #expect(cached.hasPrefix(accel.rawValue + " "))
        #expect(
            AcceleratorProbe.resolve(
                .auto, binary: "qemu-system-x86_64", paths: paths, kernel: kernel, confinement: confinement) == accel)
        // The probe's QEMU is confined like a VM's and its serial console reaches the probe: under
        // TCG the kernel's banner comes (0.3 s on a quiet machine; the wait allows a loaded one).
        #expect(
            AcceleratorProbe.bootsKernel(
                qemu: "/usr/bin/qemu-system-x86_64", kernel: kernel, paths: paths, confinement: confinement,
                accel: "tcg", within: .seconds(60)), "a confined probe under TCG saw no kernel banner")
    }
}
