import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeLLM
import ChatBridgeSimulators
import Foundation
import Logging
import Testing

/// Runs the `chatbridge` executable to completion with `input` on standard input.
func runChatbridge(_ arguments: [String], environment: [String: String], input: String = "", directory: String) throws -> (status: Int32, stdout: String, stderr: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: chatbridgeExecutable())
    process.arguments = arguments
    process.currentDirectoryURL = URL(fileURLWithPath: directory)
    var env = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("CHATBRIDGE_") && !$0.key.hasPrefix("OPENAI_") }
    env.merge(environment) { $1 }
    process.environment = env
    let stdin = Pipe()
    let stdout = Pipe()
    let stderr = Pipe()
    process.standardInput = stdin
    process.standardOutput = stdout
    process.standardError = stderr
    try process.run()
    stdin.fileHandleForWriting.write(Data(input.utf8))
    try stdin.fileHandleForWriting.close()
    let out = stdout.fileHandleForReading.readDataToEndOfFile()
    let err = stderr.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: out, as: UTF8.self), String(decoding: err, as: UTF8.self))
}

@Suite(.serialized) struct CommandTests {
    @Test func pipedChatAnswersOnceAndKeepsContext() async throws {
        let model = try await ModelSimulator.start()
        let directory = temporaryDirectory()
        let env = ["CHATBRIDGE_LLM_BASE_URL": model.baseURL, "CHATBRIDGE_LLM_API_KEY": "sk-chat", "CHATBRIDGE_BOT_LANGUAGE": "en"]
        let first = try runChatbridge(["chat"], environment: env, input: "hello there\n", directory: directory)
        #expect(first.status == 0)
        #expect(first.stdout == ModelSimulator.answer(to: "hello there") + "\n")
        let second = try runChatbridge(["chat"], environment: env, input: "again\n", directory: directory)
        #expect(second.status == 0)
        #expect(model.received.last?.messages.count == 4)
        let reset = try runChatbridge(["chat"], environment: env, input: "/reset\n", directory: directory)
        #expect(reset.stdout.contains("starting a new conversation"))
        #expect(model.requestCount == 2)
        model.script(.error(401, code: "invalid_api_key", message: "bad key sk-chat"))
        let failed = try runChatbridge(["chat"], environment: env, input: "fail\n", directory: directory)
        #expect(failed.status == 1)
        #expect(failed.stderr.hasPrefix("error: The bot's model API key is invalid"))
        #expect(failed.stderr.split(separator: "\n").count == 1)
        #expect(!failed.stderr.contains("sk-chat"))
        await model.stop()
    }

    @Test func checkMasksSecretsReportsProblemsAndProbes() async throws {
        let model = try await ModelSimulator.start()
        let dingtalk = try await DingTalkSimulator.start()
        let directory = temporaryDirectory()
        let good = [
            "CHATBRIDGE_LLM_BASE_URL": model.baseURL, "CHATBRIDGE_LLM_API_KEY": "sk-very-secret-value",
            "CHATBRIDGE_DINGTALK_CLIENT_ID": "dingbot", "CHATBRIDGE_DINGTALK_CLIENT_SECRET": "app-secret-value",
            "CHATBRIDGE_DINGTALK_API_BASE_URL": dingtalk.baseURL,
        ]
        let ok = try runChatbridge(["check", "--probe"], environment: good, directory: directory)
        #expect(ok.status == 0, "\(ok.stdout)")
        #expect(!ok.stdout.contains("sk-very-secret-value"))
        #expect(!ok.stdout.contains("app-secret-value"))
        #expect(ok.stdout.contains("probe model: ok"))
        #expect(ok.stdout.contains("probe dingtalk: ok"))
        model.script(.error(404, code: "model_not_found", message: "The model does not exist"))
        let probeFails = try runChatbridge(["check", "--probe"], environment: good, directory: directory)
        #expect(probeFails.status == 1)
        #expect(probeFails.stdout.contains("probe model: failed: model error model_not_found (HTTP 404)"))
        let bad = try runChatbridge(["check"], environment: ["CHATBRIDGE_SERVER_PORT": "eighty", "CHATBRIDGE_DATABASE_URL": "postgres://x/y"], directory: directory)
        #expect(bad.status == 1)
        #expect(bad.stdout.contains("error: server.port: must be a whole number, got 'eighty'"))
        #expect(bad.stdout.contains("error: database.url: PostgreSQL is not supported yet"))
        let missingFile = try runChatbridge(["check", "--config", "nope.yaml"], environment: [:], directory: directory)
        #expect(missingFile.status == 1)
        #expect(missingFile.stderr.contains("configuration file nope.yaml does not exist"))
        await model.stop()
        await dingtalk.stop()
    }

