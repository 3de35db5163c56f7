import Foundation
import Testing
import VmpoolSpec

/// `spec.network.egress`, `spec.network.isolate`, `spec.limits` and `spec.template` (SPEC §10).
@Suite("Manifest walls")
struct WallsTests {
    /// A document whose `spec:` ends with `body` (lines indented by two), starting on line 9.
    static func document(_ body: String, boot: String? = nil) -> String {
        var text = "apiVersion: vmpool/v1\nkind: Pool\nmetadata:\n  name: web\nspec:\n  size: 2\n  vcpus: 1\n"
        text += "  memory: 256Mi\n"
        if let boot { text += "  boot: \(boot)\n" }
        return text + body
    }

    func parse(_ text: String) -> (pool: PoolSpec?, diagnostics: [Diagnostic]) {
        let result = ManifestLoader.parse(Array(text.utf8), file: "w.yaml")
        return (result.pools.first?.0, result.diagnostics)
    }

    /// The one diagnostic of `text`, as `line:col field code`.
    func failure(_ text: String) -> [String] {
        let (pool, diagnostics) = parse(text)
        #expect(pool == nil)
        return diagnostics.map { "\($0.location.line):\($0.location.column) \($0.field) \($0.code)" }
    }

    // MARK: - Egress

    @Test func egressDefaultsToAllAndIsolateToFalse() throws {
        let pool = try #require(parse(Self.document("  network:\n    mode: user\n")).pool)
        #expect(pool.network?.egress == .all)
        #expect(pool.network?.isolate == false)
        #expect(pool.walls == Walls(egress: .all, isolate: false, limits: ResourceLimits()))
    }

    @Test(arguments: [("all", EgressPolicy.all), ("none", .none)])
    func egressWords(_ word: String, _ policy: EgressPolicy) throws {
        let (pool, diagnostics) = parse(Self.document("  network:\n    egress: \(word)\n"))
        #expect(diagnostics.isEmpty, "\(diagnostics)")
        #expect(pool?.network?.egress == policy)
        #expect(pool?.walls.egress == policy)
    }

