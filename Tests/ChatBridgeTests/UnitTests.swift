import ChatBridgeCore
import ChatBridgeDingTalk
@testable import ChatBridgeLark
@testable import ChatBridgeLLM
import ChatBridgeServer
import ChatBridgeStore
import Foundation
import NIOHTTP1
import Testing

@Suite struct SignatureTests {
    @Test func protocolVector() {
        #expect(DingTalkSignature.sign(timestamp: "1700000000000", secret: "this is secret") == "sSFWELbV2YwjdDQhWZwTcWlX5BWUx5J6TPpsZmuPii0=")
    }

    @Test func verifyAcceptsWithinWindowAndRejectsOtherwise() throws {
        let now = Date(timeIntervalSince1970: 1_700_000_000)
        let sign = "sSFWELbV2YwjdDQhWZwTcWlX5BWUx5J6TPpsZmuPii0="
        try DingTalkSignature.verify(timestamp: "1700000000000", sign: sign, secret: "this is secret", now: now)
        try DingTalkSignature.verify(timestamp: "1700000000000", sign: sign, secret: "this is secret", now: now.addingTimeInterval(3599))
        #expect(throws: DingTalkSignature.Failure.staleTimestamp) {
            try DingTalkSignature.verify(timestamp: "1700000000000", sign: sign, secret: "this is secret", now: now.addingTimeInterval(3601))
        }
        #expect(throws: DingTalkSignature.Failure.badSignature) {
            try DingTalkSignature.verify(timestamp: "1700000000000", sign: sign, secret: "other secret", now: now)
        }
        #expect(throws: DingTalkSignature.Failure.badSignature) {
            try DingTalkSignature.verify(timestamp: "1700000000000", sign: String(sign.dropLast()), secret: "this is secret", now: now)
        }
        #expect(throws: DingTalkSignature.Failure.missingHeaders) {
            try DingTalkSignature.verify(timestamp: nil, sign: sign, secret: "this is secret", now: now)
        }
        #expect(throws: DingTalkSignature.Failure.malformedTimestamp) {
            try DingTalkSignature.verify(timestamp: "yesterday", sign: sign, secret: "this is secret", now: now)
        }
    }
}

@Suite struct PayloadTests {
    func decode(_ json: String) throws -> InboundMessage {
        try DingTalkMessage.decode(Data(json.utf8)).normalised(botID: "bot", receivedAt: Date())
    }

    let base = #""msgId":"m1","conversationId":"cid1","senderId":"$:s","senderStaffId":"007","senderNick":"Ann","conversationType":"1""#

