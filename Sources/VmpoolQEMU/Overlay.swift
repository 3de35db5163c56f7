import Foundation
import VmpoolDriver

/// Copy-on-write overlays: every VM writes to its own qcow2 over a base image (or over its
/// template's frozen disk), so that no VM's writes reach the base or another VM.
enum Overlay {
    /// Makes `disk.path`: a qcow2 over `disk.backing` (read, never written), or an empty one.
    static func create(_ disk: DiskAttachment, qemuImg: String, vm: String) throws(DriverError) {
        guard let binary = QemuProcess.resolve(qemuImg) else {
            throw DriverError(.hostUnsupported, "qemu-img is not installed; install qemu-utils", vm: vm)
        }
        // 16 KiB clusters: a VM's first small writes allocate a quarter of what the default
        // 64 KiB would, keeping a fresh clone's overlay small.
        var arguments = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=16384"]
        if let backing = disk.backing {
            guard access(backing, R_OK) == 0 else {
                throw DriverError(.imageMissing, "disk image \(backing) does not exist or is not readable", vm: vm)
            }
            arguments += ["-b", backing, "-F", disk.backingChain.first?.format ?? "qcow2"]
        }
        arguments.append(disk.path)
        if let bytes = disk.sizeBytes {
            arguments.append("\(bytes)")
        } else if let size = disk.sizeMiB {
            arguments.append("\(size)M")
        }
        let (status, errors) = try Spawn.run(binary, arguments)
        guard status == 0 else {
            unlink(disk.path)
            throw DriverError(
                .launchFailed,
                "cannot make the overlay of disk \(disk.name): \(errors.trimmingCharacters(in: .whitespacesAndNewlines))",
                vm: vm)
        }
        chmod(disk.path, 0o600)
    }

    /// The base image a disk is made over, if any.
    static func base(of disk: DiskShape) -> [BackingFile] {
        disk.base.map { [BackingFile(path: $0, format: disk.format ?? "raw")] } ?? []
    }

    /// A VM's overlays over the pool's base images (cold VMs, template VMs).
    static func overBases(_ disks: [DiskShape], scratch: Bool, path: (String) -> String) -> [DiskAttachment] {
        disks.map { disk in
            DiskAttachment(
                name: disk.name, path: path(disk.name), backingChain: base(of: disk),
                sizeMiB: disk.base == nil || disk.sizeMiB > 0 ? disk.sizeMiB : nil, scratch: scratch)
        }
    }

    /// A clone's overlays over its template's frozen disks (same sizes). A fork's snapshot
    /// of a clone is made over that clone's template: `underlay` names it.
    static func overTemplate(
        _ disks: [DiskShape], template: String, underlay: String? = nil, paths: QemuPaths, vm: String
    ) -> [DiskAttachment] {
        disks.map { disk in
            let frozen = ([template] + (underlay.map { [$0] } ?? [])).map {
                BackingFile(path: paths.templateDisk(template: $0, disk: disk.name), format: "qcow2")
            }
            return DiskAttachment(
                name: disk.name, path: paths.overlay(vm, disk: disk.name), backingChain: frozen + base(of: disk),
                sizeMiB: nil, scratch: true)
        }
    }
}
