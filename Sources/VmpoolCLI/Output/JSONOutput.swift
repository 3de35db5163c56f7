import Foundation
import VmpoolDriver

enum JSONOutput {
    static func encode(_ value: [[String: JSONValue]]) throws -> String {
        try encode(JSONValue.array(value.map { .object($0) }))
    }

    static func encode(_ value: [String: JSONValue]) throws -> String { try encode(.object(value)) }

    static func encode(_ value: JSONValue) throws -> String { try JSONValue.render(value) }

    static func rfc3339(_ date: Date) -> String { JSONValue.rfc3339(date) }
}
