import Foundation
import Testing
import VmpoolStore
import VmpoolTestSupport

@testable import VmpoolQEMU

/// `vmpool fork` on real QEMU: copies of a leased VM carry its memory and disks, each with an
/// identity of its own; nothing one writes reaches another; the source runs on; and a fork
/// killed at any instant leaves nothing one reconcile does not repair.
@Suite(
    "Forks of a running VM on real QEMU", .serialized,
    .enabled(if: QemuEnvironment.available, "\(QemuEnvironment.skipReason ?? "")"))
struct ForkTests {
    /// A template pool of busybox VMs with a disk and a forwarded port.
    static let manifest = poolYAML(
        "br", size: 1, boot: "template",
        extra: "  disks: [{name: data, size: 16Mi}]\n  network: {mode: user, ports: [8080]}\n")

    func setUp(_ box: QemuSandbox, holder: String = "job") throws -> String {
        let applied = try box.run(["apply", "-f", box.write(Self.manifest)], environment: ["VMPOOL_STANDBY": "0"])
        guard applied.status == 0 else { throw SandboxError("apply failed: \(applied.stdout)\(applied.stderr)") }
        let leased = try box.run(["lease", "br", "--holder", holder, "--refill"], environment: ["VMPOOL_STANDBY": "0"])
        guard leased.status == 0 else { throw SandboxError("lease failed: \(leased.stderr)") }
        return leased.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// What a VM's guest says of itself and of the state a fork must carry over.
    func facts(_ box: QemuSandbox, _ vm: String) throws -> [String] {
        let result = try box.exec(
            vm,
            [
                "sh", "-c",
                "cat /proc/sys/kernel/hostname; cat /tmp/mark; dd if=/dev/vda bs=512 skip=64 count=1 2>/dev/null"
                    + " | head -c 11; echo; cat /sys/class/net/eth0/address",
            ])
        #expect(result.status == 0, "\(vm): \(result.stderr)")
        return result.stdout.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
    }

    @Test func threeForksCarryTheSourcesStateEachWithItsOwnIdentityAndNothingCrosses() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let source = try setUp(box)
        let wrote = try box.exec(
            source,
            ["sh", "-c", "echo before-fork > /tmp/mark; printf source-disk | dd of=/dev/vda bs=512 seek=64 conv=fsync"])
        #expect(wrote.status == 0, "\(wrote.stderr)")
        let sourcePid = try #require(try box.vms().first { $0["id"] as? String == source }?["pid"] as? Int)

        let forked = try box.run(["fork", source, "--count", "3", "--ttl", "30m", "-o", "json"])
        #expect(forked.status == 0, "\(forked.stdout)\(forked.stderr)")
        let list = try #require(try JSONSerialization.jsonObject(with: Data(forked.stdout.utf8)) as? [[String: Any]])
        let forks = list.compactMap { $0["id"] as? String }
        #expect(forks.count == 3 && Set(forks).count == 3 && !forks.contains(source), "\(forked.stdout)")
        #expect(list.allSatisfy { $0["holder"] as? String == "job" && $0["expiresAt"] is String }, "\(list)")
        let ports = list.compactMap { ($0["ports"] as? [String: Any])?["8080"] as? Int }
        #expect(Set(ports).count == 3, "each fork forwards its own host port: \(list)")

        // Each fork: the source's tmpfs file and disk block; its own name and MAC.
        var macs: Set<String> = []
        for fork in forks {
            let seen = try facts(box, fork)
            #expect(seen.count >= 4, "\(fork): \(seen)")
            guard seen.count >= 4 else { continue }
            #expect(seen[0] == fork, "\(fork)'s host name is \(seen[0])")
            #expect(seen[1] == "before-fork" && seen[2] == "source-disk", "\(fork): \(seen)")
            macs.insert(seen[3])
        }
        let sourceFacts = try facts(box, source)
        #expect(sourceFacts.first == source, "the source keeps its name: \(sourceFacts)")
        if sourceFacts.count >= 4 { macs.insert(sourceFacts[3]) }
        #expect(macs.count == 4, "four VMs, four MACs: \(macs)")
        let records = try box.vms()
        #expect(records.first { $0["id"] as? String == source }?["pid"] as? Int == sourcePid, "the source runs on")

        // A write in one fork, memory and disk, reaches neither the other forks nor the source.
        let changed = try box.exec(
            forks[0],
            ["sh", "-c", "echo changed > /tmp/mark; printf forked-disk | dd of=/dev/vda bs=512 seek=64 conv=fsync"])
        #expect(changed.status == 0, "\(changed.stderr)")
        let sourceChanged = try box.exec(source, ["sh", "-c", "echo source-later > /tmp/mark"])
        #expect(sourceChanged.status == 0)
        #expect(Array(try facts(box, forks[0]).dropFirst().prefix(2)) == ["changed", "forked-disk"])
        for other in forks.dropFirst() {
            #expect(Array(try facts(box, other).dropFirst().prefix(2)) == ["before-fork", "source-disk"], "\(other)")
        }
        #expect(Array(try facts(box, source).dropFirst().prefix(2)) == ["source-later", "source-disk"])

        // The snapshot is gone once the forks run: only the pool's template is saved.
        let store = try StateStore(directory: box.state)
        let paths = QemuPaths(configuration: QemuConfiguration(stateDirectory: box.state))
        let templates = Set(try store.templates().map(\.ref.id))
        let saved = Set(
            ((try? FileManager.default.contentsOfDirectory(atPath: paths.templateRoot)) ?? []).compactMap {
                $0.split(separator: ".").first.map(String.init)
            })
        #expect(saved == templates, "saved state left: \(saved.subtracting(templates))")
        #expect(try store.unfinishedOperations().isEmpty)

        // Released, the forks stop; the source and its pool remain.
        let released = try box.run(["release"] + forks)
        #expect(released.status == 0, "\(released.stderr)")
        let left = Set(try box.ids())
        #expect(left.isDisjoint(with: forks) && left.contains(source), "\(left)")
        #expect(box.qemuProcesses().count == left.count, "QEMU \(box.qemuProcesses()) for VMs \(left)")
    }

