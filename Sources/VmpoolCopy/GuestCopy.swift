import Foundation
import VmpoolArchive
import VmpoolDriver

/// Why a copy failed, in the words a user reads; nothing was copied.
public struct CopyFailure: Error, CustomStringConvertible, Sendable {
    /// Stable failure kinds, for callers that answer each its own way (the HTTP API's status).
    public struct Code: Hashable, Sendable {
        private enum Kind: Hashable, Sendable {
            case missing, conflict, unsupported, interrupted, refused, failed
        }
        private let kind: Kind
        private init(_ kind: Kind) { self.kind = kind }

        /// The path to copy, or the directory to copy into, does not exist.
        public static let missing = Code(.missing)
        /// What is at the destination stands in the way (a directory, a file where a directory
        /// is needed).
        public static let conflict = Code(.conflict)
        /// The copy is not one vmpool makes (a root directory).
        public static let unsupported = Code(.unsupported)
        /// Stopped by a signal or a caller that went away.
        public static let interrupted = Code(.interrupted)
        /// The guest's stream broke the extractor's rules.
        public static let refused = Code(.refused)
        /// Anything else: the guest's tools failed (no space, permission denied), the host's I/O.
        public static let failed = Code(.failed)
    }

    public let description: String
    public let code: Code

    init(description: String, code: Code = .failed) {
        self.description = description
        self.code = code
    }
}

/// A copy between the host and a guest as one tar stream through the guest agent. The guest
/// side is its own `tar` under a short `sh` script (busybox or GNU, both images have them); the
/// host side is Swift: `TreeArchiver` writes the stream into the guest, `SafeExtractor` reads
/// the stream out of it without trusting a byte of it. Both directions are all or nothing.
public enum CopyTransfer {
    /// Copies the host's `source` (a file, directory or symlink) to `path` in the guest. The copy
    /// stops, leaving nothing, once `interrupt` (a signal pipe; -1: none) is readable.
    public static func toGuest(
        _ access: any GuestAccess, _ vm: VMRef, from source: String, path: String, interrupt: Int32 = -1
    ) async throws -> [String] {
        signal(SIGPIPE, SIG_IGN)
        let local = URL(fileURLWithPath: source).standardizedFileURL
        guard local.path != "/" else {
            throw CopyFailure(
                description: "copying the host's root directory is not supported; name a directory", code: .unsupported)
        }
        let archiver: TreeArchiver
        do { archiver = try TreeArchiver(path: local.path, display: source) } catch {
            throw CopyFailure(description: "\(error.message); nothing was copied")
        }
        let name = local.lastPathComponent
        let target = GuestPath(path)
        let mark = name == ".vmpool-cp-end" ? ".vmpool-cp-end.1" : ".vmpool-cp-end"
        let stream = try StreamPipe.make()
        let output = try StreamPipe.make()
        setNonblocking(stream.write)
        let request = ExecRequest(
            argv: [
                "sh", "-c", GuestScript.receive, "sh", target.path, target.parent,
                target.trailingSlash ? "" : target.name,
                name, archiver.kind == .directory ? "d" : "f", mark,
            ], stdin: true)
        let streams = ExecStreams(stdin: stream.read, stdout: output.write, stderr: output.write)
        let done = try StreamPipe.make()
        async let guestOutput = OffPool.run { _ in collectTail(output.read) }
        let (outcome, writerResult, interrupted) = await withTaskGroup(of: Part.self) { group in
            group.addTask {
                defer {
                    close(stream.read)
                    close(output.write)
                    close(done.write)
                }
                return .exec(await capture { try await access.exec(vm, request, streams: streams) })
            }
            group.addTask { await Self.watch(interrupt, until: done.read) }
            group.addTask {
                let written = await capture {
                    try await OffPool.run(interrupt: interrupt) { cancel in
                        defer { close(stream.write) }
                        let writer = TarWriter(fd: stream.write, cancel: cancel)
                        let warnings = try archiver.write(as: Array(name.utf8), to: writer, cancel: cancel)
                        try writer.appendHeader(TarEntry(name: Array(mark.utf8), kind: .file, mode: 0o600))
                        try writer.finish()
                        return warnings
                    }
                }
                return .wrote(written)
            }
            var outcome: Result<ExecOutcome, any Error> = .failure(CancellationError())
            var wrote: Result<[String], any Error> = .failure(CancellationError())
            var interrupted = false
            for await part in group {
                switch part {
                case .exec(let result): outcome = result
                case .wrote(let result): wrote = result
                case .interrupted:
                    interrupted = true
                    group.cancelAll()
                default: break
                }
            }
            return (outcome, wrote, interrupted)
        }
        let text = String(decoding: (try? await guestOutput) ?? [], as: UTF8.self)
        if Task.isCancelled || interrupted {
            throw CopyFailure(description: "interrupted; nothing was copied", code: .interrupted)
        }
        if case .failure(let error as ArchiveError) = writerResult, error.code != .streamClosed {
            throw error.code == .cancelled
                ? CopyFailure(description: "interrupted; nothing was copied", code: .interrupted)
                : CopyFailure(description: "\(error.message); nothing was copied")
        }
        let result = try outcome.get()
        if let failure = CopyErrors.receive(result, output: text, path: target.path) {
            throw CopyFailure(description: failure, code: CopyErrors.code(result, output: text))
        }
        return (try? writerResult.get()) ?? []
    }

