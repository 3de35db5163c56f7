import Foundation
import GRDB
import Synchronization
import VmpoolDriver
import VmpoolSpec

/// An in-process simulated hypervisor whose VMs persist in the state dir.
///
/// It enforces what QEMU enforces (hotplug ceilings, 128 MiB memory blocks, pause and
/// resume legality, clones only from a saved template of the same shape) so that plans
/// and reconcile logic are exercised honestly, but it runs no processes.
public final class SimDriver: HypervisorDriver {
    public let name = "sim"
    public let configuration: SimConfiguration
    private let db: DatabaseQueue
    private let counters = Mutex<[SimOperation: [String: UInt64]]>([:])

    public static let fileName = "sim.sqlite"

    public init(stateDirectory: String, configuration: SimConfiguration = SimConfiguration()) throws(DriverError) {
        self.configuration = configuration
        do {
            var config = Configuration()
            config.busyMode = .timeout(10)
            db = try DatabaseQueue(path: stateDirectory + "/" + Self.fileName, configuration: config)
            try db.writeWithoutTransaction { db in
                try db.execute(sql: "PRAGMA journal_mode = WAL")
                try db.execute(sql: "PRAGMA synchronous = NORMAL")
            }
            try db.write { db in
                try db.execute(
                    sql: """
                        CREATE TABLE IF NOT EXISTS simvm (
                            id TEXT PRIMARY KEY NOT NULL,
                            pool TEXT NOT NULL,
                            running INTEGER NOT NULL,
                            alive INTEGER NOT NULL DEFAULT 1,
                            agent INTEGER NOT NULL DEFAULT 1,
                            vcpus INTEGER NOT NULL,
                            memoryMiB INTEGER NOT NULL,
                            maxVcpus INTEGER NOT NULL,
                            maxMemoryMiB INTEGER NOT NULL,
                            template TEXT
                        );
                        CREATE TABLE IF NOT EXISTS simstandby (
                            id TEXT PRIMARY KEY NOT NULL,
                            pool TEXT NOT NULL,
                            template TEXT NOT NULL
                        );
                        CREATE TABLE IF NOT EXISTS simtemplate (
                            id TEXT PRIMARY KEY NOT NULL,
                            pool TEXT NOT NULL,
                            key TEXT NOT NULL
                        );
                        """)
            }
            for suffix in ["", "-wal", "-shm"] { chmod(stateDirectory + "/" + Self.fileName + suffix, 0o600) }
        } catch {
            throw DriverError(.io, "cannot open the sim driver's state in \(stateDirectory): \(error)")
        }
    }

    // MARK: - HypervisorDriver

    public func create(_ request: LaunchRequest) async throws(DriverError) -> LaunchedVM {
        try await step(.create, key: request.slot, vm: request.id)
        try checkImage(request.shape.image, vm: request.id)
        try insert(request, template: nil)
        return LaunchedVM(pid: nil, shape: request.shape)
    }

    public func buildTemplate(_ template: TemplateRef) async throws(DriverError) {
        try await step(.buildTemplate, key: template.pool, vm: nil)
        try checkImage(template.key.image, vm: nil)
        let key = try encode(template.key)
        try write { db in
            try db.execute(
                sql: "INSERT OR REPLACE INTO simtemplate (id, pool, key) VALUES (?, ?, ?)",
                arguments: [template.id, template.pool, key])
        }
    }

    public func clone(_ request: LaunchRequest, from template: TemplateRef) async throws(DriverError) -> LaunchedVM {
        try await step(.clone, key: request.slot, vm: request.id)
        guard let stored = try storedTemplateKey(template.id) else {
            throw DriverError(.notFound, "template \(template.id) has no saved state", vm: request.id)
        }
        guard stored == request.shape.templateKey else {
            throw DriverError(.invalidState, "template \(template.id) has another shape than the clone", vm: request.id)
        }
        try write { db in try db.execute(sql: "DELETE FROM simstandby WHERE id = ?", arguments: [request.id]) }
        try insert(request, template: template.id)
        return LaunchedVM(pid: nil, shape: request.shape)
    }

