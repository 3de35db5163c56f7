import Foundation
import Testing
import VmpoolArchive
import VmpoolTestSupport

/// A scratch area for one extraction: `dest` (where the copy goes) and `outside` (what an
/// escaping entry would reach), side by side in a private temporary directory.
struct Scratch {
    let root: TemporaryDirectory
    var dest: String { root.path + "/dest" }
    var outside: String { root.path + "/outside" }

    init() {
        root = TemporaryDirectory(prefix: "vmpool-archive")
        mkdir(root.path + "/dest", 0o755)
        mkdir(root.path + "/outside", 0o755)
    }

    func remove() { root.remove() }

    /// Every path under the scratch root with its type and size (symlinks not followed).
    func snapshot() -> [String: String] { Scratch.snapshot(root.path) }

    static func snapshot(_ root: String) -> [String: String] {
        var result: [String: String] = [:]
        func walk(_ relative: String) {
            let full = relative.isEmpty ? root : root + "/" + relative
            var info = stat()
            guard lstat(full, &info) == 0 else { return }
            result[relative] = "\(info.st_mode) \(info.st_size) \(info.st_nlink)"
            if info.st_mode & S_IFMT == S_IFDIR {
                for name in (try? FileManager.default.contentsOfDirectory(atPath: full)) ?? [] {
                    walk(relative.isEmpty ? name : relative + "/" + name)
                }
            }
        }
        walk("")
        return result
    }

    /// Extracts `bytes`, asking for `requested`, into `dest` under `name`; commits on success.
    func extract(
        _ bytes: [UInt8], requested: String = "top", name: String? = nil, limits: ArchiveLimits = ArchiveLimits()
    ) -> Result<[String], ArchiveError> {
        do {
            let extractor = try SafeExtractor(
                directory: dest, name: name ?? requested, requested: Array(requested.utf8), limits: limits)
            do {
                try extractor.extract(TarReader(limits: limits, source: memorySource(bytes)))
                try extractor.commit()
                return .success(extractor.warnings)
            } catch {
                extractor.discard()
                throw error
            }
        } catch let error as ArchiveError {
            return .failure(error)
        } catch {
            Issue.record("not an ArchiveError: \(error)")
            return .failure(ArchiveError(.hostIO, "\(error)"))
        }
    }

    /// Asserts that extracting `bytes` fails with `code` and changes nothing on disk.
    func expectRefused(
        _ bytes: [UInt8], _ code: ArchiveError.Code, requested: String = "top", limits: ArchiveLimits = ArchiveLimits(),
        sourceLocation: SourceLocation = #_sourceLocation
    ) -> ArchiveError? {
        let before = snapshot()
        let result = extract(bytes, requested: requested, limits: limits)
        guard case .failure(let error) = result else {
            Issue.record("the archive was accepted", sourceLocation: sourceLocation)
            return nil
        }
        #expect(error.code == code, "\(error.code): \(error.message)", sourceLocation: sourceLocation)
        #expect(snapshot() == before, "the failed extraction left something behind", sourceLocation: sourceLocation)
        return error
    }
}

/// A reader source over bytes in memory, handing them out in pieces of at most 7000 bytes (so
/// headers straddle reads).
func memorySource(_ bytes: [UInt8]) -> TarReader.Source {
    final class Cursor: @unchecked Sendable { var offset = 0 }
    let cursor = Cursor()
    return { buffer in
        let count = min(buffer.count, bytes.count - cursor.offset, 7000)
        guard count > 0 else { return 0 }
        bytes.withUnsafeBytes { source in
            buffer.baseAddress!.copyMemory(from: source.baseAddress! + cursor.offset, byteCount: count)
        }
        cursor.offset += count
        return count
    }
}

/// Runs `command` under /bin/sh; fails the test with its stderr when it exits non-zero.
@discardableResult
func shell(_ command: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> CommandResult {
    let result = try RunningCommand(
        path: "/bin/sh", arguments: ["-c", command], environment: ["PATH": "/usr/bin:/bin"]
    )
    .wait()
    #expect(result.status == 0, "\(command): \(result.stderr)", sourceLocation: sourceLocation)
    return result
}

func bytes(of path: String) -> [UInt8] { Array(FileManager.default.contents(atPath: path) ?? Data()) }

/// What a tree holds, for comparing two trees: per relative path its type, permission bits,
/// content or link target, and (files) modification time.
func describeTree(_ root: String, times: Bool = true) -> [String: String] {
    var result: [String: String] = [:]
    func walk(_ relative: String) {
        let full = relative.isEmpty ? root : root + "/" + relative
        var info = stat()
        guard lstat(full, &info) == 0 else { return }
        let mode = String(info.st_mode & 0o7777, radix: 8)
        switch info.st_mode & S_IFMT {
        case S_IFDIR:
            result[relative] = "dir \(mode)"
            for name in (try? FileManager.default.contentsOfDirectory(atPath: full)) ?? [] {
                walk(relative.isEmpty ? name : relative + "/" + name)
            }
        case S_IFLNK:
            result[relative] = "link -> " + ((try? FileManager.default.destinationOfSymbolicLink(atPath: full)) ?? "?")
        case S_IFREG:
            let data = FileManager.default.contents(atPath: full) ?? Data()
            var hasher = Hasher()
            hasher.combine(data)
            result[relative] =
                "file \(mode) \(data.count) \(hasher.finalize())" + (times ? " t\(info.st_mtim.tv_sec)" : "")
        default:
            result[relative] = "other \(info.st_mode)"
        }
    }
    walk("")
    return result
}

/// A tree with what copies must carry: nested and empty directories, empty files, names past
/// 100 and 255 bytes, spaces and non-ASCII, symlinks (relative, absolute, dangling), odd
/// permission bits, hard links, a file of 1 MiB + 3 bytes.
func makeSampleTree(_ top: String) throws {
    let longName = String(repeating: "n", count: 150)
    let deep = "a/" + String(repeating: "d", count: 90) + "/" + String(repeating: "e", count: 90)
    try shell(
        """
        set -e
        mkdir -p '\(top)/a/b/c' '\(top)/empty-dir' '\(top)/\(deep)' '\(top)/ro-dir'
        : > '\(top)/empty-file'
        printf 'hello\\n' > '\(top)/a/b/c/hello.txt'
        printf 'long\\n' > '\(top)/a/\(longName)'
        printf 'deep\\n' > '\(top)/\(deep)/\(String(repeating: "f", count: 80))'
        printf 'spaced\\n' > '\(top)/with space é.txt'
        head -c 1048579 /dev/urandom > '\(top)/blob.bin'
        printf '#!/bin/sh\\necho hi\\n' > '\(top)/run.sh'
        chmod 751 '\(top)/run.sh'
        printf 'secret\\n' > '\(top)/private'
        chmod 600 '\(top)/private'
        printf 'read only\\n' > '\(top)/ro-dir/file'
        chmod 444 '\(top)/ro-dir/file'
        chmod 555 '\(top)/ro-dir'
        ln -s b/c/hello.txt '\(top)/a/rel-link'
        ln -s /etc/hostname '\(top)/abs-link'
        ln -s does-not-exist '\(top)/dangling'
        ln -s '\(longName)' '\(top)/a/long-link'
        ln '\(top)/a/b/c/hello.txt' '\(top)/hard-link'
        touch -d '2001-02-03 04:05:06' '\(top)/a/b/c/hello.txt' '\(top)/run.sh'
        """)
}
