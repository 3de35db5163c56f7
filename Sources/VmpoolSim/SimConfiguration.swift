import VmpoolSpec
import Foundation
import VmpoolDriver

/// The sim driver's knobs, read from the environment (documented in README).
public struct SimConfiguration: Sendable, Hashable {
    /// How long every operation takes (`VMPOOL_SIM_LATENCY`, default 0).
    public var latency: Duration
    /// Probability that an operation of a kind fails (`VMPOOL_SIM_FAIL=create:0.2,hotplug-cpu:1`).
    public var failureRates: [SimOperation: Double]
    /// Seed of the failure decisions (`VMPOOL_SIM_SEED`); the n-th operation of a kind fails
    /// or not depending only on the seed and n.
    public var seed: UInt64

    public init(latency: Duration = .zero, failureRates: [SimOperation: Double] = [:], seed: UInt64 = 0) {
        self.latency = latency
        self.failureRates = failureRates
        self.seed = seed
    }

    /// Reads the knobs; an unparsable value is an error, not silently ignored.
    public static func fromEnvironment(_ environment: [String: String] = ProcessInfo.processInfo.environment)
        throws(DriverError) -> SimConfiguration
    {
        var config = SimConfiguration()
        if let text = environment["VMPOOL_SIM_LATENCY"], !text.isEmpty {
            guard let latency = DurationText.parse(text) else {
                throw DriverError(.launchFailed, "VMPOOL_SIM_LATENCY: expected a duration like 50ms, got \"\(text)\"")
            }
            config.latency = latency
        }
        if let text = environment["VMPOOL_SIM_FAIL"], !text.isEmpty {
            for item in text.split(separator: ",") {
                let parts = item.split(separator: ":", maxSplits: 1).map(String.init)
                guard parts.count == 2, let kind = SimOperation(rawValue: parts[0]), let rate = Double(parts[1]),
                    (0...1).contains(rate)
                else {
                    let kinds = SimOperation.allCases.map(\.rawValue).joined(separator: ", ")
                    throw DriverError(
                        .launchFailed,
                        "VMPOOL_SIM_FAIL: expected KIND:PROBABILITY pairs (kinds: \(kinds); probability 0 to 1),"
                            + " got \"\(item)\"")
                }
                config.failureRates[kind] = rate
            }
        }
        if let text = environment["VMPOOL_SIM_SEED"], !text.isEmpty {
            guard let seed = UInt64(text) else {
                throw DriverError(.launchFailed, "VMPOOL_SIM_SEED: expected a non-negative integer, got \"\(text)\"")
            }
            config.seed = seed
        }
        return config
    }
}

/// Operation kinds that fault injection can fail.
public enum SimOperation: String, Sendable, Hashable, CaseIterable {
    case create, clone
    case buildTemplate = "build-template"
    case resume, pause
    case hotplugCPU = "hotplug-cpu"
    case hotplugMemory = "hotplug-memory"
    case stop
}
