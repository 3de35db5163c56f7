import Foundation
import Testing
import VmpoolStore
import VmpoolTestSupport

@testable import VmpoolQEMU

/// `vmpool apply` on real QEMU killed with SIGKILL at many instants; one `vmpool reconcile`
/// must leave exactly the desired VMs: no QEMU without a record, no record without a QEMU, no
/// stale socket dir, memory file or template state.
@Suite(
    "Crash safety on real QEMU", .serialized,
    .enabled(if: QemuEnvironment.available, "\(QemuEnvironment.skipReason ?? "")"))
struct QemuCrashSafetyTests {
    static let killPoints = Int(ProcessInfo.processInfo.environment["VMPOOL_QEMU_KILL_POINTS"] ?? "") ?? 30

    func manifest(size: Int, vcpus: Int, memory: String) -> String {
        """
        apiVersion: vmpool/v1
        kind: Pool
        metadata: {name: crash}
        spec: {size: \(size), vcpus: \(vcpus), memory: \(memory), maxVcpus: 2, maxMemory: 512Mi, boot: template}
        """
    }

    @Test func applyKilledAtAnyInstantIsRepairedByOneReconcile() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        // Shapes to move between: scale up from few, a new template (memory change), scale down.
        let files = [
            box.write(manifest(size: 8, vcpus: 1, memory: "256Mi"), as: "a.yaml"),
            box.write(manifest(size: 3, vcpus: 1, memory: "256Mi"), as: "b.yaml"),
            box.write(manifest(size: 8, vcpus: 1, memory: "384Mi"), as: "c.yaml"),
        ]
        // Time each transition once, unkilled, so the kill points spread over the apply they hit.
        func timedApply(_ file: String) throws -> Double {
            let started = Date()
            #expect(try box.run(["apply", "-f", file]).status == 0)
            return Date().timeIntervalSince(started)
        }
        _ = try timedApply(files[0])
        _ = try timedApply(files[1])
        var durations = [Double](repeating: 0, count: files.count)
        for index in [2, 0, 1] { durations[index] = try timedApply(files[index]) }

        var interrupted = 0
        for point in 0..<Self.killPoints {
            let index = (point + 2) % files.count
            let file = files[index]
            let delay = durations[index] * Double(point % 10 + 1) / 11
            let apply = try box.binary.start(["apply", "-f", file, "--state-dir", box.state])
            usleep(useconds_t(delay * 1_000_000))
            apply.kill(SIGKILL)
            _ = apply.wait()
            let repair = try box.run(["reconcile"])
            #expect(repair.status == 0, "kill point \(point): \(repair.stdout)\n\(repair.stderr)")
            if !repair.stdout.contains("No changes") { interrupted += 1 }
            try expectConsistent(box, point: point)
        }
        #expect(interrupted >= Self.killPoints / 2)
        print(
            "crash safety (qemu): \(Self.killPoints) kill points survived, \(interrupted) interrupted work,"
                + " spread over applies of \(durations.map { String(format: "%.2f", $0) }.joined(separator: ", ")) s")
    }

    func expectConsistent(_ box: QemuSandbox, point: Int) throws {
        let store = try StateStore(directory: box.state)
        #expect(try store.unfinishedOperations().isEmpty, "kill point \(point): open journal entries")
        let records = try store.vms()
        let desired = try #require(try store.pools().first?.spec)
        #expect(records.count == desired.size, "kill point \(point): \(records.count) VMs of \(desired.size)")
        #expect(records.allSatisfy { $0.state == .running && $0.shape.memoryMiB == desired.memoryMiB })
        let standbys = try store.standbys()
        #expect(standbys.count == 2 && standbys.allSatisfy { $0.ready }, "kill point \(point): standbys \(standbys)")
        let processes = Set(box.qemuProcesses())
        let recorded = Set(records.compactMap(\.pid) + standbys.compactMap(\.pid))
        #expect(processes == recorded, "kill point \(point): processes \(processes) vs records \(recorded)")
        let paths = QemuPaths(configuration: QemuConfiguration(stateDirectory: box.state))
        let runDirs = Set((try? FileManager.default.contentsOfDirectory(atPath: paths.runRoot)) ?? [])
        let expectedDirs = Set(
            (records.map(\.id) + standbys.map(\.id)).map { URL(fileURLWithPath: paths.vmDirectory($0)).lastPathComponent })
        #expect(runDirs == expectedDirs, "kill point \(point): stale run dirs \(runDirs.subtracting(expectedDirs))")
        let templates = try store.templates()
        #expect(templates.count == 1 && templates.allSatisfy { $0.state == .ready })
        #expect(standbys.allSatisfy { $0.template == templates.first?.ref.id }, "kill point \(point): stale standby")
        let memory = Set((try? FileManager.default.contentsOfDirectory(atPath: paths.memoryRoot)) ?? [])
        #expect(memory == Set(templates.map { $0.ref.id + ".mem" }), "kill point \(point): memory files \(memory)")
        let states = Set((try? FileManager.default.contentsOfDirectory(atPath: paths.templateRoot)) ?? [])
        #expect(states == Set(templates.map { $0.ref.id + ".state" }), "kill point \(point): template states \(states)")
    }
}
