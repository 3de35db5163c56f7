import CVmpoolSys
import VmpoolDriver
import Foundation
import Testing
import VmpoolStore
import VmpoolTestSupport

/// `vmpool lease` and `vmpool release` as users run them, on the sim driver: one consumer per
/// VM, the pool refills, waiting callers are served in the order they asked, expired leases
/// end, leasing never waits for the state dir lock, and a vmpool killed at any instant leaves
/// no lease that nobody holds.
@Suite("Leases on the sim driver", .serialized)
struct LeaseTests {
    static let killIterations = Int(ProcessInfo.processInfo.environment["VMPOOL_KILL_POINTS"] ?? "") ?? 20

    @Test func aLeasedVMLeavesItsPoolWhichRefills() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let file = box.write(pool(size: 3))
        #expect(try box.run("apply", "-f", file).status == 0)

        let plain = try box.run("lease", "web")
        #expect(plain.status == 0, "\(plain.stderr)")
        #expect(plain.stdoutLines.count == 1, "text output is the id alone: \(plain.stdout)")
        let first = plain.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(first.hasPrefix("web-"))

        let asked = Date()
        let json = try box.run("lease", "web", "-o", "json", "--holder", "ci-job-7", "--ttl", "1h")
        #expect(json.status == 0, "\(json.stderr)")
        let lease = try #require(try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any])
        #expect(Set(lease.keys) == ["id", "pool", "address", "ports", "holder", "expiresAt"])
        let second = try #require(lease["id"] as? String)
        #expect(second != first)
        #expect(lease["pool"] as? String == "web")
        #expect(lease["holder"] as? String == "ci-job-7")
        #expect(lease["address"] is NSNull, "a VM without network has no address")
        #expect((lease["ports"] as? [String: Any])?.isEmpty == true)
        let expires = try #require(Self.date(lease["expiresAt"]))
        #expect(abs(expires.timeIntervalSince(asked) - 3600) < 60, "expiresAt is an hour away: \(expires)")

        let rows = try box.vms()
        #expect(rows.count == 3)
        for (id, row) in rows {
            guard id == first || id == second else {
                #expect(row["lease"] is NSNull, "\(id) is not leased")
                continue
            }
            let term = try #require(row["lease"] as? [String: Any], "\(id) shows its lease")
            #expect(Set(term.keys) == ["holder", "leasedAt", "expiresAt"])
            #expect(Self.date(term["leasedAt"]) != nil)
            if id == first {
                #expect((term["holder"] as? String)?.contains("@") == true, "the default holder is USER@HOST")
                #expect(term["expiresAt"] is NSNull)
            } else {
                #expect(term["holder"] as? String == "ci-job-7")
                #expect(term["expiresAt"] as? String == lease["expiresAt"] as? String)
            }
        }
        let before = try #require(try box.json("get", "pools").first)
        #expect(before["leased"] as? Int == 2)
        #expect(before["ready"] as? Int == 1, "leased VMs do not count toward the pool")
        #expect(before["size"] as? Int == 3)

