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

            func run() async throws {
                let directory = output ?? GuestImage.directory(stateDirectory: options.resolvedStateDir)
                let kernelPath = try kernel ?? GuestImage.findKernel()
                let image = try GuestImage.build(kernel: kernelPath, busybox: busybox, output: directory)
                printOut("guest image written to \(directory)")
                printOut("  kernel  \(image.kernel)")
                printOut("  initrd  \(image.initrd ?? "-")")
                printOut("  cmdline \(image.cmdline)")
            }
        }
    }
}
