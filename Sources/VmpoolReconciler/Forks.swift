import Foundation
import VmpoolDriver
import VmpoolSpec
import VmpoolStore

/// Forks of a leased VM (SPEC §12): how a job branches, set up once and then N variants. Like
/// a lease, a fork runs without the state dir lock: every VM it launches is recorded (state
/// `creating`, leased to the caller) and journaled before the driver starts it, so a vmpool
/// killed at any instant leaves what the next pass's recovery undoes (`Reconciler.recover`).
extension Leases {
    /// Why no fork was made.
    public struct ForkFailure: Error, CustomStringConvertible, Sendable {
        public var description: String
        /// The request itself is wrong (no such VM, not leased, not running, busy): 4xx over HTTP.
        public var isConflict: Bool
        public var isNotFound = false

        public init(description: String, isConflict: Bool, isNotFound: Bool = false) {
            self.description = description
            self.isConflict = isConflict
            self.isNotFound = isNotFound
        }
    }

    /// What a fork made.
    public struct Forked: Sendable {
        /// The new VMs, running and leased to the caller, in the order they were recorded.
        public var vms: [VMRecord]
        /// How long the source stood paused.
        public var pause: Duration
        /// Why some requested forks did not start (the others did).
        public var failures: [String]
    }

    /// The most copies one fork makes.
    public static let maxForks = 64

    /// Makes `count` VMs from the leased, running VM `id` and gives them to `handOver` (which
    /// prints their ids, or answers the request); until `handOver` returns, their leases are
    /// journaled, so a vmpool that dies before ends them. The forks are leased to the source's
    /// holder; `holder`, when given, must be it. Fails, making nothing, when the source cannot
    /// be saved; when only some forks fail, the others are kept and `failures` says why.
    public func fork(
        _ id: String, count: Int, ttl: Duration?, holder: String?,
        handOver: (Forked) async throws -> Void = { _ in }
    ) async throws -> Forked {
        guard (1...Self.maxForks).contains(count) else {
            throw ForkFailure(description: "the count must be 1 to \(Self.maxForks), not \(count)", isConflict: true)
        }
        guard let forking = driver as? any ForkAccess else {
            throw ForkFailure(description: "the \(driver.name) driver cannot fork VMs", isConflict: true)
        }
        guard let current = try store.vm(id) else {
            throw ForkFailure(
                description: "no VM named \"\(id)\" (see vmpool get vms)", isConflict: false, isNotFound: true)
        }
        // The snapshot is named as a template of the pool: recovery removes one a dead vmpool left.
        let snapshot = VMID.template(pool: current.pool)
        let begun: StateStore.ForkBegun
        do {
            begun = try store.beginFork(
                id, count: count, ttl: ttl, holder: holder, snapshot: snapshot,
                portIsFree: LocalPorts.isFree)
        } catch {
            guard error.code == .conflict || error.code == .notFound else { throw error }
            throw ForkFailure(description: error.message, isConflict: true, isNotFound: error.code == .notFound)
        }
        let source = ForkSource(vm: begun.source.ref, shape: begun.source.shape, template: begun.source.templateID)
        let requests = begun.forks.map { fork in
            LaunchRequest(
                id: fork.record.id, pool: fork.record.pool, shape: fork.record.shape, state: .running,
                network: fork.record.network, slot: fork.record.id, walls: walls(of: fork.record.pool))
        }
        let outcome: ForkOutcome
        do {
            outcome = try await forking.fork(source, snapshot: snapshot, into: requests)
        } catch {
            for fork in begun.forks { try? store.forgetFork(fork.journal, fork.record.id, error: "\(error)") }
            try? store.finish(begun.journal, outcome: .failed, error: "\(error)")
            try? store.record(
                Event(pool: begun.source.pool, vm: id, kind: "fork-failed", message: "\(error)"))
            throw error
        }
        var made = Forked(vms: [], pause: outcome.pause, failures: [])
        for (fork, result) in zip(begun.forks, outcome.vms) {
            switch result {
            case .success(let launched):
                var record = fork.record
                record.state = .running
                record.pid = launched.pid
                record.shape = launched.shape
                try store.markForkRunning(record, source: id)
                made.vms.append(record)
            case .failure(let error):
                made.failures.append(error.description)
                try? await driver.stop(fork.record.ref)
                try store.forgetFork(fork.journal, fork.record.id, error: error.description)
            }
        }
        try store.finish(
            begun.journal, outcome: made.vms.isEmpty ? .failed : .ok,
            error: made.failures.isEmpty ? nil : made.failures.joined(separator: "; "))
        Wake.send(directory: stateDirectory)
        guard !made.vms.isEmpty else {
            throw ForkFailure(
                description: "no fork of \(id) started: \(made.failures.first ?? "unknown reason")", isConflict: false)
        }
        let launched = Dictionary(uniqueKeysWithValues: begun.forks.map { ($0.record.id, $0.journal) })
        do {
            try await handOver(made)
        } catch {
            for vm in made.vms {
                try? await release(vm.id)
                if let journal = launched[vm.id] { try? store.finish(journal, outcome: .failed, error: "\(error)") }
            }
            throw error
        }
        for vm in made.vms {
            if let journal = launched[vm.id] { try store.finish(journal, outcome: .ok) }
        }
        return made
    }

    /// The walls of `pool` as applied now (a fork starts behind its pool's walls).
    private func walls(of pool: String) -> Walls {
        ((try? store.pools()) ?? []).first { $0.spec.name == pool }?.spec.walls ?? Walls()
    }
}
