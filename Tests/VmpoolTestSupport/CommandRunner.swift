import Foundation

/// The result of running the built `vmpool` binary.
public struct CommandResult: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String

    public var stdoutLines: [String] { stdout.split(separator: "\n").map(String.init) }
    public var stderrLines: [String] { stderr.split(separator: "\n").map(String.init) }
}

/// Runs the `vmpool` executable the test build produced, the way users run it.
public struct VmpoolBinary: Sendable {
    public let path: String
    public var environment: [String: String]

    /// The binary next to the test bundle (`.build/<config>/vmpool`).
    public init(environment: [String: String] = [:]) {
        var dir = URL(fileURLWithPath: CommandLine.arguments.first ?? ".").deletingLastPathComponent()
        var candidate = dir.appendingPathComponent("vmpool").path
        for _ in 0..<4 where !FileManager.default.isExecutableFile(atPath: candidate) {
            dir.deleteLastPathComponent()
            candidate = dir.appendingPathComponent("vmpool").path
        }
        if !FileManager.default.isExecutableFile(atPath: candidate) {
            candidate = repositoryRoot + "/.build/debug/vmpool"
        }
        path = candidate
        var env = ProcessInfo.processInfo.environment
        for key in env.keys where key.hasPrefix("VMPOOL_") { env[key] = nil }
        env["VMPOOL_LOG_LEVEL"] = "warning"
        for (key, value) in environment { env[key] = value }
        self.environment = env
    }

    public var exists: Bool { FileManager.default.isExecutableFile(atPath: path) }

    /// Runs `vmpool ARGS` to completion.
    @discardableResult
    public func run(_ arguments: [String], environment extra: [String: String] = [:]) throws -> CommandResult {
        let process = try start(arguments, environment: extra)
        return process.wait()
    }

    /// Starts `vmpool ARGS` without waiting (for kill and concurrency tests).
    public func start(_ arguments: [String], environment extra: [String: String] = [:]) throws -> RunningCommand {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        var env = environment
        for (key, value) in extra { env[key] = value }
        process.environment = env
        let out = Pipe()
        let err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        return RunningCommand(process: process, out: out, err: err)
    }
}

/// A `vmpool` process started by a test.
public final class RunningCommand: @unchecked Sendable {
    public let process: Process
    private let out: Pipe
    private let err: Pipe
    private var outData = Data()
    private var errData = Data()
    private let group = DispatchGroup()

    init(process: Process, out: Pipe, err: Pipe) {
        self.process = process
        self.out = out
        self.err = err
        group.enter()
        DispatchQueue.global().async {
            self.outData = out.fileHandleForReading.readDataToEndOfFile()
            self.group.leave()
        }
        group.enter()
        DispatchQueue.global().async {
            self.errData = err.fileHandleForReading.readDataToEndOfFile()
            self.group.leave()
        }
    }

    public var pid: Int32 { process.processIdentifier }

    public func kill(_ signal: Int32 = SIGKILL) { Glibc.kill(process.processIdentifier, signal) }

    public func wait() -> CommandResult {
        process.waitUntilExit()
        group.wait()
        return CommandResult(
            status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
            stderr: String(decoding: errData, as: UTF8.self))
    }
}
