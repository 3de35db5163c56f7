import Foundation
import Synchronization
import VmpoolDriver
import VmpoolSpec

/// vmpool's memory: desired pools, VMs, templates, the operation journal and events.
///
/// The logic lives here once; where the tables live is a `StoreBackend`: SQLite in the state
/// dir (the default), or PostgreSQL shared by many hosts. Every method is one transaction.
public final class StateStore: Sendable {
    public let directory: String
    let backend: any StoreBackend
    /// The host this store's rows are written for (`--host`); empty on a single-host store.
    public let host: String
    /// This host's epoch once it has joined the cluster: every write checks that the cluster
    /// has not declared the host dead since (fencing), and fails if it has.
    let epoch = Mutex<Int64?>(nil)

    public static let fileName = "state.sqlite"

    /// Opens (creating when absent) the SQLite store in `directory`, which is created mode 0700.
    public convenience init(directory: String) throws(StoreError) {
        try StateDirectory.prepare(directory)
        let backend: SQLiteBackend
        do {
            backend = try SQLiteBackend(path: directory + "/" + Self.fileName)
        } catch {
            throw StoreError(.database, "cannot open the state store in \(directory): \(error)")
        }
        try self.init(directory: directory, backend: backend)
    }

    /// Opens the store `backend` keeps, migrating its schema; `directory` is the state dir of
    /// this host's runtime files.
    public init(directory: String, backend: any StoreBackend, host: String = "") throws(StoreError) {
        self.directory = directory
        self.backend = backend
        self.host = host
        do {
            let applied = try backend.appliedMigrations()
            let known = Set(Self.migrations.map(\.identifier))
            if let newer = applied.subtracting(known).sorted().last {
                throw StoreError(
                    .newerSchema,
                    "the state store \(backend.location) was written by a newer vmpool (schema \(newer)); this vmpool"
                        + " knows up to \(Self.migrations.last?.identifier ?? "none"): use the newer vmpool")
            }
            try backend.migrate(Self.migrations)
        } catch let error as StoreError {
            backend.close()
            throw error
        } catch {
            backend.close()
            throw StoreError(.database, "cannot open the state store \(backend.location): \(error)")
        }
    }

    func read<T>(_ body: (any SQLTransaction) throws -> T) throws(StoreError) -> T {
        do {
            return try backend.read(body)
        } catch let error as StoreError {
            throw error
        } catch {
            throw StoreError(.database, "reading the state store failed: \(error)")
        }
    }

    /// One write transaction; on a host that has joined a cluster, only while the cluster
    /// still counts the host as alive with the epoch it joined with.
    func write<T>(_ body: (any SQLTransaction) throws -> T) throws(StoreError) -> T {
        let joined = epoch.withLock { $0 }
        do {
            return try backend.write { db in
                if let joined { try self.checkEpoch(db, joined) }
                return try body(db)
            }
        } catch let error as StoreError {
            throw error
        } catch {
            throw StoreError(.database, "writing the state store failed: \(error)")
        }
    }

    /// Change notices from the other hosts of a shared store (`nil` on SQLite).
    public func watchChanges() -> (any ChangeWatch)? { backend.watchChanges() }

    // MARK: - Pools

    /// Every pool last applied, by name.
    public func pools() throws(StoreError) -> [StoredPool] {
        try read { db in
            try db.query("SELECT name, spec, generation, updatedAt, deleting FROM pool ORDER BY name")
                .map(Self.pool)
        }
    }

    /// Records the desired spec of each pool, bumping its generation where it changed.
    /// Returns the names whose spec changed.
    @discardableResult
    public func applyDesired(_ specs: [PoolSpec]) throws(StoreError) -> [String] {
        let now = Date().timeIntervalSince1970
        let encoded = try specs.map { spec throws(StoreError) in (spec, try Self.encode(spec)) }
        return try write { db in
            var changed: [String] = []
            for (spec, json) in encoded {
                let existing = try db.queryOne("SELECT spec, generation FROM pool WHERE name = ?", [spec.name])
                if let existing {
                    if try existing["spec"] as String == json {
                        try db.execute("UPDATE pool SET deleting = 0 WHERE name = ?", [spec.name])
                        continue
                    }
                    try db.execute(
                        "UPDATE pool SET spec = ?, generation = generation + 1, updatedAt = ?, deleting = 0"
                            + " WHERE name = ?", [json, now, spec.name])
                } else {
                    try db.execute(
                        "INSERT INTO pool (name, spec, generation, updatedAt) VALUES (?, ?, 1, ?)",
                        [spec.name, json, now])
                }
                try self.insertEventRow(db, Event(pool: spec.name, kind: "applied", message: "desired spec recorded"))
                changed.append(spec.name)
            }
            // Unchanged specs too: an apply may be what a pool that failed was waiting for.
            try self.backend.announceChange(db)
            return changed
        }
    }

