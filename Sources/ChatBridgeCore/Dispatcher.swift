import Foundation
import Logging
import Metrics
import Synchronization

/// How the dispatcher runs answers.
public struct DispatcherSettings: Sendable, Equatable {
    /// Answers in flight at once, across all conversations.
    public var concurrency: Int
    public var retry: RetryPolicy
    /// How long a claim lasts before another worker may take the message over. Renewed every third of it.
    public var lease: Duration
    /// How often to look for ready messages when nothing wakes the dispatcher.
    public var pollInterval: Duration
    /// The wait before the one more try of a send whose outcome is unknown (it may have been delivered).
    public var uncertainRetryDelay: Duration
    /// The first and the longest pause between tries of a bookkeeping write after a successful send.
    public var bookkeepingBackoff: ClosedRange<Duration>

    public init(
        concurrency: Int = 64, retry: RetryPolicy = .init(), lease: Duration = .seconds(30), pollInterval: Duration = .seconds(1),
        uncertainRetryDelay: Duration = .seconds(30), bookkeepingBackoff: ClosedRange<Duration> = .milliseconds(100)...(.seconds(5))
    ) {
        self.concurrency = concurrency
        self.retry = retry
        self.lease = lease
        self.pollInterval = pollInterval
        self.uncertainRetryDelay = uncertainRetryDelay
        self.bookkeepingBackoff = bookkeepingBackoff
    }
}

/// Claims ready messages from the inbox and answers them: at most one per conversation at a time (so
/// answers keep their order), up to `concurrency` in all, with retries and a final error reply.
///
/// Exactly once: every claim has its own lease token and every write on the row is conditional on it
/// (``LeaseLost`` stops the attempt before it sends anything more). Each send is immediately preceded by
/// ``Inbox/beginSend(_:uncertainSends:leaseUntil:now:)``, so a send whose outcome is unknown is known to be unknown;
/// after a send succeeded only the bookkeeping is retried, never the send. `docs/architecture.md` walks
/// through what a crash at each step leaves behind.
public final class Dispatcher: Sendable {
    private let inbox: any Inbox
    private let engine: Engine
    private let replies: any ReplyChannel
    private let settings: DispatcherSettings
    private let owner: String
    private let clock: any WallClock
    private let logger: Logger
    private let signal = WakeSignal()
    private let state = Mutex(State())
    private let random: @Sendable () -> Double
    private let stopped = OneTimeEvent()

    private struct State {
        var draining = false
        var abandoning = false
        /// Claims being worked on (one row can appear twice: an attempt that lost its lease is still finishing).
        var inFlight: Set<Lease> = []
        /// A claim failed: it may have committed all the same (a call given up after it did), leaving rows
        /// claimed by this process that nobody works on.
        var claimsMayBeLost = false
        /// The earliest retry this dispatcher scheduled, so it wakes in time without asking the database.
        var nextRetry: Date?
        /// Live replies to mark failed once running (messages the previous run gave up).
        var liveRepliesToFail: [LiveReplyAddress] = []
    }

    private let answered: Counter
    private let failed: Counter
    private let retried: Counter
    private let leasesLost: Counter
    private let uncertainSends: Counter
    private let resends: Counter
    private let inFlightGauge: Gauge
    private let answerTimer: Metrics.Timer

    public init(
        inbox: any Inbox, engine: Engine, replies: any ReplyChannel, settings: DispatcherSettings, owner: String,
        clock: any WallClock, metrics: any MetricsFactory = MetricsSystem.factory, logger: Logger,
        random: @escaping @Sendable () -> Double = { Double.random(in: 0..<1) }
    ) {
        self.inbox = inbox
        self.engine = engine
        self.replies = replies
        self.settings = settings
        self.owner = owner
        self.clock = clock
        self.logger = logger
        self.random = random
        answered = Counter(label: "chatbridge_messages_answered_total", factory: metrics)
        failed = Counter(label: "chatbridge_messages_failed_total", factory: metrics)
        retried = Counter(label: "chatbridge_messages_retried_total", factory: metrics)
        leasesLost = Counter(label: "chatbridge_leases_lost_total", factory: metrics)
        uncertainSends = Counter(label: "chatbridge_replies_uncertain_total", factory: metrics)
        resends = Counter(label: "chatbridge_replies_resent_total", factory: metrics)
        inFlightGauge = Gauge(label: "chatbridge_answers_in_flight", factory: metrics)
        answerTimer = Metrics.Timer(label: "chatbridge_answer_seconds", factory: metrics)
    }

