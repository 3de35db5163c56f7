import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import PostgresNIO
import VmpoolStore

/// The store on a PostgreSQL server, shared by every host of a cluster.
///
/// One connection per vmpool process, one transaction at a time on it. Writes take a
/// transaction-scoped advisory lock, so they are serialized cluster-wide the way SQLite
/// serializes a state dir's writers: the store's read-then-write transactions (is this id
/// taken? which VM is free to lease?) need no retry logic. Reads run in REPEATABLE READ
/// snapshots and never wait for writers.
///
/// `synchronous_commit` is off for vmpool's sessions: a commit is durable once PostgreSQL
/// has it, whatever happens to vmpool (the guarantee SQLite's WAL mode with
/// `synchronous = NORMAL` gives the single-host store); a crash of the database server
/// itself may lose its last fraction of a second of commits, never consistency.
///
/// Every round trip has a deadline: a host cut off from the database gets an error within
/// `timeout`, not a hang, and the server ends a session idle inside a transaction, or whose
/// peer stopped answering, within about the same time, releasing its locks.
public final class PostgresBackend: StoreBackend, @unchecked Sendable {
    public let location: String
    private let configuration: PostgresConnection.Configuration
    private let timeout: TimeAmount
    private let logger: Logger
    private let lock = NSLock()
    // Guarded by `lock`.
    private var connection: PostgresConnection?
    private var nextID = 1
    /// Statements with `?` placeholders as PostgreSQL's `$n` ones, by their text; the store
    /// runs a few dozen distinct statements.
    private var numberedSQL: [String: String] = [:]

    /// Advisory lock keys (one namespace, vmpool's).
    public enum LockKey: Int64 {
        case writes = 0x766D_706F_6F6C_0001
        case migrations = 0x766D_706F_6F6C_0002
        case placer = 0x766D_706F_6F6C_0003
    }

    /// Connects to `location` (checking that it answers) within `timeout`.
    public init(_ location: StoreLocation.PostgresLocation, timeout: Duration = .seconds(10), logger: Logger)
        throws(StoreError)
    {
        self.location = location.description
        self.logger = logger
        self.timeout = .nanoseconds(
            timeout.components.seconds * 1_000_000_000 + timeout.components.attoseconds / 1_000_000_000)
        var configuration: PostgresConnection.Configuration
        if let socket = location.socketDirectory {
            configuration = .init(
                unixSocketPath: socket + "/.s.PGSQL.\(location.port)", username: location.user,
                password: location.password, database: location.database)
        } else {
            let tls: PostgresConnection.Configuration.TLS
            do {
                switch location.tls {
                case .disable: tls = .disable
                case .prefer: tls = .prefer(try NIOSSLContext(configuration: .makeClientConfiguration()))
                case .require: tls = .require(try NIOSSLContext(configuration: .makeClientConfiguration()))
                }
            } catch {
                throw StoreError(.badLocation, "cannot set up TLS for \(location): \(error)")
            }
            configuration = .init(
                host: location.host, port: location.port, username: location.user, password: location.password,
                database: location.database, tls: tls)
        }
        configuration.options.connectTimeout = self.timeout
        let seconds = max(2, Int(timeout.components.seconds))
        configuration.options.additionalStartupParameters = [
            ("application_name", "vmpool"),
            ("synchronous_commit", "off"),
            ("idle_in_transaction_session_timeout", "\(seconds * 1000)"),
            ("tcp_keepalives_idle", "\(max(1, seconds / 2))"),
            ("tcp_keepalives_interval", "1"),
            ("tcp_keepalives_count", "\(max(1, seconds / 2))"),
            // Keepalives only probe an idle connection: when the server has sent something
            // the host never acknowledged (a notice, a reply) and the host is cut off, only
            // this ends the session, and frees its locks, in time.
            ("tcp_user_timeout", "\(seconds * 1000)"),
        ]
        self.configuration = configuration
        lock.lock()
        defer { lock.unlock() }
        _ = try connected()
    }

    deinit {
        if let connection { _ = try? wait(connection.close()) }
    }

    public func close() {
        lock.lock()
        defer { lock.unlock() }
        if let connection { _ = try? wait(connection.close()) }
        connection = nil
    }

    // MARK: - Transactions

    public func read<T>(_ body: (any SQLTransaction) throws -> T) throws -> T {
        try transaction(begin: "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY", body)
    }

    public func write<T>(_ body: (any SQLTransaction) throws -> T) throws -> T {
        try transaction(begin: "BEGIN; SELECT pg_advisory_xact_lock(\(LockKey.writes.rawValue))", body)
    }

