// swift-tools-version: 6.1
// Micro-benchmarks of ChatBridge's hot pieces, in a package of their own so the main build and its tests are
// not slowed. Run from this directory: `swift package benchmark` (release build; time, CPU and allocations).
import Foundation
import PackageDescription

/// A path dependency is known by its directory's name: the checkout's, whatever it is called.
let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().lastPathComponent.lowercased()

let package = Package(
    name: "ChatBridgeBenchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(path: ".."),
        .package(url: "https://github.com/ordo-one/package-benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.0"),
    ],
    targets: [
        .executableTarget(
            name: "ChatBridgeBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "package-benchmark"),
                .product(name: "ChatBridgeCore", package: root),
                .product(name: "ChatBridgeDingTalk", package: root),
                .product(name: "ChatBridgeLLM", package: root),
                .product(name: "ChatBridgeStore", package: root),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Benchmarks/ChatBridgeBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "package-benchmark")]
        ),
    ]
)
