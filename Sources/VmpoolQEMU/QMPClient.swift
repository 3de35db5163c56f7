import Foundation
import VmpoolDriver

/// A QMP (QEMU Machine Protocol) session on a Unix socket.
///
/// Connects, reads the greeting, negotiates capabilities, then runs commands one at a time,
/// matching each answer by its `id` and keeping asynchronous events for `waitForEvent`.
final class QMPClient {
    private let socket: LineSocket
    private var nextID = 1
    private(set) var events: [[String: Any]] = []
    let vm: String?

    /// Connects and negotiates; `timeout` bounds the whole handshake.
    init(path: String, vm: String?, timeout: Duration = .seconds(5)) throws(DriverError) {
        self.vm = vm
        socket = try LineSocket(path: path)
        let deadline = ContinuousClock.now + timeout
        let greeting = try Self.parse(try socket.readLine(until: deadline), vm: vm)
        guard greeting["QMP"] != nil else {
            throw DriverError(.protocolError, "QMP greeting expected, got \(greeting)", vm: vm)
        }
        _ = try execute("qmp_capabilities", timeout: timeout)
    }

    func close() { socket.close() }

    /// Runs one command and returns its `return` value; a QMP `error` becomes a DriverError.
    @discardableResult
    func execute(
        _ command: String, _ arguments: [String: Any]? = nil, attaching fd: Int32? = nil,
        timeout: Duration = .seconds(10)
    ) throws(DriverError) -> Any {
        let id = "v\(nextID)"
        nextID += 1
        var message: [String: Any] = ["execute": command, "id": id]
        if let arguments { message["arguments"] = arguments }
        let text: String
        do {
            text = String(decoding: try JSONSerialization.data(withJSONObject: message), as: UTF8.self)
        } catch {
            throw DriverError(.protocolError, "cannot encode QMP command \(command): \(error)", vm: vm)
        }
        try socket.send(text + "\n", attach: fd)
        let deadline = ContinuousClock.now + timeout
        while true {
            let reply = try Self.parse(try socket.readLine(until: deadline), vm: vm)
            if reply["event"] != nil {
                events.append(reply)
                continue
            }
            guard (reply["id"] as? String) == id else { continue }
            if let error = reply["error"] as? [String: Any] {
                let desc = error["desc"] as? String ?? "\(error)"
                throw DriverError(.protocolError, "QMP \(command) failed: \(desc)", vm: vm)
            }
            return reply["return"] ?? [:]
        }
    }

    /// Waits for an event named `name` (already received ones count) that satisfies `match`.
    func waitForEvent(
        _ name: String, timeout: Duration, match: ([String: Any]) -> Bool = { _ in true }
    ) throws(DriverError) -> [String: Any] {
        let deadline = ContinuousClock.now + timeout
        while true {
            if let index = events.firstIndex(where: { ($0["event"] as? String) == name && match($0) }) {
                return events.remove(at: index)
            }
            let message = try Self.parse(try socket.readLine(until: deadline), vm: vm)
            if message["event"] != nil { events.append(message) }
        }
    }

    private static func parse(_ line: String, vm: String?) throws(DriverError) -> [String: Any] {
        guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
            throw DriverError(.protocolError, "QMP sent something that is not a JSON object: \(line.prefix(200))", vm: vm)
        }
        return object
    }
}
