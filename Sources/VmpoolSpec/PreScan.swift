/// Cheap byte-level checks that run before the YAML parser sees a file.
///
/// libyaml and Yams are trusted with well-formed input of sane shape; these checks keep
/// hostile shapes away from them: oversized files, non-UTF-8 bytes, nesting deep enough to
/// exhaust the composer's recursion, and aliases used as mapping keys (hashing an
/// alias-expanded key is exponential in the alias depth: the "billion laughs" attack).
struct PreScan {
    /// A pool is about 130 bytes of YAML: 4 MiB holds a fleet of 30,000 pools in one file,
    /// and keeps the parsed tree of the largest accepted file around 100 MB.
    static let maxBytes = 4 << 20
    /// An over-estimate of nesting depth; real manifests stay under 10.
    static let maxDepth = 200
    /// Aliases are legitimate (shared labels) but hundreds of them are not.
    static let maxAliases = 1000

    let file: String

    /// Returns the decoded text, or the first problem found.
    func check(_ bytes: [UInt8]) -> Result<String, Diagnostic> {
        if bytes.count > Self.maxBytes {
            return .failure(
                Diagnostic(
                    .tooLarge, at: SourceLocation(file: file, line: 1, column: 1), field: "(file)",
                    "file is too large: manifests are limited to \(Self.maxBytes) bytes"))
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            let (line, column) = Self.firstInvalidUTF8(bytes)
            return .failure(
                Diagnostic(
                    .notUTF8, at: SourceLocation(file: file, line: line, column: column), field: "(file)",
                    "expected UTF-8 text, found an invalid byte sequence"))
        }
        if let problem = structure(bytes) {
            return .failure(problem)
        }
        return .success(text)
    }

    /// Line and column (in Unicode scalars, as libyaml counts) of the first invalid UTF-8 byte.
    static func firstInvalidUTF8(_ bytes: [UInt8]) -> (Int, Int) {
        var line = 1
        var column = 1
        var index = 0
        while index < bytes.count {
            let byte = bytes[index]
            let length: Int
            switch byte {
            case 0x00...0x7F: length = 1
            case 0xC2...0xDF: length = 2
            case 0xE0...0xEF: length = 3
            case 0xF0...0xF4: length = 4
            default: return (line, column)
            }
            if index + length > bytes.count { return (line, column) }
            let slice = Array(bytes[index..<index + length])
            if String(validating: slice, as: UTF8.self) == nil { return (line, column) }
            if byte == 0x0A {
                line += 1
                column = 1
            } else {
                column += 1
            }
            index += length
        }
        return (line, column)
    }

