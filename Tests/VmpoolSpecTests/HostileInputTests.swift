import Foundation
import Testing
import VmpoolSpec
import VmpoolTestSupport

/// Every input gets a located error or is accepted; nothing crashes, hangs or grows without bound.
@Suite("Hostile input")
struct HostileInputTests {
    /// 10,000 mutations by default; `VMPOOL_FUZZ_COUNT` runs more.
    static let count = Int(ProcessInfo.processInfo.environment["VMPOOL_FUZZ_COUNT"] ?? "") ?? 10_000
    /// What any one classic attack may cost in CPU time, accepted or refused.
    static let attackBudget: Duration = .seconds(2)

    @Test func everyClassicAttackGetsItsVerdictQuickly() {
        for attack in ManifestMutator.attacks() {
            let started = threadCPUTime()
            let result = ManifestLoader.parse(attack.bytes, file: "fuzz.yaml")
            let cost = threadCPUTime() - started
            #expect(cost < Self.attackBudget, "\(attack.name) took \(cost) of CPU time")
            let problems = InputCheck(attack.bytes, file: "fuzz.yaml").problems(in: result.diagnostics)
            #expect(problems.isEmpty, "\(attack.name): \(problems)")
            switch attack.verdict {
            case .mustReject(let code):
                #expect(!result.diagnostics.isEmpty, "\(attack.name) was accepted")
                #expect(
                    result.diagnostics.contains { $0.code == code },
                    "\(attack.name) should be \(attack.verdict), got \(result.diagnostics.prefix(3).map(\.description))"
                )
            case .validManifest(let pools):
                #expect(
                    result.diagnostics.isEmpty,
                    "\(attack.name) should be \(attack.verdict), got \(result.diagnostics.prefix(3).map(\.description))"
                )
                #expect(result.pools.count == pools, "\(attack.name)")
            }
        }
    }

    @Test func aliasBombInLabelsIsRefusedAtTheLabels() throws {
        let attack = try #require(ManifestMutator.attacks().first { $0.name == "alias bomb in labels" })
        let text = String(decoding: attack.bytes, as: UTF8.self)
        #expect(text.contains("  labels:\n    a0: &a0 ["), "the bomb is not the value of metadata.labels")
        let started = threadCPUTime()
        let result = ManifestLoader.parse(attack.bytes, file: "fuzz.yaml")
        #expect(threadCPUTime() - started < .seconds(1))
        #expect(result.pools.isEmpty)
        #expect(InputCheck(attack.bytes, file: "fuzz.yaml").problems(in: result.diagnostics).isEmpty)
        // One wrongType per label whose value is a sequence of aliases, each at its own line.
        let labels = result.diagnostics.filter { $0.field.hasPrefix("metadata.labels.") }
        #expect(labels.map(\.field) == (0...9).map { "metadata.labels.a\($0)" })
        #expect(labels.allSatisfy { $0.code == .wrongType })
        #expect(labels.map(\.location.line) == Array(6...15))
    }

    @Test func tenMegabytesIsRefusedByTheSizeLimit() {
        let diagnostics = ManifestLoader.parse(Array(repeating: UInt8(ascii: "a"), count: 10 << 20), file: "fuzz.yaml")
            .diagnostics
        #expect(diagnostics.map(\.code) == [.tooLarge])
        #expect(diagnostics.map(\.location) == [VmpoolSpec.SourceLocation(file: "fuzz.yaml", line: 1, column: 1)])
    }

    @Test func invalidUTF8IsLocated() {
        let bytes = Array("apiVersion: vmpool/v1\nkind: \"".utf8) + [0xFF] + Array("\"\n".utf8)
        let diagnostics = ManifestLoader.parse(bytes, file: "fuzz.yaml").diagnostics
        #expect(diagnostics.first?.code == .notUTF8)
        #expect(diagnostics.first?.location.line == 2)
        #expect(diagnostics.first?.location.column == 8)
    }

    /// libyaml ends a stream with a line break of its own; an error at the end of a file that
    /// has none must still point into the file, not at the line after its last.
    @Test(arguments: ["a: [b", "apiVersion: vmpool/v1\nkind", "spec: {size: 1"])
    func syntaxErrorAtTheEndOfAFileWithoutAFinalNewlineIsInsideTheFile(_ text: String) {
        let bytes = Array(text.utf8)
        let diagnostics = ManifestLoader.parse(bytes, file: "fuzz.yaml").diagnostics
        #expect(diagnostics.map(\.code) == [.syntax])
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).count
        #expect(diagnostics.allSatisfy { $0.location.line <= lines }, "\(diagnostics.map(\.description))")
        #expect(InputCheck(bytes, file: "fuzz.yaml").problems(in: diagnostics) == [])
    }

    @Test func mutatorSeedsAreValidAndEveryFieldIsTargeted() {
        for seed in ManifestMutator.seeds {
            let result = ManifestLoader.parse(Array(seed.utf8), file: "seed.yaml")
            #expect(result.diagnostics.isEmpty, "\(result.diagnostics.map(\.description))")
        }
        let fields = Set(
            (ManifestMutator.seeds + Self.corpusSeeds()).flatMap { ManifestMutator.fieldSites(in: $0).map(\.field) })
        for field in [
            "apiVersion", "kind", "metadata.name", "metadata.labels", "metadata.labels.team", "spec.size", "spec.vcpus",
            "spec.memory", "spec.maxVcpus", "spec.maxMemory", "spec.boot", "spec.state", "spec.warm", "spec.placement",
            "spec.image", "spec.image.kernel", "spec.image.initrd", "spec.image.cmdline", "spec.disks[0].name",
            "spec.disks[1].image", "spec.disks[1].size", "spec.network.mode", "spec.network.ports[1]",
            "spec.network.bridge", "spec.network.subnet", "spec.network.egress", "spec.network.egress[1]",
            "spec.network.isolate", "spec.limits.cpu", "spec.limits.ioWeight", "spec.template.shareMemory",
        ] {
            #expect(fields.contains(field), "no targeted mutation reaches \(field)")
        }
    }

    static func corpusSeeds() -> [String] {
        Corpus.files("valid").compactMap { try? String(contentsOfFile: $0, encoding: .utf8) }
    }

    @Test func mutatedManifestsGetLocatedErrorsAtTheBrokenField() throws {
        let seeds = Self.corpusSeeds() + ManifestMutator.seeds
        #expect(seeds.count > ManifestMutator.seeds.count)
        var mutator = ManifestMutator(seed: 20_261_129)
        let memoryBefore = residentMiB()
        let started = ContinuousClock.now
        var accepted = 0
        var located = 0
        var unlocated: [String] = []
        var targets = 0
        var targeted = 0
        var missed: [String] = []
        var slowest: Duration = .zero
        for index in 0..<Self.count {
            let mutation = mutator.mutation(of: seeds[index % seeds.count])
            let one = threadCPUTime()
            let result = ManifestLoader.parse(mutation.bytes, file: "fuzz.yaml")
            slowest = max(slowest, threadCPUTime() - one)
            let input = InputCheck(mutation.bytes, file: "fuzz.yaml")
            if let target = mutation.target {
                targets += 1
                if result.diagnostics.contains(where: { input.names(target, $0) }) {
                    targeted += 1
                } else {
                    missed.append("mutation \(index), \(target): \(result.diagnostics.prefix(3).map(\.description))")
                }
            }
            if result.diagnostics.isEmpty {
                accepted += 1
                continue
            }
            let problems = input.problems(in: result.diagnostics)
            if problems.isEmpty {
                located += 1
            } else {
                unlocated.append("mutation \(index): \(problems)")
            }
        }
        let elapsed = ContinuousClock.now - started
        let growth = residentMiB() - memoryBefore
        let rejected = Self.count - accepted
        #expect(
            unlocated.count == 0,
            "\(unlocated.count) of \(rejected) rejected mutations have a diagnostic outside the input: \(unlocated.prefix(3))"
        )
        #expect(
            missed.count == 0,
            "\(missed.count) of \(targets) targeted mutations have no diagnostic at their field and line: \(missed.prefix(3))"
        )
        #expect(targets > Self.count / 8, "only \(targets) targeted mutations")
        #expect(slowest < .seconds(2), "slowest input took \(slowest) of CPU time")
        #expect(growth < 200, "resident memory grew \(growth) MiB")
        if accepted + located == Self.count, targeted == targets {
            print(
                "hostile input: \(Self.count) mutated manifests, \(accepted) accepted, \(located) located errors,"
                    + " \(targeted) targeted mutations reported at their field and line, in \(elapsed),"
                    + " slowest \(slowest) of CPU time, RSS growth \(growth) MiB")
        }
    }
}

