import CVmpoolSys
import Foundation
import VmpoolDriver
import VmpoolTestSupport

@testable import VmpoolQEMU

/// Whether the tests that change this host's cgroups run, and why not.
enum CgroupEnvironment {
    static let layout = CgroupLayout.detect()

    /// CI (VMPOOL_REQUIRE_QEMU=1, or VMPOOL_REQUIRE_CGROUPS=1) runs them: a missing part fails there.
    static let required =
        ProcessInfo.processInfo.environment["VMPOOL_REQUIRE_QEMU"] == "1"
        || ProcessInfo.processInfo.environment["VMPOOL_REQUIRE_CGROUPS"] == "1"

    static var skipReason: String? {
        if geteuid() != 0 { return "not root: cgroups cannot be created" }
        if case .failure(let error) = layout { return error.message }
        return nil
    }

    static var available: Bool { required || skipReason == nil }

    /// A real cgroup2 mount where tests may create cgroups, and a controller it can enable
    /// (on a v1 host the cpu, memory and pids controllers are bound to v1; hugetlb is not).
    static let unified: (mount: String, controller: String)? = {
        let mounts = CgroupLayout.Mount.parse(CgroupFiles.read("/proc/self/mountinfo") ?? "")
        for mount in mounts where mount.type == "cgroup2" && mount.root == "/" {
            let controllers = (CgroupFiles.read(mount.mountPoint + "/cgroup.controllers") ?? "").split(separator: " ")
                .map { $0.trimmingCharacters(in: .whitespacesAndNewlines) }
            if let controller = ["hugetlb", "misc", "rdma"].first(where: controllers.contains) {
                return (mount.mountPoint, controller)
            }
        }
        return nil
    }()
}

/// A process started into cgroups through a handle's descriptors (`vmpool_spawn_joined`);
/// `arguments` is its whole argv, argv[0] included.
struct JoinedProcess {
    let pid: Int32

    init(_ path: String, _ arguments: [String], handle: CgroupHandle) throws {
        try self.init(path, arguments, descriptors: handle.procsDescriptors)
    }

    init(_ path: String, _ arguments: [String], descriptors: [Int32], stderr: Int32 = -1) throws {
        let pid = withCStrings(arguments) { argv in
            descriptors.withUnsafeBufferPointer { fds in
                vmpool_spawn_joined(path, argv, fds.baseAddress, Int32(fds.count), stderr)
            }
        }
        guard pid > 0 else { throw SandboxError("cannot start \(path): \(String(cString: strerror(errno)))") }
        self.pid = pid
    }

    /// The cgroup paths /proc/PID/cgroup lists, one per hierarchy line.
    var cgroups: [String] {
        (CgroupFiles.read("/proc/\(pid)/cgroup") ?? "").split(separator: "\n").map {
            String($0.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false).last ?? "")
        }
    }

    /// Waits for the exit; the status (128 + signal when killed).
    @discardableResult
    func wait() -> Int32 { vmpool_wait(pid) }

    /// SIGKILL and reap (the test's cleanup; harmless when already reaped).
    func stop() {
        if kill(pid, 0) == 0 {
            kill(pid, SIGKILL)
            _ = vmpool_wait(pid)
        }
    }
}

/// A plain directory that behaves like a cgroup v2 file system where vmpool can tell: mkdir
/// gives a cgroup its interface files (the controllers its parent enables), subtree_control
/// takes `+name`/`-name` for controllers the cgroup has and refuses (EBUSY) a non-root cgroup
/// holding processes, limit files refuse malformed values (EINVAL), a missing file is ENOENT,
/// rmdir refuses a cgroup with children or processes (EBUSY), cgroup.kill empties cgroup.procs.
/// Every change is recorded, relative to the root, to be replayed on a real kernel.
final class FakeCgroup2: @unchecked Sendable {
    enum Operation: Equatable, CustomStringConvertible {
        case mkdir(String)
        case rmdir(String)
        case write(String, String)

        var description: String {
            switch self {
            case .mkdir(let path): return "mkdir \(path)"
            case .rmdir(let path): return "rmdir \(path)"
            case .write(let path, let value): return "write \(path) \(value)"
            }
        }
    }

    let directory = TemporaryDirectory(prefix: "fakecg")
    var root: String { directory.path }
    private let lock = NSLock()
    private var recorded: [Operation] = []

    init(controllers: [String] = ["cpuset", "cpu", "io", "memory", "hugetlb", "pids"]) {
        put(root + "/cgroup.controllers", controllers.joined(separator: " "))
        put(root + "/cgroup.subtree_control", "")
        put(root + "/cgroup.procs", "1\n")
    }

    var operations: [Operation] {
        lock.lock()
        defer { lock.unlock() }
        return recorded
    }

    func clearOperations() {
        lock.lock()
        recorded.removeAll()
        lock.unlock()
    }

    var calls: CgroupSystemCalls {
        CgroupSystemCalls(
            mkdir: { [self] in mkdir($0) }, rmdir: { [self] in rmdir($0) }, write: { [self] in write($0, $1) })
    }

    func layout(base: String = "") -> Result<CgroupLayout, DriverError> {
        let available = words(root + base + "/cgroup.controllers")
        let controllers = ["cpu", "memory", "pids"] + (available.contains("io") ? ["io"] : [])
        return .success(
            CgroupLayout(version: .v2, hierarchies: [.init(controllers: controllers, base: root + base)]))
    }

    func cgroups(stateDirectory: String, base: String = "") -> VMCgroups {
        var cgroups = VMCgroups(stateDirectory: stateDirectory, translationCacheMiB: 64, layout: layout(base: base))
        cgroups.system = calls
        return cgroups
    }

