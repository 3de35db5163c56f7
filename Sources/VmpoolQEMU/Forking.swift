import CVmpoolSys
import Foundation
import VmpoolDriver

/// Forks of a running VM (SPEC §12): its whole state saved once, as a template its copies are
/// restored from the way clones are restored from a pool's template.
///
/// A running VM's RAM is its own (anonymous, or its template's file mapped private), so a save
/// cannot skip it as a template's save does. With the source paused, its RAM and devices are
/// migrated into a helper QEMU started for the purpose, whose RAM is a new file on tmpfs mapped
/// shared: once the migration completes, that file holds the source's memory and the source's
/// disks are flushed; their overlays are copied, and the source runs on. Only the migration and
/// the copy are the source's pause. The helper then saves its device state without the RAM
/// (`x-ignore-shared`, as a template does) and goes, and each fork maps the file private,
/// copy-on-write, over its own overlays on the copied disks, and is given its own identity by
/// its agent, as a clone is. The snapshot's files are unlinked once the forks have started:
/// the memory lives on while a fork maps it and is freed with the last of them.
extension QemuDriver: ForkAccess {
    /// A running VM's state saved for its forks.
    struct ForkSnapshot: Sendable {
        var template: TemplateRef
        /// The template the source was cloned from, under the snapshot's disks.
        var underlay: String?
        var ramID: String
        var pause: Duration
        var phases: [(String, Duration)]
    }

    public func fork(_ source: ForkSource, snapshot id: String, into requests: [LaunchRequest])
        async throws(DriverError) -> ForkOutcome
    {
        try PrivateDirectory.make(paths.memoryRoot)
        let snapshot: ForkSnapshot
        do {
            snapshot = try await Blocking.run { () throws(DriverError) -> ForkSnapshot in
                try self.save(source, as: id)
            }
        } catch {
            try? await deleteTemplate(id: id)
            throw error
        }
        var phases = PhaseClock()
        let results = await withTaskGroup(of: (Int, Result<LaunchedVM, DriverError>).self) { group in
            for (index, request) in requests.enumerated() {
                group.addTask {
                    do throws(DriverError) {
                        let launched = try await self.restore(
                            request, from: snapshot.template, underlay: snapshot.underlay, ramID: snapshot.ramID,
                            awaitsReady: false)
                        return (index, .success(launched))
                    } catch {
                        return (index, .failure(error))
                    }
                }
            }
            var results = [Result<LaunchedVM, DriverError>](
                repeating: .failure(DriverError(.cancelled, "not started")), count: requests.count)
            for await (index, result) in group { results[index] = result }
            return results
        }
        phases.mark("forks")
        logger.debug(
            "fork phases: \(PhaseClock.describe(snapshot.phases + phases.phases)); paused \(snapshot.pause.milliseconds)ms",
            metadata: ["vm": "\(source.vm.id)"])
        // The forks hold the memory file mapped and their disks' layers open: the names can go.
        try? await deleteTemplate(id: id)
        return ForkOutcome(pause: snapshot.pause, vms: results, phases: snapshot.phases + phases.phases)
    }

    /// Saves the running VM `source` as template `id` (see the type's comment). On failure the
    /// source runs, and the helper and whatever was saved are the caller's to remove.
    func save(_ source: ForkSource, as id: String) throws(DriverError) -> ForkSnapshot {
        var phases = PhaseClock()
        let origin = vm(source.vm.id, pid: source.vm.pid)
        guard let pid = origin.pid, QemuProcess.isRunning(pid, vm: origin.id, runRoot: paths.runRoot) else {
            throw DriverError(.invalidState, "the VM's QEMU is not running", vm: origin.id)
        }
        if let template = source.template {
            for disk in source.shape.disks
            where access(paths.templateDisk(template: template, disk: disk.name), R_OK) != 0 {
                throw DriverError(
                    .notFound,
                    "the template this VM was cloned from (\(template)) has been replaced since, and its disks with it;"
                        + " fork a VM of the pool's current template", vm: origin.id)
            }
        }
        let control = try origin.qmp()
        defer { control.close() }
        let status = try control.execute("query-status", returning: StatusInfo.self).status
        guard status == "running" else {
            throw DriverError(.invalidState, "the VM is \(status); only a running VM can be forked", vm: origin.id)
        }
        let cpus = try control.execute("query-hotpluggable-cpus", returning: [HotpluggableCPU].self)
            .compactMap(\.qomPath)
        let memory = try control.execute("query-memory-size-summary", returning: MemorySizeSummary.self)
        guard (memory.pluggedMemory ?? 0) == 0, !cpus.contains(where: { $0.contains("/peripheral") }) else {
            throw DriverError(
                .invalidState,
                "CPUs or memory were plugged into the VM after it started; forking such a VM is not supported",
                vm: origin.id)
        }
        var shape = source.shape
        shape.vcpus = cpus.count
        shape.memoryMiB = memory.baseMemory >> 20
        let ramID = source.template == nil ? QemuVM.anonymousRAMID : QemuVM.ramID
        let template = TemplateRef(id: id, pool: source.vm.pool, key: shape.templateKey)

        // The helper that receives the source's memory into the snapshot's file. Its disks only
        // stand in for the source's (the device state names them): empty, of the same sizes.
        var helper = vm(id, kernel: shape.image.kernel)
        var helperDisks: [DiskAttachment] = []
        for disk in source.shape.disks {
            var stand = DiskAttachment(name: disk.name, path: paths.overlay(id, disk: disk.name), scratch: true)
            stand.sizeBytes = try Self.virtualSize(paths.overlay(source.vm.id, disk: disk.name), vm: origin.id)
            helperDisks.append(stand)
        }
        var spec = MachineSpec(
            shape: shape, memory: .templateShared(paths.memoryFile(template: id)), incoming: true,
            disks: helperDisks, nic: Self.nic(shape.network, vm: id), pool: source.vm.pool)
        spec.ramID = ramID
        spec.preallocate = true
        try helper.start(spec)
        phases.mark("helper")

        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
            throw DriverError(
                .io, "cannot make the migration's socket pair: \(String(cString: strerror(errno)))", vm: id)
        }
        defer {
            close(pair[0])
            close(pair[1])
        }
        let receiver = try helper.qmp()
        try receiver.execute(
            "migrate-set-capabilities", ["capabilities": [["capability": "x-ignore-shared", "state": false]]])
        try receiver.execute("getfd", ["fdname": "vmpool-fork"], attaching: pair[1])
        try receiver.execute("migrate-incoming", ["uri": "fd:vmpool-fork"])
        receiver.close()

