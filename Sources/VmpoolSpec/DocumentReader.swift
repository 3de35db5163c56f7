import Yams

/// Walks one composed YAML document into a `PoolSpec`, collecting every problem on the way.
///
/// The reader never descends into values it does not expect, so a hostile document costs
/// no more than the fields a pool has.
struct DocumentReader {
    let file: String
    /// Directory of the manifest, for resolving relative image paths.
    let baseDirectory: String
    private(set) var diagnostics: [Diagnostic] = []
    /// Where fields of the last pool read were written, by field path, for errors found later
    /// (a duplicate name, a missing image file).
    private(set) var fieldLocations: [String: SourceLocation] = [:]
    /// Fields merge keys (`<<`) may still bring into the current document: merges that share
    /// anchors would otherwise expand exponentially (a merge "bomb" of a kilobyte).
    private var mergeBudget = 0
    static let maxMergedFields = 10_000

    init(file: String, baseDirectory: String) {
        self.file = file
        self.baseDirectory = baseDirectory
    }

    mutating func readPool(_ root: Node) -> (PoolSpec, PoolOrigin)? {
        let start = diagnostics.count
        fieldLocations = [:]
        mergeBudget = Self.maxMergedFields
        guard
            let top = mapping(
                root, path: "", allowed: ["apiVersion", "kind", "metadata", "spec"],
                required: ["apiVersion", "kind", "metadata", "spec"])
        else { return nil }
        if let node = top["apiVersion"] { constant(node, path: "apiVersion", "vmpool/v1") }
        if let node = top["kind"] { constant(node, path: "kind", "Pool") }

        var name: String?
        var labels: [String: String] = [:]
        if let node = top["metadata"],
            let meta = mapping(node, path: "metadata", allowed: ["name", "labels"], required: ["name"])
        {
            if let nameNode = meta["name"], let value = string(nameNode, path: "metadata.name") {
                fieldLocations["metadata.name"] = location(nameNode)
                if Names.isValidPoolName(value) {
                    name = value
                } else {
                    report(
                        .badFormat, nameNode, "metadata.name",
                        "expected a name of 1 to 63 lowercase letters, digits and '-', starting and ending"
                            + " with a letter or digit, got \(Self.show(nameNode))")
                }
            }
            if let labelsNode = meta["labels"] { labels = readLabels(labelsNode) }
        }

        var spec: PoolSpec?
        if let node = top["spec"] { spec = readSpec(node, name: name ?? "", labels: labels) }
        guard diagnostics.count == start, let spec, name != nil else { return nil }
        return (spec, PoolOrigin(document: location(root), fields: fieldLocations))
    }

    private mutating func readLabels(_ node: Node) -> [String: String] {
        guard let pairs = pairs(node, path: "metadata.labels") else { return [:] }
        var labels: [String: String] = [:]
        for (keyNode, valueNode) in pairs {
            guard let key = keyNode.scalar?.string, keyNode.keyTagName == .str else {
                report(.wrongType, keyNode, "metadata.labels", "expected string label keys, got \(Self.show(keyNode))")
                continue
            }
            let path = "metadata.labels.\(key)"
            guard Names.isValidLabelKey(key) else {
                report(
                    .badFormat, keyNode, path,
                    "expected a label key of 1 to 63 letters, digits and '._/-', starting and ending with a"
                        + " letter or digit")
                continue
            }
            guard let value = string(valueNode, path: path) else { continue }
            if value.unicodeScalars.count > SpecLimits.maxLabelValueLength || Self.hasControl(value) {
                report(
                    .badFormat, valueNode, path,
                    "expected a label value of at most \(SpecLimits.maxLabelValueLength) characters without"
                        + " control characters")
                continue
            }
            labels[key] = value
        }
        return labels
    }

