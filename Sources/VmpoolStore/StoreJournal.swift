import Foundation
import VmpoolDriver
import VmpoolSpec

/// The operation journal (every driver call, written before it and closed after it) and events.
extension StateStore {
    /// Closes a journal entry without touching VM records.
    public func finish(_ journal: Int64, outcome: JournalEntry.Outcome, error: String? = nil) throws(StoreError) {
        try write { db in try self.closeJournal(db, journal, outcome: outcome, error: error) }
    }

    /// Journal entries whose operation never reported back: a vmpool died during them.
    public func unfinishedOperations() throws(StoreError) -> [JournalEntry] {
        try read { db in
            try db.query("SELECT * FROM journal WHERE finishedAt IS NULL AND host = ? ORDER BY id", [host]).map(
                Self.journal)
        }
    }

    /// The most recent journal entries, newest first.
    public func journal(limit: Int = 100) throws(StoreError) -> [JournalEntry] {
        try read { db in
            try db.query("SELECT * FROM journal ORDER BY id DESC LIMIT ?", [limit]).map(
                Self.journal)
        }
    }

    public func record(_ event: Event) throws(StoreError) {
        try write { db in try self.insertEventRow(db, event) }
    }

    /// Events in the order they happened: of `pool` or `vm` (or all), at or after `since`, after
    /// the event `afterID` (to follow new ones), at most `limit` of the newest.
    public func events(
        pool: String? = nil, vm: String? = nil, kinds: Set<String>? = nil, since: Date? = nil, afterID: Int64 = 0,
        limit: Int = 1000
    ) throws(StoreError) -> [Event] {
        try read { db in
            var conditions = ["id > ?"]
            var arguments: [any SQLBindable] = [afterID]
            if let pool {
                conditions.append("pool = ?")
                arguments.append(pool)
            }
            if let vm {
                conditions.append("vm = ?")
                arguments.append(vm)
            }
            if let kinds {
                conditions.append("kind IN (\(kinds.map { _ in "?" }.joined(separator: ", ")))")
                arguments += kinds.sorted().map { $0 as any SQLBindable }
            }
            if let since {
                conditions.append("at >= ?")
                arguments.append(since.timeIntervalSince1970)
            }
            let sql =
                "SELECT * FROM (SELECT * FROM event WHERE \(conditions.joined(separator: " AND "))"
                + " ORDER BY id DESC LIMIT ?) AS recent ORDER BY id"
            arguments.append(limit)
            return try db.query(sql, arguments).map(Self.event)
        }
    }

    static func event(_ row: SQLRow) throws -> Event {
        var event = Event(
            at: Date(timeIntervalSince1970: try row["at"]), pool: try row["pool"], vm: try row["vm"],
            kind: try row["kind"], message: try row["message"])
        event.id = try row["id"] as Int64
        return event
    }
}
