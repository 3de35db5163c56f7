import Foundation
import Testing
import VmpoolTestSupport

@testable import VmpoolQEMU

/// A state dir whose pools are all deleted leaves nothing in the host's firewall.
@Suite(
    "Walls go with the last pool", .serialized,
    .enabled(if: QemuEnvironment.available, "\(QemuEnvironment.skipReason ?? "")"))
struct WallsCleanupTests {
    /// This state dir's nft tables, as `nft list tables` shows them.
    func tables(_ state: String) throws -> [String] {
        let names = Set(
            [state, URL(fileURLWithPath: state).resolvingSymlinksInPath().path].map {
                "vmpool_" + QemuPaths.hash($0, hexDigits: 12)
            })
        let listed = try RunningCommand(path: "/usr/sbin/nft", arguments: ["list", "tables"], environment: [:]).wait()
        return listed.stdout.split(separator: "\n").map(String.init).filter { line in
            names.contains { line.hasSuffix(" " + $0) }
        }
    }

    @Test(.enabled(if: geteuid() == 0, "nftables needs root")) func deletingTheLastPoolRemovesTheTables() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let applied = try box.run([
            "apply", "-f",
            box.write(
                "apiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: w}\nspec: {size: 1, vcpus: 1, memory: 128Mi}\n"),
        ])
        #expect(applied.status == 0, "\(applied.stdout)\(applied.stderr)")
        let running = try tables(box.state)
        #expect(running.count == 2, "the walls of a running VM: \(running)")
        let deleted = try box.run(["delete", "w"])
        #expect(deleted.status == 0, "\(deleted.stdout)\(deleted.stderr)")
        let left = try tables(box.state)
        #expect(left.isEmpty, "tables left after the last pool went: \(left)")
    }
}
