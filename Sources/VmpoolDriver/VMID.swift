/// The one place that makes and reads the ids of VMs, standbys and templates.
///
/// A VM or standby id is `<pool>-<6 hex digits>`; a template id is `<pool>-t<6 hex digits>`.
/// Pool names never hold anything after their last dash that these suffixes could be
/// confused with, so the pool of any id is everything before its last dash.
public enum VMID {
    /// A fresh VM or standby id for `pool`.
    public static func vm(pool: String) -> String { pool + "-" + hex6() }

    /// A fresh template id for `pool`.
    public static func template(pool: String) -> String { pool + "-t" + hex6() }

    /// The pool an id belongs to; `nil` when `id` is not of either form.
    public static func pool(of id: String) -> String? {
        guard let dash = id.lastIndex(of: "-") else { return nil }
        var suffix = id[id.index(after: dash)...]
        if suffix.count == 7, suffix.first == "t" { suffix = suffix.dropFirst() }
        guard suffix.count == 6, suffix.allSatisfy(\.isHexDigit), dash > id.startIndex else { return nil }
        return String(id[..<dash])
    }

    /// Whether `id` is a template id.
    public static func isTemplate(_ id: String) -> Bool {
        guard let dash = id.lastIndex(of: "-") else { return false }
        let suffix = id[id.index(after: dash)...]
        return suffix.count == 7 && suffix.first == "t" && pool(of: id) != nil
    }

    /// The host name a VM's guest gets: its id, shortened to Linux's 63 bytes by keeping the
    /// start of the pool name and the whole suffix.
    public static func hostname(of id: String) -> String {
        guard id.utf8.count > 63, let dash = id.lastIndex(of: "-") else { return id }
        let suffix = id[dash...]
        var prefix = String(id[..<dash].prefix(63 - suffix.count))
        while prefix.hasSuffix("-") { prefix.removeLast() }
        return prefix + suffix
    }

    private static func hex6() -> String {
        let hex = String(UInt32.random(in: 0...0xFF_FFFF), radix: 16)
        return String(repeating: "0", count: 6 - hex.count) + hex
    }
}
