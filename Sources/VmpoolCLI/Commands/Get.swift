import ArgumentParser
import Foundation
import VmpoolDriver
import VmpoolPlanner
import VmpoolReconciler
import VmpoolSpec
import VmpoolStore

extension Vmpool {
    /// Lists pools or VMs with what the hypervisor says about them.
    struct Get: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "get",
            abstract: "List pools, VMs or the hosts of the store.",
            subcommands: [Pools.self, VMs.self, Hosts.self])

        struct Pools: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "pools",
                abstract: "List applied pools with their readiness.", aliases: ["pool"])

            @OptionGroup var options: GlobalOptions

            @Argument(help: "Pool names (default: all).", completion: Completions.pools)
            var names: [String] = []

            @Option(name: .shortAndLong, help: "Output format: text or json.")
            var output: OutputFormat = .text

            func run() async throws {
                let session = try await Session(options, locking: nil, create: false)
                let observation = try await session.reconciler.observe(depth: .hypervisor, allHosts: true)
                var pools = observation.pools
                if !names.isEmpty {
                    let known = Set(pools.map(\.spec.name))
                    if let missing = names.first(where: { !known.contains($0) }) {
                        throw CommandFailure(description: "no pool named \"\(missing)\" has been applied")
                    }
                    pools = pools.filter { names.contains($0.spec.name) }
                }
                let readiness = observation.readiness()
                // Standbys count only while their process lives.
                let standbys = try await session.reconciler.liveStandbyCounts()
                let rows = pools.map { pool in
                    PoolRow(
                        spec: pool.spec, generation: pool.generation,
                        readiness: readiness[pool.spec.name] ?? Readiness(), standbys: standbys[pool.spec.name] ?? 0)
                }
                switch output {
                case .json: printOut(try JSONOutput.encode(rows.map(\.json)))
                case .text: printOut(TableRenderer.pools(rows))
                }
            }
        }

        struct VMs: AsyncParsableCommand {
            static let configuration = CommandConfiguration(commandName: "vms", abstract: "List VMs.", aliases: ["vm"])

            @OptionGroup var options: GlobalOptions

            @Option(help: "Only the VMs of this pool.", completion: Completions.pools)
            var pool: String?

            @Option(name: .shortAndLong, help: "Output format: text or json.")
            var output: OutputFormat = .text

            func run() async throws {
                let session = try await Session(options, locking: nil, create: false)
                if let pool, try !session.store.pools().contains(where: { $0.spec.name == pool }) {
                    throw CommandFailure(description: "no pool named \"\(pool)\" has been applied")
                }
                let observation = try await session.reconciler.observe(depth: .hypervisor, allHosts: true)
                let rows = VMRow.rows(observation, pool: pool)
                switch output {
                case .json: printOut(try JSONOutput.encode(rows.map(\.json)))
                case .text: printOut(TableRenderer.vms(rows))
                }
            }
        }
    }
}

extension Vmpool.Get {
    struct Hosts: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "hosts",
            abstract: "List the hosts of the store (this one alone on SQLite): capacity, use and heartbeat.",
            aliases: ["host"])

        @OptionGroup var options: GlobalOptions

        @Option(name: .shortAndLong, help: "Output format: text or json.")
        var output: OutputFormat = .text

        func run() async throws {
            let session = try await Session(options, locking: nil, create: false)
            let vms = try session.store.allVMs()
            let now = Date()
            let rows: [HostRow]
            if let cluster = session.cluster {
                let byHost = Dictionary(grouping: vms, by: \.host)
                rows = try session.store.hosts().map { host in
                    HostRow(
                        record: host, alive: host.isAlive(timeout: cluster.hostTimeout, now: now),
                        vms: byHost[host.name] ?? [], now: now)
                }
            } else {
                // The store is this host's own (SQLite): the one host is this one, offering the
                // machine's CPUs and memory, or what VMPOOL_CAPACITY declares.
                let record = HostRecord(
                    name: try options.resolvedHost(), epoch: 0,
                    capacity: try HostCapacity.resolve(flag: nil, environment: options.environment),
                    heartbeatAt: now, registeredAt: now)
                rows = [HostRow(record: record, alive: true, vms: vms, now: now)]
            }
            switch output {
            case .json: printOut(try JSONOutput.encode(rows.map(\.json)))
            case .text: printOut(TableRenderer.hosts(rows))
            }
        }
    }
}

/// A host of a shared store as `get hosts` shows it.
struct HostRow {
    var record: HostRecord
    var alive: Bool
    var vms: Int
    var usedVcpus: Int
    var usedMemoryMiB: Int
    var heartbeatAge: Int

    init(record: HostRecord, alive: Bool, vms: [VMRecord], now: Date) {
        self.record = record
        self.alive = alive
        self.vms = vms.count
        usedVcpus = vms.reduce(0) { $0 + $1.shape.vcpus }
        usedMemoryMiB = vms.reduce(0) { $0 + $1.shape.memoryMiB }
        heartbeatAge = max(0, Int(now.timeIntervalSince(record.heartbeatAt).rounded()))
    }

    /// `ready` (heartbeating), `silent` (late, not declared dead yet), `dead` (its VMs were
    /// placed elsewhere; it rejoins when it is back).
    var state: String { record.fencedAt != nil ? "dead" : alive ? "ready" : "silent" }

    var json: [String: JSONValue] {
        [
            "name": .string(record.name), "state": .string(state), "vms": .int(vms), "epoch": .int(Int(record.epoch)),
            "capacity": .object(["vcpus": .int(record.capacity.vcpus), "memoryMiB": .int(record.capacity.memoryMiB)]),
            "used": .object(["vcpus": .int(usedVcpus), "memoryMiB": .int(usedMemoryMiB)]),
            "heartbeatAt": .string(JSONValue.rfc3339(record.heartbeatAt)),
            "fencedAt": record.fencedAt.map { .string(JSONValue.rfc3339($0)) } ?? .null,
        ]
    }
}

struct PoolRow {
    var spec: PoolSpec
    var generation: Int
    var readiness: Readiness
    /// Hypervisor processes started ahead of clones (template pools), alive.
    var standbys: Int

    var ready: Int { readiness.ready }
    var vms: Int { readiness.vms }

    var json: [String: JSONValue] {
        [
            "name": .string(spec.name), "size": .int(spec.size), "vcpus": .int(spec.vcpus),
            "memoryMiB": .int(spec.memoryMiB), "maxVcpus": .int(spec.maxVcpus),
            "maxMemoryMiB": .int(spec.maxMemoryMiB), "boot": .string(spec.boot.rawValue),
            "state": .string(spec.state.rawValue), "warm": .int(spec.warm), "ready": .int(ready), "vms": .int(vms),
            "generation": .int(generation), "labels": .object(spec.labels.mapValues { .string($0) }),
            "standbys": .int(standbys), "warmReady": .int(readiness.warm), "leased": .int(readiness.leased),
        ]
    }
}