    /// Tells the dispatcher that new work may be ready.
    public func wake() { signal.signal() }

    /// Stops claiming new messages; `run()` returns once the answers in flight are done.
    public func beginDrain() {
        state.withLock { $0.draining = true }
        signal.signal()
    }

    /// Stops at once: answers in flight are cancelled and resume at the next start (or after their lease).
    public func abandon() {
        state.withLock {
            $0.draining = true
            $0.abandoning = true
        }
        signal.signal()
    }

    /// Marks the live replies of these given-up messages failed once `run()` starts (the previous run's
    /// give-ups, found at start before the dispatcher runs).
    public func failLiveRepliesWhenRunning(_ messages: [LiveReplyAddress]) {
        state.withLock { $0.liveRepliesToFail += messages }
    }

    /// Returns once `run()` has returned.
    public func waitUntilStopped() async { await stopped.wait() }

    public var inFlightCount: Int { state.withLock { $0.inFlight.count } }

    /// Runs until drained, abandoned or cancelled.
    public func run() async {
        defer { stopped.signal() }
        await withDiscardingTaskGroup { group in
            group.addTask { await self.renewLeasesRegularly() }
            group.addTask { await self.releaseExpiredLeasesRegularly() }
            let tidy = state.withLock { state in
                defer { state.liveRepliesToFail = [] }
                return state.liveRepliesToFail
            }
            if !tidy.isEmpty { group.addTask { await self.failLiveReplies(of: tidy) } }
            if let next = try? await inbox.nextWakeup(now: clock.now) { noteRetry(at: next) }
            while !Task.isCancelled {
                let (draining, busy) = state.withLock { ($0.draining, $0.inFlight.count) }
                if draining { break }
                let free = settings.concurrency - busy
                let limit = min(free, 512)
                var claimed: [ClaimedRow] = []
                if free > 0 {
                    if state.withLock({ $0.claimsMayBeLost }) { await releaseLostClaims() }
                    do {
                        let now = clock.now
                        claimed = try await inbox.claim(
                            limit: limit, owner: owner, leaseUntil: now.adding(settings.lease),
                            maxAttempts: settings.retry.maxAttempts, now: now)
                    } catch {
                        state.withLock { $0.claimsMayBeLost = true }
                        logger.error("could not claim messages", metadata: ["error": "\(error)"])
                        await signal.wait(timeout: settings.pollInterval, clock: clock)
                        continue
                    }
                }
                for row in claimed {
                    switch row {
                    case .unreadable(let lease, let reason):
                        await failUnreadable(lease, reason: reason)
                    case .ready(let item):
                        state.withLock { _ = $0.inFlight.insert(item.lease) }
                        inFlightGauge.record(inFlightCount)
                        group.addTask {
                            await self.process(item)
                            self.state.withLock { _ = $0.inFlight.remove(item.lease) }
                            self.inFlightGauge.record(self.inFlightCount)
                            self.signal.signal()
                        }
                    }
                }
                if free > 0, claimed.count == limit { continue }
                await signal.wait(timeout: nextWait(), clock: clock)
            }
            // Drain: wait for the answers in flight (or cancel them when abandoning), then stop maintenance.
            while inFlightCount > 0, !Task.isCancelled, !state.withLock({ $0.abandoning }) {
                await signal.wait(timeout: settings.pollInterval, clock: clock)
            }
            group.cancelAll()
        }
    }

    /// Returns the rows a failed claim may have claimed all the same to pending, so they are answered now
    /// rather than after their lease (they were never worked on; each gets its attempt back).
    private func releaseLostClaims() async {
        let keeping = state.withLock { $0.inFlight }
        do {
            let released = try await inbox.releaseOwnClaims(owner: owner, keeping: keeping, now: clock.now)
            state.withLock { $0.claimsMayBeLost = false }
            if released > 0 {
                logger.notice("returned claims whose result was lost to pending", metadata: ["count": "\(released)"])
            }
        } catch {
            logger.error("could not return claims whose result may have been lost; their leases will expire", metadata: ["error": "\(error)"])
        }
    }

    private func noteRetry(at date: Date) {
        state.withLock { state in
            if state.nextRetry.map({ date < $0 }) ?? true { state.nextRetry = date }
        }
    }

    /// How long to sleep when nothing is ready: until the earliest scheduled retry, at most the poll interval.
    private func nextWait() -> Duration {
        let now = clock.now
        let next = state.withLock { state -> Date? in
            if let retry = state.nextRetry, retry <= now { state.nextRetry = nil }
            return state.nextRetry
        }
        guard let next else { return settings.pollInterval }
        return min(settings.pollInterval, .between(now, next) + .milliseconds(1))
    }

