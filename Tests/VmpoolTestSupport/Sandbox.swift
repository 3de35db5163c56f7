import Foundation
import VmpoolSpec

/// Runs the built `vmpool` binary as a user would, on the sim driver, in a throwaway state dir.
public struct Sandbox {
    public init() {}

    public let dir = TemporaryDirectory()
    public var state: String { dir.path + "/state" }
    public let binary = VmpoolBinary(environment: ["VMPOOL_DRIVER": "sim"])

    /// `vmpool ARGS --state-dir STATE`.
    @discardableResult
    public func run(_ arguments: String..., environment: [String: String] = [:]) throws -> CommandResult {
        try run(arguments, environment: environment)
    }

    public func run(_ arguments: [String], environment: [String: String] = [:]) throws -> CommandResult {
        try binary.run(arguments + ["--state-dir", state], environment: environment)
    }

    public func write(_ spec: PoolSpec, as name: String = "pools.yaml") -> String {
        dir.write(name, manifest(spec))
    }

    public func json(_ arguments: String...) throws -> [[String: Any]] {
        let result = try binary.run(arguments + ["--state-dir", state, "-o", "json"])
        guard result.status == 0 else {
            throw SandboxError("vmpool \(arguments.joined(separator: " ")) exited \(result.status): \(result.stderr)")
        }
        let object = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8))
        return (object as? [[String: Any]]) ?? []
    }

    public func plan(_ file: String) throws -> (status: Int32, counts: [String: Int]) {
        let result = try binary.run(["plan", "-f", file, "--state-dir", state, "-o", "json", "--detailed-exitcode"])
        let object = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any]
        let actions = object?["actions"] as? [[String: Any]] ?? []
        var counts: [String: Int] = [:]
        for action in actions { counts[action["action"] as? String ?? "?", default: 0] += 1 }
        return (result.status, counts)
    }

    public func vmStates(pool: String? = nil) throws -> [String: Int] {
        var counts: [String: Int] = [:]
        let rows = pool.map { try? json("get", "vms", "--pool", $0) } ?? (try? json("get", "vms"))
        for vm in rows ?? [] { counts[vm["state"] as? String ?? "?", default: 0] += 1 }
        return counts
    }
}
