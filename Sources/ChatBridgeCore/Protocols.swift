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
    public init(messages: [ChatMessage], user: String? = nil) {
        self.messages = messages
        self.user = user
    }
}

/// A finished answer with what was measured while it streamed.
public struct ChatCompletion: Sendable, Equatable {
    public var text: String
    public var finishReason: String?
    public var promptTokens: Int?
    public var completionTokens: Int?
    public var timeToFirstToken: Duration?
    public init(
        text: String, finishReason: String? = nil, promptTokens: Int? = nil, completionTokens: Int? = nil,
        timeToFirstToken: Duration? = nil
    ) {
        self.text = text
        self.finishReason = finishReason
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
}

/// The platform's way out for a finished answer.
public protocol ReplyChannel: Sendable {
    /// The messages `text` is sent as: one, or numbered parts when it exceeds the platform's size limit.
    func parts(of text: String) -> [String]
    /// Delivers one part of an answer to `message`. Throws ``DeliveryError``.
    func deliver(part: String, replyingTo message: InboundMessage) async throws
}

extension ReplyChannel {
    /// Delivers every part of `text`, in order.
    public func deliver(_ text: String, replyingTo message: InboundMessage) async throws {
        for part in parts(of: text) { try await deliver(part: part, replyingTo: message) }
    }
}

/// Why a reply could not be delivered.
public struct DeliveryError: Error, Sendable, CustomStringConvertible {
    /// Whether trying again later may succeed.
    public var isRetryable: Bool
    public var reason: String
    public var retryAfter: Duration?
    public init(isRetryable: Bool, reason: String, retryAfter: Duration? = nil) {
        self.isRetryable = isRetryable
        self.reason = reason
        self.retryAfter = retryAfter
    }
    public var description: String { reason }
}

/// A message in the inbox, as claimed by a dispatcher.
public struct InboxItem: Sendable, Equatable {
    public var id: Int64
    public var message: InboundMessage
    public var conversation: ConversationKey
    /// Attempts made so far, including the one this claim starts.
    public var attempts: Int
    /// The answer stored by an earlier attempt that was not confirmed as delivered.
    public var storedAnswer: String?
    /// How many parts of the stored answer an earlier attempt already delivered.
    public var deliveredParts: Int
    public init(id: Int64, message: InboundMessage, conversation: ConversationKey, attempts: Int, storedAnswer: String?, deliveredParts: Int = 0) {
        self.id = id
        self.message = message
        self.conversation = conversation
        self.attempts = attempts
        self.storedAnswer = storedAnswer
        self.deliveredParts = deliveredParts
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

/// The durable queue of received messages.
public protocol Inbox: Sendable {
    /// Stores a message once; a second delivery of the same platform message id is a duplicate.
    func accept(_ message: InboundMessage, conversation: ConversationKey, now: Date) async throws -> AcceptOutcome
    /// Returns messages whose lease expired (their worker died) to pending. Returns how many.
    func releaseExpiredLeases(now: Date) async throws -> Int
    /// Claims up to `limit` ready messages, at most one per conversation and only the oldest open one of each.
    func claim(limit: Int, owner: String, leaseUntil: Date, now: Date) async throws -> [InboxItem]
    /// Stores the answer and applies its effect on the conversation in one transaction.
    func storeAnswer(id: Int64, owner: String, resolution: Resolution, key: ConversationKey, now: Date) async throws
    /// Records that the first `count` parts of a long answer were delivered, so a retry sends only the rest.
    func markPartsDelivered(id: Int64, owner: String, count: Int) async throws
    /// Marks a message answered (its reply was delivered).
    func markAnswered(id: Int64, owner: String, now: Date) async throws
    /// Puts a message back to wait until `notBefore`, recording why.
    func scheduleRetry(id: Int64, owner: String, notBefore: Date, error: String, now: Date) async throws
    /// Gives up on a message, recording why.
    func markFailed(id: Int64, owner: String, error: String, now: Date) async throws
    /// Returns every running message to pending (single-process start-up after a crash). Returns how many.
    func reclaimRunning(now: Date) async throws -> Int
    /// Extends the lease on messages still being worked on.
    func renewLeases(ids: [Int64], owner: String, leaseUntil: Date) async throws
    /// The earliest `not_before` of waiting messages, to know when to look again.
    func nextWakeup() async throws -> Date?
    /// Counts of open (pending and running) messages; cheap however long the history is.
    func counts() async throws -> InboxCounts
}
