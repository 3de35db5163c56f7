import Foundation
import GRDB
import Testing
import VmpoolDriver
import VmpoolPlanner
import VmpoolReconciler
import VmpoolSim
import VmpoolSpec
import VmpoolStore
import VmpoolTestSupport

@Suite("Reconciler on the sim driver")
struct ReconcilerTests {
    @Test func applyConvergesAndTheSecondApplyDoesNothing() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        let spec = pool(size: 5, warm: 2)
        let first = try await h.reconciler.apply([spec], prune: [])
        #expect(first.converged)
        #expect(try h.states("web") == [.running: 5, .paused: 2])
        let second = try await h.reconciler.apply([spec], prune: [])
        #expect(second.plan.isEmpty)
        #expect(second.converged)
    }

    @Test func templatePoolBuildsOneTemplateThenClones() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        let result = try await h.reconciler.apply([pool(size: 4, boot: .template)], prune: [])
        #expect(result.converged)
        #expect(result.plan.summary[.buildTemplate] == 1)
        #expect(result.plan.summary[.clone] == 4)
        let templates = try h.store.templates()
        #expect(templates.count == 1)
        #expect(try h.store.vms().allSatisfy { $0.templateID == templates.first?.ref.id })
    }

    @Test func aPartlyFailedApplyIsFinishedByTheNextPass() async throws {
        let failing = try SimHarness(faults: [.create: 0.5], seed: 3)
        defer { failing.directory.remove() }
        let spec = pool(size: 10)
        let first = try await failing.reconciler.apply([spec], prune: [])
        let failed = first.results.filter { $0.outcome == .failed }.count
        #expect(failed > 0, "the seed must fail some creates")
        #expect(!first.converged)
        #expect(try failing.store.vms().count == 10 - failed, "failed launches leave no record")
        #expect(try failing.store.unfinishedOperations().isEmpty)
        let healthy = try failing.reopened()
        let second = try await healthy.reconciler.reconcile()
        #expect(second.converged)
        #expect(second.plan.summary[.create] == failed)
        #expect(try healthy.store.vms().count == 10)
    }

    @Test func aFailedActionSkipsOnlyItsDependents() async throws {
        let h = try SimHarness(faults: [.buildTemplate: 1])
        defer { h.directory.remove() }
        let result = try await h.reconciler.apply(
            [pool("tpl", size: 2, boot: .template), pool("cold", size: 2)], prune: [])
        let byPool = Dictionary(grouping: result.results, by: \.action.pool)
        #expect(byPool["tpl"]?.allSatisfy { $0.outcome == .failed } == true)
        #expect(byPool["tpl"]?.filter { $0.error?.contains("depends on failed") == true }.count == 2)
        #expect(byPool["cold"]?.allSatisfy { $0.outcome == .ok } == true)
        #expect(try h.store.vms(pool: "cold").count == 2)
        #expect(try h.store.templates().isEmpty, "a failed build leaves no template record")
    }

    @Test func hotplugFailureLeavesTheRecordedShapeTrue() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply([pool(size: 2)], prune: [])
        let failing = try h.reopened(faults: [.hotplugCPU: 1])
        let result = try await failing.reconciler.apply([pool(size: 2, vcpus: 2)], prune: [])
        #expect(result.results.count == 2)
        #expect(result.results.allSatisfy { $0.outcome == .failed })
        #expect(try failing.store.vms().allSatisfy { $0.shape.vcpus == 1 })
        let healed = try await h.reopened().reconciler.reconcile()
        #expect(healed.converged)
        #expect(try h.store.vms().allSatisfy { $0.shape.vcpus == 2 })
    }

    @Test func driftIsRepairedByTheNextPass() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply([pool(size: 4, vcpus: 2)], prune: [])
        let vms = try h.store.vms()
        try h.driver.simulateCrash(vms[0].id)
        try h.driver.simulateExternalPause(vms[1].id)
        try h.driver.simulateResize(vms[2].id, vcpus: 1)
        try h.driver.simulateAgentHang(vms[3].id)
        let preview = try await h.reconciler.preview([pool(size: 4, vcpus: 2)], prune: [], depth: .guest)
        #expect(kinds(preview) == [.replace: 2, .resume: 1, .hotplugCPU: 1])
        let result = try await h.reconciler.reconcile()
        #expect(result.converged)
        let after = try h.store.vms()
        #expect(after.count == 4)
        #expect(!after.contains { $0.id == vms[0].id || $0.id == vms[3].id })
        #expect(after.allSatisfy { $0.state == .running && $0.shape.vcpus == 2 })
    }

    @Test func orphansAreStoppedAndInterruptedLaunchesUndone() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply([pool(size: 2)], prune: [])
        let shape = VMShape(pool: pool(), image: testImage)
        try h.driver.simulateStray(id: "web-0rphan", pool: "web", shape: shape)
        // A launch recorded and journaled whose vmpool died before the driver answered.
        let half = VMRecord(
            id: "web-ha1f00", pool: "web", state: .creating, boot: .cold, shape: shape, createdAt: Date())
        _ = try h.store.beginLaunch(half, operation: "create")
        try h.driver.simulateStray(id: "web-ha1f00", pool: "web", shape: shape)
        let result = try await h.reopened().reconciler.reconcile()
        #expect(result.recovery.orphansStopped == ["web-0rphan"])
        #expect(result.recovery.undoneLaunches == ["web-ha1f00"])
        #expect(result.recovery.unfinished == 1)
        #expect(result.converged)
        let discovered = await h.driver.discover().map(\.id).sorted()
        #expect(discovered == (try h.store.vms().map(\.id)).sorted())
    }

    @Test func aReleaseStillRunningIsLeftToItsOwnerAndADeadOnesIsFinished() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply([pool(size: 2)], prune: [])
        let leases = Leases(store: h.store, driver: h.driver, stateDirectory: h.directory.path)
        let first = try await leases.take(pool: "web", holder: "a", ttl: nil, wait: .zero)
        let second = try await leases.take(pool: "web", holder: "b", ttl: nil, wait: .zero)
        // Both releases got as far as marking the VM stopping; one's vmpool (this process) still
        // runs, the other's died.
        for record in [first, second] { _ = try h.store.release(record.id) }
        let live = try h.store.begin(operation: "release", pool: "web", vm: first.id)
        let dead = try h.store.begin(operation: "release", pool: "web", vm: second.id)
        let exited = Process()
        exited.executableURL = URL(fileURLWithPath: "/bin/true")
        try exited.run()
        exited.waitUntilExit()
        try await DatabaseQueue(path: h.directory.path + "/" + StateStore.fileName).write { db in
            try db.execute(
                sql: "UPDATE journal SET ownerPid = ? WHERE id = ?", arguments: [exited.processIdentifier, dead])
        }
        let result = try await h.reopened().reconciler.reconcile()
        #expect(result.recovery.unfinished == 1)
        let ids = Set(try h.store.vms().map(\.id))
        #expect(ids.contains(first.id), "a release whose vmpool runs is its own to finish")
        #expect(!ids.contains(second.id))
        #expect(try h.store.unfinishedOperations().map(\.id) == [live])
        #expect(await h.driver.discover().contains { $0.id == first.id })
    }

    @Test(arguments: [(size: 0, vcpus: 1, kind: Action.Kind.stop), (size: 1, vcpus: 2, kind: .hotplugCPU)])
    func anActionOnAVMLeasedAfterThePlanWasMadeDoesNothing(size: Int, vcpus: Int, kind: Action.Kind) async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply([pool(size: 1)], prune: [])
        let spec = pool(size: size, vcpus: vcpus)
        try h.store.applyDesired([spec])
        let observation = try await h.reconciler.observe(depth: .guest, leased: false)
        let input = h.reconciler.planInput(desired: [spec], prune: [], observation: observation)
        let plan = Planner.plan(input)
        #expect(plan.actions.map(\.kind) == [kind])
        // A consumer leases the VM between the plan and its execution.
        let leases = Leases(store: h.store, driver: h.driver, stateDirectory: h.directory.path)
        let taken = try await leases.take(pool: "web", holder: "ci", ttl: nil, wait: .zero)
        let results = await h.reconciler.execute(plan, input: input, cancellation: Cancellation())
        #expect(results.map(\.outcome) == [.ok])
        #expect(results.first?.note != nil, "the action says it did nothing")
        let after = try #require(try h.store.vm(taken.id))
        #expect(after.lease?.holder == "ci")
        #expect(after.state == .running && after.shape.vcpus == 1)
        #expect(await h.driver.discover().map(\.id) == [taken.id])
        #expect(try h.store.unfinishedOperations().isEmpty)
    }

    @Test func noLeaseTakesAVMAPassIsActingOn() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply([pool(size: 1)], prune: [])
        let vm = try #require(try h.store.vms().first)
        let opened = try #require(try h.store.beginOnVM(vm.id, operation: "pause", plannedLeased: false))
        let leases = Leases(store: h.store, driver: h.driver, stateDirectory: h.directory.path)
        await #expect(throws: Leases.Failure.self) {
            try await leases.take(pool: "web", holder: "ci", ttl: nil, wait: .zero)
        }
        try h.store.finish(opened.1, outcome: .ok)
        #expect(try await leases.take(pool: "web", holder: "ci", ttl: nil, wait: .zero).id == vm.id)
    }

    @Test func pruneDeletesAbsentPoolsAndTheirTemplates() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply([pool("a", size: 2, boot: .template), pool("b", size: 1)], prune: [])
        let result = try await h.reconciler.apply([pool("b", size: 1)], prune: ["a"])
        #expect(result.converged)
        #expect(try h.store.pools().map(\.spec.name) == ["b"])
        #expect(try h.store.vms().map(\.pool) == ["b"])
        #expect(await h.driver.discoverTemplates().isEmpty)
    }

    @Test func switchingToColdBootRemovesTheTemplate() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply([pool(size: 1, boot: .template)], prune: [])
        let result = try await h.reconciler.apply([pool(size: 2, boot: .cold)], prune: [])
        #expect(result.converged)
        #expect(result.plan.summary[.create] == 1)
        #expect(try h.store.templates().isEmpty)
    }

    @Test func cancellationStartsNothingNewAndTheNextPassFinishes() async throws {
        let h = try SimHarness(parallelism: 1)
        defer { h.directory.remove() }
        let cancellation = Cancellation()
        cancellation.cancel()
        let result = try await h.reconciler.apply([pool(size: 3)], prune: [], cancellation: cancellation)
        #expect(result.results.allSatisfy { $0.outcome == .failed && $0.error?.contains("shutting down") == true })
        #expect(try h.store.vms().isEmpty)
        #expect(try await h.reconciler.reconcile().converged)
    }

    @Test func simLimitsMatchQemu() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply(
            [pool(size: 1, vcpus: 1, memoryMiB: 256, maxVcpus: 2, maxMemoryMiB: 512)], prune: [])
        let vm = try #require(try h.store.vms().first)
        await #expect(throws: DriverError.self) { try await h.driver.hotplugCPUs(vm.ref, shape: vm.shape, to: 3) }
        await #expect(throws: DriverError.self) { try await h.driver.hotplugMemory(vm.ref, shape: vm.shape, to: 300) }
        await #expect(throws: DriverError.self) { try await h.driver.resume(vm.ref) }
        try await h.driver.pause(vm.ref)
        await #expect(throws: DriverError.self) { try await h.driver.pause(vm.ref) }
        try await h.driver.hotplugMemory(vm.ref, shape: vm.shape, to: 512)
    }

    @Test func faultInjectionIsReproducibleFromTheSeed() {
        let a = (0..<200).map { SimDriver.unitInterval(seed: 9, operation: .create, n: UInt64($0)) < 0.3 }
        let b = (0..<200).map { SimDriver.unitInterval(seed: 9, operation: .create, n: UInt64($0)) < 0.3 }
        let c = (0..<200).map { SimDriver.unitInterval(seed: 10, operation: .create, n: UInt64($0)) < 0.3 }
        #expect(a == b)
        #expect(a != c)
        let rate = Double(a.filter { $0 }.count) / 200
        #expect(rate > 0.15 && rate < 0.45)
    }
}

