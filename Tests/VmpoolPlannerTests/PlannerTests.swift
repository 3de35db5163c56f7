import Foundation
import Testing
import VmpoolDriver
import VmpoolPlanner
import VmpoolSpec
import VmpoolTestSupport

/// Builds observed VMs for a pool spec with the shape the spec asks for.
struct Fleet {
    var vms: [ObservedVM] = []
    private var clock = 0

    mutating func add(
        _ spec: PoolSpec, _ count: Int = 1, condition: ObservedVM.Condition = .running, vcpus: Int? = nil,
        memoryMiB: Int? = nil, maxVcpus: Int? = nil, image: BootImage = testImage
    ) {
        for _ in 0..<count {
            clock += 1
            var shape = VMShape(pool: spec, image: image)
            shape.vcpus = vcpus ?? shape.vcpus
            shape.memoryMiB = memoryMiB ?? shape.memoryMiB
            shape.maxVcpus = maxVcpus ?? shape.maxVcpus
            vms.append(
                ObservedVM(
                    id: "\(spec.name)-\(String(format: "%06x", clock))", pool: spec.name, condition: condition,
                    shape: shape, boot: spec.boot, createdAt: Date(timeIntervalSince1970: Double(clock))))
        }
    }
}

func desired(_ specs: PoolSpec...) -> [DesiredPool] {
    specs.map { DesiredPool(spec: $0, shape: VMShape(pool: $0, image: testImage)) }
}

func template(for spec: PoolSpec, usable: Bool = true, key: TemplateKey? = nil) -> [String: ObservedTemplate] {
    let ref = TemplateRef(
        id: "\(spec.name)-tmpl-000001", pool: spec.name,
        key: key ?? VMShape(pool: spec, image: testImage).templateKey)
    return [spec.name: ObservedTemplate(ref: ref, usable: usable)]
}

@Suite("Planner")
struct PlannerTests {
    /// One row: a desired spec, the fleet observed, and the exact actions expected.
    struct Case: CustomStringConvertible, Sendable {
        var name: String
        var spec: PoolSpec
        var observed: @Sendable (PoolSpec) -> [ObservedVM]
        var templates: @Sendable (PoolSpec) -> [String: ObservedTemplate] = { _ in [:] }
        var expected: [Action.Kind: Int]
        var description: String { name }
    }

