import ArgumentParser
import Foundation
import VmpoolSpec
import VmpoolStore

extension HostCapacity {
    /// The machine's own: its online CPUs and its physical memory (MemTotal of /proc/meminfo).
    static var machine: HostCapacity {
        HostCapacity(
            vcpus: ProcessInfo.processInfo.activeProcessorCount,
            memoryMiB: Int(ProcessInfo.processInfo.physicalMemory >> 20))
    }

    /// What this host offers its VMs: `flag` (`--capacity`), else `VMPOOL_CAPACITY`, else the
    /// machine's; a part left out of `vcpus=N,memory=SIZE` is the machine's. Errors name where
    /// the text came from.
    static func resolve(flag: String?, environment: [String: String]) throws -> HostCapacity {
        let name = flag == nil ? "VMPOOL_CAPACITY" : "--capacity"
        var result = machine
        guard let text = flag ?? environment["VMPOOL_CAPACITY"], !text.isEmpty else { return result }
        for part in text.split(separator: ",", omittingEmptySubsequences: false) {
            let pair = part.split(separator: "=", maxSplits: 1).map(String.init)
            switch (pair.first, pair.count == 2 ? pair[1] : nil) {
            case ("vcpus", let value?):
                guard let n = Int(value), (1...100_000).contains(n) else {
                    throw ValidationError("\(name): vcpus: expected an integer from 1 to 100000, got \"\(value)\"")
                }
                result.vcpus = n
            case ("memory", let value?):
                guard let mib = MemoryQuantity.parse(value) ?? Int(value).flatMap({ $0 >= 64 ? $0 : nil }) else {
                    throw ValidationError("\(name): memory: \(MemoryQuantity.expectation), got \"\(value)\"")
                }
                result.memoryMiB = mib
            default:
                throw ValidationError(
                    "\(name): expected vcpus=N,memory=SIZE (like vcpus=16,memory=64Gi), got \"\(text)\"")
            }
        }
        return result
    }
}

/// What the desired pools ask of one host, against what it has: every VM the pools keep
/// (`size` and `warm`) with its vCPUs and memory. A paused VM keeps its memory and is resumed
/// with its vCPUs, so it counts; clones of a template share part of their memory, so the
/// memory is an upper bound.
struct HostDemand: Equatable {
    var vms = 0
    var vcpus = 0
    var memoryMiB = 0

    init(_ pools: [PoolSpec]) {
        for pool in pools {
            vms += pool.totalVMs
            vcpus += pool.totalVMs * pool.vcpus
            memoryMiB += pool.totalVMs * pool.memoryMiB
        }
    }

    /// A note when the pools want more vCPUs or memory than `capacity`, else `nil`. Not a
    /// refusal: vCPUs are shared by design, and an idle guest seldom touches all its memory.
    func overcommitNote(_ capacity: HostCapacity, configured: Bool) -> String? {
        var over: [String] = []
        if vcpus > capacity.vcpus {
            over.append("\(vcpus) vCPUs on \(capacity.vcpus) CPU\(capacity.vcpus == 1 ? "" : "s")")
        }
        if memoryMiB > capacity.memoryMiB {
            over.append("\(Self.size(memoryMiB)) of memory on \(Self.size(capacity.memoryMiB))")
        }
        guard !over.isEmpty else { return nil }
        let source = configured ? "VMPOOL_CAPACITY" : "the machine's; VMPOOL_CAPACITY declares another"
        return "note: the pools' \(vms) VM\(vms == 1 ? "" : "s") want more than this host has: "
            + over.joined(separator: ", ") + " (\(source)). Nothing is refused: the VMs will share the CPUs,"
            + " and VMs whose memory the host cannot give may fail to start"
    }

    /// MiB as people read a machine's memory: `512 MiB`, `23.4 GiB`, `19.5 TiB`.
    static func size(_ mib: Int) -> String {
        guard mib >= 1024 else { return "\(mib) MiB" }
        let (unit, scale) = mib >= 1024 * 1024 ? ("TiB", 1024.0 * 1024) : ("GiB", 1024.0)
        let tenths = Int((Double(mib) * 10 / scale).rounded())
        return "\(tenths / 10)" + (tenths % 10 == 0 ? "" : ".\(tenths % 10)") + " " + unit
    }
}

/// Notes on stderr when the pools that would be desired after this input (the input's, and
/// the recorded ones it leaves alone, less those pruned) want more of this host than it has.
/// A shared store places VMs by each host's declared capacity instead, and says what fits
/// nowhere.
func noteOvercommit(_ session: Session, manifests: ManifestSet, pruning prune: Set<String>) {
    guard session.cluster == nil, let stored = try? session.store.pools() else { return }
    var desired: [String: PoolSpec] = [:]
    for pool in stored where !pool.deleting && !prune.contains(pool.spec.name) { desired[pool.spec.name] = pool.spec }
    for pool in manifests.pools { desired[pool.name] = pool }
    let environment = session.options.environment
    guard let capacity = try? HostCapacity.resolve(flag: nil, environment: environment),
        let note = HostDemand(Array(desired.values)).overcommitNote(
            capacity, configured: !(environment["VMPOOL_CAPACITY"] ?? "").isEmpty)
    else { return }
    printError(note)
}
