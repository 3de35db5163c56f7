import ArgumentParser
import Foundation
import VmpoolImage

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
                    Debian's package mirrors; downloads are kept in $XDG_CACHE_HOME/vmpool.
                    """)

            /// Root file systems `--rootfs` builds.
            enum RootFS: String, ExpressibleByArgument, CaseIterable {
                case debian
            }

            @Option(help: "Also build a root disk: debian.")
            var rootfs: RootFS?

            @Option(name: .customLong("disk-size"), help: "Virtual size of the root disk (default 4G).")
            var diskSize: String = "4G"

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

            func run() async throws {
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
                        output: directory, size: diskSize, cache: GuestImage.cacheDirectory() + "/debian-apt")
                    printOut("  rootfs  \(disk)  (boot it with cmdline \"\(GuestImage.defaultCmdline) root=/dev/vda\")")
                }
            }
        }
    }
}