    // MARK: Leases

    /// Keeps the claims of answers in flight alive. Renewal runs ahead of background work in the store,
    /// so a burst of callbacks cannot starve it past the lease.
    private func renewLeasesRegularly() async {
        while !Task.isCancelled {
            do { try await clock.sleep(for: settings.lease / 3) } catch { return }
            let leases = state.withLock { Array($0.inFlight) }
            guard !leases.isEmpty else { continue }
            do {
                let now = clock.now
                let renewed = try await inbox.renewLeases(leases, until: now.adding(settings.lease), now: now)
                if renewed < leases.count {
                    // Usually answers that finished meanwhile; an attempt that truly lost its claim stops at its next write.
                    logger.debug("some claims were not renewed", metadata: ["renewed": "\(renewed)", "held": "\(leases.count)"])
                }
            } catch {
                logger.warning("could not renew leases", metadata: ["error": "\(error)"])
            }
        }
    }

    /// Returns messages of workers that died (or lost touch) to the queue.
    private func releaseExpiredLeasesRegularly() async {
        while !Task.isCancelled {
            do { try await clock.sleep(for: settings.lease / 3) } catch { return }
            do {
                // Never our own answers in flight: their claims are alive even when a renewal was missed.
                let keeping = state.withLock { $0.inFlight }
                let released = try await inbox.releaseExpiredLeases(now: clock.now, maxAttempts: settings.retry.maxAttempts, keeping: keeping)
                if released.gaveUp > 0 {
                    failed.increment(by: released.gaveUp)
                    logger.error("gave up on messages whose last attempt was interrupted", metadata: ["count": "\(released.gaveUp)"])
                    // Card calls can be slow (rate limits, timeouts): the reaper does not wait for them.
                    if !released.gaveUpLive.isEmpty { Task { [gaveUpLive = released.gaveUpLive] in await self.failLiveReplies(of: gaveUpLive) } }
                }
                if released.requeued > 0 { signal.signal() }
            } catch {
                logger.warning("could not release expired leases", metadata: ["error": "\(error)"])
            }
        }
    }

    /// Messages given up while their live reply may be showing: each reply is completed with the reply
    /// stored for the message (it may show it already: an attempt finished the card and was interrupted
    /// before recording it), or told the answer failed (one try each), so no card is left "thinking".
    /// Also called at start for the previous run's give-ups.
    public func failLiveReplies(of addresses: [LiveReplyAddress]) async {
        let failedText = engine.settings.messages.failed
        await withDiscardingTaskGroup { group in
            for address in addresses {
                let message = address.message
                guard let live = replies.liveReply(to: message, reference: address.reference, begun: true) else { continue }
                group.addTask {
                    do {
                        switch address.reply?.kind {
                        case .answer: try await live.finish(address.reply?.text ?? failedText)
                        case .error: try await live.fail(address.reply?.text ?? failedText)
                        case nil: try await live.fail(failedText)
                        }
                    } catch {
                        self.logger.warning("could not mark a given-up message's live reply failed", metadata: ["message_id": "\(message.messageID)", "error": "\(error)"])
                    }
                }
            }
        }
    }

    private func failUnreadable(_ lease: Lease, reason: String) async {
        logger.error("a stored message cannot be read; marking it failed", metadata: ["inbox_id": "\(lease.id)", "error": "\(reason)"])
        do {
            try await inbox.markFailed(lease, error: "unreadable: \(reason)", lastSendFailed: false, now: clock.now)
            failed.increment()
        } catch {
            logger.error("could not mark an unreadable message failed; it is retried after its lease", metadata: ["inbox_id": "\(lease.id)", "error": "\(error)"])
        }
    }

    // MARK: One attempt

