import Foundation

/// The local terminal's size, and whether it changed (SIGWINCH) since last asked: what a
/// pty session in a guest follows.
public enum TerminalSize {
    nonisolated(unsafe) private static var changed: sig_atomic_t = 0

    /// Starts watching SIGWINCH.
    public static func watch() {
        signal(SIGWINCH) { _ in TerminalSize.changed = 1 }
    }

    /// Rows and columns of the terminal on stdout; `nil` when it is not a terminal.
    public static func current() -> (rows: Int, columns: Int)? {
        var size = winsize()
        guard ioctl(1, UInt(TIOCGWINSZ), &size) == 0, size.ws_row > 0 else { return nil }
        return (Int(size.ws_row), Int(size.ws_col))
    }

    /// The new size when the terminal was resized since the last call.
    public static func takeChange() -> (rows: Int, columns: Int)? {
        guard changed != 0 else { return nil }
        changed = 0
        return current()
    }
}
