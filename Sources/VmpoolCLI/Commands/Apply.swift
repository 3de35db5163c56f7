import ArgumentParser
import Foundation
import VmpoolPlanner
import VmpoolReconciler
import VmpoolSpec
import VmpoolStore

extension Vmpool {
    /// Records the manifests as the desired state and converges the host to it.
    struct Apply: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "apply",
            abstract: "Make the host match the manifests: create, clone, resume, pause, hotplug and stop VMs.")

        @OptionGroup var options: GlobalOptions

        @OptionGroup var manifests: ManifestOptions

        @Flag(help: "Delete pools applied earlier but absent from the input.")
        var prune = false

        @Flag(
            name: .customLong("allow-empty"), help: "Let --prune run with no pools in the input (deletes every pool).")
        var allowEmpty = false

        @Flag(name: .customLong("dry-run"), help: "Print the plan and change nothing.")
        var dryRun = false

        @OptionGroup var execution: ExecutionOptions

        @OptionGroup var timeout: TimeoutOption

        @OptionGroup var format: OutputOptions

        var output: OutputFormat { format.output }

        func run() async throws {
            let manifests = try loadManifests(
                self.manifests.file, prune: prune, allowEmpty: allowEmpty, refusingEmptyFor: "apply")
            try checkImages(manifests)
            if dryRun {
                let session = try await Session(options, locking: nil)
                let prunable = prune ? try pruneSet(session, keeping: manifests) : []
                if let cluster = session.cluster {
                    let plan = try ClusterPlan.make(session, cluster: cluster, pools: manifests.pools, prune: prunable)
                    switch output {
                    case .text:
                        printOut(plan.text)
                        printOut("Dry run: nothing was changed.")
                    case .json: printOut(try JSONOutput.encode(plan.json))
                    }
                    return
                }
                let plan = try await preview(session, manifests.pools, prune: prunable)
                noteOvercommit(session, manifests: manifests, pruning: prunable)
                switch output {
                case .text:
                    printOut(PlanRenderer.text(plan, pools: manifests.pools))
                    printOut("Dry run: nothing was changed.")
                case .json: printOut(try PlanRenderer.json(plan, results: nil))
                }
                return
            }
            if options.sharedStore {
                let probe = try await Session(options, locking: nil, parallelism: execution.parallel)
                guard let cluster = probe.cluster else { return }
                let prunable = prune ? try pruneSet(probe, keeping: manifests) : []
                try await ClusterApply.apply(
                    probe, cluster: cluster, pools: manifests.pools, prune: prunable, timeout: timeout.timeout,
                    output: output)
                return
            }
            let session = try await Session(
                options, locking: "apply", parallelism: execution.parallel, timeout: timeout.timeout, showProgress: true
            )
            let prunable = prune ? try pruneSet(session, keeping: manifests) : []
            noteOvercommit(session, manifests: manifests, pruning: prunable)
            let cancellation = Cancellation()
            let reconciler = session.reconciler
            let pools = manifests.pools
            let result = try await withShutdownSignals(cancellation) {
                try await reconciler.apply(pools, prune: prunable, cancellation: cancellation)
            }
            session.progress?.finish()
            Wake.send(directory: session.stateDirectory)
            try report(result, output: output, pools: manifests.pools)
        }
    }
}

/// Prints a pass's outcome and fails (exit 1) unless it converged.
func report(_ result: Reconciler.PassResult, output: OutputFormat, pools: [PoolSpec]) throws {
    switch output {
    case .text:
        printOut(PlanRenderer.text(result))
    case .json:
        printOut(try PlanRenderer.json(result.plan, results: result.results))
    }
    if !result.converged {
        let failed = result.results.filter { $0.outcome == .failed }.count
        var parts: [String] = []
        if failed > 0 { parts.append("\(failed) action\(failed == 1 ? "" : "s") failed") }
        if !result.remaining.isEmpty { parts.append("\(result.remaining.actions.count) still to do") }
        if result.interrupted { parts.append("interrupted before its last steps (standbys, a final look)") }
        printError("not converged: \(parts.joined(separator: ", ")); the next apply or reconcile continues")
        throw ExitCode.failure
    }
}
