import Foundation

/// One message sent to the model.
public struct ChatMessage: Sendable, Equatable, Codable {
    public enum Role: String, Sendable, Codable {
        case system, user, assistant
    }
    public var role: Role
    public var content: String
    public init(role: Role, content: String) {
        self.role = role
        self.content = content
    }
}

/// A request for one answer.
public struct ChatRequest: Sendable, Equatable {
    public var messages: [ChatMessage]
    /// An opaque end-user id the provider may use for abuse monitoring.
    public var user: String?
    /// The model profile to answer with (`models.<name>`); nil is `default`.
    public var profile: String?
    public init(messages: [ChatMessage], user: String? = nil, profile: String? = nil) {
        self.messages = messages
        self.user = user
        self.profile = profile
    }
}

/// Which profile, model and key answered, and what its tokens cost.
public struct ModelUse: Sendable, Equatable {
    public var profile: String
    public var model: String
    /// `sk-…abcd`, never the key.
    public var keyFingerprint: String
    /// Prices per million tokens, when the profile names them.
    public var inputPrice: Double?
    public var outputPrice: Double?
    public init(profile: String, model: String, keyFingerprint: String, inputPrice: Double? = nil, outputPrice: Double? = nil) {
        self.profile = profile
        self.model = model
        self.keyFingerprint = keyFingerprint
        self.inputPrice = inputPrice
        self.outputPrice = outputPrice
    }

    public func cost(prompt: Int, completion: Int) -> Double {
        (Double(prompt) * (inputPrice ?? 0) + Double(completion) * (outputPrice ?? 0)) / 1_000_000
    }
}

/// A finished answer with what was measured while it streamed.
public struct ChatCompletion: Sendable, Equatable {
    public var text: String
    /// `stop`, `length` (cut off at the token limit), `content_filter`, … as the provider reported it.
    public var finishReason: String?
    /// The model's refusal message, when it refused instead of answering.
    public var refusal: String?
    public var promptTokens: Int?
    public var completionTokens: Int?
    public var timeToFirstToken: Duration?
    /// Which profile, model and key answered (set by the profile router).
    public var servedBy: ModelUse?
    public init(
        text: String, finishReason: String? = nil, refusal: String? = nil, promptTokens: Int? = nil,
        completionTokens: Int? = nil, timeToFirstToken: Duration? = nil, servedBy: ModelUse? = nil
    ) {
        self.servedBy = servedBy
        self.text = text
        self.finishReason = finishReason
        self.refusal = refusal
        self.promptTokens = promptTokens
        self.completionTokens = completionTokens
        self.timeToFirstToken = timeToFirstToken
    }
}

/// A language model that streams an answer. Implementations throw ``ModelError``.
public protocol ChatModel: Sendable {
    /// Streams the answer, calling `onDelta` with each piece of text as it arrives.
    func complete(
        _ request: ChatRequest,
        onDelta: @escaping @Sendable (String) async -> Void
    ) async throws -> ChatCompletion
}

/// Durable storage of conversation turns.
public protocol ConversationStore: Sendable {
    /// The newest turns of a conversation since its last reset, oldest first, at most `limit`.
    func recentTurns(_ key: ConversationKey, limit: Int) async throws -> [Turn]
    /// Applies an effect outside the inbox (terminal chat).
    func apply(_ effect: ConversationEffect, to key: ConversationKey) async throws
    /// The conversation's own persona, model and system prompt.
    func preferences(_ key: ConversationKey) async throws -> ConversationPreferences
    /// The preferences and the most recent turns (at most `limit`, oldest first) in one call: what a
    /// question needs (a store answers both with one round trip).
    func context(_ key: ConversationKey, turns limit: Int) async throws -> ConversationContext
}

/// What a question needs from its conversation.
public struct ConversationContext: Sendable, Equatable {
    public var preferences: ConversationPreferences
    public var turns: [Turn]
    public init(preferences: ConversationPreferences = ConversationPreferences(), turns: [Turn] = []) {
        self.preferences = preferences
        self.turns = turns
    }
}

