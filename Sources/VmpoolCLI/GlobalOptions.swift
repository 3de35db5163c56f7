import ArgumentParser
import Foundation
import Logging
import VmpoolDriver
import VmpoolQEMU
import VmpoolSim
import VmpoolStore

/// Which hypervisor driver runs VMs.
public enum DriverKind: String, ExpressibleByArgument, CaseIterable, Sendable {
    case qemu
    case sim
}

/// Options every command takes (SPEC section 3), with their environment variables.
public struct GlobalOptions: ParsableArguments {
    @Option(name: .customLong("state-dir"), help: "State directory (env VMPOOL_STATE_DIR).")
    var stateDir: String?

    @Option(help: "Hypervisor driver: qemu or sim (env VMPOOL_DRIVER; default qemu).")
    var driver: DriverKind?

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical (env VMPOOL_LOG_LEVEL; default info).")
    var logLevel: String?

    @Option(help: "QEMU accelerator: auto, kvm or tcg (env VMPOOL_ACCEL; default auto).")
    var accel: Accelerator?

    @Option(name: .customLong("lock-timeout"), help: "How long to wait for another vmpool on this state dir (default 60s).")
    var lockTimeout: String?

    public init() {}

    var environment: [String: String] { ProcessInfo.processInfo.environment }

    var resolvedStateDir: String {
        if let stateDir, !stateDir.isEmpty { return stateDir }
        if let value = environment["VMPOOL_STATE_DIR"], !value.isEmpty { return value }
        return StateDirectory.defaultPath()
    }

    func resolvedDriver() throws -> DriverKind {
        if let driver { return driver }
        guard let value = environment["VMPOOL_DRIVER"], !value.isEmpty else { return .qemu }
        guard let kind = DriverKind(rawValue: value) else {
            throw ValidationError("VMPOOL_DRIVER: expected qemu or sim, got \"\(value)\"")
        }
        return kind
    }

    func resolvedLogLevel() throws -> Logger.Level {
        let text = logLevel ?? environment["VMPOOL_LOG_LEVEL"] ?? "info"
        guard let level = Logger.Level(rawValue: text.isEmpty ? "info" : text) else {
            throw ValidationError(
                "--log-level: expected one of \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", ")),"
                    + " got \"\(text)\"")
        }
        return level
    }

    func resolvedLockTimeout() throws -> Double {
        guard let lockTimeout else { return 60 }
        guard let duration = DurationText.parse(lockTimeout) else {
            throw ValidationError("--lock-timeout: expected a duration like 30s or 500ms, got \"\(lockTimeout)\"")
        }
        return duration.seconds
    }

    public func validate() throws {
        _ = try resolvedDriver()
        _ = try resolvedLogLevel()
        _ = try resolvedLockTimeout()
    }

    /// A logger writing to stderr at the chosen level. Logging is bootstrapped once per process.
    func makeLogger() throws -> Logger {
        let level = try resolvedLogLevel()
        LoggingBootstrap.once()
        var logger = Logger(label: "vmpool")
        logger.logLevel = level
        return logger
    }

    /// The driver for this state dir.
    func makeDriver(logger: Logger) throws -> any HypervisorDriver {
        let dir = resolvedStateDir
        switch try resolvedDriver() {
        case .sim:
            try StateDirectory.prepare(dir)
            return try SimDriver(stateDirectory: dir, configuration: SimConfiguration.fromEnvironment(environment))
        case .qemu:
            let accel = accel ?? environment["VMPOOL_ACCEL"].flatMap(Accelerator.init(rawValue:)) ?? .auto
            return try QemuDriver(
                configuration: QemuConfiguration.fromEnvironment(stateDirectory: dir, accelerator: accel, environment),
                logger: logger)
        }
    }
}

extension Accelerator: ExpressibleByArgument {}

extension Duration {
    /// The duration in (fractional) seconds.
    var seconds: Double {
        Double(components.seconds) + Double(components.attoseconds) / 1e18
    }
}

enum LoggingBootstrap {
    private static let done: Void = {
        LoggingSystem.bootstrap { label in StreamLogHandler.standardError(label: label) }
    }()
    static func once() { _ = done }
}
