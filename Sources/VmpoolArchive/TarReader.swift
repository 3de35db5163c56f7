/// Bounds on what an untrusted archive can make the reader and extractor do. The defaults fit any
/// copy a person asks for and stop a hostile or broken stream before it costs much.
public struct ArchiveLimits: Sendable {
    /// Entries (files, directories, links); extended headers are not counted. Default 1,000,000.
    public var maxEntries = 1_000_000
    /// Bytes of the whole stream, headers and padding included. Default 64 GiB.
    public var maxBytes: Int64 = 64 << 30
    /// A name's or a link target's length, long-name records included. Default 4096 (PATH_MAX).
    public var maxNameBytes = 4096
    /// Components of one name (each open directory costs a descriptor). Default 256.
    public var maxDepth = 256
    /// One pax extended header's size. Default 64 KiB.
    public var maxExtendedHeaderBytes = 64 << 10
    /// Extended headers and long-name records in front of one entry. Default 8.
    public var maxHeadersPerEntry = 8
    /// Bytes after the end-of-archive marker (GNU tar pads to 10 KiB records). Default 1 MiB.
    public var maxTrailingBytes: Int64 = 1 << 20

    public init() {}
}

/// One entry of a tar stream, after GNU long-name records and pax headers are applied.
public struct TarEntry: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        case file, directory, symlink, hardLink, characterDevice, blockDevice, fifo
    }

    /// The name as sent, bytes (not necessarily UTF-8).
    public var name: [UInt8]
    public var kind: Kind
    /// A symlink's target or a hard link's entry name.
    public var linkTarget: [UInt8]
    public var mode: UInt32
    /// Data bytes that follow the header (regular files).
    public var size: Int64
    public var mtime: Int64
    /// Numeric owner and group (a copy ignores them; a root file system keeps them).
    public var uid: UInt32
    public var gid: UInt32
    /// A device node's numbers.
    public var deviceMajor: UInt32
    public var deviceMinor: UInt32

    public init(
        name: [UInt8], kind: Kind, linkTarget: [UInt8] = [], mode: UInt32 = 0o644, size: Int64 = 0, mtime: Int64 = 0,
        uid: UInt32 = 0, gid: UInt32 = 0, deviceMajor: UInt32 = 0, deviceMinor: UInt32 = 0
    ) {
        self.name = name
        self.kind = kind
        self.linkTarget = linkTarget
        self.mode = mode
        self.size = size
        self.mtime = mtime
        self.uid = uid
        self.gid = gid
        self.deviceMajor = deviceMajor
        self.deviceMinor = deviceMinor
    }

    /// The name for messages.
    public var displayName: String { printable(name) }
}

/// Reads a tar stream (ustar, GNU and pax, as GNU tar and busybox tar write them) from a source it
/// does not trust: every header is checked (checksum, numbers, sizes) and every length is bounded
/// by `ArchiveLimits` before anything is allocated or read for it.
public final class TarReader {
    /// Fills the buffer it is given with the stream's next bytes; 0 at the stream's end.
    public typealias Source = (UnsafeMutableRawBufferPointer) throws -> Int

    public let limits: ArchiveLimits
    private let source: Source
    private let buffer: UnsafeMutableRawBufferPointer
    private var low = 0
    private var high = 0
    private var atEnd = false
    private var finished = false
    private var entries = 0
    /// Bytes of the current entry's data not yet read, and the padding after them.
    private var remaining: Int64 = 0
    private var padding = 0
    private var current: TarEntry?
    /// Bytes taken from the stream so far: headers, data, padding.
    public private(set) var consumed: Int64 = 0

    public init(limits: ArchiveLimits = ArchiveLimits(), bufferSize: Int = 1 << 20, source: @escaping Source) {
        self.limits = limits
        self.source = source
        buffer = .allocate(byteCount: max(bufferSize, 4096), alignment: 16)
    }

