import Foundation
import Testing
import VmpoolArchive
import VmpoolDriver
import VmpoolTestSupport

@testable import VmpoolCopy

/// The guest's side of `cp`, run here under both guests' shells and tars (busybox; dash with
/// GNU tar), fed by vmpool's own writer: atomic, never through a symlink, plain about failures.
@Suite("cp's guest scripts", .serialized)
struct CopyScriptTests {
    /// A shell and the tools the script finds on PATH, as in one of the guests.
    struct Guest: CustomStringConvertible, Sendable {
        let description: String
        let shell: String
        let path: String
    }

    static let busyboxDirectory: String? = {
        guard FileManager.default.isExecutableFile(atPath: "/bin/busybox") else { return nil }
        let dir = NSTemporaryDirectory() + "vmpool-busybox-\(getpid())"
        mkdir(dir, 0o755)
        _ = try? RunningCommand(path: "/bin/busybox", arguments: ["--install", "-s", dir], environment: [:]).wait()
        return FileManager.default.isExecutableFile(atPath: dir + "/tar") ? dir : nil
    }()

    static let guests: [Guest] =
        [Guest(description: "dash and GNU tar", shell: "/bin/sh", path: "/usr/bin:/bin")]
        + (busyboxDirectory.map { [Guest(description: "busybox", shell: $0 + "/sh", path: $0)] } ?? [])

    /// Runs the receive script with `stream` on stdin.
    func receive(
        _ guest: Guest, stream: [UInt8], dst: String, name: String = "top", kind: String = "d",
        mark: String = ".vmpool-cp-end"
    ) throws -> CommandResult {
        let target = GuestPath(dst)
        return try run(
            guest, GuestScript.receive,
            [target.path, target.parent, target.trailingSlash ? "" : target.name, name, kind, mark], stdin: stream)
    }

    func run(_ guest: Guest, _ script: String, _ arguments: [String], stdin: [UInt8]) throws -> CommandResult {
        let file = NSTemporaryDirectory() + "vmpool-stream-\(UInt64.random(in: 0...UInt64.max))"
        _ = FileManager.default.createFile(atPath: file, contents: Data(stdin))
        defer { unlink(file) }
        return try RunningCommand(
            path: "/bin/sh",
            arguments: ["-c", "exec \"$@\" < \"$STREAM\"", "wrap", guest.shell, "-c", script, "sh"]
                + arguments,
            environment: ["PATH": guest.path, "STREAM": file]
        ).wait()
    }

    /// A stream as `cp` sends it: `tree` under the name `name`, then the end mark.
    func stream(of tree: String, as name: String = "top", mark: Bool = true) throws -> [UInt8] {
        var bytes: [UInt8] = []
        let writer = TarWriter { bytes += $0 }
        _ = try TreeArchiver(path: tree).write(as: Array(name.utf8), to: writer)
        if mark { try writer.appendHeader(TarEntry(name: Array(".vmpool-cp-end".utf8), kind: .file, mode: 0o600)) }
        try writer.finish()
        return bytes
    }

