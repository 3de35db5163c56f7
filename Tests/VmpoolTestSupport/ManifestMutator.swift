import Foundation
import VmpoolSpec

/// Generates hostile and broken manifests from valid ones, reproducibly from a seed.
///
/// Mutations work on bytes and on YAML structure: flipped and inserted bytes, dropped,
/// duplicated and re-indented lines, injected YAML constructs (anchors, aliases, tags, flow
/// collections, document markers), duplicate keys, huge numbers and strings, invalid UTF-8.
/// Targeted mutations replace the value of one named field with a value that field cannot
/// take, so that a test knows which field and line the error must point at.
/// Classic attacks come on top: alias bombs, deep nesting, oversized files.
public struct ManifestMutator {
    private var state: UInt64

    public init(seed: UInt64) { state = seed &+ 0x9E37_79B9_7F4A_7C15 }

    public mutating func next() -> UInt64 {
        state = state &+ 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    public mutating func below(_ n: Int) -> Int { n <= 1 ? 0 : Int(next() % UInt64(n)) }

    static let fragments: [String] = [
        "&a ", "*a", "!!str ", "!!int ", "!!binary ", "!custom ", "[", "]", "{", "}", ", ", ": ", "- ", "? ", "---\n",
        "...\n", "#", "'", "\"", "|\n", ">-\n", "~", "null", "true", "yes", "0x1F", "0o17", "1e9", ".inf", "-.nan",
        "99999999999999999999999", "-1", "1_000", "1:30", "2001-12-14", "<<: *a\n", "\t", "\\u0000", "\u{FEFF}",
        "é", "😀", "\r\n", "  ", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "&b [*b]", "Gi", "Mi", "spec:", "size:",
    ]

    // MARK: - Mutations

    /// One mutated manifest, and the field it breaks when the mutation targets one.
    public struct Mutation: Sendable {
        public var bytes: [UInt8]
        public var target: Target?
    }

    /// The field a targeted mutation gave a value it cannot take.
    public struct Target: Sendable, Hashable, CustomStringConvertible {
        /// Dotted path as diagnostics name it: `spec.vcpus`, `metadata.labels.team`, `spec.disks[1].size`.
        public var field: String
        /// 1-based line of the replaced value.
        public var line: Int
        /// What the value was replaced with.
        public var value: String

        public var description: String { "\(field) = \(value) at line \(line)" }
    }

    /// A mutated variant of `seed`: one in four replaces a field's value (when `seed` has a field
    /// written on one line), the others are structural and byte mutations.
    public mutating func mutation(of seed: String) -> Mutation {
        if below(4) == 0, let targeted = mutateField(seed) { return targeted }
        return Mutation(bytes: mutate(seed), target: nil)
    }

    /// `seed` with the value of one of its fields replaced by a bad value for that field, or `nil`
    /// when no field of `seed` can be targeted.
    public mutating func mutateField(_ seed: String) -> Mutation? {
        let sites = Self.fieldSites(in: seed)
        guard !sites.isEmpty else { return nil }
        let site = sites[below(sites.count)]
        let choices = Self.badValues(for: site.field)
        let value = choices[below(choices.count)]
        var lines = seed.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        lines[site.lineIndex] = site.prefix + value + site.suffix
        return Mutation(
            bytes: Array(lines.joined(separator: "\n").utf8),
            target: Target(field: site.field, line: site.lineIndex + 1, value: value))
    }

    /// One structurally mutated variant of `seed`.
    public mutating func mutate(_ seed: String) -> [UInt8] {
        var lines = seed.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let rounds = 1 + below(4)
        for _ in 0..<rounds {
            guard !lines.isEmpty else {
                lines = [""]
                continue
            }
            let index = below(lines.count)
            switch below(10) {
            case 0: lines.remove(at: index)
            case 1: lines.insert(lines[index], at: index)
            case 2: lines[index] = String(repeating: " ", count: below(6)) + lines[index]
            case 3:
                var line = Array(lines[index])
                let at = line.isEmpty ? 0 : below(line.count + 1)
                line.insert(contentsOf: Self.fragments[below(Self.fragments.count)], at: min(at, line.count))
                lines[index] = String(line)
            case 4:
                if let colon = lines[index].firstIndex(of: ":") {
                    lines[index] = String(lines[index][...colon]) + " " + Self.fragments[below(Self.fragments.count)]
                }
            case 5: lines.swapAt(index, below(lines.count))
            case 6: lines[index] = String(lines[index].prefix(below(lines[index].count + 1)))
            case 7: lines.insert(String(repeating: "x", count: below(5000)) + ": 1", at: index)
            case 8: lines.insert(lines[index].trimmingCharacters(in: .whitespaces), at: index)
            default:
                lines[index] = lines[index].replacingOccurrences(of: ": ", with: ":")
            }
        }
        var bytes = Array(lines.joined(separator: "\n").utf8)
        if below(8) == 0, !bytes.isEmpty {
            for _ in 0..<(1 + below(3)) { bytes[below(bytes.count)] = UInt8(truncatingIfNeeded: next()) }
        }
        return bytes
    }

    /// Valid manifests with the parts the fixture corpus leaves out (disks, networks, block
    /// sequences in both indentations), so that targeted mutations reach every reader.
    public static let seeds: [String] = [
        """
        # Disks, forwarded ports and labels, sequences indented under their key.
        apiVersion: vmpool/v1
        kind: Pool
        metadata:
          name: build
          labels:
            team: ci
            tier: "2"
        spec:
          size: 2
          vcpus: 2
          memory: 1Gi
          placement: pack
          disks:
            - name: scratch
              size: 8Gi
            - name: base
              image: images/base.qcow2
              size: 2048
          network:
            mode: user
            ports:
              - 22
              - 8080
            egress:
              - 10.20.0.0/16
              - "[2001:db8::/32]:443"
            isolate: false
          limits:
            cpu: 50%
            ioWeight: 10
        ---
        apiVersion: vmpool/v1
        kind: Pool
        metadata:
          name: bridged
        spec:
          size: 1
          vcpus: 1
          memory: 256Mi
          warm: 1
          state: paused
          boot: template
          template:
            shareMemory: false
          network:
            mode: bridge
            bridge: br-vm
            subnet: 10.77.0.0/24
            egress: none
            isolate: true
          disks:
          - name: data
            size: 1Ti
          image: {kernel: /boot/vmlinuz, cmdline: console=ttyS0}
        """
    ]

    // MARK: - Targeted fields

    /// A field whose whole value is written on one line of a seed.
    public struct FieldSite: Sendable, Hashable {
        /// Dotted path as diagnostics name it.
        public var field: String
        /// 0-based index of the line in the seed.
        public var lineIndex: Int
        /// The line up to the value (`  vcpus: `).
        public var prefix: String
        /// What follows the value and stays (the `\r` of a CRLF line).
        public var suffix: String
    }

    /// The fields of `seed`'s block mappings and sequences whose value is complete on its own
    /// line: a scalar or a one-line flow collection, without anchors or aliases (replacing an
    /// anchored value would break its aliases rather than the field). Documents with merge keys
    /// give none, since an explicit key may override the replaced value.
    public static func fieldSites(in seed: String) -> [FieldSite] {
        if seed.contains("<<") { return [] }
        struct Frame {
            var indent: Int
            var path: String
            var isItem: Bool
        }
        let lines = seed.split(separator: "\n", omittingEmptySubsequences: false).map { line in
            line.hasSuffix("\r") ? (String(line.dropLast()), "\r") : (String(line), "")
        }
        func indentation(_ line: String) -> Int { line.prefix { $0 == " " }.count }
        func isContent(_ line: String) -> Bool {
            let trimmed = line.drop { $0 == " " }
            return !trimmed.isEmpty && !trimmed.hasPrefix("#")
        }
        /// Whether the next line with content is indented deeper than `indent`: the value
        /// continues there (a multi-line scalar, or children).
        func continues(after index: Int, deeperThan indent: Int) -> Bool {
            guard let next = lines[(index + 1)...].first(where: { isContent($0.0) }) else { return false }
            return indentation(next.0) > indent
        }

        var sites: [FieldSite] = []
        var frames: [Frame] = []
        var items: [String: Int] = [:]
        var openBrackets = 0
        for (index, (line, suffix)) in lines.enumerated() {
            guard isContent(line) else { continue }
            let indent = indentation(line)
            var rest = Substring(line).dropFirst(indent)
            if openBrackets > 0 {
                openBrackets += bracketBalance(rest)
                continue
            }
            if indent == 0, rest.hasPrefix("---") || rest.hasPrefix("...") {
                frames = []
                items = [:]
                continue
            }
            var keyIndent = indent
            if rest == "-" || rest.hasPrefix("- ") {
                // A sequence item: of the key above, or of the key at the same indentation
                // (`disks:` then `- name: data`, the compact form).
                while let top = frames.last, top.indent > indent || (top.indent == indent && top.isItem) {
                    frames.removeLast()
                }
                guard let sequence = frames.last?.path else { continue }
                let item = sequence + "[\(items[sequence, default: 0])]"
                items[sequence, default: 0] += 1
                frames.append(Frame(indent: indent, path: item, isItem: true))
                let afterDash = rest.dropFirst(1)
                let value = afterDash.drop { $0 == " " }
                keyIndent = indent + 1 + (afterDash.count - value.count)
                rest = value
                if splitKey(rest) == nil {
                    if let site = site(item, value: rest, line: line, index: index, suffix: suffix),
                        !continues(after: index, deeperThan: indent)
                    {
                        sites.append(site)
                    }
                    openBrackets = max(0, bracketBalance(rest))
                    continue
                }
            } else {
                while let top = frames.last, top.indent >= indent { frames.removeLast() }
            }
            guard let (key, value) = splitKey(rest) else {
                openBrackets = max(0, bracketBalance(rest))
                continue
            }
            let parent = frames.last?.path ?? ""
            let path = parent.isEmpty ? key : parent + "." + key
            frames.append(Frame(indent: keyIndent, path: path, isItem: false))
            if value.isEmpty { continue }
            if let site = site(path, value: value, line: line, index: index, suffix: suffix),
                !continues(after: index, deeperThan: keyIndent)
            {
                sites.append(site)
            }
            openBrackets = max(0, bracketBalance(value))
        }
        return sites
    }

    /// `key: value` at the start of `text`, with the key unquoted; `nil` when `text` is not a
    /// plain or simply quoted key followed by `:`.
    private static func splitKey(_ text: Substring) -> (String, Substring)? {
        let key: Substring
        var afterKey: Substring
        if let quote = text.first, quote == "\"" || quote == "'" {
            let body = text.dropFirst()
            guard let close = body.firstIndex(of: quote) else { return nil }
            key = body[..<close]
            if key.contains("\\") { return nil }
            afterKey = body[body.index(after: close)...]
        } else {
            guard let colon = text.firstIndex(of: ":") else { return nil }
            key = text[..<colon]
            let keyCharacters = key.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "._/-".contains($0)) }
            guard !key.isEmpty, keyCharacters else { return nil }
            afterKey = text[colon...]
        }
        guard afterKey.first == ":" else { return nil }
        afterKey = afterKey.dropFirst()
        guard afterKey.isEmpty || afterKey.first == " " else { return nil }
        return (String(key), afterKey.drop { $0 == " " })
    }

    /// A site for `value` on `line` when the value is whole and free of anchors and aliases.
    private static func site(_ field: String, value: Substring, line: String, index: Int, suffix: String) -> FieldSite?
    {
        guard let first = value.first, !"&*|>".contains(first), !value.contains("&"), !value.contains("*") else {
            return nil
        }
        if first == "\"" || first == "'" {
            guard value.count >= 2, value.last == first else { return nil }
        }
        if first == "[" || first == "{" {
            guard bracketBalance(value) == 0, !value.contains("\""), !value.contains("'") else { return nil }
        }
        return FieldSite(field: field, lineIndex: index, prefix: String(line[..<value.startIndex]), suffix: suffix)
    }

    /// Flow brackets opened minus closed outside quotes.
    private static func bracketBalance(_ text: Substring) -> Int {
        var balance = 0
        var quote: Character?
        for character in text {
            if let open = quote {
                if character == open { quote = nil }
                continue
            }
            switch character {
            case "\"", "'": quote = character
            case "[", "{": balance += 1
            case "]", "}": balance -= 1
            case "#": return balance
            default: break
            }
        }
        return balance
    }

    /// Values `field` cannot take whatever the rest of the document says, each reported at the
    /// value itself (or at a key inside it, on the same line).
    public static func badValues(for field: String) -> [String] {
        let scalar = ["~", "[1, 2]", "{bogus: 1}"]
        let memory = ["63", "12Ki", "1.5Gi", "10000Gi", "0x3F", "lots", "-1Gi"]
        switch field {
        case "apiVersion": return ["vmpool/v2", "v1", "1", "!!binary dm1wb29sL3Yx"] + scalar
        case "kind": return ["Pools", "pool", "Deployment", "\"\""] + scalar
        case "metadata.name":
            return ["Bad_Name", "-web", "web-", "a.b", String(repeating: "a", count: 64), "''", "true", "12"] + scalar
        case "spec.size": return ["-1", "1001", "three", "1.5", "0x10000", "1e3", ".inf"] + scalar
        case "spec.vcpus", "spec.maxVcpus": return ["0", "65", "two", "1.5", "true", "0b1000001", "-.nan"] + scalar
        case "spec.memory", "spec.maxMemory": return memory + scalar
        case "spec.warm": return ["-1", "1001", "some", "1_001"] + scalar
        case "spec.boot": return ["warm", "Cold", "yes", "0"] + scalar
        case "spec.state": return ["stopped", "Paused", "on"] + scalar
        case "spec.placement": return ["random", "Spread"] + scalar
        case "spec.image.kernel", "spec.image.initrd": return ["''", "\"a\\u0001b\"", "42"] + scalar
        case "spec.image.cmdline":
            return ["\"console=ttyS0\\tquiet\"", String(repeating: "c", count: 2049), "1.0"] + scalar
        case "spec.network.mode": return ["wifi", "User", "null"] + scalar
        case "spec.network.bridge": return ["bridge-name-too-long", "'br 0'", "0"] + scalar
        case "spec.network.subnet": return ["10.77.0.1/24", "10.77.0.0/30", "10.77.0.0", "nope"] + scalar
        case "spec.network.ports": return ["[0]", "[http]", "[22, 22]"] + ["~", "{bogus: 1}"]
        case "spec.network.egress": return ["some", "[]", "10.0.0.0/8", "[10.0.0.0/33]", "[443]", "~", "{bogus: 1}"]
        case "spec.network.isolate": return ["maybe", "1", "'true'"] + scalar
        case "spec.limits": return ["50%", "{cpu: 0%}", "{ioWeight: 0}", "{bogus: 1}", "~"]
        case "spec.limits.cpu": return ["0%", "101%", "50", "half", "050%"] + scalar
        case "spec.limits.ioWeight": return ["0", "10001", "'10'", "1.5"] + scalar
        case "spec.template.shareMemory": return ["maybe", "0", "'no'"] + scalar
        case "spec.disks": return ["[scratch]", "[{name: Bad}]"] + ["~", "{bogus: 1}"]
        default: break
        }
        if field.hasPrefix("metadata.labels.") {
            return ["123", "true", "\"bell\\a\"", String(repeating: "v", count: 257)] + scalar
        }
        if field.hasPrefix("spec.network.ports[") { return ["0", "65536", "http"] + scalar }
        if field.hasPrefix("spec.network.egress[") {
            return ["10.0.0.1/8", "10.0.0.0/8:0", "'2001:db8::/32:443'", "example.com/32"] + scalar
        }
        if field.hasPrefix("spec.disks["), field.hasSuffix(".name") {
            return ["Bad_Name", "''", String(repeating: "d", count: 33)] + scalar
        }
        if field.hasPrefix("spec.disks["), field.hasSuffix(".size") {
            return ["0", "65Ti", "big", "1.5Gi", "-1"] + scalar
        }
        if field.hasPrefix("spec.disks["), field.hasSuffix(".image") { return ["''"] + scalar }
        // A mapping written in flow style (`labels: {team: a}`) or an unknown leaf.
        return scalar
    }

    // MARK: - Classic attacks

    /// What the loader must make of an attack.
    public enum Verdict: Sendable, Equatable, CustomStringConvertible {
        /// Refused, with at least one diagnostic of this code.
        case mustReject(Diagnostic.Code)
        /// Accepted without a diagnostic, with this many pools.
        case validManifest(pools: Int)

        public var description: String {
            switch self {
            case .mustReject(let code): "rejected (\(code))"
            case .validManifest(let pools): "a valid manifest of \(pools) pools"
            }
        }
    }

    /// A classic attack as a whole file.
    public struct Attack: Sendable {
        public var name: String
        public var bytes: [UInt8]
        public var verdict: Verdict
    }

    /// Nine levels of aliases, each a sequence of nine aliases of the level below: 9^9 `x`
    /// once expanded. `indent` goes before every line.
    static func aliasBomb(indent: String = "") -> String {
        var bomb = indent + "a0: &a0 [x, x, x, x, x, x, x, x, x]\n"
        for level in 1...9 {
            bomb +=
                indent + "a\(level): &a\(level) ["
                + Array(repeating: "*a\(level - 1)", count: 9).joined(separator: ", ") + "]\n"
        }
        return bomb
    }

    /// Labels merged from a chain of `depth` mappings, each merging the one below `width`
    /// times: width^depth merges to walk if nothing is remembered, a few dozen nodes if it is.
    static func mergeFanOut(width: Int, depth: Int) -> String {
        var chain = "&m0 {team: infra}"
        for level in 1...depth {
            chain +=
                ", &m\(level) {<<: [" + Array(repeating: "*m\(level - 1)", count: width).joined(separator: ", ") + "]}"
        }
        return "apiVersion: vmpool/v1\nkind: Pool\nmetadata:\n  name: merged\n  labels:\n    <<: [\(chain)]\n"
            + "spec: {size: 1, vcpus: 1, memory: 64}\n"
    }

    static func pool(_ name: String) -> String {
        "apiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: \(name)}\nspec: {size: 1, vcpus: 1, memory: 64}\n"
    }

    /// The classic attacks, each as a whole file, with what the loader must make of it.
    public static func attacks() -> [Attack] {
        var result: [Attack] = []
        func add(_ name: String, _ bytes: [UInt8], _ verdict: Verdict) {
            result.append(Attack(name: name, bytes: bytes, verdict: verdict))
        }
        func add(_ name: String, _ text: String, _ verdict: Verdict) { add(name, Array(text.utf8), verdict) }

        add(
            "alias bomb at top level",
            "apiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: bomb}\n" + aliasBomb()
                + "spec: {size: 1, vcpus: 1, memory: 64}\n",
            .mustReject(.unknownField))
        add(
            "alias bomb in labels",
            "apiVersion: vmpool/v1\nkind: Pool\nmetadata:\n  name: bomb\n  labels:\n" + aliasBomb(indent: "    ")
                + "spec: {size: 1, vcpus: 1, memory: 64}\n",
            .mustReject(.wrongType))
        add("alias bomb as a key", aliasBomb() + "? *a9\n: 1\n", .mustReject(.badFormat))
        add("alias bomb as a flow key", aliasBomb() + "{*a9 : 1}\n", .mustReject(.badFormat))
        // A kilobyte that merges a million fields: refused by the merge budget, at once.
        add("merge fan-out in labels", mergeFanOut(width: 10, depth: 6), .mustReject(.tooManyAliases))
        add("deep flow nesting", String(repeating: "[", count: 100_000), .mustReject(.tooDeep))
        add("deep block nesting", Array(String(repeating: "- ", count: 50_000).utf8) + [0x78], .mustReject(.tooDeep))
        add(
            "deep indentation",
            (0..<1000).map { String(repeating: " ", count: $0) + "k\($0):" }.joined(separator: "\n"),
            .mustReject(.tooDeep))
        add("10 MB file", Array(repeating: UInt8(ascii: "a"), count: 10 << 20), .mustReject(.tooLarge))
        add(
            "just under the size limit", "#" + String(repeating: "x", count: (4 << 20) - 10) + "\n",
            .validManifest(pools: 0))
        add(
            "invalid UTF-8",
            Array("apiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: \"".utf8) + [0xC3, 0x28, 0xFF]
                + Array("\"}\n".utf8),
            .mustReject(.notUTF8))
        add("overlong UTF-8", [0xC0, 0xAF, 0x0A], .mustReject(.notUTF8))
        add("UTF-16 bytes", [0xFF, 0xFE, 0x61, 0x00, 0x3A, 0x00], .mustReject(.notUTF8))
        add("NUL bytes", Array("apiVersion: vmpool/v1\n".utf8) + [0, 0, 0], .mustReject(.syntax))
        add("duplicate keys", "apiVersion: vmpool/v1\napiVersion: vmpool/v1\nkind: Pool\n", .mustReject(.syntax))
        add("many empty documents", String(repeating: "---\n{}\n", count: 50_000), .mustReject(.missingField))
        add(
            "many valid documents", (0..<5_000).map { "---\n" + pool("p\($0)") }.joined(),
            .validManifest(pools: 5_000))
        add(
            "many aliases", "a: &a 1\nb: [" + Array(repeating: "*a", count: 5000).joined(separator: ",") + "]\n",
            .mustReject(.tooManyAliases))
        add("long scalar", "apiVersion: " + String(repeating: "v", count: 900_000) + "\n", .mustReject(.badValue))
        add(
            "huge integer",
            "apiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: n}\n"
                + "spec: {size: 1e400, vcpus: 99999999999999999999999999, memory: 9223372036854775808}\n",
            .mustReject(.wrongType))
        add("merge cycle", "a: &a {<<: *a}\n", .mustReject(.syntax))
        add(
            "self-referencing merge chain",
            "x0: &x0 {size: 1}\n"
                + (1...40).map { "x\($0): &x\($0) {<<: [*x\($0 - 1), *x\($0 - 1)]}" }.joined(separator: "\n")
                + "\napiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: m}\nspec: {<<: *x40, vcpus: 1, memory: 64}\n",
            .mustReject(.tooDeep))
        return result
    }
}

/// Resident memory of this process, from /proc/self/statm.
public func residentMiB() -> Int {
    guard let text = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return 0 }
    let pages = Int(text.split(separator: " ").dropFirst().first ?? "0") ?? 0
    return pages * Int(sysconf(Int32(_SC_PAGESIZE))) >> 20
}

/// CPU time the calling thread has used: what synchronous work costs, however busy the
/// machine is with other processes.
public func threadCPUTime() -> Duration {
    var now = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now)
    return .seconds(now.tv_sec) + .nanoseconds(now.tv_nsec)
}