    /// Statements whose results the transaction does not need (BEGIN, the lock, INSERTs and
    /// UPDATEs) are sent without waiting for them: the connection runs them in order, and
    /// their outcome is checked at the next query that returns rows, and at COMMIT. A round
    /// trip per statement costs a thread hop each way; a launch's two transactions run about
    /// a dozen statements.
    private func transaction<T>(begin: String, _ body: (any SQLTransaction) throws -> T) throws -> T {
        lock.lock()
        defer { lock.unlock() }
        let connection = try connected()
        let transaction = Transaction(backend: self, connection: connection)
        do {
            for statement in Self.statements(begin) { transaction.send(statement, []) }
            let result = try body(transaction)
            try transaction.flush()
            try simple(connection, "COMMIT")
            return result
        } catch {
            try? transaction.flush()
            if self.connection != nil { try? simple(connection, "ROLLBACK") }
            throw error
        }
    }

    public func tryHoldPlacerLock() throws -> Bool {
        try tryHoldSessionLock(.placer)
    }

    /// Holds `key` for this process's session, if no other session holds it: the lock goes
    /// when the session does (vmpool exits, or its host stops answering). `true` when held.
    public func tryHoldSessionLock(_ key: LockKey) throws(StoreError) -> Bool {
        lock.lock()
        defer { lock.unlock() }
        do {
            let connection = try connected()
            // Held already by this session: asking again would stack a second hold.
            let held = try rows(
                connection,
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted"
                    + " AND (classid::bigint << 32 | objid::bigint) = \(key.rawValue)", [])
            if !held.isEmpty { return true }
            let got = try rows(connection, "SELECT pg_try_advisory_lock(\(key.rawValue)) AS got", [])
            return try got.first?["got"] as Bool? ?? false
        } catch let error as StoreError {
            throw error
        } catch {
            throw StoreError(.database, "\(location): \(Self.describe(error))")
        }
    }

    // MARK: - Change notices

    /// The channel hosts announce changes on.
    static let changeChannel = "vmpool_changed"

    public func announceChange(_ db: any SQLTransaction) throws {
        try db.execute("SELECT pg_notify('\(Self.changeChannel)', '')", [])
    }

    public var clockSQL: String { "extract(epoch from clock_timestamp())::double precision" }

    public func watchChanges() -> (any ChangeWatch)? {
        ChangeListener(configuration: configuration, location: location, logger: logger)
    }

    // MARK: - Migrations

    public func appliedMigrations() throws -> Set<String> {
        try read { db in
            guard try db.queryOne("SELECT to_regclass('vmpool_migrations') IS NOT NULL AS present")?["present"] == true
            else { return [] }
            return Set(try db.query("SELECT identifier FROM vmpool_migrations").map { try $0["identifier"] })
        }
    }

    public func migrate(_ migrations: [StoreMigration]) throws {
        lock.lock()
        defer { lock.unlock() }
        let connection = try connected()
        try simple(connection, "BEGIN; SELECT pg_advisory_xact_lock(\(LockKey.migrations.rawValue))")
        do {
            try simple(connection, "CREATE TABLE IF NOT EXISTS vmpool_migrations (identifier TEXT PRIMARY KEY)")
            let applied = Set(
                try rows(connection, "SELECT identifier FROM vmpool_migrations", []).map {
                    try $0["identifier"] as String
                })
            for migration in migrations where !applied.contains(migration.identifier) {
                try simple(connection, migration.postgres)
                try rows(
                    connection, "INSERT INTO vmpool_migrations (identifier) VALUES ($1)", [.text(migration.identifier)])
                logger.debug("store migrated", metadata: ["migration": "\(migration.identifier)"])
            }
            try simple(connection, "COMMIT")
        } catch {
            if self.connection != nil { try? simple(connection, "ROLLBACK") }
            throw error
        }
    }

    // MARK: - The connection

    /// The open connection, or a new one. Caller holds `lock`.
    private func connected() throws(StoreError) -> PostgresConnection {
        if let connection, !connection.isClosed { return connection }
        connection = nil
        let id = nextID
        nextID += 1
        let attempt = PostgresConnection.connect(
            on: MultiThreadedEventLoopGroup.singleton.any(), configuration: configuration, id: id, logger: logger)
        switch Self.outcome(of: attempt, within: timeout) {
        case .success(let opened)?:
            connection = opened
            return opened
        case .failure(let error)?:
            throw StoreError(.unavailable, "cannot reach the store \(location): \(Self.describe(error))")
        case nil:
            throw StoreError(
                .unavailable,
                "cannot reach the store \(location): no answer within \(timeout.nanoseconds / 1_000_000_000)s")
        }
    }

    /// What `future` came to, or `nil` when it did not within `timeout`.
    static func outcome<T: Sendable>(of future: EventLoopFuture<T>, within timeout: TimeAmount) -> Result<T, any Error>?
    {
        let done = DispatchSemaphore(value: 0)
        let box = ResultBox<T>()
        future.whenComplete { result in
            box.result = result
            done.signal()
        }
        guard done.wait(timeout: .now() + .nanoseconds(Int(timeout.nanoseconds))) == .success else { return nil }
        return box.result
    }

