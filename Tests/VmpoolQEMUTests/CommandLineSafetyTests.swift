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

    /// Descriptor numbers as `QemuVM.start` would hand them over.
    static func files(disks: [[String]] = []) -> QemuFiles {
        var files = QemuFiles()
        files.marker = 3
        var next: Int32 = 4
        for chardev in ["qmp", "qmpo", "hvc", "ctl"] + (0..<QemuVM.execPorts).map({ "x\($0)" }) {
            files.sockets[chardev] = next
            next += 1
        }
        files.kernel = next
        files.initrd = next + 1
        files.memory = next + 2
        next += 3
        files.disks = disks.map { formats in
            formats.map { format in
                defer { next += 1 }
                return QemuFiles.DiskLayer(fd: next, format: format)
            }
        }
        return files
    }

    func arguments(image: BootImage, stateDir: String = "/tmp/s", memory: MemoryMode = .anonymous) -> [String] {
        let configuration = QemuConfiguration(stateDirectory: stateDir)
        var vm = QemuVM(
            id: "web-000001", paths: QemuPaths(configuration: configuration), configuration: configuration,
            accelerator: .tcg, pid: nil)
        vm.sandbox = true
        let shape = VMShape(vcpus: 1, memoryMiB: 256, maxVcpus: 2, maxMemoryMiB: 512, image: image)
        return vm.arguments(MachineSpec(shape: shape, memory: memory, incoming: false), files: Self.files())
    }

    /// Files reach QEMU as descriptors: a manifest's path is never on its command line; the
    /// kernel's command line is one whole argument.
    @Test func manifestValuesAreWholeArgumentsNeverOptions() {
        for value in hostile {
            let args = arguments(image: BootImage(kernel: value, initrd: value, cmdline: value + ",x=y"))
            let kernel = args.firstIndex(of: "-kernel").map { args[$0 + 1] }
            let initrd = args.firstIndex(of: "-initrd").map { args[$0 + 1] }
            let append = args.firstIndex(of: "-append").map { args[$0 + 1] }
            #expect(kernel?.hasPrefix("/proc/self/fd/") == true)
            #expect(initrd?.hasPrefix("/proc/self/fd/") == true)
            #expect(append == value + ",x=y")
            // The value appears nowhere else, so it cannot be read as an option.
            #expect(args.filter { $0.contains(value) }.count == 1)
        }
    }

    /// QEMU serves sockets vmpool bound, by descriptor; the run dir is on its command line only
    /// as the description of the marker's fd set, comma-escaped.
    @Test func statePathsWithCommasAreEscapedInOptionLists() {
        let args = arguments(image: BootImage(kernel: "/k", initrd: nil, cmdline: ""), stateDir: "/tmp/a,server=off")
        let chardevs = args.enumerated().filter { $0.offset > 0 && args[$0.offset - 1] == "-chardev" }.map(\.element)
            .filter { $0.hasPrefix("socket,") }
        // Two monitors, the interactive console, the agent's control port and its exec ports.
        #expect(chardevs.count == 4 + QemuVM.execPorts)
        for chardev in chardevs {
            #expect(chardev.contains(",fd=") && chardev.hasSuffix(",server=on,wait=off") && !chardev.contains("/"))
        }
        let marker = args.enumerated().filter { $0.offset > 0 && args[$0.offset - 1] == "-add-fd" }.map(\.element)
        #expect(marker.count == 1)
        #expect(marker.first?.contains("opaque=vmpool:/tmp/a,,server=off/run/") == true, "\(marker)")
        #expect(args.filter { $0.contains("/tmp/a,server=off/") }.isEmpty)
    }

    /// Each disk is a chain of JSON nodes over fd sets: the overlay written, what it is made
    /// over read only, and the chain ends where vmpool says (never at a name an image's header
    /// gives).
    @Test func disksAreChainsOverDescriptorsAndNICOptionListsCannotBeExtended() throws {
        let configuration = QemuConfiguration(stateDirectory: "/tmp/s")
        let vm = QemuVM(
            id: "web-000001", paths: QemuPaths(configuration: configuration), configuration: configuration,
            accelerator: .tcg, pid: nil)
        let files = Self.files(disks: [["qcow2", "qcow2", "raw"], ["qcow2"]])
        let disks = vm.diskArguments(
            [DiskAttachment(name: "root", path: "/x"), DiskAttachment(name: "data", path: "/y", scratch: true)], files)
        let blockdevs = disks.enumerated().filter { $0.offset > 0 && disks[$0.offset - 1] == "-blockdev" }.map {
            try? JSONSerialization.jsonObject(with: Data($0.element.utf8)) as? [String: Any]
        }
        #expect(blockdevs.count == 2)
        let root = try #require(blockdevs[0] ?? nil)
        #expect(root["driver"] as? String == "qcow2" && root["node-name"] as? String == "disk0")
        #expect(root["read-only"] == nil, "the overlay is written")
        #expect((root["cache"] as? [String: Any])?["no-flush"] as? Bool == false, "flushes reach the disk")
        let template = try #require(root["backing"] as? [String: Any])
        #expect(template["read-only"] as? Bool == true && template["driver"] as? String == "qcow2")
        let base = try #require(template["backing"] as? [String: Any])
        #expect(base["read-only"] as? Bool == true && base["driver"] as? String == "raw" && base["backing"] == nil)
        let filenames = [root, template, base].compactMap { ($0["file"] as? [String: Any])?["filename"] as? String }
        #expect(filenames == ["/dev/fdset/3", "/dev/fdset/2", "/dev/fdset/1"], "\(filenames)")
        let data = try #require(blockdevs[1] ?? nil)
        #expect(data["backing"] is NSNull, "an empty disk has no backing, not the header's")
        #expect((data["cache"] as? [String: Any])?["no-flush"] as? Bool == true)
        let fdsets = disks.enumerated().filter { $0.offset > 0 && disks[$0.offset - 1] == "-add-fd" }.map(\.element)
        #expect(fdsets.count == 4 && fdsets.allSatisfy { $0.hasPrefix("fd=") }, "\(fdsets)")
        for value in hostile {
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
        #expect(parsed["mem-path"] as? String == "/proc/self/fd/\(Self.files().memory!)")
        #expect(parsed["share"] as? Bool == true)
    }

    @Test func sandboxIsOnWhereQEMUSupportsIt() throws {
        let args = arguments(image: BootImage(kernel: "/k", initrd: nil, cmdline: ""))
        let sandbox = args.firstIndex(of: "-sandbox").map { args[$0 + 1] } ?? ""
        #expect(sandbox.hasPrefix("on,"))
        for set in ["spawn", "elevateprivileges", "obsolete", "resourcecontrol"] {
            #expect(sandbox.contains("\(set)=deny"), "\(sandbox)")
        }
        #expect(!args.contains("-daemonize") && !args.contains("-runas"))
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
