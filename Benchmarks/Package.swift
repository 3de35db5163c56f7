// swift-tools-version:6.1
import PackageDescription

// In-process benchmarks of vmpool's own overhead, with ordo-one/package-benchmark.
// Run from this directory: swift package benchmark
// A package of its own so that the main build and test suite do not compile the benchmark harness.
let package = Package(
    name: "vmpool-benchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "vmpool", path: ".."),
        .package(url: "https://github.com/ordo-one/benchmark.git", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        .executableTarget(
            name: "VmpoolBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "VmpoolSpec", package: "vmpool"),
                .product(name: "VmpoolPlanner", package: "vmpool"),
                .product(name: "VmpoolStore", package: "vmpool"),
                .product(name: "VmpoolDriver", package: "vmpool"),
                .product(name: "VmpoolReconciler", package: "vmpool"),
                .product(name: "VmpoolSim", package: "vmpool"),
            ],
            path: "Benchmarks/VmpoolBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        )
    ]
)