    public func prestart(id: String, pool: String, from template: TemplateRef) async throws(DriverError) -> Int32? {
        try await step(.clone, key: "standby \(id)", vm: id)
        guard try storedTemplateKey(template.id) != nil else {
            throw DriverError(.notFound, "template \(template.id) has no saved state", vm: id)
        }
        try write { db in
            try db.execute(
                sql: "INSERT OR REPLACE INTO simstandby (id, pool, template) VALUES (?, ?, ?)",
                arguments: [id, pool, template.id])
        }
        return nil
    }

    public func pause(_ vm: VMRef) async throws(DriverError) {
        try await step(.pause, key: vm.id, vm: vm.id)
        let row = try fetch(vm.id)
        guard row.running else { throw DriverError(.invalidState, "cannot pause: the VM is already paused", vm: vm.id) }
        try setColumn("running", 0, vm: vm.id)
    }

    public func resume(_ vm: VMRef) async throws(DriverError) {
        try await step(.resume, key: vm.id, vm: vm.id)
        let row = try fetch(vm.id)
        guard !row.running else { throw DriverError(.invalidState, "cannot resume: the VM is running", vm: vm.id) }
        try setColumn("running", 1, vm: vm.id)
    }

    public func hotplugCPUs(_ vm: VMRef, shape: VMShape, to vcpus: Int) async throws(DriverError) {
        try await step(.hotplugCPU, key: vm.id, vm: vm.id)
        let row = try fetch(vm.id)
        guard vcpus <= row.maxVcpus else {
            throw DriverError(
                .limitExceeded, "cannot plug \(vcpus) CPUs: the VM's ceiling is \(row.maxVcpus)", vm: vm.id)
        }
        guard vcpus >= row.vcpus else {
            throw DriverError(.invalidState, "CPUs can only be added: has \(row.vcpus), asked \(vcpus)", vm: vm.id)
        }
        try setColumn("vcpus", vcpus, vm: vm.id)
    }

    public func hotplugMemory(_ vm: VMRef, shape: VMShape, to memoryMiB: Int) async throws(DriverError) {
        try await step(.hotplugMemory, key: vm.id, vm: vm.id)
        let row = try fetch(vm.id)
        guard memoryMiB <= row.maxMemoryMiB else {
            throw DriverError(
                .limitExceeded, "cannot grow memory to \(memoryMiB) MiB: the ceiling is \(row.maxMemoryMiB) MiB",
                vm: vm.id)
        }
        let delta = memoryMiB - row.memoryMiB
        guard delta >= 0, delta % SpecLimits.memoryBlockMiB == 0 else {
            throw DriverError(
                .invalidState,
                "memory grows in \(SpecLimits.memoryBlockMiB) MiB blocks: has \(row.memoryMiB) MiB, asked"
                    + " \(memoryMiB) MiB", vm: vm.id)
        }
        try setColumn("memoryMiB", memoryMiB, vm: vm.id)
    }

    public func stop(_ vm: VMRef) async throws(DriverError) {
        try await step(.stop, key: vm.id, vm: vm.id)
        try write { db in
            try db.execute(sql: "DELETE FROM simvm WHERE id = ?", arguments: [vm.id])
            try db.execute(sql: "DELETE FROM simstandby WHERE id = ?", arguments: [vm.id])
        }
    }

    public func deleteTemplate(id: String) async throws(DriverError) {
        try write { db in try db.execute(sql: "DELETE FROM simtemplate WHERE id = ?", arguments: [id]) }
    }

    /// The sim driver makes nothing on the host.
    public func prepareNetwork(_ shape: NetworkShape) async throws(DriverError) -> Bool { false }
    public func removeBridge(_ name: String) async {}

    public func templateExists(_ template: TemplateRef) async -> Bool {
        ((try? storedTemplateKey(template.id)) ?? nil) != nil
    }

    public func status(of vms: [VMRef], depth: StatusDepth) async -> [String: VMStatus] {
        guard let rows = try? allRows() else { return [:] }
        var result: [String: VMStatus] = [:]
        result.reserveCapacity(vms.count)
        for vm in vms {
            guard let row = rows[vm.id], row.alive else {
                result[vm.id] = .gone
                continue
            }
            result[vm.id] = VMStatus(
                liveness: .alive, running: row.running,
                agent: depth == .guest && row.running ? (row.agent ? .answers : .silent) : nil,
                vcpus: row.vcpus, memoryMiB: row.memoryMiB)
        }
        return result
    }

