// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "vmpool",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "vmpool", targets: ["vmpool"]),
        .library(name: "VmpoolSpec", targets: ["VmpoolSpec"]),
        .library(name: "VmpoolDriver", targets: ["VmpoolDriver"]),
        .library(name: "VmpoolStore", targets: ["VmpoolStore"]),
        .library(name: "VmpoolPlanner", targets: ["VmpoolPlanner"]),
        .library(name: "VmpoolReconciler", targets: ["VmpoolReconciler"]),
        .library(name: "VmpoolSim", targets: ["VmpoolSim"]),
        .library(name: "VmpoolQEMU", targets: ["VmpoolQEMU"]),
        .library(name: "VmpoolImage", targets: ["VmpoolImage"]),
        .library(name: "VmpoolArchive", targets: ["VmpoolArchive"]),
        .library(name: "VmpoolCopy", targets: ["VmpoolCopy"]),
        .library(name: "VmpoolOCI", targets: ["VmpoolOCI"]),
        .library(name: "VmpoolCLI", targets: ["VmpoolCLI"]),
        .library(name: "VmpoolStatus", targets: ["VmpoolStatus"]),
    ],
    dependencies: [
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.2.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/groue/GRDB.swift.git", from: "7.10.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
        .package(url: "https://github.com/vapor/postgres-nio.git", from: "1.33.2"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-http-types.git", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-crypto.git", "3.12.3"..<"5.0.0"),
    ],
    targets: [
        // Manifest model, loading and validation: YAML in, typed pool specs or located errors out.
        .target(name: "VmpoolSpec", dependencies: [.product(name: "Yams", package: "Yams")]),
        // The hypervisor seam: the driver protocol and the VM facts every driver reports.
        .target(
            name: "VmpoolDriver",
            dependencies: ["VmpoolSpec", .product(name: "Crypto", package: "swift-crypto")]),
        // The state store: desired pools, VMs, templates, the operation journal, events, hosts,
        // written once over a backend seam; SQLite (GRDB) in the state dir; the state-dir lock.
        .target(
            name: "VmpoolStore",
            dependencies: ["VmpoolSpec", "VmpoolDriver", .product(name: "GRDB", package: "GRDB.swift")]
        ),
        // The store on PostgreSQL, shared by many hosts (postgres-nio).
        .target(
            name: "VmpoolStorePostgres",
            dependencies: [
                "VmpoolStore", .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"), .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Pure planning: (desired, observed) -> ordered actions.
        .target(name: "VmpoolPlanner", dependencies: ["VmpoolSpec", "VmpoolDriver"]),
        // Observing, recovering, executing plans against a driver and the store; leases.
        .target(
            name: "VmpoolReconciler",
            dependencies: [
                "VmpoolSpec", "VmpoolDriver", "VmpoolStore", "VmpoolPlanner",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
            ]
        ),
        // The long-running service's HTTP side: the lease API, commands and files in leased VMs,
        // and Prometheus metrics.
        .target(
            name: "VmpoolService",
            dependencies: [
                "VmpoolSpec", "VmpoolDriver", "VmpoolStore", "VmpoolReconciler", "VmpoolArchive", "VmpoolCopy",
                "VmpoolStatus", "CVmpoolSys", .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Logging", package: "swift-log"),
            ],
            resources: [.embedInCode("openapi.json")]
        ),
        // The operator's status page: a snapshot of the store and the hypervisor rendered as
        // HTML (pure: no HTTP), its stylesheet and script, and the service's hour of history.
        .target(
            name: "VmpoolStatus",
            dependencies: ["VmpoolDriver", "VmpoolStore", "VmpoolReconciler"],
            resources: [.embedInCode("Assets/status.css"), .embedInCode("Assets/status.js")]
        ),
        // The simulated hypervisor (CI fixtures, tests, dry experiments).
        .target(
            name: "VmpoolSim",
            dependencies: ["VmpoolSpec", "VmpoolDriver", .product(name: "GRDB", package: "GRDB.swift")]
        ),
        // Small C helpers for what Swift cannot spell on Linux (SCM_RIGHTS fd passing).
        .target(name: "CVmpoolSys"),
        // The real hypervisor: QEMU processes, QMP, the guest agent.
        .target(
            name: "VmpoolQEMU",
            dependencies: [
                "VmpoolSpec", "VmpoolDriver", "VmpoolArchive", "CVmpoolSys",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The default guest image: Debian kernel + busybox initramfs with the agent, and the
        // Debian root disk. The guest's own files (agent sources, init, root disk builder) are
        // files of their own, embedded in the binary so that `image build` works anywhere.
        .target(
            name: "VmpoolImage", dependencies: ["VmpoolDriver", "CVmpoolSys"],
            resources: [
                .embedInCode("Guest/agent/agent.h"), .embedInCode("Guest/agent/main.c"),
                .embedInCode("Guest/agent/protocol.c"), .embedInCode("Guest/agent/session.c"),
                .embedInCode("Guest/agent/ports.c"), .embedInCode("Guest/agent/exec.c"),
                .embedInCode("Guest/agent/control.c"), .embedInCode("Guest/agent/identity.c"),
                .embedInCode("Guest/agent/network.c"), .embedInCode("Guest/agent/util.c"),
                .embedInCode("Guest/guest-init.sh"), .embedInCode("Guest/debian-rootfs.sh"),
                .embedInCode("Guest/fetch-kernel.sh"),
            ]
        ),
        // Tar streams for `cp`: a guest's archive read without trusting it (bounded, nothing
        // outside the destination, nothing privileged, all or nothing) and host trees written as one.
        .target(name: "VmpoolArchive", dependencies: ["CVmpoolSys"]),
        // `cp` between the host and a guest: one tar stream through the guest agent, the guest's
        // side a short sh script, the host's side the archive library (for the CLI and the API).
        .target(name: "VmpoolCopy", dependencies: ["VmpoolDriver", "VmpoolArchive"]),
        // Images the user brings: an OCI or Docker image archive read without trusting it
        // (digests checked, sizes bounded, nothing outside the root), its layers applied in order
        // with whiteouts into a root tree, and that tree made a root disk (mke2fs -d, qemu-img).
        .target(
            name: "VmpoolOCI",
            dependencies: [
                "VmpoolArchive", "CVmpoolSys", "CVmpoolZlib", .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        // zlib's inflate for gzip-compressed layers.
        .target(name: "CVmpoolZlib", linkerSettings: [.linkedLibrary("z")]),
        // Commands: argument parsing and printing; everything else is a library call.
        .target(
            name: "VmpoolCLI",
            dependencies: [
                "VmpoolSpec", "VmpoolDriver", "VmpoolStore", "VmpoolPlanner", "VmpoolReconciler",
                "VmpoolSim", "VmpoolQEMU", "VmpoolImage", "VmpoolService", "VmpoolStatus", "VmpoolStorePostgres",
                "VmpoolArchive",
                "VmpoolOCI", "VmpoolCopy", "CVmpoolSys",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"), .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ]
        ),
        .executableTarget(name: "vmpool", dependencies: ["VmpoolCLI"]),
        // Builders and fakes shared by the test targets.
        .target(
            name: "VmpoolTestSupport",
            dependencies: [
                "VmpoolSpec", "VmpoolDriver", "VmpoolStore", "VmpoolStorePostgres", "VmpoolSim", "VmpoolReconciler",
                "VmpoolPlanner", "VmpoolArchive", "CVmpoolSys", .product(name: "Logging", package: "swift-log"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            path: "Tests/VmpoolTestSupport"
        ),
        .testTarget(name: "VmpoolSpecTests", dependencies: ["VmpoolSpec", "VmpoolTestSupport"]),
        .testTarget(name: "VmpoolPlannerTests", dependencies: ["VmpoolPlanner", "VmpoolTestSupport"]),
        .testTarget(
            name: "VmpoolStoreTests",
            dependencies: ["VmpoolStore", "VmpoolTestSupport", .product(name: "GRDB", package: "GRDB.swift")]
        ),
        .testTarget(
            name: "VmpoolReconcilerTests",
            dependencies: [
                "VmpoolReconciler", "VmpoolSim", "VmpoolTestSupport", .product(name: "GRDB", package: "GRDB.swift"),
            ]
        ),
        .testTarget(
            name: "VmpoolCLITests", dependencies: ["VmpoolCLI", "VmpoolArchive", "VmpoolCopy", "VmpoolTestSupport"]),
        .testTarget(
            name: "VmpoolStatusTests",
            dependencies: ["VmpoolStatus", "VmpoolReconciler", "VmpoolStore", "VmpoolTestSupport"]),
        .testTarget(name: "VmpoolArchiveTests", dependencies: ["VmpoolArchive", "VmpoolTestSupport"]),
        .testTarget(name: "VmpoolOCITests", dependencies: ["VmpoolOCI", "VmpoolArchive", "VmpoolTestSupport"]),
        .testTarget(
            name: "VmpoolQEMUTests",
            dependencies: ["VmpoolQEMU", "VmpoolImage", "VmpoolStore", "VmpoolArchive", "VmpoolTestSupport"]
        ),
    ]
)
