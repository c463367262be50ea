import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeDingTalk
import ChatBridgeHTTP
import ChatBridgeLark
import ChatBridgeLLM
import ChatBridgeStore
import Foundation
import Hummingbird
import Logging
import Metrics
import NIOCore
import Prometheus
import ServiceLifecycle
import Synchronization

/// Shared between the HTTP routes and the shutdown sequence.
public final class LifecycleState: Sendable {
    private let draining = Atomic<Bool>(false)
    public var isDraining: Bool { draining.load(ordering: .relaxed) }
    func beginDraining() { draining.store(true, ordering: .relaxed) }
}

/// The ports the application's listeners bound (useful with port 0).
public final class BoundPorts: Sendable {
    private let ports = Mutex<(main: Int?, metrics: Int?)>((nil, nil))
    public var main: Int? { ports.withLock { $0.main } }
    public var metrics: Int? { ports.withLock { $0.metrics } }
    func setMain(_ port: Int) { ports.withLock { $0.main = port } }
    func setMetrics(_ port: Int) { ports.withLock { $0.metrics = port } }
}

/// What the application is made of, for the commands and the tests.
public struct ChatBridgeComponents: Sendable {
    public let configuration: ChatBridgeConfiguration
    public let store: SQLStore
    public let engine: Engine
    /// The operator controls in force; a reload replaces them.
    public let controls: ControlsBox
    /// Every model profile with its key pool.
    public let models: ModelRouter
    /// Reloads controls and profiles (SIGHUP, a changed file).
    public let reloader: ConfigReloader
    public let dispatcher: Dispatcher
    public let ingress: DingTalkIngress
    /// The DingTalk Stream-mode connection (status `off` when not configured to connect).
    public let stream: DingTalkStream
    /// The Lark webhook ingress (answers 503 until Lark is configured).
    public let larkIngress: LarkWebhookIngress
    /// The Lark long connection (status `off` when not configured to connect); it also fetches the bot's
    /// identity at start.
    public let larkConnection: LarkLongConnection
    /// The Lark OpenAPI client (nil when Lark is not configured).
    public let larkAPI: LarkAPI?
    public let httpClient: HTTPClient
    /// The registry `/metrics` renders; every metric of this application is recorded in it.
    public let metrics: PrometheusCollectorRegistry
    public let lifecycle: LifecycleState
    public let ports: BoundPorts
    /// Happens when the HTTP server listens; the dispatcher starts claiming only then.
    public let serverRunning: OneTimeEvent
    /// Happens when the dispatcher service has stopped; shared resources close only then.
    let dispatcherStopped: OneTimeEvent
}

/// The ChatBridge server as a Hummingbird application: callback, health and metrics routes, and the
/// dispatcher and resource services registered with `addServices`. `app.test(.router)` and `.live` work as
/// for any Hummingbird application.
///
/// Run as a service (`runService()`, or inside a `ServiceGroup`), a graceful shutdown first drains: `/readyz`
/// turns 503, the dispatcher stops claiming and the answers in flight finish (up to
/// `server.drain_timeout`) while callbacks are still accepted into the durable inbox; then the HTTP
/// server stops, then the services.
public struct ChatBridgeApplication: ApplicationProtocol {
    public typealias Responder = RouterResponder<BasicRequestContext>

    public let components: ChatBridgeComponents
    private let builtResponder: Responder
    public var configuration: ApplicationConfiguration
    public var logger: Logger
    public var services: [any Service]
    private let onListening: @Sendable (Int) async -> Void

    public var responder: Responder {
        get async throws { builtResponder }
    }

    public func onServerRunning(_ channel: any Channel) async {
        let port = channel.localAddress?.port ?? 0
        components.ports.setMain(port)
        components.serverRunning.signal()
        await onListening(port)
    }