    /// Answers one claimed message: the stored reply if an earlier attempt made one, else a new one.
    func process(_ item: InboxItem) async {
        let metadata: Logger.Metadata = [
            "message_id": "\(item.message.messageID)", "conversation": "\(item.conversation)",
            "platform": "\(item.message.platform)", "attempt": "\(item.attempts)",
        ]
        let started = clock.now
        do {
            // What to do is decided before anything shows: a command, a refusal or a limit is answered with
            // a message (no card), a group the bot may not serve gets nothing.
            var plan: Plan?
            if item.reply == nil && item.live == .none {
                guard let planned = try await self.plan(for: item, metadata: metadata) else { return }
                if case .silent(let reason) = planned {
                    try await recordFinished(StoredReply(text: "", kind: .answer, effect: .none), for: item, metadata: metadata)
                    logger.debug("not answered", metadata: metadata.merging(["why": "\(reason)"]) { $1 })
                    return
                }
                plan = planned
            }
            // A message already (partly) sent as whole messages stays on that path: a card would repeat it.
            let sentWhole = item.live == .none && (item.deliveredParts > 0 || item.uncertainSends > 0)
            // A live reply an earlier attempt began is continued whatever the card settings are now.
            let begun = item.live == .opening || item.live == .opened || item.live == .finalized
            // A reply stored by an earlier attempt without a live reply (a command, a refusal, or an answer on
            // the whole-message path) stays a whole message.
            let wantsLive = begun || (item.reply == nil && (plan?.asksModel ?? true))
            let live = item.live == .declined || sentWhole || !wantsLive
                ? nil : replies.liveReply(to: item.message, reference: item.liveReference, begun: begun)
            let finished: StoredReply?
            if item.live == .finalized, let stored = item.reply {
                // The live reply shows the final text already: only recording it is left.
                try await recordFinished(stored, for: item, metadata: metadata)
                finished = stored
            } else if let live {
                finished = try await answerLive(item, live: live, plan: plan, metadata: metadata)
            } else if let made = try await reply(for: item, plan: plan, metadata: metadata, store: false) {
                finished = try await deliver(made.reply, for: item, metadata: metadata, storing: made.unstored) ? made.reply : nil
            } else {
                finished = nil
            }
            if let finished {
                switch finished.kind {
                case .answer: answered.increment()
                case .error: failed.increment()
                }
                answerTimer.recordNanoseconds(Duration.between(started, clock.now).nanoseconds)
                logger.debug("answered", metadata: metadata)
            }
        } catch let error as LeaseLost {
            leasesLost.increment()
            logger.warning("lost the claim on a message; another attempt answers it, this one stops", metadata: metadata.merging(["error": "\(error)"]) { $1 })
        } catch where Task.isCancelled || error is CancellationError {
            logger.info("answer abandoned at shutdown; it resumes at the next start", metadata: metadata)
        } catch {
            // Not expected (records are retried in place): nothing more is sent; the claim runs out and the
            // message is tried again.
            logger.error("could not answer; the message is retried after its lease", metadata: metadata.merging(["error": "\(error)"]) { $1 })
        }
    }

    /// The reply to deliver: the stored one, a new answer, or the error reply when the model failed for
    /// good. Nil when a retry was scheduled instead.
    private func reply(
        for item: InboxItem, plan: Plan?, metadata: Logger.Metadata, onDelta: @escaping @Sendable (String) async -> Void = { _ in }
    ) async throws -> StoredReply? {
        try await reply(for: item, plan: plan, metadata: metadata, store: true, onDelta: onDelta)?.reply
    }

    /// A reply made (or found stored); `unstored` when it is new and not stored yet.
    private struct MadeReply {
        var reply: StoredReply
        var unstored: UnstoredReply?
    }

    /// A new reply to be stored with the error reason (if any) that made it.
    private struct UnstoredReply {
        var reason: String?
    }

    /// As above; with `store` false a new reply is returned unstored, for `deliver` to store with its first
    /// send.
    private func reply(
        for item: InboxItem, plan: Plan?, metadata: Logger.Metadata, store: Bool,
        onDelta: @escaping @Sendable (String) async -> Void = { _ in }
    ) async throws -> MadeReply? {
        if let stored = item.reply { return MadeReply(reply: stored) }
        let reply: StoredReply
        var reason: String?
        do {
            let resolution: Resolution
            let planned: Plan
            if let plan { planned = plan } else { planned = try await engine.plan(item.message) }
            switch planned {
            case .reply(let immediate): resolution = immediate
            // Refused since an earlier attempt began a live reply for it (the rules were reloaded).
            case .silent: resolution = Resolution(text: engine.texts.accessDenied, effect: .none)
            case .ask(let question): resolution = try await engine.answer(question, onDelta: onDelta)
            }
            reply = StoredReply(text: resolution.text, kind: .answer, effect: resolution.effect)
        } catch let error where !(error is CancellationError) && !Task.isCancelled {
            guard try await handleAnswerFailure(error, item: item, metadata: metadata) else { return nil }
            reply = StoredReply(text: engine.settings.messages.reply(for: error), kind: .error, effect: .none)
            reason = "\(error)"
        }
        guard store else { return MadeReply(reply: reply, unstored: UnstoredReply(reason: reason)) }
        try await storeReply(reply, reason: reason, for: item, metadata: metadata)
        return MadeReply(reply: reply)
    }

