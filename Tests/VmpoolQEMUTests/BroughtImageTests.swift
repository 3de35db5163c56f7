import Foundation
import Testing
import VmpoolArchive
import VmpoolTestSupport

/// Root disks vmpool did not build with its agent: an OCI image's (hand-made, and one a real
/// tool wrote) and a Debian disk without the agent. Each boots with the agent the initramfs
/// carries, and exec, cp and identity work.
@Suite(
    "Images the user brings, on real QEMU", .serialized,
    .enabled(if: QemuEnvironment.available, "\(QemuEnvironment.skipReason ?? "")"))
struct BroughtImageTests {
    static let debianDisk = ProcessInfo.processInfo.environment["VMPOOL_TEST_DEBIAN"]

    static func pool(_ name: String, disk: String, size: Int = 1, boot: String = "template", memory: String = "256Mi")
        -> String
    {
        """
        apiVersion: vmpool/v1
        kind: Pool
        metadata: {name: \(name)}
        spec:
          size: \(size)
          vcpus: 1
          memory: \(memory)
          boot: \(boot)
          image: {cmdline: "console=ttyS0 quiet root=/dev/vda"}
          disks:
            - {name: root, image: \(disk)}

        """
    }

    func apply(_ box: QemuSandbox, _ text: String) throws {
        let result = try box.run(["apply", "-f", box.write(text)])
        #expect(result.status == 0, "apply failed: \(result.stdout)\n\(result.stderr)")
    }

    /// A busybox root file system as one layer: the static busybox and the links of the applets.
    static func busyboxLayer() throws -> [LayerItem] {
        let busybox = try #require(FileManager.default.contents(atPath: "/bin/busybox"))
        var items: [LayerItem] = [
            .directory("bin"), .directory("etc"), .directory("tmp", mode: 0o1777), .directory("root", mode: 0o700),
            .directory("usr"), .directory("usr/bin"), .directory("srv"),
            LayerItem(
                entry: TarEntry(
                    name: Array("bin/busybox".utf8), kind: .file, mode: 0o755, size: Int64(busybox.count)),
                data: Array(busybox)),
            .file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/srv:/bin/sh\n"),
            .file("etc/hostname", "image\n"),
        ]
        for applet in ["sh", "cat", "ls", "stat", "tar", "mktemp", "mv", "rm", "mkdir", "sleep", "md5sum", "pwd"] {
            items.append(.symlink("bin/" + applet, to: "busybox"))
        }
        return items
    }

    @Test func aHandMadeOCIImageBootsWithExecCpAndItsEnvAndWorkingDir() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let archive = box.dir.path + "/app.tar"
        try OCIImageBuilder.writeArchive(
            [
                try Self.busyboxLayer() + [
                    .directory("srv/app"), .file("srv/app/gone", "lower"), .directory("srv/app/cache"),
                    .file("srv/app/cache/old", "lower"), .directory("srv/opaque"), .file("srv/opaque/lower", "1"),
                    .directory("srv/becomes-file"), .file("srv/becomes-file/x", "x"),
                ],
                [
                    .whiteout("srv/app/gone"), .opaque("srv/opaque"), .file("srv/opaque/upper", "2"),
                    .file("srv/becomes-file", "a file now\n"),
                    .file("usr/bin/setuid", "#!/bin/sh\n", mode: 0o4755),
                    .file("srv/app/owned", "mine\n", mode: 0o640, uid: 1000, gid: 1000),
                    .hardLink("srv/app/owned-too", to: "srv/app/owned"),
                    .symlink("srv/app/link", to: "/srv/becomes-file"),
                ],
            ], to: archive, name: "localhost/app:1", env: ["PATH=/usr/bin:/bin", "GREETING=hello from the image"],
            workingDir: "/srv/app")
        let images = box.dir.path + "/images"
        let built = try box.run(["image", "build", "--from", "oci-archive:" + archive, "--output", images])
        #expect(built.status == 0, "image build --from failed: \(built.stderr)")
        let disk = images + "/app.qcow2"
        #expect(FileManager.default.fileExists(atPath: disk), "\(built.stdout)")

