import Foundation
import Hummingbird
import Logging
import Metrics
import VmpoolDriver
import VmpoolReconciler
import VmpoolStore

/// Where the service listens: `host:port` or `unix:PATH`.
public struct ListenAddress: Sendable, CustomStringConvertible {
    enum Kind: Sendable {
        case tcp(host: String, port: Int)
        case unix(String)
    }
    let kind: Kind

    /// Parses `host:port` (`[::1]:8080` for IPv6) or `unix:PATH`.
    public init?(_ text: String) {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty else { return nil }
            kind = .unix(path)
            return
        }
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]),
            (1...65535).contains(port)
        else { return nil }
        var host = String(text[..<colon])
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else { return nil }
        kind = .tcp(host: host, port: port)
    }

    /// Loopback or a Unix socket: reachable from this host only.
    public var isLocal: Bool {
        switch kind {
        case .unix: true
        case .tcp(let host, _): host == "localhost" || host == "::1" || host.hasPrefix("127.")
        }
    }

    var bindAddress: BindAddress {
        switch kind {
        case .unix(let path): .unixDomainSocket(path: path)
        case .tcp(let host, let port): .hostname(host, port: port)
        }
    }

    public var description: String {
        switch kind {
        case .unix(let path): "unix:\(path)"
        case .tcp(let host, let port): host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        }
    }
}

/// Why the service cannot serve.
public struct ServiceError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// A bearer token read from a file only its owner can read.
public enum BearerToken {
    public static func read(_ path: String) throws -> String {
        var info = stat()
        guard stat(path, &info) == 0 else { throw ServiceError("--token-file \(path): no such file") }
        guard info.st_mode & 0o077 == 0 else {
            throw ServiceError(
                "--token-file \(path) is readable by others (mode \(String(info.st_mode & 0o777, radix: 8))); chmod 600 it"
            )
        }
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw ServiceError("--token-file \(path) cannot be read")
        }
        let token = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard token.count >= 16, !token.contains(where: \.isWhitespace) else {
            throw ServiceError("--token-file \(path): the token must be one word of at least 16 characters")
        }
        return token
    }
}

/// The lease API and `/metrics` (see Sources/VmpoolService/openapi.json).
public struct APIServer: Sendable {
    let leases: Leases
    let store: StateStore
    let metrics: ServiceMetrics
    let token: String?
    let logger: Logger
    /// The VMs with what the hypervisor says about them (observers' depth).
    let observe: @Sendable () async throws -> Observation

    public init(
        leases: Leases, store: StateStore, metrics: ServiceMetrics, token: String?, logger: Logger,
        observe: @escaping @Sendable () async throws -> Observation
    ) {
        self.leases = leases
        self.store = store
        self.metrics = metrics
        self.token = token
        self.logger = logger
        self.observe = observe
    }

    /// The Hummingbird application, a `Service` to run in the service group.
    public func application(listening address: ListenAddress) -> some ApplicationProtocol {
        let router = Router()
        router.middlewares.add(BearerMiddleware(token: token))
        router.middlewares.add(MethodNotAllowedMiddleware())
        router.get("/openapi.json") { _, _ in
            Response(
                status: .ok, headers: [.contentType: "application/json"],
                body: .init(byteBuffer: ByteBuffer(bytes: PackageResources.openapi_json)))
        }
        router.get("/metrics") { _, _ in
            Response(
                status: .ok, headers: [.contentType: "text/plain; version=0.0.4"],
                body: .init(byteBuffer: ByteBuffer(string: metrics.exposition())))
        }
        router.get("/v1/vms") { _, _ in
            let rows = VMRow.rows(try await observe())
            return try Self.json(.array(rows.map { .object($0.json) }), status: .ok)
        }
        router.post("/v1/pools/:pool/leases") { request, context in
            try await lease(request, pool: context.parameters.get("pool") ?? "")
        }
        router.delete("/v1/leases/:vm") { _, context in
            try await release(context.parameters.get("vm") ?? "")
        }
        var configuration = ApplicationConfiguration(address: address.bindAddress, serverName: "vmpool")
        configuration.reuseAddress = true
        return Application(router: router, configuration: configuration, logger: logger)
    }

    struct LeaseRequest: Decodable {
        var ttl: String?
        var wait: String?
        var holder: String?

        /// The patterns of `ttl` and `wait` in the published document, so that the server takes
        /// exactly the durations the document describes (above zero and whole milliseconds for
        /// ttl, at most 1h for wait).
        static let patterns: [String: NSRegularExpression] = {
            let document = try? JSONSerialization.jsonObject(with: Data(PackageResources.openapi_json))
            let schemas = ((document as? [String: Any])?["components"] as? [String: Any])?["schemas"] as? [String: Any]
            let fields = (schemas?["LeaseRequest"] as? [String: Any])?["properties"] as? [String: Any] ?? [:]
            var patterns: [String: NSRegularExpression] = [:]
            for name in ["ttl", "wait"] {
                if let pattern = (fields[name] as? [String: Any])?["pattern"] as? String {
                    patterns[name] = try? NSRegularExpression(pattern: pattern)
                }
            }
            return patterns
        }()

        /// Whether `text` is a duration of the document's form for `field`.
        static func documented(_ text: String, _ field: String) -> Bool {
            guard let pattern = patterns[field] else { return false }
            let range = NSRange(text.startIndex..., in: text)
            return pattern.firstMatch(in: text, options: [.anchored], range: range)?.range == range
        }
    }

