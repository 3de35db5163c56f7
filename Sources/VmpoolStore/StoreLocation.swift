import Foundation

/// Where the state store is, as `--store` / `VMPOOL_STORE` name it: `sqlite:PATH` (the
/// default, a file in the state dir) or `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`
/// (also `postgresql://`; `?host=/run/postgresql` for a Unix socket, `?sslmode=disable|prefer|require`).
public enum StoreLocation: Sendable, Hashable {
    case sqlite(path: String)
    case postgres(PostgresLocation)

    /// A PostgreSQL server and database. The password is kept apart from everything that is
    /// printed: `description` never shows it.
    public struct PostgresLocation: Sendable, Hashable, CustomStringConvertible {
        public enum TLSMode: String, Sendable, Hashable {
            case disable, prefer, require
        }

        public var host: String
        public var port: Int
        /// A Unix socket directory (`?host=/run/postgresql`) instead of TCP.
        public var socketDirectory: String?
        public var user: String
        public var password: String?
        public var database: String
        public var tls: TLSMode

        public var description: String {
            let server = socketDirectory.map { "?host=\($0)" } ?? ""
            let address = socketDirectory == nil ? "\(host):\(port)" : ""
            return "postgres://\(user)@\(address)/\(database)\(server)"
        }
    }

    /// Parses `text`; `stateDirectory` is where a bare `sqlite:` keeps its file. The error names
    /// the part that is wrong, never the password.
    public static func parse(_ text: String, stateDirectory: String, environment: [String: String] = [:])
        throws(StoreError) -> StoreLocation
    {
        if text == "sqlite" || text == "sqlite:" {
            return .sqlite(path: stateDirectory + "/" + StateStore.fileName)
        }
        if text.hasPrefix("sqlite:") {
            let path = String(text.dropFirst("sqlite:".count))
            return .sqlite(path: path.hasPrefix("//") ? String(path.dropFirst(2)) : path)
        }
        guard text.hasPrefix("postgres://") || text.hasPrefix("postgresql://") else {
            throw StoreError(
                .badLocation,
                "store \(Self.redacted(text)) is neither sqlite:PATH nor postgres://USER@HOST[:PORT]/DATABASE")
        }
        guard let components = URLComponents(string: text) else {
            throw StoreError(.badLocation, "store URL \(Self.redacted(text)) does not parse as a URL")
        }
        let query = Dictionary(
            (components.queryItems ?? []).map { ($0.name, $0.value ?? "") }, uniquingKeysWith: { $1 })
        for name in query.keys where !["host", "sslmode", "application_name"].contains(name) {
            throw StoreError(
                .badLocation, "store URL \(Self.redacted(text)): unknown parameter \(name) (known: host, sslmode)")
        }
        let socket = query["host"].flatMap { $0.hasPrefix("/") ? $0 : nil }
        let host = components.host.flatMap { $0.isEmpty ? nil : $0 } ?? (socket == nil ? nil : "localhost")
        guard let host else {
            throw StoreError(
                .badLocation, "store URL \(Self.redacted(text)) names no host (postgres://USER@HOST/DATABASE)")
        }
        let port = components.port ?? 5432
        guard (1...65535).contains(port) else {
            throw StoreError(.badLocation, "store URL \(Self.redacted(text)): port \(port) is not 1-65535")
        }
        let database = String(components.path.drop(while: { $0 == "/" }))
        guard !database.isEmpty, !database.contains("/") else {
            throw StoreError(
                .badLocation, "store URL \(Self.redacted(text)) names no database (postgres://USER@HOST/DATABASE)")
        }
        let user = components.user.flatMap { $0.isEmpty ? nil : $0 } ?? environment["PGUSER"] ?? environment["USER"]
        guard let user else {
            throw StoreError(
                .badLocation, "store URL \(Self.redacted(text)) names no user (postgres://USER@HOST/DATABASE)")
        }
        let mode = query["sslmode"] ?? (socket == nil && !Self.isLoopback(host) ? "prefer" : "disable")
        guard let tls = PostgresLocation.TLSMode(rawValue: mode) else {
            throw StoreError(
                .badLocation, "store URL \(Self.redacted(text)): sslmode \(mode) is not disable, prefer or require")
        }
        return .postgres(
            PostgresLocation(
                host: host, port: port, socketDirectory: socket, user: user,
                password: components.password ?? environment["PGPASSWORD"], database: database, tls: tls))
    }

    /// `text` with any password replaced by `***`, for messages.
    public static func redacted(_ text: String) -> String {
        guard let scheme = text.range(of: "://"), let at = text[scheme.upperBound...].firstIndex(of: "@") else {
            return text
        }
        let credentials = text[scheme.upperBound..<at]
        guard let colon = credentials.firstIndex(of: ":") else { return text }
        return text[..<colon] + ":***" + text[at...]
    }

    static func isLoopback(_ host: String) -> Bool {
        host == "localhost" || host.hasPrefix("127.") || host == "::1"
    }

    public var description: String {
        switch self {
        case .sqlite(let path): "sqlite:\(path)"
        case .postgres(let location): location.description
        }
    }
}