extension ConversationStore {
    public func preferences(_ key: ConversationKey) async throws -> ConversationPreferences { ConversationPreferences() }

    public func context(_ key: ConversationKey, turns limit: Int) async throws -> ConversationContext {
        ConversationContext(preferences: try await preferences(key), turns: try await recentTurns(key, limit: limit))
    }
}

/// The platform's way out for an answer: whole messages (one-shot), and optionally a live reply that
/// shows the answer while the model writes it.
public protocol ReplyChannel: Sendable {
    /// The messages `text` is sent as to answer `message`: one, or numbered parts when it exceeds the
    /// platform's size limit.
    func parts(of text: String, replyingTo message: InboundMessage) -> [String]
    /// Delivers one part of an answer to `message`. Throws ``DeliveryError``.
    func deliver(part: String, replyingTo message: InboundMessage) async throws
    /// A live reply for `message` (a card that grows), or nil to answer with whole messages. `reference`
    /// is what an earlier attempt recorded for it (``LiveReply/prepare()``, ``LiveReply/reference``).
    /// `begun`: an earlier attempt began showing one; it is returned whenever the platform can still reach
    /// it, even when live replies were switched off since (else the answer would show twice).
    func liveReply(to message: InboundMessage, reference: String?, begun: Bool) -> (any LiveReply)?
}

/// An answer shown while it is being written: opened, updated with the whole text so far, then finished
/// (or failed). A live reply is addressed by the platform message it answers, so every attempt for that
/// message — a retry, a takeover, a restart — reaches the same reply, and updates replace its text.
/// Methods throw ``DeliveryError``; one that is not retryable from ``open(resuming:)`` means this message
/// cannot have a live reply (the dispatcher answers it with whole messages instead), and from
/// ``finish(_:)``/``fail(_:)`` that the shown reply cannot be completed.
public protocol LiveReply: Sendable {
    /// Creates what the reply needs before it can be shown (a card entity) and returns the platform's
    /// reference to it, recorded on the row with `opening` before ``open(resuming:)``, so an attempt after
    /// a crash shows that same card and not a second one. Nil when the platform needs nothing.
    func prepare() async throws -> String?
    /// What to record with `opened` once the reply is shown (e.g. the id of the message that shows it), to
    /// be handed back to later attempts; nil keeps what was recorded.
    var reference: String? { get }
    /// The shortest pause between two updates of this reply.
    var updateInterval: Duration { get }
    /// Shows the reply, empty and marked as being written. `resuming`: an earlier attempt began showing it
    /// and may have succeeded, so the reply is looked for first and shown only when it is not there.
    func open(resuming: Bool) async throws
    /// Replaces the shown text with `text`, the whole answer so far.
    func update(_ text: String) async throws
    /// Shows the final text and marks the reply finished.
    func finish(_ text: String) async throws
    /// Shows `text` (the user's error message) and marks the reply failed.
    func fail(_ text: String) async throws
}

/// How far an attempt got with a message's live reply. Recorded on the inbox row before and after each
/// step, so the next attempt continues the same reply and never shows a second one.
public enum LiveReplyState: String, Sendable, Equatable, Codable {
    /// No live reply shown yet.
    case none
    /// Showing it began; whether it appeared is unknown (the next attempt looks for it first).
    case opening
    /// The live reply is shown; later attempts update it.
    case opened
    /// The live reply shows the final text (or the error); only the row's bookkeeping is left.
    case finalized
    /// The platform refused a live reply for this message; it is answered with whole messages.
    case declined
}

extension ReplyChannel {
    public func liveReply(to message: InboundMessage, reference: String?, begun: Bool) -> (any LiveReply)? { nil }

    /// Delivers every part of `text`, in order.
    public func deliver(_ text: String, replyingTo message: InboundMessage) async throws {
        for part in parts(of: text, replyingTo: message) { try await deliver(part: part, replyingTo: message) }
    }
}

