import Foundation
import Testing
import VmpoolTestSupport

/// `vmpool cp` against a real guest that misbehaves: privileged files, device nodes, a `tar`
/// that lies, a full disk, an unwritable destination, an interrupted copy. Nothing privileged
/// and nothing partial may land, and the message must say what happened.
@Suite(
    "cp on real QEMU trusts nothing", .serialized,
    .enabled(if: QemuEnvironment.available, "\(QemuEnvironment.skipReason ?? "")"))
struct CopySafetyTests {
    func bootOne(_ box: QemuSandbox, name: String) throws -> String {
        let manifest = """
            apiVersion: vmpool/v1
            kind: Pool
            metadata: {name: \(name)}
            spec: {size: 1, vcpus: 1, memory: 256Mi}
            """
        let applied = try box.run(["apply", "-f", box.write(manifest)])
        try #require(applied.status == 0, "apply failed: \(applied.stderr)")
        return try #require(try box.ids().first)
    }

    /// Runs a shell line in the guest (busybox's own shell, which a test may replace `sh` beside)
    /// and requires it to succeed.
    @discardableResult
    func guest(_ box: QemuSandbox, _ vm: String, _ line: String) throws -> String {
        let result = try box.exec(vm, ["/bin/busybox", "sh", "-c", line])
        try #require(result.status == 0, "\(line): \(result.stdout)\(result.stderr)")
        return result.stdout
    }

    /// Waits for `command` to end, up to `seconds`; one that is still running then is killed
    /// (SIGKILL) and recorded as a failure, so that a copy deaf to SIGTERM fails the test
    /// instead of hanging it.
    func waitOrKill(_ command: RunningCommand, within seconds: Double = 10) -> CommandResult {
        let ended = eventually(timeout: .seconds(seconds)) {
            let stat = (try? String(contentsOfFile: "/proc/\(command.pid)/stat", encoding: .utf8)) ?? ""
            return stat.isEmpty || stat.contains(") Z")
        }
        if !ended {
            Issue.record("cp was still running \(seconds) s after SIGTERM; killed")
            command.kill(SIGKILL)
        }
        return command.wait()
    }

