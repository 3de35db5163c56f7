import CVmpoolSys
import VmpoolDriver
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
///
/// Children are started with posix_spawn and reaped with waitpid, their output going to
/// files: Foundation's Process reaps through dispatch sources, which tests that block
/// cooperative threads can starve.
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
        for key in env.keys where key.hasPrefix("VMPOOL_") && key != "VMPOOL_TEST_KERNEL" { env[key] = nil }
        env["VMPOOL_LOG_LEVEL"] = "warning"
        for (key, value) in environment { env[key] = value }
        self.environment = env
    }

    public var exists: Bool { FileManager.default.isExecutableFile(atPath: path) }

    /// Runs `vmpool ARGS` to completion.
    @discardableResult
    public func run(_ arguments: [String], environment extra: [String: String] = [:], input: String? = nil) throws
        -> CommandResult
    {
        try start(arguments, environment: extra, input: input).wait()
    }

    /// Starts `vmpool ARGS` without waiting (for kill and concurrency tests).
    public func start(_ arguments: [String], environment extra: [String: String] = [:], input: String? = nil)
        throws -> RunningCommand
    {
        var env = environment
        for (key, value) in extra { env[key] = value }
        return try RunningCommand(path: path, arguments: arguments, environment: env, input: input)
    }
}

/// A child process started by a test, its output captured in files.
public final class RunningCommand: @unchecked Sendable {
    public let pid: Int32
    /// Where standard output goes while the command runs (readable before it ends).
    public let outPath: String
    private let errPath: String
    private var result: CommandResult?

    public init(path: String, arguments: [String], environment: [String: String], input: String? = nil) throws {
        let base = NSTemporaryDirectory() + "vmpool-cmd-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        outPath = base + ".out"
        errPath = base + ".err"
        let out = open(outPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        let err = open(errPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        var inFD: Int32 = -1
        if let input {
            let inPath = base + ".in"
            FileManager.default.createFile(atPath: inPath, contents: Data(input.utf8))
            inFD = open(inPath, O_RDONLY | O_CLOEXEC)
            unlink(inPath)
        }
        defer {
            close(out)
            close(err)
            if inFD >= 0 { close(inFD) }
        }
        let pid = withCStrings([path] + arguments) { args in
            withCStrings(environment.map { "\($0.key)=\($0.value)" }) { env in
                vmpool_spawn_io(path, args, env, inFD, out, err)
            }
        }
        guard pid > 0 else { throw CocoaError(.executableLoad) }
        self.pid = pid
    }

    deinit {
        // Never waited for: its output files go with it (the child keeps its descriptors).
        unlink(outPath)
        unlink(errPath)
    }

    public func kill(_ signal: Int32 = SIGKILL) { Glibc.kill(pid, signal) }

    /// Waits for the child and returns its exit status (128+signal when killed) and output.
    public func wait() -> CommandResult {
        if let result { return result }
        let code = vmpool_wait(pid)
        let stdout = (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? ""
        let stderr = (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? ""
        unlink(outPath)
        unlink(errPath)
        let result = CommandResult(status: code, stdout: stdout, stderr: stderr)
        self.result = result
        return result
    }
}

extension RunningCommand {
    /// Whether the process ends within `seconds`; it is not reaped, so `wait()` still works.
    public func exited(within seconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        repeat {
            var info = siginfo_t()
            if waitid(P_PID, id_t(pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_signo == SIGCHLD {
                return true
            }
            usleep(20_000)
        } while Date() < deadline
        return false
    }
}
