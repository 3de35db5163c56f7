import Foundation
import Testing
import VmpoolTestSupport

/// Templates the user prepares (SPEC §11) on real QEMU: files copied in, a service that setup
/// starts in the background, a ready check on its port, in template pools and cold ones.
@Suite(
    "Template setup on real QEMU", .serialized,
    .enabled(if: QemuEnvironment.available, "\(QemuEnvironment.skipReason ?? "")"))
struct TemplateSetupTests {
    /// A web server started by setup, serving the copied site directory on guest port 8080.
    func pool(_ name: String, size: Int = 2, boot: String = "template", firstStep: String = "mkdir -p /srv/logs")
        -> String
    {
        """
        apiVersion: vmpool/v1
        kind: Pool
        metadata: {name: \(name)}
        spec:
          size: \(size)
          vcpus: 1
          memory: 256Mi
          boot: \(boot)
          network: {mode: user, ports: [8080]}
          template:
            files:
              - {src: site, dst: /srv/www}
              - {src: motd.txt, dst: /etc/motd-copy}
            setup:
              - \(firstStep)
              - [busybox, httpd, -p, "8080", -h, /srv/www]
            ready:
              exec: [test, -s, /srv/www/index.html]
              port: 8080
              timeout: 2m
        """
    }

    /// Each VM of `pool` with its forwarded host port for guest port 8080.
    func served(_ box: QemuSandbox, pool: String) throws -> [(String, Int)] {
        try box.vms(pool: pool).map { vm in
            (try #require(vm["id"] as? String), try #require((vm["ports"] as? [String: Int])?["8080"]))
        }
    }

    /// Right after `apply` returns, every clone answers on its forwarded port with the copied
    /// site, from the server setup started in the template; a file that changes rebuilds the
    /// template and the new clones serve the new content; the steps' output is kept.
    @Test func clonesServeWhatSetupStartedAndAChangedFileRebuilds() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        box.dir.write("site/index.html", "first edition\n")
        box.dir.write("motd.txt", "hello\n")
        let file = box.write(pool("web"))
        let applied = try box.run(["apply", "-f", file])
        #expect(applied.status == 0, "\(applied.stdout)\(applied.stderr)")
        let first = try served(box, pool: "web")
        #expect(first.count == 2)
        for (vm, port) in first {
            // No retry: the clone counted as ready only once its port listened.
            let body = (try? httpGet(port: port)) ?? ""
            #expect(body.contains("first edition"), "\(vm) on 127.0.0.1:\(port): \(body)")
            #expect(try box.exec(vm, ["cat", "/etc/motd-copy"]).stdout == "hello\n")
        }
        let logs = try FileManager.default.contentsOfDirectory(atPath: box.state + "/templates")
            .filter { $0.hasSuffix(".setup.log") }
        #expect(logs.count == 1, "\(logs)")
        let log = try String(contentsOfFile: box.state + "/templates/" + (logs.first ?? ""), encoding: .utf8)
        #expect(log.contains("setup step 2 (busybox httpd -p 8080 -h /srv/www)"), "\(log)")
        let described = try box.run(["describe", "pool", "web"]).stdout
        #expect(described.contains("Setup log:") && described.contains(logs.first ?? "-"), "\(described)")
        #expect(described.contains("  setup 2: busybox httpd -p 8080 -h /srv/www"), "\(described)")

        box.dir.write("site/index.html", "second edition\n")
        let plan = try box.run(["plan", "-f", file])
        #expect(plan.stdout.contains("template is stale: template.files changed"), "\(plan.stdout)")
        let again = try box.run(["apply", "-f", file])
        #expect(again.status == 0, "\(again.stdout)\(again.stderr)")
        let second = try served(box, pool: "web")
        #expect(Set(second.map(\.0)).isDisjoint(with: first.map(\.0)), "the VMs were not replaced")
        for (vm, port) in second {
            let body = (try? httpGet(port: port)) ?? ""
            #expect(body.contains("second edition"), "\(vm) on 127.0.0.1:\(port): \(body)")
        }
    }

    /// A step that fails fails the build with the step, its exit status and its stderr's tail
    /// (in apply's error and an event); no VM is made, and no template is left.
    @Test func aFailingStepFailsThePoolWithItsStderrAndMakesNoVM() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        box.dir.write("site/index.html", "x\n")
        box.dir.write("motd.txt", "x\n")
        let step = "echo 'schema.sql: syntax error at line 3' >&2; exit 3"
        let file = box.write(pool("broken", firstStep: "\"\(step)\""))
        let result = try box.run(["apply", "-f", file])
        #expect(result.status == 1)
        let expected =
            "setup step 1 (\(step)) exited with status 3; its stderr ends: schema.sql: syntax error at line 3"
        #expect(result.stdout.contains(expected), "\(result.stdout)\n\(result.stderr)")
        #expect(try box.ids(pool: "broken").isEmpty, "a VM was made from a template that never became ready")
        #expect(box.qemuProcesses().isEmpty, "the template VM was left running")
        let described = try box.run(["describe", "pool", "broken"])
        #expect(described.stdout.contains("template-failed"), "\(described.stdout)")
        #expect(described.stdout.contains("syntax error at line 3"), "\(described.stdout)")
        let templates = (try? FileManager.default.contentsOfDirectory(atPath: box.state + "/templates")) ?? []
        #expect(templates.isEmpty, "a failed template left files: \(templates)")
    }

    /// A pool that boots cold runs the same files, setup and ready in each VM: the same site
    /// on the same port, ready when apply returns.
    @Test func aColdPoolGetsTheSameVM() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        box.dir.write("site/index.html", "cold edition\n")
        box.dir.write("motd.txt", "cold\n")
        let applied = try box.run(["apply", "-f", box.write(pool("cold", size: 1, boot: "cold"))])
        #expect(applied.status == 0, "\(applied.stdout)\(applied.stderr)")
        let vms = try served(box, pool: "cold")
        #expect(vms.count == 1)
        for (vm, port) in vms {
            let body = (try? httpGet(port: port)) ?? ""
            #expect(body.contains("cold edition"), "\(vm) on 127.0.0.1:\(port): \(body)")
            #expect(try box.exec(vm, ["cat", "/etc/motd-copy"]).stdout == "cold\n")
        }
    }
}