    private mutating func readSpec(_ node: Node, name: String, labels: [String: String]) -> PoolSpec? {
        guard
            let spec = mapping(
                node, path: "spec",
                allowed: [
                    "size", "vcpus", "memory", "maxVcpus", "maxMemory", "boot", "state", "warm", "image", "disks",
                    "network", "placement", "limits", "template",
                ],
                required: ["size", "vcpus", "memory"])
        else { return nil }
        let size = spec["size"].flatMap { integer($0, path: "spec.size", 0...SpecLimits.maxPoolSize) }
        let vcpus = spec["vcpus"].flatMap { integer($0, path: "spec.vcpus", 1...SpecLimits.maxVcpus) }
        let memory = spec["memory"].flatMap { quantity($0, path: "spec.memory") }
        let maxVcpus = spec["maxVcpus"].flatMap { integer($0, path: "spec.maxVcpus", 1...SpecLimits.maxVcpus) }
        let maxMemory = spec["maxMemory"].flatMap { quantity($0, path: "spec.maxMemory") }
        let boot = spec["boot"].flatMap { choice($0, path: "spec.boot", BootMode.self) }
        let state = spec["state"].flatMap { choice($0, path: "spec.state", DesiredState.self) }
        let warm = spec["warm"].flatMap { integer($0, path: "spec.warm", 0...SpecLimits.maxWarm) }
        let image = spec["image"].flatMap { readImage($0) }
        let disks = spec["disks"].flatMap { readDisks($0) }
        let network = spec["network"].flatMap { readNetwork($0, vms: (size ?? 0) + (warm ?? 0)) }
        let placement = spec["placement"].flatMap { choice($0, path: "spec.placement", Placement.self) }
        let limits = spec["limits"].flatMap { readLimits($0) }
        let template = spec["template"].flatMap { readTemplate($0) }

        // An invalid boot is reported as such; shareMemory is judged against a valid one (files,
        // setup and ready prepare VMs that boot cold too).
        if case .mapping(let fields) = spec["template"],
            let node = fields.first(where: { $0.key.scalar?.string == "shareMemory" })?.key,
            spec["boot"] == nil || boot != nil, boot != .template
        {
            report(
                .crossField, node, "spec.template.shareMemory",
                "only with boot: template (boot is \(boot?.rawValue ?? "cold, the default"))")
        }

        if let vcpus, let maxVcpus, let node = spec["vcpus"], maxVcpus < vcpus {
            report(.crossField, node, "spec.vcpus", "expected at most maxVcpus (\(maxVcpus)), got \(vcpus)")
        }
        if let memory, let maxMemory, let node = spec["maxMemory"], maxMemory < memory {
            report(
                .crossField, node, "spec.maxMemory",
                "expected a memory hotplug ceiling of at least memory (\(MemoryQuantity.format(memory)))"
                    + ", got \(MemoryQuantity.format(maxMemory))")
        }
        guard let size, let vcpus, let memory else { return nil }
        return PoolSpec(
            name: name, labels: labels, size: size, vcpus: vcpus, memoryMiB: memory, maxVcpus: maxVcpus,
            maxMemoryMiB: maxMemory, boot: boot ?? .cold, state: state ?? .running, warm: warm ?? 0,
            image: image, disks: disks ?? [], network: network, placement: placement ?? .spread,
            limits: limits ?? ResourceLimits(), template: template ?? TemplateSpec())
    }

    private mutating func readDisks(_ node: Node) -> [DiskSpec]? {
        guard case .sequence(let sequence) = node else {
            report(.wrongType, node, "spec.disks", "expected a sequence of disks, got \(Self.show(node))")
            return nil
        }
        guard sequence.count <= SpecLimits.maxDisks else {
            report(
                .outOfRange, node, "spec.disks", "expected at most \(SpecLimits.maxDisks) disks, got \(sequence.count)")
            return nil
        }
        var disks: [DiskSpec] = []
        var names: [String: Node] = [:]
        var failed = false
        for (index, item) in sequence.enumerated() {
            let path = "spec.disks[\(index)]"
            guard let disk = mapping(item, path: path, allowed: ["name", "image", "size"], required: ["name"]) else {
                failed = true
                continue
            }
            var name: String?
            if let nameNode = disk["name"], let value = string(nameNode, path: path + ".name") {
                if !Names.isValidDiskName(value) {
                    report(
                        .badFormat, nameNode, path + ".name",
                        "expected 1 to 32 lowercase letters, digits and '-', got \(Self.show(nameNode))")
                } else if let first = names[value] {
                    let at = location(first)
                    report(
                        .duplicateName, nameNode, path + ".name",
                        "disk \"\(value)\" is already defined at \(at.file):\(at.line):\(at.column)")
                } else {
                    names[value] = nameNode
                    name = value
                }
            }
            let image = disk["image"].flatMap { self.path($0, path: path + ".image") }
            let size = disk["size"].flatMap { diskSize($0, path: path + ".size") }
            if disk["image"] == nil, disk["size"] == nil {
                report(.missingField, item, path + ".size", "required for a disk without an image (an empty disk)")
                failed = true
            }
            guard let name, disk["image"] == nil || image != nil, disk["size"] == nil || size != nil else {
                failed = true
                continue
            }
            disks.append(DiskSpec(name: name, image: image, sizeMiB: size))
        }
        return failed ? nil : disks
    }