    func relative(_ path: String) -> String { String(path.dropFirst(root.count)) }

    func read(_ path: String) -> String? { CgroupFiles.read(path) }

    func put(_ path: String, _ text: String) {
        _ = FileManager.default.createFile(atPath: path, contents: Data(text.utf8))
    }

    private func words(_ path: String) -> [String] {
        (read(path) ?? "").split(whereSeparator: \.isWhitespace).map(String.init)
    }

    private func record(_ operation: Operation) {
        lock.lock()
        recorded.append(operation)
        lock.unlock()
    }

    private func mkdir(_ path: String) -> Int32? {
        let parent = (path as NSString).deletingLastPathComponent
        guard CgroupFiles.exists(parent + "/cgroup.procs") else { return ENOENT }
        guard Glibc.mkdir(path, 0o755) == 0 else { return errno }
        record(.mkdir(relative(path)))
        let controllers = words(parent + "/cgroup.subtree_control")
        var files = [
            "cgroup.controllers": controllers.joined(separator: " "), "cgroup.subtree_control": "",
            "cgroup.procs": "", "cgroup.type": "domain\n", "cgroup.events": "populated 0\nfrozen 0\n",
            "cgroup.kill": "", "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
        ]
        if controllers.contains("cpu") {
            files["cpu.max"] = "max 100000\n"
            files["cpu.stat"]! += "nr_periods 0\nnr_throttled 0\nthrottled_usec 0\n"
        }
        if controllers.contains("memory") {
            files["memory.max"] = "max\n"
            files["memory.swap.max"] = "max\n"
            files["memory.oom.group"] = "0\n"
            files["memory.current"] = "0\n"
            files["memory.events"] = "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"
        }
        if controllers.contains("pids") {
            files["pids.max"] = "max\n"
            files["pids.current"] = "0\n"
        }
        if controllers.contains("io") { files["io.weight"] = "default 100\n" }
        for (name, text) in files { put(path + "/" + name, text) }
        return nil
    }

    private func rmdir(_ path: String) -> Int32? {
        guard CgroupFiles.exists(path) else { return ENOENT }
        if !CgroupFiles.children(path).isEmpty || !(read(path + "/cgroup.procs") ?? "").isEmpty { return EBUSY }
        try? FileManager.default.removeItem(atPath: path)
        record(.rmdir(relative(path)))
        return nil
    }

    private func write(_ path: String, _ value: String) -> Int32? {
        guard CgroupFiles.exists(path) else { return ENOENT }
        let directory = (path as NSString).deletingLastPathComponent
        let name = (path as NSString).lastPathComponent
        let number = #/(0|[1-9][0-9]*)/#
        var text = value
        switch name {
        case "cgroup.subtree_control":
            var enabled = Set(words(path))
            let available = Set(words(directory + "/cgroup.controllers"))
            for token in value.split(separator: " ") {
                let controller = String(token.dropFirst())
                guard available.contains(controller), token.first == "+" || token.first == "-" else { return ENOENT }
                if token.first == "+" { enabled.insert(controller) } else { enabled.remove(controller) }
            }
            let isRoot = !CgroupFiles.exists(directory + "/cgroup.type")
            if !isRoot && !(read(directory + "/cgroup.procs") ?? "").isEmpty && !enabled.isEmpty { return EBUSY }
            text = enabled.sorted().joined(separator: " ")
        case "cgroup.kill":
            guard value == "1" else { return EINVAL }
            put(directory + "/cgroup.procs", "")
            text = ""
        case "cpu.max":
            guard value.wholeMatch(of: #/(max|[1-9][0-9]*) [1-9][0-9]*/#) != nil else { return EINVAL }
        case "memory.max", "memory.swap.max", "pids.max":
            guard value == "max" || value.wholeMatch(of: number) != nil else { return EINVAL }
        case "memory.oom.group":
            guard value == "0" || value == "1" else { return EINVAL }
        case "io.weight":
            guard let match = value.wholeMatch(of: #/default ([0-9]+)/#), let weight = Int(match.1),
                (1...10000).contains(weight)
            else { return EINVAL }
        default:
            break
        }
        put(path, text)
        record(.write(relative(path), value))
        return nil
    }
}

/// The kernel's log (/dev/kmsg), as records with their sequence numbers.
enum KernelLog {
    struct Record {
        var sequence: Int
        var message: String
    }

    /// Every record the kernel still holds; nil when /dev/kmsg cannot be read.
    static func records() -> [Record]? {
        let fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var records: [Record] = []
        var buffer = [UInt8](repeating: 0, count: 16384)
        while true {
            let count = read(fd, &buffer, buffer.count)
            if count < 0 {
                if errno == EPIPE || errno == EINTR { continue }  // EPIPE: a record was overwritten
                break
            }
            guard count > 0 else { break }
            // "PRIORITY,SEQUENCE,TIMESTAMP,FLAGS;MESSAGE\n" and continuation lines.
            let text = String(decoding: buffer[0..<count], as: UTF8.self)
            guard let semicolon = text.firstIndex(of: ";") else { continue }
            let header = text[..<semicolon].split(separator: ",")
            guard header.count >= 2, let sequence = Int(header[1]) else { continue }
            let message = text[text.index(after: semicolon)...].split(separator: "\n").first.map(String.init) ?? ""
            records.append(Record(sequence: sequence, message: message))
        }
        return records
    }

    /// `KEY=VALUE` out of a comma-separated kernel message.
    static func field(_ message: String, _ key: String) -> String? {
        message.split(separator: ",").first { $0.hasPrefix(key + "=") }.map { String($0.dropFirst(key.count + 1)) }
    }
}
