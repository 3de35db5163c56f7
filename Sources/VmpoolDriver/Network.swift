import Foundation
import VmpoolSpec

/// What a VM's network was given: recorded with the VM in the same transaction that records
/// its launch, freed in the one that forgets it.
public struct NetworkAssignment: Codable, Sendable, Hashable {
    public var mode: NetworkMode
    public var mac: String
    /// Guest TCP port → the 127.0.0.1 port that forwards to it (user mode).
    public var ports: [Int: Int]
    /// Bridge mode: the bridge, the VM's address, the prefix length and the gateway (the
    /// bridge's own address).
    public var bridge: String?
    public var address: String?
    public var prefix: Int?
    public var gateway: String?

    public init(
        mode: NetworkMode, mac: String, ports: [Int: Int] = [:], bridge: String? = nil, address: String? = nil,
        prefix: Int? = nil, gateway: String? = nil
    ) {
        self.mode = mode
        self.mac = mac
        self.ports = ports
        self.bridge = bridge
        self.address = address
        self.prefix = prefix
        self.gateway = gateway
    }

    /// The guest's side, as the agent's `hello net=` takes it.
    public var guestConfiguration: String {
        switch mode {
        case .user: "eth0,\(mac),\(NetworkAssignment.userAddress)/24,\(NetworkAssignment.userGateway)"
        case .bridge, .none: "eth0,\(mac),\(address ?? "0.0.0.0")/\(prefix ?? 24),\(gateway ?? "-")"
        }
    }

    /// QEMU user-mode networking's fixed guest side.
    public static let userAddress = "10.0.2.15"
    public static let userGateway = "10.0.2.2"

    /// A locally administered MAC from a VM id (user mode) or from an address (bridge mode:
    /// unique on the bridge because the address is).
    public static func mac(for id: String, address: UInt32? = nil) -> String {
        let value: UInt32
        if let address {
            value = address & 0xFF_FFFF
        } else {
            var hash: UInt32 = 2_166_136_261
            for byte in id.utf8 { hash = (hash ^ UInt32(byte)) &* 16_777_619 }
            value = hash & 0xFF_FFFF
        }
        let prefix = address == nil ? "52:54:00" : "52:54:0a"
        return prefix + String(format: ":%02x:%02x:%02x", value >> 16 & 0xFF, value >> 8 & 0xFF, value & 0xFF)
    }

    /// The tap device of a VM on a bridge: short enough for an interface name (15 bytes).
    public static func tapName(for id: String) -> String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in id.utf8 { hash = (hash ^ UInt64(byte)) &* 0x0100_0000_01b3 }
        return "vmp" + String(String(hash, radix: 16).suffix(10))
    }
}

/// Ports on the host's loopback.
public enum LocalPorts {
    /// Whether nothing listens on TCP port `port` of 127.0.0.1 right now. Connections lingering
    /// in TIME_WAIT do not count: QEMU's forwards bind with SO_REUSEADDR too.
    public static func isFree(_ port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = in_addr_t(UInt32(0x7F00_0001).bigEndian)
        return withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
            }
        }
    }
}

/// The host's IPv4 routing table, for subnets that must not collide with it.
public enum HostRoutes {
    /// The host's IPv4 routes (from /proc/net/route, default route left out) that overlap
    /// `subnet`, other than those through `except` (the pool's own bridge), as `dev network/prefix`.
    public static func overlappingRoutes(_ subnet: IPv4Subnet, except: String?) -> [String] {
        guard let data = FileManager.default.contents(atPath: "/proc/net/route") else { return [] }
        let bytes = [UInt8](data)
        var result: [String] = []
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n").dropFirst() {
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard fields.count >= 8, let destination = UInt32(fields[1], radix: 16),
                let mask = UInt32(fields[7], radix: 16), mask != 0, String(fields[0]) != except
            else { continue }
            let network = destination.byteSwapped
            let prefix = mask.nonzeroBitCount
            let shorter = min(prefix, subnet.prefix)
            let common = shorter == 0 ? 0 : UInt32.max << (32 - shorter)
            if network & common == subnet.network & common {
                result.append("\(fields[0]) \(IPv4Subnet.format(network))/\(prefix)")
            }
        }
        return result
    }
}
