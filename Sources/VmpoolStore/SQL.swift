import Foundation

/// One value crossing the store's seam to a database: the four types both SQLite and
/// PostgreSQL keep without loss. Booleans are integers, times are seconds since 1970.
public enum SQLValue: Sendable, Hashable {
    case null
    case integer(Int64)
    case real(Double)
    case text(String)
}

/// A Swift value the store binds as a statement argument.
public protocol SQLBindable: Sendable {
    var sqlValue: SQLValue { get }
}

/// A Swift value the store reads back from a column.
public protocol SQLReadable {
    static func read(_ value: SQLValue) -> Self?
}

extension Int64: SQLBindable, SQLReadable {
    public var sqlValue: SQLValue { .integer(self) }
    public static func read(_ value: SQLValue) -> Int64? {
        switch value {
        case .integer(let v): v
        case .real(let v): Int64(exactly: v)
        default: nil
        }
    }
}

extension Int: SQLBindable, SQLReadable {
    public var sqlValue: SQLValue { .integer(Int64(self)) }
    public static func read(_ value: SQLValue) -> Int? { Int64.read(value).flatMap { Int(exactly: $0) } }
}

extension Int32: SQLBindable, SQLReadable {
    public var sqlValue: SQLValue { .integer(Int64(self)) }
    public static func read(_ value: SQLValue) -> Int32? { Int64.read(value).flatMap { Int32(exactly: $0) } }
}

extension Bool: SQLBindable, SQLReadable {
    public var sqlValue: SQLValue { .integer(self ? 1 : 0) }
    public static func read(_ value: SQLValue) -> Bool? { Int64.read(value).map { $0 != 0 } }
}

extension Double: SQLBindable, SQLReadable {
    public var sqlValue: SQLValue { .real(self) }
    public static func read(_ value: SQLValue) -> Double? {
        switch value {
        case .real(let v): v
        case .integer(let v): Double(v)
        default: nil
        }
    }
}

extension String: SQLBindable, SQLReadable {
    public var sqlValue: SQLValue { .text(self) }
    public static func read(_ value: SQLValue) -> String? {
        if case .text(let v) = value { return v }
        return nil
    }
}

extension Optional: SQLBindable where Wrapped: SQLBindable {
    public var sqlValue: SQLValue { self?.sqlValue ?? .null }
}

extension Optional: SQLReadable where Wrapped: SQLReadable {
    public static func read(_ value: SQLValue) -> Wrapped?? {
        if case .null = value { return .some(nil) }
        return Wrapped.read(value).map { .some($0) }
    }
}

/// One result row. Columns are found by name whatever their case: PostgreSQL folds unquoted
/// names to lower case, SQLite keeps them as written.
public struct SQLRow: Sendable {
    public final class Columns: Sendable {
        let index: [String: Int]
        public init(_ names: [String]) {
            var index: [String: Int] = [:]
            for (i, name) in names.enumerated() { index[name.lowercased()] = i }
            self.index = index
        }
    }

    let columns: Columns
    let values: [SQLValue]

    public init(columns: Columns, values: [SQLValue]) {
        self.columns = columns
        self.values = values
    }

    /// The value of `column`, converted; a column that is absent, or holds a value of another
    /// type (a damaged store), throws.
    public subscript<T: SQLReadable>(_ column: String) -> T {
        get throws {
            guard let i = columns.index[column] ?? columns.index[column.lowercased()] else {
                throw StoreError(.corrupt, "a stored row has no column \(column)")
            }
            guard let value = T.read(values[i]) else {
                throw StoreError(.corrupt, "a stored \(column) holds \(values[i]), not a \(T.self)")
            }
            return value
        }
    }
}

/// The statements of one transaction. SQL is written once, portable to SQLite and PostgreSQL,
/// with `?` placeholders.
public protocol SQLTransaction {
    func execute(_ sql: String, _ arguments: [any SQLBindable]) throws
    func query(_ sql: String, _ arguments: [any SQLBindable]) throws -> [SQLRow]
}

extension SQLTransaction {
    public func execute(_ sql: String) throws { try execute(sql, []) }

