import Foundation
import VmpoolDriver

/// Frame types of the guest agent protocol (see Sources/VmpoolImage/Guest/agent/agent.h).
enum AgentFrame {
    // Host to guest (and `session` back, as the agent's echo).
    static let session = UInt8(ascii: "H")
    static let presence = UInt8(ascii: "P")
    static let query = UInt8(ascii: "Q")
    static let command = UInt8(ascii: "C")
    static let stdin = UInt8(ascii: "I")
    static let signal = UInt8(ascii: "K")
    static let window = UInt8(ascii: "W")
    // Guest to host.
    static let answer = UInt8(ascii: "A")
    static let started = UInt8(ascii: "S")
    static let stdout = UInt8(ascii: "O")
    static let stderr = UInt8(ascii: "E")
    static let exit = UInt8(ascii: "X")

    /// The largest frame the host accepts from a guest: the agent sends at most 64 KiB, and
    /// nothing a guest sends can make the host buffer more than this per channel.
    static let maxFromGuest = 1 << 20

    static func encode(_ type: UInt8, _ payload: [UInt8]) -> [UInt8] {
        let n = payload.count
        return [type, UInt8(n >> 24 & 0xFF), UInt8(n >> 16 & 0xFF), UInt8(n >> 8 & 0xFF), UInt8(n & 0xFF)] + payload
    }
}

/// Control requests to the vmpool guest agent on the VM's control port (virtio-serial
/// `org.vmpool.ctl`): `Q` frames `ID COMMAND [ARGS]`, answered by `A` frames `ID ok [DATA]`
/// or `ID error MESSAGE`. Ids let the client skip late answers to requests it gave up on
/// (pings sent while the guest was still booting).
final class AgentClient {
    private let channel: Channel
    private let lock: ChannelLock?
    private var nextID = UInt32.random(in: 1...1_000_000)
    let vm: String?

    /// A client on an already connected channel (tests).
    init(channel: Channel, vm: String?) {
        self.channel = channel
        self.lock = nil
        self.vm = vm
    }

    /// Takes the port's host-side lock, then connects; both bounded by `timeout`.
    init(path: String, vm: String?, timeout: Duration = .seconds(5)) throws(DriverError) {
        self.vm = vm
        let deadline = ContinuousClock.now + timeout
        let name = "the guest agent's control port"
        lock = try ChannelLock(path: path + ".lock", name: name, until: deadline, vm: vm)
        channel = try Channel(path: path, name: name, vm: vm, deadline: deadline)
    }

    func close() {
        channel.close()
        lock?.release()
    }

    /// What the guest reports about itself.
    struct Info: Equatable {
        /// CPUs online.
        var cpus: Int
        /// Memory online, MiB.
        var memoryMiB: Int
        /// The guest's clock, seconds since the epoch, when it answered.
        var time: Double?
    }

