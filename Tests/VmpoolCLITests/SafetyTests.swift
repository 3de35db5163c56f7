import Foundation
import Testing
import VmpoolDriver
import VmpoolSim
import VmpoolSpec
import VmpoolTestSupport

/// Inputs that must never cost a user their VMs, and status that must not mislead.
@Suite("Safety of inputs and status", .serialized)
struct SafetyTests {
    func appliedPool(_ box: Sandbox, size: Int = 3) throws -> String {
        let file = box.write(pool("keep", size: size))
        let result = try box.run("apply", "-f", file)
        #expect(result.status == 0, "\(result.stderr)")
        return file
    }

    @Test func pruneWithAnEmptyInputIsRefusedAndDeletesNothing() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        _ = try appliedPool(box)
        let empty = box.dir.path + "/empty"
        try FileManager.default.createDirectory(atPath: empty, withIntermediateDirectories: true)
        let emptyFile = box.dir.write("empty.yaml", "")
        let commentOnly = box.dir.write("comment.yaml", "# nothing here\n---\n")
        for input in [empty, emptyFile, commentOnly] {
            for command in ["apply", "plan"] {
                let result = try box.run(command, "-f", input, "--prune")
                #expect(result.status == 1, "\(command) -f \(input) --prune: \(result.stdout)")
                #expect(result.stderr.contains("--allow-empty"), "\(result.stderr)")
            }
        }
        let stdin = try box.binary.run(["apply", "-f", "-", "--prune", "--state-dir", box.state], input: "")
        #expect(stdin.status == 1)
        #expect(try box.vmStates() == ["running": 3], "an empty input must not stop any VM")
        // Said out loud, it is allowed.
        let allowed = try box.run("apply", "-f", empty, "--prune", "--allow-empty")
        #expect(allowed.status == 0, "\(allowed.stderr)")
        #expect(try box.json("get", "pools").isEmpty)
    }

    @Test func aMissingPathIsAnErrorNeverAnEmptyInput() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        _ = try appliedPool(box)
        let result = try box.run("apply", "-f", box.dir.path + "/typo", "--prune")
        #expect(result.status == 1)
        #expect(result.stderr.contains("typo:1:1: (file): no such file or directory"), "\(result.stderr)")
        #expect(try box.vmStates() == ["running": 3])
    }

    @Test func anUnreadableDirectoryIsAnError() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let locked = box.dir.path + "/locked"
        try FileManager.default.createDirectory(atPath: locked, withIntermediateDirectories: true)
        _ = box.dir.write("locked/pool.yaml", manifest(pool("hidden")))
        chmod(locked, 0o000)
        defer { chmod(locked, 0o755) }
        // root reads any directory; run as nobody so the permission really is missing.
        var command = [box.binary.path, "validate", "-f", locked]
        if geteuid() == 0 {
            chmod(box.dir.path, 0o755)
            command = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + command
        }
        let run = try RunningCommand(
            path: command[0], arguments: Array(command.dropFirst()), environment: box.binary.environment
        ).wait()
        #expect(run.status == 1, "\(run.stdout)")
        #expect(
            run.stderr.contains("locked:1:1: (file): cannot read the directory: Permission denied"), "\(run.stderr)")
        #expect(!run.stdout.contains("0 pools valid"))
    }

    @Test func standardInputIsAManifest() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let result = try box.binary.run(["validate", "-f", "-"], input: manifest(pool("piped")))
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.contains("1 pool valid: piped"))
        let bad = try box.binary.run(
            ["validate", "-f", "-"],
            input: "apiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: x}\nspec: {size: -1, vcpus: 1, memory: 128Mi}\n"
        )
        #expect(bad.status == 1)
        #expect(bad.stderr.contains("<stdin>:4:14: spec.size"), "\(bad.stderr)")
    }

    @Test func everySpellingOfTheStateDirNamesTheSameVMs() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let file = try appliedPool(box)
        let link = box.dir.path + "/link"
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: box.state)
        let relative = String(box.state.dropFirst(FileManager.default.currentDirectoryPath.count + 1))
        let spellings =
            [
                box.state + "/", box.dir.path + "//state", box.dir.path + "/./state", link,
            ] + (box.state.hasPrefix(FileManager.default.currentDirectoryPath + "/") ? [relative] : [])
        for spelling in spellings {
            let plan = try box.binary.run(["plan", "-f", file, "--state-dir", spelling, "--detailed-exitcode"])
            #expect(plan.status == 0, "state dir spelled \(spelling): \(plan.stdout)")
            let reconcile = try box.binary.run(["reconcile", "--state-dir", spelling])
            #expect(reconcile.stdout.contains("No changes"), "state dir spelled \(spelling): \(reconcile.stdout)")
        }
        #expect(try box.vmStates() == ["running": 3])
    }

    @Test func observersNeverCreateAStateDir() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        for command in [["get", "pools"], ["get", "vms"]] {
            let result = try box.binary.run(command + ["--state-dir", box.state])
            #expect(result.status == 1)
            #expect(result.stderr.contains("does not exist"), "\(result.stderr)")
        }
        #expect(!FileManager.default.fileExists(atPath: box.state))
    }

    @Test func badEnvironmentVariablesAreErrorsThatNameThem() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        for (name, value) in [("VMPOOL_STANDBY", "lots"), ("VMPOOL_ACCEL", "fast"), ("VMPOOL_TCG_CACHE_MIB", "0")] {
            let result = try box.run("get", "pools", environment: [name: value])
            #expect(result.status == 1)
            #expect(result.stderr.contains(name), "\(name)=\(value): \(result.stderr)")
        }
    }

    @Test func aTemplatePoolOfNoVMsBuildsNothing() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let file = box.write(pool("later", size: 0, boot: .template))
        let result = try box.run("apply", "-f", file, "-o", "json")
        #expect(result.status == 0, "\(result.stderr)")
        let document = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any]
        #expect((document?["actions"] as? [Any])?.isEmpty == true, "\(result.stdout)")
        #expect(try box.json("get", "pools").first?["standbys"] as? Int == 0)
    }

    @Test func switchingToColdBootPlansTheTemplatesRemoval() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let template = box.write(pool("web", size: 2, boot: .template))
        #expect(try box.run("apply", "-f", template).status == 0)
        #expect(try box.json("get", "pools").first?["standbys"] as? Int == 2)
        let cold = box.write(pool("web", size: 2, boot: .cold))
        let plan = try box.plan(cold)
        #expect(plan.status == 2, "switching to cold boot is a change")
        #expect(plan.counts == ["delete-template": 1])
        #expect(try box.run("apply", "-f", cold).status == 0)
        #expect(try box.plan(cold).status == 0)
        #expect(try box.json("get", "pools").first?["standbys"] as? Int == 0)
    }

    @Test func aVMPausedBehindOurBackShowsPaused() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        _ = try appliedPool(box, size: 2)
        let sim = try SimDriver(stateDirectory: box.state)
        let ids = try box.json("get", "vms").compactMap { $0["id"] as? String }
        try sim.simulateExternalPause(ids[0])
        #expect(try box.vmStates() == ["running": 1, "paused": 1])
        let pools = try box.json("get", "pools")
        #expect(pools.first?["ready"] as? Int == 1, "a paused VM of a running pool is not ready")
    }

    @Test func aDuplicateNameIsReportedWhereTheNameIs() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let text = manifest(pool("twin")) + "---\n" + manifest(pool("twin"))
        let file = box.dir.write("twins.yaml", text)
        let result = try box.run("validate", "-f", file)
        #expect(result.status == 1)
        let line = text.split(separator: "\n", omittingEmptySubsequences: false).enumerated()
            .filter { $0.element.contains("name: twin") }.map { $0.offset + 1 }.last!
        #expect(
            result.stderr.contains("twins.yaml:\(line):9: metadata.name: pool \"twin\" is already defined"),
            "\(result.stderr)")
    }

    @Test func anAliasIntoAnotherDocumentIsAnError() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let file = box.dir.write(
            "alias.yaml",
            manifest(pool("a", size: 1)).replacingOccurrences(of: "  size: 1", with: "  size: &n 1")
                + "---\n" + manifest(pool("b", size: 1)).replacingOccurrences(of: "  size: 1", with: "  size: *n"))
        let result = try box.run("validate", "-f", file)
        #expect(result.status == 1, "\(result.stdout)")
        #expect(result.stderr.contains("alias *n has no anchor earlier in this document"), "\(result.stderr)")
    }

    @Test func validateChecksImageFilesAtTheirField() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        var imagePool = pool("img")
        imagePool.image = ImageSpec(kernel: "/nonexistent/vmlinuz")
        let file = box.dir.write("img.yaml", manifest(imagePool))
        let result = try box.run("validate", "-f", file)
        #expect(result.status == 1)
        let line =
            try #require(
                manifest(imagePool).split(separator: "\n").firstIndex { $0.contains("kernel:") }) + 1
        #expect(
            result.stderr.contains("img.yaml:\(line):13: spec.image.kernel: file /nonexistent/vmlinuz does not exist"),
            "\(result.stderr)")
    }

    /// Disk images that cannot be a VM's disk are located errors at validate, plan and apply,
    /// and nothing is recorded or started: missing, a directory, another format, a raw file
    /// that is no whole number of sectors, a size smaller than the image, a name used twice,
    /// and a file the user cannot read.
    @Test func badDiskImagesAreLocatedErrorsAndChangeNothing() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        chmod(box.dir.path, 0o755)
        let root = box.dir.path
        FileManager.default.createFile(atPath: root + "/four.raw", contents: Data(count: 4 << 20))
        FileManager.default.createFile(atPath: root + "/odd.raw", contents: Data(count: 1000))
        FileManager.default.createFile(atPath: root + "/old.vmdk", contents: Data("KDMV".utf8) + Data(count: 2044))
        FileManager.default.createFile(atPath: root + "/secret.raw", contents: Data(count: 1 << 20))
        chmod(root + "/secret.raw", 0o600)
        try FileManager.default.createDirectory(atPath: root + "/adir", withIntermediateDirectories: true)
        let cases: [(disks: String, at: String, says: String)] = [
            ("{name: a, image: \(root)/missing.raw}", "8:28: spec.disks[0].image", "does not exist"),
            ("{name: a, image: \(root)/adir}", "8:28: spec.disks[0].image", "is not a regular file"),
            (
                "{name: a, image: \(root)/old.vmdk}", "8:28: spec.disks[0].image",
                "is a vmdk image; expected qcow2 or raw"
            ),
            ("{name: a, image: \(root)/odd.raw}", "8:28: spec.disks[0].image", "neither qcow2 nor a raw disk image"),
            (
                "{name: a, image: \(root)/four.raw, size: 2Mi}", "8:",
                "spec.disks[0].size: 2Mi is smaller than the image"
            ),
            (
                "{name: a, image: \(root)/four.raw}, {name: a, size: 1Mi}", "8:",
                "spec.disks[1].name: disk \"a\" is already"
            ),
        ]
        func manifest(_ disks: String) -> String {
            "apiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: d}\nspec:\n  size: 1\n  vcpus: 1\n  memory: 64Mi\n"
                + "  disks: [\(disks)]\n"
        }
        for (disks, at, says) in cases {
            let file = box.dir.write("disks.yaml", manifest(disks))
            for command in ["validate", "plan", "apply"] {
                let result = try box.run(command, "-f", file)
                #expect(result.status == 1, "\(command) \(disks): exit \(result.status)")
                #expect(
                    result.stderr.contains("disks.yaml:\(at)") && result.stderr.contains(says),
                    "\(command) \(disks): \(result.stderr)")
            }
        }
        // A file this user cannot read: root runs it as nobody (root reads every file), other
        // users have the file's read bit taken away; the manifest comes on standard input.
        let validate = [box.binary.path, "validate", "-f", "-"]
        let asNobody = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + validate
        if geteuid() != 0 { chmod(root + "/secret.raw", 0) }
        let argv = geteuid() == 0 ? asNobody : validate
        let unreadable = try RunningCommand(
            path: argv[0], arguments: Array(argv.dropFirst()),
            environment: box.binary.environment, input: manifest("{name: a, image: \(root)/secret.raw}")
        ).wait()
        #expect(unreadable.status == 1)
        #expect(
            unreadable.stderr.contains("<stdin>:8:28: spec.disks[0].image: file \(root)/secret.raw is not readable"),
            "\(unreadable.stderr)")
        #expect(try access(box.state, F_OK) != 0 || box.json("get", "pools").isEmpty, "a pool was recorded")
    }

    /// A store that cannot be used is one clear error, exit 1, and changes nothing; the
    /// password in a store URL appears in no output, debug logs included.
    @Test func aStoreThatCannotBeUsedIsOneErrorAndChangesNothing() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let file = box.write(pool("web", size: 2))
        let secret = "s3cr3t-Pa55"
        let cases: [(arguments: [String], environment: [String: String], says: String)] = [
            (
                ["--store", "postgress://vmpool@127.0.0.1/x"], [:],
                "--store: store postgress://vmpool@127.0.0.1/x is neither"
            ),
            (
                ["--store", "postgres://vmpool:\(secret)@127.0.0.1:1/vmpool"], [:],
                "cannot reach the store postgres://vmpool@127.0.0.1:1/vmpool: Connection refused"
            ),
            (
                [], ["VMPOOL_STORE": "postgres://vmpool:\(secret)@127.0.0.1:notaport/vmpool"],
                "VMPOOL_STORE: "
            ),
            (["--store", "postgres://vmpool@127.0.0.1:1/vmpool?sslmode=maybe"], [:], "sslmode"),
        ]
        for (arguments, environment, says) in cases {
            for command in [["apply", "-f", file], ["get", "vms"], ["get", "hosts"], ["delete", "web"]] {
                let result = try box.binary.run(
                    command + arguments + ["--state-dir", box.state, "--log-level", "debug"], environment: environment)
                let output = result.stdout + result.stderr
                #expect(result.status == 1, "\(command) \(arguments): \(output)")
                #expect(result.stderr.contains(says), "\(command) \(arguments): \(result.stderr)")
                #expect(!output.contains(secret), "the password leaked: \(output)")
                #expect(
                    result.stderr.split(separator: "\n").filter { $0.hasPrefix("Error:") }.count == 1,
                    "one error: \(result.stderr)")
            }
        }
        #expect(!FileManager.default.fileExists(atPath: box.state), "nothing was created")
    }

    /// A plan made while an apply holds the state dir says so, and neither waits for the apply
    /// nor disturbs it.
    @Test func aPlanDuringAnApplySaysSoAndDisturbsNothing() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let file = box.write(pool("slow", size: 6))
        let applying = try box.binary.start(
            ["apply", "-f", file, "--parallel", "1", "--state-dir", box.state],
            environment: ["VMPOOL_SIM_LATENCY": "400ms"])
        // The apply holds the lock once its holder record is in the lock file.
        let held = eventually(timeout: .seconds(20)) {
            (try? String(contentsOfFile: box.state + "/lock", encoding: .utf8))?.contains("apply") == true
        }
        #expect(held, "the apply never took the lock")
        let planned = try box.run("plan", "-f", file)
        let planEnded = Date()
        let applied = applying.wait()
        #expect(planned.status == 0, "\(planned.stderr)")
        #expect(planned.stderr.contains("is working on this state dir"), "\(planned.stderr)")
        #expect(applied.status == 0, "\(applied.stdout)\(applied.stderr)")
        #expect(try box.vmStates() == ["running": 6])
        // The plan did not wait for the lock: the apply created its last VM after the plan ended.
        let created = try box.json("events").filter { $0["kind"] as? String == "created" }
        let last = try #require(created.last?["time"] as? String)
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        let lastCreated = try #require(formatter.date(from: last))
        #expect(lastCreated > planEnded, "the plan ended at \(planEnded), after the apply's last VM (\(last))")
    }
}
