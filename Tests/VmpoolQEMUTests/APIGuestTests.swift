import Foundation
import Testing
import VmpoolTestSupport

/// The service's guest endpoints on real QEMU, as a test runner uses them: lease over HTTP,
/// run commands (status, stdout, stderr, stdin, environment, timeout, bounded output, a client
/// that goes away), copy a file and a directory in and out, and the refusals (a path that is
/// not there, a VM nobody leased). curl is the client, as it would be in a CI job.
@Suite(
    "The HTTP API reaches inside leased VMs on real QEMU", .serialized,
    .enabled(if: QemuEnvironment.available, "\(QemuEnvironment.skipReason ?? "")"))
struct APIGuestTests {
    /// `vmpool reconcile --every 1s --listen 127.0.0.1:PORT` on the sandbox.
    final class Service {
        let command: RunningCommand
        let base: String
        let scratch: String

        init(_ box: QemuSandbox) throws {
            let port = Self.freePort()
            base = "http://127.0.0.1:\(port)"
            scratch = box.dir.path + "/http"
            try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
            command = try box.binary.start(
                ["reconcile", "--every", "1s", "--listen", "127.0.0.1:\(port)", "--state-dir", box.state])
        }

        func stop() {
            command.kill(SIGTERM)
            if !command.exited(within: 20) { command.kill(SIGKILL) }
            _ = command.wait()
        }

        /// One request through curl: the status and the body (written to `output` when given).
        func request(_ arguments: [String], output: String? = nil, maxTime: Int = 300) throws -> (
            status: Int, body: Data
        ) {
            let file = output ?? scratch + "/body-\(UUID().uuidString)"
            defer { if output == nil { unlink(file) } }
            let result = try RunningCommand(
                path: "/usr/bin/curl",
                arguments: ["-sS", "-o", file, "-w", "%{http_code}", "--max-time", "\(maxTime)"] + arguments,
                environment: [:]
            ).wait()
            let body = FileManager.default.contents(atPath: file) ?? Data()
            return (Int(result.stdout) ?? 0, body)
        }

        func exec(_ vm: String, _ json: String) throws -> (status: Int, object: [String: Any]) {
            let (status, body) = try request(["-X", "POST", "--data-binary", json, "\(base)/v1/vms/\(vm)/exec"])
            return (status, (try? JSONSerialization.jsonObject(with: body) as? [String: Any]) ?? [:])
        }