    func entries(_ path: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).sorted()
    }

    func mount(_ arguments: [String]) throws -> CommandResult {
        try RunningCommand(path: "/bin/mount", arguments: arguments, environment: [:]).wait()
    }

    func unmount(_ path: String) {
        _ = try? RunningCommand(path: "/bin/umount", arguments: [path], environment: [:]).wait()
    }

    @Test func copiesOutDropPrivilegeAndFailuresLeaveNothing() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let vm = try bootOne(box, name: "cpsafe")
        // Setuid and setgid files, a sticky directory, a device node and a fifo, made as root
        // in the guest: the README's CI recipe copies such a tree out as root.
        try guest(
            box, vm,
            "mkdir -p /work/sticky && echo x > /work/suid && chmod 4755 /work/suid && echo y > /work/sgid"
                + " && chmod 2711 /work/sgid && chmod 1777 /work/sticky && mknod /work/null c 1 3"
                + " && mkfifo /work/fifo && echo ok > /work/plain")
        let copied = try box.run(["cp", "\(vm):/work", box.dir.path + "/results"])
        #expect(copied.status == 0, "\(copied.stderr)")
        #expect(copied.stderr.contains("skipped \(box.dir.path)/results/null: a character device"), "\(copied.stderr)")
        #expect(copied.stderr.contains("skipped \(box.dir.path)/results/fifo: a fifo"), "\(copied.stderr)")
        #expect(entries(box.dir.path + "/results") == ["plain", "sgid", "sticky", "suid"])
        for (name, mode) in [("suid", 0o755), ("sgid", 0o711), ("sticky", 0o777), ("plain", 0o644)] {
            var info = stat()
            lstat(box.dir.path + "/results/" + name, &info)
            #expect(info.st_mode & 0o7777 == mode, "\(name): \(String(info.st_mode & 0o7777, radix: 8))")
            #expect(info.st_uid == geteuid(), "\(name) is owned by uid \(info.st_uid)")
        }

        // A missing source says so plainly.
        let missing = try box.run(["cp", "\(vm):/no/such/file", box.dir.path + "/x"])
        #expect(missing.status == 1)
        #expect(
            missing.stderr == "vmpool: no such file or directory in the guest: /no/such/file\n", "\(missing.stderr)")

        // A guest file system that is full: the plain reason, and no partial file in the guest.
        try guest(
            box, vm, "mkdir -p /tmp/small && mount -t tmpfs -o size=1m tmpfs /tmp/small && echo keep > /tmp/small/k")
        let big = box.dir.path + "/big"
        _ = FileManager.default.createFile(atPath: big, contents: Data([UInt8](repeating: 0x5a, count: 4 << 20)))
        let full = try box.run(["cp", big, "\(vm):/tmp/small/big"])
        #expect(full.status == 1)
        #expect(
            full.stderr == "vmpool: no space left on device in the guest (/tmp/small); nothing was copied\n",
            "\(full.stderr)")
        #expect(try guest(box, vm, "ls -A /tmp/small") == "k\n")

        // A host destination that cannot be written: nothing is left there.
        let readOnly = box.dir.path + "/ro"
        mkdir(readOnly, 0o755)
        let rootCanMount = geteuid() == 0
        if rootCanMount {
            let mounted = try mount(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", readOnly])
            try #require(mounted.status == 0, "mount: \(mounted.stderr)")
        } else {
            chmod(readOnly, 0o500)
        }
        defer { if rootCanMount { unmount(readOnly) } }
        let unwritable = try box.run(["cp", "\(vm):/work", readOnly])
        #expect(unwritable.status == 1)
        #expect(
            unwritable.stderr.hasPrefix("vmpool: cannot write to \(readOnly) on the host: "), "\(unwritable.stderr)")
        #expect(entries(readOnly).isEmpty)

        // No space on the host: the entry is named and nothing is left.
        if rootCanMount {
            let small = box.dir.path + "/small"
            mkdir(small, 0o755)
            let mounted = try mount(["-t", "tmpfs", "-o", "size=1m", "tmpfs", small])
            try #require(mounted.status == 0, "mount: \(mounted.stderr)")
            defer { unmount(small) }
            try guest(box, vm, "mkdir -p /out && head -c 4194304 /dev/zero > /out/big")
            let hostFull = try box.run(["cp", "\(vm):/out", small])
            #expect(hostFull.status == 1)
            #expect(
                hostFull.stderr
                    == "vmpool: cannot write \(small)/out/big on the host: no space left on device; nothing was copied\n",
                "\(hostFull.stderr)")
            #expect(entries(small).isEmpty)
        } else {
            print("CopySafetyTests: no host ENOSPC check: mounting a small tmpfs needs root")
        }
    }

    @Test func aLyingGuestTarAndInterruptedCopiesLeaveNothing() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let vm = try bootOne(box, name: "cpliar")

        // SIGTERM in the middle of a copy in: cp ends within about a second, nothing is left
        // at the destination, and the guest's temporary directory goes too.
        let zeros = box.dir.path + "/zeros"
        _ = FileManager.default.createFile(atPath: zeros, contents: nil)
        truncate(zeros, 200 << 20)
        let copyIn = try box.binary.start(["cp", zeros, "\(vm):/tmp/zeros", "--state-dir", box.state])
        let started = try eventually(timeout: .seconds(60)) {
            try box.exec(vm, ["ls", "-A", "/tmp"]).stdout.contains(".vmpool-cp.")
        }
        try #require(started, "the copy in never started")
        let sent = ContinuousClock.now
        copyIn.kill(SIGTERM)
        let interrupted = waitOrKill(copyIn)
        let took = ContinuousClock.now - sent
        print("CopySafetyTests: cp (in) ended \(took) after SIGTERM")
        #expect(took < .seconds(2), "cp took \(took) to end after SIGTERM")
        #expect(
            interrupted.status == 1 && interrupted.stderr.contains("interrupted"),
            "status \(interrupted.status): \(interrupted.stderr)")
        let cleaned = try eventually(timeout: .seconds(10)) {
            !(try box.exec(vm, ["ls", "-A", "/tmp"]).stdout.contains(".vmpool-cp."))
        }
        let left = try box.exec(vm, ["ls", "-A", "/tmp"]).stdout
        #expect(cleaned, "the guest kept its temporary directory: \(left)")
        #expect(try box.exec(vm, ["ls", "/tmp/zeros"]).status != 0, "a partial /tmp/zeros is in the guest")

        // A guest that sends what it likes in place of its files: entries outside the
        // destination or beside the requested one fail the copy and nothing is written. The
        // copy runs `sh -c '... exec tar ...'`; busybox's shell runs its own tar applet whatever
        // PATH holds, so the liar here is the guest's `sh` (the first program of the copy).
        let escape = { (extra: String) -> [UInt8] in
            var tar = TarBuilder()
            tar.entry("work/", type: "5", mode: 0o755)
            tar.entry("work/ok", data: Array("ok\n".utf8))
            tar.entry(extra, data: Array("evil\n".utf8))
            tar.end()
            return tar.bytes
        }
        var endless = TarBuilder()
        endless.entry("work", size: 0o77777777777)
        for (name, bytes) in [
            ("escape.tar", escape("../../evil")), ("sibling.tar", escape("sibling")), ("endless.tar", endless.bytes),
        ] {
            _ = FileManager.default.createFile(atPath: box.dir.path + "/" + name, contents: Data(bytes))
            let put = try box.run(["cp", box.dir.path + "/" + name, "\(vm):/tmp/"])
            try #require(put.status == 0, "\(put.stderr)")
        }
        try guest(
            box, vm,
            "mkdir -p /work && echo real > /work/real"
                + " && printf '#!/bin/busybox sh\\nexec /bin/busybox cat \"/tmp/$(/bin/busybox cat /tmp/which)\"\\n'"
                + " > /tmp/liar && chmod 755 /tmp/liar"
                + " && for d in /bin /sbin /usr/bin /usr/sbin; do if [ -e $d/sh ]; then rm -f $d/sh; cp /tmp/liar $d/sh; fi;"
                + " done")
        let results = box.dir.path + "/results"
        mkdir(results, 0o755)
        for (which, refusal) in [
            ("escape.tar", "entry \"../../evil\" has a \"..\" component"),
            ("sibling.tar", "entry \"sibling\" is not work or under it"),
        ] {
            try guest(box, vm, "echo \(which) > /tmp/which")
            let copied = try box.run(["cp", "\(vm):/work", results])
            #expect(copied.status == 1)
            #expect(
                copied.stderr.hasPrefix("vmpool: refused what the guest sent for /work: \(refusal)"), "\(copied.stderr)"
            )
            #expect(entries(results).isEmpty, "\(which) left \(entries(results))")
            #expect(!FileManager.default.fileExists(atPath: box.dir.path + "/evil"))
            #expect(
                !FileManager.default.fileExists(atPath: (box.dir.path as NSString).deletingLastPathComponent + "/evil"))
        }

        // A guest that streams without end: SIGTERM ends cp within about a second and the
        // partial copy on the host is removed.
        try guest(
            box, vm,
            "printf '#!/bin/busybox sh\\n/bin/busybox cat /tmp/endless.tar; exec /bin/busybox cat /dev/zero\\n'"
                + " > /tmp/liar && for d in /bin /sbin /usr/bin /usr/sbin; do if [ -e $d/sh ]; then cp /tmp/liar $d/sh; fi; done"
        )
        let copyOut = try box.binary.start(["cp", "\(vm):/work", results, "--state-dir", box.state])
        // Started: the staged file on the host is growing.
        let flowing = eventually(timeout: .seconds(60)) {
            guard let staging = entries(results).first(where: { $0.hasPrefix(".vmpool-cp-") }) else { return false }
            var info = stat()
            return stat(results + "/" + staging + "/work", &info) == 0 && info.st_size > 1 << 20
        }
        try #require(flowing, "the copy out never started")
        let sentOut = ContinuousClock.now
        copyOut.kill(SIGTERM)
        let stopped = waitOrKill(copyOut)
        let tookOut = ContinuousClock.now - sentOut
        print("CopySafetyTests: cp (out) ended \(tookOut) after SIGTERM")
        #expect(tookOut < .seconds(2), "cp took \(tookOut) to end after SIGTERM")
        #expect(
            stopped.status == 1 && stopped.stderr.contains("interrupted"), "status \(stopped.status): \(stopped.stderr)"
        )
        #expect(entries(results).isEmpty, "\(entries(results))")

        // A guest that takes the whole stream in and then goes quiet: nothing moves on any
        // pipe, and SIGTERM still ends cp within about a second.
        try guest(
            box, vm,
            "printf '#!/bin/busybox sh\\n/bin/busybox cat >/dev/null; exec /bin/busybox sleep 1000\\n'"
                + " > /tmp/liar && for d in /bin /sbin /usr/bin /usr/sbin; do if [ -e $d/sh ]; then cp /tmp/liar $d/sh; fi; done"
        )
        let quiet = try box.binary.start([
            "cp", box.dir.path + "/escape.tar", "\(vm):/tmp/quiet", "--state-dir", box.state,
        ])
        let asleep = try eventually(timeout: .seconds(60)) { try box.exec(vm, ["ps"]).stdout.contains("sleep 1000") }
        try #require(asleep, "the guest side of the copy never went quiet")
        let sentQuiet = ContinuousClock.now
        quiet.kill(SIGTERM)
        let ended = waitOrKill(quiet)
        let tookQuiet = ContinuousClock.now - sentQuiet
        print("CopySafetyTests: cp (in, quiet guest) ended \(tookQuiet) after SIGTERM")
        #expect(tookQuiet < .seconds(2), "cp took \(tookQuiet) to end after SIGTERM")
        #expect(ended.status == 1 && ended.stderr.contains("interrupted"), "status \(ended.status): \(ended.stderr)")
    }
}
