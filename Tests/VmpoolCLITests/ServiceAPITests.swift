import Foundation
import Testing
import VmpoolTestSupport

/// `vmpool reconcile --every ... --listen ADDR` over HTTP, as a CI system or a scheduler talks
/// to it: the lease API, `/v1/vms`, `/metrics`, bearer tokens, Unix sockets, and how long a
/// lease takes on a kept-alive connection.
@Suite("The service's HTTP API on the sim driver", .serialized)
struct ServiceAPITests {
    @Test func leasesAreTakenAndEndedOverHTTP() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let file = box.dir.write("pools.yaml", manifest(pool(size: 2)) + "---\n" + manifest(pool("empty", size: 0)))
        #expect(try box.run("apply", "-f", file).status == 0)
        let service = try APIService(box)
        defer { service.stop() }
        let http = try service.connect()

        let asked = try http.request("POST", "/v1/pools/web/leases", body: #"{"ttl":"1h","holder":"job"}"#)
        #expect(asked.status == 201, "\(asked.text)")
        #expect(asked.headers["content-type"]?.hasPrefix("application/json") == true)
        let lease = try #require(asked.object)
        #expect(Set(lease.keys) == ["id", "pool", "address", "ports", "holder", "expiresAt"])
        #expect(lease["pool"] as? String == "web" && lease["holder"] as? String == "job")
        #expect(lease["expiresAt"] as? String != nil)
        let first = try #require(lease["id"] as? String)

        let bare = try http.request("POST", "/v1/pools/web/leases")
        #expect(bare.status == 201, "no body: \(bare.text)")
        let second = try #require(bare.object?["id"] as? String)
        #expect(second != first)
        #expect(bare.object?["expiresAt"] is NSNull)

        let leased = try box.vms()
        #expect((leased[first]?["lease"] as? [String: Any])?["holder"] as? String == "job")
        #expect(leased[second]?["lease"] as? [String: Any] != nil)

        let refused: [(body: String?, pool: String, status: Int)] = [
            ("{bad", "web", 400),
            (#"{"ttl": 5}"#, "web", 400),
            (#"{"ttl": "0"}"#, "web", 400),
            (#"{"ttl": "1h", "color": "red"}"#, "web", 400),
            (#"[1, 2]"#, "web", 400),
            (#"{"holder": ""}"#, "web", 400),
            (#"{"holder": null}"#, "web", 400),
            (#"{"holder": "evil\u001b[31mRED\u001b[0m \u0007bell"}"#, "web", 400),
            (#"{"holder": "tab\there"}"#, "web", 400),
            (#"{"holder": "csi\u009b2J"}"#, "web", 400),
            (#"{"holder": "bidi\u202egnp.exe"}"#, "web", 400),
            (#"{"wait": "61m"}"#, "web", 400),
            (#"{"ttl": "0.0004ms"}"#, "web", 400),
            (nil, "nope", 404),
            (nil, "empty", 409),
        ]
        for (body, pool, status) in refused {
            let response = try http.request("POST", "/v1/pools/\(pool)/leases", body: body)
            #expect(response.status == status, "\(body ?? "no body") to \(pool): \(response.status) \(response.text)")
            #expect(response.object?["error"] is String, "an error says why: \(response.text)")
            if status == 409 {
                // Said for an HTTP client: the body's wait field, not the command line's flag.
                let error = response.object?["error"] as? String ?? ""
                #expect(error.contains(#""wait""#) && !error.contains("--wait"), "\(error)")
            }
        }

        #expect(try http.request("DELETE", "/v1/leases/\(first)").status == 204)
        let again = try http.request("DELETE", "/v1/leases/\(first)")
        #expect(again.status == 404, "a released VM is gone: \(again.text)")
        #expect(try box.vms()[first] == nil)
        // The service refills the pool; an unleased VM cannot be released.
        #expect(eventuallyIgnoringErrors(timeout: .seconds(10)) { LeaseTests.unleasedRunning(try box.vms()) == 2 })
        let free = try #require(try box.vms().first { $0.value["lease"] is NSNull }?.key)
        let unleased = try http.request("DELETE", "/v1/leases/\(free)")
        #expect(unleased.status == 409, "\(unleased.text)")
        #expect(try http.request("DELETE", "/v1/leases/web-000000").status == 404)

        let vms = try http.request("GET", "/v1/vms")
        #expect(vms.status == 200)
        let rows = try #require(try JSONSerialization.jsonObject(with: vms.body) as? [[String: Any]])
        #expect(Set(rows.compactMap { $0["id"] as? String }) == Set(try box.vms().keys))
        #expect(rows.contains { ($0["lease"] as? [String: Any])?["holder"] as? String == "http" })

        let names = [
            "vmpool_pool_size", "vmpool_pool_ready", "vmpool_pool_leased", "vmpool_actions_total",
            "vmpool_action_duration_seconds", "vmpool_pass_duration_seconds", "vmpool_lease_duration_seconds",
        ]
        var metrics = ""
        let complete = eventuallyIgnoringErrors(timeout: .seconds(10)) {
            let response = try http.request("GET", "/metrics")
            metrics = response.text
            return response.status == 200 && names.allSatisfy { metrics.contains($0) }
        }
        #expect(complete, "missing: \(names.filter { !metrics.contains($0) }); got \(metrics)")
        #expect(metrics.contains(#"vmpool_pool_leased{pool="web"} 1"#), "\(metrics)")
        let nothing = try http.request("GET", "/v1/nothing")
        #expect(nothing.status == 404)
        #expect(
            nothing.headers["content-type"]?.hasPrefix("application/json") == true
                && (nothing.object?["error"] as? String)?.contains("/v1/nothing") == true,
            "an unknown path says so in JSON, like every other error: \(nothing.text)")
        // A known path answers a method it does not take with 405 and what it takes.
        for (method, path, allowed) in [
            ("TRACE", "/metrics", "GET"), ("PUT", "/v1/pools/web/leases", "POST"),
            ("GET", "/v1/leases/\(second)", "DELETE"),
        ] {
            let response = try http.request(method, path)
            #expect(
                response.status == 405 && response.headers["allow"] == allowed, "\(method) \(path): \(response.status)")
        }
    }

    /// `POST /v1/vms/{vm}/forks` on the sim driver: forks of a leased VM come back shaped like
    /// leases; a wrong body, VM or holder is refused and changes nothing.
    @Test func forksAreMadeOverHTTP() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 2))).status == 0)
        let service = try APIService(box)
        defer { service.stop() }
        let http = try service.connect()
        let source = try #require(
            try http.request("POST", "/v1/pools/web/leases", body: #"{"holder":"job"}"#).object?["id"] as? String)
        let unleased = try #require(try box.vms().first { $0.value["lease"] is NSNull }?.key)

        let forked = try http.request("POST", "/v1/vms/\(source)/forks", body: #"{"count": 2, "ttl": "10m"}"#)
        #expect(forked.status == 201, "\(forked.text)")
        let list = try #require(try JSONSerialization.jsonObject(with: forked.body) as? [[String: Any]])
        #expect(list.count == 2)
        #expect(list.allSatisfy { Set($0.keys) == ["id", "pool", "address", "ports", "holder", "expiresAt"] })
        #expect(list.allSatisfy { $0["holder"] as? String == "job" && $0["expiresAt"] is String }, "\(list)")
        let forks = Set(list.compactMap { $0["id"] as? String })
        let rows = try box.vms()
        #expect(forks.allSatisfy { (rows[$0]?["lease"] as? [String: Any])?["holder"] as? String == "job" })

        let before = try box.vms().count
        let refused: [(vm: String, body: String?, status: Int)] = [
            (source, #"{"count": 0}"#, 400),
            (source, #"{"count": 65}"#, 400),
            (source, #"{"count": 2.5}"#, 400),
            (source, #"{"count": true}"#, 400),
            (source, #"{"count": "2"}"#, 400),
            (source, #"{"ttl": "0"}"#, 400),
            (source, #"{"holder": "a\u001b[2Jb"}"#, 400),
            (source, #"{"color": "red"}"#, 400),
            (source, "[1]", 400),
            ("web-000000", nil, 404),
            (unleased, nil, 409),
            (source, #"{"holder": "someone-else"}"#, 409),
        ]
        for (vm, body, status) in refused {
            let response = try http.request("POST", "/v1/vms/\(vm)/forks", body: body)
            #expect(response.status == status, "\(body ?? "no body") for \(vm): \(response.status) \(response.text)")
            #expect(response.object?["error"] is String, "an error says why: \(response.text)")
        }
        #expect(try box.vms().count == before, "a refused fork made nothing")
        for fork in forks { #expect(try http.request("DELETE", "/v1/leases/\(fork)").status == 204) }
    }

    @Test func aTokenFileGuardsEveryRequest() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 1))).status == 0)
        let token = "s3cret-" + UUID().uuidString
        let service = try APIService(box, token: token)
        defer { service.stop() }
        let http = try service.connect()

        for authorization in [nil, "Bearer wrong-token-of-some-length", "Bearer \(token)x", "Basic \(token)", token] {
            let headers = authorization.map { ["Authorization": $0] } ?? [:]
            let lease = try http.request("POST", "/v1/pools/web/leases", headers: headers)
            #expect(lease.status == 401, "\(authorization ?? "no token"): \(lease.status)")
            #expect(lease.headers["www-authenticate"]?.hasPrefix("Bearer") == true)
            #expect(try http.request("GET", "/v1/vms", headers: headers).status == 401)
            #expect(try http.request("GET", "/metrics", headers: headers).status == 401)
            #expect(try http.request("DELETE", "/v1/leases/web-000000", headers: headers).status == 401)
        }
        #expect(try box.vms().values.allSatisfy { $0["lease"] is NSNull }, "no lease was made without the token")

        let right = ["Authorization": "Bearer \(token)"]
        let lease = try http.request("POST", "/v1/pools/web/leases", headers: right)
        #expect(lease.status == 201, "\(lease.text)")
        // The scheme's name is case-insensitive (RFC 7235).
        for scheme in ["bearer", "BEARER"] {
            let response = try http.request("GET", "/v1/vms", headers: ["Authorization": "\(scheme) \(token)"])
            #expect(response.status == 200, "\(scheme): \(response.status)")
        }
        #expect(try http.request("GET", "/v1/vms", headers: right).status == 200)
        #expect(try http.request("GET", "/metrics", headers: right).status == 200)

        // A token others can read is refused, and so is a public address without a token (on a
        // state dir of their own: one service per state dir).
        let other = Sandbox()
        defer { other.dir.remove() }
        #expect(try other.run("apply", "-f", other.write(pool(size: 1))).status == 0)
        let open = other.dir.write("open-token", token + "\n")
        chmod(open, 0o644)
        let refused = try other.binary.start(
            [
                "reconcile", "--every", "1s", "--listen", "127.0.0.1:\(APIService.freePort())", "--token-file", open,
                "--state-dir", other.state,
            ])
        let exited = refused.exited(within: 10)
        if !exited { refused.kill(SIGKILL) }
        let result = refused.wait()
        #expect(exited && result.status == 1, "a 0644 token file: exit \(result.status)")
        #expect(result.stderr.contains(open), "the message names the file: \(result.stderr)")

        let exposed = try other.binary.start(
            ["reconcile", "--every", "1s", "--listen", "0.0.0.0:\(APIService.freePort())", "--state-dir", other.state])
        let stopped = exposed.exited(within: 10)
        if !stopped { exposed.kill(SIGKILL) }
        let publicResult = exposed.wait()
        #expect(stopped && publicResult.status == 1, "0.0.0.0 without a token: exit \(publicResult.status)")
        #expect(publicResult.stderr.contains("--token-file"), "\(publicResult.stderr)")
    }

    @Test func theAPIListensOnAUnixSocket() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 1))).status == 0)
        let socket = box.dir.path + "/api.sock"
        let service = try APIService(box, listen: "unix:\(socket)")
        defer { service.stop() }
        var info = stat()
        #expect(stat(socket, &info) == 0 && (info.st_mode & S_IFMT) == S_IFSOCK, "the socket file exists")
        let http = try service.connect()
        #expect(try http.request("GET", "/v1/vms").status == 200)
        let lease = try http.request("POST", "/v1/pools/web/leases", body: #"{"holder":"over-unix"}"#)
        #expect(lease.status == 201, "\(lease.text)")
        #expect(try http.request("GET", "/metrics").status == 200)
    }

    /// A client that asked for a lease with a wait and went away before the answer (killed,
    /// timed out) is given no VM: the wait ends with it, and when the pool grows the new VM
    /// stays ready for the next caller instead of being leased to nobody.
    @Test func aLeaseWhoseClientWentAwayIsNotGranted() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 0))).status == 0)
        let service = try APIService(box)
        defer { service.stop() }
        let http = try service.connect()
        try http.sendOnly("POST", "/v1/pools/web/leases", body: #"{"wait":"30s","holder":"gone-client"}"#)
        let waiting = eventuallyIgnoringErrors(timeout: .seconds(20)) {
            let result = try box.run("describe", "pool", "web", "-o", "json")
            let object = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any]
            return ((object?["status"] as? [String: Any])?["leaseWaiters"] as? Int) == 1
        }
        #expect(waiting, "the lease request waits in line")
        http.hangUp()
        let gaveUp = eventuallyIgnoringErrors(timeout: .seconds(20)) {
            let result = try box.run("describe", "pool", "web", "-o", "json")
            let object = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any]
            return ((object?["status"] as? [String: Any])?["leaseWaiters"] as? Int) == 0
        }
        #expect(gaveUp, "the wait ended with its client")
        #expect(try box.run("apply", "-f", box.write(pool(size: 1))).status == 0)
        let ready = eventuallyIgnoringErrors(timeout: .seconds(20)) {
            try box.vms().values.contains { ($0["state"] as? String) == "running" }
        }
        #expect(ready, "the pool grew")
        let leased = try box.vms().values.filter { $0["lease"] as? [String: Any] != nil }
        #expect(leased.isEmpty, "a VM was leased to a client that went away: \(leased)")
        // The next caller gets it.
        let next = try service.connect().request("POST", "/v1/pools/web/leases", body: #"{"holder":"next"}"#)
        #expect(next.status == 201, "\(next.text)")
    }

    @Test func leaseLatencyOnAKeptAliveConnection() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 16))).status == 0)
        let service = try APIService(box)
        defer { service.stop() }
        let http = try service.connect()
        let rounds = 200
        var leases: [Double] = []
        var releases: [Double] = []
        for round in 0..<rounds {
            var started = ContinuousClock.now
            let lease = try http.request("POST", "/v1/pools/web/leases", body: #"{"wait":"10s","holder":"bench"}"#)
            leases.append(Self.milliseconds(ContinuousClock.now - started))
            guard lease.status == 201, let id = lease.object?["id"] as? String else {
                Issue.record("round \(round): \(lease.status) \(lease.text)")
                return
            }
            started = ContinuousClock.now
            let release = try http.request("DELETE", "/v1/leases/\(id)")
            releases.append(Self.milliseconds(ContinuousClock.now - started))
            #expect(release.status == 204, "round \(round): \(release.text)")
        }
        #expect(http.connections == 1, "every round trip used the one connection")
        let lease = Self.percentiles(leases)
        let release = Self.percentiles(releases)
        print(
            "lease over HTTP (sim, keep-alive, \(rounds) rounds): POST p50 \(Self.format(lease.p50)) ms,"
                + " p99 \(Self.format(lease.p99)) ms (target p50 <= 5, p99 <= 20); DELETE p50"
                + " \(Self.format(release.p50)) ms, p99 \(Self.format(release.p99)) ms")
        #expect(lease.p50 < 200 && lease.p99 < 2000, "lease latency p50 \(lease.p50) ms, p99 \(lease.p99) ms")
    }

    static func milliseconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) * 1000 + Double(duration.components.attoseconds) / 1e15
    }

    static func percentiles(_ samples: [Double]) -> (p50: Double, p99: Double) {
        let sorted = samples.sorted()
        func at(_ q: Double) -> Double {
            sorted[min(sorted.count - 1, Int((Double(sorted.count) * q).rounded(.up)) - 1)]
        }
        return (at(0.5), at(0.99))
    }

    static func format(_ value: Double) -> String { String(format: "%.1f", value) }
}