    /// Copies `path` in the guest (a file, directory or symlink) to the host's `destination`. The
    /// copy stops, leaving nothing, once `interrupt` (a signal pipe; -1: none) is readable.
    public static func fromGuest(
        _ access: any GuestAccess, _ vm: VMRef, path: String, to destination: String, interrupt: Int32 = -1
    ) async throws -> [String] {
        signal(SIGPIPE, SIG_IGN)
        let remote = GuestPath(path)
        guard remote.path != "/" else {
            throw CopyFailure(
                description: "copying the guest's root directory is not supported; name a directory under it",
                code: .unsupported)
        }
        let place = try hostPlace(destination, name: remote.name)
        let extractor: SafeExtractor
        do {
            extractor = try SafeExtractor(
                directory: place.directory, name: place.name, requested: Array(remote.name.utf8))
        } catch { throw CopyFailure(description: "\(error.message); nothing was copied") }
        let box = ExtractorBox(extractor)
        defer { extractor.discard() }
        let stream = try StreamPipe.make()
        let output = try StreamPipe.make()
        let null = open("/dev/null", O_RDONLY | O_CLOEXEC)
        defer { close(null) }
        let request = ExecRequest(argv: ["sh", "-c", GuestScript.send, "sh", remote.path, remote.parent, remote.name])
        let streams = ExecStreams(stdin: null, stdout: stream.write, stderr: output.write)
        let done = try StreamPipe.make()
        async let guestOutput = OffPool.run { _ in collectTail(output.read) }
        let (outcome, extracted, interrupted) = await withTaskGroup(of: Part.self) { group in
            group.addTask {
                defer {
                    close(stream.write)
                    close(output.write)
                    close(done.write)
                }
                return .exec(await capture { try await access.exec(vm, request, streams: streams) })
            }
            group.addTask { await Self.watch(interrupt, until: done.read) }
            group.addTask {
                let result = await capture {
                    try await OffPool.run(interrupt: interrupt) { cancel in
                        defer { close(stream.read) }
                        try box.extractor.extract(TarReader(fd: stream.read, cancel: cancel))
                    }
                }
                return .extracted(result)
            }
            var outcome: Result<ExecOutcome, any Error> = .failure(CancellationError())
            var extracted: Result<Void, any Error> = .failure(CancellationError())
            var interrupted = false
            for await part in group {
                switch part {
                case .exec(let result): outcome = result
                case .extracted(let result):
                    extracted = result
                    // A refused stream stops the command in the guest, even one that went quiet.
                    if case .failure = result { group.cancelAll() }
                case .interrupted:
                    interrupted = true
                    group.cancelAll()
                default: break
                }
            }
            return (outcome, extracted, interrupted)
        }
        let text = String(decoding: (try? await guestOutput) ?? [], as: UTF8.self)
        if Task.isCancelled || interrupted {
            throw CopyFailure(description: "interrupted; nothing was copied", code: .interrupted)
        }
        let archiveError = { () -> ArchiveError? in
            if case .failure(let error as ArchiveError) = extracted { return error }
            return nil
        }()
        if let error = archiveError, error.code == .cancelled {
            throw CopyFailure(description: "interrupted; nothing was copied", code: .interrupted)
        }
        if let error = archiveError, error.code != .truncated {
            throw CopyFailure(
                description: CopyErrors.refused(error, path: path),
                code: error.code == .hostIO || error.code == .exists ? .failed : .refused)
        }
        let result = try outcome.get()
        if let failure = CopyErrors.send(result, output: text, path: path) {
            throw CopyFailure(description: failure, code: CopyErrors.code(result, output: text))
        }
        if let error = archiveError {
            throw CopyFailure(
                description:
                    "the copy of \(remote.path) from the guest ended early: \(error.message); nothing was copied")
        }
        try extracted.get()
        do { try extractor.commit() } catch let error as ArchiveError {
            throw CopyFailure(description: "\(error.message); nothing was copied")
        }
        return extractor.warnings
    }

