import CVmpoolSys
import Foundation
import Testing
import VmpoolDriver
import VmpoolTestSupport

@testable import VmpoolQEMU

/// What makes a VM usable, on real QEMU: exec, cp, logs, console, disks, identity after a clone.
@Suite(
    "Usable VMs on real QEMU", .serialized,
    .enabled(if: QemuEnvironment.available, "\(QemuEnvironment.skipReason ?? "")"))
struct UsableVMTests {
    /// This suite's pools: cold-booted and running unless it says otherwise.
    func pool(_ name: String, size: Int, boot: String = "cold", state: String = "running", extra: String = "")
        -> String
    {
        poolYAML(name, size: size, boot: boot, state: state, extra: extra)
    }

    func apply(_ box: QemuSandbox, _ text: String, name: String = "pool.yaml") throws {
        let result = try box.run(["apply", "-f", box.write(text, as: name)])
        #expect(result.status == 0, "apply failed: \(result.stdout)\n\(result.stderr)")
    }

    @Test func execRunsCommandsOnColdVMsAndClones() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        try apply(box, pool("cold", size: 1) + "---\n" + pool("clone", size: 1, boot: "template"))
        for vm in try box.ids() {
            let uname = try box.exec(vm, ["uname", "-a"])
            #expect(
                uname.status == 0 && uname.stdout.hasPrefix("Linux \(vm) "), "\(vm): \(uname.stdout) \(uname.stderr)")
            let split = try box.exec(vm, ["sh", "-c", "echo to-out; echo to-err >&2; exit 3"])
            #expect(split.status == 3)
            #expect(split.stdout == "to-out\n")
            #expect(split.stderr == "to-err\n")
            #expect(try box.exec(vm, ["no-such-program"]).status == 127)
            #expect(try box.exec(vm, ["/proc/cpuinfo"]).status == 126)
            let env = try box.exec(vm, ["sh", "-c", "echo $A-$B"], options: ["-e", "A=1", "-e", "B=two words"])
            #expect(env.stdout == "1-two words\n")
            let echoed = try box.exec(
                vm, ["sh", "-c", "cat | wc -c"], input: String(repeating: "x", count: 100_000), options: ["-i"])
            #expect(echoed.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "100000")
            // Every byte value comes through unchanged.
            let all = try box.exec(
                vm,
                ["sh", "-c", "i=0; while [ $i -lt 256 ]; do printf \"\\\\$(printf %o $i)\"; i=$((i+1)); done | md5sum"])
            let expected = Data((0...255).map { UInt8($0) })
            #expect(all.stdout.hasPrefix(md5(expected)), "\(all.stdout)")
            let timed = try box.exec(vm, ["sleep", "30"], options: ["--timeout", "1s"])
            #expect(timed.status == 137)
            // Under TCG a command and its children start with a fixed address-space layout
            // (ADDR_NO_RANDOMIZE, 0x0040000); VMPOOL_ASLR=1 keeps randomization.
            let fixed = try box.underTCG(vm) ? "00040000" : "00000000"
            let layout = try box.exec(vm, ["sh", "-c", "cat /proc/$$/personality; cat /proc/self/personality"])
            #expect(layout.stdout == "\(fixed)\n\(fixed)\n", "\(layout.stdout)\(layout.stderr)")
            let kept = try box.exec(vm, ["cat", "/proc/self/personality"], options: ["-e", "VMPOOL_ASLR=1"])
            #expect(kept.stdout == "00000000\n", "\(kept.stdout)\(kept.stderr)")
        }
        #expect(try box.exec("no-such-vm", ["true"]).status == 125)
    }

    @Test func severalExecsRunAtOnceAndTheControlPortStaysFree() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        try apply(box, pool("par", size: 1))
        // Leased first: an exec into a VM nobody holds marks it entered, and the pass below
        // would replace it. The pool refills before the lease returns.
        let leased = try box.run(["lease", "par", "--holder", "execs", "--refill"])
        #expect(leased.status == 0, "\(leased.stderr)")
        let vm = leased.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let started = ContinuousClock.now
        let runs = try (0..<4).map { _ in
            try box.binary.start(["exec", vm, "--state-dir", box.state, "--", "sh", "-c", "sleep 2; echo done"])
        }
        // Meanwhile the reconciler still reaches the agent: a pass finds nothing to do.
        let reconcile = try box.run(["reconcile"])
        #expect(
            reconcile.status == 0 && reconcile.stdout.contains("No changes"), "\(reconcile.stdout)\(reconcile.stderr)")
        for run in runs {
            let result = run.wait()
            #expect(result.status == 0 && result.stdout == "done\n")
        }
        #expect(ContinuousClock.now - started < .seconds(7), "four 2 s execs ran one after another")
    }

    @Test func execOnAPausedVMIsRefused() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        try apply(box, pool("sleepy", size: 1, state: "paused"))
        let vm = try #require(try box.ids().first)
        let result = try box.exec(vm, ["true"])
        #expect(result.status == 125)
        #expect(result.stderr.contains("paused"), "\(result.stderr)")
    }

    @Test func cpCopiesFilesAndDirectoriesBothWaysKeepingModes() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        try apply(box, pool("files", size: 1, boot: "template"))
        let vm = try #require(try box.ids().first)
        var bytes = [UInt8](repeating: 0, count: 5 << 20)
        for index in bytes.indices { bytes[index] = UInt8(truncatingIfNeeded: index &* 7919 &+ index >> 11) }
        let source = box.dir.path + "/blob.bin"
        FileManager.default.createFile(atPath: source, contents: Data(bytes))
        _ = box.dir.write("tree/sub/run.sh", "#!/bin/sh\necho hi\n")
        chmod(box.dir.path + "/tree/sub/run.sh", 0o751)
        #expect(try box.run(["cp", source, "\(vm):/tmp/blob.bin"]).status == 0)
        #expect(try box.run(["cp", box.dir.path + "/tree", "\(vm):/tmp/tree2"]).status == 0)
        #expect(try box.exec(vm, ["md5sum", "/tmp/blob.bin"]).stdout.hasPrefix(md5(Data(bytes))))
        #expect(try box.exec(vm, ["stat", "-c", "%a", "/tmp/tree2/sub/run.sh"]).stdout == "751\n")
        #expect(try box.exec(vm, ["/tmp/tree2/sub/run.sh"]).stdout == "hi\n")
        #expect(try box.run(["cp", "\(vm):/tmp/blob.bin", box.dir.path + "/back.bin"]).status == 0)
        #expect(FileManager.default.contents(atPath: box.dir.path + "/back.bin") == Data(bytes))
        #expect(try box.run(["cp", "\(vm):/tmp/tree2", box.dir.path + "/tree3"]).status == 0)
        var info = stat()
        stat(box.dir.path + "/tree3/sub/run.sh", &info)
        #expect(info.st_mode & 0o777 == 0o751)
        let missing = try box.run(["cp", "\(vm):/no/such/file", box.dir.path + "/x"])
        #expect(missing.status == 1)
        #expect(
            missing.stderr == "vmpool: no such file or directory in the guest: /no/such/file\n", "\(missing.stderr)")
        #expect(!FileManager.default.fileExists(atPath: box.dir.path + "/x"))
    }

    @Test func aClonesBootIsInItsTemplatesLog() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        try apply(box, pool("cloned", size: 1, boot: "template"))
        let vm = try #require(try box.ids().first)
        let described = try box.run(["describe", "pool", "cloned", "-o", "json"])
        let object = try JSONSerialization.jsonObject(with: Data(described.stdout.utf8)) as? [String: Any]
        let template = try #require(
            (object?["templates"] as? [[String: Any]])?.first?["id"] as? String, "\(described.stdout)")
        // The clone never booted: its log holds only what it printed since, and says where
        // its boot is.
        let clone = try box.run(["logs", vm])
        #expect(clone.status == 0, "\(clone.stderr)")
        #expect(!clone.stdout.contains("vmpool-guest: ready"), "\(clone.stdout.prefix(500))")
        #expect(clone.stderr.contains("its boot output is the template's: vmpool logs \(template)"), "\(clone.stderr)")
        // The template's boot was kept when its memory was saved, its process gone.
        let boot = try box.run(["logs", template])
        #expect(boot.status == 0, "\(boot.stderr)")
        #expect(boot.stdout.contains("vmpool-guest: ready"), "\(boot.stdout)")
        let last = try box.run(["logs", template, "--tail", "1"])
        #expect(last.status == 0 && last.stdout.split(separator: "\n").count == 1, "\(last.stdout)")
        #expect(try box.run(["describe", "pool", "cloned"]).stdout.contains("Boot log:    vmpool logs \(template)"))
        // A rebuilt template takes its log with it.
        try apply(box, poolYAML("cloned", size: 1, memory: "320Mi", boot: "template"))
        let gone = try box.run(["logs", template])
        #expect(gone.status == 1 && gone.stderr.contains("no VM named"), "\(gone.stderr)")
    }

    @Test func logsAreBoundedAndConsoleAnswers() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        try apply(box, pool("talk", size: 1))
        let vm = try #require(try box.ids().first)
        let logs = try box.run(["logs", vm])
        #expect(logs.status == 0 && logs.stdout.contains("vmpool-guest: ready"), "\(logs.stdout)")
        // --follow prints what the guest writes after it started, until interrupted.
        let following = try box.binary.start(["logs", vm, "--follow", "--tail", "1", "--state-dir", box.state])
        #expect(eventually { following.outputSize > 0 }, "logs --follow printed no tail")
        let late = "late-\(UInt32.random(in: 0...UInt32.max))"
        _ = try box.exec(vm, ["sh", "-c", "echo \(late) > /dev/ttyS0"])
        _ = eventually(timeout: .seconds(5)) {
            ((try? String(contentsOfFile: following.outPath, encoding: .utf8)) ?? "").contains(late)
        }
        following.kill(SIGINT)
        let ended = following.wait()
        #expect(ended.stdout.contains(late), "logs --follow did not print \(late): \(ended.stdout.suffix(300))")
        let before = ended.stdout.components(separatedBy: late).first ?? ""
        #expect(before.split(separator: "\n").count <= 1, "--tail 1 printed more: \(before)")
        // A guest printing 5 MiB on its serial console: the host keeps a bounded amount.
        _ = try box.exec(vm, ["sh", "-c", "head -c 5242880 /dev/zero | tr '\\\\0' x > /dev/ttyS0"])
        _ = try box.run(["logs", vm, "--tail", "1"])
        let dir = QemuPaths(configuration: QemuConfiguration(stateDirectory: box.state)).vmDirectory(vm)
        var total = 0
        for file in ["console.log", "console.log.1"] {
            var info = stat()
            if stat(dir + "/" + file, &info) == 0 { total += Int(info.st_size) }
        }
        #expect(total <= 2 * ConsoleLog.capBytes + QemuVM.consoleRingBytes, "console log on disk: \(total) bytes")
        let marker = "console-\(UInt32.random(in: 0...UInt32.max))"
        let console = try box.binary.run(
            ["console", vm, "--state-dir", box.state], input: "echo \(marker)\r" + String(UnicodeScalar(0x1D)))
        #expect(console.status == 0, "\(console.stderr)")
        #expect(console.stdout.contains(marker))
    }

    @Test func disksAreCopyOnWritePrivateAndGoWithTheirVM() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        // A raw base image whose first sector carries a marker.
        let base = box.dir.path + "/base.raw"
        var sector = [UInt8](repeating: 0, count: 1 << 20)
        for (index, byte) in "BASE-IMAGE".utf8.enumerated() { sector[index] = byte }
        FileManager.default.createFile(atPath: base, contents: Data(sector))
        let before = md5(Data(sector))
        // The same content as a qcow2 image: the other base format.
        let qcow2 = box.dir.path + "/base.qcow2"
        let converted = try RunningCommand(
            path: QemuProcess.resolve("qemu-img") ?? "/usr/bin/qemu-img",
            arguments: ["convert", "-f", "raw", "-O", "qcow2", base, qcow2], environment: [:]
        ).wait()
        #expect(converted.status == 0, "\(converted.stderr)")
        let qcow2Before = md5(FileManager.default.contents(atPath: qcow2) ?? Data())
        let disks =
            "  disks:\n    - {name: data, image: base.raw, size: 8Mi}\n    - {name: scratch, size: 16Mi}\n"
            + "    - {name: packed, image: base.qcow2}"
        try apply(box, pool("disky", size: 2, boot: "template", extra: disks))
        let ids = try box.ids()
        #expect(ids.count == 2)
        for vm in ids {
            #expect(try box.exec(vm, ["head", "-c", "10", "/dev/vda"]).stdout == "BASE-IMAGE")
            #expect(try box.exec(vm, ["cat", "/sys/block/vda/size", "/sys/block/vdb/size"]).stdout == "16384\n32768\n")
            #expect(try box.exec(vm, ["head", "-c", "10", "/dev/vdc"]).stdout == "BASE-IMAGE", "qcow2 base")
            #expect(try box.exec(vm, ["cat", "/sys/block/vdc/size"]).stdout == "2048\n", "the qcow2 image's size")
        }
        #expect(
            try box.exec(ids[0], ["sh", "-c", "printf PACKED-A | dd of=/dev/vdc conv=notrunc 2>/dev/null; sync"])
                .status == 0)
        #expect(try box.exec(ids[1], ["head", "-c", "10", "/dev/vdc"]).stdout == "BASE-IMAGE")
        #expect(md5(FileManager.default.contents(atPath: qcow2) ?? Data()) == qcow2Before, "the qcow2 base was written")
        #expect(
            try box.exec(ids[0], ["sh", "-c", "printf WRITTEN-A | dd of=/dev/vda conv=notrunc 2>/dev/null; sync"])
                .status == 0)
        #expect(try box.exec(ids[0], ["head", "-c", "9", "/dev/vda"]).stdout == "WRITTEN-A")
        #expect(
            try box.exec(ids[1], ["head", "-c", "10", "/dev/vda"]).stdout == "BASE-IMAGE",
            "a write in one VM is seen by another")
        #expect(md5(FileManager.default.contents(atPath: base) ?? Data()) == before, "the base image was written")
        let paths = QemuPaths(configuration: QemuConfiguration(stateDirectory: box.state))
        for vm in ids { #expect(access(paths.overlay(vm, disk: "data"), F_OK) == 0) }
        // A changed base is a new image: the template is rebuilt and the VMs replaced.
        sector[0] = UInt8(ascii: "b")
        FileManager.default.createFile(atPath: base, contents: Data(sector))
        let plan = try box.run(["plan", "-f", box.dir.path + "/pool.yaml"])
        #expect(plan.stdout.contains("build-template") && plan.stdout.contains("replace"), "\(plan.stdout)")
        try apply(box, pool("disky", size: 2, boot: "template", extra: disks))
        let replaced = try box.ids()
        #expect(Set(replaced).isDisjoint(with: ids))
        #expect(try box.exec(replaced[0], ["head", "-c", "10", "/dev/vda"]).stdout == "bASE-IMAGE")
        #expect(try box.run(["delete", "disky"]).status == 0)
        for vm in ids + replaced { #expect(access(paths.overlay(vm, disk: "data"), F_OK) != 0) }
        let templates = (try? FileManager.default.contentsOfDirectory(atPath: box.state + "/templates")) ?? []
        #expect(templates.isEmpty, "left: \(templates)")
    }

    /// Waits until `pool`'s template was saved at least `seconds` ago (the age of the clock in
    /// its saved state); `false` when it has no saved template.
    func templateSaved(_ box: QemuSandbox, pool: String, atLeast seconds: Double) throws -> Bool {
        let described = try box.run(["describe", "pool", pool, "-o", "json"])
        let object = try JSONSerialization.jsonObject(with: Data(described.stdout.utf8)) as? [String: Any]
        let templates = object?["templates"] as? [[String: Any]] ?? []
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        guard let text = templates.first?["savedAt"] as? String, let saved = formatter.date(from: text) else {
            return false
        }
        return eventually(timeout: .seconds(seconds + 10)) { Date().timeIntervalSince(saved) >= seconds }
    }

    @Test func clonesHaveTheirOwnIdentityAndTheHostsClock() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        try apply(box, pool("twins", size: 0, boot: "template"))
        // The template is saved now; clones made 10 s later must still read the host's time.
        try apply(box, pool("twins", size: 1, boot: "template"))
        #expect(try templateSaved(box, pool: "twins", atLeast: 10), "the template was not saved")
        try apply(box, pool("twins", size: 3, boot: "template"))
        var names = Set<String>()
        var randoms = Set<String>()
        for vm in try box.ids() {
            names.insert(try box.exec(vm, ["hostname"]).stdout)
            randoms.insert(try box.exec(vm, ["sh", "-c", "head -c 16 /dev/urandom | md5sum"]).stdout)
            let guest =
                Double(try box.exec(vm, ["date", "+%s"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
            #expect(
                abs(guest - Date().timeIntervalSince1970) < 2,
                "\(vm)'s clock is off by \(guest - Date().timeIntervalSince1970) s")
        }
        #expect(names.count == 3)
        #expect(randoms.count == 3)
        // Each VM has its own generation id (the vmgenid device guests with the driver reseed
        // from), read from QEMU.
        var generations = Set<String>()
        let paths = QemuPaths(configuration: QemuConfiguration(stateDirectory: box.state))
        for vm in try box.ids() {
            let qmp = try QMPClient(path: paths.qmpSocket(vm), vm: vm, timeout: .seconds(5))
            defer { qmp.close() }
            generations.insert(try qmp.execute("query-vm-generation-id", returning: Generation.self).guid)
        }
        #expect(generations.count == 3, "generation ids: \(generations)")
        // Without the clock step a clone keeps its template's time: the check above can fail.
        _ = try box.run(["apply", "-f", box.write(pool("drift", size: 1, boot: "template"), as: "drift.yaml")])
        #expect(try templateSaved(box, pool: "drift", atLeast: 3), "the template was not saved")
        let grown = box.write(pool("drift", size: 2, boot: "template"), as: "drift.yaml")
        _ = try box.run(["apply", "-f", grown], environment: ["VMPOOL_CLOCK_SYNC": "0", "VMPOOL_STANDBY": "0"])
        let newest = try #require(try box.ids(pool: "drift").last)
        let guest =
            Double(try box.exec(newest, ["date", "+%s"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        #expect(Date().timeIntervalSince1970 - guest > 2, "without clock sync the clone's clock should lag")
    }

    /// A lease hands one running clone to one consumer, which can use it; the pool refills
    /// around it, and a release stops the VM's QEMU: no process, run dir or lease is left.
    @Test func aLeasedCloneIsUsableThePoolRefillsAndAReleaseStopsIt() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        try apply(box, pool("ci", size: 2, boot: "template"))
        let leased = try box.run(["lease", "ci", "--holder", "job-1", "--refill", "-o", "json"])
        #expect(leased.status == 0, "\(leased.stdout)\(leased.stderr)")
        let lease = try JSONSerialization.jsonObject(with: Data(leased.stdout.utf8)) as? [String: Any]
        let vm = try #require(lease?["id"] as? String, "\(leased.stdout)")
        let hostname = try box.exec(vm, ["cat", "/proc/sys/kernel/hostname"])
        #expect(hostname.status == 0 && hostname.stdout == vm + "\n", "\(hostname.stdout)\(hostname.stderr)")
        // --refill returns with the pool whole again: two unleased VMs besides the leased one.
        let vms = try box.vms(pool: "ci")
        #expect(vms.count == 3, "\(vms)")
        #expect(vms.filter { $0["lease"] is [String: Any] }.compactMap { $0["id"] as? String } == [vm])
        let pid = try #require(vms.first { $0["id"] as? String == vm }?["pid"] as? Int)
        let released = try box.run(["release", vm])
        #expect(released.status == 0, "\(released.stderr)")
        #expect(!box.qemuProcesses().contains(Int32(pid)), "the released VM's QEMU (pid \(pid)) still runs")
        let reconciled = try box.run(["reconcile"])
        #expect(reconciled.status == 0, "\(reconciled.stdout)\(reconciled.stderr)")
        let after = try box.vms(pool: "ci")
        #expect(after.count == 2 && after.allSatisfy { $0["lease"] == nil || $0["lease"] is NSNull }, "\(after)")
        #expect(!after.contains { $0["id"] as? String == vm })
        // Every QEMU left is a VM or a standby with its own run dir, and nothing else is left.
        let runDirs = (try? FileManager.default.contentsOfDirectory(atPath: box.state + "/run")) ?? []
        #expect(box.qemuProcesses().count == runDirs.count, "QEMU \(box.qemuProcesses()) vs run dirs \(runDirs)")
    }
}

/// Hex MD5 of `data`, by the host's md5sum (the same tool as in the guest).
func md5(_ data: Data) -> String {
    let path = NSTemporaryDirectory() + "vmpool-md5-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    FileManager.default.createFile(atPath: path, contents: data)
    defer { unlink(path) }
    let result = try? RunningCommand(path: "/usr/bin/md5sum", arguments: [path], environment: [:]).wait()
    return String(result?.stdout.prefix(32) ?? "")
}

/// QEMU's answer to `query-vm-generation-id`.
struct Generation: Decodable {
    var guid: String
}
