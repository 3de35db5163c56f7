import Foundation
import Testing
import VmpoolSpec
import VmpoolTestSupport

/// Every input gets a located error or is accepted; nothing crashes, hangs or grows without bound.
@Suite("Hostile input")
struct HostileInputTests {
    /// 10,000 mutations by default; `VMPOOL_FUZZ_COUNT` runs more.
    static let count = Int(ProcessInfo.processInfo.environment["VMPOOL_FUZZ_COUNT"] ?? "") ?? 10_000

    func check(_ bytes: [UInt8], name: String) -> (accepted: Bool, diagnostics: [Diagnostic]) {
        let result = ManifestLoader.parse(bytes, file: "fuzz.yaml")
        if result.diagnostics.isEmpty { return (true, []) }
        for diagnostic in result.diagnostics {
            #expect(diagnostic.location.file == "fuzz.yaml", "\(name)")
            #expect(diagnostic.location.line >= 1 && diagnostic.location.column >= 1, "\(name): \(diagnostic)")
            #expect(!diagnostic.field.isEmpty && !diagnostic.message.isEmpty, "\(name)")
        }
        return (false, result.diagnostics)
    }

    @Test func classicAttacksGetLocatedErrorsQuickly() {
        for (name, bytes) in ManifestMutator.attacks() {
            let started = ContinuousClock.now
            let (accepted, diagnostics) = check(bytes, name: name)
            let elapsed = ContinuousClock.now - started
            #expect(elapsed < .seconds(5), "\(name) took \(elapsed)")
            if name.hasPrefix("alias bomb as") || name.hasPrefix("deep") || name == "10 MB file"
                || name.contains("UTF") || name == "duplicate keys"
            {
                #expect(!accepted, "\(name) was accepted")
            }
            _ = diagnostics
        }
    }

    @Test func tenMegabytesIsRefusedByTheSizeLimit() {
        let (_, diagnostics) = check(Array(repeating: UInt8(ascii: "a"), count: 10 << 20), name: "10 MB")
        #expect(diagnostics.map(\.code) == [.tooLarge])
    }

    @Test func invalidUTF8IsLocated() {
        let bytes = Array("apiVersion: vmpool/v1\nkind: \"".utf8) + [0xFF] + Array("\"\n".utf8)
        let (_, diagnostics) = check(bytes, name: "utf8")
        #expect(diagnostics.first?.code == .notUTF8)
        #expect(diagnostics.first?.location.line == 2)
        #expect(diagnostics.first?.location.column == 8)
    }

    @Test func mutatedManifestsNeverCrashOrHang() throws {
        let seeds = Corpus.files("valid").compactMap { try? String(contentsOfFile: $0, encoding: .utf8) }
        #expect(!seeds.isEmpty)
        var mutator = ManifestMutator(seed: 20261129)
        let memoryBefore = residentMiB()
        let started = ContinuousClock.now
        var accepted = 0
        var slowest: Duration = .zero
        for index in 0..<Self.count {
            let bytes = mutator.mutate(seeds[index % seeds.count])
            let one = ContinuousClock.now
            if check(bytes, name: "mutation \(index)").accepted { accepted += 1 }
            slowest = max(slowest, ContinuousClock.now - one)
        }
        let elapsed = ContinuousClock.now - started
        let growth = residentMiB() - memoryBefore
        #expect(slowest < .seconds(2), "slowest input took \(slowest)")
        #expect(growth < 200, "resident memory grew \(growth) MiB")
        print(
            "hostile input: \(Self.count) mutated manifests, \(accepted) accepted, \(Self.count - accepted) located"
                + " errors, 0 crashes, in \(elapsed), slowest \(slowest), RSS growth \(growth) MiB")
    }
}
