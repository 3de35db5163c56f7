import VmpoolSpec
import CVmpoolSys
import Foundation
import Testing
import VmpoolDriver
import VmpoolTestSupport

/// Exec sessions on real QEMU: many more sessions than exec ports at once, signals that end
/// `exec`, `logs --follow` and `console` mid-stream, and a VM that dies under an exec. Every
/// command runs through the `vmpool` binary, and every wait has a deadline.
@Suite(
    "Exec sessions on real QEMU", .serialized,
    .enabled(if: QemuEnvironment.available, "\(QemuEnvironment.skipReason ?? "")"))
struct ExecSessionTests {
    func pool(_ name: String) -> String { poolYAML(name, size: 1, boot: "template") }

    /// One VM cloned from a template, without standbys (as in the report of hung copies).
    func vm(_ box: QemuSandbox, _ name: String) throws -> String {
        let result = try box.run(
            ["apply", "-f", box.write(pool(name), as: name + ".yaml")], environment: ["VMPOOL_STANDBY": "0"])
        #expect(result.status == 0, "apply failed: \(result.stdout)\n\(result.stderr)")
        return try #require(try box.ids(pool: name).first)
    }

    /// Random bytes (from the host's RNG).
    static func randomData(_ count: Int) -> Data {
        var bytes = [UInt8](repeating: 0, count: count)
        let fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC)
        defer { close(fd) }
        var filled = 0
        while filled < count {
            let got = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + filled, count - filled) }
            guard got > 0 else { break }
            filled += got
        }
        return Data(bytes)
    }

    /// One session of the concurrency test: what runs, and how to tell that it worked.
    struct Session {
        var kind: String
        var command: RunningCommand
        var check: (CommandResult) -> String?
        var launched = ContinuousClock.now
    }

    @Test func manyMoreSessionsThanExecPortsAllFinishAndNoneHangs() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let vm = try vm(box, "busy")
        let rounds = 5
        let perRound = 32  // four times the exec ports: the rest wait for a free one
        // A hang is for ever; on a loaded 2-core host a session waits for a port up to a few minutes.
        let deadline = Duration.seconds(300)
        let copySource = Self.randomData(512 << 10)
        let copyPath = box.dir.path + "/copy.bin"
        FileManager.default.createFile(atPath: copyPath, contents: copySource)
        let copySum = sha256(copySource)
        var finished = 0
        var failures: [String] = []
        var hung: [String] = []
        var durations: [Duration] = []
        var kinds: [String: Int] = [:]
        for round in 1...rounds {
            var sessions: [Session] = []
            for index in 0..<perRound {
                let tag = "r\(round)-\(index)"
                let exec = ["exec", vm, "--state-dir", box.state]
                switch index % 4 {
                case 0:
                    // Output: 1 MiB made in the guest, its checksum on stderr.
                    let script =
                        "head -c 1048576 /dev/urandom > /tmp/\(tag); sha256sum < /tmp/\(tag) >&2; cat /tmp/\(tag)"
                    let command = try box.binary.start(exec + ["--", "sh", "-c", script])
                    sessions.append(
                        Session(kind: "exec stdout", command: command) { result in
                            let guest = String(result.stderr.prefix(64))
                            let host = sha256(result.stdoutData)
                            return guest == host && result.stdoutData.count == 1_048_576
                                ? nil : "stdout \(result.stdoutData.count) bytes, sha256 \(host), guest said \(guest)"
                        })
                case 1:
                    // Input: 512 KiB to the guest, its checksum back.
                    let data = Self.randomData(512 << 10)
                    let command = try box.binary.start(exec + ["-i", "--", "sha256sum"], stdin: .data(data))
                    let expected = sha256(data)
                    sessions.append(
                        Session(kind: "exec stdin", command: command) { result in
                            result.stdout.hasPrefix(expected) ? nil : "guest sha256 \(result.stdout.prefix(64))"
                        })
                case 2:
                    // Both ways at once: 512 KiB through tee in the guest and back.
                    let data = Self.randomData(512 << 10)
                    let command = try box.binary.start(exec + ["-i", "--", "tee", "/tmp/\(tag)"], stdin: .data(data))
                    let expected = sha256(data)
                    sessions.append(
                        Session(kind: "exec stdin+stdout", command: command) { result in
                            let back = sha256(result.stdoutData)
                            return back == expected ? nil : "\(result.stdoutData.count) bytes back, sha256 \(back)"
                        })
                default:
                    let command = try box.binary.start([
                        "cp", copyPath, "\(vm):/tmp/\(tag).cp", "--state-dir", box.state,
                    ])
                    sessions.append(Session(kind: "cp", command: command) { _ in nil })
                }
            }
            // All of them at once, each against its deadline from its own start.
            var ended: [Int: (result: CommandResult, after: Duration)] = [:]
            var pending = Array(sessions.indices)
            while let first = pending.first {
                if let result = sessions[first].command.wait(timeout: .milliseconds(20)) {
                    ended[first] = (result, ContinuousClock.now - sessions[first].launched)
                }
                for index in pending.dropFirst() {
                    if let result = sessions[index].command.wait(timeout: .zero) {
                        ended[index] = (result, ContinuousClock.now - sessions[index].launched)
                    }
                }
                pending.removeAll { ended[$0] != nil }
                let late = pending.filter { ContinuousClock.now - sessions[$0].launched > deadline }
                for index in late {
                    sessions[index].command.kill()
                    _ = sessions[index].command.wait()
                    hung.append("round \(round) #\(index) \(sessions[index].kind)")
                }
                pending.removeAll { late.contains($0) }
            }
            var copied: [String] = []
            for (index, session) in sessions.enumerated() {
                guard let (result, after) = ended[index] else { continue }
                durations.append(after)
                kinds[session.kind, default: 0] += 1
                if result.status != 0 {
                    failures.append(
                        "round \(round) #\(index) \(session.kind): status \(result.status): \(result.stderr)")
                } else if let problem = session.check(result) {
                    failures.append("round \(round) #\(index) \(session.kind): \(problem)")
                } else {
                    finished += 1
                    if session.kind == "cp" { copied.append("/tmp/r\(round)-\(index).cp") }
                }
            }
            // The copies arrived whole.
            if !copied.isEmpty {
                let sums = try box.exec(vm, ["sha256sum"] + copied)
                for line in sums.stdoutLines where !line.hasPrefix(copySum) {
                    failures.append("round \(round): a copy differs: \(line)")
                    finished -= 1
                }
                if sums.stdoutLines.count != copied.count {
                    failures.append("round \(round): sha256sum of the copies: \(sums.stdout) \(sums.stderr)")
                }
            }
            _ = try box.exec(vm, ["sh", "-c", "rm -f /tmp/r\(round)-*"])
        }
        let total = rounds * perRound
        let byKind = kinds.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        print(
            "exec sessions on one VM: \(rounds) rounds of \(perRound) at once (\(byKind)): \(finished) of \(total)"
                + " finished with the right data, \(failures.count) failed, \(hung.count) hung;"
                + " each took \(DurationText.seconds(durations.sorted()[durations.count / 2])) median,"
                + " \(DurationText.seconds(durations.max() ?? .zero)) at most (deadline \(deadline))")
        #expect(hung.isEmpty, "hung: \(hung)")
        #expect(failures.isEmpty, "failed: \(failures.prefix(5))")
        #expect(finished == total)
    }

    /// Lines of `ps`-like output from the guest: every process's command line.
    func guestCommandLines(_ box: QemuSandbox, _ vm: String) throws -> [String] {
        let listing = try box.exec(
            vm, ["sh", "-c", "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f 2>/dev/null; echo; done"])
        return listing.stdoutLines
    }

    /// Looks until no guest process's command line contains `marker`; returns how many looks
    /// that took (1: gone at the first), or `nil` when one still does after `limit`.
    func looksUntilGone(_ box: QemuSandbox, _ vm: String, _ marker: String, within limit: Duration) throws -> Int? {
        let start = ContinuousClock.now
        var looks = 0
        while true {
            looks += 1
            if try !guestCommandLines(box, vm).contains(where: { $0.contains(marker) }) { return looks }
            if ContinuousClock.now - start > limit { return nil }
        }
    }

    /// Sends `signal` once `command` has written `bytes` of output, and returns how long it took
    /// to exit, and how (`nil` when it had not exited after 10 s: then it is killed).
    func interrupt(_ command: RunningCommand, _ signal: Int32, afterOutput bytes: Int) -> (Duration, CommandResult)? {
        let waitStart = ContinuousClock.now
        while command.outputSize < bytes, ContinuousClock.now - waitStart < .seconds(60) {
            if let early = command.wait(timeout: .milliseconds(20)) {
                Issue.record("the command ended before it was signalled: \(early.status) \(early.stderr)")
                return nil
            }
        }
        #expect(command.outputSize >= bytes, "no output within 60 s")
        let sent = ContinuousClock.now
        command.kill(signal)
        guard let result = command.wait(timeout: .seconds(10)) else {
            command.kill()
            _ = command.wait()
            return nil
        }
        return (ContinuousClock.now - sent, result)
    }

    @Test func signalsEndExecLogsAndConsoleWithinASecond() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let vm = try vm(box, "signals")
        var report: [String] = []

        // exec, streaming: SIGTERM, then SIGINT; the command in the guest is gone with it.
        for (signal, name) in [(SIGTERM, "SIGTERM"), (SIGINT, "SIGINT")] {
            let marker = "vmpool-marker-\(UInt32.random(in: 0...UInt32.max))"
            let exec = try box.binary.start(["exec", vm, "--state-dir", box.state, "--", "yes", marker])
            let ended = try #require(interrupt(exec, signal, afterOutput: 1 << 20), "exec did not exit after \(name)")
            #expect(ended.0 <= .seconds(1), "exec took \(ended.0) to exit after \(name)")
            #expect(ended.1.status == 128 + signal, "exec after \(name): \(ended.1.status) \(ended.1.stderr)")
            // vmpool exits once the agent confirmed the kill: the command is gone at the first look.
            let looks = try looksUntilGone(box, vm, marker, within: .seconds(10))
            #expect(
                looks == 1,
                "the interrupted exec's command still ran in the guest (looks: \(String(describing: looks)))")
            report.append(
                "exec \(name) \(DurationText.milliseconds(ended.0)), exit \(ended.1.status), guest command "
                    + (looks.map { "gone at look \($0)" } ?? "still running"))
        }

        // exec with stdin forwarded and a command that does not read it (a session that only waits).
        let marker = "vmpool-marker-\(UInt32.random(in: 0...UInt32.max))"
        let quiet = try box.binary.start(
            [
                "exec", vm, "-i", "--state-dir", box.state, "--", "sh", "-c", "echo started; while :; do sleep 1; done",
                marker,
            ],
            stdin: .pipe)
        let ended = try #require(interrupt(quiet, SIGTERM, afterOutput: 8), "a waiting exec did not exit")
        #expect(ended.0 <= .seconds(1) && ended.1.status == 143, "\(ended.0) \(ended.1.status) \(ended.1.stderr)")
        let looks = try looksUntilGone(box, vm, marker, within: .seconds(10))
        #expect(
            looks == 1, "the interrupted exec's command still ran in the guest (looks: \(String(describing: looks)))")
        report.append(
            "exec -i (waiting) SIGTERM \(DurationText.milliseconds(ended.0)), exit \(ended.1.status), guest command "
                + (looks.map { "gone at look \($0)" } ?? "still running"))

        // logs --follow while the guest prints on its serial console.
        let printer = "vmpool-printer-\(UInt32.random(in: 0...UInt32.max))"
        let background = try box.exec(
            vm, ["sh", "-c", "(while :; do echo \(printer); done > /dev/ttyS0 2>&1 &) ; echo ok"])
        #expect(background.stdout == "ok\n", "\(background.stderr)")
        let logs = try box.binary.start(["logs", vm, "--follow", "--state-dir", box.state])
        let stopped = try #require(interrupt(logs, SIGTERM, afterOutput: 64 << 10), "logs --follow did not exit")
        #expect(stopped.0 <= .seconds(1), "logs --follow took \(stopped.0)")
        #expect(stopped.1.status == 143, "logs --follow: \(stopped.1.status) \(stopped.1.stderr)")
        report.append("logs --follow SIGTERM \(DurationText.milliseconds(stopped.0)), exit \(stopped.1.status)")
        _ = try box.exec(vm, ["sh", "-c", "pkill -f '\(printer)' || kill $(pgrep -f '\(printer)')"])

        // console, while a command there streams.
        let streamer = "vmpool-console-\(UInt32.random(in: 0...UInt32.max))"
        let console = try box.binary.start(["console", vm, "--state-dir", box.state], stdin: .pipe)
        console.write("yes \(streamer)\r")
        let detached = try #require(interrupt(console, SIGTERM, afterOutput: 64 << 10), "console did not exit")
        #expect(detached.0 <= .seconds(1), "console took \(detached.0)")
        #expect(detached.1.status == 143, "console: \(detached.1.status) \(detached.1.stderr)")
        report.append("console SIGTERM \(DurationText.milliseconds(detached.0)), exit \(detached.1.status)")
        // The console is free again: a new attach stops the stream with ^C and detaches.
        let again = try box.binary.start(["console", vm, "--state-dir", box.state], stdin: .pipe)
        again.write("\u{03}\r")
        again.write("\u{1D}")
        let result = try #require(again.wait(timeout: .seconds(30)), "a second console did not detach")
        #expect(result.status == 0, "second console: \(result.stderr)")
        #expect(try looksUntilGone(box, vm, streamer, within: .seconds(10)) != nil, "^C did not stop the stream")
        print("signals: " + report.joined(separator: "; "))
    }

    @Test func aVMWhoseProcessDiesUnderAnExecIsReportedAsSuch() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        let vm = try vm(box, "doomed")
        let pid = try #require(try box.vms().first { $0["id"] as? String == vm }?["pid"] as? Int)
        let exec = try box.binary.start(["exec", vm, "--state-dir", box.state, "--", "sh", "-c", "echo up; exec yes"])
        let waitStart = ContinuousClock.now
        while exec.outputSize < 4096, ContinuousClock.now - waitStart < .seconds(60) {
            _ = exec.wait(timeout: .milliseconds(20))
        }
        #expect(exec.outputSize >= 4096, "the exec produced no output")
        let killed = ContinuousClock.now
        kill(Int32(pid), SIGKILL)
        let result = try #require(exec.wait(timeout: .seconds(10)), "exec did not end after its VM died")
        let took = ContinuousClock.now - killed
        #expect(result.status == 125, "status \(result.status): \(result.stderr)")
        #expect(took < .seconds(3), "exec took \(took) to report its VM's death")
        let message = result.stderr
        #expect(message.contains(vm) && message.contains("process") && message.contains("exited"), "\(message)")
        #expect(message.contains("replace"), "the message does not say what happens next: \(message)")
        #expect(!message.contains(box.state) && !message.contains("/run/"), "an internal path: \(message)")
        print("VM killed under exec: exit \(result.status) after \(DurationText.milliseconds(took)): \(message)")
    }
}

/// Hex SHA-256 of `data`, by the host's sha256sum (the same tool as in the guest).
func sha256(_ data: Data) -> String {
    let path = NSTemporaryDirectory() + "vmpool-sha-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    FileManager.default.createFile(atPath: path, contents: data)
    defer { unlink(path) }
    let result = try? RunningCommand(path: "/usr/bin/sha256sum", arguments: [path], environment: [:]).wait()
    return String(result?.stdout.prefix(64) ?? "")
}

extension DurationText {
    /// "1.23 s"
    static func seconds(_ duration: Duration) -> String {
        String(format: "%.2f s", Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18)
    }

    /// "123 ms"
    static func milliseconds(_ duration: Duration) -> String {
        String(
            format: "%.0f ms",
            (Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18) * 1000)
    }
}
