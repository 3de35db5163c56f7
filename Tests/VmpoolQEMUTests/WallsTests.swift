import Foundation
import Testing
import VmpoolTestSupport

/// The walls around every VM, tried from inside real guests and from the host: nothing a guest,
/// a lease client or a copied file does reaches past its VM.
@Suite(
    "Walls around every VM on real QEMU", .serialized,
    .enabled(if: QemuEnvironment.available, "\(QemuEnvironment.skipReason ?? "")"))
struct WallsTests {
    func pool(_ name: String, size: Int, boot: String = "template", extra: String = "") -> String {
        """
        apiVersion: vmpool/v1
        kind: Pool
        metadata: {name: \(name)}
        spec:
          size: \(size)
          vcpus: 1
          memory: 256Mi
          boot: \(boot)
        \(extra)
        """
    }

    func apply(_ box: QemuSandbox, _ text: String, name: String = "pool.yaml") throws {
        let result = try box.run(["apply", "-f", box.write(text, as: name)])
        #expect(result.status == 0, "apply failed: \(result.stdout)\n\(result.stderr)")
    }

    /// A VM someone entered while nobody held it (here: exec wrote a marker into every free VM)
    /// is never leased: a lease gets none of them, the next pass replaces them new before old,
    /// and the VM a lease then hands out has no marker.
    @Test func aVMEnteredWhileFreeIsNeverLeased() throws {
        let box = try QemuSandbox()
        defer { box.tearDown() }
        try apply(box, pool("fresh", size: 2))
        let entered = try box.ids(pool: "fresh")
        #expect(entered.count == 2)
        for vm in entered {
            let wrote = try box.exec(vm, ["sh", "-c", "echo planted > /root/marker"])
            #expect(wrote.status == 0, "\(wrote.stderr)")
        }
        let refused = try box.run(["lease", "fresh", "--holder", "job"])
        #expect(refused.status == 1, "a lease took an entered VM: \(refused.stdout)")
        let rows = try box.vms(pool: "fresh")
        for vm in entered {
            let row = rows.first { $0["id"] as? String == vm }
            #expect((row?["problem"] as? String)?.contains("entered by exec") == true, "\(row ?? [:])")
        }
        let events = try box.run(["events", "--pool", "fresh"])
        #expect(events.stdout.contains("entered"), "\(events.stdout)")

        let reconciled = try box.run(["reconcile"])
        #expect(reconciled.status == 0, "\(reconciled.stdout)\(reconciled.stderr)")
        let fresh = try box.ids(pool: "fresh")
        #expect(fresh.count == 2 && Set(fresh).isDisjoint(with: entered), "replaced: \(entered) -> \(fresh)")
        let leased = try box.run(["lease", "fresh", "--holder", "job"])
        #expect(leased.status == 0, "\(leased.stderr)")
        let vm = leased.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let marker = try box.exec(vm, ["sh", "-c", "test -e /root/marker && echo present || echo absent"])
        #expect(marker.stdout == "absent\n", "the leased VM \(vm): \(marker.stdout)\(marker.stderr)")
        // The holder may enter its own VM: that marks nothing, and the lease stands.
        #expect(try box.vms(pool: "fresh").first { $0["id"] as? String == vm }?["problem"] is NSNull)
    }
}
