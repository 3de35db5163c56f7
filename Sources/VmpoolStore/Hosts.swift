import Foundation
import VmpoolDriver

/// What a host offers the cluster's VMs (`--capacity vcpus=N,memory=SIZE`).
public struct HostCapacity: Sendable, Hashable {
    public var vcpus: Int
    public var memoryMiB: Int

    public init(vcpus: Int, memoryMiB: Int) {
        self.vcpus = vcpus
        self.memoryMiB = memoryMiB
    }
}

/// A host of a cluster, as the store knows it.
public struct HostRecord: Sendable, Hashable {
    public var name: String
    /// Bumped each time the cluster declares the host dead: writes the host makes with an
    /// older epoch are refused.
    public var epoch: Int64
    public var capacity: HostCapacity
    public var heartbeatAt: Date
    public var registeredAt: Date
    /// When the cluster declared it dead and re-placed its VMs; `nil` while it counts.
    public var fencedAt: Date?

    public init(
        name: String, epoch: Int64, capacity: HostCapacity, heartbeatAt: Date, registeredAt: Date,
        fencedAt: Date? = nil
    ) {
        self.name = name
        self.epoch = epoch
        self.capacity = capacity
        self.heartbeatAt = heartbeatAt
        self.registeredAt = registeredAt
        self.fencedAt = fencedAt
    }

    /// Alive: not fenced, and heard from within `timeout` of `now`.
    public func isAlive(timeout: Duration, now: Date = Date()) -> Bool {
        fencedAt == nil && now.timeIntervalSince(heartbeatAt) <= timeout.seconds
    }
}

/// How many of a pool's VMs one host runs, and how many warm spares it keeps.
public struct PlacementRecord: Sendable, Hashable {
    public var pool: String
    public var host: String
    public var size: Int
    public var warm: Int

    public init(pool: String, host: String, size: Int, warm: Int) {
        self.pool = pool
        self.host = host
        self.size = size
        self.warm = warm
    }
}

extension StateStore {
    /// Joins the cluster as `host` (or heartbeats a host that joined before), offering
    /// `capacity`. A host the cluster declared dead meanwhile rejoins with the epoch the
    /// cluster gave it: its old rows are gone, so whatever it still runs is an orphan its next
    /// recovery stops. Returns `true` when the host had been declared dead.
    @discardableResult
    public func join(capacity: HostCapacity) throws(StoreError) -> Bool {
        let now = Date().timeIntervalSince1970
        let result: (epoch: Int64, fenced: Bool) = try backend.writeChecked(self) { db in
            if let row = try db.queryOne("SELECT epoch, fencedAt FROM host WHERE name = ?", [self.host]) {
                let fencedAt: Double? = try row["fencedAt"]
                try db.execute(
                    "UPDATE host SET vcpus = ?, memoryMiB = ?, heartbeatAt = \(self.backend.clockSQL), fencedAt = NULL"
                        + " WHERE name = ?", [capacity.vcpus, capacity.memoryMiB, self.host])
                if fencedAt != nil {
                    try self.insertEventRow(
                        db,
                        Event(
                            pool: "", kind: "host-rejoined",
                            message:
                                "host \(self.host) rejoined; the cluster had declared it dead and re-placed its VMs"))
                    // The placer may place VMs that fit nowhere on it now.
                    try self.backend.announceChange(db)
                }
                return (try row["epoch"], fencedAt != nil)
            }
            try db.execute(
                """
                INSERT INTO host (name, epoch, vcpus, memoryMiB, heartbeatAt, registeredAt)
                VALUES (?, 1, ?, ?, \(self.backend.clockSQL), ?)
                """, [self.host, capacity.vcpus, capacity.memoryMiB, now])
            try self.insertEventRow(
                db,
                Event(
                    pool: "", kind: "host-joined",
                    message: "host \(self.host) joined with \(capacity.vcpus) vcpus, \(capacity.memoryMiB) MiB"))
            try self.backend.announceChange(db)
            return (1, false)
        }
        epoch.withLock { $0 = result.epoch }
        return result.fenced
    }

    /// Tells the cluster this host is alive. Fails with `.fenced` when it was declared dead
    /// meanwhile (the caller rejoins), or when the store cannot be reached.
    public func heartbeat() throws(StoreError) {
        guard let joined = epoch.withLock({ $0 }) else { return }
        try write { db in
            try db.execute(
                "UPDATE host SET heartbeatAt = \(self.backend.clockSQL) WHERE name = ? AND epoch = ?",
                [self.host, joined])
        }
    }

    /// Whether this host has joined a cluster (and writes are checked against its epoch).
    public var hasJoined: Bool { epoch.withLock { $0 != nil } }

    func checkEpoch(_ db: any SQLTransaction, _ joined: Int64) throws {
        let row = try db.queryOne("SELECT epoch, fencedAt FROM host WHERE name = ?", [host])
        let current: Int64? = try row?["epoch"]
        let fencedAt: Double? = try row?["fencedAt"]
        guard current == joined && fencedAt == nil else {
            let when = fencedAt.map { " at \(Self.rfc3339(Date(timeIntervalSince1970: $0)))" } ?? ""
            throw StoreError(
                .fenced,
                "the cluster declared host \(host) dead\(when) and re-placed its VMs; it rejoins on its next pass")
        }
    }

    /// Takes (or confirms this process holds) the placer lock: one process at a time places
    /// the cluster's VMs on its hosts.
    public func tryBecomePlacer() throws(StoreError) -> Bool {
        do {
            return try backend.tryHoldPlacerLock()
        } catch let error as StoreError {
            throw error
        } catch {
            throw StoreError(.database, "taking the placer lock failed: \(error)")
        }
    }

