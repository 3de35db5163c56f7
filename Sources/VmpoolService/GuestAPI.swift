import CVmpoolSys
import Foundation
import Hummingbird
import NIOCore
import VmpoolArchive
import VmpoolCopy
import VmpoolDriver
import VmpoolSpec
import VmpoolStore

/// A request the API refuses: its status and the words of its Error body.
struct APIFailure: Error {
    let status: HTTPResponse.Status
    let message: String

    init(_ status: HTTPResponse.Status, _ message: String) {
        self.status = status
        self.message = message
    }
}

/// Bounds of what goes in and out of a guest over HTTP.
enum GuestLimits {
    /// Each of a command's stdout and stderr as answered; the rest is read and dropped.
    static let output = 16 << 20
    /// An exec request: the command, its environment, and its stdin as base64.
    static let execBody = 24 << 20
    /// An uploaded tar archive.
    static let upload = 1 << 30
    /// A guest path given in `?path=`, in Unicode scalars.
    static let path = 4096
}

extension APIServer {
    /// Runs `body`, turning its refusals into their Error answers.
    static func answering(_ body: () async throws -> Response) async throws -> Response {
        do {
            return try await body()
        } catch let failure as APIFailure {
            return try error(failure.status, failure.message)
        }
    }

    /// The VM `id`, to run a command in or copy files to and from: it exists, runs on this
    /// host under a driver with guests, is leased, and runs. Only a leased VM is entered: an
    /// unleased one is the pool's, and a VM someone entered is never leased after (it would
    /// be replaced), so HTTP clients lease first.
    func leasedGuest(_ id: String) async throws -> (any GuestAccess, VMRecord) {
        let store = leases.store
        guard let record = try store.vm(id) else {
            throw APIFailure(.notFound, "no VM named \"\(id)\" (see GET /v1/vms)")
        }
        guard let access = leases.driver as? any GuestAccess else {
            throw APIFailure(
                .conflict, "the \(leases.driver.name) driver runs no guests; commands and files need --driver qemu")
        }
        guard record.host == store.host else {
            throw APIFailure(
                .conflict, "VM \(id) runs on host \(record.host), not on \(store.host): ask the service there")
        }
        guard record.lease != nil else {
            throw APIFailure(
                .conflict,
                "VM \(id) is not leased; lease a VM first (POST /v1/pools/\(record.pool)/leases): only a leased VM is"
                    + " entered over HTTP")
        }
        let status = await leases.driver.status(of: [record.ref], depth: .hypervisor)[record.id]
        if let fault = status?.fault {
            throw APIFailure(.conflict, "VM \(id) is stopped: \(fault); the next pass replaces it")
        }
        guard record.state == .running, status?.liveness == .alive, status?.running != false else {
            let state =
                status?.liveness == .gone
                ? "not running (its process is gone)" : status?.running == false ? "paused" : record.state.rawValue
            throw APIFailure(.conflict, "VM \(id) is \(state); it must be running")
        }
        return (access, record)
    }

    // MARK: exec

    /// `POST /v1/vms/{vm}/exec`: runs a command in a leased VM and answers once it ended.
    func exec(_ request: Request, context: APIRequestContext, vm id: String) async throws -> Response {
        let body: ByteBuffer
        do { body = try await request.body.collect(upTo: GuestLimits.execBody) } catch is NIOTooManyBytesError {
            throw APIFailure(.contentTooLarge, "the exec request is larger than 24 MiB (stdin at most 16 MiB)")
        }
        var call = try ExecCall(body)
        let (access, record) = try await leasedGuest(id)
        if let problem = call.environmentProblem { throw APIFailure(.badRequest, problem) }
        call.request.stdin = call.stdin != nil
        let channel = context.channel
        let ran: GuestExec.Ran?
        do {
            ran = try await GuestExec.run(
                access, record.ref, call.request, stdin: call.stdin ?? [], limit: GuestLimits.output,
                gone: { !channel.isActive })
        } catch let error as DriverError {
            throw APIFailure(.conflict, error.description)
        }
        // The client went away: the command was killed, and nobody reads an answer.
        guard let ran else { throw APIFailure(.conflict, "the client went away; the command was killed") }
        var stderr = ran.stderr.bytes
        if case .notRun(_, let message) = ran.outcome {
            // As `vmpool exec` says it: why the command did not run.
            stderr += Array("vmpool: \(call.request.argv[0]): \(message)\n".utf8)
        }
        return try Self.json(
            .object([
                "exitStatus": .int(Int(ran.outcome.exitStatus)),
                "stdout": .string(Base64.encode(ran.stdout.bytes)),
                "stderr": .string(Base64.encode(stderr)),
                "truncated": .bool(ran.stdout.truncated || ran.stderr.truncated),
            ]), status: .ok)
    }

