import ArgumentParser
import Foundation
import VmpoolDriver
import VmpoolReconciler
import VmpoolSpec
import VmpoolStore

/// `apply` and `delete` on a shared store: from any host, the desired state is recorded and
/// placed, and the command waits while the hosts converge their shares (as `kubectl apply`
/// followed by `kubectl wait`). Exit 0 once every pool is whole, 1 when the wait ends first
/// or a pool does not fit on the hosts.
enum ClusterApply {
    /// How long to wait for the hosts when `--timeout` is not given.
    static let defaultWait = Duration.seconds(300)

    static func apply(
        _ session: Session, cluster: ClusterMember, pools: [PoolSpec], prune: Set<String>, timeout: Duration?,
        output: OutputFormat
    ) async throws {
        try session.store.applyDesired(pools)
        try session.store.markDeleting(prune)
        Wake.send(directory: session.stateDirectory)
        try await waitForHosts(session, cluster: cluster, timeout: timeout, output: output)
    }

    static func delete(
        _ session: Session, cluster: ClusterMember, names: Set<String>, timeout: Duration?, output: OutputFormat
    ) async throws {
        try session.store.markDeleting(names)
        Wake.send(directory: session.stateDirectory)
        try await waitForHosts(session, cluster: cluster, timeout: timeout, output: output)
    }

    /// One pool's state across the cluster.
    struct PoolStatus {
        var spec: PoolSpec
        var readiness: Readiness
        var unplaced: Int
        var hosts: [String: Int]

        var converged: Bool {
            unplaced == 0 && readiness.ready == spec.size && readiness.warm == spec.warm
                && readiness.vms - readiness.leased == spec.totalVMs
        }

        var text: String {
            let placed = hosts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
            var line = "\(spec.name): \(readiness.ready)/\(spec.size) ready"
            if spec.warm > 0 { line += ", \(readiness.warm)/\(spec.warm) warm" }
            line += placed.isEmpty ? "" : " (\(placed))"
            if unplaced > 0 { line += "; \(unplaced) VM\(unplaced == 1 ? "" : "s") fit on no host" }
            return line
        }

        var json: JSONValue {
            .object([
                "pool": .string(spec.name), "size": .int(spec.size), "warm": .int(spec.warm),
                "ready": .int(readiness.ready), "warmReady": .int(readiness.warm), "unplaced": .int(unplaced),
                "hosts": .object(hosts.mapValues { .int($0) }), "converged": .bool(converged),
            ])
        }
    }

    static func status(_ session: Session) async throws -> (pools: [PoolStatus], deleting: [String]) {
        let observation = try await session.reconciler.observe(depth: .hypervisor, allHosts: true)
        let readiness = observation.readiness()
        let unplaced = try session.store.unplaced()
        let placements = Dictionary(grouping: try session.store.placements(), by: \.pool)
        let pools = observation.pools.filter { !$0.deleting }.map { pool in
            PoolStatus(
                spec: pool.spec, readiness: readiness[pool.spec.name] ?? Readiness(),
                unplaced: unplaced[pool.spec.name] ?? 0,
                hosts: Dictionary(
                    (placements[pool.spec.name] ?? []).map { ($0.host, $0.size + $0.warm) }, uniquingKeysWith: +))
        }
        return (pools, observation.pools.filter(\.deleting).map(\.spec.name))
    }

    static func waitForHosts(_ session: Session, cluster: ClusterMember, timeout: Duration?, output: OutputFormat)
        async throws
    {
        let deadline = ContinuousClock.now + (timeout ?? defaultWait)
        var lastShown = ""
        var unplacedSince: ContinuousClock.Instant?
        while true {
            // Place at once when no placer runs (the lock is free); else the placer's next pass does.
            _ = try cluster.placeIfPlacer()
            let (pools, deleting) = try await status(session)
            let done = deleting.isEmpty && pools.allSatisfy(\.converged)
            // VMs that fit nowhere while hosts are up, for a few seconds running (hosts that
            // are starting have time to join): reported now, not at the end of the wait.
            let live = try session.store.hosts().contains { $0.isAlive(timeout: cluster.hostTimeout) }
            if live && pools.contains(where: { $0.unplaced > 0 }) {
                unplacedSince = unplacedSince ?? .now
            } else {
                unplacedSince = nil
            }
            let stuck = unplacedSince.map { ContinuousClock.now - $0 >= .seconds(3) } ?? false
            let line = (pools.map(\.text) + deleting.map { "\($0): deleting" }).joined(separator: "; ")
            if output == .text && line != lastShown && !done {
                session.logger.info("waiting for the hosts: \(line)")
                lastShown = line
            }
            if done || stuck || ContinuousClock.now >= deadline {
                try finish(pools: pools, deleting: deleting, done: done, output: output)
                return
            }
            try await Task.sleep(for: .milliseconds(200))
        }
    }

    static func finish(pools: [PoolStatus], deleting: [String], done: Bool, output: OutputFormat) throws {
        switch output {
        case .text:
            for pool in pools { printOut(pool.text) }
            for name in deleting { printOut("\(name): still deleting") }
        case .json:
            printOut(
                try JSONOutput.encode(
                    JSONValue.object([
                        "actions": .array([]), "summary": .object([:]), "pools": .array(pools.map(\.json)),
                        "converged": .bool(done),
                    ])))
        }
        guard done else {
            let stuck = pools.filter { $0.unplaced > 0 }
            if !stuck.isEmpty {
                printError(
                    "not converged: "
                        + stuck.map { "\($0.unplaced) VM\($0.unplaced == 1 ? "" : "s") of \($0.spec.name)" }
                        .joined(separator: ", ")
                        + " fit on no live host's declared capacity (vmpool get hosts; --capacity on the hosts)")
            } else {
                printError("not converged in time: the hosts' next passes continue (vmpool get hosts, vmpool events)")
            }
            throw ExitCode.failure
        }
    }
}
