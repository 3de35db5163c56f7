import Foundation
import GRDB

/// The embedded store: one SQLite file (GRDB), WAL mode so that `get` and `plan` read while
/// `apply` writes; `synchronous = NORMAL`, so a commit survives a crash of vmpool at any
/// instant (not a power cut of the last moments).
final class SQLiteBackend: StoreBackend {
    let path: String
    private let pool: DatabasePool

    var location: String { path }

    init(path: String) throws {
        self.path = path
        var config = Configuration()
        config.busyMode = .timeout(10)
        config.prepareDatabase { db in
            try db.execute(sql: "PRAGMA synchronous = NORMAL")
        }
        pool = try Self.open(path, config)
        // Private whatever the caller's umask: the database, its WAL and shared memory.
        for suffix in ["", "-wal", "-shm"] { chmod(path + suffix, 0o600) }
    }

    /// Opens the pool. Its switch to WAL mode needs a moment with the file to itself, and the
    /// busy timeout does not cover it: a second process opening a new store meanwhile is told
    /// SQLITE_BUSY, and tries again for up to 10 s.
    private static func open(_ path: String, _ config: Configuration) throws -> DatabasePool {
        let deadline = ContinuousClock.now + .seconds(10)
        while true {
            do {
                return try DatabasePool(path: path, configuration: config)
            } catch let error as DatabaseError where error.resultCode == .SQLITE_BUSY && ContinuousClock.now < deadline
            {
                usleep(UInt32.random(in: 5_000...20_000))
            }
        }
    }

    func read<T>(_ body: (any SQLTransaction) throws -> T) throws -> T {
        try pool.read { db in try body(Transaction(db: db)) }
    }

    /// One IMMEDIATE transaction (GRDB's default for writes): it holds SQLite's write lock
    /// from its first statement, so other processes' writers wait their turn.
    func write<T>(_ body: (any SQLTransaction) throws -> T) throws -> T {
        try pool.write { db in try body(Transaction(db: db)) }
    }

    func appliedMigrations() throws -> Set<String> {
        try pool.read { db in
            guard try db.tableExists("grdb_migrations") else { return [] }
            return Set(try String.fetchAll(db, sql: "SELECT identifier FROM grdb_migrations"))
        }
    }

    /// Reads what is applied and applies the rest in one IMMEDIATE transaction: two processes
    /// opening a new store at once (a cron pass and an apply) never both decide that the same
    /// migration is pending; the second waits for the first and finds nothing left to do.
    /// The bookkeeping table is GRDB's, which state dirs of earlier versions already have.
    func migrate(_ migrations: [StoreMigration]) throws {
        // Nothing pending: no write at all (a store on a full disk still opens for reading).
        let pending = Set(migrations.map(\.identifier)).subtracting(try appliedMigrations())
        guard !pending.isEmpty else { return }
        try pool.writeWithoutTransaction { db in
            try db.inTransaction(.immediate) {
                try db.execute(sql: "CREATE TABLE IF NOT EXISTS grdb_migrations (identifier TEXT NOT NULL PRIMARY KEY)")
                let applied = Set(try String.fetchAll(db, sql: "SELECT identifier FROM grdb_migrations"))
                for migration in migrations where !applied.contains(migration.identifier) {
                    try db.execute(sql: migration.sqlite)
                    try db.execute(
                        sql: "INSERT INTO grdb_migrations (identifier) VALUES (?)", arguments: [migration.identifier])
                }
                return .commit
            }
        }
        for suffix in ["", "-wal", "-shm"] { chmod(path + suffix, 0o600) }
    }

    func close() {
        try? pool.close()
    }

    struct Transaction: SQLTransaction {
        let db: Database

        func execute(_ sql: String, _ arguments: [any SQLBindable]) throws {
            let statement = try db.cachedStatement(sql: sql)
            try statement.execute(arguments: Self.arguments(arguments))
        }

        func query(_ sql: String, _ arguments: [any SQLBindable]) throws -> [SQLRow] {
            let statement = try db.cachedStatement(sql: sql)
            statement.arguments = Self.arguments(arguments)
            let columns = SQLRow.Columns(statement.columnNames)
            let width = statement.columnCount
            var rows: [SQLRow] = []
            let cursor = try Row.fetchCursor(statement)
            while let row = try cursor.next() {
                var values: [SQLValue] = []
                values.reserveCapacity(width)
                for i in 0..<width {
                    let value: DatabaseValue = row[i]
                    switch value.storage {
                    case .null: values.append(.null)
                    case .int64(let v): values.append(.integer(v))
                    case .double(let v): values.append(.real(v))
                    case .string(let v): values.append(.text(v))
                    case .blob(let v): values.append(.text(String(decoding: v, as: UTF8.self)))
                    }
                }
                rows.append(SQLRow(columns: columns, values: values))
            }
            return rows
        }

        static func arguments(_ arguments: [any SQLBindable]) -> StatementArguments {
            StatementArguments(
                arguments.map { argument -> DatabaseValue in
                    switch argument.sqlValue {
                    case .null: .null
                    case .integer(let v): v.databaseValue
                    case .real(let v): v.databaseValue
                    case .text(let v): v.databaseValue
                    }
                })
        }
    }
}

/// Opens SQLite stores at a path of the caller's choosing (`--store sqlite:PATH`).
public enum SQLiteStoreBackend {
    public static func open(path: String) throws -> any StoreBackend {
        try SQLiteBackend(path: path)
    }
}
