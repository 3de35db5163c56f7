/// Memory sizes as manifests write them: plain MiB integers, or `NMi` / `NGi` strings.
public enum MemoryQuantity {
    /// What a quantity looks like, for error messages.
    public static let expectation =
        "expected a memory size from 64Mi to 9999Gi: an integer number of MiB (256), or a string like 256Mi or 1Gi"

    /// Parses the string form. `nil` when it is not `^(6[4-9]|[7-9]\d|[1-9]\d{2,6})Mi$` or `^[1-9]\d{0,3}Gi$`.
    public static func parse(_ text: String) -> Int? {
        let utf8 = Array(text.utf8)
        guard utf8.count >= 3, utf8[utf8.count - 1] == UInt8(ascii: "i") else { return nil }
        let unit = utf8[utf8.count - 2]
        let digits = utf8[0..<(utf8.count - 2)]
        guard !digits.isEmpty, digits.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), digits.first != 0x30 else {
            return nil
        }
        switch unit {
        case UInt8(ascii: "M"):
            guard digits.count <= 7, let value = Int(String(decoding: digits, as: UTF8.self)),
                value >= SpecLimits.minMemoryMiB
            else { return nil }
            return value
        case UInt8(ascii: "G"):
            guard digits.count <= 4, let value = Int(String(decoding: digits, as: UTF8.self)) else { return nil }
            return value * 1024
        default:
            return nil
        }
    }

    /// The shortest exact form of a MiB count, for display (`1Gi`, `384Mi`).
    public static func format(_ mib: Int) -> String {
        mib % 1024 == 0 ? "\(mib / 1024)Gi" : "\(mib)Mi"
    }
}

/// Disk sizes as manifests write them: plain MiB integers, or `NMi` / `NGi` / `NTi` strings.
public enum DiskQuantity {
    /// MiB of `^[1-9][0-9]{0,7}Mi$`, `^[1-9][0-9]{0,4}Gi$` or `^[1-9][0-9]?Ti$`, within 1 MiB to 64 TiB.
    public static func parse(_ text: String) -> Int? {
        let utf8 = Array(text.utf8)
        guard utf8.count >= 3, utf8[utf8.count - 1] == UInt8(ascii: "i") else { return nil }
        let digits = utf8[0..<(utf8.count - 2)]
        guard !digits.isEmpty, digits.count <= 8, digits.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), digits.first != 0x30,
            let value = Int(String(decoding: digits, as: UTF8.self))
        else { return nil }
        let mib: Int
        switch utf8[utf8.count - 2] {
        case UInt8(ascii: "M"): mib = value
        case UInt8(ascii: "G"): mib = value * 1024
        case UInt8(ascii: "T"): mib = value * 1024 * 1024
        default: return nil
        }
        return mib <= SpecLimits.maxDiskMiB ? mib : nil
    }
}

/// An IPv4 network in CIDR form, as bridge mode assigns addresses from it.
public struct IPv4Subnet: Sendable, Hashable, CustomStringConvertible {
    /// The network address, host order.
    public var network: UInt32
    public var prefix: Int

    /// Parses `a.b.c.d/p` with p in 8...29 and no host bits set.
    public init?(_ text: String) {
        guard case .success(let subnet) = Self.parse(text) else { return nil }
        self = subnet
    }

    /// Parses `a.b.c.d/p` with p in 8...29, saying why not: malformed (another prefix, an
    /// IPv6 network), or host bits set (with the network address to suggest).
    public static func parse(_ text: String) -> Result<IPv4Subnet, IPNetwork.Problem> {
        switch IPNetwork.parse(text) {
        case .success(let network):
            guard let subnet = IPv4Subnet(network) else { return .failure(.malformed) }
            return .success(subnet)
        case .failure(.hostBitsSet(let network)):
            return IPv4Subnet(network) == nil ? .failure(.malformed) : .failure(.hostBitsSet(network: network))
        case .failure(.malformed):
            return .failure(.malformed)
        }
    }

    /// The IPv4 network `network` is, when its prefix is one a bridge subnet may have (8...29).
    public init?(_ network: IPNetwork) {
        guard network.family == .ipv4, (8...29).contains(network.prefix) else { return nil }
        self.network = network.address.reduce(0) { $0 << 8 | UInt32($1) }
        prefix = network.prefix
    }

    /// Addresses VMs can get: all but the network, broadcast and the bridge's (the first).
    public var assignable: Int { (1 << (32 - prefix)) - 3 }
    /// The bridge's own address: the first host address.
    public var gateway: UInt32 { network + 1 }
    /// The `index`-th address a VM can get (0-based), after the gateway.
    public func vmAddress(_ index: Int) -> UInt32 { network + 2 + UInt32(index) }
    public var mask: UInt32 { UInt32.max << (32 - prefix) }

    public func contains(_ address: UInt32) -> Bool { address & mask == network }
    public func overlaps(_ other: IPv4Subnet) -> Bool {
        let shorter = min(prefix, other.prefix)
        let mask = shorter == 0 ? 0 : UInt32.max << (32 - shorter)
        return network & mask == other.network & mask
    }

    public var description: String { "\(Self.format(network))/\(prefix)" }

    public static func format(_ address: UInt32) -> String {
        "\(address >> 24).\(address >> 16 & 0xFF).\(address >> 8 & 0xFF).\(address & 0xFF)"
    }

    public static func parseAddress<S: StringProtocol>(_ text: S) -> UInt32? {
        let octets = text.split(separator: ".", omittingEmptySubsequences: false)
        guard octets.count == 4 else { return nil }
        var value: UInt32 = 0
        for octet in octets {
            guard (1...3).contains(octet.count), octet.allSatisfy({ $0 >= "0" && $0 <= "9" }),
                octet.count == 1 || octet.first != "0", let byte = UInt32(octet), byte <= 255
            else { return nil }
            value = value << 8 | byte
        }
        return value
    }
}
