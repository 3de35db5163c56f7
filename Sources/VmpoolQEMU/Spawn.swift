import CVmpoolSys
import Foundation
import VmpoolDriver

/// Child processes started with `posix_spawn`, reaped with `waitpid` by whoever started them.
///
/// Foundation's `Process` reaps children through a dispatch source that a busy or
/// signal-trapping host process can starve; vmpool waits for its few short-lived children
/// itself instead.
enum Spawn {
    /// A started child: its pid and the read end of its stderr pipe.
    struct Child {
        let pid: Int32
        let stderr: Int32
    }

    static func start(_ path: String, _ arguments: [String]) throws(DriverError) -> Child {
        var fds: [Int32] = [0, 0]
        guard vmpool_pipe_cloexec(&fds) == 0 else {
            throw DriverError(.io, "cannot create a pipe: \(String(cString: strerror(errno)))")
        }
        let pid = withCStrings([path] + arguments) { vmpool_spawn(path, $0, fds[1]) }
        Glibc.close(fds[1])
        guard pid > 0 else {
            Glibc.close(fds[0])
            throw DriverError(.launchFailed, "cannot start \(path): \(String(cString: strerror(errno)))")
        }
        return Child(pid: pid, stderr: fds[0])
    }

    /// Waits for the child to exit and returns its exit status (128+signal when killed) and
    /// stderr. With a `deadline`, a child that has not closed its stderr by then (hung, or
    /// stopped) is killed, and `nil` is returned.
    static func wait(_ child: Child, deadline: ContinuousClock.Instant? = nil) -> (status: Int32, stderr: String)? {
        var output: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            if let deadline {
                let left = deadline - .now
                var pfd = pollfd(fd: child.stderr, events: Int16(POLLIN), revents: 0)
                let ready = left > .zero ? poll(&pfd, 1, Int32(clamping: max(1, left.milliseconds))) : 0
                if ready < 0 && errno == EINTR { continue }
                if ready == 0 {
                    Glibc.kill(child.pid, SIGKILL)
                    Glibc.close(child.stderr)
                    _ = vmpool_wait(child.pid)
                    return nil
                }
            }
            let count = read(child.stderr, &chunk, chunk.count)
            if count > 0 {
                if output.count < 65536 { output += chunk[0..<count] }
                continue
            }
            if count < 0 && errno == EINTR { continue }
            break
        }
        Glibc.close(child.stderr)
        return (vmpool_wait(child.pid), String(decoding: output, as: UTF8.self))
    }

    /// Runs `path ARGS` to completion.
    static func run(_ path: String, _ arguments: [String]) throws(DriverError) -> (status: Int32, stderr: String) {
        wait(try start(path, arguments))!
    }

    /// Runs `path ARGS` to completion, or kills it at `timeout`; `nil` then.
    static func run(_ path: String, _ arguments: [String], timeout: Duration) throws(DriverError) -> (
        status: Int32, stderr: String
    )? {
        wait(try start(path, arguments), deadline: .now + timeout)
    }
}
