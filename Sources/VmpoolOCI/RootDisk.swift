import CVmpoolSys
import Crypto
import Foundation
import VmpoolArchive

/// Turns an image the user brings into a root disk a pool boots like the Debian disk: its
/// layers applied in order into a staging tree (as root, owners and setuid bits kept: the tree
/// is the guest's, not the host's), the config's exec defaults in `/.vmpool/image-config`, then
/// one ext4 file system (label vmpool-root, no partition table) made from the tree with
/// `mke2fs -d` and converted to qcow2. The guest agent is not put on the disk: the initramfs
/// brings it. No registry is contacted.
public enum RootDisk {
    /// Where the guest agent finds the image's exec defaults.
    public static let configPath = ".vmpool/image-config"

    /// What a build made.
    public struct Result: Sendable {
        /// The qcow2 file.
        public let path: String
        public let name: String
        public let config: ImageConfig
        public let layers: Int
        /// Bytes of file data in the tree.
        public let bytes: Int64
        public let size: String
    }

    /// Builds `DIR/NAME.qcow2` from `source`. `name` defaults to the image's own (its
    /// reference's last component); `size` (K, M, G or T) defaults to twice the image's data
    /// plus 512 MiB, at least 1 GiB. Needs root, mke2fs (e2fsprogs) and qemu-img.
    public static func build(from source: ImageSource, output: String, name: String? = nil, size: String? = nil)
        throws -> Result
    {
        if let name, !isSafeDiskName(name) {
            throw OCIError("--name \(name): use letters, digits, '.', '_' and '-' (not first), at most 100")
        }
        if let size, parseSize(size) == nil {
            throw OCIError("--size \(size): give a number with an optional K, M, G or T suffix, such as 2G")
        }
        guard geteuid() == 0 else {
            throw OCIError(
                "image build --from must run as root: the image's files keep their owners and setuid bits,"
                    + " which only root can give them")
        }
        let mke2fs = try tool("mke2fs", package: "e2fsprogs")
        let qemuImg = try tool("qemu-img", package: "qemu-utils")

        let files: ImageFiles
        switch source {
        case .ociDirectory(let path, _): files = try ImageFiles(directory: path)
        case .ociArchive(let path, _), .dockerArchive(let path, _): files = try ImageFiles(archive: path)
        }
        let image = try ImageLayout.resolve(files, source: source)
        guard let diskName = name ?? image.name else {
            throw OCIError("\(files.display) does not name its image; give the disk a name with --name NAME")
        }

        try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true)
        var template = Array((output + "/.\(diskName).XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else {
            throw OCIError("cannot create a staging directory in \(output): \(String(cString: strerror(errno)))")
        }
        let work = String(cString: made)
        defer { try? FileManager.default.removeItem(atPath: work) }
        chmod(work, 0o700)
        let tree = work + "/root"
        guard mkdir(tree, 0o755) == 0 else { throw OCIError("cannot create \(tree)") }
        let rootFD = open(tree, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard rootFD >= 0 else { throw OCIError("cannot open \(tree)") }
        defer { close(rootFD) }

        var applier = LayerApplier(root: rootFD)
        for (number, layer) in image.layers.enumerated() {
            let label = "layer \(number + 1) of \(image.layers.count) (\(layer.digest ?? layer.file))"
            try apply(layer, label: label, files: files, into: &applier)
        }
        try writeConfig(image.config, root: rootFD)

        let bytes = applier.written
        let diskSize = size ?? defaultSize(bytes)
        let raw = work + "/disk.img"
        let (made2, log) = try run(
            mke2fs,
            [
                "-q", "-F", "-t", "ext4", "-L", "vmpool-root", "-m", "0", "-d", tree, "-E",
                "lazy_itable_init=0,lazy_journal_init=0", raw, diskSize,
            ])
        guard made2 == 0 else {
            throw OCIError("mke2fs failed (is --size \(diskSize) large enough for \(bytes >> 20) MiB?):\n\(log)")
        }
        try? FileManager.default.removeItem(atPath: tree)
        let converted = work + "/disk.qcow2"
        let (status, convertLog) = try run(qemuImg, ["convert", "-f", "raw", "-O", "qcow2", raw, converted])
        guard status == 0 else { throw OCIError("qemu-img convert failed:\n\(convertLog)") }
        chmod(converted, 0o644)
        let path = output + "/" + diskName + ".qcow2"
        guard rename(converted, path) == 0 else {
            throw OCIError("cannot move the disk to \(path): \(String(cString: strerror(errno)))")
        }
        return Result(
            path: path, name: diskName, config: image.config, layers: image.layers.count, bytes: bytes, size: diskSize)
    }

    /// Applies one layer, checking the blob's digest and size and the uncompressed stream's
    /// diff_id once it has been read to its end.
    static func apply(_ layer: LayerBlob, label: String, files: ImageFiles, into applier: inout LayerApplier) throws {
        let blob = try files.open(layer.file)
        if let size = layer.size, size != blob.size {
            throw OCIError("\(label) is \(blob.size) bytes but its descriptor says \(size): the archive is damaged")
        }
        let magic = blob.peek(4)
        if magic == [0x28, 0xB5, 0x2F, 0xFD] {
            throw OCIError(
                "\(label) is zstd-compressed, which is not read; save the image with gzip layers"
                    + " (skopeo copy --dest-compress-format gzip ...)")
        }
        let gzip: Gunzip? =
            try magic.starts(with: [0x1F, 0x8B]) ? Gunzip(name: label) { try blob.read(into: $0) } : nil
        let diff = DiffHasher()
        let reader = TarReader(limits: layerLimits) { buffer in
            let count = try gzip?.read(into: buffer) ?? blob.read(into: buffer)
            diff.update(UnsafeRawBufferPointer(rebasing: buffer[0..<count]))
            return count
        }
        try applier.apply(reader, layer: label)
        // Whatever follows the tar's end belongs to the digests too.
        let rest = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 16, alignment: 16)
        defer { rest.deallocate() }
        var trailing = 0
        while true {
            let count = try gzip?.read(into: rest) ?? blob.read(into: rest)
            if count == 0 { break }
            trailing += count
            guard trailing <= 1 << 20 else { throw OCIError("\(label): more than 1 MiB follows its tar stream") }
            diff.update(UnsafeRawBufferPointer(rebasing: rest[0..<count]))
        }
        try blob.drain()
        if let digest = layer.digest, blob.digest != digest {
            throw OCIError(
                "\(label) does not match its digest (it hashes to \(blob.digest)): the archive is damaged or was altered"
            )
        }
        if let diffID = layer.diffID, diff.digest != diffID {
            throw OCIError(
                "\(label) does not match the config's diff_id \(diffID) (its tar stream hashes to \(diff.digest)):"
                    + " the archive is damaged or was altered")
        }
    }