    private mutating func readNetwork(_ node: Node, vms: Int) -> NetworkSpec? {
        guard
            let network = mapping(
                node, path: "spec.network", allowed: ["mode", "ports", "bridge", "subnet", "egress", "isolate"],
                required: [])
        else { return nil }
        let start = diagnostics.count
        let mode = network["mode"].flatMap { choice($0, path: "spec.network.mode", NetworkMode.self) }
        if network["mode"] != nil, mode == nil { return nil }
        let chosen = mode ?? .user
        var result = NetworkSpec(mode: chosen)
        for (key, allowedIn) in [("ports", NetworkMode.user), ("bridge", .bridge), ("subnet", .bridge)]
        where network[key] != nil && chosen != allowedIn {
            report(
                .crossField, network[key]!, "spec.network.\(key)",
                "only with mode: \(allowedIn.rawValue) (mode is \(chosen.rawValue))")
        }
        for key in ["egress", "isolate"] where network[key] != nil && chosen == .none {
            report(
                .crossField, network[key]!, "spec.network.\(key)",
                "only with mode: user or bridge (mode is none: the VMs have no NIC)")
        }
        if chosen != .none {
            if let node = network["egress"] { result.egress = readEgress(node) ?? .all }
            if let node = network["isolate"] { result.isolate = boolean(node, path: "spec.network.isolate") ?? false }
        }
        if chosen == .user, let node = network["ports"] { result.ports = readPorts(node) ?? [] }
        if chosen == .bridge {
            if let node = network["bridge"], let name = string(node, path: "spec.network.bridge") {
                if Names.isValidInterfaceName(name) {
                    result.bridge = name
                } else {
                    report(
                        .badFormat, node, "spec.network.bridge",
                        "expected an interface name of 1 to 15 letters, digits, '_', '.' and '-', got \(Self.show(node))"
                    )
                }
            } else if network["bridge"] == nil {
                result.bridge = NetworkSpec.defaultBridge
            }
            if let node = network["subnet"] {
                fieldLocations["spec.network.subnet"] = location(node)
                if let text = string(node, path: "spec.network.subnet") {
                    switch IPv4Subnet.parse(text) {
                    case .success(let subnet) where subnet.assignable < vms + 1:
                        report(
                            .crossField, node, "spec.network.subnet",
                            "\(text) has \(subnet.assignable) addresses for VMs; the pool needs at least"
                                + " \(vms + 1) (size + warm + 1 for a replacement)")
                    case .success(let subnet):
                        result.subnet = subnet.description
                    case .failure(.hostBitsSet(let network)):
                        report(.badValue, node, "spec.network.subnet", Self.hostBits(text, network: "\(network)"))
                    case .failure(.malformed):
                        report(
                            .badFormat, node, "spec.network.subnet",
                            "expected an IPv4 network in CIDR form with a prefix of 8 to 29 and no host bits set,"
                                + " like 10.77.0.0/24, got \(Self.show(node))")
                    }
                }
            } else {
                report(.missingField, node, "spec.network.subnet", "required with mode: bridge")
            }
        }
        return diagnostics.count == start ? result : nil
    }

    private mutating func readEgress(_ node: Node) -> EgressPolicy? {
        let path = "spec.network.egress"
        let expectation = "expected all, none or a list of rules (CIDRs, each optionally with :PORT)"
        if case .scalar(let scalar) = node, node.tagName == .str {
            switch scalar.string {
            case "all": return .all
            case "none": return EgressPolicy.none
            default:
                let hint =
                    if case .success = EgressRule.parse(scalar.string) {
                        "; write a single rule as a list: [\(scalar.string)]"
                    } else { "" }
                report(.badValue, node, path, "\(expectation), got \(Self.show(node))\(hint)")
                return nil
            }
        }
        guard case .sequence(let sequence) = node else {
            report(.wrongType, node, path, "\(expectation), got \(Self.show(node))")
            return nil
        }
        guard !sequence.isEmpty else {
            report(.outOfRange, node, path, "expected at least one rule; for no egress at all, write egress: none")
            return nil
        }
        guard sequence.count <= SpecLimits.maxEgressRules else {
            report(
                .outOfRange, node, path,
                "expected at most \(SpecLimits.maxEgressRules) rules, got \(sequence.count)")
            return nil
        }
        var rules: [EgressRule] = []
        var seen: [EgressRule: Node] = [:]
        var failed = false
        for (index, item) in sequence.enumerated() {
            guard let rule = readEgressRule(item, path: "\(path)[\(index)]") else {
                failed = true
                continue
            }
            if let first = seen[rule] {
                let at = location(first)
                let same = first.scalar?.string == item.scalar?.string ? "" : " (as \(rule))"
                report(
                    .duplicateName, item, "\(path)[\(index)]",
                    "rule \(Self.show(item)) is already listed\(same) at \(at.file):\(at.line):\(at.column)")
                failed = true
                continue
            }
            seen[rule] = item
            rules.append(rule)
        }
        return failed ? nil : .allow(rules)
    }

