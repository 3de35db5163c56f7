import Foundation
import Metrics
import Prometheus
import VmpoolReconciler
import VmpoolStore

/// Prometheus exposition of what the service does: swift-metrics is the API everywhere
/// (the reconciler counts actions, leases time themselves), swift-prometheus the backend,
/// bootstrapped once by the service. Commands run outside the service record nothing.
public final class ServiceMetrics: Sendable {
    public let registry: PrometheusCollectorRegistry

    /// Bootstraps the metrics system with a Prometheus registry (once per process).
    public init() {
        registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        let fast: [Duration] = [
            .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10),
            .milliseconds(20), .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500),
            .seconds(1), .seconds(2), .seconds(5), .seconds(10), .seconds(30), .seconds(60),
        ]
        factory.defaultDurationHistogramBuckets = fast
        MetricsSystem.bootstrap(factory)
    }

    /// Sets the per-pool gauges from an observation and its pools' readiness.
    public func record(_ observation: Observation, readiness: [String: Readiness], standbys: [String: Int]) {
        for pool in observation.pools {
            let name = pool.spec.name
            let counts = readiness[name] ?? Readiness()
            let dimensions = [("pool", name)]
            Gauge(label: "vmpool_pool_size", dimensions: dimensions).record(pool.spec.size)
            Gauge(label: "vmpool_pool_ready", dimensions: dimensions).record(counts.ready)
            Gauge(label: "vmpool_pool_leased", dimensions: dimensions).record(counts.leased)
            Gauge(label: "vmpool_pool_warm", dimensions: dimensions).record(counts.warm)
            Gauge(label: "vmpool_pool_standbys", dimensions: dimensions).record(standbys[name] ?? 0)
        }
    }

    /// What each metric means, for `# HELP` lines: the swift-metrics API has no help text,
    /// and Prometheus tooling (promtool check metrics) wants one per metric.
    static let help: [String: String] = [
        "vmpool_pool_size": "VMs the pool must have in its state (spec.size).",
        "vmpool_pool_ready": "VMs of the pool in its desired state and answering, leased ones not counted.",
        "vmpool_pool_leased": "VMs taken from the pool by lease and not yet released.",
        "vmpool_pool_warm": "Paused spare VMs of the pool beyond its size.",
        "vmpool_pool_standbys": "Hypervisor processes started ahead of clones for the pool, ready.",
        "vmpool_actions_total": "Actions run by reconcile passes, by kind and outcome.",
        "vmpool_action_duration_seconds": "How long actions took, by kind and outcome.",
        "vmpool_pass_duration_seconds": "How long reconcile passes took, waiting for the state dir lock included.",
        "vmpool_lease_duration_seconds": "How long handing out a lease took, waiting for a ready VM included.",
    ]

    /// The text exposition format.
    public func exposition() -> String {
        var buffer: [UInt8] = []
        registry.emit(into: &buffer)
        var text = ""
        for line in String(decoding: buffer, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("# TYPE "), let name = line.split(separator: " ").dropFirst(2).first,
                let help = Self.help[String(name)]
            {
                text += "# HELP \(name) \(help)\n"
            }
            text += line
            text += "\n"
        }
        return String(text.dropLast())
    }
}
