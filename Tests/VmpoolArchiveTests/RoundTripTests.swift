import Foundation
import Testing
import VmpoolArchive
import VmpoolTestSupport

/// Normal trees survive a copy unchanged, whichever tar wrote or reads the stream: GNU tar (the
/// Debian guest's) and busybox tar (the default guest's) on the other end of vmpool's own reader
/// and writer.
@Suite("Archive round trips")
struct RoundTripTests {
    static let busybox = FileManager.default.isExecutableFile(atPath: "/bin/busybox")

    /// The source tree `src/top` and an empty `out`.
    struct Trees {
        let scratch = TemporaryDirectory(prefix: "vmpool-roundtrip")
        var source: String { scratch.path + "/src" }
        var top: String { source + "/top" }
        var out: String { scratch.path + "/out" }

        init() throws {
            mkdir(scratch.path + "/src", 0o755)
            mkdir(scratch.path + "/out", 0o755)
            try makeSampleTree(scratch.path + "/src/top")
        }

        func remove() {
            chmod(top + "/ro-dir", 0o755)
            chmod(out + "/top/ro-dir", 0o755)
            scratch.remove()
        }

        /// Extracts the stream in `file` with vmpool's extractor into `out/top`.
        func extract(_ file: String) throws -> [String] {
            let extractor = try SafeExtractor(directory: out, name: "top", requested: Array("top".utf8))
            let fd = open(file, O_RDONLY | O_CLOEXEC)
            defer { close(fd) }
            try extractor.extract(TarReader(fd: fd))
            try extractor.commit()
            return extractor.warnings
        }

        /// Writes `src/top` with vmpool's writer into `file`.
        func write(_ file: String) throws {
            let fd = open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            defer { close(fd) }
            let writer = TarWriter(fd: fd)
            let warnings = try TreeArchiver(path: top).write(as: Array("top".utf8), to: writer)
            try writer.finish()
            #expect(warnings.isEmpty, "\(warnings)")
        }

        func expectSameTree(times: Bool = true, sourceLocation: SourceLocation = #_sourceLocation) {
            let expected = describeTree(top, times: times)
            let actual = describeTree(out + "/top", times: times)
            #expect(expected.count > 20, sourceLocation: sourceLocation)
            for key in Set(expected.keys).union(actual.keys).sorted() where expected[key] != actual[key] {
                Issue.record(
                    "\(key): expected \(expected[key] ?? "nothing"), got \(actual[key] ?? "nothing")",
                    sourceLocation: sourceLocation)
            }
            var a = stat()
            var b = stat()
            stat(out + "/top/hard-link", &a)
            stat(out + "/top/a/b/c/hello.txt", &b)
            #expect(a.st_ino == b.st_ino, "the hard link became a copy", sourceLocation: sourceLocation)
        }
    }

    @Test(arguments: ["gnu", "posix", "oldgnu"])
    func gnuTarStreamsAreExtractedFaithfully(format: String) throws {
        let trees = try Trees()
        defer { trees.remove() }
        let file = trees.scratch.path + "/stream.tar"
        try shell("tar --format=\(format) -c -f '\(file)' -C '\(trees.source)' top")
        #expect(try trees.extract(file).isEmpty)
        trees.expectSameTree()
    }

    @Test func gnuTarStreamsInLargeRecordsAreExtractedFaithfully() throws {
        // What a guest with GNU tar sends: 128 KiB records, so up to 128 KiB of zeros after the end.
        let trees = try Trees()
        defer { trees.remove() }
        let file = trees.scratch.path + "/stream.tar"
        try shell("cd '\(trees.source)' && tar -c -b 256 -f - -- top | cat > '\(file)'")
        var info = stat()
        stat(file, &info)
        #expect(info.st_size % (128 << 10) == 0)
        #expect(try trees.extract(file).isEmpty)
        trees.expectSameTree()
    }

    @Test(.enabled(if: busybox, "busybox is not installed (scripts/test installs busybox-static)"))
    func busyboxTarStreamsAreExtractedFaithfully() throws {
        let trees = try Trees()
        defer { trees.remove() }
        let file = trees.scratch.path + "/stream.tar"
        try shell("cd '\(trees.source)' && busybox tar -c -f - top > '\(file)'")
        #expect(try trees.extract(file).isEmpty)
        trees.expectSameTree()
    }

    @Test func vmpoolStreamsAreExtractedFaithfullyByGnuTar() throws {
        let trees = try Trees()
        defer { trees.remove() }
        let file = trees.scratch.path + "/stream.tar"
        try trees.write(file)
        try shell("tar -x -f '\(file)' -C '\(trees.out)' && tar -t -f '\(file)' > /dev/null")
        trees.expectSameTree()
    }

    @Test(.enabled(if: busybox, "busybox is not installed (scripts/test installs busybox-static)"))
    func vmpoolStreamsAreExtractedFaithfullyByBusyboxTar() throws {
        let trees = try Trees()
        defer { trees.remove() }
        let file = trees.scratch.path + "/stream.tar"
        try trees.write(file)
        try shell("busybox tar -x -f - -C '\(trees.out)' < '\(file)'")
        trees.expectSameTree()
    }

    @Test func vmpoolStreamsRoundTripThroughTheExtractor() throws {
        let trees = try Trees()
        defer { trees.remove() }
        let file = trees.scratch.path + "/stream.tar"
        try trees.write(file)
        #expect(try trees.extract(file).isEmpty)
        trees.expectSameTree()
        // Directory times come back too.
        var source = stat()
        var copy = stat()
        stat(trees.top + "/a/b", &source)
        stat(trees.out + "/top/a/b", &copy)
        #expect(source.st_mtim.tv_sec == copy.st_mtim.tv_sec)
    }

    @Test func largeSizesUseBase256AndReadBack() throws {
        // A header for 9 GiB, past the 8 GiB of 11 octal digits, as GNU tar writes it.
        let header = TarWriter.header(
            name: Array("top".utf8), type: UInt8(ascii: "0"), mode: 0o644, size: 9 << 30, mtime: 1, linkTarget: [])
        #expect(header[124] == 0x80)
        let reader = TarReader(source: memorySource(header))
        let entry = try reader.next()
        #expect(entry?.size == 9 << 30)
        #expect(entry?.kind == .file)
    }

    @Test func specialFilesOfTheHostAreSkippedWithAWarning() throws {
        let trees = try Trees()
        defer { trees.remove() }
        mkfifo(trees.top + "/fifo", 0o644)
        let file = trees.scratch.path + "/stream.tar"
        let fd = open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        let writer = TarWriter(fd: fd)
        let warnings = try TreeArchiver(path: trees.top).write(as: Array("top".utf8), to: writer)
        try writer.finish()
        close(fd)
        #expect(warnings.count == 1 && warnings[0].contains("fifo"), "\(warnings)")
        let listing = try shell("tar -t -f '\(file)'")
        #expect(!listing.stdout.contains("fifo"))
        // A missing source says so.
        #expect(throws: ArchiveError.self) { _ = try TreeArchiver(path: trees.top + "/missing") }
    }
}
