import Logging
import VmpoolDriver

/// swift-log's stream handler with the message and metadata made terminal-safe: log lines
/// carry holders, errors and guest output.
struct SafeStreamLogHandler: LogHandler {
    private var inner: StreamLogHandler

    init(label: String) { inner = StreamLogHandler.standardError(label: label) }

    var logLevel: Logger.Level {
        get { inner.logLevel }
        set { inner.logLevel = newValue }
    }

    var metadata: Logger.Metadata {
        get { inner.metadata }
        set { inner.metadata = newValue }
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { inner[metadataKey: key] }
        set { inner[metadataKey: key] = newValue }
    }

    func log(event: LogEvent) {
        var event = event
        event.message = Logger.Message(stringLiteral: TerminalText.safe("\(event.message)"))
        event.metadata = event.metadata?.mapValues { .string(TerminalText.safe("\($0)", singleLine: true)) }
        inner.log(event: event)
    }
}