    /// A reader of `fd` (a pipe or a file) that stops within 100 ms of `cancel`.
    public convenience init(fd: Int32, limits: ArchiveLimits = ArchiveLimits(), cancel: CancelFlag = CancelFlag()) {
        self.init(limits: limits) { buffer in try readSome(fd, into: buffer, cancel: cancel) }
    }

    deinit { buffer.deallocate() }

    /// The next entry, or nil after the end-of-archive marker (the rest of the stream is then
    /// read and dropped, up to `maxTrailingBytes`). Data the caller did not read is skipped.
    public func next() throws -> TarEntry? {
        if finished { return nil }
        try skipRest()
        var longName: [UInt8]?
        var longLink: [UInt8]?
        var pax = PaxRecords()
        var headers = 0
        while true {
            let offset = consumed
            guard try ensure(512) else {
                throw ArchiveError(
                    .truncated,
                    high == low
                        ? "the archive ended without its end marker (the sender stopped early)"
                        : "the archive ended inside a header")
            }
            let header = UnsafeRawBufferPointer(rebasing: buffer[low..<low + 512])
            if header.allSatisfy({ $0 == 0 }) {
                take(512)
                try drain()
                finished = true
                return nil
            }
            let fields = try HeaderFields(header, offset: offset)
            take(512)
            headers += 1
            if headers > limits.maxHeadersPerEntry + 1 {
                throw ArchiveError(
                    .limit, "more than \(limits.maxHeadersPerEntry) extended headers in a row at byte \(offset)")
            }
            switch fields.type {
            case UInt8(ascii: "L"), UInt8(ascii: "K"):
                guard fields.size <= limits.maxNameBytes + 1 else {
                    throw ArchiveError(
                        .limit,
                        "a GNU long name of \(fields.size) bytes at byte \(offset), more than \(limits.maxNameBytes)")
                }
                try reserve(fields.size, for: fields.name)
                var value = try readSmall(Int(fields.size))
                while value.last == 0 { value.removeLast() }
                if fields.type == UInt8(ascii: "L") { longName = value } else { longLink = value }
                continue
            case UInt8(ascii: "x"), UInt8(ascii: "g"):
                guard fields.size <= limits.maxExtendedHeaderBytes else {
                    throw ArchiveError(
                        .limit,
                        "a pax extended header of \(fields.size) bytes at byte \(offset), more than "
                            + "\(limits.maxExtendedHeaderBytes)")
                }
                try reserve(fields.size, for: fields.name)
                let records = try PaxRecords(try readSmall(Int(fields.size)), limits: limits, offset: offset)
                // A global header applies to every later entry; vmpool takes nothing from one.
                if fields.type == UInt8(ascii: "x") { pax.merge(records) }
                continue
            case UInt8(ascii: "V"):
                try reserve(fields.size, for: fields.name)
                remaining = fields.size
                padding = Int((512 - fields.size % 512) % 512)
                try skipRest()
                continue
            default: break
            }
            let size = pax.size ?? fields.size
            var name = pax.path ?? longName ?? fields.name
            let target = pax.linkPath ?? longLink ?? fields.linkName
            guard name.count <= limits.maxNameBytes, target.count <= limits.maxNameBytes else {
                throw ArchiveError(.limit, "a name longer than \(limits.maxNameBytes) bytes at byte \(offset)")
            }
            guard !name.isEmpty else { throw ArchiveError(.malformed, "an entry without a name at byte \(offset)") }
            let kind: TarEntry.Kind
            switch fields.type {
            case 0, UInt8(ascii: "0"), UInt8(ascii: "7"):
                // Old archives mark a directory by the name's trailing slash alone.
                kind = name.last == UInt8(ascii: "/") ? .directory : .file
            case UInt8(ascii: "1"): kind = .hardLink
            case UInt8(ascii: "2"): kind = .symlink
            case UInt8(ascii: "3"): kind = .characterDevice
            case UInt8(ascii: "4"): kind = .blockDevice
            case UInt8(ascii: "5"): kind = .directory
            case UInt8(ascii: "6"): kind = .fifo
            default:
                let letter =
                    fields.type >= 0x21 && fields.type < 0x7f ? "'\(UnicodeScalar(fields.type))'" : "\(fields.type)"
                throw ArchiveError(
                    .unsupported,
                    "entry \"\(printable(name))\" has type \(letter) (sparse, multi-volume or unknown), which is not copied"
                )
            }
            if kind == .directory { while name.count > 1 && name.last == UInt8(ascii: "/") { name.removeLast() } }
            entries += 1
            guard entries <= limits.maxEntries else {
                throw ArchiveError(.limit, "more than \(limits.maxEntries) entries in the archive")
            }
            try reserve(size, for: name)
            let entry = TarEntry(
                name: name, kind: kind, linkTarget: target, mode: fields.mode & 0o7777, size: size,
                mtime: pax.mtime ?? fields.mtime, uid: pax.uid ?? fields.uid, gid: pax.gid ?? fields.gid,
                deviceMajor: fields.deviceMajor, deviceMinor: fields.deviceMinor)
            remaining = size
            padding = Int((512 - size % 512) % 512)
            current = entry
            return entry
        }
    }

