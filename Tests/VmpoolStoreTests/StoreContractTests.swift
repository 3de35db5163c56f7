import Foundation
import Testing
import VmpoolDriver
import VmpoolSpec
import VmpoolStore
import VmpoolTestSupport

/// What every store engine must do alike: the same tests on SQLite and PostgreSQL.
@Suite("Store contract, on every engine")
struct StoreContractTests {
    func record(_ id: String, pool: String = "web", state: VMState = .running) -> VMRecord {
        VMRecord(
            id: id, pool: pool, state: state, boot: .cold,
            shape: VMShape(pool: VmpoolTestSupport.pool(pool), image: testImage), createdAt: Date())
    }

    func launch(_ store: StateStore, _ id: String, pool: String = "web") throws {
        let (vm, journal) = try #require(
            try store.beginLaunch(record(id, pool: pool, state: .creating), operation: "create"))
        var running = vm
        running.state = .running
        try store.finish(journal, outcome: .ok, updating: running)
    }

    @Test(arguments: StoreEngine.available)
    func desiredStateSurvivesReopening(engine: StoreEngine) throws {
        let fixture = try StoreFixture(engine)
        defer { fixture.remove() }
        do {
            let store = try fixture.open()
            try store.applyDesired([pool("web", size: 2), pool("db", size: 1)])
            try launch(store, "web-000001")
        }
        let reopened = try fixture.open()
        #expect(try reopened.pools().map(\.spec.name) == ["db", "web"])
        #expect(try reopened.vms().map(\.id) == ["web-000001"])
        #expect(try reopened.applyDesired([pool("web", size: 2), pool("db", size: 1)]).isEmpty, "nothing changed")
        #expect(try reopened.applyDesired([pool("web", size: 3)]) == ["web"])
        #expect(try reopened.pools().first { $0.spec.name == "web" }?.generation == 2)
    }

    @Test(arguments: StoreEngine.available)
    func valuesComeBackAsTheyWereWritten(engine: StoreEngine) throws {
        let fixture = try StoreFixture(engine)
        defer { fixture.remove() }
        let store = try fixture.open()
        var vm = record("web-0000aa", state: .creating)
        vm.shape.disks = [
            DiskShape(name: "data", base: nil, format: "qcow2", fingerprint: "é ? ünïcode", sizeMiB: 1024)
        ]
        vm.lastError = "it's \"quoted\" ? and 'single' ; -- not SQL"
        vm.pid = Int32.max
        let (_, journal) = try #require(try store.beginLaunch(vm, operation: "create"))
        vm.state = .paused
        try store.finish(journal, outcome: .failed, error: vm.lastError, updating: vm)
        let back = try #require(try store.vm(vm.id))
        #expect(back.shape == vm.shape && back.lastError == vm.lastError && back.pid == Int32.max)
        #expect(back.state == .paused)
        #expect(abs(back.createdAt.timeIntervalSince(vm.createdAt)) < 0.001)
        #expect(try store.journal(limit: 1).first?.error == vm.lastError)
    }

    @Test(arguments: StoreEngine.available)
    func eventsFilterAndFollow(engine: StoreEngine) throws {
        let fixture = try StoreFixture(engine)
        defer { fixture.remove() }
        let store = try fixture.open()
        for n in 0..<30 {
            try store.record(Event(pool: n % 2 == 0 ? "a" : "b", vm: "vm-\(n)", kind: "k\(n)", message: "m"))
        }
        #expect(try store.events(pool: "a").count == 15)
        #expect(try store.events(vm: "vm-7").map(\.kind) == ["k7"])
        let newest = try store.events(limit: 5)
        #expect(newest.map(\.kind) == ["k25", "k26", "k27", "k28", "k29"], "the newest, in order")
        let after = try #require(newest.first?.id)
        #expect(try store.events(afterID: after).count == 4)
    }

    @Test(arguments: StoreEngine.available)
    func concurrentLeasesNeverHandOneVMTwice(engine: StoreEngine) async throws {
        let fixture = try StoreFixture(engine)
        defer { fixture.remove() }
        let store = try fixture.open()
        try store.applyDesired([pool("web", size: 12)])
        for n in 0..<12 { try launch(store, "web-\(String(format: "%06x", n))") }
        // Separate connections, as separate vmpool processes have.
        let stores = try (0..<4).map { _ in try fixture.open() }
        let taken = try await withThrowingTaskGroup(of: [String].self) { group in
            for (n, store) in stores.enumerated() {
                group.addTask {
                    var mine: [String] = []
                    for _ in 0..<5 {
                        if case .leased(let vm) = try store.lease(pool: "web", holder: "t\(n)", ttl: nil) {
                            mine.append(vm.id)
                            try store.closeLeaseJournal(vm: vm.id, outcome: .ok)
                        }
                    }
                    return mine
                }
            }
            return try await group.reduce(into: []) { $0 += $1 }
        }
        #expect(taken.count == 12, "every VM leased once, the rest found none")
        #expect(Set(taken).count == taken.count, "no VM leased twice")
        #expect(try store.vms().allSatisfy { $0.lease != nil })
    }

    @Test(arguments: StoreEngine.available)
    func leaseWaitersGoInOrderAndADeadOneLosesItsPlace(engine: StoreEngine) throws {
        let fixture = try StoreFixture(engine)
        defer { fixture.remove() }
        let store = try fixture.open()
        try store.applyDesired([pool("web", size: 1)])
        let first = try store.enqueueLeaseWait(pool: "web", holder: "first")
        let second = try store.enqueueLeaseWait(pool: "web", holder: "second")
        try launch(store, "web-000001")
        guard case .waitYourTurn = try store.lease(pool: "web", holder: "second", ttl: nil, ticket: second) else {
            Issue.record("the second waiter went first")
            return
        }
        // The first waiter's process is gone: it gives up its place.
        try fixture.sql("UPDATE leasewait SET pid = 999999 WHERE id = \(first)")
        guard case .leased(let vm) = try store.lease(pool: "web", holder: "second", ttl: .seconds(60), ticket: second)
        else {
            Issue.record("the second waiter got nothing")
            return
        }
        #expect(vm.lease?.holder == "second" && vm.lease?.expiresAt != nil)
        #expect(try store.leaseWaiters().isEmpty)
    }

    @Test(arguments: StoreEngine.available)
    func anActionBegunOnAVMKeepsLeasesAwayAndALeaseKeepsActionsAway(engine: StoreEngine) throws {
        let fixture = try StoreFixture(engine)
        defer { fixture.remove() }
        let store = try fixture.open()
        try store.applyDesired([pool("web", size: 2)])
        try launch(store, "web-000001")
        let (_, pause) = try #require(try store.beginOnVM("web-000001", operation: "pause", plannedLeased: false))
        guard case .noneReady = try store.lease(pool: "web", holder: "ci", ttl: nil) else {
            Issue.record("a VM being paused was leased")
            return
        }
        try store.finish(pause, outcome: .ok)
        guard case .leased = try store.lease(pool: "web", holder: "ci", ttl: nil) else {
            Issue.record("no lease after the pause ended")
            return
        }
        #expect(try store.beginOnVM("web-000001", operation: "stop", plannedLeased: false, stopping: true) == nil)
        #expect(try store.vm("web-000001")?.state == .running)
        // A write of the VM's row made from an older read keeps the lease.
        var stale = try #require(try store.vm("web-000001"))
        stale.lease = nil
        try store.saveVM(stale)
        #expect(try store.vm("web-000001")?.lease?.holder == "ci")
    }

    @Test(arguments: StoreEngine.available)
    func standbysAreClaimedOnceWithTheirAllocations(engine: StoreEngine) throws {
        let fixture = try StoreFixture(engine)
        defer { fixture.remove() }
        let store = try fixture.open()
        #expect(try store.beginStandby(id: "web-00000a", pool: "web", template: "web-t00001"))
        #expect(try !store.beginStandby(id: "web-00000a", pool: "web", template: "web-t00001"), "id taken")
        try store.markStandbyReady("web-00000a", pid: 77)
        let network = NetworkRequest(NetworkShape(mode: .user, ports: [22]))
        let (vm, _) = try #require(
            try store.claimStandby(template: "web-t00001", for: record("web-999999"), network: network))
        #expect(vm.id == "web-00000a" && vm.pid == 77 && vm.network?.ports[22] != nil)
        #expect(try store.claimStandby(template: "web-t00001", for: record("web-999998")) == nil)
        #expect(try store.standbys().isEmpty)
    }

    @Test(arguments: StoreEngine.available)
    func aStoreFromANewerVmpoolIsRefused(engine: StoreEngine) throws {
        let fixture = try StoreFixture(engine)
        defer { fixture.remove() }
        _ = try fixture.open()
        let table = engine == .sqlite ? "grdb_migrations" : "vmpool_migrations"
        try fixture.sql("INSERT INTO \(table) (identifier) VALUES ('v99-from-the-future')")
        do {
            _ = try fixture.open()
            Issue.record("a newer store was opened")
        } catch let error as StoreError {
            #expect(error.code == .newerSchema)
            #expect(error.message.contains("v99-from-the-future") && error.message.contains("v8-template-saved"))
        }
    }
}