    init(
        components: ChatBridgeComponents, router: Router<BasicRequestContext>, configuration: ApplicationConfiguration,
        logger: Logger, onListening: @escaping @Sendable (Int) async -> Void
    ) {
        self.components = components
        self.builtResponder = router.buildResponder()
        self.configuration = configuration
        self.logger = logger
        self.services = []
        self.onListening = onListening
    }

    /// Adds services run alongside the HTTP server.
    public mutating func addServices(_ services: any Service...) {
        self.services.append(contentsOf: services)
    }

    /// Runs the HTTP server and the services; on graceful shutdown the answers drain before the server stops.
    public func run() async throws {
        let http = Application(
            responder: try await responder, configuration: configuration, services: services,
            onServerRunning: { channel in await self.onServerRunning(channel) }, logger: logger)
        let drain = DrainService(
            lifecycle: components.lifecycle, dispatcher: components.dispatcher, serverRunning: components.serverRunning,
            timeout: components.configuration.server.drainTimeout, logger: logger)
        // Shut down in reverse: the Stream connection first (no frame is read, so none is acknowledged, after
        // this point), then the drain (the HTTP server still accepts), then the server and its services.
        let group = ServiceGroup(configuration: .init(services: [http, drain, components.stream, components.larkConnection], logger: logger))
        do {
            try await group.run()
        } catch let error as IOError where error.errnoCode == EADDRINUSE {
            let address = "\(components.configuration.server.host):\(components.configuration.server.port)"
            throw ListenError(address: address, settings: "server.host/server.port (CHATBRIDGE_SERVER_PORT)")
        }
    }
}

/// A listen address is taken.
public struct ListenError: Error, CustomStringConvertible {
    public var address: String
    public var settings: String
    public var description: String {
        "cannot listen on \(address): the address is already in use; choose a free one with \(settings), or stop the other process"
    }
}

/// Runs the dispatcher until the group shuts down; on graceful shutdown anything still in flight (the drain
/// ran before) is abandoned and resumes at the next start.
///
/// It starts claiming only once the HTTP server listens, so a start that fails (a taken port) does not
/// begin answers it cannot finish.
struct DispatcherService: Service {
    let dispatcher: Dispatcher
    let serverRunning: OneTimeEvent
    let stopped: OneTimeEvent

    func run() async throws {
        defer { stopped.signal() }
        let listening = await withTaskGroup(of: Bool.self) { group in
            group.addTask { await serverRunning.wait(); return !Task.isCancelled }
            group.addTask { try? await gracefulShutdown(); return false }
            let first = await group.next() ?? false
            group.cancelAll()
            return first
        }
        guard listening, !Task.isCancelled else { return }
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask { await self.dispatcher.run() }
            try? await gracefulShutdown()
            dispatcher.abandon()
        }
    }
}

/// The first service told to shut down: turns `/readyz` to 503 and lets the answers in flight finish while
/// the HTTP server keeps accepting callbacks (they wait in the inbox for the next start).
struct DrainService: Service {
    let lifecycle: LifecycleState
    let dispatcher: Dispatcher
    let serverRunning: OneTimeEvent
    let timeout: Duration
    let logger: Logger

    func run() async throws {
        // Cancelled (the group failed or was cancelled): nothing to drain in order.
        do { try await gracefulShutdown() } catch { return }
        lifecycle.beginDraining()
        // The dispatcher starts with the server; before that there is nothing to drain.
        guard serverRunning.hasHappened else { return }
        let inFlight = dispatcher.inFlightCount
        logger.info("shutting down: /readyz answers 503; callbacks are still accepted and kept for the next start; answers in flight finish", metadata: ["in_flight": "\(inFlight)"])
        dispatcher.beginDrain()
        let drained = await SystemClock().withTimeout(timeout) { await dispatcher.waitUntilStopped() } != nil
        if !drained {
            logger.warning("drain timed out; answers still in flight resume at the next start", metadata: ["in_flight": "\(dispatcher.inFlightCount)", "server.drain_timeout": "\(timeout)"])
        }
    }
}