    // MARK: files

    /// The `path` query parameter: one absolute guest path.
    static func guestPath(_ request: Request) throws -> String {
        let given = request.uri.queryParameters.getAll("path")
        guard given.count == 1, let path = given.first.map({ String($0) }) else {
            throw APIFailure(
                .badRequest,
                given.isEmpty ? "path: give the guest path, ?path=/PATH" : "path: give one guest path, not several")
        }
        guard path.utf8.first == UInt8(ascii: "/"), !path.utf8.contains(0),
            path.unicodeScalars.count <= GuestLimits.path
        else {
            throw APIFailure(
                .badRequest, "path: expected an absolute guest path (up to 4096 characters, no NUL), got \"\(path)\"")
        }
        return path
    }

    /// `PUT /v1/vms/{vm}/files?path=`: the body's one tar entry (a file, a directory tree, a
    /// symlink) copied to `path` as `vmpool cp` copies a host path. The archive is checked on
    /// the way in as one from a guest is (`SafeExtractor`): bounded, nothing outside its entry,
    /// nothing privileged.
    func putFiles(_ request: Request, context: APIRequestContext, vm id: String) async throws -> Response {
        let path = try Self.guestPath(request)
        if let length = request.headers[.contentLength].flatMap({ Int($0) }), length > GuestLimits.upload {
            throw APIFailure(.contentTooLarge, "the archive is larger than 1 GiB; nothing was copied")
        }
        let (access, record) = try await leasedGuest(id)
        let scratch = try Scratch(in: leases.stateDirectory)
        defer { scratch.remove() }
        let archive = scratch.path + "/upload.tar"
        try await Self.receive(request.body, into: archive)
        let (name, unpacked) = try await Self.unpack(archive, into: scratch.tree)
        unlink(archive)
        let copied = try await Self.copying(context.channel) { interrupt in
            try await CopyTransfer.toGuest(
                access, record.ref, from: scratch.tree + "/" + name, path: path, interrupt: interrupt)
        }
        let warnings = unpacked + copied
        guard !warnings.isEmpty else { return Response(status: .noContent) }
        return try Self.json(.object(["warnings": .array(warnings.map { .string($0) })]), status: .ok)
    }

