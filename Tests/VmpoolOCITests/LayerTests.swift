import Foundation
import Testing
import VmpoolArchive
import VmpoolTestSupport

@testable import VmpoolOCI

/// Layers applied to a staging tree: the OCI rules, and nothing outside the tree, on hostile input.
@Suite("Image layers", .enabled(if: geteuid() == 0, "layers keep owners and setuid bits, which needs root"))
struct LayerTests {
    /// A staging tree with `layers` applied in order.
    final class Tree {
        let dir = TemporaryDirectory(prefix: "layers")
        let fd: Int32
        var applier: LayerApplier

        init() {
            fd = open(dir.path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            applier = LayerApplier(root: fd)
        }

        deinit {
            close(fd)
            dir.remove()
        }

        func apply(_ layers: [LayerItem]..., name: String = "layer") throws {
            for (index, items) in layers.enumerated() {
                let bytes = try OCIImageBuilder.layer(items)
                var offset = 0
                let reader = TarReader { buffer in
                    let count = min(buffer.count, bytes.count - offset)
                    bytes.withUnsafeBytes {
                        buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[offset..<offset + count]))
                    }
                    offset += count
                    return count
                }
                try applier.apply(reader, layer: "\(name) \(index + 1)")
            }
        }

        func path(_ name: String) -> String { dir.path + "/" + name }

        func read(_ name: String) -> String? {
            FileManager.default.contents(atPath: path(name)).map { String(decoding: $0, as: UTF8.self) }
        }

        func exists(_ name: String) -> Bool {
            var info = stat()
            return lstat(path(name), &info) == 0
        }

        func info(_ name: String) -> stat {
            var info = stat()
            lstat(path(name), &info)
            return info
        }

