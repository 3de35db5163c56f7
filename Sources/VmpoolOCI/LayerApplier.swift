import Glibc
import VmpoolArchive

/// Applies image layers, in order, to a root tree being staged for a guest: the OCI rules for
/// whiteouts (`.wh.NAME` hides NAME of the layers below, `.wh..wh..opq` hides everything the
/// layers below put in its directory), owners, modes (setuid included), symlinks, hard links
/// and device nodes kept, as the guest will see them.
///
/// The layers are not trusted. Every path is resolved inside the root the way the guest would
/// resolve it (a symlink's absolute target starts again at the root, `..` stops there), one
/// component at a time, never following a symlink with the host's view; names with `..` are
/// refused; a file is always created fresh (O_EXCL, O_NOFOLLOW), so a symlink left by an
/// earlier entry is replaced, never written through.
public struct LayerApplier {
    /// The staging root (a directory descriptor).
    public let root: Int32
    /// Data bytes written so far, across layers.
    public private(set) var written: Int64 = 0
    /// At most this many data bytes across all layers (default 64 GiB).
    public var maxBytes: Int64 = 64 << 30
    /// What was skipped (sockets, xattrs are not carried) for the caller to print.
    public private(set) var warnings: [String] = []

    /// Paths the current layer made: a whiteout or an opaque directory of the same layer
    /// hides only what the layers below put there.
    private var made: Set<[UInt8]> = []
    private var layer = ""

    /// Symlinks followed while resolving one path, at most (as the kernel's 40).
    static let maxLinks = 40

    public init(root: Int32) { self.root = root }

    /// Applies one layer, read from `reader`; `layer` names it in errors ("layer 2 of 3
    /// (sha256:ab12...)").
    public mutating func apply(_ reader: TarReader, layer: String) throws {
        self.layer = layer
        made = []
        while let entry = try readEntry(reader) {
            do {
                try add(entry, reader)
            } catch let error as OCIError {
                throw error
            } catch {
                throw OCIError("\(layer), entry \"\(entry.displayName)\": \(error)")
            }
        }
    }

    private func readEntry(_ reader: TarReader) throws -> TarEntry? {
        do {
            return try reader.next()
        } catch {
            throw OCIError("\(layer) is not a valid tar stream: \(error)")
        }
    }

    private func fail(_ entry: TarEntry, _ why: String) -> OCIError {
        OCIError("\(layer), entry \"\(entry.displayName)\": \(why)")
    }

    /// The components of an entry name: leading `/` and `.` dropped; `..` refused.
    func components(_ name: [UInt8], of entry: TarEntry) throws -> [[UInt8]] {
        let parts = name.split(separator: UInt8(ascii: "/"), omittingEmptySubsequences: true).map(Array.init)
            .filter { $0 != [UInt8(ascii: ".")] }
        if parts.contains([UInt8(ascii: "."), UInt8(ascii: ".")]) {
            throw fail(entry, "the name has a \"..\" component, which could reach outside the root; refused")
        }
        return parts
    }

