import VmpoolSpec
import ArgumentParser
import Foundation
import VmpoolDriver

/// Durations are parsed once, where the options are: `500ms`, `30s`, `5m`, `1h`, `1m30s`, `0`.
extension Duration: @retroactive ExpressibleByArgument {
    public init?(argument: String) {
        guard let duration = DurationText.parse(argument) else { return nil }
        self = duration
    }
}

/// A `transform:` for duration options that says what it expected, naming the option (a value
/// that starts with `-` reaches it too, with `parsing: .unconditional`).
func duration(_ option: String, allowZero: Bool = true) -> @Sendable (String) throws -> Duration {
    { text in
        guard let value = DurationText.parse(text) else {
            throw ValidationError(
                "\(option): expected a duration like 500ms, 30s, 5m, 1h or 1m30s, got \"\(text)\""
                    + (text.hasPrefix("-") ? " (a duration cannot be negative)" : ""))
        }
        guard allowZero || value > .zero else { throw ValidationError("\(option): expected a duration above zero") }
        return value
    }
}

/// How a command runs in a guest: its environment, working directory and time limit
/// (`exec`, `run`).
struct GuestCommandOptions: ParsableArguments {
    @Option(name: .shortAndLong, help: "Set an environment variable in the guest (KEY=VALUE, repeatable).")
    var env: [String] = []

    @Option(name: .shortAndLong, help: "Working directory in the guest (default: the image's WorkingDir, else /).")
    var workdir: String?

    @Option(
        parsing: .unconditional, help: "Kill the command after this long (30s, 5m).",
        transform: duration("--timeout", allowZero: false))
    var timeout: Duration?

    func validate() throws {
        for pair in env where !pair.contains("=") || pair.hasPrefix("=") {
            throw ValidationError("--env: expected KEY=VALUE, got \"\(pair)\"")
        }
    }
}

/// The manifests a command reads.
struct ManifestOptions: ParsableArguments {
    @Option(
        name: .shortAndLong, parsing: .upToNextOption,
        help: "Manifest files or directories, `-` for standard input (repeatable: -f a.yaml b.yaml, or -f a -f b).")
    var file: [String] = []

    func validate() throws {
        if file.isEmpty { throw ValidationError("give at least one manifest with -f PATH") }
    }
}

/// `-o text|json`.
struct OutputOptions: ParsableArguments {
    @Option(name: .shortAndLong, help: "Output format: text or json.")
    var output: OutputFormat = .text
}

/// How a pass runs its actions.
struct ExecutionOptions: ParsableArguments {
    @Option(parsing: .unconditional, help: "Actions to run at once (1 to 256).")
    var parallel: Int = 4

    func validate() throws {
        if parallel < 1 || parallel > 256 { throw ValidationError("--parallel: expected 1 to 256, got \(parallel)") }
    }
}

/// `--timeout` of commands that run a pass.
struct TimeoutOption: ParsableArguments {
    @Option(
        parsing: .unconditional,
        help:
            "Give up after this long (30s, 5m, 1m30s): no action starts after it, running ones are interrupted and undone.",
        transform: duration("--timeout"))
    var timeout: Duration?
}