    /// Walks the bytes once, tracking quotes, comments and flow brackets, and reports
    /// excessive nesting, too many aliases, and aliases or collections used as keys.
    private func structure(_ bytes: [UInt8]) -> Diagnostic? {
        var line = 1
        var lineStart = 0
        var index = 0
        var flowDepth = 0
        var aliases = 0
        var atLineStart = true
        var indent = 0
        var chain = 0
        var previous: UInt8 = 0x20
        // Anchors defined so far in the current document: YAML scopes anchors to one document,
        // and an alias must not reach into another (the composer would share the node).
        var anchors = Set<[UInt8]>()

        func location(_ at: Int) -> SourceLocation {
            // Column in scalars: count the bytes of the line that are not UTF-8 continuation bytes.
            var column = 1
            var i = lineStart
            while i < at {
                if bytes[i] & 0xC0 != 0x80 { column += 1 }
                i += 1
            }
            return SourceLocation(file: file, line: line, column: column)
        }
        func isTokenStart(_ byte: UInt8) -> Bool {
            byte == 0x20 || byte == 0x09 || byte == 0x2C || byte == 0x5B || byte == 0x7B || byte == 0x3A
                || byte == 0x0A || byte == 0x2D
        }
        func isIndicator(_ at: Int) -> Bool {
            isTokenStart(previous) && at + 1 < bytes.count && (bytes[at + 1] == 0x20 || bytes[at + 1] == 0x0A)
        }
        func nextNonSpace(after at: Int) -> UInt8? {
            var i = at
            while i < bytes.count, bytes[i] == 0x20 || bytes[i] == 0x09 { i += 1 }
            return i < bytes.count ? bytes[i] : nil
        }
        // Whether an `&` or `*` at `at` starts a node: only spaces between it and the start of
        // the line or a `:`, `-`, `?`, `[`, `{` or `,` (elsewhere it is part of a plain scalar).
        func startsNode(_ at: Int) -> Bool {
            var i = at - 1
            while i >= lineStart, bytes[i] == 0x20 || bytes[i] == 0x09 { i -= 1 }
            if i < lineStart { return true }
            return [0x3A, 0x2D, 0x3F, 0x5B, 0x7B, 0x2C].contains(bytes[i])
        }
        func name(after at: Int) -> (name: [UInt8], end: Int) {
            var end = at + 1
            while end < bytes.count, !Self.endsAnchor(bytes[end]) { end += 1 }
            return (Array(bytes[(at + 1)..<end]), end)
        }
        func tooDeep(_ at: Int) -> Diagnostic {
            Diagnostic(
                .tooDeep, at: location(at), field: "(document)",
                "nesting is deeper than \(Self.maxDepth) levels; a pool manifest needs a handful")
        }

        while index < bytes.count {
            let byte = bytes[index]
            if atLineStart {
                if byte == 0x20 {
                    indent += 1
                    index += 1
                    continue
                }
                atLineStart = false
                chain = 0
                if indent == 0, index + 3 <= bytes.count,
                    bytes[index..<index + 3].elementsEqual("---".utf8)
                        || bytes[index..<index + 3].elementsEqual("...".utf8),
                    index + 3 == bytes.count || [0x20, 0x09, 0x0A, 0x0D].contains(bytes[index + 3])
                {
                    anchors.removeAll()
                }
            }
            switch byte {
            case 0x0A:
                line += 1
                lineStart = index + 1
                atLineStart = true
                indent = 0
            case 0x23 where previous == 0x20 || previous == 0x09 || index == lineStart:
                // A comment runs to the end of the line.
                while index + 1 < bytes.count, bytes[index + 1] != 0x0A { index += 1 }
            case 0x22 where isTokenStart(previous), 0x27 where isTokenStart(previous):
                // A quoted scalar; skip to its closing quote, which may be lines away.
                let quote = byte
                index += 1
                while index < bytes.count {
                    let c = bytes[index]
                    if c == 0x0A {
                        line += 1
                        lineStart = index + 1
                    } else if quote == 0x22, c == 0x5C {
                        index += 1
                    } else if c == quote {
                        if quote == 0x27, index + 1 < bytes.count, bytes[index + 1] == 0x27 {
                            index += 1
                        } else {
                            break
                        }
                    }
                    index += 1
                }
            case 0x5B where isTokenStart(previous), 0x7B where isTokenStart(previous):
                flowDepth += 1
                if flowDepth + indent + chain > Self.maxDepth { return tooDeep(index) }
            case 0x5D, 0x7D:
                if flowDepth > 0 {
                    flowDepth -= 1
                    if nextNonSpace(after: index + 1) == 0x3A {
                        return Diagnostic(
                            .badFormat, at: location(index), field: "(document)",
                            "collections cannot be mapping keys")
                    }
                }
            case 0x2D where isIndicator(index), 0x3F where isIndicator(index):
                if byte == 0x3F && flowDepth == 0 {
                    return Diagnostic(
                        .badFormat, at: location(index), field: "(document)",
                        "complex mapping keys ('? ') are not supported in manifests")
                }
                chain += 1
                if flowDepth + indent + chain > Self.maxDepth { return tooDeep(index) }
            case 0x26 where isTokenStart(previous) && startsNode(index):
                let (anchor, end) = name(after: index)
                anchors.insert(anchor)
                index = end - 1
            case 0x2A where isTokenStart(previous):
                aliases += 1
                if aliases > Self.maxAliases {
                    return Diagnostic(
                        .tooManyAliases, at: location(index), field: "(document)",
                        "more than \(Self.maxAliases) aliases; manifests need few, if any")
                }
                let (alias, end) = name(after: index)
                if startsNode(index), !anchors.contains(alias) {
                    return Diagnostic(
                        .syntax, at: location(index), field: "(document)",
                        "invalid YAML: alias *\(String(decoding: alias, as: UTF8.self)) has no anchor earlier in this document"
                            + " (YAML scopes anchors to one document)")
                }
                if nextNonSpace(after: end) == 0x3A {
                    return Diagnostic(
                        .badFormat, at: location(index), field: "(document)",
                        "aliases cannot be mapping keys")
                }
                index = end - 1
            default:
                break
            }
            if flowDepth + indent > Self.maxDepth { return tooDeep(index) }
            previous = index < bytes.count ? bytes[index] : 0x20
            index += 1
        }
        return nil
    }

    private static func endsAnchor(_ byte: UInt8) -> Bool {
        byte == 0x20 || byte == 0x09 || byte == 0x0A || byte == 0x0D || byte == 0x2C || byte == 0x5B
            || byte == 0x5D || byte == 0x7B || byte == 0x7D
    }
}