/// `vmpool reconcile --every 300ms --listen ADDR` on a sandbox, stopped with SIGTERM.
final class APIService {
    let command: RunningCommand
    let address: Address

    enum Address {
        case tcp(Int)
        case unix(String)
    }

    init(_ box: Sandbox, listen: String? = nil, extra: [String] = []) throws {
        let listen = listen ?? "127.0.0.1:\(Self.freePort())"
        address =
            listen.hasPrefix("unix:")
            ? .unix(String(listen.dropFirst(5))) : .tcp(Int(listen.split(separator: ":").last!)!)
        command = try box.binary.start(
            ["reconcile", "--every", "300ms", "--listen", listen, "--state-dir", box.state] + extra)
        // Up when it answers.
        let ready = eventuallyIgnoringErrors(timeout: .seconds(20)) {
            let connection = try self.connect()
            return try connection.request("GET", "/openapi.json", headers: ["Authorization": "Bearer -"]).status > 0
        }
        if !ready {
            command.kill(SIGKILL)
            let result = command.wait()
            throw HTTPError("the service did not answer on \(listen): exit \(result.status), \(result.stderr)")
        }
    }

    /// The service requiring `token`, given in a file of mode 0600.
    convenience init(_ box: Sandbox, token: String) throws {
        let file = box.dir.write("token", token + "\n")
        chmod(file, 0o600)
        try self.init(box, extra: ["--token-file", file])
    }