    private mutating func readEgressRule(_ node: Node, path: String) -> EgressRule? {
        let expectation =
            "expected an IPv4 or IPv6 network in CIDR form, optionally with :PORT (10.20.0.0/16, 192.0.2.7/32:443,"
            + " 2001:db8::/32, [2001:db8::/32]:443)"
        guard case .scalar(let scalar) = node, node.tagName == .str else {
            report(.wrongType, node, path, "\(expectation), got \(Self.show(node))")
            return nil
        }
        switch EgressRule.parse(scalar.string) {
        case .success(let rule):
            return rule
        case .failure(.malformed):
            report(.badFormat, node, path, "\(expectation), got \(Self.show(node))")
        case .failure(.portOutOfRange(let port)):
            report(.outOfRange, node, path, "expected a port from 1 to 65535, got \(port)")
        case .failure(.hostBitsSet(let suggestion)):
            report(.badValue, node, path, Self.hostBits(scalar.string, network: "\(suggestion)"))
        }
        return nil
    }

    /// The message for a network written with host bits set, suggesting its network address.
    static func hostBits(_ text: String, network: String) -> String {
        "\(text) has host bits set (bits past the prefix); did you mean \(network)?"
    }

    private mutating func readLimits(_ node: Node) -> ResourceLimits? {
        guard let limits = mapping(node, path: "spec.limits", allowed: ["cpu", "ioWeight"], required: []) else {
            return nil
        }
        var result = ResourceLimits()
        result.cpuPercent = limits["cpu"].flatMap { percent($0, path: "spec.limits.cpu", SpecLimits.cpuPercent) }
        result.ioWeight = limits["ioWeight"].flatMap { integer($0, path: "spec.limits.ioWeight", SpecLimits.ioWeight) }
        return result
    }

    /// Template options, one entry per key: adding one is a key here and a field of `TemplateSpec`.
    private mutating func readTemplate(_ node: Node) -> TemplateSpec? {
        guard
            let template = mapping(
                node, path: "spec.template", allowed: ["shareMemory", "files", "setup", "ready"], required: [])
        else { return nil }
        var result = TemplateSpec()
        var failed = false
        if let node = template["shareMemory"] {
            if let value = boolean(node, path: "spec.template.shareMemory") {
                result.shareMemory = value
            } else {
                failed = true
            }
        }
        if let node = template["files"] {
            if let files = readTemplateFiles(node) { result.files = files } else { failed = true }
        }
        if let node = template["setup"] {
            if let steps = readSetup(node) { result.setup = steps } else { failed = true }
        }
        if let node = template["ready"] {
            if let ready = readReady(node) { result.ready = ready } else { failed = true }
        }
        return failed ? nil : result
    }

    private mutating func readTemplateFiles(_ node: Node) -> [TemplateFile]? {
        guard case .sequence(let sequence) = node else {
            report(
                .wrongType, node, "spec.template.files",
                "expected a sequence of {src, dst} files, got \(Self.show(node))")
            return nil
        }
        guard sequence.count <= SpecLimits.maxTemplateFiles else {
            report(
                .outOfRange, node, "spec.template.files",
                "expected at most \(SpecLimits.maxTemplateFiles) files, got \(sequence.count)")
            return nil
        }
        var files: [TemplateFile] = []
        var failed = false
        for (index, item) in sequence.enumerated() {
            let field = "spec.template.files[\(index)]"
            guard let entry = mapping(item, path: field, allowed: ["src", "dst"], required: ["src", "dst"]),
                let srcNode = entry["src"], let dstNode = entry["dst"],
                let src = path(srcNode, path: field + ".src"), let dst = guestPath(dstNode, path: field + ".dst")
            else {
                failed = true
                continue
            }
            files.append(TemplateFile(src: src, dst: dst))
        }
        return failed ? nil : files
    }

