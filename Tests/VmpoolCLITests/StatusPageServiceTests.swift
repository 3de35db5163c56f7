import Foundation
import Testing
import VmpoolTestSupport

/// The status page as the service serves it (sim driver): who may see it, what it carries,
/// and that it follows the store.
@Suite("The service's status page on the sim driver", .serialized)
struct StatusPageServiceTests {
    @Test func withoutATokenThePageIsOpenAndFollowsTheStore() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 2))).status == 0)
        let service = try APIService(box)
        defer { service.stop() }
        let http = try service.connect()

        let page = try http.request("GET", "/")
        #expect(page.status == 200, "\(page.text)")
        #expect(page.headers["content-type"] == "text/html; charset=utf-8")
        #expect(page.headers["content-security-policy"]?.hasPrefix("default-src 'none'") == true)
        #expect(page.headers["x-frame-options"] == "DENY")
        #expect(page.text.contains("<h2>Pools</h2>") && page.text.contains("<a href=\"/?pool=web\">web</a>"))
        #expect(!page.text.contains("Sign out"), "nothing to sign out of")
        let login = try http.request("GET", "/ui/login")
        #expect(login.status == 303 && login.headers["location"] == "/", "no token, no form")

        // A lease made meanwhile shows in the live part, its holder escaped.
        let lease = try http.request("POST", "/v1/pools/web/leases", body: #"{"holder":"job <u>7</u>"}"#)
        #expect(lease.status == 201, "\(lease.text)")
        let id = try #require(lease.object?["id"] as? String)
        var live = ""
        let shown = eventuallyIgnoringErrors(timeout: .seconds(10)) {
            live = try http.request("GET", "/ui/live").text
            return live.contains("<tr><td>\(id)<td>web<td class=s-running>running<td><td><td>job &lt;u&gt;7&lt;/u&gt;")
        }
        #expect(shown, "the lease of \(id) is not in the live part: \(live)")
        #expect(!live.contains("<html"), "the live part is the main part alone")

        let filtered = try http.request("GET", "/?pool=nope&state=paused")
        #expect(filtered.status == 200 && filtered.text.contains("No VMs match the filter."))
        #expect(filtered.text.contains("data-live=\"/ui/live?pool=nope&amp;state=paused\""))
        for (path, type) in [("/ui/status.css", "text/css"), ("/ui/status.js", "text/javascript")] {
            let asset = try http.request("GET", path)
            #expect(asset.status == 200 && asset.headers["content-type"]?.hasPrefix(type) == true, "\(path)")
        }
        let post = try http.request("POST", "/")
        #expect(post.status == 405 && post.headers["allow"] == "GET", "the page is read-only: \(post.status)")
    }

    @Test func withATokenThePageTakesItOrASessionAndTheSessionOpensNothingElse() throws {
        let box = Sandbox()
        defer { box.dir.remove() }
        #expect(try box.run("apply", "-f", box.write(pool(size: 1))).status == 0)
        let token = "s3cret-" + UUID().uuidString
        let service = try APIService(box, token: token)
        defer { service.stop() }
        let http = try service.connect()

        // Without the token: the sign-in form (and its stylesheet), nothing of the store.
        for authorization in [nil, "Bearer wrong-token-of-some-length", "Basic \(token)", token] {
            let headers = authorization.map { ["Authorization": $0] } ?? [:]
            let page = try http.request("GET", "/", headers: headers)
            #expect(page.status == 401, "\(authorization ?? "no token"): \(page.status)")
            #expect(page.text.contains("<form method=post action=/ui/login>") && !page.text.contains("Pools"))
            #expect(try http.request("GET", "/ui/live", headers: headers).status == 401)
        }
        #expect(try http.request("GET", "/?token=\(token)").status == 401, "a token in a URL is no token")
        #expect(try http.request("GET", "/ui/status.css").status == 200)
        let right = try http.request("GET", "/", headers: ["Authorization": "Bearer \(token)"])
        #expect(right.status == 200 && right.text.contains("<h2>Pools</h2>"))

        let wrong = try http.request("POST", "/ui/login", body: "token=not-it", headers: Self.form)
        #expect(wrong.status == 401 && wrong.text.contains("That is not the token."))
        #expect(wrong.headers["set-cookie"] == nil)
        let signedIn = try http.request(
            "POST", "/ui/login",
            body: "token=" + (token.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? ""),
            headers: Self.form)
        #expect(signedIn.status == 303 && signedIn.headers["location"] == "/")
        let setCookie = try #require(signedIn.headers["set-cookie"])
        #expect(setCookie.contains("HttpOnly") && setCookie.contains("SameSite=Strict") && !setCookie.contains(token))
        let cookie = try #require(setCookie.split(separator: ";").first.map(String.init))
        let session = ["Cookie": cookie]

        let page = try http.request("GET", "/", headers: session)
        #expect(page.status == 200 && page.text.contains("<h2>Pools</h2>") && page.text.contains("Sign out"))
        #expect(try http.request("GET", "/ui/live", headers: session).status == 200)
        // The cookie is the page's alone: the API, the metrics and every write want the token.
        #expect(try http.request("GET", "/v1/vms", headers: session).status == 401)
        #expect(try http.request("GET", "/metrics", headers: session).status == 401)
        #expect(try http.request("POST", "/v1/pools/web/leases", headers: session).status == 401)
        #expect(try box.vms().values.allSatisfy { $0["lease"] is NSNull }, "a session leased nothing")
        #expect(
            try http.request("GET", "/", headers: ["Cookie": "vmpool_session=\(String(repeating: "0", count: 64))"])
                .status == 401)

        let out = try http.request("POST", "/ui/logout", headers: session)
        #expect(out.status == 303 && out.headers["set-cookie"]?.contains("Max-Age=0") == true)
        #expect(try http.request("GET", "/", headers: session).status == 401, "signed out")
    }

    static let form = ["Content-Type": "application/x-www-form-urlencoded"]
}