    /// Records that pools are being deleted, so that a pass interrupted halfway is finished
    /// by the next one instead of bringing the pools back.
    public func markDeleting(_ names: Set<String>) throws(StoreError) {
        guard !names.isEmpty else { return }
        try write { db in
            for name in names {
                try db.execute("UPDATE pool SET deleting = 1 WHERE name = ?", [name])
            }
            try self.backend.announceChange(db)
        }
    }

    /// Forgets a pool. Its VMs and templates must be gone already.
    public func deletePool(_ name: String) throws(StoreError) {
        try write { db in
            try db.execute("DELETE FROM pool WHERE name = ?", [name])
            try db.execute("DELETE FROM template WHERE pool = ?", [name])
            try self.insertEventRow(db, Event(pool: name, kind: "deleted", message: "pool forgotten"))
        }
    }

    // MARK: - VMs

    /// VMs of one pool, or of all pools, oldest first.
    public func vms(pool: String? = nil) throws(StoreError) -> [VMRecord] {
        try read { db in
            let columns = Self.vmColumns
            let rows =
                if let pool {
                    try db.query(
                        "SELECT \(columns) FROM vm WHERE host = ? AND pool = ? ORDER BY createdAt, id", [host, pool])
                } else {
                    try db.query("SELECT \(columns) FROM vm WHERE host = ? ORDER BY createdAt, id", [host])
                }
            return try Self.vms(rows)
        }
    }

    /// Records a VM about to be launched (state `creating`) together with the journal entry
    /// for the launch, so a crash between the two cannot happen. Returns `nil` when the id is
    /// taken already; the caller picks another.
    ///
    /// `network` is allocated in the same transaction (forwarded host ports, an address on the
    /// bridge), so a crash can neither leak an allocation nor give one to two VMs; `portIsFree`
    /// says whether nothing else on the host listens on a candidate port.
    public func beginLaunch(
        _ record: VMRecord, operation: String, network: NetworkRequest? = nil,
        portIsFree: @escaping @Sendable (Int) -> Bool = { _ in true }
    ) throws(StoreError) -> (VMRecord, Int64)? {
        try write { db in
            if try db.exists("SELECT 1 FROM vm WHERE id = ?", [record.id]) {
                return nil
            }
            var record = record
            if let network {
                record.network = try self.allocate(db, network, vm: record.id, portIsFree: portIsFree)
            }
            try self.upsertVM(db, record)
            let journal = try self.insertJournal(
                db, operation: operation, pool: record.pool, vm: record.id, template: nil)
            return (record, journal)
        }
    }

    /// Host ports vmpool forwards from: above the kernel's usual ephemeral range's start is
    /// avoided, so that outgoing connections do not race for them.
    public static let forwardedPorts = 20000...32767

    /// Allocates what a VM's NIC needs, inside the caller's transaction.
    func allocate(
        _ db: any SQLTransaction, _ request: NetworkRequest, vm: String, portIsFree: (Int) -> Bool
    ) throws -> NetworkAssignment {
        var assignment = NetworkAssignment(mode: request.mode, mac: NetworkAssignment.mac(for: vm))
        for guest in request.ports {
            var chosen: Int?
            for _ in 0..<512 {
                let candidate = Int.random(in: Self.forwardedPorts)
                let taken =
                    try db.exists("SELECT 1 FROM hostport WHERE host = ? AND port = ?", [host, candidate])
                if !taken && portIsFree(candidate) {
                    chosen = candidate
                    break
                }
            }
            guard let port = chosen else {
                throw StoreError(.exhausted, "no free port on 127.0.0.1 to forward guest port \(guest) from")
            }
            try db.execute("INSERT INTO hostport (host, port, vm, guest) VALUES (?, ?, ?, ?)", [host, port, vm, guest])
            assignment.ports[guest] = port
        }
        if request.mode == .bridge, let bridge = request.bridge, let subnet = request.subnet {
            let used = Set(
                try db.query("SELECT address FROM address WHERE host = ? AND bridge = ?", [host, bridge]).map {
                    row throws in
                    try row["address"] as Int64
                })
            guard let index = (0..<subnet.assignable).first(where: { !used.contains(Int64(subnet.vmAddress($0))) })
            else {
                throw StoreError(.exhausted, "no free address left in \(subnet) on bridge \(bridge)")
            }
            let address = subnet.vmAddress(index)
            try db.execute(
                "INSERT INTO address (host, bridge, address, vm) VALUES (?, ?, ?, ?)",
                [host, bridge, Int64(address), vm])
            assignment.bridge = bridge
            assignment.address = IPv4Subnet.format(address)
            assignment.prefix = subnet.prefix
            assignment.gateway = IPv4Subnet.format(subnet.gateway)
            assignment.mac = NetworkAssignment.mac(for: vm, address: address)
        }
        return assignment
    }

