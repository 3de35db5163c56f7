import Foundation
import Yams

/// Pools read from manifest files, with where each was defined.
public struct ManifestSet: Sendable {
    public var pools: [PoolSpec]
    /// Where each pool's document starts, for later errors (missing image files).
    public var origins: [String: SourceLocation]

    public init(pools: [PoolSpec] = [], origins: [String: SourceLocation] = [:]) {
        self.pools = pools
        self.origins = origins
    }
}

/// Reads manifest files and directories into validated pool specs.
///
/// All files are read and all problems collected before anything is returned: a caller
/// either gets every pool or a `ManifestError` listing every problem of every file.
public enum ManifestLoader {
    /// Loads files and directories (`*.yaml` / `*.yml` in a directory, sorted, not recursive).
    public static func load(paths: [String]) throws(ManifestError) -> ManifestSet {
        var diagnostics: [Diagnostic] = []
        var result = ManifestSet()
        for file in expand(paths, diagnostics: &diagnostics) {
            let bytes: [UInt8]
            do {
                bytes = try readBytes(file, limit: PreScan.maxBytes)
            } catch {
                diagnostics.append(
                    Diagnostic(
                        .unreadable, at: SourceLocation(file: file, line: 1, column: 1), field: "(file)",
                        "cannot read the file: \(error.localizedDescription)"))
                continue
            }
            let parsed = parse(bytes, file: file, baseDirectory: absoluteDirectory(of: file))
            diagnostics += parsed.diagnostics
            for (pool, origin) in parsed.pools {
                if let first = result.origins[pool.name] {
                    diagnostics.append(
                        Diagnostic(
                            .duplicateName, at: origin, field: "metadata.name",
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
        -> (pools: [(PoolSpec, SourceLocation)], diagnostics: [Diagnostic])
    {
        let text: String
        switch PreScan(file: file).check(bytes) {
        case .success(let decoded): text = decoded
        case .failure(let problem): return ([], [problem])
        }
        var reader = DocumentReader(file: file, baseDirectory: baseDirectory)
        var pools: [(PoolSpec, SourceLocation)] = []
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

    static func expand(_ paths: [String], diagnostics: inout [Diagnostic]) -> [String] {
        var files: [String] = []
        let manager = FileManager.default
        for path in paths {
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
            let entries = (try? manager.contentsOfDirectory(atPath: path)) ?? []
            let prefix = path.hasSuffix("/") ? path : path + "/"
            files += entries.filter { $0.hasSuffix(".yaml") || $0.hasSuffix(".yml") }.sorted().map { prefix + $0 }
                .filter { !isDirectoryPath($0) }
        }
        return files
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
        guard let handle = FileHandle(forReadingAtPath: path) else {
            throw CocoaError(.fileReadNoPermission)
        }
        defer { try? handle.close() }
        let data = try handle.read(upToCount: limit + 1) ?? Data()
        return [UInt8](data)
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
        return Diagnostic(
            .syntax, at: SourceLocation(file: file, line: line, column: column), field: "(document)",
            "invalid YAML: \(message)")
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
