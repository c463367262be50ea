import ChatBridgeCore
import Foundation
import Logging
import Synchronization
import Testing

/// The live-reply path of the dispatcher and the paced updates, against twins and a manual clock: every
/// step recorded on the row, resumed rather than repeated, and the answer delivered exactly once even
/// when the live reply cannot carry it.
@Suite struct LiveReplyTests {
    static let pieces = ["The ", "answer ", "grows"]
    static let answer = pieces.joined()

    @Test func aLiveAnswerIsOpenedUpdatedFinishedAndRecordedStepByStep() async throws {
        let live = LiveTwin()
        let f = DispatcherFixture(live: live)
        f.model.script(.streamed(Self.pieces))
        let id = try await f.accept("m1", "question")
        f.start()
        #expect(await f.advance(by: .milliseconds(500)) { await f.state(id) == "answered" })
        let calls = live.calls
        #expect(calls.first == .open(resuming: false))
        #expect(calls.last == .finish(Self.answer))
        // Whole-text updates only (the first delta at once), never the final text twice.
        for call in calls.dropFirst().dropLast() {
            guard case .update(let text) = call else { Issue.record("unexpected \(call)"); continue }
            #expect(Self.answer.hasPrefix(text))
        }
        #expect(calls.filter { $0 == .finish(Self.answer) }.count == 1)
        #expect(await f.inbox.row(id)?.live == .finalized)
        #expect(f.replies.attempts.isEmpty)
        await f.stop()
    }

    @Test func anOpeningWhoseOutcomeIsUnknownIsResumedNotRepeated() async throws {
        let live = LiveTwin()
        let f = DispatcherFixture(live: live)
        live.script(.open, DeliveryError(isRetryable: true, reason: "timed out after sending"))
        let id = try await f.accept("m1", "question")
        f.start()
        #expect(await eventually { await f.inbox.row(id)?.lastError?.contains("live reply failed") == true })
        // Recorded before the call: the next attempt knows the reply may already be there.
        #expect(await f.inbox.row(id)?.live == .opening)
        #expect(await f.advance(by: .seconds(1)) { await f.state(id) == "answered" })
        #expect(live.calls == [.open(resuming: false), .open(resuming: true), .finish("Answer to: question")])
        #expect(f.model.calls == 1)
        #expect(f.replies.attempts.isEmpty)
        await f.stop()
    }

    @Test func aPreparedReferenceIsRecordedBeforeTheReplyShowsAndHandedToTheNextAttempt() async throws {
        let live = LiveTwin(references: (prepared: "card-7", shown: "card-7 in om_1"))
        let f = DispatcherFixture(live: live)
        live.script(.open, DeliveryError(isRetryable: true, reason: "timed out after sending"))
        let id = try await f.accept("m1", "question")
        f.start()
        #expect(await eventually { await f.inbox.row(id)?.lastError?.contains("live reply failed") == true })
        // The card entity exists before anything is shown: its reference is on the row with `opening`.
        #expect(await f.inbox.row(id)?.live == .opening)
        #expect(await f.inbox.row(id)?.liveReference == "card-7")
        #expect(await f.advance(by: .seconds(1)) { await f.state(id) == "answered" })
        // The resumed attempt gets the recorded card, not a new one; once shown, its own reference is kept.
        #expect(live.calls == [.prepare, .open(resuming: false), .open(resuming: true), .finish("Answer to: question")])
        #expect(f.replies.references.withLock { $0 } == [nil, "card-7"])
        #expect(await f.inbox.row(id)?.liveReference == "card-7 in om_1")
        await f.stop()
    }

    @Test func aLiveReplyThatCannotBeShownInAnyAttemptIsAnsweredAsAMessage() async throws {
        let live = LiveTwin()
        let f = DispatcherFixture(maxAttempts: 3, live: live)
        let down = DeliveryError(isRetryable: true, reason: "card API unavailable")
        live.script(.open, down, down, down)
        let id = try await f.accept("m1", "question")
        f.start()
        #expect(await f.advance(by: .seconds(1)) { await f.state(id) == "answered" })
        // The card may exist (the outcomes were unknown): it is told where the answer went.
        let follows = EngineSettings(language: .en).messages.answerFollows
        #expect(live.calls == [.open(resuming: false), .open(resuming: true), .open(resuming: true), .fail(follows)])
        #expect(f.replies.delivered == ["Answer to: question"])
        #expect(await f.inbox.row(id)?.live == .declined)
        await f.stop()
    }

    @Test func aShownReplyThatCannotBeFinishedIsSentAsAMessageOnce() async throws {
        let live = LiveTwin()
        let f = DispatcherFixture(live: live)
        live.script(.finish, DeliveryError(isRetryable: false, reason: "permission withdrawn"))
        let id = try await f.accept("m1", "question")
        f.start()
        #expect(await f.advance(by: .seconds(1)) { await f.state(id) == "answered" })
        let follows = EngineSettings(language: .en).messages.answerFollows
        #expect(live.calls == [.open(resuming: false), .finish("Answer to: question"), .fail(follows)])
        #expect(f.replies.delivered == ["Answer to: question"])
        #expect(await f.inbox.row(id)?.live == .declined)
        #expect(f.model.calls == 1)
        await f.stop()
    }