    @Test func textIsTrimmedAndNormalised() throws {
        let message = try decode(#"{"msgtype":"text","text":{"content":"  hello \n"},\#(base),"sessionWebhook":"https://oapi.dingtalk.com/x","sessionWebhookExpiredTime":1700000000000}"#)
        #expect(message.body == .text("hello"))
        #expect(message.chat.kind == .direct)
        #expect(message.sender.staffID == "007")
        #expect(message.reply.webhookExpiresAt == Date(timeIntervalSince1970: 1_700_000_000))
    }

    @Test func audioRecognitionRichTextAndUnsupported() throws {
        #expect(try decode(#"{"msgtype":"audio","content":{"recognition":"你好"},\#(base)}"#).body == .text("你好"))
        #expect(try decode(#"{"msgtype":"richText","content":{"richText":[{"text":"see:"},{"type":"picture","downloadCode":"x"},{"text":"end"}]},\#(base)}"#).body == .text("see:\nend"))
        #expect(try decode(#"{"msgtype":"picture","content":{"downloadCode":"x"},\#(base)}"#).body == .unsupported(kind: "picture"))
        #expect(try decode(#"{"msgtype":"unknownMsgType",\#(base)}"#).body == .unsupported(kind: "unknownMsgType"))
    }

    @Test func missingFieldsAreNamed() {
        #expect(throws: DingTalkMessage.Invalid(description: "body is missing msgId, conversationId")) {
            try DingTalkMessage.decode(Data(#"{"msgtype":"text","senderId":"x"}"#.utf8))
        }
        #expect(throws: DingTalkMessage.Invalid(description: "body is not a JSON object")) {
            try DingTalkMessage.decode(Data("not json".utf8))
        }
    }

    @Test func webhookAllowlistHTTPSAndPathRule() {
        let settings = DingTalkSettings(webhookHosts: ["oapi.dingtalk.com", "127.0.0.1"])
        #expect(settings.allowsWebhook("https://oapi.dingtalk.com/robot/sendBySession?session=1"))
        #expect(!settings.allowsWebhook("http://oapi.dingtalk.com/robot/sendBySession?session=1"))
        #expect(!settings.allowsWebhook("https://evil.example.com/robot/sendBySession"))
        #expect(!settings.allowsWebhook("https://oapi.dingtalk.com.evil.example/robot/sendBySession"))
        #expect(!settings.allowsWebhook("https://user@oapi.dingtalk.com/robot/sendBySession"))
        #expect(settings.allowsWebhook("http://127.0.0.1:9000/robot/sendBySession?session=1"))
        #expect(!DingTalkSettings(webhookHosts: ["oapi.dingtalk.com"]).allowsWebhook("http://127.0.0.1:9000/robot/sendBySession"))
        #expect(!settings.allowsWebhook("file:///etc/passwd"))
        // Only the documented path, never another API on an allowed host.
        #expect(!settings.allowsWebhook("https://oapi.dingtalk.com/robot/send?access_token=x"))
        #expect(!settings.allowsWebhook("https://oapi.dingtalk.com/topapi/message/corpconversation/asyncsend_v2"))
        #expect(!settings.allowsWebhook("https://oapi.dingtalk.com/robot/sendBySession/../send"))
        #expect(!settings.allowsWebhook("https://oapi.dingtalk.com/robot/%73endBySession"))
        #expect(!settings.allowsWebhook("https://oapi.dingtalk.com/robot/sendBySession#x"))
    }
}

@Suite struct SSEParserTests {
    @Test func splitChunksCRLFCommentsAndMultilineData() {
        var parser = SSEParser()
        var events: [SSEParser.Event] = []
        for piece in [": keep-alive\r", "\n\r\ndata: {\"a\"", ":1}\r", "\n\r", "\ndata:x\ndata: y\n\nevent: e\ndata: z\r\r"] {
            events += try! parser.feed(Array(piece.utf8))
        }
        #expect(events.map(\.data) == ["{\"a\":1}", "x\ny", "z"])
        #expect(events.last?.event == "e")
    }

    @Test func everySplitAndEveryKindOfSequenceGivesTheSameEvents() throws {
        let stream = ": hi\r\nid: 7\nretry: 10\nevent: delta\ndata: {\"a\":1}\r\rdata: 一\ndata:二\r\n\r\nbogus\ndata: [DONE]\n\n"
        let bytes = Array(stream.utf8)
        var whole = SSEParser()
        let expected = try whole.feed(bytes)
        #expect(expected.map(\.data) == ["{\"a\":1}", "一\n二", "[DONE]"])
        #expect(expected.first?.event == "delta")
        #expect(expected.first?.id == "7")
        for size in 1...7 {
            var parser = SSEParser()
            var events: [SSEParser.Event] = []
            for start in stride(from: 0, to: bytes.count, by: size) {
                events += try parser.feed(bytes[start..<min(start + size, bytes.count)])
            }
            #expect(events == expected, "pieces of \(size) bytes")
        }
        // A sequence without contiguous storage takes the other path.
        var lazy = SSEParser()
        #expect(try lazy.feed(bytes.lazy.map { $0 }) == expected)
    }

    @Test func lastEventWithoutBlankLineIsDelivered() throws {
        var parser = SSEParser()
        #expect(try parser.feed(Array("data: [DONE]".utf8)).isEmpty)
        #expect(try parser.finish()?.data == "[DONE]")
    }

    @Test func aLineOrAnEventOverTheLimitIsRefused() throws {
        var parser = SSEParser(maxLineBytes: 64)
        #expect(throws: SSEParser.TooLarge.self) { try parser.feed(Array(String(repeating: "x", count: 100).utf8)) }
        var events = SSEParser(maxLineBytes: 64)
        let lines = String(repeating: "data: 0123456789\n", count: 10)
        #expect(throws: SSEParser.TooLarge.self) { try events.feed(Array(lines.utf8)) }
        var fine = SSEParser(maxLineBytes: 64)
        #expect(try fine.feed(Array("data: short\n\n".utf8)).map(\.data) == ["short"])
    }

