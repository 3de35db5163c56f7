import Foundation

/// Builds tar streams byte by byte for tests, hostile ones included: any name, type, mode or
/// declared size, GNU long-name and pax records of any length, a wrong checksum. It shares no
/// code with the archive module it tests, so a mistake there cannot hide here.
public struct TarBuilder {
    public private(set) var bytes: [UInt8] = []

    public init() {}

    /// One header block. `size` is what the header declares; `data` (padded) follows it.
    public mutating func entry(
        _ name: String, type: Character = "0", mode: Int = 0o644, size: Int? = nil, data: [UInt8] = [],
        link: String = "", magic: String = "ustar\u{0}00", prefix: String = "", breakChecksum: Bool = false,
        sizeField: [UInt8]? = nil
    ) {
        bytes += Self.header(
            name: Array(name.utf8), type: type, mode: mode, size: size ?? data.count, link: Array(link.utf8),
            magic: magic, prefix: prefix, breakChecksum: breakChecksum, sizeField: sizeField)
        append(data)
    }

    /// A GNU long-name ('L') or long-link ('K') record declaring `declared` bytes (default: the
    /// name's length plus its NUL).
    public mutating func longName(_ name: [UInt8], type: Character = "L", declared: Int? = nil) {
        let data = name + [0]
        bytes += Self.header(
            name: Array("././@LongLink".utf8), type: type, mode: 0o644, size: declared ?? data.count, link: [],
            magic: "ustar  \u{0}", prefix: "", breakChecksum: false, sizeField: nil)
        append(data)
    }

    /// A pax extended header ('x') with `records` as KEY=VALUE, each with its correct length.
    public mutating func pax(_ records: [(String, String)]) {
        var data: [UInt8] = []
        for (key, value) in records {
            let body = " \(key)=\(value)\n"
            var length = body.utf8.count + 1
            while "\(length)".count + body.utf8.count != length { length += 1 }
            data += Array("\(length)\(body)".utf8)
        }
        paxRaw(data)
    }

    /// A pax extended header with `data` as it is.
    public mutating func paxRaw(_ data: [UInt8], declared: Int? = nil) {
        bytes += Self.header(
            name: Array("PaxHeaders/x".utf8), type: "x", mode: 0o644, size: declared ?? data.count, link: [],
            magic: "ustar\u{0}00", prefix: "", breakChecksum: false, sizeField: nil)
        append(data)
    }

    /// The end-of-archive marker.
    public mutating func end() { bytes += [UInt8](repeating: 0, count: 1024) }

    /// `data` padded to a whole block.
    public mutating func append(_ data: [UInt8]) {
        bytes += data
        bytes += [UInt8](repeating: 0, count: (512 - data.count % 512) % 512)
    }

    public static func header(
        name: [UInt8], type: Character, mode: Int, size: Int, link: [UInt8], magic: String, prefix: String,
        breakChecksum: Bool, sizeField: [UInt8]?
    ) -> [UInt8] {
        var block = [UInt8](repeating: 0, count: 512)
        func put(_ value: [UInt8], _ offset: Int, _ length: Int) {
            for (index, byte) in value.prefix(length).enumerated() { block[offset + index] = byte }
        }
        func octal(_ value: Int, _ offset: Int, _ length: Int) {
            let digits = String(value, radix: 8)
            put(
                Array((String(repeating: "0", count: max(0, length - 1 - digits.count)) + digits).utf8), offset,
                length - 1)
        }
        put(name, 0, 100)
        octal(mode, 100, 8)
        octal(0, 108, 8)
        octal(0, 116, 8)
        if let sizeField { put(sizeField, 124, 12) } else { octal(size, 124, 12) }
        octal(1_700_000_000, 136, 12)
        block[156] = type.asciiValue!
        put(link, 157, 100)
        put(Array(magic.utf8), 257, 8)
        put(Array(prefix.utf8), 345, 155)
        put(Array("        ".utf8), 148, 8)
        var sum = block.reduce(0) { $0 + Int($1) }
        if breakChecksum { sum += 1 }
        let digits = String(sum, radix: 8)
        put(Array((String(repeating: "0", count: 6 - digits.count) + digits).utf8) + [0, 32], 148, 8)
        return block
    }
}
