import Foundation
import Testing
import VmpoolSim
import VmpoolStore
import VmpoolTestSupport

/// `vmpool apply` killed with SIGKILL at many instants; one `vmpool reconcile` must then leave
/// exactly the desired VMs, every record matched by a hypervisor VM and the other way round.
@Suite("Crash safety on the sim driver", .serialized)
struct CrashSafetyTests {
    static let killPoints = Int(ProcessInfo.processInfo.environment["VMPOOL_KILL_POINTS"] ?? "") ?? 30

    @Test func applyKilledAtAnyInstantIsRepairedByOneReconcile() async throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let latency = ["VMPOOL_SIM_LATENCY": "40ms"]
        // Three shapes to move between, so each killed apply has creates, hotplugs, replaces and stops to do.
        let specs = [
            pool(size: 8, vcpus: 1, warm: 1),
            pool(size: 10, vcpus: 2, memoryMiB: 512, warm: 0),
            pool(size: 9, vcpus: 1, memoryMiB: 512, boot: .template, warm: 2),
        ]
        let files = specs.enumerated().map { box.dir.write("spec\($0.offset).yaml", manifest($0.element)) }

        // How long an unkilled apply of the first shape takes, to spread the kill points over it.
        let started = Date()
        #expect(try box.run("apply", "-f", files[0], "--parallel", "2", environment: latency).status == 0)
        let duration = max(0.2, Date().timeIntervalSince(started))
        #expect(try box.run("delete", "web").status == 0)

        var survived = 0
        var interrupted = 0
        for point in 0..<Self.killPoints {
            let file = files[point % files.count]
            let delay = duration * Double(point) / Double(Self.killPoints)
            let apply = try box.binary.start(
                ["apply", "-f", file, "--parallel", "2", "--state-dir", box.state], environment: latency)
            usleep(useconds_t(delay * 1_000_000))
            apply.kill(SIGKILL)
            _ = apply.wait()

            let repair = try box.run("reconcile")
            #expect(repair.status == 0, "kill point \(point) (\(delay)s): \(repair.stdout)\n\(repair.stderr)")
            try await expectConsistent(box, point: point)
            survived += 1
            if !repair.stdout.contains("No changes") { interrupted += 1 }
        }
        #expect(survived == Self.killPoints)
        #expect(interrupted >= Self.killPoints / 2, "most kill points must land inside an apply")
        print(
            "crash safety (sim): \(survived) of \(Self.killPoints) kill points survived, \(interrupted) of them"
                + " interrupted work, spread over \(String(format: "%.2f", duration)) s")
    }

    /// The store's desired pools are met exactly, and store and hypervisor agree on every VM.
    func expectConsistent(_ box: Sandbox, point: Int) async throws {
        let store = try StateStore(directory: box.state)
        #expect(try store.unfinishedOperations().isEmpty, "kill point \(point): open journal entries")
        let records = try store.vms()
        for stored in try store.pools() {
            let vms = records.filter { $0.pool == stored.spec.name }
            #expect(vms.count == stored.spec.totalVMs, "kill point \(point): \(vms.count) VMs of \(stored.spec.totalVMs)")
            #expect(vms.filter { $0.state == .running }.count == stored.spec.size)
            #expect(vms.allSatisfy { $0.shape.vcpus == stored.spec.vcpus && $0.shape.memoryMiB == stored.spec.memoryMiB })
        }
        let sim = try SimDriver(stateDirectory: box.state)
        let running = Set(await sim.discover().map(\.id))
        let standbys = try store.standbys()
        #expect(standbys.allSatisfy { $0.ready }, "kill point \(point): a standby start was left half done")
        #expect(
            running == Set(records.map(\.id) + standbys.map(\.id)), "kill point \(point): sim and store disagree")
        let templates = Set(await sim.discoverTemplates())
        #expect(templates.isSubset(of: Set(try store.templates().map(\.ref.id))), "kill point \(point): stray template")
    }
}