    public func discover() async -> [DiscoveredVM] {
        guard let rows = try? allRows() else { return [] }
        let standbys = (try? await db.read { db in try String.fetchAll(db, sql: "SELECT id FROM simstandby") }) ?? []
        return (rows.values.filter(\.alive).map(\.id) + standbys).map { DiscoveredVM(id: $0, pid: nil) }
            .sorted { $0.id < $1.id }
    }

    public func discoverTemplates() async -> [String] {
        (try? await db.read { db in try String.fetchAll(db, sql: "SELECT id FROM simtemplate ORDER BY id") }) ?? []
    }

    // MARK: - Interference, for drift tests and demos

    /// The VM's "process" dies: it stays listed nowhere but in vmpool's records.
    public func simulateCrash(_ id: String) throws(DriverError) { try setColumn("alive", 0, vm: id) }
    /// Someone paused the VM behind vmpool's back.
    public func simulateExternalPause(_ id: String) throws(DriverError) { try setColumn("running", 0, vm: id) }
    /// The guest agent stops answering.
    public func simulateAgentHang(_ id: String) throws(DriverError) { try setColumn("agent", 0, vm: id) }
    /// Someone changed the VM's CPU count behind vmpool's back.
    public func simulateResize(_ id: String, vcpus: Int) throws(DriverError) { try setColumn("vcpus", vcpus, vm: id) }
    /// A VM vmpool has no record of (as after a crash between launch and record).
    public func simulateStray(id: String, pool: String, shape: VMShape) throws(DriverError) {
        try insert(LaunchRequest(id: id, pool: pool, shape: shape, state: .running), template: nil)
    }

    // MARK: - Internals

    private struct SimRow {
        var id: String
        var running: Bool
        var alive: Bool
        var agent: Bool
        var vcpus: Int
        var memoryMiB: Int
        var maxVcpus: Int
        var maxMemoryMiB: Int
    }

    /// Waits the configured latency, then decides whether this operation fails: from the
    /// seed, the kind and what the operation is on (`key`: a VM's id, or a new VM's place in
    /// its pool), never from the order operations run in, so that a seed fails the same
    /// actions at any `--parallel`. A key failed once is counted, so that retrying it can succeed.
    private func step(_ operation: SimOperation, key: String, vm: String?) async throws(DriverError) {
        if configuration.latency > .zero {
            try? await Task.sleep(for: configuration.latency)
        }
        guard let rate = configuration.failureRates[operation], rate > 0 else { return }
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in key.utf8 { hash = (hash ^ UInt64(byte)) &* 0x0100_0000_01b3 }
        let attempt = counters.withLock { counters in
            let n = counters[operation, default: [:]][key, default: 0]
            counters[operation, default: [:]][key] = n + 1
            return n
        }
        if Self.unitInterval(seed: configuration.seed, operation: operation, n: hash &+ attempt) < rate {
            throw DriverError(.injectedFault, "injected \(operation.rawValue) failure (VMPOOL_SIM_FAIL)", vm: vm)
        }
    }

    /// A reproducible number in [0, 1) from (seed, operation, n): SplitMix64 over their mix.
    public static func unitInterval(seed: UInt64, operation: SimOperation, n: UInt64) -> Double {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in operation.rawValue.utf8 { hash = (hash ^ UInt64(byte)) &* 0x0100_0000_01b3 }
        var z = seed &+ hash &+ n &* 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        z ^= z >> 31
        return Double(z >> 11) / Double(1 << 53)
    }

    private func checkImage(_ image: BootImage, vm: String?) throws(DriverError) {
        for path in [image.kernel, image.initrd].compactMap({ $0 }) where path.hasPrefix("/") {
            if access(path, R_OK) != 0 {
                throw DriverError(.imageMissing, "image file \(path) does not exist or is not readable", vm: vm)
            }
        }
    }

