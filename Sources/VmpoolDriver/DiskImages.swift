import Foundation
import VmpoolSpec

/// What files a pool names really are: their real paths and identities, and for disk images
/// their format and virtual size, read from the file itself (no helper program needed, so
/// `validate` and `plan` can check them anywhere).
public enum DiskImages {
    /// A base image as read from its header.
    public struct Info: Sendable, Hashable {
        public var path: String
        public var format: String
        public var virtualBytes: UInt64
        public var fingerprint: String
    }

    /// Why a file cannot be a disk image; `field` is where the manifest named it.
    public struct Problem: Error, Sendable, CustomStringConvertible {
        public var message: String
        public var description: String { message }
    }

    /// The real path of `path` and what it is (size, modification time, inode): a file replaced
    /// or rewritten under the same name has another identity.
    public static func identity(_ path: String) -> (path: String, fingerprint: String)? {
        guard let real = realpath(path, nil) else { return nil }
        defer { free(real) }
        var info = stat()
        guard stat(real, &info) == 0 else { return nil }
        let mtime = "\(info.st_mtim.tv_sec).\(info.st_mtim.tv_nsec)"
        return (String(cString: real), "\(info.st_size):\(mtime):\(info.st_ino)")
    }

    /// Reads a base image's header: qcow2 (magic `QFI\xfb`) or raw; other known formats are refused.
    public static func inspect(_ path: String) throws(Problem) -> Info {
        guard let (real, fingerprint) = identity(path) else {
            throw Problem(message: "file \(path) does not exist")
        }
        let fd = open(real, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw Problem(message: "file \(path) is not readable: \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var info = stat()
        fstat(fd, &info)
        guard info.st_mode & S_IFMT == S_IFREG else { throw Problem(message: "\(path) is not a regular file") }
        var header = [UInt8](repeating: 0, count: 512)
        let count = pread(fd, &header, header.count, 0)
        guard count >= 0 else {
            throw Problem(message: "file \(path) is not readable: \(String(cString: strerror(errno)))")
        }
        let magic = Array(header.prefix(8))
        if magic.starts(with: [0x51, 0x46, 0x49, 0xFB]) {
            guard count >= 104 else { throw Problem(message: "\(path) is a truncated qcow2 image") }
            func be64(_ at: Int) -> UInt64 { header[at..<(at + 8)].reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
            let size = be64(24)
            // QEMU gets each image as an open file: it cannot follow a chain of its own by name.
            if be64(8) != 0 {
                throw Problem(
                    message: "\(path) has a backing file of its own; flatten it first (qemu-img convert -O qcow2"
                        + " \(path) FLAT.qcow2)")
            }
            let version = header[4..<8].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            if version >= 3, be64(72) & 0x4 != 0 {
                throw Problem(
                    message: "\(path) keeps its data in an external file; convert it first (qemu-img convert)")
            }
            return Info(path: real, format: "qcow2", virtualBytes: size, fingerprint: fingerprint)
        }
        let others: [(String, [UInt8])] = [
            ("vmdk", Array("KDMV".utf8)), ("vdi", Array("<<< ".utf8)), ("vhdx", Array("vhdxfile".utf8)),
            ("qed", [0x51, 0x45, 0x44, 0x00]), ("vpc", Array("conectix".utf8)),
        ]
        if let (name, _) = others.first(where: { magic.starts(with: $0.1) }) {
            throw Problem(
                message: "\(path) is a \(name) image; expected qcow2 or raw (convert it with qemu-img convert -O qcow2)"
            )
        }
        let size = UInt64(info.st_size)
        guard size > 0, size % 512 == 0 else {
            throw Problem(
                message: "\(path) is neither qcow2 nor a raw disk image (a raw image is a whole number of 512-byte"
                    + " sectors; this file is \(size) bytes)")
        }
        return Info(path: real, format: "raw", virtualBytes: size, fingerprint: fingerprint)
    }

    /// The disks of a pool as VMs get them, checking each base image; problems come with the
    /// field path of the disk they belong to.
    public static func resolve(_ disks: [DiskSpec]) -> (disks: [DiskShape], problems: [(field: String, Problem)]) {
        var result: [DiskShape] = []
        var problems: [(String, Problem)] = []
        for (index, disk) in disks.enumerated() {
            guard let image = disk.image else {
                result.append(
                    DiskShape(name: disk.name, base: nil, format: nil, fingerprint: nil, sizeMiB: disk.sizeMiB ?? 0))
                continue
            }
            do {
                let info = try inspect(image)
                let imageMiB = Int((info.virtualBytes + (1 << 20) - 1) >> 20)
                if let size = disk.sizeMiB, UInt64(size) << 20 < info.virtualBytes {
                    problems.append(
                        (
                            "spec.disks[\(index)].size",
                            Problem(
                                message: "\(MemoryQuantity.format(size)) is smaller than the image \(image)"
                                    + " (\(MemoryQuantity.format(imageMiB))); a disk can grow, not shrink")
                        ))
                    continue
                }
                result.append(
                    DiskShape(
                        name: disk.name, base: info.path, format: info.format, fingerprint: info.fingerprint,
                        sizeMiB: disk.sizeMiB ?? imageMiB))
            } catch {
                problems.append(("spec.disks[\(index)].image", error))
            }
        }
        return (result, problems)
    }

    /// A boot image with its files resolved to real paths and identified.
    public static func resolve(_ image: BootImage) -> BootImage {
        guard let kernel = identity(image.kernel) else { return image }
        let initrd = image.initrd.flatMap(identity)
        return BootImage(
            kernel: kernel.path, initrd: initrd?.path ?? image.initrd, cmdline: image.cmdline,
            fingerprint: [kernel.fingerprint, initrd?.fingerprint ?? "-"].joined(separator: " "))
    }
}