    /// Every host of the cluster, by name. Heartbeats are stamped with the database's clock;
    /// `heartbeatAt` is given on this host's clock (now, less the heartbeat's age), so that
    /// hosts whose clocks disagree still agree on which host is silent.
    public func hosts() throws(StoreError) -> [HostRecord] {
        try read { db in
            let now = Date()
            return try db.query("SELECT *, \(self.backend.clockSQL) AS clock FROM host ORDER BY name").map { row in
                let fenced: Double? = try row["fencedAt"]
                let age = max(0, (try row["clock"] as Double) - (try row["heartbeatAt"] as Double))
                return HostRecord(
                    name: try row["name"], epoch: try row["epoch"],
                    capacity: HostCapacity(vcpus: try row["vcpus"], memoryMiB: try row["memoryMiB"]),
                    heartbeatAt: now.addingTimeInterval(-age),
                    registeredAt: Date(timeIntervalSince1970: try row["registeredAt"]),
                    fencedAt: fenced.map { Date(timeIntervalSince1970: $0) })
            }
        }
    }

    /// Declares `host` dead: its epoch is bumped (so nothing it writes counts any more), and
    /// its VMs, templates, standbys, allocations and placements are forgotten, to be placed
    /// again on live hosts. Its unfinished journal entries are closed.
    public func fence(_ name: String, reason: String) throws(StoreError) {
        try write { db in
            let now = Date().timeIntervalSince1970
            try db.execute("UPDATE host SET epoch = epoch + 1, fencedAt = ? WHERE name = ?", [now, name])
            let vms = try db.query("SELECT count(*) AS n FROM vm WHERE host = ?", [name]).first?["n"] as Int? ?? 0
            for table in ["vm", "template", "standby", "hostport", "address", "bridge", "placement"] {
                try db.execute("DELETE FROM \(table) WHERE host = ?", [name])
            }
            try db.execute(
                "UPDATE journal SET finishedAt = ?, outcome = 'recovered', error = ? WHERE host = ? AND finishedAt IS NULL",
                [now, "host \(name) was declared dead", name])
            try self.insertEventRow(
                db,
                Event(
                    pool: "", kind: "host-lost",
                    message:
                        "host \(name) declared dead (\(reason)); its \(vms) VM\(vms == 1 ? "" : "s") are placed again"))
        }
    }

    /// Every VM of every host (of one pool), oldest first: what `get` and `describe` show.
    public func allVMs(pool: String? = nil) throws(StoreError) -> [VMRecord] {
        try read { db in
            let rows =
                if let pool {
                    try db.query("SELECT \(Self.vmColumns) FROM vm WHERE pool = ? ORDER BY createdAt, id", [pool])
                } else {
                    try db.query("SELECT \(Self.vmColumns) FROM vm ORDER BY createdAt, id")
                }
            return try Self.vms(rows)
        }
    }

    /// What leased VMs take of each host (they count toward no pool, but use the host).
    public func leasedUsage() throws(StoreError) -> [String: HostCapacity] {
        try read { db in
            var result: [String: HostCapacity] = [:]
            for row in try db.query(
                """
                SELECT host, sum(vcpus) AS vcpus, sum(memoryMiB) AS memory FROM vm
                WHERE leaseHolder IS NOT NULL GROUP BY host
                """)
            {
                result[try row["host"]] = HostCapacity(vcpus: try row["vcpus"], memoryMiB: try row["memory"])
            }
            return result
        }
    }

    // MARK: - Placement

    public func placements() throws(StoreError) -> [PlacementRecord] {
        try read { db in
            try db.query("SELECT * FROM placement ORDER BY pool, host").map { row in
                PlacementRecord(
                    pool: try row["pool"], host: try row["host"], size: try row["size"], warm: try row["warm"])
            }
        }
    }

    /// Replaces the whole placement, and records each pool's VMs no host has room for.
    public func writePlacement(_ rows: [PlacementRecord], unplaced: [String: Int], events: [Event]) throws(StoreError) {
        try write { db in
            try db.execute("DELETE FROM placement")
            for row in rows where row.size > 0 || row.warm > 0 {
                try db.execute(
                    "INSERT INTO placement (pool, host, size, warm) VALUES (?, ?, ?, ?)",
                    [row.pool, row.host, row.size, row.warm])
            }
            try db.execute("UPDATE pool SET unplaced = 0")
            for (pool, count) in unplaced where count > 0 {
                try db.execute("UPDATE pool SET unplaced = ? WHERE name = ?", [count, pool])
            }
            for event in events { try self.insertEventRow(db, event) }
            try self.backend.announceChange(db)
        }
    }

    /// VMs of each pool no host has room for (0 for every pool on a single host).
    public func unplaced() throws(StoreError) -> [String: Int] {
        try read { db in
            var result: [String: Int] = [:]
            for row in try db.query("SELECT name, unplaced FROM pool WHERE unplaced > 0") {
                result[try row["name"]] = try row["unplaced"]
            }
            return result
        }
    }
}

extension StoreBackend {
    /// A write that does not check the writer's epoch (joining is how a host gets one).
    fileprivate func writeChecked<T>(_ store: StateStore, _ body: (any SQLTransaction) throws -> T) throws(StoreError)
        -> T
    {
        do {
            return try write(body)
        } catch let error as StoreError {
            throw error
        } catch {
            throw StoreError(.database, "writing the state store failed: \(error)")
        }
    }
}
