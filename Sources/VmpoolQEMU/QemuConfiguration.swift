import VmpoolSpec
import Foundation
import VmpoolDriver

/// Which accelerator QEMU uses.
public enum Accelerator: String, Sendable, CaseIterable {
    /// KVM where it really runs guests, else TCG; decided by a probe, cached per host boot.
    case auto
    case kvm
    case tcg
}

/// How the qemu driver runs QEMU. Defaults suit a small host with TCG.
public struct QemuConfiguration: Sendable {
    /// The state dir: VM run dirs, template device state, the accelerator probe cache.
    public var stateDirectory: String
    /// QEMU binary (`VMPOOL_QEMU`; default `qemu-system-x86_64` from PATH).
    public var binary: String
    /// qemu-img, which makes the disks' overlays (`VMPOOL_QEMU_IMG`; default from PATH).
    public var qemuImg: String = "qemu-img"
    public var accelerator: Accelerator
    /// Where template memory files live: a tmpfs (`VMPOOL_MEMORY_DIR`; default /dev/shm).
    public var memoryRoot: String
    /// Run QEMU with `-sandbox on` (seccomp) where QEMU supports it (`VMPOOL_QEMU_SANDBOX=0` turns it off).
    public var sandbox: Bool
    /// The user whose subordinate uid range VMs run as, one uid each (`--qemu-user`,
    /// `VMPOOL_QEMU_USER`; made by scripts/setup). Used when vmpool runs as root.
    public var qemuUser = "vmpool-qemu"
    /// Confine QEMU (its own uid, cgroup and network walls) where vmpool can: as root.
    /// `VMPOOL_WALLS=0` turns it off, to measure what the walls cost.
    public var confine = true
    /// Put each confined VM's QEMU in a cgroup of its own (`VMPOOL_CGROUPS=0` turns it off:
    /// for a vmpool run where no cgroup file system is mounted, such as `ip netns exec`).
    public var cgroups = true
    /// Longest wait for a cold-booted guest's agent (`VMPOOL_BOOT_TIMEOUT`).
    public var bootTimeout: Duration
    /// Set the guest clock after a clone or resume (`VMPOOL_CLOCK_SYNC=0` turns it off, to
    /// measure what it is worth: a clone then keeps its template's clock).
    public var clockSync = true
    /// Longest wait for a clone's agent after restore.
    public var restoreTimeout: Duration
    /// How long `quit` may take before SIGKILL.
    public var stopGrace: Duration
    /// TCG translation cache per VM, MiB (QEMU's default is 1 GiB of address space).
    public var tcgCacheMiB: Int
    /// Firmware for `-bios`; `nil`: QEMU's default (SeaBIOS). qboot boots 0.1 s sooner but
    /// hangs with a vmgenid device (it does not run QEMU's ACPI table loader), and every VM has
    /// one. Templates and clones must use the same firmware.
    public var firmware: String?

    public init(
        stateDirectory: String, binary: String = "qemu-system-x86_64", accelerator: Accelerator = .auto,
        memoryRoot: String = "/dev/shm", sandbox: Bool = true,
        bootTimeout: Duration = .seconds(180), restoreTimeout: Duration = .seconds(30),
        stopGrace: Duration = .seconds(3), tcgCacheMiB: Int = 64
    ) {
        self.stateDirectory = stateDirectory
        self.binary = binary
        self.accelerator = accelerator
        self.memoryRoot = memoryRoot
        self.sandbox = sandbox
        self.bootTimeout = bootTimeout
        self.restoreTimeout = restoreTimeout
        self.stopGrace = stopGrace
        self.tcgCacheMiB = tcgCacheMiB
        self.firmware = nil
    }

    /// Reads the `VMPOOL_QEMU*` environment variables over the defaults.
    public static func fromEnvironment(
        stateDirectory: String, accelerator: Accelerator,
        _ environment: [String: String] = ProcessInfo.processInfo.environment
    ) -> QemuConfiguration {
        var config = QemuConfiguration(stateDirectory: stateDirectory, accelerator: accelerator)
        if let binary = environment["VMPOOL_QEMU"], !binary.isEmpty { config.binary = binary }
        if let binary = environment["VMPOOL_QEMU_IMG"], !binary.isEmpty { config.qemuImg = binary }
        if let root = environment["VMPOOL_MEMORY_DIR"], !root.isEmpty { config.memoryRoot = root }
        if environment["VMPOOL_QEMU_SANDBOX"] == "0" { config.sandbox = false }
        if let user = environment["VMPOOL_QEMU_USER"], !user.isEmpty { config.qemuUser = user }
        if environment["VMPOOL_WALLS"] == "0" { config.confine = false }
        if environment["VMPOOL_CGROUPS"] == "0" { config.cgroups = false }
        // Validated by the command line (an invalid value is an error there).
        if let text = environment["VMPOOL_TCG_CACHE_MIB"], let mib = Int(text), (1...2048).contains(mib) {
            config.tcgCacheMiB = mib
        }
        if let text = environment["VMPOOL_BOOT_TIMEOUT"], let timeout = DurationText.parse(text), timeout > .zero {
            config.bootTimeout = timeout
        }
        if environment["VMPOOL_CLOCK_SYNC"] == "0" { config.clockSync = false }
        return config
    }
}