    mutating func add(_ entry: TarEntry, _ reader: TarReader) throws {
        let parts = try components(entry.name, of: entry)
        guard let leaf = parts.last else {
            // The root itself ("./"): its mode and owner.
            guard entry.kind == .directory else { throw fail(entry, "the root can only be a directory") }
            try setOwnerAndMode([], entry, symlink: false)
            return
        }
        let whiteout = Array(".wh.".utf8)
        if leaf == Array(".wh..wh..opq".utf8) {
            let directory = try resolve(Array(parts.dropLast()), followLast: true, for: entry)
            guard let kind = kindAt(directory) else { return }
            guard kind == S_IFDIR else { throw fail(entry, "an opaque marker in something that is not a directory") }
            try hideBelow(directory)
            return
        }
        if leaf.starts(with: whiteout) {
            let hidden = Array(leaf.dropFirst(whiteout.count))
            guard !hidden.isEmpty, hidden != [46], hidden != [46, 46] else {
                throw fail(entry, "a whiteout that names no file")
            }
            let parent = try resolve(Array(parts.dropLast()), followLast: true, for: entry)
            let path = parent + [hidden]
            if !made.contains(join(path)), kindAt(parent) == S_IFDIR { removeTree(path) }
            return
        }
        let parent = try resolve(Array(parts.dropLast()), followLast: true, for: entry)
        try makeDirectories(parent, for: entry)
        let path = parent + [leaf]
        let existing = kindAt(path)
        switch entry.kind {
        case .directory:
            if existing != S_IFDIR {
                if existing != nil { removeTree(path) }
                guard mkdirat(root, cPath(path), 0o700) == 0 else { throw systemError(entry, "mkdir") }
            }
            try setOwnerAndMode(path, entry, symlink: false)
        case .file:
            if existing != nil { removeTree(path) }
            try writeFile(path, entry, reader)
            try setOwnerAndMode(path, entry, symlink: false)
        case .symlink:
            if existing != nil { removeTree(path) }
            guard !entry.linkTarget.isEmpty, symlinkat(cPath(entry.linkTarget), root, cPath(path)) == 0 else {
                throw systemError(entry, "symlink")
            }
            try setOwnerAndMode(path, entry, symlink: true)
        case .hardLink:
            let targetParts = try components(entry.linkTarget, of: entry)
            guard let targetLeaf = targetParts.last else { throw fail(entry, "a hard link to the root") }
            let target = try resolve(Array(targetParts.dropLast()), followLast: true, for: entry) + [targetLeaf]
            guard let kind = kindAt(target) else {
                throw fail(entry, "a hard link to \"\(printable(entry.linkTarget))\", which is not in the image")
            }
            guard kind != S_IFDIR else { throw fail(entry, "a hard link to a directory") }
            if join(target) == join(path) { break }
            if existing != nil { removeTree(path) }
            guard linkat(root, cPath(target), root, cPath(path), 0) == 0 else { throw systemError(entry, "link") }
        case .characterDevice, .blockDevice, .fifo:
            if existing != nil { removeTree(path) }
            let type = entry.kind == .fifo ? S_IFIFO : entry.kind == .blockDevice ? S_IFBLK : S_IFCHR
            let device = Self.device(entry.deviceMajor, entry.deviceMinor)
            guard mknodat(root, cPath(path), type | 0o600, entry.kind == .fifo ? 0 : device) == 0 else {
                throw systemError(entry, "mknod")
            }
            try setOwnerAndMode(path, entry, symlink: false)
        }
        made.insert(join(path))
    }

    /// Resolves `parts` inside the root as the guest would: symlinks followed (an absolute
    /// target from the root, `..` stopping at the root), the last one only when `followLast`.
    /// Returns components none of which, but perhaps the last, is a symlink.
    func resolve(_ parts: [[UInt8]], followLast: Bool, for entry: TarEntry) throws -> [[UInt8]] {
        var resolved: [[UInt8]] = []
        var queue = parts[...]
        var links = 0
        while let part = queue.first {
            queue = queue.dropFirst()
            if part.isEmpty || part == [46] { continue }
            if part == [46, 46] {
                _ = resolved.popLast()
                continue
            }
            let candidate = resolved + [part]
            if (followLast || !queue.isEmpty), kindAt(candidate) == S_IFLNK {
                links += 1
                guard links <= Self.maxLinks else {
                    throw fail(entry, "more than \(Self.maxLinks) symlinks in its path (a loop?)")
                }
                let target = try readLink(candidate, for: entry)
                if target.first == UInt8(ascii: "/") { resolved = [] }
                let targetParts = target.split(separator: UInt8(ascii: "/"), omittingEmptySubsequences: true)
                    .map(Array.init)
                queue = (targetParts + Array(queue))[...]
                continue
            }
            resolved = candidate
        }
        return resolved
    }

    /// Creates the missing directories of `path` (root-owned, 0755); anything else in the way
    /// is an error.
    func makeDirectories(_ path: [[UInt8]], for entry: TarEntry) throws {
        for count in stride(from: 1, through: path.count, by: 1) {
            let prefix = Array(path.prefix(count))
            switch kindAt(prefix) {
            case .some(S_IFDIR): continue
            case .none:
                guard mkdirat(root, cPath(prefix), 0o755) == 0 else { throw systemError(entry, "mkdir") }
            default:
                throw fail(entry, "its directory \"/\(printable(join(prefix)))\" is not a directory in the image")
            }
        }
    }

    /// Hides what the layers below put under `directory`: everything this layer did not make.
    mutating func hideBelow(_ directory: [[UInt8]]) throws {
        for child in children(directory) {
            let path = directory + [child]
            if !made.contains(join(path)) {
                removeTree(path)
            } else if kindAt(path) == S_IFDIR {
                try hideBelow(path)
            }
        }
    }

