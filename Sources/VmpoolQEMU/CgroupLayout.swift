import Foundation
import VmpoolDriver

/// The cgroup hierarchies vmpool uses on this host and where its `vmpool` parent goes in each.
///
/// cgroup v2 is used when one unified hierarchy offers the cpu, memory and pids controllers;
/// otherwise the v1 hierarchies of cpu, memory and pids (and blkio, for the io weight, where
/// mounted). A systemd "hybrid" host (v1 controllers plus a cgroup2 mount without them, as the
/// development machines have) is a v1 host.
///
/// Where the parent goes. vmpool's VM cgroups hang below the cgroup vmpool itself runs in
/// (`/proc/self/cgroup`), so that a container or a delegated systemd unit keeps them inside
/// what it was given:
///
/// - v1: `OWN/vmpool` in each hierarchy. v1 lets a cgroup hold processes and children alike.
/// - v2, vmpool in the root cgroup (a host's `/`): `/vmpool`; the root is exempt from the
///   rule below.
/// - v2, vmpool in any other cgroup: `PARENT-OF-OWN/vmpool`, a sibling of vmpool's own cgroup.
///   v2 lets a non-root cgroup either hold processes or give controllers to children, never
///   both ("no internal processes"); vmpool's own cgroup holds vmpool (and, in a login session
///   or a cron job, other processes vmpool must not move), so `OWN/vmpool` could never get the
///   cpu, memory and pids controllers. Its parent (a systemd slice, a container's cgroup)
///   holds no processes of its own, so it can give them to a sibling: vmpool needs them in
///   the parent's `cgroup.controllers` and enables them in its `cgroup.subtree_control` where
///   they are not yet. vmpool's own process stays where it is. Under systemd, give the unit a
///   delegated subgroup
///   (`Delegate=yes` and `DelegateSubgroup=supervisor`, systemd 254 and later) and the parent
///   lands inside the unit's delegated cgroup; on older systemd (Debian 12 has 252) it lands in
///   the unit's slice, beside the unit, and VMs outlive a restart of the unit, which is what
///   `KillMode=process` asks for anyway.
/// - v2, vmpool at the top of a cgroup namespace that is not the real root (a container whose
///   processes all sit in its top cgroup): no place works until the container's processes move
///   to a child cgroup (as docker-in-docker moves them to `/init`); that is reported, not done.
public struct CgroupLayout: Sendable, Equatable {
    /// The cgroup version; v1 spreads the controllers over hierarchies of their own.
    public enum Version: String, Sendable {
        case v1
        case v2
    }

    /// One hierarchy vmpool writes in, and the cgroup its `vmpool` parent is created in.
    public struct Hierarchy: Sendable, Equatable {
        /// v1: the controllers of this hierarchy vmpool uses (cpu, memory, pids, blkio);
        /// v2: the controllers vmpool enables for its cgroups (cpu, memory, pids, io where
        /// available).
        public var controllers: [String]
        /// The directory `vmpool/` is created in.
        public var base: String

        /// A hierarchy (tests pass a fake root's).
        public init(controllers: [String], base: String) {
            self.controllers = controllers
            self.base = base
        }
    }

    /// Which version's files vmpool writes.
    public var version: Version
    /// v2: one; v1: one per hierarchy (cpu, memory and pids may share one, as cpu and cpuacct do).
    public var hierarchies: [Hierarchy]

    /// A layout of the caller's (another cgroup root, a fake one in tests).
    public init(version: Version, hierarchies: [Hierarchy]) {
        self.version = version
        self.hierarchies = hierarchies
    }

    /// The controllers vmpool needs on either version; without one of them it does not manage cgroups.
    static let required = ["cpu", "memory", "pids"]

    /// Reads this process's mounts and cgroups and decides; `.failure` says what is missing.
    public static func detect() -> Result<CgroupLayout, DriverError> {
        let mountinfo = CgroupFiles.read("/proc/self/mountinfo") ?? ""
        let own = CgroupFiles.read("/proc/self/cgroup") ?? ""
        return detect(mountinfo: mountinfo, ownCgroups: own, read: CgroupFiles.read, exists: CgroupFiles.exists)
    }

    /// Decides from the texts of /proc/self/mountinfo and /proc/self/cgroup; `read` and
    /// `exists` look at cgroup files (tests pass fixtures).
    static func detect(
        mountinfo: String, ownCgroups: String, read: (String) -> String?, exists: (String) -> Bool
    ) -> Result<CgroupLayout, DriverError> {
        let mounts = Mount.parse(mountinfo)
        let own = OwnCgroups.parse(ownCgroups)
        var reasons: [String] = []
        switch unified(mounts: mounts, own: own, read: read, exists: exists) {
        case .success(let layout): return .success(layout)
        case .failure(let reason): reasons.append(reason.message)
        }
        switch legacy(mounts: mounts, own: own, exists: exists) {
        case .success(let layout): return .success(layout)
        case .failure(let reason): reasons.append(reason.message)
        }
        return .failure(
            DriverError(
                .hostUnsupported,
                "cgroups cannot be managed on this host: " + reasons.joined(separator: "; ")))
    }