    /// Stores a new reply on its own (with the error reason that made it, if any).
    private func storeReply(_ reply: StoredReply, reason: String?, for item: InboxItem, metadata: Logger.Metadata) async throws {
        let now = clock.now
        try await record("the reply", afterSend: false, metadata: metadata) { [inbox] in
            try await inbox.storeReply(reply, for: item.lease, error: reason, now: now)
        }
    }

    /// The engine's plan for a message; nil when deciding failed and a retry was scheduled (or, out of
    /// attempts, the error reply was stored and sent as such).
    private func plan(for item: InboxItem, metadata: Logger.Metadata) async throws -> Plan? {
        do {
            return try await engine.plan(item.message)
        } catch let error where !(error is CancellationError) && !Task.isCancelled {
            // Deciding fails only when the database does; the model path has the same retry rules.
            guard try await handleAnswerFailure(error, item: item, metadata: metadata) else { return nil }
            let reply = StoredReply(text: engine.settings.messages.reply(for: error), kind: .error, effect: .none)
            try await storeReply(reply, reason: "\(error)", for: item, metadata: metadata)
            if try await deliver(reply, for: item, metadata: metadata) { failed.increment() }
            return nil
        }
    }

    /// Schedules a retry for a failed answer and returns false, or returns true when the user is to be told
    /// it failed for good.
    private func handleAnswerFailure(_ error: any Error, item: InboxItem, metadata: Logger.Metadata) async throws -> Bool {
        let (retryable, retryAfter) = Self.classify(error)
        let decision = settings.retry.decision(afterAttempt: item.attempts, retryable: retryable, retryAfter: retryAfter, random: random())
        if case .retry(let delay) = decision {
            try await scheduleRetry(item, after: delay, error: "\(error)", lastSendFailed: false, metadata: metadata)
            return false
        }
        logger.error("answer failed for good; telling the user", metadata: metadata.merging(["error": "\(error)", "why": "\(decision)"]) { $1 })
        return true
    }

    /// Sends the parts not yet delivered. Returns true when the whole reply was delivered and recorded.
    /// With `storing`, the reply is new and not stored yet: it is stored in the same write that records the
    /// start of the first send.
    private func deliver(_ reply: StoredReply, for item: InboxItem, metadata: Logger.Metadata, storing: UnstoredReply? = nil) async throws -> Bool {
        let parts = replies.parts(of: reply.text, replyingTo: item.message)
        var uncertain = item.uncertainSends
        var index = min(item.deliveredParts, parts.count)
        var toStore = storing
        if let pending = toStore, index >= parts.count || uncertain >= 2 {
            // No send follows at once: the reply is stored on its own.
            try await storeReply(reply, reason: pending.reason, for: item, metadata: metadata)
            toStore = nil
        }
        while index < parts.count {
            var partMetadata = metadata
            partMetadata["part"] = "\(index + 1)/\(parts.count)"
            if uncertain >= 2 {
                logger.error("not sending a reply part again: two sends of it have an unknown outcome", metadata: partMetadata)
                try await inbox.markFailed(
                    item.lease, error: "delivery of part \(index + 1) of \(parts.count) is uncertain after two tries; not sent again",
                    lastSendFailed: false, now: clock.now)
                failed.increment()
                return false
            }
            if uncertain == 1 {
                resends.increment()
                logger.warning("sending a reply part again that may already have been delivered; it may appear twice", metadata: partMetadata)
            }
            let now = clock.now
            if let pending = toStore {
                try await record("the reply and the start of its send", afterSend: false, metadata: partMetadata) { [inbox, lease = settings.lease, uncertain] in
                    try await inbox.storeReply(
                        reply, for: item.lease, error: pending.reason, beginningSendUntil: now.adding(lease), uncertainSends: uncertain + 1, now: now)
                }
                toStore = nil
            } else {
                try await record("the start of a send", afterSend: false, metadata: partMetadata) { [inbox, lease = settings.lease, uncertain] in
                    try await inbox.beginSend(item.lease, uncertainSends: uncertain + 1, leaseUntil: now.adding(lease), now: now)
                }
            }
            do {
                try await replies.deliver(part: parts[index], replyingTo: item.message)
            } catch where Task.isCancelled || error is CancellationError {
                throw CancellationError()
            } catch {
                let failure = error as? DeliveryError ?? .uncertain("\(error)")
                try await handleDeliveryFailure(failure, item: item, earlierUncertainSends: uncertain, metadata: partMetadata)
                return false
            }
            uncertain = 0
            index += 1
            if index < parts.count {
                let delivered = index
                try await record("the delivered parts", afterSend: true, metadata: partMetadata) {
                    try await self.inbox.recordDelivered(item.lease, parts: delivered, now: self.clock.now)
                }
            }
        }
        try await recordFinished(reply, for: item, metadata: metadata)
        return true
    }