    /// Hands the current entry's data to `body` in pieces, as they arrive.
    public func readData(_ body: (UnsafeRawBufferPointer) throws -> Void) throws {
        while remaining > 0 {
            if low == high {
                low = 0
                high = 0
                guard try fill() else { throw truncatedData() }
            }
            let count = Int(min(Int64(high - low), remaining))
            try body(UnsafeRawBufferPointer(rebasing: buffer[low..<low + count]))
            take(count)
            remaining -= Int64(count)
        }
        try skipPadding()
    }

    /// Skips what is left of the current entry's data and padding.
    private func skipRest() throws {
        while remaining > 0 {
            if low == high {
                low = 0
                high = 0
                guard try fill() else { throw truncatedData() }
            }
            let count = Int(min(Int64(high - low), remaining))
            take(count)
            remaining -= Int64(count)
        }
        try skipPadding()
    }

    private func skipPadding() throws {
        guard padding > 0 else { return }
        guard try ensure(padding) else { throw truncatedData() }
        take(padding)
        padding = 0
    }

    private func truncatedData() -> ArchiveError {
        ArchiveError(
            .truncated,
            "the archive ended inside the data of \"\(current?.displayName ?? "")\" (the sender stopped early)")
    }

    /// Reads a small entry body (a long name, a pax header) whose size was already bounded.
    private func readSmall(_ size: Int) throws -> [UInt8] {
        remaining = Int64(size)
        padding = (512 - size % 512) % 512
        var bytes: [UInt8] = []
        bytes.reserveCapacity(size)
        try readData { bytes.append(contentsOf: $0) }
        return bytes
    }

    /// Checks that `size` more bytes (and their padding) keep the stream within `maxBytes`.
    private func reserve(_ size: Int64, for name: [UInt8]) throws {
        let padded = size > Int64.max - 1024 ? Int64.max : (size + 511) / 512 * 512
        guard padded <= limits.maxBytes - consumed else {
            throw ArchiveError(
                .limit,
                "entry \"\(printable(name))\" declares \(size) bytes; the copy is limited to \(limits.maxBytes) bytes")
        }
    }

    /// Reads and drops what follows the end-of-archive marker, up to `maxTrailingBytes`.
    private func drain() throws {
        var trailing = Int64(high - low)
        while true {
            guard trailing <= limits.maxTrailingBytes else {
                throw ArchiveError(
                    .limit, "more than \(limits.maxTrailingBytes) bytes follow the archive's end marker")
            }
            low = 0
            high = 0
            guard try fill() else { return }
            trailing += Int64(high)
        }
    }

    private func take(_ count: Int) {
        low += count
        consumed += Int64(count)
    }

    /// Makes `count` bytes available at `low` (count <= the buffer); false if the stream ends first.
    private func ensure(_ count: Int) throws -> Bool {
        while high - low < count {
            if atEnd { return false }
            if buffer.count - low < count {
                buffer.baseAddress!.copyMemory(from: buffer.baseAddress! + low, byteCount: high - low)
                high -= low
                low = 0
            }
            guard try fill() else { return false }
        }
        return true
    }

