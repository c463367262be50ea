import ChatBridgeCore
import Foundation
import Logging
import Testing

/// The dispatcher against in-memory twins and a manual clock: every exactly-once rule, with time driven
/// by the test.
final class DispatcherFixture: @unchecked Sendable {
    let clock = ManualClock()
    let inbox = InMemoryInbox()
    let model = ScriptedModel()
    let replies: RecordingReplies
    let settings: DispatcherSettings
    let dispatcher: Dispatcher
    private var task: Task<Void, Never>?

    init(maxAttempts: Int = 3, maxRetryWait: Duration = .seconds(600), live: LiveTwin? = nil, controls: Controls = Controls()) {
        replies = RecordingReplies(live: live)
        settings = DispatcherSettings(
            concurrency: 4, retry: RetryPolicy(maxAttempts: maxAttempts, maxRetryWait: maxRetryWait), lease: .seconds(30),
            pollInterval: .seconds(1), uncertainRetryDelay: .seconds(30))
        var logger = Logger(label: "dispatcher-test")
        logger.logLevel = .critical
        let engine = Engine(
            settings: EngineSettings(language: .en), model: model, conversations: NoConversations(), clock: clock, controls: ControlsBox(controls))
        dispatcher = Dispatcher(
            inbox: inbox, engine: engine, replies: replies, settings: settings, owner: "test", clock: clock, logger: logger,
            random: { 0 })
    }

    @discardableResult
    func accept(_ id: String, _ text: String, chat: String = "c1") async throws -> Int64 {
        let message = textMessage(id, text, chat: chat, user: "u-\(chat)")
        _ = try await inbox.accept(message, conversation: ConversationKey(for: message, groupScope: .user), now: clock.now)
        dispatcher.wake()  // as the ingress does after an accept
        return await inbox.rows.last!.id
    }

    /// The next message, claimed by another worker that then dies (its lease runs out in 30 s).
    func claimByDeadWorker(maxAttempts: Int) async throws -> InboxItem {
        let claimed = try await inbox.claim(limit: 1, owner: "dead", leaseUntil: clock.now.adding(.seconds(30)), maxAttempts: maxAttempts, now: clock.now)
        guard case .ready(let item) = try #require(claimed.first) else { throw ClaimFailed() }
        return item
    }
    struct ClaimFailed: Error {}

    func start() { task = Task { await dispatcher.run() } }

    func stop() async {
        dispatcher.abandon()
        await task?.value
    }

    func state(_ id: Int64) async -> String? { await inbox.row(id)?.state }

    /// Advances the clock in steps until `condition` holds (each step lets the dispatcher run).
    func advance(by step: Duration, until condition: @escaping () async -> Bool) async -> Bool {
        await eventually {
            if await condition() { return true }
            self.clock.advance(by: step)
            return await condition()
        }
    }
}

@Suite struct DispatcherTests {
    @Test func aClaimWhoseResultWasLostIsAnsweredWithoutWaitingForItsLease() async throws {
        let f = DispatcherFixture()
        // The claim commits, but its call fails (as one given up after 5 s that committed all the same).
        await f.inbox.loseNextClaimResult()
        let id = try await f.accept("m1", "hello")
        f.start()
        // One poll interval later (not a 30 s lease) the row is back to pending and answered once.
        var answered = false
        for _ in 0..<5 where !answered {
            f.clock.advance(by: .seconds(1))
            answered = await eventually(seconds: 2) { await f.state(id) == "answered" }
        }
        #expect(answered)
        #expect(f.replies.delivered.count == 1)
        #expect(await f.inbox.claims[id] == 2)
        #expect(await f.inbox.row(id)?.attempts == 1, "the lost claim gave its attempt back")
        await f.stop()
    }

