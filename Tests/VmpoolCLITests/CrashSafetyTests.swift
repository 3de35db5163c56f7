import Foundation
import Testing
import VmpoolDriver
import VmpoolSim
import VmpoolSpec
import VmpoolStore
import VmpoolTestSupport

/// `vmpool apply`, `reconcile` and `delete` killed with SIGKILL at many instants; one
/// `vmpool reconcile` must then leave exactly the desired VMs, every record matched by a
/// hypervisor VM and the other way round, every allocation (forwarded port, address) held by
/// exactly one recorded VM.
@Suite("Crash safety on the sim driver", .serialized)
struct CrashSafetyTests {
    static let killPoints = Int(ProcessInfo.processInfo.environment["VMPOOL_KILL_POINTS"] ?? "") ?? 30

    /// Shapes to move between: creates, CPU and memory hotplug, replaces, a template, warm
    /// spares, a paused pool, forwarded ports and bridge addresses.
    static func shapes() -> [[PoolSpec]] {
        var web = [
            pool(size: 8, vcpus: 1, warm: 1),
            pool(size: 10, vcpus: 2, memoryMiB: 512, warm: 0),
            pool(size: 9, vcpus: 1, memoryMiB: 512, boot: .template, warm: 2),
        ]
        for index in web.indices { web[index].network = NetworkSpec(mode: .user, ports: [22, 80]) }
        var lab = [pool("lab", size: 3, state: .paused), pool("lab", size: 5), pool("lab", size: 2, warm: 2)]
        for index in lab.indices {
            lab[index].network = NetworkSpec(mode: .bridge, bridge: "vmpsim0", subnet: "10.99.0.0/28")
        }
        return (0..<3).map { [web[$0], lab[$0]] }
    }

    @Test func anyCommandKilledAtAnyInstantIsRepairedByOneReconcile() async throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let latency = ["VMPOOL_SIM_LATENCY": "40ms"]
        let files = Self.shapes().enumerated().map { index, specs in
            box.dir.write("spec\(index).yaml", specs.map(manifest).joined(separator: "---\n"))
        }
        // How long an unkilled apply takes, to spread the kill points over it.
        let started = Date()
        #expect(try box.run("apply", "-f", files[0], "--parallel", "2", environment: latency).status == 0)
        var duration = max(0.2, Date().timeIntervalSince(started))

