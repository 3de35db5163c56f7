import Foundation
import VmpoolDriver
import VmpoolSpec

/// Leases: handing one ready VM to one holder, the queue of callers waiting for one, releases,
/// and VMs someone entered.
extension StateStore {
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
                    ? LocalProcess.isGone(pid) : now - seenAt > Self.waiterSilence.seconds
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
}
