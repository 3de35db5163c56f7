import ArgumentParser
import Testing

@testable import VmpoolCLI

/// The help users read, pinned as exact text.
@Suite("Help text")
struct HelpTests {
    @Test func rootHelpListsEveryCommand() {
        #expect(
            Vmpool.helpMessage(columns: 80) == """
                OVERVIEW: Provision pools of virtual machines from declarative manifests.

                Manifests describe the pools a host should have; `apply` and `reconcile`
                create, clone, resume, pause, hotplug and stop VMs until the host matches them.

                USAGE: vmpool <subcommand>

                OPTIONS:
                  --version               Show the version.
                  -h, --help              Show help information.

                SUBCOMMANDS:
                  validate                Check manifests and report every error with its file,
                                          line and column.
                  plan                    Show the actions apply would take, without taking
                                          them.
                  apply                   Make the host match the manifests: create, clone,
                                          resume, pause, hotplug and stop VMs.
                  reconcile               Converge the host to the pools last applied (one
                                          pass, or a loop with --every).
                  get                     List pools, VMs or the hosts of the store.
                  describe                Show a pool or VM in detail: spec, status, VMs,
                                          template, standbys, recent events.
                  events                  List what happened to pools and VMs (created,
                                          replaced, leased, recovered...), oldest first.
                  delete                  Stop the VMs of pools and forget the pools.
                  lease                   Take one ready VM of a pool for yourself alone; the
                                          pool refills.
                  release                 End leases: stop the leased VMs.
                  run                     Run one command in a fresh VM of a pool: lease it,
                                          copy in, run, copy out, release it.
                  fork                    Copy a running leased VM, memory, disks and devices,
                                          into new leased VMs.
                  exec                    Run a command in a VM through its guest agent.
                  cp                      Copy files or directories between the host and a VM
                                          (VM:PATH on one side).
                  logs                    Print a VM's serial console output (the last MiB or
                                          so is kept).
                  console                 Attach to a VM's interactive console; Ctrl-] detaches.
                  image                   Build the default guest image.

                  See 'vmpool help <subcommand>' for detailed help.
                """)
    }

    @Test func planHelpShowsTheDetailedExitCode() {
        let help = Vmpool.helpMessage(for: Vmpool.PlanCommand.self, columns: 80)
        #expect(help.hasPrefix("OVERVIEW: Show the actions apply would take, without taking them.\n"))
        #expect(
            help.contains(
                """
                  --detailed-exitcode     Exit 2 when the plan has changes, 0 when it has none.
                """))
        #expect(help.contains("  -o, --output <output>   Output format: text or json. (values: text, json;\n"))
    }

    @Test func everyCommandTakesTheGlobalOptions() {
        for command in [
            Vmpool.Validate.self, Vmpool.PlanCommand.self, Vmpool.Apply.self, Vmpool.Reconcile.self,
            Vmpool.Get.Pools.self, Vmpool.Get.VMs.self, Vmpool.Delete.self, Vmpool.Image.Build.self,
            Vmpool.Exec.self, Vmpool.Cp.self, Vmpool.Logs.self, Vmpool.Console.self, Vmpool.LeaseCommand.self,
            Vmpool.Release.self, Vmpool.Run.self, Vmpool.Describe.PoolCommand.self, Vmpool.Describe.VMCommand.self,
            Vmpool.Events.self,
        ] as [any ParsableCommand.Type] {
            let help = Vmpool.helpMessage(for: command, columns: 120)
            for option in [
                "--state-dir", "--driver", "--log-level", "--log-format", "--accel", "--qemu-user", "--lock-timeout",
            ] {
                #expect(help.contains(option), "\(command) lacks \(option)")
            }
        }
    }

    /// A first word that names no command is answered like kubectl answers: the commands it
    /// is closest to, and nothing run.
    @Test func anUnknownCommandSuggestsTheNearestOnes() {
        #expect(
            Vmpool.unknownCommand(["exce", "web-1", "--", "true"]) == """
                Error: unknown command "exce" for "vmpool"

                Did you mean this?
                \texec

                Run 'vmpool --help' for the commands.
                """)
        #expect(Vmpool.unknownCommand(["gte", "vms"])?.contains("\tget\n") == true)
        #expect(Vmpool.unknownCommand(["frobnicate"])?.contains("Did you mean") == false)
        for known in [["get", "vms"], ["help", "apply"], ["--version"], ["apply", "-f", "x"], []] {
            #expect(Vmpool.unknownCommand(known) == nil, "\(known)")
        }
        #expect(Vmpool.editDistance("lease", "lase") == 1 && Vmpool.editDistance("", "get") == 3)
    }
}
