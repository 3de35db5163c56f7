import Foundation
import VmpoolDriver
import VmpoolStore

/// Which VMs the page lists (the filter form's query: `?pool=NAME&state=STATE`).
public struct StatusFilter: Sendable, Hashable {
    public var pool: String?
    public var state: String?

    public init(pool: String? = nil, state: String? = nil) {
        self.pool = pool.flatMap { $0.isEmpty ? nil : $0 }
        self.state = state.flatMap { $0.isEmpty ? nil : $0 }
    }

    /// The states a VM can show (`VMRow.state`).
    public static let states = ["running", "paused", "failed", "creating", "stopping"]

    func admits(_ vm: StatusSnapshot.VM) -> Bool {
        (pool == nil || vm.pool == pool) && (state == nil || vm.state == state)
    }

    /// `?pool=…&state=…` for the live updates' URL, empty when nothing is filtered.
    var query: String {
        let parts = [pool.map { "pool=" + HTML.queryValue($0) }, state.map { "state=" + HTML.queryValue($0) }]
            .compactMap { $0 }
        return parts.isEmpty ? "" : "?" + parts.joined(separator: "&")
    }
}

/// The operator's page: plain HTML rendered here, styled by `/ui/status.css`, kept live by
/// `/ui/status.js` (which fetches `/ui/live` and swaps the main part). Without script it is a
/// snapshot, and complete. Every string that comes from a manifest, a client or a guest is
/// escaped by `HTML.escape`.
public enum StatusPage {
    /// The most VM rows one page lists; more are left to the filter.
    public static let maxVMRows = 2000
    /// The newest events the page lists.
    public static let maxEvents = 200

    /// The whole page. `signedIn`: the visitor came with the page's cookie (and gets a
    /// sign-out button).
    public static func render(_ snapshot: StatusSnapshot, filter: StatusFilter, signedIn: Bool = false) -> String {
        var html = head(title: "vmpool · \(snapshot.host)")
        html += "<body><header><h1>vmpool</h1><span class=where>\(HTML.escape(snapshot.host))"
        html += snapshot.shared ? " · shared store, \(snapshot.hosts.count) hosts" : " · this host"
        html += "</span><span id=live data-at=\"\(timestamp(snapshot.generatedAt))\">"
        html += "snapshot at \(clock(snapshot.generatedAt)) UTC</span>"
        if signedIn {
            html += "<form method=post action=/ui/logout class=logout><button>Sign out</button></form>"
        }
        html += "</header><noscript><p class=note>A snapshot: reload the page for a newer one.</p></noscript>"
        html += "<main id=status data-live=\"/ui/live\(HTML.escape(filter.query))\">"
        html += fragment(snapshot, filter: filter)
        return html + "</main></body></html>\n"
    }

    /// The part live updates replace: everything under the header.
    public static func fragment(_ snapshot: StatusSnapshot, filter: StatusFilter) -> String {
        var html = summary(snapshot)
        html += pools(snapshot)
        html += vms(snapshot, filter: filter)
        if snapshot.shared { html += hosts(snapshot) }
        html += events(snapshot)
        return html
    }

    /// The form a visitor without the token gets (`failed`: a wrong token was given).
    public static func login(failed: Bool) -> String {
        var html = head(title: "vmpool · sign in")
        html += "<body class=login><main><h1>vmpool</h1><p>This service needs its token.</p>"
        if failed { html += "<p class=error>That is not the token.</p>" }
        html += "<form method=post action=/ui/login><label>Token <input type=password name=token"
        html += " autocomplete=current-password required autofocus></label><button>Sign in</button></form>"
        return html + "</main></body></html>\n"
    }

    static func head(title: String) -> String {
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
            + "<meta name=viewport content=\"width=device-width,initial-scale=1\">"
            + "<title>\(HTML.escape(title))</title><link rel=stylesheet href=/ui/status.css>"
            + "<script src=/ui/status.js defer></script></head>"
    }

    static func summary(_ snapshot: StatusSnapshot) -> String {
        let short = snapshot.pools.filter { !$0.isFull }.count
        let states = Dictionary(grouping: snapshot.vms, by: \.state).mapValues(\.count)
        let leased = snapshot.vms.filter { $0.lease != nil }.count
        let waiting = snapshot.pools.reduce(0) { $0 + $1.waiting }
        var html = "<section class=tiles>"
        html += tile("Pools", "\(snapshot.pools.count)", short == 0 ? "all full" : "\(short) not full", bad: short > 0)
        let failed = states["failed"] ?? 0
        html += tile(
            "VMs", "\(snapshot.vms.count)",
            "\(states["running"] ?? 0) running · \(states["paused"] ?? 0) paused · \(failed) failed", bad: failed > 0)
        html += tile("Leases", "\(leased)", waiting == 0 ? "nobody waiting" : "\(waiting) waiting", bad: waiting > 0)
        if snapshot.shared {
            let down = snapshot.hosts.filter { $0.state != "ready" }.count
            html += tile(
                "Hosts", "\(snapshot.hosts.count)", down == 0 ? "all ready" : "\(down) silent or dead", bad: down > 0)
        }
        return html + "</section>"
    }

