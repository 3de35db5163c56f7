import Foundation
import GRDB
import Testing
import Synchronization
import VmpoolDriver
import VmpoolSpec
import VmpoolStore
import VmpoolTestSupport

@Suite("State store")
struct StoreTests {
    func record(_ id: String, pool: String = "web", state: VMState = .running) -> VMRecord {
        VMRecord(
            id: id, pool: pool, state: state, boot: .cold,
            shape: VMShape(pool: VmpoolTestSupport.pool(pool), image: testImage), createdAt: Date())
    }

    @Test func stateDirAndFilesArePrivate() throws {
        let dir = TemporaryDirectory()
        defer { dir.remove() }
        let stateDir = dir.path + "/state"
        // A permissive umask: the store must set its modes itself, not lean on the caller's.
        let old = umask(0o022)
        defer { umask(old) }
        let store = try StateStore(directory: stateDir)
        try store.applyDesired([pool("web")])
        var info = stat()
        #expect(stat(stateDir, &info) == 0)
        #expect(info.st_mode & 0o777 == 0o700)
        for file in ["state.sqlite", "state.sqlite-wal", "state.sqlite-shm"] {
            #expect(stat(stateDir + "/" + file, &info) == 0, "\(file) missing")
            #expect(info.st_mode & 0o077 == 0, "\(file) has mode \(String(info.st_mode & 0o777, radix: 8))")
        }
    }

    @Test func anExistingLooseStateDirIsTightened() throws {
        let dir = TemporaryDirectory()
        defer { dir.remove() }
        chmod(dir.path, 0o755)
        _ = try StateStore(directory: dir.path)
        var info = stat()
        stat(dir.path, &info)
        #expect(info.st_mode & 0o777 == 0o700)
    }

    @Test(arguments: StoreEngine.available)
    func applyingBumpsTheGenerationOnlyOnChange(engine: StoreEngine) throws {
        let fixture = try StoreFixture(engine)
        defer { fixture.remove() }
        let store = try fixture.open()
        #expect(try store.applyDesired([pool("web"), pool("db")]) == ["web", "db"])
        #expect(try store.applyDesired([pool("web"), pool("db", size: 5)]) == ["db"])
        let pools = try store.pools()
        #expect(pools.map(\.spec.name) == ["db", "web"])
        #expect(pools.map(\.generation) == [2, 1])
        #expect(pools.first?.spec.size == 5)
    }

    @Test func desiredStateSurvivesReopening() throws {
        let dir = TemporaryDirectory()
        defer { dir.remove() }
        do {
            let store = try StateStore(directory: dir.path)
            try store.applyDesired([pool("web", size: 7, warm: 2)])
            _ = try store.beginLaunch(record("web-000001"), operation: "create")
        }
        let reopened = try StateStore(directory: dir.path)
        #expect(try reopened.pools().first?.spec == pool("web", size: 7, warm: 2))
        #expect(try reopened.vms().map(\.id) == ["web-000001"])
    }

    @Test(arguments: StoreEngine.available)
    func aLaunchIsJournaledWithItsRecordAndClosedWithItsOutcome(engine: StoreEngine) throws {
        let fixture = try StoreFixture(engine)
        defer { fixture.remove() }
        let store = try fixture.open()
        var vm = record("web-000001", state: .creating)
        let journal = try #require(try store.beginLaunch(vm, operation: "create")).1
        #expect(try store.unfinishedOperations().map(\.id) == [journal])
        #expect(try store.vm("web-000001")?.state == .creating)
        vm.state = .running
        vm.pid = 4242
        try store.finish(
            journal, outcome: .ok, updating: vm, event: Event(pool: "web", vm: vm.id, kind: "created", message: "ok"))
        #expect(try store.unfinishedOperations().isEmpty)
        #expect(try store.vm("web-000001")?.pid == 4242)
        #expect(try store.journal().first?.outcome == .ok)
        #expect(try store.events(pool: "web").last?.kind == "created")
    }

