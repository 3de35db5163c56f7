import CVmpoolSys
import Glibc

/// Extracts one requested entry of an untrusted tar stream (a file, a symlink, or a directory
/// and what is under it) to `directory/name`, all or nothing.
///
/// The rules, each against a way a hostile archive gets out of its destination:
/// - Only regular files, directories, symlinks and hard links are made. Modes are masked to 0777
///   (no setuid, setgid or sticky bit) and ownership is never taken from the archive. Device
///   nodes and fifos are skipped with a warning: a results directory that holds one is still
///   worth copying, and skipping creates nothing.
/// - Every name must be the requested entry or under it: no absolute name, no `..`.
/// - Nothing is created by path. Each parent is opened from the staging directory's descriptor
///   one component at a time with `O_NOFOLLOW | O_DIRECTORY`, so neither a symlink from the
///   archive nor one already at the destination is ever followed; a name that goes through a
///   non-directory fails the copy. Files are created with `O_CREAT | O_EXCL | O_NOFOLLOW` after
///   what was there is unlinked (never opened for writing), so no write lands on another inode.
/// - A hard link is made only to a regular file this extraction created, found the same way.
/// - Everything goes into a fresh private staging directory next to the destination; `commit`
///   renames the entry into place (a directory never replaces or merges into an existing one),
///   `discard` removes the staging directory. The destination never holds half a copy.
public final class SafeExtractor {
    /// The destination directory as the user named it, for messages.
    public let directory: String
    /// The name the entry gets in `directory`.
    public let name: String
    /// Messages about entries that were skipped (device nodes, fifos).
    public private(set) var warnings: [String] = []

    private let requested: [UInt8]
    private let limits: ArchiveLimits
    private let parentFD: Int32
    private let stagingName: String
    private var stagingFD: Int32
    private var top: TarEntry.Kind?
    private var skippedTop: String?
    private var directories: [(path: [[UInt8]], mode: UInt32, mtime: Int64)] = []
    private var cached: (path: [[UInt8]], fd: Int32)?
    private var closed = false