    @discardableResult
    fileprivate func rows(_ connection: PostgresConnection, _ sql: String, _ values: [SQLValue]) throws -> [SQLRow] {
        let result = try wait(issue(connection, sql, values), connection: connection)
        return try Self.convert(result.rows)
    }

    /// Sends one statement; its rows come in the future returned.
    fileprivate func issue(_ connection: PostgresConnection, _ sql: String, _ values: [SQLValue])
        -> EventLoopFuture<PostgresQueryResult>
    {
        var bindings = PostgresBindings(capacity: values.count)
        for value in values {
            switch value {
            case .null: bindings.appendNull()
            case .integer(let v): bindings.append(v)
            case .real(let v): bindings.append(v)
            case .text(let v): bindings.append(v)
            }
        }
        return connection.query(PostgresQuery(unsafeSQL: sql, binds: bindings), logger: logger)
    }

    /// `sql` with numbered placeholders. Caller holds `lock`.
    fileprivate func numbered(_ sql: String) -> String {
        if let known = numberedSQL[sql] { return known }
        let result = Transaction.numbered(sql)
        if numberedSQL.count < 1024 { numberedSQL[sql] = result }
        return result
    }

    /// Waits for statements sent earlier; the first failure is thrown.
    fileprivate func settle(_ futures: [EventLoopFuture<PostgresQueryResult>], _ connection: PostgresConnection)
        throws
    {
        var first: (any Error)?
        for future in futures {
            do {
                _ = try wait(future, connection: connection)
            } catch {
                first = first ?? error
            }
        }
        if let first { throw first }
    }

    /// Runs `sql`, one statement after another when it holds several (PostgreSQL's extended
    /// protocol takes one at a time).
    private func simple(_ connection: PostgresConnection, _ sql: String) throws {
        for statement in Self.statements(sql) {
            try rows(connection, statement, [])
        }
    }

    /// `sql` split at semicolons outside quotes.
    static func statements(_ sql: String) -> [String] {
        var result: [String] = []
        var current = ""
        var quoted = false
        for character in sql {
            if character == "'" { quoted.toggle() }
            if character == ";" && !quoted {
                result.append(current)
                current = ""
            } else {
                current.append(character)
            }
        }
        result.append(current)
        return result.map { $0.trimmingCharacters(in: .whitespacesAndNewlines) }.filter { !$0.isEmpty }
    }

    /// Waits for `future` at most `timeout`; past it the connection is closed (failing what
    /// is in flight), and the next call opens a new one.
    fileprivate func wait<T: Sendable>(_ future: EventLoopFuture<T>, connection: PostgresConnection? = nil)
        throws(StoreError)
        -> T
    {
        guard let result = Self.outcome(of: future, within: timeout) else {
            if let connection {
                // The closure keeps the connection alive until its channel has closed.
                connection.close().whenComplete { _ in withExtendedLifetime(connection) {} }
                if self.connection === connection { self.connection = nil }
            }
            throw StoreError(
                .unavailable, "the store \(location) did not answer within \(timeout.nanoseconds / 1_000_000_000)s")
        }
        switch result {
        case .success(let value): return value
        case .failure(let error):
            if let connection, connection.isClosed, self.connection === connection { self.connection = nil }
            if let error = error as? PSQLError, error.code == .server {
                throw StoreError(.database, "\(location): \(Self.describe(error))")
            }
            throw StoreError(.unavailable, "the store \(location) failed: \(Self.describe(error))")
        }
    }

    private final class ResultBox<T>: @unchecked Sendable {
        var result: Result<T, any Error>?
    }

    /// What went wrong, in the server's words where it gave some; never the connection's
    /// configuration (which holds the password).
    static func describe(_ error: any Error) -> String {
        if let error = error as? NIOConnectionError {
            if let failure = error.connectionErrors.first {
                let reason = (failure.error as? IOError).map { String(cString: strerror($0.errnoCode)) }
                return "\(reason ?? "\(failure.error)") (\(error.host):\(error.port))"
            }
            if let dns = error.dnsAError ?? error.dnsAAAAError { return "cannot resolve \(error.host): \(dns)" }
            return "cannot connect to \(error.host):\(error.port)"
        }
        if let error = error as? IOError { return String(cString: strerror(error.errnoCode)) }
        guard let error = error as? PSQLError else { return "\(error)" }
        if let message = error.serverInfo?[.message] {
            let code = error.serverInfo?[.sqlState].map { " (SQLSTATE \($0))" } ?? ""
            return message + code
        }
        if let underlying = error.underlying { return describe(underlying) }
        switch error.code {
        case .serverClosedConnection: return "the connection was closed before the server answered"
        case .sslUnsupported: return "the server does not offer TLS (sslmode=require asks for it)"
        default: return "\(error.code)"
        }
    }

