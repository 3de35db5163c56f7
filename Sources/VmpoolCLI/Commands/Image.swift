import ArgumentParser
import Foundation
import VmpoolImage
import VmpoolOCI

extension Vmpool {
    /// Builds the default guest image.
    struct Image: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "image",
            abstract: "Build the default guest image.", subcommands: [Build.self])

        struct Build: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "build",
                abstract: "Assemble the default guest image: a Debian kernel and a busybox initramfs with the agent.",
                discussion: """
                    With --rootfs debian, also a Debian 12 root disk (debian.qcow2: systemd, python3, the agent) \
                    for pools that boot it: give the pool a disk with `image: .../debian.qcow2` and \
                    `image: {cmdline: "console=ttyS0 quiet root=/dev/vda"}`. That build needs root and \
                    Debian's package mirrors; downloads are kept in $XDG_CACHE_HOME/vmpool. --packages adds \
                    Debian packages to that disk.

                    With --from, only a root disk NAME.qcow2 made from an OCI or Docker image archive (as \
                    podman save, buildah push or skopeo copy write them; no registry is contacted): its layers \
                    applied in order, its Env and WorkingDir the defaults of exec. A pool boots it like the \
                    Debian disk; the agent comes from the default image's initramfs. Needs root, mke2fs and \
                    qemu-img.
                    """)

            /// Root file systems `--rootfs` builds.
            enum RootFS: String, ExpressibleByArgument, CaseIterable {
                case debian
            }

            @Option(help: "Also build a root disk: debian.")
            var rootfs: RootFS?

            @Option(name: .customLong("disk-size"), help: "Virtual size of the root disk (default 4G).")
            var diskSize: String = "4G"

            @Option(
                help: ArgumentHelp(
                    "Extra Debian packages for --rootfs debian, comma-separated.", valueName: "a,b,..."))
            var packages: String?

            @Option(
                help: ArgumentHelp(
                    "Make a root disk from an image: oci-archive:PATH, oci:DIR[:TAG] or docker-archive:PATH.",
                    valueName: "source"))
            var from: String?

            @Option(help: "Name of the disk --from makes (default: the image's name).")
            var name: String?

            @Option(help: "Virtual size of the disk --from makes (default: twice its files plus 512M, at least 1G).")
            var size: String?

            @OptionGroup var options: GlobalOptions

            @Option(
                help:
                    "Kernel to use (default: $VMPOOL_KERNEL, else Debian's cloud kernel, fetched once into $XDG_CACHE_HOME/vmpool)."
            )
            var kernel: String?

            @Option(help: "Directory to write the image to (default: STATE_DIR/image).")
            var output: String?

            @Option(help: "busybox binary to put in the initramfs (must be static).")
            var busybox: String = "/bin/busybox"

            @Option(
                help:
                    "Directory of the kernel's virtio modules with an order file (default: modules/ next to the kernel's boot/)."
            )
            var modules: String?

            /// The names --packages gives, checked.
            var packageNames: [String] {
                (packages ?? "").split(separator: ",", omittingEmptySubsequences: false).map {
                    $0.trimmingCharacters(in: .whitespaces)
                }
            }

            func validate() throws {
                if packages != nil {
                    guard rootfs == .debian else { throw ValidationError("--packages needs --rootfs debian") }
                    for package in packageNames where !GuestImage.isDebianPackageName(package) {
                        throw ValidationError(
                            "--packages: '\(package)' is not a Debian package name (lowercase letters, digits, '.',"
                                + " '+' and '-', at least two characters, starting with a letter or digit)")
                    }
                }
                if let from {
                    guard rootfs == nil else {
                        throw ValidationError("--from and --rootfs make different disks; give one")
                    }
                    do { _ = try ImageSource(parsing: from) } catch { throw ValidationError("\(error)") }
                    if let name, !isSafeDiskName(name) {
                        throw ValidationError(
                            "--name \(name): use letters, digits, '.', '_' and '-' (not first), at most 100 characters")
                    }
                    if let size, RootDisk.parseSize(size) == nil {
                        throw ValidationError(
                            "--size \(size): a number with an optional K, M, G or T suffix, such as 2G")
                    }
                } else if name != nil || size != nil {
                    throw ValidationError("--name and --size are for --from")
                }
            }

            func run() async throws {
                if let from {
                    let directory =
                        try output ?? GuestImage.directory(stateDirectory: options.stateDirectory(create: true))
                    let disk: RootDisk.Result
                    do {
                        disk = try RootDisk.build(
                            from: try ImageSource(parsing: from), output: directory, name: name, size: size)
                    } catch let error as OCIError {
                        throw CommandFailure(description: error.description)
                    }
                    printOut("root disk written to \(disk.path)")
                    printOut("  layers  \(disk.layers), \(disk.bytes >> 20) MiB of files, virtual size \(disk.size)")
                    if let dir = disk.config.workingDir { printOut("  workdir \(dir)") }
                    printOut(
                        "  boot it with a disk {name: root, image: \(disk.path)} and cmdline \"\(GuestImage.defaultCmdline) root=/dev/vda\""
                    )
                    return
                }
                let directory = try output ?? GuestImage.directory(stateDirectory: options.stateDirectory(create: true))
                let kernelPath = try kernel ?? GuestImage.findKernel()
                let image = try GuestImage.build(
                    kernel: kernelPath, busybox: busybox, output: directory, modules: modules)
                printOut("guest image written to \(directory)")
                printOut("  kernel  \(image.kernel)")
                printOut("  initrd  \(image.initrd ?? "-")")
                printOut("  cmdline \(image.cmdline)")
                if rootfs == .debian {
                    let disk = try GuestImage.buildDebian(
                        output: directory, size: diskSize, packages: packages == nil ? [] : packageNames,
                        cache: GuestImage.cacheDirectory() + "/debian-apt")
                    printOut("  rootfs  \(disk)  (boot it with cmdline \"\(GuestImage.defaultCmdline) root=/dev/vda\")")
                }
            }
        }
    }
}