    static func tile(_ name: String, _ value: String, _ detail: String, bad: Bool) -> String {
        "<div class=\"tile\(bad ? " bad" : "")\"><b>\(value)</b><span>\(name)</span><small>\(detail)</small></div>"
    }

    static func pools(_ snapshot: StatusSnapshot) -> String {
        var html = "<section><h2>Pools</h2>"
        guard !snapshot.pools.isEmpty else {
            return html
                + "<p class=empty>No pools applied. <code>vmpool apply -f manifests/</code> adds some.</p></section>"
        }
        html += "<table class=pools><thead><tr><th>Pool<th>Ready<th>Warm<th>Leased<th>Standbys<th>Waiting"
        html += "<th>Template<th>Last hour<th>Last error</tr></thead><tbody>"
        for pool in snapshot.pools { html += poolRow(pool, now: snapshot.generatedAt) }
        return html + "</tbody></table></section>"
    }

    static func poolRow(_ pool: StatusSnapshot.Pool, now: Date) -> String {
        let name = HTML.escape(pool.name)
        var html = "<tr><td><a href=\"/?pool=\(HTML.escape(HTML.queryValue(pool.name)))\">\(name)</a>"
        html += "<small>\(pool.boot)\(pool.state == "paused" ? " · paused" : "")\(pool.deleting ? " · deleting" : "")"
        html += "</small><td class=\"\(pool.isFull ? "ok" : "short")\">\(pool.readiness.ready) / \(pool.size)"
        html += "<td>\(pool.readiness.warm) / \(pool.warm)<td>\(pool.readiness.leased)<td>\(pool.standbys)"
        html += "<td class=\"\(pool.waiting > 0 ? "short" : "")\">\(pool.waiting)<td>"
        if let template = pool.template {
            let cls = template.state == "ready" ? "ok" : template.state == "missing" ? "bad" : "busy"
            html += "<span class=\(cls) title=\"\(HTML.escape(template.id))\">\(template.state)</span>"
            html += " <small>\(Age.text(since: template.since, now: now))</small>"
        } else {
            html += "<small>none</small>"
        }
        html += "<td>" + Chart.svg(pool.history, now: now, pool: pool.name) + "<td class=error>"
        if let problem = pool.lastError {
            html += HTML.escape(problem.text)
            let detail = [
                problem.vm.map { HTML.escape($0) }, problem.at.map { Age.text(since: $0, now: now) + " ago" },
            ]
            html += " <small>\(detail.compactMap { $0 }.joined(separator: " · "))</small>"
        }
        return html + "</tr>"
    }

    static func vms(_ snapshot: StatusSnapshot, filter: StatusFilter) -> String {
        let shown = snapshot.vms.filter(filter.admits)
        var html = "<section><h2>VMs</h2>" + filterForm(snapshot, filter: filter)
        guard !shown.isEmpty else {
            return html + "<p class=empty>No VMs\(filter == StatusFilter() ? "" : " match the filter").</p></section>"
        }
        html += "<table class=vms><thead><tr><th>VM<th>Pool<th>State<th>PID<th>Address<th>Lease<th>Boot<th>Age"
        html += snapshot.shared ? "<th>Host" : ""
        html += "</tr></thead><tbody>"
        for vm in shown.prefix(maxVMRows) { html += vmRow(vm, now: snapshot.generatedAt, shared: snapshot.shared) }
        html += "</tbody></table>"
        if shown.count > maxVMRows {
            html +=
                "<p class=note>The first \(maxVMRows) of \(shown.count) VMs; filter by pool or state for the rest.</p>"
        }
        return html + "</section>"
    }

    static func vmRow(_ vm: StatusSnapshot.VM, now: Date, shared: Bool) -> String {
        var html = "<tr><td>\(HTML.escape(vm.id))<td>\(HTML.escape(vm.pool))<td class=s-\(HTML.escape(vm.state))"
        if let problem = vm.problem { html += " title=\"\(HTML.escape(problem))\"" }
        html += ">\(HTML.escape(vm.state))<td>\(vm.pid.map(String.init) ?? "")<td>"
        if let address = vm.address {
            html += HTML.escape(address) + (vm.ports == "-" ? "" : " " + HTML.escape(vm.ports))
        }
        html += "<td>"
        if let lease = vm.lease {
            html += HTML.escape(lease.holder) + " <small>"
            if let expires = lease.expiresAt {
                html += expires <= now ? "expired" : Age.text(since: now, now: expires) + " left"
            } else {
                html += "no expiry"
            }
            html += "</small>"
        }
        html += "<td>\(vm.boot)<td>\(Age.text(since: vm.createdAt, now: now))"
        if shared { html += "<td>\(HTML.escape(vm.host))" }
        return html + "</tr>"
    }