    /// An entered VM is never leased; entering a leased VM records nothing (its holder may).
    @Test(arguments: StoreEngine.available)
    func aVMEnteredWhileFreeIsNeverLeased(engine: StoreEngine) throws {
        let fixture = try StoreFixture(engine)
        defer { fixture.remove() }
        let store = try fixture.open()
        try store.applyDesired([pool("web")])
        for id in ["web-000001", "web-000002"] {
            let (_, journal) = try #require(try store.beginLaunch(record(id, state: .running), operation: "create"))
            try store.finish(journal, outcome: .ok)
        }
        #expect(try store.markEntered("web-000001", by: "exec"))
        #expect(try !store.markEntered("web-000001", by: "cp"), "entered once, recorded once")
        #expect(try store.vm("web-000001")?.entered?.by == "exec")
        guard case .leased(let first) = try store.lease(pool: "web", holder: "job", ttl: nil) else {
            Issue.record("the fresh VM was not leased")
            return
        }
        #expect(first.id == "web-000002")
        guard case .noneReady = try store.lease(pool: "web", holder: "job", ttl: nil) else {
            Issue.record("the entered VM was leased")
            return
        }
        #expect(try !store.markEntered("web-000002", by: "exec"), "a leased VM is its holder's to enter")
        #expect(try store.vm("web-000002")?.entered == nil)
        #expect(try store.events(pool: "web").filter { $0.kind == "entered" }.count == 1)
    }

    @Test(arguments: StoreEngine.available)
    func aTakenIdIsRefused(engine: StoreEngine) throws {
        let fixture = try StoreFixture(engine)
        defer { fixture.remove() }
        let store = try fixture.open()
        #expect(try store.beginLaunch(record("web-000001"), operation: "create") != nil)
        #expect(try store.beginLaunch(record("web-000001"), operation: "create") == nil)
        #expect(try store.unfinishedOperations().count == 1)
    }

    @Test(arguments: StoreEngine.available)
    func templatesMoveFromBuildingToReady(engine: StoreEngine) throws {
        let fixture = try StoreFixture(engine)
        defer { fixture.remove() }
        let store = try fixture.open()
        let ref = TemplateRef(
            id: "web-tmpl-000001", pool: "web", key: VMShape(pool: pool(), image: testImage).templateKey)
        let journal = try store.beginTemplate(TemplateRecord(ref: ref, state: .building, createdAt: Date()))
        #expect(try store.templates().map(\.state) == [.building])
        try store.markTemplateReady(ref.id)
        try store.finish(journal, outcome: .ok)
        #expect(try store.templates().map(\.state) == [.ready])
        #expect(try store.templates().first?.ref == ref)
        try store.deletePool("web")
        #expect(try store.templates().isEmpty)
    }

    @Test func theLockNamesItsHolderAndTimesOut() throws {
        let dir = TemporaryDirectory()
        defer { dir.remove() }
        let held = try StateLock.acquire(directory: dir.path, command: "apply", timeout: 1)
        var reported: LockHolder?
        let started = Date()
        do {
            _ = try StateLock.acquire(directory: dir.path, command: "reconcile", timeout: 0.3) { reported = $0 }
            Issue.record("a second lock was granted")
        } catch {
            #expect(error.code == .locked)
            #expect(error.message.contains("pid \(getpid()) (apply)"))
        }
        #expect(Date().timeIntervalSince(started) >= 0.3)
        #expect(reported?.pid == getpid())
        #expect(reported?.command == "apply")
        _ = held
    }

    @Test func aReleasedLockIsTakenAgain() throws {
        let dir = TemporaryDirectory()
        defer { dir.remove() }
        do { _ = try StateLock.acquire(directory: dir.path, command: "apply", timeout: 1) }
        let again = try StateLock.acquire(directory: dir.path, command: "apply", timeout: 0.1)
        #expect(again.holder.command == "apply")
    }
}

@Suite("Network allocations")
struct NetworkAllocationTests {
    func record(_ id: String) -> VMRecord {
        VMRecord(
            id: id, pool: "web", state: .creating, boot: .cold,
            shape: VMShape(pool: VmpoolTestSupport.pool("web"), image: testImage), createdAt: Date())
    }

