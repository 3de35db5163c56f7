import ArgumentParser
import VmpoolSpec

extension Vmpool {
    /// Checks manifests without touching the state dir or the hypervisor.
    struct Validate: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check manifests and report every error with its file, line and column.")

        @OptionGroup var options: GlobalOptions

        @Option(name: .shortAndLong, help: "Manifest file or directory (repeatable).")
        var file: [String] = []

        @Flag(
            name: .customLong("documents-only"),
            help: "Check the documents only, not the files they name (as the JSON Schema does).")
        var documentsOnly = false

        func validate() throws {
            if file.isEmpty { throw ValidationError("give at least one manifest with -f PATH") }
        }

        func run() async throws {
            let manifests = try loadManifests(file)
            if !documentsOnly { try checkImages(manifests) }
            let count = manifests.pools.count
            printOut("\(count) pool\(count == 1 ? "" : "s") valid: \(manifests.pools.map(\.name).joined(separator: ", "))")
        }
    }
}
