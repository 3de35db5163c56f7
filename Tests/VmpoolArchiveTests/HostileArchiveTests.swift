import Foundation
import Testing
import VmpoolArchive
import VmpoolTestSupport

/// Archives a hostile guest could send instead of its files: each must land nothing outside the
/// destination, nothing privileged, and nothing at all when it is refused.
@Suite("Hostile archives")
struct HostileArchiveTests {
    @Test func setuidSetgidAndStickyBitsAreDropped() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        var tar = TarBuilder()
        tar.entry("top/", type: "5", mode: 0o1777)
        tar.entry("top/suid", mode: 0o4755, data: Array("x".utf8))
        tar.entry("top/sgid", mode: 0o2711, data: Array("y".utf8))
        tar.entry("top/sticky-dir/", type: "5", mode: 0o1755)
        tar.end()
        let result = scratch.extract(tar.bytes)
        #expect(throws: Never.self) { try result.get() }
        for (path, expected) in [("top", 0o777), ("top/suid", 0o755), ("top/sgid", 0o711), ("top/sticky-dir", 0o755)] {
            var info = stat()
            #expect(lstat(scratch.dest + "/" + path, &info) == 0, "\(path) was not created")
            #expect(info.st_mode & 0o7777 == expected, "\(path): mode \(String(info.st_mode & 0o7777, radix: 8))")
            #expect(info.st_uid == geteuid() && info.st_gid == getegid(), "\(path) is owned by \(info.st_uid)")
        }
    }

    @Test func deviceNodesAndFifosAreSkippedWithAWarning() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        var tar = TarBuilder()
        tar.entry("top/", type: "5", mode: 0o755)
        tar.entry("top/null", type: "3", mode: 0o666)
        tar.entry("top/sda", type: "4", mode: 0o660)
        tar.entry("top/pipe", type: "6", mode: 0o644)
        tar.entry("top/kept", data: Array("kept".utf8))
        tar.end()
        let warnings = try scratch.extract(tar.bytes).get()
        #expect(warnings.count == 3, "\(warnings)")
        #expect(warnings.contains { $0.contains("top/null") && $0.contains("character device") })
        #expect(warnings.contains { $0.contains("top/sda") && $0.contains("block device") })
        #expect(warnings.contains { $0.contains("top/pipe") && $0.contains("fifo") })
        #expect(Set(try FileManager.default.contentsOfDirectory(atPath: scratch.dest + "/top")) == ["kept"])
        // A requested entry that is itself a device node copies nothing and says why.
        var device = TarBuilder()
        device.entry("top", type: "3", mode: 0o666)
        device.end()
        let refused = scratch.expectRefused(device.bytes, .unsupported, requested: "top")
        #expect(refused?.message.contains("character device") == true)
    }

    @Test func dotDotAndAbsoluteNamesAreRefused() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        for name in ["../escape", "top/../../escape", "top/a/../../../escape", "/abs", "/top/abs", ".."] {
            var tar = TarBuilder()
            tar.entry("top/", type: "5")
            tar.entry("top/fine", data: [1, 2, 3])
            tar.entry(name, data: Array("evil".utf8))
            tar.end()
            _ = scratch.expectRefused(tar.bytes, .unsafeName)
        }
        // The same through a pax path and a GNU long name.
        var pax = TarBuilder()
        pax.pax([("path", "top/../../escape")])
        pax.entry("top/innocent", data: [1])
        pax.end()
        _ = scratch.expectRefused(pax.bytes, .unsafeName)
        var long = TarBuilder()
        long.longName(Array(("/" + String(repeating: "x", count: 120)).utf8))
        long.entry("top/innocent", data: [1])
        long.end()
        _ = scratch.expectRefused(long.bytes, .unsafeName)
    }

    @Test func aFileWrittenThroughASymlinkIsRefused() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        for target in [scratch.outside, "../../outside", "../.."] {
            var tar = TarBuilder()
            tar.entry("top/", type: "5")
            tar.entry("top/link", type: "2", link: target)
            tar.entry("top/link/pwned", data: Array("evil".utf8))
            tar.end()
            let error = scratch.expectRefused(tar.bytes, .throughLink)
            #expect(error?.message.contains("top/link") == true, "\(error?.message ?? "")")
            #expect(try FileManager.default.contentsOfDirectory(atPath: scratch.outside).isEmpty)
        }
        // A symlink as the parent of a directory entry, and of a hard link.
        var directory = TarBuilder()
        directory.entry("top/", type: "5")
        directory.entry("top/link", type: "2", link: scratch.outside)
        directory.entry("top/link/sub/", type: "5")
        directory.end()
        _ = scratch.expectRefused(directory.bytes, .throughLink)
        var symlinkTop = TarBuilder()
        symlinkTop.entry("top", type: "2", link: scratch.outside)
        symlinkTop.entry("top/pwned", data: [1])
        symlinkTop.end()
        _ = scratch.expectRefused(symlinkTop.bytes, .throughLink)
    }

    @Test func symlinksAreCreatedButNeverFollowed() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        var tar = TarBuilder()
        tar.entry("top/", type: "5")
        tar.entry("top/out", type: "2", link: scratch.outside + "/target")
        tar.entry("top/out", data: Array("replaced".utf8))
        tar.end()
        // A later file of the same name replaces the symlink; it is not written through.
        _ = try scratch.extract(tar.bytes).get()
        #expect(!FileManager.default.fileExists(atPath: scratch.outside + "/target"))
        #expect(bytes(of: scratch.dest + "/top/out") == Array("replaced".utf8))
    }

    @Test func aSymlinkAlreadyAtTheDestinationIsNotFollowed() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        _ = FileManager.default.createFile(atPath: scratch.outside + "/target", contents: Data("keep".utf8))
        symlink(scratch.outside + "/target", scratch.dest + "/top")
        var file = TarBuilder()
        file.entry("top", data: Array("new".utf8))
        file.end()
        _ = try scratch.extract(file.bytes).get()
        #expect(bytes(of: scratch.outside + "/target") == Array("keep".utf8))
        #expect(bytes(of: scratch.dest + "/top") == Array("new".utf8))
        var info = stat()
        lstat(scratch.dest + "/top", &info)
        #expect(info.st_mode & S_IFMT == S_IFREG)
        // A directory where a symlink to a directory is: refused, not merged through it.
        unlink(scratch.dest + "/top")
        symlink(scratch.outside, scratch.dest + "/top")
        var directory = TarBuilder()
        directory.entry("top/", type: "5")
        directory.entry("top/pwned", data: [1])
        directory.end()
        _ = scratch.expectRefused(directory.bytes, .exists)
        #expect(try FileManager.default.contentsOfDirectory(atPath: scratch.outside) == ["target"])
    }

    @Test func entriesOutsideTheRequestedNameAreRefused() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        for name in ["sibling", "topx/file", "other/top/file", "./sibling"] {
            var tar = TarBuilder()
            tar.entry("top/", type: "5")
            tar.entry("top/a", data: [1])
            tar.entry(name, data: [2])
            tar.end()
            _ = scratch.expectRefused(tar.bytes, .outsideRequest)
        }
        // "./top/..." is the requested name.
        var dotted = TarBuilder()
        dotted.entry("./top/", type: "5")
        dotted.entry("./top/a", data: [1])
        dotted.end()
        _ = try scratch.extract(dotted.bytes).get()
        #expect(bytes(of: scratch.dest + "/top/a") == [1])
    }

    @Test func hugeDeclaredSizesAreRefusedBeforeAnythingIsRead() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        var tar = TarBuilder()
        // 1 TiB, base-256 as GNU tar writes sizes past 8 GiB.
        tar.entry("top", sizeField: [0x80, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0])
        let error = scratch.expectRefused(tar.bytes, .limit)
        #expect(error?.message.contains("1099511627776") == true, "\(error?.message ?? "")")
        var limits = ArchiveLimits()
        limits.maxBytes = 1 << 20
        var small = TarBuilder()
        small.entry("top", size: 2 << 20)
        _ = scratch.expectRefused(small.bytes, .limit, limits: limits)
        // Too many entries.
        limits = ArchiveLimits()
        limits.maxEntries = 10
        var many = TarBuilder()
        many.entry("top/", type: "5")
        for index in 0..<20 { many.entry("top/\(index)", data: []) }
        many.end()
        _ = scratch.expectRefused(many.bytes, .limit, limits: limits)
        // A negative base-256 size.
        var negative = TarBuilder()
        negative.entry("top", sizeField: [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff])
        _ = scratch.expectRefused(negative.bytes, .malformed)
    }

    @Test func truncatedStreamsLeaveNothing() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        var tar = TarBuilder()
        tar.entry("top/", type: "5")
        tar.entry("top/done", data: Array(repeating: 7, count: 3000))
        tar.entry("top/big", size: 100_000, data: [])
        tar.append(Array(repeating: 9, count: 5000))
        let error = scratch.expectRefused(tar.bytes, .truncated)
        #expect(error?.message.contains("top/big") == true, "\(error?.message ?? "")")
        // Cut at an entry's end: no end-of-archive marker.
        var boundary = TarBuilder()
        boundary.entry("top/", type: "5")
        boundary.entry("top/done", data: [1, 2, 3])
        _ = scratch.expectRefused(boundary.bytes, .truncated)
        // Cut inside a header.
        _ = scratch.expectRefused(Array(boundary.bytes[0..<700]), .truncated)
        // Nothing at all.
        _ = scratch.expectRefused([], .truncated)
    }

    @Test func paxRecordsWithHugeOrBrokenLengthsAreRefused() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let broken: [[UInt8]] = [
            Array("99999999999 path=top/x\n".utf8),
            Array("18446744073709551620 path=top/x\n".utf8),
            Array("5 path=top/x\n".utf8),
            Array("x path=top/x\n".utf8),
            Array("16 path=top/x\n".utf8),
            Array("14 pathtop/xx\n".utf8),
        ]
        for data in broken {
            var tar = TarBuilder()
            tar.paxRaw(data)
            tar.entry("top", data: [1])
            tar.end()
            _ = scratch.expectRefused(tar.bytes, .malformed)
        }
        // A pax header that declares 1 GiB, and a path record past PATH_MAX.
        var huge = TarBuilder()
        huge.paxRaw(Array("20 path=top/xxxxxxx\n".utf8), declared: 1 << 30)
        _ = scratch.expectRefused(huge.bytes, .limit)
        var longPath = TarBuilder()
        longPath.pax([("path", "top/" + String(repeating: "p", count: 5000))])
        longPath.entry("top", data: [1])
        longPath.end()
        _ = scratch.expectRefused(longPath.bytes, .limit)
        // A pax size that is not a number, and a sparse file.
        var size = TarBuilder()
        size.pax([("size", "12abc")])
        size.entry("top", data: [1])
        size.end()
        _ = scratch.expectRefused(size.bytes, .malformed)
        var sparse = TarBuilder()
        sparse.pax([("GNU.sparse.major", "1")])
        sparse.entry("top", data: [1])
        sparse.end()
        _ = scratch.expectRefused(sparse.bytes, .unsupported)
    }

    @Test func gnuLongNameBombsAreRefused() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        // One long name that declares 1 GiB (nothing that large is read or allocated).
        var huge = TarBuilder()
        huge.longName(Array("top/x".utf8), declared: 1 << 30)
        _ = scratch.expectRefused(huge.bytes, .limit)
        // One just past PATH_MAX.
        var long = TarBuilder()
        long.longName(Array(("top/" + String(repeating: "y", count: 5000)).utf8))
        long.entry("top", data: [1])
        long.end()
        _ = scratch.expectRefused(long.bytes, .limit)
        // A chain of long names in front of one entry.
        var chain = TarBuilder()
        for _ in 0..<50 { chain.longName(Array(("top/" + String(repeating: "z", count: 4000)).utf8)) }
        chain.entry("top", data: [1])
        chain.end()
        _ = scratch.expectRefused(chain.bytes, .limit)
        // A name deeper than the limit.
        var deep = TarBuilder()
        deep.longName(Array(("top" + String(repeating: "/d", count: 300)).utf8))
        deep.entry("ignored", data: [1])
        deep.end()
        _ = scratch.expectRefused(deep.bytes, .limit)
    }

    @Test func hardLinksOutsideTheCopyAreRefused() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        var before = stat()
        stat("/etc/passwd", &before)
        for (target, code) in [
            ("/etc/passwd", ArchiveError.Code.unsafeName), ("../../etc/passwd", .unsafeName),
            ("top/../../etc/passwd", .unsafeName), ("etc/passwd", .outsideRequest),
            ("top/not-copied", .unsupported), ("top/dir", .unsupported),
        ] {
            var tar = TarBuilder()
            tar.entry("top/", type: "5")
            tar.entry("top/dir/", type: "5")
            tar.entry("top/pw", type: "1", link: target)
            tar.end()
            _ = scratch.expectRefused(tar.bytes, code)
        }
        var after = stat()
        stat("/etc/passwd", &after)
        #expect(after.st_nlink == before.st_nlink)
        // A hard link to a file of the copy is made, inside it.
        var inside = TarBuilder()
        inside.entry("top/", type: "5")
        inside.entry("top/a", data: Array("shared".utf8))
        inside.entry("top/b", type: "1", link: "top/a")
        inside.end()
        _ = try scratch.extract(inside.bytes).get()
        var a = stat()
        var b = stat()
        stat(scratch.dest + "/top/a", &a)
        stat(scratch.dest + "/top/b", &b)
        #expect(a.st_ino == b.st_ino && a.st_nlink == 2)
        // A hard link to a symlink that points out is refused (only files are linked).
        var toLink = TarBuilder()
        toLink.entry("top/", type: "5")
        toLink.entry("top/l", type: "2", link: "/etc/passwd")
        toLink.entry("top/h", type: "1", link: "top/l")
        toLink.end()
        let other = Scratch()
        defer { other.remove() }
        _ = other.expectRefused(toLink.bytes, .unsupported)
    }

    @Test func malformedHeadersAreRefused() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        var checksum = TarBuilder()
        checksum.entry("top", data: [1], breakChecksum: true)
        checksum.end()
        _ = scratch.expectRefused(checksum.bytes, .malformed)
        var octal = TarBuilder()
        octal.entry("top", sizeField: Array("00000000009\0".utf8))
        octal.end()
        _ = scratch.expectRefused(octal.bytes, .malformed)
        var garbage = [UInt8](repeating: 0x41, count: 4096)
        garbage[0] = 0x42
        _ = scratch.expectRefused(garbage, .malformed)
        var unknown = TarBuilder()
        unknown.entry("top", type: "S", data: [1])
        unknown.end()
        _ = scratch.expectRefused(unknown.bytes, .unsupported)
        // The same name as a directory and as a file.
        var conflict = TarBuilder()
        conflict.entry("top/", type: "5")
        conflict.entry("top/x/", type: "5")
        conflict.entry("top/x", data: [1])
        conflict.end()
        _ = scratch.expectRefused(conflict.bytes, .conflict)
        // Garbage after the end marker beyond the bound.
        var trailing = TarBuilder()
        trailing.entry("top", data: [1])
        trailing.end()
        var limits = ArchiveLimits()
        limits.maxTrailingBytes = 4096
        _ = scratch.expectRefused(trailing.bytes + [UInt8](repeating: 1, count: 10000), .limit, limits: limits)
    }

    @Test func aDestinationThatCannotBeWrittenFailsPlainly() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        _ = FileManager.default.createFile(atPath: scratch.root.path + "/a-file", contents: Data())
        #expect(throws: ArchiveError.self) {
            try SafeExtractor(directory: scratch.root.path + "/a-file", name: "top", requested: Array("top".utf8))
        }
        do {
            _ = try SafeExtractor(directory: scratch.root.path + "/missing", name: "top", requested: Array("top".utf8))
            Issue.record("a missing directory was accepted")
        } catch {
            #expect(error.message == "no such directory on the host: \(scratch.root.path)/missing")
        }
        // A directory already at the destination is neither merged into nor replaced.
        mkdir(scratch.dest + "/top", 0o755)
        _ = FileManager.default.createFile(atPath: scratch.dest + "/top/mine", contents: Data("mine".utf8))
        var tar = TarBuilder()
        tar.entry("top/", type: "5")
        tar.entry("top/theirs", data: [1])
        tar.end()
        _ = scratch.expectRefused(tar.bytes, .exists)
        // A file where a directory is: refused.
        var file = TarBuilder()
        file.entry("top", data: [1])
        file.end()
        _ = scratch.expectRefused(file.bytes, .exists)
    }

    @Test(
        "No space on the host names the entry and leaves nothing",
        .enabled(if: geteuid() == 0, "mounting a small tmpfs needs root"))
    func noSpaceOnTheHostNamesTheEntry() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let mounted = try RunningCommand(
            path: "/bin/mount", arguments: ["-t", "tmpfs", "-o", "size=1m", "tmpfs", scratch.dest], environment: [:]
        ).wait()
        try #require(mounted.status == 0, "mount: \(mounted.stderr)")
        defer { _ = try? RunningCommand(path: "/bin/umount", arguments: [scratch.dest], environment: [:]).wait() }
        var tar = TarBuilder()
        tar.entry("top/", type: "5")
        tar.entry("top/big", data: [UInt8](repeating: 1, count: 3 << 20))
        tar.end()
        let error = scratch.expectRefused(tar.bytes, .hostIO)
        #expect(
            error?.message == "cannot write \(scratch.dest)/top/big on the host: no space left on device",
            "\(error?.message ?? "")")
        #expect(try FileManager.default.contentsOfDirectory(atPath: scratch.dest).isEmpty)
    }
}
