import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeServer
import ChatBridgeSimulators
import ChatBridgeStore
import Foundation
@testable import ChatBridgeLark
import Testing

/// Feishu/Lark end to end: the real application against the Lark simulator — webhook and long connection
/// in, replies, CardKit and patched cards and text out, exactly once.
@Suite(.serialized, .timeLimit(.minutes(2))) struct LarkIntegrationTests {
    static func streaming(tokens: Int = 30) -> ModelSimulator.Behaviour {
        var behaviour = ModelSimulator.Behaviour()
        behaviour.tokensPerSecond = 100
        behaviour.answerTokens = tokens
        return behaviour
    }

    static func answer(_ question: String, tokens: Int) -> String {
        ModelSimulator.answer(to: question) + (0..<tokens).map { " w\($0)" }.joined()
    }

    func answered(_ h: Harness, count: Int = 1) async -> Bool {
        await eventually { (try? await h.store.inboxRows().filter { $0.state == "answered" }.count) == count }
    }

    @Test func aDirectMessageStreamsIntoOneCardKitCardThatIsClosedWithTheAnswer() async throws {
        let h = try await Harness.start(behaviour: Self.streaming(), lark: true)
        defer { Task { await h.stop() } }
        let lark = try #require(h.lark)
        let ack = try await h.sendLark("om_u1", "hello")
        #expect(ack.status == 200)
        #expect(await answered(h))
        let answer = Self.answer("hello", tokens: 30)
        let card = try #require(lark.cards.first)
        #expect(lark.cards.count == 1)
        #expect(card.sends == 1)
        #expect(!card.streaming, "streaming mode is closed at the end")
        #expect(card.text == answer)
        #expect(card.summary == String(answer.prefix(60)))
        #expect(card.contentUpdates >= 2)
        #expect(card.contentUpdates < 31, "updates are paced, not one per token")
        #expect(zip(card.sequences, card.sequences.dropFirst()).allSatisfy { $0 < $1 })
        #expect(card.refusedSequences == 0, "no operation was refused for a sequence that did not increase")
        let replies = lark.replies(to: "om_u1")
        #expect(replies.count == 1)
        #expect(replies.first?.type == "interactive")
        #expect(replies.first?.cardID == card.id)
        #expect(replies.first?.uuid?.isEmpty == false)
        // The conversation remembers the delivered answer.
        #expect(try await h.sendLark("om_u2", "again").status == 200)
        #expect(await answered(h, count: 2))
        #expect(h.model.received.last?.messages.contains { $0["content"] == answer } == true)
    }

    @Test func aLongCardKitAnswerFillsTheCardAndContinuesInFurtherMessages() async throws {
        let h = try await Harness.start(
            ["conversation.max_question_chars": "100000", "server.max_body_bytes": "4MiB"], behaviour: Self.streaming(tokens: 0), lark: true)
        defer { Task { await h.stop() } }
        let lark = try #require(h.lark)
        // 80 KB of four-byte characters: more than two cards hold, and 9,000 of them already over a card's 30 KB.
        let question = String(repeating: "😀", count: 20_000)
        let answer = ModelSimulator.answer(to: question)
        let parts = LarkReplyChannel.numberedParts(of: answer, maxBytes: LarkCard.maxCardBytes)
        #expect(parts.count == 3)
        #expect(parts.map { $0.drop { $0 != "\n" }.dropFirst() }.joined() == answer, "nothing is cut off")
        _ = try await h.sendLark("om_long", question)
        #expect(await answered(h))
        let card = try #require(lark.cards.first)
        #expect(!card.streaming)
        #expect(card.text == parts[0])
        let replies = lark.replies(to: "om_long")
        #expect(replies.first?.cardID == card.id)
        #expect(replies.dropFirst().map(\.text) == Array(parts.dropFirst()))
        #expect(Set(replies.compactMap(\.uuid)).count == replies.count)
    }

    @Test func aCardWhoseStreamingModeClosedByItselfIsStillFinishedWithTheAnswer() async throws {
        let h = try await Harness.start(["lark.card.update_interval": "100ms"], behaviour: Self.streaming(tokens: 40), lark: true)
        defer { Task { await h.stop() } }
        let lark = try #require(h.lark)
        // Feishu closes streaming mode 10 minutes after a card is made: the first update is refused so.
        lark.script(.cardContent, .code(300309, "streaming mode is closed"))
        #expect(try await h.sendLark("om_s1", "hello").status == 200)
        #expect(await answered(h))
        let card = try #require(lark.cards.first)
        #expect(card.text == Self.answer("hello", tokens: 40))
        #expect(!card.streaming)
        #expect(card.closes == 1)
        #expect(lark.requests(.cardContent) == 1, "no more updates are sent into a closed card")
        #expect(lark.replies(to: "om_s1").count == 1)
    }

    @Test func aRepushedEventIsAnsweredOnce() async throws {
        let h = try await Harness.start(["lark.card.mode": "off"], lark: true)
        defer { Task { await h.stop() } }
        let lark = try #require(h.lark)
        let sender = h.larkSender
        // Feishu's retry of the same message comes as a new event id.
        for eventID in ["ev-1", "ev-2", "ev-3"] {
            let event = sender.messageEvent(messageID: "om_dup", text: "hello", eventID: eventID)
            #expect(try await sender.post(event, client: h.client).status == 200)
        }
        #expect(await answered(h))
        #expect(h.model.received.count == 1)
        #expect(lark.replies(to: "om_dup").count == 1)
        #expect(lark.replies(to: "om_dup").first?.text == ModelSimulator.answer(to: "hello"))
        #expect(try await h.metric(#"chatbridge_messages_deduplicated_total{platform="lark"}"#) == 2)
    }

    @Test func theChallengeIsAnsweredPlainAndEncryptedAndUnauthenticatedEventsStoreNothing() async throws {
        let h = try await Harness.start(lark: true)
        defer { Task { await h.stop() } }
        let sender = h.larkSender
        // Encrypted but unsigned, as Feishu sends it when the URL is saved.
        let encrypted = try await sender.post(sender.challenge("c-123"), signed: false, client: h.client)
        #expect(encrypted.status == 200)
        #expect(encrypted.body == #"{"challenge":"c-123"}"#)
        // A wrong verification token in the challenge is refused.
        var wrong = sender
        wrong.verificationToken = "not-the-token"
        #expect(try await wrong.post(wrong.challenge("c-1"), signed: false, client: h.client).status == 401)
        // A message event without a signature, with a bad one, undecryptable, or too big: nothing stored.
        let event = sender.messageEvent(messageID: "om_x", text: "hi")
        #expect(try await sender.post(event, signed: false, client: h.client).status == 401)
        var (body, headers) = sender.envelope(event)
        headers = headers.map { $0.0 == "X-Lark-Signature" ? ($0.0, String(repeating: "0", count: 64)) : $0 }
        #expect(try await sender.post(raw: body, headers: headers, client: h.client).status == 401)
        var badKey = sender
        badKey.encryptKey = "another key"
        #expect(try await badKey.post(event, client: h.client).status == 401)
        let huge = sender.messageEvent(messageID: "om_big", text: String(repeating: "x", count: 2 << 20))
        (body, headers) = sender.envelope(huge)
        #expect(try await sender.post(raw: body, headers: headers, client: h.client).status == 413)
        #expect(try await h.store.inboxRows().isEmpty)
        _ = body

        // Without an encrypt key the challenge comes plain.
        let plain = try await Harness.start(["lark.encrypt_key": ""], lark: true)
        defer { Task { await plain.stop() } }
        var plainSender = plain.larkSender
        plainSender.encryptKey = ""
        let answer = try await plainSender.post(plainSender.challenge("c-plain"), client: plain.client)
        #expect(answer.status == 200)
        #expect(answer.body == #"{"challenge":"c-plain"}"#)
    }

    @Test func withoutAKeyOrTokenTheWebhookAnswers503NamingTheSettings() async throws {
        let h = try await Harness.start(["lark.encrypt_key": "", "lark.verification_token": ""], lark: true)
        defer { Task { await h.stop() } }
        var sender = h.larkSender
        sender.encryptKey = ""
        let answer = try await sender.post(sender.messageEvent(messageID: "om_1", text: "hi"), client: h.client)
        #expect(answer.status == 503)
        #expect(answer.body.contains("lark.encrypt_key") && answer.body.contains("lark.verification_token"))
        #expect(try await h.store.inboxRows().isEmpty)
    }

    @Test func withoutAnAppIDTheWebhookStoresNothingAndThePlainHTTPBaseURLIsRefused() async throws {
        let h = try await Harness.start()
        defer { Task { await h.stop() } }
        let answer = try await h.larkSender.post(h.larkSender.messageEvent(messageID: "om_1", text: "hi"), client: h.client)
        #expect(answer.status == 503)
        #expect(answer.body.contains("lark.app_id"))
        #expect(try await h.store.inboxRows().isEmpty)
        let plain = ChatBridgeConfiguration.from(values: ["lark.app_id": "cli_x", "lark.app_secret": "s", "lark.base_url": "http://open.feishu.cn"])
        #expect(plain.errors.contains { $0.key == "lark.base_url" && $0.message.contains("https") })
        let loopback = ChatBridgeConfiguration.from(values: ["lark.app_id": "cli_x", "lark.app_secret": "s", "lark.base_url": "http://127.0.0.1:9"])
        #expect(!loopback.errors.contains { $0.key == "lark.base_url" })
        // Webhooks checked by the verification token alone work, with a warning to add the encrypt key.
        let tokenOnly = ChatBridgeConfiguration.from(values: ["lark.app_id": "cli_x", "lark.app_secret": "s", "lark.mode": "webhook", "lark.verification_token": "t"])
        #expect(tokenOnly.warnings.contains { $0.key == "lark.encrypt_key" && $0.message.contains("unsigned") })
        let keyed = ChatBridgeConfiguration.from(values: ["lark.app_id": "cli_x", "lark.app_secret": "s", "lark.mode": "webhook", "lark.encrypt_key": "k"])
        #expect(!keyed.warnings.contains { $0.key == "lark.encrypt_key" })
    }

    @Test func inGroupsOnlyAMentionOfTheBotItselfIsAnsweredEvenAfterARename() async throws {
        let h = try await Harness.start(["lark.card.mode": "off"], lark: true)
        defer { Task { await h.stop() } }
        let lark = try #require(h.lark)
        let other = LarkEventSender.Mention(key: "@_user_1", openID: "ou_someone", name: "ChatBridge")
        // Someone else who happens to share the bot's name: not for the bot.
        #expect(try await h.sendLark("om_g1", "@_user_1 what time is it", chat: "oc_group", group: true, mentions: [other]).status == 200)
        lark.renameBot("Renamed Bot")
        let bot = LarkEventSender.Mention(key: "@_user_1", openID: lark.botOpenID, name: "Old Name")
        let colleague = LarkEventSender.Mention(key: "@_user_2", openID: "ou_tom", name: "Tom")
        #expect(try await h.sendLark("om_g2", "@_user_1 ask @_user_2 about it", chat: "oc_group", group: true, mentions: [bot, colleague]).status == 200)
        #expect(await answered(h))
        let rows = try await h.store.inboxRows()
        #expect(rows.map(\.messageID) == ["om_g2"], "the message mentioning someone else is not stored")
        #expect(h.model.received.count == 1)
        // The bot's mention is removed, the colleague's placeholder becomes the name.
        #expect(h.model.received.first?.messages.last?["content"] == "ask @Tom about it")
        #expect(lark.replies(to: "om_g2").count == 1)
        #expect(lark.replies(to: "om_g1").isEmpty)
    }

    @Test func aGroupMentionWaitsAtMostASecondForTheBotsIdentityAndItsRePushIsAnswered() async throws {
        let lark = try await LarkSimulator.start()
        // The bot-info call is rate limited for 8 s: far longer than Feishu waits for an event's answer.
        lark.script(.botInfo, .rateLimited(reset: 8))
        let h = try await Harness.start(["lark.card.mode": "off", "lark.mode": "webhook"], lark: true, larkSimulator: lark)
        defer { Task { await h.stop() } }
        let bot = LarkEventSender.Mention(key: "@_user_1", openID: lark.botOpenID, name: "ChatBridge")
        let started = ContinuousClock.now
        let first = try await h.sendLark("om_g1", "@_user_1 hello", chat: "oc_group", group: true, mentions: [bot])
        #expect(first.status == 503, "Feishu pushes it again")
        #expect(ContinuousClock.now - started < .seconds(3), "answered within Feishu's 3 s")
        #expect(try await h.store.inboxRows().isEmpty)
        // Feishu's re-push after the identity arrived is stored and answered.
        #expect(await eventually { (try? await h.sendLark("om_g1", "@_user_1 hello", chat: "oc_group", group: true, mentions: [bot]).status) == 200 })
        #expect(await answered(h))
        #expect(lark.replies(to: "om_g1").count == 1)
    }

    @Test func withReplyInThreadAnswersGoIntoTheThreadAndTheThreadKeepsItsConversation() async throws {
        let h = try await Harness.start(["lark.card.mode": "off", "lark.reply_in_thread": "true"], lark: true)
        defer { Task { await h.stop() } }
        let lark = try #require(h.lark)
        #expect(try await h.sendLark("om_t1", "first question").status == 200)
        #expect(await answered(h))
        let event = h.larkSender.messageEvent(messageID: "om_t2", text: "second question", threadID: "omt_1", rootID: "om_t1")
        #expect(try await h.larkSender.post(event, client: h.client).status == 200)
        #expect(await answered(h, count: 2))
        #expect(lark.replies(to: "om_t1").map(\.replyInThread) == [true])
        #expect(lark.replies(to: "om_t2").map(\.replyInThread) == [true])
        // The follow-up in the thread carries the thread's first exchange as context.
        let context = h.model.received.last?.messages.compactMap { $0["content"] } ?? []
        #expect(context.contains("first question"))
        #expect(context.contains(ModelSimulator.answer(to: "first question")))
    }

    @Test func patchModeStreamsIntoOneInteractiveCard() async throws {
        let h = try await Harness.start(["lark.card.mode": "patch", "lark.card.update_interval": "200ms"], behaviour: Self.streaming(tokens: 40), lark: true)
        defer { Task { await h.stop() } }
        let lark = try #require(h.lark)
        #expect(try await h.sendLark("om_p1", "hello").status == 200)
        #expect(await answered(h))
        let replies = lark.replies(to: "om_p1")
        #expect(replies.count == 1)
        let message = try #require(replies.first)
        #expect(message.type == "interactive")
        #expect(message.text == Self.answer("hello", tokens: 40))
        #expect(message.patches >= 2)
        #expect(lark.cards.isEmpty)
    }

    @Test func cardKitRefusedForPermissionFallsBackToAPatchedCard() async throws {
        let h = try await Harness.start(behaviour: Self.streaming(tokens: 10), lark: true)
        defer { Task { await h.stop() } }
        let lark = try #require(h.lark)
        lark.refuseCardKit()
        #expect(try await h.sendLark("om_f1", "hello").status == 200)
        #expect(await answered(h))
        let replies = lark.replies(to: "om_f1")
        #expect(replies.count == 1)
        #expect(replies.first?.type == "interactive")
        #expect(replies.first?.text == Self.answer("hello", tokens: 10))
        #expect(lark.cards.isEmpty)
    }

    @Test func cardsRefusedEntirelyFallBackToOneTextAnswer() async throws {
        let h = try await Harness.start(["lark.card.mode": "patch"], lark: true)
        defer { Task { await h.stop() } }
        let lark = try #require(h.lark)
        lark.script(.reply, .code(230099, "card content error"))
        #expect(try await h.sendLark("om_t1", "hello").status == 200)
        #expect(await answered(h))
        let replies = lark.replies(to: "om_t1")
        #expect(replies.map(\.type) == ["text"])
        #expect(replies.first?.text == ModelSimulator.answer(to: "hello"))
    }

    @Test func aRefusedTokenIsRefreshedOnceAndAFrequencyLimitIsWaitedOut() async throws {
        let h = try await Harness.start(["lark.card.mode": "off"], lark: true)
        defer { Task { await h.stop() } }
        let lark = try #require(h.lark)
        #expect(try await h.sendLark("om_a", "first").status == 200)
        #expect(await answered(h))
        let issued = lark.tokensIssued
        lark.expireTokens()
        lark.script(.reply, .code(230020, "frequency limit"), .rateLimited(reset: 0))
        #expect(try await h.sendLark("om_b", "second").status == 200)
        #expect(await answered(h, count: 2))
        #expect(lark.tokensIssued == issued + 1, "one new token after the refusal")
        #expect(lark.replies(to: "om_b").count == 1)
        #expect(lark.requests(.reply) == 5, "first, then refused token, 230020, 429, success")
        let rows = try await h.store.inboxRows()
        #expect(rows.first { $0.messageID == "om_b" }?.attempts == 1, "waited out in place, not a retry of the message")
    }

    @Test func aLongAnswerContinuesInFurtherMessagesAndNothingIsCutOff() async throws {
        let h = try await Harness.start(
            ["lark.card.mode": "off", "conversation.max_question_chars": "100000", "server.max_body_bytes": "4MiB"], behaviour: Self.streaming(tokens: 0),
            lark: true)
        defer { Task { await h.stop() } }
        let lark = try #require(h.lark)
        // 39,000 characters fit a message by count, but at four bytes each they are over Feishu's 150 KB.
        let question = String(repeating: "😀", count: 39_000)
        let parts = LarkReplyChannel.numberedParts(of: ModelSimulator.answer(to: question), maxBytes: LarkReplyChannel.maxTextBytes)
        #expect(parts.count == 2)
        _ = try await h.sendLark("om_long", question)
        #expect(await answered(h))
        let replies = lark.replies(to: "om_long")
        #expect(replies.map(\.text) == parts)
        #expect(Set(replies.compactMap(\.uuid)).count == 2)
    }

    @Test func dingTalkAndLarkAreAnsweredByOneProcessOnTheirOwnPlatforms() async throws {
        let h = try await Harness.start(["lark.card.mode": "off"], lark: true)
        defer { Task { await h.stop() } }
        let lark = try #require(h.lark)
        #expect(try await h.send("d1", "from dingtalk").status == 200)
        #expect(try await h.sendLark("om_l1", "from lark").status == 200)
        #expect(await answered(h, count: 2))
        #expect(h.dingtalk.deliveries.map(\.text) == [ModelSimulator.answer(to: "from dingtalk")])
        #expect(lark.messages.map(\.text) == [ModelSimulator.answer(to: "from lark")])
        let ready = try await h.get("/readyz")
        #expect(ready.body.contains(#""lark_stream":"off""#))
    }

    // MARK: Long connection

    static let websocket = ["lark.mode": "websocket", "lark.card.mode": "off", "lark.stream.keepalive_timeout": "300ms"]

    @Test func longConnectionEventsAreAnsweredAndRespondedToOnlyAfterTheCommit() async throws {
        let lark = try await LarkSimulator.start()
        lark.gateway.setPingInterval(1)
        lark.gateway.setPongConfig(["ReconnectCount": -1, "ReconnectInterval": 120, "ReconnectNonce": 30, "PingInterval": 1])
        let h = try await Harness.start(Self.websocket, lark: true, larkSimulator: lark)
        defer { Task { await h.stop() } }
        #expect(await lark.gateway.wait { !$0.openConnections.isEmpty })
        let sender = h.larkSender
        // Split in three fragments, delivered out of order.
        let id = try await lark.gateway.pushEvent(sender.messageEvent(messageID: "om_ws1", text: "over the socket"), fragments: 3)
        #expect(await lark.gateway.wait { !$0.replies(for: id).isEmpty })
        let reply = try #require(lark.gateway.replies(for: id).first)
        #expect(reply.code == 200)
        #expect(reply.bizRT != nil)
        #expect(reply.echoesFrame)
        #expect(lark.gateway.replies(for: id).count == 1, "a fragmented event is answered once")
        // Responded only after the commit: the row exists.
        #expect(try await h.store.inboxRows().map(\.messageID) == ["om_ws1"])
        #expect(await answered(h))
        #expect(lark.replies(to: "om_ws1").first?.text == ModelSimulator.answer(to: "over the socket"))
        // A re-push of the same message is answered (200) and not stored again.
        let again = try await lark.gateway.pushEvent(sender.messageEvent(messageID: "om_ws1", text: "over the socket", eventID: "other"))
        #expect(await lark.gateway.wait { !$0.replies(for: again).isEmpty })
        #expect(lark.gateway.replies(for: again).first?.code == 200)
        #expect(h.model.received.count == 1)
        // Card frames are not ours: no response.
        let card = try await lark.gateway.pushEvent(Data(#"{"card":true}"#.utf8), type: "card")
        let pings = lark.gateway.pings
        #expect(await lark.gateway.wait { $0.pings > pings })
        #expect(lark.gateway.replies(for: card).isEmpty)
        #expect(try await h.get("/readyz").body.contains(#""lark_stream":"connected""#))
    }

    @Test func aSilentConnectionIsReplacedWithAFreshEndpointAndNothingIsLost() async throws {
        let lark = try await LarkSimulator.start()
        lark.gateway.setPingInterval(1)
        lark.gateway.setRedelivery(after: .milliseconds(500))
        let h = try await Harness.start(Self.websocket, lark: true, larkSimulator: lark)
        defer { Task { await h.stop() } }
        #expect(await lark.gateway.wait { $0.openConnections.count == 1 })
        lark.gateway.goSilent()
        // Pushed into the silent connection: lost there, pushed again on the next one.
        _ = try? await lark.gateway.pushEvent(h.larkSender.messageEvent(messageID: "om_z1", text: "lost?"), to: lark.gateway.connectionsAccepted)
        lark.gateway.endSilence()
        #expect(await lark.gateway.wait { $0.openConnections.count == 1 && $0.connectionsAccepted >= 2 })
        #expect(lark.gateway.endpointRequests >= 2, "every reconnect asks for a fresh URL")
        #expect(await answered(h))
        #expect(lark.replies(to: "om_z1").count == 1)
    }

    @Test func refusedCredentialsAreReportedAndNotRetriedInATightLoop() async throws {
        let lark = try await LarkSimulator.start()
        lark.gateway.refuseApp(code: 1000040344)
        let h = try await Harness.start(Self.websocket.merging(["lark.stream.max_backoff": "30s"]) { $1 }, lark: true, larkSimulator: lark)
        defer { Task { await h.stop() } }
        #expect(await eventually { (try? await h.get("/readyz").body.contains(#""lark_stream":"rejected""#)) == true })
        #expect(lark.gateway.endpointRequests == 1, "the next try waits lark.stream.max_backoff")
    }
}
