import VmpoolPlanner

/// What a child task of a pass reports to the loop that schedules them (the shape of
/// swift-service-lifecycle's `ChildTaskResult`): one case per way a child can end.
enum ChildTaskResult: Sendable {
    case finished(index: Int, result: ActionResult)
}

/// Which actions of a plan may start now: those whose dependencies all succeeded, in plan
/// order. An action whose dependency failed is not run and fails in turn (transitively).
struct ActionScheduler {
    private let actions: [Action]
    private var outcomes: [ActionResult?]
    private var started: [Bool]
    private var dependents: [[Int]]
    private var waiting: [Int]
    /// Startable actions, the next at the end.
    private var ready: [Int]

    init(_ actions: [Action]) {
        self.actions = actions
        outcomes = Array(repeating: nil, count: actions.count)
        started = Array(repeating: false, count: actions.count)
        dependents = Array(repeating: [], count: actions.count)
        let waiting = actions.map(\.dependsOn.count)
        self.waiting = waiting
        for (index, action) in actions.enumerated() {
            for dependency in action.dependsOn { dependents[dependency].append(index) }
        }
        ready = (0..<actions.count).filter { waiting[$0] == 0 }.reversed()
    }

    /// The next action to start, marked started; `nil` while none can.
    mutating func next() -> Int? {
        while let index = ready.popLast() {
            guard !started[index] else { continue }
            started[index] = true
            return index
        }
        return nil
    }

    /// Records how an action ended: its dependents become startable, or (when it failed) fail
    /// unstarted with `skipReason`.
    mutating func record(_ index: Int, _ result: ActionResult, skipReason: String) {
        var failing: [Int] = []
        settle(index, result, failing: &failing)
        while let next = failing.popLast() {
            guard outcomes[next] == nil, !started[next] else { continue }
            started[next] = true
            settle(next, ActionResult(action: actions[next], outcome: .failed, error: skipReason), failing: &failing)
        }
    }

    private mutating func settle(_ index: Int, _ result: ActionResult, failing: inout [Int]) {
        outcomes[index] = result
        for next in dependents[index] {
            if result.outcome == .failed {
                failing.append(next)
            } else {
                waiting[next] -= 1
                if waiting[next] == 0 { ready.insert(next, at: 0) }
            }
        }
    }

    /// Results of the actions that ended so far.
    var finished: [ActionResult] { outcomes.compactMap { $0 } }

    /// A result for every action, in plan order (`not run` for any that never started).
    var results: [ActionResult] {
        outcomes.enumerated().map { index, result in
            result ?? ActionResult(action: actions[index], outcome: .failed, error: "not run")
        }
    }
}
