import Foundation
import Hummingbird
import VmpoolDriver
import VmpoolReconciler
import VmpoolSpec
import VmpoolStore

/// `POST /v1/vms/{vm}/forks`: `vmpool fork` over HTTP (SPEC §12).
extension APIServer {
    func fork(_ request: Request, context: APIRequestContext, vm: String) async throws -> Response {
        let body = try await request.body.collect(upTo: 64 << 10)
        var count = 1
        var ttl: Duration?
        var holder: String?
        if body.readableBytes > 0 {
            guard let fields = try? JSONSerialization.jsonObject(with: Data(buffer: body)) as? [String: Any] else {
                return try Self.error(
                    .badRequest, "the body is not a fork request: expected {\"count\", \"ttl\", \"holder\"}")
            }
            if let unknown = fields.keys.sorted().first(where: { !["count", "ttl", "holder"].contains($0) }) {
                return try Self.error(.badRequest, "unknown field \"\(unknown)\"; expected count, ttl, holder")
            }
            struct Counted: Decodable { var count: Int? }
            // JSONDecoder takes a whole JSON number only: not 2.5, not true, not "2".
            guard let counted = try? JSONDecoder().decode(Counted.self, from: Data(buffer: body)),
                (1...Leases.maxForks).contains(counted.count ?? 1)
            else {
                return try Self.error(.badRequest, "count: expected a whole number from 1 to \(Leases.maxForks)")
            }
            count = counted.count ?? 1
            if let value = fields["ttl"] {
                guard let text = value as? String, LeaseRequest.documented(text, "ttl"),
                    let parsed = DurationText.parse(text), parsed > .zero
                else {
                    return try Self.error(.badRequest, "ttl: expected a duration above zero like 30m (at least 1ms)")
                }
                ttl = parsed
            }
            if let value = fields["holder"] {
                guard let text = value as? String else {
                    return try Self.error(.badRequest, "holder: expected a string")
                }
                if let problem = Leases.holderProblem(text) { return try Self.error(.badRequest, "holder: \(problem)") }
                holder = text
            }
        }
        let channel = context.channel
        do {
            let made = try await leases.fork(vm, count: count, ttl: ttl, holder: holder) { _ in
                // A client that went away gets no forks: they are released again.
                guard channel.isActive else {
                    throw Leases.ForkFailure(description: "the caller went away", isConflict: true)
                }
            }
            return try Self.json(.array(made.vms.map { JSONValue.object(Leases.json($0)) }), status: .created)
        } catch let failure as Leases.ForkFailure {
            return try Self.error(failure.isNotFound ? .notFound : .conflict, failure.description)
        } catch let error as DriverError {
            return try Self.error(.conflict, "cannot fork \(vm): \(error.message)")
        }
    }
}
