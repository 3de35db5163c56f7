import Foundation
import Testing
import VmpoolDriver
import VmpoolStore
import VmpoolTestSupport

@testable import VmpoolQEMU

/// `vmpool apply`, `reconcile` and `delete` on real QEMU killed with SIGKILL at many instants;
/// one `vmpool reconcile` must leave exactly the desired VMs: no QEMU without a record, no
/// record without a QEMU, no stale run dir, overlay, memory file, template state, tap or
/// address. The VMs are bridged, so it runs inside a network namespace of its own (as root);
/// elsewhere it runs with user-mode networking and says so.
@Suite(
    "Crash safety on real QEMU", .serialized,
    .enabled(if: QemuEnvironment.available, "\(QemuEnvironment.skipReason ?? "")"))
struct QemuCrashSafetyTests {
    static let killPoints = Int(ProcessInfo.processInfo.environment["VMPOOL_QEMU_KILL_POINTS"] ?? "") ?? 30
    static let bridged = geteuid() == 0

    func manifest(size: Int, vcpus: Int, memory: String, warm: Int) -> String {
        let network =
            Self.bridged ? "{mode: bridge, bridge: vmpcrash0, subnet: 10.66.0.0/27}" : "{mode: user, ports: [22]}"
        return """
            apiVersion: vmpool/v1
            kind: Pool
            metadata: {name: crash}
            spec:
              size: \(size)
              vcpus: \(vcpus)
              memory: \(memory)
              maxVcpus: 2
              maxMemory: 512Mi
              boot: template
              warm: \(warm)
              disks: [{name: scratch, size: 16Mi}]
              network: \(network)
            """
    }

    /// Runs vmpool (or another program) inside the test's namespace.
    struct Namespace {
        let name: String
        let box: QemuSandbox

        func command(_ arguments: [String]) -> [String] {
            Self.wrap(name, arguments)
        }

        static func wrap(_ name: String?, _ arguments: [String]) -> [String] {
            guard let name else { return arguments }
            return ["/usr/sbin/ip", "netns", "exec", name] + arguments
        }
    }

