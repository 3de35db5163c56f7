import ArgumentParser
import Foundation
import VmpoolDriver
import VmpoolPlanner
import VmpoolReconciler
import VmpoolSpec
import VmpoolStore

extension Vmpool {
    /// Everything about one pool or VM, like `kubectl describe`.
    struct Describe: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "describe",
            abstract: "Show a pool or VM in detail: spec, status, VMs, template, standbys, recent events.",
            subcommands: [PoolCommand.self, VMCommand.self])

        struct PoolCommand: AsyncParsableCommand {
            static let configuration = CommandConfiguration(commandName: "pool", abstract: "Describe a pool.")

            @OptionGroup var options: GlobalOptions

            @Argument(help: "The pool's name.", completion: Completions.pools)
            var name: String

            @OptionGroup var format: OutputOptions

            func run() async throws {
                let session = try await Session(options, locking: nil, create: false)
                let observation = try await session.reconciler.observe(depth: .hypervisor, allHosts: true)
                guard let stored = observation.pools.first(where: { $0.spec.name == name }) else {
                    throw CommandFailure(description: "no pool named \"\(name)\" has been applied")
                }
                let rows = VMRow.rows(observation, pool: name)
                let readiness = observation.readiness()[name] ?? Readiness()
                let templates = observation.templates.filter { $0.ref.pool == name }
                let alive = Set(await session.reconciler.driver.discover().map(\.id))
                let standbys = try session.store.standbys().filter { $0.pool == name }
                let events = try session.store.events(pool: name, limit: 15)
                var description = PoolDescription(
                    stored: stored, readiness: readiness, rows: rows, templates: templates,
                    standbys: standbys.map { ($0, $0.ready && alive.contains($0.id)) }, events: events)
                description.leaseWaiters = try session.store.leaseWaiters()[name] ?? 0
                if let guest = session.reconciler.driver as? any GuestAccess {
                    description.setupLogs = templates.compactMap { guest.setupLog(of: $0.ref.id, template: true) }
                    description.bootLogs = templates.map(\.ref.id).filter { guest.bootLog(ofTemplate: $0) != nil }
                }
                if session.cluster != nil {
                    description.placement = try session.store.placements().filter { $0.pool == name }
                    description.unplaced = try session.store.unplaced()[name] ?? 0
                }
                switch format.output {
                case .text: printOut(description.text)
                case .json: printOut(try JSONOutput.encode(.object(description.json)))
                }
            }
        }

        struct VMCommand: AsyncParsableCommand {
            static let configuration = CommandConfiguration(commandName: "vm", abstract: "Describe a VM.")

            @OptionGroup var options: GlobalOptions

            @Argument(help: "The VM's id.", completion: Completions.vms)
            var id: String

            @OptionGroup var format: OutputOptions

            func run() async throws {
                let session = try await Session(options, locking: nil, create: false)
                let observation = try await session.reconciler.observe(depth: .hypervisor, allHosts: true)
                guard let row = VMRow.rows(observation).first(where: { $0.record.id == id }) else {
                    throw CommandFailure(description: "no VM named \"\(id)\" (see vmpool get vms)")
                }
                let events = try session.store.events(vm: id, limit: 15)
                var description = VMDescription(row: row, events: events)
                description.walls = observation.pools.first { $0.spec.name == row.record.pool }?.spec.walls
                description.confinement = await session.reconciler.driver.confinement(of: row.record.ref)
                switch format.output {
                case .text: printOut(description.text)
                case .json: printOut(try JSONOutput.encode(.object(description.json)))
                }
            }
        }
    }

    /// The store's events: what vmpool did and why.
    struct Events: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "events",
            abstract: "List what happened to pools and VMs (created, replaced, leased, recovered...), oldest first.")

        @OptionGroup var options: GlobalOptions

        @Option(help: "Only the events of this pool.", completion: Completions.pools)
        var pool: String?

        @Option(
            parsing: .unconditional, help: "Only events of the last DURATION (30m, 2h).", transform: duration("--since")
        )
        var since: Duration?

        @Flag(name: .shortAndLong, help: "Keep printing new events until interrupted.")
        var follow = false

        @OptionGroup var format: OutputOptions

        func run() async throws {
            let session = try await Session(options, locking: nil, create: false)
            let from = since.map { Date().addingTimeInterval(-$0.seconds) }
            var events = try session.store.events(pool: pool, since: from)
            if format.output == .json && !follow {
                printOut(try JSONOutput.encode(events.map(EventText.json)))
                return
            }
            if format.output == .text && !events.isEmpty { printOut(EventText.header) }
            var last: Int64 = 0
            while true {
                for event in events {
                    printOut(
                        format.output == .json
                            ? try JSONValue.render(.object(EventText.json(event))).replacingOccurrences(
                                of: "\n", with: "") : EventText.line(event))
                }
                guard follow else { return }
                // The newest shown so far: a poll that finds nothing keeps it.
                last = events.last?.id ?? last
                try await Task.sleep(for: .milliseconds(500))
                events = try session.store.events(pool: pool, afterID: last)
            }
        }
    }
}

