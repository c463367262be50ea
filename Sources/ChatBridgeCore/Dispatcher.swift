import Foundation
import Logging
import Metrics
import Synchronization

/// How the dispatcher runs answers.
public struct DispatcherSettings: Sendable, Equatable {
    /// Answers in flight at once, across all conversations.
    public var concurrency: Int
    public var retry: RetryPolicy
    /// How long a claim lasts before another worker may take the message over.
    public var lease: Duration
    /// How often to look for ready messages when nothing wakes the dispatcher.
    public var pollInterval: Duration

    public init(concurrency: Int = 64, retry: RetryPolicy = .init(), lease: Duration = .seconds(30), pollInterval: Duration = .seconds(1)) {
        self.concurrency = concurrency
        self.retry = retry
        self.lease = lease
        self.pollInterval = pollInterval
    }
}

/// Claims ready messages from the inbox and answers them: at most one per conversation at a time (so
/// answers keep their order), up to `concurrency` in all, with retries and a final error reply.
public final class Dispatcher: Sendable {
    private let inbox: any Inbox
    private let engine: Engine
    private let replies: any ReplyChannel
    private let settings: DispatcherSettings
    private let owner: String
    private let logger: Logger
    private let signal = WakeSignal()
    private let state = Mutex(State())
    private let random: @Sendable () -> Double

    private struct State {
        var draining = false
        var inFlight: Set<Int64> = []
        /// The earliest retry this dispatcher scheduled, so it wakes in time without asking the database.
        var nextRetry: Date?
    }

    private let answered = Counter(label: "chatbridge_messages_answered_total")
    private let failed = Counter(label: "chatbridge_messages_failed_total")
    private let retried = Counter(label: "chatbridge_messages_retried_total")
    private let inFlightGauge = Gauge(label: "chatbridge_answers_in_flight")
    private let answerTimer = Metrics.Timer(label: "chatbridge_answer_seconds")

    public init(
        inbox: any Inbox, engine: Engine, replies: any ReplyChannel, settings: DispatcherSettings, owner: String,
        logger: Logger, random: @escaping @Sendable () -> Double = { Double.random(in: 0..<1) }
    ) {
        self.inbox = inbox
        self.engine = engine
        self.replies = replies
        self.settings = settings
        self.owner = owner
        self.logger = logger
        self.random = random
    }

    /// Tells the dispatcher that new work may be ready.
    public func wake() { signal.signal() }

    /// Stops claiming new messages; `run()` returns once the answers in flight are done.
    public func beginDrain() {
        state.withLock { $0.draining = true }
        signal.signal()
    }

    public var inFlightCount: Int { state.withLock { $0.inFlight.count } }

    /// Runs until drained or cancelled. Cancellation abandons answers in flight; their messages stay
    /// claimed and are taken up again after the lease, or at the next start.
    public func run() async {
        await withDiscardingTaskGroup { group in
            group.addTask { await self.maintainLeases() }
            if let next = try? await inbox.nextWakeup() { noteRetry(at: next) }
            while !Task.isCancelled {
                let (draining, busy) = state.withLock { ($0.draining, $0.inFlight.count) }
                if draining { break }
                let free = settings.concurrency - busy
                var claimed: [InboxItem] = []
                if free > 0 {
                    do {
                        let now = Date()
                        claimed = try await inbox.claim(
                            limit: min(free, 512), owner: owner, leaseUntil: now.adding(settings.lease), now: now)
                    } catch {
                        logger.error("could not claim messages", metadata: ["error": "\(error)"])
                        await signal.wait(timeout: settings.pollInterval)
                        continue
                    }
                }
                for item in claimed {
                    state.withLock { _ = $0.inFlight.insert(item.id) }
                    inFlightGauge.record(inFlightCount)
                    group.addTask {
                        await self.process(item)
                        self.state.withLock { _ = $0.inFlight.remove(item.id) }
                        self.inFlightGauge.record(self.inFlightCount)
                        self.signal.signal()
                    }
                }
                if free > 0, claimed.count == min(free, 512) { continue }
                await signal.wait(timeout: nextWait())
            }
            // Drain: wait for the answers in flight, then stop the lease renewal.
            while inFlightCount > 0, !Task.isCancelled {
                await signal.wait(timeout: settings.pollInterval)
            }
            group.cancelAll()
        }
    }

    private func noteRetry(at date: Date) {
        state.withLock { state in
            if state.nextRetry.map({ date < $0 }) ?? true { state.nextRetry = date }
        }
    }

    /// How long to sleep when nothing is ready: until the earliest scheduled retry, at most the poll interval.
    private func nextWait() -> Duration {
        let now = Date()
        let next = state.withLock { state -> Date? in
            if let retry = state.nextRetry, retry <= now { state.nextRetry = nil }
            return state.nextRetry
        }
        guard let next else { return settings.pollInterval }
        return min(settings.pollInterval, .milliseconds(Int64(next.timeIntervalSince(now) * 1000) + 1))
    }

