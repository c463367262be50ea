import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeServer
import ChatBridgeSimulators
@testable import ChatBridgeStore
import Foundation
import SQLKit
import Testing

@Suite(.serialized) struct CallbackIntegrationTests {
    @Test func groupQuestionIsAnsweredOnceWithMentionAndContext() async throws {
        let h = try await Harness.start()
        defer { Task { await h.stop() } }
        let ack = try await h.send("g1", "What is Swift?", conversation: "cidGroup==", staff: "0420001", group: true)
        #expect(ack.status == 200)
        #expect(ack.body == #"{"msgtype":"empty"}"#)
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
        let first = h.dingtalk.deliveries[0]
        #expect(first.channel == .webhook)
        #expect(first.atUserIds == ["0420001"])
        #expect(first.text == "@0420001 " + ModelSimulator.answer(to: "What is Swift?"))
        try await h.send("g2", "And Rust?", conversation: "cidGroup==", staff: "0420001", group: true)
        #expect(await eventually { h.dingtalk.deliveries.count == 2 })
        let second = h.model.received[1].messages.map { $0["content"] ?? "" }
        #expect(second.suffix(3) == ["What is Swift?", ModelSimulator.answer(to: "What is Swift?"), "And Rust?"])
        // Another person in the same group has their own context (group_scope: user).
        try await h.send("g3", "Hi", conversation: "cidGroup==", staff: "0420002", group: true)
        #expect(await eventually { h.dingtalk.deliveries.count == 3 })
        #expect(h.model.received[2].messages.count == 2)
        #expect(h.model.received[0].authorization == "Bearer sk-test-secret-key-123456")
        #expect(h.model.received[0].stream)
    }

