import Foundation
import VmpoolDriver

/// A QMP (QEMU Machine Protocol) session on a Unix socket.
///
/// Connects, reads the greeting, negotiates capabilities, then runs commands, matching each
/// answer by its `id` and decoding its `return` into the caller's `Decodable` type (as Kata's
/// govmm decodes `query-status` into `StatusInfo`). Commands may be pipelined: `send` several,
/// then `receive` each, for one round trip.
final class QMPClient {
    private let channel: Channel
    private var nextID = 1
    let vm: String?

    /// Connects and negotiates; `timeout` bounds the whole handshake.
    init(path: String, name: String = "the VM's QMP monitor", vm: String?, timeout: Duration = .seconds(5))
        throws(DriverError)
    {
        self.vm = vm
        let deadline = ContinuousClock.now + timeout
        channel = try Channel(path: path, name: name, vm: vm, deadline: deadline)
        let greeting = try Self.decode(QMPGreeting.self, try channel.readLine(until: deadline), vm: vm)
        guard greeting.qmp != nil else {
            throw DriverError(.protocolError, "QMP greeting expected on \(name)", vm: vm)
        }
        try execute("qmp_capabilities", timeout: timeout)
    }

    func close() { channel.close() }

    /// Sends a command without waiting; returns the id to `receive` its answer by.
    func send(
        _ command: String, _ arguments: [String: Any]? = nil, attaching fd: Int32? = nil,
        timeout: Duration = .seconds(10)
    ) throws(DriverError) -> String {
        let id = "v\(nextID)"
        nextID += 1
        var message: [String: Any] = ["execute": command, "id": id]
        if let arguments { message["arguments"] = arguments }
        let data: Data
        do {
            data = try JSONSerialization.data(withJSONObject: message)
        } catch {
            throw DriverError(.protocolError, "cannot encode QMP command \(command): \(error)", vm: vm)
        }
        try channel.send(Array(data) + [0x0A], attach: fd, deadline: .now + timeout)
        return id
    }

    /// Waits for the answer to `id` and decodes its `return`; events and late answers are skipped.
    func receive<R: Decodable>(_ id: String, as type: R.Type, command: String, timeout: Duration = .seconds(10))
        throws(DriverError) -> R
    {
        let deadline = ContinuousClock.now + timeout
        while true {
            let line = try channel.readLine(until: deadline)
            let header = try Self.decode(QMPHeader.self, line, vm: vm)
            guard header.event == nil, header.id == id else { continue }
            let reply = try Self.decode(QMPReply<R>.self, line, vm: vm)
            if let error = reply.error {
                throw DriverError(.protocolError, "QMP \(command) failed: \(error.desc)", vm: vm)
            }
            guard let value = reply.return else {
                throw DriverError(.protocolError, "QMP \(command) answered without a return value", vm: vm)
            }
            return value
        }
    }

    /// Runs one command and decodes its `return`.
    @discardableResult
    func execute<R: Decodable>(
        _ command: String, _ arguments: [String: Any]? = nil, attaching fd: Int32? = nil, returning: R.Type,
        timeout: Duration = .seconds(10)
    ) throws(DriverError) -> R {
        let id = try send(command, arguments, attaching: fd, timeout: timeout)
        return try receive(id, as: R.self, command: command, timeout: timeout)
    }

    /// Runs one command whose answer carries nothing the caller needs.
    func execute(
        _ command: String, _ arguments: [String: Any]? = nil, attaching fd: Int32? = nil,
        timeout: Duration = .seconds(10)
    ) throws(DriverError) {
        _ = try execute(command, arguments, attaching: fd, returning: QMPIgnored.self, timeout: timeout)
    }

    private static func decode<T: Decodable>(_ type: T.Type, _ line: String, vm: String?) throws(DriverError) -> T {
        do {
            return try JSONDecoder().decode(T.self, from: Data(line.utf8))
        } catch {
            throw DriverError(.protocolError, "QMP sent something unexpected: \(line.prefix(200))", vm: vm)
        }
    }
}

// MARK: - Replies

private struct QMPGreeting: Decodable {
    struct Info: Decodable {}
    var qmp: Info?

    enum CodingKeys: String, CodingKey { case qmp = "QMP" }
}

private struct QMPHeader: Decodable {
    var id: String?
    var event: String?
}

private struct QMPReply<R: Decodable>: Decodable {
    struct Failure: Decodable {
        var desc: String
    }
    var `return`: R?
    var error: Failure?
}

/// Any `return` value, unread.
struct QMPIgnored: Decodable {
    init(from decoder: Decoder) throws {}
}

/// `query-status`.
struct StatusInfo: Decodable {
    var running: Bool
    var status: String
}

/// One entry of `query-block`: the device and, for a device that stopped the VM, why.
struct BlockInfo: Decodable {
    var qdev: String?
    var ioStatus: String?

    enum CodingKeys: String, CodingKey {
        case qdev
        case ioStatus = "io-status"
    }
}

/// One entry of `query-hotpluggable-cpus`.
struct HotpluggableCPU: Decodable {
    var type: String
    /// `socket-id`, `core-id`, `thread-id` (and `node-id` on NUMA machines).
    var props: [String: Int]
    /// Set when a CPU is plugged into the slot.
    var qomPath: String?

    enum CodingKeys: String, CodingKey {
        case type, props
        case qomPath = "qom-path"
    }

    /// Slots ordered by socket, core, thread.
    var order: [Int] { ["socket-id", "core-id", "thread-id"].map { props[$0] ?? 0 } }

    /// `s1-c0-t0`: unique per slot, so device ids never collide with earlier plugs.
    var slotName: String {
        zip(["s", "c", "t"], order).map { "\($0)\($1)" }.joined(separator: "-")
    }
}

/// `query-memory-size-summary`.
struct MemorySizeSummary: Decodable {
    var baseMemory: Int
    var pluggedMemory: Int?

    enum CodingKeys: String, CodingKey {
        case baseMemory = "base-memory"
        case pluggedMemory = "plugged-memory"
    }

    var totalMiB: Int { (baseMemory + (pluggedMemory ?? 0)) >> 20 }
}

/// `query-migrate`.
struct MigrationInfo: Decodable {
    var status: String?
    var errorDesc: String?
    /// Milliseconds from the start, once completed.
    var totalTime: Int?
    var ram: RAM?

    /// What went of the RAM: pages sent whole (`normal`) and zero pages sent as a mark (`duplicate`).
    struct RAM: Decodable {
        var transferred: Int?
        var normal: Int?
        var duplicate: Int?
    }

    enum CodingKeys: String, CodingKey {
        case status, ram
        case errorDesc = "error-desc"
        case totalTime = "total-time"
    }
}

/// One entry of `query-chardev`.
struct ChardevInfo: Decodable {
    var label: String
    /// `disconnected:unix:...` while no client is connected to a server socket.
    var filename: String

    var hasClient: Bool { !filename.hasPrefix("disconnected:") }
}
