import VmpoolSpec
import CVmpoolSys
import Foundation
import Hummingbird
import Logging
import Metrics
import VmpoolStatus
import NIOCore
import VmpoolDriver
import VmpoolReconciler
import VmpoolStore

/// Where the service listens: `host:port` or `unix:PATH`.
///
/// A host name is resolved once, by `bind()`: whether the address is local is judged from
/// the addresses it resolved to, and those are what is bound, so a name cannot pass for
/// loopback and then resolve elsewhere.
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

    public var description: String {
        switch kind {
        case .unix(let path): "unix:\(path)"
        case .tcp(let host, let port): host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        }
    }

    /// Resolves the host, a name once, here: whether the address is local is judged from the
    /// addresses it resolved to, and the first of them is what the server binds.
    public func resolve() throws(ServiceError) -> BoundAddress {
        switch kind {
        case .unix:
            return BoundAddress(listen: self, resolved: nil, isLocal: true)
        case .tcp(let host, _):
            let addresses = try Self.resolve(host)
            return BoundAddress(listen: self, resolved: addresses[0], isLocal: addresses.allSatisfy(\.isLoopback))
        }
    }

    /// A resolved IP address.
    struct IPAddress: Sendable {
        var family: Int32
        /// The address itself: 4 or 16 bytes.
        var bytes: [UInt8]
        var text: String
        /// The socket address the resolver gave (sockaddr_in or sockaddr_in6), port 0.
        var socketAddress: [UInt8]

        /// 127.0.0.0/8, ::1 and IPv4-mapped 127.0.0.0/8.
        var isLoopback: Bool {
            if family == AF_INET { return bytes[0] == 127 }
            if bytes == [UInt8](repeating: 0, count: 15) + [1] { return true }
            return bytes[0..<10].allSatisfy { $0 == 0 } && bytes[10] == 0xFF && bytes[11] == 0xFF && bytes[12] == 127
        }
    }

    /// Every address `host` stands for: a numeric address as it is, a name through the
    /// system's resolver (/etc/hosts, then DNS), once.
    static func resolve(_ host: String) throws(ServiceError) -> [IPAddress] {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_family = AF_UNSPEC
        var list: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host, nil, &hints, &list)
        guard status == 0, let list else {
            throw ServiceError("--listen: cannot resolve \"\(host)\": \(String(cString: gai_strerror(status)))")
        }
        defer { freeaddrinfo(list) }
        var found: [IPAddress] = []
        var entry: UnsafeMutablePointer<addrinfo>? = list
        while let current = entry {
            if let address = Self.address(current.pointee) { found.append(address) }
            entry = current.pointee.ai_next
        }
        guard !found.isEmpty else { throw ServiceError("--listen: \"\(host)\" resolved to no IP address") }
        return found
    }

    /// An IPv4 or IPv6 entry of the resolver's answer.
    private static func address(_ entry: addrinfo) -> IPAddress? {
        guard let sockaddr = entry.ai_addr, entry.ai_family == AF_INET || entry.ai_family == AF_INET6 else {
            return nil
        }
        let raw = Array(UnsafeRawBufferPointer(start: sockaddr, count: Int(entry.ai_addrlen)))
        // The address sits at offset 4 of a sockaddr_in, 8 of a sockaddr_in6.
        let bytes = entry.ai_family == AF_INET ? Array(raw[4..<8]) : Array(raw[8..<24])
        var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN) + 1)
        inet_ntop(entry.ai_family, bytes, &text, socklen_t(text.count))
        return IPAddress(family: entry.ai_family, bytes: bytes, text: String(cString: text), socketAddress: raw)
    }

    /// Binds and closes a socket on the address: a port in use is reported now, in words, not
    /// after a pass as an errno from deep inside the server.
    static func checkFree(_ address: IPAddress, port: Int, shown: String) throws(ServiceError) {
        let fd = socket(address.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ServiceError("--listen \(shown): cannot make a socket: \(Self.errorText(errno))") }
        defer { close(fd) }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        // The port, big-endian, at offset 2 of either socket address.
        var socketAddress = address.socketAddress
        socketAddress[2] = UInt8(port >> 8)
        socketAddress[3] = UInt8(port & 0xFF)
        let result = socketAddress.withUnsafeBytes { raw in
            Glibc.bind(fd, raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t(raw.count))
        }
        guard result == 0 else {
            let code = errno
            switch code {
            case EADDRINUSE:
                throw ServiceError(
                    "cannot listen on \(shown): the port is already in use (another program listens there)")
            case EADDRNOTAVAIL:
                throw ServiceError("cannot listen on \(shown): \(address.text) is not an address of this host")
            case EACCES:
                throw ServiceError("cannot listen on \(shown): permission denied (ports below 1024 need privileges)")
            default:
                throw ServiceError("cannot listen on \(shown): \(Self.errorText(code))")
            }
        }
    }

    /// Takes `path` for a new server: refused while a live service answers on it or when
    /// something other than a socket is there; a socket nobody answers on is stale and removed.
    static func claimUnixPath(_ path: String) throws(ServiceError) {
        var info = stat()
        guard lstat(path, &info) == 0 else {
            if errno == ENOENT { return }
            throw ServiceError("--listen unix:\(path): \(Self.errorText(errno))")
        }
        guard info.st_mode & S_IFMT == S_IFSOCK else {
            throw ServiceError("--listen unix:\(path): the path exists and is not a socket; choose another path")
        }
        // Non-blocking: a live server whose backlog is full answers EAGAIN, and is live too.
        let fd = vmpool_unix_connect_flags(path, Int32(SOCK_NONBLOCK.rawValue))
        if fd >= 0 || errno == EAGAIN {
            if fd >= 0 { close(fd) }
            throw ServiceError(
                "--listen unix:\(path): another service is serving this socket; stop it first or choose another path")
        }
        guard errno == ECONNREFUSED else {
            throw ServiceError("--listen unix:\(path): cannot check the existing socket: \(Self.errorText(errno))")
        }
        guard unlink(path) == 0 || errno == ENOENT else {
            throw ServiceError("--listen unix:\(path): cannot remove the stale socket: \(Self.errorText(errno))")
        }
    }

    static func errorText(_ code: Int32) -> String { String(cString: strerror(code)) }
}

