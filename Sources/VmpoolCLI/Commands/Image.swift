import ArgumentParser
import Foundation
import VmpoolImage

extension Vmpool {
    /// Builds the default guest image.
    struct Image: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Build the default guest image.", subcommands: [Build.self])

        struct Build: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Assemble the default guest image: a Debian kernel and a busybox initramfs with the agent.")

            @OptionGroup var options: GlobalOptions

            @Option(help: "Kernel to use (default: $VMPOOL_KERNEL, else the newest /boot/vmlinuz-*).")
            var kernel: String?

            @Option(help: "Directory to write the image to (default: STATE_DIR/image).")
            var output: String?

            @Option(help: "busybox binary to put in the initramfs (must be static).")
            var busybox: String = "/bin/busybox"

            @Option(help: "Directory of the kernel's virtio modules with an order file (default: modules/ next to the kernel's boot/).")
            var modules: String?

            func run() async throws {
                let directory = try output ?? GuestImage.directory(stateDirectory: options.stateDirectory(create: true))
                let kernelPath = try kernel ?? GuestImage.findKernel()
                let image = try GuestImage.build(kernel: kernelPath, busybox: busybox, output: directory, modules: modules)
                printOut("guest image written to \(directory)")
                printOut("  kernel  \(image.kernel)")
                printOut("  initrd  \(image.initrd ?? "-")")
                printOut("  cmdline \(image.cmdline)")
            }
        }
    }
}