    /// Forgets a VM's row and everything allocated to it.
    func deleteVMRow(_ db: any SQLTransaction, _ id: String) throws {
        try db.execute("DELETE FROM vm WHERE id = ?", [id])
        try db.execute("DELETE FROM hostport WHERE vm = ?", [id])
        try db.execute("DELETE FROM address WHERE vm = ?", [id])
    }

    /// Every host port and address allocated, by VM (for checks and recovery).
    public func allocations() throws(StoreError) -> (ports: [Int: String], addresses: [String: String]) {
        try read { db in
            var ports: [Int: String] = [:]
            for row in try db.query("SELECT port, vm FROM hostport WHERE host = ?", [host]) {
                ports[try row["port"]] = try row["vm"]
            }
            var addresses: [String: String] = [:]
            for row in try db.query("SELECT bridge, address, vm FROM address WHERE host = ?", [host]) {
                let address: Int64 = try row["address"]
                let bridge: String = try row["bridge"]
                addresses["\(bridge)/\(IPv4Subnet.format(UInt32(address)))"] = try row["vm"]
            }
            return (ports, addresses)
        }
    }

    // MARK: - Leases

    /// What a lease attempt found.
    public enum LeaseOutcome: Sendable {
        case leased(VMRecord)
        /// No VM of the pool is running and free.
        case noneReady
        /// Callers that asked earlier are still waiting for this pool: they go first.
        case waitYourTurn
    }

    /// Hands one running, unleased VM of `pool` to `holder`, in one transaction: no VM is ever
    /// leased twice. `ticket` is the caller's place in the pool's queue (`enqueueLeaseWait`);
    /// a caller without one, or behind a live earlier caller, gets nothing while others wait.
    /// The lease is journaled until `closeLeaseJournal` says the holder has the VM's id.
    public func lease(pool: String, holder: String, ttl: Duration?, ticket: Int64? = nil) throws(StoreError)
        -> LeaseOutcome
    {
        try write { db in
            guard
                try db.exists("SELECT 1 FROM pool WHERE name = ? AND deleting = 0", [pool])
            else {
                throw StoreError(.notFound, "no pool named \"\(pool)\" has been applied")
            }
            let now = Date().timeIntervalSince1970
            if let ticket { try db.execute("UPDATE leasewait SET seenAt = ? WHERE id = ?", [now, ticket]) }
            for waiter in try db.query(
                "SELECT id, pid, host, seenAt FROM leasewait WHERE pool = ? ORDER BY id", [pool])
            {
                let id: Int64 = try waiter["id"]
                if id == ticket { break }
                let pid: Int32 = try waiter["pid"]
                let waiterHost: String = try waiter["host"]
                let seenAt: Double = try waiter["seenAt"]
                // A waiter that died gives up its place: on this host, its process is gone; on
                // another, it has not asked again for longer than any waiter's poll.
                let dead =
                    waiterHost == host
                    ? kill(pid, 0) != 0 && errno == ESRCH : now - seenAt > Self.waiterSilence.seconds
                if dead {
                    try db.execute("DELETE FROM leasewait WHERE id = ?", [id])
                    continue
                }
                return .waitYourTurn
            }
            guard
                let row = try db.queryOne(
                    // Not a VM a pass is acting on (an open journal entry): pausing, stopping.
                    """
                    SELECT \(Self.vmColumns) FROM vm
                    WHERE pool = ? AND state = 'running' AND leaseHolder IS NULL AND enteredAt IS NULL
                        AND NOT EXISTS (SELECT 1 FROM journal WHERE journal.vm = vm.id AND journal.finishedAt IS NULL)
                    ORDER BY createdAt, id LIMIT 1
                    """, [pool])
            else { return .noneReady }
            var record = try Self.vm(row)
            let leasedAt = Date()
            record.lease = Lease(
                holder: holder, leasedAt: leasedAt, expiresAt: ttl.map { leasedAt.addingTimeInterval($0.seconds) })
            try self.writeLease(db, record)
            if let ticket { try db.execute("DELETE FROM leasewait WHERE id = ?", [ticket]) }
            _ = try self.insertJournal(db, operation: "lease", pool: pool, vm: record.id, template: nil)
            try self.insertEventRow(
                db,
                Event(
                    pool: pool, vm: record.id, kind: "leased",
                    message: "to \(holder)" + (record.lease?.expiresAt.map { " until \(Self.rfc3339($0))" } ?? "")))
            // The VM's host refills its pool now.
            try self.backend.announceChange(db)
            return .leased(record)
        }
    }

