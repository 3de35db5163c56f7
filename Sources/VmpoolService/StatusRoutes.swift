import Foundation
import HTTPTypes
import Hummingbird
import NIOCore
import Synchronization
import VmpoolSpec
import VmpoolStatus

/// The status page at `/`: the HTML, its live part at `/ui/live`, its stylesheet and script,
/// and the sign-in form for a service with a token.
///
/// A visitor proves the token once, in the form (POSTed: the token is never in a URL), and
/// gets a session cookie (`HttpOnly`, `SameSite=Strict`) that opens the page and its live
/// part only: the API still takes the token alone, so a page cannot be made to lease, exec
/// or copy on its visitor's behalf. Snapshots are shared by every open page for two seconds
/// (the live updates' period), so five open pages read the store no more often than one.
public final class StatusService: Sendable {
    let snapshots: SnapshotCache
    let sessions = StatusSessions()
    /// Lease waits through the API go into the page's charts.
    public let history: PoolHistory?

    public init(history: PoolHistory?, read: @escaping @Sendable () async throws -> StatusSnapshot) {
        self.history = history
        snapshots = SnapshotCache(read: read)
    }

    static let cookie = "vmpool_session"
    /// Paths anyone may fetch: the sign-in form and what it is styled with.
    static let openPaths: Set<String> = ["/ui/status.css", "/ui/status.js", "/ui/login", "/ui/logout"]
    /// Paths a session cookie opens (GET only).
    static let pagePaths: Set<String> = ["/", "/ui/live"]

    /// What every HTML answer carries: nothing may load from another origin, no inline
    /// script or style runs (so even a string that escaped escaping could not), the page is
    /// not framed, and no URL leaks in a Referer.
    static let securityHeaders: HTTPFields = [
        .contentSecurityPolicy:
            "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self';"
            + " form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        .xContentTypeOptions: "nosniff", HTTPField.Name("Referrer-Policy")!: "no-referrer", .cacheControl: "no-store",
        HTTPField.Name("X-Frame-Options")!: "DENY",
    ]

    func register(on router: Router<APIRequestContext>, token: String?) {
        router.get("/") { request, _ in
            let signedIn = token != nil && self.sessions.isValid(Self.session(of: request))
            return try await self.timed(request) { StatusPage.render($0, filter: $1, signedIn: signedIn) }
        }
        router.get("/ui/live") { request, _ in
            Self.html(try await self.snapshots.fragment(Self.filter(request)))
        }
        router.get("/ui/status.css") { _, _ in Self.asset(StatusAssets.stylesheet, "text/css; charset=utf-8") }
        router.get("/ui/status.js") { _, _ in
            Self.asset(StatusAssets.script, "text/javascript; charset=utf-8")
        }
        router.get("/ui/login") { _, _ in
            token == nil ? Self.redirect("/") : Self.html(StatusPage.login(failed: false))
        }
        router.post("/ui/login") { request, _ in try await self.signIn(request, token: token) }
        router.post("/ui/logout") { request, _ in
            if let id = Self.session(of: request) { self.sessions.end(id) }
            var response = Self.redirect("/")
            response.headers[.setCookie] = "\(Self.cookie)=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
            return response
        }
    }

    /// The page for `request`'s filter, with how long the snapshot and the HTML took in a
    /// `Server-Timing` header (browsers' developer tools show it).
    func timed(_ request: Request, _ render: (StatusSnapshot, StatusFilter) -> String) async throws -> Response {
        let filter = Self.filter(request)
        let started = ContinuousClock.now
        let snapshot = try await snapshots.snapshot()
        let read = ContinuousClock.now
        let html = render(snapshot, filter)
        var response = Self.html(html)
        let milliseconds = { (duration: Duration) in String(format: "%.2f", duration.seconds * 1000) }
        response.headers[HTTPField.Name("Server-Timing")!] =
            "snapshot;dur=\(milliseconds(read - started)), render;dur=\(milliseconds(ContinuousClock.now - read))"
        return response
    }

    static func filter(_ request: Request) -> StatusFilter {
        let query = request.uri.queryParameters
        return StatusFilter(pool: query["pool"].map(String.init), state: query["state"].map(String.init))
    }

    /// Checks the form's token in constant time; right, a session begins.
    func signIn(_ request: Request, token: String?) async throws -> Response {
        guard let token else { return Self.redirect("/") }
        let body = try await request.body.collect(upTo: 4096)
        let given = Self.formField("token", in: String(buffer: body)) ?? ""
        guard BearerMiddleware<APIRequestContext>.equal(Array(given.utf8), Array(token.utf8)) else {
            return Self.html(StatusPage.login(failed: true), status: .unauthorized)
        }
        var response = Self.redirect("/")
        response.headers[.setCookie] =
            "\(Self.cookie)=\(sessions.begin()); Path=/; Max-Age=\(Int(StatusSessions.lifetime)); HttpOnly; SameSite=Strict"
        return response
    }