    @Test func whenTheLiveReplyUsedEveryAttemptTheMessageRouteGetsTriesOfItsOwn() async throws {
        let live = LiveTwin()
        let f = DispatcherFixture(maxAttempts: 2, live: live)
        live.script(.finish, DeliveryError(isRetryable: true, reason: "card API down"), DeliveryError(isRetryable: true, reason: "card API down"))
        // The first message send after the card gave up fails too, but it may be tried again.
        f.replies.script(.failed(retryable: true))
        let id = try await f.accept("m1", "question")
        f.start()
        #expect(await f.advance(by: .seconds(1)) { await f.state(id) == "answered" })
        #expect(f.replies.attempts == ["Answer to: question", "Answer to: question"])
        #expect(f.replies.delivered == ["Answer to: question"])
        #expect(await f.inbox.row(id)?.live == .declined)
        await f.stop()
    }

    @Test func aFinishedLiveReplyIsNotFinishedAgainByTheNextAttempt() async throws {
        let live = LiveTwin()
        let f = DispatcherFixture(live: live)
        let id = try await f.accept("m1", "question")
        // The claim is lost right after the live reply showed the final text, before the row was done.
        await f.inbox.stealAfter(.finish)
        f.start()
        #expect(await eventually { await f.inbox.refusedWrites == [.finish] })
        #expect(await f.inbox.row(id)?.live == .finalized)
        #expect(await f.advance(by: .seconds(11)) { await f.state(id) == "answered" })
        #expect(live.calls == [.open(resuming: false), .finish("Answer to: question")])
        #expect(f.replies.attempts.isEmpty)
        await f.stop()
    }

    @Test func liveRepliesOfMessagesGivenUpAtStartAreMarkedFailed() async throws {
        let live = LiveTwin()
        let f = DispatcherFixture(live: live)
        f.dispatcher.failLiveRepliesWhenRunning([LiveReplyAddress(message: textMessage("m1", "question"))])
        f.start()
        let failed = EngineSettings(language: .en).messages.failed
        #expect(await eventually { live.calls == [.fail(failed)] })
        await f.stop()
    }

    @Test func aMessageGivenUpByTheReaperHasItsLiveReplyMarkedFailed() async throws {
        let live = LiveTwin()
        let f = DispatcherFixture(maxAttempts: 1, live: live)
        let id = try await f.accept("m1", "question")
        // Another worker claimed it, showed its card and died on its last allowed attempt.
        let item = try await f.claimByDeadWorker(maxAttempts: 1)
        try await f.inbox.recordLive(item.lease, state: .opened, reference: nil, now: f.clock.now)
        f.start()
        // This dispatcher's reaper finds the expired claim, gives the message up and marks its card failed.
        #expect(await f.advance(by: .seconds(11)) { await f.state(id) == "failed" })
        let failed = EngineSettings(language: .en).messages.failed
        #expect(await eventually { live.calls == [.fail(failed)] })
        await f.stop()
    }

    @Test func aGivenUpMessageWhoseReplyWasStoredHasItsLiveReplyFinishedWithItNotFailed() async throws {
        let live = LiveTwin()
        let f = DispatcherFixture(maxAttempts: 1, live: live)
        let id = try await f.accept("m1", "question")
        // Another worker showed the card, stored the answer (and may have finished the card) and died.
        let item = try await f.claimByDeadWorker(maxAttempts: 1)
        try await f.inbox.recordLive(item.lease, state: .opened, reference: nil, now: f.clock.now)
        try await f.inbox.storeReply(StoredReply(text: "the stored answer", kind: .answer, effect: .none), for: item.lease, error: nil, now: f.clock.now)
        f.start()
        #expect(await f.advance(by: .seconds(11)) { await f.state(id) == "failed" })
        // The card may already show the answer: it is completed with it, never overwritten with a failure.
        #expect(await eventually { live.calls == [.finish("the stored answer")] })
        await f.stop()
    }

    @Test func aLiveReplyAnEarlierAttemptBeganIsContinuedAfterLiveRepliesWereSwitchedOff() async throws {
        let live = LiveTwin()
        let f = DispatcherFixture(live: live)
        let id = try await f.accept("m1", "question")
        let item = try await f.claimByDeadWorker(maxAttempts: 5)
        try await f.inbox.recordLive(item.lease, state: .opened, reference: nil, now: f.clock.now)
        // Cards were switched off before the restart: the card already showing is still the one finished.
        live.setAvailability(.begunOnly)
        f.start()
        #expect(await f.advance(by: .seconds(11)) { await f.state(id) == "answered" })
        #expect(live.calls == [.finish("Answer to: question")])
        #expect(f.replies.attempts.isEmpty, "the answer is not sent again as a message")
        // A new message gets no live reply now: it is answered with a message.
        let fresh = try await f.accept("m2", "another", chat: "c2")
        #expect(await f.advance(by: .seconds(1)) { await f.state(fresh) == "answered" })
        #expect(live.calls == [.finish("Answer to: question")])
        #expect(f.replies.delivered == ["Answer to: another"])
        await f.stop()
    }