    /// Closes the journal entry of the lease of `vm`: its holder has the id (ok), or the lease
    /// was given up (failed). An entry a dead vmpool left open is a lease nobody received.
    public func closeLeaseJournal(vm: String, outcome: JournalEntry.Outcome, error: String? = nil) throws(StoreError) {
        try write { db in
            try db.execute(
                """
                UPDATE journal SET finishedAt = ?, outcome = ?, error = ?
                WHERE operation = 'lease' AND vm = ? AND finishedAt IS NULL
                """, [Date().timeIntervalSince1970, outcome.rawValue, error, vm])
        }
    }

    /// How long a waiter on another host may go without asking before it loses its place.
    public static let waiterSilence = Duration.seconds(10)

    /// Takes a place in `pool`'s queue of callers waiting for a VM (`lease --wait`).
    public func enqueueLeaseWait(pool: String, holder: String) throws(StoreError) -> Int64 {
        try write { db in
            try db.insertReturningID(
                "INSERT INTO leasewait (pool, holder, pid, since, host, seenAt) VALUES (?, ?, ?, ?, ?, ?)",
                [pool, holder, getpid(), Date().timeIntervalSince1970, host, Date().timeIntervalSince1970])
        }
    }

    public func dequeueLeaseWait(_ ticket: Int64) throws(StoreError) {
        try write { db in try db.execute("DELETE FROM leasewait WHERE id = ?", [ticket]) }
    }

    /// Callers waiting for a VM of each pool.
    public func leaseWaiters() throws(StoreError) -> [String: Int] {
        try read { db in
            var result: [String: Int] = [:]
            for row in try db.query("SELECT pool, count(*) AS n FROM leasewait GROUP BY pool") {
                result[try row["pool"]] = try row["n"]
            }
            return result
        }
    }

    /// Ends a lease: the VM is marked stopping (a VM one consumer used is never handed to
    /// another) and keeps its lease, so that no pass counts it toward its pool; the caller
    /// stops it, or the next pass's recovery does.
    public func release(_ id: String) throws(StoreError) -> VMRecord {
        try write { db in
            guard let row = try db.queryOne("SELECT \(Self.vmColumns) FROM vm WHERE id = ?", [id])
            else { throw StoreError(.notFound, "no VM named \"\(id)\"") }
            var record = try Self.vm(row)
            guard let lease = record.lease else { throw StoreError(.conflict, "VM \(id) is not leased") }
            guard record.state != .stopping else { return record }
            record.state = .stopping
            try self.upsertVM(db, record)
            try self.insertEventRow(
                db, Event(pool: record.pool, vm: id, kind: "released", message: "by \(lease.holder); the VM is stopped")
            )
            try self.backend.announceChange(db)
            return record
        }
    }

    /// Records that `command` (exec, cp, console) entered VM `id`, unless it is leased (its
    /// holder may do as they like) or was entered before. In the same store as the leases, so
    /// a lease either came first (and this records nothing) or never takes the VM. Returns
    /// whether it was recorded now.
    @discardableResult
    public func markEntered(_ id: String, by command: String) throws(StoreError) -> Bool {
        try write { db in
            guard
                let row = try db.queryOne(
                    "SELECT pool FROM vm WHERE id = ? AND leaseHolder IS NULL AND enteredAt IS NULL", [id])
            else { return false }
            try db.execute(
                "UPDATE vm SET enteredAt = ?, enteredBy = ? WHERE id = ?", [Date().timeIntervalSince1970, command, id])
            try self.insertEventRow(
                db,
                Event(
                    pool: try row["pool"], vm: id, kind: "entered",
                    message: "\(command) while not leased; the VM is replaced before anyone can lease it"))
            try self.backend.announceChange(db)
            return true
        }
    }

    static func rfc3339(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        return formatter.string(from: date)
    }

    // MARK: - Bridges

    /// Records a bridge vmpool uses; `createdByVmpool` marks one it made (and removes when no
    /// pool uses it any more).
    public func recordBridge(_ name: String, subnet: String, createdByVmpool: Bool) throws(StoreError) {
        try write { db in
            try db.execute(
                """
                INSERT INTO bridge (host, name, subnet, createdByVmpool) VALUES (?, ?, ?, ?)
                ON CONFLICT (host, name) DO UPDATE SET createdByVmpool =
                    CASE WHEN excluded.createdByVmpool > bridge.createdByVmpool
                    THEN excluded.createdByVmpool ELSE bridge.createdByVmpool END
                """, [host, name, subnet, createdByVmpool])
        }
    }

