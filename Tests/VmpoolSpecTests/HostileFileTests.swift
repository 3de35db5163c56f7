import Foundation
import Testing
import VmpoolSpec
import VmpoolTestSupport

/// The size limit as users meet it: through files on disk and standard input, not only on
/// bytes already in memory.
extension HostileInputTests {
    /// `PreScan.maxBytes`: a file of this many bytes is read, one byte more is refused.
    static let sizeLimit = 4 << 20

    /// One pool padded with comment lines to exactly `size` bytes.
    static func manifest(ofExactly size: Int) -> String {
        var text = "apiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: big}\nspec: {size: 1, vcpus: 1, memory: 64}\n"
        let fill = size - text.utf8.count
        let line = "# " + String(repeating: "x", count: 1021) + "\n"
        text += String(repeating: line, count: fill / line.utf8.count)
        switch fill % line.utf8.count {
        case 0: break
        case 1: text += "\n"
        case let rest: text += "#" + String(repeating: "x", count: rest - 2) + "\n"
        }
        return text
    }

    static func writeFile(_ dir: TemporaryDirectory, _ name: String, _ bytes: some Collection<UInt8>) -> String {
        let path = dir.path + "/" + name
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        return path
    }

    static func diagnostics(_ load: () throws(ManifestError) -> ManifestSet) -> [Diagnostic] {
        do {
            let set = try load()
            Issue.record("accepted \(set.pools.count) pools")
            return []
        } catch {
            return error.diagnostics
        }
    }

    @Test func tenMegabyteFileIsRefusedThroughTheFileReader() {
        let dir = TemporaryDirectory()
        defer { dir.remove() }
        let path = Self.writeFile(dir, "huge.yaml", repeatElement(UInt8(ascii: "a"), count: 10 << 20))
        let started = threadCPUTime()
        let diagnostics = Self.diagnostics { () throws(ManifestError) in try ManifestLoader.load(paths: [path]) }
        #expect(threadCPUTime() - started < .seconds(1), "the reader should stop at the limit, not read 10 MB")
        #expect(diagnostics.map(\.code) == [.tooLarge])
        #expect(diagnostics.map(\.location) == [VmpoolSpec.SourceLocation(file: path, line: 1, column: 1)])
        #expect(diagnostics.map(\.field) == ["(file)"])
    }

    /// The reader stops after the limit plus one byte; the message must not pass that count off
    /// as the size of the file.
    @Test func sizeLimitMessageDoesNotMisstateTheFileSize() throws {
        let dir = TemporaryDirectory()
        defer { dir.remove() }
        let size = 10 << 20
        let path = Self.writeFile(dir, "huge.yaml", repeatElement(UInt8(ascii: "a"), count: size))
        let diagnostics = Self.diagnostics { () throws(ManifestError) in try ManifestLoader.load(paths: [path]) }
        let message = try #require(diagnostics.first?.message)
        if let stated = message.firstMatch(of: /file is (\d+) bytes/) {
            #expect(Int(stated.1) == size, "\(path) is \(size) bytes; the diagnostic says: \(message)")
        }
    }

    @Test func fileOfExactlyTheLimitIsAcceptedAndOneByteMoreIsNot() throws {
        let dir = TemporaryDirectory()
        defer { dir.remove() }
        let atLimit = Self.manifest(ofExactly: Self.sizeLimit)
        #expect(atLimit.utf8.count == Self.sizeLimit)
        let fits = Self.writeFile(dir, "fits.yaml", atLimit.utf8)
        let pools = try ManifestLoader.load(paths: [fits]).pools
        #expect(pools.map(\.name) == ["big"])

        let over = Self.writeFile(dir, "over.yaml", Self.manifest(ofExactly: Self.sizeLimit + 1).utf8)
        let diagnostics = Self.diagnostics { () throws(ManifestError) in try ManifestLoader.load(paths: [over]) }
        #expect(diagnostics.map(\.code) == [.tooLarge])
        #expect(diagnostics.map(\.location) == [VmpoolSpec.SourceLocation(file: over, line: 1, column: 1)])
    }

    @Test func standardInputHasTheSameLimit() throws {
        let atLimit = Array(Self.manifest(ofExactly: Self.sizeLimit).utf8)
        let pools = try ManifestLoader.load(paths: ["-"], standardInput: { atLimit }).pools
        #expect(pools.map(\.name) == ["big"])

        let over = Array(Self.manifest(ofExactly: Self.sizeLimit + 1).utf8)
        let diagnostics = Self.diagnostics { () throws(ManifestError) in
            try ManifestLoader.load(paths: ["-"], standardInput: { over })
        }
        #expect(diagnostics.map(\.code) == [.tooLarge])
        #expect(diagnostics.map(\.location) == [VmpoolSpec.SourceLocation(file: "<stdin>", line: 1, column: 1)])
    }

    /// `ManifestLoader.readStandardInput` reads file descriptor 0, so it runs in a child: the
    /// built binary's `validate -f -`.
    @Test func standardInputOfTheBinaryIsReadUpToTheLimit() throws {
        let binary = VmpoolBinary()
        try #require(binary.exists, "no vmpool binary at \(binary.path)")
        let fits = try binary.run(["validate", "-f", "-"], input: Self.manifest(ofExactly: Self.sizeLimit))
        #expect(fits.status == 0, "\(fits.stderr)")
        #expect(fits.stdout.contains("1 pool valid: big"), "\(fits.stdout)")

        let huge = try binary.run(["validate", "-f", "-"], input: String(repeating: "a", count: 10 << 20))
        #expect(huge.status == 1)
        #expect(huge.stderr.hasPrefix("<stdin>:1:1: (file): "), "\(huge.stderr)")
        #expect(huge.stderr.contains("limited to \(Self.sizeLimit) bytes"), "\(huge.stderr)")
    }
}
