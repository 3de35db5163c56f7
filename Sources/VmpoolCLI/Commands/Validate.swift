import ArgumentParser
import VmpoolDriver
import VmpoolSpec

extension Vmpool {
    /// Checks manifests without touching the state dir or the hypervisor.
    struct Validate: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "validate",
            abstract: "Check manifests and report every error with its file, line and column.")

        @OptionGroup var options: GlobalOptions

        @OptionGroup var manifests: ManifestOptions

        @OptionGroup var format: OutputOptions

        @Flag(
            name: .customLong("documents-only"),
            help: "Check the documents only, not the files they name (as the JSON Schema does).")
        var documentsOnly = false

        func run() async throws {
            let manifests = try loadManifests(self.manifests.file)
            if !documentsOnly { try checkImages(manifests) }
            let count = manifests.pools.count
            switch format.output {
            case .text:
                printOut(
                    "\(count) pool\(count == 1 ? "" : "s") valid: \(manifests.pools.map(\.name).joined(separator: ", "))"
                )
            case .json:
                printOut(
                    try JSONOutput.encode(
                        .object(["valid": .bool(true), "pools": .array(manifests.pools.map { .string($0.name) })])))
            }
        }
    }
}