    public func bridges() throws(StoreError) -> [(name: String, subnet: String, createdByVmpool: Bool)] {
        try read { db in
            try db.query("SELECT * FROM bridge WHERE host = ? ORDER BY name", [host]).map {
                (try $0["name"], try $0["subnet"], try $0["createdByVmpool"])
            }
        }
    }

    public func forgetBridge(_ name: String) throws(StoreError) {
        try write { db in try db.execute("DELETE FROM bridge WHERE host = ? AND name = ?", [host, name]) }
    }

    /// One VM by id.
    public func vm(_ id: String) throws(StoreError) -> VMRecord? {
        try read { db in
            try db.queryOne("SELECT \(Self.vmColumns) FROM vm WHERE id = ?", [id]).map { try Self.vm($0) }
        }
    }

    /// Writes a VM's new facts and closes a journal entry in one transaction.
    public func finish(
        _ journal: Int64, outcome: JournalEntry.Outcome, error: String? = nil, updating record: VMRecord? = nil,
        deletingVM: String? = nil, event: Event? = nil
    ) throws(StoreError) {
        try write { db in
            if let record { try self.upsertVM(db, record) }
            if let deletingVM { try self.deleteVMRow(db, deletingVM) }
            try self.closeJournal(db, journal, outcome: outcome, error: error)
            if let event { try self.insertEventRow(db, event) }
        }
    }

    /// Opens a journal entry for an operation on an existing VM or template.
    public func begin(operation: String, pool: String, vm: String? = nil, template: String? = nil)
        throws(StoreError) -> Int64
    {
        try write { db in try self.insertJournal(db, operation: operation, pool: pool, vm: vm, template: template) }
    }

    /// Opens a journal entry for `operation` on the existing VM `id`, provided the VM is still
    /// leased, or not, as the caller planned: `nil` when a lease came (or ended) meanwhile, or
    /// the VM is gone. A lease never takes a VM with an open entry, so once this returns an
    /// entry the VM stays as planned until the entry is closed. `stopping` marks the VM
    /// stopping in the same transaction. Returns the VM as stored now, and the entry.
    public func beginOnVM(_ id: String, operation: String, plannedLeased: Bool, stopping: Bool = false)
        throws(StoreError) -> (VMRecord, Int64)?
    {
        try write { db in
            guard let row = try db.queryOne("SELECT \(Self.vmColumns) FROM vm WHERE id = ?", [id]) else { return nil }
            var record = try Self.vm(row)
            guard (record.lease != nil) == plannedLeased else { return nil }
            if stopping && record.state != .stopping {
                record.state = .stopping
                try self.upsertVM(db, record)
            }
            let journal = try self.insertJournal(
                db, operation: operation, pool: record.pool, vm: record.id, template: nil)
            return (record, journal)
        }
    }

    /// Writes a VM record outside any operation (recovery, adoption).
    public func saveVM(_ record: VMRecord) throws(StoreError) {
        try write { db in try self.upsertVM(db, record) }
    }

    public func deleteVM(_ id: String) throws(StoreError) {
        try write { db in try self.deleteVMRow(db, id) }
    }

    // MARK: - Templates

    public func templates() throws(StoreError) -> [TemplateRecord] {
        try read { db in
            try db.query(
                "SELECT id, pool, key, state, createdAt, savedAt FROM template WHERE host = ? ORDER BY createdAt",
                [host]
            )
            .map(Self.template)
        }
    }

    /// Records a template about to be built, with its journal entry.
    public func beginTemplate(_ record: TemplateRecord) throws(StoreError) -> Int64 {
        let key = try Self.encode(record.ref.key)
        return try write { db in
            try db.execute(
                """
                INSERT INTO template (id, pool, key, state, createdAt, host) VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT (id) DO UPDATE SET
                    pool = excluded.pool, key = excluded.key, state = excluded.state, createdAt = excluded.createdAt
                """,
                [
                    record.ref.id, record.ref.pool, key, record.state.rawValue, record.createdAt.timeIntervalSince1970,
                    host,
                ])
            return try self.insertJournal(
                db, operation: "build-template", pool: record.ref.pool, vm: nil, template: record.ref.id)
        }
    }

    /// Records that the template's state was saved, now: it is ready to clone from.
    public func markTemplateReady(_ id: String, at savedAt: Date = Date()) throws(StoreError) {
        try write { db in
            try db.execute(
                "UPDATE template SET state = 'ready', savedAt = ? WHERE id = ?", [savedAt.timeIntervalSince1970, id])
        }
    }

