import Foundation
import VmpoolDriver
import Logging
import Synchronization
import VmpoolReconciler

/// How logs are written on stderr (`--log-format`, `VMPOOL_LOG_FORMAT`).
enum LogFormat: String, CaseIterable, Sendable {
    /// swift-log's line format, for people.
    case text
    /// One JSON object per line, for log shippers.
    case json
}

/// Writes each log record as one JSON object per line on stderr: `time`, `level`, `message`,
/// `source`, and the metadata keys (`pool`, `vm`, `took_ms`...) as fields. Numbers stay
/// numbers: a numeric metadata value, and a key named for a unit (`took_ms`) whose value is an
/// integer, are written as JSON numbers, so log queries can compare and sum them.
struct JSONLogHandler: LogHandler {
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]
    let label: String

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var fields: [String: JSONValue] = [
            "time": .string(JSONLogHandler.timestamp()), "level": .string(event.level.rawValue),
            "message": .string("\(event.message)"), "source": .string(event.source), "logger": .string(label),
        ]
        for (key, value) in metadata.merging(event.metadata ?? [:], uniquingKeysWith: { $1 }) where fields[key] == nil {
            fields[key] = Self.field(key, value)
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        guard let data = try? encoder.encode(fields) else { return }
        // C1 and bidi controls pass a JSON encoder raw; escaped, a terminal tailing the log is safe.
        FileHandle.standardError.write(
            Data(TerminalText.safe(String(decoding: data, as: UTF8.self)).utf8) + Data([0x0A]))
    }

    /// Suffixes of keys whose values are measured quantities.
    static let unitSuffixes = ["_ms", "_seconds", "_bytes", "_mib", "_count"]

    /// One metadata value as a JSON field: numbers and booleans as themselves, the rest as text.
    static func field(_ key: String, _ value: Logger.Metadata.Value) -> JSONValue {
        switch value {
        case .stringConvertible(let value as Int): return .int(value)
        case .stringConvertible(let value as Int64): return .int(Int(value))
        case .stringConvertible(let value as Double): return value.isFinite ? .double(value) : .string("\(value)")
        case .stringConvertible(let value as Bool): return .bool(value)
        case .string(let text) where unitSuffixes.contains(where: key.hasSuffix):
            return Int(text).map(JSONValue.int) ?? .string(text)
        default: return .string("\(value)")
        }
    }

    private static func timestamp() -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter.string(from: Date())
    }
}

/// One live line on a terminal's stderr while a pass runs: done/total, failed, elapsed.
final class ProgressLine: Sendable {
    private let started = ContinuousClock.now
    private let state = Mutex<(shown: Bool, Void)>((false, ()))
    let verb: String

    init(verb: String) { self.verb = verb }

    /// Whether to show one: stderr is a terminal and nobody asked for log lines instead.
    static func wanted(_ options: GlobalOptions) -> Bool {
        isatty(2) == 1 && options.logLevel == nil && (options.environment["VMPOOL_LOG_LEVEL"] ?? "").isEmpty
    }

    func update(_ progress: PassProgress) {
        let elapsed = (ContinuousClock.now - started).seconds
        var line = "\(verb): \(progress.done)/\(progress.total) done"
        if progress.failed > 0 { line += ", \(progress.failed) failed" }
        line += String(format: ", %.1f s", elapsed)
        state.withLock { state in
            FileHandle.standardError.write(Data(("\r\u{1B}[K" + line).utf8))
            state.shown = true
        }
    }

    /// Ends the line, so what follows starts on its own.
    func finish() {
        state.withLock { state in
            if state.shown { FileHandle.standardError.write(Data("\n".utf8)) }
            state.shown = false
        }
    }
}
