import Foundation
import VmpoolDriver

/// Forks of a running VM (SPEC §12) as the store records them: the source's journal entry
/// (`fork`, naming the snapshot the forks are restored from) and, per fork, a VM record in
/// state `creating`, already leased to the caller, with its own `fork-launch` entry. A
/// `vmpool fork` runs without the state dir lock, so its entries are lockless: recovery leaves
/// them alone while their vmpool lives, and undoes them once it has died.
extension StateStore {
    /// What `beginFork` recorded.
    public struct ForkBegun: Sendable {
        /// The source as stored when the fork began.
        public var source: VMRecord
        /// The source's journal entry.
        public var journal: Int64
        /// Each fork's record (state `creating`, leased) and its journal entry.
        public var forks: [(record: VMRecord, journal: Int64)]
    }

    /// The journal operation on the source of a fork; its `template` column names the
    /// snapshot (and the helper VM that receives the source's memory) while the fork runs.
    public static let forkOperation = "fork"
    /// The journal operation of each new VM a fork launches.
    public static let forkLaunchOperation = "fork-launch"

    /// Records a fork of VM `id` into `count` new VMs leased to the source's holder, in one
    /// transaction: the source must be a leased, running VM of this host that no operation is
    /// acting on (and, when `holder` is given, leased to that holder). Each fork gets the
    /// network the source's pool gives a VM (its own forwarded ports, its own address).
    public func beginFork(
        _ id: String, count: Int, ttl: Duration?, holder: String?, snapshot: String,
        portIsFree: @escaping @Sendable (Int) -> Bool = { _ in true }
    ) throws(StoreError) -> ForkBegun {
        try write { db in
            guard let row = try db.queryOne("SELECT \(Self.vmColumns) FROM vm WHERE id = ?", [id]) else {
                throw StoreError(.notFound, "no VM named \"\(id)\" (see vmpool get vms)")
            }
            let source = try Self.vm(row)
            guard source.host == host else {
                throw StoreError(
                    .conflict, "VM \(id) runs on host \(source.host), not on \(host): fork it there")
            }
            guard source.state == .running else {
                throw StoreError(.conflict, "VM \(id) is \(source.state.rawValue); only a running VM can be forked")
            }
            guard let held = source.lease else {
                throw StoreError(
                    .conflict,
                    "VM \(id) is not leased: a pool's VM is its pool's; lease one (vmpool lease POOL) and fork that")
            }
            if let holder, held.holder != holder {
                throw StoreError(.conflict, "VM \(id) is leased to another holder, not to \"\(holder)\"")
            }
            if let busy = try db.queryOne(
                "SELECT operation FROM journal WHERE vm = ? AND finishedAt IS NULL ORDER BY id LIMIT 1", [id])
            {
                let operation: String = try busy["operation"]
                throw StoreError(
                    .conflict, "VM \(id) is in the middle of another action (\(operation)); try again when it is done")
            }
            let journal = try self.insertJournal(
                db, operation: Self.forkOperation, pool: source.pool, vm: id, template: snapshot)
            let network = source.shape.network.map(NetworkRequest.init)
            let now = Date()
            let lease = Lease(
                holder: held.holder, leasedAt: now, expiresAt: ttl.map { now.addingTimeInterval($0.seconds) })
            var forks: [(VMRecord, Int64)] = []
            for _ in 0..<count {
                var fork = VMRecord(
                    id: VMID.vm(pool: source.pool), pool: source.pool, state: .creating, boot: source.boot,
                    shape: source.shape, templateID: source.templateID, createdAt: now, lease: lease, host: host)
                while try db.exists("SELECT 1 FROM vm WHERE id = ?", [fork.id]) {
                    fork.id = VMID.vm(pool: source.pool)
                }
                if let network { fork.network = try self.allocate(db, network, vm: fork.id, portIsFree: portIsFree) }
                try self.upsertVM(db, fork)
                let entry = try self.insertJournal(
                    db, operation: Self.forkLaunchOperation, pool: source.pool, vm: fork.id, template: snapshot)
                forks.append((fork, entry))
            }
            return ForkBegun(source: source, journal: journal, forks: forks)
        }
    }

    /// A fork that runs: its record says so (its journal entry stays open until its holder
    /// has its id, so that a vmpool that dies before ends the lease, as for `lease`).
    public func markForkRunning(_ record: VMRecord, source: String) throws(StoreError) {
        try write { db in
            try self.upsertVM(db, record)
            try self.insertEventRow(
                db,
                Event(
                    pool: record.pool, vm: record.id, kind: "forked",
                    message: "from \(source), leased to \(record.lease?.holder ?? "nobody")"))
            try self.backend.announceChange(db)
        }
    }

    /// A fork that did not start: its record and what was allocated to it go.
    public func forgetFork(_ journal: Int64, _ id: String, error: String) throws(StoreError) {
        try write { db in
            try self.deleteVMRow(db, id)
            try self.closeJournal(db, journal, outcome: .failed, error: error)
        }
    }
}