    /// Where a copy out goes on the host: into `destination` when it is a directory (the guest
    /// entry keeps its name), else to `destination` itself.
    static func hostPlace(_ destination: String, name: String) throws -> (directory: String, name: String) {
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: destination, isDirectory: &isDirectory), isDirectory.boolValue {
            return (destination, name)
        }
        if destination.hasSuffix("/") {
            throw CopyFailure(
                description: "no such directory on the host: \(destination); nothing was copied", code: .missing)
        }
        let parent = (destination as NSString).deletingLastPathComponent
        return (parent.isEmpty ? "." : parent, (destination as NSString).lastPathComponent)
    }

    /// What one child of a copy's task group reports.
    public enum Part: Sendable {
        case exec(Result<ExecOutcome, any Error>)
        case wrote(Result<[String], any Error>)
        case extracted(Result<Void, any Error>)
        /// A signal came (the interrupt pipe became readable) before the guest command ended.
        case interrupted
        /// The guest command ended first.
        case finished
    }

    /// Waits, on a thread of its own, for `interrupt` or for `done` (closed when the guest
    /// command has ended), whichever comes first: a signal stops the copy even while the guest
    /// command is quiet and nothing reads or writes the stream. Closes `done`.
    public static func watch(_ interrupt: Int32, until done: Int32) async -> Part {
        defer { close(done) }
        guard interrupt >= 0 else { return .finished }
        do {
            try await OffPool.run(interrupt: interrupt) { cancel in try waitReadable(done, cancel: cancel) }
            return .finished
        } catch {
            // Cancelled by the group (a refused stream) is not a signal: only a readable pipe is.
            return CancelFlag(interrupt: interrupt).isCancelled ? .interrupted : .finished
        }
    }
}

/// Hands the extractor to the thread that fills it; only that thread uses it until the task
/// group is over.
private final class ExtractorBox: @unchecked Sendable {
    let extractor: SafeExtractor
    init(_ extractor: SafeExtractor) { self.extractor = extractor }
}

/// The outcome of `body` as a value, so that a task group's children all run to their end.
public func capture<T>(_ body: () async throws -> T) async -> Result<T, any Error> {
    do { return .success(try await body()) } catch { return .failure(error) }
}

/// Reads `fd` to its end, keeping the last 64 KiB (a guest's messages, bounded on the host).
func collectTail(_ fd: Int32) -> [UInt8] {
    defer { close(fd) }
    var kept: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 16384)
    while true {
        let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if count < 0 && errno == EINTR { continue }
        if count <= 0 { return kept }
        kept += chunk[0..<count]
        if kept.count > 65536 { kept.removeFirst(kept.count - 65536) }
    }
}

/// A guest path, made absolute (relative to /, where guest commands start) and normalized by
/// its text alone: the host never looks at the guest's file system.
struct GuestPath: Equatable {
    /// The normalized absolute path.
    let path: String
    /// Its directory and last component ("/" and "" for the root).
    let parent: String
    let name: String
    /// The path as given ended in "/": it must name a directory.
    let trailingSlash: Bool

    init(_ text: String) {
        var parts: [Substring] = []
        for component in text.split(separator: "/", omittingEmptySubsequences: true) {
            switch component {
            case ".": continue
            case "..": _ = parts.popLast()
            default: parts.append(component)
            }
        }
        path = "/" + parts.joined(separator: "/")
        name = parts.last.map(String.init) ?? ""
        parent = "/" + parts.dropLast().joined(separator: "/")
        trailingSlash = text.hasSuffix("/") && !parts.isEmpty
    }
}

