import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeHTTP
import ChatBridgeLLM
import ChatBridgeSimulators
import ChatBridgeStore
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

    @Test func checkProbesLarkTokenAndBotInfoWithoutShowingSecrets() async throws {
        let model = try await ModelSimulator.start()
        let lark = try await LarkSimulator.start()
        let directory = temporaryDirectory()
        var env = [
            "CHATBRIDGE_LLM_BASE_URL": model.baseURL, "CHATBRIDGE_LLM_API_KEY": "sk-very-secret-value",
            "CHATBRIDGE_LARK_APP_ID": lark.appID, "CHATBRIDGE_LARK_APP_SECRET": lark.appSecret, "CHATBRIDGE_LARK_BASE_URL": lark.baseURL,
            "CHATBRIDGE_LARK_ENCRYPT_KEY": "encrypt-key-value", "CHATBRIDGE_LARK_VERIFICATION_TOKEN": "verification-token-value",
        ]
        let ok = try runChatbridge(["check", "--probe"], environment: env, directory: directory)
        #expect(ok.status == 0, "\(ok.stdout)")
        #expect(ok.stdout.contains("probe lark token: ok"))
        #expect(ok.stdout.contains("probe lark bot: ok (\"ChatBridge\", open_id ou_bot)"))
        for secret in [lark.appSecret, "encrypt-key", "verification-token"] { #expect(!ok.stdout.contains(secret)) }
        env["CHATBRIDGE_LARK_APP_SECRET"] = "wrong-secret"
        let refused = try runChatbridge(["check", "--probe"], environment: env, directory: directory)
        #expect(refused.status == 1)
        #expect(refused.stdout.contains("probe lark token: failed: Feishu refused the tenant access token request (HTTP 400 code 10014"))
        #expect(refused.stdout.contains("check lark.app_id and lark.app_secret"))
        #expect(!refused.stdout.contains("wrong-secret"))
        await model.stop()
        await lark.stop()
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
        #expect(!ok.stdout.contains("sk-v"))
        #expect(!ok.stdout.contains("app-"))
        #expect(!ok.stdout.contains("lue"))
        #expect(ok.stdout.contains("probe model: ok"))
        #expect(ok.stdout.contains("probe dingtalk: ok"))
        model.script(.error(404, code: "model_not_found", message: "The model does not exist"))
        let probeFails = try runChatbridge(["check", "--probe"], environment: good, directory: directory)
        #expect(probeFails.status == 1)
        #expect(probeFails.stdout.contains("probe model: failed: model error model_not_found (HTTP 404)"))
        let bad = try runChatbridge(["check"], environment: ["CHATBRIDGE_SERVER_PORT": "eighty", "CHATBRIDGE_DATABASE_URL": "postgres://u:hunter2secret@x/"], directory: directory)
        #expect(bad.status == 1)
        #expect(bad.stdout.contains("error: server.port: must be a whole number, got 'eighty'"))
        #expect(bad.stdout.contains("error: database.url: the PostgreSQL URL names no database"))
        #expect(!bad.stdout.contains("hunter2secret") && !bad.stderr.contains("hunter2secret"))
        let missingFile = try runChatbridge(["check", "--config", "nope.yaml"], environment: [:], directory: directory)
        #expect(missingFile.status == 1)
        #expect(missingFile.stderr.contains("configuration file nope.yaml does not exist"))
        await model.stop()
        await dingtalk.stop()
    }

    @Test func benchRefusesReplicasOnSQLiteAndAnUnknownDatabase() throws {
        let directory = temporaryDirectory()
        let replicas = try runChatbridge(["bench", "--replicas", "2", "--duration", "1"], environment: [:], directory: directory)
        #expect(replicas.status != 0 && replicas.stderr.contains("--replicas needs a PostgreSQL --database"))
        let unknown = try runChatbridge(["bench", "--database", "mysql://u:hunter2@db/x", "--duration", "1"], environment: [:], directory: directory)
        #expect(unknown.status != 0 && unknown.stderr.contains("--database"))
        #expect(!unknown.stderr.contains("hunter2"), "the URL's password is never echoed")
    }

    @Test func migrateCreatesTheDatabase() throws {
        let directory = temporaryDirectory()
        let result = try runChatbridge(["migrate"], environment: [:], directory: directory)
        #expect(result.status == 0)
        #expect(result.stdout.contains("schema version \(SQLStore.latestVersion) (latest \(SQLStore.latestVersion))"))
        #expect(FileManager.default.fileExists(atPath: directory + "/data/chatbridge.sqlite"))
    }

    @Test func migrateCopiesAWholeDatabaseIntoAnEmptyOneOnlyWithBothEnds() async throws {
        let directory = temporaryDirectory()
        let source = try await SQLStore.open(.sqliteFile(path: directory + "/old.sqlite"), logger: Logger(label: "t"))
        let m = inboxMessage("m1")
        _ = try await source.accept(m, conversation: ConversationKey(for: m, groupScope: .user), now: Date())
        try await source.apply(.appendExchange(question: Turn(role: .user, content: "q", createdAt: Date()),
                                               answer: Turn(role: .assistant, content: "a", createdAt: Date())), to: ConversationKey(rawValue: "k"))
        await source.close()
        let copied = try runChatbridge(["migrate", "--from", "sqlite:old.sqlite", "--to", "sqlite:new.sqlite"], environment: [:], directory: directory)
        #expect(copied.status == 0, "\(copied.stderr)")
        #expect(copied.stdout.contains("copied 1 conversations, 2 turns, 1 inbox messages, 0 usage records, 0 model keys from sqlite:old.sqlite to sqlite:new.sqlite; the counts match"))
        let again = try runChatbridge(["migrate", "--from", "sqlite:old.sqlite", "--to", "sqlite:new.sqlite"], environment: [:], directory: directory)
        #expect(again.status == 1 && again.stderr.contains("is not empty"))
        let half = try runChatbridge(["migrate", "--from", "sqlite:old.sqlite"], environment: [:], directory: directory)
        #expect(half.status == 1 && half.stderr.contains("--from and --to go together"))
        let same = try runChatbridge(["migrate", "--from", "sqlite:old.sqlite", "--to", "sqlite:old.sqlite"], environment: [:], directory: directory)
        #expect(same.status == 1 && same.stderr.contains("name the same database"))
        let missing = try runChatbridge(["migrate", "--from", "sqlite:typo.sqlite", "--to", "sqlite:other.sqlite"], environment: [:], directory: directory)
        #expect(missing.status == 1 && missing.stderr.contains("there is no SQLite database at typo.sqlite"))
        #expect(!FileManager.default.fileExists(atPath: directory + "/typo.sqlite"))
        let secret = try runChatbridge(["migrate", "--from", "sqlite:old.sqlite", "--to", "pgsql://u:hunter2@db/x"], environment: [:], directory: directory)
        #expect(secret.status == 1 && !secret.stderr.contains("hunter2") && !secret.stdout.contains("hunter2"))
    }

    @Test func anUnreachableModelIsReportedAsUnreachable() async throws {
        let directory = temporaryDirectory()
        let refused = ["CHATBRIDGE_LLM_BASE_URL": "http://127.0.0.1:1/v1", "CHATBRIDGE_LLM_API_KEY": "sk-x", "CHATBRIDGE_BOT_LANGUAGE": "en"]
        let chat = try runChatbridge(["chat"], environment: refused, input: "hello\n", directory: directory)
        #expect(chat.status == 1)
        #expect(chat.stderr == "error: cannot reach 127.0.0.1:1: connection refused; check llm.base_url and the network\n")
        let probe = try runChatbridge(["check", "--probe"], environment: refused, directory: directory)
        #expect(probe.status == 1)
        #expect(probe.stdout.contains("probe model: failed: cannot reach 127.0.0.1:1: connection refused; check llm.base_url and the network"))
        let unknownHost = ["CHATBRIDGE_LLM_BASE_URL": "http://nonexistent.invalid/v1", "CHATBRIDGE_LLM_API_KEY": "sk-x"]
        let dns = try runChatbridge(["chat"], environment: unknownHost, input: "hello\n", directory: directory)
        #expect(dns.stderr.hasPrefix("error: cannot reach nonexistent.invalid: "), "\(dns.stderr)")
        #expect(dns.stderr.contains("check llm.base_url and the network"))
        #expect(!dns.stderr.contains("模型服务繁忙"))
    }

    @Test func aTakenListenAddressEndsServeWithOneLineNamingTheSetting() async throws {
        let occupier = try await ModelSimulator.start()
        let directory = temporaryDirectory()
        let result = try runChatbridge(
            ["serve"], environment: ["CHATBRIDGE_SERVER_HOST": "127.0.0.1", "CHATBRIDGE_SERVER_PORT": "\(occupier.port)", "CHATBRIDGE_LOG_LEVEL": "critical"],
            directory: directory)
        #expect(result.status == 1)
        #expect(result.stderr == "error: cannot listen on 127.0.0.1:\(occupier.port): the address is already in use; choose a free one with server.host/server.port (CHATBRIDGE_SERVER_PORT), or stop the other process\n")
        #expect(!result.stderr.contains("bind(descriptor"))
        let metrics = try runChatbridge(
            ["serve"], environment: [
                "CHATBRIDGE_SERVER_HOST": "127.0.0.1", "CHATBRIDGE_SERVER_PORT": "0", "CHATBRIDGE_LOG_LEVEL": "critical",
                "CHATBRIDGE_SERVER_METRICS_ADDRESS": "127.0.0.1:\(occupier.port)",
            ], directory: directory)
        #expect(metrics.status == 1)
        #expect(metrics.stderr.contains("server.metrics_address"))
        await occupier.stop()
    }

    @Test func helpExplainsCommands() throws {
        let result = try runChatbridge(["serve", "--help"], environment: [:], directory: temporaryDirectory())
        #expect(result.stdout.contains("--config"))
        #expect(result.stdout.contains("SIGTERM"))
        #expect(result.stdout.contains("server.metrics_address"))
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

    func model(_ simulator: ModelSimulator, _ client: HTTPClient) -> OpenAIChatModel {
        OpenAIChatModel(settings: LLMSettings(baseURL: simulator.baseURL, apiKey: "sk-key-123456"), client: client, logger: Logger(label: "t"))
    }

    func ask(_ chat: OpenAIChatModel) async throws -> ChatCompletion {
        try await chat.complete(ChatRequest(messages: [ChatMessage(role: .user, content: "q")], user: "dingtalk/bot/cid/$:LWCP_v1:$abc")) { _ in }
    }

    @Test func aStreamIsFinishedOnlyWhenItSaysSo() async throws {
        let simulator = try await ModelSimulator.start()
        let client = OutboundHTTP.makeClient()
        let chat = model(simulator, client)
        typealias S = ModelSimulator.Scripted
        // Neither [DONE] nor a finish_reason: not an answer, and worth another try.
        simulator.script(.stream([S.chunk("Hel"), S.chunk("lo")]))
        await #expect { try await ask(chat) } throws: { error in
            guard let error = error as? ModelError else { return false }
            return error.kind == .invalidResponse && error.isRetryable && error.detail.contains("ended before")
        }
        // A finish_reason without [DONE] is finished (some servers omit [DONE]).
        simulator.script(.stream([S.chunk("Hello"), S.chunk(nil, finish: "stop")]))
        #expect(try await ask(chat).text == "Hello")
        // Cut off at the token limit.
        simulator.script(.stream([S.chunk("Hal"), S.chunk(nil, finish: "length"), "[DONE]"]))
        let cut = try await ask(chat)
        #expect(cut.text == "Hal" && cut.finishReason == "length")
        // A refusal is an answer of its own.
        simulator.script(.stream([S.chunk(nil, refusal: "I can't "), S.chunk(nil, refusal: "help with that."), S.chunk(nil, finish: "stop"), "[DONE]"]))
        let refusal = try await ask(chat)
        #expect(refusal.text.isEmpty && refusal.refusal == "I can't help with that.")
        // An error object mid-stream is classified like the same error before the stream.
        simulator.script(.stream([S.chunk("partial"), #"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#]))
        await #expect { try await ask(chat) } throws: { error in
            guard let error = error as? ModelError else { return false }
            return error.kind == .quotaExceeded && !error.isRetryable
        }
        // A server that ignores stream: true and answers with one JSON object.
        simulator.script(ModelSimulator.Scripted(status: 200, body: #"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Whole answer"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#))
        let whole = try await ask(chat)
        #expect(whole.text == "Whole answer" && whole.completionTokens == 2)
        // The same with a server that labels it as something else.
        simulator.script(ModelSimulator.Scripted(status: 200, headers: ["content-type": "text/plain"], body: #"  {"choices":[{"message":{"content":"Mislabelled"},"finish_reason":"stop"}]}"#))
        #expect(try await ask(chat).text == "Mislabelled")
        // A whole answer too large to hold is refused for good, not retried as a connection problem.
        simulator.script(ModelSimulator.Scripted(status: 200, body: #"{"choices":[{"message":{"content":""# + String(repeating: "x", count: 1_100_000) + #""}}]}"#))
        await #expect { try await ask(chat) } throws: { error in
            guard let error = error as? ModelError else { return false }
            return error.kind == .invalidResponse && !error.isRetryable
        }
        // The provider sees a stable hash of the conversation, never its ids.
        let users = Set(simulator.received.compactMap(\.user))
        #expect(users.count == 1)
        #expect(users.first?.hasPrefix("cb-") == true)
        #expect(users.first?.contains("LWCP") == false)
        try await client.shutdown()
        await simulator.stop()
    }

    @Test func aRedirectFromTheModelServerIsNotFollowed() async throws {
        let simulator = try await ModelSimulator.start()
        let elsewhere = try await DingTalkSimulator.start()
        let client = OutboundHTTP.makeClient()
        simulator.script(ModelSimulator.Scripted(status: 307, headers: ["location": elsewhere.baseURL + "/_simulator/stolen"], body: ""))
        await #expect { try await ask(model(simulator, client)) } throws: { error in
            guard let error = error as? ModelError else { return false }
            return !error.isRetryable && error.detail.contains("redirect")
        }
        #expect(elsewhere.stolenRequests.isEmpty)
        try await client.shutdown()
        await simulator.stop()
        await elsewhere.stop()
    }

    @Test func connectionRefusedIsARetryableConnectionError() async throws {
        let client = OutboundHTTP.makeClient()
        let chat = OpenAIChatModel(settings: LLMSettings(baseURL: "http://127.0.0.1:1/v1", apiKey: "k"), client: client, logger: Logger(label: "t"))
        await #expect { try await chat.complete(ChatRequest(messages: [ChatMessage(role: .user, content: "x")])) { _ in } } throws: { error in
            guard let error = error as? ModelError else { return false }
            return error.kind == .connection && error.isRetryable && error.description == "cannot reach 127.0.0.1:1: connection refused; check llm.base_url and the network"
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
