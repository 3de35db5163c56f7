import ArgumentParser
import CVmpoolSys
import Foundation
import VmpoolDriver

extension Vmpool {
    /// Copies files and directories between the host and a VM, like `docker cp`.
    struct Cp: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "cp",
            abstract: "Copy files or directories between the host and a VM (VM:PATH on one side).",
            discussion: """
                Modes are kept. When DST is an existing directory, SRC is copied into it; otherwise SRC \
                is copied to DST's name. The copy streams a tar archive through the guest agent: the \
                guest needs tar (the default image and the Debian image have it).
                """)

        @OptionGroup var options: GlobalOptions

        @Argument(help: "Source: a host path or VM:PATH.")
        var source: String

        @Argument(help: "Destination: a host path or VM:PATH.")
        var destination: String

        /// `VM:PATH`, where VM is a VM id (no slash before the colon).
        static func remote(_ text: String) -> (vm: String, path: String)? {
            guard let colon = text.firstIndex(of: ":"), !text[..<colon].contains("/"), colon != text.startIndex else {
                return nil
            }
            return (String(text[..<colon]), String(text[text.index(after: colon)...]))
        }

        func validate() throws {
            switch (Self.remote(source), Self.remote(destination)) {
            case (nil, nil): throw ValidationError("one of SRC and DST must be VM:PATH")
            case (.some, .some):
                throw ValidationError("copying between two VMs is not supported; copy through the host")
            case (.some(let remote), nil), (nil, .some(let remote)):
                if remote.path.isEmpty { throw ValidationError("VM:PATH needs a path after the colon") }
            }
        }

        func run() async throws {
            let source = self.source
            let destination = self.destination
            let vm = Self.remote(source)?.vm ?? Self.remote(destination)!.vm
            let code = await GuestCommand.run(options: options, vm: vm, entering: "cp") { access, record in
                if let from = Self.remote(source) {
                    return try await CopyTransfer.fromGuest(access, record.ref, path: from.path, to: destination)
                } else {
                    return try await CopyTransfer.toGuest(
                        access, record.ref, from: source, path: Self.remote(destination)!.path)
                }
            }
            if code != 0 { throw ExitCode(code == GuestCommand.vmpoolFailed ? 1 : code) }
        }
    }
}

/// A copy as a tar stream: the host's GNU tar on one end, the guest's tar (run through the
/// agent) on the other. Names are renamed on the host side (`--transform`) when DST names a
/// new path, so the guest needs nothing beyond a basic tar.
enum CopyTransfer {
    static func toGuest(_ access: any GuestAccess, _ vm: VMRef, from source: String, path: String) async throws
        -> Int32
    {
        var info = stat()
        guard lstat(source, &info) == 0 else {
            throw CommandFailure(description: "\(source): no such file or directory")
        }
        let url = URL(fileURLWithPath: source).standardizedFileURL
        let name = url.lastPathComponent
        let parent = url.deletingLastPathComponent().path
        // Is DST an existing directory in the guest? Then copy into it, keeping the name.
        let isDirectory = try await quietExec(access, vm, ["test", "-d", path]) == 0
        let target = isDirectory ? path : (path as NSString).deletingLastPathComponent.nonEmpty ?? "/"
        let newName = isDirectory ? name : (path as NSString).lastPathComponent
        var arguments = ["-c", "-f", "-", "-C", parent, "--numeric-owner", "--owner=0", "--group=0"]
        if newName != name { arguments += ["--transform", renaming(name, to: newName)] }
        arguments += ["--", name]
        let pipe = try Pipe.make()
        let tar = try LocalProcess.start("tar", arguments, stdin: -1, stdout: pipe.write)
        close(pipe.write)
        let outcome = try await access.exec(
            vm, ExecRequest(argv: ["tar", "-x", "-f", "-", "-C", target], stdin: true),
            streams: ExecStreams(stdin: pipe.read, stdout: 2, stderr: 2))
        close(pipe.read)
        let local = tar.wait()
        guard local == 0 else { throw CommandFailure(description: "tar on the host failed (status \(local))") }
        guard outcome.exitStatus == 0 else {
            throw CommandFailure(
                description: "tar in the guest failed (status \(outcome.exitStatus)); is \(target) a directory?")
        }
        return 0
    }