    @Test func migrateCreatesTheDatabase() throws {
        let directory = temporaryDirectory()
        let result = try runChatbridge(["migrate"], environment: [:], directory: directory)
        #expect(result.status == 0)
        #expect(result.stdout.contains("schema version 1"))
        #expect(FileManager.default.fileExists(atPath: directory + "/data/chatbridge.sqlite"))
    }

    @Test func helpExplainsCommands() throws {
        let result = try runChatbridge(["serve", "--help"], environment: [:], directory: temporaryDirectory())
        #expect(result.stdout.contains("--config"))
        #expect(result.stdout.contains("SIGTERM"))
    }
}

@Suite struct ModelClientTests {
    @Test func azureUsesDeploymentURLApiVersionAndApiKeyHeader() async throws {
        let model = try await ModelSimulator.start()
        let client = HTTPClient(eventLoopGroupProvider: .singleton)
        let settings = LLMSettings(provider: .azure, baseURL: "http://127.0.0.1:\(model.port)/openai/deployments/gpt4o", apiKey: "azure-key", apiVersion: "2024-10-21")
        let chat = OpenAIChatModel(settings: settings, client: client, logger: Logger(label: "t"))
        let deltas = DeltaCollector()
        let completion = try await chat.complete(ChatRequest(messages: [ChatMessage(role: .user, content: "hi")])) { deltas.append($0) }
        #expect(completion.text == ModelSimulator.answer(to: "hi"))
        #expect(completion.promptTokens == 10)
        #expect(completion.timeToFirstToken != nil)
        #expect(deltas.joined == completion.text)
        let received = try #require(model.received.first)
        #expect(received.path == "/openai/deployments/gpt4o/chat/completions")
        #expect(received.query == "api-version=2024-10-21")
        #expect(received.apiKeyHeader == "azure-key")
        #expect(received.authorization == nil)
        try await client.shutdown()
        await model.stop()
    }

    @Test func overallDeadlineStopsASlowStream() async throws {
        var behaviour = ModelSimulator.Behaviour()
        behaviour.tokensPerSecond = 5
        behaviour.answerTokens = 100
        let model = try await ModelSimulator.start(behaviour: behaviour)
        let client = HTTPClient(eventLoopGroupProvider: .singleton)
        let chat = OpenAIChatModel(settings: LLMSettings(baseURL: model.baseURL, apiKey: "k", timeout: .milliseconds(500)), client: client, logger: Logger(label: "t"))
        await #expect { try await chat.complete(ChatRequest(messages: [ChatMessage(role: .user, content: "slow")])) { _ in } } throws: { error in
            (error as? ModelError)?.kind == .timeout
        }
        try await client.shutdown()
        await model.stop()
    }

    @Test func connectionRefusedIsARetryableConnectionError() async throws {
        let client = HTTPClient(eventLoopGroupProvider: .singleton)
        let chat = OpenAIChatModel(settings: LLMSettings(baseURL: "http://127.0.0.1:1/v1", apiKey: "k"), client: client, logger: Logger(label: "t"))
        await #expect { try await chat.complete(ChatRequest(messages: [ChatMessage(role: .user, content: "x")])) { _ in } } throws: { error in
            guard let error = error as? ModelError else { return false }
            return error.kind == .connection && error.isRetryable
        }
        try await client.shutdown()
    }
}

final class DeltaCollector: @unchecked Sendable {
    private let lock = NSLock()
    private var parts: [String] = []
    func append(_ part: String) { lock.withLock { parts.append(part) } }
    var joined: String { lock.withLock { parts.joined() } }
}