        static func freePort() -> Int {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            defer { close(fd) }
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            _ = withUnsafeMutablePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
                    bind(fd, pointer, length) == 0 ? getsockname(fd, pointer, &length) : -1
                }
            }
            return Int(UInt16(bigEndian: address.sin_port))
        }
    }

    static func decoded(_ value: Any?) -> String {
        String(decoding: Data(base64Encoded: value as? String ?? "") ?? Data(), as: UTF8.self)
    }

    static func tar(_ arguments: [String]) throws -> CommandResult {
        try RunningCommand(path: "/usr/bin/tar", arguments: arguments, environment: [:]).wait()
    }

    @Test func commandsAndFilesGoThroughTheLease() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let manifest = """
            apiVersion: vmpool/v1
            kind: Pool
            metadata: {name: apiguest}
            spec: {size: 1, vcpus: 1, memory: 256Mi}
            """
        try #require(try box.run(["apply", "-f", box.write(manifest)]).status == 0)
        let service = try Service(box)
        defer { service.stop() }
        let up = eventuallyIgnoringErrors(timeout: .seconds(30)) {
            try service.request(["\(service.base)/openapi.json"], maxTime: 5).status == 200
        }
        try #require(up, "the service answers")

        // Lease over HTTP, waiting for the pool's VM to boot.
        let leased = try service.request([
            "-X", "POST", "--data-binary", #"{"wait": "10m", "holder": "api-guest-test"}"#,
            "\(service.base)/v1/pools/apiguest/leases",
        ])
        try #require(leased.status == 201, "\(String(decoding: leased.body, as: UTF8.self))")
        let lease = try #require(try JSONSerialization.jsonObject(with: leased.body) as? [String: Any])
        let vm = try #require(lease["id"] as? String)

        // Status, stdout and stderr apart.
        let ran = try service.exec(vm, #"{"argv": ["sh", "-c", "echo out; echo err >&2; exit 3"]}"#)
        #expect(ran.status == 200, "\(ran.object)")
        #expect(ran.object["exitStatus"] as? Int == 3)
        #expect(Self.decoded(ran.object["stdout"]) == "out\n" && Self.decoded(ran.object["stderr"]) == "err\n")
        #expect(ran.object["truncated"] as? Bool == false)

        // stdin, environment and working directory.
        let input = Data("line one\nline two\n".utf8).base64EncodedString()
        let fed = try service.exec(
            vm,
            #"{"argv": ["sh", "-c", "cat; echo $GREETING; pwd"], "env": {"GREETING": "hi there"}, "workdir": "/tmp", "stdin": "\#(input)"}"#
        )
        #expect(fed.status == 200 && fed.object["exitStatus"] as? Int == 0, "\(fed.object)")
        #expect(Self.decoded(fed.object["stdout"]) == "line one\nline two\nhi there\n/tmp\n")

        // Killed at its timeout (137), not found (127), a bad env name refused (400).
        let slow = try service.exec(vm, #"{"argv": ["sleep", "60"], "timeout": "1s"}"#)
        #expect(slow.status == 200 && slow.object["exitStatus"] as? Int == 137, "\(slow.object)")
        let missing = try service.exec(vm, #"{"argv": ["/no/such/command"]}"#)
        #expect(missing.status == 200 && missing.object["exitStatus"] as? Int == 127, "\(missing.object)")
        #expect(Self.decoded(missing.object["stderr"]).contains("/no/such/command"))
        let badName = try service.exec(vm, #"{"argv": ["true"], "env": {"A=B": "c"}}"#)
        #expect(badName.status == 400, "\(badName.object)")

        // Output beyond 16 MiB is dropped; the command still runs to its end.
        let big = try service.exec(
            vm, #"{"argv": ["sh", "-c", "head -c 17000000 /dev/zero; echo finished >&2; exit 4"]}"#)
        #expect(big.status == 200 && big.object["exitStatus"] as? Int == 4, "\(big.object["stderr"] ?? "")")
        #expect(big.object["truncated"] as? Bool == true)
        #expect(Data(base64Encoded: big.object["stdout"] as? String ?? "")?.count == 16 << 20)
        #expect(Self.decoded(big.object["stderr"]) == "finished\n")

        // A client that goes away kills its command in the guest.
        let processes = {
            let ps = try service.exec(vm, #"{"argv": ["ps"]}"#)
            let text = Self.decoded(ps.object["stdout"])
            try #require(ps.status == 200 && text.contains("PID"), "ps: \(ps.object)")
            return text
        }
        let client = try RunningCommand(
            path: "/usr/bin/curl",
            arguments: [
                "-sS", "-o", "/dev/null", "-X", "POST", "--data-binary", #"{"argv": ["sleep", "317"]}"#,
                "\(service.base)/v1/vms/\(vm)/exec",
            ], environment: [:])
        let running = eventuallyIgnoringErrors(timeout: .seconds(30)) { try processes().contains("sleep 317") }
        client.kill(SIGKILL)
        _ = client.wait()
        #expect(running, "the command runs while its client waits")
        let killed = eventuallyIgnoringErrors(timeout: .seconds(30)) { try !processes().contains("sleep 317") }
        #expect(killed, "the command of a client that went away was killed")

        // A directory (a file, a binary file, a symlink) in, and back out.
        let host = box.dir.path + "/host"
        try FileManager.default.createDirectory(atPath: host + "/tree/sub", withIntermediateDirectories: true)
        try Data("alpha\n".utf8).write(to: URL(fileURLWithPath: host + "/tree/a.txt"))
        let binary = Data((0..<70000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) })
        try binary.write(to: URL(fileURLWithPath: host + "/tree/sub/b.bin"))
        symlink("a.txt", host + "/tree/link")
        let upload = box.dir.path + "/tree.tar"
        #expect(try Self.tar(["-C", host, "-cf", upload, "tree"]).status == 0)
        let put = try service.request([
            "-X", "PUT", "-H", "Content-Type: application/x-tar", "--data-binary", "@\(upload)",
            "\(service.base)/v1/vms/\(vm)/files?path=/tmp",
        ])
        #expect(put.status == 204, "\(String(decoding: put.body, as: UTF8.self))")
        let listed = try service.exec(vm, #"{"argv": ["sh", "-c", "cat /tmp/tree/a.txt; readlink /tmp/tree/link"]}"#)
        #expect(Self.decoded(listed.object["stdout"]) == "alpha\na.txt\n", "\(listed.object)")
        // Again: a directory is not merged into the one now there.
        let again = try service.request([
            "-X", "PUT", "--data-binary", "@\(upload)", "\(service.base)/v1/vms/\(vm)/files?path=/tmp",
        ])
        #expect(again.status == 409, "\(String(decoding: again.body, as: UTF8.self))")

        let download = box.dir.path + "/back.tar"
        let got = try service.request(["\(service.base)/v1/vms/\(vm)/files?path=/tmp/tree"], output: download)
        #expect(got.status == 200)
        let back = box.dir.path + "/back"
        try FileManager.default.createDirectory(atPath: back, withIntermediateDirectories: true)
        #expect(try Self.tar(["-C", back, "-xf", download]).status == 0)
        #expect(FileManager.default.contents(atPath: back + "/tree/a.txt") == Data("alpha\n".utf8))
        #expect(FileManager.default.contents(atPath: back + "/tree/sub/b.bin") == binary)
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: back + "/tree/link") == "a.txt")

        // One file, to a new name, and back.
        try Data("single\n".utf8).write(to: URL(fileURLWithPath: host + "/one.txt"))
        let single = box.dir.path + "/one.tar"
        #expect(try Self.tar(["-C", host, "-cf", single, "one.txt"]).status == 0)
        let putOne = try service.request([
            "-X", "PUT", "--data-binary", "@\(single)", "\(service.base)/v1/vms/\(vm)/files?path=/root/renamed.txt",
        ])
        #expect(putOne.status == 204, "\(String(decoding: putOne.body, as: UTF8.self))")
        let oneBack = box.dir.path + "/one-back.tar"
        let gotOne = try service.request(
            ["\(service.base)/v1/vms/\(vm)/files?path=/root/renamed.txt"], output: oneBack)
        #expect(gotOne.status == 200)
        let listing = try Self.tar(["-tvf", oneBack])
        #expect(listing.stdoutLines.count == 1 && listing.stdout.contains("renamed.txt"), "\(listing.stdout)")
        #expect(try Self.tar(["-C", back, "-xf", oneBack]).status == 0)
        #expect(FileManager.default.contents(atPath: back + "/renamed.txt") == Data("single\n".utf8))

        // A path that is not there, and an archive that is not one.
        let absent = try service.request(["\(service.base)/v1/vms/\(vm)/files?path=/no/such/path"])
        #expect(absent.status == 404)
        let absentError = (try? JSONSerialization.jsonObject(with: absent.body) as? [String: Any])?["error"] as? String
        #expect(absentError?.contains("no such file or directory in the guest: /no/such/path") == true, "\(absent)")
        let junk = try service.request([
            "-X", "PUT", "--data-binary", "this is not a tar archive", "\(service.base)/v1/vms/\(vm)/files?path=/tmp",
        ])
        #expect(junk.status == 400, "\(String(decoding: junk.body, as: UTF8.self))")

        // An upload whose client goes away halfway leaves nothing on the host.
        let scratch = box.state + "/api-files"
        let entries = { (try? FileManager.default.contentsOfDirectory(atPath: scratch)) ?? [] }
        let uploader = try RunningCommand(
            path: "/usr/bin/curl",
            arguments: [
                "-sS", "-o", "/dev/null", "-X", "PUT", "-H", "Expect:", "-T", "-",
                "\(service.base)/v1/vms/\(vm)/files?path=/tmp",
            ], environment: [:], stdin: .pipe)
        uploader.write(String(repeating: "x", count: 32768))
        let receiving = eventually(timeout: .seconds(30)) { !entries().isEmpty }
        uploader.kill(SIGKILL)
        _ = uploader.wait()
        #expect(receiving, "the upload is kept in a private directory while it comes")
        #expect(eventually(timeout: .seconds(30)) { entries().isEmpty }, "left: \(entries())")

        // The pool refills; its new VM is nobody's lease and is not entered over HTTP.
        var free: String?
        let refilled = eventuallyIgnoringErrors(timeout: .seconds(600)) {
            free =
                try box.vms(pool: "apiguest").first {
                    $0["lease"] is NSNull && $0["state"] as? String == "running"
                }?["id"] as? String
            return free != nil
        }
        try #require(refilled, "the pool refilled")
        let unleased = try service.exec(try #require(free), #"{"argv": ["true"]}"#)
        #expect(unleased.status == 409, "\(unleased.object)")
        #expect((unleased.object["error"] as? String)?.contains("not leased") == true, "\(unleased.object)")
        let unleasedFiles = try service.request(["\(service.base)/v1/vms/\(free!)/files?path=/tmp"])
        #expect(unleasedFiles.status == 409)

        // Released; nothing of any request is left on the host.
        let released = try service.request(["-X", "DELETE", "\(service.base)/v1/leases/\(vm)"])
        #expect(released.status == 204)
        #expect(entries().isEmpty, "left: \(entries())")
    }
}