    @Test func accumulatorHandlesDoneUsageEmptyChoicesAndErrors() throws {
        var acc = StreamAccumulator()
        for data in [
            #"{"choices":[],"prompt_filter_results":[]}"#,
            #"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            #"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
            #"{"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}"#,
            #"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2}}"#,
        ] {
            #expect(try acc.consume(.init(data: data), apiKey: "") == .more)
        }
        #expect(acc.text == "Hello")
        #expect(acc.finishReason == "stop")
        #expect(acc.promptTokens == 9 && acc.completionTokens == 2)
        #expect(try acc.consume(.init(data: "[DONE]"), apiKey: "") == .done)
        #expect(throws: ModelError.self) { try acc.consume(.init(data: #"{"error":{"message":"boom"}}"#), apiKey: "") }
        #expect(throws: ModelError.self) { try acc.consume(.init(data: "{not json"), apiKey: "") }
    }

    @Test func inStreamErrorsAreClassifiedLikeTheSameErrorBeforeTheStream() {
        func error(_ json: String) -> ModelError? {
            var acc = StreamAccumulator()
            do {
                _ = try acc.consume(.init(data: json), apiKey: "sk-key-123456")
                return nil
            } catch {
                return error as? ModelError
            }
        }
        let quota = error(#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#)
        #expect(quota?.kind == .quotaExceeded && quota?.isRetryable == false)
        #expect(error(#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#)?.kind == .rateLimited)
        #expect(error(#"{"error":{"message":"maximum context length is 8192 tokens"}}"#)?.kind == .contextTooLong)
        #expect(error(#"{"error":{"code":"429","message":"Please retry after 6 seconds"}}"#)?.kind == .rateLimited)
        #expect(error(#"{"error":{"message":"Incorrect API key sk-key-123456","code":"invalid_api_key"}}"#)?.kind == .invalidAPIKey)
        #expect(error(#"{"error":{"message":"Incorrect API key sk-key-123456","code":"invalid_api_key"}}"#)?.description.contains("sk-key-123456") == false)
        let server = error(#"{"error":{"message":"stream interrupted","type":"server_error"}}"#)
        #expect(server?.kind == .serverError && server?.isRetryable == true)
    }

    @Test func anAnswerOverTheSizeLimitIsRefused() throws {
        var acc = StreamAccumulator(maxAnswerBytes: 10)
        #expect(try acc.consume(.init(data: #"{"choices":[{"delta":{"content":"12345"}}]}"#), apiKey: "") == .more)
        #expect { try acc.consume(.init(data: #"{"choices":[{"delta":{"content":"678901"}}]}"#), apiKey: "") } throws: { error in
            (error as? ModelError)?.isRetryable == false
        }
    }
}

@Suite struct ErrorClassifierTests {
    func classify(_ status: Int, _ body: String, headers: [(String, String)] = []) -> ModelError {
        ErrorClassifier.error(status: status, headers: HTTPHeaders(headers), body: body, apiKey: "sk-secret-abcdef")
    }

    @Test func statusClasses() {
        #expect(classify(401, #"{"error":{"message":"Incorrect API key provided: sk-secret-abcdef","code":"invalid_api_key"}}"#).kind == .invalidAPIKey)
        #expect(!classify(401, "{}").isRetryable)
        #expect(classify(429, #"{"error":{"message":"quota","type":"insufficient_quota","code":"insufficient_quota"}}"#).kind == .quotaExceeded)
        #expect(!classify(429, #"{"error":{"code":"insufficient_quota"}}"#).isRetryable)
        #expect(classify(429, #"{"error":{"code":"rate_limit_exceeded"}}"#).isRetryable)
        #expect(classify(429, #"{"error":{"code":"429","message":"Please retry after 6 seconds"}}"#).kind == .rateLimited)
        #expect(classify(400, #"{"error":{"code":"context_length_exceeded","message":"maximum context length"}}"#).kind == .contextTooLong)
        #expect(classify(404, #"{"error":{"code":"404","message":"Resource not found"}}"#).kind == .modelNotFound)
        #expect(classify(503, "overloaded").isRetryable)
        #expect(classify(409, "{}").isRetryable)
        #expect(classify(408, "{}").isRetryable)
        #expect(!classify(403, "{}").isRetryable)
        #expect(!classify(500, "{}", headers: [("x-should-retry", "false")]).isRetryable)
    }