    private mutating func readSetup(_ node: Node) -> [SetupStep]? {
        guard case .sequence(let sequence) = node else {
            report(
                .wrongType, node, "spec.template.setup",
                "expected a sequence of steps (a shell line, or a list of arguments), got \(Self.show(node))")
            return nil
        }
        guard sequence.count <= SpecLimits.maxSetupSteps else {
            report(
                .outOfRange, node, "spec.template.setup",
                "expected at most \(SpecLimits.maxSetupSteps) steps, got \(sequence.count)")
            return nil
        }
        var steps: [SetupStep] = []
        var failed = false
        for (index, item) in sequence.enumerated() {
            if let step = readStep(item, path: "spec.template.setup[\(index)]") {
                steps.append(step)
            } else {
                failed = true
            }
        }
        return failed ? nil : steps
    }

    /// A shell line (`/bin/sh -c LINE`) or an argument vector.
    private mutating func readStep(_ node: Node, path field: String) -> SetupStep? {
        let expectation = "expected a shell line or a list of 1 to \(SpecLimits.maxStepArguments) arguments"
        switch node {
        case .scalar:
            guard let line = stepText(node, path: field) else { return nil }
            return SetupStep(shell: line)
        case .sequence(let sequence):
            guard (1...SpecLimits.maxStepArguments).contains(sequence.count) else {
                report(.outOfRange, node, field, "\(expectation), got \(sequence.count) arguments")
                return nil
            }
            var argv: [String] = []
            for (index, item) in sequence.enumerated() {
                guard let argument = stepText(item, path: "\(field)[\(index)]", allowEmpty: index > 0) else {
                    return nil
                }
                argv.append(argument)
            }
            return SetupStep(argv: argv)
        default:
            report(.wrongType, node, field, "\(expectation), got \(Self.show(node))")
            return nil
        }
    }

    /// A step's text: a string (a number is refused, as in a container's command: quote it),
    /// no NUL, bounded.
    private mutating func stepText(_ node: Node, path field: String, allowEmpty: Bool = false) -> String? {
        guard case .scalar(let scalar) = node, node.tagName == .str else {
            report(.wrongType, node, field, "expected a string (quote numbers: \"8080\"), got \(Self.show(node))")
            return nil
        }
        let text = scalar.string
        guard allowEmpty || !text.isEmpty, text.unicodeScalars.count <= SpecLimits.maxStepText,
            !text.utf8.contains(0)
        else {
            report(
                .badFormat, node, field,
                "expected \(allowEmpty ? "" : "non-empty ")text of at most \(SpecLimits.maxStepText) characters"
                    + " without NUL")
            return nil
        }
        return text
    }

    private mutating func readReady(_ node: Node) -> ReadyCheck? {
        guard
            let ready = mapping(node, path: "spec.template.ready", allowed: ["exec", "port", "timeout"], required: [])
        else { return nil }
        var check = ReadyCheck()
        var failed = false
        if let node = ready["exec"] {
            if let step = readStep(node, path: "spec.template.ready.exec") { check.exec = step } else { failed = true }
        }
        if let node = ready["port"] {
            if let port = integer(node, path: "spec.template.ready.port", 1...65535) {
                check.port = port
            } else {
                failed = true
            }
        }
        if let node = ready["timeout"] {
            if let seconds = wholeDuration(node, path: "spec.template.ready.timeout", SpecLimits.readyTimeoutSeconds) {
                check.timeoutSeconds = seconds
            } else {
                failed = true
            }
        }
        if !failed, check.exec == nil, check.port == nil {
            report(.missingField, node, "spec.template.ready", "expected exec, port or both")
            failed = true
        }
        return failed ? nil : check
    }

    /// A whole number of seconds, minutes or hours (`90s`, `2m`, `1h`), in seconds within `range`.
    private mutating func wholeDuration(_ node: Node, path field: String, _ range: ClosedRange<Int>) -> Int? {
        let expectation =
            "expected a whole number of seconds, minutes or hours from \(range.lowerBound)s to"
            + " \(range.upperBound / 60)m (90s, 2m, 1h)"
        let units: [Character: Int] = ["s": 1, "m": 60, "h": 3600]
        guard case .scalar(let scalar) = node, node.tagName == .str, let unit = scalar.string.last,
            let scale = units[unit], let value = IPNetwork.decimal(scalar.string.dropLast(), maxDigits: 5)
        else {
            report(.badFormat, node, field, "\(expectation), got \(Self.show(node))")
            return nil
        }
        guard range.contains(value * scale) else {
            report(.outOfRange, node, field, "\(expectation), got \(scalar.string)")
            return nil
        }
        return value * scale
    }