@Suite("Interrupted deletes")
struct InterruptedDeleteTests {
    @Test func anInterruptedDeleteIsFinishedByReconcileNotUndone() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply([pool("a", size: 2), pool("b", size: 1)], prune: [])
        // A delete that died right after marking the pool, before stopping anything.
        try h.store.markDeleting(["a"])
        let result = try await h.reopened().reconciler.reconcile()
        #expect(result.converged)
        #expect(try h.store.pools().map(\.spec.name) == ["b"])
        #expect(try h.store.vms().map(\.pool) == ["b"])
    }

    @Test func reapplyingAPoolCancelsItsDeletion() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply([pool("a", size: 2)], prune: [])
        try h.store.markDeleting(["a"])
        _ = try await h.reconciler.apply([pool("a", size: 2)], prune: [])
        #expect(try h.store.pools().map(\.deleting) == [false])
        #expect(try await h.reconciler.reconcile().plan.isEmpty)
    }
}

@Suite("Standbys")
struct StandbyTests {
    @Test func templatePoolsKeepStandbysAndClonesClaimThem() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply([pool(size: 2, boot: .template)], prune: [])
        let standbys = try h.store.standbys()
        #expect(standbys.count == 2)
        #expect(standbys.allSatisfy { $0.ready && $0.template == (try? h.store.templates().first?.ref.id) })
        let grown = try await h.reconciler.apply([pool(size: 3, boot: .template)], prune: [])
        #expect(grown.converged)
        let vms = Set(try h.store.vms().map(\.id))
        #expect(vms.contains(standbys[0].id), "the new clone took the oldest standby's id and process")
        let refilled = try h.store.standbys()
        #expect(refilled.count == 2)
        #expect(!refilled.contains { vms.contains($0.id) })
        let running = Set(await h.driver.discover().map(\.id))
        #expect(running == vms.union(refilled.map(\.id)))
    }

    @Test func standbysGoWithTheirTemplateAndPool() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply(
            [pool("a", size: 1, boot: .template), pool("b", size: 1, boot: .template)], prune: [])
        #expect(try h.store.standbys().count == 4)
        // A new template: a's standbys are replaced by ones for the new template.
        let before = Set(try h.store.standbys().filter { $0.pool == "a" }.map(\.id))
        _ = try await h.reconciler.apply([pool("a", size: 1, memoryMiB: 512, boot: .template)], prune: [])
        let after = try h.store.standbys().filter { $0.pool == "a" }
        #expect(after.count == 2 && before.isDisjoint(with: after.map(\.id)))
        // Cold boot: no standbys. Deleted: none either, and nothing left running.
        _ = try await h.reconciler.apply([pool("a", size: 1, boot: .cold)], prune: [])
        #expect(try h.store.standbys().map(\.pool) == ["b", "b"])
        _ = try await h.reconciler.delete(["a", "b"])
        #expect(try h.store.standbys().isEmpty)
        #expect(await h.driver.discover().isEmpty)
    }

    @Test func aStandbyWhoseStartWasInterruptedIsCleanedUp() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply([pool(size: 1, boot: .template)], prune: [])
        let template = try #require(try h.store.templates().first?.ref)
        #expect(try h.store.beginStandby(id: "web-5ta1e0", pool: "web", template: template.id))
        _ = try await h.driver.prestart(id: "web-5ta1e0", pool: "web", from: template)
        let result = try await h.reopened().reconciler.reconcile()
        #expect(result.converged)
        #expect(!(try h.store.standbys().map(\.id)).contains("web-5ta1e0"))
        #expect(!(await h.driver.discover().map(\.id)).contains("web-5ta1e0"))
    }
}
