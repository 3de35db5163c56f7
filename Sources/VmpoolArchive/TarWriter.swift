import Glibc

/// Writes a tar stream in GNU tar's own format (GNU long-name records past 100 bytes,
/// base-256 sizes past 8 GiB), which GNU tar and busybox tar both read, so that a guest needs
/// nothing but its tar to take in a copy.
public final class TarWriter {
    /// Takes the stream's next bytes (all of them, or throws).
    public typealias Sink = (UnsafeRawBufferPointer) throws -> Void

    private let sink: Sink
    private let buffer: UnsafeMutableRawBufferPointer
    private var count = 0
    /// Bytes handed to the sink so far, and still buffered.
    public private(set) var written: Int64 = 0

    public init(bufferSize: Int = 1 << 20, sink: @escaping Sink) {
        self.sink = sink
        buffer = .allocate(byteCount: max(bufferSize, 10240), alignment: 16)
    }

    /// A writer to `fd` (a pipe, best non-blocking) that stops within 100 ms of `cancel`.
    public convenience init(fd: Int32, cancel: CancelFlag = CancelFlag()) {
        self.init { bytes in try writeAll(fd, bytes, cancel: cancel) }
    }

    deinit { buffer.deallocate() }

    /// Appends the header(s) of `entry`; a file's `entry.size` data bytes must follow
    /// (`appendData`), then `endData`.
    public func appendHeader(_ entry: TarEntry) throws {
        var name = entry.name
        if entry.kind == .directory && name.last != UInt8(ascii: "/") { name.append(UInt8(ascii: "/")) }
        if name.count > 100 { try appendLongName(name, type: UInt8(ascii: "L")) }
        if entry.linkTarget.count > 100 { try appendLongName(entry.linkTarget, type: UInt8(ascii: "K")) }
        let type: UInt8
        switch entry.kind {
        case .file: type = UInt8(ascii: "0")
        case .hardLink: type = UInt8(ascii: "1")
        case .symlink: type = UInt8(ascii: "2")
        case .characterDevice: type = UInt8(ascii: "3")
        case .blockDevice: type = UInt8(ascii: "4")
        case .directory: type = UInt8(ascii: "5")
        case .fifo: type = UInt8(ascii: "6")
        }
        try append(
            Self.header(
                name: name, type: type, mode: entry.mode, size: entry.kind == .file ? entry.size : 0,
                mtime: entry.mtime, linkTarget: entry.linkTarget, uid: entry.uid, gid: entry.gid,
                deviceMajor: entry.deviceMajor, deviceMinor: entry.deviceMinor))
    }

    /// Appends data bytes of the current file.
    public func appendData(_ bytes: UnsafeRawBufferPointer) throws {
        if count == 0 && bytes.count >= buffer.count / 2 {
            try sink(bytes)
            written += Int64(bytes.count)
            return
        }
        var offset = 0
        while offset < bytes.count {
            if count == buffer.count { try flush() }
            let take = min(buffer.count - count, bytes.count - offset)
            (buffer.baseAddress! + count).copyMemory(from: bytes.baseAddress! + offset, byteCount: take)
            count += take
            offset += take
        }
    }

    /// Pads the current file's `size` data bytes to a whole block.
    public func endData(size: Int64) throws {
        let padding = Int((512 - size % 512) % 512)
        if padding > 0 { try append([UInt8](repeating: 0, count: padding)) }
    }

    /// Appends the end-of-archive marker (two zero blocks), pads the stream to a whole 10 KiB
    /// record as GNU tar does, and hands everything to the sink.
    public func finish() throws {
        try append([UInt8](repeating: 0, count: 1024))
        let total = written + Int64(count)
        let padding = Int((10240 - total % 10240) % 10240)
        if padding > 0 { try append([UInt8](repeating: 0, count: padding)) }
        try flush()
    }

    /// Hands what is buffered to the sink.
    public func flush() throws {
        guard count > 0 else { return }
        try sink(UnsafeRawBufferPointer(rebasing: buffer[0..<count]))
        written += Int64(count)
        count = 0
    }