    /// An absolute guest path other than `/`, without control characters.
    private mutating func guestPath(_ node: Node, path field: String) -> String? {
        guard let value = string(node, path: field) else { return nil }
        let count = value.unicodeScalars.count
        guard value.hasPrefix("/"), value != "/", count <= SpecLimits.maxPathLength, !Self.hasControl(value) else {
            report(
                .badFormat, node, field,
                "expected an absolute guest path (not /) of at most \(SpecLimits.maxPathLength) characters"
                    + " without control characters, got \(Self.show(node))")
            return nil
        }
        return value
    }

    private mutating func readPorts(_ node: Node) -> [Int]? {
        guard case .sequence(let sequence) = node else {
            report(.wrongType, node, "spec.network.ports", "expected a sequence of TCP ports, got \(Self.show(node))")
            return nil
        }
        guard sequence.count <= SpecLimits.maxPorts else {
            report(
                .outOfRange, node, "spec.network.ports",
                "expected at most \(SpecLimits.maxPorts) ports, got \(sequence.count)")
            return nil
        }
        var ports: [Int] = []
        for (index, item) in sequence.enumerated() {
            guard let port = integer(item, path: "spec.network.ports[\(index)]", 1...65535) else { continue }
            if ports.contains(port) {
                report(.duplicateName, item, "spec.network.ports[\(index)]", "port \(port) is listed twice")
                continue
            }
            ports.append(port)
        }
        return ports
    }

    private mutating func diskSize(_ node: Node, path: String) -> Int? {
        fieldLocations[path] = location(node)
        let expectation =
            "expected a disk size from 1Mi to 64Ti: an integer number of MiB (4096), or a string like 512Mi, 4Gi or 1Ti"
        if let value = Self.integerValue(node) {
            guard value >= 1, value <= SpecLimits.maxDiskMiB else {
                report(.outOfRange, node, path, "\(expectation), got \(value)")
                return nil
            }
            return value
        }
        guard case .scalar(let scalar) = node, node.tagName == .str, let value = DiskQuantity.parse(scalar.string)
        else {
            report(.badFormat, node, path, "\(expectation), got \(Self.show(node))")
            return nil
        }
        return value
    }

    private mutating func readImage(_ node: Node) -> ImageSpec? {
        guard
            let image = mapping(
                node, path: "spec.image", allowed: ["kernel", "initrd", "cmdline"], required: [])
        else { return nil }
        if image["kernel"] == nil, let initrd = image["initrd"] {
            report(.crossField, initrd, "spec.image.initrd", "an initrd needs its kernel: give spec.image.kernel too")
            return nil
        }
        let kernel = image["kernel"].flatMap { path($0, path: "spec.image.kernel") }
        let initrd = image["initrd"].flatMap { path($0, path: "spec.image.initrd") }
        var cmdline: String?
        if let cmdNode = image["cmdline"], let value = string(cmdNode, path: "spec.image.cmdline") {
            if value.unicodeScalars.count > SpecLimits.maxCmdlineLength || Self.hasControl(value) {
                report(
                    .badFormat, cmdNode, "spec.image.cmdline",
                    "expected a kernel command line of at most \(SpecLimits.maxCmdlineLength) characters"
                        + " without control characters")
            } else {
                cmdline = value
            }
        }
        if image["kernel"] != nil, kernel == nil { return nil }
        if image["initrd"] != nil, initrd == nil { return nil }
        if image["cmdline"] != nil, cmdline == nil { return nil }
        return ImageSpec(kernel: kernel, initrd: initrd, cmdline: cmdline)
    }

    // MARK: - Typed readers

    private mutating func path(_ node: Node, path field: String) -> String? {
        guard let value = string(node, path: field) else { return nil }
        fieldLocations[field] = location(node)
        let count = value.unicodeScalars.count
        guard count >= 1, count <= SpecLimits.maxPathLength, !Self.hasControl(value) else {
            report(
                .badFormat, node, field,
                "expected a file path of 1 to \(SpecLimits.maxPathLength) characters without control characters")
            return nil
        }
        if value.hasPrefix("/") { return value }
        return baseDirectory == "." ? value : baseDirectory + "/" + value
    }

    private mutating func constant(_ node: Node, path: String, _ expected: String) {
        if node.scalar?.string != expected || node.tagName != .str {
            report(.badValue, node, path, "expected \"\(expected)\", got \(Self.show(node))")
        }
    }

    private mutating func string(_ node: Node, path: String) -> String? {
        guard case .scalar(let scalar) = node, node.tagName == .str else {
            report(.wrongType, node, path, "expected a string, got \(Self.show(node))")
            return nil
        }
        return scalar.string
    }