extension LiveReply {
    public func prepare() async throws -> String? { nil }
    public var reference: String? { nil }
    public var updateInterval: Duration { .milliseconds(500) }
}

/// Answers each message through the reply channel of its platform (`InboundMessage.platform`), so several
/// platforms share one dispatcher. A message of a platform without a channel cannot be answered: its
/// sends fail for good (a configuration change removed the platform while its messages waited).
public struct PlatformReplies: ReplyChannel {
    private let channels: [String: any ReplyChannel]

    public init(_ channels: [String: any ReplyChannel]) {
        self.channels = channels
    }

    private func channel(for message: InboundMessage) -> (any ReplyChannel)? { channels[message.platform] }

    public func parts(of text: String, replyingTo message: InboundMessage) -> [String] {
        channel(for: message)?.parts(of: text, replyingTo: message) ?? [text]
    }

    public func deliver(part: String, replyingTo message: InboundMessage) async throws {
        guard let channel = channel(for: message) else {
            throw DeliveryError(isRetryable: false, reason: "no reply channel for platform \"\(message.platform)\" is configured")
        }
        try await channel.deliver(part: part, replyingTo: message)
    }

    public func liveReply(to message: InboundMessage, reference: String?, begun: Bool) -> (any LiveReply)? {
        channel(for: message)?.liveReply(to: message, reference: reference, begun: begun)
    }
}

/// Why a reply could not be delivered.
public struct DeliveryError: Error, Sendable, CustomStringConvertible {
    /// Whether trying again later may succeed.
    public var isRetryable: Bool
    /// The platform may have accepted the message although the send did not confirm it (a timeout or a
    /// broken response after the request went out). Such a send is neither repeated at once nor tried
    /// through another route in the same attempt: the dispatcher allows one more attempt after a delay,
    /// logged as a possible duplicate.
    public var mayHaveBeenDelivered: Bool
    public var reason: String
    public var retryAfter: Duration?
    public init(isRetryable: Bool, reason: String, retryAfter: Duration? = nil, mayHaveBeenDelivered: Bool = false) {
        self.isRetryable = isRetryable
        self.reason = reason
        self.retryAfter = retryAfter
        self.mayHaveBeenDelivered = mayHaveBeenDelivered
    }

    /// A send whose outcome is unknown.
    public static func uncertain(_ reason: String) -> DeliveryError {
        DeliveryError(isRetryable: true, reason: reason, mayHaveBeenDelivered: true)
    }

    public var description: String { reason }
}

/// One claim on an inbox row: the row and the claim's own token. Every write that records progress of
/// the claim names it and changes the row only while the claim still holds it.
public struct Lease: Hashable, Sendable, CustomStringConvertible {
    public var id: Int64
    public var token: String
    public init(id: Int64, token: String) {
        self.id = id
        self.token = token
    }
    public var description: String { "message \(id) (lease \(token))" }
}

/// A conditional write found that its claim no longer holds the row: the lease expired and another
/// attempt took it over, or the row was finished. The attempt that gets it stops without sending.
public struct LeaseLost: Error, Sendable, CustomStringConvertible {
    public var lease: Lease
    public init(_ lease: Lease) { self.lease = lease }
    public var description: String { "\(lease) is no longer held by this attempt" }
}

/// A message in the inbox, as claimed by a dispatcher.
public struct InboxItem: Sendable, Equatable {
    public var lease: Lease
    public var message: InboundMessage
    public var conversation: ConversationKey
    /// Attempts made so far, including the one this claim starts.
    public var attempts: Int
    /// The reply stored by an earlier attempt that did not finish delivering it.
    public var reply: StoredReply?
    /// How many parts of the stored reply an earlier attempt already delivered.
    public var deliveredParts: Int
    /// Sends of the next part whose outcome is unknown (a timeout, or a crash while sending): the part may
    /// already be in the chat. 0 normally; 1 allows one more try, logged as a possible duplicate; 2 stops.
    public var uncertainSends: Int
    /// Whether an earlier attempt showed a live reply (or was refused one).
    public var live: LiveReplyState
    /// What an earlier attempt recorded to find its live reply again (``LiveReply/prepare()``).
    public var liveReference: String?

