import Foundation
import Testing
import VmpoolTestSupport

/// Where the service listens is checked before its first pass: locality judged from resolved
/// addresses, a served Unix socket never taken over, a busy port said in words.
@Suite("The service's listen address", .serialized)
struct ListenTests {
    /// A name that starts like a loopback address but resolves elsewhere needs a token. The
    /// name resolves through a private /etc/hosts in a mount namespace of the command's own,
    /// so no query leaves this host.
    @Test func aNameIsLocalOnlyByTheAddressesItResolvesTo() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        guard geteuid() == 0,
            let unshare = ["/usr/bin/unshare", "/bin/unshare"].first(where: {
                FileManager.default.isExecutableFile(atPath: $0)
            })
        else {
            Issue.record("this test needs root and unshare(1) to give the command a private /etc/hosts")
            return
        }
        let hosts = box.dir.write("hosts", "127.0.0.1 localhost\n192.0.2.7 127.evil.example\n127.0.0.1 loop.example\n")
        func start(_ name: String, port: Int = APIService.freePort()) throws -> RunningCommand {
            let script = "mount --bind \"$1\" /etc/hosts && shift && exec \"$@\""
            return try RunningCommand(
                path: unshare,
                arguments: [
                    "-m", "--propagation", "private", "sh", "-c", script, "sh", hosts, box.binary.path, "reconcile",
                    "--every", "1s", "--listen", "\(name):\(port)", "--state-dir", box.state,
                ], environment: box.binary.environment.merging(["PATH": "/usr/sbin:/usr/bin:/sbin:/bin"]) { $1 })
        }
        let evil = try start("127.evil.example")
        let exited = evil.exited(within: 15)
        if !exited { evil.kill(SIGKILL) }
        let result = evil.wait()
        #expect(
            exited && result.status == 1, "127.evil.example without a token: exit \(result.status) \(result.stderr)")
        #expect(
            result.stderr.contains("reachable from other hosts") && result.stderr.contains("192.0.2.7"),
            "\(result.stderr)")

        // A name that does resolve to loopback is served without a token.
        let port = APIService.freePort()
        let loop = try start("loop.example", port: port)
        let serving = eventuallyIgnoringErrors(timeout: .seconds(20)) {
            try HTTPConnection(port: port).request("GET", "/v1/vms").status == 200
        }
        loop.kill(SIGTERM)
        if !loop.exited(within: 10) { loop.kill(SIGKILL) }
        let served = loop.wait()
        #expect(serving, "loop.example (127.0.0.1) is served without a token: \(served.status) \(served.stderr)")
    }

    @Test func aServedUnixSocketIsNeverTakenOver() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let socket = box.dir.path + "/api.sock"
        let first = try APIService(box, listen: "unix:\(socket)")
        defer { first.stop() }

        let other = Sandbox()
        defer { other.dir.remove() }
        let second = try other.binary.start(
            ["reconcile", "--every", "1s", "--listen", "unix:\(socket)", "--state-dir", other.state])
        let exited = second.exited(within: 15)
        if !exited { second.kill(SIGKILL) }
        let result = second.wait()
        #expect(exited && result.status == 1, "a second service on a served socket: exit \(result.status)")
        #expect(result.stderr.contains("another service is serving"), "\(result.stderr)")
        var info = stat()
        #expect(stat(socket, &info) == 0 && info.st_mode & S_IFMT == S_IFSOCK, "the socket is still there")
        #expect(try first.connect().request("GET", "/v1/vms").status == 200, "the first service still answers")

        // Something that is not a socket is refused too, and left alone.
        let file = other.dir.write("not-a-socket", "data")
        let refused = try other.binary.run(
            ["reconcile", "--every", "1s", "--listen", "unix:\(file)", "--state-dir", other.state])
        #expect(refused.status == 1 && refused.stderr.contains("not a socket"), "\(refused.stderr)")
        #expect((try? String(contentsOfFile: file, encoding: .utf8)) == "data")
    }

    /// A socket file nobody answers on (a service killed with SIGKILL leaves one) is stale and
    /// taken.
    @Test func aStaleUnixSocketIsReplaced() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let socket = box.dir.path + "/api.sock"
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: Array(socket.utf8) + [0])
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        close(fd)
        #expect(bound == 0, "a stale socket file was made")
        let service = try APIService(box, listen: "unix:\(socket)")
        defer { service.stop() }
        #expect(try service.connect().request("GET", "/v1/vms").status == 200)
    }

    @Test func aBusyPortIsReportedInWordsBeforeAnyPass() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let port = APIService.freePort()
        let holder = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(holder) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        let listening = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(holder, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 && listen(holder, 1) == 0
            }
        }
        #expect(listening, "the test holds 127.0.0.1:\(port)")
        let result = try box.binary.run(
            ["reconcile", "--every", "1s", "--listen", "127.0.0.1:\(port)", "--state-dir", box.state])
        #expect(result.status == 1, "exit \(result.status)")
        #expect(
            result.stderr.contains("127.0.0.1:\(port)") && result.stderr.contains("already in use"), "\(result.stderr)")
        #expect(!result.stderr.contains("errno"), "\(result.stderr)")
        // No pass ran: the state dir has no store yet.
        #expect(access(box.state + "/state.sqlite", F_OK) != 0, "a pass ran before the bind error")
    }
}
