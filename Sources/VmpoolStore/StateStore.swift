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
}
