import Foundation
import VmpoolDriver
import VmpoolSpec

/// Rows: reading and writing records as the tables store them, shared by every part of the store.
extension StateStore {
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
    func writeLease(_ db: any SQLTransaction, _ r: VMRecord) throws {
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

    static func pool(_ row: SQLRow) throws -> StoredPool {
        let spec: PoolSpec = try decode(try row["spec"])
        return StoredPool(
            spec: spec, generation: try row["generation"], updatedAt: Date(timeIntervalSince1970: try row["updatedAt"]),
            deleting: try row["deleting"])
    }

    static func template(_ row: SQLRow) throws -> TemplateRecord {
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

    static func journal(_ row: SQLRow) throws -> JournalEntry {
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
