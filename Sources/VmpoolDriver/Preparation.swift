import Crypto
import Foundation
import Synchronization
import VmpoolSpec

/// How a VM is prepared after it boots and before it counts as ready (SPEC §11): the pool's
/// `template.files` resolved to what they are now (a digest of their content), its setup
/// steps and its ready check. Part of a VM's shape and a template's key, so a changed file,
/// step or check rebuilds the template and replaces the VMs.
public struct Preparation: Codable, Sendable, Hashable {
    /// A host file or tree copied to `dst` in the guest.
    public struct File: Codable, Sendable, Hashable {
        /// The real host path.
        public var src: String
        public var dst: String
        /// SHA-256 of the tree: names, kinds, modes, link targets and contents.
        public var digest: String

        public init(src: String, dst: String, digest: String) {
            self.src = src
            self.dst = dst
            self.digest = digest
        }
    }

    public var files: [File]
    public var setup: [SetupStep]
    public var ready: ReadyCheck?

    public init(files: [File] = [], setup: [SetupStep] = [], ready: ReadyCheck? = nil) {
        self.files = files
        self.setup = setup
        self.ready = ready
    }

    /// What changed between two preparations, for plans: `files, setup`.
    public static func describe(_ have: Preparation?, _ want: Preparation?) -> String {
        var changes: [String] = []
        if have?.files != want?.files { changes.append("template.files") }
        if have?.setup ?? [] != want?.setup ?? [] { changes.append("template.setup") }
        if have?.ready != want?.ready { changes.append("template.ready") }
        return changes.joined(separator: ", ") + " changed"
    }

    /// Why a pool's files cannot be read; `field` is where the manifest named the file.
    public struct Problem: Error, Sendable, CustomStringConvertible {
        public var field: String
        public var message: String
        public var description: String { "\(field): \(message)" }
    }

    /// The preparation a pool asks for, its files read now; `nil` when it asks for none.
    public static func resolve(_ template: TemplateSpec) throws(Problem) -> Preparation? {
        guard template.prepares else { return nil }
        var files: [File] = []
        for (index, file) in template.files.enumerated() {
            let field = "spec.template.files[\(index)].src"
            guard let real = realpath(file.src, nil) else {
                throw Problem(field: field, message: "\(file.src): \(String(cString: strerror(errno)))")
            }
            let path = String(cString: real)
            free(real)
            do {
                files.append(File(src: path, dst: file.dst, digest: try TreeDigest.of(path)))
            } catch {
                throw Problem(field: field, message: error.message)
            }
        }
        return Preparation(files: files, setup: template.setup, ready: template.ready)
    }
}

/// SHA-256 over a file tree, each regular file's digest kept while its identity (device,
/// inode, size, change and modification times) stays the same: a reconcile every few seconds
/// reads a large fixture once, and any write changes the change time.
enum TreeDigest {
    struct Failure: Error {
        var message: String
    }

    private struct Identity: Hashable {
        var device: UInt64
        var inode: UInt64
        var size: Int64
        var changed: Int64
        var modified: Int64
    }

    private static let cache = Mutex<[Identity: [UInt8]]>([:])
    /// Entries in one tree, at most: a fixture, not a file system.
    static let maxEntries = 100_000

    static func of(_ path: String) throws(Failure) -> String {
        var hash = SHA256()
        var count = 0
        try add(path, name: ".", into: &hash, count: &count)
        return hash.finalize().map { String(format: "%02x", $0) }.joined()
    }

    private static func add(_ path: String, name: String, into hash: inout SHA256, count: inout Int)
        throws(Failure)
    {
        count += 1
        guard count <= maxEntries else { throw Failure(message: "more than \(maxEntries) files") }
        var info = stat()
        guard lstat(path, &info) == 0 else { throw Failure(message: "\(path): \(String(cString: strerror(errno)))") }
        let kind = info.st_mode & S_IFMT
        hash.update(data: Array("\(name)\0\(kind)\0\(info.st_mode & 0o7777)\0".utf8))
        switch kind {
        case S_IFREG:
            hash.update(data: try contentDigest(path, info))
        case S_IFDIR:
            let names: [String]
            do { names = try FileManager.default.contentsOfDirectory(atPath: path).sorted() } catch {
                throw Failure(message: "\(path): cannot list the directory")
            }
            for entry in names { try add(path + "/" + entry, name: name + "/" + entry, into: &hash, count: &count) }
        case S_IFLNK:
            var buffer = [CChar](repeating: 0, count: 4097)
            let length = readlink(path, &buffer, 4096)
            guard length >= 0 else { throw Failure(message: "\(path): \(String(cString: strerror(errno)))") }
            hash.update(data: buffer[0..<length].map { UInt8(bitPattern: $0) })
        default:
            throw Failure(message: "\(path) is not a file, directory or symlink")
        }
    }

    private static func contentDigest(_ path: String, _ info: stat) throws(Failure) -> [UInt8] {
        let identity = Identity(
            device: UInt64(info.st_dev), inode: UInt64(info.st_ino), size: Int64(info.st_size),
            changed: Int64(info.st_ctim.tv_sec) * 1_000_000_000 + Int64(info.st_ctim.tv_nsec),
            modified: Int64(info.st_mtim.tv_sec) * 1_000_000_000 + Int64(info.st_mtim.tv_nsec))
        if let known = cache.withLock({ $0[identity] }) { return known }
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { throw Failure(message: "\(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var hash = SHA256()
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0, errno == EINTR { continue }
            guard count >= 0 else { throw Failure(message: "\(path): \(String(cString: strerror(errno)))") }
            if count == 0 { break }
            hash.update(data: buffer[0..<count])
        }
        let digest = Array(hash.finalize())
        cache.withLock { $0[identity] = digest }
        return digest
    }
}
