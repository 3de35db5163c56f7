import Yams

/// YAML 1.1 implicit typing of plain scalars, as Yams' default resolver does it, without
/// regular expressions.
///
/// Yams resolves tags with NSRegularExpression, which made tag resolution most of the cost
/// of loading a large manifest (and Yams hashes every mapping key to find duplicates, which
/// resolves its tag too). The loader therefore parses with Yams' rule-less resolver and
/// types plain scalars here, with the same rules in the same order: bool, int, float,
/// merge, null, timestamp, value, else str.
enum ScalarResolver {
    static func resolve(_ text: String) -> Tag.Name {
        let s = Array(text.utf8)
        if isBool(s) { return .bool }
        if isInt(s) { return .int }
        if isFloat(s) { return .float }
        if s == [0x3C, 0x3C] { return .merge }
        if isNull(s) { return .null }
        if isTimestamp(s) { return .timestamp }
        if s == [0x3D] { return .value }
        return .str
    }

    private static let bools: Set<String> = [
        "yes", "Yes", "YES", "no", "No", "NO", "true", "True", "TRUE", "false", "False", "FALSE", "on", "On", "ON",
        "off", "Off", "OFF",
    ]

    static func isBool(_ s: [UInt8]) -> Bool {
        s.count <= 5 && bools.contains(String(decoding: s, as: UTF8.self))
    }

    static func isNull(_ s: [UInt8]) -> Bool {
        s.isEmpty || s == [0x7E] || ["null", "Null", "NULL"].contains(String(decoding: s, as: UTF8.self))
    }

    private static func digit(_ b: UInt8) -> Bool { b >= 0x30 && b <= 0x39 }
    private static func hex(_ b: UInt8) -> Bool {
        digit(b) || (b >= 0x61 && b <= 0x66) || (b >= 0x41 && b <= 0x46)
    }

    /// A cursor over bytes for the little grammars below.
    private struct Cursor {
        let s: [UInt8]
        var i = 0
        var atEnd: Bool { i == s.count }
        var peek: UInt8? { i < s.count ? s[i] : nil }
        mutating func take(_ b: UInt8) -> Bool {
            if peek == b {
                i += 1
                return true
            }
            return false
        }
        mutating func sign() { if peek == 0x2B || peek == 0x2D { i += 1 } }
        /// One or more bytes satisfying `p`; returns how many.
        @discardableResult
        mutating func many(_ p: (UInt8) -> Bool) -> Int {
            let start = i
            while let b = peek, p(b) { i += 1 }
            return i - start
        }
        /// `(?::[0-5]?[0-9])+`
        mutating func sexagesimalTail() -> Bool {
            var groups = 0
            while take(0x3A) {
                guard let first = peek, digit(first) else { return false }
                i += 1
                if first <= 0x35, let second = peek, digit(second) { i += 1 }
                groups += 1
            }
            return groups > 0
        }
    }

    static func isInt(_ s: [UInt8]) -> Bool {
        let underscore: (UInt8) -> Bool = { $0 == 0x5F }
        // [-+]?0b[0-1_]+
        var c = Cursor(s: s)
        c.sign()
        if c.take(0x30), c.take(0x62) {
            return c.many { $0 == 0x30 || $0 == 0x31 || underscore($0) } > 0 && c.atEnd
        }
        // [-+]?0o?[0-7_]+
        c = Cursor(s: s)
        c.sign()
        if c.take(0x30) {
            _ = c.take(0x6F)
            if c.many({ ($0 >= 0x30 && $0 <= 0x37) || underscore($0) }) > 0 && c.atEnd { return true }
        }
        // [-+]?(?:0|[1-9][0-9_]*)
        c = Cursor(s: s)
        c.sign()
        if c.take(0x30) {
            if c.atEnd { return true }
        } else if let b = c.peek, b >= 0x31, b <= 0x39 {
            c.i += 1
            c.many { digit($0) || underscore($0) }
            if c.atEnd { return true }
        }
        // [-+]?0x[0-9a-fA-F_]+
        c = Cursor(s: s)
        c.sign()
        if c.take(0x30), c.take(0x78) {
            if c.many({ hex($0) || underscore($0) }) > 0 && c.atEnd { return true }
        }
        // [-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+
        c = Cursor(s: s)
        c.sign()
        if let b = c.peek, b >= 0x31, b <= 0x39 {
            c.i += 1
            c.many { digit($0) || underscore($0) }
            if c.sexagesimalTail() && c.atEnd { return true }
        }
        return false
    }