    static func fromGuest(_ access: any GuestAccess, _ vm: VMRef, path: String, to destination: String) async throws
        -> Int32
    {
        let remote = URL(fileURLWithPath: path).standardizedFileURL
        let name = remote.lastPathComponent
        let parent = remote.deletingLastPathComponent().path
        var isDirectory: ObjCBool = false
        let exists = FileManager.default.fileExists(atPath: destination, isDirectory: &isDirectory)
        let target =
            exists && isDirectory.boolValue
            ? destination : (destination as NSString).deletingLastPathComponent.nonEmpty ?? "."
        let newName = exists && isDirectory.boolValue ? name : (destination as NSString).lastPathComponent
        var arguments = ["-x", "-f", "-", "-C", target, "--no-same-owner"]
        if geteuid() == 0 { arguments += ["--same-permissions"] }
        if newName != name { arguments += ["--transform", renaming(name, to: newName)] }
        let pipe = try Pipe.make()
        let tar = try LocalProcess.start("tar", arguments, stdin: pipe.read, stdout: -1)
        close(pipe.read)
        let outcome = try await access.exec(
            vm, ExecRequest(argv: ["tar", "-c", "-f", "-", "-C", parent, name]),
            streams: ExecStreams(stdin: 0, stdout: pipe.write, stderr: 2))
        close(pipe.write)
        let local = tar.wait()
        guard outcome.exitStatus == 0 else {
            throw CommandFailure(
                description: "tar in the guest failed (status \(outcome.exitStatus)); does \(path) exist?")
        }
        guard local == 0 else { throw CommandFailure(description: "tar on the host failed (status \(local))") }
        return 0
    }

    /// A GNU tar `--transform` that renames the top entry `old` (and what is under it) to `new`.
    static func renaming(_ old: String, to new: String) -> String {
        func regex(_ text: String) -> String {
            text.map { "\\.[]*^$,".contains($0) ? "\\\($0)" : String($0) }.joined()
        }
        func replacement(_ text: String) -> String {
            text.map { "\\&,".contains($0) ? "\\\($0)" : String($0) }.joined()
        }
        return "s,^\(regex(old))\\($\\|/\\),\(replacement(new))\\1,S"
    }

    /// Runs a command whose output does not matter; returns its exit status.
    static func quietExec(_ access: any GuestAccess, _ vm: VMRef, _ argv: [String]) async throws -> Int32 {
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { close(null) }
        return try await access.exec(
            vm, ExecRequest(argv: argv), streams: ExecStreams(stdin: null, stdout: null, stderr: null)
        )
        .exitStatus
    }
}

extension String {
    var nonEmpty: String? { isEmpty ? nil : self }
}

/// A pipe whose ends are closed on exec.
struct Pipe {
    let read: Int32
    let write: Int32

    static func make() throws -> Pipe {
        var fds: [Int32] = [0, 0]
        guard vmpool_pipe_cloexec(&fds) == 0 else { throw CommandFailure(description: "cannot create a pipe") }
        return Pipe(read: fds[0], write: fds[1])
    }
}

/// A helper program on the host, started with posix_spawn.
struct LocalProcess {
    let pid: Int32

    /// Starts `program` (from PATH) with `stdin`/`stdout` (-1: /dev/null for stdin, our stdout
    /// for stdout); stderr is ours.
    static func start(_ program: String, _ arguments: [String], stdin: Int32, stdout: Int32) throws -> LocalProcess {
        let directories = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":")
        let candidates: [String] = directories.map { "\($0)/\(program)" }
        let path = candidates.first { access($0, X_OK) == 0 }
        guard let path else { throw CommandFailure(description: "\(program) is not installed on the host") }
        let pid = withCStrings([path] + arguments) {
            vmpool_spawn_io(path, $0, nil, stdin, stdout >= 0 ? stdout : 1, 2)
        }
        guard pid > 0 else { throw CommandFailure(description: "cannot start \(program)") }
        return LocalProcess(pid: pid)
    }

    func wait() -> Int32 { vmpool_wait(pid) }
}
