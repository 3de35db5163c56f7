import Foundation
import VmpoolDriver
import VmpoolSpec

/// Templates and standbys: a pool's saved template VMs, and the hypervisor processes started
/// ahead of its clones.
extension StateStore {
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
}
