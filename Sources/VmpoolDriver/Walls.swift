import Foundation
import VmpoolSpec

/// What a pool's VMs may reach on the network, as a driver enforces it (SPEC §10). Changes
/// apply to running VMs in place: the reconciler hands every pool's policy to the driver at
/// each pass.
public struct WallPolicy: Sendable, Hashable {
    public var pool: String
    /// The pool's egress, isolation and limits as its manifest says.
    public var walls: Walls
    /// Bridge mode: the pool's bridge (where bridged frames pass the host's IP filter too,
    /// its own subnet is not another pool's).
    public var bridge: String?

    public init(pool: String, walls: Walls = Walls(), bridge: String? = nil) {
        self.pool = pool
        self.walls = walls
        self.bridge = bridge
    }
}

/// A VM the walls must know: its pool, and in bridge mode its tap and address.
public struct WallMember: Sendable, Hashable {
    public var id: String
    public var pool: String
    public var network: NetworkAssignment?
    /// Its vCPUs and memory now (a hotplug raises its cgroup's limits).
    public var shape: VMShape?
    /// A clone that maps its template's memory file (its memory limit allows for it).
    public var mapsTemplate: Bool

    public init(
        id: String, pool: String, network: NetworkAssignment?, shape: VMShape? = nil, mapsTemplate: Bool = false
    ) {
        self.id = id
        self.pool = pool
        self.network = network
        self.shape = shape
        self.mapsTemplate = mapsTemplate
    }
}
