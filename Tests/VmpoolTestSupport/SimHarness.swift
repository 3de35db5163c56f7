import Foundation
import Logging
import VmpoolDriver
import VmpoolReconciler
import VmpoolSim
import VmpoolSpec
import VmpoolStore

/// A reconciler on the sim driver in a throwaway state dir.
public struct SimHarness: Sendable {
    public let directory: TemporaryDirectory
    public let store: StateStore
    public let driver: SimDriver
    public let reconciler: Reconciler

    public init(faults: [SimOperation: Double] = [:], seed: UInt64 = 1, parallelism: Int = 4) throws {
        directory = TemporaryDirectory()
        store = try StateStore(directory: directory.path)
        driver = try SimDriver(
            stateDirectory: directory.path, configuration: SimConfiguration(failureRates: faults, seed: seed))
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        reconciler = Reconciler(
            store: store, driver: driver,
            configuration: ReconcilerConfiguration(parallelism: parallelism, defaultImage: testImage), logger: logger)
    }

    /// A second reconciler on the same state dir, as the next vmpool run would be.
    public func reopened(faults: [SimOperation: Double] = [:]) throws -> SimHarness {
        try SimHarness(directory: directory, faults: faults)
    }

    private init(directory: TemporaryDirectory, faults: [SimOperation: Double]) throws {
        self.directory = directory
        store = try StateStore(directory: directory.path)
        driver = try SimDriver(
            stateDirectory: directory.path, configuration: SimConfiguration(failureRates: faults, seed: 7))
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        reconciler = Reconciler(
            store: store, driver: driver, configuration: ReconcilerConfiguration(defaultImage: testImage),
            logger: logger)
    }

    /// Recorded VMs of a pool by recorded state.
    public func states(_ pool: String) throws -> [VMState: Int] {
        var counts: [VMState: Int] = [:]
        for vm in try store.vms(pool: pool) { counts[vm.state, default: 0] += 1 }
        return counts
    }
}
