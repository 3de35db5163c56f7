import Foundation
import Testing
import VmpoolReconciler
import VmpoolStatus
import VmpoolStore
import VmpoolTestSupport

/// The status page rendered from real snapshots: a store on the sim driver, observed as the
/// service observes it.
@Suite("The status page's HTML")
struct StatusPageTests {
    /// Markup, quotes, a terminal escape, a bidirectional override, a NUL and a newline.
    static let hostile = "<script>alert(1)</script>\"'><img src=x onerror=alert(2)>\u{1B}[31m\u{202E}exe.gpj\u{0}\nend"

    /// The elements the page is made of; anything else in it came from data.
    static let elements: Set<String> = [
        "doctype", "html", "head", "meta", "title", "link", "script", "body", "header", "h1", "h2", "span", "form",
        "button",
        "noscript", "p", "main", "section", "div", "b", "small", "table", "thead", "tbody", "tr", "th", "td", "a",
        "svg", "line", "path", "rect", "label", "select", "option", "input", "code",
    ]

    func observed(_ h: SimHarness, hosts: [HostRecord] = [], history: PoolHistory? = nil, now: Date = Date())
        async throws -> StatusSnapshot
    {
        StatusSnapshot(
            observation: try await h.reconciler.observe(depth: .hypervisor, allHosts: true),
            standbyCounts: try await h.reconciler.liveStandbyCounts(), hosts: hosts,
            hostTimeout: hosts.isEmpty ? nil : .seconds(30), events: try h.store.events(limit: 1000),
            waiters: try h.store.leaseWaiters(), history: history, host: "test-host", now: now)
    }

    /// Every element name the HTML opens or closes.
    static func tags(_ html: String) -> Set<String> {
        var names = Set<String>()
        var rest = Substring(html)
        while let open = rest.firstIndex(of: "<") {
            rest = rest[rest.index(after: open)...]
            let name = rest.drop { $0 == "/" || $0 == "!" }.prefix { $0.isLetter || $0.isNumber }
            if !name.isEmpty { names.insert(name.lowercased()) }
        }
        return names
    }

    /// What no page may contain, whatever its data: elements of its own making only, one
    /// script element (its own), and no character that is not text.
    static func checkInert(_ html: String, _ comment: Comment) {
        #expect(tags(html).subtracting(elements).isEmpty, "\(tags(html).subtracting(elements)) — \(comment)")
        #expect(html.components(separatedBy: "<script").count - 1 <= 1, comment)
        let invisible = html.dropLast().unicodeScalars.filter {
            [.control, .format].contains($0.properties.generalCategory)
        }
        #expect(invisible.isEmpty, "\(invisible.map { String($0.value, radix: 16) }) — \(comment)")
    }

