import Testing
import VmpoolPlanner
import VmpoolSpec

@Suite("Placement of pools on hosts")
struct PlacementTests {
    func pool(
        _ name: String, size: Int, warm: Int = 0, vcpus: Int = 1, memoryMiB: Int = 256, policy: Placement = .spread
    )
        -> Placer.Pool
    {
        Placer.Pool(
            PoolSpec(name: name, size: size, vcpus: vcpus, memoryMiB: memoryMiB, warm: warm, placement: policy))
    }

    func hosts(_ names: String..., vcpus: Int = 8, memoryMiB: Int = 4096) -> [Placer.Host] {
        names.map { Placer.Host(name: $0, vcpus: vcpus, memoryMiB: memoryMiB) }
    }

    func sizes(_ result: Placer.Result, _ pool: String) -> [String: Int] {
        Dictionary(uniqueKeysWithValues: result.shares.filter { $0.pool == pool }.map { ($0.host, $0.size) })
    }

    @Test func spreadPutsAsManyOnEachHost() {
        let result = Placer.place(pools: [pool("web", size: 7)], hosts: hosts("a", "b", "c"), current: [])
        #expect(sizes(result, "web") == ["a": 3, "b": 2, "c": 2])
        #expect(result.unplaced.isEmpty)
    }

    @Test func packFillsOneHostBeforeTheNext() {
        let result = Placer.place(
            pools: [pool("batch", size: 10, policy: .pack)], hosts: hosts("a", "b", "c", vcpus: 4), current: [])
        #expect(sizes(result, "batch") == ["a": 4, "b": 4, "c": 2])
    }

    @Test func whatDoesNotFitIsCountedNotDropped() {
        let result = Placer.place(
            pools: [pool("big", size: 5, memoryMiB: 3000)], hosts: hosts("a", "b", memoryMiB: 4096), current: [])
        #expect(sizes(result, "big") == ["a": 1, "b": 1])
        #expect(result.unplaced == ["big": 3])
    }

    @Test func leasedVMsTakeTheirHostsRoom() {
        var full = Placer.Host(name: "a", vcpus: 2, memoryMiB: 4096)
        full.usedVcpus = 2
        let result = Placer.place(
            pools: [pool("web", size: 2)], hosts: [full, Placer.Host(name: "b", vcpus: 2, memoryMiB: 4096)], current: []
        )
        #expect(sizes(result, "web") == ["b": 2])
    }

    @Test func placementsStayWhereTheyAreAndADeadHostsShareMoves() {
        let first = Placer.place(pools: [pool("web", size: 6)], hosts: hosts("a", "b", "c"), current: [])
        #expect(sizes(first, "web") == ["a": 2, "b": 2, "c": 2])
        // A fourth host joins: nothing moves to it.
        let joined = Placer.place(
            pools: [pool("web", size: 6)], hosts: hosts("a", "b", "c", "d"), current: first.shares)
        #expect(joined.shares == first.shares)
        // b dies: its two go to the others, which keep theirs.
        let lost = Placer.place(pools: [pool("web", size: 6)], hosts: hosts("a", "c", "d"), current: joined.shares)
        #expect(sizes(lost, "web") == ["a": 2, "c": 2, "d": 2])
    }

    @Test func shrinkingTakesFromTheFullestHostsOrTheLastFilled() {
        let spread = Placer.place(
            pools: [pool("web", size: 4)], hosts: hosts("a", "b", "c"),
            current: [
                .init(pool: "web", host: "a", size: 4, warm: 0), .init(pool: "web", host: "b", size: 1, warm: 0),
                .init(pool: "web", host: "c", size: 1, warm: 0),
            ])
        #expect(sizes(spread, "web") == ["a": 2, "b": 1, "c": 1])
        let pack = Placer.place(
            pools: [pool("batch", size: 5, policy: .pack)], hosts: hosts("a", "b", vcpus: 4),
            current: [
                .init(pool: "batch", host: "a", size: 4, warm: 0), .init(pool: "batch", host: "b", size: 4, warm: 0),
            ])
        #expect(sizes(pack, "batch") == ["a": 4, "b": 1])
    }

    @Test func aHostThatShrankShedsWarmSparesFirst() {
        let result = Placer.place(
            pools: [pool("web", size: 2, warm: 2)], hosts: hosts("a", vcpus: 3),
            current: [.init(pool: "web", host: "a", size: 2, warm: 2)])
        #expect(result.shares == [.init(pool: "web", host: "a", size: 2, warm: 1)])
        #expect(result.unplaced == ["web": 1])
    }

    @Test func placementNeverExceedsAnyHostsCapacity() {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            let hostList = (0..<Int.random(in: 1...4, using: &generator)).map {
                Placer.Host(
                    name: "h\($0)", vcpus: Int.random(in: 1...16, using: &generator),
                    memoryMiB: Int.random(in: 256...8192, using: &generator))
            }
            let pools = (0..<Int.random(in: 1...5, using: &generator)).map {
                pool(
                    "p\($0)", size: Int.random(in: 0...12, using: &generator),
                    warm: Int.random(in: 0...3, using: &generator),
                    vcpus: Int.random(in: 1...4, using: &generator),
                    memoryMiB: Int.random(in: 64...2048, using: &generator),
                    policy: Bool.random(using: &generator) ? .spread : .pack)
            }
            let result = Placer.place(pools: pools, hosts: hostList, current: [])
            for host in hostList {
                let shares = result.shares.filter { $0.host == host.name }
                let vcpus = shares.reduce(0) { sum, share in
                    sum + (share.size + share.warm) * pools.first { $0.name == share.pool }!.vcpus
                }
                let memory = shares.reduce(0) { sum, share in
                    sum + (share.size + share.warm) * pools.first { $0.name == share.pool }!.memoryMiB
                }
                #expect(vcpus <= host.vcpus && memory <= host.memoryMiB)
            }
            for pool in pools {
                let placed = result.shares.filter { $0.pool == pool.name }.reduce(0) { $0 + $1.size + $1.warm }
                #expect(
                    placed + (result.unplaced[pool.name] ?? 0) == pool.size + pool.warm, "every VM placed or counted")
            }
        }
    }
}
