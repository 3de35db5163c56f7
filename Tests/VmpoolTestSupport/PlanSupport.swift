import VmpoolPlanner

/// The kinds of action a plan takes, with their counts; kinds it does not take are left out,
/// so tests compare with a literal such as `[.create: 3]`.
public func kinds(_ plan: Plan) -> [Action.Kind: Int] {
    plan.summary.filter { $0.value > 0 }
}
