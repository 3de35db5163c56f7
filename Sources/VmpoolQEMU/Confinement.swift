import CVmpoolSys
import Foundation
import Synchronization
import VmpoolDriver

/// The uids VMs run as: each VM a uid of its own from the subordinate uid range of the QEMU
/// user (`/etc/subuid`), so that no two VMs' QEMUs can signal, trace or read each other, and
/// the network walls can tell whose traffic a packet is by its socket's owner (Firecracker's
/// jailer gives each microVM its own uid for the same reasons).
///
/// A uid is taken by an exclusive lock on `/run/vmpool/uids/UID`, whose descriptor the QEMU
/// process inherits: the uid is held exactly as long as the process lives, across vmpool's
/// own exits and crashes, and freed by the kernel when it dies. A uid some process still runs
/// as (a QEMU that dropped its lock) is never given again.
public struct VMUsers: Sendable {
    /// The QEMU user: its name and primary group.
    public let user: String
    public let gid: gid_t
    /// Its subordinate range.
    public let first: uid_t
    public let count: UInt32

    static let lockDirectory = "/run/vmpool/uids"

    /// Reads `user` and its subordinate range from the system's databases.
    public static func load(user: String, subuid: String = "/etc/subuid") throws(DriverError) -> VMUsers {
        guard let entry = getpwnam(user) else {
            throw DriverError(
                .hostUnsupported,
                "the QEMU user \(user) does not exist: scripts/setup creates it (useradd --system \(user), with a"
                    + " subordinate uid range in /etc/subuid); --qemu-user names another")
        }
        let gid = entry.pointee.pw_gid
        let text = (try? String(contentsOfFile: subuid, encoding: .utf8)) ?? ""
        let uid = entry.pointee.pw_uid
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: ":", omittingEmptySubsequences: false)
            guard fields.count == 3, fields[0] == user || fields[0] == "\(uid)",
                let first = UInt32(fields[1]), let count = UInt32(fields[2]), count >= 16
            else { continue }
            return VMUsers(user: user, gid: gid, first: first, count: count)
        }
        throw DriverError(
            .hostUnsupported,
            "the QEMU user \(user) has no subordinate uid range in \(subuid): each VM runs as a uid of its own"
                + " from it; scripts/setup adds one (usermod --add-subuids FIRST-LAST \(user))")
    }

    /// Whether `uid` is one VMs run as.
    public func contains(_ uid: uid_t) -> Bool { uid >= first && UInt64(uid) < UInt64(first) + UInt64(count) }

    /// A free uid for `vm`, with the lock that holds it (to be inherited by the VM's process).
    func claim(for vm: String) throws(DriverError) -> VMUser {
        try PrivateDirectory.make("/run/vmpool")
        try PrivateDirectory.make(Self.lockDirectory)
        let running = Self.uidsInUse()
        // Start where the VM's name points, so that concurrent claimers rarely race for one.
        let start = UInt32(truncatingIfNeeded: QemuPaths.fnv(vm)) % count
        for step in 0..<count {
            let uid = first + (start &+ step) % count
            if running.contains(uid) { continue }
            let path = Self.lockDirectory + "/\(uid)"
            let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
            guard fd >= 0 else {
                throw DriverError(.io, "cannot open \(path): \(String(cString: strerror(errno)))", vm: vm)
            }
            if flock(fd, LOCK_EX | LOCK_NB) == 0 { return VMUser(uid: uid, gid: gid, lock: fd) }
            close(fd)
        }
        throw DriverError(
            .limitExceeded, "every uid of \(user)'s subordinate range (\(count)) is in use by a VM", vm: vm)
    }

    /// Whether a process holds `uid`'s lock: a VM runs as it, or is being started as it.
    static func isHeld(_ uid: uid_t) -> Bool {
        let fd = open(lockDirectory + "/\(uid)", O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        if flock(fd, LOCK_SH | LOCK_NB) == 0 {
            flock(fd, LOCK_UN)
            return false
        }
        return errno == EWOULDBLOCK
    }

    /// The owners of every process (the owner of /proc/PID).
    static func uidsInUse() -> Set<uid_t> {
        var uids: Set<uid_t> = []
        for pid in QemuProcess.processIDs() {
            var info = stat()
            if stat("/proc/\(pid)", &info) == 0 { uids.insert(info.st_uid) }
        }
        return uids
    }
}