/// Where the qemu driver keeps each VM's and template's files.
struct QemuPaths: Sendable {
    let stateDirectory: String
    let memoryRoot: String

    init(configuration: QemuConfiguration) {
        let absolute = URL(fileURLWithPath: configuration.stateDirectory).standardizedFileURL.path
        stateDirectory = absolute
        memoryRoot = configuration.memoryRoot + "/vmpool-\(getuid())-" + Self.hash(absolute, hexDigits: 12)
    }

    /// Parent of every VM run dir; its path in a QEMU command line marks the process as ours.
    var runRoot: String { stateDirectory + "/run" }
    var templateRoot: String { stateDirectory + "/templates" }

    /// Per-VM dir, named by a hash of the id so socket paths stay under the 107-byte limit.
    func vmDirectory(_ id: String) -> String { runRoot + "/" + Self.hash(id, hexDigits: 12) }
    /// The control monitor (the state dir lock holder's).
    func qmpSocket(_ id: String) -> String { vmDirectory(id) + "/q" }
    /// The observers' monitor (`get`, `plan`, `logs`), shared under `o.lock`.
    func observerSocket(_ id: String) -> String { vmDirectory(id) + "/o" }
    /// The agent's control port.
    func agentSocket(_ id: String) -> String { vmDirectory(id) + "/c" }
    /// The agent's exec ports, one exec or copy each at a time.
    func execSocket(_ id: String, port: Int) -> String { vmDirectory(id) + "/x\(port)" }
    /// The interactive console (hvc0 in the guest).
    func consoleSocket(_ id: String) -> String { vmDirectory(id) + "/h" }
    /// The serial console's output as drained from QEMU's ring, capped (`console.log.1` holds
    /// the previous part).
    func consoleLog(_ id: String) -> String { vmDirectory(id) + "/console.log" }
    func pidFile(_ id: String) -> String { vmDirectory(id) + "/pid" }
    /// Held while a VM's uid is made known and its cgroup made, and while a pass looks for
    /// VMs, writes the walls and sweeps the cgroups: neither sees the other halfway.
    var launchLock: String { stateDirectory + "/launch.lock" }
    /// The uid a VM runs as and its id, written before its process starts.
    func uidFile(_ id: String) -> String { vmDirectory(id) + "/uid" }

    /// The sockets vmpool listens on for the VM's QEMU, which serves them on the descriptors it inherits.
    func sockets(_ id: String) -> [String] {
        [qmpSocket(id), observerSocket(id), agentSocket(id), consoleSocket(id)]
            + (0..<QemuVM.execPorts).map { execSocket(id, port: $0) }
    }

    /// What QEMU writes on stdout and stderr (its start-up errors).
    func qemuLog(_ id: String) -> String { vmDirectory(id) + "/qemu.log" }

    /// A template's RAM, on tmpfs, shared by the template and mapped copy-on-write by clones.
    func memoryFile(template id: String) -> String { memoryRoot + "/" + id + ".mem" }
    /// A template's device state, as migrated out of the saved template VM.
    func stateFile(template id: String) -> String { templateRoot + "/" + id + ".state" }
    /// The output of a template's setup steps, kept as long as the template.
    func setupLog(template id: String) -> String { templateRoot + "/" + id + ".setup.log" }
    /// A template's serial console output up to its save (its clones' boot), kept as long as
    /// the template: its process and run dir go once its memory is saved.
    func bootLog(template id: String) -> String { templateRoot + "/" + id + ".boot.log" }
    /// The output of a cold VM's setup steps, kept as long as the VM.
    func setupLog(_ id: String) -> String { vmDirectory(id) + "/setup.log" }
    /// A template's disk, frozen when its memory was saved; clones' overlays are made over it.
    func templateDisk(template id: String, disk: String) -> String {
        templateRoot + "/" + id + ".disk-" + disk + ".qcow2"
    }
    /// A VM's own overlay of one disk, in its run dir (removed with it).
    func overlay(_ id: String, disk: String) -> String { vmDirectory(id) + "/disk-" + disk + ".qcow2" }

    /// Longest socket path any VM id can produce; must fit `sun_path`.
    var longestSocketPath: Int { (runRoot + "/" + String(repeating: "0", count: 12) + "/q").utf8.count }

    /// FNV-1a 64-bit: stable across runs and platforms, unlike `hashValue`.
    static func fnv(_ text: String) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in text.utf8 { hash = (hash ^ UInt64(byte)) &* 0x0100_0000_01b3 }
        return hash
    }

    /// `fnv` as hex.
    static func hash(_ text: String, hexDigits: Int) -> String {
        let hex = String(fnv(text), radix: 16)
        return String((String(repeating: "0", count: max(0, 16 - hex.count)) + hex).prefix(hexDigits))
    }
}

/// QEMU's option syntax: in `key=value,key=value` lists a literal comma is written twice.
enum QemuOpts {
    static func escape(_ value: String) -> String {
        value.replacingOccurrences(of: ",", with: ",,")
    }

    /// A JSON `-object`/`-device` argument: no comma parsing at all.
    static func json(_ object: [String: Any]) -> String {
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
        return String(decoding: data, as: UTF8.self)
    }
}