    public func query(_ sql: String) throws -> [SQLRow] { try query(sql, []) }

    public func queryOne(_ sql: String, _ arguments: [any SQLBindable] = []) throws -> SQLRow? {
        try query(sql, arguments).first
    }

    public func exists(_ sql: String, _ arguments: [any SQLBindable] = []) throws -> Bool {
        try !query(sql, arguments).isEmpty
    }

    /// Runs an `INSERT ... RETURNING id` and gives the id.
    public func insertReturningID(_ sql: String, _ arguments: [any SQLBindable]) throws -> Int64 {
        guard let row = try queryOne(sql + " RETURNING id", arguments) else {
            throw StoreError(.database, "an insert returned no id")
        }
        return try row["id"]
    }
}

/// Where a store keeps its tables: the seam between the store's logic, written once, and
/// the database engines it runs on (SQLite in the state dir, PostgreSQL for many hosts).
///
/// Each call is one transaction. Writes are serialized store-wide, as SQLite's single writer
/// does, so that a read-then-write (is this id taken? which VM is free?) is never raced.
public protocol StoreBackend: Sendable {
    /// Where the store lives, for messages, with no credentials.
    var location: String { get }
    func read<T>(_ body: (any SQLTransaction) throws -> T) throws -> T
    func write<T>(_ body: (any SQLTransaction) throws -> T) throws -> T
    /// Identifiers of the schema migrations applied.
    func appliedMigrations() throws -> Set<String>
    /// Applies `migrations` not applied yet, in order, each in its own transaction.
    func migrate(_ migrations: [StoreMigration]) throws
    /// Takes (or confirms this process holds) the cluster's placer lock, held until the
    /// process's connection ends; `false` while another process holds it.
    func tryHoldPlacerLock() throws -> Bool
    /// Within a write transaction: tells the other hosts' services, once it commits, that
    /// the cluster's desired state changed (an apply, a placement, a lease), so that they run
    /// a pass now rather than at their next tick.
    func announceChange(_ db: any SQLTransaction) throws
    /// Starts receiving the change notices other processes announce; `nil` for a store no
    /// other host shares (a state dir's own services are woken by `Wake`).
    func watchChanges() -> (any ChangeWatch)?
    /// An SQL expression for the database's clock, in seconds since 1970: heartbeats are
    /// stamped and aged by one clock, whatever the hosts' own clocks say.
    var clockSQL: String { get }
    func close()
}

extension StoreBackend {
    /// A store no other host shares: this process is always its placer.
    public func tryHoldPlacerLock() throws -> Bool { true }
    public func announceChange(_ db: any SQLTransaction) throws {}
    public func watchChanges() -> (any ChangeWatch)? { nil }
    public var clockSQL: String { "((julianday('now') - 2440587.5) * 86400.0)" }
}

/// Change notices from other hosts, as they come.
public protocol ChangeWatch: Sendable {
    /// Consumes the notices received since the last call; `true` when there was one (or
    /// when some may have been missed, the watch having reconnected).
    func drain() -> Bool
}

/// One schema change, with its SQL for each engine.
public struct StoreMigration: Sendable {
    public var identifier: String
    public var sqlite: String
    public var postgres: String

    /// A change whose SQL is the same on both engines but for column types: `DOUBLE` and
    /// `INTEGER` (64-bit in SQLite) become `DOUBLE PRECISION` and `BIGINT`, an autoincrement
    /// key a `BIGSERIAL`.
    public init(_ identifier: String, _ sql: String) {
        self.identifier = identifier
        self.sqlite = sql
        self.postgres = Self.postgresTypes(sql)
    }

    public init(_ identifier: String, sqlite: String, postgres: String) {
        self.identifier = identifier
        self.sqlite = sqlite
        self.postgres = postgres
    }

    static func postgresTypes(_ sql: String) -> String {
        sql.replacingOccurrences(of: "INTEGER PRIMARY KEY AUTOINCREMENT", with: "BIGSERIAL PRIMARY KEY")
            .replacingOccurrences(of: "INTEGER", with: "BIGINT")
            .replacingOccurrences(of: "DOUBLE", with: "DOUBLE PRECISION")
    }
}