    static func isFloat(_ s: [UInt8]) -> Bool {
        let digitOrUnderscore: (UInt8) -> Bool = { digit($0) || $0 == 0x5F }
        func exponent(_ c: inout Cursor, signRequired: Bool) -> Bool {
            guard c.take(0x65) || c.take(0x45) else { return true }
            if !(c.take(0x2B) || c.take(0x2D)) && signRequired { return false }
            return c.many(digit) > 0
        }
        // [-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
        var c = Cursor(s: s)
        c.sign()
        if let b = c.peek, digit(b) {
            c.i += 1
            c.many(digitOrUnderscore)
            if c.take(0x2E) { c.many(digitOrUnderscore) }
            if exponent(&c, signRequired: false) && c.atEnd { return true }
        }
        // \.[0-9_]+(?:[eE][-+][0-9]+)?
        c = Cursor(s: s)
        if c.take(0x2E), c.many(digitOrUnderscore) > 0, exponent(&c, signRequired: true), c.atEnd { return true }
        // [-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        c = Cursor(s: s)
        c.sign()
        if let b = c.peek, digit(b) {
            c.i += 1
            c.many(digitOrUnderscore)
            if c.sexagesimalTail(), c.take(0x2E) {
                c.many(digitOrUnderscore)
                if c.atEnd { return true }
            }
        }
        // [-+]?\.(?:inf|Inf|INF) and \.(?:nan|NaN|NAN)
        let text = String(decoding: s, as: UTF8.self)
        let unsigned = text.hasPrefix("+") || text.hasPrefix("-") ? String(text.dropFirst()) : text
        if [".inf", ".Inf", ".INF"].contains(unsigned) { return true }
        return [".nan", ".NaN", ".NAN"].contains(text)
    }

    static func isTimestamp(_ s: [UInt8]) -> Bool {
        var c = Cursor(s: s)
        func digits(_ n: ClosedRange<Int>) -> Bool {
            let start = c.i
            while c.i - start < n.upperBound, let b = c.peek, digit(b) { c.i += 1 }
            return n.contains(c.i - start)
        }
        // yyyy-mm-dd
        guard digits(4...4), c.take(0x2D) else { return false }
        let afterYear = c.i
        if digits(2...2), c.take(0x2D), digits(2...2), c.atEnd { return true }
        // yyyy-m?m-d?d(?:[Tt]|[ \t]+)h?h:mm:ss(?:\.[0-9]*)?(?:[ \t]*(?:Z|[-+]h?h(?::mm)?))?
        c.i = afterYear
        guard digits(1...2), c.take(0x2D), digits(1...2) else { return false }
        if !(c.take(0x54) || c.take(0x74)) {
            guard c.many({ $0 == 0x20 || $0 == 0x09 }) > 0 else { return false }
        }
        guard digits(1...2), c.take(0x3A), digits(2...2), c.take(0x3A), digits(2...2) else { return false }
        if c.take(0x2E) { c.many(digit) }
        if c.atEnd { return true }
        c.many { $0 == 0x20 || $0 == 0x09 }
        if c.take(0x5A) { return c.atEnd }
        guard c.take(0x2B) || c.take(0x2D), digits(1...2) else { return false }
        if c.take(0x3A) { guard digits(2...2) else { return false } }
        return c.atEnd
    }
}