    @Test func anAttemptThatLostItsLeaseSendsNothing() async throws {
        let f = DispatcherFixture()
        let gate = OneTimeEvent()
        f.model.script(.held(gate, "first attempt's answer"), .answer("second attempt's answer"))
        let id = try await f.accept("m1", "question")
        await f.inbox.setRenewalsFail(true)  // the database was out of reach for a whole lease
        f.start()
        #expect(await eventually { f.model.calls == 1 })
        // The lease runs out while the first attempt waits for the model; another worker's reaper releases
        // the row and it is claimed again (here by this dispatcher, standing in for the other worker).
        f.clock.advance(by: .seconds(31))
        #expect(try await f.inbox.releaseExpiredLeases(now: f.clock.now, maxAttempts: 3, keeping: []) == ReleasedClaims(requeued: 1))
        f.dispatcher.wake()
        #expect(await f.advance(by: .seconds(11)) { await f.state(id) == "answered" })
        #expect(f.replies.delivered == ["second attempt's answer"])
        // The first attempt gets its answer now, but its lease token is stale: it stops without sending.
        gate.signal()
        #expect(await eventually { await f.inbox.refusedWrites == [.storeReply] })
        #expect(await eventually { f.dispatcher.inFlightCount == 0 })
        #expect(f.replies.attempts == ["second attempt's answer"])
        #expect(await f.inbox.row(id)?.attempts == 2)
        await f.stop()
    }

    @Test func itsOwnLiveClaimIsNeverReleasedEvenOnTheLastAttempt() async throws {
        let f = DispatcherFixture(maxAttempts: 1)
        let gate = OneTimeEvent()
        f.model.script(.held(gate, "a slow but good answer"))
        let id = try await f.accept("m1", "question")
        await f.inbox.setRenewalsFail(true)
        f.start()
        #expect(await eventually { f.model.calls == 1 })
        // Past the lease, with renewals failing: the reaper runs after the claim expired, and keeps it.
        let expiry = f.clock.now.adding(.seconds(30))
        #expect(await f.advance(by: .seconds(11)) { await f.inbox.releaseRuns.contains { $0 > expiry } })
        #expect(await f.state(id) == "running")
        gate.signal()
        #expect(await eventually { await f.state(id) == "answered" })
        #expect(f.replies.delivered == ["a slow but good answer"])
        await f.stop()
    }

    @Test func anAttemptThatLosesItsLeaseBetweenPartsStopsBeforeTheNextPart() async throws {
        let f = DispatcherFixture()
        f.model.script(.answer("one|two|three"))
        let id = try await f.accept("m1", "question")
        // The record after the first part finds the claim gone (another worker took the row over).
        await f.inbox.stealAfter(.recordDelivered)
        f.start()
        #expect(await eventually { await f.inbox.refusedWrites == [.recordDelivered] })
        #expect(await eventually { f.dispatcher.inFlightCount == 0 })
        #expect(f.replies.attempts == ["one"])
        #expect(await f.inbox.row(id)?.leaseToken == "another-worker")
        await f.stop()
    }

    @Test func stoppingDuringARecordRetryStillRecordsTheDeliveredPart() async throws {
        let f = DispatcherFixture()
        f.model.script(.answer("one|two"))
        let id = try await f.accept("m1", "question")
        await f.inbox.failNext(.recordDelivered, count: 1)
        f.start()
        // The first part went out; its record failed once and waits for the backoff.
        #expect(await eventually { await f.inbox.failuresFired == [.recordDelivered] })
        #expect(f.replies.attempts == ["one"])
        #expect(await f.inbox.row(id)?.deliveredParts == 0)
        await f.stop()
        // Stopping made one last record, so the next attempt will not send part one again.
        #expect(await f.inbox.row(id)?.deliveredParts == 1)
        #expect(await f.inbox.row(id)?.uncertainSends == 0)
    }

    @Test func aRecordThatKeepsFailingForALeaseFinishesWithoutItsEffect() async throws {
        let f = DispatcherFixture()
        let id = try await f.accept("m1", "question")
        await f.inbox.setEffectsFail(true)
        f.start()
        #expect(await f.advance(by: .seconds(2)) { await f.state(id) == "answered" })
        #expect(f.replies.attempts == ["Answer to: question"])
        #expect(await f.inbox.effects.isEmpty)
        #expect(f.clock.now.timeIntervalSince(ManualClock().now) >= 30)
        await f.stop()
    }

    @Test func aNewReplyIsStoredInTheSameWriteThatBeginsItsSend() async throws {
        let f = DispatcherFixture(maxAttempts: 3)
        let id = try await f.accept("m1", "question")
        f.start()
        #expect(await f.advance(by: .milliseconds(500)) { await f.state(id) == "answered" })
        // Two writes for a one-part answer: the reply with the start of its send, then the finish.
        #expect(await f.inbox.written == [.storeReplyAndBeginSend, .finish])
        #expect(f.replies.attempts == ["Answer to: question"])
        await f.stop()
    }

