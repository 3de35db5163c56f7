import Crypto
import Foundation
import VmpoolArchive

/// The files of an image as it was handed over: the members of an archive (indexed once, then
/// read by byte range, never unpacked on the host) or the files of a layout directory. Names
/// come from the image's own JSON and are only ever looked up, never used to write anything.
final class ImageFiles {
    private let fd: Int32
    private let directory: Bool
    /// Archive members: name -> (data offset, size); links resolved to their targets' names.
    private var members: [String: (offset: Int64, size: Int64)] = [:]
    let display: String

    /// Members of an archive's own listing, at most (the layout's files, not the image's).
    static let maxMembers = 100_000

    init(archive path: String) throws {
        display = path
        fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw OCIError("cannot open \(path): \(String(cString: strerror(errno)))") }
        directory = false
        try index()
    }

    init(directory path: String) throws {
        display = path
        fd = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else {
            throw OCIError("cannot open the image layout directory \(path): \(String(cString: strerror(errno)))")
        }
        directory = true
    }

    deinit { close(fd) }

    /// Reads the archive's headers once: where each member's data is.
    private func index() throws {
        let file = fd
        var position: Int64 = 0
        var limits = ArchiveLimits()
        limits.maxEntries = Self.maxMembers
        limits.maxBytes = Int64.max / 2
        let reader = TarReader(limits: limits) { buffer in
            let count = pread(file, buffer.baseAddress, buffer.count, off_t(position))
            guard count >= 0 else { throw OCIError("cannot read \(self.display): \(String(cString: strerror(errno)))") }
            position += Int64(count)
            return count
        }
        var links: [(String, String)] = []
        do {
            while let entry = try reader.next() {
                let name = Self.normalize(String(decoding: entry.name, as: UTF8.self))
                switch entry.kind {
                case .file: members[name] = (reader.consumed, entry.size)
                case .hardLink: links.append((name, Self.normalize(String(decoding: entry.linkTarget, as: UTF8.self))))
                case .symlink:
                    // docker save links a layer it already wrote: `../ID/layer.tar`.
                    let base = name.split(separator: "/").dropLast().map(String.init)
                    let target = String(decoding: entry.linkTarget, as: UTF8.self)
                    links.append((name, Self.normalize((base + [target]).joined(separator: "/"))))
                default: break
                }
            }
        } catch let error as OCIError {
            throw error
        } catch {
            throw OCIError("\(display) is not a readable image archive (a tar file): \(error)")
        }
        for (name, target) in links { if let member = members[target] { members[name] = member } }
    }

    /// `./a/../b//c` -> `b/c`.
    static func normalize(_ name: String) -> String {
        var parts: [Substring] = []
        for part in name.split(separator: "/") {
            if part == "." { continue }
            if part == ".." {
                _ = parts.popLast()
                continue
            }
            parts.append(part)
        }
        return parts.joined(separator: "/")
    }

    /// Whether the image has the file `name`.
    func has(_ name: String) -> Bool {
        if directory {
            var info = stat()
            return fstatat(fd, name, &info, 0) == 0 && info.st_mode & S_IFMT == S_IFREG
        }
        return members[Self.normalize(name)] != nil
    }

    /// A reader of the file `name`, hashing what it reads.
    func open(_ name: String) throws -> BlobReader {
        if directory {
            let file = openat(fd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
            guard file >= 0 else {
                throw OCIError("\(display) has no readable \(name): \(String(cString: strerror(errno)))")
            }
            var info = stat()
            fstat(file, &info)
            guard info.st_mode & S_IFMT == S_IFREG else {
                close(file)
                throw OCIError("\(display)/\(name) is not a regular file")
            }
            return BlobReader(fd: file, owned: true, offset: 0, size: Int64(info.st_size), name: name)
        }
        guard let member = members[Self.normalize(name)] else { throw OCIError("\(display) has no \(name)") }
        return BlobReader(fd: fd, owned: false, offset: member.offset, size: member.size, name: name)
    }

    /// A small file (JSON) whole; refused past `limit` bytes.
    func read(_ name: String, limit: Int = 4 << 20) throws -> (data: Data, digest: String) {
        let reader = try open(name)
        guard reader.size <= limit else {
            throw OCIError("\(name) in \(display) is \(reader.size) bytes; more than \(limit) is not taken")
        }
        var data = Data(count: Int(reader.size))
        let count = try data.withUnsafeMutableBytes { buffer in try reader.readFully(buffer) }
        guard count == Int(reader.size) else { throw OCIError("\(name) in \(display) is cut short") }
        return (data, reader.digest)
    }
}

/// One file of an image read in order, its SHA-256 taken on the way.
final class BlobReader {
    let fd: Int32
    let owned: Bool
    let size: Int64
    let name: String
    private var offset: Int64
    private var remaining: Int64
    private var hasher = SHA256()

    init(fd: Int32, owned: Bool, offset: Int64, size: Int64, name: String) {
        self.fd = fd
        self.owned = owned
        self.offset = offset
        self.size = size
        self.name = name
        remaining = size
    }

    deinit { if owned { close(fd) } }

    /// The first bytes, without consuming them (for the compression's magic number).
    func peek(_ count: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let got = pread(fd, &bytes, min(count, Int(remaining)), off_t(offset))
        return Array(bytes.prefix(max(got, 0)))
    }

    /// Fills `buffer` with the next bytes; 0 at the end.
    func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let want = Int(min(Int64(buffer.count), remaining))
        guard want > 0 else { return 0 }
        while true {
            let count = pread(fd, buffer.baseAddress, want, off_t(offset))
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else {
                throw OCIError(
                    "\(name) ends early: \(count < 0 ? String(cString: strerror(errno)) : "the file is shorter than its entry")"
                )
            }
            hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: buffer[0..<count]))
            offset += Int64(count)
            remaining -= Int64(count)
            return count
        }
    }

    func readFully(_ buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        var total = 0
        while total < buffer.count {
            let count = try read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[total...]))
            if count == 0 { break }
            total += count
        }
        return total
    }

    /// Reads what is left (so that the digest covers the whole file).
    func drain() throws {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
        defer { buffer.deallocate() }
        while try read(into: buffer) > 0 {}
    }

    /// `sha256:HEX` of what was read so far.
    var digest: String { "sha256:" + hex(hasher.finalize()) }
}

func hex(_ digest: some Sequence<UInt8>) -> String {
    digest.map { String(format: "%02x", $0) }.joined()
}
