import Foundation
import Testing
import VmpoolSim
import VmpoolStore
import VmpoolTestSupport

@testable import VmpoolCLI

@Suite("reconcile --every", .serialized)
struct ReconcileServiceTests {
    @Test func sigtermFinishesInFlightActionsAndLeavesNoHalfMadeVM() async throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        // Record the desired pool without creating anything.
        let file = box.write(pool(size: 8))
        let recorded = try box.run("apply", "-f", file, environment: ["VMPOOL_SIM_FAIL": "create:1"])
        #expect(recorded.status == 1)
        let service = try box.binary.start(
            ["reconcile", "--every", "200ms", "--parallel", "2", "--state-dir", box.state],
            environment: ["VMPOOL_SIM_LATENCY": "300ms", "VMPOOL_LOG_LEVEL": "info"])
        // SIGTERM once the pass has made some VMs (each create takes 300 ms, two at a time),
        // well before it could make all 8.
        let underway = eventuallyIgnoringErrors(timeout: .seconds(10)) {
            try box.json("get", "vms").filter { $0["state"] as? String == "running" }.count >= 2
        }
        #expect(underway, "the service's pass made no VM")
        let signalled = Date()
        service.kill(SIGTERM)
        let result = service.wait()
        let stopping = Date().timeIntervalSince(signalled)
        #expect(result.status == 0, "\(result.stderr)")
        #expect(stopping < 2, "shutdown took \(stopping) s")
        let store = try StateStore(directory: box.state)
        let records = try store.vms()
        #expect(!records.isEmpty && records.count < 8, "the pass was cut short: \(records.count) VMs")
        #expect(records.allSatisfy { $0.state == .running }, "a half-made VM was left")
        #expect(try store.unfinishedOperations().isEmpty)
        let sim = try SimDriver(stateDirectory: box.state)
        #expect(Set(await sim.discover().map(\.id)) == Set(records.map(\.id)))
        #expect(result.stderr.contains("pool=web"), "logs carry pool metadata")
        #expect(try box.run("reconcile").status == 0)
        #expect(try box.vmStates() == ["running": 8])
    }

    @Test func oneBrokenPoolDoesNotHoldUpTheOthers() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let broken = box.dir.write(
            "broken.yaml",
            manifest(pool("broken", size: 1)).replacingOccurrences(
                of: "  warm: 0\n", with: "  warm: 0\n  image: {kernel: \(box.dir.path)/vmlinuz}\n"))
        _ = FileManager.default.createFile(atPath: box.dir.path + "/vmlinuz", contents: Data())
        let healthy = box.write(pool("healthy", size: 2), as: "healthy.yaml")
        #expect(try box.run("apply", "-f", broken, "-f", healthy).status == 0)
        // The kernel disappears behind vmpool's back; the healthy pool drifts too.
        unlink(box.dir.path + "/vmlinuz")
        let sim = try SimDriver(stateDirectory: box.state)
        for vm in try box.json("get", "vms") { try sim.simulateCrash(vm["id"] as? String ?? "") }
        let port = APIService.freePort()
        let service = try box.binary.start(
            ["reconcile", "--every", "100ms", "--listen", "127.0.0.1:\(port)", "--state-dir", box.state],
            environment: ["VMPOOL_LOG_LEVEL": "info"])
        // Ten passes: a pool retried in a hot loop would be retried in most of them.
        let passed = eventuallyIgnoringErrors(timeout: .seconds(20)) {
            try Self.passes(port: port) >= 10 && box.vmStates(pool: "healthy") == ["running": 2]
        }
        #expect(passed, "the service ran \((try? Self.passes(port: port)) ?? 0) passes")
        service.kill(SIGTERM)
        let result = service.wait()
        #expect(result.status == 0)
        #expect(try box.vmStates(pool: "healthy") == ["running": 2])
        let retries = result.stderr.components(separatedBy: "\n").filter {
            $0.contains("pool=broken") && $0.contains("retrying later")
        }
        #expect(retries.count == 1, "a terminal failure is not retried in a hot loop: \(retries.count) retries")
        #expect(retries.first?.contains("retry_in=10m") == true)
    }

    @Test func theServiceSharesTheStateDirAndIsWokenByChanges() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let small = box.write(pool(size: 1))
        #expect(try box.run("apply", "-f", small).status == 0)
        // A pass every hour: anything it does after the first pass is the work of a wake.
        let port = APIService.freePort()
        let service = try box.binary.start(
            ["reconcile", "--every", "1h", "--listen", "127.0.0.1:\(port)", "--state-dir", box.state],
            environment: ["VMPOOL_LOG_LEVEL": "debug"])
        defer {
            service.kill(SIGTERM)
            _ = service.wait()
        }
        // Its first pass is over (it now waits an hour, or a wake).
        #expect(eventuallyIgnoringErrors(timeout: .seconds(20)) { try Self.passes(port: port) >= 1 })
        // apply and delete do not wait for the service's lock.
        let bigger = box.write(pool(size: 3))
        let started = Date()
        let apply = try box.run("apply", "-f", bigger, "--lock-timeout", "2s")
        #expect(apply.status == 0, "apply during the service: \(apply.stderr)")
        #expect(Date().timeIntervalSince(started) < 2)
        let other = box.write(pool("other", size: 1), as: "other.yaml")
        #expect(try box.run("apply", "-f", other, "--lock-timeout", "2s").status == 0)
        #expect(try box.run("delete", "other", "--lock-timeout", "2s").status == 0)
        // A VM dies; the next change wakes the service, whose pass repairs it at once.
        let sim = try SimDriver(stateDirectory: box.state)
        let victim = try #require(try box.json("get", "vms").first?["id"] as? String)
        try sim.simulateCrash(victim)
        let third = box.write(pool("third", size: 0), as: "third.yaml")
        #expect(try box.run("apply", "-f", third).status == 0)
        let repaired = eventuallyIgnoringErrors(timeout: .seconds(10)) {
            try box.json("get", "vms", "--pool", "web").allSatisfy { $0["id"] as? String != victim }
        }
        #expect(repaired, "the woken service replaced the dead VM")
        service.kill(SIGTERM)
        let log = service.wait()
        #expect(log.status == 0)
        #expect(log.stderr.contains("woken"), "\(log.stderr.suffix(2000))")
    }

    /// How many passes the service on `port` has finished (its pass-duration histogram's count).
    static func passes(port: Int) throws -> Int {
        let metrics = try HTTPConnection(port: port).request("GET", "/metrics").text
        let line = metrics.split(separator: "\n").first { $0.hasPrefix("vmpool_pass_duration_seconds_count") }
        return line.flatMap { $0.split(separator: " ").last }.flatMap { Double($0) }.map { Int($0) } ?? 0
    }

    @Test func backoffDoublesPerFailureUpToTheCeiling() {
        var backoff = Backoff(interval: .seconds(1), maximum: .seconds(60))
        let now = ContinuousClock.now
        #expect(backoff.isDue("a", now: now))
        #expect(backoff.failed("a", terminal: false, now: now) == .seconds(2))
        #expect(!backoff.isDue("a", now: now.advanced(by: .seconds(1))))
        #expect(backoff.isDue("a", now: now.advanced(by: .seconds(2))))
        #expect(backoff.failed("a", terminal: false, now: now) == .seconds(4))
        for _ in 0..<10 { _ = backoff.failed("a", terminal: false, now: now) }
        #expect(backoff.failed("a", terminal: false, now: now) == .seconds(60))
        #expect(backoff.failed("b", terminal: true, now: now) == .seconds(60))
        #expect(backoff.isDue("c", now: now))
        backoff.succeeded("a")
        #expect(backoff.isDue("a", now: now))
    }
}