        // A clone restored its template with x-ignore-shared on: now every page goes.
        try control.execute(
            "migrate-set-capabilities", ["capabilities": [["capability": "x-ignore-shared", "state": false]]])
        try control.execute("migrate-set-parameters", ["max-bandwidth": Int64(1) << 40])
        try control.execute("getfd", ["fdname": "vmpool-fork"], attaching: pair[0])
        phases.mark("prepare")
        let pausedAt = ContinuousClock.now
        try control.execute("stop")
        do throws(DriverError) {
            try control.execute("migrate", ["uri": "fd:vmpool-fork"])
            let migrated = try origin.waitForMigration(control, timeout: .seconds(120))
            phases.mark("migrate")
            let sent = (migrated.ram?.transferred ?? 0) >> 20
            let whole = migrated.ram?.normal ?? 0
            let zero = migrated.ram?.duplicate ?? 0
            logger.debug(
                "fork migration: \(sent) MiB sent, \(whole) pages whole, \(zero) zero, \(migrated.totalTime ?? 0) ms in QEMU",
                metadata: ["vm": "\(source.vm.id)"])
            // Migrated, the source's disks are flushed and let go of until it runs again.
            for disk in source.shape.disks {
                try Self.copyFile(
                    paths.overlay(source.vm.id, disk: disk.name), to: paths.templateDisk(template: id, disk: disk.name),
                    vm: origin.id)
            }
            try control.execute("cont")
        } catch {
            try? control.execute("cont")
            throw error
        }
        let pause = ContinuousClock.now - pausedAt
        phases.mark("disks")
        // The guest's clock stood still while it was paused.
        if configuration.clockSync, let agent = try? origin.agent(timeout: .seconds(2)) {
            try? agent.syncTime()
            agent.close()
        }

        // The helper has the memory; its device state is saved as a template's.
        try helper.awaitIncoming(timeout: .seconds(120))
        try helper.save(to: paths.stateFile(template: id))
        Undo.run { helper.stop() }
        phases.mark("save")
        // The helper had every page of the file allocated; the zero ones (most of a guest's
        // RAM) go back before any fork maps the file.
        let memoryFile = paths.memoryFile(template: id)
        _ = Self.freeZeroPages(memoryFile)
        var info = stat()
        if stat(memoryFile, &info) == 0 {
            logger.debug(
                "fork snapshot: \((Int64(info.st_blocks) * 512) >> 20) MiB of saved memory",
                metadata: ["vm": "\(source.vm.id)"])
        }
        phases.mark("trim")
        return ForkSnapshot(
            template: template, underlay: source.template, ramID: ramID, pause: pause, phases: phases.phases)
    }

    /// The virtual size of a qcow2 image, from its header (read as bytes: the image is in
    /// use by its VM's QEMU, which locks it against qemu-img).
    static func virtualSize(_ path: String, vm: String) throws(DriverError) -> UInt64 {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { throw DriverError(.notFound, "disk \(path) is missing", vm: vm) }
        defer { close(fd) }
        var header = [UInt8](repeating: 0, count: 32)
        guard pread(fd, &header, 32, 0) == 32, header[0..<4] == [0x51, 0x46, 0x49, 0xFB] else {
            throw DriverError(.io, "disk \(path) is not a qcow2 image", vm: vm)
        }
        return header[24..<32].reduce(0) { $0 << 8 | UInt64($1) }
    }

    /// Copies a file whole (in the kernel, without the data passing through vmpool), mode 0600.
    static func copyFile(_ source: String, to destination: String, vm: String) throws(DriverError) {
        let input = open(source, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard input >= 0 else { throw DriverError(.notFound, "disk \(source) is missing", vm: vm) }
        defer { close(input) }
        unlink(destination)
        let output = open(destination, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard output >= 0 else {
            throw DriverError(.io, "cannot create \(destination): \(String(cString: strerror(errno)))", vm: vm)
        }
        defer { close(output) }
        guard vmpool_copy_file(input, output) >= 0 else {
            throw DriverError(
                .io, "cannot copy \(source) to \(destination): \(String(cString: strerror(errno)))", vm: vm)
        }
    }
}

extension QemuVM {
    /// Waits until an incoming migration into this VM has completed (the VM then stands paused).
    func awaitIncoming(timeout: Duration) throws(DriverError) {
        let qmp = try qmp()
        defer { qmp.close() }
        let deadline = ContinuousClock.now + timeout
        while true {
            let state = try qmp.execute("query-status", returning: StatusInfo.self).status
            if state != "inmigrate" {
                guard state == "paused" || state == "prelaunch" else {
                    throw DriverError(.protocolError, "the incoming migration ended in state \(state)", vm: id)
                }
                return
            }
            guard ContinuousClock.now < deadline else {
                throw DriverError(.timeout, "the migration did not arrive within \(timeout)", vm: id)
            }
            try Interrupt.sleep(.milliseconds(2))
        }
    }
}
