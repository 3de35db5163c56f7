import VmpoolSpec
import Foundation
import VmpoolDriver
import VmpoolStore

/// Handing ready VMs to single consumers (Kata's VM cache, EC2 warm pools): a lease is one
/// store transaction, so no VM is ever leased twice, and leasing never waits for the state
/// dir lock a running pass holds. A leased VM belongs to its holder, not to its pool, which
/// the next pass refills; a released or expired lease stops the VM.
public struct Leases: Sendable {
    public let store: StateStore
    public let driver: any HypervisorDriver
    public let stateDirectory: String

    public init(store: StateStore, driver: any HypervisorDriver, stateDirectory: String) {
        self.store = store
        self.driver = driver
        self.stateDirectory = stateDirectory
    }

    /// Why a lease was not given.
    public struct Failure: Error, CustomStringConvertible, Sendable {
        public var description: String
        /// No VM was ready and the caller asked not to wait: asking to wait may succeed. Each
        /// front end words that its own way (the CLI's `--wait`, the HTTP body's `wait`).
        public var couldWait = false
    }

    /// Why `holder` cannot name a lease's holder, or `nil`: 1 to 200 characters (counted as
    /// JSON Schema counts, in Unicode scalars), none of them a control character or one that
    /// reorders text (`TerminalText.isUnsafe`), so that `get vms` and `events` show it as sent.
    public static func holderProblem(_ holder: String) -> String? {
        guard !holder.isEmpty, holder.unicodeScalars.count <= 200 else { return "expected 1 to 200 characters" }
        if let bad = holder.unicodeScalars.first(where: { TerminalText.isUnsafe($0) || $0 == "\n" || $0 == "\t" }) {
            return "control characters are not allowed (found U+\(String(format: "%04X", bad.value)))"
        }
        return nil
    }

    /// `USER@HOST`.
    public static func defaultHolder() -> String {
        let user =
            ProcessInfo.processInfo.environment["USER"]
            ?? String(cString: getpwuid(geteuid())?.pointee.pw_name ?? strdup("uid\(geteuid())"))
        return "\(user)@\(ProcessInfo.processInfo.hostName)"
    }

    /// Takes a VM of `pool`, waiting up to `wait` in line behind earlier callers, and gives it
    /// to `handOver` (which prints its id, or answers the request). Until `handOver` returns
    /// the lease is journaled: a vmpool that dies before leaves a lease nobody received, which
    /// the next pass ends; a `handOver` that throws gives the VM up.
    /// `abandoned` says that the caller is gone (an HTTP client that closed its connection):
    /// the wait ends, and a VM leased meanwhile is given up rather than handed to nobody.
    public func take(
        pool: String, holder: String, ttl: Duration?, wait: Duration,
        handOver: (VMRecord) async throws -> Void = { _ in },
        abandoned: @Sendable () -> Bool = { false }
    ) async throws -> VMRecord {
        let deadline = ContinuousClock.now + wait
        let ticket = wait > .zero ? try store.enqueueLeaseWait(pool: pool, holder: holder) : nil
        defer { if let ticket { try? store.dequeueLeaseWait(ticket) } }
        // The pool refills behind this caller; a running service starts at once.
        Wake.send(directory: stateDirectory)
        while true {
            switch try store.lease(pool: pool, holder: holder, ttl: ttl, ticket: ticket) {
            case .leased(let record):
                // The store says it runs; the hypervisor must agree, or the VM goes and the
                // next one is tried.
                // (A VM on another host is that host's to watch: its record is what counts.)
                var runs = record.host != store.host
                if !runs {
                    let status = await driver.status(of: [record.ref], depth: .hypervisor)[record.id]
                    runs = status?.liveness == .alive && status?.running != false
                }
                if runs {
                    Wake.send(directory: stateDirectory)
                    do {
                        if abandoned() { throw Failure(description: "the caller went away before the lease was given") }
                        try await handOver(record)
                    } catch {
                        try? await release(record.id)
                        try? store.closeLeaseJournal(vm: record.id, outcome: .failed, error: "\(error)")
                        throw error
                    }
                    try store.closeLeaseJournal(vm: record.id, outcome: .ok)
                    return record
                }
                try? await release(record.id)
                try? store.closeLeaseJournal(vm: record.id, outcome: .failed, error: "the VM is not running")
                continue
            case .noneReady, .waitYourTurn:
                if abandoned() { throw Failure(description: "the caller went away while waiting for a VM") }
                guard ContinuousClock.now < deadline else {
                    throw Failure(
                        description: wait > .zero
                            ? "no VM of pool \(pool) became ready within \(DurationText.format(wait))"
                            : "no ready VM in pool \(pool) (wait for one with --wait)", couldWait: wait == .zero)
                }
                try await Task.sleep(for: .milliseconds(20))
            }
        }
    }

    /// Ends the lease of `id` and stops the VM. A vmpool killed meanwhile leaves the VM
    /// marked stopping: the next pass's recovery stops it.
    public func release(_ id: String) async throws {
        let record = try store.release(id)
        // A VM on another host is stopped by that host's next pass.
        guard record.host == store.host else { return }
        let journal = try store.begin(operation: "release", pool: record.pool, vm: record.id)
        try? await driver.stop(record.ref)
        try store.finish(
            journal, outcome: .ok, deletingVM: record.id,
            event: Event(pool: record.pool, vm: record.id, kind: "stopped", message: "lease ended"))
        Wake.send(directory: stateDirectory)
    }

    /// The JSON `lease -o json` and the HTTP API give for a leased VM.
    public static func json(_ record: VMRecord) -> [String: JSONValue] {
        var ports: [String: JSONValue] = [:]
        for (guest, host) in record.network?.ports ?? [:] { ports["\(guest)"] = .int(host) }
        let address = record.network?.address ?? (ports.isEmpty ? nil : "127.0.0.1")
        return [
            "id": .string(record.id), "pool": .string(record.pool),
            "address": address.map { .string($0) } ?? .null, "ports": .object(ports),
            "holder": record.lease.map { .string($0.holder) } ?? .null,
            "expiresAt": record.lease?.expiresAt.map { .string(JSONValue.rfc3339($0)) } ?? .null,
        ]
    }
}
