import Foundation
import Testing
import VmpoolSpec
import VmpoolTestSupport

@Suite("Manifest loader")
struct LoaderTests {
    func parse(_ text: String, file: String = "m.yaml") -> (pools: [PoolSpec], diagnostics: [Diagnostic]) {
        let result = ManifestLoader.parse(Array(text.utf8), file: file)
        return (result.pools.map(\.0), result.diagnostics)
    }

    @Test func defaultsAreFilledIn() throws {
        let (pools, diagnostics) = parse(
            """
            apiVersion: vmpool/v1
            kind: Pool
            metadata: {name: web}
            spec: {size: 2, vcpus: 2, memory: 1Gi}
            """)
        #expect(diagnostics.isEmpty)
        let pool = try #require(pools.first)
        #expect(pool.memoryMiB == 1024)
        #expect(pool.maxVcpus == 2)
        #expect(pool.maxMemoryMiB == 1024)
        #expect(pool.boot == .cold)
        #expect(pool.state == .running)
        #expect(pool.warm == 0)
    }

    @Test func errorCarriesFileLineColumnFieldAndExpectation() throws {
        let (_, diagnostics) = parse(
            """
            apiVersion: vmpool/v1
            kind: Pool
            metadata:
              name: ci
            spec:
              size: 1
              vcpus: two
              memory: 256Mi
            """, file: "manifests/ci.yaml")
        let diagnostic = try #require(diagnostics.first)
        #expect(diagnostics.count == 1)
        #expect(
            diagnostic.description
                == #"manifests/ci.yaml:7:10: spec.vcpus: expected an integer from 1 to 64, got "two""#)
        #expect(diagnostic.code == .wrongType)
    }

    @Test func everyErrorOfEveryDocumentIsReported() {
        let (_, diagnostics) = parse(
            """
            apiVersion: vmpool/v2
            kind: Pool
            metadata: {name: Bad_Name}
            spec: {size: -1, vcpus: 65, memory: 12Ki, extra: 1}
            ---
            apiVersion: vmpool/v1
            kind: Pool
            metadata: {name: ok}
            spec: {size: 1, vcpus: 1}
            """)
        let fields = Set(diagnostics.map(\.field))
        #expect(
            fields == [
                "apiVersion", "metadata.name", "spec.size", "spec.vcpus", "spec.memory", "spec.extra", "spec.memory",
            ])
        #expect(diagnostics.count == 7)
        #expect(diagnostics.filter { $0.code == .missingField }.count == 1)
    }

    @Test func allFilesAreReportedInOneRun() throws {
        let dir = TemporaryDirectory()
        defer { dir.remove() }
        let a = dir.write(
            "a.yaml", "apiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: a}\nspec: {size: x, vcpus: 1, memory: 64}\n")
        let b = dir.write(
            "b.yml", "apiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: b}\nspec: {size: 1, vcpus: 0, memory: 64}\n")
        dir.write("ignored.txt", "not yaml")
        #expect(throws: ManifestError.self) { try ManifestLoader.load(paths: [dir.path]) }
        do {
            _ = try ManifestLoader.load(paths: [dir.path])
        } catch {
            #expect(Set(error.diagnostics.map(\.location.file)) == [dir.path + "/a.yaml", dir.path + "/b.yml"])
            #expect(error.diagnostics.map(\.location.file).sorted() == [a, b].sorted())
        }
    }

    @Test func namesMustBeUniqueAcrossFiles() throws {
        let dir = TemporaryDirectory()
        defer { dir.remove() }
        let spec = manifest(pool("dup"))
        let first = dir.write("1.yaml", spec)
        let second = dir.write("2.yaml", spec)
        do {
            _ = try ManifestLoader.load(paths: [first, second])
            Issue.record("duplicate names were accepted")
        } catch {
            let diagnostic = try #require(error.diagnostics.first)
            #expect(error.diagnostics.count == 1)
            #expect(diagnostic.code == .duplicateName)
            #expect(diagnostic.location.file == second)
            // Both places are the metadata.name lines.
            #expect(diagnostic.location.line == 4)
            #expect(diagnostic.message.contains(first + ":4:"))
        }
    }

    @Test func relativeImagePathsResolveAgainstTheManifestDirectory() throws {
        let dir = TemporaryDirectory()
        defer { dir.remove() }
        let file = dir.write(
            "sub/p.yaml",
            "apiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: p}\nspec:\n  size: 1\n  vcpus: 1\n  memory: 64\n"
                + "  image: {kernel: k/vmlinuz, initrd: /abs/initrd}\n")
        let set = try ManifestLoader.load(paths: [file])
        let image = try #require(set.pools.first?.image)
        #expect(image.kernel?.hasSuffix("/sub/k/vmlinuz") == true)
        #expect(image.kernel?.hasPrefix("/") == true)
        #expect(image.initrd == "/abs/initrd")
    }

    @Test func missingFileIsALocatedError() {
        do {
            _ = try ManifestLoader.load(paths: ["/nonexistent/pools.yaml"])
            Issue.record("missing file accepted")
        } catch {
            #expect(
                error.diagnostics.map(\.description) == [
                    "/nonexistent/pools.yaml:1:1: (file): no such file or directory"
                ])
        }
    }

    @Test(arguments: [
        ("256", 256), ("64", 64), ("\"256Mi\"", 256), ("1Gi", 1024), ("9999Gi", 9999 * 1024), ("2.0", 2),
    ])
    func quantitiesParse(_ text: String, _ mib: Int) throws {
        let (pools, diagnostics) = parse(
            "apiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: q}\nspec: {size: 1, vcpus: 1, memory: \(text)}\n")
        if text == "2.0" {
            #expect(diagnostics.first?.code == .outOfRange)
        } else {
            #expect(diagnostics.isEmpty, "\(diagnostics)")
            #expect(pools.first?.memoryMiB == mib)
        }
    }

    @Test(arguments: ["63Mi", "1Ti", "256M", "0Gi", "01Gi", "\" 1Gi\"", "1.5Gi", "10000Gi", "99999999Mi", "\"256\""])
    func badQuantitiesAreRejected(_ text: String) {
        let (pools, diagnostics) = parse(
            "apiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: q}\nspec: {size: 1, vcpus: 1, memory: \(text)}\n")
        #expect(pools.isEmpty)
        #expect(diagnostics.first?.field == "spec.memory")
    }

    @Test func mergeKeysShareFieldsWithinADocument() throws {
        let (pools, diagnostics) = parse(
            """
            apiVersion: vmpool/v1
            kind: Pool
            metadata: {name: a, labels: &shared {team: ci}}
            spec:
              <<: &base {size: 1, vcpus: 2}
              memory: 128
              size: 3
            """)
        #expect(diagnostics.isEmpty, "\(diagnostics)")
        #expect(pools.map(\.size) == [3])
        #expect(pools.map(\.vcpus) == [2])
    }

    @Test func anAliasCannotReachIntoAnotherDocument() throws {
        // YAML scopes anchors to their document; a composer that kept them would share nodes.
        let (pools, diagnostics) = parse(
            """
            apiVersion: vmpool/v1
            kind: Pool
            metadata: {name: a}
            spec: &base {size: 1, vcpus: 2, memory: 128}
            ---
            apiVersion: vmpool/v1
            kind: Pool
            metadata: {name: b}
            spec:
              <<: *base
              size: 3
            """)
        #expect(diagnostics.map(\.location.line) == [10])
        #expect(diagnostics.first?.message.contains("alias *base has no anchor earlier in this document") == true)
        #expect(pools.map(\.name) == [])
    }
}
