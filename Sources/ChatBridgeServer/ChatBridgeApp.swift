import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeDingTalk
import ChatBridgeLLM
import ChatBridgeStore
import Foundation
import Hummingbird
import Logging
import NIOCore
import NIOFoundationCompat
import NIOHTTP1
import ServiceLifecycle
import UnixSignals
import Metrics
import Prometheus
import Synchronization

/// Shared between the HTTP routes and the shutdown sequence.
final class LifecycleState: Sendable {
    private let draining = Atomic<Bool>(false)
    var isDraining: Bool { draining.load(ordering: .relaxed) }
    func beginDraining() { draining.store(true, ordering: .relaxed) }
}

/// The assembled server: HTTP routes, the dispatcher and the store, run as services in one group.
///
/// On SIGTERM or SIGINT it stops accepting callbacks (503), lets the answers in flight finish for up to
/// `server.drain_timeout`, then stops the HTTP server and exits.
public final class ChatBridgeApp: Sendable {
    public let configuration: ChatBridgeConfiguration
    public let store: SQLStore
    public let dispatcher: Dispatcher
    public let engine: Engine
    private let httpClient: HTTPClient
    private let lifecycle = LifecycleState()
    private let logger: Logger
    private let group = Mutex<ServiceGroup?>(nil)

    init(configuration: ChatBridgeConfiguration, store: SQLStore, dispatcher: Dispatcher, engine: Engine, httpClient: HTTPClient, logger: Logger) {
        self.configuration = configuration
        self.store = store
        self.dispatcher = dispatcher
        self.engine = engine
        self.httpClient = httpClient
        self.logger = logger
    }

    /// Runs until shut down. `onListening` receives the bound port (useful with `server.port: 0`).
    public func run(gracefulShutdownSignals: [UnixSignal] = [.sigterm, .sigint], onListening: @escaping @Sendable (Int) async -> Void = { _ in }) async throws {
        let router = makeRouter()
        let http = Application(
            router: router,
            configuration: .init(address: .hostname(configuration.server.host, port: configuration.server.port), serverName: "chatbridge"),
            onServerRunning: { channel in await onListening(channel.localAddress?.port ?? 0) },
            logger: logger
        )
        var serviceConfiguration = ServiceGroupConfiguration(
            services: [
                .init(service: http),
                .init(service: DispatcherService(dispatcher: dispatcher)),
                .init(service: DrainStarter(lifecycle: lifecycle, logger: logger), successTerminationBehavior: .ignore),
            ],
            gracefulShutdownSignals: gracefulShutdownSignals,
            logger: logger
        )
        serviceConfiguration.maximumGracefulShutdownDuration = configuration.server.drainTimeout
        serviceConfiguration.maximumCancellationDuration = .seconds(5)
        let serviceGroup = ServiceGroup(configuration: serviceConfiguration)
        group.withLock { $0 = serviceGroup }
        defer { group.withLock { $0 = nil } }
        do {
            try await serviceGroup.run()
        } catch {
            await shutdownResources()
            throw error
        }
        await shutdownResources()
    }

    /// Starts a graceful shutdown, as SIGTERM does.
    public func shutdown() async {
        let serviceGroup = group.withLock { $0 }
        await serviceGroup?.triggerGracefulShutdown()
    }

    private func shutdownResources() async {
        try? await httpClient.shutdown()
        await store.close()
    }

    func makeRouter() -> Router<BasicRequestContext> {
        let router = Router()
        router.get("/healthz") { _, _ in
            Response.json(.ok, ["status": "ok"])
        }
        router.get("/readyz") { _, _ in
            do {
                let version = try await self.store.schemaVersion()
                guard version == SQLStore.latestVersion else {
                    return Response.json(.serviceUnavailable, ["status": "migrations pending"])
                }
                return Response.json(.ok, ["status": "ready"])
            } catch {
                return Response.json(.serviceUnavailable, ["status": "database unreachable"])
            }
        }
        router.get("/metrics") { _, _ in
            if let counts = try? await self.store.counts() {
                Metrics.Gauge(label: "chatbridge_inbox_pending").record(counts.pending)
                Metrics.Gauge(label: "chatbridge_inbox_running").record(counts.running)
            }
            let text = Telemetry.registry.emitToString()
            return Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4"], body: .init(byteBuffer: ByteBuffer(string: text)))
        }
        DingTalkCallbackController(
            settings: configuration.dingtalk, groupScope: configuration.engine.groupScope, inbox: store,
            maxBodyBytes: configuration.server.maxBodyBytes, lifecycle: lifecycle,
            onAccepted: { [dispatcher] in dispatcher.wake() }, logger: logger
        ).addRoutes(to: router)
        return router
    }
}

/// Runs the dispatcher; on graceful shutdown it stops claiming and waits for the answers in flight.
struct DispatcherService: Service {
    let dispatcher: Dispatcher
    func run() async throws {
        await withGracefulShutdownHandler {
            await dispatcher.run()
        } onGracefulShutdown: {
            dispatcher.beginDrain()
        }
    }
}

/// The first service told to shut down: it makes the callback route answer 503 while answers drain.
struct DrainStarter: Service {
    let lifecycle: LifecycleState
    let logger: Logger
    func run() async throws {
        try? await gracefulShutdown()
        lifecycle.beginDraining()
        logger.info("shutting down: callbacks now answer 503 while answers in flight finish")
    }
}

/// Problems that stop the server from starting.
public struct StartupError: Error, CustomStringConvertible {
    public var description: String
}

/// Opens the store, builds the model client, the DingTalk reply channel, the engine and the dispatcher.
public func buildApplication(configuration: ChatBridgeConfiguration, logger: Logger) async throws -> ChatBridgeApp {
    if let problem = configuration.errors.first {
        throw StartupError(description: "invalid configuration: \(problem)")
    }
    let location = try DatabaseLocation.parse(configuration.databaseURL)
    _ = Telemetry.registry
    let store = try await SQLStore.open(location, logger: logger)
    let reclaimed = try await store.reclaimRunning(now: Date())
    if reclaimed > 0 {
        logger.notice("resuming answers interrupted by the previous run", metadata: ["count": "\(reclaimed)"])
    }
    var clientConfiguration = HTTPClient.Configuration()
    clientConfiguration.timeout = .init(connect: .seconds(10), read: .seconds(Int64(max(configuration.llm.timeout.seconds, 30))))
    clientConfiguration.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: max(configuration.worker.concurrency, 8))
    let httpClient = HTTPClient(eventLoopGroupProvider: .singleton, configuration: clientConfiguration)
    let model = OpenAIChatModel(settings: configuration.llm, client: httpClient, logger: logger)
    let engine = Engine(settings: configuration.engine, model: model, conversations: store)
    let replies = DingTalkReplyChannel(settings: configuration.dingtalk, client: httpClient, logger: logger)
    let owner = "\(ProcessInfo.processInfo.hostName)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    let dispatcher = Dispatcher(
        inbox: store, engine: engine, replies: replies,
        settings: DispatcherSettings(
            concurrency: configuration.worker.concurrency,
            retry: RetryPolicy(maxAttempts: configuration.worker.maxAttempts),
            lease: configuration.worker.lease),
        owner: owner, logger: logger)
    return ChatBridgeApp(configuration: configuration, store: store, dispatcher: dispatcher, engine: engine, httpClient: httpClient, logger: logger)
}
