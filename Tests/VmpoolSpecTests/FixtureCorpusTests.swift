import Foundation
import Testing
import VmpoolSpec
import VmpoolTestSupport

/// The fixture corpus under Tests/Fixtures/manifests, shared with the JSON Schema check.
enum Corpus {
    static let root = repositoryRoot + "/Tests/Fixtures/manifests"

    static func files(_ folder: String) -> [String] {
        let dir = root + "/" + folder
        return ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [])
            .filter { $0.hasSuffix(".yaml") }.sorted().map { dir + "/" + $0 }
    }

    /// The field path an invalid fixture's `# expect: FIELD reason` header names.
    static func expectedField(_ file: String) -> String? {
        guard let text = try? String(contentsOfFile: file, encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n", omittingEmptySubsequences: false).prefix(3)
        where line.hasPrefix("# expect:") {
            return line.dropFirst("# expect:".count).split(separator: " ").first.map(String.init)
        }
        return nil
    }
}

@Suite("Manifest fixture corpus")
struct FixtureCorpusTests {
    @Test func corpusIsLargeEnough() {
        #expect(Corpus.files("valid").count >= 20)
        #expect(Corpus.files("invalid").count >= 20)
        #expect(Corpus.files("cross-field").count >= 4)
    }

    @Test("valid fixtures load without a diagnostic", arguments: Corpus.files("valid"))
    func validFixtureLoads(_ file: String) throws {
        do {
            _ = try ManifestLoader.load(paths: [file])
        } catch {
            Issue.record("\(file): \(error)")
        }
    }

    @Test(
        "invalid fixtures are rejected at the field they name",
        arguments: Corpus.files("invalid") + Corpus.files("cross-field"))
    func invalidFixtureIsRejected(_ file: String) throws {
        let expected = try #require(Corpus.expectedField(file), "fixture lacks its # expect: header")
        do {
            let set = try ManifestLoader.load(paths: [file])
            Issue.record("accepted \(set.pools.map(\.name)) but the fixture expects an error at \(expected)")
        } catch {
            #expect(!error.diagnostics.isEmpty)
            let fields = error.diagnostics.map(\.field)
            let matches = fields.contains { field in
                field == expected || field.hasPrefix(expected + ".") || expected.hasPrefix(field + ".")
                    || (field == "(document)"
                        && ["document", "metadata", "spec", "metadata.labels"].contains(expected))
                    || (field == "(document)" && error.diagnostics.contains { $0.code == .syntax })
            }
            #expect(matches, "expected an error at \(expected), got \(error.diagnostics.map(\.description))")
            for diagnostic in error.diagnostics {
                #expect(diagnostic.location.file == file)
                #expect(diagnostic.location.line >= 1 && diagnostic.location.column >= 1)
            }
        }
    }
}
