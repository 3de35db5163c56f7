import Foundation
import VmpoolDriver

/// The network walls around this state dir's VMs, in nftables tables of their own: `inet
/// vmpool_HASH` for what a guest's traffic may reach, `bridge vmpool_HASH` for what crosses a
/// bridge between VMs.
///
/// A VM's QEMU runs as a uid of its own, so every connection a user-mode guest makes (QEMU's
/// slirp opens it on the host) leaves through the output hook owned by that uid: a map from
/// VM uid to its pool's chain sends it through the pool's policy. A bridge-mode guest's
/// packets cross the host's forward hook from its address (checked against its tap: no VM
/// speaks for another) or reach the host's input hook from the bridge. Every pool's chain
/// first closes what is always closed: the host itself (any of its addresses, loopback
/// included: slirp maps 10.0.2.2 to it), link-local and multicast addresses, and the subnets
/// of the bridges of this store (other pools); then applies the pool's egress. Connections
/// the host made to a VM (a forwarded port, a ping from the host) are answered.
///
/// The whole of both tables is written at every pass from the pools' policies and the VMs
/// that run, in one nft transaction (no moment without rules); a VM that starts between
/// passes is added before its guest runs.
struct NetworkWalls: Sendable {
    let table: String
    /// The nft program.
    let nft: String

    init(stateDirectory: String, nft: String) {
        table = "vmpool_" + QemuPaths.hash(stateDirectory, hexDigits: 12)
        self.nft = nft
    }

    /// A VM's QEMU as the walls know it.
    struct Member: Sendable, Hashable {
        var uid: uid_t
        var pool: String
        var tap: String?
        var address: String?
    }

    /// Everything the tables are written from.
    struct State: Sendable {
        var policies: [WallPolicy]
        var members: [Member]
        /// The bridges of this store and their subnets: no pool's VM reaches another pool's
        /// across the host, nor the host from a bridge.
        var bridges: [String: String]
        var subnets: [String] { bridges.values.sorted() }
        /// The host's DNS resolvers (from /etc/resolv.conf): a VM with egress reaches them on
        /// port 53, also where they listen on loopback, and nothing else of the host.
        var resolvers: [String]
    }

    /// nft names: a pool name's dashes become underscores (no pool name has an underscore).
    static func identifier(_ pool: String) -> String { pool.replacingOccurrences(of: "-", with: "_") }
    static func chain(_ pool: String) -> String { "p_" + identifier(pool) }
    static func l2Chain(_ pool: String) -> String { "l2_" + identifier(pool) }
    static func tapSet(_ pool: String) -> String { "taps_" + identifier(pool) }