/// The guest's side of a copy: `sh` scripts run through the agent with their paths as
/// arguments (never spliced into the text). A failure is one line `vmpool-cp: WHAT PATH` on
/// stderr, which `CopyErrors` turns into plain words.
enum GuestScript {
    /// Sends PATH ($1) as a tar stream of its name ($3) from its directory ($2).
    ///
    /// GNU tar gets 128 KiB records (`-b 256`) rather than its default 10 KiB: under TCG a
    /// guest's system call is dear, and 100 MiB through a pipe took 2.6 s in 10 KiB writes and
    /// 0.7 s in 128 KiB ones (Debian guest). busybox tar has no such option; a busybox shell
    /// names its own applet without a slash (`command -v tar` is `tar`), so it is not even asked.
    static let send = """
        if [ ! -e "$1" ] && [ ! -L "$1" ]; then echo "vmpool-cp: missing $1" >&2; exit 3; fi
        cd -- "$2" || { echo "vmpool-cp: failed $2" >&2; exit 3; }
        case $(command -v tar) in */*) case $(tar --version 2>/dev/null) in *"GNU tar"*) exec tar -c -b 256 -f - -- "$3" ;; esac ;; esac
        exec tar -c -f - -- "$3"
        """

    /// Receives a tar stream whose top entry is NAME ($4, a directory when KIND $5 is d) and
    /// whose last entry is the empty file MARK ($6): into DST ($1) when it is a directory, else
    /// to PARENT/BASE ($2/$3; BASE empty when DST must be a directory).
    ///
    /// The stream is extracted into a fresh directory (mktemp) in the target directory, so tar
    /// meets nothing that was there (no symlink of the guest is followed, no file is written
    /// over), and renamed into place only when tar succeeded and MARK arrived (a stream cut
    /// short at an entry's end still satisfies tar). A directory is never merged into or put in
    /// place of an existing one. GNU tar reports a short write without its reason, so after a
    /// failed extraction one block is written beside it: dd's error says whether the file system
    /// is full. GNU tar reads 128 KiB records, as `send` explains (100 MiB from a pipe: 5.3 s in
    /// 10 KiB reads, 1.9 s in 128 KiB ones).
    ///
    /// The work writes its status into a pipe read by a watcher in its own session (setsid): the
    /// watcher removes the temporary directory once the pipe closes, whether the work ended or
    /// was killed with its process group (an interrupted copy), and exits with that status (3
    /// when none came). It waits on the pipe, so it costs no process while the copy runs. The
    /// watcher makes the directory itself (mkdir fails on anything already there) and the work
    /// waits for it, so the directory never exists while the only process that would remove it
    /// can still be killed with the copy's process group.
    static let receive = """
        dst=$1 parent=$2 base=$3 name=$4 kind=$5 mark=$6
        if [ -d "$dst" ]; then dir=$dst final=$name
        elif [ -z "$base" ]; then echo "vmpool-cp: missing $dst" >&2; exit 3
        else dir=$parent final=$base
        fi
        if [ ! -e "$dir" ]; then echo "vmpool-cp: missing $dir" >&2; exit 3; fi
        if [ ! -d "$dir" ]; then echo "vmpool-cp: notdir $dir" >&2; exit 3; fi
        cd -- "$dir" || { echo "vmpool-cp: failed $dir" >&2; exit 3; }
        case $dir in */) target=$dir$final ;; *) target=$dir/$final ;; esac
        if [ -e "$final" ] || [ -L "$final" ]; then
        \tif [ "$kind" = d ] || { [ -d "$final" ] && [ ! -L "$final" ]; }; then
        \t\techo "vmpool-cp: exists $target" >&2; exit 3
        \tfi
        fi
        tmp=$(mktemp -u ./.vmpool-cp.XXXXXX) || { echo "vmpool-cp: failed $dir" >&2; exit 3; }
        if command -v setsid >/dev/null 2>&1; then watch="setsid sh"; else watch=sh; fi
        records=
        case $(command -v tar) in */*) case $(tar --version 2>/dev/null) in *"GNU tar"*) records="-b 256 -B" ;; esac ;; esac
        {
        \tn=0
        \twhile [ ! -d "$tmp" ] || [ -L "$tmp" ]; do
        \t\tn=$((n + 1)); [ $n -le 1000 ] || { echo "vmpool-cp: failed $dir" >&2; exit; }; sleep 0.01
        \tdone
        \tif ! tar -x $records -f - -C "$tmp"; then
        \t\terr=$(dd if=/dev/zero of="$tmp/.vmpool-space" bs=4096 count=1 2>&1 >/dev/null) || echo "$err" >&2
        \t\techo "vmpool-cp: failed $dir" >&2; exit
        \tfi
        \tif [ ! -f "$tmp/$mark" ]; then echo "vmpool-cp: incomplete $target" >&2; exit; fi
        \tif [ -L "$final" ]; then rm -f -- "$final"; fi
        \tif ! mv -f -T -- "$tmp/$name" "$final"; then echo "vmpool-cp: failed $dir" >&2; exit; fi
        \techo 0 >&3
        } 3>&1 1>&2 | $watch -c 'mkdir -m 700 -- "$1" || exit 3; status=3; while read -r line; do status=$line; done; rm -rf -- "$1"; exit "$status"' sh "$tmp"
        """
}