    @Test func apiKeyNeverInDetail() {
        let error = classify(401, #"{"error":{"message":"Incorrect API key provided: sk-secret-abcdef"}}"#)
        #expect(!error.description.contains("sk-secret-abcdef"))
        #expect(!ErrorClassifier.redact("key sk-proj-ABCDEFGH1234 leaked", apiKey: "x").contains("ABCDEFGH"))
    }

    @Test func retryAfterHeaders() {
        #expect(ErrorClassifier.retryAfter(HTTPHeaders([("retry-after-ms", "1500")])) == .milliseconds(1500))
        #expect(ErrorClassifier.retryAfter(HTTPHeaders([("retry-after", "2.5")])) == .milliseconds(2500))
        #expect(ErrorClassifier.retryAfter(HTTPHeaders([("retry-after", "nonsense")])) == nil)
        // A hostile server's value means "much later", never a crash.
        for value in ["inf", "1e300", "1e17", "9223372036854775807"] {
            #expect(ErrorClassifier.retryAfter(HTTPHeaders([("retry-after", value)])) == .seconds(365 * 86_400))
            #expect(ErrorClassifier.retryAfter(HTTPHeaders([("retry-after-ms", value)])) != nil)
        }
        #expect(ErrorClassifier.retryAfter(HTTPHeaders([("retry-after", "nan")])) == nil)
        #expect(ErrorClassifier.retryAfter(HTTPHeaders([("retry-after", "-5")])) == nil)
        let future = Date().addingTimeInterval(30)
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss 'GMT'"
        let parsed = ErrorClassifier.retryAfter(HTTPHeaders([("retry-after", formatter.string(from: future))]))
        #expect(parsed != nil && parsed! > .seconds(20) && parsed! <= .seconds(31))
    }
}

@Suite struct EngineTests {
    let settings = EngineSettings(maxTurns: 3, maxContextTokens: 200, idleReset: .seconds(3600), language: .en)

    func turns(_ count: Int, start: Date, content: String = "q") -> [Turn] {
        (0..<count).flatMap { i in
            [Turn(role: .user, content: "\(content)\(i)", createdAt: start.addingTimeInterval(Double(i) * 60)),
             Turn(role: .assistant, content: "a\(i)", createdAt: start.addingTimeInterval(Double(i) * 60 + 1))]
        }
    }

    @Test func keepsTheNewestWholePairsWithinTheTurnLimit() {
        let now = Date()
        let history = turns(5, start: now.addingTimeInterval(-600))
        let messages = ContextBuilder(settings: settings).messages(history: history, question: "new", now: now)
        #expect(messages.map(\.content) == [settings.systemPrompt, "q2", "a2", "q3", "a3", "q4", "a4", "new"])
    }

    @Test func dropsOldestPairsToFitTheTokenBudget() {
        let now = Date()
        let long = String(repeating: "长", count: 60)
        let history = turns(3, start: now.addingTimeInterval(-600), content: long)
        let messages = ContextBuilder(settings: settings).messages(history: history, question: "new", now: now)
        // Each pair costs ~70 tokens; the budget (200 minus prompt and question) holds two.
        #expect(messages.count == 1 + 4 + 1)
        #expect(messages[1].content == long + "1")
    }

    @Test func idleGapStartsAFreshContext() {
        let now = Date()
        let old = turns(2, start: now.addingTimeInterval(-10_000))
        let recent = turns(1, start: now.addingTimeInterval(-100), content: "r")
        let builder = ContextBuilder(settings: settings)
        #expect(builder.messages(history: old, question: "x", now: now).count == 2)
        #expect(builder.messages(history: old + recent, question: "x", now: now).map(\.content) == [settings.systemPrompt, "r0", "a0", "x"])
    }

    @Test func tokenEstimateIsSaneForChineseAndEnglish() {
        #expect(TokenEstimator.estimate("你好世界") == 4)
        #expect(TokenEstimator.estimate("hello world, how are you") == 6)
        #expect(TokenEstimator.estimate("") == 0)
    }

