import ChatBridgeCore
import ChatBridgeDingTalk
import ChatBridgeServer
import ChatBridgeSimulators
import ChatBridgeStore
import Foundation
import Testing

/// Typewriter answers in DingTalk AI cards: the real application against the card endpoints of the
/// DingTalk simulator.
@Suite(.serialized, .timeLimit(.minutes(2))) struct CardTests {
    static let cardSettings = [
        "dingtalk.card.template_id": "382e4302-551d-4880-bf29-a30acfab2e71.schema", "dingtalk.card.update_interval": "100ms",
        "dingtalk.card.qps_backoff": "50ms",
    ]

    static func streaming(tokens: Int = 30) -> ModelSimulator.Behaviour {
        var behaviour = ModelSimulator.Behaviour()
        behaviour.tokensPerSecond = 100
        behaviour.answerTokens = tokens
        return behaviour
    }

    static func outTrackID(_ messageID: String) -> String { DingTalkCard.outTrackID(robotCode: "dingbot", messageID: messageID) }

    @Test func aGroupAnswerGrowsInOneCardAndIsFinalized() async throws {
        let h = try await Harness.start(Self.cardSettings, behaviour: Self.streaming())
        defer { Task { await h.stop() } }
        #expect(try await h.send("g1", "hello", conversation: "cidGroup==", staff: "0420001", group: true).status == 200)
        let id = Self.outTrackID("g1")
        #expect(await eventually { h.dingtalk.cards.card(id)?.flowStatus == "3" })
        #expect(await eventually { (try? await h.store.inboxRows().first?.state) == "answered" })
        let card = try #require(h.dingtalk.cards.card(id))
        let answer = ModelSimulator.answer(to: "hello") + (0..<30).map { " w\($0)" }.joined()
        #expect(card.deliveries == 1)
        #expect(card.openSpaceID == "dtv1.card//IM_GROUP.cidGroup==")
        #expect(card.atUserIds.keys.contains("0420001"))
        #expect(card.robotCode == "dingbot")
        #expect(card.finalized && !card.isError)
        #expect(card.streamed == answer)
        #expect(card.params["msgContent"] == answer)
        #expect(h.dingtalk.cards.cards.count == 1)
        // Growing whole-text updates, each with a new guid, fewer than the tokens (the pace itself is asserted
        // on a manual clock in LiveUpdatesTests).
        let updates = h.dingtalk.cards.calls.filter { $0.path == "/v1.0/card/streaming" && $0.outTrackID == id }
        let intermediate = updates.filter { !$0.isFinalize }.compactMap(\.content)
        #expect(intermediate.count >= 2)
        #expect(intermediate.count < 30, "updates are throttled, not one per token")
        for (earlier, later) in zip(intermediate, intermediate.dropFirst()) { #expect(later.hasPrefix(earlier) && later.count > earlier.count) }
        #expect(Set(updates.compactMap(\.guid)).count == updates.count)
        #expect(h.dingtalk.cards.repeatedGuids == 0)
        #expect(updates.last?.isFinalize == true)
        // No markdown message besides the card; the context holds the exchange.
        #expect(h.dingtalk.deliveries.isEmpty)
        #expect(try await h.store.inboxRows().first?.live == "finalized")
    }

    @Test func aDirectAnswerGoesToTheUsersRobotChat() async throws {
        let h = try await Harness.start(Self.cardSettings, behaviour: Self.streaming(tokens: 5))
        defer { Task { await h.stop() } }
        try await h.send("d1", "hi", staff: "0420002")
        let id = Self.outTrackID("d1")
        #expect(await eventually { h.dingtalk.cards.card(id)?.flowStatus == "3" })
        let card = try #require(h.dingtalk.cards.card(id))
        #expect(card.openSpaceID == "dtv1.card//IM_ROBOT.0420002")
        #expect(card.deliveries == 1)
        #expect(card.streamed.hasPrefix(ModelSimulator.answer(to: "hi")))
        #expect(h.dingtalk.deliveries.isEmpty)
    }

    @Test func aQPSLimitIsWaitedOutAndTheFinalTextStillArrives() async throws {
        let h = try await Harness.start(Self.cardSettings, behaviour: Self.streaming(tokens: 5))
        defer { Task { await h.stop() } }
        let limit = DingTalkSimulator.Scripted.failure(403, code: "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi")
        h.dingtalk.cards.script("/v1.0/card/instances/createAndDeliver", limit)
        h.dingtalk.cards.script("/v1.0/card/streaming", limit, limit)
        try await h.send("q1", "hi")
        let id = Self.outTrackID("q1")
        #expect(await eventually { h.dingtalk.cards.card(id)?.flowStatus == "3" })
        let card = try #require(h.dingtalk.cards.card(id))
        #expect(card.finalized)
        #expect(card.streamed.hasPrefix(ModelSimulator.answer(to: "hi")))
        #expect(card.deliveries == 1)
        #expect(h.dingtalk.cards.calls.filter { $0.status == 403 }.count == 3)
        #expect(h.dingtalk.cards.repeatedGuids == 0)
        #expect(h.dingtalk.deliveries.isEmpty)
    }

    @Test func aModelThatFailsForGoodTurnsTheCardIntoTheErrorMessage() async throws {
        let h = try await Harness.start(Self.cardSettings)
        defer { Task { await h.stop() } }
        h.model.script(.error(401, code: "invalid_api_key", message: "Incorrect API key provided"))
        try await h.send("e1", "hi")
        let id = Self.outTrackID("e1")
        #expect(await eventually { h.dingtalk.cards.card(id)?.flowStatus == "5" })
        let card = try #require(h.dingtalk.cards.card(id))
        #expect(card.isError && card.finalized)
        #expect(card.streamed == h.app.components.engine.settings.messages.reply(for: ModelError(.invalidAPIKey, detail: "")))
        #expect(await eventually { (try? await h.store.inboxRows().first?.state) == "failed" })
        #expect(h.dingtalk.deliveries.isEmpty)
    }

    @Test func aRefusedCardFallsBackToOneMarkdownAnswer() async throws {
        let h = try await Harness.start(Self.cardSettings)
        defer { Task { await h.stop() } }
        h.dingtalk.cards.script(
            "/v1.0/card/instances/createAndDeliver",
            .failure(403, code: "Forbidden.AccessDenied.AccessTokenPermissionDenied", message: "没有调用该接口的权限"))
        try await h.send("p1", "hi")
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
        #expect(await eventually { (try? await h.store.inboxRows().first?.state) == "answered" })
        #expect(h.dingtalk.deliveries[0].text == ModelSimulator.answer(to: "hi"))
        #expect(h.dingtalk.cards.cards.isEmpty)
        #expect(try await h.store.inboxRows().first?.live == "declined")
        // The next message tries the card again (the permission may have been granted meanwhile).
        try await h.send("p2", "again")
        #expect(await eventually { h.dingtalk.cards.card(Self.outTrackID("p2"))?.flowStatus == "3" })
        #expect(h.dingtalk.deliveries.count == 1)
    }

    @Test func aCardWhoseCreationOutcomeWasLostIsFoundNotCreatedAgain() async throws {
        let h = try await Harness.start(Self.cardSettings, behaviour: Self.streaming(tokens: 5))
        defer { Task { await h.stop() } }
        // DingTalk creates and delivers the card, but the answer is lost (a gateway error on the way back).
        h.dingtalk.cards.script("/v1.0/card/instances/createAndDeliver", .init(status: 502, body: "bad gateway", delivers: true))
        try await h.send("lost1", "hi", conversation: "cidLost==", staff: "0420009", group: true)
        let id = Self.outTrackID("lost1")
        #expect(await eventually { (try? await h.store.inboxRows().first?.state) == "answered" })
        let card = try #require(h.dingtalk.cards.card(id))
        // The retry looks for the card first, finds it, and finishes it: one card in the chat, one answer.
        #expect(card.deliveries == 1)
        #expect(card.flowStatus == "3" && card.finalized)
        #expect(card.streamed.hasPrefix(ModelSimulator.answer(to: "hi")))
        #expect(h.dingtalk.cards.calls.filter { $0.path.hasSuffix("createAndDeliver") }.count == 1)
        #expect(h.dingtalk.deliveries.isEmpty)
        #expect(try await h.store.inboxRows().first?.attempts == 2)
    }

    @Test func withoutTheStreamingPermissionTheCardIsStillFinishedWithTheWholeAnswer() async throws {
        let h = try await Harness.start(Self.cardSettings, behaviour: Self.streaming(tokens: 10))
        defer { Task { await h.stop() } }
        let denied = DingTalkSimulator.Scripted.failure(403, code: "Forbidden.AccessDenied.AccessTokenPermissionDenied", message: "Card.Streaming.Write")
        for _ in 0..<40 { h.dingtalk.cards.script("/v1.0/card/streaming", denied) }
        try await h.send("perm1", "hi")
        let id = Self.outTrackID("perm1")
        #expect(await eventually { (try? await h.store.inboxRows().first?.state) == "answered" })
        let card = try #require(h.dingtalk.cards.card(id))
        let answer = ModelSimulator.answer(to: "hi") + (0..<10).map { " w\($0)" }.joined()
        #expect(card.flowStatus == "3")
        #expect(card.params["msgContent"] == answer)
        // The first refused update stops the updates; the final streaming call is refused too.
        #expect(h.dingtalk.cards.calls.filter { $0.path == "/v1.0/card/streaming" }.count == 2)
        #expect(card.deliveries == 1)
        #expect(h.dingtalk.deliveries.isEmpty)
    }

    @Test func theRateLimiterSpacesCallsAcrossAllCards() async {
        let limiter = CardRateLimiter(maxQPS: 100)
        let slots = await withTaskGroup(of: ContinuousClock.Instant.self) { group in
            for _ in 0..<30 { group.addTask { try! await limiter.acquire() } }
            return await group.reduce(into: []) { $0.append($1) }.sorted()
        }
        for (earlier, later) in zip(slots, slots.dropFirst()) { #expect(later - earlier >= .milliseconds(10.5)) }
        // So any one-second window holds at most max_qps calls.
        #expect(slots.count == 30)
    }

    @Test func outTrackIDsAreStablePerMessageAndDistinctAcrossMessagesAndRobots() {
        let a = DingTalkCard.outTrackID(robotCode: "bot", messageID: "msg1")
        #expect(a == DingTalkCard.outTrackID(robotCode: "bot", messageID: "msg1"))
        #expect(a != DingTalkCard.outTrackID(robotCode: "bot", messageID: "msg2"))
        #expect(a != DingTalkCard.outTrackID(robotCode: "other", messageID: "msg1"))
        #expect(a.count <= 64)
    }
}