    /// `GET /v1/vms/{vm}/files?path=`: `path` copied out of the guest as `vmpool cp` copies it
    /// (the guest's stream checked by `SafeExtractor`), then archived again on the host, so
    /// the client receives only what passed the checks.
    func getFiles(_ request: Request, context: APIRequestContext, vm id: String) async throws -> Response {
        let path = try Self.guestPath(request)
        let (access, record) = try await leasedGuest(id)
        let scratch = try Scratch(in: leases.stateDirectory)
        defer { scratch.remove() }
        let tree = scratch.tree
        let warnings = try await Self.copying(context.channel) { interrupt in
            try await CopyTransfer.fromGuest(access, record.ref, path: path, to: tree, interrupt: interrupt)
        }
        for warning in warnings { logger.notice("GET files: \(warning)", metadata: ["vm": "\(id)"]) }
        let names = (try? FileManager.default.contentsOfDirectory(atPath: tree)) ?? []
        guard names.count == 1, let name = names.first else {
            throw APIFailure(.internalServerError, "the copy of \(path) left \(names.count) entries on the host")
        }
        let archive = scratch.path + "/download.tar"
        do {
            _ = try await OffPool.run { cancel in
                let fd = open(archive, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
                guard fd >= 0 else { throw ArchiveError.hostFailure("create", archive, errno: errno) }
                defer { close(fd) }
                let writer = TarWriter(fd: fd, cancel: cancel)
                let skipped = try TreeArchiver(path: tree + "/" + name, display: name)
                    .write(as: Array(name.utf8), to: writer, cancel: cancel)
                try writer.finish()
                return skipped
            }
        } catch let error as ArchiveError {
            throw APIFailure(.internalServerError, "cannot archive the copy of \(path): \(error.message)")
        }
        // Open, the archive outlives its directory (removed now): nothing is left on disk
        // whether or not the answer is ever sent.
        let file = try ReadOnlyFile(archive)
        return Response(
            status: .ok, headers: [.contentType: "application/x-tar"],
            body: ResponseBody(contentLength: file.size) { writer in
                try await file.send(to: &writer)
                try await writer.finish(nil)
            })
    }

    /// Writes the request body to `path`, at most `GuestLimits.upload` bytes.
    static func receive(_ body: RequestBody, into path: String) async throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw APIFailure(.internalServerError, "cannot keep the upload: \(errnoText(errno))") }
        defer { close(fd) }
        var total = 0
        for try await buffer in body {
            total += buffer.readableBytes
            guard total <= GuestLimits.upload else {
                throw APIFailure(.contentTooLarge, "the archive is larger than 1 GiB; nothing was copied")
            }
            try buffer.withUnsafeReadableBytes { raw in
                var offset = 0
                while offset < raw.count {
                    let written = write(fd, raw.baseAddress! + offset, raw.count - offset)
                    if written < 0 && errno == EINTR { continue }
                    guard written > 0 else {
                        throw APIFailure(
                            .internalServerError, "cannot keep the upload on the host: \(errnoText(errno))")
                    }
                    offset += written
                }
            }
        }
    }

    /// Extracts the uploaded archive's one entry into `directory` without trusting it;
    /// returns the entry's name and the warnings about what was skipped.
    static func unpack(_ archive: String, into directory: String) async throws -> (String, [String]) {
        let refused = "the body is not a tar archive of one entry"
        do {
            return try await OffPool.run { cancel in
                let fd = open(archive, O_RDONLY | O_CLOEXEC)
                guard fd >= 0 else { throw ArchiveError.hostFailure("open", archive, errno: errno) }
                defer { close(fd) }
                let reader = TarReader(fd: fd, cancel: cancel)
                guard let first = try reader.next() else {
                    throw APIFailure(.badRequest, "\(refused): it holds no entry; nothing was copied")
                }
                let top = first.name.split(separator: UInt8(ascii: "/")).first {
                    !$0.elementsEqual([UInt8(ascii: ".")])
                }
                guard let top, let name = String(validating: top, as: UTF8.self) else {
                    throw APIFailure(
                        .badRequest,
                        "\(refused): its first entry has no name (archive NAME, not ., as tar -C DIR -cf - NAME does);"
                            + " nothing was copied")
                }
                let extractor = try SafeExtractor(directory: directory, name: name, requested: Array(top))
                defer { extractor.discard() }
                try extractor.add(first, reader)
                try extractor.extract(reader)
                try extractor.commit()
                return (name, extractor.warnings)
            }
        } catch let error as ArchiveError {
            if error.code == .hostIO {
                throw APIFailure(.internalServerError, "\(error.message); nothing was copied")
            }
            throw APIFailure(.badRequest, "\(refused): \(error.message); nothing was copied")
        }
    }

    /// Runs a copy that stops, leaving nothing, once the client went away; its failures as
    /// the API's errors.
    static func copying(_ channel: any Channel, _ body: @escaping @Sendable (Int32) async throws -> [String])
        async throws -> [String]
    {
        let gone = try StreamPipe.make()
        defer {
            close(gone.read)
            close(gone.write)
        }
        do {
            return try await withThrowingTaskGroup(of: [String]?.self) { group in
                group.addTask { try await body(gone.read) }
                group.addTask {
                    // Makes the copy's interrupt pipe readable once the connection is closed.
                    while !Task.isCancelled {
                        if !channel.isActive {
                            _ = write(gone.write, [UInt8(1)], 1)
                            break
                        }
                        try? await Task.sleep(for: .milliseconds(100))
                    }
                    return nil
                }
                var warnings: [String] = []
                while let part = try await group.next() {
                    guard let part else { continue }
                    warnings = part
                    group.cancelAll()
                }
                return warnings
            }
        } catch let failure as CopyFailure {
            throw APIFailure(failure.code.status, failure.description)
        } catch let error as DriverError {
            throw APIFailure(.conflict, error.description)
        }
    }
}

extension CopyFailure.Code {
    /// The HTTP status of a copy that failed this way.
    var status: HTTPResponse.Status {
        switch self {
        case .missing: .notFound
        case .conflict, .interrupted: .conflict
        case .unsupported: .badRequest
        default: .unprocessableContent
        }
    }
}

