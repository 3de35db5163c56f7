import Benchmark
import Foundation
import Logging
import VmpoolDriver
import VmpoolPlanner
import VmpoolReconciler
import VmpoolSim
import VmpoolSpec
import VmpoolStore

// vmpool's own overhead, without any hypervisor: manifest loading, planning, the store and
// a whole apply on the zero-latency sim driver, at 1, 100 and 10,000 pools (up to 100,000 VMs).

let image = BootImage(kernel: "sim:kernel", initrd: "sim:initrd", cmdline: "console=ttyS0")

/// `pools` manifest documents of `size` VMs each, as one YAML text.
func manifestText(pools: Int, size: Int) -> [UInt8] {
    var text = ""
    text.reserveCapacity(pools * 140)
    for index in 0..<pools {
        text += "---\napiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: p\(index), labels: {team: ci}}\n"
        text += "spec: {size: \(size), vcpus: 1, memory: 256Mi, maxVcpus: 2, maxMemory: 512Mi}\n"
    }
    return Array(text.utf8)
}

func poolSpecs(pools: Int, size: Int) -> [PoolSpec] {
    (0..<pools).map {
        PoolSpec(name: "p\($0)", size: size, vcpus: 1, memoryMiB: 256, maxVcpus: 2, maxMemoryMiB: 512)
    }
}

/// A converged fleet as the planner sees it.
func observedFleet(pools: Int, size: Int) -> (desired: [DesiredPool], vms: [ObservedVM]) {
    let desired = poolSpecs(pools: pools, size: size).map { DesiredPool(spec: $0, shape: VMShape(pool: $0, image: image)) }
    var vms: [ObservedVM] = []
    vms.reserveCapacity(pools * size)
    for pool in desired {
        for index in 0..<size {
            vms.append(
                ObservedVM(
                    id: "\(pool.spec.name)-\(index)", pool: pool.spec.name, condition: .running, shape: pool.shape,
                    boot: .cold, createdAt: Date(timeIntervalSince1970: Double(index))))
        }
    }
    return (desired, vms)
}

func quietLogger() -> Logger {
    var logger = Logger(label: "bench")
    logger.logLevel = .critical
    return logger
}

func temporaryDirectory() -> String {
    let path = NSTemporaryDirectory() + "vmpool-bench-\(UUID().uuidString)"
    try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

/// A state dir with a converged fleet on the sim driver, made once per process.
final class Fleet: @unchecked Sendable {
    let directory: String
    let store: StateStore
    let reconciler: Reconciler
    let specs: [PoolSpec]

    init(pools: Int, size: Int) async throws {
        directory = temporaryDirectory()
        store = try StateStore(directory: directory)
        let driver = try SimDriver(stateDirectory: directory)
        specs = poolSpecs(pools: pools, size: size)
        reconciler = Reconciler(
            store: store, driver: driver,
            configuration: ReconcilerConfiguration(parallelism: 8, defaultImage: image), logger: quietLogger())
        _ = try await reconciler.apply(specs, prune: [])
    }
}

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .peakMemoryResident, .mallocCountTotal], warmupIterations: 1,
        maxDuration: .seconds(5), maxIterations: 20)

    for pools in [1, 100, 10_000] {
        let bytes = manifestText(pools: pools, size: 10)
        Benchmark("manifest parse+validate, \(pools) pools") { benchmark in
            for _ in benchmark.scaledIterations {
                blackHole(ManifestLoader.parse(bytes, file: "bench.yaml"))
            }
        }
    }

    for pools in [1, 100, 10_000] {
        let fleet = observedFleet(pools: pools, size: 10)
        Benchmark("plan no-op, \(pools) pools / \(pools * 10) VMs") { benchmark in
            for _ in benchmark.scaledIterations {
                blackHole(Planner.plan(PlanInput(desired: fleet.desired, vms: fleet.vms)))
            }
        }
        let grown = fleet.desired.map { pool -> DesiredPool in
            var pool = pool
            pool.spec.size += 1
            pool.shape.vcpus = 2
            pool.spec.vcpus = 2
            return pool
        }
        Benchmark("plan grow+hotplug, \(pools) pools / \(pools * 10) VMs") { benchmark in
            for _ in benchmark.scaledIterations {
                blackHole(Planner.plan(PlanInput(desired: grown, vms: fleet.vms)))
            }
        }
    }

    for vms in [1, 100, 10_000] {
        Benchmark(
            "sim apply from empty, \(vms) VMs", configuration: .init(maxIterations: 5)
        ) { benchmark in
            let pools = max(1, vms / 100)
            let wanted = poolSpecs(pools: pools, size: vms / pools)
            for _ in benchmark.scaledIterations {
                let directory = temporaryDirectory()
                defer { try? FileManager.default.removeItem(atPath: directory) }
                let store = try StateStore(directory: directory)
                let reconciler = Reconciler(
                    store: store, driver: try SimDriver(stateDirectory: directory),
                    configuration: ReconcilerConfiguration(parallelism: 8, defaultImage: image),
                    logger: quietLogger())
                benchmark.startMeasurement()
                let result = try await reconciler.apply(wanted, prune: [])
                benchmark.stopMeasurement()
                precondition(result.converged)
            }
        }
    }

    for pools in [1, 100, 10_000] {
        let box = FleetBox()
        Benchmark(
            "no-op plan from the store (observe+plan), \(pools) pools / \(pools * 10) VMs",
            configuration: .init(maxIterations: 10),
            closure: { benchmark async throws in
                let fleet = try box.get()
                for _ in benchmark.scaledIterations {
                    let plan = try await fleet.reconciler.preview(fleet.specs, prune: [])
                    precondition(plan.isEmpty)
                }
            },
            setup: { box.fleet = try await Fleet(pools: pools, size: 10) },
            teardown: { box.remove() })
    }

    for vms in [1_000, 100_000] {
        let box = FleetBox()
        Benchmark(
            "store read all VMs, \(vms) VMs", configuration: .init(maxIterations: 10),
            closure: { benchmark in
                let fleet = try box.get()
                for _ in benchmark.scaledIterations { blackHole(try fleet.store.vms()) }
            },
            setup: { box.fleet = try await Fleet(pools: vms / 10, size: 10) },
            teardown: { box.remove() })
    }

    Benchmark(
        "store launch journal (begin+finish), 1,000 VMs, fresh state dir included",
        configuration: .init(maxIterations: 5)
    ) { benchmark in
        for _ in benchmark.scaledIterations {
            let directory = temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let store = try StateStore(directory: directory)
            let shape = VMShape(vcpus: 1, memoryMiB: 256, maxVcpus: 2, maxMemoryMiB: 512, image: image)
            for index in 0..<1_000 {
                var record = VMRecord(
                    id: "p-\(index)", pool: "p", state: .creating, boot: .cold, shape: shape, createdAt: Date())
                guard let journal = try store.beginLaunch(record, operation: "create") else { continue }
                record.state = .running
                try store.finish(journal, outcome: .ok, updating: record)
            }
        }
    }
}

/// Holds a fleet made by a benchmark's setup hook for its iterations.
final class FleetBox: @unchecked Sendable {
    var fleet: Fleet?

    func get() throws -> Fleet {
        guard let fleet else { throw CocoaError(.featureUnsupported) }
        return fleet
    }

    func remove() {
        if let fleet { try? FileManager.default.removeItem(atPath: fleet.directory) }
        fleet = nil
    }
}