/// Serves `/metrics` on its own address (`server.metrics_address`).
struct MetricsServer: Service {
    let address: ChatBridgeConfiguration.ListenAddress
    let registry: PrometheusCollectorRegistry
    let store: SQLStore
    let ports: BoundPorts
    let logger: Logger

    func run() async throws {
        let router = Router()
        MetricsRoute(registry: registry, store: store).add(to: router)
        let app = Application(
            router: router, configuration: .init(address: .hostname(address.host, port: address.port), serverName: "chatbridge-metrics"),
            onServerRunning: { channel in
                let port = channel.localAddress?.port ?? 0
                ports.setMetrics(port)
                logger.notice("metrics listening on http://\(address.host):\(port)/metrics", metadata: ["port": "\(port)"])
            }, logger: logger)
        do {
            try await app.run()
        } catch let error as IOError where error.errnoCode == EADDRINUSE {
            throw ListenError(address: address.description, settings: "server.metrics_address (CHATBRIDGE_SERVER_METRICS_ADDRESS)")
        }
    }
}

/// `GET /metrics`: the application's registry in Prometheus text, with the inbox gauges refreshed.
struct MetricsRoute: Sendable {
    let registry: PrometheusCollectorRegistry
    let store: SQLStore
    private let pending: Metrics.Gauge
    private let running: Metrics.Gauge

    init(registry: PrometheusCollectorRegistry, store: SQLStore) {
        self.registry = registry
        self.store = store
        let factory = PrometheusMetricsFactory(registry: registry)
        pending = Metrics.Gauge(label: "chatbridge_inbox_pending", factory: factory)
        running = Metrics.Gauge(label: "chatbridge_inbox_running", factory: factory)
    }

    func add(to router: Router<BasicRequestContext>) {
        router.get("/metrics") { _, _ in
            if let counts = try? await store.counts() {
                pending.record(counts.pending)
                running.record(counts.running)
            }
            return Response(
                status: .ok, headers: [.contentType: "text/plain; version=0.0.4"],
                body: .init(byteBuffer: ByteBuffer(string: registry.emitToString())))
        }
    }
}

/// Closes the shared resources when the application stops, after the dispatcher stopped using them: the
/// HTTP client, then the store.
struct ResourcesService: Service {
    let httpClient: HTTPClient
    let store: SQLStore
    let dispatcherStopped: OneTimeEvent

    func run() async throws {
        try? await gracefulShutdown()
        // A task of its own, so closing completes also when the group was cancelled.
        await Task { [httpClient, store, dispatcherStopped] in
            await dispatcherStopped.wait()
            try? await httpClient.shutdown()
            await store.close()
        }.value
    }
}

/// What `/status` reads besides the store and the models: the dispatcher and the outbound connections,
/// known only once they are made.
final class StatusSources: Sendable {
    private let state = Mutex<(dispatcher: Dispatcher?, connections: [(String, @Sendable () -> String)])>((nil, []))

    func set(dispatcher: Dispatcher, connections: [(String, @Sendable () -> String)]) {
        state.withLock { $0 = (dispatcher, connections) }
    }

    func report(store: SQLStore, models: ModelRouter) async -> StatusReport {
        let (dispatcher, connections) = state.withLock { $0 }
        let counts = (try? await store.counts()) ?? InboxCounts()
        await models.refreshHealthIfStale()
        let latency = models.latencySummary()
        return StatusReport(
            pending: counts.pending, running: counts.running, inFlightHere: dispatcher?.inFlightCount ?? 0, keys: models.keyReport(),
            latencyP50: latency.p50, latencyP99: latency.p99, latencySamples: latency.count,
            connections: connections.map { ($0.0, $0.1()) }.filter { $0.1 != "off" })
    }
}

/// Problems that stop the server from starting.
public struct StartupError: Error, CustomStringConvertible {
    public var description: String
}

