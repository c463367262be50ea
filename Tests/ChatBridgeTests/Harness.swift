import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeServer
import ChatBridgeSimulators
import ChatBridgeStore
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import ServiceLifecycle
import Synchronization

let testSecret = "test-app-secret"

/// Polls `condition` every 20 ms until it holds or `seconds` pass. Returns whether it held.
func eventually(seconds: Double = 20, _ condition: () async throws -> Bool) async rethrows -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if try await condition() { return true }
        try? await Task.sleep(for: .milliseconds(20))
    }
    return try await condition()
}

func temporaryDirectory() -> String {
    let path = NSTemporaryDirectory() + "chatbridge-test-\(UUID().uuidString)"
    try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

/// The value of one sample in Prometheus text, e.g. `chatbridge_messages_received_total{platform="dingtalk"}`.
func metricValue(_ text: String, _ sample: String) -> Double? {
    for line in text.split(separator: "\n") where line.hasPrefix(sample + " ") {
        return Double(line.dropFirst(sample.count + 1).trimmingCharacters(in: .whitespaces))
    }
    return nil
}

/// The real application on port 0 with a fresh SQLite file, against the loopback simulators, run in a
/// service group the test shuts down.
final class Harness: @unchecked Sendable {
    let model: ModelSimulator
    let dingtalk: DingTalkSimulator
    /// Feishu on loopback, when started with `lark: true`.
    let lark: LarkSimulator?
    let client: HTTPClient
    let directory: String
    let configuration: ChatBridgeConfiguration
    private(set) var app: ChatBridgeApplication
    private(set) var sender: CallbackSender
    private(set) var port: Int
    private var group: ServiceGroup
    private var task: Task<Void, any Error>

    var store: SQLStore { app.components.store }

    static let larkVerificationToken = "lark-verification-token-123"
    static let larkEncryptKey = "lark-encrypt-key-456"

    static func start(
        _ overrides: [String: String] = [:], behaviour: ModelSimulator.Behaviour = .init(), lark larkEnabled: Bool = false, larkSimulator: LarkSimulator? = nil
    ) async throws -> Harness {
        let model = try await ModelSimulator.start(behaviour: behaviour)
        var lark: LarkSimulator?
        if larkEnabled {
            if let larkSimulator { lark = larkSimulator } else { lark = try await LarkSimulator.start() }
        }
        let dingtalk = try await DingTalkSimulator.start()
        dingtalk.gateway.setCredentials(clientID: "dingbot", clientSecret: testSecret)
        let directory = temporaryDirectory()
        var values = [
            "server.host": "127.0.0.1", "server.port": "0", "database.url": "sqlite:\(directory)/chatbridge.sqlite",
            "llm.base_url": model.baseURL, "llm.api_key": "sk-test-secret-key-123456", "llm.model": "sim",
            "dingtalk.client_id": "dingbot", "dingtalk.client_secret": testSecret, "dingtalk.api_base_url": dingtalk.baseURL,
            "dingtalk.webhook_hosts": "127.0.0.1", "bot.language": "en", "worker.max_attempts": "3", "dingtalk.mode": "http",
            "dingtalk.stream.hosts": "127.0.0.1", "dingtalk.stream.max_backoff": "300ms", "limits.user_per_minute": "off",
        ]
        if let lark {
            values.merge([
                "lark.app_id": lark.appID, "lark.app_secret": lark.appSecret, "lark.base_url": lark.baseURL, "lark.mode": "webhook",
                "lark.verification_token": larkVerificationToken, "lark.encrypt_key": larkEncryptKey, "lark.stream.hosts": "127.0.0.1",
                "lark.stream.max_backoff": "300ms", "lark.card.update_interval": "100ms",
            ]) { $1 }
        }
        values.merge(overrides) { $1 }
        let configuration = ChatBridgeConfiguration.from(values: values)
        precondition(configuration.errors.isEmpty, "\(configuration.errors)")
        let client = HTTPClient(eventLoopGroupProvider: .singleton)
        let (app, group, task, port) = try await launch(configuration)
        let sender = CallbackSender(url: "http://127.0.0.1:\(port)/callbacks/dingtalk", secret: testSecret)
        return Harness(
            model: model, dingtalk: dingtalk, lark: lark, client: client, directory: directory, configuration: configuration, app: app, sender: sender,
            port: port, group: group, task: task)
    }

    private static func launch(_ configuration: ChatBridgeConfiguration) async throws -> (ChatBridgeApplication, ServiceGroup, Task<Void, any Error>, Int) {
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let (stream, continuation) = AsyncStream.makeStream(of: Int.self)
        let app = try await buildApplication(configuration: configuration, logger: logger) { port in continuation.yield(port) }
        let group = ServiceGroup(configuration: .init(services: [app], logger: logger))
        let task = Task {
            defer { continuation.finish() }
            try await group.run()
        }
        var iterator = stream.makeAsyncIterator()
        guard let port = await iterator.next() else {
            try await task.value
            throw SimulatorError(description: "app did not start")
        }
        return (app, group, task, port)
    }

    private init(
        model: ModelSimulator, dingtalk: DingTalkSimulator, lark: LarkSimulator?, client: HTTPClient, directory: String, configuration: ChatBridgeConfiguration,
        app: ChatBridgeApplication, sender: CallbackSender, port: Int, group: ServiceGroup, task: Task<Void, any Error>
    ) {
        self.model = model
        self.dingtalk = dingtalk
        self.lark = lark
        self.client = client
        self.directory = directory
        self.configuration = configuration
        self.app = app
        self.sender = sender
        self.port = port
        self.group = group
        self.task = task
    }

    /// Sends a signed text callback whose webhook points at the DingTalk simulator.
    @discardableResult
    func send(_ id: String, _ text: String, conversation: String = "cidDirect==", staff: String = "0420001", group: Bool = false, webhook: String? = nil, webhookExpiresAt: Date? = nil) async throws -> (status: Int, body: String) {
        let body = sender.body(
            messageID: id, text: text, conversationID: conversation, senderStaffID: staff, group: group,
            webhook: webhook ?? dingtalk.webhookURL(session: id), webhookExpiresAt: webhookExpiresAt)
        return try await sender.post(body, client: client)
    }

    /// Signs and encrypts Lark events for `/callbacks/lark`, as Feishu does.
    var larkSender: LarkEventSender {
        LarkEventSender(
            url: "http://127.0.0.1:\(port)/callbacks/lark", verificationToken: Self.larkVerificationToken, encryptKey: Self.larkEncryptKey,
            appID: lark?.appID ?? "cli_sim")
    }

    /// Posts a Lark text message event to the webhook.
    @discardableResult
    func sendLark(
        _ id: String, _ text: String, chat: String = "oc_direct", group: Bool = false, mentions: [LarkEventSender.Mention] = [], sender: String = "ou_user1"
    ) async throws -> (status: Int, body: String) {
        let event = larkSender.messageEvent(messageID: id, text: text, chatID: chat, group: group, sender: sender, mentions: mentions)
        return try await larkSender.post(event, client: client)
    }

    func get(_ path: String, port: Int? = nil) async throws -> (status: Int, body: String) {
        let response = try await client.execute(HTTPClientRequest(url: "http://127.0.0.1:\(port ?? self.port)\(path)"), timeout: .seconds(10))
        return (Int(response.status.code), String(buffer: try await response.body.collect(upTo: 1 << 20)))
    }

    /// The sample's value; nil when `/metrics` does not show it.
    func metric(_ sample: String) async throws -> Double? {
        metricValue(try await get("/metrics").body, sample)
    }

    /// Starts a graceful shutdown, as SIGTERM does.
    func beginShutdown() async { await group.triggerGracefulShutdown() }

    /// Shuts the application down and waits for it.
    func stopApp() async {
        await group.triggerGracefulShutdown()
        _ = try? await task.value
    }

    /// The inbox as stored, read while the application is stopped (it closes its store when it stops).
    func inboxRowsWhileStopped() async throws -> [SQLStore.InboxRow] {
        let store = try await SQLStore.open(try DatabaseLocation.parse(configuration.databaseURL), logger: Logger(label: "test"))
        let rows = try await store.inboxRows()
        await store.close()
        return rows
    }

    /// Starts the application again on the same database and simulators.
    func restart() async throws {
        let (app, group, task, port) = try await Self.launch(configuration)
        self.app = app
        self.group = group
        self.task = task
        self.port = port
        sender = CallbackSender(url: "http://127.0.0.1:\(port)/callbacks/dingtalk", secret: testSecret)
    }

    func stop() async {
        await stopApp()
        try? await client.shutdown()
        await model.stop()
        await dingtalk.stop()
        await lark?.stop()
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// A thread-safe count.
final class EventCount: Sendable {
    private let count = Mutex(0)
    func increment() { count.withLock { $0 += 1 } }
    var value: Int { count.withLock { $0 } }
}