    /// One read into the free end of the buffer; false at the stream's end.
    private func fill() throws -> Bool {
        if atEnd { return false }
        if high == buffer.count {
            buffer.baseAddress!.copyMemory(from: buffer.baseAddress! + low, byteCount: high - low)
            high -= low
            low = 0
        }
        let count = try source(UnsafeMutableRawBufferPointer(rebasing: buffer[high...]))
        if count <= 0 {
            atEnd = true
            return false
        }
        high += count
        return true
    }
}

/// The fields of one 512-byte header, checked: checksum, numeric fields, names.
struct HeaderFields {
    let name: [UInt8]
    let linkName: [UInt8]
    let type: UInt8
    let mode: UInt32
    let size: Int64
    let mtime: Int64
    let uid: UInt32
    let gid: UInt32
    let deviceMajor: UInt32
    let deviceMinor: UInt32

    init(_ header: UnsafeRawBufferPointer, offset: Int64) throws {
        let stored = try Self.number(header, 148, 8, "checksum", offset: offset)
        var unsigned: Int64 = 0
        var signed: Int64 = 0
        for (index, byte) in header.enumerated() {
            let value = (148..<156).contains(index) ? UInt8(ascii: " ") : byte
            unsigned += Int64(value)
            signed += Int64(Int8(bitPattern: value))
        }
        guard stored == unsigned || stored == signed else {
            throw ArchiveError(
                .malformed, "a header with a wrong checksum at byte \(offset) (not a tar stream, or a damaged one)")
        }
        type = header[156]
        let mode = try Self.number(header, 100, 8, "mode", offset: offset)
        self.mode = UInt32(truncatingIfNeeded: mode)
        size = try Self.number(header, 124, 12, "size", offset: offset)
        mtime = (try? Self.number(header, 136, 12, "mtime", offset: offset)) ?? 0
        // Owners and device numbers matter only to a root file system; a bad one reads as 0.
        func small(_ start: Int, _ length: Int) -> UInt32 {
            let value = (try? Self.number(header, start, length, "id", offset: offset)) ?? 0
            return value <= Int64(UInt32.max) ? UInt32(value) : 0
        }
        uid = small(108, 8)
        gid = small(116, 8)
        deviceMajor = small(329, 8)
        deviceMinor = small(337, 8)
        var name = Self.text(header, 0, 100)
        // POSIX ustar keeps a name's leading part in the prefix field; GNU tar's magic
        // ("ustar  ") uses that space for other things.
        if header[257..<263].elementsEqual("ustar\0".utf8) {
            let prefix = Self.text(header, 345, 155)
            if !prefix.isEmpty { name = prefix + [UInt8(ascii: "/")] + name }
        }
        self.name = name
        linkName = Self.text(header, 157, 100)
    }

    /// A NUL-terminated text field.
    static func text(_ header: UnsafeRawBufferPointer, _ start: Int, _ length: Int) -> [UInt8] {
        let field = header[start..<start + length]
        return Array(field.prefix { $0 != 0 })
    }

    /// An octal field (leading spaces, then digits, ended by a space or NUL) or a GNU base-256
    /// one (first byte 0x80); negative or larger than Int64 is an error.
    static func number(_ header: UnsafeRawBufferPointer, _ start: Int, _ length: Int, _ what: String, offset: Int64)
        throws -> Int64
    {
        let field = header[start..<start + length]
        func bad() -> ArchiveError {
            ArchiveError(.malformed, "a header with an invalid \(what) field at byte \(offset)")
        }
        if field.first! & 0x80 != 0 {
            guard field.first! == 0x80 else { throw bad() }
            var value: Int64 = 0
            for byte in field.dropFirst() {
                guard value <= Int64.max >> 8 else { throw bad() }
                value = value << 8 | Int64(byte)
            }
            return value
        }
        var value: Int64 = 0
        var index = field.startIndex
        while index < field.endIndex, field[index] == UInt8(ascii: " ") { index += 1 }
        while index < field.endIndex, (UInt8(ascii: "0")...UInt8(ascii: "7")).contains(field[index]) {
            guard value <= Int64.max >> 3 else { throw bad() }
            value = value << 3 | Int64(field[index] - UInt8(ascii: "0"))
            index += 1
        }
        while index < field.endIndex {
            guard field[index] == 0 || field[index] == UInt8(ascii: " ") else { throw bad() }
            index += 1
        }
        return value
    }
}

