import VmpoolDriver
import VmpoolPlanner
import VmpoolReconciler
import VmpoolSpec

/// Renders plans the way `terraform plan` does: a symbol per change, a summary line.
enum PlanRenderer {
    static func symbol(_ kind: Action.Kind) -> String {
        switch kind {
        case .create, .clone, .buildTemplate: "+"
        case .resume, .pause, .hotplugCPU, .hotplugMemory: "~"
        case .replace: "-/+"
        case .stop, .deletePool, .deleteTemplate: "-"
        }
    }

    static func line(_ action: Action) -> String {
        var parts = [symbol(action.kind).padding(toLength: 3, withPad: " ", startingAt: 0), action.kind.rawValue]
        if let vm = action.vm { parts.append(vm) }
        if let template = action.template { parts.append(template) }
        if let state = action.state, action.kind != .replace || state == .paused { parts.append("(\(state.rawValue))") }
        return "  " + parts.joined(separator: " ") + "  # " + action.reason
    }

    static func text(_ plan: Plan, pools: [PoolSpec]) -> String {
        guard !plan.isEmpty else { return "No changes. The host matches the manifests." }
        var lines: [String] = []
        var currentPool: String?
        for action in plan.actions {
            if action.pool != currentPool {
                currentPool = action.pool
                lines.append("pool \(action.pool):")
            }
            lines.append(line(action))
        }
        lines.append("")
        lines.append("Plan: " + summaryText(plan.summary))
        return lines.joined(separator: "\n")
    }

    static func text(_ result: Reconciler.PassResult) -> String {
        var lines: [String] = []
        let recovery = result.recovery
        if !recovery.isEmpty {
            lines.append(
                "recovered: \(recovery.unfinished) interrupted operations, \(recovery.undoneLaunches.count) half-made"
                    + " VMs undone, \(recovery.orphansStopped.count) orphans stopped,"
                    + " \(recovery.templatesRemoved.count) stale templates removed")
        }
        if result.results.isEmpty {
            lines.append("No changes. The host matches the desired pools.")
            return lines.joined(separator: "\n")
        }
        var currentPool: String?
        for item in result.results {
            if item.action.pool != currentPool {
                currentPool = item.action.pool
                lines.append("pool \(item.action.pool):")
            }
            var text = line(item.action)
            if let vm = item.createdVM { text += " → \(vm)" }
            switch (item.outcome, item.note) {
            case (.ok, nil): text += "  [ok]"
            case (.ok, let note?): text += "  [ok, nothing done: \(note)]"
            case (.failed, _): text += "  [failed: \(item.error ?? "unknown")]"
            }
            lines.append(text)
        }
        let failed = result.results.filter { $0.outcome == .failed }.count
        var done: [Action.Kind: Int] = [:]
        for item in result.results where item.outcome == .ok && item.note == nil {
            done[item.action.kind, default: 0] += 1
        }
        lines.append("")
        let applied = summaryText(done)
        lines.append("Applied: " + (applied.isEmpty ? "nothing" : applied) + "; \(failed) failed.")
        return lines.joined(separator: "\n")
    }

    static func summaryText(_ summary: [Action.Kind: Int]) -> String {
        Action.Kind.allCases.compactMap { kind in
            guard let count = summary[kind], count > 0 else { return nil }
            return "\(count) \(kind.rawValue)"
        }.joined(separator: ", ")
    }

    /// `{"actions": [...], "summary": {...}}`; with results for apply.
    static func json(_ plan: Plan, results: [ActionResult]?) throws -> String {
        let actions: [JSONValue] = plan.actions.enumerated().map { index, action in
            var object: [String: JSONValue] = [
                "action": .string(action.kind.rawValue), "pool": .string(action.pool),
                "vm": action.vm.map { .string($0) } ?? .null, "reason": .string(action.reason),
                "template": action.template.map { .string($0) } ?? .null,
                "dependsOn": .array(action.dependsOn.map { .int($0) }),
            ]
            if let state = action.state { object["state"] = .string(state.rawValue) }
            if let change = action.vcpus {
                object["vcpus"] = .object(["from": .int(change.from), "to": .int(change.to)])
            }
            if let change = action.memoryMiB {
                object["memoryMiB"] = .object(["from": .int(change.from), "to": .int(change.to)])
            }
            if let results, index < results.count {
                let result = results[index]
                object["result"] = .string(result.outcome.rawValue)
                object["error"] = result.error.map { .string($0) } ?? .null
                if let code = result.code { object["errorCode"] = .string(code.description) }
                if let created = result.createdVM { object["createdVM"] = .string(created) }
                if let note = result.note { object["note"] = .string(note) }
            }
            return .object(object)
        }
        var summary: [String: JSONValue] = [:]
        for (kind, count) in plan.summary { summary[kind.rawValue] = .int(count) }
        summary["total"] = .int(plan.actions.count)
        if let results {
            summary["ok"] = .int(results.filter { $0.outcome == .ok }.count)
            summary["failed"] = .int(results.filter { $0.outcome == .failed }.count)
        }
        return try JSONOutput.encode(.object(["actions": .array(actions), "summary": .object(summary)]))
    }
}
