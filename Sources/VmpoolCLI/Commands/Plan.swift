import ArgumentParser
import VmpoolPlanner
import VmpoolReconciler
import VmpoolSpec
import VmpoolStore

extension Vmpool {
    /// Shows what `apply` would do, like `terraform plan`.
    struct PlanCommand: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "plan", abstract: "Show the actions apply would take, without taking them.")

        @OptionGroup var options: GlobalOptions

        @OptionGroup var manifests: ManifestOptions

        @Flag(help: "Also plan deleting pools applied earlier but absent from the input.")
        var prune = false

        @Flag(
            name: .customLong("allow-empty"), help: "Let --prune run with no pools in the input (deletes every pool).")
        var allowEmpty = false

        @OptionGroup var format: OutputOptions

        @Flag(name: .customLong("detailed-exitcode"), help: "Exit 2 when the plan has changes, 0 when it has none.")
        var detailedExitcode = false

        var output: OutputFormat { format.output }

        func run() async throws {
            let manifests = try loadManifests(self.manifests.file, prune: prune, allowEmpty: allowEmpty)
            try checkImages(manifests)
            let session = try await Session(options, locking: nil)
            let prunable = prune ? try pruneSet(session, keeping: manifests) : []
            if let cluster = session.cluster {
                let plan = try ClusterPlan.make(session, cluster: cluster, pools: manifests.pools, prune: prunable)
                noteAbsentPools(session, manifests: manifests, pruning: prune)
                switch output {
                case .text: printOut(plan.text)
                case .json: printOut(try JSONOutput.encode(plan.json))
                }
                if detailedExitcode && plan.hasChanges { throw ExitCode(2) }
                return
            }
            let plan = try await preview(session, manifests.pools, prune: prunable)
            noteAbsentPools(session, manifests: manifests, pruning: prune)
            noteOvercommit(session, manifests: manifests, pruning: prunable)
            switch output {
            case .text: printOut(PlanRenderer.text(plan, pools: manifests.pools))
            case .json: printOut(try PlanRenderer.json(plan, results: nil))
            }
            if detailedExitcode && !plan.isEmpty { throw ExitCode(2) }
        }
    }
}

/// The plan `apply` would make now. With the state dir lock free, it is taken for the
/// moment of looking, and every VM's guest is asked too: the plan is exact. While another
/// vmpool holds the lock, only what observers may ask is asked (the hypervisor's view, no
/// agent channel), and the plan says so.
func preview(_ session: Session, _ pools: [PoolSpec], prune: Set<String>) async throws -> Plan {
    switch try StateLock.tryAcquire(directory: session.stateDirectory, command: "plan") {
    case .success(let lock):
        let plan = try await session.reconciler.preview(pools, prune: prune, depth: .guest)
        withExtendedLifetime(lock) {}
        return plan
    case .failure(let busy):
        let who = busy.holder.map { "\($0)" } ?? "another vmpool"
        printError(
            "note: \(who) is working on this state dir; this plan shows the hypervisor's view and may"
                + " change when it finishes")
        return try await session.reconciler.preview(pools, prune: prune, depth: .hypervisor)
    }
}

/// Says which applied pools the input leaves out, and what `--prune` would do with them.
func noteAbsentPools(_ session: Session, manifests: ManifestSet, pruning: Bool) {
    guard !pruning, let absent = try? pruneSet(session, keeping: manifests), !absent.isEmpty else { return }
    printError(
        "note: applied pools not in the input are left alone: \(absent.sorted().joined(separator: ", "));"
            + " --prune would delete them")
}

/// Pools in the store that the input does not name.
func pruneSet(_ session: Session, keeping manifests: ManifestSet) throws -> Set<String> {
    let keep = Set(manifests.pools.map(\.name))
    return Set(try session.store.pools().map(\.spec.name)).subtracting(keep)
}