/// The body of `POST /v1/vms/{vm}/exec`, checked as the published document describes it.
struct ExecCall {
    var request: ExecRequest
    /// The command's standard input, decoded; nil: none (it reads /dev/null).
    var stdin: [UInt8]?
    /// The `env` object as given: its names are checked once the VM is known (a name cannot
    /// be described in the document).
    var environment: [String: String]

    static let fields = ["argv", "env", "workdir", "stdin", "timeout"]

    init(_ body: ByteBuffer) throws {
        let example = #"expected a JSON object like {"argv": ["uname", "-a"]}"#
        guard let object = try? JSONSerialization.jsonObject(with: Data(buffer: body)),
            let fields = object as? [String: Any]
        else {
            throw APIFailure(.badRequest, "the body is not an exec request: \(example)")
        }
        if let unknown = fields.keys.sorted().first(where: { !Self.fields.contains($0) }) {
            throw APIFailure(.badRequest, "unknown field \"\(unknown)\"; expected argv, env, workdir, stdin, timeout")
        }
        guard let argv = fields["argv"] as? [Any], let words = argv as? [String], !words.isEmpty,
            words.count == argv.count
        else {
            throw APIFailure(.badRequest, "argv: expected a non-empty array of strings (the command and its arguments)")
        }
        if words.contains(where: { $0.utf8.contains(0) }) {
            throw APIFailure(.badRequest, "argv: NUL is not allowed in a command or an argument")
        }
        var environment: [String: String] = [:]
        if let value = fields["env"] {
            guard let object = value as? [String: Any], let pairs = object as? [String: String],
                pairs.count == object.count
            else {
                throw APIFailure(.badRequest, #"env: expected an object of strings like {"LANG": "C"}"#)
            }
            if pairs.values.contains(where: { $0.utf8.contains(0) }) {
                throw APIFailure(.badRequest, "env: NUL is not allowed in a value")
            }
            environment = pairs
        }
        self.environment = environment
        var directory: String?
        if let value = fields["workdir"] {
            guard let text = value as? String, !text.isEmpty, !text.utf8.contains(0) else {
                throw APIFailure(.badRequest, "workdir: expected a non-empty guest path without NUL")
            }
            directory = text
        }
        if let value = fields["stdin"] {
            guard let text = value as? String, let bytes = Base64.decode(text) else {
                throw APIFailure(.badRequest, "stdin: expected base64 (RFC 4648, padded)")
            }
            stdin = bytes
        }
        var timeout: Duration?
        if let value = fields["timeout"] {
            guard let text = value as? String, Self.timeoutPattern.matches(text), let parsed = DurationText.parse(text),
                parsed > .zero
            else {
                throw APIFailure(
                    .badRequest,
                    "timeout: expected a duration above zero like 30s (at least 1ms), got \(Self.shown(value))")
            }
            timeout = parsed
        }
        request = ExecRequest(
            argv: words, environment: environment.keys.sorted().map { "\($0)=\(environment[$0]!)" },
            directory: directory, timeout: timeout)
    }

    /// A JSON value as the client wrote it, near enough for a message.
    static func shown(_ value: Any) -> String {
        value is String ? "\"\(value)\"" : "\(value)"
    }

    /// Why a name of `env` cannot be set: empty, or holding `=` or NUL.
    var environmentProblem: String? {
        guard
            let bad = environment.keys.sorted().first(where: {
                $0.isEmpty || $0.utf8.contains(UInt8(ascii: "=")) || $0.utf8.contains(0)
            })
        else { return nil }
        return "env: \"\(bad)\" cannot name a variable (a name is not empty and holds no = and no NUL)"
    }

    /// The pattern of `timeout` in the published document, so that the server takes exactly
    /// the durations it describes.
    static let timeoutPattern = DocumentPattern(schema: "ExecRequest", field: "timeout")
}

/// A string pattern of the published OpenAPI document.
struct DocumentPattern: Sendable {
    let expression: NSRegularExpression?

    init(schema: String, field: String) {
        let document = try? JSONSerialization.jsonObject(with: Data(PackageResources.openapi_json))
        let schemas = ((document as? [String: Any])?["components"] as? [String: Any])?["schemas"] as? [String: Any]
        let fields = (schemas?[schema] as? [String: Any])?["properties"] as? [String: Any]
        let pattern = (fields?[field] as? [String: Any])?["pattern"] as? String
        expression = pattern.flatMap { try? NSRegularExpression(pattern: $0) }
    }