    func connect() throws -> HTTPConnection {
        switch address {
        case .tcp(let port): try HTTPConnection(port: port)
        case .unix(let path): try HTTPConnection(unixPath: path)
        }
    }

    private var stopped = false

    /// SIGTERM, then SIGKILL after 10 s; once.
    func stop() {
        guard !stopped else { return }
        stopped = true
        command.kill(SIGTERM)
        if !command.exited(within: 10) { command.kill(SIGKILL) }
        _ = command.wait()
    }

    /// A port nothing listens on right now.
    static func freePort() -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
                bind(fd, pointer, length) == 0 ? getsockname(fd, pointer, &length) : -1
            }
        }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}

struct HTTPError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// An HTTP/1.1 response.
struct HTTPResponse {
    var status: Int
    /// Lowercased names.
    var headers: [String: String]
    var body: Data

    var text: String { String(decoding: body, as: UTF8.self) }
    var object: [String: Any]? { try? JSONSerialization.jsonObject(with: body) as? [String: Any] }
}

/// A kept-alive HTTP/1.1 client connection over TCP (127.0.0.1) or a Unix socket, just enough
/// for the service's API: requests with a body and Content-Length, responses with
/// Content-Length or chunked bodies.
final class HTTPConnection {
    private var fd: Int32 = -1
    private var buffer = Data()
    private let open: () throws -> Int32
    /// Sockets opened so far (1 while the server keeps the connection alive).
    private(set) var connections = 0