    static let cases: [Case] = [
        Case(name: "empty pool creates size VMs", spec: pool(size: 5), observed: { _ in [] }, expected: [.create: 5]),
        Case(
            name: "converged pool plans nothing", spec: pool(size: 5),
            observed: { s in
                var f = Fleet()
                f.add(s, 5)
                return f.vms
            }, expected: [:]),
        Case(
            name: "growing 5 to 8 plans exactly 3 creates", spec: pool(size: 8),
            observed: { s in
                var f = Fleet()
                f.add(pool(size: 5), 5)
                return f.vms
            }, expected: [.create: 3]),
        Case(
            name: "vcpus 1 to 2 within the ceiling is hotplug only", spec: pool(size: 3, vcpus: 2),
            observed: { s in
                var f = Fleet()
                f.add(s, 3, vcpus: 1)
                return f.vms
            }, expected: [.hotplugCPU: 3]),
        Case(
            name: "memory 256 to 512 within the ceiling is hotplug only", spec: pool(size: 3, memoryMiB: 512),
            observed: { s in
                var f = Fleet()
                f.add(s, 3, memoryMiB: 256)
                return f.vms
            },
            expected: [.hotplugMemory: 3]),
        Case(
            name: "cpu and memory growth chain both hotplugs", spec: pool(size: 2, vcpus: 3, memoryMiB: 512),
            observed: { s in
                var f = Fleet()
                f.add(s, 2, vcpus: 1, memoryMiB: 256)
                return f.vms
            },
            expected: [.hotplugCPU: 2, .hotplugMemory: 2]),
        Case(
            name: "vcpus 2 to 1 replaces", spec: pool(size: 3, vcpus: 1),
            observed: { s in
                var f = Fleet()
                f.add(s, 3, vcpus: 2)
                return f.vms
            }, expected: [.replace: 3]),
        Case(
            name: "memory growth not a multiple of 128 MiB replaces", spec: pool(size: 2, memoryMiB: 300),
            observed: { s in
                var f = Fleet()
                f.add(s, 2, memoryMiB: 256)
                return f.vms
            }, expected: [.replace: 2]),
        Case(
            name: "a new ceiling replaces", spec: pool(size: 2, maxVcpus: 8),
            observed: { s in
                var f = Fleet()
                f.add(s, 2, maxVcpus: 4)
                return f.vms
            }, expected: [.replace: 2]),
        Case(
            name: "a new image replaces", spec: pool(size: 2),
            observed: { s in
                var f = Fleet()
                f.add(s, 2, image: BootImage(kernel: "/old", initrd: nil, cmdline: ""))
                return f.vms
            }, expected: [.replace: 2]),
        Case(
            name: "state paused plans only pauses", spec: pool(size: 4, state: .paused),
            observed: { s in
                var f = Fleet()
                f.add(s, 4)
                return f.vms
            }, expected: [.pause: 4]),
        Case(
            name: "state running resumes paused VMs", spec: pool(size: 4),
            observed: { s in
                var f = Fleet()
                f.add(s, 4, condition: .paused)
                return f.vms
            }, expected: [.resume: 4]),
        Case(
            name: "warm spares are created paused", spec: pool(size: 3, warm: 2),
            observed: { s in
                var f = Fleet()
                f.add(s, 3)
                return f.vms
            }, expected: [.create: 2]),
        Case(
            name: "growing resumes warm spares first, then refills them", spec: pool(size: 5, warm: 2),
            observed: { s in
                var f = Fleet()
                f.add(s, 3)
                f.add(s, 2, condition: .paused)
                return f.vms
            },
            expected: [.resume: 2, .create: 2]),
        Case(
            name: "growing beyond the spares creates the rest", spec: pool(size: 6, warm: 1),
            observed: { s in
                var f = Fleet()
                f.add(s, 3)
                f.add(s, 1, condition: .paused)
                return f.vms
            },
            expected: [.resume: 1, .create: 3]),
        Case(
            name: "scale down stops the surplus", spec: pool(size: 2),
            observed: { s in
                var f = Fleet()
                f.add(s, 5)
                return f.vms
            }, expected: [.stop: 3]),
        Case(
            name: "fewer warm spares stops paused ones", spec: pool(size: 3, warm: 1),
            observed: { s in
                var f = Fleet()
                f.add(s, 3)
                f.add(s, 3, condition: .paused)
                return f.vms
            },
            expected: [.stop: 2]),
        Case(
            name: "a dead VM is replaced", spec: pool(size: 3),
            observed: { s in
                var f = Fleet()
                f.add(s, 2)
                f.add(s, 1, condition: .broken("the VM's process is gone"))
                return f.vms
            }, expected: [.replace: 1]),
        Case(
            name: "a dead VM beyond the size is stopped", spec: pool(size: 2),
            observed: { s in
                var f = Fleet()
                f.add(s, 2)
                f.add(s, 1, condition: .broken("gone"))
                return f.vms
            },
            expected: [.stop: 1]),
        Case(
            name: "template pool builds its template then clones", spec: pool(size: 3, boot: .template),
            observed: { _ in [] }, expected: [.buildTemplate: 1, .clone: 3]),
        Case(
            name: "template pool with a template only clones", spec: pool(size: 3, boot: .template),
            observed: { s in
                var f = Fleet()
                f.add(s, 1)
                return f.vms
            }, templates: { template(for: $0) },
            expected: [.clone: 2]),
        Case(
            name: "a stale template is rebuilt", spec: pool(size: 1, memoryMiB: 512, boot: .template),
            observed: { s in
                var f = Fleet()
                f.add(s, 1, memoryMiB: 256)
                return f.vms
            },
            templates: { s in
                template(for: s, key: VMShape(pool: pool(size: 1, boot: .template), image: testImage).templateKey)
            },
            expected: [.buildTemplate: 1, .hotplugMemory: 1]),
        Case(
            name: "a template whose files are gone is rebuilt", spec: pool(size: 1, boot: .template),
            observed: { s in
                var f = Fleet()
                f.add(s, 1)
                return f.vms
            }, templates: { template(for: $0, usable: false) },
            expected: [.buildTemplate: 1]),
        Case(
            name: "a paused warm spare that must grow is hotplugged", spec: pool(size: 1, vcpus: 2, warm: 1),
            observed: { s in
                var f = Fleet()
                f.add(s, 1, vcpus: 2)
                f.add(s, 1, condition: .paused, vcpus: 1)
                return f.vms
            },
            expected: [.hotplugCPU: 1]),
        Case(
            name: "surplus running VMs become warm spares", spec: pool(size: 2, warm: 1),
            observed: { s in
                var f = Fleet()
                f.add(s, 3)
                return f.vms
            }, expected: [.pause: 1]),
        Case(
            name: "size zero stops everything", spec: pool(size: 0),
            observed: { s in
                var f = Fleet()
                f.add(s, 4)
                return f.vms
            }, expected: [.stop: 4]),
    ]

