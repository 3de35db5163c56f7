import Foundation
import VmpoolDriver
import VmpoolPlanner
import VmpoolStore

/// A VM as `get vms`, `describe` and the HTTP API show it: the record, with what the
/// hypervisor says about it.
public struct VMRow: Sendable {
    public var record: VMRecord
    public var condition: ObservedVM.Condition?

    public init(record: VMRecord, condition: ObservedVM.Condition?) {
        self.record = record
        self.condition = condition
    }

    /// Rows of every VM in `observation` (of `pool` only, when given), oldest first.
    public static func rows(_ observation: Observation, pool: String? = nil) -> [VMRow] {
        let conditions = Dictionary(uniqueKeysWithValues: observation.observedVMs.map { ($0.id, $0.condition) })
        return observation.records.filter { pool == nil || $0.pool == pool }.map {
            VMRow(record: $0, condition: conditions[$0.id])
        }
    }

    /// The state users see: what the hypervisor says (a VM paused behind vmpool's back shows
    /// paused), `failed` when the VM is not usable, else the recorded state.
    public var state: String {
        guard record.state == .running || record.state == .paused else { return record.state.rawValue }
        switch condition {
        case .broken: return "failed"
        case .paused: return "paused"
        case .running: return "running"
        case nil: return record.state.rawValue
        }
    }

    public var problem: String? {
        if case .broken(let why) = condition { return why }
        return nil
    }

    /// Where the VM is reached: its own address (bridge mode), or 127.0.0.1 with forwarded ports.
    public var address: String? {
        guard let network = record.network else { return nil }
        return network.address ?? (network.ports.isEmpty ? nil : "127.0.0.1")
    }

    /// `22→20022,8080→31555`.
    public var portsText: String {
        guard let ports = record.network?.ports, !ports.isEmpty else { return "-" }
        return ports.sorted { $0.key < $1.key }.map { "\($0.key)→\($0.value)" }.joined(separator: ",")
    }

    public var json: [String: JSONValue] {
        [
            "id": .string(record.id), "pool": .string(record.pool), "state": .string(state),
            "host": record.host.isEmpty ? .null : .string(record.host),
            "vcpus": .int(record.shape.vcpus), "memoryMiB": .int(record.shape.memoryMiB),
            "boot": .string(record.boot.rawValue), "pid": record.pid.map { .int(Int($0)) } ?? .null,
            "createdAt": .string(JSONValue.rfc3339(record.createdAt)),
            "template": record.templateID.map { .string($0) } ?? .null,
            "problem": problem.map { .string($0) } ?? .null,
            "address": address.map { .string($0) } ?? .null,
            "ports": .object(
                Dictionary(uniqueKeysWithValues: (record.network?.ports ?? [:]).map { ("\($0.key)", .int($0.value)) })),
            "lease": record.lease.map { lease in
                .object([
                    "holder": .string(lease.holder), "leasedAt": .string(JSONValue.rfc3339(lease.leasedAt)),
                    "expiresAt": lease.expiresAt.map { .string(JSONValue.rfc3339($0)) } ?? .null,
                ])
            } ?? .null,
        ]
    }
}