    struct Reason: Error {
        var message: String
    }

    private static func unified(
        mounts: [Mount], own: OwnCgroups, read: (String) -> String?, exists: (String) -> Bool
    ) -> Result<CgroupLayout, Reason> {
        let candidates = mounts.filter { $0.type == "cgroup2" }
        guard !candidates.isEmpty else { return .failure(Reason(message: "no cgroup2 file system is mounted")) }
        guard let ownPath = own.unified else {
            return .failure(Reason(message: "/proc/self/cgroup has no cgroup v2 entry"))
        }
        // The mount that shows vmpool's own cgroup; the standard place first.
        let sorted = candidates.sorted {
            ($0.mountPoint == "/sys/fs/cgroup" ? 0 : 1, $0.id) < ($1.mountPoint == "/sys/fs/cgroup" ? 0 : 1, $1.id)
        }
        guard let mount = sorted.first(where: { $0.directory(of: ownPath) != nil }),
            let ownDirectory = mount.directory(of: ownPath)
        else {
            return .failure(Reason(message: "vmpool's cgroup \(ownPath) is not visible under any cgroup2 mount"))
        }
        // The root cgroup has no cgroup.type: it alone may hold processes and give controllers.
        let isRoot = !exists(ownDirectory + "/cgroup.type")
        let base: String
        if isRoot {
            base = ownDirectory
        } else if ownDirectory != mount.mountPoint {
            base = String(ownDirectory[..<ownDirectory.lastIndex(of: "/")!])
        } else {
            return .failure(
                Reason(
                    message:
                        "cgroup v2 at \(mount.mountPoint): vmpool runs in the top cgroup of its namespace, which holds"
                        + " processes and is not the root, so no cgroup of it can get controllers (move the"
                        + " processes into a child cgroup, e.g. /init, first)"))
        }
        let available = Set(
            (read(base + "/cgroup.controllers") ?? "").split(whereSeparator: { $0.isWhitespace }).map(String.init))
        let missing = required.filter { !available.contains($0) }
        guard missing.isEmpty else {
            return .failure(
                Reason(
                    message:
                        "cgroup v2 at \(mount.mountPoint): the \(missing.joined(separator: ", ")) controller"
                        + "\(missing.count == 1 ? " is" : "s are") not available in \(base) (bound to a v1"
                        + " hierarchy, or not delegated to it)"))
        }
        let controllers = required + (available.contains("io") ? ["io"] : [])
        return .success(CgroupLayout(version: .v2, hierarchies: [Hierarchy(controllers: controllers, base: base)]))
    }

    private static func legacy(mounts: [Mount], own: OwnCgroups, exists: (String) -> Bool) -> Result<
        CgroupLayout, Reason
    > {
        var hierarchies: [Hierarchy] = []
        var missing: [String] = []
        for controller in required + ["blkio"] {
            guard let mount = mounts.first(where: { $0.type == "cgroup" && $0.controllers.contains(controller) }),
                let ownPath = own.legacy.first(where: { $0.controllers == mount.controllers })?.path,
                let directory = mount.directory(of: ownPath)
            else {
                if controller != "blkio" { missing.append(controller) }
                continue
            }
            // blkio serves only the io weight: CFQ's blkio.weight or BFQ's blkio.bfq.weight.
            if controller == "blkio"
                && !["blkio.weight", "blkio.bfq.weight"].contains(where: { exists(directory + "/" + $0) })
            {
                continue
            }
            if let index = hierarchies.firstIndex(where: { $0.base == directory }) {
                hierarchies[index].controllers.append(controller)
            } else {
                hierarchies.append(Hierarchy(controllers: [controller], base: directory))
            }
        }
        guard missing.isEmpty else {
            return .failure(
                Reason(message: "no cgroup v1 hierarchy for \(missing.joined(separator: ", ")) is mounted"))
        }
        return .success(CgroupLayout(version: .v1, hierarchies: hierarchies))
    }

    /// One line of /proc/self/mountinfo that mounts a cgroup file system.
    struct Mount: Equatable {
        var id: Int
        /// The cgroup shown at the mount point ("/" unless bind-mounted from inside, or seen
        /// from another cgroup namespace).
        var root: String
        var mountPoint: String
        var type: String
        /// v1: the controllers of the hierarchy (from the super options).
        var controllers: Set<String>