    /// The whole reply was delivered: marks the row done and applies the effect (without it, when that
    /// keeps failing for a whole lease).
    private func recordFinished(_ reply: StoredReply, for item: InboxItem, metadata: Logger.Metadata) async throws {
        var withoutEffect = reply
        withoutEffect.effect = .none
        let inbox = self.inbox
        let clock = self.clock
        var finishWithoutEffect: (@Sendable () async throws -> Void)?
        if reply.effect != .none {
            finishWithoutEffect = { @Sendable [withoutEffect] in
                // The context then misses this exchange, which beats a delivered answer that is never recorded.
                try await inbox.finish(item.lease, reply: withoutEffect, conversation: item.conversation, now: clock.now)
            }
        }
        try await record("the delivered reply", afterSend: true, metadata: metadata, fallback: finishWithoutEffect) {
            try await inbox.finish(item.lease, reply: reply, conversation: item.conversation, now: clock.now)
        }
    }

    // MARK: Live replies

    /// Answers into a live reply: shows it, streams the model's text into it, stores the reply, finishes
    /// the live reply with the final text and records the row done. Each step is recorded on the row
    /// (``LiveReplyState``): `opening` before the reply is shown (so an attempt after a crash looks for it
    /// before showing it), `opened` once it is, `finalized` once it shows the final text. Returns the
    /// finished reply, or nil when a retry was scheduled or the message given up.
    ///
    /// A live reply the platform refuses before it is shown is recorded as declined and the message is
    /// answered with whole messages instead, exactly once like any other; so is one that cannot be
    /// completed for good (the whole answer then arrives as a message).
    private func answerLive(_ item: InboxItem, live: any LiveReply, plan: Plan?, metadata: Logger.Metadata) async throws -> StoredReply? {
        var item = item
        if item.live == .none || item.live == .opening {
            let resuming = item.live == .opening
            if !resuming {
                // What the platform needs first (a card entity) is made and recorded before anything shows.
                var reference: String?
                let prepared = try await liveCall(item: item, live: live, mayBeShowing: false, metadata: metadata) { reference = try await live.prepare() }
                if case .ended(let result) = prepared {
                    return result
                }
                let now = clock.now
                try await record("the live reply about to be shown", afterSend: false, metadata: metadata) { [inbox, lease = item.lease, reference] in
                    try await inbox.recordLive(lease, state: .opening, reference: reference, now: now)
                }
                item.live = .opening
            }
            // Refused now, the reply may still be showing from the earlier attempt that began opening it.
            let step = try await liveCall(item: item, live: live, mayBeShowing: resuming, metadata: metadata) { try await live.open(resuming: resuming) }
            if case .ended(let result) = step {
                return result
            }
            let now = clock.now
            let reference = live.reference
            try await record("the shown live reply", afterSend: true, metadata: metadata) { [inbox, lease = item.lease] in
                try await inbox.recordLive(lease, state: .opened, reference: reference, now: now)
            }
            item.live = .opened
        }
        let reply: StoredReply
        if let stored = item.reply {
            reply = stored
        } else {
            let updates = LiveUpdates(reply: live, interval: live.updateInterval, clock: clock, logger: logger)
            let made: StoredReply?
            do {
                made = try await self.reply(for: item, plan: plan, metadata: metadata) { delta in updates.append(delta) }
            } catch {
                await updates.close()
                throw error
            }
            await updates.close()
            guard let made else { return nil }
            reply = made
            item.reply = made
        }
        if item.live != .finalized {
            let finished = try await liveCall(item: item, live: live, mayBeShowing: true, metadata: metadata) {
                switch reply.kind {
                case .answer: try await live.finish(reply.text)
                case .error: try await live.fail(reply.text)
                }
            }
            if case .ended(let result) = finished { return result }
            let now = clock.now
            try await record("the finished live reply", afterSend: true, metadata: metadata) { [inbox, lease = item.lease] in
                try await inbox.recordLive(lease, state: .finalized, reference: nil, now: now)
            }
        }
        try await recordFinished(reply, for: item, metadata: metadata)
        return reply
    }