    convenience init(port: Int) throws {
        try self.init {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            address.sin_port = in_port_t(UInt16(port).bigEndian)
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            var one: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            return try Self.connected(fd, connected, "127.0.0.1:\(port)")
        }
    }

    convenience init(unixPath path: String) throws {
        try self.init {
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(path.utf8)
            guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
                close(fd)
                throw HTTPError("socket path too long: \(path)")
            }
            withUnsafeMutableBytes(of: &address.sun_path) { raw in
                raw.copyBytes(from: bytes)
                raw[bytes.count] = 0
            }
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                }
            }
            return try Self.connected(fd, connected, "unix:\(path)")
        }
    }

    private init(open: @escaping () throws -> Int32) throws {
        self.open = open
        try reopen()
    }

    deinit { if fd >= 0 { close(fd) } }

    private static func connected(_ fd: Int32, _ result: Int32, _ name: String) throws -> Int32 {
        guard fd >= 0, result == 0 else {
            let problem = String(cString: strerror(errno))
            if fd >= 0 { close(fd) }
            throw HTTPError("cannot connect to \(name): \(problem)")
        }
        var timeout = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        return fd
    }

    private func reopen() throws {
        if fd >= 0 { close(fd) }
        buffer.removeAll()
        fd = try open()
        connections += 1
    }

    /// Sends one request and reads its response; reconnects once when the server had closed
    /// the kept-alive connection.
    func request(_ method: String, _ path: String, body: String? = nil, headers: [String: String] = [:]) throws
        -> HTTPResponse
    {
        var head = "\(method) \(path) HTTP/1.1\r\nHost: localhost\r\n"
        let payload = Data((body ?? "").utf8)
        if body != nil { head += "Content-Type: application/json\r\n" }
        if body != nil || method == "POST" { head += "Content-Length: \(payload.count)\r\n" }
        for (name, value) in headers { head += "\(name): \(value)\r\n" }
        let message = Data((head + "\r\n").utf8) + payload
        do {
            try send(message)
            return try readResponse()
        } catch is Closed {
            try reopen()
            try send(message)
            return try readResponse()
        }
    }

    /// Sends a request and reads nothing: the test then hangs up, as a killed client does.
    func sendOnly(_ method: String, _ path: String, body: String) throws {
        let head = "\(method) \(path) HTTP/1.1\r\nHost: localhost\r\nContent-Length: \(body.utf8.count)\r\n\r\n"
        try send(Data((head + body).utf8))
    }

    /// Closes the connection.
    func hangUp() {
        if fd >= 0 { close(fd) }
        fd = -1
    }

    private struct Closed: Error {}

    private func send(_ data: Data) throws {
        try data.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let sent = Glibc.send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
                if sent < 0 && errno == EINTR { continue }
                if sent <= 0 { throw Closed() }
                offset += sent
            }
        }
    }

    /// Reads more bytes into the buffer; false at end of stream.
    private func fill() throws -> Bool {
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = recv(fd, &chunk, chunk.count, 0)
            if count < 0 && errno == EINTR { continue }
            if count < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { throw HTTPError("no response within 30 s") }
            if count < 0 && errno == ECONNRESET { return false }
            if count < 0 { throw HTTPError("recv: \(String(cString: strerror(errno)))") }
            if count == 0 { return false }
            buffer.append(contentsOf: chunk[0..<count])
            return true
        }
    }

    private func readLine() throws -> String {
        while true {
            if let end = buffer.firstRange(of: Data("\r\n".utf8)) {
                let line = String(decoding: buffer[buffer.startIndex..<end.lowerBound], as: UTF8.self)
                buffer.removeSubrange(buffer.startIndex..<end.upperBound)
                return line
            }
            guard try fill() else { throw Closed() }
        }
    }

    private func readBytes(_ count: Int) throws -> Data {
        while buffer.count < count {
            guard try fill() else { throw HTTPError("the response ended early") }
        }
        let data = Data(buffer.prefix(count))
        buffer.removeFirst(count)
        return data
    }

    private func readResponse() throws -> HTTPResponse {
        let statusLine = try readLine()
        let parts = statusLine.split(separator: " ", maxSplits: 2)
        guard parts.count >= 2, parts[0].hasPrefix("HTTP/1."), let status = Int(parts[1]) else {
            throw HTTPError("not an HTTP response: \(statusLine)")
        }
        var headers: [String: String] = [:]
        while true {
            let line = try readLine()
            if line.isEmpty { break }
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(
                in: .whitespaces)
        }
        var body = Data()
        if let length = headers["content-length"].flatMap({ Int($0) }) {
            body = try readBytes(length)
        } else if headers["transfer-encoding"]?.lowercased().contains("chunked") == true {
            while true {
                let size = Int(try readLine().split(separator: ";").first ?? "", radix: 16) ?? 0
                if size == 0 {
                    while try !readLine().isEmpty {}
                    break
                }
                body += try readBytes(size)
                _ = try readLine()
            }
        } else if status != 204 && status != 304 && !(100..<200).contains(status) {
            while try fill() {}
            body = buffer
            buffer.removeAll()
        }
        if headers["connection"]?.lowercased() == "close" { try? reopen() }
        return HTTPResponse(status: status, headers: headers, body: body)
    }
}
