import Testing
import Yams

@testable import VmpoolSpec

/// The hand-written YAML 1.1 typing must agree with Yams' regular-expression resolver.
@Suite("Scalar resolver")
struct ScalarResolverTests {
    static let tricky = [
        "", "~", "null", "Null", "NULL", "nULL", "yes", "Yes", "YES", "yEs", "no", "on", "Off", "y", "n", "true",
        "0", "00", "-0", "+0", "7", "-12", "1_000", "_1", "1__", "0b101", "0b", "-0b1_0", "017", "0o17", "0o", "09",
        "0x1F", "0xg", "0x", "1:30", "1:60", "1:5:59", "-1:30", "0:30", "1.0", "1.", ".5", ".5e+3", ".5e3", "1e3",
        "1E+3", "1.0e-3", "1.0e", "+.inf", "-.Inf", ".INF", ".nan", "-.nan", ".NaN", "1:30.5", "1:30.", "<<", "<", "=",
        "==", "2001-12-14", "2001-12-14t21:59:43.10-05:00", "2001-12-14 21:59:43.10 -5", "2001-1-2 3:04:05",
        "2001-12-14T21:59:43Z", "2001-12-14T21:59:43+01:00", "2001-12-1", "2001-12-14T", "256Mi", "1Gi", "vmpool/v1",
        "Pool", "cold", "template", "a b", "1 2", "-", "+", ".", "1_2.3_4", "0.", "-.5", "+1_0:0_0",
    ]

    func yams(_ text: String) -> String {
        Node.scalar(Node.Scalar(text, Tag(.implicit), .plain)).tag.rawValue
    }

    @Test(arguments: tricky)
    func agreesWithYams(_ text: String) {
        #expect(ScalarResolver.resolve(text).rawValue == yams(text), "\"\(text)\"")
    }

    @Test func agreesWithYamsOnGeneratedScalars() {
        let alphabet = Array("0123456789_:.+-eExXbBoOaAfF~<=TtZ ")
        var state: UInt64 = 42
        var disagreements: [String] = []
        for _ in 0..<20_000 {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            let length = Int(state >> 60) + 1
            var text = ""
            var s = state
            for _ in 0..<length {
                s = s &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
                text.append(alphabet[Int(s >> 33) % alphabet.count])
            }
            if ScalarResolver.resolve(text).rawValue != yams(text) { disagreements.append(text) }
        }
        #expect(disagreements.isEmpty, "\(disagreements.prefix(20))")
    }
}
