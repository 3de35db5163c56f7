/// A one-pool manifest as the QEMU suites write them: 1 vCPU, `memory`, `boot`, `state` when
/// given, then `extra` as given (spec lines indented by two spaces, each ending in a newline,
/// or a whole further document).
public func poolYAML(
    _ name: String, size: Int, memory: String = "256Mi", boot: String, state: String? = nil, extra: String = ""
) -> String {
    var lines = [
        "apiVersion: vmpool/v1", "kind: Pool", "metadata: {name: \(name)}", "spec:", "  size: \(size)", "  vcpus: 1",
        "  memory: \(memory)", "  boot: \(boot)",
    ]
    if let state { lines.append("  state: \(state)") }
    return lines.joined(separator: "\n") + "\n" + extra
}
