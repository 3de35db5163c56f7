import Foundation
import Logging
import VmpoolDriver
import VmpoolStore

/// What a recovery step found and did.
public struct RecoveryReport: Sendable, Hashable {
    /// Journal entries left open by a vmpool that died, now finished or undone.
    public var unfinished: Int = 0
    /// Half-made VMs stopped and forgotten.
    public var undoneLaunches: [String] = []
    /// Hypervisor VMs with no record, stopped.
    public var orphansStopped: [String] = []
    /// Templates whose build never finished, or whose saved state has no record, removed.
    public var templatesRemoved: [String] = []

    public var isEmpty: Bool {
        unfinished == 0 && undoneLaunches.isEmpty && orphansStopped.isEmpty && templatesRemoved.isEmpty
    }
}

extension Reconciler {
    /// Finishes or undoes whatever a vmpool that died left behind. The caller holds the lock,
    /// so every open journal entry belongs to a dead process, but for leases and releases:
    /// those run without the lock, and one whose vmpool still runs is not finished yet.
    public func recover() async throws(StoreError) -> RecoveryReport {
        var report = RecoveryReport()
        let unfinished = try store.unfinishedOperations()
        let open = unfinished.filter { !Self.isRunningLockless($0) }
        let inProgress = Self.subjects(of: unfinished)
        report.unfinished = open.count
        var records = Dictionary(uniqueKeysWithValues: try store.vms().map { ($0.id, $0) })

        // Leases whose vmpool died before the holder had the VM's id: nobody holds the VM, and
        // no one else may have it, so it is stopped like a released one.
        for entry in open where entry.operation == "lease" {
            guard let id = entry.vm, let record = records[id], record.lease != nil, record.state != .stopping
            else { continue }
            records[id] = try store.release(id)
            logger.notice(
                "ended a lease whose vmpool died before handing it over",
                metadata: ["pool": "\(record.pool)", "vm": "\(id)", "pid": "\(entry.ownerPID)"])
        }

        // Forks whose vmpool died: a fork already running was never handed over, so it goes as
        // an unreceived lease does.
        for entry in open where entry.operation == StateStore.forkLaunchOperation {
            guard let id = entry.vm, let record = records[id], record.lease != nil, record.state == .running
            else { continue }
            records[id] = try store.release(id)
        }
        // Launches that never reported back, and stops that never finished: the VM goes.
        for record in records.values
        where (record.state == .creating || record.state == .stopping) && !inProgress.contains(record.id) {
            try? await driver.stop(record.ref)
            try store.deleteVM(record.id)
            records[record.id] = nil
            if record.state == .creating { report.undoneLaunches.append(record.id) }
            try store.record(
                Event(
                    pool: record.pool, vm: record.id, kind: "recovered",
                    message: record.state == .creating
                        ? "launch interrupted by a crash; undone" : "stop interrupted by a crash; finished"))
            logger.notice(
                "recovered an interrupted operation", metadata: ["pool": "\(record.pool)", "vm": "\(record.id)"])
        }
        // Templates whose build never finished.
        for template in try store.templates() where template.state == .building {
            try? await driver.deleteTemplate(id: template.ref.id)
            try store.deleteTemplate(template.ref.id)
            report.templatesRemoved.append(template.ref.id)
        }
        for entry in open {
            try store.finish(entry.id, outcome: .recovered, error: "vmpool pid \(entry.ownerPID) died during it")
        }

        // Standbys whose start was interrupted, or whose process is gone.
        let discovered = await driver.discover()
        let foundTemplates = await driver.discoverTemplates()
        // Read again after the hypervisor was asked: a lease or fork that began since the first
        // read (they take no lock) recorded its VMs and snapshot before it started them.
        let since = Self.subjects(of: try store.unfinishedOperations())
        let alive = Set(discovered.map(\.id))
        var standbys = Set<String>()
        for standby in try store.standbys() {
            if standby.ready && alive.contains(standby.id) {
                standbys.insert(standby.id)
            } else {
                await stopStandby(standby, reason: standby.ready ? "its process is gone" : "its start was interrupted")
            }
        }

        // VMs the hypervisor runs for this state dir that no record knows: stopped, never leaked.
        let known = Set(try store.vms().map(\.id)).union(since)
        for found in discovered
        where records[found.id] == nil && !known.contains(found.id) && !standbys.contains(found.id)
            && !inProgress.contains(found.id)
        {
            let pool = VMID.pool(of: found.id) ?? ""

            try? await driver.stop(VMRef(id: found.id, pool: pool, pid: found.pid))
            report.orphansStopped.append(found.id)
            try store.record(
                Event(pool: pool, vm: found.id, kind: "orphan-stopped", message: "hypervisor VM had no record"))
            logger.warning("stopped an orphan VM", metadata: ["vm": "\(found.id)", "pid": "\(found.pid ?? 0)"])
        }
        // A fork's source, paused while its state was saved, runs again (its helper, stopped
        // above, no longer receives its state).
        for entry in open where entry.operation == StateStore.forkOperation {
            guard let id = entry.vm, let record = records[id], record.state == .running else { continue }
            let status = await driver.status(of: [record.ref], depth: .hypervisor)[id]
            if status?.liveness == .alive, status?.running == false, status?.fault == nil {
                try? await driver.resume(record.ref)
                logger.notice(
                    "resumed a VM a fork paused before its vmpool died",
                    metadata: ["pool": "\(record.pool)", "vm": "\(id)", "pid": "\(entry.ownerPID)"])
            }
        }
        let knownTemplates = Set(try store.templates().map(\.ref.id)).union(since)
        for id in foundTemplates where !knownTemplates.contains(id) && !inProgress.contains(id) {
            try? await driver.deleteTemplate(id: id)
            report.templatesRemoved.append(id)
        }
        return report
    }

    /// Whether `entry` is a lockless operation whose vmpool still runs: not finished yet.
    static func isRunningLockless(_ entry: JournalEntry) -> Bool {
        locklessOperations.contains(entry.operation) && !LocalProcess.isGone(entry.ownerPID)
    }

    /// The VMs, and the fork snapshots (also the id of the helper VM that receives a source's
    /// memory), of the lockless operations among `entries` that are still running.
    static func subjects(of entries: [JournalEntry]) -> Set<String> {
        Set(entries.filter(isRunningLockless).flatMap { [$0.vm, $0.template].compactMap { $0 } })
    }

    /// Operations journaled by a vmpool that does not hold the state-dir lock.
    static let locklessOperations: Set<String> = [
        "lease", "release", StateStore.forkOperation, StateStore.forkLaunchOperation,
    ]
}