    @Test func anErrorReplyIsStoredWithItsReasonInTheWriteThatBeginsItsSend() async throws {
        let f = DispatcherFixture(maxAttempts: 1)
        f.model.script(.fail(ModelError(.invalidAPIKey, detail: "refused")))
        let id = try await f.accept("m1", "question")
        f.start()
        #expect(await f.advance(by: .milliseconds(500)) { await f.state(id) == "failed" })
        #expect(await f.inbox.written == [.storeReplyAndBeginSend, .finish])
        #expect(await f.inbox.row(id)?.lastError?.contains("refused") == true)
        await f.stop()
    }

    @Test func aRetryAfterAKnownFailedSendBeginsTheSendAgainWithoutStoringTheReplyAgain() async throws {
        let f = DispatcherFixture(maxAttempts: 3)
        f.replies.script(.failed(retryable: true))
        let id = try await f.accept("m1", "question")
        f.start()
        #expect(await f.advance(by: .seconds(5)) { await f.state(id) == "answered" })
        #expect(await f.inbox.written == [.storeReplyAndBeginSend, .beginSend, .finish])
        #expect(f.model.calls == 1)
        await f.stop()
    }

    @Test func aFailedRecordBeforeTheSendIsRetriedInPlaceAndTheAnswerKept() async throws {
        let f = DispatcherFixture(maxAttempts: 1)
        let id = try await f.accept("m1", "question")
        await f.inbox.failNext(.storeReply, count: 2)
        await f.inbox.failNext(.beginSend, count: 2)
        f.start()
        #expect(await f.advance(by: .milliseconds(500)) { await f.state(id) == "answered" })
        #expect(f.model.calls == 1)
        #expect(f.replies.attempts == ["Answer to: question"])
        #expect(await f.inbox.row(id)?.uncertainSends == 0)
        await f.stop()
    }

    @Test func anUncertainSendThenAKnownFailureStillAllowsOneMoreTry() async throws {
        let f = DispatcherFixture(maxAttempts: 5)
        f.replies.script(.uncertain, .failed(retryable: true))
        let id = try await f.accept("m1", "question")
        f.start()
        #expect(await f.advance(by: .seconds(5)) { await f.state(id) == "answered" })
        // The second send is known not to have arrived, so the third is still "the one more try".
        #expect(f.replies.attempts.count == 3)
        #expect(await f.inbox.row(id)?.attempts == 3)
        await f.stop()
    }

    @Test func aSendBegunInAWriteWhoseResultWasLostIsCountedOnce() async throws {
        // The write that stores the reply and begins its send commits, but its caller is told it failed (a
        // PostgreSQL call past its time limit) and repeats it. The send is then uncertain: it still gets its
        // one more try, because the repeated write did not count the send twice.
        let f = DispatcherFixture(maxAttempts: 5)
        await f.inbox.loseNextResult(of: .storeReplyAndBeginSend)
        f.replies.script(.uncertain, .delivered)
        let id = try await f.accept("m1", "question")
        f.start()
        #expect(await f.advance(by: .seconds(5)) { await f.state(id) == "answered" })
        #expect(await f.inbox.failuresFired == [.storeReplyAndBeginSend])
        #expect(f.replies.attempts == ["Answer to: question", "Answer to: question"])
        await f.stop()
    }

    @Test func aRetriedSendBegunInAWriteWhoseResultWasLostIsCountedOnce() async throws {
        let f = DispatcherFixture(maxAttempts: 5)
        f.replies.script(.failed(retryable: true), .uncertain, .delivered)
        let id = try await f.accept("m1", "question")
        // The first send fails for sure; its retry begins the send again in a write whose result is lost.
        await f.inbox.loseNextResult(of: .beginSend)
        f.start()
        #expect(await f.advance(by: .seconds(5)) { await f.state(id) == "answered" })
        #expect(await f.inbox.failuresFired == [.beginSend])
        #expect(f.replies.attempts.count == 3)
        await f.stop()
    }

