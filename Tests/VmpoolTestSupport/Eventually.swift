import Foundation

/// Polls `condition` until it holds or `timeout` passes; returns whether it held. Tests wait
/// on what they need this way, never on a fixed sleep: the deadline is only the failure case.
/// An error thrown by `condition` ends the wait and is rethrown.
public func eventually(timeout: Duration = .seconds(10), _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = ContinuousClock.now + timeout
    while true {
        if try condition() { return true }
        if ContinuousClock.now >= deadline { return false }
        var pfd = pollfd(fd: -1, events: 0, revents: 0)
        _ = poll(&pfd, 0, 5)
    }
}

/// `eventually`, where an error thrown by `condition` means "not yet" (a service that is not
/// listening yet, a state dir not made yet) rather than a failure.
public func eventuallyIgnoringErrors(timeout: Duration = .seconds(10), _ condition: () throws -> Bool) -> Bool {
    eventually(timeout: timeout) { (try? condition()) == true }
}
