import Foundation
import VmpoolDriver
import VmpoolPlanner
import VmpoolReconciler
import VmpoolSpec
import VmpoolStore

/// `plan` (and `apply --dry-run`) on a shared store: what the input changes in the recorded
/// pools, and how many VMs of each pool each live host would run. The hosts plan their own
/// actions on their next passes, against their own hypervisors, so no host's actions are
/// listed here: a plan made from one host about another's VMs would be a guess.
struct ClusterPlan {
    enum Change: String {
        case create, update, delete, none
    }

    struct PoolChange {
        var pool: String
        var placement: Placement?
        var change: Change
        /// The spec's fields that differ from the recorded ones (an update).
        var fields: [String] = []
        /// VMs (running and warm) on each host: recorded now, and planned.
        var hosts: [String: (now: Int, planned: Int)] = [:]
        var unplaced = 0

        var movesVMs: Bool { hosts.values.contains { $0.now != $0.planned } || unplaced > 0 }
        var hasChanges: Bool { change != .none || movesVMs }
    }

    var pools: [PoolChange]

    var hasChanges: Bool { pools.contains(where: \.hasChanges) }

    static func make(_ session: Session, cluster: ClusterMember, pools: [PoolSpec], prune: Set<String>) throws
        -> ClusterPlan
    {
        let stored = try session.store.pools()
        let recorded = Dictionary(uniqueKeysWithValues: stored.map { ($0.spec.name, $0) })
        // The desired state after this apply: the input's pools, the recorded ones it leaves
        // alone, none of those it prunes or that are being deleted.
        var desired = Dictionary(
            uniqueKeysWithValues: stored.filter { !$0.deleting && !prune.contains($0.spec.name) }.map {
                ($0.spec.name, $0.spec)
            })
        for pool in pools { desired[pool.name] = pool }
        let (current, proposed) = try cluster.propose(Array(desired.values))
        func counts(_ shares: [Placer.Share], _ pool: String) -> [String: Int] {
            Dictionary(shares.filter { $0.pool == pool }.map { ($0.host, $0.size + $0.warm) }, uniquingKeysWith: +)
        }
        var changes: [PoolChange] = []
        let names = Set(desired.keys).union(prune.filter { recorded[$0] != nil })
        for name in names.sorted() {
            let now = counts(current, name)
            let planned = desired[name] == nil ? [:] : counts(proposed.shares, name)
            var change = PoolChange(pool: name, placement: desired[name]?.placement, change: .none)
            for host in Set(now.keys).union(planned.keys) {
                change.hosts[host] = (now[host] ?? 0, planned[host] ?? 0)
            }
            change.unplaced = desired[name] == nil ? 0 : proposed.unplaced[name] ?? 0
            if let spec = desired[name] {
                if let old = recorded[name], !old.deleting {
                    change.fields = try differingFields(old.spec, spec)
                    change.change = change.fields.isEmpty ? .none : .update
                } else {
                    change.change = .create
                }
            } else {
                change.change = .delete
            }
            changes.append(change)
        }
        return ClusterPlan(pools: changes)
    }

    /// The top-level fields of two specs that differ, by their JSON names.
    static func differingFields(_ old: PoolSpec, _ new: PoolSpec) throws -> [String] {
        guard old != new else { return [] }
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        let a = try JSONSerialization.jsonObject(with: encoder.encode(old)) as? [String: Any] ?? [:]
        let b = try JSONSerialization.jsonObject(with: encoder.encode(new)) as? [String: Any] ?? [:]
        func canonical(_ value: Any?) -> Data? {
            value.flatMap { try? JSONSerialization.data(withJSONObject: [$0], options: .sortedKeys) }
        }
        return Swift.Set<String>(a.keys).union(b.keys).sorted().filter { canonical(a[$0]) != canonical(b[$0]) }
    }

    var text: String {
        var lines: [String] = []
        for pool in pools where pool.hasChanges {
            lines.append("pool \(pool.pool)" + (pool.placement.map { " (\($0.rawValue))" } ?? "") + ":")
            switch pool.change {
            case .create: lines.append("  +   create")
            case .update: lines.append("  ~   update  # changed: \(pool.fields.joined(separator: ", "))")
            case .delete: lines.append("  -   delete")
            case .none: break
            }
            for (host, count) in pool.hosts.sorted(by: { $0.key < $1.key }) where count.now != count.planned {
                let sign = count.planned > count.now ? "+" : "-"
                lines.append("  \(sign)   \(host): \(count.now) → \(vms(count.planned))")
            }
            if pool.unplaced > 0 {
                lines.append("  !   \(vms(pool.unplaced)) fit on no live host's declared capacity")
            }
        }
        guard hasChanges else { return "No changes. The recorded pools and their placement match the input." }
        let count = { (change: Change) in pools.filter { $0.change == change }.count }
        let starting = pools.flatMap(\.hosts.values).map { max(0, $0.planned - $0.now) }.reduce(0, +)
        let stopping = pools.flatMap(\.hosts.values).map { max(0, $0.now - $0.planned) }.reduce(0, +)
        lines.append("")
        lines.append(
            "Plan: \(count(.create)) to create, \(count(.update)) to update, \(count(.delete)) to delete;"
                + " \(vms(starting)) placed, \(vms(stopping)) removed from hosts."
                + " Each host takes its actions on its next pass.")
        return lines.joined(separator: "\n")
    }

    private func vms(_ n: Int) -> String { "\(n) VM\(n == 1 ? "" : "s")" }

    var json: JSONValue {
        .object([
            "actions": .array([]), "summary": .object([:]), "changes": .bool(hasChanges),
            "pools": .array(
                pools.map { pool in
                    .object([
                        "pool": .string(pool.pool), "change": .string(pool.change.rawValue),
                        "fields": .array(pool.fields.map { .string($0) }),
                        "hosts": .object(
                            pool.hosts.mapValues { .object(["now": .int($0.now), "planned": .int($0.planned)]) }),
                        "unplaced": .int(pool.unplaced),
                    ])
                }),
        ])
    }
}
