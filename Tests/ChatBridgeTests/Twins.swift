import ChatBridgeCore
import Foundation
import Synchronization

/// A clock the test moves: `sleep` returns when `advance` has moved time past its deadline.
final class ManualClock: WallClock {
    private struct Sleeper {
        var deadline: Date
        var duration: Duration
        var continuation: CheckedContinuation<Void, any Error>
    }
    private struct State {
        var now: Date
        var nextID = 0
        var sleepers: [Int: Sleeper] = [:]
        var watchers: [CheckedContinuation<Void, Never>] = []
    }
    private let state: Mutex<State>

    init(start: Date = Date(timeIntervalSince1970: 1_800_000_000)) {
        state = Mutex(State(now: start))
    }

    var now: Date { state.withLock { $0.now } }

    func sleep(for duration: Duration) async throws {
        let id = state.withLock { state -> Int in
            state.nextID += 1
            return state.nextID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                enum Now { case wait, done, cancelled }
                let decision = state.withLock { state -> Now in
                    if Task.isCancelled { return .cancelled }
                    if duration <= .zero { return .done }
                    state.sleepers[id] = Sleeper(deadline: state.now.adding(duration), duration: duration, continuation: continuation)
                    return .wait
                }
                if decision == .wait { notifyWatchers() }
                switch decision {
                case .wait: break
                case .done: continuation.resume()
                case .cancelled: continuation.resume(throwing: CancellationError())
                }
            }
        } onCancel: {
            state.withLock { $0.sleepers.removeValue(forKey: id) }?.continuation.resume(throwing: CancellationError())
        }
    }

    /// The durations of the sleeps waiting now.
    var pendingSleeps: [Duration] { state.withLock { $0.sleepers.values.map(\.duration) } }

    /// Returns once a sleep satisfying `condition` is waiting.
    func waitForSleep(where condition: @Sendable (Duration) -> Bool) async {
        while !state.withLock({ $0.sleepers.values.contains { condition($0.duration) } }) {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let now = state.withLock { state -> Bool in
                    if state.sleepers.values.contains(where: { condition($0.duration) }) { return true }
                    state.watchers.append(continuation)
                    return false
                }
                if now { continuation.resume() }
            }
        }
    }

    private func notifyWatchers() {
        let watchers = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            defer { state.watchers = [] }
            return state.watchers
        }
        for watcher in watchers { watcher.resume() }
    }

    /// Moves time forward and wakes every sleeper whose deadline has come.
    func advance(by duration: Duration) {
        let due = state.withLock { state -> [CheckedContinuation<Void, any Error>] in
            state.now = state.now.adding(duration)
            let now = state.now
            let ids = state.sleepers.filter { $0.value.deadline <= now }.map(\.key)
            return ids.compactMap { state.sleepers.removeValue(forKey: $0)?.continuation }
        }
        for continuation in due { continuation.resume() }
    }
}

