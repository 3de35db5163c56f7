import Foundation
import Testing
import VmpoolSim
import VmpoolSpec
import VmpoolTestSupport

@Suite("vmpool binary on the sim driver", .serialized)
struct EndToEndTests {
    @Test func theBinaryWasBuilt() {
        #expect(VmpoolBinary().exists, "run `swift build` before the tests")
    }

    @Test func invalidManifestsReportEveryErrorAndWriteNothing() throws {
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
              color: blue
            """)
        let alsoBad = box.dir.write("also.yaml", "apiVersion: vmpool/v1\nkind: Pod\n")
        for command in ["validate", "plan", "apply"] {
            let result = try box.binary.run([command, "-f", bad, "-f", alsoBad, "--state-dir", box.state])
            #expect(result.status == 1)
            let located = result.stderrLines.filter { $0.hasPrefix(bad + ":") || $0.hasPrefix(alsoBad + ":") }
            #expect(located.count == 6, "\(result.stderr)")
            #expect(located.contains(bad + #":7:10: spec.vcpus: expected an integer from 1 to 64, got "two""#))
            #expect(located.contains { $0.hasPrefix(bad + ":9:3: spec.color: unknown field") })
            #expect(located.contains { $0.hasPrefix(alsoBad + ":2:7: kind: ") })
            #expect(!FileManager.default.fileExists(atPath: box.state), "\(command) touched the state dir")
        }
    }

    @Test func validManifestsValidate() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let file = box.write(pool(size: 2))
        let result = try box.run("validate", "-f", file)
        #expect(result.status == 0)
        #expect(result.stdout == "1 pool valid: web\n")
    }

    @Test func aPoolConvergesAndEveryChangePlansTheRightActions() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        var spec = pool(size: 5, vcpus: 1, memoryMiB: 256, maxVcpus: 4, maxMemoryMiB: 1024)
        func apply() throws {
            let result = try box.run("apply", "-f", box.write(spec))
            #expect(result.status == 0, "\(result.stderr)")
            #expect(try box.plan(box.write(spec)).status == 0, "plan after apply must be empty")
        }
        try apply()
        #expect(try box.vmStates() == ["running": 5])

        spec.size = 8
        #expect(try box.plan(box.write(spec)).counts == ["create": 3])
        #expect(try box.plan(box.write(spec)).status == 2)
        try apply()

        spec.vcpus = 2
        #expect(try box.plan(box.write(spec)).counts == ["hotplug-cpu": 8])
        try apply()

        spec.memoryMiB = 512
        #expect(try box.plan(box.write(spec)).counts == ["hotplug-memory": 8])
        try apply()

        spec.vcpus = 1
        #expect(try box.plan(box.write(spec)).counts == ["replace": 8])
        try apply()

        spec.state = .paused
        #expect(try box.plan(box.write(spec)).counts == ["pause": 8])
        try apply()
        #expect(try box.vmStates() == ["paused": 8])

        spec.state = .running
        spec.warm = 2
        #expect(try box.plan(box.write(spec)).counts == ["resume": 8, "create": 2])
        try apply()
        #expect(try box.vmStates() == ["running": 8, "paused": 2])

        spec.size = 10
        let grow = try box.binary.run(["plan", "-f", box.write(spec), "--state-dir", box.state, "-o", "json"])
        let actions =
            (try JSONSerialization.jsonObject(with: Data(grow.stdout.utf8)) as? [String: Any])?["actions"]
            as? [[String: Any]] ?? []
        #expect(actions.map { $0["action"] as? String } == ["resume", "resume", "create", "create"])
        try apply()
        #expect(try box.vmStates() == ["running": 10, "paused": 2])

        let pools = try box.json("get", "pools")
        #expect(pools.count == 1)
        for key in [
            "name", "size", "vcpus", "memoryMiB", "maxVcpus", "maxMemoryMiB", "boot", "state", "warm", "ready", "vms",
        ] {
            #expect(pools.first?[key] != nil, "get pools lacks \(key)")
        }
        // READY counts serving VMs only; the paused spares are counted apart.
        #expect(pools.first?["ready"] as? Int == 10)
        #expect(pools.first?["warmReady"] as? Int == 2)
        let vms = try box.json("get", "vms")
        for key in ["id", "pool", "state", "vcpus", "memoryMiB", "boot", "pid", "createdAt"] {
            #expect(vms.first?[key] != nil, "get vms lacks \(key)")
        }
        #expect(vms.first?["pid"] is NSNull)
    }

    @Test func templatePoolsBuildOneTemplateThenClone() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let file = box.write(pool("tpl", size: 4, boot: .template))
        #expect(try box.plan(file).counts == ["build-template": 1, "clone": 4])
        let result = try box.run("apply", "-f", file, "-o", "json")
        #expect(result.status == 0)
        let document = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any]
        let actions = document?["actions"] as? [[String: Any]] ?? []
        #expect(actions.allSatisfy { $0["result"] as? String == "ok" })
        #expect((document?["summary"] as? [String: Any])?["clone"] as? Int == 4)
        #expect(try box.plan(file).status == 0)
        #expect(try box.json("get", "pools").first?["standbys"] as? Int == 2)
    }

    @Test func pruneDeletesPoolsAbsentFromTheInput() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let both = box.dir.write("both.yaml", manifest(pool("a", size: 2)) + "---\n" + manifest(pool("b", size: 1)))
        #expect(try box.run("apply", "-f", both).status == 0)
        let onlyB = box.write(pool("b", size: 1), as: "b.yaml")
        #expect(try box.plan(onlyB).status == 0, "without --prune, pool a is left alone")
        let plan = try box.binary.run(["plan", "-f", onlyB, "--prune", "--state-dir", box.state])
        #expect(plan.stdout.contains("-   delete-pool  # pool is not in the input (--prune)"), "\(plan.stdout)")
        #expect(try box.run("apply", "-f", onlyB, "--prune").status == 0)
        #expect(try box.json("get", "pools").map { $0["name"] as? String } == ["b"])
    }

    @Test func reconcileNeedsNoManifestsAndRepairsDrift() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 3))).status == 0)
        let sim = try SimDriver(stateDirectory: box.state)
        let ids = try box.json("get", "vms").compactMap { $0["id"] as? String }
        try sim.simulateCrash(ids[0])
        try sim.simulateExternalPause(ids[1])
        let result = try box.run("reconcile")
        #expect(result.status == 0, "\(result.stderr)")
        #expect(try box.vmStates() == ["running": 3])
        let after = Set(try box.json("get", "vms").compactMap { $0["id"] as? String })
        #expect(!after.contains(ids[0]))
        #expect(after.contains(ids[1]))
    }

    @Test func deleteStopsThePoolsVMsAndForgetsIt() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 2, boot: .template))).status == 0)
        #expect(try box.run("delete", "web").status == 0)
        #expect(try box.json("get", "pools").isEmpty)
        #expect(try box.json("get", "vms").isEmpty)
        let missing = try box.run("delete", "web")
        #expect(missing.status == 1)
        #expect(missing.stderr.contains("no pool named \"web\""))
    }

    @Test func aPartlyFailedApplyExitsOneAndTheNextApplyFinishes() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let file = box.write(pool(size: 6))
        let failing = try box.run(
            "apply", "-f", file, environment: ["VMPOOL_SIM_FAIL": "create:0.5", "VMPOOL_SIM_SEED": "4"])
        #expect(failing.status == 1)
        #expect(failing.stderr.contains("not converged"))
        #expect(try box.run("apply", "-f", file).status == 0)
        #expect(try box.vmStates() == ["running": 6])
    }

    @Test func badSimKnobsAreErrors() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let result = try box.run("apply", "-f", box.write(pool()), environment: ["VMPOOL_SIM_FAIL": "create:2"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("VMPOOL_SIM_FAIL"))
    }

    @Test func usageErrorsExitOne() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply").status == 1)
        #expect(try box.run("apply", "-f", "x.yaml", "--parallel", "0").status == 1)
        #expect(try box.run("apply", "-f", "x.yaml", "--timeout", "soon").status == 1)
        #expect(try box.run("get", "pools", "--driver", "xen").status == 1)
    }

    @Test func concurrentAppliesCreateNoDuplicates() async throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let file = box.write(pool(size: 6))
        let runs = try (0..<8).map { index in
            try box.binary.start(
                [index % 2 == 0 ? "apply" : "reconcile", "--state-dir", box.state]
                    + (index % 2 == 0 ? ["-f", file] : []),
                environment: ["VMPOOL_SIM_LATENCY": "5ms"])
        }
        let results = runs.map { $0.wait() }
        // A run may fail only by saying why (never silently).
        for result in results where result.status != 0 {
            #expect(result.stderr.contains("not converged"), "exit \(result.status) with stderr: \(result.stderr)")
        }
        #expect(try box.vmStates() == ["running": 6])
        let sim = try SimDriver(stateDirectory: box.state)
        let simVMs = await sim.discover()
        #expect(simVMs.count == 6)
    }

    @Test func aWaiterNamesTheHolderAndHonoursTheTimeout() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let file = box.write(pool(size: 20))
        let holder = try box.binary.start(
            ["apply", "-f", file, "--state-dir", box.state], environment: ["VMPOOL_SIM_LATENCY": "200ms"])
        // Wait until the holder has the lock (its holder record appears).
        let held = eventually(timeout: .seconds(2)) {
            !((try? String(contentsOfFile: box.state + "/lock", encoding: .utf8)) ?? "").isEmpty
        }
        #expect(held, "the apply never took the lock")
        let waiter = try box.run("apply", "-f", file, "--lock-timeout", "300ms")
        #expect(waiter.status == 1)
        #expect(waiter.stderr.contains("pid \(holder.pid) (apply) since"), "\(waiter.stderr)")
        #expect(waiter.stderr.contains("--lock-timeout"))
        holder.kill()
        _ = holder.wait()
        // The dead holder's lock is taken without any manual step, and its half-made VMs undone.
        let next = try box.run("apply", "-f", file, "--lock-timeout", "2s")
        #expect(next.status == 0, "\(next.stderr)")
        #expect(try box.vmStates() == ["running": 20])
    }
}