    @Test func commandsAreRecognised() {
        let engine = Engine(settings: EngineSettings(language: .en), model: NoModel(), conversations: NoStore(), clock: ManualClock())
        #expect(engine.intent(of: .text(" /RESET ")) == .reset)
        #expect(engine.intent(of: .text("清空会话")) == .reset)
        #expect(engine.intent(of: .text("帮助")) == .help)
        #expect(engine.intent(of: .text("/reset please")) == .question("/reset please"))
        #expect(engine.intent(of: .text("  ")) == .empty)
        #expect(engine.helpText.contains("/reset /clear /new"))
    }

    @Test func retryPolicyBacksOffWithJitterAndNeverRetriesEarlierThanAsked() {
        let policy = RetryPolicy(maxAttempts: 5, baseDelay: .seconds(1), maxDelay: .seconds(8), maxRetryWait: .seconds(600))
        #expect(policy.backoff(afterAttempt: 1, random: 0) == .seconds(1))
        #expect(policy.backoff(afterAttempt: 3, random: 0) == .seconds(4))
        #expect(policy.backoff(afterAttempt: 3, random: 1) == .seconds(3))
        #expect(policy.backoff(afterAttempt: 10, random: 0) == .seconds(8))
        #expect(policy.decision(afterAttempt: 1, retryable: true, random: 0) == .retry(after: .seconds(1)))
        #expect(policy.decision(afterAttempt: 1, retryable: true, retryAfter: .seconds(7), random: 0.5) == .retry(after: .seconds(7)))
        // Longer than the backoff cap is still waited for, in full.
        #expect(policy.decision(afterAttempt: 1, retryable: true, retryAfter: .seconds(300), random: 0.5) == .retry(after: .seconds(300)))
        #expect(policy.decision(afterAttempt: 1, retryable: true, retryAfter: .seconds(3600), random: 0.5) == .giveUp(.waitTooLong(.seconds(3600))))
        #expect(policy.decision(afterAttempt: 4, retryable: true, random: 0) == .retry(after: .seconds(8)))
        #expect(policy.decision(afterAttempt: 5, retryable: true, random: 0) == .giveUp(.attemptsExhausted))
        #expect(policy.decision(afterAttempt: 1, retryable: false, random: 0) == .giveUp(.notRetryable))
    }

    @Test func theEngineCapsQuestionsNotesCutOffAnswersAndDeliversRefusals() async throws {
        let model = CannedModel()
        let engine = Engine(settings: EngineSettings(maxQuestionChars: 10, language: .en), model: model, conversations: NoStore(), clock: ManualClock())
        let message = { (text: String) in
            InboundMessage(platform: "p", botID: "b", messageID: "m", chat: .init(id: "c", kind: .direct), sender: .init(id: "u", name: "u"),
                           body: .text(text), sentAt: Date())
        }
        let long = try await engine.resolve(message("12345678901"))
        #expect(long.text.contains("11") && long.text.contains("10"))
        #expect(long.effect == .none)
        #expect(model.calls == 0)

        model.next = ChatCompletion(text: "half an ans", finishReason: "length")
        let cut = try await engine.resolve(message("question"))
        #expect(cut.text == "half an ans\n\n" + BotMessages.defaults(for: .en).truncated)
        guard case .appendExchange(_, let answer) = cut.effect else { Issue.record("expected an exchange"); return }
        #expect(answer.content == "half an ans")

        model.next = ChatCompletion(text: "", finishReason: "stop", refusal: "I can't help with that.")
        #expect(try await engine.resolve(message("question")).text == "I can't help with that.")

        model.next = ChatCompletion(text: "", finishReason: "stop")
        await #expect(throws: ModelError.self) { try await engine.resolve(message("question")) }
    }

    @Test func splitterKeepsEverythingAndAvoidsCodeBlocks() {
        let paragraph = String(repeating: "word ", count: 30) + "\n\n"
        let code = "```\n" + String(repeating: "let x = 1\n", count: 10) + "```\n"
        let text = paragraph + code + paragraph + paragraph
        let parts = TextSplitter(maxCharacters: 200).split(text)
        #expect(parts.joined() == text)
        #expect(parts.allSatisfy { $0.count <= 200 })
        #expect(parts.count > 1)
        #expect(parts.contains { $0.hasPrefix("```") && $0.contains("```\n") })
        #expect(TextSplitter(maxCharacters: 10).split(String(repeating: "x", count: 25)) == ["xxxxxxxxxx", "xxxxxxxxxx", "xxxxx"])
    }