    /// Whether all of `text` matches.
    func matches(_ text: String) -> Bool {
        guard let expression else { return false }
        let range = NSRange(text.startIndex..., in: text)
        return expression.firstMatch(in: text, options: [.anchored], range: range)?.range == range
    }
}

/// RFC 4648 base64 with padding, as the document's `format: byte` fields are.
enum Base64 {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
    private static let values: [UInt8] = {
        var table = [UInt8](repeating: 0xFF, count: 256)
        for (index, byte) in alphabet.enumerated() { table[Int(byte)] = UInt8(index) }
        return table
    }()

    static func encode(_ bytes: [UInt8]) -> String {
        Data(bytes).base64EncodedString()
    }

    /// The bytes of `text`; nil unless it is groups of four alphabet characters, the last one
    /// padded with `=` or `==` (the document's pattern).
    static func decode(_ text: String) -> [UInt8]? {
        let input = Array(text.utf8)
        guard input.count % 4 == 0 else { return nil }
        var output: [UInt8] = []
        output.reserveCapacity(input.count / 4 * 3)
        var index = 0
        while index < input.count {
            let last = index + 4 == input.count
            let group = input[index..<index + 4]
            let padding = last ? group.reversed().prefix { $0 == UInt8(ascii: "=") }.count : 0
            guard padding <= 2 else { return nil }
            var word: UInt32 = 0
            for (offset, byte) in group.enumerated() {
                let value: UInt8
                if offset >= 4 - padding {
                    value = 0
                } else {
                    value = values[Int(byte)]
                    guard value != 0xFF else { return nil }
                }
                word = word << 6 | UInt32(value)
            }
            output.append(UInt8(word >> 16))
            if padding < 2 { output.append(UInt8(word >> 8 & 0xFF)) }
            if padding < 1 { output.append(UInt8(word & 0xFF)) }
            index += 4
        }
        return output
    }
}

/// A command run in a guest for an HTTP client: its stdin fed from memory, its stdout and
/// stderr kept up to a bound (the rest read and dropped, so the command runs to its end), and
/// the command killed when the client goes away.
enum GuestExec {
    /// What a stream carried, up to the bound.
    struct Captured: Sendable {
        var bytes: [UInt8] = []
        /// More came than was kept.
        var truncated = false
    }

    /// How the command ended and what it wrote.
    struct Ran: Sendable {
        var outcome: ExecOutcome
        var stdout: Captured
        var stderr: Captured
    }

    private enum Part: Sendable {
        case exec(Result<ExecOutcome, DriverError>)
        case stdout(Captured)
        case stderr(Captured)
        case gone
        case done
    }

    /// Runs `request`; nil when `gone` said the client went away first (the command is killed).
    static func run(
        _ access: any GuestAccess, _ vm: VMRef, _ request: ExecRequest, stdin: [UInt8], limit: Int,
        gone: @escaping @Sendable () -> Bool
    ) async throws -> Ran? {
        signal(SIGPIPE, SIG_IGN)
        let output = try StreamPipe.make()
        let errors: StreamPipe
        do { errors = try StreamPipe.make() } catch {
            close(output.read)
            close(output.write)
            throw error
        }
        let input: StreamPipe
        do { input = try StreamPipe.make() } catch {
            for fd in [output.read, output.write, errors.read, errors.write] { close(fd) }
            throw error
        }
        setNonblocking(input.write)
        let result = await withTaskGroup(of: Part.self) { group -> Result<Ran, DriverError>? in
            group.addTask {
                defer {
                    close(output.write)
                    close(errors.write)
                    close(input.read)
                }
                let streams = ExecStreams(stdin: input.read, stdout: output.write, stderr: errors.write)
                do throws(DriverError) {
                    return .exec(.success(try await access.exec(vm, request, streams: streams)))
                } catch {
                    return .exec(.failure(error))
                }
            }
            group.addTask { .stdout(await collect(output.read, limit: limit)) }
            group.addTask { .stderr(await collect(errors.read, limit: limit)) }
            group.addTask {
                // Ends with the command: a command that does not read its stdin closes the pipe.
                _ = try? await OffPool.run { cancel in
                    defer { close(input.write) }
                    try stdin.withUnsafeBytes { try writeAll(input.write, $0, cancel: cancel) }
                }
                return .done
            }
            group.addTask {
                while !Task.isCancelled {
                    if gone() { return .gone }
                    try? await Task.sleep(for: .milliseconds(100))
                }
                return .done
            }
            var outcome: Result<ExecOutcome, DriverError>?
            var stdout = Captured()
            var stderr = Captured()
            var wentAway = false
            for await part in group {
                switch part {
                case .exec(let result):
                    outcome = result
                    group.cancelAll()
                case .stdout(let captured): stdout = captured
                case .stderr(let captured): stderr = captured
                case .gone:
                    wentAway = true
                    group.cancelAll()
                case .done: break
                }
            }
            guard !wentAway, let outcome else { return nil }
            return outcome.map { Ran(outcome: $0, stdout: stdout, stderr: stderr) }
        }
        return try result?.get()
    }