/// An in-memory twin of the SQL inbox with the same rules (one open message per conversation in flight,
/// lease tokens, conditional writes) plus failure injection.
actor InMemoryInbox: Inbox {
    struct Row: Sendable {
        var id: Int64
        var payload: Data
        var conversation: ConversationKey
        var state = "pending"
        var attempts = 0
        var notBefore: Date
        var leaseToken: String?
        var leaseOwner: String?
        var leaseExpires: Date?
        var reply: StoredReply?
        var deliveredParts = 0
        var uncertainSends = 0
        var live = LiveReplyState.none
        var liveReference: String?
        var lastError: String?
    }

    enum Operation: Hashable, Sendable { case accept, recordLive, storeReply, beginSend, storeReplyAndBeginSend, recordDelivered, finish, scheduleRetry, markFailed, renew }
    struct Injected: Error, CustomStringConvertible { var description: String { "injected database failure" } }

    private(set) var rows: [Row] = []
    private(set) var effects: [(ConversationKey, ConversationEffect)] = []
    /// The writes on claimed rows that succeeded, in order.
    private(set) var written: [Operation] = []
    /// Writes refused because their lease token was stale.
    private(set) var refusedWrites: [Operation] = []
    private(set) var claims: [Int64: Int] = [:]
    /// The time of every `releaseExpiredLeases` call (each run of a reaper).
    private(set) var releaseRuns: [Date] = []
    /// Every injected failure that fired, in order.
    private(set) var failuresFired: [Operation] = []
    private var failures: [Operation: Int] = [:]
    private var nextID: Int64 = 0
    private var claimBatch = 0
    var renewalsFail = false
    /// `finish` fails whenever it has an effect to apply (a conversation write that keeps failing).
    var effectsFail = false

    static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .millisecondsSince1970
        return encoder
    }()
    static let decoder: JSONDecoder = {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .millisecondsSince1970
        return decoder
    }()

    private var stealBefore: Operation?

    /// The next call of `operation` finds its claim taken over by another worker, which now holds the row.
    func stealAfter(_ operation: Operation) { stealBefore = operation }

    /// The next `count` calls of `operation` fail with a transient error.
    func failNext(_ operation: Operation, count: Int = 1) { failures[operation] = count }
    func setRenewalsFail(_ fail: Bool) { renewalsFail = fail }
    func setEffectsFail(_ fail: Bool) { effectsFail = fail }

    func row(_ id: Int64) -> Row? { rows.first { $0.id == id } }

    /// Stores a row whose payload cannot be decoded.
    @discardableResult
    func insertUnreadable(conversation: ConversationKey, now: Date) -> Int64 {
        nextID += 1
        rows.append(Row(id: nextID, payload: Data("{not a message".utf8), conversation: conversation, notBefore: now))
        return nextID
    }

    private func maybeFail(_ operation: Operation) throws {
        if let count = failures[operation], count > 0 {
            failures[operation] = count - 1
            failuresFired.append(operation)
            throw Injected()
        }
    }

    private func index(_ lease: Lease, _ operation: Operation) throws -> Int {
        try maybeFail(operation)
        if stealBefore == operation, let index = rows.firstIndex(where: { $0.id == lease.id }) {
            stealBefore = nil
            rows[index].leaseToken = "another-worker"
            rows[index].leaseOwner = "another-worker"
        }
        guard let index = rows.firstIndex(where: { $0.id == lease.id && $0.leaseToken == lease.token && $0.state == "running" }) else {
            refusedWrites.append(operation)
            throw LeaseLost(lease)
        }
        return index
    }

    /// `accept` calls begun; with ``holdAccepts(until:)`` they wait for the event before storing.
    private(set) var acceptsBegun = 0
    private var acceptHold: OneTimeEvent?
    func holdAccepts(until event: OneTimeEvent?) { acceptHold = event }

    func accept(_ message: InboundMessage, conversation: ConversationKey, now: Date) async throws -> AcceptOutcome {
        acceptsBegun += 1
        if let hold = acceptHold { await hold.wait() }
        try maybeFail(.accept)
        let payload = try Self.encoder.encode(message)
        if rows.contains(where: { (try? Self.decoder.decode(InboundMessage.self, from: $0.payload))?.messageID == message.messageID }) {
            return .duplicate
        }
        nextID += 1
        rows.append(Row(id: nextID, payload: payload, conversation: conversation, notBefore: now))
        return .accepted
    }

    /// The next claim commits, then fails as a call given up after it committed would: its result is lost.
    func loseNextClaimResult() { loseClaimResult = true }
    private var loseClaimResult = false

    /// Batches of claims that failed after they committed.
    private var lostBatches: [Int] = []

    func releaseOwnClaims(owner: String, keeping: Set<Lease>, now: Date) async throws -> Int {
        var released = 0
        for index in rows.indices where rows[index].state == "running" && rows[index].leaseOwner == owner {
            guard let token = rows[index].leaseToken, !keeping.contains(Lease(id: rows[index].id, token: token)),
                lostBatches.contains(where: { token.hasPrefix("b\($0)-") })
            else { continue }
            rows[index].state = "pending"
            rows[index].attempts = max(0, rows[index].attempts - 1)
            rows[index].leaseToken = nil
            rows[index].leaseOwner = nil
            rows[index].leaseExpires = nil
            released += 1
        }
        return released
    }

    func claim(limit: Int, owner: String, leaseUntil: Date, maxAttempts: Int, now: Date) async throws -> [ClaimedRow] {
        let result = try claimNow(limit: limit, owner: owner, leaseUntil: leaseUntil, maxAttempts: maxAttempts, now: now)
        if loseClaimResult {
            loseClaimResult = false
            lostBatches.append(claimBatch)
            throw Injected()
        }
        return result
    }

    private func claimNow(limit: Int, owner: String, leaseUntil: Date, maxAttempts: Int, now: Date) throws -> [ClaimedRow] {
        claimBatch += 1
        var seen: Set<ConversationKey> = []
        var result: [ClaimedRow] = []
        for index in rows.indices where result.count < limit {
            let row = rows[index]
            guard row.state == "pending" || row.state == "running" else { continue }
            guard seen.insert(row.conversation).inserted else { continue }
            guard row.state == "pending", row.notBefore <= now, row.attempts < maxAttempts else { continue }
            rows[index].state = "running"
            rows[index].attempts += 1
            rows[index].leaseToken = "b\(claimBatch)-\(row.id)"
            rows[index].leaseOwner = owner
            rows[index].leaseExpires = leaseUntil
            claims[row.id, default: 0] += 1
            let lease = Lease(id: row.id, token: rows[index].leaseToken!)
            if let message = try? Self.decoder.decode(InboundMessage.self, from: row.payload) {
                result.append(.ready(InboxItem(
                    lease: lease, message: message, conversation: row.conversation, attempts: rows[index].attempts,
                    reply: row.reply, deliveredParts: row.deliveredParts, uncertainSends: row.uncertainSends, live: row.live,
                    liveReference: rows[index].liveReference)))
            } else {
                result.append(.unreadable(lease, reason: "the stored message payload does not decode"))
            }
        }
        return result
    }

    func renewLeases(_ leases: [Lease], until: Date, now: Date) async throws -> Int {
        if renewalsFail { throw Injected() }
        var renewed = 0
        for lease in leases {
            if let index = rows.firstIndex(where: { $0.id == lease.id && $0.leaseToken == lease.token && $0.state == "running" }) {
                rows[index].leaseExpires = until
                renewed += 1
            }
        }
        return renewed
    }

    private func release(where condition: (Row) -> Bool, now: Date, maxAttempts: Int) -> ReleasedClaims {
        var released = ReleasedClaims()
        for index in rows.indices where condition(rows[index]) {
            rows[index].leaseToken = nil
            rows[index].leaseOwner = nil
            rows[index].leaseExpires = nil
            if rows[index].attempts >= maxAttempts {
                rows[index].state = "failed"
                rows[index].lastError = "gave up: the last allowed attempt was interrupted"
                released.gaveUp += 1
                if rows[index].live == .opening || rows[index].live == .opened,
                    let message = try? Self.decoder.decode(InboundMessage.self, from: rows[index].payload)
                {
                    released.gaveUpLive.append(LiveReplyAddress(message: message, reference: rows[index].liveReference, reply: rows[index].reply.map { StoredReply(text: $0.text, kind: $0.kind, effect: .none) }))
                }
            } else {
                rows[index].state = "pending"
                released.requeued += 1
            }
        }
        return released
    }

    func releaseExpiredLeases(now: Date, maxAttempts: Int, keeping: Set<Lease>) async throws -> ReleasedClaims {
        releaseRuns.append(now)
        return release(
            where: { row in
                guard row.state == "running", (row.leaseExpires ?? .distantFuture) < now, let token = row.leaseToken else { return false }
                return !keeping.contains(Lease(id: row.id, token: token))
            }, now: now, maxAttempts: maxAttempts)
    }

    func reclaimRunning(now: Date, maxAttempts: Int) async throws -> ReleasedClaims {
        release(where: { $0.state == "running" || ($0.state == "pending" && $0.attempts >= maxAttempts) }, now: now, maxAttempts: maxAttempts)
    }

    func storeReply(_ reply: StoredReply, for lease: Lease, error: String?, now: Date) async throws {
        let index = try index(lease, .storeReply)
        rows[index].reply = reply
        if let error { rows[index].lastError = error }
        written.append(.storeReply)
    }

    func beginSend(_ lease: Lease, uncertainSends: Int, leaseUntil: Date, now: Date) async throws {
        let index = try index(lease, .beginSend)
        rows[index].uncertainSends = uncertainSends
        rows[index].leaseExpires = leaseUntil
        written.append(.beginSend)
        try loseResultIfAsked(.beginSend)
    }

    /// Both or neither, as the store does; failures injected for either write fail it.
    func storeReply(
        _ reply: StoredReply, for lease: Lease, error: String?, beginningSendUntil leaseUntil: Date, uncertainSends: Int, now: Date
    ) async throws {
        try maybeFail(.beginSend)
        let index = try index(lease, .storeReply)
        rows[index].reply = reply
        if let error { rows[index].lastError = error }
        rows[index].uncertainSends = uncertainSends
        rows[index].leaseExpires = leaseUntil
        written.append(.storeReplyAndBeginSend)
        try loseResultIfAsked(.storeReplyAndBeginSend)
    }

    /// The next call of `operation` commits, then fails as a call given up after its commit would (a
    /// PostgreSQL call past its time limit): the caller sees an error for a write that happened.
    func loseNextResult(of operation: Operation) { losingResult.insert(operation) }
    private var losingResult: Set<Operation> = []
    private func loseResultIfAsked(_ operation: Operation) throws {
        guard losingResult.remove(operation) != nil else { return }
        failuresFired.append(operation)
        throw Injected()
    }

    func recordLive(_ lease: Lease, state: LiveReplyState, reference: String?, now: Date) async throws {
        let index = try index(lease, .recordLive)
        rows[index].live = state
        if let reference { rows[index].liveReference = reference }
        if state == .declined { rows[index].attempts = 1 }
    }

    func recordDelivered(_ lease: Lease, parts: Int, now: Date) async throws {
        let index = try index(lease, .recordDelivered)
        rows[index].deliveredParts = parts
        written.append(.recordDelivered)
        rows[index].uncertainSends = 0
    }

    func finish(_ lease: Lease, reply: StoredReply, conversation: ConversationKey, now: Date) async throws {
        let index = try index(lease, .finish)
        if effectsFail, reply.effect != .none { throw Injected() }
        rows[index].state = reply.kind == .answer ? "answered" : "failed"
        rows[index].uncertainSends = 0
        rows[index].leaseToken = nil
        rows[index].leaseOwner = nil
        if reply.kind == .answer, reply.effect != .none { effects.append((conversation, reply.effect)) }
        written.append(.finish)
    }

    func scheduleRetry(_ lease: Lease, notBefore: Date, error: String, lastSendFailed: Bool, now: Date) async throws {
        let index = try index(lease, .scheduleRetry)
        rows[index].state = "pending"
        rows[index].leaseToken = nil
        rows[index].leaseOwner = nil
        rows[index].notBefore = notBefore
        rows[index].lastError = error
        if lastSendFailed { rows[index].uncertainSends -= 1 }
    }

    func markFailed(_ lease: Lease, error: String, lastSendFailed: Bool, now: Date) async throws {
        let index = try index(lease, .markFailed)
        rows[index].state = "failed"
        rows[index].leaseToken = nil
        rows[index].leaseOwner = nil
        rows[index].lastError = error
        if lastSendFailed { rows[index].uncertainSends -= 1 }
    }

    func nextWakeup(now: Date) async throws -> Date? {
        rows.filter { $0.state == "pending" }.map(\.notBefore).min()
    }

    func counts() async throws -> InboxCounts {
        InboxCounts(pending: rows.filter { $0.state == "pending" }.count, running: rows.filter { $0.state == "running" }.count)
    }
}

