import Foundation
import VmpoolDriver

/// A VM's serial console output: QEMU keeps the latest `QemuVM.consoleRingBytes` in a ring
/// (nothing a guest prints can grow the host's memory or disk beyond it); vmpool drains the
/// ring over the observers' monitor into `console.log`, capped at `ConsoleLog.capBytes` with
/// one older part in `console.log.1`. All drains of a VM go through the file's lock.
enum ConsoleLog {
    static let capBytes = 1 << 20

    /// Moves the ring's content into the log; returns the new bytes.
    static func drain(_ machine: QemuVM) throws(DriverError) -> [UInt8] {
        let path = machine.paths.consoleLog(machine.id)
        let lock = try ChannelLock(
            path: path + ".lock", name: "the VM's console log", until: .now + .seconds(5), vm: machine.id)
        defer { lock.release() }
        let (qmp, monitorLock) = try machine.observerQMP(timeout: .seconds(5))
        defer {
            qmp.close()
            monitorLock.release()
        }
        let text = try qmp.execute(
            "ringbuf-read", ["device": "console", "size": QemuVM.consoleRingBytes, "format": "base64"],
            returning: String.self)
        guard let data = Data(base64Encoded: text), !data.isEmpty else { return [] }
        let bytes = [UInt8](data)
        try append(bytes, to: path)
        return bytes
    }

    /// Appends to the log, starting a new part when the current one would pass the cap.
    static func append(_ bytes: [UInt8], to path: String) throws(DriverError) {
        var info = stat()
        if stat(path, &info) == 0, Int(info.st_size) + bytes.count > capBytes {
            rename(path, path + ".1")
        }
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw DriverError(.io, "cannot write \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var offset = 0
        while offset < bytes.count {
            let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + offset, $0.count - offset) }
            guard written > 0 else {
                throw DriverError(.io, "cannot write \(path): \(String(cString: strerror(errno)))")
            }
            offset += written
        }
    }

    /// Copies the console output of `machine` (what is still in the ring, then the log) to
    /// `path`, before the machine's run dir goes: a template's boot, which its clones never
    /// print. Best effort: a template without its boot log is still a template.
    static func keep(_ machine: QemuVM, as path: String) {
        _ = try? drain(machine)
        let bytes = history(machine)
        let temporary = path + ".tmp"
        unlink(temporary)
        do throws(DriverError) {
            try append(bytes, to: temporary)
            guard rename(temporary, path) == 0 else { throw DriverError(.io, "cannot move \(temporary)") }
        } catch {
            unlink(temporary)
        }
    }

    /// The older part, then the current one.
    static func history(_ machine: QemuVM) -> [UInt8] {
        let path = machine.paths.consoleLog(machine.id)
        let older = FileManager.default.contents(atPath: path + ".1") ?? Data()
        let current = FileManager.default.contents(atPath: path) ?? Data()
        return [UInt8](older) + [UInt8](current)
    }
}

extension QemuDriver {
    public func consoleLog(_ vm: VMRef) async throws(DriverError) -> [UInt8] {
        let machine = self.vm(vm.id, pid: vm.pid)
        let process = VMProcess(paths: paths, vm: vm)
        return try await Blocking.run { () throws(DriverError) -> [UInt8] in
            do throws(DriverError) {
                _ = try ConsoleLog.drain(machine)
            } catch {
                throw process.explain(error, during: "its console output was read")
            }
            return ConsoleLog.history(machine)
        }
    }

    public func consoleDrain(_ vm: VMRef) async throws(DriverError) -> [UInt8] {
        let machine = self.vm(vm.id, pid: vm.pid)
        let process = VMProcess(paths: paths, vm: vm)
        return try await Blocking.run { () throws(DriverError) -> [UInt8] in
            do throws(DriverError) {
                return try ConsoleLog.drain(machine)
            } catch {
                throw process.explain(error, during: "its console was followed")
            }
        }
    }

    /// Relays between `streams` and the interactive console (hvc0) until the detach byte.
    public func attachConsole(_ vm: VMRef, streams: ExecStreams, detach: UInt8) async throws(DriverError) {
        let path = paths.consoleSocket(vm.id)
        let process = VMProcess(paths: paths, vm: vm)
        try await Blocking.run { () throws(DriverError) in
            do throws(DriverError) {
                try Self.relayConsole(path: path, vm: vm.id, streams: streams, detach: detach)
            } catch {
                throw process.explain(error, during: "its console was attached")
            }
        }
    }

    private static func relayConsole(path: String, vm: String, streams: ExecStreams, detach: UInt8)
        throws(DriverError)
    {
        let name = "the VM's console"
        let lock = try ChannelLock(path: path + ".lock", name: name, until: .now + .milliseconds(200), vm: vm)
        defer { lock.release() }
        let channel = try Channel(path: path, name: name, vm: vm, deadline: .now + .seconds(5))
        defer { channel.close() }
        var buffer = [UInt8](repeating: 0, count: 16384)
        // A fresh prompt, since the shell printed its last one before we came.
        try channel.send([0x0D], deadline: .now + .seconds(2))
        // After the detach key (or the end of input), what the guest still prints in
        // answer is shown until it has been quiet a moment.
        var leaving: ContinuousClock.Instant?
        var quietSince = ContinuousClock.now
        while true {
            try Interrupt.check()
            if let leaving, ContinuousClock.now - quietSince > .milliseconds(300) || ContinuousClock.now > leaving {
                return
            }
            var fds = [
                pollfd(fd: channel.fd, events: Int16(POLLIN), revents: 0),
                pollfd(fd: streams.stdin, events: Int16(leaving == nil ? POLLIN : 0), revents: 0),
            ]
            guard poll(&fds, 2, 50) >= 0 || errno == EINTR else { return }
            if leaving == nil, fds[1].revents != 0 {
                let count = read(streams.stdin, &buffer, buffer.count)
                if count <= 0 {
                    leaving = .now + .seconds(2)
                } else if let at = buffer[0..<count].firstIndex(of: detach) {
                    if at > 0 { try channel.send(Array(buffer[0..<at]), deadline: .now + .seconds(5)) }
                    leaving = .now + .seconds(2)
                    quietSince = .now
                } else {
                    try channel.send(Array(buffer[0..<count]), deadline: .now + .seconds(5))
                }
            }
            if fds[0].revents != 0 {
                let count = recv(channel.fd, &buffer, buffer.count, Int32(MSG_DONTWAIT))
                if count == 0 { throw DriverError(.io, "\(name) closed the connection", vm: vm) }
                if count > 0 {
                    try LocalOutput.write(Array(buffer[0..<count]), to: streams.stdout)
                    quietSince = .now
                }
            }
        }
    }
}