    public var id: Int64 { lease.id }

    public init(
        lease: Lease, message: InboundMessage, conversation: ConversationKey, attempts: Int, reply: StoredReply? = nil,
        deliveredParts: Int = 0, uncertainSends: Int = 0, live: LiveReplyState = .none, liveReference: String? = nil
    ) {
        self.lease = lease
        self.message = message
        self.conversation = conversation
        self.attempts = attempts
        self.reply = reply
        self.deliveredParts = deliveredParts
        self.uncertainSends = uncertainSends
        self.live = live
        self.liveReference = liveReference
    }
}

/// What a claim handed out: a message ready to answer, or a row whose stored payload cannot be read.
public enum ClaimedRow: Sendable, Equatable {
    case ready(InboxItem)
    case unreadable(Lease, reason: String)

    public var lease: Lease {
        switch self {
        case .ready(let item): item.lease
        case .unreadable(let lease, _): lease
        }
    }
}

/// The outcome of offering a message to the inbox.
public enum AcceptOutcome: Sendable, Equatable {
    case accepted
    case duplicate
}

/// How many messages wait and how many are being answered.
public struct InboxCounts: Sendable, Equatable {
    public var pending = 0
    public var running = 0
    public init(pending: Int = 0, running: Int = 0) {
        self.pending = pending
        self.running = running
    }
}

/// What returning abandoned claims to the queue did.
public struct ReleasedClaims: Sendable, Equatable {
    /// Rows put back to pending, to be claimed again.
    public var requeued = 0
    /// Rows that had used every attempt and were marked failed instead.
    public var gaveUp = 0
    /// The messages among those given up whose live reply may be showing (a card "thinking" or half
    /// written): the dispatcher completes it with the stored reply, or tells it the answer failed.
    public var gaveUpLive: [LiveReplyAddress] = []
    public init(requeued: Int = 0, gaveUp: Int = 0, gaveUpLive: [LiveReplyAddress] = []) {
        self.requeued = requeued
        self.gaveUp = gaveUp
        self.gaveUpLive = gaveUpLive
    }
}

/// Where a message's live reply is: the message it answers, the reference an attempt recorded for it,
/// and the reply stored for the message, if one was (its text and kind; the live reply may already show
/// it, so a give-up completes the reply with it rather than overwriting it with a failure).
public struct LiveReplyAddress: Sendable, Equatable {
    public var message: InboundMessage
    public var reference: String?
    public var reply: StoredReply?
    public init(message: InboundMessage, reference: String? = nil, reply: StoredReply? = nil) {
        self.message = message
        self.reference = reference
        self.reply = reply
    }
}

