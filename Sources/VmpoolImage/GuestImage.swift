import CVmpoolSys
import Foundation
import VmpoolDriver

/// The default guest image: a Debian kernel and an initramfs of busybox plus the vmpool agent.
public enum GuestImage {
    /// Kernel command line of the default image: serial console, quiet, no crypto self-tests
    /// at boot (0.26 s under TCG), no swiotlb bounce buffer (memory hotplug slots would
    /// otherwise reserve 64 MiB of every guest).
    public static let defaultCmdline = "console=ttyS0 quiet cryptomgr.notests swiotlb=noforce"

    /// The default image as the sim driver records it: nothing to read from disk.
    public static let simDefault = BootImage(
        kernel: "sim:default-kernel", initrd: "sim:default-initrd", cmdline: defaultCmdline)

    public static func directory(stateDirectory: String) -> String { stateDirectory + "/image" }

    /// The version of the guest side (agent protocol, init, device layout) this vmpool speaks.
    /// An image built by another version is not used: `image build` must run again.
    public static let version = 3

    /// The built default image of a state dir, or `nil` when `vmpool image build` has not run
    /// (or ran with a vmpool whose guest side differs).
    public static func installed(stateDirectory: String) -> BootImage? {
        let dir = directory(stateDirectory: stateDirectory)
        let kernel = dir + "/vmlinuz"
        let initrd = dir + "/initrd.img"
        guard access(kernel, R_OK) == 0, access(initrd, R_OK) == 0, builtVersion(dir) == version else { return nil }
        let cmdline = (try? String(contentsOfFile: dir + "/cmdline", encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines)
        return BootImage(kernel: kernel, initrd: initrd, cmdline: cmdline ?? defaultCmdline)
    }

    /// The guest-side version an image directory was built for; `nil` when it has none.
    public static func builtVersion(_ directory: String) -> Int? {
        (try? String(contentsOfFile: directory + "/version", encoding: .utf8))
            .flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    /// The virtio modules that go with `kernel`: `modules/` next to its `boot/` directory, as
    /// scripts/fetch-kernel unpacks them, with an `order` file listing them dependencies first.
    public static func modulesDirectory(forKernel kernel: String) -> String {
        URL(fileURLWithPath: kernel).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("modules").path
    }

    /// The guest kernel, from any directory: `$VMPOOL_KERNEL`; else Debian's cloud kernel
    /// (with the virtio modules the initramfs needs) in the cache, `$XDG_CACHE_HOME/vmpool/kernel`,
    /// fetched there with apt-get the first time; else one scripts/fetch-kernel left in
    /// `.cache/kernel` of the current directory.
    public static func findKernel(environment: [String: String] = ProcessInfo.processInfo.environment) throws
        -> String
    {
        if let path = environment["VMPOOL_KERNEL"], !path.isEmpty { return path }
        let cache = cacheDirectory(environment: environment) + "/kernel"
        for dir in [cache, ".cache/kernel"] {
            let packages = ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted().reversed()
            for package in packages where access("\(dir)/\(package)/modules/order", R_OK) == 0 {
                let boot = "\(dir)/\(package)/boot"
                if let kernel = ((try? FileManager.default.contentsOfDirectory(atPath: boot)) ?? [])
                    .filter({ $0.hasPrefix("vmlinuz-") }).sorted().last
                {
                    return URL(fileURLWithPath: boot + "/" + kernel).standardizedFileURL.path
                }
            }
        }
        return try fetchKernel(into: cache)
    }

    /// Fetches Debian's cloud kernel and its modules into `cache` (the script embedded from
    /// Sources/VmpoolImage/Guest/fetch-kernel.sh); returns the vmlinuz path.
    static func fetchKernel(into cache: String) throws -> String {
        try FileManager.default.createDirectory(atPath: cache, withIntermediateDirectories: true)
        let script = cache + "/.fetch-kernel-\(getpid()).sh"
        try write(Data(PackageResources.fetch_kernel_sh), to: script)
        defer { unlink(script) }
        guard let bash = searchPath("bash") else { throw ImageError("bash is not installed") }
        let (status, output) = try run(bash, [script, cache])
        let lines = output.split(separator: "\n").map(String.init)
        guard status == 0, let path = lines.last(where: { $0.hasPrefix("/") && $0.contains("vmlinuz") }) else {
            throw ImageError(
                "no guest kernel: fetching Debian's (apt-get download linux-image-cloud-amd64) failed:\n\(output)"
                    + "\npass --kernel PATH (with --modules DIR) or set VMPOOL_KERNEL")
        }
        return path
    }

    /// Writes `vmlinuz`, `initrd.img`, `cmdline` and `version` into `output` and returns the image.
    /// `modules` holds the kernel's virtio modules (default: next to the kernel).
    /// `compiler` builds the agent (`$CC`, else `cc`); it must be able to link statically.
    public static func build(
        kernel: String, busybox: String, output: String, modules: String? = nil, compiler: String? = nil
    ) throws -> BootImage {
        let manager = FileManager.default
        guard manager.isReadableFile(atPath: kernel) else { throw ImageError("kernel \(kernel) is not readable") }
        let modulesDir = modules ?? modulesDirectory(forKernel: kernel)
        let moduleFiles = try loadModules(modulesDir)
        guard let busyboxData = manager.contents(atPath: busybox) else {
            throw ImageError("busybox \(busybox) is not readable; install busybox-static")
        }
        guard isStaticELF(busyboxData) else {
            throw ImageError("\(busybox) is dynamically linked; the initramfs needs busybox-static")
        }
        let applets = try listApplets(busybox)
        let agent = try compileAgent(compiler: compiler ?? ProcessInfo.processInfo.environment["CC"] ?? "cc")
        do {
            try manager.createDirectory(atPath: output, withIntermediateDirectories: true)
            unlink(output + "/version")
            let initrd = initramfs(busybox: busyboxData, applets: applets, agent: agent, modules: moduleFiles)
            try write(initrd, to: output + "/initrd.img")
            try write(try Data(contentsOf: URL(fileURLWithPath: kernel)), to: output + "/vmlinuz")
            try write(Data((defaultCmdline + "\n").utf8), to: output + "/cmdline")
            try write(agent, to: output + "/vmpool-agent")
            try write(Data("\(version)\n".utf8), to: output + "/version")
        } catch let error as ImageError {
            throw error
        } catch {
            throw ImageError("cannot write the image to \(output): \(error.localizedDescription)")
        }
        return BootImage(kernel: output + "/vmlinuz", initrd: output + "/initrd.img", cmdline: defaultCmdline)
    }

    /// The kernel modules in `directory`, in the order its `order` file gives.
    static func loadModules(_ directory: String) throws -> [(name: String, data: Data)] {
        guard let order = try? String(contentsOfFile: directory + "/order", encoding: .utf8) else {
            throw ImageError(
                "the guest kernel's modules are missing (\(directory)/order): fetch the kernel with"
                    + " scripts/fetch-kernel, or pass --modules DIR")
        }
        return try order.split(separator: "\n").map(String.init).filter { !$0.isEmpty }.map { name in
            guard !name.contains("/"), name.hasSuffix(".ko"),
                let data = FileManager.default.contents(atPath: directory + "/" + name)
            else { throw ImageError("module \(name) listed in \(directory)/order cannot be read") }
            return (name, data)
        }
    }

    /// The initramfs: directories, console device, busybox with its applet links, the virtio
    /// modules, init and agent.
    static func initramfs(busybox: Data, applets: [String], agent: Data, modules: [(name: String, data: Data)])
        -> Data
    {
        var cpio = CpioWriter()
        for dir in [
            "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "etc", "root", "run", "lib",
            "lib/modules", "lib/modules/vmpool",
        ] {
            cpio.add(dir, .directory)
        }
        for module in modules { cpio.add("lib/modules/vmpool/" + module.name, .file(module.data, executable: false)) }
        cpio.add(
            "lib/modules/vmpool/order",
            .file(Data(modules.map { $0.name + "\n" }.joined().utf8), executable: false))
        cpio.add("dev/console", .characterDevice(major: 5, minor: 1))
        cpio.add("dev/null", .characterDevice(major: 1, minor: 3))
        cpio.add("bin/busybox", .file(busybox, executable: true))
        for applet in applets where applet != "bin/busybox" {
            let depth = applet.split(separator: "/").count - 1
            cpio.add(applet, .symlink(String(repeating: "../", count: depth) + "bin/busybox"))
        }
        cpio.add("init", .file(Data(PackageResources.guest_init_sh), executable: true))
        cpio.add("bin/vmpool-agent", .file(agent, executable: true))
        cpio.finish()
        return cpio.data
    }

    /// The agent's sources (Sources/VmpoolImage/Guest/agent) by file name: one C file per job,
    /// sharing `agent.h`; every `.c` file is compiled into the one executable.
    static let agentSources: [(name: String, bytes: [UInt8])] = [
        ("agent.h", PackageResources.agent_h), ("main.c", PackageResources.main_c),
        ("protocol.c", PackageResources.protocol_c), ("session.c", PackageResources.session_c),
        ("ports.c", PackageResources.ports_c), ("exec.c", PackageResources.exec_c),
        ("control.c", PackageResources.control_c), ("identity.c", PackageResources.identity_c),
        ("network.c", PackageResources.network_c), ("util.c", PackageResources.util_c),
    ]

    /// Compiles the agent into a static, stripped executable and returns its bytes.
    static func compileAgent(compiler: String) throws -> Data {
        let dir = NSTemporaryDirectory() + "vmpool-agent-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var sources: [String] = []
        for file in agentSources {
            let path = dir + "/" + file.name
            guard FileManager.default.createFile(atPath: path, contents: Data(file.bytes)) else {
                throw ImageError("cannot write the agent source to \(path)")
            }
            if file.name.hasSuffix(".c") { sources.append(path) }
        }
        let binary = dir + "/vmpool-agent"
        let (status, output) = try run(compiler, ["-static", "-Os", "-s", "-o", binary] + sources)
        guard status == 0, let data = FileManager.default.contents(atPath: binary), isStaticELF(data) else {
            throw ImageError(
                "cannot compile the guest agent with \(compiler) (install gcc and libc6-dev, or set CC):\n\(output)")
        }
        return data
    }

    /// Builds the Debian 12 root disk (`debian.qcow2` in `output`) from Debian's packages with
    /// mmdebstrap: systemd, python3 and the vmpool agent started at boot; booted with the
    /// default kernel and initramfs and `root=/dev/vda`. Progress goes to stderr. Needs root
    /// (mmdebstrap, mkfs.ext4 -d) and Debian's package mirrors. Returns the disk's path.
    public static func buildDebian(
        output: String, size: String = "4G", packages: [String] = [], cache: String?, compiler: String? = nil
    ) throws -> String {
        for name in packages where !isDebianPackageName(name) {
            throw ImageError(
                "--packages: '\(name)' is not a Debian package name (lowercase letters, digits, '.', '+', '-';"
                    + " at least two characters, starting with a letter or digit)")
        }
        let work = NSTemporaryDirectory() + "vmpool-debian-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: work) }
        let agent = try compileAgent(compiler: compiler ?? ProcessInfo.processInfo.environment["CC"] ?? "cc")
        try write(agent, to: work + "/vmpool-agent")
        chmod(work + "/vmpool-agent", 0o755)
        try write(Data(PackageResources.debian_rootfs_sh), to: work + "/debian-rootfs.sh")
        try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true)
        let disk = output + "/debian.qcow2"
        var arguments = [
            work + "/debian-rootfs.sh", "--output", disk, "--agent", work + "/vmpool-agent", "--size", size,
        ]
        if let cache {
            try FileManager.default.createDirectory(atPath: cache, withIntermediateDirectories: true)
            arguments += ["--cache", cache]
        }
        if !packages.isEmpty { arguments += ["--packages", packages.joined(separator: ",")] }
        guard let bash = searchPath("bash") else { throw ImageError("bash is not installed") }
        let pid = withCStrings([bash] + arguments) { vmpool_spawn_io(bash, $0, nil, -1, 2, 2) }
        guard pid > 0 else { throw ImageError("cannot run the root disk builder: \(String(cString: strerror(errno)))") }
        let status = vmpool_wait(pid)
        guard status == 0 else {
            throw ImageError("building the Debian root disk failed (status \(status)); see above")
        }
        return disk
    }

    /// Debian's rule for package names (Policy 5.6.1): lowercase letters, digits, `+`, `-` and
    /// `.`, at least two characters, starting with a letter or digit.
    public static func isDebianPackageName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        func alphanumeric(_ byte: UInt8) -> Bool { (0x61...0x7A).contains(byte) || (0x30...0x39).contains(byte) }
        guard bytes.count >= 2, bytes.count <= 128, alphanumeric(bytes[0]) else { return false }
        return bytes.allSatisfy {
            alphanumeric($0) || $0 == UInt8(ascii: "+") || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: ".")
        }
    }

    /// Where package downloads are kept between builds: `$XDG_CACHE_HOME/vmpool`, else `~/.cache/vmpool`.
    public static func cacheDirectory(environment: [String: String] = ProcessInfo.processInfo.environment) -> String {
        if let xdg = environment["XDG_CACHE_HOME"], !xdg.isEmpty { return xdg + "/vmpool" }
        return (environment["HOME"] ?? NSHomeDirectory()) + "/.cache/vmpool"
    }

    /// Runs a helper program (found on PATH) to completion; returns its status and combined output.
    static func run(_ program: String, _ arguments: [String]) throws -> (Int32, String) {
        let path = program.contains("/") ? program : searchPath(program)
        guard let path, access(path, X_OK) == 0 else { throw ImageError("\(program) is not installed") }
        let log = NSTemporaryDirectory() + "vmpool-image-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).log"
        let fd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw ImageError("cannot create \(log)") }
        defer { unlink(log) }
        let pid = withCStrings([path] + arguments) { vmpool_spawn_env(path, $0, nil, fd, fd) }
        close(fd)
        guard pid > 0 else { throw ImageError("cannot run \(program): \(String(cString: strerror(errno)))") }
        let status = vmpool_wait(pid)
        return (status, (try? String(contentsOfFile: log, encoding: .utf8)) ?? "")
    }

    static func searchPath(_ program: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        return path.split(separator: ":").map { "\($0)/\(program)" }.first { access($0, X_OK) == 0 }
    }

    /// Applet paths (`bin/sh`, `usr/bin/stty`) as busybox lists them.
    static func listApplets(_ busybox: String) throws -> [String] {
        let (status, output) = try run(busybox, ["--list-full"])
        guard status == 0 else { throw ImageError("\(busybox) --list-full failed: \(output)") }
        return output.split(separator: "\n").map(String.init)
            .filter { !$0.isEmpty && !$0.contains("..") && !$0.hasPrefix("/") && !$0.contains(" ") }
    }

    /// An ELF executable with no PT_INTERP program header runs without a dynamic loader.
    static func isStaticELF(_ data: Data) -> Bool {
        let bytes = [UInt8](data.prefix(64))
        guard bytes.count == 64, bytes[0] == 0x7F, bytes[1] == 0x45, bytes[2] == 0x4C, bytes[3] == 0x46,
            bytes[4] == 2
        else { return false }
        func u64(_ offset: Int) -> Int {
            (0..<8).reduce(0) { $0 | Int(data[data.startIndex + offset + $1]) << (8 * $1) }
        }
        func u16(_ offset: Int) -> Int {
            Int(data[data.startIndex + offset]) | Int(data[data.startIndex + offset + 1]) << 8
        }
        let phoff = u64(32)
        let phentsize = u16(54)
        let phnum = u16(56)
        guard phoff > 0, phentsize >= 4, phoff + phnum * phentsize <= data.count else { return false }
        for index in 0..<phnum {
            let type = u16(phoff + index * phentsize)
            if type == 3 { return false }
        }
        return true
    }

    private static func write(_ data: Data, to path: String) throws {
        let temporary = path + ".tmp"
        guard FileManager.default.createFile(atPath: temporary, contents: data, attributes: [.posixPermissions: 0o600])
        else { throw ImageError("cannot write \(temporary)") }
        if rename(temporary, path) != 0 { throw ImageError("cannot rename \(temporary) to \(path)") }
    }
}

/// Why an image could not be built.
public struct ImageError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