/// Hosts and placement: the tables the cluster's hosts share.
@Suite("Hosts on a shared store")
struct HostStoreTests {
    @Test(arguments: StoreEngine.available)
    func aHostDeclaredDeadCannotWriteUntilItRejoins(engine: StoreEngine) throws {
        let fixture = try StoreFixture(engine)
        defer { fixture.remove() }
        let a = try fixture.open(host: "a")
        let b = try fixture.open(host: "b")
        try a.applyDesired([pool("web", size: 2)])
        #expect(try !a.join(capacity: HostCapacity(vcpus: 4, memoryMiB: 4096)))
        try b.join(capacity: HostCapacity(vcpus: 2, memoryMiB: 2048))
        let vm = VMRecord(
            id: "web-00000a", pool: "web", state: .creating, boot: .cold,
            shape: VMShape(pool: pool("web"), image: testImage), createdAt: Date())
        let launched = try a.beginLaunch(
            vm, operation: "create", network: NetworkRequest(NetworkShape(mode: .user, ports: [22])))
        #expect(launched != nil)
        #expect(try b.vms().isEmpty, "each host sees its own VMs")
        #expect(try b.allVMs().map(\.host) == ["a"])
        #expect(try b.hosts().map(\.name) == ["a", "b"])

        try b.fence("a", reason: "no heartbeat for 30s")
        #expect(try b.allVMs().isEmpty, "a dead host's VMs are forgotten")
        #expect(try a.unfinishedOperations().isEmpty, "and its journal closed")
        let heartbeat = Self.failure { () throws(StoreError) in try a.heartbeat() }
        #expect(heartbeat == .fenced)
        let write = Self.failure { () throws(StoreError) in _ = try a.beginLaunch(vm, operation: "create") }
        #expect(write == .fenced, "a fenced host wrote")
        #expect(try a.allVMs().isEmpty)
        #expect(try a.join(capacity: HostCapacity(vcpus: 4, memoryMiB: 4096)), "it learns it was declared dead")
        try a.heartbeat()
        #expect(try a.beginLaunch(vm, operation: "create") != nil)
        #expect(try b.hosts().first { $0.name == "a" }?.fencedAt == nil)
    }

