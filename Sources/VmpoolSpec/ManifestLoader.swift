import Foundation
import Yams

/// Where a pool was defined: its document and the fields later checks point at.
public struct PoolOrigin: Sendable, Hashable {
    /// The start of the pool's document.
    public var document: SourceLocation
    /// Locations of the fields that were read, by field path (`metadata.name`, `spec.image.kernel`).
    public var fields: [String: SourceLocation]

    public init(document: SourceLocation, fields: [String: SourceLocation] = [:]) {
        self.document = document
        self.fields = fields
    }

    /// Where `field` was written, else the document.
    public func location(of field: String) -> SourceLocation { fields[field] ?? document }
}

/// Pools read from manifest files, with where each was defined.
public struct ManifestSet: Sendable {
    public var pools: [PoolSpec]
    /// Where each pool was defined, for later errors (missing image files).
    public var origins: [String: PoolOrigin]
    /// Directories given as input that hold no `*.yaml` or `*.yml` file.
    public var emptyDirectories: [String]

    public init(pools: [PoolSpec] = [], origins: [String: PoolOrigin] = [:], emptyDirectories: [String] = []) {
        self.pools = pools
        self.origins = origins
        self.emptyDirectories = emptyDirectories
    }
}

/// Reads manifest files and directories into validated pool specs.
///
/// All files are read and all problems collected before anything is returned: a caller
/// either gets every pool or a `ManifestError` listing every problem of every file.
public enum ManifestLoader {
    /// The path that stands for standard input (`-f -`).
    public static let standardInput = "-"

    /// Loads files and directories (`*.yaml` / `*.yml` in a directory, sorted, not recursive);
    /// `-` reads standard input. A path that cannot be read is an error, never an empty input.
    public static func load(paths: [String], standardInput read: () throws -> [UInt8] = readStandardInput)
        throws(ManifestError) -> ManifestSet
    {
        var diagnostics: [Diagnostic] = []
        var result = ManifestSet()
        let files = expand(paths, diagnostics: &diagnostics, emptyDirectories: &result.emptyDirectories)
        for file in files {
            let bytes: [UInt8]
            let shown = file == standardInput ? "<stdin>" : file
            do {
                bytes = file == standardInput ? try read() : try readBytes(file, limit: PreScan.maxBytes)
            } catch {
                diagnostics.append(
                    Diagnostic(
                        .unreadable, at: SourceLocation(file: shown, line: 1, column: 1), field: "(file)",
                        "cannot read the file: \(describe(error))"))
                continue
            }
            let base =
                file == standardInput ? FileManager.default.currentDirectoryPath : absoluteDirectory(of: file)
            let parsed = parse(bytes, file: shown, baseDirectory: base)
            diagnostics += parsed.diagnostics
            for (pool, origin) in parsed.pools {
                if let first = result.origins[pool.name]?.location(of: "metadata.name") {
                    diagnostics.append(
                        Diagnostic(
                            .duplicateName, at: origin.location(of: "metadata.name"), field: "metadata.name",
                            "pool \"\(pool.name)\" is already defined at \(first.file):\(first.line):\(first.column)"
                        ))
                    continue
                }
                result.origins[pool.name] = origin
                result.pools.append(pool)
            }
        }
        if !diagnostics.isEmpty { throw ManifestError(diagnostics) }
        return result
    }

    /// Parses one file's bytes. Pure: no file system access beyond what the caller did.
    public static func parse(_ bytes: [UInt8], file: String, baseDirectory: String = ".")
        -> (pools: [(PoolSpec, PoolOrigin)], diagnostics: [Diagnostic])
    {
        let text: String
        switch PreScan(file: file).check(bytes) {
        case .success(let decoded): text = decoded
        case .failure(let problem): return ([], [problem])
        }
        var reader = DocumentReader(file: file, baseDirectory: baseDirectory)
        var pools: [(PoolSpec, PoolOrigin)] = []
        do {
            let parser = try Parser(yaml: text, resolver: .basic, constructor: .default, encoding: .utf8)
            while let root = try parser.nextRoot() {
                if case .scalar = root, root.tagName == .null { continue }
                if let pool = reader.readPool(root) { pools.append(pool) }
            }
        } catch {
            return (pools, reader.diagnostics + [syntaxDiagnostic(error, file: file, text: text)])
        }
        return (pools, reader.diagnostics)
    }

    // MARK: - Files

    static func expand(_ paths: [String], diagnostics: inout [Diagnostic], emptyDirectories: inout [String])
        -> [String]
    {
        var files: [String] = []
        let manager = FileManager.default
        for path in paths {
            if path == standardInput {
                files.append(path)
                continue
            }
            var isDirectory: ObjCBool = false
            guard manager.fileExists(atPath: path, isDirectory: &isDirectory) else {
                diagnostics.append(
                    Diagnostic(
                        .unreadable, at: SourceLocation(file: path, line: 1, column: 1), field: "(file)",
                        "no such file or directory"))
                continue
            }
            guard isDirectory.boolValue else {
                files.append(path)
                continue
            }
            let entries: [String]
            do {
                entries = try manager.contentsOfDirectory(atPath: path)
            } catch {
                diagnostics.append(
                    Diagnostic(
                        .unreadable, at: SourceLocation(file: path, line: 1, column: 1), field: "(file)",
                        "cannot read the directory: \(describe(error))"))
                continue
            }
            let prefix = path.hasSuffix("/") ? path : path + "/"
            let found = entries.filter { $0.hasSuffix(".yaml") || $0.hasSuffix(".yml") }.sorted().map { prefix + $0 }
                .filter { !isDirectoryPath($0) }
            if found.isEmpty { emptyDirectories.append(path) }
            files += found
        }
        return files
    }