    @Test func splitterKeepsPartsWithinASizeBudget() {
        // Four-byte characters: 10 characters are 40 bytes, so a 20-byte budget takes 5 a part.
        let emoji = String(repeating: "😀", count: 10)
        let bytes = TextSplitter(maxCharacters: 100, maxSize: 20)
        #expect(bytes.split(emoji) == [String(repeating: "😀", count: 5), String(repeating: "😀", count: 5)])
        #expect(bytes.prefix(emoji) == String(repeating: "😀", count: 5))
        // One character larger than the budget still moves on.
        #expect(TextSplitter(maxCharacters: 100, maxSize: 2).split("😀a") == ["😀", "a"])
        #expect(TextSplitter(maxCharacters: 5).split("") == [""])
        // Sized as Feishu counts (escaped JSON), quotes and line breaks take two bytes.
        let escaped = String(repeating: "\"\n", count: 50)
        let parts = LarkReplyChannel.numberedParts(of: escaped, maxBytes: 66)
        #expect(parts.count > 1)
        for part in parts {
            let json = try? JSONSerialization.data(withJSONObject: [part])
            #expect((json?.count ?? .max) - 4 <= 66, "a part is within its budget once escaped")
        }
    }
}

@Suite struct ConfigurationTests {
    @Test func environmentWinsOverFileAndFallbacksApply() async throws {
        let directory = temporaryDirectory()
        let path = directory + "/chatbridge.yaml"
        try """
        server:
          port: 9000
        llm:
          model: from-file
          api_key: file-key
        dingtalk:
          webhook_hosts: [a.example, b.example]
        conversation:
          idle_reset: 30m
        """.write(toFile: path, atomically: true, encoding: .utf8)
        let config = try await ChatBridgeConfiguration.load(file: path, environment: [
            "CHATBRIDGE_LLM_MODEL": "from-env", "OPENAI_BASE_URL": "http://127.0.0.1:1/v1", "CHATBRIDGE_DINGTALK_CLIENT_SECRET": "s3cret-value",
        ])
        #expect(config.server.port == 9000)
        #expect(config.llm.model == "from-env")
        #expect(config.llm.apiKey == "file-key")
        #expect(config.llm.baseURL == "http://127.0.0.1:1/v1")
        #expect(config.dingtalk.webhookHosts == ["a.example", "b.example"])
        #expect(config.engine.idleReset == .seconds(1800))
        #expect(config.errors.isEmpty)
        let printed = config.effectiveSettings().map { "\($0.key)=\($0.value)" }.joined(separator: "\n")
        #expect(!printed.contains("s3cret-value"))
        #expect(!printed.contains("file-key"))
    }

    @Test func openAIKeyFallbackAndDefaults() async throws {
        let config = try await ChatBridgeConfiguration.load(file: nil, environment: ["OPENAI_API_KEY": "sk-env"])
        #expect(config.llm.apiKey == "sk-env")
        #expect(config.server.port == 8080)
        #expect(config.databaseURL == "sqlite:data/chatbridge.sqlite")
        #expect(config.warnings.map(\.key) == ["dingtalk.client_secret"])
    }

    @Test func badValuesAreReportedOnePerLine() {
        let config = ChatBridgeConfiguration.from(values: [
            "server.port": "http", "database.url": "postgres://:s3cret-pass@db/chat", "conversation.group_scope": "team",
            "llm.timeout": "soon", "log.format": "xml",
        ])
        #expect(Set(config.errors.map(\.key)) == ["server.port", "database.url", "conversation.group_scope", "llm.timeout", "log.format"])
        #expect(config.errors.first { $0.key == "database.url" }?.message.contains("names no user") == true)
        #expect(!config.errors.description.contains("s3cret"))
    }

