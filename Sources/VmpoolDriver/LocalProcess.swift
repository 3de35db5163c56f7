import Foundation

/// Processes of this host, by pid: whether one recorded earlier (a vmpool waiting for a lease,
/// one that journaled an operation) has exited.
public enum LocalProcess {
    /// `true` only when no process has the pid any more; a process another user owns (EPERM)
    /// is alive.
    public static func isGone(_ pid: Int32) -> Bool {
        kill(pid, 0) != 0 && errno == ESRCH
    }
}