    private enum LiveStep {
        case succeeded
        /// The attempt ended: answered with whole messages instead, or a retry scheduled / given up (nil).
        case ended(StoredReply?)
    }

    /// Makes one live-reply call. A permanent failure answers the message with whole messages; any other
    /// failure is retried by the policy.
    private func liveCall(
        item: InboxItem, live: any LiveReply, mayBeShowing: Bool, metadata: Logger.Metadata, _ call: () async throws -> Void
    ) async throws -> LiveStep {
        do {
            try await call()
            return .succeeded
        } catch where Task.isCancelled || error is CancellationError {
            throw CancellationError()
        } catch {
            let failure = error as? DeliveryError ?? DeliveryError(isRetryable: true, reason: "\(error)")
            if !failure.isRetryable {
                return .ended(try await answerWhole(item, live: mayBeShowing ? live : nil, because: failure, metadata: metadata))
            }
            return .ended(try await handleLiveFailure(failure, item: item, live: live, metadata: metadata))
        }
    }

    /// The live reply cannot carry this message's answer (the platform refused it, or it could not be
    /// completed for good): recorded, then answered with whole messages (the reply already stored, if any,
    /// is the one sent).
    /// `showing`: the live reply, when it may be showing (half an answer, or "thinking").
    private func answerWhole(
        _ item: InboxItem, live showing: (any LiveReply)?, because failure: DeliveryError, metadata: Logger.Metadata
    ) async throws -> StoredReply? {
        if item.live == .opened {
            logger.error(
                "the live reply was shown but cannot be completed; sending the whole answer as a message", metadata: metadata.merging(["error": "\(failure)"]) { $1 })
        } else {
            logger.warning("no live reply for this message; answering with whole messages", metadata: metadata.merging(["error": "\(failure)"]) { $1 })
        }
        if let showing {
            // One try to say where the answer went, so the live reply is not left looking unfinished. It may
            // well fail the same way; that changes nothing.
            try? await showing.fail(engine.settings.messages.answerFollows)
        }
        let now = clock.now
        try await record("the refused live reply", afterSend: false, metadata: metadata) { [inbox] in
            try await inbox.recordLive(item.lease, state: .declined, reference: nil, now: now)
        }
        var item = item
        item.live = .declined
        // The whole-message route has tries of its own (the store counts this attempt as its first).
        item.attempts = 1
        guard let reply = try await reply(for: item, plan: nil, metadata: metadata) else { return nil }
        return try await deliver(reply, for: item, metadata: metadata) ? reply : nil
    }

    /// A live-reply call failed in a way that may pass: retried by the policy. Live calls replace what is
    /// shown and a resumed opening looks for the reply first, so a retry never shows anything twice. When
    /// the tries are used up the answer still reaches the user: as whole messages (a live reply that was
    /// never completed is not an answer).
    private func handleLiveFailure(_ failure: DeliveryError, item: InboxItem, live: any LiveReply, metadata: Logger.Metadata) async throws -> StoredReply? {
        var metadata = metadata
        metadata["error"] = "\(failure)"
        let decision = settings.retry.decision(afterAttempt: item.attempts, retryable: true, retryAfter: failure.retryAfter, random: random())
        switch decision {
        case .retry(let delay):
            try await scheduleRetry(item, after: delay, error: "live reply failed: \(failure)", lastSendFailed: false, afterSend: true, metadata: metadata)
            return nil
        case .giveUp:
            logger.error("the live reply kept failing; answering with whole messages", metadata: metadata.merging(["why": "\(decision)"]) { $1 })
            return try await answerWhole(item, live: item.live == .none ? nil : live, because: failure, metadata: metadata)
        }
    }