    mutating func writeFile(_ path: [[UInt8]], _ entry: TarEntry, _ reader: TarReader) throws {
        guard entry.size <= maxBytes - written else {
            throw fail(
                entry, "\(entry.size) bytes would take the image past its limit of \(maxBytes) bytes of file data")
        }
        let fd = openat(root, cPath(path), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw systemError(entry, "create") }
        defer { close(fd) }
        var failure: Int32 = 0
        try reader.readData { bytes in
            guard failure == 0 else { return }
            var offset = 0
            while offset < bytes.count {
                let count = Glibc.write(fd, bytes.baseAddress! + offset, bytes.count - offset)
                if count < 0 {
                    if errno == EINTR { continue }
                    failure = errno
                    return
                }
                offset += count
            }
        }
        if failure != 0 {
            throw fail(entry, "cannot write it in the staging directory: \(String(cString: strerror(failure)))")
        }
        written += entry.size
        var times = [timespec(tv_sec: Int(entry.mtime), tv_nsec: 0), timespec(tv_sec: Int(entry.mtime), tv_nsec: 0)]
        futimens(fd, &times)
    }

    /// Owner first (a chown clears setuid), then the mode; a symlink gets its owner only.
    func setOwnerAndMode(_ path: [[UInt8]], _ entry: TarEntry, symlink: Bool) throws {
        let name = path.isEmpty ? [CChar(46), 0] : cPath(path)
        guard fchownat(root, name, entry.uid, entry.gid, AT_SYMLINK_NOFOLLOW) == 0 else {
            throw systemError(entry, "chown")
        }
        if !symlink {
            guard fchmodat(root, name, mode_t(entry.mode & 0o7777), 0) == 0 else { throw systemError(entry, "chmod") }
        }
        if entry.kind != .directory {
            var times = [
                timespec(tv_sec: Int(entry.mtime), tv_nsec: 0), timespec(tv_sec: Int(entry.mtime), tv_nsec: 0),
            ]
            utimensat(root, name, &times, AT_SYMLINK_NOFOLLOW)
        }
    }

    /// Linux's dev_t of a major and minor number (glibc's makedev, a macro Swift cannot call).
    static func device(_ major: UInt32, _ minor: UInt32) -> dev_t {
        let major = UInt64(major)
        let minor = UInt64(minor)
        return dev_t((major & 0xFFFF_F000) << 32 | (major & 0xFFF) << 8 | (minor & 0xFFFF_FF00) << 12 | (minor & 0xFF))
    }

    // MARK: paths relative to the root descriptor

    func join(_ path: [[UInt8]]) -> [UInt8] { Array(path.joined(separator: [UInt8(ascii: "/")])) }

    func cPath(_ path: [[UInt8]]) -> [CChar] { cPath(join(path)) }

    func cPath(_ bytes: [UInt8]) -> [CChar] { bytes.map { CChar(bitPattern: $0) } + [0] }

    func kindAt(_ path: [[UInt8]]) -> mode_t? {
        var info = stat()
        let name = path.isEmpty ? [CChar(46), 0] : cPath(path)
        guard fstatat(root, name, &info, AT_SYMLINK_NOFOLLOW) == 0 else { return nil }
        return info.st_mode & S_IFMT
    }

    func readLink(_ path: [[UInt8]], for entry: TarEntry) throws -> [UInt8] {
        var buffer = [CChar](repeating: 0, count: 4097)
        let count = readlinkat(root, cPath(path), &buffer, 4096)
        guard count >= 0 else { throw systemError(entry, "readlink") }
        return buffer.prefix(count).map { UInt8(bitPattern: $0) }
    }

    func children(_ path: [[UInt8]]) -> [[UInt8]] {
        let name = path.isEmpty ? [CChar(46), 0] : cPath(path)
        let fd = openat(root, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0, let stream = fdopendir(fd) else { return [] }
        defer { closedir(stream) }
        var names: [[UInt8]] = []
        while let item = readdir(stream) {
            let child = withUnsafeBytes(of: item.pointee.d_name) { raw in Array(raw.prefix { $0 != 0 }) }
            if child != [46] && child != [46, 46] { names.append(child) }
        }
        return names
    }

    /// Removes `path` and, for a directory, everything under it; no symlink is followed.
    func removeTree(_ path: [[UInt8]]) {
        guard let kind = kindAt(path) else { return }
        if kind == S_IFDIR {
            for child in children(path) { removeTree(path + [child]) }
            unlinkat(root, cPath(path), AT_REMOVEDIR)
        } else {
            unlinkat(root, cPath(path), 0)
        }
    }

    func systemError(_ entry: TarEntry, _ call: String) -> OCIError {
        fail(entry, "\(call) failed in the staging directory: \(String(cString: strerror(errno)))")
    }
}

/// Bytes as text for messages: UTF-8 where valid, control characters escaped.
func printable(_ bytes: [UInt8]) -> String {
    String(decoding: bytes, as: UTF8.self).unicodeScalars.map {
        $0.value < 0x20 || $0.value == 0x7F ? "\\u{\(String($0.value, radix: 16))}" : String($0)
    }.joined()
}
