import Foundation
import Testing
import VmpoolSpec

@Suite struct HostileInputTestsProbe {
    @Test func mergeFanOutProbe() {
        for depth in [3, 4, 5, 6] {
            var text = "apiVersion: vmpool/v1\nkind: Pool\nmetadata:\n  name: m\n  labels:\n    <<: *m\(depth)\n"
            var defs = "x-m0: &m0 {team: infra, tier: a}\n"
            for level in 1...depth {
                defs += "x-m\(level): &m\(level) {<<: [" + Array(repeating: "*m\(level - 1)", count: 9).joined(separator: ", ") + "]}\n"
            }
            // Anchors must precede their aliases; put them under labels keys instead of top level.
            text = "apiVersion: vmpool/v1\nkind: Pool\nmetadata:\n  name: m\n  labels:\n    <<: [" + "]\n"
            var labels = "    <<: &m0 {team: infra, tier: a}\n"
            _ = labels; _ = defs
            // Build: labels: {<<: *mN} with the chain defined in a sequence of merges in spec? keep it simple:
            var doc = "apiVersion: vmpool/v1\nkind: Pool\nmetadata:\n  name: m\n  labels:\n    <<: [&m0 {team: infra}"
            for level in 1...depth {
                doc += ", &m\(level) {<<: [" + Array(repeating: "*m\(level - 1)", count: 9).joined(separator: ", ") + "]}"
            }
            doc += "]\nspec: {size: 1, vcpus: 1, memory: 64}\n"
            labels = doc
            let started = ContinuousClock.now
            let result = ManifestLoader.parse(Array(labels.utf8), file: "m.yaml")
            print("depth \(depth): \(ContinuousClock.now - started), pools \(result.pools.count), diags \(result.diagnostics.prefix(2))")
        }
    }
}