/// The durable queue of received messages.
///
/// Every method that takes a ``Lease`` changes its row only while that claim holds it, and throws
/// ``LeaseLost`` when it changed nothing; it never touches a row claimed by another attempt.
public protocol Inbox: Sendable {
    /// Stores a message once; a second delivery of the same platform message id is a duplicate.
    func accept(_ message: InboundMessage, conversation: ConversationKey, now: Date) async throws -> AcceptOutcome
    /// Claims up to `limit` ready messages, at most one per conversation and only the oldest open one of
    /// each, never one that has used `maxAttempts` attempts. Each claim gets its own lease token.
    func claim(limit: Int, owner: String, leaseUntil: Date, maxAttempts: Int, now: Date) async throws -> [ClaimedRow]
    /// Extends the claims still held to `until` (on the caller's clock, which says `now`); returns how many
    /// were. Runs ahead of background work.
    func renewLeases(_ leases: [Lease], until: Date, now: Date) async throws -> Int
    /// Returns rows whose lease expired (their worker died or lost touch) to pending, or marks them failed
    /// when they have used `maxAttempts` attempts. Claims in `keeping` are still being worked on by the
    /// caller and are never released by it, expired or not.
    func releaseExpiredLeases(now: Date, maxAttempts: Int, keeping: Set<Lease>) async throws -> ReleasedClaims
    /// Returns to pending the rows of this store's failed `claim` calls that `owner` holds all the same and
    /// is not working on (not in `keeping`): a claim that committed after its call had been given up.
    /// Nothing was done for them, so each gives back the attempt it counted. Rows of claims that succeeded
    /// are never touched. Returns how many.
    func releaseOwnClaims(owner: String, keeping: Set<Lease>, now: Date) async throws -> Int
    /// At single-process start-up: returns every running row to pending (or failed, past `maxAttempts`),
    /// and fails pending rows past `maxAttempts`.
    func reclaimRunning(now: Date, maxAttempts: Int) async throws -> ReleasedClaims
    /// Stores the reply before it is delivered; `error` is recorded as the reason when it is an error reply.
    func storeReply(_ reply: StoredReply, for lease: Lease, error: String?, now: Date) async throws
    /// Records that the next part is about to be sent (its outcome is unknown until recorded) and extends
    /// the lease to `leaseUntil`. Called immediately before every send. `uncertainSends` is the count of
    /// sends of this part with an unknown outcome, this one included: written as a value, not added, so a
    /// write that committed but was reported failed and is then repeated counts the send once.
    func beginSend(_ lease: Lease, uncertainSends: Int, leaseUntil: Date, now: Date) async throws
    /// Records how far the message's live reply got (shown, or refused by the platform), with the
    /// platform's reference to it when there is a new one (nil keeps the recorded one). Recording
    /// `declined` also counts the current attempt as the first (`attempts = 1`): the whole-message route
    /// gets tries of its own, however many the live reply used up (it is recorded once per message).
    func recordLive(_ lease: Lease, state: LiveReplyState, reference: String?, now: Date) async throws
    /// `storeReply` and then `beginSend` in one write: a new reply stored as its first part is about to be
    /// sent (one store call fewer per answer; `SQLStore` writes both or neither in one statement, the default
    /// makes the two writes one after the other, each of which may be repeated).
    func storeReply(
        _ reply: StoredReply, for lease: Lease, error: String?, beginningSendUntil leaseUntil: Date, uncertainSends: Int, now: Date
    ) async throws
    /// Records that the first `parts` parts of the reply were delivered.
    func recordDelivered(_ lease: Lease, parts: Int, now: Date) async throws
    /// The whole reply was delivered: marks the row answered (or failed, for an error reply) and applies
    /// the reply's effect to `conversation` in the same transaction.
    func finish(_ lease: Lease, reply: StoredReply, conversation: ConversationKey, now: Date) async throws
    /// Puts a message back to wait until `notBefore`, recording why. `lastSendFailed` says the send begun
    /// last is known not to have been delivered.
    func scheduleRetry(_ lease: Lease, notBefore: Date, error: String, lastSendFailed: Bool, now: Date) async throws
    /// Gives up on a message, recording why.
    func markFailed(_ lease: Lease, error: String, lastSendFailed: Bool, now: Date) async throws
    /// The earliest `not_before` of waiting messages, on the caller's clock (which says `now`), to know when
    /// to look again.
    func nextWakeup(now: Date) async throws -> Date?
    /// Counts of open (pending and running) messages; cheap however long the history is.
    func counts() async throws -> InboxCounts
}

extension Inbox {
    public func storeReply(
        _ reply: StoredReply, for lease: Lease, error: String?, beginningSendUntil leaseUntil: Date, uncertainSends: Int, now: Date
    ) async throws {
        try await storeReply(reply, for: lease, error: error, now: now)
        try await beginSend(lease, uncertainSends: uncertainSends, leaseUntil: leaseUntil, now: now)
    }
}