/// Events as lines and objects.
enum EventText {
    static let header = "TIME                      POOL            VM                KIND              MESSAGE"

    static func line(_ event: Event) -> String {
        func pad(_ text: String, _ width: Int) -> String {
            text.padding(toLength: max(width, text.count), withPad: " ", startingAt: 0)
        }
        return pad(JSONValue.rfc3339(event.at), 24) + "  " + pad(event.pool.isEmpty ? "-" : event.pool, 14) + "  "
            + pad(event.vm ?? "-", 16) + "  " + pad(event.kind, 16) + "  " + event.message
    }

    static func json(_ event: Event) -> [String: JSONValue] {
        [
            "time": .string(JSONValue.rfc3339(event.at)), "pool": .string(event.pool),
            "vm": event.vm.map { .string($0) } ?? .null, "kind": .string(event.kind), "message": .string(event.message),
        ]
    }
}

struct PoolDescription {
    var stored: StoredPool
    var readiness: Readiness
    var rows: [VMRow]
    var templates: [TemplateRecord]
    var standbys: [(StandbyRecord, Bool)]
    var events: [Event]
    /// On a shared store: each host's share, and the VMs no host has room for.
    var placement: [PlacementRecord]?
    var unplaced = 0
    /// Lease requests waiting in line for a ready VM.
    var leaseWaiters = 0
    /// Where the output of the templates' setup steps is kept.
    var setupLogs: [String] = []
    /// The templates whose boot output is kept (`vmpool logs TEMPLATE`).
    var bootLogs: [String] = []