    static func entries(_ path: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).sorted()
    }

    @Test(arguments: guests)
    func aTreeArrivesWholeUnderItsNameOrANewOne(_ guest: Guest) throws {
        let dir = TemporaryDirectory(prefix: "vmpool-script")
        defer { dir.remove() }
        dir.write("src/top/sub/file", "data\n")
        chmod(dir.path + "/src/top/sub/file", 0o751)
        mkdir(dir.path + "/dest", 0o755)
        let bytes = try stream(of: dir.path + "/src/top")
        let into = try receive(guest, stream: bytes, dst: dir.path + "/dest")
        #expect(into.status == 0, "\(into.stderr)")
        #expect(Self.entries(dir.path + "/dest") == ["top"])
        #expect(try String(contentsOfFile: dir.path + "/dest/top/sub/file", encoding: .utf8) == "data\n")
        var info = stat()
        stat(dir.path + "/dest/top/sub/file", &info)
        #expect(info.st_mode & 0o777 == 0o751)
        let renamed = try receive(guest, stream: bytes, dst: dir.path + "/dest/other")
        #expect(renamed.status == 0, "\(renamed.stderr)")
        #expect(Self.entries(dir.path + "/dest") == ["other", "top"])
        // A file replaces a file.
        dir.write("one", "one\n")
        let file = try stream(of: dir.path + "/one", as: "one")
        dir.write("dest/one", "old\n")
        let replaced = try receive(guest, stream: file, dst: dir.path + "/dest/", name: "one", kind: "f")
        #expect(replaced.status == 0, "\(replaced.stderr)")
        #expect(try String(contentsOfFile: dir.path + "/dest/one", encoding: .utf8) == "one\n")
        #expect(Self.entries(dir.path + "/dest") == ["one", "other", "top"])
    }

    @Test(arguments: guests)
    func anExistingDirectoryIsNeitherMergedNorReplaced(_ guest: Guest) throws {
        let dir = TemporaryDirectory(prefix: "vmpool-script")
        defer { dir.remove() }
        dir.write("src/top/new", "new\n")
        dir.write("dest/top/mine", "mine\n")
        let result = try receive(guest, stream: try stream(of: dir.path + "/src/top"), dst: dir.path + "/dest")
        #expect(result.status != 0)
        let message = CopyErrors.receive(.exited(result.status), output: result.stderr, path: dir.path + "/dest")
        #expect(message?.hasPrefix("\(dir.path)/dest/top already exists in the guest") == true, "\(message ?? "")")
        #expect(Self.entries(dir.path + "/dest") == ["top"])
        #expect(Self.entries(dir.path + "/dest/top") == ["mine"])
    }

    @Test(arguments: guests)
    func aSymlinkAtTheDestinationIsReplacedNotFollowed(_ guest: Guest) throws {
        let dir = TemporaryDirectory(prefix: "vmpool-script")
        defer { dir.remove() }
        dir.write("outside/target", "keep\n")
        mkdir(dir.path + "/dest", 0o755)
        symlink(dir.path + "/outside/target", dir.path + "/dest/one")
        symlink(dir.path + "/outside", dir.path + "/dest/linkdir")
        dir.write("one", "one\n")
        let file = try stream(of: dir.path + "/one", as: "one")
        let result = try receive(guest, stream: file, dst: dir.path + "/dest/one", name: "one", kind: "f")
        #expect(result.status == 0, "\(result.stderr)")
        #expect(try String(contentsOfFile: dir.path + "/outside/target", encoding: .utf8) == "keep\n")
        var info = stat()
        lstat(dir.path + "/dest/one", &info)
        #expect(info.st_mode & S_IFMT == S_IFREG)
        dir.write("src/linkdir/x", "x\n")
        let tree = try stream(of: dir.path + "/src/linkdir", as: "linkdir")
        // DST names the symlink itself (the user's own path), so the copy goes into its directory...
        let followed = try receive(guest, stream: tree, dst: dir.path + "/dest/linkdir/", name: "linkdir")
        #expect(followed.status == 0, "\(followed.stderr)")
        #expect(Self.entries(dir.path + "/outside") == ["linkdir", "target"])
        let direct = try receive(guest, stream: tree, dst: dir.path + "/dest", name: "linkdir")
        // ...but a copy into dest whose entry name is taken by a symlink is refused.
        #expect(direct.status != 0)
        #expect(direct.stderr.contains("vmpool-cp: exists"), "\(direct.stderr)")
    }

    @Test(arguments: guests)
    func aStreamCutShortLeavesNothing(_ guest: Guest) throws {
        let dir = TemporaryDirectory(prefix: "vmpool-script")
        defer { dir.remove() }
        dir.write("src/top/a", "a\n")
        dir.write("src/top/b", String(repeating: "b", count: 100_000))
        mkdir(dir.path + "/dest", 0o755)
        // At an entry's end, without the mark: tar is content, the script is not.
        let whole = try stream(of: dir.path + "/src/top", mark: false)
        let cut = try receive(guest, stream: whole, dst: dir.path + "/dest")
        #expect(cut.status != 0)
        #expect(
            CopyErrors.receive(.exited(cut.status), output: cut.stderr, path: dir.path + "/dest")
                == "the copy to \(dir.path)/dest/top ended early; nothing was copied", "\(cut.stderr)")
        #expect(Self.entries(dir.path + "/dest").isEmpty)
        // Inside an entry.
        let marked = try stream(of: dir.path + "/src/top")
        let inside = try receive(guest, stream: Array(marked[0..<50_000]), dst: dir.path + "/dest")
        #expect(inside.status != 0)
        #expect(Self.entries(dir.path + "/dest").isEmpty)
    }

    @Test(arguments: guests)
    func missingDirectoriesAreNamed(_ guest: Guest) throws {
        let dir = TemporaryDirectory(prefix: "vmpool-script")
        defer { dir.remove() }
        dir.write("one", "one\n")
        dir.write("afile", "")
        let file = try stream(of: dir.path + "/one", as: "one")
        for (dst, expected) in [
            (dir.path + "/nope/one", "no such file or directory in the guest: \(dir.path)/nope"),
            (dir.path + "/nope/", "no such file or directory in the guest: \(dir.path)/nope"),
            (dir.path + "/afile/one", "not a directory in the guest: \(dir.path)/afile"),
        ] {
            let result = try receive(guest, stream: file, dst: dst, name: "one", kind: "f")
            #expect(result.status != 0)
            #expect(CopyErrors.receive(.exited(result.status), output: result.stderr, path: dst) == expected)
        }
        // Sending a path that is not there.
        let send = try run(guest, GuestScript.send, [dir.path + "/nope", dir.path, "nope"], stdin: [])
        #expect(
            CopyErrors.send(.exited(send.status), output: send.stderr, path: dir.path + "/nope")
                == "no such file or directory in the guest: \(dir.path)/nope")
    }

    @Test(arguments: guests)
    func aKilledCopyLeavesNoTemporaryDirectory(_ guest: Guest) throws {
        let dir = TemporaryDirectory(prefix: "vmpool-script")
        defer { dir.remove() }
        mkdir(dir.path + "/dest", 0o755)
        // The script waits on a fifo that never ends: killed the way the agent kills a
        // command (its whole process group), its temporary directory must still go.
        let fifo = dir.path + "/fifo"
        mkfifo(fifo, 0o600)
        let target = GuestPath(dir.path + "/dest")
        let command = try RunningCommand(
            path: "/usr/bin/setsid",
            arguments: [
                "/bin/sh", "-c", "exec \"$@\" < \"$FIFO\"", "wrap", guest.shell, "-c", GuestScript.receive, "sh",
                target.path, target.parent, target.name, "top", "d", ".vmpool-cp-end",
            ], environment: ["PATH": guest.path, "FIFO": fifo])
        var writer: Int32 = -1
        #expect(
            eventually(timeout: .seconds(60)) {
                writer = open(fifo, O_WRONLY | O_NONBLOCK | O_CLOEXEC); return writer >= 0
            })
        defer { close(writer) }
        #expect(
            eventually(timeout: .seconds(60)) {
                Self.entries(dir.path + "/dest").contains { $0.hasPrefix(".vmpool-cp.") }
            })
        kill(-command.pid, SIGKILL)
        _ = command.wait()
        #expect(
            eventually(timeout: .seconds(60)) { Self.entries(dir.path + "/dest").isEmpty },
            "\(Self.entries(dir.path + "/dest"))")
    }

    @Test(.enabled(if: geteuid() == 0, "mounting a small tmpfs needs root"), arguments: guests)
    func noSpaceIsSaidPlainlyAndLeavesNothing(_ guest: Guest) throws {
        let dir = TemporaryDirectory(prefix: "vmpool-script")
        defer { dir.remove() }
        mkdir(dir.path + "/small", 0o755)
        let mounted = try RunningCommand(
            path: "/bin/mount", arguments: ["-t", "tmpfs", "-o", "size=1m", "tmpfs", dir.path + "/small"],
            environment: [:]
        ).wait()
        try #require(mounted.status == 0, "mount: \(mounted.stderr)")
        defer {
            _ = try? RunningCommand(path: "/bin/umount", arguments: [dir.path + "/small"], environment: [:]).wait()
        }
        _ = FileManager.default.createFile(
            atPath: dir.path + "/big", contents: Data([UInt8](repeating: 7, count: 3 << 20)))
        let file = try stream(of: dir.path + "/big", as: "big")
        let result = try receive(guest, stream: file, dst: dir.path + "/small/big", name: "big", kind: "f")
        #expect(result.status != 0)
        #expect(
            CopyErrors.receive(.exited(result.status), output: result.stderr, path: dir.path + "/small/big")
                == "no space left on device in the guest (\(dir.path)/small); nothing was copied", "\(result.stderr)")
        #expect(Self.entries(dir.path + "/small").isEmpty)
    }

    @Test func guestPathsAreNormalizedByTheirText() {
        #expect(GuestPath("/tmp/x/") == GuestPath("/tmp/./x/"))
        let path = GuestPath("tmp/../work//out/")
        #expect(path.path == "/work/out" && path.parent == "/work" && path.name == "out" && path.trailingSlash)
        #expect(GuestPath("/").path == "/" && GuestPath("/..").path == "/")
        #expect(GuestPath("/a").parent == "/")
    }

    @Test func guestFailuresAreSaidInPlainWords() {
        let busyboxFull = "tar: write error: No space left on device\nvmpool-cp: failed /tmp\n"
        #expect(
            CopyErrors.receive(.exited(3), output: busyboxFull, path: "/tmp/big")
                == "no space left on device in the guest (/tmp); nothing was copied")
        let gnuFull =
            "tar: big: Wrote only 4096 of 10240 bytes\ntar: big: Cannot write: No space left on device\n"
            + "vmpool-cp: failed /srv\n"
        #expect(
            CopyErrors.receive(.exited(3), output: gnuFull, path: "/srv/big")
                == "no space left on device in the guest (/srv); nothing was copied")
        #expect(
            CopyErrors.receive(.exited(3), output: "vmpool-cp: missing /x\n", path: "/x/y")
                == "no such file or directory in the guest: /x")
        #expect(
            CopyErrors.receive(
                .exited(3), output: "mktemp: Read-only file system\nvmpool-cp: failed /ro\n", path: "/ro")
                == "read-only file system in the guest (/ro); nothing was copied")
        #expect(
            CopyErrors.send(.exited(2), output: "tar: x/y: Cannot open: Permission denied\n", path: "/x")
                == "permission denied in the guest, reading /x (tar: x/y: Cannot open: Permission denied)")
        #expect(CopyErrors.send(.exited(0), output: "", path: "/x") == nil)
        #expect(
            CopyErrors.send(.notRun(code: 127, message: "sh: not found"), output: "", path: "/x")?.contains(
                "sh: not found") == true)
        for message in [
            CopyErrors.receive(.exited(1), output: "", path: "/x"),
            CopyErrors.send(.exited(141), output: "", path: "/x"),
        ] {
            #expect(message?.contains("status") == false && message?.contains("?") == false, "\(message ?? "")")
        }
    }
}