    /// Opens `directory` (the user's own path: symlinks in it are followed, as any command
    /// does) and makes the private staging directory in it. `requested` is the name the sender
    /// was asked for: every entry must be it or under it.
    public init(directory: String, name: String, requested: [UInt8], limits: ArchiveLimits = ArchiveLimits())
        throws(ArchiveError)
    {
        self.directory = directory
        self.name = name
        self.requested = requested
        self.limits = limits
        guard !name.isEmpty, name != ".", name != "..", !name.contains("/") else {
            throw ArchiveError(.unsafeName, "\"\(name)\" cannot name the copy (one path component is needed)")
        }
        parentFD = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard parentFD >= 0 else {
            let number = errno
            switch number {
            case ENOENT: throw ArchiveError(.hostIO, "no such directory on the host: \(directory)", errno: number)
            case ENOTDIR: throw ArchiveError(.hostIO, "not a directory on the host: \(directory)", errno: number)
            default: throw ArchiveError.host("open", directory, errno: number)
            }
        }
        var made: String?
        for _ in 0..<100 {
            let candidate = ".vmpool-cp-" + String(UInt64.random(in: 0...UInt64.max), radix: 36)
            if mkdirat(parentFD, candidate, 0o700) == 0 {
                made = candidate
                break
            }
            if errno != EEXIST {
                let number = errno
                Glibc.close(parentFD)
                throw ArchiveError(
                    .hostIO, "cannot write to \(directory) on the host: \(plainErrno(number))", errno: number)
            }
        }
        guard let made else {
            Glibc.close(parentFD)
            throw ArchiveError(.hostIO, "cannot make a temporary directory in \(directory) on the host")
        }
        stagingName = made
        stagingFD = openat(parentFD, made, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        if stagingFD < 0 {
            let number = errno
            unlinkat(parentFD, made, AT_REMOVEDIR)
            Glibc.close(parentFD)
            throw ArchiveError.host("open", directory + "/" + made, errno: number)
        }
    }

    deinit { discard() }

    /// The destination's path for messages.
    public var destination: String {
        directory == "." ? name : directory.hasSuffix("/") ? directory + name : directory + "/" + name
    }

    /// Reads every entry of `reader` into the staging directory.
    public func extract(_ reader: TarReader) throws {
        while let entry = try reader.next() {
            try add(entry, reader)
        }
        guard top != nil || skippedTop != nil else {
            throw ArchiveError(.truncated, "the archive holds nothing for \(printable(requested))")
        }
    }

    /// Adds one entry (its data read from `reader`).
    public func add(_ entry: TarEntry, _ reader: TarReader) throws {
        let path = try staged(entry.name, what: "entry")
        let display = displayPath(path)
        guard let leaf = path.last else { return }
        switch entry.kind {
        case .characterDevice, .blockDevice, .fifo:
            let kind =
                entry.kind == .fifo
                ? "a fifo" : entry.kind == .characterDevice ? "a character device" : "a block device"
            let message = "skipped \(display): \(kind) (device nodes, fifos and sockets are not copied)"
            warnings.append(message)
            if path.count == 1 { skippedTop = message }
            return
        default: break
        }
        let parent = try openParent(path.dropLast(), create: true, for: entry)
        switch entry.kind {
        case .directory:
            if mkdirat(parent, leaf.cString, 0o700) != 0 {
                let number = errno
                guard number == EEXIST, kindAt(parent, leaf) == S_IFDIR else {
                    throw number == EEXIST
                        ? conflict(entry) : ArchiveError.host("create", display, errno: number)
                }
            }
            directories.append((Array(path), entry.mode & 0o777, entry.mtime))
        case .file:
            try removeNonDirectory(parent, leaf, entry)
            let fd = openat(parent, leaf.cString, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw ArchiveError.host("create", display, errno: errno) }
            defer { Glibc.close(fd) }
            try reader.readData { chunk in
                var offset = 0
                while offset < chunk.count {
                    let written = write(fd, chunk.baseAddress! + offset, chunk.count - offset)
                    if written < 0 {
                        if errno == EINTR { continue }
                        throw ArchiveError.host("write", display, errno: errno)
                    }
                    offset += written
                }
            }
            guard fchmod(fd, mode_t(entry.mode & 0o777)) == 0 else {
                throw ArchiveError.host("set the mode of", display, errno: errno)
            }
            var times = [
                timespec(tv_sec: Int(entry.mtime), tv_nsec: 0), timespec(tv_sec: Int(entry.mtime), tv_nsec: 0),
            ]
            _ = futimens(fd, &times)
        case .symlink:
            guard !entry.linkTarget.isEmpty, !entry.linkTarget.contains(0) else {
                throw ArchiveError(.malformed, "symlink \"\(entry.displayName)\" has no target")
            }
            try removeNonDirectory(parent, leaf, entry)
            guard symlinkat(entry.linkTarget.cString, parent, leaf.cString) == 0 else {
                throw ArchiveError.host("create", display, errno: errno)
            }
            var times = [
                timespec(tv_sec: Int(entry.mtime), tv_nsec: 0), timespec(tv_sec: Int(entry.mtime), tv_nsec: 0),
            ]
            _ = utimensat(parent, leaf.cString, &times, AT_SYMLINK_NOFOLLOW)
        case .hardLink:
            let target = try staged(entry.linkTarget, what: "hard link \"\(entry.displayName)\" to")
            guard !target.elementsEqual(path) else { return }
            guard let targetLeaf = target.last else { return }
            let targetParent = try openPath(target.dropLast(), create: false, for: entry)
            defer { if targetParent != stagingFD { Glibc.close(targetParent) } }
            guard kindAt(targetParent, targetLeaf) == S_IFREG else {
                throw ArchiveError(
                    .unsupported,
                    "hard link \"\(entry.displayName)\" points to \"\(printable(entry.linkTarget))\", which is not a "
                        + "file copied before it")
            }
            try removeNonDirectory(parent, leaf, entry)
            guard linkat(targetParent, targetLeaf.cString, parent, leaf.cString, 0) == 0 else {
                throw ArchiveError.host("link", display, errno: errno)
            }
        case .characterDevice, .blockDevice, .fifo: break
        }
        if path.count == 1 { top = entry.kind == .hardLink ? .file : entry.kind }
        if top == nil { top = .directory }
    }

    /// Sets directories' modes and times (deepest first, after their contents) and renames the
    /// entry into place. A directory never replaces or merges into what is at the destination;
    /// a file or symlink replaces a file or symlink (rename: the old one is never written).
    public func commit() throws {
        guard let top else {
            throw ArchiveError(.unsupported, skippedTop ?? "the archive holds nothing for \(printable(requested))")
        }
        closeCached()
        for directory in directories.reversed() {
            let fd = try openPath(directory.path[...], create: false, for: nil)
            defer { if fd != stagingFD { Glibc.close(fd) } }
            guard fchmod(fd, mode_t(directory.mode)) == 0 else {
                throw ArchiveError.host("set the mode of", displayPath(directory.path[...]), errno: errno)
            }
            var times = [
                timespec(tv_sec: Int(directory.mtime), tv_nsec: 0), timespec(tv_sec: Int(directory.mtime), tv_nsec: 0),
            ]
            _ = futimens(fd, &times)
        }
        let renamed =
            top == .directory
            ? vmpool_rename_noreplace(stagingFD, name, parentFD, name)
            : renameat(stagingFD, name, parentFD, name)
        if renamed != 0 {
            let number = errno
            switch number {
            case EEXIST, ENOTEMPTY:
                throw ArchiveError(
                    .exists,
                    "\(destination) already exists on the host; a copied directory is not merged into it or put in "
                        + "its place (remove it, or copy to another name)")
            case EISDIR:
                throw ArchiveError(
                    .exists, "\(destination) is a directory on the host; a copied file is not put in its place")
            default: throw ArchiveError.host("rename the copy to", destination, errno: number)
            }
        }
        unlinkat(parentFD, stagingName, AT_REMOVEDIR)
        closeAll()
    }

    /// Removes the staging directory and what is in it; the destination is left as it was.
    public func discard() {
        guard !closed else { return }
        closeCached()
        removeTree(parentFD, Array(stagingName.utf8CString))
        closeAll()
    }

    private func closeCached() {
        if let cached { Glibc.close(cached.fd) }
        cached = nil
    }

    private func closeAll() {
        guard !closed else { return }
        closed = true
        Glibc.close(stagingFD)
        Glibc.close(parentFD)
    }

    /// `name` split into components under the staging directory, checked: not absolute, no
    /// `..`, the requested entry or under it, not too deep.
    private func staged(_ name: [UInt8], what: String) throws(ArchiveError) -> ArraySlice<[UInt8]> {
        let text = "\(what) \"\(printable(name))\""
        guard name.first != UInt8(ascii: "/") else {
            throw ArchiveError(.unsafeName, "\(text) is an absolute name; it would land outside the destination")
        }
        let components = name.split(separator: UInt8(ascii: "/")).filter { !$0.elementsEqual([UInt8(ascii: ".")]) }
        if components.contains(where: { $0.elementsEqual([UInt8(ascii: "."), UInt8(ascii: ".")]) }) {
            throw ArchiveError(.unsafeName, "\(text) has a \"..\" component; it could land outside the destination")
        }
        guard let first = components.first else {
            throw ArchiveError(.unsafeName, "\(text) is empty")
        }
        guard first.elementsEqual(requested) else {
            throw ArchiveError(
                .outsideRequest, "\(text) is not \(printable(requested)) or under it, which is all that was asked for")
        }
        guard components.count <= limits.maxDepth else {
            throw ArchiveError(.limit, "\(text) is more than \(limits.maxDepth) directories deep")
        }
        return ([Array(self.name.utf8)] + components.dropFirst().map { Array($0) })[...]
    }

    /// The destination path of a staged entry, for messages.
    private func displayPath(_ path: ArraySlice<[UInt8]>) -> String {
        ([destination] + path.dropFirst().map { printable($0) }).joined(separator: "/")
    }

    /// The directory `path` in the staging directory, opened without following any symlink and
    /// kept open for the next entry (archives list a directory's files together).
    private func openParent(_ path: ArraySlice<[UInt8]>, create: Bool, for entry: TarEntry) throws -> Int32 {
        if path.isEmpty { return stagingFD }
        if let cached, cached.path.elementsEqual(path) { return cached.fd }
        let fd = try openPath(path, create: create, for: entry)
        closeCached()
        cached = (Array(path), fd)
        return fd
    }

    /// Opens the directory `path` one component at a time from the staging directory with
    /// O_NOFOLLOW; missing directories are made (0700) when `create`. The caller closes the
    /// result unless it is `stagingFD`.
    private func openPath(_ path: ArraySlice<[UInt8]>, create: Bool, for entry: TarEntry?) throws -> Int32 {
        var fd = stagingFD
        var walked: [[UInt8]] = []
        for component in path {
            walked.append(component)
            var next = openat(fd, component.cString, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            if next < 0 && errno == ENOENT && create {
                if mkdirat(fd, component.cString, 0o700) != 0 && errno != EEXIST {
                    let number = errno
                    if fd != stagingFD { Glibc.close(fd) }
                    throw ArchiveError.host("create", displayPath(walked[...]), errno: number)
                }
                next = openat(fd, component.cString, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            }
            let number = errno
            if fd != stagingFD { Glibc.close(fd) }
            guard next >= 0 else {
                let subject = entry.map { "entry \"\($0.displayName)\"" } ?? "a directory"
                switch number {
                case ELOOP, ENOTDIR:
                    throw ArchiveError(
                        .throughLink,
                        "\(subject) goes through \(displayPath(walked[...])), which is a symlink or a file, not a "
                            + "directory; nothing is written through it")
                case ENOENT:
                    throw ArchiveError(
                        .unsupported, "\(subject) refers to \(displayPath(walked[...])), which was not copied before it"
                    )
                default: throw ArchiveError.host("open", displayPath(walked[...]), errno: number)
                }
            }
            fd = next
        }
        return fd
    }

    /// Unlinks what is at `leaf` unless it is a directory (then the archive names one thing twice).
    private func removeNonDirectory(_ parent: Int32, _ leaf: [UInt8], _ entry: TarEntry) throws {
        switch kindAt(parent, leaf) {
        case nil: return
        case S_IFDIR: throw conflict(entry)
        default:
            guard unlinkat(parent, leaf.cString, 0) == 0 || errno == ENOENT else {
                throw ArchiveError.host("replace", entry.displayName, errno: errno)
            }
        }
    }

    private func conflict(_ entry: TarEntry) -> ArchiveError {
        ArchiveError(
            .conflict, "entry \"\(entry.displayName)\" names a directory the archive also holds as something else")
    }
}

/// The file type (S_IFDIR, S_IFREG, ...) of `leaf` in `parent`, not following a symlink; nil
/// when there is nothing.
func kindAt(_ parent: Int32, _ leaf: [UInt8]) -> mode_t? {
    var info = stat()
    guard fstatat(parent, leaf.cString, &info, AT_SYMLINK_NOFOLLOW) == 0 else { return nil }
    return info.st_mode & S_IFMT
}

/// Removes `name` in `parent` and everything under it without following symlinks (each
/// directory opened with O_NOFOLLOW from its parent's descriptor).
public func removeTree(_ parent: Int32, _ name: [CChar]) {
    let fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
    guard fd >= 0 else {
        unlinkat(parent, name, 0)
        return
    }
    fchmod(fd, 0o700)
    var names: [[CChar]] = []
    let copy = dup(fd)
    if copy >= 0, let stream = fdopendir(copy) {
        while let entry = readdir(stream) {
            let child = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                Array(raw.bindMemory(to: CChar.self).prefix { $0 != 0 }) + [0]
            }
            if child != [46, 0] && child != [46, 46, 0] { names.append(child) }
        }
        closedir(stream)
    }
    for child in names where unlinkat(fd, child, 0) != 0 {
        if errno == EISDIR || errno == EPERM { removeTree(fd, child) }
    }
    Glibc.close(fd)
    unlinkat(parent, name, AT_REMOVEDIR)
}

extension Array where Element == UInt8 {
    /// The bytes NUL-terminated, for a C path argument.
    var cString: [CChar] { map { CChar(bitPattern: $0) } + [0] }
}