    @Test func egressRulesOfEveryFormParseToTheirCanonicalText() throws {
        let (pool, diagnostics) = parse(
            Self.document(
                """
                  network:
                    mode: bridge
                    subnet: 10.77.0.0/24
                    egress: [10.20.0.0/16, 192.0.2.7/32:443, "[2001:DB8:0::/32]:443", 2001:db8:1::/48, 0.0.0.0/0, "::/0"]
                    isolate: true

                """))
        #expect(diagnostics.isEmpty, "\(diagnostics)")
        let network = try #require(pool?.network)
        guard case .allow(let rules) = network.egress else {
            Issue.record("expected rules, got \(network.egress)")
            return
        }
        #expect(
            rules.map(\.description) == [
                "10.20.0.0/16", "192.0.2.7/32:443", "[2001:db8::/32]:443", "2001:db8:1::/48", "0.0.0.0/0", "::/0",
            ])
        #expect(rules[1].network.family == .ipv4)
        #expect(rules[1].network.address == [192, 0, 2, 7])
        #expect(rules[1].network.prefix == 32)
        #expect(rules[1].port == 443)
        #expect(rules[2].network.family == .ipv6)
        #expect(rules[2].network.address == [0x20, 0x01, 0x0d, 0xb8] + Array(repeating: 0, count: 12))
        #expect(rules[3].port == nil)
        #expect(network.isolate)
        #expect(pool?.walls.isolate == true)
        #expect(
            network.egress.description
                == "10.20.0.0/16, 192.0.2.7/32:443, [2001:db8::/32]:443, 2001:db8:1::/48, 0.0.0.0/0, ::/0")
    }

    @Test func sixtyFourRulesAreTheLimit() {
        let rules = (0..<64).map { "10.\($0).0.0/16" }
        let (pool, diagnostics) = parse(
            Self.document("  network:\n    egress: [\(rules.joined(separator: ", "))]\n"))
        #expect(diagnostics.isEmpty)
        #expect(pool?.network?.egress == .allow(rules.map { try! EgressRule.parse($0).get() }))
        let more = failure(
            Self.document("  network:\n    egress: [\((rules + ["10.99.0.0/16"]).joined(separator: ", "))]\n"))
        #expect(more == ["10:13 spec.network.egress outOfRange"])
    }

    /// Line 10 is `    egress: VALUE`, the value at column 13.
    @Test(arguments: [
        ("some", "10:13 spec.network.egress badValue"),
        ("All", "10:13 spec.network.egress badValue"),
        ("10.0.0.0/8", "10:13 spec.network.egress badValue"),
        ("no", "10:13 spec.network.egress wrongType"),
        ("~", "10:13 spec.network.egress wrongType"),
        ("{allow: 10.0.0.0/8}", "10:13 spec.network.egress wrongType"),
        ("[]", "10:13 spec.network.egress outOfRange"),
        ("[10.0.0.0/33]", "10:14 spec.network.egress[0] badFormat"),
        ("['2001:db8::/129']", "10:14 spec.network.egress[0] badFormat"),
        ("[10.0.0.0/8, 10.0.0.0/8:0]", "10:26 spec.network.egress[1] outOfRange"),
        ("[192.0.2.7/32:65536]", "10:14 spec.network.egress[0] outOfRange"),
        ("[192.0.2.7/32:0443]", "10:14 spec.network.egress[0] badFormat"),
        ("['2001:db8::/32:443']", "10:14 spec.network.egress[0] badFormat"),
        ("['[2001:db8::/32]']", "10:14 spec.network.egress[0] badFormat"),
        ("['[10.0.0.0/8]:443']", "10:14 spec.network.egress[0] badFormat"),
        ("[10.0.0.1]", "10:14 spec.network.egress[0] badFormat"),
        ("['2001::db8::/32']", "10:14 spec.network.egress[0] badFormat"),
        ("['::ffff:192.0.2.0/120']", "10:14 spec.network.egress[0] badFormat"),
        ("['fe80::1%eth0/128']", "10:14 spec.network.egress[0] badFormat"),
        ("[010.0.0.0/8]", "10:14 spec.network.egress[0] badFormat"),
        ("[10.0.0.0/08]", "10:14 spec.network.egress[0] badFormat"),
        ("[443]", "10:14 spec.network.egress[0] wrongType"),
        ("[[10.0.0.0/8]]", "10:14 spec.network.egress[0] wrongType"),
        ("[10.20.0.1/16]", "10:14 spec.network.egress[0] badValue"),
        ("['2001:db8::1/32']", "10:14 spec.network.egress[0] badValue"),
        ("[10.0.0.0/8, 10.0.0.0/8:443, 10.0.0.0/8]", "10:42 spec.network.egress[2] duplicateName"),
        ("['2001:db8::/32', '2001:DB8:0::/32']", "10:31 spec.network.egress[1] duplicateName"),
    ])
    func badEgressIsLocated(_ value: String, _ expected: String) {
        #expect(failure(Self.document("  network:\n    egress: \(value)\n")) == [expected])
    }

    @Test func hostBitsAreSaidAndTheNetworkSuggested() throws {
        let (_, diagnostics) = parse(
            Self.document("  network:\n    egress: [10.20.0.1/16, 192.0.2.7/24:443, '[2001:db8::1/64]:443']\n"))
        #expect(
            diagnostics.map(\.message) == [
                "10.20.0.1/16 has host bits set (bits past the prefix); did you mean 10.20.0.0/16?",
                "192.0.2.7/24:443 has host bits set (bits past the prefix); did you mean 192.0.2.0/24:443?",
                "[2001:db8::1/64]:443 has host bits set (bits past the prefix); did you mean [2001:db8::/64]:443?",
            ])
        #expect(diagnostics.map(\.field) == (0..<3).map { "spec.network.egress[\($0)]" })
    }

    @Test func theSubnetSaysHostBitsTheSameWay() throws {
        let (_, diagnostics) = parse(
            Self.document("  network:\n    mode: bridge\n    subnet: 10.77.0.1/24\n"))
        let diagnostic = try #require(diagnostics.first)
        #expect(diagnostics.count == 1)
        #expect(
            diagnostic.description
                == "w.yaml:11:13: spec.network.subnet: 10.77.0.1/24 has host bits set (bits past the prefix);"
                + " did you mean 10.77.0.0/24?")
        #expect(diagnostic.code == .badValue)
        // Other malformed subnets keep their message.
        let (_, others) = parse(Self.document("  network:\n    mode: bridge\n    subnet: 10.77.0.0/30\n"))
        #expect(others.map(\.code) == [.badFormat])
    }

    @Test func aSingleRuleOutsideAListGetsAHint() throws {
        let (_, diagnostics) = parse(Self.document("  network:\n    egress: 10.0.0.0/8\n"))
        #expect(diagnostics.first?.message.hasSuffix("write a single rule as a list: [10.0.0.0/8]") == true)
    }

    @Test func aDuplicateNamesTheFirstRule() throws {
        let (_, diagnostics) = parse(Self.document("  network:\n    egress:\n      - ::/0\n      - 0:0::/0\n"))
        let diagnostic = try #require(diagnostics.first)
        #expect(diagnostic.field == "spec.network.egress[1]")
        #expect(diagnostic.location.line == 12)
        #expect(diagnostic.message == "rule \"0:0::/0\" is already listed (as ::/0) at w.yaml:11:9")
    }

    @Test(arguments: ["egress: none", "isolate: true", "isolate: false"])
    func egressAndIsolateNeedANIC(_ line: String) {
        let key = line.prefix { $0 != ":" }
        // The value, after `    KEY: `.
        let column = 4 + key.count + 2 + 1
        #expect(
            failure(Self.document("  network:\n    mode: none\n    \(line)\n"))
                == ["11:\(column) spec.network.\(key) crossField"])
    }

    @Test func isolateIsAllowedInUserMode() throws {
        let (pool, diagnostics) = parse(Self.document("  network:\n    mode: user\n    isolate: yes\n"))
        #expect(diagnostics.isEmpty)
        #expect(pool?.network?.isolate == true)
    }

    @Test(arguments: [
        ("\"true\"", "wrongType"), ("1", "wrongType"), ("~", "wrongType"), ("[true]", "wrongType"),
    ])
    func isolateIsABoolean(_ value: String, _ code: String) {
        #expect(failure(Self.document("  network:\n    isolate: \(value)\n")) == ["10:14 spec.network.isolate \(code)"])
    }

    @Test func aPoolWithoutANICHasNoEgress() throws {
        let none = try #require(parse(Self.document("  network:\n    mode: none\n")).pool)
        #expect(none.walls.egress == .none)
        let absent = try #require(parse(Self.document("")).pool)
        #expect(absent.walls.egress == .none)
        #expect(absent.walls.isolate == false)
    }

    // MARK: - Limits

    @Test func limitsParse() throws {
        let (pool, diagnostics) = parse(Self.document("  limits:\n    cpu: 50%\n    ioWeight: 10\n"))
        #expect(diagnostics.isEmpty, "\(diagnostics)")
        #expect(pool?.limits == ResourceLimits(cpuPercent: 50, ioWeight: 10))
        #expect(pool?.walls.limits == ResourceLimits(cpuPercent: 50, ioWeight: 10))
        let bounds = try #require(parse(Self.document("  limits: {cpu: '100%', ioWeight: 10000}\n")).pool)
        #expect(bounds.limits == ResourceLimits(cpuPercent: 100, ioWeight: 10000))
        let low = try #require(parse(Self.document("  limits: {cpu: 1%, ioWeight: 1}\n")).pool)
        #expect(low.limits == ResourceLimits(cpuPercent: 1, ioWeight: 1))
        let empty = try #require(parse(Self.document("  limits: {}\n")).pool)
        #expect(empty.limits.isEmpty)
    }

    /// Line 10 is `    cpu: VALUE` or `    ioWeight: VALUE`.
    @Test(arguments: [
        ("cpu: 0%", "10:10 spec.limits.cpu outOfRange"),
        ("cpu: 101%", "10:10 spec.limits.cpu outOfRange"),
        ("cpu: 50", "10:10 spec.limits.cpu wrongType"),
        ("cpu: 050%", "10:10 spec.limits.cpu badFormat"),
        ("cpu: 50.5%", "10:10 spec.limits.cpu badFormat"),
        ("cpu: 50 %", "10:10 spec.limits.cpu badFormat"),
        ("cpu: '1.5'", "10:10 spec.limits.cpu badFormat"),
        ("cpu: ~", "10:10 spec.limits.cpu badFormat"),
        ("ioWeight: 0", "10:15 spec.limits.ioWeight outOfRange"),
        ("ioWeight: 10001", "10:15 spec.limits.ioWeight outOfRange"),
        ("ioWeight: '10'", "10:15 spec.limits.ioWeight wrongType"),
        ("ioWeight: 1.5", "10:15 spec.limits.ioWeight wrongType"),
        ("memory: 1Gi", "10:5 spec.limits.memory unknownField"),
    ])
    func badLimitsAreLocated(_ line: String, _ expected: String) {
        #expect(failure(Self.document("  limits:\n    \(line)\n")) == [expected])
    }

    @Test func aCPUShareWithoutPercentSaysHowToWriteIt() throws {
        let (_, diagnostics) = parse(Self.document("  limits:\n    cpu: 50\n"))
        #expect(diagnostics.first?.message.hasSuffix("got 50; write 50%") == true)
    }

    @Test(arguments: ["50%", "~", "[1]"])
    func limitsIsAMapping(_ value: String) {
        #expect(failure(Self.document("  limits: \(value)\n")) == ["9:11 spec.limits wrongType"])
    }

    // MARK: - Template

    @Test func shareMemoryDefaultsToTrue() throws {
        let plain = try #require(parse(Self.document("", boot: "template")).pool)
        #expect(plain.template.shareMemory)
        #expect(plain.sharesTemplateMemory)
        let empty = try #require(parse(Self.document("  template: {}\n", boot: "template")).pool)
        #expect(empty.template == TemplateSpec())
    }

    @Test func shareMemoryFalseIsRead() throws {
        let (pool, diagnostics) = parse(Self.document("  template:\n    shareMemory: false\n", boot: "template"))
        #expect(diagnostics.isEmpty, "\(diagnostics)")
        #expect(pool?.template.shareMemory == false)
        #expect(pool?.sharesTemplateMemory == false)
    }

    @Test(
        arguments: [
            (nil, "10:5 spec.template.shareMemory crossField"), ("cold", "11:5 spec.template.shareMemory crossField"),
        ] as [(String?, String)])
    func templateNeedsBootTemplate(_ boot: String?, _ expected: String) throws {
        #expect(failure(Self.document("  template:\n    shareMemory: false\n", boot: boot)) == [expected])
        let (_, diagnostics) = parse(Self.document("  template:\n    shareMemory: false\n", boot: boot))
        #expect(
            diagnostics.first?.message
                == "only with boot: template (boot is \(boot ?? "cold, the default"))")
    }

    @Test func anInvalidBootIsReportedAloneNotAsATemplateMismatch() {
        #expect(failure(Self.document("  template: {}\n", boot: "warm")) == ["9:9 spec.boot badValue"])
    }

    /// Line 11 is `    KEY: VALUE` under `  template:` (boot on line 9).
    @Test(arguments: [
        ("shareMemory: 'false'", "11:18 spec.template.shareMemory wrongType"),
        ("shareMemory: null", "11:18 spec.template.shareMemory wrongType"),
        ("shareMemory: 0", "11:18 spec.template.shareMemory wrongType"),
        ("setup: [true]", "11:13 spec.template.setup[0] wrongType"),
        ("sources: []", "11:5 spec.template.sources unknownField"),
    ])
    func badTemplateFieldsAreLocated(_ line: String, _ expected: String) {
        #expect(failure(Self.document("  template:\n    \(line)\n", boot: "template")) == [expected])
    }

    // MARK: - Parsing networks

    @Test(arguments: [
        ("10.0.0.0/8", "10.0.0.0/8"), ("0.0.0.0/0", "0.0.0.0/0"), ("255.255.255.255/32", "255.255.255.255/32"),
        ("::/0", "::/0"), ("::1/128", "::1/128"), ("2001:DB8:0:0:0:0:0:0/32", "2001:db8::/32"),
        ("2001:db8:0:0:1:0:0:1/128", "2001:db8::1:0:0:1/128"), ("2001:0:0:1:0:0:0:1/128", "2001:0:0:1::1/128"),
        ("1:0:2:3:4:5:6:7/128", "1:0:2:3:4:5:6:7/128"), ("fe80::/10", "fe80::/10"),
        ("1:2:3:4:5:6:7::/128", "1:2:3:4:5:6:7:0/128"), ("0fd0:0000::/16", "fd0::/16"),
    ])
    func networksParseToRFC5952Text(_ text: String, _ canonical: String) throws {
        let network = try IPNetwork.parse(text).get()
        #expect(network.description == canonical)
        #expect(try IPNetwork.parse(canonical).get() == network)
    }

    @Test(arguments: [
        "10.0.0.0", "10.0.0.0/", "/8", "10.0.0/8", "10.0.0.0.0/8", "256.0.0.0/8", "10.0.0.0/33", "10.0.0.0/-1",
        "10.0.0.0/08", " 10.0.0.0/8", "::/129", ":::/0", "1::2::/0", "1:2:3:4:5:6:7:8:9/128", "12345::/16",
        "g::/16", "::ffff:1.2.3.4/128", "fe80::%eth0/64", "1:2:3:4:5:6:7:8::/128", ":1::/16", "1::2:/16",
    ])
    func malformedNetworksAreRefused(_ text: String) {
        #expect(IPNetwork.parse(text) == .failure(.malformed))
    }

    @Test func hostBitsSuggestTheNetwork() throws {
        guard case .failure(.hostBitsSet(let network)) = IPNetwork.parse("2001:db8::ff/120") else {
            Issue.record("host bits not found")
            return
        }
        #expect(network.description == "2001:db8::/120")
        guard case .failure(.hostBitsSet(let v4)) = IPNetwork.parse("10.77.0.130/25") else {
            Issue.record("host bits not found")
            return
        }
        #expect(v4.description == "10.77.0.128/25")
        #expect(IPNetwork(family: .ipv4, address: [10, 0, 0, 1], prefix: 8) == nil)
        #expect(IPNetwork(family: .ipv6, address: [10, 0, 0, 0], prefix: 8) == nil)
    }

    @Test func bridgeSubnetsStillTakePrefixes8To29Only() {
        #expect(IPv4Subnet("10.0.0.0/8")?.description == "10.0.0.0/8")
        #expect(IPv4Subnet("10.77.0.0/29")?.prefix == 29)
        #expect(IPv4Subnet("10.77.0.0/30") == nil)
        #expect(IPv4Subnet("10.0.0.0/7") == nil)
        #expect(IPv4Subnet("2001:db8::/32") == nil)
        #expect(IPv4Subnet("10.77.0.1/24") == nil)
        #expect(
            IPv4Subnet.parse("10.77.0.1/24")
                == .failure(.hostBitsSet(network: try! IPNetwork.parse("10.77.0.0/24").get())))
        #expect(IPv4Subnet.parse("10.77.0.1/30") == .failure(.malformed))
    }

    // MARK: - Stored form

    @Test func rulesAndPoliciesRoundTripThroughJSONAsText() throws {
        let policy = EgressPolicy.allow([
            try EgressRule.parse("10.20.0.0/16").get(), try EgressRule.parse("[2001:DB8::/32]:443").get(),
        ])
        let json = String(decoding: try JSONEncoder().encode(policy), as: UTF8.self)
        #expect(json == #"["10.20.0.0\/16","[2001:db8::\/32]:443"]"#)
        #expect(try JSONDecoder().decode(EgressPolicy.self, from: Data(json.utf8)) == policy)
        for word in [EgressPolicy.all, .none] {
            let data = try JSONEncoder().encode(word)
            #expect(String(decoding: data, as: UTF8.self) == "\"\(word)\"")
            #expect(try JSONDecoder().decode(EgressPolicy.self, from: data) == word)
        }
        #expect(throws: DecodingError.self) {
            try JSONDecoder().decode(EgressPolicy.self, from: Data(#"["10.0.0.1/8"]"#.utf8))
        }
        #expect(throws: DecodingError.self) { try JSONDecoder().decode(EgressPolicy.self, from: Data(#""some""#.utf8)) }
    }

    @Test func specsStoredBeforeTheWallsReadAsTheDefaults() throws {
        let old = #"""
            {"boot":"template","disks":[],"labels":{},"maxMemoryMiB":256,"maxVcpus":1,"memoryMiB":256,"name":"web",
             "network":{"mode":"bridge","ports":[],"bridge":"vmpool0","subnet":"10.77.0.0/24"},"placement":"spread",
             "size":2,"state":"running","vcpus":1,"warm":0}
            """#
        let spec = try JSONDecoder().decode(PoolSpec.self, from: Data(old.utf8))
        #expect(spec.network?.egress == .all)
        #expect(spec.network?.isolate == false)
        #expect(spec.limits == ResourceLimits())
        #expect(spec.template == TemplateSpec())
        #expect(spec.sharesTemplateMemory)
    }

    @Test func defaultsAreNotStoredSoUnchangedSpecsStoreAsBefore() throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        var spec = PoolSpec(
            name: "web", size: 2, vcpus: 1, memoryMiB: 256, boot: .template,
            network: NetworkSpec(mode: .bridge, bridge: "vmpool0", subnet: "10.77.0.0/24"))
        let plain = String(decoding: try encoder.encode(spec), as: UTF8.self)
        #expect(
            plain
                == #"{"boot":"template","disks":[],"labels":{},"maxMemoryMiB":256,"maxVcpus":1,"memoryMiB":256,"#
                + #""name":"web","network":{"bridge":"vmpool0","mode":"bridge","ports":[],"subnet":"10.77.0.0\/24"},"#
                + #""placement":"spread","size":2,"state":"running","vcpus":1,"warm":0}"#)
        spec.network?.egress = .allow([try EgressRule.parse("192.0.2.7/32:443").get()])
        spec.network?.isolate = true
        spec.limits = ResourceLimits(cpuPercent: 50)
        spec.template.shareMemory = false
        let data = try encoder.encode(spec)
        let text = String(decoding: data, as: UTF8.self)
        #expect(text.contains(#""egress":["192.0.2.7\/32:443"]"#))
        #expect(text.contains(#""isolate":true"#))
        #expect(text.contains(#""limits":{"cpuPercent":50}"#))
        #expect(text.contains(#""template":{"shareMemory":false}"#))
        #expect(try JSONDecoder().decode(PoolSpec.self, from: data) == spec)
    }
}
