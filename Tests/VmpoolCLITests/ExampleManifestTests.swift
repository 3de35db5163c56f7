import Foundation
import Testing
import VmpoolTestSupport

/// The manifests users copy stay valid as the format grows.
@Suite("Example manifests")
struct ExampleManifestTests {
    @Test func everyExampleIsValid() throws {
        let directory = repositoryRoot + "/manifests"
        let files = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".yaml") }
        #expect(files.count >= 7, "\(files)")
        let box = Sandbox()
        defer { box.dir.remove() }
        for file in files.sorted() {
            // Documents only: the disk images they name are built by the user (vmpool image build).
            let result = try box.run("validate", "--documents-only", "-f", directory + "/" + file)
            #expect(result.status == 0, "\(file): \(result.stderr)")
        }
    }
}
