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

    /// Runs `path ARGS` to completion with `input` on its stdin.
    static func run(_ path: String, _ arguments: [String], input: String) throws(DriverError) -> (
        status: Int32, stderr: String
    ) {
        var stdin: [Int32] = [0, 0]
        var stderr: [Int32] = [0, 0]
        guard vmpool_pipe_cloexec(&stdin) == 0 else {
            throw DriverError(.io, "cannot create a pipe: \(String(cString: strerror(errno)))")
        }
        guard vmpool_pipe_cloexec(&stderr) == 0 else {
            Glibc.close(stdin[0])
            Glibc.close(stdin[1])
            throw DriverError(.io, "cannot create a pipe: \(String(cString: strerror(errno)))")
        }
        let pid = withCStrings([path] + arguments) { vmpool_spawn_io(path, $0, nil, stdin[0], -1, stderr[1]) }
        Glibc.close(stdin[0])
        Glibc.close(stderr[1])
        guard pid > 0 else {
            Glibc.close(stdin[1])
            Glibc.close(stderr[0])
            throw DriverError(.launchFailed, "cannot start \(path): \(String(cString: strerror(errno)))")
        }
        // nft reads its whole program before it writes anything: no deadlock on the two pipes.
        let bytes = Array(input.utf8)
        var offset = 0
        while offset < bytes.count {
            let written = bytes[offset...].withUnsafeBytes { Glibc.write(stdin[1], $0.baseAddress, $0.count) }
            if written < 0 && errno == EINTR { continue }
            guard written > 0 else { break }
            offset += written
        }
        Glibc.close(stdin[1])
        return wait(Child(pid: pid, stderr: stderr[0]))!
    }

    /// Runs `path ARGS` to completion, or kills it at `timeout`; `nil` then.
    static func run(_ path: String, _ arguments: [String], timeout: Duration) throws(DriverError) -> (
        status: Int32, stderr: String
    )? {
        wait(try start(path, arguments), deadline: .now + timeout)
    }
}