    static func convert(_ rows: [PostgresRow]) throws -> [SQLRow] {
        guard let first = rows.first else { return [] }
        let columns = SQLRow.Columns(first.map(\.columnName))
        return try rows.map { row in
            var values: [SQLValue] = []
            values.reserveCapacity(row.count)
            for cell in row {
                guard cell.bytes != nil else {
                    values.append(.null)
                    continue
                }
                switch cell.dataType {
                case .int8: values.append(.integer(try cell.decode(Int64.self)))
                case .int4: values.append(.integer(Int64(try cell.decode(Int32.self))))
                case .int2: values.append(.integer(Int64(try cell.decode(Int16.self))))
                case .bool: values.append(.integer(try cell.decode(Bool.self) ? 1 : 0))
                case .float8: values.append(.real(try cell.decode(Double.self)))
                case .float4: values.append(.real(Double(try cell.decode(Float.self))))
                default: values.append(.text(try cell.decode(String.self)))
                }
            }
            return SQLRow(columns: columns, values: values)
        }
    }

    /// One transaction's statements on the connection; used under the backend's lock only.
    final class Transaction: SQLTransaction, @unchecked Sendable {
        let backend: PostgresBackend
        let connection: PostgresConnection
        /// Sent, not waited for yet.
        private var pending: [EventLoopFuture<PostgresQueryResult>] = []

        init(backend: PostgresBackend, connection: PostgresConnection) {
            self.backend = backend
            self.connection = connection
        }

        func send(_ sql: String, _ values: [SQLValue]) {
            pending.append(backend.issue(connection, sql, values))
        }

        /// Waits for what was sent; throws the first failure.
        func flush() throws {
            let sent = pending
            pending = []
            try backend.settle(sent, connection)
        }

        func execute(_ sql: String, _ arguments: [any SQLBindable]) throws {
            send(backend.numbered(sql), arguments.map(\.sqlValue))
        }

        func query(_ sql: String, _ arguments: [any SQLBindable]) throws -> [SQLRow] {
            let future = backend.issue(connection, backend.numbered(sql), arguments.map(\.sqlValue))
            try flush()
            return try PostgresBackend.convert(backend.wait(future, connection: connection).rows)
        }

        /// `?` placeholders, outside quotes, as PostgreSQL's `$1`, `$2`, ...
        static func numbered(_ sql: String) -> String {
            var result = ""
            result.reserveCapacity(sql.utf8.count + 16)
            var n = 0
            var quoted = false
            for character in sql {
                if character == "'" { quoted.toggle() }
                if character == "?" && !quoted {
                    n += 1
                    result += "$\(n)"
                } else {
                    result.append(character)
                }
            }
            return result
        }
    }
}

/// A connection of its own that LISTENs for change notices. It never blocks its caller:
/// connecting happens in the background, and a connection lost (a partition) is opened
/// again at most every few seconds; a new connection counts as a notice, since some may have
/// been missed meanwhile.
final class ChangeListener: ChangeWatch, @unchecked Sendable {
    private let configuration: PostgresConnection.Configuration
    private let location: String
    private let logger: Logger
    private let lock = NSLock()
    // Guarded by `lock`.
    private var connection: PostgresConnection?
    private var connecting = false
    private var lastAttempt: ContinuousClock.Instant?
    private var pending = false
    static let retryEvery = Duration.seconds(3)

    init(configuration: PostgresConnection.Configuration, location: String, logger: Logger) {
        self.configuration = configuration
        self.location = location
        self.logger = logger
        lock.withLock { connectIfNeeded() }
    }

    deinit {
        if let connection { connection.close().whenComplete { _ in withExtendedLifetime(connection) {} } }
    }

    func drain() -> Bool {
        lock.withLock {
            connectIfNeeded()
            defer { pending = false }
            return pending
        }
    }

    /// Caller holds `lock`.
    private func connectIfNeeded() {
        if let connection, !connection.isClosed { return }
        connection = nil
        if connecting { return }
        if let lastAttempt, ContinuousClock.now - lastAttempt < Self.retryEvery { return }
        connecting = true
        lastAttempt = .now
        PostgresConnection.connect(
            on: MultiThreadedEventLoopGroup.singleton.any(), configuration: configuration, id: 0, logger: logger
        ).whenComplete { result in
            self.lock.withLock {
                self.connecting = false
                switch result {
                case .success(let connection):
                    connection.addListener(channel: PostgresBackend.changeChannel) { _, _ in
                        self.lock.withLock { self.pending = true }
                    }
                    self.connection = connection
                    self.pending = true
                case .failure(let error):
                    self.logger.debug(
                        "cannot listen for changes on \(self.location): \(PostgresBackend.describe(error))")
                }
            }
        }
    }
}