    var text: String {
        let spec = stored.spec
        var lines = [
            "Name:        \(spec.name)",
            "Labels:      \(spec.labels.isEmpty ? "-" : spec.labels.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ","))",
            "Generation:  \(stored.generation) (applied \(JSONValue.rfc3339(stored.updatedAt)))",
            "Spec:",
            "  size \(spec.size), warm \(spec.warm), state \(spec.state.rawValue), boot \(spec.boot.rawValue)",
            "  vcpus \(spec.vcpus) (ceiling \(spec.maxVcpus)), memory \(MemoryQuantity.format(spec.memoryMiB)) (ceiling \(MemoryQuantity.format(spec.maxMemoryMiB)))",
        ]
        if let image = spec.image {
            lines.append(
                "  image: kernel \(image.kernel ?? "(default)"), initrd \(image.initrd ?? "-"), cmdline \(image.cmdline ?? "(default)")"
            )
        }
        for disk in spec.disks {
            lines.append(
                "  disk \(disk.name): \(disk.image ?? "empty")\(disk.sizeMiB.map { ", \(MemoryQuantity.format($0))" } ?? "")"
            )
        }
        if let network = spec.network {
            var text = "  network: \(network.mode.rawValue)"
            if !network.ports.isEmpty { text += ", ports \(network.ports.map(String.init).joined(separator: ","))" }
            if let bridge = network.bridge { text += ", bridge \(bridge)" }
            if let subnet = network.subnet { text += ", subnet \(subnet)" }
            lines.append(text)
        }
        lines += Self.preparation(spec.template)
        lines.append(
            "Status:      \(readiness.ready)/\(spec.size) ready, \(readiness.warm)/\(spec.warm) warm, \(readiness.leased) leased, \(readiness.vms) VMs"
                + (leaseWaiters > 0 ? ", \(leaseWaiters) lease request\(leaseWaiters == 1 ? "" : "s") waiting" : "")
                + (stored.deleting ? " (being deleted)" : ""))
        if let placement {
            let shares = placement.map { "\($0.host) \($0.size)" + ($0.warm > 0 ? "+\($0.warm) warm" : "") }
            lines.append(
                "Placement:   " + (shares.isEmpty ? "on no host" : shares.joined(separator: ", "))
                    + (unplaced > 0
                        ? "; \(unplaced) VM\(unplaced == 1 ? "" : "s") fit on no live host's declared capacity" : ""))
        }
        lines.append(
            "Template:    "
                + (templates.isEmpty
                    ? "-"
                    : templates.map { template in
                        "\(template.ref.id) ("
                            + (template.savedAt.map { "\(template.state.rawValue), saved \(JSONValue.rfc3339($0))" }
                                ?? "\(template.state.rawValue) since \(JSONValue.rfc3339(template.createdAt))") + ")"
                    }
                    .joined(separator: "; ")))
        for log in setupLogs { lines.append("Setup log:   \(log)") }
        for template in bootLogs { lines.append("Boot log:    vmpool logs \(template)") }
        lines.append(
            "Standbys:    \(standbys.filter(\.1).count) ready"
                + (standbys.isEmpty ? "" : " (\(standbys.map(\.0.id).joined(separator: ", ")))"))
        lines.append("VMs:")
        lines.append(
            rows.isEmpty
                ? "  none" : TableRenderer.vms(rows).split(separator: "\n").map { "  " + $0 }.joined(separator: "\n"))
        lines.append("Events:")
        lines.append(events.isEmpty ? "  none" : events.map { "  " + EventText.line($0) }.joined(separator: "\n"))
        return lines.joined(separator: "\n")
    }

    /// The spec's files, setup steps and ready check, one line each.
    static func preparation(_ template: TemplateSpec) -> [String] {
        var lines: [String] = []
        for file in template.files { lines.append("  file \(file.src) → \(file.dst)") }
        for (index, step) in template.setup.enumerated() { lines.append("  setup \(index + 1): \(step.display)") }
        if let ready = template.ready {
            let checks = [ready.exec.map { "exec \($0.display)" }, ready.port.map { "port \($0)" }].compactMap { $0 }
            lines.append(
                "  ready: \(checks.joined(separator: " and ")) within \(DurationText.format(.seconds(ready.timeoutSeconds)))"
            )
        }
        return lines
    }

    var json: [String: JSONValue] {
        [
            "name": .string(stored.spec.name), "generation": .int(stored.generation),
            "setupLogs": .array(setupLogs.map { .string($0) }),
            "spec": PoolRow(spec: stored.spec, generation: stored.generation, readiness: readiness, standbys: 0).json
                .filter { !["ready", "vms", "warmReady", "leased", "standbys"].contains($0.key) }.reduce(
                    into: [String: JSONValue]()
                ) { $0[$1.key] = $1.value }.json,
            "status": .object([
                "ready": .int(readiness.ready), "warm": .int(readiness.warm), "leased": .int(readiness.leased),
                "vms": .int(readiness.vms), "deleting": .bool(stored.deleting), "leaseWaiters": .int(leaseWaiters),
            ]),
            "vms": .array(rows.map { .object($0.json) }),
            "placement": placement.map { shares in
                .object([
                    "hosts": .array(
                        shares.map {
                            .object(["host": .string($0.host), "size": .int($0.size), "warm": .int($0.warm)])
                        }),
                    "unplaced": .int(unplaced),
                ])
            } ?? .null,
            "templates": .array(
                templates.map {
                    .object([
                        "id": .string($0.ref.id), "state": .string($0.state.rawValue),
                        "startedAt": .string(JSONValue.rfc3339($0.createdAt)),
                        "savedAt": $0.savedAt.map { .string(JSONValue.rfc3339($0)) } ?? .null,
                    ])
                }),
            "standbys": .array(standbys.map { .object(["id": .string($0.0.id), "ready": .bool($0.1)]) }),
            "events": .array(events.map { .object(EventText.json($0)) }),
        ]
    }
}

