import VmpoolSpec

/// Which host runs how many of each pool's VMs: the cluster's scheduler, a pure function
/// like the planner (Nomad's and Kubernetes' schedulers place against declared capacity the
/// same way). One host at a time runs it, the placer; every host then converges its share.
///
/// Placements are sticky: VMs stay where they are while their host lives and has room, so a
/// host joining the cluster takes new VMs but nothing is moved to it. When capacity is short,
/// pools are served in name order and what does not fit is counted as unplaced, never
/// dropped silently.
public enum Placer {
    public struct Pool: Sendable, Hashable {
        public var name: String
        public var size: Int
        public var warm: Int
        public var vcpus: Int
        public var memoryMiB: Int
        public var policy: Placement

        public init(_ spec: PoolSpec) {
            name = spec.name
            size = spec.size
            warm = spec.warm
            vcpus = spec.vcpus
            memoryMiB = spec.memoryMiB
            policy = spec.placement
        }
    }

    public struct Host: Sendable, Hashable {
        public var name: String
        public var vcpus: Int
        public var memoryMiB: Int
        /// What VMs that count toward no pool (leased ones) take of it already.
        public var usedVcpus: Int
        public var usedMemoryMiB: Int

        public init(name: String, vcpus: Int, memoryMiB: Int, usedVcpus: Int = 0, usedMemoryMiB: Int = 0) {
            self.name = name
            self.vcpus = vcpus
            self.memoryMiB = memoryMiB
            self.usedVcpus = usedVcpus
            self.usedMemoryMiB = usedMemoryMiB
        }
    }

    /// One pool's share on one host.
    public struct Share: Sendable, Hashable {
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

    public struct Result: Sendable, Hashable {
        public var shares: [Share]
        /// VMs of each pool that no live host has room for.
        public var unplaced: [String: Int]
    }

    /// Places `pools` on the live `hosts`, keeping what `current` placed on them where it
    /// still fits.
    public static func place(pools: [Pool], hosts: [Host], current: [Share]) -> Result {
        let hostNames = Set(hosts.map(\.name))
        let byName = Dictionary(uniqueKeysWithValues: pools.map { ($0.name, $0) })
        // [pool: [host: (size, warm)]]
        var table: [String: [String: (size: Int, warm: Int)]] = [:]
        for share in current where hostNames.contains(share.host) && byName[share.pool] != nil {
            table[share.pool, default: [:]][share.host] = (max(0, share.size), max(0, share.warm))
        }
        var used = Dictionary(
            uniqueKeysWithValues: hosts.map { ($0.name, (vcpus: $0.usedVcpus, memory: $0.usedMemoryMiB)) })
        let capacity = Dictionary(
            uniqueKeysWithValues: hosts.map { ($0.name, (vcpus: $0.vcpus, memory: $0.memoryMiB)) })
        let order = hosts.map(\.name).sorted()

        // Shrink pools placed beyond what they now ask for.
        for pool in pools {
            var shares = table[pool.name] ?? [:]
            trim(&shares, keep: pool.size, \.size, policy: pool.policy, order: order)
            trim(&shares, keep: pool.warm, \.warm, policy: pool.policy, order: order)
            table[pool.name] = shares
        }
        // Count what stays, pools in name order; a host over its capacity (it shrank, or a
        // pool's VMs grew) sheds VMs, warm spares first, to be placed again below.
        for pool in pools.sorted(by: { $0.name < $1.name }) {
            for host in order {
                guard let share = table[pool.name]?[host] else { continue }
                var kept = (size: 0, warm: 0)
                for _ in 0..<share.size where fits(pool, on: host, used, capacity) {
                    used[host]!.vcpus += pool.vcpus
                    used[host]!.memory += pool.memoryMiB
                    kept.size += 1
                }
                for _ in 0..<share.warm where fits(pool, on: host, used, capacity) {
                    used[host]!.vcpus += pool.vcpus
                    used[host]!.memory += pool.memoryMiB
                    kept.warm += 1
                }
                table[pool.name]![host] = kept
            }
        }
        // Place what is missing.
        var unplaced: [String: Int] = [:]
        for pool in pools.sorted(by: { $0.name < $1.name }) {
            var shares = table[pool.name] ?? [:]
            for keyPath in [\(size: Int, warm: Int).size, \.warm] {
                let wanted = keyPath == \.size ? pool.size : pool.warm
                var missing = wanted - shares.values.reduce(0) { $0 + $1[keyPath: keyPath] }
                while missing > 0 {
                    let candidates = order.filter { fits(pool, on: $0, used, capacity) }
                    guard let host = choose(candidates, pool: pool, shares: shares, used: used, capacity: capacity)
                    else {
                        unplaced[pool.name, default: 0] += missing
                        break
                    }
                    shares[host, default: (0, 0)][keyPath: keyPath] += 1
                    used[host]!.vcpus += pool.vcpus
                    used[host]!.memory += pool.memoryMiB
                    missing -= 1
                }
            }
            table[pool.name] = shares
        }
        var result: [Share] = []
        for pool in pools.map(\.name).sorted() {
            for (host, share) in (table[pool] ?? [:]).sorted(by: { $0.key < $1.key })
            where share.size > 0 || share.warm > 0 {
                result.append(Share(pool: pool, host: host, size: share.size, warm: share.warm))
            }
        }
        return Result(shares: result, unplaced: unplaced)
    }

    private static func fits(
        _ pool: Pool, on host: String, _ used: [String: (vcpus: Int, memory: Int)],
        _ capacity: [String: (vcpus: Int, memory: Int)]
    ) -> Bool {
        used[host]!.vcpus + pool.vcpus <= capacity[host]!.vcpus
            && used[host]!.memory + pool.memoryMiB <= capacity[host]!.memory
    }

    /// Removes VMs beyond `keep`: spread takes them from the hosts with the most, pack from
    /// the last hosts it filled.
    private static func trim(
        _ shares: inout [String: (size: Int, warm: Int)], keep: Int,
        _ keyPath: WritableKeyPath<(size: Int, warm: Int), Int>,
        policy: Placement, order: [String]
    ) {
        var excess = shares.values.reduce(0) { $0 + $1[keyPath: keyPath] } - keep
        while excess > 0 {
            let holders = order.filter { (shares[$0]?[keyPath: keyPath] ?? 0) > 0 }
            let host: String
            switch policy {
            case .spread:
                host = holders.max { (shares[$0]![keyPath: keyPath], $1) < (shares[$1]![keyPath: keyPath], $0) }!
            case .pack:
                host = holders.last!
            }
            shares[host]![keyPath: keyPath] -= 1
            excess -= 1
        }
    }

    /// The host for one more VM of `pool` among those it fits on: spread picks the host with
    /// the fewest of the pool's VMs, then the most free memory; pack the host with the most
    /// of them, then the least free memory (filling hosts one by one).
    private static func choose(
        _ candidates: [String], pool: Pool, shares: [String: (size: Int, warm: Int)],
        used: [String: (vcpus: Int, memory: Int)], capacity: [String: (vcpus: Int, memory: Int)]
    ) -> String? {
        func count(_ host: String) -> Int { (shares[host]?.size ?? 0) + (shares[host]?.warm ?? 0) }
        func free(_ host: String) -> Int { capacity[host]!.memory - used[host]!.memory }
        switch pool.policy {
        case .spread:
            return candidates.min { (count($0), -free($0), $0) < (count($1), -free($1), $1) }
        case .pack:
            return candidates.min { (-count($0), free($0), $0) < (-count($1), free($1), $1) }
        }
    }
}
