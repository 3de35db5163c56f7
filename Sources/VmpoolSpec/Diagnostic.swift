/// A position in an input file, 1-based, as editors count.
public struct SourceLocation: Sendable, Hashable, Comparable {
    /// The path as the user gave it.
    public var file: String
    public var line: Int
    public var column: Int

    public init(file: String, line: Int, column: Int) {
        self.file = file
        self.line = line
        self.column = column
    }

    public static func < (lhs: SourceLocation, rhs: SourceLocation) -> Bool {
        (lhs.file, lhs.line, lhs.column) < (rhs.file, rhs.line, rhs.column)
    }
}

/// One problem found in an input file: where, which field, what was expected.
public struct Diagnostic: Error, Sendable, Hashable, CustomStringConvertible {
    /// Stable kinds, so tests and scripts need not match message text.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Kind: String, Hashable, Sendable {
            case unreadable, tooLarge, notUTF8, tooDeep, tooManyAliases, syntax
            case unknownField, missingField, wrongType, outOfRange, badFormat, badValue
            case duplicateName, crossField, imageNotFound
        }
        private let kind: Kind
        private init(_ kind: Kind) { self.kind = kind }

        /// The file could not be read.
        public static let unreadable = Code(.unreadable)
        /// The file is larger than the loader accepts.
        public static let tooLarge = Code(.tooLarge)
        /// The bytes are not UTF-8.
        public static let notUTF8 = Code(.notUTF8)
        /// Nesting is deeper than any manifest needs.
        public static let tooDeep = Code(.tooDeep)
        /// More YAML aliases than any manifest needs (alias bombs).
        public static let tooManyAliases = Code(.tooManyAliases)
        /// Not well-formed YAML.
        public static let syntax = Code(.syntax)
        public static let unknownField = Code(.unknownField)
        public static let missingField = Code(.missingField)
        public static let wrongType = Code(.wrongType)
        public static let outOfRange = Code(.outOfRange)
        public static let badFormat = Code(.badFormat)
        public static let badValue = Code(.badValue)
        /// Two documents name the same pool.
        public static let duplicateName = Code(.duplicateName)
        /// Two fields disagree (vcpus above maxVcpus, memory above maxMemory).
        public static let crossField = Code(.crossField)
        /// An image file named by a manifest does not exist or cannot be read.
        public static let imageNotFound = Code(.imageNotFound)

        public var description: String { kind.rawValue }
    }

    public var code: Code
    public var location: SourceLocation
    /// Dotted field path (`spec.vcpus`), or `(document)` / `(file)` when no field applies.
    public var field: String
    public var message: String

    public init(_ code: Code, at location: SourceLocation, field: String, _ message: String) {
        self.code = code
        self.location = location
        self.field = field
        self.message = message
    }

    /// `file:line:col: field: message`, the form editors and CI annotators understand.
    public var description: String {
        "\(location.file):\(location.line):\(location.column): \(field): \(message)"
    }
}

/// Every problem of every input, thrown at once so users fix them in one round.
public struct ManifestError: Error, Sendable, CustomStringConvertible {
    public var diagnostics: [Diagnostic]

    public init(_ diagnostics: [Diagnostic]) {
        self.diagnostics = diagnostics
    }

    public var description: String {
        diagnostics.map(\.description).joined(separator: "\n")
    }
}