struct VMDescription {
    var row: VMRow
    var events: [Event]
    /// The pool's walls as its manifest says, and what confines the VM's process.
    var walls: Walls?
    var confinement: [(String, String)] = []

    /// The walls that apply, one line each.
    var wallLines: [String] {
        var lines: [String] = []
        if let walls {
            var network = "egress \(walls.egress)"
            if walls.isolate { network += ", isolated from its own pool's VMs" }
            lines.append(network)
            if let percent = walls.limits.cpuPercent { lines.append("cpu limited to \(percent)% of its vCPUs") }
            if let weight = walls.limits.ioWeight { lines.append("io weight \(weight)") }
        }
        lines += confinement.map { "\($0.0): \($0.1)" }
        return lines
    }

    var text: String {
        let record = row.record
        var lines = [
            "ID:          \(record.id)",
            "Pool:        \(record.pool)",
            "State:       \(row.state)" + (row.problem.map { " (\($0))" } ?? ""),
            "Boot:        \(record.boot.rawValue)" + (record.templateID.map { " (cloned from \($0))" } ?? ""),
            "Process:     \(record.pid.map { "pid \($0)" } ?? "-")",
            "Shape:       \(record.shape.vcpus) vcpus (ceiling \(record.shape.maxVcpus)), \(MemoryQuantity.format(record.shape.memoryMiB)) (ceiling \(MemoryQuantity.format(record.shape.maxMemoryMiB)))",
            "Image:       kernel \(record.shape.image.kernel), cmdline \(record.shape.image.cmdline)",
        ]
        for disk in record.shape.disks {
            lines.append(
                "Disk:        \(disk.name): \(disk.base ?? "empty") (\(disk.format ?? "new")), \(MemoryQuantity.format(disk.sizeMiB))"
            )
        }
        if let network = record.network {
            lines.append(
                "Network:     \(network.mode.rawValue)\(network.bridge.map { " on bridge \($0)" } ?? ""), MAC \(network.mac)"
            )
            if let address = network.address {
                lines.append("Address:     \(address)/\(network.prefix ?? 0) via \(network.gateway ?? "-")")
            } else if let address = row.address {
                lines.append("Address:     \(address) (the guest's ports are forwarded there)")
            }
            if !network.ports.isEmpty { lines.append("Ports:       \(row.portsText) (guest→127.0.0.1)") }
        }
        if let lease = record.lease {
            lines.append(
                "Lease:       \(lease.holder) since \(JSONValue.rfc3339(lease.leasedAt))"
                    + (lease.expiresAt.map { ", until \(JSONValue.rfc3339($0))" } ?? ""))
        }
        lines.append("Created:     \(JSONValue.rfc3339(record.createdAt))")
        for (index, line) in wallLines.enumerated() {
            lines.append((index == 0 ? "Walls:       " : "             ") + line)
        }
        lines.append("Events:")
        lines.append(events.isEmpty ? "  none" : events.map { "  " + EventText.line($0) }.joined(separator: "\n"))
        return lines.joined(separator: "\n")
    }

    var json: [String: JSONValue] {
        var object = row.json
        object["disks"] = .array(
            row.record.shape.disks.map {
                .object([
                    "name": .string($0.name), "base": $0.base.map { .string($0) } ?? .null, "sizeMiB": .int($0.sizeMiB),
                ])
            })
        object["mac"] = row.record.network.map { .string($0.mac) } ?? .null
        object["walls"] = .object(
            [
                "egress": walls.map { .string("\($0.egress)") } ?? .null,
                "isolate": walls.map { .bool($0.isolate) } ?? .null,
            ].merging(confinement.map { ($0.0, JSONValue.string($0.1)) }) { first, _ in first })
        object["events"] = .array(events.map { .object(EventText.json($0)) })
        return object
    }
}

extension Dictionary where Key == String, Value == JSONValue {
    var json: JSONValue { .object(self) }
}