/// A uid taken for one VM; `lock` goes to its process.
struct VMUser {
    let uid: uid_t
    let gid: gid_t
    let lock: Int32
}

/// How this host confines QEMU: as root, each VM as a uid of its own and behind the network
/// walls; as any other user (a developer's machine), QEMU runs as that user, unwalled.
public enum Confinement: Sendable {
    case users(VMUsers)
    case none(reason: String)

    /// Decided once per process from who vmpool runs as and the configuration.
    static func resolve(_ configuration: QemuConfiguration) throws(DriverError) -> Confinement {
        guard configuration.confine else { return .none(reason: "turned off (VMPOOL_WALLS=0)") }
        guard geteuid() == 0 else { return .none(reason: "vmpool is not root") }
        return .users(try VMUsers.load(user: configuration.qemuUser))
    }
}

/// What a QEMU process is started with besides its arguments: the descriptors it inherits
/// (each becomes 3, 4, ... in QEMU, in the order added), where its output goes, who it runs as.
struct LaunchPlan {
    private(set) var fds: [Int32] = []
    /// Descriptors this process opened for the launch, closed once QEMU has them.
    private var owned: [Int32] = []
    var log: Int32 = -1
    var user: VMUser?
    var cgroupProcs: [Int32] = []
    /// Copies (memfds) emptied once QEMU has read them.
    var emptiedAfterStart: [Int32] = []

    /// Hands `fd` to QEMU; returns its number there. With `owned`, it is closed here after launch.
    mutating func pass(_ fd: Int32, owned: Bool = true) -> Int32 {
        fds.append(fd)
        if owned { self.owned.append(fd) }
        return Int32(2 + fds.count)
    }

    /// Opens `path` and hands it to QEMU.
    mutating func open(_ path: String, _ flags: Int32, mode: mode_t = 0o600, vm: String) throws(DriverError) -> Int32 {
        let fd = Glibc.open(path, flags | O_CLOEXEC | O_NOFOLLOW, mode)
        guard fd >= 0 else {
            throw DriverError(.io, "cannot open \(path) for QEMU: \(String(cString: strerror(errno)))", vm: vm)
        }
        return pass(fd)
    }

    /// Closes what was opened for the launch (QEMU has its own copies by now, or never ran).
    mutating func closeAll() {
        for fd in owned { close(fd) }
        owned = []
        if log >= 0 { close(log) }
        log = -1
        for fd in cgroupProcs { close(fd) }
        cgroupProcs = []
    }

    /// Starts `binary` with `arguments` under this plan; returns its pid once it has exec'd.
    func launch(_ binary: String, _ arguments: [String], vm: String) throws(DriverError) -> Int32 {
        var pid: Int32 = 0
        var step: Int32 = 0
        let environment = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]
        let result = withCStrings([binary] + arguments) { argv in
            withCStrings(environment) { envp in
                vmpool_launch(
                    binary, argv, envp, fds, Int32(fds.count), cgroupProcs, Int32(cgroupProcs.count), log,
                    user.map { Int($0.uid) } ?? -1, user.map { Int($0.gid) } ?? -1, &pid, &step)
            }
        }
        guard result == 0 else {
            let what =
                [
                    1: "joining its cgroup", 2: "passing its descriptors", 3: "setting up its output",
                    4: "changing directory", 5: "dropping to its uid", 6: "setting no_new_privs",
                    7: "executing \(binary)", 8: "forking",
                ][step] ?? "starting"
            throw DriverError(.launchFailed, "cannot start QEMU (\(what)): \(String(cString: strerror(errno)))", vm: vm)
        }
        return pid
    }
}
