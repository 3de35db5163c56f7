import Foundation

/// A pool's last hour as a small server-rendered SVG: ready VMs as a line against the pool's
/// size (dashed), and the longest lease wait of each stretch as a bar from the bottom.
/// Plain SVG elements styled by the page's stylesheet: no script, nothing fetched.
enum Chart {
    static let width = 180.0
    static let height = 36.0
    /// Room under the line for the wait bars.
    static let barHeight = 10.0

    static func svg(_ samples: [PoolHistory.Sample], now: Date, pool: String) -> String {
        let start = now.addingTimeInterval(-PoolHistory.window)
        let top = Double(max(1, samples.map { max($0.ready, $0.size) }.max() ?? 1))
        let longest = samples.map(\.longestWait).max() ?? 0
        let label = summary(samples, longest: longest)
        var svg =
            "<svg class=\"chart\" viewBox=\"0 0 \(Int(width)) \(Int(height))\" width=\"\(Int(width))\""
            + " height=\"\(Int(height))\" role=\"img\" aria-label=\"\(HTML.escape("\(pool): \(label)"))\"><title>\(HTML.escape(label))</title>"
        let base = format(height - 0.5)
        svg += "<line class=\"axis\" x1=\"0\" y1=\"\(base)\" x2=\"\(Int(width))\" y2=\"\(base)\"/>"
        if !samples.isEmpty {
            svg += "<path class=\"size\" d=\"\(steps(samples, start: start, now: now, top: top) { $0.size })\"/>"
            svg += "<path class=\"ready\" d=\"\(steps(samples, start: start, now: now, top: top) { $0.ready })\"/>"
        }
        if longest > 0 {
            for sample in samples where sample.longestWait > 0 {
                let h = max(1.5, barHeight * sample.longestWait / longest)
                let x = xPosition(sample.at, start: start)
                svg += "<rect class=\"wait\" x=\"\(format(x - 1))\" y=\"\(format(height - h))\" width=\"2\""
                svg += " height=\"\(format(h))\"/>"
            }
        }
        return svg + "</svg>"
    }

    /// What the chart says, in words (its title and accessible name).
    static func summary(_ samples: [PoolHistory.Sample], longest: Double) -> String {
        guard let last = samples.last else { return "no passes seen yet in the last hour" }
        let leases = samples.reduce(0) { $0 + $1.leases }
        let lowest = samples.map(\.ready).min() ?? last.ready
        var text = "ready \(last.ready) of \(last.size) now, at least \(lowest) over the last hour"
        text += leases == 0 ? "; no leases through the service" : "; \(leases) lease\(leases == 1 ? "" : "s")"
        if leases > 0 { text += longest > 0 ? ", longest wait \(Age.seconds(longest))" : ", none waited" }
        return text
    }

    /// A step line: each sample's value holds until the next one, the last until now.
    static func steps(
        _ samples: [PoolHistory.Sample], start: Date, now: Date, top: Double, _ value: (PoolHistory.Sample) -> Int
    )
        -> String
    {
        var path = ""
        var previousY: Double?
        for sample in samples {
            let x = xPosition(sample.at, start: start)
            let y = yPosition(value(sample), top: top)
            if let previousY {
                if previousY != y { path += "H\(format(x))V\(format(y))" }
            } else {
                path += "M\(format(x)) \(format(y))"
            }
            previousY = y
        }
        return path + "H\(format(xPosition(now, start: start)))"
    }

    static func xPosition(_ at: Date, start: Date) -> Double {
        min(width, max(0, width * at.timeIntervalSince(start) / PoolHistory.window))
    }

    /// Values use the height above the bars' band, with a pixel of margin at the top.
    static func yPosition(_ value: Int, top: Double) -> Double {
        let usable = height - barHeight - 2
        return 1 + usable * (1 - Double(value) / top)
    }

    static func format(_ value: Double) -> String {
        let rounded = (value * 10).rounded() / 10
        return rounded == rounded.rounded() ? String(Int(rounded)) : String(rounded)
    }
}
