import Foundation
import Testing
import VmpoolSpec
import VmpoolTestSupport

/// What an operator types day to day, through the binary on the sim driver: the small
/// spellings and answers kubectl and terraform users expect.
@Suite("Operator commands and their small answers", .serialized)
struct OperatorTests {
    @Test func severalFilesAfterOneFlagAndDurationsWithSeveralUnits() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let a = box.write(pool("a", size: 2), as: "a.yaml")
        let b = box.write(pool("b", size: 1), as: "b.yaml")
        let applied = try box.run("apply", "-f", a, b, "--timeout", "1m30s")
        #expect(applied.status == 0, "\(applied.stderr)")
        #expect(applied.stdout.contains("Applied: 3 create; 0 failed."), "\(applied.stdout)")
        #expect(try box.vmStates() == ["running": 3])
        // A negative duration or an impossible parallelism: exit 1, a message naming the option.
        let negative = try box.run("apply", "-f", a, "--timeout", "-5s")
        #expect(negative.status == 1)
        #expect(negative.stderr.contains("--timeout") && negative.stderr.contains("cannot be negative"))
        let zero = try box.run("apply", "-f", a, "--parallel", "0")
        #expect(zero.status == 1)
        #expect(zero.stderr.contains("--parallel: expected 1 to 256, got 0"), "\(zero.stderr)")
    }

    @Test func aliasesUnknownPoolsAndIgnoreNotFound() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let a = box.write(pool("a", size: 2), as: "a.yaml")
        #expect(try box.run("apply", "-f", a).status == 0)
        let singular = try box.run("get", "vm")
        #expect(singular.status == 0 && singular.stdout.split(separator: "\n").count == 3, "\(singular.stdout)")
        let unknown = try box.run("get", "vms", "--pool", "nosuch")
        #expect(unknown.status == 1 && unknown.stderr.contains("no pool named \"nosuch\""), "\(unknown.stderr)")
        let strict = try box.run("delete", "nosuch")
        #expect(strict.status == 1 && strict.stderr.contains("no pool named \"nosuch\""), "\(strict.stderr)")
        let lenient = try box.run("delete", "nosuch", "--ignore-not-found")
        #expect(lenient.status == 0, "\(lenient.stderr)")
        #expect(lenient.stdout.contains("nosuch is not applied"), "\(lenient.stdout)")
        #expect(try box.vmStates() == ["running": 2], "deleting nothing deletes nothing")
    }

    @Test func dryRunPlanNotesAndAppliedCountsOnlySuccesses() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let a = box.write(pool("a", size: 1), as: "a.yaml")
        let b = box.write(pool("b", size: 1), as: "b.yaml")
        #expect(try box.run("apply", "-f", a, "-f", b).status == 0)
        let dry = try box.run("apply", "--dry-run", "-f", a, "-f", box.write(pool("b", size: 3), as: "b3.yaml"))
        #expect(dry.status == 0)
        #expect(dry.stdout.contains("Plan: 2 create") && dry.stdout.hasSuffix("Dry run: nothing was changed.\n"))
        #expect(try box.vmStates() == ["running": 2], "a dry run changes nothing")
        // plan names the applied pools the input leaves out.
        let partial = try box.run("plan", "-f", a)
        #expect(partial.stderr.contains("applied pools not in the input are left alone: b; --prune would delete them"))
        // Failed actions are not counted as applied.
        let c = box.write(pool("c", size: 2), as: "c.yaml")
        let failing = try box.run("apply", "-f", c, environment: ["VMPOOL_SIM_FAIL": "create:1"])
        #expect(failing.status == 1)
        #expect(failing.stdout.contains("Applied: nothing; 2 failed."), "\(failing.stdout)")
    }

    @Test func jsonOutputsAndJsonLogs() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let a = box.write(pool("a", size: 2), as: "a.yaml")
        let validated = try box.binary.run(["validate", "-f", a, "-o", "json"])
        let valid = try JSONSerialization.jsonObject(with: Data(validated.stdout.utf8)) as? [String: Any]
        #expect(valid?["valid"] as? Bool == true && valid?["pools"] as? [String] == ["a"], "\(validated.stdout)")
        let applied = try box.run("apply", "-f", a, "--log-format", "json", "--log-level", "info")
        #expect(applied.status == 0)
        let logLines = applied.stderr.split(separator: "\n").filter { !$0.isEmpty }
        #expect(!logLines.isEmpty)
        for line in logLines {
            let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
            #expect(object?["level"] != nil && object?["message"] != nil, "not a JSON log line: \(line)")
        }
        let reconciled = try box.run("reconcile", "-o", "json")
        #expect(reconciled.status == 0)
        let pass = try JSONSerialization.jsonObject(with: Data(reconciled.stdout.utf8)) as? [String: Any]
        #expect((pass?["actions"] as? [Any])?.isEmpty == true, "a no-op pass: \(reconciled.stdout)")
    }

    @Test func describeAndEventsTellAPoolsStory() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let a = box.write(pool("a", size: 2), as: "a.yaml")
        #expect(try box.run("apply", "-f", a).status == 0)
        let id = try #require(try box.json("get", "vms").first?["id"] as? String)
        let vm = try box.run("describe", "vm", id)
        #expect(vm.status == 0)
        #expect(vm.stdout.contains("ID:          \(id)") && vm.stdout.contains("State:       running"), "\(vm.stdout)")
        let pool = try box.binary.run(["describe", "pool", "a", "-o", "json", "--state-dir", box.state])
        let described = try JSONSerialization.jsonObject(with: Data(pool.stdout.utf8)) as? [String: Any]
        let kinds = (described?["events"] as? [[String: Any]])?.compactMap { $0["kind"] as? String } ?? []
        #expect(kinds.first == "applied" && kinds.filter { $0 == "created" }.count == 2, "\(kinds)")
        let missing = try box.run("describe", "vm", "a-000000")
        #expect(missing.status == 1 && missing.stderr.contains("a-000000"), "\(missing.stderr)")
        // events: oldest first, --pool filters, --since 1h keeps them, --since 0 keeps none older.
        let all = try box.json("events", "--pool", "a")
        #expect(all.count == 3 && all.first?["kind"] as? String == "applied", "\(all)")
        #expect(try box.json("events", "--pool", "a", "--since", "1h").count == 3)
        #expect(try box.json("events", "--pool", "nosuch").isEmpty)
    }

    /// The completion scripts are generated for bash, zsh and fish; bash's parses, and
    /// completes pool names and VM ids from the store the command line names.
    @Test func completionScriptsCompletePoolsAndVMsFromTheStore() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool("web", size: 2))).status == 0)
        for shell in ["bash", "zsh", "fish"] {
            let script = try box.binary.run(["--generate-completion-script", shell])
            #expect(script.status == 0 && script.stdout.contains("vmpool"), "\(shell): \(script.stderr)")
        }
        let bash = box.dir.write("vmpool.bash", try box.binary.run(["--generate-completion-script", "bash"]).stdout)
        let binDir = URL(fileURLWithPath: box.binary.path).deletingLastPathComponent().path
        func complete(_ words: [String]) throws -> [String] {
            let line = words.joined(separator: " ") + " "
            let script = """
                source '\(bash)'
                COMP_WORDS=(\(words.map { "'\($0)'" }.joined(separator: " ")) '')
                COMP_CWORD=\(words.count)
                COMP_LINE='\(line)'
                COMP_POINT=${#COMP_LINE}
                _vmpool
                printf '%s\\n' "${COMPREPLY[@]}"
                """
            let result = try RunningCommand(
                path: "/bin/bash", arguments: ["-c", script],
                environment: ["PATH": binDir + ":/usr/bin:/bin", "HOME": box.dir.path]
            ).wait()
            #expect(result.status == 0, "\(result.stderr)")
            return result.stdout.split(separator: "\n").map(String.init).sorted()
        }
        #expect(try RunningCommand(path: "/bin/bash", arguments: ["-n", bash], environment: [:]).wait().status == 0)
        #expect(try complete(["vmpool", "delete", "--state-dir", box.state]) == ["web"])
        let ids = try box.json("get", "vms").compactMap { $0["id"] as? String }.sorted()
        #expect(try complete(["vmpool", "describe", "vm", "--state-dir", box.state]) == ids)
        // A state dir that is not there completes nothing, and is not created.
        #expect(try complete(["vmpool", "delete", "--state-dir", box.dir.path + "/none"]).isEmpty)
        #expect(!FileManager.default.fileExists(atPath: box.dir.path + "/none"))
    }

    /// A sim seed fails the same actions at any --parallel: what fails depends on the seed
    /// and the action, never on the order actions ran in.
    @Test func aSimSeedFailsTheSameActionsAtAnyParallelism() throws {
        var failed: [Set<String>] = []
        for parallel in ["1", "8"] {
            let box = Sandbox()
            defer { box.dir.remove() }
            let file = box.write(pool("f", size: 12))
            let result = try box.run(
                "apply", "-f", file, "--parallel", parallel,
                environment: ["VMPOOL_SIM_FAIL": "create:0.4", "VMPOOL_SIM_SEED": "42"])
            #expect(result.status == 1, "\(result.stdout)")
            let slots = result.stdout.split(separator: "\n").filter { $0.contains("[failed") }.compactMap { line in
                line.range(of: #"VM \d+ of 12 "#, options: .regularExpression).map { String(line[$0]) }
            }
            failed.append(Set(slots))
        }
        #expect(!failed[0].isEmpty && failed[0].count < 12, "\(failed[0])")
        #expect(failed[0] == failed[1], "--parallel 1 failed \(failed[0].sorted()), --parallel 8 \(failed[1].sorted())")
    }

    /// On a terminal an apply shows one live line (done/total, elapsed) rewritten in place; on
    /// a pipe there is no such line, only one line per finished action.
    @Test func aTerminalGetsOneLiveProgressLineAPipeGetsNone() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let file = box.write(pool("p", size: 6))
        let command = "exec '\(box.binary.path)' apply -f '\(file)' --state-dir '\(box.state)' --parallel 2"
        let terminal = try RunningCommand(
            path: "/usr/bin/script", arguments: ["-qec", command, "/dev/null"],
            environment: ["VMPOOL_DRIVER": "sim", "VMPOOL_SIM_LATENCY": "50ms", "PATH": "/usr/bin:/bin"]
        ).wait()
        #expect(terminal.status == 0, "\(terminal.stdout)")
        #expect(terminal.stdout.contains("\r\u{1B}[Kapply: 1/6 done"), "\(terminal.stdout.debugDescription)")
        #expect(terminal.stdout.contains("\r\u{1B}[Kapply: 6/6 done"), "\(terminal.stdout.debugDescription)")
        let piped = try box.run(
            "apply", "-f", box.write(pool("p", size: 8)), environment: ["VMPOOL_SIM_LATENCY": "50ms"])
        #expect(piped.status == 0)
        #expect(!piped.stderr.contains("\r") && !piped.stdout.contains("\r"), "\(piped.stderr.debugDescription)")
        #expect(piped.stdoutLines.filter { $0.contains("[ok]") }.count == 2, "\(piped.stdout)")
    }

    /// `events --follow` prints what was there, then each new event once as it comes.
    @Test func eventsFollowPrintsEachEventOnce() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool("f", size: 1))).status == 0)
        let following = try box.binary.start(["events", "--follow", "--state-dir", box.state])
        func printed(_ kind: String) -> Int {
            let text = (try? String(contentsOfFile: following.outPath, encoding: .utf8)) ?? ""
            return text.split(separator: "\n").filter { $0.contains(" \(kind) ") }.count
        }
        // What was there is printed first; then the new apply's events as they come.
        #expect(eventually { printed("created") == 1 }, "the existing events were not printed")
        #expect(try box.run("apply", "-f", box.write(pool("f", size: 2))).status == 0)
        #expect(eventually { printed("applied") >= 2 && printed("created") >= 2 }, "the new events were not printed")
        following.kill(SIGTERM)
        let lines = following.wait().stdoutLines
        #expect(lines.filter { $0.hasPrefix("TIME") }.count == 1, "\(lines)")
        #expect(lines.filter { $0.contains(" applied ") }.count == 2, "\(lines)")
        #expect(lines.filter { $0.contains(" created ") }.count == 2, "\(lines)")
    }
}