    func lease(_ request: Request, pool: String) async throws -> Response {
        let body = try await request.body.collect(upTo: 64 << 10)
        var parsed = LeaseRequest()
        if body.readableBytes > 0 {
            do {
                let object = try JSONSerialization.jsonObject(with: Data(buffer: body))
                guard let fields = object as? [String: Any] else {
                    return try Self.error(.badRequest, "expected a JSON object")
                }
                if let unknown = fields.keys.first(where: { !["ttl", "wait", "holder"].contains($0) }) {
                    return try Self.error(.badRequest, "unknown field \"\(unknown)\"; expected ttl, wait, holder")
                }
                if let field = fields.first(where: { !($0.value is String) })?.key {
                    return try Self.error(.badRequest, "\(field): expected a string (leave it out for the default)")
                }
                parsed = try JSONDecoder().decode(LeaseRequest.self, from: Data(buffer: body))
            } catch {
                return try Self.error(
                    .badRequest, "the body is not a lease request: expected {\"ttl\", \"wait\", \"holder\"}")
            }
        }
        var ttl: Duration?
        if let text = parsed.ttl {
            guard LeaseRequest.documented(text, "ttl"), let value = DurationText.parse(text), value > .zero else {
                return try Self.error(
                    .badRequest, "ttl: expected a duration above zero like 30m (at least 1ms), got \"\(text)\"")
            }
            ttl = value
        }
        var wait = Duration.zero
        if let text = parsed.wait {
            guard LeaseRequest.documented(text, "wait"), let value = DurationText.parse(text), value <= .seconds(3600)
            else {
                return try Self.error(.badRequest, "wait: expected a duration up to 1h like 30s, got \"\(text)\"")
            }
            wait = value
        }
        let holder = parsed.holder ?? "http"
        // Counted in Unicode scalars, as JSON Schema's maxLength counts.
        guard !holder.isEmpty, holder.unicodeScalars.count <= 200, !holder.contains(where: \.isNewline) else {
            return try Self.error(.badRequest, "holder: expected 1 to 200 characters on one line")
        }
        let started = ContinuousClock.now
        do {
            let record = try await leases.take(pool: pool, holder: holder, ttl: ttl, wait: wait)
            Timer(label: "vmpool_lease_duration_seconds", dimensions: [("via", "http")])
                .record(duration: ContinuousClock.now - started)
            return try Self.json(.object(Leases.json(record)), status: .created)
        } catch let error as StoreError where error.code == .notFound {
            return try Self.error(.notFound, error.message)
        } catch let error as Leases.Failure {
            return try Self.error(.conflict, error.description)
        }
    }

    func release(_ vm: String) async throws -> Response {
        do {
            try await leases.release(vm)
            return Response(status: .noContent)
        } catch let error as StoreError where error.code == .notFound {
            return try Self.error(.notFound, error.message)
        } catch let error as StoreError where error.code == .conflict {
            return try Self.error(.conflict, error.message)
        }
    }

    static func json(_ value: JSONValue, status: HTTPResponse.Status) throws -> Response {
        Response(
            status: status, headers: [.contentType: "application/json"],
            body: .init(byteBuffer: ByteBuffer(string: try JSONValue.render(value))))
    }

    static func error(_ status: HTTPResponse.Status, _ message: String) throws -> Response {
        try json(.object(["error": .string(message)]), status: status)
    }
}

/// Answers a method a known path does not take with 405 and `Allow`, not 404.
struct MethodNotAllowedMiddleware<Context: RequestContext>: RouterMiddleware {
    /// The method each path of the API takes.
    static func allowed(_ path: String) -> HTTPRequest.Method? {
        let parts = path.split(separator: "/", omittingEmptySubsequences: false)
        switch (parts.count, parts.dropFirst().first, parts.dropFirst(2).first, parts.last) {
        case (2, "openapi.json", _, _), (2, "metrics", _, _), (3, "v1", "vms", _): return .get
        case (5, "v1", "pools", "leases") where !parts[3].isEmpty: return .post
        case (4, "v1", "leases", _) where !parts[3].isEmpty: return .delete
        default: return nil
        }
    }

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws
        -> Response
    {
        do {
            return try await next(request, context)
        } catch let error as HTTPError where error.status == .notFound {
            guard let method = Self.allowed(request.uri.path), method != request.method else { throw error }
            var response = try APIServer.error(
                .methodNotAllowed, "\(request.uri.path) takes \(method.rawValue), not \(request.method.rawValue)")
            response.headers[.allow] = method.rawValue
            return response
        }
    }
}

/// Requires `Authorization: Bearer TOKEN` when a token is configured (compared in constant time).
struct BearerMiddleware<Context: RequestContext>: RouterMiddleware {
    let token: String?

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws
        -> Response
    {
        guard let token else { return try await next(request, context) }
        let given = request.headers[.authorization] ?? ""
        let expected = "Bearer " + token
        guard Self.equal(Array(given.utf8), Array(expected.utf8)) else {
            var response = try APIServer.error(.unauthorized, "a bearer token is required (Authorization: Bearer ...)")
            response.headers[.wwwAuthenticate] = "Bearer"
            return response
        }
        return try await next(request, context)
    }

    static func equal(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        var difference = UInt8(a.count == b.count ? 0 : 1)
        for index in 0..<max(a.count, b.count) {
            difference |= (index < a.count ? a[index] : 0) ^ (index < b.count ? b[index] : 0)
        }
        return difference == 0
    }
}
