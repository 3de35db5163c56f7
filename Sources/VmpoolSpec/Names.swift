/// Syntax of the names a manifest gives, shared by validation and the store.
public enum Names {
    /// `^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`: safe in file names, QEMU options and shells alike.
    public static func isValidPoolName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard (1...63).contains(bytes.count) else { return false }
        func edge(_ b: UInt8) -> Bool { (b >= 0x61 && b <= 0x7A) || (b >= 0x30 && b <= 0x39) }
        guard edge(bytes[0]), edge(bytes[bytes.count - 1]) else { return false }
        return bytes.allSatisfy { edge($0) || $0 == 0x2D }
    }

    /// `^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$`
    public static func isValidLabelKey(_ key: String) -> Bool {
        let bytes = Array(key.utf8)
        guard (1...63).contains(bytes.count) else { return false }
        func alnum(_ b: UInt8) -> Bool {
            (b >= 0x61 && b <= 0x7A) || (b >= 0x41 && b <= 0x5A) || (b >= 0x30 && b <= 0x39)
        }
        guard alnum(bytes[0]), alnum(bytes[bytes.count - 1]) else { return false }
        return bytes.allSatisfy { alnum($0) || $0 == 0x2E || $0 == 0x5F || $0 == 0x2F || $0 == 0x2D }
    }

    /// `^[a-z0-9-]{1,32}$`
    public static func isValidDiskName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        return (1...32).contains(bytes.count)
            && bytes.allSatisfy { ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2D }
    }

    /// A Linux interface name vmpool will create: 1 to 15 of `[A-Za-z0-9_.-]`, not `.` or `..`.
    public static func isValidInterfaceName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard (1...15).contains(bytes.count), name != ".", name != ".." else { return false }
        return bytes.allSatisfy {
            ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x5F
                || $0 == 0x2E || $0 == 0x2D
        }
    }
}