    @Test func anyCommandKilledAtAnyInstantIsRepairedByOneReconcile() throws {
        let box = try QemuSandbox()
        let namespace: String? = Self.bridged ? "vmpcrash\(getpid() % 10_000)" : nil
        if let namespace {
            _ = try RunningCommand(path: "/usr/sbin/ip", arguments: ["netns", "add", namespace], environment: [:])
                .wait()
        } else {
            print("crash safety (qemu): not root, so user-mode networking instead of a bridge")
        }
        func vmpool(_ arguments: [String]) throws -> RunningCommand {
            let full = Namespace.wrap(namespace, [box.binary.path] + arguments + ["--state-dir", box.state])
            // `ip netns exec` mounts a /sys of its own, with no cgroup file system in it.
            return try RunningCommand(
                path: full[0], arguments: Array(full.dropFirst()),
                environment: box.binary.environment.merging(["VMPOOL_CGROUPS": "0"]) { $1 })
        }
        func inside(_ arguments: [String]) throws -> CommandResult {
            let full = Namespace.wrap(namespace, arguments)
            return try RunningCommand(path: full[0], arguments: Array(full.dropFirst()), environment: [:]).wait()
        }
        defer {
            _ = try? vmpool(["delete", "crash"]).wait()
            box.tearDown()
            if let namespace {
                _ = try? RunningCommand(path: "/usr/sbin/ip", arguments: ["netns", "del", namespace], environment: [:])
                    .wait()
            }
        }
        // Shapes to move between: warm spares, CPU hotplug and a scale-down, a new template.
        let files = [
            box.write(manifest(size: 5, vcpus: 1, memory: "256Mi", warm: 1), as: "a.yaml"),
            box.write(manifest(size: 3, vcpus: 2, memory: "256Mi", warm: 0), as: "b.yaml"),
            box.write(manifest(size: 5, vcpus: 1, memory: "384Mi", warm: 1), as: "c.yaml"),
        ]
        func timed(_ file: String) throws -> Double {
            let started = Date()
            let result = try vmpool(["apply", "-f", file]).wait()
            #expect(result.status == 0, "\(result.stdout)\n\(result.stderr)")
            return Date().timeIntervalSince(started)
        }
        _ = try timed(files[0])
        var durations = [Double](repeating: 0, count: files.count)
        for index in [1, 2, 0] { durations[index] = try timed(files[index]) }

        // A kill point counts once its SIGKILL found the command still running (as the sim
        // harness counts them); one that came after the command had finished is tried again
        // with the kills spread over a shorter time, up to three times as many tries as points.
        var survived = 0
        var interrupted = 0
        var landed = 0
        var tries = 0
        var scale = 1.0
        var killed: [String: Int] = [:]
        while landed < Self.killPoints && tries < 3 * Self.killPoints {
            let point = tries
            tries += 1
            let index = (point + 1) % files.count
            let delay = durations[index] * scale * Double(point % 10 + 1) / 11
            let command: [String]
            if point % 9 == 8 {
                command = ["delete", "crash"]
            } else if point % 5 == 4 {
                for pid in box.qemuProcesses().prefix(2) { kill(pid, SIGKILL) }
                command = ["reconcile"]
            } else {
                command = ["apply", "-f", files[index]]
            }
            let run = try vmpool(command)
            usleep(useconds_t(delay * 1_000_000))
            run.kill(SIGKILL)
            if run.wait().status == 128 + SIGKILL {
                landed += 1
                killed[command[0], default: 0] += 1
            } else {
                scale = max(0.05, scale * 0.8)
            }
            if command[0] == "delete" {
                // A delete killed halfway is finished by the next pass; then the pool comes back.
                #expect(try vmpool(["reconcile"]).wait().status == 0)
                #expect(
                    try vmpool(["get", "pools", "crash"]).wait().status == 1, "the interrupted delete was finished")
                let again = try vmpool(["apply", "-f", files[index]]).wait()
                #expect(again.status == 0, "apply after the delete: \(again.stdout)\n\(again.stderr.suffix(3000))")
            }
            let repair = try vmpool(["reconcile"]).wait()
            var problems = try inconsistencies(box, inside: inside)
            if repair.status != 0 {
                problems.append("reconcile failed: \(repair.stdout) \(repair.stderr.suffix(3000))")
            }
            #expect(
                problems.isEmpty,
                "kill point \(point) (\(command[0]) after \(String(format: "%.2f", delay)) s): \(problems)")
            if problems.isEmpty { survived += 1 }
            if !repair.stdout.contains("No changes") { interrupted += 1 }
        }
        #expect(survived == tries)
        #expect(landed == Self.killPoints, "\(landed) of \(tries) kills found their command still running")
        #expect(interrupted >= Self.killPoints / 3)
        print(
            "crash safety (qemu): \(landed) kill points inside a running command, \(survived) of \(tries) tries survived"
                + " (\(killed.sorted { $0.key < $1.key }.map { "\($0.value) \($0.key)" }.joined(separator: ", "))),"
                + " \(interrupted) interrupted work, \(Self.bridged ? "bridged" : "user-mode") VMs with a disk, applies of "
                + durations.map { String(format: "%.2f", $0) }.joined(separator: ", ") + " s")
    }

    func inconsistencies(_ box: QemuSandbox, inside: ([String]) throws -> CommandResult) throws -> [String] {
        var problems: [String] = []
        let store = try StateStore(directory: box.state)
        if !(try store.unfinishedOperations()).isEmpty { problems.append("open journal entries") }
        let records = try store.vms()
        guard let desired = try store.pools().first?.spec else { return ["the pool is gone"] }
        if records.count != desired.totalVMs { problems.append("\(records.count) VMs of \(desired.totalVMs)") }
        if records.filter({ $0.state == .running }).count != desired.size {
            problems.append("not \(desired.size) running")
        }
        if let wrong = records.first(where: {
            $0.shape.vcpus != desired.vcpus || $0.shape.memoryMiB != desired.memoryMiB
        }) {
            problems.append("\(wrong.id): \(wrong.shape.vcpus) vcpus, \(wrong.shape.memoryMiB) MiB")
        }
        let standbys = try store.standbys()
        let templates = try store.templates()
        if templates.count != 1 || templates.first?.state != .ready
            || templates.first?.ref.key.memoryMiB != desired.memoryMiB
            || templates.first?.ref.key.vcpus != desired.vcpus
        {
            problems.append("templates \(templates.map { "\($0.ref.id) \($0.state)" })")
        }
        if standbys.count != 2 || !standbys.allSatisfy({ $0.ready && $0.template == templates.first?.ref.id }) {
            problems.append("standbys \(standbys.map { "\($0.id) \($0.ready)" })")
        }
        let processes = Set(box.qemuProcesses())
        let recorded = Set(records.compactMap(\.pid) + standbys.compactMap(\.pid))
        if processes != recorded { problems.append("processes \(processes.sorted()) vs records \(recorded.sorted())") }
        let paths = QemuPaths(configuration: QemuConfiguration(stateDirectory: box.state))
        let ids = records.map(\.id) + standbys.map(\.id)
        let runDirs = Set((try? FileManager.default.contentsOfDirectory(atPath: paths.runRoot)) ?? [])
        let expectedDirs = Set(ids.map { URL(fileURLWithPath: paths.vmDirectory($0)).lastPathComponent })
        if runDirs != expectedDirs {
            problems.append(
                "run dirs: stale \(runDirs.subtracting(expectedDirs)), missing \(expectedDirs.subtracting(runDirs))")
        }
        let missingOverlays = ids.filter { access(paths.overlay($0, disk: "scratch"), F_OK) != 0 }
        if !missingOverlays.isEmpty { problems.append("overlays missing for \(missingOverlays)") }
        let memory = Set((try? FileManager.default.contentsOfDirectory(atPath: paths.memoryRoot)) ?? [])
        if memory != Set(templates.map { $0.ref.id + ".mem" }) { problems.append("memory files \(memory)") }
        let saved = Set((try? FileManager.default.contentsOfDirectory(atPath: paths.templateRoot)) ?? [])
        let expectedSaved = Set(templates.flatMap { [$0.ref.id + ".state", $0.ref.id + ".disk-scratch.qcow2"] })
        // A template's boot log is kept beside its state (best effort: it may be missing).
        let bootLogs = Set(templates.map { $0.ref.id + ".boot.log" })
        let strays = saved.subtracting(expectedSaved).subtracting(bootLogs)
        let absent = expectedSaved.subtracting(saved)
        if !strays.isEmpty || !absent.isEmpty { problems.append("template files: stray \(strays), missing \(absent)") }
        // Allocations: exactly the recorded VMs', once each.
        let (ports, addresses) = try store.allocations()
        if Self.bridged {
            let recordedAddresses = records.compactMap { $0.network?.address }
            if Set(recordedAddresses).count != records.count || addresses.count != records.count {
                problems.append(
                    "addresses \(addresses.count) allocated, \(Set(recordedAddresses).count) distinct recorded, \(records.count) VMs"
                )
            }
            let links = try inside(["ip", "-o", "link", "show"]).stdout
            let taps = Set(
                links.split(separator: "\n").compactMap { line -> String? in
                    let name = line.split(separator: ":").dropFirst().first?.trimmingCharacters(in: .whitespaces) ?? ""
                    return name.hasPrefix("vmp") && name != "vmpcrash0"
                        ? String(name.split(separator: "@").first ?? "") : nil
                })
            let expectedTaps = Set(ids.map(NetworkAssignment.tapName(for:)))
            if taps != expectedTaps {
                problems.append(
                    "taps: stale \(taps.subtracting(expectedTaps)), missing \(expectedTaps.subtracting(taps))")
            }
        } else if ports.count != records.count {
            problems.append("\(ports.count) forwarded ports for \(records.count) VMs")
        }
        return problems
    }
}