    private func append(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try appendData($0) }
    }

    private func appendLongName(_ name: [UInt8], type: UInt8) throws {
        try append(
            Self.header(
                name: Array("././@LongLink".utf8), type: type, mode: 0o644, size: Int64(name.count + 1), mtime: 0,
                linkTarget: []))
        try append(name + [0])
        try endData(size: Int64(name.count + 1))
    }

    /// One 512-byte GNU header; names longer than 100 bytes are cut (a long-name record comes
    /// first), numbers too large for octal are written base-256.
    public static func header(
        name: [UInt8], type: UInt8, mode: UInt32, size: Int64, mtime: Int64, linkTarget: [UInt8],
        uid: UInt32 = 0, gid: UInt32 = 0, deviceMajor: UInt32 = 0, deviceMinor: UInt32 = 0
    ) -> [UInt8] {
        var block = [UInt8](repeating: 0, count: 512)
        func put(_ bytes: some Collection<UInt8>, at offset: Int, length: Int) {
            for (index, byte) in bytes.prefix(length).enumerated() { block[offset + index] = byte }
        }
        func octal(_ value: Int64, at offset: Int, length: Int) {
            let digits = length - 1
            if value >= 0 && value < (Int64(1) << (3 * digits)) {
                let text = String(value, radix: 8)
                put(Array((String(repeating: "0", count: digits - text.count) + text).utf8), at: offset, length: digits)
            } else {
                block[offset] = 0x80
                var rest = max(value, 0)
                for index in stride(from: offset + length - 1, to: offset, by: -1) {
                    block[index] = UInt8(rest & 0xff)
                    rest >>= 8
                }
            }
        }
        put(name, at: 0, length: 100)
        octal(Int64(mode & 0o7777), at: 100, length: 8)
        octal(Int64(uid), at: 108, length: 8)
        octal(Int64(gid), at: 116, length: 8)
        octal(size, at: 124, length: 12)
        octal(max(mtime, 0), at: 136, length: 12)
        block[156] = type
        put(linkTarget, at: 157, length: 100)
        put("ustar  \0".utf8, at: 257, length: 8)
        if type == UInt8(ascii: "3") || type == UInt8(ascii: "4") {
            octal(Int64(deviceMajor), at: 329, length: 8)
            octal(Int64(deviceMinor), at: 337, length: 8)
        }
        put("        ".utf8, at: 148, length: 8)
        let sum = block.reduce(0) { $0 + Int64($1) }
        let text = String(sum, radix: 8)
        put(Array((String(repeating: "0", count: 6 - text.count) + text).utf8) + [0, 32], at: 148, length: 8)
        return block
    }
}

/// Writes a file or directory tree of the host as tar entries under a chosen top name: files,
/// directories, symlinks (never followed) and hard links between files of the tree. Device
/// nodes, fifos and sockets are skipped with a warning, as a copy out of a guest skips them.
public struct TreeArchiver: Sendable {
    /// The path that is read.
    public let path: String
    /// The path as the user gave it, for messages.
    public let display: String
    /// What `path` is: `.directory`, `.file` or `.symlink`.
    public let kind: TarEntry.Kind

    /// Looks at `path` (its last component is not followed: a symlink is copied as one);
    /// messages name it `display` (default: `path`).
    public init(path: String, display: String? = nil) throws(ArchiveError) {
        self.path = path
        let display = display ?? path
        self.display = display
        var info = stat()
        guard lstat(path, &info) == 0 else {
            let number = errno
            if number == ENOENT || number == ENOTDIR {
                throw ArchiveError(.hostIO, "no such file or directory on the host: \(display)", errno: number)
            }
            throw ArchiveError.host("read", display, errno: number)
        }
        switch info.st_mode & S_IFMT {
        case S_IFDIR: kind = .directory
        case S_IFREG: kind = .file
        case S_IFLNK: kind = .symlink
        default:
            throw ArchiveError(
                .unsupported,
                "\(display) is not a file, a directory or a symlink (device nodes, fifos and sockets are not copied)")
        }
    }

    /// Writes the tree as entries named `top` and `top/...`; returns the warnings about what
    /// was skipped. The end-of-archive marker is the caller's (`TarWriter.finish`).
    public func write(as top: [UInt8], to writer: TarWriter, cancel: CancelFlag = CancelFlag()) throws -> [String] {
        let state = WalkState(writer: writer, cancel: cancel)
        // The path itself is the user's: symlinks in its parents are followed, the last
        // component is not.
        try state.add(at: AT_FDCWD, Array(path.utf8), archiveName: top, display: display)
        return state.warnings
    }
}

/// One walk of a tree: the files seen (for hard links), what was skipped, a read buffer.
private final class WalkState {
    let writer: TarWriter
    let cancel: CancelFlag
    var warnings: [String] = []
    var links: [FileIdentity: [UInt8]] = [:]
    let block: UnsafeMutableRawBufferPointer = .allocate(byteCount: 1 << 20, alignment: 16)

