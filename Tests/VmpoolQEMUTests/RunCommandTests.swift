import Foundation
import Testing
import VmpoolDriver
import VmpoolTestSupport

/// `vmpool run` on real QEMU: one command in a fresh VM of a template pool, its streams and
/// status, the copies around it, and the release of its VM on every path (a failing command,
/// --timeout, SIGINT, SIGTERM, a VM killed under it). Each test boots one template and runs
/// its jobs on the template's clones.
@Suite(
    "vmpool run on real QEMU", .serialized,
    .enabled(if: QemuEnvironment.available, "\(QemuEnvironment.skipReason ?? "")"))
struct RunCommandTests {
    /// A template pool of `size` VMs.
    func sandbox(pool: String, size: Int) throws -> QemuSandbox {
        let box = try QemuSandbox()
        let result = try box.run([
            "apply", "-f", box.write(poolYAML(pool, size: size, boot: "template"), as: pool + ".yaml"),
        ])
        #expect(result.status == 0, "apply failed: \(result.stdout)\n\(result.stderr)")
        return box
    }

    /// Refills the pool after runs took its VMs.
    func refill(_ box: QemuSandbox) throws {
        let result = try box.run(["reconcile"])
        #expect(result.status == 0, "reconcile failed: \(result.stdout)\n\(result.stderr)")
    }

    /// `vmpool run POOL ARGS` through the binary.
    func run(_ box: QemuSandbox, _ pool: String, _ arguments: [String]) throws -> CommandResult {
        try box.binary.run(["run", pool, "--state-dir", box.state] + arguments)
    }

    /// The VMs of the sandbox that are leased.
    func leased(_ box: QemuSandbox) throws -> [[String: Any]] {
        try box.vms().filter { $0["lease"] is [String: Any] }
    }

    /// Checks that no VM is leased any more and that none of `pids` runs.
    func expectReleased(_ box: QemuSandbox, pids: [Int32], _ what: String) throws {
        let still = try leased(box)
        #expect(still.isEmpty, "\(what): a VM is still leased: \(still)")
        let gone = eventually(timeout: .seconds(30)) { Set(box.qemuProcesses()).isDisjoint(with: pids) }
        #expect(gone, "\(what): the run's QEMU still runs (\(pids) among \(box.qemuProcesses()))")
    }

    /// The QEMU pid of each VM of the sandbox.
    func pids(_ box: QemuSandbox) throws -> [String: Int32] {
        var pids: [String: Int32] = [:]
        for vm in try box.vms() {
            if let id = vm["id"] as? String, let pid = vm["pid"] as? Int { pids[id] = Int32(pid) }
        }
        return pids
    }

    /// The object `run -o json` printed last on stdout.
    func report(_ result: CommandResult) -> [String: Any] {
        let line = result.stdoutLines.last.map { Data($0.utf8) } ?? Data()
        return ((try? JSONSerialization.jsonObject(with: line)) as? [String: Any]) ?? [:]
    }

    /// The pid, among `pids`, of the VM `result` ran on.
    func pid(of result: CommandResult, among pids: [String: Int32]) -> [Int32] {
        (report(result)["id"] as? String).flatMap { pids[$0] }.map { [$0] } ?? []
    }