/// A listen address resolved by `ListenAddress.resolve()`: what is served, and whether only
/// this host can reach it.
public struct BoundAddress: Sendable, CustomStringConvertible {
    public let listen: ListenAddress
    /// The address a TCP server binds (nil: a Unix socket).
    let resolved: ListenAddress.IPAddress?
    /// Loopback (every address the name resolved to) or a Unix socket.
    public let isLocal: Bool

    /// Checks that the address can be served: a TCP port nothing else listens on, a Unix
    /// socket path no live service holds (a stale socket file left by a service that died is
    /// removed). Errors say what is wrong in words, before the service runs its first pass.
    public func claim() throws(ServiceError) {
        switch listen.kind {
        case .unix(let path): try ListenAddress.claimUnixPath(path)
        case .tcp(_, let port): try ListenAddress.checkFree(resolved!, port: port, shown: description)
        }
    }

    var bindAddress: BindAddress {
        switch listen.kind {
        case .unix(let path): .unixDomainSocket(path: path)
        case .tcp(_, let port): .hostname(resolved?.text ?? "127.0.0.1", port: port)
        }
    }

    public var description: String {
        guard let resolved, case .tcp(let host, let port) = listen.kind, resolved.text != host else {
            return listen.description
        }
        return "\(listen) (\(resolved.text.contains(":") ? "[\(resolved.text)]" : resolved.text):\(port))"
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
    /// The status page at `/`, when served.
    let status: StatusService?

    public init(
        leases: Leases, store: StateStore, metrics: ServiceMetrics, token: String?, logger: Logger,
        status: StatusService? = nil, observe: @escaping @Sendable () async throws -> Observation
    ) {
        self.leases = leases
        self.store = store
        self.metrics = metrics
        self.token = token
        self.logger = logger
        self.status = status
        self.observe = observe
    }

    /// The Hummingbird application, a `Service` to run in the service group.
    public func application(listening address: BoundAddress) -> some ApplicationProtocol {
        let router = Router(context: APIRequestContext.self)
        router.middlewares.add(BearerMiddleware(token: token, status: status))
        router.middlewares.add(MethodNotAllowedMiddleware())
        status?.register(on: router, token: token)
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
            try await lease(request, context: context, pool: context.parameters.get("pool") ?? "")
        }
        router.delete("/v1/leases/:vm") { _, context in
            try await release(context.parameters.get("vm") ?? "")
        }
        router.post("/v1/vms/:vm/forks") { request, context in
            try await fork(request, context: context, vm: context.parameters.get("vm") ?? "")
        }
        router.post("/v1/vms/:vm/exec") { request, context in
            try await Self.answering {
                try await exec(request, context: context, vm: context.parameters.get("vm") ?? "")
            }
        }
        router.put("/v1/vms/:vm/files") { request, context in
            try await Self.answering {
                try await putFiles(request, context: context, vm: context.parameters.get("vm") ?? "")
            }
        }
        router.get("/v1/vms/:vm/files") { request, context in
            try await Self.answering {
                try await getFiles(request, context: context, vm: context.parameters.get("vm") ?? "")
            }
        }
        // What a service that crashed mid-copy left.
        Scratch.sweep(leases.stateDirectory)
        var configuration = ApplicationConfiguration(address: address.bindAddress, serverName: "vmpool")
        configuration.reuseAddress = true
        return Application(
            router: router, server: .http1(additionalChannelHandlers: [ClientGoneHandler()]),
            configuration: configuration, logger: logger)
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

    func lease(_ request: Request, context: APIRequestContext, pool: String) async throws -> Response {
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
        if let problem = Leases.holderProblem(holder) { return try Self.error(.badRequest, "holder: \(problem)") }
        let started = ContinuousClock.now
        // A client that closed its connection (gave up waiting, was killed) gets no lease: the
        // wait ends, and a VM leased in the instant before the answer is given up again.
        let channel = context.channel
        do {
            let record = try await leases.take(
                pool: pool, holder: holder, ttl: ttl, wait: wait, abandoned: { !channel.isActive })
            let took = ContinuousClock.now - started
            Timer(label: "vmpool_lease_duration_seconds", dimensions: [("via", "http")]).record(duration: took)
            status?.history?.recordLease(pool: pool, waited: took.seconds)
            return try Self.json(.object(Leases.json(record)), status: .created)
        } catch let error as StoreError where error.code == .notFound {
            return try Self.error(.notFound, error.message)
        } catch let error as Leases.Failure {
            // The CLI's words name its --wait flag; an HTTP client waits with the body's field.
            return try Self.error(
                .conflict,
                error.couldWait
                    ? "no ready VM in pool \(pool); send {\"wait\": \"30s\"} (any duration up to 1h) to wait for one"
                    : error.description)
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

/// Closes a connection whose client closed its side. The server allows half-closed
/// connections, so a client that sent its request and went away (killed, timed out) would
/// otherwise look connected until an answer was written to it; closed, its pending lease
/// request sees `isActive` false and takes no VM.
final class ClientGoneHandler: ChannelInboundHandler, RemovableChannelHandler, Sendable {
    typealias InboundIn = NIOAny

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .some(.inputClosed) = event as? ChannelEvent {
            context.close(promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }
}

/// Hummingbird's basic context plus the request's connection, whose state tells whether the
/// client is still there.
struct APIRequestContext: RequestContext {
    var coreContext: CoreRequestContextStorage
    let channel: any Channel

    init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        channel = source.channel
    }
}

/// Answers a method a known path does not take with 405 and `Allow`, not 404; an unknown
/// path gets 404 with a JSON error body like every other answer.
struct MethodNotAllowedMiddleware<Context: RequestContext>: RouterMiddleware {
    /// The methods each path of the API takes.
    static func allowed(_ path: String) -> [HTTPRequest.Method] {
        let parts = path.split(separator: "/", omittingEmptySubsequences: false)
        switch (parts.count, parts.dropFirst().first, parts.dropFirst(2).first, parts.last) {
        case (2, "openapi.json", _, _), (2, "metrics", _, _), (3, "v1", "vms", _), (2, "", _, _): return [.get]
        case (3, "ui", "live", _), (3, "ui", "status.css", _), (3, "ui", "status.js", _): return [.get]
        case (3, "ui", "login", _): return [.get, .post]
        case (3, "ui", "logout", _): return [.post]
        case (5, "v1", "pools", "leases") where !parts[3].isEmpty: return [.post]
        case (4, "v1", "leases", _) where !parts[3].isEmpty: return [.delete]
        case (5, "v1", "vms", "exec") where !parts[3].isEmpty, (5, "v1", "vms", "forks") where !parts[3].isEmpty:
            return [.post]
        case (5, "v1", "vms", "files") where !parts[3].isEmpty: return [.get, .put]
        default: return []
        }
    }

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws
        -> Response
    {
        do {
            return try await next(request, context)
        } catch let error as HTTPError where error.status == .notFound {
            let methods = Self.allowed(request.uri.path)
            guard !methods.isEmpty, !methods.contains(request.method) else {
                return try APIServer.error(
                    .notFound, "no such path: \(request.uri.path) (the API is described at /openapi.json)")
            }
            let names = methods.map(\.rawValue).joined(separator: ", ")
            let takes = methods.map(\.rawValue).joined(separator: " or ")
            var response = try APIServer.error(
                .methodNotAllowed, "\(request.uri.path) takes \(takes), not \(request.method.rawValue)")
            response.headers[.allow] = names
            return response
        }
    }
}

/// Requires `Authorization: Bearer TOKEN` when a token is configured (compared in constant time).
/// The scheme's name is case-insensitive (RFC 7235 section 2.1), so `bearer TOKEN` is accepted too.
/// With a status page, its sign-in form and assets are open, and its session cookie opens the
/// page (GET) and nothing else.
struct BearerMiddleware<Context: RequestContext>: RouterMiddleware {
    let token: String?
    var status: StatusService?

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws
        -> Response
    {
        guard let token else { return try await next(request, context) }
        if let status, StatusService.openPaths.contains(request.uri.path) || status.admitsBySession(request) {
            return try await next(request, context)
        }
        let given = Self.credentials(request.headers[.authorization] ?? "")
        guard let given, Self.equal(Array(given.utf8), Array(token.utf8)) else {
            if status != nil, let page = StatusService.unauthorized(request) { return page }
            var response = try APIServer.error(.unauthorized, "a bearer token is required (Authorization: Bearer ...)")
            response.headers[.wwwAuthenticate] = "Bearer"
            return response
        }
        return try await next(request, context)
    }

    /// The token of a `Bearer` authorization, the scheme in any case, after one or more spaces;
    /// `nil` for any other scheme.
    static func credentials(_ header: String) -> String? {
        let scheme = header.prefix { $0 != " " }
        guard scheme.lowercased() == "bearer" else { return nil }
        return String(header.dropFirst(scheme.count).drop { $0 == " " })
    }

    static func equal(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        var difference = UInt8(a.count == b.count ? 0 : 1)
        for index in 0..<max(a.count, b.count) {
            difference |= (index < a.count ? a[index] : 0) ^ (index < b.count ? b[index] : 0)
        }
        return difference == 0
    }
}