        try apply(box, Self.pool("app", disk: disk, size: 2))
        let vms = try box.ids(pool: "app")
        #expect(vms.count == 2)
        for vm in vms {
            let env = try box.exec(
                vm, ["sh", "-c", "echo \"$GREETING\"; pwd; echo $PATH; cat /proc/1/cmdline | tr '\\0' ' '"])
            #expect(env.status == 0, "\(vm): \(env.stderr)")
            let lines = env.stdout.split(separator: "\n").map(String.init)
            #expect(lines.first == "hello from the image", "\(env.stdout)")
            #expect(lines.dropFirst().first == "/srv/app", "\(env.stdout)")
            #expect(lines.dropFirst(2).first?.hasPrefix("/usr/bin:/bin:") == true, "\(env.stdout)")
            #expect(
                lines.dropFirst(3).first?.contains("/.vmpool/guest/init image") == true,
                "PID 1 is not the carried init: \(env.stdout)")
            // The host's -e and --workdir win over the image's.
            let given = try box.exec(
                vm, ["sh", "-c", "echo $GREETING; pwd"], options: ["-e", "GREETING=x", "-w", "/tmp"])
            #expect(given.stdout == "x\n/tmp\n", "\(given.stdout)\(given.stderr)")
            let files = try box.exec(
                vm,
                [
                    "sh", "-c",
                    "ls /srv/app; ls /srv/opaque; cat /srv/becomes-file; stat -c '%a %u %g %h' /usr/bin/setuid "
                        + "/srv/app/owned; stat -c %i /srv/app/owned /srv/app/owned-too; cat /srv/app/link",
                ])
            let ino = files.stdout.split(separator: "\n").dropFirst(8).prefix(2)
            #expect(
                files.stdout.hasPrefix(
                    "cache\nlink\nowned\nowned-too\nupper\na file now\n4755 0 0 1\n640 1000 1000 2\n"),
                "\(files.stdout)\(files.stderr)")
            #expect(ino.count == 2 && ino.first == ino.last, "\(files.stdout)")
            #expect(try box.exec(vm, ["ls", "/srv/app/cache"]).stdout == "old\n")
            // Identity: each VM its own hostname.
            #expect(try box.exec(vm, ["cat", "/proc/sys/kernel/hostname"]).stdout == vm + "\n")
            // cp both ways, with the image's own sh and tar.
            let source = box.dir.write("in.txt", "copied in \(vm)\n")
            #expect(try box.run(["cp", source, "\(vm):/tmp/in.txt"]).status == 0)
            #expect(try box.exec(vm, ["cat", "/tmp/in.txt"]).stdout == "copied in \(vm)\n")
            #expect(try box.run(["cp", "\(vm):/srv/app/owned", box.dir.path + "/out-\(vm)"]).status == 0)
            #expect(FileManager.default.contents(atPath: box.dir.path + "/out-\(vm)") == Data("mine\n".utf8))
        }
    }

    @Test func anImageWithNoShellStillGetsExecAndCpFromTheCarriedBusybox() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let archive = box.dir.path + "/bare.tar"
        // No sh, no tar: only a file; the PATH it names has nothing.
        try OCIImageBuilder.writeArchive(
            [[.directory("data"), .file("data/only", "only file\n")]], to: archive, env: ["PATH=/nowhere"],
            workingDir: "/data", gzip: false)
        let images = box.dir.path + "/images"
        let unnamed = try box.run(["image", "build", "--from", "oci-archive:" + archive, "--output", images])
        #expect(unnamed.status != 0 && unnamed.stderr.contains("--name"), "\(unnamed.stderr)")
        let built = try box.run([
            "image", "build", "--from", "oci-archive:" + archive, "--output", images, "--name", "bare", "--size",
            "256M",
        ])
        #expect(built.status == 0, "\(built.stderr)")
        try apply(box, Self.pool("bare", disk: images + "/bare.qcow2", boot: "cold"))
        let vm = try #require(try box.ids(pool: "bare").first)
        let run = try box.exec(vm, ["cat", "only"])
        #expect(run.status == 0 && run.stdout == "only file\n", "\(run.stdout)\(run.stderr)")
        let source = box.dir.write("in.txt", "in\n")
        let copied = try box.run(["cp", source, "\(vm):/data/in.txt"])
        #expect(copied.status == 0, "\(copied.stderr)")
        #expect(try box.exec(vm, ["cat", "/data/in.txt"]).stdout == "in\n")
    }

    @Test func anImageBuildahWroteBoots() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let archive = box.dir.path + "/tool.tar"
        let storage = box.dir.path + "/containers"
        let made = Self.buildahImage(archive: archive, storage: storage, reference: "tool")
        let source: String
        if let reason = made {
            // buildah could not run here: umoci writes the same kind of image into a layout directory.
            print("buildah cannot build an image here (\(reason)); using umoci")
            source = try Self.umociImage(layout: box.dir.path + "/layout", scratch: box.dir.path + "/bundle")
        } else {
            source = "oci-archive:" + archive + ":tool"
        }
        let images = box.dir.path + "/images"
        let built = try box.run(["image", "build", "--from", source, "--output", images])
        #expect(built.status == 0, "\(built.stderr)")
        if made == nil {
            // The same image as buildah writes a docker archive.
            let docker = try box.run([
                "image", "build", "--from", "docker-archive:" + archive + ".docker", "--output", images, "--name",
                "tool-docker",
            ])
            #expect(docker.status == 0, "\(docker.stderr)")
            #expect(FileManager.default.fileExists(atPath: images + "/tool-docker.qcow2"))
        }
        let disk = images + "/tool.qcow2"
        try apply(box, Self.pool("tool", disk: disk))
        let vm = try #require(try box.ids(pool: "tool").first)
        let run = try box.exec(vm, ["sh", "-c", "echo $TOOL_MODE; pwd; cat /srv/tool/readme"])
        #expect(run.stdout == "fast\n/srv/tool\nbuilt by a tool\n", "\(run.stdout)\(run.stderr)")
    }

    /// `buildah from scratch`, busybox copied in, `buildah commit`, `buildah push oci-archive:`;
    /// nil when it worked, else why not.
    static func buildahImage(archive: String, storage: String, reference: String) -> String? {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/buildah") else {
            return "buildah is not installed (scripts/test installs it)"
        }
        let readme = storage + "-readme"
        _ = FileManager.default.createFile(atPath: readme, contents: Data("built by a tool\n".utf8))
        defer { try? FileManager.default.removeItem(atPath: readme) }
        let script = """
            set -e
            b() { buildah --root "$1/root" --runroot "$1/run" --storage-driver vfs "${@:2}"; }
            c=$(b "$1" from --name vmpool-test-$$ scratch)
            b "$1" copy "$c" /bin/busybox /bin/busybox
            b "$1" copy "$c" "$3" /srv/tool/readme
            b "$1" config --env TOOL_MODE=fast --workingdir /srv/tool --cmd /bin/sh "$c"
            b "$1" commit "$c" localhost/\(reference):latest >/dev/null
            b "$1" push localhost/\(reference):latest oci-archive:"$2":\(reference)
            b "$1" push localhost/\(reference):latest docker-archive:"$2.docker":localhost/\(reference):latest
            b "$1" rm "$c" >/dev/null
            """
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = ["-c", script, "bash", storage, archive, readme]
        let errors = Pipe()
        process.standardError = errors
        process.standardOutput = FileHandle.nullDevice
        do { try process.run() } catch { return "cannot run bash: \(error)" }
        let text = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        return process.terminationStatus == 0 ? nil : "status \(process.terminationStatus): \(text.suffix(400))"
    }

    static func umociImage(layout: String, scratch: String) throws -> String {
        let script = """
            set -e
            umoci init --layout "$1"
            umoci new --image "$1:tool"
            umoci unpack --rootless --image "$1:tool" "$2"
            mkdir -p "$2/rootfs/bin" "$2/rootfs/srv/tool"
            cp /bin/busybox "$2/rootfs/bin/busybox"
            echo 'built by a tool' > "$2/rootfs/srv/tool/readme"
            umoci repack --image "$1:tool" "$2"
            umoci config --image "$1:tool" --config.env TOOL_MODE=fast --config.workingdir /srv/tool
            """
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = ["-c", script, "bash", layout, scratch]
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw SandboxError("umoci could not build the image either") }
        return "oci:" + layout + ":tool"
    }

    @Test(
        .enabled(
            if: debianDisk != nil || QemuEnvironment.required,
            "VMPOOL_TEST_DEBIAN is not set (scripts/test builds the Debian disk)"))
    func aDebianDiskWithoutTheAgentGetsItFromTheInitramfsAndKeepsSystemd() throws {
        let source = try #require(Self.debianDisk, "scripts/test sets VMPOOL_TEST_DEBIAN")
        let box = try QemuSandbox()
        defer { box.tearDown() }
        // The Debian disk with the agent and its unit taken out, as a distribution's image would be.
        let raw = box.dir.path + "/plain.img"
        let disk = box.dir.path + "/plain.qcow2"
        let script = """
            set -e
            qemu-img convert -f qcow2 -O raw "$1" "$2"
            debugfs -w -R 'rm /usr/local/sbin/vmpool-agent' "$2" 2>/dev/null
            debugfs -w -R 'rm /etc/systemd/system/sysinit.target.wants/vmpool-agent.service' "$2" 2>/dev/null
            qemu-img convert -f raw -O qcow2 "$2" "$3"
            rm -f "$2"
            """
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = ["-c", script, "bash", source, raw, disk]
        try process.run()
        process.waitUntilExit()
        #expect(process.terminationStatus == 0)
        try apply(box, Self.pool("plain", disk: disk, boot: "cold", memory: "512Mi"))
        let vm = try #require(try box.ids(pool: "plain").first)
        let run = try box.exec(
            vm, ["sh", "-c", "cat /proc/1/comm; test -e /usr/local/sbin/vmpool-agent && echo own || echo carried"])
        #expect(run.stdout == "systemd\ncarried\n", "\(run.stdout)\(run.stderr)")
        #expect(try box.exec(vm, ["cat", "/proc/sys/kernel/hostname"]).stdout == vm + "\n")
        let source2 = box.dir.write("in.txt", "to debian\n")
        #expect(try box.run(["cp", source2, "\(vm):/root/in.txt"]).status == 0)
        #expect(try box.exec(vm, ["cat", "/root/in.txt"]).stdout == "to debian\n")
    }
}
