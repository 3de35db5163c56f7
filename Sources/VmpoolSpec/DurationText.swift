/// Durations as users write them: a number with `ms`, `s`, `m` or `h`, or a bare `0`.
public enum DurationText {
    /// A number with a unit (`500ms`, `30s`, `5m`, `1h`, `1.5s`), several of them in a row
    /// from the largest unit down (`1m30s`, `2h15m`), or a bare `0`.
    public static func parse(_ text: String) -> Duration? {
        if text == "0" { return .zero }
        let units: [(String, Double)] = [("ms", 0.001), ("h", 3600), ("m", 60), ("s", 1)]
        var rest = Substring(text)
        var total = 0.0
        var lastScale = Double.infinity
        while !rest.isEmpty {
            let number = rest.prefix { $0.isASCII && ($0.isNumber || $0 == ".") }
            guard !number.isEmpty, let value = Double(number), value.isFinite else { return nil }
            rest = rest.dropFirst(number.count)
            guard let (suffix, scale) = units.first(where: { rest.hasPrefix($0.0) }), scale < lastScale else {
                return nil
            }
            rest = rest.dropFirst(suffix.count)
            total += value * scale
            lastScale = scale
        }
        guard lastScale.isFinite, total < 1e9 else { return nil }
        return .milliseconds(Int64((total * 1000).rounded()))
    }

    /// `1.5s`, `250ms`, `2m`: the form `parse` reads back.
    public static func format(_ duration: Duration) -> String {
        let ms = duration.milliseconds
        if ms % 3_600_000 == 0, ms > 0 { return "\(ms / 3_600_000)h" }
        if ms % 60_000 == 0, ms > 0 { return "\(ms / 60_000)m" }
        if ms % 1000 == 0 { return "\(ms / 1000)s" }
        return "\(ms)ms"
    }
}

extension Duration {
    /// Whole milliseconds, rounded down: the unit of logs and timeouts.
    public var milliseconds: Int64 {
        components.seconds * 1000 + components.attoseconds / 1_000_000_000_000_000
    }
}

extension Duration {
    /// The duration in (fractional) seconds.
    public var seconds: Double {
        Double(components.seconds) + Double(components.attoseconds) / 1e18
    }
}