    /// A send failed. A send that may have been delivered gets one more try after a delay and no other route
    /// (none when it already was that one more try); a send known to have failed is retried by the policy.
    /// The user gets no error reply: it would fail the same way. Recording the outcome is retried like any
    /// record after a send, so a passing database hiccup cannot leave a definite failure looking uncertain.
    private func handleDeliveryFailure(
        _ failure: DeliveryError, item: InboxItem, earlierUncertainSends: Int, metadata: Logger.Metadata
    ) async throws {
        var metadata = metadata
        metadata["error"] = "\(failure)"
        if failure.mayHaveBeenDelivered {
            uncertainSends.increment()
            if earlierUncertainSends == 0, item.attempts < settings.retry.maxAttempts {
                logger.warning("a reply send may or may not have been delivered; one more try later, possibly duplicated", metadata: metadata)
                let delay = max(settings.uncertainRetryDelay, failure.retryAfter ?? .zero)
                try await scheduleRetry(item, after: delay, error: "uncertain delivery: \(failure)", lastSendFailed: false, afterSend: true, metadata: metadata)
            } else {
                logger.error("a reply send may or may not have been delivered and no more tries are allowed; not sending it again", metadata: metadata)
                try await giveUp(item, error: "uncertain delivery, not sent again: \(failure)", lastSendFailed: false, metadata: metadata)
            }
            return
        }
        let decision = settings.retry.decision(afterAttempt: item.attempts, retryable: failure.isRetryable, retryAfter: failure.retryAfter, random: random())
        switch decision {
        case .retry(let delay):
            try await scheduleRetry(item, after: delay, error: "delivery failed: \(failure)", lastSendFailed: true, afterSend: true, metadata: metadata)
        case .giveUp:
            logger.error("reply could not be delivered; giving up", metadata: metadata.merging(["why": "\(decision)"]) { $1 })
            try await giveUp(item, error: "delivery failed: \(failure)", lastSendFailed: true, metadata: metadata)
        }
    }

    /// Puts the message back to wait `delay`.
    private func scheduleRetry(
        _ item: InboxItem, after delay: Duration, error: String, lastSendFailed: Bool, afterSend: Bool = false, metadata: Logger.Metadata
    ) async throws {
        let now = clock.now
        logger.warning("answer failed; will retry", metadata: metadata.merging(["retry_in": "\(delay)", "error": "\(error)"]) { $1 })
        let write: @Sendable () async throws -> Void = { [inbox] in
            try await inbox.scheduleRetry(item.lease, notBefore: now.adding(delay), error: error, lastSendFailed: lastSendFailed, now: now)
        }
        try await record(afterSend ? "the failed send" : "the retry", afterSend: afterSend, metadata: metadata, write)
        retried.increment()
        noteRetry(at: now.adding(delay))
    }

    /// Gives up on the message after a send failed; nothing more is sent for it.
    private func giveUp(_ item: InboxItem, error: String, lastSendFailed: Bool, metadata: Logger.Metadata) async throws {
        let now = clock.now
        try await record("the failed send", afterSend: true, metadata: metadata) { [inbox] in
            try await inbox.markFailed(item.lease, error: error, lastSendFailed: lastSendFailed, now: now)
        }
        failed.increment()
    }

    /// Records progress of the attempt, retried with backoff until it succeeds, the claim is lost, or the
    /// dispatcher stops; a passing database hiccup neither drops an answer nor repeats a send. After a send
    /// (`afterSend`) the send itself is never repeated for a failed record, and when stopping one last try
    /// is made that cancellation cannot interrupt. After failing for a whole lease, `fallback` (a record that
    /// asks less of the database) is used instead, when there is one.
    private func record(
        _ what: String, afterSend: Bool, metadata: Logger.Metadata, fallback: (@Sendable () async throws -> Void)? = nil,
        _ write: @escaping @Sendable () async throws -> Void
    ) async throws {
        var write = write
        var fallback = fallback
        var pause = settings.bookkeepingBackoff.lowerBound
        let started = clock.now
        while true {
            if Task.isCancelled {
                if afterSend { try? await Task { [write] in try await write() }.value }
                throw CancellationError()
            }
            do {
                try await write()
                return
            } catch let error as LeaseLost {
                throw error
            } catch {
                if Task.isCancelled { continue }
                logger.error(
                    afterSend ? "could not record \(what) after a send; retrying the record, not the send" : "could not record \(what); retrying it (nothing was sent)",
                    metadata: metadata.merging(["error": "\(error)", "retry_in": "\(pause)"]) { $1 })
                if let next = fallback, Duration.between(started, clock.now) >= settings.lease {
                    logger.error("recording \(what) keeps failing; recording it without its effect on the conversation", metadata: metadata)
                    write = next
                    fallback = nil
                }
                do { try await clock.sleep(for: pause) } catch { continue }
                pause = min(pause * 2, settings.bookkeepingBackoff.upperBound)
            }
        }
    }

    static func classify(_ error: any Error) -> (retryable: Bool, retryAfter: Duration?) {
        switch error {
        case let error as ModelError: (error.isRetryable, error.retryAfter)
        case let error as DeliveryError: (error.isRetryable, error.retryAfter)
        default: (true, nil)
        }
    }
}
