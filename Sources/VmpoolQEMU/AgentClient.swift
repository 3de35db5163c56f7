import Foundation
import VmpoolDriver

/// Talks to the vmpool guest agent on the VM's second serial port.
///
/// Requests are `ID COMMAND [ARGS]`, answers `ID ok [DATA]` or `ID error MESSAGE`. Ids let
/// the client ignore late answers to requests it already gave up on (a ping sent while the
/// guest was still booting may be answered later).
final class AgentClient {
    private let socket: LineSocket
    private var nextID = UInt32.random(in: 1...1_000_000)
    let vm: String?

    init(path: String, vm: String?) throws(DriverError) {
        self.vm = vm
        socket = try LineSocket(path: path)
    }

    func close() { socket.close() }

    /// What the guest reports about itself.
    struct Info: Equatable {
        var cpus: Int
        var memoryMiB: Int
        /// The guest's clock, seconds since the epoch, when it answered.
        var time: Double?
    }

    /// Sends one request and waits for its answer.
    func request(_ command: String, timeout: Duration) throws(DriverError) -> String {
        let id = nextID
        nextID &+= 1
        try socket.send("\(id) \(command)\n")
        let deadline = ContinuousClock.now + timeout
        while true {
            let line = try socket.readLine(until: deadline)
            let parts = line.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: true)
            // Anything else is noise: a late answer to an earlier try, or the guest tty echoing
            // a request before the agent has put it in raw mode.
            guard parts.count >= 2, parts[0] == "\(id)", parts[1] == "ok" || parts[1] == "error" else { continue }
            let rest = parts.count > 2 ? String(parts[2]) : ""
            if parts[1] == "ok" { return rest }
            throw DriverError(.protocolError, "guest agent refused \(command.prefix(20)): \(rest)", vm: vm)
        }
    }

    /// Pings until the agent answers or `timeout` passes; each try waits `interval`.
    func waitReady(timeout: Duration, interval: Duration = .milliseconds(100)) throws(DriverError) {
        let deadline = ContinuousClock.now + timeout
        while true {
            do {
                _ = try request("ping", timeout: min(interval, max(deadline - .now, .milliseconds(1))))
                return
            } catch where error.code == .timeout {
                if ContinuousClock.now >= deadline {
                    throw DriverError(.timeout, "the guest agent did not answer within \(timeout)", vm: vm)
                }
            }
        }
    }

    func info(timeout: Duration = .seconds(5)) throws(DriverError) -> Info {
        try Self.parseInfo(try request("info", timeout: timeout), vm: vm)
    }

    /// Brings hotplugged CPUs and memory online; returns what the guest then has.
    func online(timeout: Duration = .seconds(10)) throws(DriverError) -> Info {
        try Self.parseInfo(try request("online", timeout: timeout), vm: vm)
    }

    /// Sets the guest clock and adds host entropy in one round trip, as a clone needs right
    /// after restore: it runs with its template's clock and RNG state.
    /// Retried every `interval` until `timeout`; repeating it is harmless.
    func hello(timeout: Duration, interval: Duration = .milliseconds(250)) throws(DriverError) {
        let deadline = ContinuousClock.now + timeout
        while true {
            let now = Date().timeIntervalSince1970
            do {
                _ = try request(
                    String(format: "hello %.6f %@", now, Self.entropyHex(bytes: 16)),
                    timeout: min(interval, max(deadline - .now, .milliseconds(1))))
                return
            } catch where error.code == .timeout {
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

    /// Steps the guest clock to the host's.
    func syncTime(timeout: Duration = .seconds(5)) throws(DriverError) {
        let now = Date().timeIntervalSince1970
        _ = try request(String(format: "time %.6f", now), timeout: timeout)
    }

    /// Mixes 64 bytes of host entropy into the guest RNG, so clones of one template diverge.
    func reseedRNG(timeout: Duration = .seconds(5)) throws(DriverError) {
        _ = try request("seed " + Self.entropyHex(bytes: 32), timeout: timeout)
    }

    static func parseInfo(_ text: String, vm: String?) throws(DriverError) -> Info {
        var values: [String: Substring] = [:]
        for pair in text.split(separator: " ") {
            let kv = pair.split(separator: "=", maxSplits: 1)
            if kv.count == 2 { values[String(kv[0])] = kv[1] }
        }
        guard let cpus = values["cpus"].flatMap({ Int($0) }), let memory = values["memMiB"].flatMap({ Int($0) }) else {
            throw DriverError(.protocolError, "guest agent info unreadable: \(text)", vm: vm)
        }
        return Info(cpus: cpus, memoryMiB: memory, time: values["time"].flatMap { Double($0) })
    }
}
