import VmpoolSpec
import ArgumentParser
import Foundation
import Logging
import Synchronization
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

    @Option(
        name: .customLong("log-level"),
        help: "trace, debug, info, notice, warning, error or critical (env VMPOOL_LOG_LEVEL; default info).")
    var logLevel: String?

    @Option(name: .customLong("log-format"), help: "Logs as text or json lines (env VMPOOL_LOG_FORMAT; default text).")
    var logFormat: String?

    @Option(help: "QEMU accelerator: auto, kvm or tcg (env VMPOOL_ACCEL; default auto).")
    var accel: Accelerator?

    @Option(
        name: .customLong("qemu-user"),
        help: "The user whose subordinate uids VMs run as, one each (env VMPOOL_QEMU_USER; default vmpool-qemu).")
    var qemuUser: String?

    @Option(
        name: .customLong("lock-timeout"), help: "How long to wait for another vmpool on this state dir (default 60s).")
    var lockTimeout: String?

    @Option(
        help: ArgumentHelp(
            "The state store: sqlite:PATH, or postgres://USER@HOST[:PORT]/DATABASE shared by many hosts (env VMPOOL_STORE; default: SQLite in the state dir).",
            valueName: "url"))
    var store: String?

    @Option(help: "This host's name on a shared store (env VMPOOL_HOST; default: the hostname).")
    var host: String?

    @Option(
        name: .customLong("host-timeout"), parsing: .unconditional,
        help:
            "On a shared store: a host silent this long has its VMs placed on others (env VMPOOL_HOST_TIMEOUT; default 30s)."
    )
    var hostTimeout: String?

    public init() {}

    var environment: [String: String] { ProcessInfo.processInfo.environment }

    /// The state dir as the user spelled it (option, environment or default).
    var givenStateDir: String {
        if let stateDir, !stateDir.isEmpty { return stateDir }
        if let value = environment["VMPOOL_STATE_DIR"], !value.isEmpty { return value }
        return StateDirectory.defaultPath()
    }

    /// The state dir resolved once to its real path, so that `/x/state/`, `/x//state`, a
    /// relative path or a symlink all name the same VMs, templates and processes.
    /// `create` makes it (mode 0700) when absent; otherwise an absent state dir is an error.
    func stateDirectory(create: Bool) throws -> String {
        let given = givenStateDir
        if create {
            try StateDirectory.prepare(given)
        } else if access(given, F_OK) != 0 {
            throw CommandFailure(
                description: "the state dir \(given) does not exist: nothing has been applied there"
                    + " (check --state-dir or VMPOOL_STATE_DIR)")
        }
        guard let real = realpath(given, nil) else {
            throw CommandFailure(
                description: "cannot resolve the state dir \(given): \(String(cString: strerror(errno)))")
        }
        defer { free(real) }
        return String(cString: real)
    }

    /// Standbys per template pool (`VMPOOL_STANDBY`, default 2, 0 turns them off).
    func resolvedStandbys() throws -> Int {
        try Self.integer(environment, "VMPOOL_STANDBY", 0...64) ?? 2
    }

    /// An integer environment variable in `range`, or `nil` when unset; anything else is an
    /// error that names the variable.
    static func integer(_ environment: [String: String], _ name: String, _ range: ClosedRange<Int>) throws -> Int? {
        guard let text = environment[name], !text.isEmpty else { return nil }
        guard let value = Int(text), range.contains(value) else {
            throw ValidationError(
                "\(name): expected an integer from \(range.lowerBound) to \(range.upperBound), got \"\(text)\"")
        }
        return value
    }

    func resolvedAccelerator() throws -> Accelerator {
        if let accel { return accel }
        guard let text = environment["VMPOOL_ACCEL"], !text.isEmpty else { return .auto }
        guard let value = Accelerator(rawValue: text) else {
            throw ValidationError("VMPOOL_ACCEL: expected auto, kvm or tcg, got \"\(text)\"")
        }
        return value
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
                "\(logLevel == nil ? "VMPOOL_LOG_LEVEL" : "--log-level"): expected one of \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", ")),"
                    + " got \"\(text)\"")
        }
        return level
    }

    func resolvedLockTimeout() throws -> Double {
        guard let lockTimeout else { return 60 }
        return try duration("--lock-timeout")(lockTimeout).seconds
    }

    func resolvedLogFormat() throws -> LogFormat {
        let text = logFormat ?? environment["VMPOOL_LOG_FORMAT"] ?? "text"
        guard let format = LogFormat(rawValue: text.isEmpty ? "text" : text) else {
            throw ValidationError(
                "\(logFormat == nil ? "VMPOOL_LOG_FORMAT" : "--log-format"): expected text or json, got \"\(text)\"")
        }
        return format
    }

    /// Where the store is (`--store`, `VMPOOL_STORE`); SQLite in `stateDirectory` by default.
    func storeLocation(stateDirectory: String) throws -> StoreLocation {
        let text = store ?? environment["VMPOOL_STORE"] ?? ""
        if text.isEmpty { return .sqlite(path: stateDirectory + "/" + StateStore.fileName) }
        do {
            return try StoreLocation.parse(text, stateDirectory: stateDirectory, environment: environment)
        } catch {
            throw ValidationError((store == nil ? "VMPOOL_STORE: " : "--store: ") + error.message)
        }
    }

    /// Whether the store is shared by many hosts (PostgreSQL).
    var sharedStore: Bool {
        if case .postgres = try? storeLocation(stateDirectory: givenStateDir) { return true }
        return false
    }

    /// This host's name on a shared store: letters, digits, dots, dashes and underscores.
    func resolvedHost() throws -> String {
        let text = host ?? environment["VMPOOL_HOST"] ?? ""
        let name = text.isEmpty ? ProcessInfo.processInfo.hostName : text
        let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")
        guard !name.isEmpty, name.count <= 63, name.allSatisfy(allowed.contains) else {
            throw ValidationError(
                (host == nil ? "VMPOOL_HOST" : "--host")
                    + ": expected 1 to 63 letters, digits, dots, dashes or underscores, got \"\(name)\"")
        }
        return name
    }

    func resolvedHostTimeout() throws -> Duration {
        let fromEnvironment = hostTimeout == nil
        guard let text = hostTimeout ?? environment["VMPOOL_HOST_TIMEOUT"], !text.isEmpty else { return .seconds(30) }
        return try duration(fromEnvironment ? "VMPOOL_HOST_TIMEOUT" : "--host-timeout", allowZero: false)(text)
    }

    public func validate() throws {
        _ = try storeLocation(stateDirectory: "/")
        _ = try resolvedHostTimeout()
        if host != nil || environment["VMPOOL_HOST"] != nil { _ = try resolvedHost() }
        _ = try resolvedDriver()
        _ = try resolvedLogLevel()
        _ = try resolvedLogFormat()
        _ = try resolvedLockTimeout()
        _ = try resolvedStandbys()
        _ = try resolvedAccelerator()
        _ = try Self.integer(environment, "VMPOOL_TCG_CACHE_MIB", 1...2048)
        if let text = environment["VMPOOL_BOOT_TIMEOUT"], !text.isEmpty,
            DurationText.parse(text).map({ $0 > .zero }) != true
        {
            throw ValidationError("VMPOOL_BOOT_TIMEOUT: expected a duration above zero like 90s, got \"\(text)\"")
        }
    }

    /// A logger writing to stderr at the chosen level and format. Logging is bootstrapped once
    /// per process. `quiet` raises the default level to warnings (a progress line says the rest).
    func makeLogger(quiet: Bool = false) throws -> Logger {
        let level = try resolvedLogLevel()
        LoggingBootstrap.once(format: try resolvedLogFormat())
        var logger = Logger(label: "vmpool")
        logger.logLevel = quiet ? max(level, .warning) : level
        return logger
    }

    /// The driver for the state dir `dir` (resolved by `stateDirectory(create:)`).
    func makeDriver(stateDirectory dir: String, logger: Logger) throws -> any HypervisorDriver {
        switch try resolvedDriver() {
        case .sim:
            return try SimDriver(stateDirectory: dir, configuration: SimConfiguration.fromEnvironment(environment))
        case .qemu:
            let accel = try resolvedAccelerator()
            var configuration = QemuConfiguration.fromEnvironment(
                stateDirectory: dir, accelerator: accel, environment)
            if let qemuUser { configuration.qemuUser = qemuUser }
            return try QemuDriver(configuration: configuration, logger: logger)
        }
    }
}

extension Accelerator: ExpressibleByArgument {}

enum LoggingBootstrap {
    private static let done = Mutex(false)

    static func once(format: LogFormat) {
        done.withLock { done in
            guard !done else { return }
            done = true
            switch format {
            case .text: LoggingSystem.bootstrap { label in SafeStreamLogHandler(label: label) }
            case .json: LoggingSystem.bootstrap { label in JSONLogHandler(label: label) }
            }
        }
    }
}