    @Test func anEmptyStoreSaysThereIsNothingYet() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        let page = StatusPage.render(try await observed(h), filter: StatusFilter())
        #expect(page.hasPrefix("<!doctype html>"))
        #expect(page.contains("No pools applied"))
        #expect(page.contains("No VMs."))
        #expect(page.contains("No events yet."))
        #expect(!page.contains("<h2>Hosts</h2>"), "a store of one host lists no hosts")
        #expect(page.contains("test-host · this host"))
        Self.checkInert(page, "empty store")
    }

    @Test func poolsLeasesAFailedVMAndASilentHostAreShown() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply([pool("web", size: 3), pool("ci", size: 2, boot: .template)], prune: [])
        guard case .leased(let leased) = try h.store.lease(pool: "ci", holder: "job-42", ttl: .seconds(600)) else {
            Issue.record("no VM of ci was leased")
            return
        }
        let crashed = try #require(try h.store.vms(pool: "web").first?.id)
        try h.driver.simulateCrash(crashed)
        let now = Date()
        let hosts = [
            HostRecord(
                name: "h1", epoch: 1, capacity: .init(vcpus: 8, memoryMiB: 16384), heartbeatAt: now,
                registeredAt: now),
            HostRecord(
                name: "h2", epoch: 1, capacity: .init(vcpus: 8, memoryMiB: 16384),
                heartbeatAt: now.addingTimeInterval(-90), registeredAt: now.addingTimeInterval(-600)),
            HostRecord(
                name: "h3", epoch: 2, capacity: .init(vcpus: 4, memoryMiB: 8192),
                heartbeatAt: now.addingTimeInterval(-900), registeredAt: now.addingTimeInterval(-900),
                fencedAt: now.addingTimeInterval(-800)),
        ]
        let snapshot = try await observed(h, hosts: hosts, now: now)
        let page = StatusPage.render(snapshot, filter: StatusFilter())

        #expect(snapshot.vms.count == 5)
        #expect(page.components(separatedBy: "<tr><td>").count - 1 == 2 + 5 + 3, "pools, VMs and hosts")
        #expect(page.components(separatedBy: "><td title=").count - 1 == snapshot.events.count)
        #expect(page.contains(">\(crashed)<td>web<td class=s-failed title=\"the VM&#39;s process is gone\">failed"))
        #expect(page.contains("job-42 <small>9m left</small>") || page.contains("job-42 <small>10m left</small>"))
        #expect(page.contains("<td class=\"short\">2 / 3"), "web is short of one ready VM")
        #expect(page.contains("<td class=\"ok\">1 / 2") == false && page.contains("<td class=\"short\">1 / 2"))
        #expect(page.contains("<span class=ok title=\"ci-t"), "ci's template is ready")
        #expect(page.contains("<td class=error>the VM&#39;s process is gone <small>\(crashed)</small>"))
        #expect(page.contains("<td>h2<td class=h-silent>silent"))
        #expect(page.contains("<td>h3<td class=h-dead>dead"))
        #expect(page.contains("<td>h1<td class=h-ready>ready"))
        #expect(page.contains("2 silent or dead"))
        #expect(page.contains("1 failed"))
        #expect(page.contains("leased<td>ci<td>\(leased.id)<td>to job-42"))
        Self.checkInert(page, "a store with pools, a lease, a failed VM and a silent host")
    }

    @Test func hostileStringsAreShownAndNeverObeyed() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply([pool("web", size: 2)], prune: [])
        _ = try h.store.lease(pool: "web", holder: Self.hostile, ttl: nil)
        try h.store.record(Event(pool: "web", kind: "fault", message: Self.hostile))
        try h.store.record(Event(pool: "web", kind: Self.hostile, message: "kind"))
        var record = try #require(try h.store.vms(pool: "web").last)
        record.lastError = Self.hostile
        try h.store.saveVM(record)
        let hosts = [
            HostRecord(
                name: Self.hostile, epoch: 1, capacity: .init(vcpus: 1, memoryMiB: 1024), heartbeatAt: Date(),
                registeredAt: Date())
        ]
        let snapshot = try await observed(h, hosts: hosts)
        for filter in [StatusFilter(), StatusFilter(pool: Self.hostile, state: Self.hostile)] {
            let page = StatusPage.render(snapshot, filter: filter, signedIn: true)
            Self.checkInert(page, "filter \(filter)")
            #expect(!page.contains("<img"))
            #expect(
                page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&gt;&lt;img src=x onerror=alert(2)&gt;"))
            #expect(page.contains("\\u{1B}[31m\\u{202E}exe.gpj\\u{0}\\u{A}end"), "controls are shown, not sent")
        }
        let filtered = StatusPage.render(snapshot, filter: StatusFilter(pool: Self.hostile))
        #expect(filtered.contains("data-live=\"/ui/live?pool=%3Cscript%3Ealert%281%29"))
        #expect(filtered.contains("No VMs match the filter."))
    }

    /// The page lists the newest events; a pool's last error is read apart, so a failure older
    /// than every listed event is still the pool's last error.
    @Test func aPoolsLastErrorOutlivesTheListedEvents() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply([pool("web", size: 1)], prune: [])
        try h.store.record(Event(pool: "web", kind: "launch-failed", message: "the disk is full"))
        for index in 0..<(StatusPage.maxEvents + 50) {
            try h.store.record(Event(pool: "web", kind: "note", message: "event \(index)"))
        }
        let snapshot = try await StatusSnapshot.read(reconciler: h.reconciler, history: nil)
        #expect(snapshot.events.count == StatusPage.maxEvents)
        #expect(snapshot.events.first?.message == "event \(StatusPage.maxEvents + 49)", "newest first")
        #expect(!snapshot.events.contains { $0.kind == "launch-failed" })
        #expect(snapshot.pools.first?.lastError?.text == "the disk is full")
    }

    @Test func theFilterListsOnlyItsVMs() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply([pool("web", size: 2), pool("db", size: 1, state: .paused)], prune: [])
        let snapshot = try await observed(h)
        let db = StatusPage.fragment(snapshot, filter: StatusFilter(pool: "db"))
        #expect(db.components(separatedBy: "<td>db<td class=s-").count - 1 == 1)
        #expect(!db.contains("<td>web<td class=s-"))
        #expect(db.contains("<option selected>db"))
        let running = StatusPage.fragment(snapshot, filter: StatusFilter(state: "running"))
        #expect(running.components(separatedBy: "<td class=s-running>").count - 1 == 2)
        #expect(!running.contains("<td class=s-paused>"))
        let none = StatusPage.fragment(snapshot, filter: StatusFilter(pool: "db", state: "running"))
        #expect(none.contains("No VMs match the filter."))
    }

    @Test func aPoolsHourIsMergedForgottenAndDrawn() {
        let history = PoolHistory(spacing: .seconds(30))
        let start = Date(timeIntervalSince1970: 1_800_000_000)
        history.record(["web": (ready: 1, size: 3, waiting: 2)], at: start)
        history.record(["web": (ready: 2, size: 3, waiting: 0)], at: start.addingTimeInterval(10))
        history.record(["web": (ready: 3, size: 3, waiting: 0)], at: start.addingTimeInterval(40))
        history.recordLease(pool: "web", waited: 2.5, at: start.addingTimeInterval(45))
        let samples = history.samples("web", now: start.addingTimeInterval(50))
        #expect(samples.count == 2, "two passes 10 s apart are one sample")
        #expect(samples.first?.ready == 2 && samples.first?.waiting == 2, "the newest count, the most waiting")
        #expect(samples.last?.leases == 1 && samples.last?.longestWait == 2.5)

        let chart = StatusPage.fragment(
            StatusSnapshot(
                generatedAt: start.addingTimeInterval(50), host: "h", shared: false, pools: [], vms: [], hosts: [],
                events: []), filter: StatusFilter())
        #expect(!chart.contains("<svg"), "no pools, no charts")

        history.record(["web": (ready: 3, size: 4, waiting: 0)], at: start.addingTimeInterval(3700))
        #expect(history.samples("web", now: start.addingTimeInterval(3700)).count == 1, "older than an hour: gone")
        history.record([:], at: start.addingTimeInterval(3710))
        #expect(history.samples("web", now: start.addingTimeInterval(3710)).isEmpty, "a deleted pool is forgotten")
    }

    @Test func theChartShowsReadyAgainstSizeAndTheLeaseWaits() async throws {
        let h = try SimHarness()
        defer { h.directory.remove() }
        _ = try await h.reconciler.apply([pool("web", size: 2)], prune: [])
        let history = PoolHistory(spacing: .seconds(30))
        let now = Date()
        history.record(["web": (ready: 0, size: 2, waiting: 1)], at: now.addingTimeInterval(-1800))
        history.recordLease(pool: "web", waited: 0.35, at: now.addingTimeInterval(-1790))
        history.record(["web": (ready: 2, size: 2, waiting: 0)], at: now.addingTimeInterval(-600))
        let page = StatusPage.render(try await observed(h, history: history, now: now), filter: StatusFilter())
        #expect(
            page.contains("<path class=\"ready\" d=\"M90 25H150V1H180\"/>"),
            "0 half an hour ago, 2 from ten minutes ago")
        #expect(page.contains("<path class=\"size\" d=\"M90 1H180\"/>"))
        #expect(page.components(separatedBy: "<rect class=\"wait\"").count - 1 == 1)
        #expect(page.contains("ready 2 of 2 now, at least 0 over the last hour; 1 lease, longest wait 350 ms"))
        Self.checkInert(page, "charts")
    }

    @Test func escapingCoversMarkupControlsAndInvisibleCharacters() {
        #expect(HTML.escape("a&b<c>d\"e'f") == "a&amp;b&lt;c&gt;d&quot;e&#39;f")
        #expect(HTML.escape("tab\there\r\n") == "tab\\u{9}here\\u{D}\\u{A}")
        #expect(HTML.escape("\u{200B}\u{202E}\u{2066}\u{9B}\u{7F}") == "\\u{200B}\\u{202E}\\u{2066}\\u{9B}\\u{7F}")
        #expect(HTML.escape("naïve 漢字 🙂") == "naïve 漢字 🙂", "text stays text")
        #expect(HTML.queryValue("a b/&é") == "a%20b%2F%26%C3%A9")
    }
}
