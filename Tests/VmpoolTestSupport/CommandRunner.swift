import CVmpoolSys
import VmpoolDriver
import Foundation

/// The result of running the built `vmpool` binary.
public struct CommandResult: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String
    /// Standard output as bytes (binary output does not survive `stdout`'s UTF-8 decoding).
    public var stdoutData = Data()

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
        try start(arguments, environment: extra, stdin: input.map { .data(Data($0.utf8)) } ?? .null)
    }

    /// Starts `vmpool ARGS` with `stdin` as its standard input.
    public func start(_ arguments: [String], environment extra: [String: String] = [:], stdin: RunningCommand.Input)
        throws -> RunningCommand
    {
        var env = environment
        for (key, value) in extra { env[key] = value }
        return try RunningCommand(path: path, arguments: arguments, environment: env, stdin: stdin)
    }
}

/// A child process started by a test, its output captured in files.
public final class RunningCommand: @unchecked Sendable {
    /// What a child reads on its standard input.
    public enum Input: Sendable {
        /// vmpool's own test process's (in practice: nothing).
        case null
        /// These bytes, then end of file.
        case data(Data)
        /// A pipe the test writes to (`write(_:)`) and closes (`closeInput()`) as it goes.
        case pipe
    }

    public let pid: Int32
    /// Where standard output goes while the command runs (readable before it ends).
    public let outPath: String
    /// Where standard error goes while the command runs.
    public let errPath: String
    private var result: CommandResult?
    private var inputWriter: Int32 = -1

    public convenience init(path: String, arguments: [String], environment: [String: String], input: String? = nil)
        throws
    {
        try self.init(
            path: path, arguments: arguments, environment: environment,
            stdin: input.map { .data(Data($0.utf8)) } ?? .null)
    }

    public init(path: String, arguments: [String], environment: [String: String], stdin: Input) throws {
        let base = NSTemporaryDirectory() + "vmpool-cmd-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        outPath = base + ".out"
        errPath = base + ".err"
        let out = open(outPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        let err = open(errPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        var inFD: Int32 = -1
        switch stdin {
        case .null:
            break
        case .data(let bytes):
            let inPath = base + ".in"
            FileManager.default.createFile(atPath: inPath, contents: bytes)
            inFD = open(inPath, O_RDONLY | O_CLOEXEC)
            unlink(inPath)
        case .pipe:
            var fds: [Int32] = [0, 0]
            guard vmpool_pipe_cloexec(&fds) == 0 else { throw CocoaError(.fileWriteUnknown) }
            inFD = fds[0]
            inputWriter = fds[1]
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
        closeInput()
    }

    public func kill(_ signal: Int32 = SIGKILL) { Glibc.kill(pid, signal) }

    /// Writes to the child's standard input (`Input.pipe`).
    public func write(_ text: String) {
        guard inputWriter >= 0 else { return }
        let bytes = Array(text.utf8)
        _ = bytes.withUnsafeBytes { Glibc.write(inputWriter, $0.baseAddress, $0.count) }
    }

    /// Closes the child's standard input (`Input.pipe`): it reads end of file.
    public func closeInput() {
        if inputWriter >= 0 {
            close(inputWriter)
            inputWriter = -1
        }
    }

    /// How many bytes the child has written to its standard output so far.
    public var outputSize: Int {
        var info = stat()
        return stat(outPath, &info) == 0 ? Int(info.st_size) : 0
    }

    /// Waits for the child up to `timeout`; `nil` when it still runs then (it is not killed).
    public func wait(timeout: Duration) -> CommandResult? {
        if let result { return result }
        let deadline = ContinuousClock.now + timeout
        while true {
            var status: Int32 = 0
            let done = waitpid(pid, &status, WNOHANG)
            if done == pid {
                let code = status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
                return finish(code)
            }
            if done < 0 && errno != EINTR { return finish(-1) }
            if ContinuousClock.now >= deadline { return nil }
            usleep(2_000)
        }
    }

    /// Waits for the child and returns its exit status (128+signal when killed) and output.
    public func wait() -> CommandResult {
        if let result { return result }
        return finish(vmpool_wait(pid))
    }

    private func finish(_ code: Int32) -> CommandResult {
        closeInput()
        let data = FileManager.default.contents(atPath: outPath) ?? Data()
        let stdout = String(decoding: data, as: UTF8.self)
        let stderr = (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? ""
        unlink(outPath)
        unlink(errPath)
        let result = CommandResult(status: code, stdout: stdout, stderr: stderr, stdoutData: data)
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
