import ArgumentParser
import Foundation
import Logging
import VmpoolDriver
import VmpoolImage
import VmpoolReconciler
import VmpoolSpec
import VmpoolStore
import VmpoolStorePostgres

/// What a command needs to act on a state dir: store, driver, reconciler, and (for
/// commands that change anything) the state dir lock.
struct Session {
    let options: GlobalOptions
    let logger: Logger
    let store: StateStore
    let reconciler: Reconciler
    /// Held for the session's lifetime when the command changes state.
    let lock: StateLock?

    /// The state dir, resolved to its real path.
    let stateDirectory: String
    /// This host's part in a cluster, on a shared (PostgreSQL) store.
    let cluster: ClusterMember?

    /// The live progress line, when a pass runs on a terminal.
    let progress: ProgressLine?

    /// Opens the state dir. `locking` names the command for the lock holder record; such a
    /// session holds the lock until it ends. `create` makes an absent state dir, else an
    /// absent one is an error (observers never create one).
    init(
        _ options: GlobalOptions, locking command: String?, create: Bool = true, parallelism: Int = 4,
        timeout: Duration? = nil, showProgress: Bool = false, capacity: HostCapacity? = nil
    ) async throws {
        self.options = options
        let progress = showProgress && ProgressLine.wanted(options) ? ProgressLine(verb: command ?? "pass") : nil
        self.progress = progress
        let logger = try options.makeLogger(quiet: progress != nil)
        self.logger = logger
        let dir: String
        let store: StateStore
        if options.sharedStore {
            // The state dir holds only this host's runtime files: observers on any host may
            // make it, once the store has answered. A host that cannot get an answer within
            // half its timeout is as good as cut off.
            let location = try options.storeLocation(stateDirectory: options.givenStateDir)
            let hostTimeout = try options.resolvedHostTimeout()
            let storeTimeout = max(.seconds(2), min(.seconds(10), hostTimeout / 2))
            store = try StateStore.open(
                location, directory: options.givenStateDir, host: try options.resolvedHost(), timeout: storeTimeout,
                logger: logger)
            dir = try options.stateDirectory(create: false)
            cluster = ClusterMember(store: store, hostTimeout: hostTimeout, capacity: capacity, logger: logger)
            lock = try command.map { command in try Self.lock(dir, command: command, options: options, logger: logger) }
        } else {
            dir = try options.stateDirectory(create: create)
            lock = try command.map { command in try Self.lock(dir, command: command, options: options, logger: logger) }
            store = try StateStore.open(
                try options.storeLocation(stateDirectory: dir), directory: dir, logger: logger)
            cluster = nil
        }
        stateDirectory = dir
        self.store = store
        let driver = try options.makeDriver(stateDirectory: dir, logger: logger)
        let defaultImage: BootImage? =
            driver.name == "sim" ? GuestImage.simDefault : GuestImage.installed(stateDirectory: dir)
        let standbys = try options.resolvedStandbys()
        var configuration = ReconcilerConfiguration(
            parallelism: parallelism, defaultImage: defaultImage, timeout: timeout, standbys: standbys)
        if let progress { configuration.progress = { progress.update($0) } }
        configuration.cluster = cluster
        reconciler = Reconciler(store: store, driver: driver, configuration: configuration, logger: logger)
    }
}

extension Session {
    /// Takes the state dir lock for `command`, waiting up to `--lock-timeout`.
    static func lock(_ dir: String, command: String, options: GlobalOptions, logger: Logger) throws -> StateLock {
        try StateLock.acquire(directory: dir, command: command, timeout: try options.resolvedLockTimeout()) {
            holder in
            let who = holder.map { "held by \($0)" } ?? "held by another vmpool"
            logger.notice("waiting for the state dir lock (\(who))")
        }
    }
}

/// Turns library errors into the one-line messages users see, and exit code 1.
struct CommandFailure: Error, CustomStringConvertible {
    let description: String
}