/// A model that answers from a script: each call takes the next step (an answer, an error, or an answer
/// held until a gate opens); with the script empty it echoes the question.
final class ScriptedModel: ChatModel {
    enum Step: Sendable {
        case answer(String)
        case fail(ModelError)
        case held(OneTimeEvent, String)
        /// The pieces are streamed as deltas; the answer is all of them.
        case streamed([String])
    }
    private let state = Mutex<(script: [Step], calls: Int, always: ModelError?)>(([], 0, nil))

    func script(_ steps: Step...) { state.withLock { $0.script.append(contentsOf: steps) } }
    /// Every call fails with `error`.
    func alwaysFail(_ error: ModelError) { state.withLock { $0.always = error } }
    var calls: Int { state.withLock { $0.calls } }

    func complete(_ request: ChatRequest, onDelta: @escaping @Sendable (String) async -> Void) async throws -> ChatCompletion {
        let step = state.withLock { state -> Step in
            state.calls += 1
            if let always = state.always { return .fail(always) }
            return state.script.isEmpty ? .answer("Answer to: " + (request.messages.last?.content ?? "")) : state.script.removeFirst()
        }
        switch step {
        case .answer(let text):
            return ChatCompletion(text: text, finishReason: "stop")
        case .fail(let error):
            throw error
        case .held(let gate, let text):
            await gate.wait()
            return ChatCompletion(text: text, finishReason: "stop")
        case .streamed(let pieces):
            for piece in pieces { await onDelta(piece) }
            return ChatCompletion(text: pieces.joined(), finishReason: "stop")
        }
    }
}