    /// The nft program that replaces both tables with `state`, atomically.
    func script(_ state: State) -> String {
        var lines: [String] = []
        // "add" then "delete" makes the delete safe when the table does not exist yet.
        lines += ["add table inet \(table)", "delete table inet \(table)", "table inet \(table) {"]
        lines.append("    map vm_uids { type uid : verdict; }")
        lines.append("    map vm_addrs { type ipv4_addr : verdict; }")
        lines.append(
            "    chain output { type filter hook output priority filter; policy accept; meta skuid vmap @vm_uids; }")
        lines.append(
            "    chain forward { type filter hook forward priority filter; policy accept; ip saddr vmap @vm_addrs; }")
        // What a bridged VM sends to the host itself meets its pool's chain (which closes the
        // host) here; its address is its own (the bridge table drops spoofed ones).
        lines.append(
            "    chain input { type filter hook input priority filter; policy accept; ip saddr vmap @vm_addrs; }")
        for policy in state.policies.sorted(by: { $0.pool < $1.pool }) {
            lines.append("    chain \(Self.chain(policy.pool)) {")
            // Its own bridge's subnet is where its VMs meet (bridged frames pass this table too
            // where br_netfilter is loaded); the bridge table keeps other pools there apart.
            let others = state.bridges.filter { $0.key != policy.bridge }.map(\.value)
            lines += Self.poolRules(policy, subnets: others, resolvers: state.resolvers).map { "        " + $0 }
            lines.append("    }")
        }
        lines.append("}")
        lines += elements(state, l2: false)
        do {
            lines += ["add table bridge \(table)", "delete table bridge \(table)", "table bridge \(table) {"]
            lines.append("    map tap_pool { type ifname : verdict; }")
            lines.append("    set vm_taps { type ifname; }")
            lines.append("    set tap_addrs { type ifname . ipv4_addr; }")
            // A VM speaks only with its own address (IP and ARP), so it cannot pass for another.
            lines.append(
                "    chain prerouting { type filter hook prerouting priority filter; policy accept;"
                    + " iifname @vm_taps ether type ip iifname . ip saddr != @tap_addrs drop;"
                    + " iifname @vm_taps ether type arp iifname . arp saddr ip != @tap_addrs drop; }")
            lines.append(
                "    chain forward { type filter hook forward priority filter; policy accept; iifname vmap @tap_pool; }"
            )
            for policy in state.policies.sorted(by: { $0.pool < $1.pool }) {
                lines.append("    set \(Self.tapSet(policy.pool)) { type ifname; }")
                lines.append("    chain \(Self.l2Chain(policy.pool)) {")
                lines.append(
                    policy.walls.isolate
                        ? "        oifname @vm_taps drop" : "        oifname @\(Self.tapSet(policy.pool)) accept")
                lines.append("        oifname @vm_taps drop")
                lines.append("    }")
            }
            lines.append("}")
            lines += elements(state, l2: true)
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// The rules of one pool's chain, in order.
    static func poolRules(_ policy: WallPolicy, subnets: [String], resolvers: [String]) -> [String] {
        var rules = ["ct direction reply accept"]
        let egress = policy.walls.egress
        if egress != .none {
            for resolver in resolvers {
                let family = resolver.contains(":") ? "ip6" : "ip"
                rules.append("\(family) daddr \(resolver) meta l4proto { tcp, udp } th dport 53 accept")
            }
        }
        rules.append("fib daddr type local drop")
        rules.append("ip daddr { 169.254.0.0/16, 224.0.0.0/4, 255.255.255.255 } drop")
        rules.append("ip6 daddr { fe80::/10, ff00::/8 } drop")
        if !subnets.isEmpty { rules.append("ip daddr { \(subnets.sorted().joined(separator: ", ")) } drop") }
        switch egress {
        case .all:
            rules.append("accept")
        case .none:
            rules.append("drop")
        case .allow(let destinations):
            for destination in destinations {
                let family = destination.network.family == .ipv6 ? "ip6" : "ip"
                if let port = destination.port {
                    rules.append(
                        "\(family) daddr \(destination.network) meta l4proto { tcp, udp } th dport \(port) accept")
                } else {
                    rules.append("\(family) daddr \(destination.network) accept")
                }
            }
            rules.append("drop")
        }
        return rules
    }

    /// The elements that put members under their pools' chains (`l2`: the bridge table's).
    func elements(_ state: State, l2: Bool) -> [String] {
        let pools = Set(state.policies.map(\.pool))
        var lines: [String] = []
        for member in state.members.sorted(by: { $0.uid < $1.uid }) {
            // A member whose pool has no policy (deleted meanwhile) gets no way out at all.
            let known = pools.contains(member.pool)
            lines += l2 ? l2Elements(member, known: known) : inetElements(member, known: known)
        }
        return lines
    }

    func inetElements(_ member: Member, known: Bool) -> [String] {
        let verdict = known ? "jump \(Self.chain(member.pool))" : "drop"
        var lines = ["add element inet \(table) vm_uids { \(member.uid) : \(verdict) }"]
        if let address = member.address {
            lines.append("add element inet \(table) vm_addrs { \(address) : \(verdict) }")
        }
        return lines
    }

    func l2Elements(_ member: Member, known: Bool) -> [String] {
        guard let tap = member.tap else { return [] }
        let name = "\"\(tap)\""
        var lines = ["add element bridge \(table) vm_taps { \(name) }"]
        if known {
            lines.append("add element bridge \(table) tap_pool { \(name) : jump \(Self.l2Chain(member.pool)) }")
            lines.append("add element bridge \(table) \(Self.tapSet(member.pool)) { \(name) }")
        } else {
            lines.append("add element bridge \(table) tap_pool { \(name) : drop }")
        }
        if let address = member.address {
            lines.append("add element bridge \(table) tap_addrs { \(name) . \(address) }")
        }
        return lines
    }

    /// The nft program that removes both tables (made first, so that it succeeds when they
    /// are already gone).
    var removal: String {
        [
            "add table inet \(table)", "delete table inet \(table)", "add table bridge \(table)",
            "delete table bridge \(table)",
        ].joined(separator: "\n") + "\n"
    }

    /// Runs an nft program; a failure says what nft said.
    func apply(_ program: String, vm: String? = nil) throws(DriverError) {
        let (status, errors) = try Spawn.run(nft, ["-f", "-"], input: program)
        guard status == 0 else {
            throw DriverError(
                .io,
                "cannot set the network walls (nft): \(errors.trimmingCharacters(in: .whitespacesAndNewlines).prefix(600))",
                vm: vm)
        }
    }

    /// Adds one member: before its guest runs, so that no packet of it passes unwalled. An
    /// element a dead VM left under another pool (the uid came back) is replaced.
    func add(_ member: Member, vm: String) throws(DriverError) {
        let program =
            (inetElements(member, known: true) + l2Elements(member, known: true)).joined(separator: "\n") + "\n"
        do throws(DriverError) {
            try apply(program, vm: vm)
        } catch {
            remove(member)
            try apply(program, vm: vm)
        }
    }

    /// Removes a stopped member's uid (best effort: the next pass writes the tables anew; a
    /// stale element only ever drops more, never lets more through).
    func remove(_ member: Member) {
        _ = try? Spawn.run(nft, ["-f", "-"], input: "delete element inet \(table) vm_uids { \(member.uid) }\n")
    }

    /// Nameservers of /etc/resolv.conf.
    static func resolvers(_ path: String = "/etc/resolv.conf") -> [String] {
        let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { line in
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard fields.count >= 2, fields[0] == "nameserver" else { return nil }
            let address = String(fields[1])
            var v4 = in_addr()
            var v6 = in6_addr()
            return inet_pton(AF_INET, address, &v4) == 1 || inet_pton(AF_INET6, address, &v6) == 1 ? address : nil
        }
    }
}
