import Foundation

/// What a pool's VMs may reach on the network, as a driver enforces it (SPEC §10). Changes
/// apply to running VMs in place: the reconciler hands every pool's policy to the driver at
/// each pass.
public struct WallPolicy: Sendable, Hashable {
    /// Where a pool's VMs may open connections to, besides what is always closed (the host,
    /// link-local addresses, other pools).
    public enum Egress: Sendable, Hashable {
        case all
        case none
        case only([Destination])
    }

    /// A network (canonical CIDR text) and, optionally, one TCP/UDP port.
    public struct Destination: Sendable, Hashable {
        public var cidr: String
        public var isIPv6: Bool
        public var port: Int?

        public init(cidr: String, isIPv6: Bool, port: Int? = nil) {
            self.cidr = cidr
            self.isIPv6 = isIPv6
            self.port = port
        }
    }

    public var pool: String
    public var egress: Egress
    /// In bridge mode: VMs of the pool do not reach each other either.
    public var isolate: Bool

    public init(pool: String, egress: Egress = .all, isolate: Bool = false) {
        self.pool = pool
        self.egress = egress
        self.isolate = isolate
    }
}

/// A VM the walls must know: its pool, and in bridge mode its tap and address.
public struct WallMember: Sendable, Hashable {
    public var id: String
    public var pool: String
    public var network: NetworkAssignment?

    public init(id: String, pool: String, network: NetworkAssignment?) {
        self.id = id
        self.pool = pool
        self.network = network
    }
}
