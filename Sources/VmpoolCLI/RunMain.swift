import ArgumentParser
import Foundation

extension Vmpool {
    /// Parses and runs the command line with SPEC's exit codes: 0 success, 1 any error
    /// (including a usage error, which argument-parser would report as 64), 2 only for
    /// `plan --detailed-exitcode` with changes. A usage error of `exec` is vmpool's own
    /// failure, 125, as `docker exec` reports it, so it is never taken for the command's status.
    public static func runMain(_ arguments: [String]? = nil) async -> Int32 {
        let arguments = arguments ?? Array(CommandLine.arguments.dropFirst())
        if let unknown = unknownCommand(arguments) {
            printError(unknown)
            return 1
        }
        var command: any ParsableCommand
        do {
            command = try parseAsRoot(arguments)
        } catch {
            return report(error, failure: usageFailureStatus(arguments))
        }
        do {
            if var asyncCommand = command as? AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
            return 0
        } catch {
            return report(error, failure: 1)
        }
    }

    /// Prints what `error` says (help on stdout, errors on stderr) and gives the exit status.
    private static func report(_ error: any Error, failure: Int32) -> Int32 {
        if let code = error as? ExitCode { return code.rawValue }
        let message = fullMessage(for: error)
        if exitCode(for: error) == .success {
            if !message.isEmpty { printOut(message) }
            return 0
        }
        printError(message)
        return failure
    }

    /// The status of a command line that does not parse: 125 for `exec` and `run`, whose own
    /// statuses are the guest command's, else 1.
    static func usageFailureStatus(_ arguments: [String]) -> Int32 {
        [Exec.configuration.commandName, Run.configuration.commandName].contains(arguments.first)
            ? GuestCommand.vmpoolFailed : 1
    }
}

extension Vmpool {
    /// The message for a first word that names no command (`vmpool exce VM`), with the
    /// commands it is closest to, as kubectl and git answer; `nil` when the word is a command
    /// or an option.
    static func unknownCommand(_ arguments: [String]) -> String? {
        guard let word = arguments.first, !word.hasPrefix("-") else { return nil }
        var names = ["help"]
        for command in configuration.subcommands {
            names.append(command._commandName)
            names += command.configuration.aliases
        }
        guard !names.contains(word) else { return nil }
        let near = names.filter { $0 != "help" && (editDistance($0, word) <= 2 || $0.hasPrefix(word)) }
        var message = "Error: unknown command \"\(word)\" for \"vmpool\""
        if !near.isEmpty { message += "\n\nDid you mean this?\n" + near.map { "\t\($0)" }.joined(separator: "\n") }
        return message + "\n\nRun 'vmpool --help' for the commands."
    }

    /// Levenshtein distance between two words.
    static func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a)
        let b = Array(b)
        guard !a.isEmpty, !b.isEmpty else { return max(a.count, b.count) }
        var previous = Array(0...b.count)
        for i in 1...a.count {
            var current = [i] + Array(repeating: 0, count: b.count)
            for j in 1...b.count {
                current[j] = Swift.min(
                    previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
            }
            previous = current
        }
        return previous[b.count]
    }
}
