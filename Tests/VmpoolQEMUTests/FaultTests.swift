import Foundation
import Testing
import VmpoolTestSupport

/// Faults of the host under a guest: a state dir that fills up while a guest writes its disk.
@Suite(
    "Faults under real QEMU VMs", .serialized,
    .enabled(if: QemuEnvironment.available, "\(QemuEnvironment.skipReason ?? "")"))
struct FaultTests {
    /// A guest fills the host's state dir (a small tmpfs) through its scratch disk: QEMU stops
    /// the VM on the write error. The exec writing fails instead of hanging, the VM shows as
    /// failed with the reason and an event, the pool never counts it warm, and once space is
    /// free again the pool has its VMs back.
    @Test(.enabled(if: geteuid() == 0, "mounting a tmpfs needs root"))
    func aFullStateDirFailsTheVMAndThePoolRecovers() throws {
        let image = try QemuSandbox()
        defer { image.tearDown() }
        let mount = TemporaryDirectory(prefix: "vmfull")
        defer { mount.remove() }
        let mounted = try RunningCommand(
            path: "/bin/mount", arguments: ["-t", "tmpfs", "-o", "size=40m,mode=0700", "tmpfs", mount.path],
            environment: [:]
        ).wait()
        try #require(mounted.status == 0, "mount: \(mounted.stderr)")
        defer { _ = try? RunningCommand(path: "/bin/umount", arguments: ["-l", mount.path], environment: [:]).wait() }
        let state = mount.path + "/s"
        let binary = image.binary
        func run(_ arguments: [String]) throws -> CommandResult {
            try binary.run(arguments + ["--state-dir", state])
        }
        // The guest image stays outside the small state dir: the pool names its files.
        let cmdline = try String(contentsOfFile: image.state + "/image/cmdline", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let manifest = mount.path + "/../vmfull-\(getpid()).yaml"
        defer { unlink(manifest) }
        try """
        apiVersion: vmpool/v1
        kind: Pool
        metadata: {name: full}
        spec:
          size: 2
          vcpus: 1
          memory: 256Mi
          boot: template
          image: {kernel: \(image.state)/image/vmlinuz, initrd: \(image.state)/image/initrd.img, cmdline: "\(cmdline)"}
          disks: [{name: scratch, size: 64Mi}]
        """.write(toFile: manifest, atomically: true, encoding: .utf8)
        let applied = try run(["apply", "-f", manifest])
        try #require(applied.status == 0, "\(applied.stdout)\(applied.stderr)")
        defer { _ = try? run(["delete", "full"]) }
        // Ballast the test can take away later, as an operator frees space.
        let ballast = mount.path + "/ballast"
        try Data(count: 8 << 20).write(to: URL(fileURLWithPath: ballast))
        let rows =
            try JSONSerialization.jsonObject(with: Data(try run(["get", "vms", "-o", "json"]).stdout.utf8))
            as? [[String: Any]] ?? []
        let filler = try #require(rows.first?["id"] as? String)
        let started = Date()
        let fill = try binary.start([
            "exec", filler, "--state-dir", state, "--", "sh", "-c",
            "dd if=/dev/urandom of=/dev/vda bs=1M count=60 2>/dev/null; sync; echo written",
        ])
        let ended = fill.exited(within: 180)
        if !ended { fill.kill(SIGKILL) }
        let result = fill.wait()
        #expect(ended, "exec on a VM QEMU stopped did not end")
        #expect(result.status == 125, "exec: \(result.status) \(result.stdout) \(result.stderr)")
        #expect(
            result.stderr.contains("no space left") && !result.stderr.contains("/run/"),
            "exec said: \(result.stderr)")
        print("full disk: exec ended after \(Int(Date().timeIntervalSince(started))) s with \(result.status)")
        // The store still answers (reads need no space).
        let after =
            try JSONSerialization.jsonObject(with: Data(try run(["get", "vms", "-o", "json"]).stdout.utf8))
            as? [[String: Any]] ?? []
        let row = after.first { $0["id"] as? String == filler }
        #expect(row?["state"] as? String == "failed", "\(row ?? [:])")
        #expect((row?["problem"] as? String)?.contains("no space left on the host") == true, "\(row ?? [:])")
        let pools =
            try JSONSerialization.jsonObject(with: Data(try run(["get", "pools", "-o", "json"]).stdout.utf8))
            as? [[String: Any]] ?? []
        #expect(pools.first?["warmReady"] as? Int == 0, "a stopped VM counted as warm: \(pools)")
        #expect(pools.first?["ready"] as? Int == 1, "\(pools)")
        // Space comes back: the next pass replaces the failed VM (new before old; the old one's
        // overlay, which filled the disk, goes with it).
        unlink(ballast)
        let reconciled = try run(["reconcile"])
        #expect(reconciled.status == 0, "\(reconciled.stdout)\(reconciled.stderr)")
        let final =
            try JSONSerialization.jsonObject(with: Data(try run(["get", "pools", "-o", "json"]).stdout.utf8))
            as? [[String: Any]] ?? []
        #expect(final.first?["ready"] as? Int == 2, "\(final)")
        let vms = try run(["get", "vms", "-o", "json"]).stdout
        #expect(!vms.contains(filler), "the failed VM is gone")
        let events = try run(["events", "--pool", "full"]).stdout
        #expect(events.contains("fault") && events.contains("no space left"), "\(events)")
    }
}