/// Plain words for a copy that failed: the guest's `vmpool-cp:` lines and its tools' errno
/// texts, never a guess and never a bare exit status.
enum CopyErrors {
    /// The errno texts of the C library the guest's tools print, and the words vmpool uses.
    static let reasons: [(text: String, words: String)] = [
        ("No space left on device", "no space left on device"),
        ("Disk quota exceeded", "disk quota exceeded"),
        ("Read-only file system", "read-only file system"),
        ("Permission denied", "permission denied"),
        ("Operation not permitted", "operation not permitted"),
        ("File name too long", "file name too long"),
        ("Too many links", "too many links"),
    ]

    /// The copy into the guest's `path`: nil when it succeeded.
    static func receive(_ outcome: ExecOutcome, output: String, path: String) -> String? {
        if case .exited(0) = outcome { return nil }
        if let failure = common(outcome) { return failure }
        let (what, subject) = tagged(output) ?? ("", path)
        switch what {
        case "missing": return "no such file or directory in the guest: \(subject)"
        case "notdir": return "not a directory in the guest: \(subject)"
        case "exists":
            return "\(subject) already exists in the guest; a copied directory is not merged into it or put in its "
                + "place (remove it, or copy to another name)"
        case "incomplete": return "the copy to \(subject) ended early; nothing was copied"
        default:
            if let reason = reason(output) { return "\(reason) in the guest (\(subject)); nothing was copied" }
            return "the copy into \(subject) in the guest failed\(detail(output)); nothing was copied"
        }
    }

    /// The copy out of the guest's `path`: nil when the guest's side succeeded.
    static func send(_ outcome: ExecOutcome, output: String, path: String) -> String? {
        if case .exited(0) = outcome { return nil }
        if let failure = common(outcome) { return failure }
        if let (what, _) = tagged(output), what == "missing" {
            return "no such file or directory in the guest: \(path)"
        }
        if let reason = reason(output) { return "\(reason) in the guest, reading \(path)\(detail(output))" }
        return "reading \(path) in the guest failed\(detail(output))"
    }

    /// The kind of a failure `receive` or `send` put in words.
    static func code(_ outcome: ExecOutcome, output: String) -> CopyFailure.Code {
        guard case .exited = outcome, let (what, _) = tagged(output) else { return .failed }
        switch what {
        case "missing": return .missing
        case "notdir", "exists": return .conflict
        default: return .failed
        }
    }

    /// A guest command that did not run or was killed.
    static func common(_ outcome: ExecOutcome) -> String? {
        switch outcome {
        case .notRun(_, let message): return "the copy could not start in the guest: \(message)"
        case .signalled(let signal): return "the copy was killed in the guest (signal \(signal)); nothing was copied"
        case .timedOut: return "the copy timed out in the guest; nothing was copied"
        case .exited: return nil
        }
    }

    /// The refusal of a stream that broke the extractor's rules.
    static func refused(_ error: ArchiveError, path: String) -> String {
        if error.code == .hostIO || error.code == .exists { return "\(error.message); nothing was copied" }
        return "refused what the guest sent for \(path): \(error.message); nothing was copied"
    }

    /// The last `vmpool-cp: WHAT SUBJECT` line.
    static func tagged(_ output: String) -> (String, String)? {
        guard let line = output.split(separator: "\n").last(where: { $0.hasPrefix("vmpool-cp: ") }) else { return nil }
        let rest = line.dropFirst("vmpool-cp: ".count)
        let parts = rest.split(separator: " ", maxSplits: 1)
        return (String(parts.first ?? ""), parts.count > 1 ? String(parts[1]) : "")
    }

    static func reason(_ output: String) -> String? {
        reasons.first { output.contains($0.text) }?.words
    }

    /// ": " and the guest tool's last message, when it said something.
    static func detail(_ output: String) -> String {
        let lines = output.split(separator: "\n").filter { !$0.hasPrefix("vmpool-cp: ") }
        guard let last = lines.last?.trimmingCharacters(in: .whitespaces), !last.isEmpty else { return "" }
        return " (\(String(last.prefix(300))))"
    }
}