    @Test func aForkIsRefusedClearlyWhenItCannotBeMade() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let source = try setUp(box, holder: "mine")
        let pool = try #require(try box.ids(pool: "br").first { $0 != source })
        let cases: [([String], String)] = [
            (["fork", "br-000000"], "no VM named"),
            (["fork", pool], "is not leased"),
            (["fork", source, "--holder", "theirs"], "leased to another holder"),
            (["fork", source, "--count", "0"], "--count"),
        ]
        for (arguments, expected) in cases {
            let result = try box.run(arguments)
            #expect(result.status != 0 && result.stderr.contains(expected), "\(arguments): \(result.stderr)")
        }
        let answers = try box.exec(source, ["true"])
        #expect(answers.status == 0, "the source runs on: \(answers.stderr)")
        let ids = try box.ids()
        #expect(ids.count == 2, "nothing was made: \(ids)")
        #expect(box.qemuProcesses().count == 2)
    }

    /// Forks start without the state dir lock: a service passing every half second meanwhile
    /// (writing the walls, sweeping the cgroups of VMs it does not see running) must neither
    /// kill a fork halfway nor leave it out of the walls.
    @Test func forksBesideARunningServiceAllStartBehindTheWalls() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let source = try setUp(box)
        let service = try RunningCommand(
            path: box.binary.path, arguments: ["reconcile", "--every", "500ms", "--state-dir", box.state],
            environment: box.binary.environment.merging(["VMPOOL_STANDBY": "0"]) { $1 })
        defer {
            service.kill(SIGTERM)
            _ = service.wait()
        }
        let walls = "vmpool_" + QemuPaths.hash(URL(fileURLWithPath: box.state).standardizedFileURL.path, hexDigits: 12)
        var made = 0
        for round in 0..<4 {
            let forked = try box.run(["fork", source, "--count", "2"])
            #expect(forked.status == 0, "round \(round): \(forked.stderr)")
            let forks = forked.stdout.split(separator: "\n").map(String.init)
            made += forks.count
            // Each fork's uid is in the walls' map the moment fork returns (as root: VMs are
            // walled only there).
            guard geteuid() == 0 else {
                _ = try box.run(["release"] + forks)
                continue
            }
            let map = try RunningCommand(
                path: "/usr/sbin/nft", arguments: ["list", "map", "inet", walls, "vm_uids"], environment: [:]
            ).wait().stdout
            for vm in try box.vms() where forks.contains(vm["id"] as? String ?? "") {
                let pid = try #require(vm["pid"] as? Int)
                let uid = try #require(QemuProcess.owner(Int32(pid)))
                #expect(
                    map.contains("\(uid) :"), "round \(round): \(vm["id"] ?? "") (uid \(uid)) is not walled: \(map)")
            }
            _ = try box.run(["release"] + forks)
        }
        #expect(made == 8)
    }

    /// SIGKILL of `fork` at each stage of its run, as each is seen from outside (its journal
    /// entry, the helper's QEMU, the copied disks, the saved state, the forks' QEMUs); after one `reconcile` every QEMU is a recorded VM's and every record's
    /// VM runs, no snapshot or helper is left, no journal entry is open, and the source answers.
    @Test func aForkKilledAtAnyInstantIsRepairedByOneReconcile() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let source = try setUp(box)
        let store = try StateStore(directory: box.state)
        let paths = QemuPaths(configuration: QemuConfiguration(stateDirectory: box.state))
        let templates = Set(try store.templates().map(\.ref.id))
        func snapshotFile(_ suffix: String) -> Bool {
            ((try? FileManager.default.contentsOfDirectory(atPath: paths.templateRoot)) ?? []).contains { name in
                name.hasSuffix(suffix) && !templates.contains(String(name.prefix { $0 != "." }))
            }
        }
        var before: Set<String> = []
        var baseline = 0
        /// QEMUs running for VMs recorded since the fork began (its forks, not its helper).
        func forkQEMUs() throws -> Int {
            let forks = try store.vms().map(\.id).filter { !before.contains($0) }
            return box.qemuProcesses().filter { pid in
                let command = String(
                    decoding: FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") ?? Data(), as: UTF8.self)
                return forks.contains { command.contains("guest=\($0)\u{0}") }
            }.count
        }
        let stages: [(name: String, reached: () throws -> Bool)] = [
            ("at once", { true }),
            (
                "journaled",
                { try store.unfinishedOperations().contains { $0.operation == StateStore.forkOperation } }
            ),
            ("helper started", { box.qemuProcesses().count > baseline }),
            ("disks copied", { snapshotFile(".qcow2") }),
            ("state saved", { snapshotFile(".state") }),
            ("a fork's QEMU started", { try forkQEMUs() >= 1 }),
            ("both forks' QEMUs started", { try forkQEMUs() >= 2 }),
        ]
        // A kill counts once it found the fork still running at its stage; a stage the fork
        // passed unseen (it ended first) is tried again.
        var landed: [String: Int] = [:]
        var survived = 0
        var tries = 0
        while Set(landed.keys).count < stages.count && tries < 4 * stages.count {
            let stage = stages[tries % stages.count]
            tries += 1
            before = Set(try box.ids())
            baseline = box.qemuProcesses().count
            let run = try RunningCommand(
                path: box.binary.path, arguments: ["fork", source, "--count", "2", "--state-dir", box.state],
                environment: box.binary.environment)
            _ = try eventually(timeout: .seconds(60)) { try stage.reached() || run.exited(within: 0) }
            run.kill(SIGKILL)
            if run.wait().status == 128 + SIGKILL { landed[stage.name, default: 0] += 1 }
            let repair = try box.run(["reconcile"], environment: ["VMPOOL_STANDBY": "0"])
            var problems = try inconsistencies(box, source: source)
            if repair.status != 0 { problems.append("reconcile failed: \(repair.stderr.suffix(2000))") }
            #expect(problems.isEmpty, "killed at \(stage.name): \(problems)")
            if problems.isEmpty { survived += 1 }
            // Forks that were handed over before the kill are the caller's: released here.
            let leasedForks = try box.vms().filter {
                !before.contains($0["id"] as? String ?? "") && $0["lease"] is [String: Any]
            }.compactMap { $0["id"] as? String }
            if !leasedForks.isEmpty { _ = try box.run(["release"] + leasedForks) }
        }
        #expect(survived == tries)
        let missed = stages.map(\.name).filter { landed[$0] == nil }
        #expect(missed.isEmpty, "no kill found the fork still running at: \(missed)")
        print(
            "fork crash safety (qemu): killed at \(landed.count) of \(stages.count) stages"
                + " (\(stages.map(\.name).filter { landed[$0] != nil }.joined(separator: ", "))),"
                + " \(survived) of \(tries) tries repaired by one reconcile")
    }

    func inconsistencies(_ box: QemuSandbox, source: String) throws -> [String] {
        var problems: [String] = []
        let store = try StateStore(directory: box.state)
        if !(try store.unfinishedOperations()).isEmpty { problems.append("open journal entries") }
        let records = try store.vms()
        if let bad = records.first(where: { $0.state != .running }) {
            problems.append("\(bad.id) is \(bad.state.rawValue)")
        }
        let processes = Set(box.qemuProcesses())
        let recorded = Set(records.compactMap(\.pid) + (try store.standbys()).compactMap(\.pid))
        if processes != recorded { problems.append("processes \(processes.sorted()) vs records \(recorded.sorted())") }
        let paths = QemuPaths(configuration: QemuConfiguration(stateDirectory: box.state))
        let templates = Set(try store.templates().map(\.ref.id))
        let saved = Set(
            ((try? FileManager.default.contentsOfDirectory(atPath: paths.templateRoot)) ?? []).compactMap {
                $0.split(separator: ".").first.map(String.init)
            })
        if saved != templates { problems.append("saved state left: \(saved.subtracting(templates))") }
        let memory = Set((try? FileManager.default.contentsOfDirectory(atPath: paths.memoryRoot)) ?? [])
        if memory != Set(templates.map { $0 + ".mem" }) { problems.append("memory files \(memory)") }
        let (ports, _) = try store.allocations()
        if ports.count != records.count { problems.append("\(ports.count) ports for \(records.count) VMs") }
        let answer = try box.exec(source, ["true"])
        if answer.status != 0 { problems.append("the source does not answer: \(answer.stderr)") }
        return problems
    }
}