    @Test func postgresURLsAreParsedAndShownWithTheirPasswordMasked() throws {
        let location = try DatabaseLocation.parse("postgresql://bot:p%40ss%2Fword@db.internal:6432/chat?sslmode=require")
        #expect(location == .postgres(PostgresLocation(host: "db.internal", port: 6432, username: "bot", password: "p@ss/word", database: "chat", tls: .require)))
        #expect(location.description == "postgres://bot:***@db.internal:6432/chat?sslmode=require")
        #expect(location.isShared)
        #expect(try DatabaseLocation.parse("postgres://bot@db/chat").description == "postgres://bot@db:5432/chat?sslmode=prefer")
        for (url, problem) in [
            ("postgres://bot:pw@db/chat?sslmode=sometimes", "sslmode 'sometimes'"), ("postgres://bot:pw@/chat", "names no host"),
            ("postgres://bot:pw@db", "names no database"), ("postgres://bot:pw@db/chat?search_path=x", "'search_path' is not supported"),
        ] {
            var message = ""
            do { _ = try DatabaseLocation.parse(url) } catch { message = "\(error)" }
            #expect(message.contains(problem), "\(url): \(message)")
            #expect(!message.contains("pw@"))
        }
        // A mistyped scheme is not echoed back: it may carry a password.
        #expect(ChatBridgeConfiguration.from(values: ["database.url": "pgsql://bot:hunter2@db/chat"]).errors.description.contains("hunter2") == false)
        #expect(try DatabaseLocation.parse("POSTGRES://bot@db/chat").isShared)
        let config = ChatBridgeConfiguration.from(values: ["database.url": "postgres://bot:hunter2@db/chat", "database.pool_size": "4"])
        #expect(config.errors.isEmpty)
        #expect(config.databasePoolSize == 4)
        #expect(config.effectiveSettings().first { $0.key == "database.url" }?.value == "postgres://bot:***@db:5432/chat?sslmode=prefer")
        #expect(!config.effectiveSettings().map(\.value).joined().contains("hunter2"))
    }

    @Test func streamAndCardSettingsAreReadAndCheckedNamingTheKey() {
        let good = ChatBridgeConfiguration.from(values: [
            "dingtalk.client_id": "id", "dingtalk.client_secret": "secret", "dingtalk.mode": "HTTP",
            "dingtalk.stream.keepalive_timeout": "5s", "dingtalk.stream.max_backoff": "30s", "dingtalk.card.template_id": " tpl.schema ",
            "dingtalk.card.content_key": "content", "dingtalk.card.update_interval": "300ms", "dingtalk.card.max_qps": "10",
            "dingtalk.card.qps_backoff": "1s",
        ])
        #expect(good.errors.isEmpty)
        #expect(good.dingtalk.mode == .http)
        #expect(good.dingtalk.stream.keepaliveTimeout == .seconds(5))
        #expect(good.dingtalk.stream.maxBackoff == .seconds(30))
        #expect(good.dingtalk.card.templateID == "tpl.schema" && good.dingtalk.card.isEnabled)
        #expect(good.dingtalk.card.contentKey == "content")
        #expect(good.dingtalk.card.updateInterval == .milliseconds(300))
        #expect(good.dingtalk.card.maxQPS == 10)
        // Defaults: stream mode, cards off.
        let defaults = ChatBridgeConfiguration.from(values: [:])
        #expect(defaults.dingtalk.mode == .stream && !defaults.dingtalk.card.isEnabled)
        let bad = ChatBridgeConfiguration.from(values: [
            "dingtalk.mode": "websocket", "dingtalk.stream.keepalive_timeout": "1ms", "dingtalk.card.update_interval": "10ms",
            "dingtalk.card.max_qps": "0", "dingtalk.card.template_id": "tpl.schema",
        ])
        #expect(Set(bad.errors.map(\.key)).isSuperset(of: [
            "dingtalk.mode", "dingtalk.stream.keepalive_timeout", "dingtalk.card.update_interval", "dingtalk.card.max_qps", "dingtalk.card.template_id",
        ]))
        #expect(bad.errors.first { $0.key == "dingtalk.card.template_id" }?.message.contains("dingtalk.client_id") == true)
    }

