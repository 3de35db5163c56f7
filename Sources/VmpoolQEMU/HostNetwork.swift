import Foundation
import VmpoolDriver
import VmpoolSpec

/// Bridges and tap devices on the host, made and removed with iproute2's `ip` (argument
/// vectors, never a shell). Bridge mode needs root or CAP_NET_ADMIN; without it every call
/// fails with one clear error before anything is made.
enum HostNetwork {
    static func ip(_ arguments: [String]) throws(DriverError) -> (status: Int32, stderr: String) {
        guard
            let binary = QemuProcess.resolve("ip")
                ?? ["/sbin/ip", "/usr/sbin/ip", "/bin/ip"].first(where: { access($0, X_OK) == 0 })
        else {
            throw DriverError(
                .hostUnsupported, "iproute2's ip is not installed; bridge mode needs it (apt install iproute2)")
        }
        return try Spawn.run(binary, arguments)
    }

    static func run(_ arguments: [String], what: String, vm: String?) throws(DriverError) {
        let (status, errors) = try ip(arguments)
        guard status == 0 else {
            let text = errors.trimmingCharacters(in: .whitespacesAndNewlines)
            if text.contains("Operation not permitted") {
                throw DriverError(
                    .hostUnsupported,
                    "\(what): bridge mode needs root or CAP_NET_ADMIN (ip said: \(text)); use network mode user instead",
                    vm: vm)
            }
            throw DriverError(.io, "\(what): ip \(arguments.joined(separator: " ")): \(text)", vm: vm)
        }
    }

    static func linkExists(_ name: String) -> Bool {
        access("/sys/class/net/\(name)", F_OK) == 0
    }

    /// Makes `name` a bridge with the subnet's first address, up; returns whether it was made
    /// now (`false`: it existed, and is used as it is).
    static func ensureBridge(_ name: String, subnet: IPv4Subnet) throws(DriverError) -> Bool {
        if linkExists(name) {
            guard access("/sys/class/net/\(name)/bridge", F_OK) == 0 else {
                throw DriverError(
                    .hostUnsupported, "\(name) exists and is not a bridge; choose another spec.network.bridge")
            }
            return false
        }
        do throws(DriverError) {
            try run(["link", "add", "name", name, "type", "bridge"], what: "creating bridge \(name)", vm: nil)
        } catch {
            // Another vmpool made it meanwhile: use it.
            if linkExists(name) { return false }
            throw error
        }
        do throws(DriverError) {
            try run(
                ["address", "add", "\(IPv4Subnet.format(subnet.gateway))/\(subnet.prefix)", "dev", name],
                what: "addressing bridge \(name)", vm: nil)
            try run(["link", "set", "dev", name, "up"], what: "bringing bridge \(name) up", vm: nil)
        } catch {
            _ = try? ip(["link", "del", "dev", name])
            throw error
        }
        return true
    }

    static func removeBridge(_ name: String) {
        guard linkExists(name), access("/sys/class/net/\(name)/bridge", F_OK) == 0 else { return }
        _ = try? ip(["link", "del", "dev", name, "type", "bridge"])
    }

    /// A persistent tap for `vm` on `bridge`, up; QEMU attaches to it by name.
    static func createTap(_ tap: String, bridge: String, vm: String, user: String?) throws(DriverError) {
        removeTap(tap)
        var add = ["tuntap", "add", "dev", tap, "mode", "tap"]
        if let user { add += ["user", user] }
        try run(add, what: "creating tap \(tap)", vm: vm)
        do throws(DriverError) {
            try run(
                ["link", "set", "dev", tap, "master", bridge, "up"], what: "attaching tap \(tap) to \(bridge)", vm: vm)
        } catch {
            removeTap(tap)
            throw error
        }
    }

    static func removeTap(_ tap: String) {
        guard linkExists(tap) else { return }
        _ = try? ip(["link", "del", "dev", tap])
    }
}