    @Test("plans the exact actions", arguments: cases)
    func plansTheExactActions(_ testCase: Case) {
        let input = PlanInput(
            desired: desired(testCase.spec), vms: testCase.observed(testCase.spec),
            templates: testCase.templates(testCase.spec))
        let plan = Planner.plan(input)
        #expect(kinds(plan) == testCase.expected, "\(plan.actions.map { "\($0.kind.rawValue) \($0.reason)" })")
        // Every dependency points backwards, so the plan can run in order.
        for (index, action) in plan.actions.enumerated() {
            #expect(action.dependsOn.allSatisfy { $0 < index })
        }
    }

    @Test func planningIsIdempotentOnceConverged() {
        let spec = pool(size: 4, vcpus: 2, warm: 2)
        var fleet = Fleet()
        fleet.add(spec, 4)
        fleet.add(spec, 2, condition: .paused)
        #expect(Planner.plan(PlanInput(desired: desired(spec), vms: fleet.vms)).isEmpty)
    }

    @Test func newVMsSayWhichOfTheWholePoolTheyAreAndWhetherTheyAreWarmSpares() {
        let running = Planner.plan(PlanInput(desired: desired(pool(size: 2, warm: 1)), vms: []))
        #expect(
            running.actions.map(\.reason) == [
                "VM 1 of 3 (2 running + 1 warm)", "VM 2 of 3 (2 running + 1 warm)",
                "VM 3 of 3 (2 running + 1 warm), a warm spare",
            ])
        let paused = Planner.plan(PlanInput(desired: desired(pool(size: 2, state: .paused)), vms: []))
        #expect(paused.actions.map(\.reason) == ["VM 1 of 2 (2 paused)", "VM 2 of 2 (2 paused)"])
    }

    @Test func scaleDownStopsUnreadyVMsFirst() {
        let spec = pool(size: 2)
        var fleet = Fleet()
        fleet.add(spec, 2)
        fleet.add(spec, 1, condition: .broken("the guest agent does not answer"))
        fleet.add(spec, 1)
        let plan = Planner.plan(PlanInput(desired: desired(spec), vms: fleet.vms))
        let stopped = plan.actions.filter { $0.kind == .stop }.compactMap(\.vm)
        #expect(stopped.count == 2)
        #expect(stopped.contains(fleet.vms[2].id), "the unready VM is stopped")
        #expect(stopped.contains(fleet.vms[3].id), "then the newest")
    }

    @Test func scaleDownStopsPausedSparesBeyondWarmBeforeTheNewest() {
        let spec = pool(size: 3, warm: 0)
        var fleet = Fleet()
        fleet.add(spec, 1, condition: .paused)
        fleet.add(spec, 3)
        let plan = Planner.plan(PlanInput(desired: desired(spec), vms: fleet.vms))
        #expect(plan.actions.map(\.kind) == [.stop])
        #expect(plan.actions.first?.vm == fleet.vms[0].id)
    }

    @Test func clonesWaitForTheTemplateBuild() {
        let spec = pool(size: 2, boot: .template)
        let plan = Planner.plan(PlanInput(desired: desired(spec), vms: []))
        let build = plan.actions.firstIndex { $0.kind == .buildTemplate }
        #expect(build == 0)
        for action in plan.actions where action.kind == .clone { #expect(action.dependsOn == [0]) }
    }

    @Test func resumeComesBeforeHotplugOnTheSameVM() {
        let spec = pool(size: 1, vcpus: 2, memoryMiB: 512)
        var fleet = Fleet()
        fleet.add(spec, 1, condition: .paused, vcpus: 1, memoryMiB: 256)
        let plan = Planner.plan(PlanInput(desired: desired(spec), vms: fleet.vms))
        #expect(plan.actions.map(\.kind) == [.resume, .hotplugCPU, .hotplugMemory])
        #expect(plan.actions[1].dependsOn == [0])
        #expect(plan.actions[2].dependsOn == [1])
    }

    @Test func pruneStopsEveryVMThenDeletesThePool() {
        let kept = pool("kept", size: 1)
        let gone = pool("gone", size: 2)
        var fleet = Fleet()
        fleet.add(kept, 1)
        fleet.add(gone, 2)
        let plan = Planner.plan(PlanInput(desired: desired(kept), vms: fleet.vms, prune: ["gone"]))
        #expect(plan.actions.map(\.kind) == [.stop, .stop, .deletePool])
        #expect(plan.actions.last?.dependsOn == [0, 1])
        #expect(plan.actions.allSatisfy { $0.pool == "gone" })
    }

    @Test func poolsNotInTheInputAreLeftAloneWithoutPrune() {
        let other = pool("other", size: 3)
        var fleet = Fleet()
        fleet.add(other, 1, condition: .broken("gone"))
        let plan = Planner.plan(PlanInput(desired: desired(pool("web", size: 0)), vms: fleet.vms))
        #expect(plan.isEmpty)
    }

    @Test func replacedVMKeepsItsRunState() {
        let spec = pool(size: 1, vcpus: 1, warm: 1)
        var fleet = Fleet()
        fleet.add(spec, 1, vcpus: 2)
        fleet.add(spec, 1, condition: .paused, vcpus: 2)
        let plan = Planner.plan(PlanInput(desired: desired(spec), vms: fleet.vms))
        #expect(plan.actions.map(\.kind) == [.replace, .replace])
        #expect(Set(plan.actions.compactMap(\.state)) == [.running, .paused])
    }

    @Test func combinedChangesAcrossPoolsAreIndependent() {
        let a = pool("a", size: 2, vcpus: 2)
        let b = pool("b", size: 1, boot: .template)
        var fleet = Fleet()
        fleet.add(a, 3, vcpus: 1)
        let plan = Planner.plan(PlanInput(desired: desired(a, b), vms: fleet.vms))
        #expect(kinds(plan) == [.stop: 1, .hotplugCPU: 2, .buildTemplate: 1, .clone: 1])
        let clone = plan.actions.first { $0.kind == .clone }
        let build = plan.actions.firstIndex { $0.kind == .buildTemplate }
        #expect(clone?.dependsOn == build.map { [$0] })
    }
}