    @Test func hostileValuesAreErrorsNamingTheKeyNeverCrashes() async throws {
        let hostile = ["1e300", "-1e300", "inf", "-inf", "nan", "-5", "1e18s", "99999999999999999999", "1e300MiB", "-1KiB", "..", "1.5.5h"]
        for value in hostile {
            let config = ChatBridgeConfiguration.from(values: [
                "server.port": value, "server.max_body_bytes": value, "server.drain_timeout": value, "llm.timeout": value,
                "llm.temperature": value, "llm.max_tokens": value, "worker.lease": value, "worker.max_retry_wait": value,
                "conversation.idle_reset": value, "conversation.max_question_chars": value,
            ])
            for key in ["server.port", "server.max_body_bytes", "server.drain_timeout", "llm.timeout", "llm.temperature", "llm.max_tokens",
                        "worker.lease", "worker.max_retry_wait", "conversation.idle_reset", "conversation.max_question_chars"] {
                // A negative number of seconds is no duration; everything else here is out of range or not a number.
                #expect(config.errors.contains { $0.key == key }, "\(key) = \(value) was accepted")
            }
        }
        // The same through a YAML file, where some of these are numbers rather than strings.
        let path = temporaryDirectory() + "/hostile.yaml"
        try """
        server:
          port: 1e300
          max_body_bytes: .inf
          drain_timeout: -5
          metrics_address: nowhere
        llm:
          timeout: .nan
          temperature: 1e300
        worker:
          lease: 1e300
        """.write(toFile: path, atomically: true, encoding: .utf8)
        let config = try await ChatBridgeConfiguration.load(file: path, environment: [:])
        #expect(Set(config.errors.map(\.key)).isSuperset(of: ["server.port", "server.max_body_bytes", "server.drain_timeout", "server.metrics_address", "llm.timeout", "llm.temperature", "worker.lease"]))
    }

    @Test func secretsShowNoCharactersOnlyALengthClass() {
        #expect(ChatBridgeConfiguration.masked("") == "(not set)")
        #expect(ChatBridgeConfiguration.masked("sk-abcdefghijklmnopqrstuvwxyz") == "(set, 16 to 31 characters)")
        let config = ChatBridgeConfiguration.from(values: ["llm.api_key": "sk-proj-AbCdEfGh1234", "dingtalk.client_secret": "Zx9-secret-value"])
        let printed = config.effectiveSettings().map(\.value).joined(separator: " ")
        for fragment in ["sk-", "1234", "AbC", "Zx9", "lue"] { #expect(!printed.contains(fragment), "\(fragment)") }
    }

    @Test func missingFileIsAnError() async {
        await #expect(throws: ChatBridgeConfiguration.LoadError.self) {
            _ = try await ChatBridgeConfiguration.load(file: "/nonexistent/chatbridge.yaml", environment: [:])
        }
    }

    @Test func durationsAndSizes() {
        #expect(DurationParser.parse("1h30m") == .seconds(5400))
        #expect(DurationParser.parse("500ms") == .milliseconds(500))
        #expect(DurationParser.parse("45") == .seconds(45))
        #expect(DurationParser.parse("1x") == nil)
        #expect(DurationParser.parse("1e300") == nil)
        #expect(DurationParser.parse("inf") == nil)
        #expect(DurationParser.parse("99999999999d") == nil)
        #expect(SizeParser.parse("1e300") == nil)
        #expect(SizeParser.parse("inf") == nil)
        #expect(SizeParser.parse("1MiB") == 1 << 20)
        #expect(SizeParser.parse("512k") == 512 * 1024)
        #expect(SizeParser.parse("lots") == nil)
    }
}

final class CannedModel: ChatModel, @unchecked Sendable {
    var next = ChatCompletion(text: "ok", finishReason: "stop")
    var calls = 0
    func complete(_ request: ChatRequest, onDelta: @escaping @Sendable (String) async -> Void) async throws -> ChatCompletion {
        calls += 1
        return next
    }
}

struct NoModel: ChatModel {
    func complete(_ request: ChatRequest, onDelta: @escaping @Sendable (String) async -> Void) async throws -> ChatCompletion {
        throw ModelError(.connection, detail: "not used")
    }
}

struct NoStore: ConversationStore {
    func recentTurns(_ key: ConversationKey, limit: Int) async throws -> [Turn] { [] }
    func apply(_ effect: ConversationEffect, to key: ConversationKey) async throws {}
}