    /// Whether `request` may see the page through a session cookie.
    func admitsBySession(_ request: Request) -> Bool {
        request.method == .get && Self.pagePaths.contains(request.uri.path)
            && sessions.isValid(Self.session(of: request))
    }

    /// The answer to a visitor without the token: the sign-in form for the page, a JSON 401
    /// (which the page's script answers by reloading) for its live part.
    static func unauthorized(_ request: Request) -> Response? {
        guard request.method == .get, request.uri.path == "/" else { return nil }
        return html(StatusPage.login(failed: false), status: .unauthorized)
    }

    static func session(of request: Request) -> String? {
        for header in request.headers[values: .cookie] {
            for pair in header.split(separator: ";") {
                let parts = pair.trimmingCharacters(in: .whitespaces).split(separator: "=", maxSplits: 1)
                if parts.count == 2, parts[0] == cookie { return String(parts[1]) }
            }
        }
        return nil
    }

    /// A field of an `application/x-www-form-urlencoded` body.
    static func formField(_ name: String, in body: String) -> String? {
        for pair in body.split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts.count == 2, parts[0] == name else { continue }
            return String(parts[1]).replacingOccurrences(of: "+", with: " ").removingPercentEncoding
        }
        return nil
    }

    static func html(_ text: String, status: HTTPResponse.Status = .ok) -> Response {
        var headers = securityHeaders
        headers[.contentType] = "text/html; charset=utf-8"
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(string: text)))
    }

    static func asset(_ bytes: [UInt8], _ type: String) -> Response {
        var headers = securityHeaders
        headers[.contentType] = type
        headers[.cacheControl] = "max-age=300"
        return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: bytes)))
    }

    static func redirect(_ location: String) -> Response {
        var headers = securityHeaders
        headers[.location] = location
        return Response(status: .seeOther, headers: headers)
    }
}

/// Signed-in visitors of the page: random ids, in memory (a restarted service asks again),
/// each for `lifetime`, at most `limit` at once (the oldest give way).
final class StatusSessions: Sendable {
    static let lifetime: TimeInterval = 12 * 3600
    static let limit = 256
    private let sessions = Mutex<[String: Date]>([:])

    func begin(now: Date = Date()) -> String {
        var generator = SystemRandomNumberGenerator()
        let id = (0..<4).map { _ in String(format: "%016llx", generator.next() as UInt64) }.joined()
        sessions.withLock { sessions in
            sessions = sessions.filter { $0.value > now }
            if sessions.count >= Self.limit, let oldest = sessions.min(by: { $0.value < $1.value }) {
                sessions[oldest.key] = nil
            }
            sessions[id] = now.addingTimeInterval(Self.lifetime)
        }
        return id
    }

    func isValid(_ id: String?, now: Date = Date()) -> Bool {
        guard let id else { return false }
        return sessions.withLock { $0[id].map { $0 > now } ?? false }
    }

    func end(_ id: String) { _ = sessions.withLock { $0.removeValue(forKey: id) } }
}

/// The newest snapshot, shared by every request for `freshness` (the live updates' period, so
/// that any number of open pages cost one read per period); requests that arrive while one
/// is being read wait for that one instead of reading another.
actor SnapshotCache {
    static let freshness: Duration = .seconds(2)
    let read: @Sendable () async throws -> StatusSnapshot
    private var latest: (at: ContinuousClock.Instant, snapshot: StatusSnapshot)?
    private var reading: Task<StatusSnapshot, any Error>?
    /// The live part of the latest snapshot, per filter: open pages with one filter share it.
    private var fragments: [StatusFilter: (at: Date, html: String)] = [:]

    init(read: @escaping @Sendable () async throws -> StatusSnapshot) { self.read = read }

    func snapshot() async throws -> StatusSnapshot {
        if let latest, ContinuousClock.now - latest.at < Self.freshness { return latest.snapshot }
        if let reading { return try await reading.value }
        let task = Task { try await read() }
        reading = task
        defer { reading = nil }
        let snapshot = try await task.value
        latest = (ContinuousClock.now, snapshot)
        return snapshot
    }

    func fragment(_ filter: StatusFilter) async throws -> String {
        let snapshot = try await snapshot()
        if let cached = fragments[filter], cached.at == snapshot.generatedAt { return cached.html }
        let html = StatusPage.fragment(snapshot, filter: filter)
        // Filters are the visitors' choice: keep a few.
        if fragments.count >= 16 { fragments = fragments.filter { $0.value.at == snapshot.generatedAt } }
        if fragments.count < 16 { fragments[filter] = (snapshot.generatedAt, html) }
        return html
    }
}