    @Test func aFinalizedLiveReplyIsOnlyRecordedEvenWithoutALiveChannel() async throws {
        let live = LiveTwin()
        let f = DispatcherFixture(live: live)
        let id = try await f.accept("m1", "question")
        let item = try await f.claimByDeadWorker(maxAttempts: 5)
        try await f.inbox.storeReply(StoredReply(text: "the stored answer", kind: .answer, effect: .none), for: item.lease, error: nil, now: f.clock.now)
        try await f.inbox.recordLive(item.lease, state: .finalized, reference: nil, now: f.clock.now)
        // The card shows the final text; the worker died before recording the row done.
        live.setAvailability(.off)
        f.start()
        #expect(await f.advance(by: .seconds(11)) { await f.state(id) == "answered" })
        #expect(live.calls.isEmpty)
        #expect(f.replies.attempts.isEmpty, "the answer is not sent again as a message")
        await f.stop()
    }

    @Test func aModelThatFailsForGoodShowsTheErrorInTheLiveReply() async throws {
        let live = LiveTwin()
        let f = DispatcherFixture(live: live)
        f.model.alwaysFail(ModelError(.invalidAPIKey, detail: "bad key"))
        let id = try await f.accept("m1", "question")
        f.start()
        #expect(await f.advance(by: .seconds(1)) { await f.state(id) == "failed" })
        let text = EngineSettings(language: .en).messages.reply(for: ModelError(.invalidAPIKey, detail: ""))
        #expect(live.calls == [.open(resuming: false), .fail(text)])
        #expect(f.replies.attempts.isEmpty)
        await f.stop()
    }

    @Test func aMessageAlreadySentAsAMessageIsNotRestartedAsALiveReply() async throws {
        let live = LiveTwin()
        let f = DispatcherFixture(live: live)
        live.script(.open, DeliveryError(isRetryable: false, reason: "no card permission"))
        f.model.script(.answer("one|two"))
        f.replies.script(.delivered, .failed(retryable: true))
        let id = try await f.accept("m1", "question")
        f.start()
        #expect(await f.advance(by: .seconds(1)) { await f.state(id) == "answered" })
        // Declined once (nothing was shown, so nothing to tidy up); the retry continues with the second part
        // and never opens a live reply again.
        #expect(live.calls == [.open(resuming: false)])
        #expect(f.replies.delivered == ["one", "two"])
        await f.stop()
    }
}

/// ``LiveUpdates`` on a manual clock: the pace is the clock's, not the machine's.
@Suite struct LiveUpdatesTests {
    final class Recorder: LiveReply, @unchecked Sendable {
        private let state = Mutex<[String]>([])
        var updates: [String] { state.withLock { $0 } }
        func open(resuming: Bool) async throws {}
        func update(_ text: String) async throws { state.withLock { $0.append(text) } }
        func finish(_ text: String) async throws {}
        func fail(_ text: String) async throws {}
    }

    @Test func updatesCarryTheWholeTextAtMostOncePerInterval() async throws {
        let clock = ManualClock()
        let reply = Recorder()
        let updates = LiveUpdates(reply: reply, interval: .milliseconds(500), clock: clock, logger: Logger(label: "t"))
        updates.append("a")
        // The first delta is shown at once, then the pause begins.
        await clock.waitForSleep { $0 == .milliseconds(500) }
        #expect(reply.updates == ["a"])
        for piece in ["b", "c", "d\n"] { updates.append(piece) }
        clock.advance(by: .milliseconds(499))
        #expect(reply.updates == ["a"])
        clock.advance(by: .milliseconds(1))
        // Everything that arrived during the pause goes out as one update of the newest whole text,
        // without the trailing newline.
        await clock.waitForSleep { $0 == .milliseconds(500) }
        #expect(reply.updates == ["a", "abcd"])
        // Closing waits out the pause, so the final text that follows keeps the pace too.
        updates.append("e")
        let closed = OneTimeEvent()
        Task {
            await updates.close()
            closed.signal()
        }
        #expect(clock.pendingSleeps == [.milliseconds(500)])
        clock.advance(by: .milliseconds(500))
        await closed.wait()
        #expect(reply.updates == ["a", "abcd"])
        #expect(updates.updates == 2)
    }

    @Test func nothingNewMeansNoUpdate() async throws {
        let clock = ManualClock()
        let reply = Recorder()
        let updates = LiveUpdates(reply: reply, interval: .milliseconds(100), clock: clock, logger: Logger(label: "t"))
        updates.append("  ")
        updates.append("\n")
        await updates.close()
        #expect(reply.updates.isEmpty)
    }
}
