import Foundation

/// Generates hostile and broken manifests from valid ones, reproducibly from a seed.
///
/// Mutations work on bytes and on YAML structure: flipped and inserted bytes, dropped,
/// duplicated and re-indented lines, injected YAML constructs (anchors, aliases, tags, flow
/// collections, document markers), duplicate keys, huge numbers and strings, invalid UTF-8.
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

    /// One mutated variant of `seed`.
    public mutating func mutate(_ seed: String) -> [UInt8] {
        var lines = seed.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let rounds = 1 + below(4)
        for _ in 0..<rounds {
            guard !lines.isEmpty else { lines = [""]; continue }
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

    /// The classic attacks, each as a whole file.
    public static func attacks() -> [(String, [UInt8])] {
        var result: [(String, [UInt8])] = []
        var bomb = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n"
        for level in 1...9 {
            bomb += "a\(level): &a\(level) [" + Array(repeating: "*a\(level - 1)", count: 9).joined(separator: ", ") + "]\n"
        }
        let header = "apiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: bomb}\n"
        result.append(("alias bomb at top level", Array((header + bomb + "spec: {size: 1, vcpus: 1, memory: 64}\n").utf8)))
        result.append((
            "alias bomb in labels",
            Array(("bombs:\n" + bomb.split(separator: "\n").map { "  " + $0 }.joined(separator: "\n")).utf8)
                + Array("\n".utf8)
        ))
        result.append((
            "alias bomb as a key",
            Array((bomb + "? *a9\n: 1\n").utf8)
        ))
        result.append(("alias bomb as a flow key", Array((bomb + "{*a9 : 1}\n").utf8)))
        result.append(("deep flow nesting", Array((String(repeating: "[", count: 100_000)).utf8)))
        result.append(("deep block nesting", Array(String(repeating: "- ", count: 50_000).utf8) + [0x78]))
        result.append((
            "deep indentation",
            Array((0..<3000).map { String(repeating: " ", count: $0) + "k\($0):" }.joined(separator: "\n").utf8)
        ))
        result.append(("10 MB file", Array(repeating: UInt8(ascii: "a"), count: 10 << 20)))
        result.append(("just under the size limit", Array(("#" + String(repeating: "x", count: (4 << 20) - 10) + "\n").utf8)))
        result.append(("invalid UTF-8", Array("apiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: \"".utf8) + [0xC3, 0x28, 0xFF] + Array("\"}\n".utf8)))
        result.append(("overlong UTF-8", [0xC0, 0xAF, 0x0A]))
        result.append(("UTF-16 bytes", [0xFF, 0xFE, 0x61, 0x00, 0x3A, 0x00]))
        result.append(("NUL bytes", Array("apiVersion: vmpool/v1\n".utf8) + [0, 0, 0]))
        result.append(("duplicate keys", Array("apiVersion: vmpool/v1\napiVersion: vmpool/v1\nkind: Pool\n".utf8)))
        result.append(("many documents", Array(String(repeating: "---\n{}\n", count: 50_000).utf8)))
        result.append(("many aliases", Array(("a: &a 1\nb: [" + Array(repeating: "*a", count: 5000).joined(separator: ",") + "]\n").utf8)))
        result.append(("long scalar", Array(("apiVersion: " + String(repeating: "v", count: 900_000) + "\n").utf8)))
        result.append(("huge integer", Array("apiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: n}\nspec: {size: 1e400, vcpus: 99999999999999999999999999, memory: 9223372036854775808}\n".utf8)))
        result.append(("merge cycle", Array("a: &a {<<: *a}\n".utf8)))
        result.append(("self-referencing merge chain", Array(("x0: &x0 {size: 1}\n" + (1...40).map { "x\($0): &x\($0) {<<: [*x\($0 - 1), *x\($0 - 1)]}" }.joined(separator: "\n") + "\napiVersion: vmpool/v1\nkind: Pool\nmetadata: {name: m}\nspec: {<<: *x40, vcpus: 1, memory: 64}\n").utf8)))
        return result
    }
}

/// Resident memory of this process, from /proc/self/statm.
public func residentMiB() -> Int {
    guard let text = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return 0 }
    let pages = Int(text.split(separator: " ").dropFirst().first ?? "0") ?? 0
    return pages * Int(sysconf(Int32(_SC_PAGESIZE))) >> 20
}
