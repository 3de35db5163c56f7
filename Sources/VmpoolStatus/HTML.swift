/// Text made safe for HTML. Everything on the status page that a manifest, a client or a
/// guest wrote (pool names, lease holders, errors, event messages) goes through `escape`.
public enum HTML {
    /// Escapes `text` for element content and for quoted attribute values: the five markup
    /// characters become entities, and characters that are not text (C0 and C1 controls,
    /// DEL, bidirectional overrides and other invisible format characters) are shown as
    /// `\u{…}` so that a holder cannot hide or reorder what the page says.
    public static func escape(_ text: String) -> String {
        var result = ""
        result.reserveCapacity(text.utf8.count)
        for scalar in text.unicodeScalars {
            switch scalar {
            case "&": result += "&amp;"
            case "<": result += "&lt;"
            case ">": result += "&gt;"
            case "\"": result += "&quot;"
            case "'": result += "&#39;"
            default:
                if isInvisible(scalar) {
                    result += "\\u{" + String(scalar.value, radix: 16, uppercase: true) + "}"
                } else {
                    result.unicodeScalars.append(scalar)
                }
            }
        }
        return result
    }

    /// Controls (a tab and a newline included: names and messages on the page are one line)
    /// and format characters such as U+202E RIGHT-TO-LEFT OVERRIDE and U+200B ZERO WIDTH SPACE.
    static func isInvisible(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar.properties.generalCategory {
        case .control, .format, .lineSeparator, .paragraphSeparator, .privateUse, .surrogate, .unassigned:
            return true
        default:
            return false
        }
    }

    /// `text` escaped for a URL's query value (percent-encoding every byte outside the
    /// unreserved set), then for an attribute.
    public static func queryValue(_ text: String) -> String {
        var result = ""
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"),
                UInt8(ascii: "~"):
                result.unicodeScalars.append(Unicode.Scalar(byte))
            default:
                let hex = String(byte, radix: 16, uppercase: true)
                result += "%" + (hex.count == 1 ? "0" + hex : hex)
            }
        }
        return result
    }
}