        static let knownControllers: Set<String> = [
            "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "net_prio", "blkio",
            "perf_event", "hugetlb", "pids", "rdma", "misc",
        ]

        /// `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPEROPTIONS`.
        static func parse(_ text: String) -> [Mount] {
            text.split(separator: "\n").compactMap { line in
                let fields = line.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
                guard let dash = fields.firstIndex(of: "-"), dash >= 6, fields.count >= dash + 4,
                    let id = Int(fields[0])
                else { return nil }
                let type = fields[dash + 1]
                guard type == "cgroup" || type == "cgroup2" else { return nil }
                let options = Set(fields[dash + 3].split(separator: ",").map(String.init))
                return Mount(
                    id: id, root: unescape(fields[3]), mountPoint: unescape(fields[4]), type: type,
                    controllers: type == "cgroup" ? options.intersection(knownControllers) : [])
            }
        }

        /// mountinfo writes space, tab, newline and backslash as `\ooo`.
        static func unescape(_ field: String) -> String {
            guard field.contains("\\") else { return field }
            var bytes: [UInt8] = []
            var utf8 = Array(field.utf8)[...]
            while let byte = utf8.popFirst() {
                if byte == UInt8(ascii: "\\"), utf8.count >= 3,
                    let value = UInt8(String(decoding: utf8.prefix(3), as: UTF8.self), radix: 8)
                {
                    bytes.append(value)
                    utf8 = utf8.dropFirst(3)
                } else {
                    bytes.append(byte)
                }
            }
            return String(decoding: bytes, as: UTF8.self)
        }

        /// The directory of cgroup `path` under this mount, or nil when the mount does not show it.
        func directory(of path: String) -> String? {
            // A cgroup outside this process's cgroup namespace reads as "/../...".
            guard path.hasPrefix("/"), !path.split(separator: "/").contains("..") else { return nil }
            if root == "/" { return path == "/" ? mountPoint : mountPoint + path }
            if path == root { return mountPoint }
            guard path.hasPrefix(root + "/") else { return nil }
            return mountPoint + path.dropFirst(root.count)
        }
    }

    /// /proc/self/cgroup: `0::PATH` for v2, `ID:CONTROLLERS:PATH` for each v1 hierarchy.
    struct OwnCgroups: Equatable {
        var unified: String?
        var legacy: [(controllers: Set<String>, path: String)] = []

        static func == (lhs: OwnCgroups, rhs: OwnCgroups) -> Bool {
            lhs.unified == rhs.unified
                && lhs.legacy.map { [$0.controllers.sorted().joined(separator: ","), $0.path] }
                    == rhs.legacy.map { [$0.controllers.sorted().joined(separator: ","), $0.path] }
        }

        static func parse(_ text: String) -> OwnCgroups {
            var result = OwnCgroups()
            for line in text.split(separator: "\n") {
                let parts = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
                guard parts.count == 3 else { continue }
                let path = String(parts[2])
                if parts[0] == "0" && parts[1].isEmpty {
                    result.unified = path
                } else {
                    let controllers = Set(parts[1].split(separator: ",").map(String.init))
                        .intersection(Mount.knownControllers)
                    if !controllers.isEmpty { result.legacy.append((controllers, path)) }
                }
            }
            return result
        }
    }
}

/// Plain reads and writes of cgroup files: one write(2) per value, as the kernel parses them.
enum CgroupFiles {
    static func read(_ path: String) -> String? {
        guard let bytes = QemuProcess.readProcFile(path, limit: 1 << 20) else { return nil }
        return String(decoding: bytes, as: UTF8.self)
    }

    static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    /// Writes `text` in one call; the errno of a refused write.
    static func write(_ path: String, _ text: String) -> Int32? {
        let fd = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC)
        guard fd >= 0 else { return errno }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        while true {
            let written = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if written == bytes.count { return nil }
            if written < 0 && errno == EINTR { continue }
            return written < 0 ? errno : EIO
        }
    }

    /// The names of the subdirectories of `path` (child cgroups).
    static func children(_ path: String) -> [String] {
        guard let dir = opendir(path) else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            guard entry.pointee.d_type == DT_DIR else { continue }
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    /// `KEY VALUE` lines (memory.events, memory.oom_control, cpu.stat) as a dictionary.
    static func keyed(_ text: String?) -> [String: Int] {
        var result: [String: Int] = [:]
        for line in (text ?? "").split(separator: "\n") {
            let parts = line.split(separator: " ")
            if parts.count == 2, let value = Int(parts[1]) { result[String(parts[0])] = value }
        }
        return result
    }

    static func describe(_ error: Int32) -> String { String(cString: strerror(error)) }
}