    private mutating func boolean(_ node: Node, path: String) -> Bool? {
        guard case .scalar(let scalar) = node, node.tagName == .bool, let value = Bool.construct(from: scalar) else {
            report(.wrongType, node, path, "expected true or false, got \(Self.show(node))")
            return nil
        }
        return value
    }

    /// `N%` with N in `range`, no leading zeros.
    private mutating func percent(_ node: Node, path: String, _ range: ClosedRange<Int>) -> Int? {
        let expectation =
            "expected a percentage from \(range.lowerBound)% to \(range.upperBound)% (an integer followed by %)"
        if let value = Self.integerValue(node) {
            report(.wrongType, node, path, "\(expectation), got \(value); write \(value)%")
            return nil
        }
        guard case .scalar(let scalar) = node, node.tagName == .str, scalar.string.hasSuffix("%"),
            let value = IPNetwork.decimal(scalar.string.dropLast(), maxDigits: 6)
        else {
            report(.badFormat, node, path, "\(expectation), got \(Self.show(node))")
            return nil
        }
        guard range.contains(value) else {
            report(.outOfRange, node, path, "\(expectation), got \(scalar.string)")
            return nil
        }
        return value
    }

    private mutating func choice<T: RawRepresentable & CaseIterable>(_ node: Node, path: String, _: T.Type) -> T?
    where T.RawValue == String {
        let options = T.allCases.map(\.rawValue).joined(separator: " or ")
        guard case .scalar(let scalar) = node, node.tagName == .str, let value = T(rawValue: scalar.string) else {
            report(.badValue, node, path, "expected \(options), got \(Self.show(node))")
            return nil
        }
        return value
    }

    private mutating func integer(_ node: Node, path: String, _ range: ClosedRange<Int>) -> Int? {
        let expectation = "expected an integer from \(range.lowerBound) to \(range.upperBound)"
        guard let value = Self.integerValue(node) else {
            report(.wrongType, node, path, "\(expectation), got \(Self.show(node))")
            return nil
        }
        guard range.contains(value) else {
            report(.outOfRange, node, path, "\(expectation), got \(value)")
            return nil
        }
        return value
    }

    private mutating func quantity(_ node: Node, path: String) -> Int? {
        if let value = Self.integerValue(node) {
            guard value >= SpecLimits.minMemoryMiB, value <= SpecLimits.maxMemoryMiB else {
                report(.outOfRange, node, path, "\(MemoryQuantity.expectation), got \(value)")
                return nil
            }
            return value
        }
        guard case .scalar(let scalar) = node, node.tagName == .str, let value = MemoryQuantity.parse(scalar.string)
        else {
            report(.badFormat, node, path, "\(MemoryQuantity.expectation), got \(Self.show(node))")
            return nil
        }
        return value
    }

    /// YAML 1.1 integers, plus floats with an integral value (JSON Schema counts `3.0` as an integer).
    static func integerValue(_ node: Node) -> Int? {
        guard case .scalar(let scalar) = node else { return nil }
        switch node.tagName {
        case .int:
            return Int.construct(from: scalar)
        case .float:
            // YAML 1.1 floats need a dot (`1e3` is a string there); underscores are digit separators.
            let text = scalar.string.replacingOccurrences(of: "_", with: "")
            guard text.wholeMatch(of: /[-+]?[0-9]*\.[0-9]*([eE][-+][0-9]+)?/) != nil, let value = Double(text),
                value.isFinite, value.magnitude < 1e15, value == value.rounded()
            else { return nil }
            return Int(value)
        default:
            return nil
        }
    }

    // MARK: - Mappings

    /// The pairs of a mapping node, with `<<` merge keys applied (explicit keys win).
    private mutating func pairs(_ node: Node, path: String, depth: Int = 0) -> [(Node, Node)]? {
        guard case .mapping(let mapping) = node else {
            report(.wrongType, node, path.isEmpty ? "(document)" : path, "expected a mapping, got \(Self.show(node))")
            return nil
        }
        var explicit: [(Node, Node)] = []
        var merged: [(Node, Node)] = []
        for (key, value) in mapping {
            guard key.keyTagName == .merge else {
                explicit.append((key, value))
                continue
            }
            guard depth < 8 else {
                report(.tooDeep, key, path, "merge keys ('<<') nest deeper than 8 levels")
                return nil
            }
            let sources: [Node]
            if case .sequence(let sequence) = value { sources = Array(sequence) } else { sources = [value] }
            for source in sources {
                guard let more = pairs(source, path: path, depth: depth + 1) else { return nil }
                mergeBudget -= more.count
                guard mergeBudget >= 0 else {
                    report(
                        .tooManyAliases, key, path.isEmpty ? "(document)" : path,
                        "merge keys ('<<') bring in more than \(Self.maxMergedFields) fields; a pool needs a handful")
                    return nil
                }
                merged.append(contentsOf: more)
            }
        }
        let explicitKeys = Set(explicit.compactMap { $0.0.scalar?.string })
        var seen = Set<String>()
        var result = explicit
        for (key, value) in merged {
            guard let name = key.scalar?.string else {
                result.append((key, value))
                continue
            }
            if explicitKeys.contains(name) || !seen.insert(name).inserted { continue }
            result.append((key, value))
        }
        return result
    }

