import Foundation
import VmpoolDriver
import VmpoolReconciler
import VmpoolSpec

/// Plain aligned tables, like `kubectl get`.
enum TableRenderer {
    static func table(_ header: [String], _ rows: [[String]]) -> String {
        // A cell is one line: a newline or tab from a holder or an error would forge rows.
        let rows = rows.map { $0.map { TerminalText.safe($0, singleLine: true) } }
        var widths = header.map(\.count)
        for row in rows {
            for (index, cell) in row.enumerated() { widths[index] = max(widths[index], cell.count) }
        }
        func render(_ row: [String]) -> String {
            row.enumerated().map { index, cell in
                index == row.count - 1 ? cell : cell.padding(toLength: widths[index] + 2, withPad: " ", startingAt: 0)
            }.joined()
        }
        return ([render(header)] + rows.map(render)).joined(separator: "\n")
    }

    static func pools(_ rows: [PoolRow]) -> String {
        if rows.isEmpty { return "No pools have been applied." }
        return table(
            ["NAME", "READY", "WARM", "LEASED", "VCPUS", "MEMORY", "BOOT", "STATE"],
            rows.map { row in
                [
                    row.spec.name, "\(row.ready)/\(row.spec.size)", "\(row.readiness.warm)/\(row.spec.warm)",
                    "\(row.readiness.leased)",
                    "\(row.spec.vcpus)/\(row.spec.maxVcpus)",
                    "\(MemoryQuantity.format(row.spec.memoryMiB))/\(MemoryQuantity.format(row.spec.maxMemoryMiB))",
                    row.spec.boot.rawValue, row.spec.state.rawValue,
                ]
            })
    }

    /// VMs; a HOST column when any VM runs on a named host (a shared store).
    static func vms(_ rows: [VMRow]) -> String {
        if rows.isEmpty { return "No VMs." }
        let hosts = rows.contains { !$0.record.host.isEmpty }
        var header = ["ID", "POOL", "STATE", "VCPUS", "MEMORY", "BOOT", "PID", "ADDRESS", "PORTS", "LEASE", "CREATED"]
        if hosts { header.insert("HOST", at: 2) }
        return table(
            header,
            rows.map { row in
                var cells = [
                    row.record.id, row.record.pool, row.state + (row.problem.map { " (\($0))" } ?? ""),
                    "\(row.record.shape.vcpus)", MemoryQuantity.format(row.record.shape.memoryMiB),
                    row.record.boot.rawValue, row.record.pid.map(String.init) ?? "-", row.address ?? "-", row.portsText,
                    row.record.lease?.holder ?? "-", JSONOutput.rfc3339(row.record.createdAt),
                ]
                if hosts { cells.insert(row.record.host, at: 2) }
                return cells
            })
    }

    /// The hosts of a shared store.
    static func hosts(_ rows: [HostRow]) -> String {
        if rows.isEmpty { return "No hosts have joined (a host joins with its first vmpool reconcile)." }
        return table(
            ["NAME", "STATE", "VMS", "VCPUS", "MEMORY", "HEARTBEAT", "EPOCH"],
            rows.map { row in
                [
                    row.record.name, row.state, "\(row.vms)", "\(row.usedVcpus)/\(row.record.capacity.vcpus)",
                    (row.usedMemoryMiB == 0 ? "0" : MemoryQuantity.format(row.usedMemoryMiB)) + "/"
                        + MemoryQuantity.format(row.record.capacity.memoryMiB),
                    "\(row.heartbeatAge)s ago", "\(row.record.epoch)",
                ]
            })
    }
}
