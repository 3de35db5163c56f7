/// Text that came from a manifest, a client or a guest (a lease holder, an event, an error
/// with a guest's stderr in it), made safe to show on a terminal: a control character could
/// otherwise move the cursor, recolour or retitle the terminal, or forge lines of output.
///
/// Every character that is not printable (C0 controls but newline and tab, DEL, C1 controls)
/// and every Unicode control that reorders text (bidi embeddings, overrides and isolates, line
/// and paragraph separators) becomes a visible `\uXXXX`. The same escape is valid inside a
/// JSON string, so JSON documents keep their meaning.
public enum TerminalText {
    public static func isUnsafe(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar.value {
        case 0x00...0x08, 0x0B...0x1F, 0x7F...0x9F: true
        case 0x200E, 0x200F, 0x2028, 0x2029, 0x202A...0x202E, 0x2066...0x2069: true
        default: false
        }
    }

    /// `text` with unsafe characters escaped; newline and tab kept unless `singleLine`.
    public static func safe(_ text: String, singleLine: Bool = false) -> String {
        guard text.unicodeScalars.contains(where: { isUnsafe($0) || (singleLine && ($0 == "\n" || $0 == "\t")) })
        else { return text }
        var result = String.UnicodeScalarView()
        for scalar in text.unicodeScalars {
            if isUnsafe(scalar) || (singleLine && (scalar == "\n" || scalar == "\t")) {
                let hex = String(scalar.value, radix: 16)
                result.append(contentsOf: ("\\u" + String(repeating: "0", count: 4 - hex.count) + hex).unicodeScalars)
            } else {
                result.append(scalar)
            }
        }
        return String(result)
    }

    /// A guest's console output for a terminal: colour changes (`ESC [ digits ; m`) pass, as
    /// `less -R` lets them; every other escape sequence and control byte but newline, carriage
    /// return and tab is shown escaped. Bytes that are not UTF-8 pass as they are (no terminal
    /// acts on a lone byte above 0x7F in UTF-8 mode but C1, which is escaped when well formed).
    public static func safeConsole(_ bytes: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count)
        var index = 0
        func escaped(_ value: UInt32) -> [UInt8] {
            let hex = String(value, radix: 16)
            return Array(("\\u" + String(repeating: "0", count: max(0, 4 - hex.count)) + hex).utf8)
        }
        while index < bytes.count {
            let byte = bytes[index]
            if byte == 0x1B, index + 1 < bytes.count, bytes[index + 1] == UInt8(ascii: "[") {
                var end = index + 2
                while end < bytes.count, (0x30...0x39).contains(bytes[end]) || bytes[end] == UInt8(ascii: ";") {
                    end += 1
                }
                if end < bytes.count, bytes[end] == UInt8(ascii: "m") {
                    out += bytes[index...end]
                    index = end + 1
                    continue
                }
            }
            if byte < 0x20 && byte != 0x0A && byte != 0x0D && byte != 0x09 || byte == 0x7F {
                out += escaped(UInt32(byte))
                index += 1
                continue
            }
            // C1 controls in UTF-8 are C2 80...C2 9F; the bidi controls are E2 80 8E/8F/A8...AE and E2 81 A6...A9.
            if byte == 0xC2, index + 1 < bytes.count, (0x80...0x9F).contains(bytes[index + 1]) {
                out += escaped(UInt32(bytes[index + 1]))
                index += 2
                continue
            }
            if byte == 0xE2, index + 2 < bytes.count {
                let value = (UInt32(bytes[index + 1] & 0x3F) << 6 | UInt32(bytes[index + 2] & 0x3F)) | 0x2000
                if bytes[index + 1] & 0xC0 == 0x80, bytes[index + 2] & 0xC0 == 0x80, let scalar = Unicode.Scalar(value),
                    isUnsafe(scalar)
                {
                    out += escaped(value)
                    index += 3
                    continue
                }
            }
            out.append(byte)
            index += 1
        }
        return out
    }
}