    /// The value nodes of a mapping by key, reporting unknown and missing keys.
    private mutating func mapping(_ node: Node, path: String, allowed: Set<String>, required: [String]) -> [String:
        Node]?
    {
        guard let pairs = pairs(node, path: path) else { return nil }
        var result: [String: Node] = [:]
        let prefix = path.isEmpty ? "" : path + "."
        for (key, value) in pairs {
            guard case .scalar(let scalar) = key, key.keyTagName == .str else {
                report(
                    .wrongType, key, path.isEmpty ? "(document)" : path, "expected string keys, got \(Self.show(key))")
                continue
            }
            guard allowed.contains(scalar.string) else {
                let known = allowed.sorted().joined(separator: ", ")
                report(.unknownField, key, prefix + scalar.string, "unknown field; expected one of \(known)")
                continue
            }
            result[scalar.string] = value
        }
        for key in required where result[key] == nil {
            report(.missingField, node, prefix + key, "required field is missing")
        }
        return result
    }

    // MARK: - Reporting

    private func location(_ node: Node) -> SourceLocation {
        let mark = node.mark
        return SourceLocation(file: file, line: mark?.line ?? 1, column: mark?.column ?? 1)
    }

    private mutating func report(_ code: Diagnostic.Code, _ node: Node, _ field: String, _ message: String) {
        diagnostics.append(Diagnostic(code, at: location(node), field: field, message))
    }

    static func hasControl(_ value: String) -> Bool {
        value.unicodeScalars.contains { $0.value < 0x20 || $0.value == 0x7F }
    }

    /// A short, safe rendering of what the user wrote.
    static func show(_ node: Node) -> String {
        switch node {
        case .scalar(let scalar):
            let text = scalar.string.count > 40 ? String(scalar.string.prefix(40)) + "…" : scalar.string
            let quoted =
                "\""
                + text.unicodeScalars.map {
                    $0.value < 0x20 || $0 == "\"" || $0 == "\\" ? $0.escaped(asASCII: false) : String($0)
                }.joined() + "\""
            switch node.tagName {
            case .str: return quoted
            case .null: return "null"
            case .bool: return "\(text) (a YAML boolean; quote it if you mean a string)"
            case .int, .float: return text
            default: return "\(quoted) (a YAML \(node.tag.rawValue.split(separator: ":").last ?? "value"))"
            }
        case .mapping: return "a mapping"
        case .sequence: return "a sequence"
        case .alias: return "an alias"
        }
    }
}

extension Node {
    /// The YAML 1.1 type of a value node (`str`, `int`, `bool`, ...).
    ///
    /// Documents are parsed with Yams' rule-less resolver (see `ScalarResolver`): an untagged
    /// plain scalar is typed here from its text; an explicit tag (`!!str 5`) is kept.
    var tagName: Tag.Name {
        guard case .scalar(let scalar) = self else { return Tag.Name(rawValue: tag.rawValue) }
        let name = Tag.Name(rawValue: scalar.tag.rawValue)
        guard scalar.style == .plain || scalar.style == .any, name == .implicit else {
            return name == .implicit ? .str : name
        }
        return ScalarResolver.resolve(scalar.string)
    }

    /// The YAML 1.1 type of a mapping key. Yams has already resolved key tags in place while
    /// checking for duplicates, so an explicit `!!str` on a plain key cannot be told from none
    /// and plain keys are always typed from their text.
    var keyTagName: Tag.Name {
        guard case .scalar(let scalar) = self, scalar.style == .plain || scalar.style == .any else { return tagName }
        let name = Tag.Name(rawValue: scalar.tag.rawValue)
        return name == .implicit || name == .str ? ScalarResolver.resolve(scalar.string) : name
    }
}