/// Loads manifests or prints every diagnostic and fails. Directories without manifests are
/// named on stderr; `--prune` with no pools at all is refused unless `allowEmpty`, since it
/// would delete every pool (as kubectl refuses an empty prune). A `command` that has nothing
/// to do without pools (`apply`) refuses an input with none, as kubectl's "no
/// objects passed to apply" does, so an empty pipe or a mistyped directory is never taken for
/// success. `rejected` sees the diagnostics before the command fails.
func loadManifests(
    _ paths: [String], prune: Bool = false, allowEmpty: Bool = false, refusingEmptyFor command: String? = nil,
    rejected: ([Diagnostic]) -> Void = { _ in }
) throws -> ManifestSet {
    let manifests: ManifestSet
    do {
        manifests = try ManifestLoader.load(paths: paths)
    } catch {
        rejected(error.diagnostics)
        printDiagnostics(error.diagnostics)
        throw ExitCode.failure
    }
    for directory in manifests.emptyDirectories {
        printError("warning: \(directory) holds no *.yaml or *.yml file")
    }
    if prune && manifests.pools.isEmpty && !allowEmpty {
        throw CommandFailure(
            description: "refusing --prune with no pools in the input: it would delete every applied pool;"
                + " pass --allow-empty if that is what you want")
    }
    if let command, manifests.pools.isEmpty && !(prune && allowEmpty) {
        throw CommandFailure(description: noPoolsMessage(command, paths: paths))
    }
    return manifests
}

/// Why an input with no pools is refused, naming what was read.
func noPoolsMessage(_ command: String, paths: [String]) -> String {
    let shown = paths.map { $0 == ManifestLoader.standardInput ? "<stdin>" : $0 }.joined(separator: ", ")
    return "no pools passed to \(command): \(shown.isEmpty ? "the input" : shown) holds no Pool document;"
        + " nothing was changed"
}

func printDiagnostics(_ diagnostics: [Diagnostic]) {
    for diagnostic in diagnostics { printError(diagnostic.description) }
    printError("\(diagnostics.count) error\(diagnostics.count == 1 ? "" : "s") in the input; nothing was changed")
}

/// Checks that the files manifests name are there and are what they must be (kernel and
/// initrd readable; disk images qcow2 or raw, not larger than the disk), reporting each
/// problem at its field. Nothing reaches the store or the hypervisor otherwise.
func checkImages(_ manifests: ManifestSet, rejected: ([Diagnostic]) -> Void = { _ in }) throws {
    let diagnostics = imageDiagnostics(manifests)
    if !diagnostics.isEmpty {
        rejected(diagnostics)
        printDiagnostics(diagnostics)
        throw ExitCode.failure
    }
}

/// The problems `checkImages` reports, each at its field.
func imageDiagnostics(_ manifests: ManifestSet) -> [Diagnostic] {
    var diagnostics: [Diagnostic] = []
    for pool in manifests.pools {
        guard let origin = manifests.origins[pool.name] else { continue }
        if let image = pool.image {
            for (field, path) in [("spec.image.kernel", image.kernel), ("spec.image.initrd", image.initrd)] {
                guard let path, access(path, R_OK) != 0 else { continue }
                diagnostics.append(
                    Diagnostic(
                        .imageNotFound, at: origin.location(of: field), field: field,
                        "file \(path) does not exist or is not readable"))
            }
        }
        for (field, problem) in DiskImages.resolve(pool.disks).problems {
            diagnostics.append(
                Diagnostic(.imageNotFound, at: origin.location(of: field), field: field, problem.message))
        }
        do { _ = try Preparation.resolve(pool.template) } catch {
            diagnostics.append(
                Diagnostic(.imageNotFound, at: origin.location(of: error.field), field: error.field, error.message))
        }
        if let network = pool.network, network.mode == .bridge, let text = network.subnet,
            let subnet = IPv4Subnet(text)
        {
            let collisions = HostRoutes.overlappingRoutes(subnet, except: network.bridge)
            if !collisions.isEmpty {
                diagnostics.append(
                    Diagnostic(
                        .crossField, at: origin.location(of: "spec.network.subnet"), field: "spec.network.subnet",
                        "\(text) overlaps the host's route\(collisions.count == 1 ? "" : "s") \(collisions.joined(separator: ", "));"
                            + " choose a subnet the host does not use"))
            }
        }
    }
    return diagnostics
}

/// Writes a line to stderr, terminal-safe (`TerminalText`): errors carry holders and guest output.
func printError(_ line: String) {
    FileHandle.standardError.write(Data((TerminalText.safe(line) + "\n").utf8))
}

/// Writes a document to stdout, terminal-safe (`TerminalText`); its escapes are valid in JSON too.
func printOut(_ text: String) {
    let safe = TerminalText.safe(text)
    FileHandle.standardOutput.write(Data((safe.hasSuffix("\n") ? safe : safe + "\n").utf8))
}

/// Output format of commands that print documents.
enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case text
    case json
}
