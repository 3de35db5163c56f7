import Foundation
import Testing
import VmpoolDriver
import VmpoolPlanner
import VmpoolReconciler
import VmpoolSim
import VmpoolSpec
import VmpoolStore
import VmpoolTestSupport

/// `plan` is the whole truth about `apply`: when it says "no changes", applying changes
/// nothing in the store, and after every apply it says "no changes".
@Suite("Plan and apply agree")
struct PlanPropertyTests {
    /// Everything an apply could change, in a comparable form.
    struct Snapshot: Equatable {
        var pools: [String]
        var vms: [String]
        var templates: [String]
        var standbys: [String]

        init(_ store: StateStore) throws {
            pools = try store.pools().map { "\($0.spec.name) g\($0.generation) \($0.deleting)" }
            vms = try store.vms().map {
                "\($0.id) \($0.state) \($0.shape.vcpus) \($0.shape.memoryMiB) \($0.boot) \($0.templateID ?? "-")"
            }
            templates = try store.templates().map { "\($0.ref.id) \($0.state)" }
            standbys = try store.standbys().map { "\($0.id) \($0.template) \($0.ready)" }
        }
    }

    static func randomSpec(_ name: String, using rng: inout some RandomNumberGenerator) -> PoolSpec {
        let maxVcpus = Int.random(in: 1...3, using: &rng)
        let memory = [128, 256].randomElement(using: &rng)!
        return PoolSpec(
            name: name, size: Int.random(in: 0...4, using: &rng), vcpus: Int.random(in: 1...maxVcpus, using: &rng),
            memoryMiB: memory, maxVcpus: maxVcpus, maxMemoryMiB: memory + [0, 128, 256].randomElement(using: &rng)!,
            boot: Bool.random(using: &rng) ? .template : .cold,
            state: Int.random(in: 0...3, using: &rng) == 0 ? .paused : .running,
            warm: Int.random(in: 0...2, using: &rng))
    }

    @Test(arguments: [1, 2, 3, 4, 5, 6] as [UInt64])
    func whenPlanSaysNoChangesApplyChangesNothing(seed: UInt64) async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        var rng = SeededGenerator(seed: seed)
        var checked = 0
        for _ in 0..<12 {
            let names = ["a", "b", "c"].filter { _ in Bool.random(using: &rng) }
            let specs = names.map { Self.randomSpec($0, using: &rng) }
            let prune = Bool.random(using: &rng)
            let stale = prune ? Set(try h.store.pools().map(\.spec.name)).subtracting(names) : []
            let result = try await h.reconciler.apply(specs, prune: stale)
            #expect(result.converged, "seed \(seed): \(result.results.filter { $0.outcome == .failed })")
            let plan = try await h.reconciler.preview(specs, prune: [], depth: .guest)
            #expect(plan.isEmpty, "seed \(seed): after apply, plan still has \(plan.actions.map(\.kind))")
            guard plan.isEmpty else { continue }
            let before = try Snapshot(h.store)
            let again = try await h.reconciler.apply(specs, prune: [])
            #expect(again.plan.isEmpty)
            #expect(try Snapshot(h.store) == before, "seed \(seed): a no-change apply changed the store")
            checked += 1
        }
        #expect(checked == 12)
    }

    @Test func idsNameTheirPoolWhateverThePoolIsCalled() {
        for pool in ["foo", "foo-tmpl", "a-b-c", "t", "x-t000000", String(repeating: "p", count: 63)] {
            let vm = VMID.vm(pool: pool)
            let template = VMID.template(pool: pool)
            #expect(VMID.pool(of: vm) == pool)
            #expect(VMID.pool(of: template) == pool)
            #expect(VMID.isTemplate(template))
            #expect(!VMID.isTemplate(vm))
            #expect(VMID.hostname(of: vm).utf8.count <= 63)
            #expect(VMID.hostname(of: vm).hasSuffix(String(vm.suffix(7))))
        }
        #expect(VMID.pool(of: "kvm-probe") == nil)
    }
}

/// SplitMix64: reproducible sequences for property tests.
struct SeededGenerator: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
