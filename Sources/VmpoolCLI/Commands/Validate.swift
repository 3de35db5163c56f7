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
            let json = format.output == .json
            let report: ([Diagnostic]) -> Void = { diagnostics in
                if json { Self.printInvalid(diagnostics.map(Self.object)) }
            }
            let manifests = try loadManifests(self.manifests.file, rejected: report)
            if !documentsOnly { try checkImages(manifests, rejected: report) }
            // Directories with no manifest file at all: nothing was read, so nothing was
            // validated (an empty file is read, and is a valid stream of no documents, as the
            // JSON Schema has it).
            guard !Set(self.manifests.file).isSubset(of: Set(manifests.emptyDirectories)) else {
                let message =
                    "nothing to validate: \(self.manifests.file.joined(separator: ", ")) holds no *.yaml or *.yml file"
                if json {
                    Self.printInvalid([
                        .object([
                            "file": .null, "line": .null, "column": .null, "field": .null, "code": .string("empty"),
                            "message": .string(message),
                        ])
                    ])
                }
                throw CommandFailure(description: message)
            }
            let count = manifests.pools.count
            switch format.output {
            case .text where count == 0:
                printOut("0 pools valid: the input holds no Pool document")
            case .text:
                printOut(
                    "\(count) pool\(count == 1 ? "" : "s") valid: \(manifests.pools.map(\.name).joined(separator: ", "))"
                )
            case .json:
                printOut(
                    try JSONOutput.encode(
                        .object([
                            "valid": .bool(true), "pools": .array(manifests.pools.map { .string($0.name) }),
                            "errors": .array([]),
                        ])))
            }
        }

        /// `{"valid": false, "pools": [], "errors": [...]}` on stdout, the one document `-o json` promises.
        private static func printInvalid(_ errors: [JSONValue]) {
            let document = JSONValue.object(["valid": .bool(false), "pools": .array([]), "errors": .array(errors)])
            if let text = try? JSONOutput.encode(document) { printOut(text) }
        }

        /// One diagnostic as JSON: where, which field, what was expected, and its stable code.
        private static func object(_ diagnostic: Diagnostic) -> JSONValue {
            .object([
                "file": .string(diagnostic.location.file), "line": .int(diagnostic.location.line),
                "column": .int(diagnostic.location.column), "field": .string(diagnostic.field),
                "code": .string(diagnostic.code.description), "message": .string(diagnostic.message),
            ])
        }
    }
}