        func list(_ name: String) -> [String] {
            ((try? FileManager.default.contentsOfDirectory(atPath: path(name))) ?? []).sorted()
        }
    }

    @Test func whiteoutsHideFilesOfTheLayersBelow() throws {
        let tree = Tree()
        try tree.apply(
            [.directory("etc"), .file("etc/a", "a"), .file("etc/b", "b"), .directory("etc/d"), .file("etc/d/x", "x")],
            [.whiteout("etc/a"), .whiteout("etc/d"), .file("etc/c", "c")])
        #expect(tree.list("etc") == ["b", "c"])
        #expect(!tree.exists("etc/.wh.a"))
    }

    @Test func anOpaqueDirectoryKeepsOnlyItsOwnLayersEntries() throws {
        let tree = Tree()
        try tree.apply(
            [
                .directory("opt"), .directory("opt/app"), .file("opt/app/old", "1"), .directory("opt/app/sub"),
                .file("opt/app/sub/lower", "2"), .file("opt/other", "3"),
            ],
            // The marker after the layer's own entries in the directory, and a directory of the
            // same name below it whose lower content must go too.
            [.directory("opt/app/sub"), .file("opt/app/sub/upper", "4"), .file("opt/app/new", "5"), .opaque("opt/app")])
        #expect(tree.list("opt/app") == ["new", "sub"])
        #expect(tree.list("opt/app/sub") == ["upper"])
        #expect(tree.read("opt/other") == "3")
        #expect(!tree.exists("opt/app/.wh..wh..opq"))
    }

    @Test func linksModesAndOwnersAreKept() throws {
        let tree = Tree()
        try tree.apply([
            .directory("usr"), .directory("usr/bin"),
            .file("usr/bin/su", "su", mode: 0o4755), .file("usr/bin/wall", "wall", mode: 0o2755, gid: 5),
            .directory("tmp", mode: 0o1777),
            .directory("home"), .directory("home/u", mode: 0o700, uid: 1000, gid: 1000),
            .file("home/u/secret", "s", mode: 0o600, uid: 1000, gid: 1000),
            .symlink("home/u/link", to: "/etc/passwd", uid: 1000, gid: 1000),
            .hardLink("usr/bin/su2", to: "usr/bin/su"),
        ])
        #expect(tree.info("usr/bin/su").st_mode & 0o7777 == 0o4755)
        #expect(tree.info("usr/bin/wall").st_mode & 0o7777 == 0o2755 && tree.info("usr/bin/wall").st_gid == 5)
        #expect(tree.info("tmp").st_mode & 0o7777 == 0o1777)
        #expect(tree.info("home/u").st_uid == 1000 && tree.info("home/u").st_mode & 0o777 == 0o700)
        #expect(tree.info("home/u/secret").st_uid == 1000 && tree.info("home/u/secret").st_gid == 1000)
        #expect(tree.info("home/u/link").st_mode & S_IFMT == S_IFLNK && tree.info("home/u/link").st_uid == 1000)
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: tree.path("home/u/link")) == "/etc/passwd")
        #expect(tree.info("usr/bin/su2").st_ino == tree.info("usr/bin/su").st_ino)
        #expect(tree.info("usr/bin/su").st_nlink == 2)
        #expect(tree.info("usr/bin/su").st_mtim.tv_sec == 1_700_000_000)
    }

    @Test func aLayerReplacesADirectoryWithAFileAndAFileWithADirectory() throws {
        let tree = Tree()
        try tree.apply(
            [.directory("srv"), .directory("srv/data"), .file("srv/data/x", "x"), .file("srv/conf", "c")],
            [.file("srv/data", "now a file"), .directory("srv/conf"), .file("srv/conf/y", "y")])
        #expect(tree.read("srv/data") == "now a file")
        #expect(tree.info("srv/conf").st_mode & S_IFMT == S_IFDIR)
        #expect(tree.read("srv/conf/y") == "y")
    }

    @Test func pathsResolveInsideTheRootAsTheGuestSeesThem() throws {
        let outside = TemporaryDirectory(prefix: "outside")
        defer { outside.remove() }
        let tree = Tree()
        // Merged /usr: an upper layer's lib/x lands in usr/lib/x; symlinks pointing out of the
        // root (absolute, or by ..) resolve inside it; an entry over a symlink replaces the link.
        try tree.apply(
            [
                .directory("usr"), .directory("usr/lib"), .symlink("lib", to: "usr/lib"),
                .symlink("escape", to: outside.path), .symlink("up", to: "../../../../.." + outside.path),
                .symlink("victim", to: outside.path + "/target"),
            ],
            [
                .file("lib/x", "x"), .file("escape/abs", "a"), .file("up/rel", "r"), .file("/absolute-name", "n"),
                .file("victim", "v"),
            ])
        #expect(tree.read("usr/lib/x") == "x")
        #expect(tree.read(String(outside.path.dropFirst()) + "/abs") == "a")
        #expect(tree.read(String(outside.path.dropFirst()) + "/rel") == "r")
        #expect(tree.read("absolute-name") == "n")
        #expect(tree.read("victim") == "v" && tree.info("victim").st_mode & S_IFMT == S_IFREG)
        #expect(outside.entries.isEmpty, "written outside the root: \(outside.entries)")
    }

    @Test func namesWithDotDotAndLinkLoopsAreRefusedNamingLayerAndEntry() throws {
        let tree = Tree()
        do {
            let error = #expect(throws: (any Error).self) {
                try tree.apply([.file("etc/../../x", "x")], name: "hostile")
            }
            let text = error.map { "\($0)" } ?? ""
            #expect(text.contains("hostile 1") && text.contains("etc/../../x") && text.contains(".."), "\(text)")
        }
        let loop = Tree()
        do {
            let error = #expect(throws: (any Error).self) {
                try loop.apply([.symlink("a", to: "b"), .symlink("b", to: "a"), .file("a/x", "x")], name: "loop")
            }
            let text = error.map { "\($0)" } ?? ""
            #expect(text.contains("loop 1") && text.contains("symlinks"), "\(text)")
        }
        let hard = Tree()
        do {
            let error = #expect(throws: (any Error).self) {
                try hard.apply([.hardLink("x", to: "no/such")], name: "links")
            }
            let text = error.map { "\($0)" } ?? ""
            #expect(text.contains("links 1") && text.contains("not in the image"), "\(text)")
        }
    }

    @Test func theDataOfAllLayersIsBounded() throws {
        let tree = Tree()
        tree.applier.maxBytes = 10
        do {
            let error = #expect(throws: (any Error).self) {
                try tree.apply([.file("a", "12345678"), .file("b", "12345678")], name: "big")
            }
            let text = error.map { "\($0)" } ?? ""
            #expect(text.contains("big 1") && text.contains("\"b\"") && text.contains("limit"), "\(text)")
        }
    }
}
