import Foundation
import Testing
import VmpoolTestSupport

/// manifests/postgres-fixture.yaml as a user runs it, on the Debian disk with PostgreSQL.
@Suite(
    "The PostgreSQL fixture on real QEMU", .serialized,
    .enabled(if: QemuEnvironment.available, "\(QemuEnvironment.skipReason ?? "")"))
struct PostgresFixtureTests {
    static let disk = ProcessInfo.processInfo.environment["VMPOOL_TEST_DEBIAN_PG"]

    /// A leased VM's database answers at once, with the schema setup loaded, through the
    /// forwarded port; a second lease gets another VM with its own copy of the data.
    @Test(
        .enabled(
            if: disk != nil || QemuEnvironment.required,
            "VMPOOL_TEST_DEBIAN_PG is not set (scripts/test builds the Debian disk with postgresql)"))
    func aLeasedVMsDatabaseAnswersAtOnce() throws {
        let disk = try #require(Self.disk, "scripts/test sets VMPOOL_TEST_DEBIAN_PG")
        let psql = try #require(
            ["/usr/bin/psql", "/usr/lib/postgresql/15/bin/psql"].first {
                FileManager.default.isExecutableFile(atPath: $0)
            },
            "psql is not installed (scripts/test installs postgresql)")
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let fixture = repositoryRoot + "/manifests"
        try FileManager.default.createDirectory(atPath: box.dir.path + "/images", withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(
            atPath: box.dir.path + "/images/debian.qcow2", withDestinationPath: disk)
        try FileManager.default.copyItem(
            atPath: fixture + "/postgres-fixture", toPath: box.dir.path + "/postgres-fixture")
        let manifest = try String(contentsOfFile: fixture + "/postgres-fixture.yaml", encoding: .utf8)
        let applied = try box.run(["apply", "-f", box.write(manifest)], environment: ["VMPOOL_BOOT_TIMEOUT": "600s"])
        #expect(applied.status == 0, "\(applied.stdout)\(applied.stderr)")

        var seen: [String] = []
        for round in 0..<2 {
            let leased = try box.run(["lease", "pg", "--ttl", "10m", "-o", "json"])
            try #require(leased.status == 0, "\(leased.stderr)")
            let lease = try #require(
                try JSONSerialization.jsonObject(with: Data(leased.stdout.utf8)) as? [String: Any])
            let vm = try #require(lease["id"] as? String)
            let port = try #require((lease["ports"] as? [String: Int])?["5432"])
            seen.append(vm)
            // No retry: a VM is leased only once its ready check (pg_isready, port 5432) held.
            let query = try RunningCommand(
                path: psql,
                arguments: [
                    "-h", "127.0.0.1", "-p", "\(port)", "-U", "ci", "-d", "postgres", "-qtA",
                    "-c", "insert into jobs (name) values ('round \(round)')", "-c", "select count(*) from jobs",
                ], environment: ["PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "30"]
            ).wait()
            // The fixture's row and this round's: nothing another VM wrote.
            #expect(
                query.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "2",
                "\(vm): \(query.stdout)\(query.stderr)")
        }
        #expect(Set(seen).count == 2, "both leases got \(seen)")
    }
}
