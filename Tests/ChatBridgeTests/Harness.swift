import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeServer
import ChatBridgeSimulators
import ChatBridgeStore
import Foundation
import Logging
import NIOCore
import NIOHTTP1

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

/// The real application on port 0 with a fresh SQLite file, against the loopback simulators.
final class Harness: @unchecked Sendable {
    let model: ModelSimulator
    let dingtalk: DingTalkSimulator
    let app: ChatBridgeApp
    let client: HTTPClient
    let sender: CallbackSender
    let port: Int
    let directory: String
    private let task: Task<Void, any Error>

    static func start(_ overrides: [String: String] = [:], behaviour: ModelSimulator.Behaviour = .init()) async throws -> Harness {
        let model = try await ModelSimulator.start(behaviour: behaviour)
        let dingtalk = try await DingTalkSimulator.start()
        let directory = temporaryDirectory()
        var values = [
            "server.host": "127.0.0.1", "server.port": "0", "database.url": "sqlite:\(directory)/chatbridge.sqlite",
            "llm.base_url": model.baseURL, "llm.api_key": "sk-test-secret-key-123456", "llm.model": "sim",
            "dingtalk.client_id": "dingbot", "dingtalk.client_secret": testSecret, "dingtalk.api_base_url": dingtalk.baseURL,
            "dingtalk.webhook_hosts": "127.0.0.1", "bot.language": "en", "worker.max_attempts": "3",
        ]
        values.merge(overrides) { $1 }
        let configuration = ChatBridgeConfiguration.from(values: values)
        precondition(configuration.errors.isEmpty, "\(configuration.errors)")
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let app = try await buildApplication(configuration: configuration, logger: logger)
        let (stream, continuation) = AsyncStream.makeStream(of: Int.self)
        let task = Task {
            try await app.run(gracefulShutdownSignals: []) { port in continuation.yield(port) }
        }
        var iterator = stream.makeAsyncIterator()
        guard let port = await iterator.next() else { throw SimulatorError(description: "app did not start") }
        let client = HTTPClient(eventLoopGroupProvider: .singleton)
        let sender = CallbackSender(url: "http://127.0.0.1:\(port)/callbacks/dingtalk", secret: testSecret)
        return Harness(model: model, dingtalk: dingtalk, app: app, client: client, sender: sender, port: port, directory: directory, task: task)
    }

    private init(model: ModelSimulator, dingtalk: DingTalkSimulator, app: ChatBridgeApp, client: HTTPClient, sender: CallbackSender, port: Int, directory: String, task: Task<Void, any Error>) {
        self.model = model
        self.dingtalk = dingtalk
        self.app = app
        self.client = client
        self.sender = sender
        self.port = port
        self.directory = directory
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

    func get(_ path: String) async throws -> (status: Int, body: String) {
        let response = try await client.execute(HTTPClientRequest(url: "http://127.0.0.1:\(port)\(path)"), timeout: .seconds(10))
        return (Int(response.status.code), String(buffer: try await response.body.collect(upTo: 1 << 20)))
    }

    func stop() async {
        await app.shutdown()
        _ = try? await task.value
        try? await client.shutdown()
        await model.stop()
        await dingtalk.stop()
        try? FileManager.default.removeItem(atPath: directory)
    }
}
