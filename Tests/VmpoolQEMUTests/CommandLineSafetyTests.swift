import Foundation
import Logging
import Testing
import VmpoolDriver
import VmpoolTestSupport

@testable import VmpoolQEMU

/// Nothing from a manifest can add an option to QEMU's command line.
@Suite("QEMU command line")
struct CommandLineSafetyTests {
    let hostile = [
        "/k,readonly=on", "/k -append evil", "-monitor stdio", "/k\nmore", "/k,,x", "--", "/k;rm -rf /", "$(id)",
    ]

    func arguments(image: BootImage, stateDir: String = "/tmp/s", memory: MemoryMode = .anonymous) -> [String] {
        let configuration = QemuConfiguration(stateDirectory: stateDir)
        var vm = QemuVM(
            id: "web-000001", paths: QemuPaths(configuration: configuration), configuration: configuration,
            accelerator: .tcg, pid: nil)
        vm.sandbox = true
        let shape = VMShape(vcpus: 1, memoryMiB: 256, maxVcpus: 2, maxMemoryMiB: 512, image: image)
        return vm.arguments(MachineSpec(shape: shape, memory: memory, incoming: false))
    }

    @Test func manifestValuesAreWholeArgumentsNeverOptions() {
        for value in hostile {
            let args = arguments(image: BootImage(kernel: value, initrd: value, cmdline: value + ",x=y"))
            let kernel = args.firstIndex(of: "-kernel").map { args[$0 + 1] }
            let initrd = args.firstIndex(of: "-initrd").map { args[$0 + 1] }
            let append = args.firstIndex(of: "-append").map { args[$0 + 1] }
            #expect(kernel == value)
            #expect(initrd == value)
            #expect(append == value + ",x=y")
            // The value appears nowhere else, so it cannot be read as an option.
            #expect(args.filter { $0.contains(value) }.count == 3)
        }
    }

    @Test func statePathsWithCommasAreEscapedInOptionLists() {
        let args = arguments(image: BootImage(kernel: "/k", initrd: nil, cmdline: ""), stateDir: "/tmp/a,server=off")
        let chardevs = args.enumerated().filter { $0.offset > 0 && args[$0.offset - 1] == "-chardev" }.map(\.element)
            .filter { $0.hasPrefix("socket,") }
        // Two monitors, the interactive console, the agent's control port and its exec ports.
        #expect(chardevs.count == 4 + QemuVM.execPorts)
        for chardev in chardevs {
            #expect(chardev.contains("/tmp/a,,server=off/run/"))
            #expect(!chardev.contains("/tmp/a,server=off/"))
        }
    }

    @Test func diskPathsAreJSONAndNICOptionListsCannotBeExtended() throws {
        let configuration = QemuConfiguration(stateDirectory: "/tmp/s")
        let vm = QemuVM(
            id: "web-000001", paths: QemuPaths(configuration: configuration), configuration: configuration,
            accelerator: .tcg, pid: nil)
        for value in hostile {
            let disks = vm.diskArguments([DiskAttachment(name: "data", path: "/tmp/s/run/x/" + value)])
            let blockdev = try #require(disks.firstIndex(of: "-blockdev").map { disks[$0 + 1] })
            let parsed = try #require(try JSONSerialization.jsonObject(with: Data(blockdev.utf8)) as? [String: Any])
            #expect((parsed["file"] as? [String: Any])?["filename"] as? String == "/tmp/s/run/x/" + value)
            #expect(parsed["driver"] as? String == "qcow2", "a path cannot change the format")
            #expect(disks.count == 4, "\(disks)")
            #expect((parsed["cache"] as? [String: Any])?["no-flush"] as? Bool == false, "flushes reach the disk")
            let scratch = vm.diskArguments([DiskAttachment(name: "data", path: "/tmp/x", scratch: true)])[1]
            #expect(scratch.contains(#""no-flush":true"#), "\(scratch)")
            // A tap name, even one with commas, stays one value of the netdev option list.
            let nic = vm.nicArguments(
                NICAttachment(backend: .tap(name: "tap" + value, bridge: "br0"), mac: "52:54:00:00:00:01"))
            let netdev = try #require(nic.firstIndex(of: "-netdev").map { nic[$0 + 1] })
            #expect(netdev.hasSuffix(",script=no,downscript=no"), "\(netdev)")
            #expect(!netdev.contains("tap" + value) || !value.contains(","), "\(netdev)")
            #expect(nic.count == 4)
        }
    }

    @Test func memoryBackendsAreJSONNotOptionLists() throws {
        let args = arguments(
            image: BootImage(kernel: "/k", initrd: nil, cmdline: ""), memory: .templateShared("/dev/shm/x,share=off"))
        let object = try #require(args.firstIndex(of: "-object").map { args[$0 + 1] })
        let parsed = try #require(try JSONSerialization.jsonObject(with: Data(object.utf8)) as? [String: Any])
        #expect(parsed["mem-path"] as? String == "/dev/shm/x,share=off")
        #expect(parsed["share"] as? Bool == true)
    }

    @Test func sandboxIsOnWhereQEMUSupportsIt() throws {
        let args = arguments(image: BootImage(kernel: "/k", initrd: nil, cmdline: ""))
        #expect(args.firstIndex(of: "-sandbox").map { args[$0 + 1].hasPrefix("on,") } == true)
        let dir = TemporaryDirectory()
        defer { dir.remove() }
        let driver = try QemuDriver(
            configuration: QemuConfiguration(stateDirectory: dir.path), logger: Logger(label: "test"))
        if QemuEnvironment.qemuInstalled {
            // Debian's QEMU is built with seccomp.
            #expect(driver.sandboxSupported)
        }
        let missing = try QemuDriver(
            configuration: QemuConfiguration(stateDirectory: dir.path, binary: "/nonexistent/qemu"),
            logger: Logger(label: "test"))
        #expect(!missing.sandboxSupported)
    }

    @Test func clonesDoNotReloadTheKernel() {
        let args = arguments(image: BootImage(kernel: "/k", initrd: "/i", cmdline: "c"), memory: .clonePrivate("/m"))
        #expect(!args.contains("-kernel"))
        #expect(args.contains("-no-reboot"))
    }
}