/// A live reply twin: records every call, in order, and fails by script.
final class LiveTwin: Sendable {
    enum Call: Equatable, Sendable {
        case prepare
        case open(resuming: Bool)
        case update(String)
        case finish(String)
        case fail(String)
    }
    enum Kind: Hashable, Sendable { case prepare, open, update, finish, fail }
    private let state = Mutex<(calls: [Call], script: [Kind: [DeliveryError]])>(([], [:]))
    /// When set, the reply is prepared (a call recorded) and returns this reference, and once shown
    /// reports `shown` as its reference, like a card entity and the message showing it.
    let references: (prepared: String, shown: String)?
    init(references: (prepared: String, shown: String)? = nil) { self.references = references }

    /// Whether the channel offers live replies: always, only to continue one an attempt began (switched
    /// off in the settings since), or never (the platform's channel is gone).
    enum Availability: Sendable { case on, begunOnly, off }
    private let availability = Mutex(Availability.on)
    func setAvailability(_ value: Availability) { availability.withLock { $0 = value } }
    func isOffered(begun: Bool) -> Bool {
        switch availability.withLock({ $0 }) {
        case .on: true
        case .begunOnly: begun
        case .off: false
        }
    }

    /// The next calls of `kind` fail with `errors`, in order.
    func script(_ kind: Kind, _ errors: DeliveryError...) { state.withLock { $0.script[kind, default: []].append(contentsOf: errors) } }
    var calls: [Call] { state.withLock { $0.calls } }