/// Checks diagnostics of one input against the input's own lines.
struct InputCheck {
    let file: String
    /// Lengths of the input's lines in Unicode scalars (as libyaml counts columns), split at `\n`
    /// (a `\r` before it counts as part of the line).
    let lengths: [Int]
    /// The same, with the line breaks YAML 1.1 and libyaml know: `\n`, `\r\n`, `\r`, NEL, LS, PS.
    let yamlLengths: [Int]

    init(_ bytes: [UInt8], file: String) {
        self.file = file
        let text = String(decoding: bytes, as: UTF8.self)
        var lengths: [Int] = []
        var yamlLengths: [Int] = []
        var length = 0
        var yamlLength = 0
        var previous: Unicode.Scalar = " "
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\n":
                lengths.append(length)
                if previous != "\r" { yamlLengths.append(yamlLength) }
                length = 0
                yamlLength = 0
            case "\r", "\u{85}", "\u{2028}", "\u{2029}":
                length += 1
                yamlLengths.append(yamlLength)
                yamlLength = 0
            default:
                length += 1
                yamlLength += 1
            }
            previous = scalar
        }
        lengths.append(length)
        yamlLengths.append(yamlLength)
        self.lengths = lengths
        self.yamlLengths = yamlLengths
    }

    /// Whether `location` is a position inside the input: a line it has, a column at most one
    /// past that line's end, whichever way its lines are counted.
    func contains(_ location: VmpoolSpec.SourceLocation) -> Bool {
        func inside(_ lengths: [Int]) -> Bool {
            location.line >= 1 && location.line <= lengths.count && location.column >= 1
                && location.column <= lengths[location.line - 1] + 1
        }
        return location.file == file && (inside(lengths) || inside(yamlLengths))
    }

    /// What is wrong with `diagnostics` as errors of this input.
    func problems(in diagnostics: [Diagnostic]) -> [String] {
        diagnostics.compactMap { diagnostic in
            if !contains(diagnostic.location) {
                return "\(diagnostic) is outside the input (\(lengths.count) lines)"
            }
            if diagnostic.field.isEmpty || diagnostic.message.isEmpty {
                return "\(diagnostic) lacks a field or message"
            }
            return nil
        }
        .prefix(5).map { $0 }
    }

    /// Whether `diagnostic` reports `target`: at its field, a field inside it or the field it
    /// is part of, on the line of the replaced value.
    func names(_ target: ManifestMutator.Target, _ diagnostic: Diagnostic) -> Bool {
        let field = diagnostic.field
        let related =
            field == target.field || field.hasPrefix(target.field + ".") || field.hasPrefix(target.field + "[")
            || target.field.hasPrefix(field + ".") || target.field.hasPrefix(field + "[")
        return related && diagnostic.location.line == target.line && diagnostic.location.file == file
    }
}