    public func deleteTemplate(_ id: String) throws(StoreError) {
        try write { db in try db.execute("DELETE FROM template WHERE id = ?", [id]) }
    }

    // MARK: - Standbys

    /// Every standby, oldest first.
    public func standbys() throws(StoreError) -> [StandbyRecord] {
        try read { db in
            try db.query("SELECT * FROM standby WHERE host = ? ORDER BY createdAt, id", [host]).map { row in
                StandbyRecord(
                    id: try row["id"], pool: try row["pool"], template: try row["template"], pid: try row["pid"],
                    ready: try row["ready"], createdAt: Date(timeIntervalSince1970: try row["createdAt"]))
            }
        }
    }

    /// Records a standby about to be started; `false` when the id is taken by a VM or standby.
    public func beginStandby(id: String, pool: String, template: String) throws(StoreError) -> Bool {
        try write { db in
            let taken =
                try db.exists("SELECT 1 FROM vm WHERE id = ? UNION SELECT 1 FROM standby WHERE id = ?", [id, id])
            if taken { return false }
            try db.execute(
                "INSERT INTO standby (id, pool, template, createdAt, host) VALUES (?, ?, ?, ?, ?)",
                [id, pool, template, Date().timeIntervalSince1970, host])
            return true
        }
    }

    public func markStandbyReady(_ id: String, pid: Int32?) throws(StoreError) {
        try write { db in
            try db.execute("UPDATE standby SET ready = 1, pid = ? WHERE id = ?", [pid.map { Int64($0) }, id])
        }
    }

    public func deleteStandby(_ id: String) throws(StoreError) {
        try write { db in try db.execute("DELETE FROM standby WHERE id = ?", [id]) }
    }

    /// Turns a ready standby of `template` into the VM `record` describes (taking the
    /// standby's id), journaled as a clone, in one transaction. `nil` when none is ready.
    public func claimStandby(
        template: String, for record: VMRecord, network: NetworkRequest? = nil,
        portIsFree: @escaping @Sendable (Int) -> Bool = { _ in true }
    ) throws(StoreError) -> (VMRecord, Int64)? {
        try write { db in
            guard
                let row = try db.queryOne(
                    "SELECT id, pid FROM standby WHERE host = ? AND template = ? AND ready = 1 ORDER BY createdAt LIMIT 1",
                    [host, template])
            else { return nil }
            var claimed = record
            claimed.id = try row["id"]
            claimed.pid = try row["pid"]
            if let network {
                claimed.network = try self.allocate(db, network, vm: claimed.id, portIsFree: portIsFree)
            }
            try db.execute("DELETE FROM standby WHERE id = ?", [claimed.id])
            try self.upsertVM(db, claimed)
            let journal = try self.insertJournal(
                db, operation: "clone", pool: claimed.pool, vm: claimed.id, template: template)
            return (claimed, journal)
        }
    }

    // MARK: - Journal

    /// Closes a journal entry without touching VM records.
    public func finish(_ journal: Int64, outcome: JournalEntry.Outcome, error: String? = nil) throws(StoreError) {
        try write { db in try self.closeJournal(db, journal, outcome: outcome, error: error) }
    }

    /// Journal entries whose operation never reported back: a vmpool died during them.
    public func unfinishedOperations() throws(StoreError) -> [JournalEntry] {
        try read { db in
            try db.query("SELECT * FROM journal WHERE finishedAt IS NULL AND host = ? ORDER BY id", [host]).map(
                Self.journal)
        }
    }

    /// The most recent journal entries, newest first.
    public func journal(limit: Int = 100) throws(StoreError) -> [JournalEntry] {
        try read { db in
            try db.query("SELECT * FROM journal ORDER BY id DESC LIMIT ?", [limit]).map(
                Self.journal)
        }
    }

    // MARK: - Events

    public func record(_ event: Event) throws(StoreError) {
        try write { db in try self.insertEventRow(db, event) }
    }

    /// Events in the order they happened: of `pool` or `vm` (or all), at or after `since`, after
    /// the event `afterID` (to follow new ones), at most `limit` of the newest.
    public func events(
        pool: String? = nil, vm: String? = nil, since: Date? = nil, afterID: Int64 = 0, limit: Int = 1000
    ) throws(StoreError) -> [Event] {
        try read { db in
            var conditions = ["id > ?"]
            var arguments: [any SQLBindable] = [afterID]
            if let pool {
                conditions.append("pool = ?")
                arguments.append(pool)
            }
            if let vm {
                conditions.append("vm = ?")
                arguments.append(vm)
            }
            if let since {
                conditions.append("at >= ?")
                arguments.append(since.timeIntervalSince1970)
            }
            let sql =
                "SELECT * FROM (SELECT * FROM event WHERE \(conditions.joined(separator: " AND "))"
                + " ORDER BY id DESC LIMIT ?) AS recent ORDER BY id"
            arguments.append(limit)
            return try db.query(sql, arguments).map(Self.event)
        }
    }

