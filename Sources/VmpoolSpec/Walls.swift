/// One destination a pool's VMs may open connections to: a network, and optionally one port.
///
/// Its text is the manifest's: `10.20.0.0/16`, `192.0.2.7/32:443`, `2001:db8::/32`,
/// `[2001:db8::/32]:443` (brackets only around an IPv6 network with a port). `description` is
/// the canonical form (IPv6 as RFC 5952 writes it), which it also has when stored.
public struct EgressRule: Codable, Sendable, Hashable, CustomStringConvertible {
    public var network: IPNetwork
    /// TCP or UDP port 1 to 65535; `nil`: every port.
    public var port: Int?

    public init(network: IPNetwork, port: Int? = nil) {
        self.network = network
        self.port = port
    }

    /// Why a text is not a rule.
    public enum Problem: Error, Sendable, Hashable {
        /// Not one of the rule forms.
        case malformed
        /// A rule's form with a port outside 1 to 65535.
        case portOutOfRange(String)
        /// A valid rule but for host bits in its network; `suggestion` is the rule with them cleared.
        case hostBitsSet(suggestion: EgressRule)
    }

    /// Parses one rule in the manifest's form.
    public static func parse(_ text: String) -> Result<EgressRule, Problem> {
        var cidr = Substring(text)
        var portText: Substring?
        if cidr.hasPrefix("[") {
            // `[IPv6/p]:PORT`: brackets are there only to set the port apart from the groups.
            guard let close = cidr.firstIndex(of: "]"), cidr[close...].hasPrefix("]:") else {
                return .failure(.malformed)
            }
            portText = cidr[cidr.index(close, offsetBy: 2)...]
            cidr = cidr[cidr.index(after: cidr.startIndex)..<close]
        } else if let slash = cidr.firstIndex(of: "/"), let colon = cidr[slash...].firstIndex(of: ":") {
            // `a.b.c.d/p:PORT`; an IPv6 network's colons all come before its slash.
            portText = cidr[cidr.index(after: colon)...]
            cidr = cidr[..<colon]
        }
        var port: Int?
        if let portText {
            guard let value = IPNetwork.decimal(portText, maxDigits: 5) else { return .failure(.malformed) }
            port = value
        }
        let bracketed = text.hasPrefix("[")
        let network: IPNetwork
        var hostBitsSet = false
        switch IPNetwork.parse(cidr) {
        case .success(let parsed): network = parsed
        case .failure(.malformed): return .failure(.malformed)
        case .failure(.hostBitsSet(let cleared)):
            network = cleared
            hostBitsSet = true
        }
        // Brackets go with IPv6 and a port, and only there: one spelling per rule.
        guard bracketed == (network.family == .ipv6 && port != nil) else { return .failure(.malformed) }
        if let port, !(1...65535).contains(port) { return .failure(.portOutOfRange(String(port))) }
        let rule = EgressRule(network: network, port: port)
        return hostBitsSet ? .failure(.hostBitsSet(suggestion: rule)) : .success(rule)
    }

    public var description: String {
        guard let port else { return network.description }
        return network.family == .ipv6 ? "[\(network)]:\(port)" : "\(network):\(port)"
    }

    public init(from decoder: Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard case .success(let rule) = Self.parse(text) else {
            throw DecodingError.dataCorrupted(
                DecodingError.Context(codingPath: decoder.codingPath, debugDescription: "not an egress rule: \(text)"))
        }
        self = rule
    }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

/// Where a pool's VMs may open connections to. The host, link-local addresses and other pools
/// are walled off whatever this says (SPEC §10); this chooses among the rest.
public enum EgressPolicy: Codable, Sendable, Hashable, CustomStringConvertible {
    /// Anywhere else: the default.
    case all
    /// No outbound connection at all.
    case none
    /// Only these destinations (1 to `SpecLimits.maxEgressRules`, no two alike).
    case allow([EgressRule])

    /// `all`, `none`, or the rules' canonical texts separated by `, `.
    public var description: String {
        switch self {
        case .all: "all"
        case .none: "none"
        case .allow(let rules): rules.map(\.description).joined(separator: ", ")
        }
    }

    /// Stored as the manifest writes it: the string `all` or `none`, or an array of rule texts.
    public init(from decoder: Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let word = try? container.decode(String.self) {
            switch word {
            case "all": self = .all
            case "none": self = .none
            default:
                throw DecodingError.dataCorrupted(
                    DecodingError.Context(
                        codingPath: decoder.codingPath, debugDescription: "expected all, none or rules, got \(word)"))
            }
            return
        }
        self = .allow(try container.decode([EgressRule].self))
    }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .all: try container.encode("all")
        case .none: try container.encode("none")
        case .allow(let rules): try container.encode(rules)
        }
    }
}

/// Per-VM resource limits a pool lowers below what its VM size gives (SPEC §10): `nil` keeps
/// the default.
public struct ResourceLimits: Codable, Sendable, Hashable {
    /// Share of the VM's vCPUs its QEMU may use, 1 to 100 (percent); `nil`: all of them.
    public var cpuPercent: Int?
    /// cgroup v2 `io.weight`, 1 to 10000; `nil`: the cgroup's default (100).
    public var ioWeight: Int?

    public init(cpuPercent: Int? = nil, ioWeight: Int? = nil) {
        self.cpuPercent = cpuPercent
        self.ioWeight = ioWeight
    }

    /// Nothing lowered.
    public var isEmpty: Bool { cpuPercent == nil && ioWeight == nil }
}

/// What fences one VM in, beyond what every VM gets: everything the driver applies to a
/// running VM in place, so that none of it is part of the VM's shape (a change replaces
/// nothing).
public struct Walls: Codable, Sendable, Hashable {
    /// `.none` for a VM without a NIC.
    public var egress: EgressPolicy
    /// On a bridge, the VM reaches no other VM, not even of its own pool.
    public var isolate: Bool
    public var limits: ResourceLimits

    public init(egress: EgressPolicy = .all, isolate: Bool = false, limits: ResourceLimits = ResourceLimits()) {
        self.egress = egress
        self.isolate = isolate
        self.limits = limits
    }
}