/// The pax extended header records vmpool uses: `path`, `linkpath`, `size`, `mtime`, `uid`, `gid`. Every
/// record's length is checked against the header it is in; sparse files are refused.
struct PaxRecords {
    var path: [UInt8]?
    var linkPath: [UInt8]?
    var size: Int64?
    var mtime: Int64?
    var uid: UInt32?
    var gid: UInt32?

    init() {}

    init(_ data: [UInt8], limits: ArchiveLimits, offset: Int64) throws {
        func bad(_ why: String) -> ArchiveError {
            ArchiveError(.malformed, "a pax extended header at byte \(offset) \(why)")
        }
        var index = 0
        while index < data.count {
            // "LENGTH KEY=VALUE\n", LENGTH counting the whole record.
            var length = 0
            var cursor = index
            while cursor < data.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(data[cursor]) {
                length = length * 10 + Int(data[cursor] - UInt8(ascii: "0"))
                guard length <= data.count - index else {
                    throw bad("has a record longer than the header (\(length)+ bytes)")
                }
                cursor += 1
            }
            if cursor == index, data[index...].allSatisfy({ $0 == 0 }) { break }
            guard cursor > index, cursor < data.count, data[cursor] == UInt8(ascii: " "), length > cursor - index + 2
            else { throw bad("has a record without a valid length") }
            let record = data[(cursor + 1)..<(index + length)]
            guard record.last == UInt8(ascii: "\n"), let equals = record.firstIndex(of: UInt8(ascii: "=")) else {
                throw bad("has a record that is not KEY=VALUE")
            }
            let key = String(decoding: record[record.startIndex..<equals], as: UTF8.self)
            let value = Array(record[(equals + 1)..<(record.endIndex - 1)])
            switch key {
            case "path", "linkpath":
                guard !value.contains(0) else { throw bad("has a \(key) with a NUL byte") }
                guard value.count <= limits.maxNameBytes else {
                    throw ArchiveError(
                        .limit,
                        "a pax \(key) of \(value.count) bytes at byte \(offset), more than \(limits.maxNameBytes)")
                }
                if key == "path" { path = value } else { linkPath = value }
            case "size":
                guard !value.isEmpty, value.count <= 19, value.allSatisfy({ (48...57).contains($0) }),
                    let number = Int64(String(decoding: value, as: UTF8.self))
                else { throw bad("has an invalid size") }
                size = number
            case "uid", "gid":
                guard !value.isEmpty, value.count <= 10, value.allSatisfy({ (48...57).contains($0) }),
                    let number = UInt32(String(decoding: value, as: UTF8.self))
                else { throw bad("has an invalid \(key)") }
                if key == "uid" { uid = number } else { gid = number }
            case "mtime":
                let text = String(decoding: value, as: UTF8.self)
                mtime = Int64(text.split(separator: ".", maxSplits: 1).first ?? "") ?? 0
            default:
                if key.hasPrefix("GNU.sparse.") {
                    throw ArchiveError(.unsupported, "a sparse file at byte \(offset), which is not copied")
                }
            }
            index += length
        }
    }

    mutating func merge(_ other: PaxRecords) {
        if let value = other.path { path = value }
        if let value = other.linkPath { linkPath = value }
        if let value = other.size { size = value }
        if let value = other.mtime { mtime = value }
        if let value = other.uid { uid = value }
        if let value = other.gid { gid = value }
    }
}
