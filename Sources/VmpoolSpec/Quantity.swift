/// Memory sizes as manifests write them: plain MiB integers, or `NMi` / `NGi` strings.
public enum MemoryQuantity {
    /// What a quantity looks like, for error messages.
    public static let expectation =
        "expected a memory size of at least 64Mi: an integer number of MiB (256), or a string like 256Mi or 1Gi"

    /// Parses the string form. `nil` when it is not `^(6[4-9]|[7-9]\d|[1-9]\d{2,6})Mi$` or `^[1-9]\d{0,3}Gi$`.
    public static func parse(_ text: String) -> Int? {
        let utf8 = Array(text.utf8)
        guard utf8.count >= 3, utf8[utf8.count - 1] == UInt8(ascii: "i") else { return nil }
        let unit = utf8[utf8.count - 2]
        let digits = utf8[0..<(utf8.count - 2)]
        guard !digits.isEmpty, digits.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), digits.first != 0x30 else {
            return nil
        }
        switch unit {
        case UInt8(ascii: "M"):
            guard digits.count <= 7, let value = Int(String(decoding: digits, as: UTF8.self)),
                value >= SpecLimits.minMemoryMiB
            else { return nil }
            return value
        case UInt8(ascii: "G"):
            guard digits.count <= 4, let value = Int(String(decoding: digits, as: UTF8.self)) else { return nil }
            return value * 1024
        default:
            return nil
        }
    }

    /// The shortest exact form of a MiB count, for display (`1Gi`, `384Mi`).
    public static func format(_ mib: Int) -> String {
        mib % 1024 == 0 ? "\(mib / 1024)Gi" : "\(mib)Mi"
    }
}