    init(writer: TarWriter, cancel: CancelFlag) {
        self.writer = writer
        self.cancel = cancel
    }

    deinit { block.deallocate() }

    struct FileIdentity: Hashable {
        let device: UInt64
        let inode: UInt64
    }

    func add(at parent: Int32, _ leaf: [UInt8], archiveName: [UInt8], display: String) throws {
        try cancel.check()
        var info = stat()
        guard fstatat(parent, leaf.cString, &info, AT_SYMLINK_NOFOLLOW) == 0 else {
            throw ArchiveError.host("read", display, errno: errno)
        }
        let mtime = Int64(info.st_mtim.tv_sec)
        let mode = UInt32(info.st_mode & 0o7777)
        switch info.st_mode & S_IFMT {
        case S_IFDIR:
            let fd = openat(parent, leaf.cString, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            guard fd >= 0 else { throw ArchiveError.host("read", display, errno: errno) }
            defer { close(fd) }
            try writer.appendHeader(TarEntry(name: archiveName, kind: .directory, mode: mode, mtime: mtime))
            for child in try Self.names(fd, display: display) {
                try add(
                    at: fd, child, archiveName: archiveName + [UInt8(ascii: "/")] + child,
                    display: display + "/" + printable(child))
            }
        case S_IFLNK:
            var target = [UInt8](repeating: 0, count: 4097)
            let length = target.withUnsafeMutableBytes {
                readlinkat(parent, leaf.cString, $0.baseAddress!.assumingMemoryBound(to: CChar.self), 4097)
            }
            guard length >= 0 else { throw ArchiveError.host("read", display, errno: errno) }
            guard length <= 4096 else { throw ArchiveError(.limit, "the symlink \(display) has too long a target") }
            try writer.appendHeader(
                TarEntry(
                    name: archiveName, kind: .symlink, linkTarget: Array(target[0..<length]), mode: 0o777, mtime: mtime)
            )
        case S_IFREG:
            let identity = FileIdentity(device: UInt64(info.st_dev), inode: UInt64(info.st_ino))
            if info.st_nlink > 1 {
                if let first = links[identity] {
                    try writer.appendHeader(
                        TarEntry(name: archiveName, kind: .hardLink, linkTarget: first, mode: mode, mtime: mtime))
                    return
                }
                links[identity] = archiveName
            }
            let fd = openat(parent, leaf.cString, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC)
            guard fd >= 0 else { throw ArchiveError.host("read", display, errno: errno) }
            defer { close(fd) }
            var opened = stat()
            guard fstat(fd, &opened) == 0, opened.st_mode & S_IFMT == S_IFREG, opened.st_ino == info.st_ino else {
                throw ArchiveError(.hostIO, "\(display) changed while it was copied; copy again")
            }
            let size = Int64(opened.st_size)
            try writer.appendHeader(TarEntry(name: archiveName, kind: .file, mode: mode, size: size, mtime: mtime))
            var left = size
            while left > 0 {
                try cancel.check()
                let count = read(fd, block.baseAddress, Int(min(Int64(block.count), left)))
                if count < 0 {
                    if errno == EINTR { continue }
                    throw ArchiveError.host("read", display, errno: errno)
                }
                if count == 0 {
                    throw ArchiveError(.hostIO, "\(display) shrank while it was copied; copy again")
                }
                try writer.appendData(UnsafeRawBufferPointer(rebasing: block[0..<count]))
                left -= Int64(count)
            }
            try writer.endData(size: size)
        default:
            let kind =
                switch info.st_mode & S_IFMT {
                case S_IFIFO: "a fifo"
                case S_IFSOCK: "a socket"
                case S_IFCHR: "a character device"
                default: "a block device"
                }
            warnings.append("skipped \(display): \(kind) (device nodes, fifos and sockets are not copied)")
        }
    }

    /// The names in the directory open on `fd`, sorted (the stream is the same every time).
    static func names(_ fd: Int32, display: String) throws -> [[UInt8]] {
        let copy = dup(fd)
        guard copy >= 0, let stream = fdopendir(copy) else {
            if copy >= 0 { close(copy) }
            throw ArchiveError.host("read", display, errno: errno)
        }
        defer { closedir(stream) }
        var names: [[UInt8]] = []
        while let entry = readdir(stream) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in Array(raw.prefix { $0 != 0 }) }
            if name != [46] && name != [46, 46] { names.append(name) }
        }
        return names.sorted { $0.lexicographicallyPrecedes($1) }
    }
}