        // A kill point counts once its SIGKILL found the command still running; one that came
        // after the command had finished is tried again with the kills spread over a shorter
        // time (later commands have less to do than the first apply, and the machine's speed
        // varies), up to three times as many tries as points.
        var survived = 0
        var landed = 0
        var tries = 0
        var interrupted = 0
        var killed: [String: Int] = [:]
        while landed < Self.killPoints && tries < 3 * Self.killPoints {
            let point = tries
            tries += 1
            let file = files[point % files.count]
            let delay = duration * Double(point % 10 + 1) / 11
            // Mostly applies; every fifth a reconcile after a crash of the VMs, every seventh a delete.
            let command: [String]
            if point % 7 == 6 {
                command = ["delete", "lab"]
            } else if point % 5 == 4 {
                let sim = try SimDriver(stateDirectory: box.state)
                for record in try StateStore(directory: box.state).vms().prefix(4) { try? sim.simulateCrash(record.id) }
                command = ["reconcile", "--parallel", "2"]
            } else {
                command = ["apply", "-f", file, "--parallel", "2"]
            }
            let run = try box.binary.start(command + ["--state-dir", box.state], environment: latency)
            usleep(useconds_t(delay * 1_000_000))
            run.kill(SIGKILL)
            if run.wait().status == 128 + SIGKILL {
                landed += 1
                killed[command[0], default: 0] += 1
            } else {
                duration = max(0.05, duration * 0.8)
            }

            let repair = try box.run("reconcile")
            let problems =
                try await inconsistencies(box) + (repair.status == 0 ? [] : ["reconcile failed: \(repair.stderr)"])
            #expect(problems.isEmpty, "try \(point) (\(command[0]) killed after \(delay)s): \(problems)")
            if problems.isEmpty { survived += 1 }
            if !repair.stdout.contains("No changes") { interrupted += 1 }
            if command[0] == "delete" {
                #expect(try box.run("apply", "-f", file).status == 0)
            }
        }
        #expect(survived == tries)
        #expect(landed == Self.killPoints, "\(landed) of \(tries) kills found their command still running")
        print(
            "crash safety (sim): \(landed) kill points inside a running command (\(killed.sorted { $0.key < $1.key }.map { "\($0.value) \($0.key)" }.joined(separator: ", "))),"
                + " \(survived) of \(tries) tries repaired by one reconcile, \(interrupted) of them with work left to repair"
        )
    }

    /// What is wrong after the repair: the desired pools not met exactly, store and
    /// hypervisor disagreeing, a template of another shape, allocations leaked or doubled.
    func inconsistencies(_ box: Sandbox) async throws -> [String] {
        var problems: [String] = []
        let store = try StateStore(directory: box.state)
        if !(try store.unfinishedOperations()).isEmpty { problems.append("open journal entries") }
        let records = try store.vms()
        let templates = try store.templates()
        let standbys = try store.standbys()
        for stored in try store.pools() {
            let spec = stored.spec
            let vms = records.filter { $0.pool == spec.name }
            if vms.count != spec.totalVMs { problems.append("\(spec.name): \(vms.count) VMs of \(spec.totalVMs)") }
            let serving =
                spec.state == .running
                ? vms.filter { $0.state == .running }.count : vms.filter { $0.state == .paused }.count
            if serving < spec.size {
                problems.append("\(spec.name): \(serving) VMs \(spec.state.rawValue) of \(spec.size)")
            }
            if let wrong = vms.first(where: { $0.shape.vcpus != spec.vcpus || $0.shape.memoryMiB != spec.memoryMiB }) {
                problems.append("\(wrong.id) has \(wrong.shape.vcpus) vcpus, \(wrong.shape.memoryMiB) MiB")
            }
            let own = templates.filter { $0.ref.pool == spec.name }
            if spec.boot == .template {
                if own.count != 1 || own.first?.state != .ready || own.first?.ref.key.vcpus != spec.vcpus
                    || own.first?.ref.key.memoryMiB != spec.memoryMiB
                {
                    problems.append(
                        "\(spec.name): templates \(own.map { "\($0.ref.id) \($0.state) \($0.ref.key.vcpus)/\($0.ref.key.memoryMiB)" })"
                    )
                }
                let mine = standbys.filter { $0.pool == spec.name }
                if mine.count != 2 || !mine.allSatisfy({ $0.ready && $0.template == own.first?.ref.id }) {
                    problems.append("\(spec.name): standbys \(mine.map { "\($0.id) ready=\($0.ready)" })")
                }
            } else {
                if !own.isEmpty { problems.append("\(spec.name) boots cold but keeps templates") }
                if standbys.contains(where: { $0.pool == spec.name }) {
                    problems.append("\(spec.name) boots cold but keeps standbys")
                }
            }
        }
        let sim = try SimDriver(stateDirectory: box.state)
        let running = Set(await sim.discover().map(\.id))
        if running != Set(records.map(\.id) + standbys.map(\.id)) {
            problems.append(
                "sim and store disagree: \(running.symmetricDifference(records.map(\.id) + standbys.map(\.id)))")
        }
        let stray = Set(await sim.discoverTemplates()).subtracting(templates.map(\.ref.id))
        if !stray.isEmpty { problems.append("stray templates \(stray)") }
        // Allocations: exactly the recorded VMs' ports and addresses, none given twice.
        let (ports, addresses) = try store.allocations()
        let recordedPorts = records.flatMap { record in
            (record.network?.ports.values.map { $0 } ?? []).map { ($0, record.id) }
        }
        if Set(recordedPorts.map(\.0)).count != recordedPorts.count {
            problems.append("a port is recorded for two VMs")
        }
        if Dictionary(recordedPorts, uniquingKeysWith: { a, _ in a }) != ports {
            problems.append("port allocations \(ports.count) vs recorded \(recordedPorts.count)")
        }
        let recordedAddresses = records.compactMap { record in
            record.network?.address.map { ("\(record.network?.bridge ?? "")/\($0)", record.id) }
        }
        if Set(recordedAddresses.map(\.0)).count != recordedAddresses.count {
            problems.append("an address is recorded for two VMs")
        }
        if Dictionary(recordedAddresses, uniquingKeysWith: { a, _ in a }) != addresses {
            problems.append("address allocations \(addresses.count) vs recorded \(recordedAddresses.count)")
        }
        for record in records where record.network == nil && record.pool != "" {
            problems.append("\(record.id) has no network")
        }
        return problems
    }
}
