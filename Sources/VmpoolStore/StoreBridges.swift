import Foundation
import VmpoolDriver
import VmpoolSpec

/// The bridges this host's pools use, and which of them vmpool made.
extension StateStore {
    /// Records a bridge vmpool uses; `createdByVmpool` marks one it made (and removes when no
    /// pool uses it any more).
    public func recordBridge(_ name: String, subnet: String, createdByVmpool: Bool) throws(StoreError) {
        try write { db in
            try db.execute(
                """
                INSERT INTO bridge (host, name, subnet, createdByVmpool) VALUES (?, ?, ?, ?)
                ON CONFLICT (host, name) DO UPDATE SET createdByVmpool =
                    CASE WHEN excluded.createdByVmpool > bridge.createdByVmpool
                    THEN excluded.createdByVmpool ELSE bridge.createdByVmpool END
                """, [host, name, subnet, createdByVmpool])
        }
    }

    public func bridges() throws(StoreError) -> [(name: String, subnet: String, createdByVmpool: Bool)] {
        try read { db in
            try db.query("SELECT * FROM bridge WHERE host = ? ORDER BY name", [host]).map {
                (try $0["name"], try $0["subnet"], try $0["createdByVmpool"])
            }
        }
    }

    public func forgetBridge(_ name: String) throws(StoreError) {
        try write { db in try db.execute("DELETE FROM bridge WHERE host = ? AND name = ?", [host, name]) }
    }

    /// One VM by id.
}