    /// The code of the store error `body` fails with; nil when it does not fail.
    static func failure(_ body: () throws(StoreError) -> Void) -> StoreError.Code? {
        do {
            try body()
            return nil
        } catch {
            return error.code
        }
    }

    @Test(arguments: StoreEngine.available)
    func placementIsStoredWholeWithWhatDidNotFit(engine: StoreEngine) throws {
        let fixture = try StoreFixture(engine)
        defer { fixture.remove() }
        let store = try fixture.open(host: "a")
        try store.applyDesired([pool("web", size: 5), pool("db", size: 1)])
        try store.writePlacement(
            [
                PlacementRecord(pool: "web", host: "a", size: 2, warm: 0),
                PlacementRecord(pool: "web", host: "b", size: 2, warm: 1),
            ], unplaced: ["web": 1], events: [Event(pool: "web", kind: "unplaced", message: "1 VM does not fit")])
        #expect(try store.placements().count == 2)
        #expect(try store.unplaced() == ["web": 1])
        try store.writePlacement([PlacementRecord(pool: "db", host: "a", size: 1, warm: 0)], unplaced: [:], events: [])
        #expect(try store.placements() == [PlacementRecord(pool: "db", host: "a", size: 1, warm: 0)])
        #expect(try store.unplaced().isEmpty)
    }
}
