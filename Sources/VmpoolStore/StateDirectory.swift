import Foundation

/// Creates and checks the state dir: owned by us, mode 0700, nothing readable by others.
public enum StateDirectory {
    /// The default: `$XDG_STATE_HOME/vmpool`, else `~/.local/state/vmpool`.
    public static func defaultPath(environment: [String: String] = ProcessInfo.processInfo.environment) -> String {
        if let xdg = environment["XDG_STATE_HOME"], !xdg.isEmpty { return xdg + "/vmpool" }
        let home = environment["HOME"] ?? NSHomeDirectory()
        return home + "/.local/state/vmpool"
    }

    /// Creates `path` (and parents) mode 0700, or tightens an existing one to 0700.
    public static func prepare(_ path: String) throws(StoreError) {
        var info = stat()
        if stat(path, &info) != 0 {
            do {
                try FileManager.default.createDirectory(
                    atPath: path, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            } catch {
                throw StoreError(.stateDir, "cannot create the state dir \(path): \(error.localizedDescription)")
            }
            return
        }
        guard info.st_mode & S_IFMT == S_IFDIR else {
            throw StoreError(.stateDir, "the state dir \(path) exists and is not a directory")
        }
        guard info.st_uid == geteuid() else {
            throw StoreError(.stateDir, "the state dir \(path) belongs to uid \(info.st_uid), not to this user")
        }
        if info.st_mode & 0o077 != 0, chmod(path, 0o700) != 0 {
            throw StoreError(.stateDir, "cannot make the state dir \(path) private (mode 0700)")
        }
    }
}
