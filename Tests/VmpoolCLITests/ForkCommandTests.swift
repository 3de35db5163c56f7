import Foundation
import Testing
import VmpoolStore
import VmpoolTestSupport

/// `vmpool fork` as users run it, on the sim driver: forks are leased VMs of the source's pool
/// that do not count toward it, shaped like `lease -o json`'s answer; refusals change nothing;
/// a fork that cannot start leaves nothing leased.
@Suite("Forks on the sim driver")
struct ForkCommandTests {
    @Test func forksAreLeasedToTheSourcesHolderAndThePoolKeepsItsSize() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 2))).status == 0)
        let source = try box.run("lease", "web", "--holder", "job-9", "--refill").stdout
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let forked = try box.run("fork", source, "--count", "3", "--ttl", "1h", "-o", "json")
        #expect(forked.status == 0, "\(forked.stderr)")
        let list = try #require(try JSONSerialization.jsonObject(with: Data(forked.stdout.utf8)) as? [[String: Any]])
        #expect(list.count == 3)
        #expect(list.allSatisfy { Set($0.keys) == ["id", "pool", "address", "ports", "holder", "expiresAt"] })
        #expect(list.allSatisfy { $0["holder"] as? String == "job-9" && $0["pool"] as? String == "web" })
        let forks = Set(list.compactMap { $0["id"] as? String })
        #expect(forks.count == 3 && !forks.contains(source))

        // The pool still has its two unleased VMs; the forks and the source are held.
        #expect(try box.run("reconcile").status == 0)
        let rows = try box.json("get", "vms")
        let unleased = rows.filter { $0["lease"] is NSNull }
        #expect(unleased.count == 2, "\(rows)")
        let held = Set(rows.filter { $0["lease"] is [String: Any] }.compactMap { $0["id"] as? String })
        #expect(held == forks.union([source]))
        let events = try box.run("events", "--pool", "web").stdout
        #expect(events.contains("forked") && events.contains("from \(source)"), "\(events)")

        // Text output: the ids, one a line. Released, forks stop.
        let text = try box.run("fork", source)
        #expect(text.status == 0 && text.stdout.split(separator: "\n").count == 1, "\(text.stdout)\(text.stderr)")
        #expect(try box.run(["release"] + forks.sorted()).status == 0)
        let after = Set(try box.json("get", "vms").compactMap { $0["id"] as? String })
        #expect(after.isDisjoint(with: forks))
    }

    @Test func refusalsSayWhyAndChangeNothing() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 2))).status == 0)
        let source = try box.run("lease", "web", "--holder", "mine").stdout
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let unleased = try #require(
            try box.json("get", "vms").first { $0["lease"] is NSNull }?["id"] as? String)
        let before = try box.json("get", "vms").count
        let cases: [([String], String)] = [
            (["fork", "web-000000"], "no VM named \"web-000000\""),
            (["fork", unleased], "is not leased"),
            (["fork", source, "--holder", "yours"], "leased to another holder"),
            (["fork", source, "--count", "65"], "--count: expected 1 to 64"),
            (["fork", source, "--holder", "a\u{1B}[2Jb"], "--holder: control characters"),
        ]
        for (arguments, expected) in cases {
            let result = try box.run(arguments)
            #expect(result.status != 0 && result.stderr.contains(expected), "\(arguments): \(result.stderr)")
        }
        // Every fork fails to start: nothing is left leased or recorded.
        let failing = try box.run(["fork", source, "--count", "2"], environment: ["VMPOOL_SIM_FAIL": "clone:1"])
        #expect(failing.status != 0 && failing.stderr.contains("no fork of \(source) started"), "\(failing.stderr)")
        #expect(try box.json("get", "vms").count == before)
        let store = try StateStore(directory: box.state)
        #expect(try store.unfinishedOperations().isEmpty)
    }
}
