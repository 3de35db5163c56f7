/// The address family of an IP network.
public enum IPFamily: String, Codable, Sendable, Hashable, CaseIterable {
    case ipv4
    case ipv6

    /// Bits of an address: the largest prefix.
    public var bits: Int { self == .ipv4 ? 32 : 128 }
}

/// An IP network in CIDR form, IPv4 or IPv6: the one parser behind bridge subnets and egress
/// rules, so that both accept the same spellings and report host bits the same way.
public struct IPNetwork: Codable, Sendable, Hashable, CustomStringConvertible {
    public let family: IPFamily
    /// The network address in network byte order (4 or 16 bytes), no bit set past `prefix`.
    public let address: [UInt8]
    public let prefix: Int

    /// Why a text is not an IP network.
    public enum Problem: Error, Sendable, Hashable {
        /// Not `ADDRESS/PREFIX` with a valid address and a prefix the family allows.
        case malformed
        /// Address and prefix are valid but bits past the prefix are set; `network` is what
        /// clearing them gives, to suggest.
        case hostBitsSet(network: IPNetwork)
    }

    /// A network from its parts; `nil` when the byte count does not fit the family, the prefix
    /// is out of range or bits past the prefix are set.
    public init?(family: IPFamily, address: [UInt8], prefix: Int) {
        guard address.count == family.bits / 8, (0...family.bits).contains(prefix),
            Self.clearHostBits(address, prefix: prefix) == address
        else { return nil }
        self.family = family
        self.address = address
        self.prefix = prefix
    }

    /// Parses `a.b.c.d/p` (p 0 to 32) or an IPv6 address in hex groups with `/p` (p 0 to 128).
    ///
    /// IPv4 octets and prefixes are decimal without leading zeros; IPv6 groups are 1 to 4 hex
    /// digits of either case with at most one `::`; no zone, no dotted IPv4 tail.
    public static func parse<S: StringProtocol>(_ text: S) -> Result<IPNetwork, Problem> {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        guard parts.count == 2 else { return .failure(.malformed) }
        let family: IPFamily
        let bytes: [UInt8]
        if let v4 = IPv4Subnet.parseAddress(parts[0]) {
            family = .ipv4
            bytes = [UInt8(v4 >> 24), UInt8(v4 >> 16 & 0xFF), UInt8(v4 >> 8 & 0xFF), UInt8(v4 & 0xFF)]
        } else if let v6 = parseIPv6(parts[0]) {
            family = .ipv6
            bytes = v6
        } else {
            return .failure(.malformed)
        }
        guard let prefix = decimal(parts[1], maxDigits: 3), prefix <= family.bits else { return .failure(.malformed) }
        let network = clearHostBits(bytes, prefix: prefix)
        guard let result = IPNetwork(family: family, address: network, prefix: prefix) else {
            return .failure(.malformed)
        }
        return network == bytes ? .success(result) : .failure(.hostBitsSet(network: result))
    }

    /// Canonical text: dotted IPv4, IPv6 as RFC 5952 writes it (lowercase, the longest run of
    /// zero groups as `::`), then `/prefix`.
    public var description: String {
        let text =
            family == .ipv4
            ? address.map(String.init).joined(separator: ".") : Self.formatIPv6(address)
        return "\(text)/\(prefix)"
    }

    /// Whether `other` lies within this network (same family).
    public func contains(_ other: IPNetwork) -> Bool {
        family == other.family && other.prefix >= prefix
            && Self.clearHostBits(other.address, prefix: prefix) == address
    }

    /// Stored as its canonical text.
    public init(from decoder: Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard case .success(let network) = Self.parse(text) else {
            throw DecodingError.dataCorrupted(
                DecodingError.Context(codingPath: decoder.codingPath, debugDescription: "not an IP network: \(text)"))
        }
        self = network
    }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }

    // MARK: - Text

    /// A decimal number of 1 to `maxDigits` digits without leading zeros (`0` itself allowed).
    static func decimal<S: StringProtocol>(_ text: S, maxDigits: Int) -> Int? {
        guard (1...maxDigits).contains(text.utf8.count), text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
            text.utf8.count == 1 || text.utf8.first != 0x30
        else { return nil }
        return Int(text)
    }

    /// The 16 bytes of an IPv6 address in hex groups, with at most one `::`.
    public static func parseIPv6<S: StringProtocol>(_ text: S) -> [UInt8]? {
        let utf8 = Array(text.utf8)
        guard utf8.count >= 2, utf8.count <= 39 else { return nil }
        var head: ArraySlice<UInt8> = utf8[...]
        var tail: ArraySlice<UInt8>?
        if let gap = (0..<(utf8.count - 1)).first(where: { utf8[$0] == 0x3A && utf8[$0 + 1] == 0x3A }) {
            head = utf8[..<gap]
            tail = utf8[(gap + 2)...]
        }
        func groups(_ part: ArraySlice<UInt8>) -> [UInt16]? {
            if part.isEmpty { return [] }
            var result: [UInt16] = []
            for group in part.split(separator: 0x3A, omittingEmptySubsequences: false) {
                guard (1...4).contains(group.count) else { return nil }
                var value: UInt16 = 0
                for byte in group {
                    guard let digit = hexDigit(byte) else { return nil }
                    value = value << 4 | UInt16(digit)
                }
                result.append(value)
            }
            return result
        }
        guard let left = groups(head) else { return nil }
        var all = left
        if let tail {
            guard let right = groups(tail), left.count + right.count <= 7 else { return nil }
            all += Array(repeating: 0, count: 8 - left.count - right.count) + right
        }
        guard all.count == 8 else { return nil }
        return all.flatMap { [UInt8($0 >> 8), UInt8($0 & 0xFF)] }
    }

    private static func hexDigit(_ byte: UInt8) -> UInt8? {
        switch byte {
        case 0x30...0x39: byte - 0x30
        case 0x61...0x66: byte - 0x61 + 10
        case 0x41...0x46: byte - 0x41 + 10
        default: nil
        }
    }

    /// RFC 5952: lowercase hex without leading zeros, the longest run of two or more zero
    /// groups (the first of equal runs) written `::`.
    public static func formatIPv6(_ bytes: [UInt8]) -> String {
        let groups = stride(from: 0, to: 16, by: 2).map { UInt16(bytes[$0]) << 8 | UInt16(bytes[$0 + 1]) }
        var best: Range<Int>?
        var index = 0
        while index < 8 {
            guard groups[index] == 0 else {
                index += 1
                continue
            }
            var end = index
            while end < 8, groups[end] == 0 { end += 1 }
            if end - index >= 2, end - index > (best?.count ?? 0) { best = index..<end }
            index = end
        }
        func hex(_ part: ArraySlice<UInt16>) -> String {
            part.map { String($0, radix: 16) }.joined(separator: ":")
        }
        guard let best else { return hex(groups[...]) }
        return hex(groups[..<best.lowerBound]) + "::" + hex(groups[best.upperBound...])
    }

    static func clearHostBits(_ bytes: [UInt8], prefix: Int) -> [UInt8] {
        bytes.enumerated().map { index, byte in
            let kept = min(8, max(0, prefix - index * 8))
            return kept == 8 ? byte : byte & ~(UInt8.max >> kept)
        }
    }
}
