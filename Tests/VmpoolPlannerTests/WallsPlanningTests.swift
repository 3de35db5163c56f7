import Foundation
import Testing
import VmpoolDriver
import VmpoolPlanner
import VmpoolSpec
import VmpoolTestSupport

/// Egress, isolation and limits change in place (no action of the planner's); private template
/// memory is part of a clone's shape.
@Suite("Planning the walls")
struct WallsPlanningTests {
    static func walled(_ spec: PoolSpec) -> PoolSpec {
        var spec = spec
        spec.network = NetworkSpec(
            mode: .bridge, bridge: "vmpool0", subnet: "10.77.0.0/24",
            egress: .allow([
                try! EgressRule.parse("10.20.0.0/16").get(), try! EgressRule.parse("192.0.2.7/32:443").get(),
            ]),
            isolate: true)
        spec.limits = ResourceLimits(cpuPercent: 50, ioWeight: 10)
        return spec
    }

    @Test(arguments: [BootMode.cold, .template])
    func egressIsolationAndLimitsChangesPlanNothing(_ boot: BootMode) {
        var before = pool(size: 3, boot: boot, warm: 1)
        before.network = NetworkSpec(mode: .bridge, bridge: "vmpool0", subnet: "10.77.0.0/24")
        let after = Self.walled(before)
        #expect(after != before)
        #expect(after.walls != before.walls)
        var fleet = Fleet()
        fleet.add(before, 3)
        fleet.add(before, 1, condition: .paused)
        let templates = boot == .template ? template(for: before) : [:]
        let plan = Planner.plan(PlanInput(desired: desired(after), vms: fleet.vms, templates: templates))
        #expect(plan.actions.isEmpty, "\(plan.actions.map(\.reason))")
        // And back: lifting the walls replaces nothing either.
        var walledFleet = Fleet()
        walledFleet.add(after, 3)
        walledFleet.add(after, 1, condition: .paused)
        let back = Planner.plan(PlanInput(desired: desired(before), vms: walledFleet.vms, templates: templates))
        #expect(back.actions.isEmpty, "\(back.actions.map(\.reason))")
    }

    @Test func egressNoneAloneOnAUserModePoolPlansNothing() {
        var before = pool(size: 2)
        before.network = NetworkSpec(mode: .user, ports: [22])
        var after = before
        after.network?.egress = .none
        var fleet = Fleet()
        fleet.add(before, 2)
        #expect(Planner.plan(PlanInput(desired: desired(after), vms: fleet.vms)).isEmpty)
    }

    @Test func privateTemplateMemoryReplacesTheClonesNotTheTemplate() throws {
        let shared = pool(size: 3, boot: .template, warm: 1)
        var isolated = shared
        isolated.template.shareMemory = false
        var fleet = Fleet()
        fleet.add(shared, 3)
        fleet.add(shared, 1, condition: .paused)
        // The template built for the sharing pool still serves the private one.
        let plan = Planner.plan(PlanInput(desired: desired(isolated), vms: fleet.vms, templates: template(for: shared)))
        #expect(kinds(plan) == [.replace: 4])
        #expect(plan.actions.allSatisfy { $0.reason == "template memory is private now (template.shareMemory: false)" })
        #expect(plan.actions.map(\.state) == [.running, .running, .running, .paused])
        #expect(
            VMShape(pool: isolated, image: testImage).templateKey == VMShape(pool: shared, image: testImage).templateKey
        )

        // Converged once the clones are private; sharing again replaces them back.
        var privateFleet = Fleet()
        privateFleet.add(isolated, 3)
        privateFleet.add(isolated, 1, condition: .paused)
        #expect(
            Planner.plan(PlanInput(desired: desired(isolated), vms: privateFleet.vms, templates: template(for: shared)))
                .isEmpty)
        let back = Planner.plan(
            PlanInput(desired: desired(shared), vms: privateFleet.vms, templates: template(for: shared)))
        #expect(kinds(back) == [.replace: 4])
        #expect(back.actions.first?.reason == "template memory is shared now (template.shareMemory)")
    }

    @Test func recordedShapesWithoutTheFieldShareMemory() throws {
        let shape = VMShape(pool: pool(boot: .template), image: testImage)
        let encoded = try JSONEncoder().encode(shape)
        #expect(!String(decoding: encoded, as: UTF8.self).contains("sharesTemplateMemory"))
        #expect(try JSONDecoder().decode(VMShape.self, from: encoded).sharesTemplateMemory)
        var isolated = shape
        isolated.sharesTemplateMemory = false
        let stored = try JSONEncoder().encode(isolated)
        #expect(try JSONDecoder().decode(VMShape.self, from: stored) == isolated)
    }
}
