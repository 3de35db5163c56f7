import Foundation
import Logging
import VmpoolStore

extension StateStore {
    /// Opens the store at `location` for `host`: SQLite in a file, or PostgreSQL. `directory`
    /// is the state dir (runtime files, the lock), whichever the store is.
    public static func open(
        _ location: StoreLocation, directory: String, host: String = "", timeout: Duration = .seconds(10),
        logger: Logger = Logger(label: "vmpool.store")
    ) throws(StoreError) -> StateStore {
        switch location {
        case .sqlite(let path):
            try StateDirectory.prepare(directory)
            if path == directory + "/" + StateStore.fileName && host.isEmpty {
                return try StateStore(directory: directory)
            }
            let backend: any StoreBackend
            do {
                backend = try SQLiteStoreBackend.open(path: path)
            } catch {
                throw StoreError(.database, "cannot open the state store \(path): \(error)")
            }
            return try StateStore(directory: directory, backend: backend, host: host)
        case .postgres(let server):
            // Connected (and the schema checked) first: a store that cannot be used leaves
            // no state dir behind.
            let backend = try PostgresBackend(server, timeout: timeout, logger: logger)
            let store = try StateStore(directory: directory, backend: backend, host: host)
            try StateDirectory.prepare(directory)
            return store
        }
    }
}
