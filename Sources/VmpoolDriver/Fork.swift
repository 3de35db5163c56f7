/// A running VM that a fork copies (SPEC §12).
public struct ForkSource: Sendable {
    public var vm: VMRef
    /// What the VM was launched as (its disks, NIC and image).
    public var shape: VMShape
    /// The template the VM was cloned from (its disks are overlays over that template's), or
    /// `nil` for a VM booted cold.
    public var template: String?

    public init(vm: VMRef, shape: VMShape, template: String?) {
        self.vm = vm
        self.shape = shape
        self.template = template
    }
}

/// What a fork did.
public struct ForkOutcome: Sendable {
    /// How long the source stood paused while its state was saved.
    public var pause: Duration
    /// Each request's VM, or why it did not start, in the order of the requests.
    public var vms: [Result<LaunchedVM, DriverError>]
    /// Named phases of the fork and their durations, for logs and benchmarks.
    public var phases: [(String, Duration)]

    public init(pause: Duration, vms: [Result<LaunchedVM, DriverError>], phases: [(String, Duration)] = []) {
        self.pause = pause
        self.vms = vms
        self.phases = phases
    }
}

/// A driver that can copy a running VM: its memory, disks and device state, into new VMs that
/// each get their own identity (name, machine id, MAC and address, clock, RNG, generation id).
/// The sim driver and the qemu driver conform.
public protocol ForkAccess: Sendable {
    /// Saves the running VM `source`'s state under the name `snapshot` (the source paused only
    /// while it is saved), then starts one VM per request from it, running. The snapshot is
    /// removed before this returns, whatever happened; a VM that did not start left nothing.
    /// Throws when the source could not be saved (then no VM was started, and the source runs).
    func fork(_ source: ForkSource, snapshot: String, into requests: [LaunchRequest]) async throws(DriverError)
        -> ForkOutcome
}