    @Test func aClaimThatFindsTwoUncertainSendsSendsNothing() async throws {
        let f = DispatcherFixture()
        let id = try await f.accept("m1", "question")
        let lease = try await f.inbox.claim(limit: 1, owner: "dead", leaseUntil: f.clock.now.adding(.seconds(30)), maxAttempts: 3, now: f.clock.now)[0].lease
        try await f.inbox.storeReply(StoredReply(text: "stored", kind: .answer, effect: .none), for: lease, error: nil, now: f.clock.now)
        try await f.inbox.beginSend(lease, uncertainSends: 1, leaseUntil: f.clock.now.adding(.seconds(30)), now: f.clock.now)
        try await f.inbox.beginSend(lease, uncertainSends: 2, leaseUntil: f.clock.now.adding(.seconds(30)), now: f.clock.now)
        _ = try await f.inbox.reclaimRunning(now: f.clock.now, maxAttempts: 3)
        f.start()
        #expect(await eventually { await f.state(id) == "failed" })
        #expect(f.replies.attempts.isEmpty)
        #expect(await f.inbox.row(id)?.lastError?.contains("uncertain after two tries") == true)
        await f.stop()
    }

    @Test func aFailedRecordAfterASuccessfulSendIsRetriedWithoutSendingAgain() async throws {
        let f = DispatcherFixture()
        f.model.script(.answer("part one|part two"))
        let id = try await f.accept("m1", "question")
        await f.inbox.failNext(.recordDelivered, count: 2)
        await f.inbox.failNext(.finish, count: 3)
        f.start()
        #expect(await f.advance(by: .milliseconds(500)) { await f.state(id) == "answered" })
        #expect(f.replies.attempts == ["part one", "part two"])
        #expect(f.model.calls == 1)
        #expect(await f.inbox.effects.count == 1)
        await f.stop()
    }

    @Test func anUnreadableRowFailsAndItsNeighboursAreAnswered() async throws {
        let f = DispatcherFixture()
        let bad = await f.inbox.insertUnreadable(conversation: ConversationKey(rawValue: "dingtalk/bot/c1/u-c1"), now: f.clock.now)
        let sameConversation = try await f.accept("m2", "after the bad one", chat: "c1")
        let other = try await f.accept("m3", "elsewhere", chat: "c2")
        f.start()
        #expect(await eventually { await f.state(sameConversation) == "answered" && f.dispatcher.inFlightCount == 0 })
        #expect(await f.state(other) == "answered")
        #expect(await f.state(bad) == "failed")
        #expect(await f.inbox.row(bad)?.lastError?.contains("unreadable") == true)
        #expect(Set(f.replies.delivered) == ["Answer to: after the bad one", "Answer to: elsewhere"])
        await f.stop()
    }

    @Test func attemptsNeverExceedTheMaximum() async throws {
        let f = DispatcherFixture(maxAttempts: 3)
        f.model.alwaysFail(ModelError(.serverError, status: 503, detail: "overloaded"))
        let id = try await f.accept("m1", "question")
        f.start()
        #expect(await f.advance(by: .seconds(5)) { await f.state(id) == "failed" })
        #expect(f.model.calls == 3)
        #expect(await f.inbox.claims[id] == 3)
        #expect(f.replies.delivered == [BotMessages.defaults(for: .en).busy])
        #expect(await f.inbox.effects.isEmpty)
        await f.stop()
    }