    /// Reads standard input, refusing more than a manifest may hold.
    public static func readStandardInput() throws -> [UInt8] {
        var result: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while result.count <= PreScan.maxBytes {
            let count = Glibc.read(0, &chunk, chunk.count)
            if count < 0 && errno == EINTR { continue }
            if count < 0 { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
            if count == 0 { break }
            result += chunk[0..<count]
        }
        return result
    }

    /// `strerror` wording for file errors ("Permission denied"), whatever Foundation wraps them in.
    static func describe(_ error: Error) -> String {
        if let posix = error as? POSIXError { return String(cString: strerror(posix.code.rawValue)) }
        let nsError = error as NSError
        if let underlying = nsError.userInfo[NSUnderlyingErrorKey] as? NSError, underlying.domain == NSPOSIXErrorDomain
        {
            return String(cString: strerror(Int32(underlying.code)))
        }
        if nsError.domain == NSCocoaErrorDomain {
            switch CocoaError.Code(rawValue: nsError.code) {
            case .fileReadNoPermission: return "Permission denied"
            case .fileReadNoSuchFile, .fileNoSuchFile: return "No such file or directory"
            default: break
            }
        }
        return error.localizedDescription
    }

    private static func isDirectoryPath(_ path: String) -> Bool {
        var isDirectory: ObjCBool = false
        return FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) && isDirectory.boolValue
    }

    private static func absoluteDirectory(of file: String) -> String {
        let url = URL(fileURLWithPath: file).standardizedFileURL.deletingLastPathComponent()
        return url.path
    }

    /// Reads at most `limit + 1` bytes, so that a huge file is refused without being read whole.
    static func readBytes(_ path: String, limit: Int) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        defer { close(fd) }
        var result: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while result.count <= limit {
            let count = read(fd, &chunk, min(chunk.count, limit + 1 - result.count))
            if count < 0 && errno == EINTR { continue }
            if count < 0 { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
            if count == 0 { break }
            result += chunk[0..<count]
        }
        return result
    }

    private static func syntaxDiagnostic(_ error: Error, file: String, text: String) -> Diagnostic {
        var line = 1
        var column = 1
        var message = "\(error)"
        if let yamlError = error as? YamlError {
            switch yamlError {
            case .scanner(let context, let problem, let mark, _), .parser(let context, let problem, let mark, _),
                .composer(let context, let problem, let mark, _):
                line = mark.line
                column = mark.column
                message = [context?.text, problem].compactMap { $0 }.filter { !$0.isEmpty }.joined(separator: ", ")
            case .duplicatedKeysInMapping(let duplicates, let context):
                line = context.mark.line
                column = context.mark.column
                message = "duplicate key \(duplicates.map { "\"\($0)\"" }.joined(separator: ", ")) in a mapping"
            case .reader(let problem, let offset, _, _):
                message = problem
                if let offset { (line, column) = position(ofUTF8Offset: offset, in: text) }
            default:
                break
            }
        }
        // libyaml can report a position just past the input (a line after the last one when the
        // file has no final newline, a column after a line's break): point at the nearest
        // position inside it, counting lines as YAML does.
        (line, column) = clamp(line: line, column: column, in: text)
        return Diagnostic(
            .syntax, at: SourceLocation(file: file, line: line, column: column), field: "(document)",
            "invalid YAML: \(message)")
    }

    /// The position nearest to (`line`, `column`) that lies in `text`, lines broken at `\n`,
    /// `\r\n`, `\r`, NEL, LS and PS as YAML breaks them.
    static func clamp(line: Int, column: Int, in text: String) -> (Int, Int) {
        var lengths: [Int] = []
        var length = 0
        var previous: Unicode.Scalar = " "
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\n":
                if previous != "\r" { lengths.append(length) }
                length = 0
            case "\r", "\u{85}", "\u{2028}", "\u{2029}":
                lengths.append(length)
                length = 0
            default:
                length += 1
            }
            previous = scalar
        }
        lengths.append(length)
        if text.hasSuffix("\n") || text.hasSuffix("\r"), lengths.count > 1, lengths.last == 0 { lengths.removeLast() }
        let clampedLine = min(max(1, line), lengths.count)
        let maxColumn = lengths[clampedLine - 1] + 1
        return (clampedLine, clampedLine < line ? maxColumn : min(max(1, column), maxColumn))
    }

    private static func position(ofUTF8Offset offset: Int, in text: String) -> (Int, Int) {
        var line = 1
        var column = 1
        for (index, scalar) in text.unicodeScalars.enumerated() {
            if index >= offset { break }
            if scalar == "\n" {
                line += 1
                column = 1
            } else {
                column += 1
            }
        }
        return (line, column)
    }
}
