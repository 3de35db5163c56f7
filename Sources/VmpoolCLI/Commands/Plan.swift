import ArgumentParser
import VmpoolPlanner
import VmpoolSpec

extension Vmpool {
    /// Shows what `apply` would do, like `terraform plan`.
    struct PlanCommand: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "plan", abstract: "Show the actions apply would take, without taking them.")

        @OptionGroup var options: GlobalOptions

        @Option(name: .shortAndLong, help: "Manifest file or directory (repeatable).")
        var file: [String] = []

        @Flag(help: "Also plan deleting pools applied earlier but absent from the input.")
        var prune = false

        @Option(name: .shortAndLong, help: "Output format: text or json.")
        var output: OutputFormat = .text

        @Flag(name: .customLong("detailed-exitcode"), help: "Exit 2 when the plan has changes, 0 when it has none.")
        var detailedExitcode = false

        func validate() throws {
            if file.isEmpty { throw ValidationError("give at least one manifest with -f PATH") }
        }

        func run() async throws {
            let manifests = try loadManifests(file)
            try checkImages(manifests)
            let session = try await Session(options, locking: nil)
            let prunable = prune ? try pruneSet(session, keeping: manifests) : []
            let plan = try await session.reconciler.preview(manifests.pools, prune: prunable)
            switch output {
            case .text: printOut(PlanRenderer.text(plan, pools: manifests.pools))
            case .json: printOut(try PlanRenderer.json(plan, results: nil))
            }
            if detailedExitcode && !plan.isEmpty { throw ExitCode(2) }
        }
    }
}

/// Pools in the store that the input does not name.
func pruneSet(_ session: Session, keeping manifests: ManifestSet) throws -> Set<String> {
    let keep = Set(manifests.pools.map(\.name))
    return Set(try session.store.pools().map(\.spec.name)).subtracting(keep)
}