    /// Renews the leases of answers in flight and returns messages of dead workers to the queue.
    private func maintainLeases() async {
        let interval = settings.lease / 3
        while !Task.isCancelled {
            try? await Task.sleep(for: interval)
            if Task.isCancelled { return }
            let ids = state.withLock { Array($0.inFlight) }
            do {
                if !ids.isEmpty {
                    try await inbox.renewLeases(ids: ids, owner: owner, leaseUntil: Date().adding(settings.lease))
                }
                if try await inbox.releaseExpiredLeases(now: Date()) > 0 { signal.signal() }
            } catch {
                logger.warning("could not maintain leases", metadata: ["error": "\(error)"])
            }
        }
    }

    /// Answers one claimed message: the stored answer if an earlier attempt made one, else a new one.
    func process(_ item: InboxItem) async {
        var metadata: Logger.Metadata = [
            "message_id": "\(item.message.messageID)", "conversation": "\(item.conversation)",
            "platform": "\(item.message.platform)", "attempt": "\(item.attempts)",
        ]
        let started = ContinuousClock.now
        var answer = item.storedAnswer
        do {
            if answer == nil {
                let resolution = try await engine.resolve(item.message, now: Date())
                try await inbox.storeAnswer(id: item.id, owner: owner, resolution: resolution, key: item.conversation, now: Date())
                answer = resolution.text
            }
            try await deliver(answer!, for: item)
            try await inbox.markAnswered(id: item.id, owner: owner, now: Date())
            answered.increment()
            answerTimer.recordNanoseconds((ContinuousClock.now - started).nanoseconds)
            logger.debug("answered", metadata: metadata)
        } catch {
            if Task.isCancelled {
                logger.info("answer abandoned at shutdown; it resumes at the next start", metadata: metadata)
                return
            }
            metadata["error"] = "\(error)"
            await handleFailure(item, error: error, answerStored: answer != nil, metadata: metadata)
        }
    }

    /// Sends the parts an earlier attempt did not, recording progress when there is more than one.
    private func deliver(_ answer: String, for item: InboxItem) async throws {
        let parts = replies.parts(of: answer)
        for index in min(item.deliveredParts, parts.count)..<parts.count {
            try await replies.deliver(part: parts[index], replyingTo: item.message)
            if parts.count > 1, index + 1 < parts.count {
                try await inbox.markPartsDelivered(id: item.id, owner: owner, count: index + 1)
            }
        }
    }

    private func handleFailure(_ item: InboxItem, error: any Error, answerStored: Bool, metadata: Logger.Metadata) async {
        let retryable: Bool
        var retryAfter: Duration?
        switch error {
        case let error as ModelError:
            retryable = error.isRetryable
            retryAfter = error.retryAfter
        case let error as DeliveryError:
            retryable = error.isRetryable
            retryAfter = error.retryAfter
        default:
            retryable = true
        }
        let now = Date()
        do {
            if settings.retry.shouldRetry(afterAttempt: item.attempts, retryable: retryable) {
                let delay = settings.retry.delay(afterAttempt: item.attempts, retryAfter: retryAfter, random: random())
                logger.warning("answer failed; will retry", metadata: metadata.merging(["retry_in": "\(delay)"]) { $1 })
                retried.increment()
                try await inbox.scheduleRetry(id: item.id, owner: owner, notBefore: now.adding(delay), error: "\(error)", now: now)
                noteRetry(at: now.adding(delay))
                return
            }
            logger.error("answer failed for good", metadata: metadata)
            failed.increment()
            if !answerStored {
                // Tell the user, in words they can act on, and keep that reply so a restart does not ask again.
                let reply = engine.settings.messages.reply(for: error)
                try await inbox.storeAnswer(
                    id: item.id, owner: owner, resolution: Resolution(text: reply, effect: .none), key: item.conversation, now: now)
                do {
                    try await replies.deliver(reply, replyingTo: item.message)
                } catch {
                    logger.error("could not deliver the error reply", metadata: metadata.merging(["delivery_error": "\(error)"]) { $1 })
                }
            }
            try await inbox.markFailed(id: item.id, owner: owner, error: "\(error)", now: Date())
        } catch {
            logger.error("could not record the failure; the message is retried after its lease", metadata: metadata.merging(["store_error": "\(error)"]) { $1 })
        }
    }
}

extension Date {
    public func adding(_ duration: Duration) -> Date {
        let (seconds, attoseconds) = duration.components
        return addingTimeInterval(Double(seconds) + Double(attoseconds) / 1e18)
    }
}

extension Duration {
    public var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }

    public var seconds: Double {
        let (seconds, attoseconds) = components
        return Double(seconds) + Double(attoseconds) / 1e18
    }
}