    private static func event(_ row: SQLRow) throws -> Event {
        var event = Event(
            at: Date(timeIntervalSince1970: try row["at"]), pool: try row["pool"], vm: try row["vm"],
            kind: try row["kind"], message: try row["message"])
        event.id = try row["id"] as Int64
        return event
    }

    // MARK: - Rows

    func insertJournal(
        _ db: any SQLTransaction, operation: String, pool: String, vm: String?, template: String?
    ) throws -> Int64 {
        try db.insertReturningID(
            "INSERT INTO journal (operation, pool, vm, template, startedAt, ownerPid, host) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [operation, pool, vm, template, Date().timeIntervalSince1970, getpid(), host])
    }

    func closeJournal(
        _ db: any SQLTransaction, _ id: Int64, outcome: JournalEntry.Outcome, error: String?
    ) throws {
        try db.execute(
            "UPDATE journal SET finishedAt = ?, outcome = ?, error = ? WHERE id = ?",
            [Date().timeIntervalSince1970, outcome.rawValue, error, id])
    }

    func insertEventRow(_ db: any SQLTransaction, _ event: Event) throws {
        try db.execute(
            "INSERT INTO event (at, pool, vm, kind, message, host) VALUES (?, ?, ?, ?, ?, ?)",
            [event.at.timeIntervalSince1970, event.pool, event.vm, event.kind, event.message, host])
    }

    /// Writes a VM's row. Its lease is written when the row is new, and otherwise only by
    /// `lease` and `release`: a pass that read the VM before a lease took it cannot undo the
    /// lease by writing what it read.
    func upsertVM(_ db: any SQLTransaction, _ r: VMRecord) throws {
        try db.execute(
            """
            INSERT INTO vm (id, pool, state, boot, vcpus, memoryMiB, maxVcpus, maxMemoryMiB, kernel,
                initrd, cmdline, pid, templateId, createdAt, updatedAt, lastError, shape, network, leaseHolder,
                leasedAt, leaseExpiresAt, host)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (id) DO UPDATE SET
                pool = excluded.pool, state = excluded.state, boot = excluded.boot, vcpus = excluded.vcpus,
                memoryMiB = excluded.memoryMiB, maxVcpus = excluded.maxVcpus, maxMemoryMiB = excluded.maxMemoryMiB,
                kernel = excluded.kernel, initrd = excluded.initrd, cmdline = excluded.cmdline, pid = excluded.pid,
                templateId = excluded.templateId, createdAt = excluded.createdAt, updatedAt = excluded.updatedAt,
                lastError = excluded.lastError, shape = excluded.shape, network = excluded.network
            """,
            [
                r.id, r.pool, r.state.rawValue, r.boot.rawValue, r.shape.vcpus, r.shape.memoryMiB, r.shape.maxVcpus,
                r.shape.maxMemoryMiB, r.shape.image.kernel, r.shape.image.initrd, r.shape.image.cmdline,
                r.pid.map { Int64($0) }, r.templateID, r.createdAt.timeIntervalSince1970,
                Date().timeIntervalSince1970, r.lastError, try Self.encode(r.shape),
                try r.network.map { try Self.encode($0) },
                r.lease?.holder, r.lease?.leasedAt.timeIntervalSince1970, r.lease?.expiresAt?.timeIntervalSince1970,
                r.host.isEmpty ? host : r.host,
            ])
    }

    /// Writes the lease columns of `r` (a lease given or ended).
    private func writeLease(_ db: any SQLTransaction, _ r: VMRecord) throws {
        try db.execute(
            "UPDATE vm SET leaseHolder = ?, leasedAt = ?, leaseExpiresAt = ?, updatedAt = ? WHERE id = ?",
            [
                r.lease?.holder, r.lease?.leasedAt.timeIntervalSince1970, r.lease?.expiresAt?.timeIntervalSince1970,
                Date().timeIntervalSince1970, r.id,
            ])
    }

    static let vmColumns =
        "id, pool, state, boot, vcpus, memoryMiB, maxVcpus, maxMemoryMiB, kernel, initrd, cmdline, pid, templateId,"
        + " createdAt, updatedAt, lastError, shape, network, leaseHolder, leasedAt, leaseExpiresAt, host, enteredAt,"
        + " enteredBy"

    /// Decoded VM shapes by their JSON text: a pool's VMs share a shape, which a read of
    /// many VMs then decodes once rather than once a VM (most of a no-op pass's time).
    final class ShapeCache {
        var shapes: [String: VMShape] = [:]
    }

    static func vms(_ rows: [SQLRow]) throws -> [VMRecord] {
        let shapes = ShapeCache()
        return try rows.map { try vm($0, shapes: shapes) }
    }

    static func vm(_ row: SQLRow, shapes: ShapeCache? = nil) throws -> VMRecord {
        let id: String = try row["id"]
        guard let state = VMState(rawValue: try row["state"]), let boot = BootMode(rawValue: try row["boot"]) else {
            throw StoreError(.corrupt, "VM \(id) has an unknown state or boot mode")
        }
        let shape: VMShape
        if let json: String = try row["shape"] {
            if let known = shapes?.shapes[json] {
                shape = known
            } else {
                shape = try decode(json)
                shapes?.shapes[json] = shape
            }
        } else {
            let image = BootImage(kernel: try row["kernel"], initrd: try row["initrd"], cmdline: try row["cmdline"])
            shape = VMShape(
                vcpus: try row["vcpus"], memoryMiB: try row["memoryMiB"], maxVcpus: try row["maxVcpus"],
                maxMemoryMiB: try row["maxMemoryMiB"], image: image)
        }
        let pid: Int32? = try row["pid"]
        let network: NetworkAssignment? = try (try row["network"] as String?).map { try decode($0) }
        var lease: Lease?
        if let holder: String = try row["leaseHolder"], let at: Double = try row["leasedAt"] {
            let expires: Double? = try row["leaseExpiresAt"]
            lease = Lease(
                holder: holder, leasedAt: Date(timeIntervalSince1970: at),
                expiresAt: expires.map { Date(timeIntervalSince1970: $0) })
        }
        var entered: VMRecord.Entry?
        if let at: Double = try row["enteredAt"] {
            entered = VMRecord.Entry(by: try row["enteredBy"] ?? "?", at: Date(timeIntervalSince1970: at))
        }
        return VMRecord(
            id: id, pool: try row["pool"], state: state, boot: boot, shape: shape, pid: pid,
            templateID: try row["templateId"], createdAt: Date(timeIntervalSince1970: try row["createdAt"]),
            updatedAt: Date(timeIntervalSince1970: try row["updatedAt"]), lastError: try row["lastError"],
            network: network, lease: lease, host: try row["host"], entered: entered)
    }

    private static func pool(_ row: SQLRow) throws -> StoredPool {
        let spec: PoolSpec = try decode(try row["spec"])
        return StoredPool(
            spec: spec, generation: try row["generation"], updatedAt: Date(timeIntervalSince1970: try row["updatedAt"]),
            deleting: try row["deleting"])
    }

    private static func template(_ row: SQLRow) throws -> TemplateRecord {
        let key: TemplateKey = try decode(try row["key"])
        let id: String = try row["id"]
        guard let state = TemplateRecord.State(rawValue: try row["state"]) else {
            throw StoreError(.corrupt, "template \(id) has an unknown state")
        }
        let savedAt: Double? = try row["savedAt"]
        return TemplateRecord(
            ref: TemplateRef(id: id, pool: try row["pool"], key: key), state: state,
            createdAt: Date(timeIntervalSince1970: try row["createdAt"]),
            savedAt: savedAt.map { Date(timeIntervalSince1970: $0) })
    }

    private static func journal(_ row: SQLRow) throws -> JournalEntry {
        let finished: Double? = try row["finishedAt"]
        let outcome: String? = try row["outcome"]
        return JournalEntry(
            id: try row["id"], operation: try row["operation"], pool: try row["pool"], vm: try row["vm"],
            template: try row["template"], startedAt: Date(timeIntervalSince1970: try row["startedAt"]),
            finishedAt: finished.map { Date(timeIntervalSince1970: $0) },
            outcome: outcome.flatMap(JournalEntry.Outcome.init(rawValue:)), error: try row["error"],
            ownerPID: try row["ownerPid"])
    }

    static func encode<T: Encodable>(_ value: T) throws(StoreError) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        do {
            return String(decoding: try encoder.encode(value), as: UTF8.self)
        } catch {
            throw StoreError(.corrupt, "cannot encode \(T.self): \(error)")
        }
    }

    static func decode<T: Decodable>(_ text: String) throws -> T {
        do {
            return try JSONDecoder().decode(T.self, from: Data(text.utf8))
        } catch {
            throw StoreError(.corrupt, "cannot decode a stored \(T.self): \(error)")
        }
    }
}