    @Test func aSendThatMayHaveBeenDeliveredGetsOneMoreTryAfterADelayThenStops() async throws {
        let f = DispatcherFixture(maxAttempts: 5)
        f.replies.script(.uncertain, .uncertain)
        let id = try await f.accept("m1", "question")
        f.start()
        #expect(await eventually {
            let state = await f.state(id)
            return f.replies.attempts.count == 1 && state == "pending"
        })
        let failedAt = f.clock.now
        let row = try #require(await f.inbox.row(id))
        #expect(row.notBefore >= failedAt.adding(.seconds(30)))
        #expect(row.uncertainSends == 1)
        #expect(f.replies.attempts.count == 1)
        #expect(await f.advance(by: .seconds(5)) { await f.state(id) == "failed" })
        #expect(f.replies.attempts.count == 2)
        #expect(f.model.calls == 1)
        #expect(await f.inbox.row(id)?.lastError?.contains("uncertain") == true)
        // The one more try was recorded as the second uncertain send: a crash during it sends nothing more.
        #expect(await f.inbox.row(id)?.uncertainSends == 2)
        #expect(await f.inbox.effects.isEmpty)
        await f.stop()
    }

    @Test func aCrashWhileSendingCountsAsAnUncertainSend() async throws {
        let f = DispatcherFixture()
        let id = try await f.accept("m1", "question")
        // A previous process stored the reply, began the send and died.
        let claimed = try await f.inbox.claim(limit: 1, owner: "dead", leaseUntil: f.clock.now.adding(.seconds(30)), maxAttempts: 3, now: f.clock.now)
        let lease = claimed[0].lease
        try await f.inbox.storeReply(StoredReply(text: "stored", kind: .answer, effect: .none), for: lease, error: nil, now: f.clock.now)
        try await f.inbox.beginSend(lease, uncertainSends: 1, leaseUntil: f.clock.now.adding(.seconds(30)), now: f.clock.now)
        _ = try await f.inbox.reclaimRunning(now: f.clock.now, maxAttempts: 3)
        // The one more try is allowed (and logged as a possible duplicate); the model is not asked again.
        f.start()
        #expect(await eventually { await f.state(id) == "answered" })
        #expect(f.replies.attempts == ["stored"])
        #expect(f.model.calls == 0)
        await f.stop()
    }

    @Test func aDefiniteDeliveryFailureResumesAtTheFirstUndeliveredPart() async throws {
        let f = DispatcherFixture()
        f.model.script(.answer("one|two|three"))
        f.replies.script(.delivered, .failed(retryable: true))
        let id = try await f.accept("m1", "question")
        f.start()
        #expect(await f.advance(by: .seconds(1)) { await f.state(id) == "answered" })
        #expect(f.replies.attempts == ["one", "two", "two", "three"])
        #expect(f.replies.delivered == ["one", "two", "three"])
        #expect(await f.inbox.row(id)?.attempts == 2)
        await f.stop()
    }

    @Test func theContextGainsAnExchangeOnlyWhenItWasDelivered() async throws {
        let f = DispatcherFixture(maxAttempts: 2)
        f.replies.script(.failed(retryable: false))
        let id = try await f.accept("m1", "question")
        f.start()
        #expect(await eventually { await f.state(id) == "failed" })
        #expect(await f.inbox.effects.isEmpty)
        let next = try await f.accept("m2", "again")
        #expect(await eventually { await f.state(next) == "answered" })
        let effects = await f.inbox.effects
        #expect(effects.count == 1)
        guard case .appendExchange(let question, _) = effects.first?.1 else {
            Issue.record("expected an exchange")
            await f.stop()
            return
        }
        #expect(question.content == "again")
        await f.stop()
    }

    @Test func aRetryAfterIsHonouredAndOneTooLongGivesUpWithTheBusyReply() async throws {
        let f = DispatcherFixture(maxAttempts: 5, maxRetryWait: .seconds(600))
        f.model.script(.fail(ModelError(.rateLimited, status: 429, detail: "slow down", retryAfter: .seconds(90))))
        let id = try await f.accept("m1", "question")
        f.start()
        #expect(await eventually { await f.inbox.row(id)?.state == "pending" && f.model.calls == 1 })
        // Never earlier than asked.
        #expect(try #require(await f.inbox.row(id)).notBefore >= f.clock.now.adding(.seconds(90)))
        #expect(await f.advance(by: .seconds(10)) { await f.state(id) == "answered" })
        #expect(f.model.calls == 2)

        f.model.script(.fail(ModelError(.rateLimited, status: 429, detail: "come back tomorrow", retryAfter: .seconds(86_400))))
        let later = try await f.accept("m2", "another")
        #expect(await eventually { await f.state(later) == "failed" })
        #expect(f.model.calls == 3)
        #expect(f.replies.delivered.last == BotMessages.defaults(for: .en).busy)
        await f.stop()
    }

    @Test func drainingFinishesInFlightAnswersAndClaimsNothingNew() async throws {
        let f = DispatcherFixture()
        let gate = OneTimeEvent()
        f.model.script(.held(gate, "slow answer"))
        let first = try await f.accept("m1", "first", chat: "c1")
        f.start()
        #expect(await eventually { f.model.calls == 1 })
        f.dispatcher.beginDrain()
        let waiting = try await f.accept("m2", "second", chat: "c2")
        f.dispatcher.wake()
        gate.signal()
        await f.dispatcher.waitUntilStopped()
        #expect(await f.state(first) == "answered")
        #expect(await f.state(waiting) == "pending")
        #expect(f.model.calls == 1)
    }
}