/// Builds the application: opens the store (resuming what a previous run left), the model client, the
/// DingTalk ingress and reply channel, the engine and the dispatcher, the routes and the services.
///
/// `metrics` is the registry to record into and render at `/metrics`; `main` bootstraps the global metrics
/// system with the same registry once. Each application without one gets a registry of its own.
public func buildApplication(
    configuration: ChatBridgeConfiguration, logger: Logger, metrics: PrometheusCollectorRegistry = PrometheusCollectorRegistry(),
    clock: any WallClock = SystemClock(), onListening: @escaping @Sendable (Int) async -> Void = { _ in }
) async throws -> ChatBridgeApplication {
    if let problem = configuration.errors.first {
        throw StartupError(description: "invalid configuration: \(problem)")
    }
    let location = try DatabaseLocation.parse(configuration.databaseURL)
    let store = try await SQLStore.open(location, options: .init(poolSize: configuration.databasePoolSize), logger: logger)
    let factory = PrometheusMetricsFactory(registry: metrics)
    let reclaimed: ReleasedClaims
    do {
        reclaimed = try await store.reclaimRunning(now: clock.now, maxAttempts: configuration.worker.maxAttempts)
    } catch {
        await store.close()
        throw error
    }
    if reclaimed.requeued > 0 {
        logger.notice("resuming answers interrupted by the previous run", metadata: ["count": "\(reclaimed.requeued)"])
    }
    if reclaimed.gaveUp > 0 {
        logger.error("gave up on messages whose last allowed attempt was interrupted by the previous run", metadata: ["count": "\(reclaimed.gaveUp)"])
    }
    // The longest answer any profile may take (a reload cannot lengthen it beyond this).
    let longestTimeout = configuration.profiles.map(\.settings.timeout).max() ?? configuration.llm.timeout
    let httpClient = OutboundHTTP.makeClient(
        readTimeout: .seconds(Int64(max(longestTimeout.seconds, configuration.llm.timeout.seconds, 30))),
        connectionsPerHost: max(configuration.worker.concurrency, 8))
    let models = ModelRouter(
        profiles: configuration.profiles, store: store, client: httpClient, clock: clock, recheckInterval: configuration.keyRecheck,
        metrics: factory, logger: logger)
    let controls = ControlsBox(configuration.controls)
    let statusSources = StatusSources()
    let engine = Engine(
        settings: configuration.engine, model: models, conversations: store, clock: clock, controls: controls, ledger: store,
        donations: models, status: { await statusSources.report(store: store, models: models) }, metrics: factory, logger: logger)
    let dingtalkReplies = DingTalkReplyChannel(settings: configuration.dingtalk, client: httpClient, logger: logger)
    var channels: [String: any ReplyChannel] = ["dingtalk": dingtalkReplies]
    let larkAPI = configuration.lark.isEnabled ? LarkAPI(settings: configuration.lark, client: httpClient, clock: clock, logger: logger) : nil
    if let larkAPI { channels["lark"] = LarkReplyChannel(api: larkAPI, logger: logger) }
    let replies = PlatformReplies(channels)
    let owner = "\(ProcessInfo.processInfo.hostName)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    let dispatcher = Dispatcher(
        inbox: store, engine: engine, replies: replies,
        settings: DispatcherSettings(
            concurrency: configuration.worker.concurrency,
            retry: RetryPolicy(maxAttempts: configuration.worker.maxAttempts, maxRetryWait: configuration.worker.maxRetryWait),
            lease: configuration.worker.lease),
        owner: owner, clock: clock, metrics: factory, logger: logger)
    dispatcher.failLiveRepliesWhenRunning(reclaimed.gaveUpLive)
    // A message accepted by another replica (PostgreSQL) wakes this one too.
    store.listenForAcceptedMessages { [dispatcher] in dispatcher.wake() }
    let ingress = DingTalkIngress(
        settings: configuration.dingtalk, groupScope: configuration.engine.groupScope, inbox: store, clock: clock,
        metrics: factory, logger: logger, onAccepted: { [dispatcher] in dispatcher.wake() })
    let stream = DingTalkStream(
        settings: configuration.dingtalk, ingress: ingress, client: httpClient, clock: clock, metrics: factory,
        logger: logger)
    let larkBot = LarkBotIdentity(api: larkAPI ?? LarkAPI(settings: configuration.lark, client: httpClient, clock: clock, logger: logger), logger: logger)
    let larkIngress = LarkWebhookIngress(
        settings: configuration.lark, groupScope: configuration.engine.groupScope, inbox: store, clock: clock,
        botOpenID: { configuration.lark.isEnabled ? await larkBot.openID() : nil }, metrics: factory, logger: logger,
        onAccepted: { [dispatcher] in dispatcher.wake() })
    let larkConnection = LarkLongConnection(
        settings: configuration.lark, ingress: larkIngress, bot: larkBot, client: httpClient, clock: clock, metrics: factory, logger: logger)
    statusSources.set(dispatcher: dispatcher, connections: [
        ("dingtalk.stream", { stream.status.rawValue }), ("lark.stream", { larkConnection.status.rawValue }),
    ])
    let reloader = ConfigReloader(configuration: configuration, controls: controls, models: models, logger: logger)
    let components = ChatBridgeComponents(
        configuration: configuration, store: store, engine: engine, controls: controls, models: models, reloader: reloader,
        dispatcher: dispatcher, ingress: ingress, stream: stream,
        larkIngress: larkIngress, larkConnection: larkConnection, larkAPI: larkAPI,
        httpClient: httpClient,
        metrics: metrics, lifecycle: LifecycleState(), ports: BoundPorts(), serverRunning: OneTimeEvent(),
        dispatcherStopped: OneTimeEvent())

    let router = Router()
    router.get("/healthz") { _, _ in Response.json(.ok, ["status": "ok"]) }
    router.get("/readyz") { _, _ in
        // The connection states are reported, not required: callbacks and answers work without them.
        func body(_ status: String) -> [String: String] {
            ["status": status, "dingtalk_stream": stream.status.rawValue, "lark_stream": larkConnection.status.rawValue]
        }
        if components.lifecycle.isDraining {
            return Response.json(.serviceUnavailable, body("draining"))
        }
        do {
            let version = try await store.schemaVersion()
            if version < SQLStore.latestVersion {
                return Response.json(.serviceUnavailable, body("migrations pending"))
            }
            if version > SQLStore.latestVersion {
                // Another replica runs a newer build and migrated the shared database: this one must be replaced.
                return Response.json(.serviceUnavailable, body("database schema newer than this build"))
            }
            return Response.json(.ok, body("ready"))
        } catch {
            return Response.json(.serviceUnavailable, body("database unreachable"))
        }
    }
    if configuration.server.metricsAddress == nil {
        MetricsRoute(registry: metrics, store: store).add(to: router)
    }
    DingTalkCallbackController(
        ingress: ingress, maxBodyBytes: configuration.server.maxBodyBytes, metrics: factory, logger: logger
    ).addRoutes(to: router)
    LarkCallbackController(
        ingress: larkIngress, maxBodyBytes: configuration.server.maxBodyBytes, metrics: factory, logger: logger
    ).addRoutes(to: router)

    var app = ChatBridgeApplication(
        components: components, router: router,
        configuration: .init(address: .hostname(configuration.server.host, port: configuration.server.port), serverName: "chatbridge"),
        logger: logger, onListening: onListening)
    // Registered first so it shuts down last, after the dispatcher stopped using them.
    app.addServices(ResourcesService(httpClient: httpClient, store: store, dispatcherStopped: components.dispatcherStopped))
    if let address = configuration.server.metricsAddress {
        app.addServices(MetricsServer(address: address, registry: metrics, store: store, ports: components.ports, logger: logger))
    }
    app.addServices(DispatcherService(dispatcher: dispatcher, serverRunning: components.serverRunning, stopped: components.dispatcherStopped))
    app.addServices(reloader, KeyRecheckService(models: models, interval: .seconds(60)))
    return app
}