    static var layerLimits: ArchiveLimits {
        var limits = ArchiveLimits()
        limits.maxEntries = 2_000_000
        limits.maxBytes = 64 << 30
        return limits
    }

    /// `/.vmpool/image-config`, root-owned, 0644; anything the image had at `/.vmpool` goes.
    static func writeConfig(_ config: ImageConfig, root: Int32) throws {
        var info = stat()
        if fstatat(root, ".vmpool", &info, AT_SYMLINK_NOFOLLOW) == 0, info.st_mode & S_IFMT != S_IFDIR {
            unlinkat(root, ".vmpool", 0)
        }
        if fstatat(root, ".vmpool", &info, AT_SYMLINK_NOFOLLOW) != 0 { mkdirat(root, ".vmpool", 0o755) }
        fchownat(root, ".vmpool", 0, 0, AT_SYMLINK_NOFOLLOW)
        fchmodat(root, ".vmpool", 0o755, 0)
        unlinkat(root, configPath, 0)
        let fd = openat(root, configPath, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw OCIError("cannot write /\(configPath) into the tree") }
        defer { close(fd) }
        let bytes = Array(config.guestText.utf8)
        guard Glibc.write(fd, bytes, bytes.count) == bytes.count else {
            throw OCIError("cannot write /\(configPath) into the tree")
        }
        fchmod(fd, 0o644)
    }

    /// Twice the data plus 512 MiB, at least 1 GiB, in whole MiB.
    static func defaultSize(_ bytes: Int64) -> String {
        let mebibytes = max(1024, (bytes * 2 >> 20) + 512)
        return "\(mebibytes)M"
    }

    /// Bytes of `2G`, `512M`, `1T`, `4096K` or a plain byte count.
    public static func parseSize(_ text: String) -> Int64? {
        let units: [Character: Int64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
        var digits = Substring(text)
        var unit: Int64 = 1
        if let last = text.last, let scale = units[last] {
            unit = scale
            digits = digits.dropLast()
        }
        guard !digits.isEmpty, digits.allSatisfy(\.isNumber), let number = Int64(digits), number > 0,
            number <= Int64.max / unit
        else { return nil }
        return number * unit
    }

    static func tool(_ name: String, package: String) throws -> String {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        let dirs = path.split(separator: ":").map(String.init) + ["/usr/sbin", "/sbin"]
        guard let found = dirs.map({ $0 + "/" + name }).first(where: { access($0, X_OK) == 0 }) else {
            throw OCIError("\(name) is not installed; install \(package) (apt-get install \(package))")
        }
        return found
    }

    /// Runs a helper to completion; its status and combined output.
    static func run(_ path: String, _ arguments: [String]) throws -> (Int32, String) {
        let log = NSTemporaryDirectory() + "vmpool-oci-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).log"
        let fd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw OCIError("cannot create \(log)") }
        defer { unlink(log) }
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        let pid = argv.withUnsafeBufferPointer { vmpool_spawn_env(path, $0.baseAddress, nil, fd, fd) }
        close(fd)
        guard pid > 0 else { throw OCIError("cannot run \(path): \(String(cString: strerror(errno)))") }
        let status = vmpool_wait(pid)
        return (status, (try? String(contentsOfFile: log, encoding: .utf8)) ?? "")
    }
}

/// SHA-256 of a layer's uncompressed stream.
final class DiffHasher {
    private var hasher = SHA256()
    func update(_ bytes: UnsafeRawBufferPointer) { hasher.update(bufferPointer: bytes) }
    var digest: String { "sha256:" + hex(hasher.finalize()) }
}