    func perform(_ call: Call, _ kind: Kind) throws {
        let error = state.withLock { state -> DeliveryError? in
            state.calls.append(call)
            guard var queue = state.script[kind], !queue.isEmpty else { return nil }
            let error = queue.removeFirst()
            state.script[kind] = queue
            return error
        }
        if let error { throw error }
    }

    struct Reply: LiveReply {
        let twin: LiveTwin
        func prepare() async throws -> String? {
            guard let references = twin.references else { return nil }
            try twin.perform(.prepare, .prepare)
            return references.prepared
        }
        var reference: String? { twin.references?.shown }
        func open(resuming: Bool) async throws { try twin.perform(.open(resuming: resuming), .open) }
        func update(_ text: String) async throws { try twin.perform(.update(text), .update) }
        func finish(_ text: String) async throws { try twin.perform(.finish(text), .finish) }
        func fail(_ text: String) async throws { try twin.perform(.fail(text), .fail) }
    }
}

/// A reply channel that records what it sent; parts are separated by `|` in the text. Sends follow a
/// script of outcomes, then succeed. With a ``LiveTwin`` it offers live replies too.
final class RecordingReplies: ReplyChannel {
    let live: LiveTwin?
    init(live: LiveTwin? = nil) { self.live = live }
    func liveReply(to message: InboundMessage, reference: String?, begun: Bool) -> (any LiveReply)? {
        guard let live, live.isOffered(begun: begun) else { return nil }
        references.withLock { $0.append(reference) }
        return LiveTwin.Reply(twin: live)
    }
    /// The reference each live reply was made with, in order.
    let references = Mutex<[String?]>([])

    enum Outcome: Sendable {
        case delivered
        case failed(retryable: Bool)
        case uncertain
    }
    private let state = Mutex<(script: [Outcome], attempts: [String], delivered: [String])>(([], [], []))

    func script(_ outcomes: Outcome...) { state.withLock { $0.script.append(contentsOf: outcomes) } }
    /// Every part a send was attempted for, in order.
    var attempts: [String] { state.withLock { $0.attempts } }
    /// Every part that was delivered (an uncertain send counts: the platform got it).
    var delivered: [String] { state.withLock { $0.delivered } }

    func parts(of text: String, replyingTo message: InboundMessage) -> [String] { text.components(separatedBy: "|") }

    func deliver(part: String, replyingTo message: InboundMessage) async throws {
        let outcome = state.withLock { state -> Outcome in
            state.attempts.append(part)
            let outcome = state.script.isEmpty ? .delivered : state.script.removeFirst()
            if case .failed = outcome {} else { state.delivered.append(part) }
            return outcome
        }
        switch outcome {
        case .delivered: return
        case .failed(let retryable): throw DeliveryError(isRetryable: retryable, reason: "simulated failure")
        case .uncertain: throw DeliveryError.uncertain("simulated timeout after sending")
        }
    }
}

struct NoConversations: ConversationStore {
    func recentTurns(_ key: ConversationKey, limit: Int) async throws -> [Turn] { [] }
    func apply(_ effect: ConversationEffect, to key: ConversationKey) async throws {}
}

func textMessage(_ id: String, _ text: String, chat: String = "c1", user: String = "u1", sentAt: Date = Date(timeIntervalSince1970: 1_800_000_000)) -> InboundMessage {
    InboundMessage(
        platform: "dingtalk", botID: "bot", messageID: id, chat: .init(id: chat, kind: .direct),
        sender: .init(id: user, staffID: user, name: user), body: .text(text), sentAt: sentAt)
}