        let refill = try box.run("reconcile")
        #expect(refill.status == 0, "\(refill.stderr)")
        let after = try box.vms()
        #expect(after.count == 5)
        #expect(Self.unleasedRunning(after) == 3, "the pool is refilled to its size")
        #expect(Set(after.filter { !($0.value["lease"] is NSNull) }.keys) == [first, second])
        #expect(after[first]?["state"] as? String == "running" && after[second]?["state"] as? String == "running")
        let pools = try #require(try box.json("get", "pools").first)
        #expect(pools["ready"] as? Int == 3 && pools["leased"] as? Int == 2)
        #expect(try box.plan(file).status == 0, "a refilled pool plans nothing, leased VMs included")
    }

    @Test func badInputFailsWithOneErrorLineAndLeasesNothing() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let file = box.dir.write("pools.yaml", manifest(pool(size: 1)) + "---\n" + manifest(pool("empty", size: 0)))
        #expect(try box.run("apply", "-f", file).status == 0)
        let free = try #require(try box.vms().keys.first)
        let cases: [(arguments: [String], says: String)] = [
            (["lease", "nope"], "\"nope\""),
            (["lease", "empty"], "no ready VM in pool empty"),
            (["lease", "empty", "--wait", "300ms"], "within 300ms"),
            (["release", "web-000000"], "\"web-000000\""),
            (["release", free], "not leased"),
            (["lease", "web", "--ttl", "0"], "--ttl"),
            (["lease", "web", "--ttl", "banana"], "banana"),
        ]
        for (arguments, says) in cases {
            let result = try box.binary.run(arguments + ["--state-dir", box.state])
            let command = arguments.joined(separator: " ")
            #expect(result.status == 1, "\(command): exit \(result.status)")
            #expect(result.stdout.isEmpty, "\(command) printed \(result.stdout)")
            let errors = Self.errorLines(result.stderr)
            #expect(errors.count == 1, "\(command): one error line, got \(result.stderr)")
            #expect(errors.first?.contains(says) == true, "\(command): \(result.stderr)")
        }
        #expect(try box.vms().values.allSatisfy { $0["lease"] is NSNull }, "a refused lease leases nothing")
        #expect(try box.vms()[free]?["state"] as? String == "running", "a refused release stops nothing")
    }

    @Test func anExpiredLeaseIsStoppedByTheNextPass() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let file = box.write(pool(size: 2))
        #expect(try box.run("apply", "-f", file).status == 0)
        let leased = try box.run("lease", "web", "--ttl", "1s", "--holder", "short")
        #expect(leased.status == 0, "\(leased.stderr)")
        let id = leased.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let lease = try box.vms()[id]?["lease"] as? [String: Any]
        let expires = try #require(Self.date(lease?["expiresAt"]), "a lease with --ttl has expiresAt: \(lease ?? [:])")
        #expect(eventually(timeout: .seconds(5)) { Date() > expires }, "the lease never expired")

        let plan = try box.binary.run(["plan", "-f", file, "--state-dir", box.state, "-o", "json"])
        let document = try JSONSerialization.jsonObject(with: Data(plan.stdout.utf8)) as? [String: Any]
        let actions = document?["actions"] as? [[String: Any]] ?? []
        let stop = actions.first { $0["action"] as? String == "stop" && $0["vm"] as? String == id }
        let reason = stop?["reason"] as? String ?? ""
        #expect(reason.contains("lease") && reason.contains("expired"), "plan: \(plan.stdout)")

        let pass = try box.run("reconcile")
        #expect(pass.status == 0, "\(pass.stderr)")
        #expect(pass.stdout.contains("stop \(id)") && pass.stdout.contains("expired"), "\(pass.stdout)")
        let rows = try box.vms()
        #expect(rows[id] == nil, "the expired VM is stopped")
        #expect(rows.count == 2 && Self.unleasedRunning(rows) == 2, "and the pool is whole")
    }

    @Test func noVMIsLeasedTwiceByConcurrentCallers() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 8))).status == 0)
        let service = try box.binary.start(["reconcile", "--every", "200ms", "--state-dir", box.state])
        defer {
            service.kill(SIGTERM)
            _ = service.wait()
        }
        let callers = 32
        let takers = try (0..<callers).map {
            try box.binary.start(["lease", "web", "--wait", "20s", "--holder", "taker-\($0)", "--state-dir", box.state])
        }
        let results = takers.map { $0.wait() }
        for (n, result) in results.enumerated() {
            #expect(result.status == 0, "taker-\(n): \(result.stderr)")
        }
        let ids = results.map { $0.stdout.trimmingCharacters(in: .whitespacesAndNewlines) }
        #expect(Set(ids).count == callers, "\(callers) callers got \(Set(ids).count) distinct VMs")

        let rows = try box.vms()
        var holders: [String: [String]] = [:]
        for (id, row) in rows {
            if let holder = (row["lease"] as? [String: Any])?["holder"] as? String {
                holders[id, default: []].append(holder)
            }
        }
        for (n, id) in ids.enumerated() {
            #expect(
                holders[id] == ["taker-\(n)"], "\(id) was printed to taker-\(n); the store says \(holders[id] ?? [])")
        }
        #expect(holders.count == callers, "exactly the printed VMs are leased")
        let refilled = eventuallyIgnoringErrors(timeout: .seconds(10)) { Self.unleasedRunning(try box.vms()) == 8 }
        #expect(refilled, "the service refills the pool behind the takers")
        service.kill(SIGTERM)
        #expect(service.wait().status == 0)
    }

    @Test func waitingCallersAreServedInTheOrderTheyAsked() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 0))).status == 0)
        let store = try StateStore(directory: box.state)
        let one = box.write(pool(size: 1), as: "one.yaml")
        let five = box.write(pool(size: 5), as: "five.yaml")

        /// Starts `holders` in sequence, each in line before the next asks.
        func queue(_ holders: [String]) throws -> [RunningCommand] {
            var waiters: [RunningCommand] = []
            for holder in holders {
                waiters.append(
                    try box.binary.start(
                        ["lease", "web", "--wait", "30s", "--holder", holder, "--state-dir", box.state]))
                let queued = eventuallyIgnoringErrors(timeout: .seconds(10)) {
                    try store.leaseWaiters()["web"] == waiters.count
                }
                #expect(queued, "\(holder) is in line")
            }
            return waiters
        }

        // One VM at a time: each goes to the caller at the head of the line.
        let first = (0..<5).map { "w\($0)" }
        var waiters = try queue(first)
        for n in 0..<5 {
            #expect(Self.convergedOrLeasedAway(try box.run("apply", "-f", one)))
            let served = eventuallyIgnoringErrors(timeout: .seconds(10)) { try Self.leases(box).count == n + 1 }
            #expect(served, "a waiter took the VM of step \(n)")
        }
        // Five at once, appearing one by one: still in line.
        #expect(try box.run("apply", "-f", box.write(pool(size: 0))).status == 0)
        let second = (5..<10).map { "w\($0)" }
        waiters += try queue(second)
        // The waiters take the VMs as they come, so the apply ends short of its size.
        let grow = try box.run(
            "apply", "-f", five, "--parallel", "1", environment: ["VMPOOL_SIM_LATENCY": "150ms"])
        #expect(Self.convergedOrLeasedAway(grow), "\(grow.stderr)")

        let results = waiters.map { $0.wait() }
        let leases = try Self.leases(box)
        for (n, result) in results.enumerated() {
            #expect(result.status == 0, "w\(n): \(result.stderr)")
            let id = result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(leases[id]?.holder == "w\(n)", "w\(n) printed \(id), leased to \(leases[id]?.holder ?? "nobody")")
        }
        for holders in [first, second] {
            let times = holders.map { holder in leases.values.first { $0.holder == holder }?.leasedAt ?? .distantPast }
            #expect(times == times.sorted() && Set(times).count == times.count, "\(holders) served in order: \(times)")
        }
        #expect(try store.leaseWaiters().isEmpty, "served callers leave the line")
    }

    @Test func leaseWithRefillReturnsWithThePoolWhole() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 2))).status == 0)
        let result = try box.run("lease", "web", "--refill")
        #expect(result.status == 0, "\(result.stderr)")
        let id = result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let rows = try box.vms()
        #expect(rows.count == 3)
        #expect(Self.unleasedRunning(rows) == 2, "the pool has its size again when lease --refill returns")
        #expect((rows[id]?["lease"] as? [String: Any]) != nil)
    }

    @Test func leasingNeverWaitsForTheStateDirLock() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 2))).status == 0)
        let slow = ["VMPOOL_SIM_LATENCY": "2s"]
        let grow = try box.binary.start(
            ["apply", "-f", box.write(pool(size: 6)), "--state-dir", box.state], environment: slow)
        // The apply holds the lock once it has recorded its launches.
        let locked = eventuallyIgnoringErrors(timeout: .seconds(10)) {
            try box.vms().values.contains { $0["state"] as? String == "creating" }
        }
        #expect(locked, "the apply is under way")
        let started = Date()
        let lease = try box.binary.run(["lease", "web", "--state-dir", box.state], environment: slow)
        let took = Date().timeIntervalSince(started)
        #expect(lease.status == 0, "\(lease.stderr)")
        #expect(took < 1, "lease took \(took) s during an apply")
        #expect(try box.vms().values.contains { $0["state"] as? String == "creating" }, "the apply still held the lock")
        let applied = grow.wait()
        #expect(Self.convergedOrLeasedAway(applied), "\(applied.stderr)")
        #expect(try box.run("reconcile").status == 0)
        let rows = try box.vms()
        #expect(rows.count == 7 && Self.unleasedRunning(rows) == 6)
        print("lease during a locked apply: \(String(format: "%.0f", took * 1000)) ms")
    }

    /// A `lease` whose output cannot be written (its reader is gone or slow) is killed after
    /// the store gave it a VM and before anyone read the id: nobody holds that VM, so the next
    /// pass ends the lease.
    @Test func aLeaseWhoseVmpoolDiedBeforeHandingItOverIsEnded() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 2))).status == 0)
        let lease = try BlockedOutput.start(box, ["lease", "web", "--holder", "gone"])
        let taken = eventuallyIgnoringErrors(timeout: .seconds(10)) {
            try Self.leases(box).values.contains { $0.holder == "gone" }
        }
        #expect(taken, "the store gave the blocked lease a VM")
        let id = try Self.leases(box).first { $0.value.holder == "gone" }?.key
        lease.kill()
        #expect(lease.wait() == 128 + SIGKILL)

        let pass = try box.run("reconcile")
        #expect(pass.status == 0, "\(pass.stderr)")
        let rows = try box.vms()
        #expect(id.map { rows[$0] == nil } == true, "the lease nobody received is ended and its VM stopped")
        #expect(rows.count == 2 && Self.unleasedRunning(rows) == 2)
        #expect(try StateStore(directory: box.state).unfinishedOperations().isEmpty)
    }

    /// `lease --wait` and `release` killed with SIGKILL at random instants, then one pass:
    /// every lease a dead vmpool holds in the store was printed by it, no VM is leased twice,
    /// the pool is whole, and dead callers' places in line block nobody.
    @Test func leasesAndReleasesKilledAtAnyInstantLeakNothing() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let size = 3
        #expect(try box.run("apply", "-f", box.write(pool(size: size))).status == 0)
        // How long an unkilled lease takes, to spread the kill points over it.
        let started = Date()
        let probe = try box.run("lease", "web", "--holder", "probe")
        let span = max(0.1, Date().timeIntervalSince(started)) * 1.5
        #expect(probe.status == 0)
        #expect(try box.run("release", probe.stdout.trimmingCharacters(in: .whitespacesAndNewlines)).status == 0)
        #expect(try box.run("reconcile").status == 0)

        var random = SplitMix(seed: 0x1ea5e)
        var printedBy: [String: String] = [:]  // VM id -> the holder whose lease printed it
        var releasing: Set<String> = []
        var tally = (printed: 0, killedBefore: 0, killedAfterTake: 0, releaseKilled: 0, released: 0)
        var consistent = 0
        for iteration in 0..<Self.killIterations {
            // More callers than ready VMs: the last ones wait in line when killed.
            let holders = (0..<(size + 1)).map { "crash-\(iteration)-\($0)" }
            var victims: [(command: RunningCommand, delay: Double, holder: String?, release: String?)] = []
            for holder in holders {
                let command = try box.binary.start(
                    ["lease", "web", "--wait", "5s", "--holder", holder, "--state-dir", box.state])
                victims.append((command, random.unit() * span, holder, nil))
            }
            let held = printedBy.keys.filter { !releasing.contains($0) }.sorted()
            if let target = held.isEmpty ? nil : held[Int(random.unit() * Double(held.count))] {
                let command = try box.binary.start(["release", target, "--state-dir", box.state])
                victims.append((command, random.unit() * span, nil, target))
                releasing.insert(target)
            }
            let begun = Date()
            for victim in victims.sorted(by: { $0.delay < $1.delay }) {
                let due = victim.delay - Date().timeIntervalSince(begun)
                if due > 0 { usleep(useconds_t(due * 1_000_000)) }
                victim.command.kill(SIGKILL)
            }
            let before = try Self.leases(box)
            for victim in victims {
                let result = victim.command.wait()
                let printed = result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
                if let holder = victim.holder {
                    // Killed or not, a lease that printed an id handed its VM over.
                    if !printed.isEmpty {
                        #expect(
                            printedBy[printed] == nil, "\(printed) printed to \(printedBy[printed] ?? "") and \(holder)"
                        )
                        printedBy[printed] = holder
                        tally.printed += 1
                    } else if before.values.contains(where: { $0.holder == holder }) {
                        tally.killedAfterTake += 1
                    } else if result.status == 128 + SIGKILL {
                        tally.killedBefore += 1
                    }
                } else if victim.release != nil {
                    if result.status == 0 { tally.released += 1 } else { tally.releaseKilled += 1 }
                }
            }

            let pass = try box.run("reconcile")
            #expect(pass.status == 0, "iteration \(iteration): \(pass.stderr)")
            let rows = try box.vms()
            let leases = try Self.leases(box)
            var ok = true
            func check(_ condition: Bool, _ message: @autoclosure () -> String) {
                if !condition {
                    ok = false
                    Issue.record("iteration \(iteration): \(message())")
                }
            }
            for (id, lease) in leases where lease.holder.hasPrefix("crash-") {
                check(printedBy[id] == lease.holder, "\(id) is leased to \(lease.holder), which never printed it")
            }
            check(Set(leases.keys).isSubset(of: Set(rows.keys)), "a lease without its VM")
            check(
                Self.unleasedRunning(rows) == size, "\(Self.unleasedRunning(rows)) unleased running VMs, want \(size)")
            check(rows.count == size + leases.count, "\(rows.count) VMs for \(size) + \(leases.count) leased")
            check(leases.keys.allSatisfy { rows[$0]?["state"] as? String == "running" }, "a leased VM is not running")
            for id in releasing where rows[id] != nil {
                check(
                    leases[id]?.holder == printedBy[id],
                    "\(id), being released, went to \(leases[id]?.holder ?? "its pool")")
            }
            // Released VMs are gone; a release killed early left its lease as it was.
            for id in releasing where rows[id] == nil { printedBy[id] = nil }
            releasing.removeAll()
            check(try StateStore(directory: box.state).unfinishedOperations().isEmpty, "open journal entries")

            // Dead callers' places in line block no one.
            let fresh = try box.run("lease", "web", "--holder", "fresh-\(iteration)")
            check(fresh.status == 0, "a fresh lease failed: \(fresh.stderr)")
            let freshID = fresh.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            check(try box.run("release", freshID).status == 0, "releasing \(freshID) failed")
            check(try box.run("reconcile").status == 0, "the refill after the fresh lease failed")
            if ok { consistent += 1 }
        }
        #expect(consistent == Self.killIterations)
        #expect(
            tally.printed > 0 && tally.killedBefore + tally.killedAfterTake > 0, "kill points land in and around leases"
        )
        print(
            "lease crash safety (sim): \(consistent) of \(Self.killIterations) iterations consistent;"
                + " \(tally.printed) leases printed, \(tally.killedBefore) killed before taking a VM,"
                + " \(tally.killedAfterTake) killed holding one they never printed (ended by the next pass);"
                + " \(tally.released) releases finished, \(tally.releaseKilled) killed; kill points over"
                + " \(String(format: "%.0f", span * 1000)) ms")
    }

    // MARK: - Helpers

    /// An apply that converged, or one whose new VMs were leased before its final look (it
    /// then says what is left to do).
    static func convergedOrLeasedAway(_ result: CommandResult) -> Bool {
        result.status == 0 || (result.status == 1 && result.stderr.contains("not converged"))
    }

    /// Lines of stderr that report the error, without the usage block argument-parser adds
    /// to a usage error (`Help:`, `Usage:`, `See 'vmpool ... --help'`).
    static func errorLines(_ stderr: String) -> [String] {
        stderr.split(separator: "\n").map(String.init).filter { line in
            let text = line.trimmingCharacters(in: .whitespaces)
            return !text.hasPrefix("Usage: ") && !text.hasPrefix("Help: ") && !text.hasPrefix("See 'vmpool ")
        }
    }

    static func date(_ value: Any?) -> Date? {
        guard let text = value as? String else { return nil }
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter.date(from: text) ?? ISO8601DateFormatter().date(from: text)
    }

    static func unleasedRunning(_ rows: [String: [String: Any]]) -> Int {
        rows.values.filter { $0["lease"] is NSNull && $0["state"] as? String == "running" }.count
    }

    /// Leased VMs by id, with holder and time, as `get vms -o json` shows them.
    static func leases(_ box: Sandbox) throws -> [String: (holder: String, leasedAt: Date)] {
        var result: [String: (holder: String, leasedAt: Date)] = [:]
        for (id, row) in try box.vms() {
            guard let lease = row["lease"] as? [String: Any], let holder = lease["holder"] as? String else { continue }
            result[id] = (holder, date(lease["leasedAt"]) ?? .distantPast)
        }
        return result
    }
}

