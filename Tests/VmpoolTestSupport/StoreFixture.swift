import Foundation
import VmpoolStore
import VmpoolStorePostgres

/// The engines the store's contract tests run on: SQLite always; PostgreSQL when a server is
/// given in `VMPOOL_TEST_POSTGRES` (an administrator's URL; `scripts/postgres` starts one,
/// and `scripts/test` always does).
public enum StoreEngine: String, CaseIterable, Sendable, CustomStringConvertible {
    case sqlite
    case postgres

    public var description: String { rawValue }

    public static var available: [StoreEngine] {
        if postgresAdminURL != nil { return [.sqlite, .postgres] }
        reportSkip
        return [.sqlite]
    }

    public static let postgresAdminURL: String? = {
        let url = ProcessInfo.processInfo.environment["VMPOOL_TEST_POSTGRES"]
        return url?.isEmpty == false ? url : nil
    }()

    private static let reportSkip: Void = {
        FileHandle.standardError.write(
            Data(
                ("note: the store's PostgreSQL tests are skipped: VMPOOL_TEST_POSTGRES is not set"
                    + " (scripts/postgres -- swift test starts a server)\n").utf8))
    }()
}

/// A fresh, empty store on one engine: a temp state dir, and on PostgreSQL a database of its
/// own, dropped by `remove()`.
public final class StoreFixture: @unchecked Sendable {
    public let engine: StoreEngine
    public let directory: TemporaryDirectory
    public let location: StoreLocation
    /// The store's URL as a user would pass it to `--store` (PostgreSQL), or nil (SQLite).
    public let url: String?
    private let database: String?

    public init(_ engine: StoreEngine) throws {
        self.engine = engine
        directory = TemporaryDirectory()
        switch engine {
        case .sqlite:
            location = .sqlite(path: directory.path + "/" + StateStore.fileName)
            url = nil
            database = nil
        case .postgres:
            guard let admin = StoreEngine.postgresAdminURL else { throw FixtureError("no PostgreSQL server") }
            let name = "vmpool_test_" + String(UInt64.random(in: 0...UInt64.max), radix: 36)
            try Self.psql(admin, "CREATE DATABASE \(name)")
            database = name
            let url = admin.replacingOccurrences(of: "/postgres", with: "/\(name)")
            self.url = url
            location = try StoreLocation.parse(url, stateDirectory: directory.path)
        }
    }

    /// Opens the store as `host` (empty: a single host).
    public func open(host: String = "") throws -> StateStore {
        try StateStore.open(location, directory: directory.path, host: host, timeout: .seconds(10))
    }

    /// Runs SQL on the store's own database, for tests that damage or inspect it.
    public func sql(_ statement: String) throws {
        switch engine {
        case .sqlite:
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            process.arguments = [
                "python3", "-c",
                "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.executescript(sys.argv[2]); c.commit()",
                directory.path + "/" + StateStore.fileName, statement,
            ]
            try process.run()
            process.waitUntilExit()
            guard process.terminationStatus == 0 else { throw FixtureError("sqlite3 failed: \(statement)") }
        case .postgres:
            try Self.psql(url!, statement)
        }
    }

    public func remove() {
        if let database, let admin = StoreEngine.postgresAdminURL {
            try? Self.psql(admin, "DROP DATABASE IF EXISTS \(database) WITH (FORCE)")
        }
        directory.remove()
    }

    static func psql(_ url: String, _ statement: String) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["psql", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", statement]
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw FixtureError("psql failed: \(statement)") }
    }
}

public struct FixtureError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
