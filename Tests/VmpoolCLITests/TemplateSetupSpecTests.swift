import Foundation
import Testing
import VmpoolTestSupport

/// `spec.template.files`, `setup` and `ready` as manifests give them (SPEC §11), on the sim
/// driver: where the files are read from, what a change of them plans, and the errors.
@Suite("Template setup in manifests")
struct TemplateSetupSpecTests {
    func manifest(boot: String = "template", files: String = "{src: fixtures/schema.sql, dst: /srv/schema.sql}")
        -> String
    {
        """
        apiVersion: vmpool/v1
        kind: Pool
        metadata: {name: db}
        spec:
          size: 2
          vcpus: 1
          memory: 256Mi
          boot: \(boot)
          template:
            files:
              - \(files)
            setup:
              - systemctl start postgresql
              - [psql, -U, postgres, -f, /srv/schema.sql]
            ready: {exec: [pg_isready], timeout: 2m}
        """
    }

    /// A file is read relative to its manifest, not the working directory; a change of its
    /// content rebuilds the template and replaces the clones (new before old), and plan says
    /// which part changed. Changing it back plans nothing new against the rebuilt pool.
    @Test func aChangedFileRebuildsTheTemplateAndReplacesTheVMs() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let file = box.dir.write("db/pool.yaml", manifest())
        box.dir.write("db/fixtures/schema.sql", "CREATE TABLE t (id int);\n")
        // The manifest is named by an absolute path from the tests' own working directory.
        let applied = try box.run("apply", "-f", file)
        #expect(applied.status == 0, "\(applied.stdout)\(applied.stderr)")
        #expect(try box.plan(file).status == 0, "an unchanged file plans nothing")

        box.dir.write("db/fixtures/schema.sql", "CREATE TABLE t (id int, name text);\n")
        let plan = try box.run("plan", "-f", file)
        #expect(plan.stdout.contains("template is stale: template.files changed"), "\(plan.stdout)")
        #expect(plan.stdout.components(separatedBy: "-/+ replace").count - 1 == 2, "\(plan.stdout)")
        #expect(try box.plan(file).counts == ["build-template": 1, "replace": 2])
        #expect(try box.run("apply", "-f", file).status == 0)
        #expect(try box.plan(file).status == 0)

        // A changed step or check is a change too.
        let stepChanged = box.dir.write(
            "db/pool.yaml", manifest().replacingOccurrences(of: "pg_isready", with: "pg_isready -q"))
        let replan = try box.run("plan", "-f", stepChanged)
        #expect(replan.stdout.contains("template.ready changed"), "\(replan.stdout)")
    }

    /// A pool that boots cold is replaced when its setup changes (its VMs ran the old one).
    @Test func aColdPoolsVMsAreReplacedWhenItsSetupChanges() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        box.dir.write("fixtures/schema.sql", "SELECT 1;\n")
        let file = box.dir.write("pool.yaml", manifest(boot: "cold"))
        #expect(try box.run("apply", "-f", file).status == 0)
        box.dir.write("pool.yaml", manifest(boot: "cold").replacingOccurrences(of: "postgres,", with: "admin,"))
        #expect(try box.plan(file).counts == ["replace": 2])
    }

    /// A file that is not there is an error at its field (file:line:col), and nothing changes.
    @Test func aMissingFileIsALocatedErrorAndChangesNothing() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        let text = manifest()
        let file = box.dir.write("pool.yaml", text)
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        let line = try #require(lines.firstIndex { $0.contains("{src:") })
        let column = try #require(lines[line].range(of: "fixtures/")).lowerBound.utf16Offset(in: lines[line]) + 1
        for command in ["validate", "plan", "apply"] {
            let result = try box.run(command, "-f", file)
            #expect(result.status == 1, "\(command): \(result.stdout)")
            #expect(
                result.stderr.contains("pool.yaml:\(line + 1):\(column): spec.template.files[0].src: ")
                    && result.stderr.contains("fixtures/schema.sql: No such file or directory"),
                "\(command): \(result.stderr)")
        }
        #expect(!FileManager.default.fileExists(atPath: box.state), "a refused apply made the state dir")
    }

    /// Steps and checks are checked where they are written.
    @Test func badStepsAreLocatedErrors() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        box.dir.write("fixtures/schema.sql", "SELECT 1;\n")
        let cases: [(String, String, String)] = [
            ("[psql, -U, postgres, -f, /srv/schema.sql]", "[sleep, 5]", "spec.template.setup[1][1]: expected a string"),
            ("{exec: [pg_isready], timeout: 2m}", "{timeout: 2m}", "spec.template.ready: expected exec, port or both"),
            ("timeout: 2m", "timeout: 1m30s", "spec.template.ready.timeout: expected a whole number"),
            ("dst: /srv/schema.sql", "dst: srv/schema.sql", "spec.template.files[0].dst: expected an absolute"),
        ]
        for (from, to, expected) in cases {
            let file = box.dir.write("bad.yaml", manifest().replacingOccurrences(of: from, with: to))
            let result = try box.run("validate", "-f", file)
            #expect(result.status == 1 && result.stderr.contains(expected), "\(to): \(result.stderr)")
        }
        // shareMemory is for template pools; the rest prepares cold VMs too.
        let cold = box.dir.write(
            "cold.yaml",
            manifest(boot: "cold").replacingOccurrences(of: "    files:", with: "    shareMemory: false\n    files:"))
        let refused = try box.run("validate", "-f", cold)
        #expect(refused.status == 1 && refused.stderr.contains("spec.template.shareMemory: only with boot: template"))
        #expect(try box.run("validate", "-f", box.dir.write("ok.yaml", manifest(boot: "cold"))).status == 0)
    }
}