    /// Sends one request and waits for its answer.
    func request(_ command: String, timeout: Duration) throws(DriverError) -> String {
        let id = nextID
        nextID &+= 1
        let deadline = ContinuousClock.now + timeout
        try channel.send(AgentFrame.encode(AgentFrame.query, Array("\(id) \(command)".utf8)), deadline: deadline)
        while true {
            let (type, payload) = try channel.readFrame(until: deadline, limit: AgentFrame.maxFromGuest)
            guard type == AgentFrame.answer else { continue }
            let line = String(decoding: payload.prefix(4096), as: UTF8.self)
            let parts = line.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: true)
            guard parts.count >= 2, parts[0] == "\(id)", parts[1] == "ok" || parts[1] == "error" else { continue }
            let rest = parts.count > 2 ? String(parts[2]) : ""
            if parts[1] == "ok" { return rest }
            throw DriverError(.protocolError, "guest agent refused \(command.prefix(20)): \(rest)", vm: vm)
        }
    }

    /// Pings until the agent answers or `timeout` passes; each try waits `interval`.
    func waitReady(timeout: Duration, interval: Duration = .milliseconds(250)) throws(DriverError) {
        try retrying("ping", timeout: timeout, interval: interval)
    }

    func info(timeout: Duration = .seconds(5)) throws(DriverError) -> Info {
        try Self.parseInfo(try request("info", timeout: timeout), vm: vm)
    }

    /// Brings hotplugged CPUs and memory online; returns what the guest then has.
    func online(timeout: Duration = .seconds(10)) throws(DriverError) -> Info {
        try Self.parseInfo(try request("online", timeout: timeout), vm: vm)
    }

    /// What a VM must not share with its template, or with any other VM: the clock, the RNG
    /// state, the host name and machine id, and (bridged) its MAC and address. Set in one
    /// round trip, right after restore and after a cold boot alike.
    struct Identity: Sendable {
        var hostname: String
        /// 32 lowercase hex digits, written to /etc/machine-id where the guest has one.
        var machineID: String
        /// `IFACE,MAC,ADDR/PREFIX,GATEWAY` for the agent to configure, when the VM has a NIC.
        var network: String?
    }

    /// Sets the guest clock, adds host entropy and applies `identity`; retried every
    /// `interval` until `timeout` (repeating it is harmless).
    func hello(
        identity: Identity?, setClock: Bool = true, timeout: Duration, interval: Duration = .milliseconds(250)
    ) throws(DriverError) {
        try retrying(timeout: timeout, interval: interval) {
            var command = "hello seed=" + Self.entropyHex(bytes: 32)
            if setClock { command += String(format: " time=%.6f", Date().timeIntervalSince1970) }
            if let identity {
                command += " name=\(identity.hostname) machine=\(identity.machineID)"
                if let network = identity.network { command += " net=\(network)" }
            }
            return command
        }
    }

    /// Steps the guest clock to the host's.
    func syncTime(timeout: Duration = .seconds(5)) throws(DriverError) {
        _ = try request(String(format: "time %.6f", Date().timeIntervalSince1970), timeout: timeout)
    }

    private func retrying(_ command: String, timeout: Duration, interval: Duration) throws(DriverError) {
        try retrying(timeout: timeout, interval: interval) { command }
    }

    private func retrying(timeout: Duration, interval: Duration, _ command: () -> String) throws(DriverError) {
        let deadline = ContinuousClock.now + timeout
        while true {
            do {
                _ = try request(command(), timeout: min(interval, max(deadline - .now, .milliseconds(1))))
                return
            } catch  where error.code == .timeout {
                if ContinuousClock.now >= deadline {
                    throw DriverError(.timeout, "the guest agent did not answer within \(timeout)", vm: vm)
                }
            }
        }
    }

    static func entropyHex(bytes count: Int) -> String {
        var generator = SystemRandomNumberGenerator()
        return (0..<count).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &generator)) }.joined()
    }

    static func parseInfo(_ text: String, vm: String?) throws(DriverError) -> Info {
        var values: [String: Substring] = [:]
        for pair in text.split(separator: " ") {
            let kv = pair.split(separator: "=", maxSplits: 1)
            if kv.count == 2 { values[String(kv[0])] = kv[1] }
        }
        guard let cpus = values["cpus"].flatMap({ Int($0) }), let memory = values["memMiB"].flatMap({ Int($0) }) else {
            throw DriverError(.protocolError, "guest agent info unreadable: \(text.prefix(200))", vm: vm)
        }
        return Info(cpus: cpus, memoryMiB: memory, time: values["time"].flatMap { Double($0) })
    }
}

/// The host-side lock of a channel that serves one client at a time: vmpool processes take it
/// before connecting, so they queue instead of stealing each other's connection. Taken on one
/// thread and released on another, never used from two at once.
final class ChannelLock: @unchecked Sendable {
    private var fd: Int32

    /// `name` says what the lock guards, for messages ("the VM's console").
    init(path: String, name: String, until deadline: ContinuousClock.Instant, vm: String?) throws(DriverError) {
        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else {
            let reason = String(cString: strerror(errno))
            throw DriverError(
                errno == ENOENT ? .notFound : .io, "cannot open the host-side lock of \(name): \(reason)", vm: vm)
        }
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            guard errno == EWOULDBLOCK || errno == EINTR, ContinuousClock.now < deadline else {
                let busy = errno == EWOULDBLOCK
                let reason = String(cString: strerror(errno))
                Glibc.close(fd)
                fd = -1
                throw DriverError(
                    busy ? .busy : .io,
                    busy ? "another vmpool is using \(name)" : "cannot lock \(name): \(reason)", vm: vm)
            }
            try Interrupt.check()
            usleep(2_000)
        }
    }

    /// Takes the lock only if it is free at once; `nil` when another process holds it.
    static func tryTake(path: String, name: String, vm: String?) -> ChannelLock? {
        try? ChannelLock(path: path, name: name, until: .now, vm: vm)
    }

    func release() {
        if fd >= 0 {
            Glibc.close(fd)
            fd = -1
        }
    }

    /// Marks the channel as just used (its lock file's time).
    func touch() {
        if fd >= 0 { futimens(fd, nil) }
    }

    deinit { release() }
}
