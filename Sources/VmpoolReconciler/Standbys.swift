import Foundation
import Logging
import VmpoolDriver
import VmpoolPlanner
import VmpoolSpec
import VmpoolStore

/// Standbys (the VM cache): per template pool, a few hypervisor processes started with the
/// clone's command line and waiting, nothing restored yet. A clone claims one and skips the
/// hypervisor's start-up; the next pass starts replacements. They are not VMs: plans and
/// `get vms` do not show them, but they are recorded like VMs so that a crash never leaks one.
extension Reconciler {
    /// Ready standbys whose process lives, per pool: what `get pools`, the service's gauges
    /// and the status page count.
    public func liveStandbyCounts() async throws(StoreError) -> [String: Int] {
        let alive = Set(await driver.discover().map(\.id))
        var counts: [String: Int] = [:]
        for standby in try store.standbys() where standby.ready && alive.contains(standby.id) {
            counts[standby.pool, default: 0] += 1
        }
        return counts
    }

    /// Keeps `configuration.standbys` ready standbys for the current template of every
    /// template pool in `desired`, and stops the standbys of other templates and of pools that
    /// no longer boot from a template.
    ///
    /// Stale standbys are stopped even when `startNew` is false (a pass shutting down): they
    /// map an old template's memory and would otherwise outlive it.
    func refillStandbys(_ desired: [DesiredPool], startNew: Bool = true) async throws(StoreError) {
        let templates = try store.templates()
        var standbys = try store.standbys()
        var starts: [(pool: String, template: TemplateRef)] = []
        for pool in desired {
            let name = pool.spec.name
            // Only pools that have VMs keep standbys: a pool of none needs no clone soon.
            // A pool whose clones get a private copy of the template's memory keeps none: a
            // standby maps the template's memory as clones that share it do.
            let current =
                pool.spec.boot == .template && configuration.standbys > 0 && pool.spec.totalVMs > 0
                    && pool.spec.sharesTemplateMemory
                ? Self.currentTemplate(of: pool, among: templates) : nil
            for standby in standbys where standby.pool == name && standby.template != current?.id {
                await stopStandby(standby, reason: "its template is no longer current")
            }
            standbys.removeAll { $0.pool == name && $0.template != current?.id }
            guard let current else { continue }
            let have = standbys.filter { $0.template == current.id }.count
            for _ in have..<max(have, configuration.standbys) { starts.append((name, current)) }
        }
        guard startNew, !starts.isEmpty else { return }
        let parallelism = configuration.parallelism
        await withTaskGroup(of: Void.self) { group in
            var running = 0
            for start in starts {
                if running >= parallelism {
                    await group.next()
                    running -= 1
                }
                running += 1
                group.addTask { await self.startStandby(pool: start.pool, template: start.template) }
            }
        }
    }

    /// The newest ready template that matches the pool's shape: what clones restore from.
    static func currentTemplate(of pool: DesiredPool, among templates: [TemplateRecord]) -> TemplateRef? {
        templates.last {
            $0.ref.pool == pool.spec.name && $0.state == .ready && $0.ref.key == pool.shape.templateKey
        }?.ref
    }

    private func startStandby(pool: String, template: TemplateRef) async {
        do {
            try await ensureNetwork(template.key.network)
            var id = VMID.vm(pool: pool)
            while try !store.beginStandby(id: id, pool: pool, template: template.id) { id = VMID.vm(pool: pool) }
            do {
                let pid = try await driver.prestart(id: id, pool: pool, from: template)
                try store.markStandbyReady(id, pid: pid)
                logger.debug("standby started", metadata: ["pool": "\(pool)", "vm": "\(id)"])
            } catch {
                try? await driver.stop(VMRef(id: id, pool: pool))
                try store.deleteStandby(id)
                logger.warning("standby not started: \(error)", metadata: ["pool": "\(pool)"])
            }
        } catch {
            logger.warning("standby not recorded: \(error)", metadata: ["pool": "\(pool)"])
        }
    }

    func stopStandby(_ standby: StandbyRecord, reason: String) async {
        try? await driver.stop(standby.ref)
        try? store.deleteStandby(standby.id)
        logger.debug("standby stopped: \(reason)", metadata: ["pool": "\(standby.pool)", "vm": "\(standby.id)"])
    }
}
