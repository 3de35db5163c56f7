import Foundation
import VmpoolDriver
import VmpoolSpec

/// VM records and the journaled operations on them: launches (with their ports and
/// addresses allocated in the same transaction), the driver calls a pass makes, saves and deletes.
extension StateStore {
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
}
