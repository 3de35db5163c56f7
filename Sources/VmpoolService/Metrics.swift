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
        let fast: [Duration] = [.milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10),
            .milliseconds(20), .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500),
            .seconds(1), .seconds(2), .seconds(5), .seconds(10), .seconds(30), .seconds(60)]
        factory.defaultDurationHistogramBuckets = fast
        MetricsSystem.bootstrap(factory)
    }

    /// Sets the per-pool gauges from an observation.
    public func record(_ observation: Observation, standbys: [String: Int]) {
        let readiness = observation.readiness()
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

    /// The text exposition format.
    public func exposition() -> String {
        var buffer: [UInt8] = []
        registry.emit(into: &buffer)
        return String(decoding: buffer, as: UTF8.self)
    }
}
