import ArgumentParser

/// The `vmpool` command: declarative pools of VMs on one host.
public struct Vmpool: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "vmpool",
        abstract: "Provision pools of virtual machines from declarative manifests.",
        discussion: """
            Manifests describe the pools a host should have; `apply` and `reconcile` create, clone, \
            resume, pause, hotplug and stop VMs until the host matches them.
            """,
        version: "0.1.0",
        subcommands: [
            Validate.self, PlanCommand.self, Apply.self, Reconcile.self, Get.self, Describe.self, Events.self,
            Delete.self, LeaseCommand.self, Release.self, Run.self, ForkCommand.self, Exec.self, Cp.self, Logs.self,
            Console.self,
            Image.self,
        ]
    )

    public init() {}
}
