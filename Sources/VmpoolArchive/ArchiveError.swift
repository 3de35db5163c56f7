import Glibc

/// Why an archive could not be read, written or extracted: one error for the module, so callers
/// and tests switch on `code` while users read `message`, which names the entry concerned.
public struct ArchiveError: Error, CustomStringConvertible, Sendable {
    /// The kind of failure; a struct over a private enum so that kinds can be added.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Value: String, Sendable {
            case malformed, truncated, limit, unsafeName, outsideRequest, throughLink, conflict, unsupported
            case hostIO, exists, streamClosed, cancelled
        }
        private let value: Value
        private init(_ value: Value) { self.value = value }

        /// A header that is not a valid tar header (checksum, numbers, records).
        public static let malformed = Code(.malformed)
        /// The stream ended inside an entry or before the end-of-archive marker.
        public static let truncated = Code(.truncated)
        /// A bound was passed: entries, bytes, a name's or an extended header's length.
        public static let limit = Code(.limit)
        /// An absolute name, a `..` component or an empty name.
        public static let unsafeName = Code(.unsafeName)
        /// A name that is neither the requested entry nor under it.
        public static let outsideRequest = Code(.outsideRequest)
        /// An entry whose path goes through a symlink (or another non-directory).
        public static let throughLink = Code(.throughLink)
        /// Two entries of one name that cannot both be (a file where a directory is).
        public static let conflict = Code(.conflict)
        /// An entry type that is not copied (sparse, multi-volume, unknown).
        public static let unsupported = Code(.unsupported)
        /// The host's own file system refused (no space, read-only, permission).
        public static let hostIO = Code(.hostIO)
        /// The destination already holds something that would be replaced or merged into.
        public static let exists = Code(.exists)
        /// The other end of the stream went away.
        public static let streamClosed = Code(.streamClosed)
        /// The work was asked to stop.
        public static let cancelled = Code(.cancelled)

        public var description: String { value.rawValue }
    }

    public let code: Code
    /// What went wrong and, where it helps, what to do; names the entry concerned.
    public let message: String
    /// The errno behind a host I/O failure.
    public let errno: Int32?
    public let file: String
    public let line: Int

    public init(_ code: Code, _ message: String, errno: Int32? = nil, file: String = #fileID, line: Int = #line) {
        self.code = code
        self.message = message
        self.errno = errno
        self.file = file
        self.line = line
    }

    public var description: String { message }

    /// A host I/O failure of `action` on `path`, in plain words ("no space left on device").
    static func host(_ action: String, _ path: String, errno number: Int32, file: String = #fileID, line: Int = #line)
        -> ArchiveError
    {
        ArchiveError(
            .hostIO, "cannot \(action) \(path) on the host: \(plainErrno(number))", errno: number, file: file,
            line: line)
    }
}

/// The C library's words for `number`, lower-cased as the start of a clause.
func plainErrno(_ number: Int32) -> String {
    let text = String(cString: strerror(number))
    guard let first = text.first else { return "error \(number)" }
    return first.lowercased() + text.dropFirst()
}

/// A name from an archive as text for messages: invalid UTF-8 replaced, control characters
/// escaped and long names shortened, so that a hostile name cannot garble the terminal.
func printable(_ bytes: some Collection<UInt8>) -> String {
    var text = ""
    for scalar in String(decoding: bytes.prefix(300), as: UTF8.self).unicodeScalars {
        if scalar.value < 0x20 || scalar.value == 0x7f || (0x80..<0xa0).contains(scalar.value) {
            text += "\\x" + String(scalar.value, radix: 16)
        } else {
            text.unicodeScalars.append(scalar)
        }
    }
    return bytes.count > 300 ? text + "..." : text
}