    private func insert(_ request: LaunchRequest, template: String?) throws(DriverError) {
        let shape = request.shape
        try write { db in
            try db.execute(
                sql: """
                    INSERT OR REPLACE INTO simvm (id, pool, running, vcpus, memoryMiB, maxVcpus, maxMemoryMiB, template)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                    """,
                arguments: [
                    request.id, request.pool, request.state == .running ? 1 : 0, shape.vcpus, shape.memoryMiB,
                    shape.maxVcpus, shape.maxMemoryMiB, template,
                ])
        }
    }

    private func fetch(_ id: String) throws(DriverError) -> SimRow {
        let row: SimRow?
        do {
            row = try db.read { db in
                try Row.fetchOne(db, sql: "SELECT * FROM simvm WHERE id = ?", arguments: [id]).map(Self.row)
            }
        } catch {
            throw DriverError(.io, "sim state unreadable: \(error)", vm: id)
        }
        guard let row, row.alive else { throw DriverError(.notFound, "no such VM", vm: id) }
        return row
    }

    private func allRows() throws -> [String: SimRow] {
        try db.read { db in
            var rows: [String: SimRow] = [:]
            let cursor = try Row.fetchCursor(db, sql: "SELECT * FROM simvm")
            while let row = try cursor.next() {
                let sim = Self.row(row)
                rows[sim.id] = sim
            }
            return rows
        }
    }

    private static func row(_ row: Row) -> SimRow {
        SimRow(
            id: row["id"], running: row["running"], alive: row["alive"], agent: row["agent"], vcpus: row["vcpus"],
            memoryMiB: row["memoryMiB"], maxVcpus: row["maxVcpus"], maxMemoryMiB: row["maxMemoryMiB"])
    }

    private func storedTemplateKey(_ id: String) throws(DriverError) -> TemplateKey? {
        let text: String?
        do {
            text = try db.read { db in
                try String.fetchOne(db, sql: "SELECT key FROM simtemplate WHERE id = ?", arguments: [id])
            }
        } catch {
            throw DriverError(.io, "sim state unreadable: \(error)")
        }
        guard let text else { return nil }
        return try? JSONDecoder().decode(TemplateKey.self, from: Data(text.utf8))
    }

    private func setColumn(_ column: String, _ value: Int, vm id: String) throws(DriverError) {
        let changed = try write { db in
            try db.execute(sql: "UPDATE simvm SET \(column) = ? WHERE id = ?", arguments: [value, id])
            return db.changesCount
        }
        if changed == 0 { throw DriverError(.notFound, "no such VM", vm: id) }
    }

    private func write<T>(_ body: (Database) throws -> T) throws(DriverError) -> T {
        do {
            return try db.write(body)
        } catch {
            throw DriverError(.io, "sim state unwritable: \(error)")
        }
    }

    private func encode(_ key: TemplateKey) throws(DriverError) -> String {
        do {
            let encoder = JSONEncoder()
            encoder.outputFormatting = .sortedKeys
            return String(decoding: try encoder.encode(key), as: UTF8.self)
        } catch {
            throw DriverError(.io, "cannot encode a template key: \(error)")
        }
    }
}

extension SimDriver: ForkAccess {
    /// Copies a running sim VM: each fork is a running VM of the source's pool and shape (its
    /// CPUs and memory as the source has them now). A fork fails as a clone does
    /// (`VMPOOL_SIM_FAIL=clone:...`), keyed by its slot.
    public func fork(_ source: ForkSource, snapshot: String, into requests: [LaunchRequest])
        async throws(DriverError) -> ForkOutcome
    {
        let row = try fetch(source.vm.id)
        guard row.running else {
            throw DriverError(.invalidState, "the VM is paused; only a running VM can be forked", vm: source.vm.id)
        }
        var results: [Result<LaunchedVM, DriverError>] = []
        for request in requests {
            do throws(DriverError) {
                try await step(.clone, key: request.slot, vm: request.id)
                var copy = request
                copy.shape.vcpus = row.vcpus
                copy.shape.memoryMiB = row.memoryMiB
                try insert(copy, template: nil)
                results.append(.success(LaunchedVM(pid: nil, shape: copy.shape)))
            } catch {
                results.append(.failure(error))
            }
        }
        return ForkOutcome(pause: .zero, vms: results)
    }
}
