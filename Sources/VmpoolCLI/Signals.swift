import UnixSignals
import VmpoolReconciler

/// Runs `body`; a first SIGINT or SIGTERM meanwhile asks it to start nothing new, so in-flight
/// actions finish and no VM is left half made; a second one interrupts the running actions,
/// which undo what they half made.
func withShutdownSignals<T: Sendable>(
    _ cancellation: Cancellation, _ body: @escaping @Sendable () async throws -> T
) async throws -> T {
    try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask {
            for await _ in await UnixSignalsSequence(trapping: .sigint, .sigterm) {
                if cancellation.isCancelled {
                    cancellation.abort()
                    printError("interrupting running actions; what they half made is undone")
                } else {
                    cancellation.cancel()
                    printError(
                        "shutting down: finishing running actions, starting no new ones (signal again to interrupt them)"
                    )
                }
            }
            return nil
        }
        group.addTask { try await body() }
        while let next = try await group.next() {
            if let value = next {
                group.cancelAll()
                return value
            }
        }
        throw CancellationError()
    }
}