    /// Reads `fd` to its end on a thread of its own, keeping the first `limit` bytes.
    static func collect(_ fd: Int32, limit: Int) async -> Captured {
        let captured = try? await OffPool.run { _ in
            defer { close(fd) }
            var kept = Captured()
            var chunk = [UInt8](repeating: 0, count: 65536)
            while true {
                let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if count < 0 && errno == EINTR { continue }
                if count <= 0 { return kept }
                let room = max(0, limit - kept.bytes.count)
                if count > room { kept.truncated = true }
                kept.bytes += chunk[0..<min(count, room)]
            }
        }
        return captured ?? Captured()
    }
}

/// A private directory for one request's files under the state dir's `api-files`, named
/// after the service's process: removed when the request ends, and, after a crash, by the
/// next service that starts (`sweep`).
struct Scratch {
    let path: String
    /// Where a copy lands (made empty with the directory).
    var tree: String { path + "/tree" }

    static func base(_ stateDirectory: String) -> String { stateDirectory + "/api-files" }

    init(in stateDirectory: String) throws {
        let base = Self.base(stateDirectory)
        if mkdir(base, 0o700) != 0 && errno != EEXIST {
            throw APIFailure(.internalServerError, "cannot make \(base): \(errnoText(errno))")
        }
        var template = Array("\(base)/\(getpid())-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else {
            throw APIFailure(.internalServerError, "cannot make a directory in \(base): \(errnoText(errno))")
        }
        path = String(cString: made)
        guard mkdir(path + "/tree", 0o700) == 0 else {
            let problem = errnoText(errno)
            rmdir(path)
            throw APIFailure(.internalServerError, "cannot make a directory in \(path): \(problem)")
        }
    }

    /// Removes the directory and everything in it, never following a symlink.
    func remove() { Self.remove(path) }

    static func remove(_ path: String) {
        let parent = open((path as NSString).deletingLastPathComponent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard parent >= 0 else { return }
        defer { close(parent) }
        removeTree(parent, Array((path as NSString).lastPathComponent.utf8CString))
    }

    /// Removes what services that are gone left in `api-files` (a crash mid-request).
    static func sweep(_ stateDirectory: String) {
        let base = Self.base(stateDirectory)
        for name in (try? FileManager.default.contentsOfDirectory(atPath: base)) ?? [] {
            guard let pid = name.split(separator: "-").first.flatMap({ Int32($0) }) else { continue }
            if pid != getpid(), kill(pid, 0) != 0, errno == ESRCH { remove(base + "/" + name) }
        }
    }
}

/// A file opened for reading whose descriptor is closed when the last reference goes.
final class ReadOnlyFile: Sendable {
    let fd: Int32
    let size: Int

    init(_ path: String) throws {
        fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw APIFailure(.internalServerError, "cannot open \(path): \(errnoText(errno))") }
        var info = stat()
        fstat(fd, &info)
        size = Int(info.st_size)
    }

    deinit { close(fd) }

    /// Writes the file from its start to `writer` in 1 MiB pieces.
    func send(to writer: inout any ResponseBodyWriter) async throws {
        var offset = 0
        while offset < size {
            var buffer = ByteBufferAllocator().buffer(capacity: min(1 << 20, size - offset))
            let count = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: min(1 << 20, size - offset)) {
                raw in
                max(0, pread(fd, raw.baseAddress, min(raw.count, size - offset), off_t(offset)))
            }
            guard count > 0 else { throw APIFailure(.internalServerError, "the archive ended early") }
            offset += count
            try await writer.write(buffer)
        }
    }
}

/// The C library's words for `number`.
func errnoText(_ number: Int32) -> String { String(cString: strerror(number)) }

extension ArchiveError {
    /// A host failure of the service's own files.
    static func hostFailure(_ action: String, _ path: String, errno number: Int32) -> ArchiveError {
        ArchiveError(.hostIO, "cannot \(action) \(path): \(errnoText(number))", errno: number)
    }
}
