import ArgumentParser
import Foundation
import VmpoolStore

/// Shell completion of pool names and VM ids, read from the store of the state dir the
/// command line names (`--state-dir`, else `VMPOOL_STATE_DIR`, else the default). Never
/// creates anything: a state dir that is not there completes nothing.
enum Completions {
    static let pools = CompletionKind.custom { arguments, _, prefix in
        names(arguments) { try $0.pools().map(\.spec.name) }.filter { $0.hasPrefix(prefix) }
    }

    static let vms = CompletionKind.custom { arguments, _, prefix in
        names(arguments) { try $0.vms().map(\.id) }.filter { $0.hasPrefix(prefix) }
    }

    private static func names(_ arguments: [String], _ list: (StateStore) throws -> [String]) -> [String] {
        var directory =
            ProcessInfo.processInfo.environment["VMPOOL_STATE_DIR"].flatMap { $0.isEmpty ? nil : $0 }
            ?? StateDirectory.defaultPath()
        if let index = arguments.firstIndex(of: "--state-dir"), index + 1 < arguments.count {
            directory = arguments[index + 1]
        }
        guard access(directory + "/" + StateStore.fileName, R_OK) == 0,
            let store = try? StateStore(directory: directory)
        else { return [] }
        return ((try? list(store)) ?? []).sorted()
    }
}
