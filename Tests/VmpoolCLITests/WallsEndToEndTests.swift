import Foundation
import Testing
import VmpoolSpec
import VmpoolTestSupport

/// The walls' manifest fields through apply, the store and plan, on the sim driver.
@Suite("Walls on the sim driver", .serialized)
struct WallsEndToEndTests {
    func vmIDs(_ box: Sandbox) throws -> Set<String> {
        Set(try box.json("get", "vms").compactMap { $0["id"] as? String })
    }

    @Test func egressIsolateAndLimitsChangePlanNothingAndShareMemoryReplacesTheClones() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        var spec = pool("walled", size: 3, boot: .template)
        spec.network = NetworkSpec(mode: .user, ports: [22])
        let first = try box.run("apply", "-f", box.write(spec))
        #expect(first.status == 0, "\(first.stderr)")
        let before = try vmIDs(box)
        #expect(before.count == 3)

        spec.network?.egress = .allow([try EgressRule.parse("10.20.0.0/16").get()])
        spec.network?.isolate = true
        spec.limits = ResourceLimits(cpuPercent: 50, ioWeight: 10)
        let walled = box.write(spec)
        #expect(try box.plan(walled).status == 0, "a change of the walls alone must plan nothing")
        let applied = try box.run("apply", "-f", walled)
        #expect(applied.status == 0, "\(applied.stderr)")
        #expect(try vmIDs(box) == before)
        spec.network?.egress = .none
        #expect(try box.plan(box.write(spec)).status == 0)

        spec.template.shareMemory = false
        let isolated = box.write(spec)
        let plan = try box.plan(isolated)
        #expect(plan.status == 2)
        #expect(plan.counts == ["replace": 3], "the template stays; only the clones go")
        let replaced = try box.run("apply", "-f", isolated)
        #expect(replaced.status == 0, "\(replaced.stderr)")
        let after = try vmIDs(box)
        #expect(after.count == 3)
        #expect(after.isDisjoint(with: before))
        #expect(try box.plan(isolated).status == 0, "converged once the clones are private")
    }
}