    @Test func badRequestsAreRejectedAndChangeNothing() async throws {
        let h = try await Harness.start(["server.max_body_bytes": "2048"])
        defer { Task { await h.stop() } }
        let body = h.sender.body(messageID: "x1", text: "hi", webhook: h.dingtalk.webhookURL(session: "x1"))
        #expect(try await h.sender.post(body, headers: [("Content-Type", "application/json")], client: h.client).status == 401)
        let wrong = CallbackSender(url: h.sender.url, secret: "wrong")
        #expect(try await wrong.post(body, client: h.client).status == 401)
        #expect(try await h.sender.post(body, headers: h.sender.headers(timestamp: Date().addingTimeInterval(-7200)), client: h.client).status == 401)
        let big = Data(String(repeating: "x", count: 4096).utf8)
        let tooLarge = try await h.sender.post(big, client: h.client)
        #expect(tooLarge.status == 413, "\(tooLarge.body)")
        let malformed = try await h.sender.post(Data("{oops".utf8), client: h.client)
        #expect(malformed.status == 400)
        let missing = try await h.sender.post(Data(#"{"msgtype":"text","text":{"content":"hi"}}"#.utf8), client: h.client)
        #expect(missing.status == 400)
        #expect(missing.body.contains("msgId"))
        #expect(try await h.get("/healthz").status == 200)
        #expect(try await h.store.inboxRows().isEmpty)
        #expect(h.model.requestCount == 0)
        // The server is still healthy and accepts a good message.
        #expect(try await h.sender.post(body, client: h.client).status == 200)
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
    }

    @Test func hostileBodiesGetClientErrorsAndTheServerStaysHealthy() async throws {
        let h = try await Harness.start()
        defer { Task { await h.stop() } }
        var generator = SystemRandomNumberGenerator()
        var bodies: [Data] = [
            Data(), Data("null".utf8), Data("[]".utf8), Data(#"{"msgId":1,"conversationId":[],"msgtype":{},"senderId":null}"#.utf8),
            Data((String(repeating: "[", count: 5000) + String(repeating: "]", count: 5000)).utf8),
            Data([0xFF, 0xFE, 0x00, 0x7B]), Data(#"{"msgtype":"text","msgId":"\u0000","conversationId":"c","senderId":"s","text":{"content":5}}"#.utf8),
        ]
        for _ in 0..<30 {
            bodies.append(Data((0..<Int.random(in: 1...300, using: &generator)).map { _ in UInt8.random(in: 0...255, using: &generator) }))
        }
        for body in bodies {
            let status = try await h.sender.post(body, client: h.client).status
            #expect((400..<500).contains(status), "status \(status)")
        }
        #expect(try await h.get("/healthz").status == 200)
        #expect(try await h.store.inboxRows().isEmpty)
        try await h.send("after", "still here")
        #expect(await eventually { h.dingtalk.deliveries.contains { $0.target == "after" } })
    }

    @Test func withoutClientSecretCallbacksAnswer503() async throws {
        let h = try await Harness.start(["dingtalk.client_secret": ""])
        defer { Task { await h.stop() } }
        let result = try await h.send("n1", "hi")
        #expect(result.status == 503)
        #expect(result.body.contains("dingtalk.client_secret"))
    }

    @Test func concurrentRedeliveriesProduceOneAnswer() async throws {
        var behaviour = ModelSimulator.Behaviour()
        behaviour.firstTokenLatency = .milliseconds(300)
        let h = try await Harness.start(behaviour: behaviour)
        defer { Task { await h.stop() } }
        let body = h.sender.body(messageID: "dup-1", text: "once", webhook: h.dingtalk.webhookURL(session: "dup-1"))
        let statuses = try await withThrowingTaskGroup(of: Int.self) { group in
            for _ in 0..<20 { group.addTask { try await h.sender.post(body, client: h.client).status } }
            return try await group.reduce(into: [Int]()) { $0.append($1) }
        }
        #expect(statuses.allSatisfy { $0 == 200 })
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
        #expect(await eventually { (try? await h.store.inboxRows().first?.state) == "answered" })
        // A late re-delivery after the answer is only acknowledged: no second row, so nothing more to send.
        #expect(try await h.sender.post(body, client: h.client).status == 200)
        let rows = try await h.store.inboxRows()
        #expect(rows.count == 1 && rows[0].state == "answered")
        #expect(h.dingtalk.deliveries.count == 1)
        #expect(h.model.requestCount == 1)
    }

    @Test func answersKeepOrderWithinAConversationAndRunConcurrentlyAcross() async throws {
        var behaviour = ModelSimulator.Behaviour()
        behaviour.firstTokenLatency = .milliseconds(200)
        let h = try await Harness.start(behaviour: behaviour)
        defer { Task { await h.stop() } }
        for i in 0..<3 { try await h.send("o\(i)", "question \(i)", conversation: "cidOrder==") }
        for i in 0..<6 { try await h.send("p\(i)", "parallel \(i)", conversation: "cidPar\(i)==", staff: "u\(i)") }
        #expect(await eventually { h.dingtalk.deliveries.count == 9 })
        let ordered = h.dingtalk.deliveries.filter { $0.text.contains("question") }.map(\.text)
        #expect(ordered == (0..<3).map { ModelSimulator.answer(to: "question \($0)") })
        // The third question saw both earlier exchanges.
        let third = h.model.received.first { $0.messages.last?["content"] == "question 2" }
        #expect(third?.messages.count == 6)
        #expect(h.model.maxConcurrentRequests > 1)
    }

    @Test func rateLimitIsRetriedAfterRetryAfter() async throws {
        let h = try await Harness.start()
        defer { Task { await h.stop() } }
        h.model.script(.error(429, code: "rate_limit_exceeded", message: "slow down", retryAfter: "0.2"))
        try await h.send("r1", "retry me")
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
        #expect(h.dingtalk.deliveries[0].text == ModelSimulator.answer(to: "retry me"))
        #expect(h.model.requestCount == 2)
        #expect(await eventually { (try? await h.store.inboxRows()[0].state) == "answered" })
        #expect(try await h.store.inboxRows()[0].attempts == 2)
    }

    @Test func permanentErrorGetsAnActionableReplyWithoutRetry() async throws {
        let h = try await Harness.start()
        defer { Task { await h.stop() } }
        h.model.script(.error(401, code: "invalid_api_key", message: "Incorrect API key provided: sk-test-secret-key-123456"))
        try await h.send("e1", "hello")
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
        #expect(h.dingtalk.deliveries[0].text == BotMessages.defaults(for: .en).invalidKey)
        #expect(h.model.requestCount == 1)
        #expect(await eventually { (try? await h.store.inboxRows()[0].state) == "failed" })
        let row = try await h.store.inboxRows()[0]
        #expect(row.lastError?.contains("invalid_api_key") == true)
        #expect(row.lastError?.contains("sk-test-secret-key-123456") == false)
    }

    @Test func exhaustedRetriesEndWithABusyReply() async throws {
        let h = try await Harness.start(["worker.max_attempts": "2"])
        defer { Task { await h.stop() } }
        h.model.script(.error(503, retryAfter: "0.1"), .error(503, retryAfter: "0.1"))
        try await h.send("b1", "hello")
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
        #expect(h.dingtalk.deliveries[0].text == BotMessages.defaults(for: .en).busy)
        #expect(h.model.requestCount == 2)
    }

    @Test func midStreamErrorIsRetriedAndNoHalfTurnIsStored() async throws {
        let h = try await Harness.start()
        defer { Task { await h.stop() } }
        var broken = ModelSimulator.Scripted(status: 200, body: "")
        broken.midStreamError = "partial"
        h.model.script(broken)
        h.model.behaviour = { var b = ModelSimulator.Behaviour(); b.firstTokenLatency = .zero; return b }()
        try await h.send("s1", "stream")
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
        #expect(h.dingtalk.deliveries[0].text == ModelSimulator.answer(to: "stream"))
        try await h.send("s2", "next")
        #expect(await eventually { h.dingtalk.deliveries.count == 2 })
        // Context holds exactly one exchange: the failed attempt stored nothing.
        #expect(h.model.received.last?.messages.count == 4)
    }

    @Test func disallowedWebhookIsNeverRequestedAndOpenAPIIsUsed() async throws {
        let h = try await Harness.start(["dingtalk.webhook_hosts": "oapi.dingtalk.com"])
        defer { Task { await h.stop() } }
        try await h.send("w1", "group q", conversation: "cidG==", group: true)
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
        let delivery = h.dingtalk.deliveries[0]
        #expect(delivery.channel == .group)
        #expect(delivery.target == "cidG==")
        #expect(delivery.text == ModelSimulator.answer(to: "group q"))
    }

    @Test func expiredWebhookFallsBackToOpenAPIWithCachedToken() async throws {
        let h = try await Harness.start()
        defer { Task { await h.stop() } }
        let expired = Date().addingTimeInterval(-60)
        try await h.send("x1", "one", webhookExpiresAt: expired)
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
        try await h.send("x2", "two", webhookExpiresAt: expired)
        #expect(await eventually { h.dingtalk.deliveries.count == 2 })
        #expect(h.dingtalk.deliveries.map(\.channel) == [.direct, .direct])
        #expect(h.dingtalk.deliveries[0].target == "0420001")
        #expect(h.dingtalk.tokensIssued == 1)
        // A revoked token is refreshed once and the send succeeds.
        h.dingtalk.rejectNextSends(1)
        try await h.send("x3", "three", webhookExpiresAt: expired)
        #expect(await eventually { h.dingtalk.deliveries.count == 3 })
        #expect(h.dingtalk.tokensIssued == 2)
    }

    @Test func longAnswersAreSplitIntoNumberedParts() async throws {
        var behaviour = ModelSimulator.Behaviour()
        behaviour.answerTokens = 400
        let h = try await Harness.start(["dingtalk.max_message_chars": "500"], behaviour: behaviour)
        defer { Task { await h.stop() } }
        try await h.send("l1", "long")
        #expect(await eventually { (try? await h.store.inboxRows().first?.state) == "answered" })
        let parts = h.dingtalk.deliveries.map(\.text)
        let count = parts.count
        #expect(parts.allSatisfy { $0.count <= 500 })
        var joined = ""
        for (index, part) in parts.enumerated() {
            let prefix = "(\(index + 1)/\(count))\n\n"
            #expect(part.hasPrefix(prefix))
            joined += part.dropFirst(prefix.count)
        }
        #expect(joined == ModelSimulator.answer(to: "long") + (0..<400).map { " w\($0)" }.joined())
    }

    @Test func aFailedPartIsResentWithoutRepeatingTheDeliveredOnes() async throws {
        var behaviour = ModelSimulator.Behaviour()
        behaviour.answerTokens = 300
        // No OpenAPI credentials (robot code only): a failed part waits for the next attempt.
        let h = try await Harness.start(
            ["dingtalk.max_message_chars": "500", "dingtalk.client_id": "", "dingtalk.robot_code": "dingbot"], behaviour: behaviour)
        defer { Task { await h.stop() } }
        h.dingtalk.failNextWebhooks(1, after: 1)
        try await h.send("pf1", "parts")
        #expect(await eventually { (try? await h.store.inboxRows().first?.state) == "answered" })
        let row = try #require(try await h.store.inboxRows().first)
        #expect(row.attempts == 2)
        let texts = h.dingtalk.deliveries.map(\.text)
        #expect(texts.count >= 3)
        #expect(Set(texts).count == texts.count)
        #expect(texts.enumerated().allSatisfy { index, text in text.hasPrefix("(\(index + 1)/\(texts.count))") })
        // Every part once, plus the one failed post of the second part; never the first part again.
        #expect(h.dingtalk.webhookRequests == texts.count + 1)
        #expect(h.dingtalk.sendRequests == 0)
        #expect(h.model.requestCount == 1)
    }

    @Test func commandsAndUnsupportedMessagesNeverReachTheModel() async throws {
        let h = try await Harness.start()
        defer { Task { await h.stop() } }
        try await h.send("c1", "first")
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
        try await h.send("c2", "/reset")
        #expect(await eventually { h.dingtalk.deliveries.count == 2 })
        #expect(h.dingtalk.deliveries[1].text == BotMessages.defaults(for: .en).resetDone)
        try await h.send("c3", "/help")
        #expect(await eventually { h.dingtalk.deliveries.count == 3 })
        #expect(h.dingtalk.deliveries[2].text.contains("/reset"))
        let picture = h.sender.body(messageID: "c4", text: "", webhook: h.dingtalk.webhookURL(session: "c4"), msgtype: "picture", content: ["downloadCode": "abc"])
        #expect(try await h.sender.post(picture, client: h.client).status == 200)
        #expect(await eventually { h.dingtalk.deliveries.count == 4 })
        #expect(h.dingtalk.deliveries[3].text.contains("pictures"))
        #expect(h.model.requestCount == 1)
        try await h.send("c5", "after reset")
        #expect(await eventually { h.dingtalk.deliveries.count == 5 })
        #expect(h.model.received.last?.messages.count == 2)
    }

    @Test func shutdownDrainsInFlightAnswersWhileStillAcceptingCallbacks() async throws {
        let h = try await Harness.start()
        defer { Task { await h.stop() } }
        h.model.hold()
        try await h.send("d1", "slow")
        #expect(await eventually { h.model.requestCount == 1 })
        #expect(try await h.get("/readyz").status == 200)
        await h.beginShutdown()
        #expect(await eventually(seconds: 5) { (try? await h.get("/readyz").status) == 503 })
        // Still accepted while the answer in flight drains: stored durably for the next start, not refused.
        let late = try await h.send("d2", "late", conversation: "cidLate==", staff: "u9")
        #expect(late.status == 200)
        #expect(h.model.requestCount == 1)
        h.model.release()
        await h.stopApp()
        #expect(h.dingtalk.deliveries.map(\.target) == ["d1"])
        #expect(h.dingtalk.deliveries[0].text == ModelSimulator.answer(to: "slow"))
        #expect(try await h.inboxRowsWhileStopped().map(\.state) == ["answered", "pending"])
        // The next start answers it.
        try await h.restart()
        #expect(await eventually { h.dingtalk.deliveries.contains { $0.target == "d2" } })
        #expect(h.dingtalk.deliveries.count == 2)
    }

    @Test func readinessSaysWhenAnotherReplicaMigratedTheDatabaseToANewerSchema() async throws {
        let h = try await Harness.start()
        defer { Task { await h.stop() } }
        #expect(try await h.get("/readyz").status == 200)
        let newer = SQLStore.latestVersion + 1
        try await h.store.single { db in try await db.raw("INSERT INTO schema_migrations (version, applied_at) VALUES (\(bind: newer), 0)").run() }
        let ready = try await h.get("/readyz")
        #expect(ready.status == 503 && ready.body.contains("database schema newer than this build"))
    }

    @Test func metricsAndReadinessFollowTheTraffic() async throws {
        let h = try await Harness.start()
        defer { Task { await h.stop() } }
        #expect(try await h.get("/readyz").status == 200)
        let received = #"chatbridge_messages_received_total{platform="dingtalk"}"#
        let answered = "chatbridge_messages_answered_total"
        #expect(try await h.metric(received) == 0)
        try await h.send("m1", "count me")
        try await h.send("m1", "count me")
        #expect(await eventually { (try? await h.metric(answered)) == 1 })
        #expect(try await h.metric(received) == 1)
        #expect(try await h.metric(#"chatbridge_messages_deduplicated_total{platform="dingtalk"}"#) == 1)
        try await h.send("m2", "and me", conversation: "cidOther==", staff: "u2")
        #expect(await eventually { (try? await h.metric(answered)) == 2 })
        #expect(try await h.metric(received) == 2)
        _ = try await h.sender.post(Data("{oops".utf8), client: h.client)
        #expect(try await h.metric(#"chatbridge_callbacks_rejected_total{platform="dingtalk"}"#) == 1)
        #expect(try await h.metric("chatbridge_inbox_pending") == 0)
    }

    @Test func metricsCanBeServedOnTheirOwnAddress() async throws {
        let h = try await Harness.start(["server.metrics_address": "127.0.0.1:0"])
        defer { Task { await h.stop() } }
        #expect(await eventually { h.app.components.ports.metrics != nil })
        let metricsPort = try #require(h.app.components.ports.metrics)
        #expect(try await h.get("/metrics").status == 404)
        let text = try await h.get("/metrics", port: metricsPort)
        #expect(text.status == 200)
        #expect(text.body.contains("chatbridge_messages_received_total"))
    }

    @Test func aQuestionOverTheLimitGetsTheLimitAndNoModelCall() async throws {
        let h = try await Harness.start(["conversation.max_question_chars": "20"])
        defer { Task { await h.stop() } }
        try await h.send("q1", String(repeating: "字", count: 21))
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
        let text = h.dingtalk.deliveries[0].text
        #expect(text.contains("21") && text.contains("20"))
        #expect(!text.contains("/reset"))
        #expect(h.model.requestCount == 0)
        try await h.send("q2", String(repeating: "字", count: 20))
        #expect(await eventually { h.dingtalk.deliveries.count == 2 })
        #expect(h.model.requestCount == 1)
    }

    @Test func aWebhookOnAnotherPathOfAnAllowedHostIsNeverRequested() async throws {
        let h = try await Harness.start()
        defer { Task { await h.stop() } }
        let other = h.dingtalk.baseURL + "/_simulator/stolen?session=w1"
        try await h.send("w1", "where does this go", webhook: other)
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
        #expect(h.dingtalk.deliveries[0].channel == .direct)
        #expect(h.dingtalk.stolenRequests.isEmpty)
        #expect(h.dingtalk.webhookRequests == 0)
    }
}
