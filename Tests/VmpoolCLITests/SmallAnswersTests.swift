import Foundation
import Testing
import VmpoolDriver
import VmpoolSpec
import VmpoolStore
import VmpoolTestSupport

@testable import VmpoolCLI

/// Answers at the edges of the commands, through the binary on the sim driver: what an
/// empty input, a bad option, a single host or a log line says, and that it says it where a
/// script looks.
@Suite("Small answers at the edges", .serialized)
struct SmallAnswersTests {
    @Test func validateJsonPrintsTheErrorsOnStdoutToo() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let bad = box.dir.write(
            "bad.yaml",
            """
            apiVersion: vmpool/v1
            kind: Pool
            metadata:
              name: ci
            spec:
              size: 1
              vcpus: two
              memory: 12
            """)
        let result = try box.binary.run(["validate", "-f", bad, "-o", "json"])
        #expect(result.status == 1)
        let document = try #require(
            try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any],
            "stdout: \(result.stdout)")
        #expect(document["valid"] as? Bool == false)
        #expect(document["pools"] as? [String] == [])
        let errors = document["errors"] as? [[String: Any]] ?? []
        #expect(errors.count == 2, "\(errors)")
        let vcpus = try #require(errors.first { $0["field"] as? String == "spec.vcpus" }, "\(errors)")
        #expect(vcpus["file"] as? String == bad)
        #expect(vcpus["line"] as? Int == 7 && vcpus["column"] as? Int == 10)
        #expect(vcpus["message"] as? String == #"expected an integer from 1 to 64, got "two""#)
        #expect(vcpus["code"] as? String == "wrongType" || vcpus["code"] as? String == "outOfRange")
        // The diagnostics still go to stderr for people.
        #expect(result.stderr.contains(bad + #":7:10: spec.vcpus:"#), "\(result.stderr)")

        // A valid input keeps its shape, and says it has no errors.
        let good = box.write(pool("a", size: 1), as: "good.yaml")
        let valid = try box.binary.run(["validate", "-f", good, "-o", "json"])
        #expect(valid.status == 0, "\(valid.stderr)")
        let ok = try JSONSerialization.jsonObject(with: Data(valid.stdout.utf8)) as? [String: Any]
        #expect(ok?["valid"] as? Bool == true && ok?["pools"] as? [String] == ["a"], "\(valid.stdout)")
        #expect((ok?["errors"] as? [Any])?.isEmpty == true, "\(valid.stdout)")
    }

    @Test func anInputWithNoPoolsIsRefusedByValidateAndApply() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let file = box.write(pool("a", size: 2))
        #expect(try box.run("apply", "-f", file).status == 0)
        let empty = box.dir.path + "/empty"
        try FileManager.default.createDirectory(atPath: empty, withIntermediateDirectories: true)

        let validated = try box.binary.run(["validate", "-f", empty])
        #expect(validated.status == 1, "\(validated.stdout)")
        #expect(validated.stdout.isEmpty, "\(validated.stdout)")
        #expect(validated.stderr.contains("nothing to validate: \(empty)"), "\(validated.stderr)")
        let json = try box.binary.run(["validate", "-f", empty, "-o", "json"])
        #expect(json.status == 1)
        let document = try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any]
        #expect(document?["valid"] as? Bool == false, "\(json.stdout)")
        #expect((document?["errors"] as? [Any])?.count == 1, "\(json.stdout)")
        // An empty file was read: a valid stream of no documents, as the JSON Schema judges it.
        let blank = try box.binary.run(["validate", "-f", box.dir.write("blank.yaml", "")])
        #expect(blank.status == 0 && blank.stdout == "0 pools valid: the input holds no Pool document\n")

        for input in [empty, "-"] {
            let applied = try box.binary.run(["apply", "-f", input, "--state-dir", box.state], input: "")
            #expect(applied.status == 1, "apply -f \(input): \(applied.stdout)")
            #expect(applied.stderr.contains("no pools passed to apply"), "\(applied.stderr)")
            #expect(!applied.stdout.contains("No changes"), "\(applied.stdout)")
        }
        #expect(try box.vmStates() == ["running": 2], "a refused empty apply changes nothing")
    }

    @Test func getHostsOnTheDefaultStoreListsThisHost() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool("a", size: 2))).status == 0)
        let text = try box.run("get", "hosts")
        #expect(text.status == 0, "\(text.stderr)")
        #expect(text.stdoutLines.count == 2 && text.stdoutLines.first?.hasPrefix("NAME") == true, "\(text.stdout)")
        let hosts = try box.json("get", "hosts")
        #expect(hosts.count == 1, "\(hosts)")
        #expect(hosts.first?["vms"] as? Int == 2)
        #expect(hosts.first?["state"] as? String == "ready")
        #expect(((hosts.first?["used"] as? [String: Any])?["vcpus"] as? Int) == 2)
        let machine = hosts.first?["capacity"] as? [String: Any]
        #expect(machine?["vcpus"] as? Int == ProcessInfo.processInfo.activeProcessorCount, "\(hosts)")
        #expect(hosts.first?["name"] as? String == ProcessInfo.processInfo.hostName, "\(hosts)")
        // The name and the capacity it is given, as a shared store's host would declare them.
        let declaring = ["VMPOOL_HOST": "box-1", "VMPOOL_CAPACITY": "vcpus=3,memory=2Gi"]
        let declared = try box.run("get", "hosts", "-o", "json", environment: declaring)
        let host = try JSONSerialization.jsonObject(with: Data(declared.stdout.utf8)) as? [[String: Any]]
        #expect(host?.first?["name"] as? String == "box-1", "\(declared.stdout)\(declared.stderr)")
        let capacity = host?.first?["capacity"] as? [String: Any]
        #expect(capacity?["vcpus"] as? Int == 3 && capacity?["memoryMiB"] as? Int == 2048, "\(declared.stdout)")
    }

    @Test func execUsageErrorsAreVmpoolsOwnFailure125() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool("a", size: 1))).status == 0)
        let vm = try #require(try box.json("get", "vms").first?["id"] as? String)
        for arguments in [
            ["exec", vm, "-e", "=x", "--", "true"], ["exec", vm], ["exec", vm, "--bogus", "--", "true"],
        ] {
            let result = try box.binary.run(arguments + ["--state-dir", box.state])
            #expect(result.status == 125, "\(arguments): exit \(result.status) \(result.stderr)")
            #expect(!result.stderr.isEmpty)
        }
        #expect(try box.binary.run(["exec", "--help"]).status == 0)
        // Other commands keep 1 for a usage error.
        #expect(try box.binary.run(["get", "vms", "--bogus"]).status == 1)
    }

    @Test func runOnTheSimDriverAndItsUsageErrorsAre125AndLeaseNothing() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool("a", size: 1))).status == 0)
        let leased = { try box.json("get", "vms").filter { $0["lease"] is [String: Any] } }
        for arguments in [
            ["run", "a", "-e", "=x", "--", "true"], ["run", "a"], ["run", "a", "--in", "nocolon", "--", "true"],
            ["run", "a", "--out", ":/tmp/x", "--", "true"], ["run", "a", "--bogus", "--", "true"],
            ["run", "a", "--in", box.dir.path + "/absent:/x", "--", "true"],
        ] {
            let result = try box.binary.run(arguments + ["--state-dir", box.state])
            #expect(result.status == 125, "\(arguments): exit \(result.status) \(result.stderr)")
            #expect(!result.stderr.isEmpty)
        }
        let sim = try box.run("run", "a", "-o", "json", "--", "true")
        #expect(sim.status == 125, "exit \(sim.status) \(sim.stderr)")
        #expect(sim.stderr.contains("runs no guests; this needs --driver qemu"), "\(sim.stderr)")
        let report = try JSONSerialization.jsonObject(with: Data(sim.stdout.utf8)) as? [String: Any]
        #expect(report?["exitStatus"] as? Int == 125 && report?["id"] is NSNull, "\(sim.stdout)")
        #expect(try leased().isEmpty, "a refused run leased a VM")
        #expect(try box.binary.run(["run", "--help"]).status == 0)
    }

    @Test func anEmptyLogOfACloneSaysItsBootWasTheTemplates() {
        let shape = VMShape(pool: pool("t", size: 1, boot: .template), image: testImage)
        let clone = VMRecord(
            id: "t-000001", pool: "t", state: .running, boot: .template, shape: shape, templateID: "t-tmpl-000001",
            createdAt: Date())
        let hint = Vmpool.Logs.emptyCloneHint(clone, templateLogKept: true)
        #expect(
            hint
                == "vmpool logs: VM t-000001 was cloned from template t-tmpl-000001 and has printed nothing since;"
                + " its boot output is the template's: vmpool logs t-tmpl-000001")
        let replaced = Vmpool.Logs.emptyCloneHint(clone, templateLogKept: false)
        #expect(replaced?.contains("has been replaced since") == true, "\(replaced ?? "nil")")
        #expect(replaced?.contains("vmpool logs t-tmpl") == false, "no pointer to a log that is gone")
        let cold = VMRecord(id: "c-000001", pool: "c", state: .running, boot: .cold, shape: shape, createdAt: Date())
        #expect(Vmpool.Logs.emptyCloneHint(cold, templateLogKept: true) == nil, "a VM that booted itself needs no hint")
    }

    @Test func logsOfATemplateIdIsTheTemplatesBootNotAnUnknownVM() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool("t", size: 1, boot: .template))).status == 0)
        let described = try box.binary.run(["describe", "pool", "t", "-o", "json", "--state-dir", box.state])
        let object = try JSONSerialization.jsonObject(with: Data(described.stdout.utf8)) as? [String: Any]
        let template = try #require(
            (object?["templates"] as? [[String: Any]])?.first?["id"] as? String, "\(described.stdout)")
        // The sim driver runs no guests: logs says so for a template as for a VM.
        let logs = try box.run("logs", template)
        #expect(logs.status == 1, "\(logs.stderr)")
        #expect(logs.stderr.contains("runs no guests"), "\(logs.stderr)")
        #expect(!logs.stderr.contains("no VM named"), "a template's id is known: \(logs.stderr)")
        let unknown = try box.run("logs", "t-nosuch")
        #expect(unknown.status == 1 && unknown.stderr.contains("no VM named \"t-nosuch\""), "\(unknown.stderr)")
    }

    @Test func aBadLogLevelOrFormatFromTheEnvironmentNamesTheVariable() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let loud = try box.run("get", "pools", environment: ["VMPOOL_LOG_LEVEL": "loud"])
        #expect(loud.status == 1)
        #expect(loud.stderr.contains(#"VMPOOL_LOG_LEVEL: expected one of"#), "\(loud.stderr)")
        #expect(!loud.stderr.contains("--log-level:"), "\(loud.stderr)")
        let flag = try box.run("get", "pools", "--log-level", "loud")
        #expect(flag.status == 1 && flag.stderr.contains("--log-level: expected one of"), "\(flag.stderr)")
        let format = try box.run("get", "pools", environment: ["VMPOOL_LOG_FORMAT": "xml"])
        #expect(format.status == 1 && format.stderr.contains("VMPOOL_LOG_FORMAT: expected text or json"))
    }

    @Test func deleteTakesATimeoutAsTheReadmeSays() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool("a", size: 2))).status == 0)
        let deleted = try box.run("delete", "a", "--timeout", "30s")
        #expect(deleted.status == 0, "\(deleted.stderr)")
        #expect(try box.json("get", "pools").isEmpty)
        let negative = try box.run("delete", "a", "--timeout", "-1s")
        #expect(negative.status == 1 && negative.stderr.contains("--timeout"), "\(negative.stderr)")
    }

    @Test func jsonLogLinesGiveDurationsAsNumbers() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let applied = try box.run(
            "apply", "-f", box.write(pool("a", size: 2)), "--log-format", "json", "--log-level", "info")
        #expect(applied.status == 0, "\(applied.stderr)")
        let timed = applied.stderrLines.compactMap {
            (try? JSONSerialization.jsonObject(with: Data($0.utf8))) as? [String: Any]
        }.filter { $0["took_ms"] != nil }
        #expect(timed.count == 2, "\(applied.stderr)")
        for line in timed {
            #expect(line["took_ms"] is NSNumber && !(line["took_ms"] is String), "\(line)")
        }
    }

    @Test func describePoolShowsWhenTheTemplateWasSaved() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let file = box.write(pool("t", size: 1, boot: .template))
        #expect(try box.run("apply", "-f", file, environment: ["VMPOOL_SIM_LATENCY": "400ms"]).status == 0)
        let described = try box.binary.run(["describe", "pool", "t", "-o", "json", "--state-dir", box.state])
        let object = try JSONSerialization.jsonObject(with: Data(described.stdout.utf8)) as? [String: Any]
        let template = try #require((object?["templates"] as? [[String: Any]])?.first, "\(described.stdout)")
        let started = try #require(LeaseTests.date(template["startedAt"]), "\(template)")
        let saved = try #require(LeaseTests.date(template["savedAt"]), "\(template)")
        #expect(saved.timeIntervalSince(started) >= 0.35, "the build took 400 ms: \(template)")
        let events = try box.json("events", "--pool", "t")
        let built = try #require(events.first { $0["kind"] as? String == "template-built" }, "\(events)")
        let eventTime = try #require(LeaseTests.date(built["time"]))
        #expect(abs(eventTime.timeIntervalSince(saved)) < 0.2, "saved \(saved), event \(eventTime)")
        let text = try box.run("describe", "pool", "t")
        #expect(text.stdout.contains("saved \(template["savedAt"] as? String ?? "?")"), "\(text.stdout)")
    }

    @Test func planNotesPoolsThatWantMoreThanTheHostHas() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let small = ["VMPOOL_CAPACITY": "vcpus=2,memory=4Gi"]
        // Within the host: no note.
        let fits = box.write(pool("a", size: 2), as: "fits.yaml")
        let quiet = try box.run("plan", "-f", fits, environment: small)
        #expect(quiet.status == 0 && !quiet.stderr.contains("want more"), "\(quiet.stderr)")
        // The new user's pool: 1000 VMs and 1000 warm ones, 64 vCPUs and 9999Gi each.
        let huge = box.dir.write(
            "huge.yaml",
            """
            apiVersion: vmpool/v1
            kind: Pool
            metadata: {name: huge}
            spec: {size: 1000, warm: 1000, vcpus: 64, memory: 9999Gi}
            """)
        let planned = try box.run("plan", "-f", huge, environment: small)
        #expect(planned.status == 0, "a note, not a refusal: \(planned.stderr)")
        #expect(
            planned.stderr.contains(
                "note: the pools' 2000 VMs want more than this host has: 128000 vCPUs on 2 CPUs,"
                    + " 19529.3 TiB of memory on 4 GiB (VMPOOL_CAPACITY)"), "\(planned.stderr)")
        #expect(planned.stdout.contains("VM 2000 of 2000"), "the plan itself is printed: \(planned.stdout)")
        // Only what is short is named, and the pools already applied count too: 2 + 3 VMs of
        // 1 vCPU fit on 5 CPUs, 5 x 1Gi do not fit in 4Gi.
        #expect(try box.run("apply", "-f", box.write(pool("a", size: 2, memoryMiB: 1024), as: "a.yaml")).status == 0)
        let more = box.write(pool("b", size: 3, memoryMiB: 1024), as: "b.yaml")
        let memory = try box.run("plan", "-f", more, environment: ["VMPOOL_CAPACITY": "vcpus=5,memory=4Gi"])
        #expect(
            memory.stderr.contains("note: the pools' 5 VMs want more than this host has: 5 GiB of memory on 4 GiB"),
            "\(memory.stderr)")
        #expect(!memory.stderr.contains("vCPUs on"), "\(memory.stderr)")
        // apply goes ahead, and says so too; a pruned pool no longer counts.
        let applied = try box.run("apply", "-f", more, environment: ["VMPOOL_CAPACITY": "vcpus=5,memory=4Gi"])
        #expect(applied.status == 0 && applied.stderr.contains("want more than this host has"), "\(applied.stderr)")
        let pruned = try box.run("plan", "-f", more, "--prune", environment: ["VMPOOL_CAPACITY": "vcpus=5,memory=4Gi"])
        #expect(!pruned.stderr.contains("want more"), "\(pruned.stderr)")
        // The machine's own capacity is named as such.
        let machine = try box.run("plan", "-f", huge)
        #expect(machine.stderr.contains("(the machine's; VMPOOL_CAPACITY declares another)"), "\(machine.stderr)")
    }

    @Test func hostDemandCountsEveryVMAndNamesOnlyWhatIsShort() {
        let demand = HostDemand([pool("a", size: 2, vcpus: 2, memoryMiB: 512, warm: 1), pool("b", size: 1)])
        #expect(demand.vms == 4 && demand.vcpus == 7 && demand.memoryMiB == 1792, "\(demand)")
        #expect(demand.overcommitNote(HostCapacity(vcpus: 7, memoryMiB: 1792), configured: true) == nil)
        let note = demand.overcommitNote(HostCapacity(vcpus: 6, memoryMiB: 4096), configured: true)
        #expect(note?.contains("7 vCPUs on 6 CPUs (VMPOOL_CAPACITY)") == true, "\(note ?? "nil")")
        #expect(HostDemand.size(512) == "512 MiB" && HostDemand.size(1024) == "1 GiB")
        #expect(HostDemand.size(23_995) == "23.4 GiB" && HostDemand.size(3 * 1024 * 1024) == "3 TiB")
    }
}
