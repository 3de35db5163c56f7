import Foundation
import Testing
import VmpoolTestSupport

/// The guest endpoints of the service (exec, files) on the sim driver: every malformed
/// request is refused with 400 and the field it got wrong, before any VM is looked at; a VM
/// that is not there is 404; a sim VM, which has no guest, is 409 with the reason. The real
/// guest side is Tests/VmpoolQEMUTests/APIGuestTests.swift.
@Suite("The service's guest endpoints on the sim driver", .serialized)
struct ServiceGuestAPITests {
    @Test func badRequestsAndTheSimDriverAreRefusedInWords() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 1))).status == 0)
        // What a service that crashed mid-copy left is removed by the next one; what a live
        // service's request holds is not.
        let scratch = box.state + "/api-files"
        let exited = try RunningCommand(path: "/bin/true", arguments: [], environment: [:])
        _ = exited.wait()
        let dead = scratch + "/\(exited.pid)-crashed"
        let live = scratch + "/\(getpid())-running"
        for directory in [dead + "/tree/sub", live + "/tree"] {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        }
        #expect(FileManager.default.createFile(atPath: dead + "/upload.tar", contents: Data("x".utf8)))
        chmod(dead + "/tree/sub", 0o500)
        let service = try APIService(box)
        defer { service.stop() }
        #expect(!FileManager.default.fileExists(atPath: dead), "a crashed service's files are removed")
        #expect(FileManager.default.fileExists(atPath: live + "/tree"), "a live service's files are kept")
        try FileManager.default.removeItem(atPath: live)
        let http = try service.connect()
        let lease = try http.request("POST", "/v1/pools/web/leases", body: #"{"holder":"guest-tests"}"#)
        #expect(lease.status == 201, "\(lease.text)")
        let vm = try #require(lease.object?["id"] as? String)

        let refused: [(body: String, field: String)] = [
            ("{bad", "exec request"),
            (#"[1]"#, "exec request"),
            (#"{}"#, "argv"),
            (#"{"argv": []}"#, "argv"),
            (#"{"argv": "uname -a"}"#, "argv"),
            (#"{"argv": ["echo", 1]}"#, "argv"),
            (#"{"argv": ["echo", "a\u0000b"]}"#, "argv"),
            (#"{"argv": ["true"], "user": "root"}"#, "user"),
            (#"{"argv": ["true"], "env": ["A=1"]}"#, "env"),
            (#"{"argv": ["true"], "env": {"A": 1}}"#, "env"),
            (#"{"argv": ["true"], "workdir": ""}"#, "workdir"),
            (#"{"argv": ["true"], "workdir": null}"#, "workdir"),
            (#"{"argv": ["true"], "stdin": "abc"}"#, "stdin"),
            (#"{"argv": ["true"], "stdin": "a b="}"#, "stdin"),
            (#"{"argv": ["true"], "timeout": "0s"}"#, "timeout"),
            (#"{"argv": ["true"], "timeout": 30}"#, "timeout"),
            (#"{"argv": ["true"], "timeout": "soon"}"#, "timeout"),
        ]
        for (body, field) in refused {
            let response = try http.request("POST", "/v1/vms/\(vm)/exec", body: body)
            let error = response.object?["error"] as? String ?? ""
            #expect(response.status == 400, "\(body): \(response.status) \(response.text)")
            #expect(error.contains(field), "\(body): the error names \(field): \(error)")
        }

        // An exec request past 24 MiB is refused whole, in JSON like every error.
        let huge = #"{"argv": ["cat"], "stdin": ""# + String(repeating: "QUFB", count: 25 << 18) + #""}"#
        let tooLarge = try http.request("POST", "/v1/vms/\(vm)/exec", body: huge)
        #expect(tooLarge.status == 413, "\(tooLarge.status)")
        #expect((tooLarge.object?["error"] as? String)?.contains("24 MiB") == true, "\(tooLarge.text.prefix(200))")

        // A well-formed request reaches the VM, which the sim driver cannot enter.
        let valid =
            #"{"argv": ["sh", "-c", "cat"], "env": {"A": "1"}, "workdir": "/tmp", "stdin": "aGk=", "timeout": "30s"}"#
        let sim = try http.request("POST", "/v1/vms/\(vm)/exec", body: valid)
        #expect(sim.status == 409, "\(sim.text)")
        #expect((sim.object?["error"] as? String)?.contains("--driver qemu") == true, "\(sim.text)")
        let missing = try http.request("POST", "/v1/vms/web-000000/exec", body: valid)
        #expect(missing.status == 404, "\(missing.text)")
        #expect((missing.object?["error"] as? String)?.contains("web-000000") == true)

        for query in ["", "?path=", "?path=tmp/x", "?path=/a&path=/b", "?path=/a%00b", "?other=/tmp"] {
            for method in ["GET", "PUT"] {
                let response = try http.request(
                    method, "/v1/vms/\(vm)/files\(query)", body: method == "PUT" ? "x" : nil)
                #expect(response.status == 400, "\(method) \(query): \(response.status) \(response.text)")
                #expect((response.object?["error"] as? String)?.hasPrefix("path:") == true, "\(response.text)")
            }
        }
        for method in ["GET", "PUT"] {
            let body = method == "PUT" ? "not a tar archive" : nil
            let response = try http.request(method, "/v1/vms/\(vm)/files?path=/tmp", body: body)
            #expect(response.status == 409, "\(method) on a sim VM: \(response.text)")
            #expect((response.object?["error"] as? String)?.contains("--driver qemu") == true, "\(response.text)")
            let gone = try http.request(method, "/v1/vms/web-000000/files?path=/tmp", body: body)
            #expect(gone.status == 404, "\(method) on no VM: \(gone.text)")
        }

        // A known path answers a method it does not take with 405 and what it takes.
        for (method, path, allowed) in [
            ("GET", "/v1/vms/\(vm)/exec", "POST"), ("DELETE", "/v1/vms/\(vm)/files?path=/tmp", "GET, PUT"),
            ("POST", "/v1/vms/\(vm)/files", "GET, PUT"),
        ] {
            let response = try http.request(method, path)
            #expect(response.status == 405, "\(method) \(path): \(response.status) \(response.text)")
            #expect(response.headers["allow"] == allowed, "\(method) \(path): \(response.headers)")
        }
        // Nothing of any request is left in the state dir.
        let left = (try? FileManager.default.contentsOfDirectory(atPath: scratch)) ?? []
        #expect(left.isEmpty, "left: \(left)")
    }
}
