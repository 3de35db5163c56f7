import Foundation
import Testing
import VmpoolArchive
import VmpoolTestSupport

@testable import VmpoolOCI

/// Image archives read without trusting them: sources, names, configs, digests.
@Suite("Image archives")
struct ImageArchiveTests {
    @Test func sourcesParseAsSkopeoNamesThem() throws {
        #expect(try ImageSource(parsing: "oci-archive:/tmp/a.tar") == .ociArchive(path: "/tmp/a.tar", reference: nil))
        #expect(try ImageSource(parsing: "oci:/srv/layout:v1") == .ociDirectory(path: "/srv/layout", reference: "v1"))
        #expect(try ImageSource(parsing: "oci:./dir") == .ociDirectory(path: "./dir", reference: nil))
        #expect(
            try ImageSource(parsing: "docker-archive:img.tar") == .dockerArchive(path: "img.tar", reference: nil))
        #expect(throws: OCIError.self) { try ImageSource(parsing: "docker://alpine") }
        #expect(throws: OCIError.self) { try ImageSource(parsing: "oci-archive:") }
    }

    @Test func diskNamesComeFromReferences() {
        #expect(diskName(fromReference: "docker.io/library/alpine:3.19") == "alpine")
        #expect(diskName(fromReference: "localhost/tools:latest") == "tools")
        #expect(diskName(fromReference: "registry:5000/a/b@sha256:00") == "b")
        #expect(diskName(fromReference: "web") == "web")
        #expect(diskName(fromReference: "a/..") == nil)
        #expect(diskName(fromReference: "-rf") == nil)
    }

    @Test func theConfigBecomesTheGuestsDefaults() {
        let config = ImageConfig(
            env: ["PATH=/opt/bin:/bin", "BAD", "MULTI=a\nb", "GREETING=hi there"], workingDir: "/srv", user: "1000:1000"
        )
        #expect(
            config.guestText == """
                # The image's defaults for commands run by vmpool exec (written by vmpool image build).
                env PATH=/opt/bin:/bin
                env GREETING=hi there
                workdir /srv
                user 1000:1000

                """)
    }

    func resolve(_ path: String, _ text: String = "") throws -> (ImageFiles, ResolvedImage) {
        let files = try ImageFiles(archive: path)
        return (files, try ImageLayout.resolve(files, source: try ImageSource(parsing: "oci-archive:" + path + text)))
    }

    @Test func anArchiveIsReadByItsIndexWithNameConfigAndLayers() throws {
        let dir = TemporaryDirectory(prefix: "oci")
        defer { dir.remove() }
        let path = dir.path + "/image.tar"
        try OCIImageBuilder.writeArchive(
            [[.file("a", "1")], [.file("b", "2")]], to: path, name: "localhost/tools:1.0", env: ["X=1"],
            workingDir: "/work")
        let (_, image) = try resolve(path)
        #expect(image.name == "tools")
        #expect(image.config.env == ["X=1"] && image.config.workingDir == "/work")
        #expect(image.layers.count == 2 && image.layers.allSatisfy { $0.digest != nil && $0.diffID != nil })
        #expect(throws: OCIError.self) { try resolve(path, ":nope") }
    }

    @Test(.enabled(if: geteuid() == 0, "layers keep owners, which needs root"))
    func gzipAndPlainLayersApplyAndAlteredOnesAreRefused() throws {
        let dir = TemporaryDirectory(prefix: "oci")
        defer { dir.remove() }
        for compress in [true, false] {
            let path = dir.path + "/image-\(compress).tar"
            try OCIImageBuilder.writeArchive(
                [[.file("a", String(repeating: "x", count: 100_000))], [.whiteout("a"), .file("b", "2")]], to: path,
                gzip: compress)
            let (files, image) = try resolve(path)
            let tree = TemporaryDirectory(prefix: "tree")
            defer { tree.remove() }
            let fd = open(tree.path, O_RDONLY | O_DIRECTORY)
            defer { close(fd) }
            var applier = LayerApplier(root: fd)
            for (index, layer) in image.layers.enumerated() {
                try RootDisk.apply(layer, label: "layer \(index + 1)", files: files, into: &applier)
            }
            #expect(tree.entries == ["b"])
        }
        let altered = dir.path + "/altered.tar"
        try OCIImageBuilder.writeArchive([[.file("a", "1")]], to: altered, gzip: false, tamper: true)
        let (files, image) = try resolve(altered)
        let tree = TemporaryDirectory(prefix: "tree")
        defer { tree.remove() }
        let fd = open(tree.path, O_RDONLY | O_DIRECTORY)
        defer { close(fd) }
        var applier = LayerApplier(root: fd)
        do {
            let error = #expect(throws: (any Error).self) {
                try RootDisk.apply(image.layers[0], label: "layer 1 of 1", files: files, into: &applier)
            }
            let text = error.map { "\($0)" } ?? ""
            #expect(text.contains("layer 1 of 1") && text.contains("does not match"), "\(text)")
        }
    }

    @Test(.enabled(if: geteuid() == 0, "layers keep owners, which needs root"))
    func aDockerArchiveIsReadByItsManifestAndItsLayersChecked() throws {
        let dir = TemporaryDirectory(prefix: "docker")
        defer { dir.remove() }
        let path = dir.path + "/saved.tar"
        try OCIImageBuilder.writeDockerArchive(
            [[.directory("etc"), .file("etc/a", "1")], [.whiteout("etc/a"), .file("etc/b", "2")]], to: path,
            tag: "docker.io/library/web:2", env: ["A=1"], workingDir: "/etc")
        let files = try ImageFiles(archive: path)
        let image = try ImageLayout.resolve(files, source: try ImageSource(parsing: "docker-archive:" + path))
        #expect(image.name == "web" && image.config.workingDir == "/etc" && image.config.env == ["A=1"])
        #expect(image.layers.count == 2 && image.layers.allSatisfy { $0.diffID != nil })
        let tree = TemporaryDirectory(prefix: "tree")
        defer { tree.remove() }
        let fd = open(tree.path, O_RDONLY | O_DIRECTORY)
        defer { close(fd) }
        var applier = LayerApplier(root: fd)
        for (index, layer) in image.layers.enumerated() {
            try RootDisk.apply(layer, label: "layer \(index + 1)", files: files, into: &applier)
        }
        #expect(FileManager.default.contents(atPath: tree.path + "/etc/b") == Data("2".utf8))
        #expect(!FileManager.default.fileExists(atPath: tree.path + "/etc/a"))
        // A tag the archive does not have is an error that lists the ones it has.
        do {
            let error = #expect(throws: OCIError.self) {
                try ImageLayout.resolve(files, source: try ImageSource(parsing: "docker-archive:" + path + ":nope"))
            }
            #expect(error?.description.contains("docker.io/library/web:2") == true, "\(String(describing: error))")
        }
    }

    @Test func aFileThatIsNoImageIsRefusedClearly() throws {
        let dir = TemporaryDirectory(prefix: "oci")
        defer { dir.remove() }
        let path = dir.write("junk.tar", String(repeating: "junk", count: 300))
        do {
            let error = #expect(throws: (any Error).self) {
                try resolve(path)
            }
            let text = error.map { "\($0)" } ?? ""
            #expect(text.contains(path), "\(text)")
        }
    }
}