    @Test func runStreamsCopiesInAndOutAndReleasesItsVMWhateverTheCommandDid() throws {
        let box = try sandbox(pool: "job", size: 2)
        defer { box.tearDown() }
        let hostFile = box.dir.write("in.txt", "hello from the host\n")
        box.dir.write("indir/a.txt", "a\n")
        box.dir.write("indir/sub/b.txt", "b\n")
        let results = box.dir.path + "/results"
        try FileManager.default.createDirectory(atPath: results, withIntermediateDirectories: true)
        var before = try pids(box)
        #expect(before.count == 2, "\(before)")

        // A command that fails: both streams, its status, the copies in and (still) out, -o json.
        let script = """
            cat /tmp/in.txt /tmp/indir/sub/b.txt; echo "$GREETING"; echo to-stderr >&2
            echo result > /tmp/result.txt; mkdir -p /tmp/outdir/deep; echo deep > /tmp/outdir/deep/c.txt
            exit 3
            """
        let failed = try run(
            box, "job",
            [
                "--in", hostFile + ":/tmp/in.txt", "--in", box.dir.path + "/indir:/tmp/indir",
                "--out", "/tmp/result.txt:" + results + "/result.txt", "--out", "/tmp/outdir:" + results + "/got",
                "-e", "GREETING=hi", "-o", "json", "--", "sh", "-c", script,
            ])
        #expect(failed.status == 3, "exit \(failed.status): \(failed.stderr)")
        #expect(failed.stdout.hasPrefix("hello from the host\nb\nhi\n"), "\(failed.stdout)")
        #expect(failed.stderr == "to-stderr\n", "\(failed.stderr)")
        let summary = report(failed)
        #expect((summary["id"] as? String)?.hasPrefix("job-") == true, "\(summary)")
        #expect(summary["pool"] as? String == "job" && summary["exitStatus"] as? Int == 3, "\(summary)")
        #expect((summary["errors"] as? [Any])?.isEmpty == true, "\(summary)")
        let timings = try #require(summary["timingsMs"] as? [String: Any], "\(summary)")
        #expect(Set(timings.keys) == ["lease", "in", "cmd", "out", "release"], "\(timings)")
        #expect(timings.values.allSatisfy { ($0 as? Int).map { $0 >= 0 } == true }, "\(timings)")
        #expect((timings["cmd"] as? Int ?? 0) > 0, "\(timings)")
        let copied = try? String(contentsOfFile: results + "/result.txt", encoding: .utf8)
        #expect(copied == "result\n", "--out file: \(copied ?? "missing")")
        let deep = try? String(contentsOfFile: results + "/got/deep/c.txt", encoding: .utf8)
        #expect(deep == "deep\n", "--out directory: \(deep ?? "missing")")
        #expect(pid(of: failed, among: before).count == 1, "\(summary) \(before)")
        try expectReleased(box, pids: pid(of: failed, among: before), "after a failing command")

        // --timeout kills the command; a --out that cannot be copied is reported and keeps its 137.
        before = try pids(box)
        let timedOut = try run(
            box, "job",
            ["--timeout", "2s", "--out", "/tmp/never-made:" + results + "/never", "-o", "json", "--", "sleep", "600"])
        #expect(timedOut.status == 137, "exit \(timedOut.status): \(timedOut.stderr)")
        #expect(timedOut.stderr.contains("--timeout 2s"), "\(timedOut.stderr)")
        #expect(timedOut.stderr.contains("--out /tmp/never-made"), "\(timedOut.stderr)")
        #expect(!FileManager.default.fileExists(atPath: results + "/never"))
        #expect(report(timedOut)["exitStatus"] as? Int == 137 && pid(of: timedOut, among: before).count == 1)
        try expectReleased(box, pids: pid(of: timedOut, among: before), "after --timeout")

        // A --out that cannot be copied after a command that succeeded: 125, and still released.
        try refill(box)
        before = try pids(box)
        let lost = try run(box, "job", ["--out", "/tmp/never-made:" + results + "/never", "-o", "json", "--", "true"])
        #expect(lost.status == 125, "exit \(lost.status): \(lost.stderr)")
        #expect(lost.stderr.contains("no such file or directory in the guest: /tmp/never-made"), "\(lost.stderr)")
        let errors = report(lost)["errors"] as? [String] ?? []
        #expect(errors.count == 1 && errors.first?.contains("/tmp/never-made") == true, "\(report(lost))")
        try expectReleased(box, pids: pid(of: lost, among: before), "after a --out that failed")

        // A command that is not there: 127, as exec.
        before = try pids(box)
        let missing = try run(box, "job", ["-o", "json", "--", "no-such-command-here"])
        #expect(missing.status == 127, "exit \(missing.status): \(missing.stderr)")
        try expectReleased(box, pids: pid(of: missing, among: before), "after a command not found")

        // A --in that cannot be copied: 125, the command is not run, the VM is released.
        try refill(box)
        before = try pids(box)
        let badIn = try run(
            box, "job", ["--in", hostFile + ":/no/such/dir/in.txt", "-o", "json", "--", "sh", "-c", "echo ran"])
        #expect(badIn.status == 125, "exit \(badIn.status): \(badIn.stderr)")
        #expect(badIn.stderr.contains("--in \(hostFile)") && badIn.stderr.contains("not run"), "\(badIn.stderr)")
        #expect(!badIn.stdout.contains("ran"), "the command ran after a failed --in: \(badIn.stdout)")
        try expectReleased(box, pids: pid(of: badIn, among: before), "after a --in that failed")

        // A --in whose source is not there fails before anything is leased; so does an empty pool.
        let vmsBefore = try box.ids()
        let absent = try run(box, "job", ["--in", box.dir.path + "/absent:/tmp/x", "--", "true"])
        #expect(absent.status == 125 && absent.stderr.contains("nothing was leased"), "\(absent.stderr)")
        #expect(try box.ids() == vmsBefore, "a refused run changed the VMs")
        _ = try run(box, "job", ["--", "true"])
        let empty = try run(box, "job", ["-o", "json", "--", "true"])
        #expect(empty.status == 125 && empty.stderr.contains("no ready VM in pool job"), "\(empty.stderr)")
        let emptyReport = try JSONSerialization.jsonObject(with: Data(empty.stdout.utf8)) as? [String: Any]
        #expect(emptyReport?["id"] is NSNull && emptyReport?["exitStatus"] as? Int == 125, "\(empty.stdout)")
    }