    static func filterForm(_ snapshot: StatusSnapshot, filter: StatusFilter) -> String {
        var html = "<form method=get action=/ class=filter><label>Pool <select name=pool><option value=\"\">all"
        var names = snapshot.pools.map(\.name)
        if let pool = filter.pool, !names.contains(pool) { names.append(pool) }
        for name in names {
            html += "<option\(name == filter.pool ? " selected" : "")>\(HTML.escape(name))"
        }
        html += "</select></label><label>State <select name=state><option value=\"\">all"
        for state in StatusFilter.states {
            html += "<option\(state == filter.state ? " selected" : "")>\(state)"
        }
        return html + "</select></label><button>Filter</button></form>"
    }

    static func hosts(_ snapshot: StatusSnapshot) -> String {
        var html = "<section><h2>Hosts</h2><table class=hosts><thead><tr><th>Host<th>State<th>VMs<th>vCPUs"
        html += "<th>Memory<th>Heard from</tr></thead><tbody>"
        for host in snapshot.hosts {
            html += "<tr><td>\(HTML.escape(host.name))<td class=h-\(host.state)>\(host.state)<td>\(host.vms)"
            html +=
                "<td>\(host.usedVcpus) / \(host.vcpus)<td>\(mebibytes(host.usedMemoryMiB)) / \(mebibytes(host.memoryMiB))"
            html += "<td>\(Age.text(since: host.heartbeatAt, now: snapshot.generatedAt)) ago</tr>"
        }
        return html + "</tbody></table></section>"
    }

    static func events(_ snapshot: StatusSnapshot) -> String {
        var html = "<section><h2>Recent events</h2>"
        guard !snapshot.events.isEmpty else { return html + "<p class=empty>No events yet.</p></section>" }
        html += "<table class=events><thead><tr><th>Time<th>Kind<th>Pool<th>VM<th>Message</tr></thead><tbody>"
        for event in snapshot.events.prefix(maxEvents) {
            let failure = StatusSnapshot.failureKinds.contains(event.kind)
            html += "<tr\(failure ? " class=bad" : "")><td title=\"\(timestamp(event.at))\">\(clock(event.at))"
            html += "<td>\(HTML.escape(event.kind))<td>\(HTML.escape(event.pool))<td>\(HTML.escape(event.vm ?? ""))"
            html += "<td>\(HTML.escape(event.message))</tr>"
        }
        return html + "</tbody></table></section>"
    }

    static func mebibytes(_ value: Int) -> String {
        value >= 1024 && value % 1024 == 0
            ? "\(value / 1024) GiB" : value >= 10240 ? "\(value / 1024) GiB" : "\(value) MiB"
    }

    static func timestamp(_ date: Date) -> String { JSONValue.rfc3339(date) }

    /// `HH:MM:SS`, UTC.
    static func clock(_ date: Date) -> String {
        let seconds = Int(date.timeIntervalSince1970.rounded(.down))
        let day = ((seconds % 86400) + 86400) % 86400
        return String(format: "%02d:%02d:%02d", day / 3600, day / 60 % 60, day % 60)
    }
}

/// Short ages and durations for the page.
enum Age {
    /// `42s`, `5m`, `3h`, `2d` from `since` to `now`.
    static func text(since: Date, now: Date) -> String {
        let seconds = max(0, Int(now.timeIntervalSince(since)))
        switch seconds {
        case ..<120: return "\(seconds)s"
        case ..<7200: return "\(seconds / 60)m"
        case ..<172_800: return "\(seconds / 3600)h"
        default: return "\(seconds / 86400)d"
        }
    }

    /// `350 ms`, `2.4 s`, `3m`.
    static func seconds(_ value: Double) -> String {
        if value < 1 { return "\(Int((value * 1000).rounded())) ms" }
        if value < 120 { return String(format: "%.1f s", value) }
        return "\(Int(value / 60))m"
    }
}

/// The page's stylesheet and script, served from the service's own origin.
public enum StatusAssets {
    public static var stylesheet: [UInt8] { PackageResources.status_css }
    public static var script: [UInt8] { PackageResources.status_js }
}
