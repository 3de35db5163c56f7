import ArgumentParser
import Foundation

extension Vmpool {
    /// Parses and runs the command line with SPEC's exit codes: 0 success, 1 any error
    /// (including a usage error, which argument-parser would report as 64), 2 only for
    /// `plan --detailed-exitcode` with changes.
    public static func runMain(_ arguments: [String]? = nil) async -> Int32 {
        do {
            var command = try parseAsRoot(arguments)
            if var asyncCommand = command as? AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
            return 0
        } catch let code as ExitCode {
            return code.rawValue
        } catch {
            let message = fullMessage(for: error)
            if exitCode(for: error) == .success {
                if !message.isEmpty { printOut(message) }
                return 0
            }
            printError(message)
            return 1
        }
    }
}