    /// Starts `run` on a command that says it started and then waits; returns it once the
    /// guest command runs, with the run's VM and its QEMU pid.
    func startWaitingRun(_ box: QemuSandbox, _ pool: String) throws -> (RunningCommand, String, Int32) {
        let command = try box.binary.start([
            "run", pool, "--state-dir", box.state, "--", "sh", "-c", "echo started; exec sleep 600",
        ])
        let started = eventually(timeout: .seconds(120)) { command.outputSize > 0 || command.exited(within: 0) }
        #expect(started && command.outputSize > 0, "the run's command did not start")
        let vm = try #require(try leased(box).first, "no VM is leased while run runs")
        let holder = (vm["lease"] as? [String: Any])?["holder"] as? String
        #expect(holder?.hasPrefix("run:") == true, "holder \(holder ?? "none")")
        let id = try #require(vm["id"] as? String)
        let pid = try #require(vm["pid"] as? Int)
        return (command, id, Int32(pid))
    }

    @Test func signalsAndAVMKilledUnderItEndARunAndItsLease() throws {
        let box = try sandbox(pool: "sig", size: 2)
        defer { box.tearDown() }
        for (signal, name) in [(SIGINT, "SIGINT"), (SIGTERM, "SIGTERM")] {
            let (command, _, pid) = try startWaitingRun(box, "sig")
            command.kill(signal)
            let result = try #require(command.wait(timeout: .seconds(60)), "run did not end after \(name)")
            #expect(result.status == 128 + signal, "\(name): exit \(result.status): \(result.stderr)")
            #expect(result.stdout == "started\n", "\(name): \(result.stdout)")
            try expectReleased(box, pids: [pid], "after \(name)")
        }

        // The VM dies under the command: run says so, exits 125, and leaves no lease.
        try refill(box)
        let (command, vm, pid) = try startWaitingRun(box, "sig")
        kill(pid, SIGKILL)
        let result = try #require(command.wait(timeout: .seconds(60)), "run did not end after its VM died")
        #expect(result.status == 125, "exit \(result.status): \(result.stderr)")
        #expect(result.stderr.contains(vm) && result.stderr.contains("exited"), "\(result.stderr)")
        try expectReleased(box, pids: [pid], "after the VM was killed")
        #expect(!(try box.ids().contains(vm)), "the dead VM is still recorded")

        // A signal while run waits for a ready VM: 128+N, and no VM is leased for it.
        let held = try box.run(["lease", "sig", "--holder", "test"])
        #expect(held.status == 0, "\(held.stderr)")
        let waiting = try box.binary.start(["run", "sig", "--wait", "5m", "--state-dir", box.state, "--", "true"])
        #expect(!waiting.exited(within: 1), "run did not wait for a VM")
        waiting.kill(SIGTERM)
        let ended = try #require(waiting.wait(timeout: .seconds(30)), "a waiting run did not end after SIGTERM")
        #expect(ended.status == 143, "exit \(ended.status): \(ended.stderr)")
        let holders = try leased(box).compactMap { ($0["lease"] as? [String: Any])?["holder"] as? String }
        #expect(holders == ["test"], "\(holders)")
    }
}