extension Sandbox {
    /// `get vms -o json` by id.
    func vms() throws -> [String: [String: Any]] {
        var rows: [String: [String: Any]] = [:]
        for row in try json("get", "vms") { rows[row["id"] as? String ?? "?"] = row }
        return rows
    }

}

/// A vmpool whose stdout is a pipe already full that nobody reads: its first write blocks
/// until it is killed.
final class BlockedOutput {
    let pid: Int32
    private let reader: Int32

    static func start(_ box: Sandbox, _ arguments: [String]) throws -> BlockedOutput {
        var fds: [Int32] = [0, 0]
        guard vmpool_pipe_cloexec(&fds) == 0 else { throw CocoaError(.fileWriteUnknown) }
        defer { close(fds[1]) }
        let flags = fcntl(fds[1], F_GETFL)
        _ = fcntl(fds[1], F_SETFL, flags | O_NONBLOCK)
        let chunk = [UInt8](repeating: 0x2e, count: 4096)
        while write(fds[1], chunk, chunk.count) > 0 {}
        _ = fcntl(fds[1], F_SETFL, flags)
        let errors = open("/dev/null", O_WRONLY | O_CLOEXEC)
        defer { close(errors) }
        let pid = withCStrings([box.binary.path] + arguments + ["--state-dir", box.state]) { args in
            withCStrings(box.binary.environment.map { "\($0.key)=\($0.value)" }) { env in
                vmpool_spawn_io(box.binary.path, args, env, -1, fds[1], errors)
            }
        }
        guard pid > 0 else {
            close(fds[0])
            throw CocoaError(.executableLoad)
        }
        // The read end stays open here, so the child's write blocks instead of failing.
        return BlockedOutput(pid: pid, reader: fds[0])
    }

    private init(pid: Int32, reader: Int32) {
        self.pid = pid
        self.reader = reader
    }

    deinit { close(reader) }

    func kill() { Glibc.kill(pid, SIGKILL) }

    /// Exit status, 128+signal when killed.
    func wait() -> Int32 { vmpool_wait(pid) }
}

/// A reproducible source of kill points.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }

    mutating func unit() -> Double {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        z ^= z >> 31
        return Double(z >> 11) / Double(1 << 53)
    }
}