    @Test(arguments: StoreEngine.available)
    func portsAndAddressesAreNeverGivenTwiceAndAreFreedWithTheVM(engine: StoreEngine) throws {
        let fixture = try StoreFixture(engine)
        defer { fixture.remove() }
        let store = try fixture.open()
        let bridged = NetworkRequest(NetworkShape(mode: .bridge, bridge: "vmpool0", subnet: "10.9.0.0/29"))
        var addresses: [String] = []
        // A /29 has 8 addresses: network, gateway and broadcast leave 5 for VMs.
        for index in 0..<5 {
            let (vm, _) = try #require(
                try store.beginLaunch(record("web-00000\(index)"), operation: "create", network: bridged))
            addresses.append(try #require(vm.network?.address))
            #expect(vm.network?.gateway == "10.9.0.1")
        }
        #expect(Set(addresses).count == 5)
        #expect(!addresses.contains("10.9.0.1") && !addresses.contains("10.9.0.7"))
        #expect(throws: StoreError.self) {
            try store.beginLaunch(self.record("web-000009"), operation: "create", network: bridged)
        }
        try store.deleteVM("web-000002")
        let (again, _) = try #require(
            try store.beginLaunch(record("web-00000a"), operation: "create", network: bridged))
        #expect(again.network?.address == addresses[2], "a stopped VM's address is free again")

        let forwarded = NetworkRequest(NetworkShape(mode: .user, ports: [22, 80]))
        var hostPorts: [Int] = []
        for index in 0..<50 {
            let (vm, _) = try #require(
                try store.beginLaunch(record("user-\(index)"), operation: "create", network: forwarded))
            hostPorts += vm.network?.ports.values.map { $0 } ?? []
            #expect(vm.network?.ports.keys.sorted() == [22, 80])
        }
        #expect(Set(hostPorts).count == 100, "no host port is given twice")
        #expect(try store.allocations().ports.count == 100)
        try store.deleteVM("user-0")
        #expect(try store.allocations().ports.count == 98)
    }

    @Test(arguments: StoreEngine.available)
    func aPortSomethingElseListensOnIsNotChosen(engine: StoreEngine) throws {
        let fixture = try StoreFixture(engine)
        defer { fixture.remove() }
        let store = try fixture.open()
        let forwarded = NetworkRequest(NetworkShape(mode: .user, ports: [22]))
        let busy = Set(StateStore.forwardedPorts.filter { $0 % 2 == 0 })
        for index in 0..<20 {
            let (vm, _) = try #require(
                try store.beginLaunch(record("w-\(index)"), operation: "create", network: forwarded) {
                    !busy.contains($0)
                })
            #expect(vm.network?.ports[22].map { !busy.contains($0) } == true)
        }
    }
}

@Suite("Store schema versions")
struct SchemaVersionTests {
    @Test func aStoreWrittenByANewerVmpoolIsRefusedNamingBothVersions() throws {
        let dir = TemporaryDirectory()
        defer { dir.remove() }
        _ = try StateStore(directory: dir.path)
        // A newer vmpool left a migration this one does not know.
        let db = try DatabaseQueue(path: dir.path + "/" + StateStore.fileName)
        try db.write { try $0.execute(sql: "INSERT INTO grdb_migrations (identifier) VALUES ('v99-from-the-future')") }
        do {
            _ = try StateStore(directory: dir.path)
            Issue.record("a newer schema was accepted")
        } catch {
            #expect(error.code == .newerSchema)
            #expect(
                error.message.contains("v99-from-the-future") && error.message.contains("v8-template-saved"),
                "\(error.message)")
        }
    }
}

@Suite("Store migrations under concurrent openers")
struct ConcurrentOpenTests {
    /// Two openers of one new store, released at the same instant, 40 times: each must see a
    /// complete schema and neither may fail (before migrations ran in one transaction, both
    /// decided the same migration was pending: `duplicate column name: host`).
    @Test func twoOpenersOfANewStoreBothSucceed() throws {
        let rounds = 40
        var failures: [String] = []
        for round in 0..<rounds {
            let dir = TemporaryDirectory()
            defer { dir.remove() }
            let start = DispatchSemaphore(value: 0)
            let done = DispatchGroup()
            let errors = Mutex<[String]>([])
            for _ in 0..<2 {
                done.enter()
                Thread.detachNewThread {
                    start.wait()
                    do {
                        let store = try StateStore(directory: dir.path)
                        _ = try store.pools()
                    } catch {
                        errors.withLock { $0.append("round \(round): \(error)") }
                    }
                    done.leave()
                }
            }
            start.signal()
            start.signal()
            #expect(done.wait(timeout: .now() + 60) == .success, "round \(round) did not finish")
            failures += errors.withLock { $0 }
        }
        print("concurrent openers: \(rounds * 2 - failures.count) of \(rounds * 2) opened a new store")
        #expect(failures.isEmpty, "\(failures.prefix(3))")
    }
}
