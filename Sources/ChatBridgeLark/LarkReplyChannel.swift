import AsyncHTTPClient
import ChatBridgeCore
import Crypto
import Foundation
import Logging
import NIOHTTP1
import Synchronization

/// The bot's own open_id, fetched once (at start, or at the first message that needs it) and cached.
/// A failed fetch is tried again at most every `retryInterval`, so a flood of events cannot hammer the API.
public actor LarkBotIdentity {
    private let api: LarkAPI
    private let logger: Logger
    private let retryInterval: Duration
    private let waitLimit: Duration
    private var info: LarkBotInfo?
    private var lastFailure: Date?
    private var inFlight: Task<LarkBotInfo, any Error>?

    /// `waitLimit`: how long a message may wait for the identity (a fetch can take much longer, through
    /// token fetches and rate-limit waits, and Feishu gives an event 3 s).
    public init(api: LarkAPI, retryInterval: Duration = .seconds(5), waitLimit: Duration = .seconds(1), logger: Logger) {
        self.api = api
        self.logger = logger
        self.retryInterval = retryInterval
        self.waitLimit = waitLimit
    }

    /// The bot's open_id, or nil while it cannot be fetched or the fetch takes longer than the wait
    /// limit (it goes on in the background, and the next message finds it).
    public func openID() async -> String? {
        if let info { return info.openID }
        if let lastFailure, api.clock.now.timeIntervalSince(lastFailure) < retryInterval.seconds { return nil }
        let fetched = OneTimeEvent()
        Task {
            _ = try? await self.fetch()
            fetched.signal()
        }
        _ = await api.clock.withTimeout(waitLimit) { await fetched.wait() }
        return info?.openID
    }

    /// Fetches the bot's info now (at start); logs what went wrong when it cannot.
    @discardableResult
    public func fetch() async throws -> LarkBotInfo {
        if let info { return info }
        let task: Task<LarkBotInfo, any Error>
        if let inFlight {
            task = inFlight
        } else {
            task = Task { [api] in try await api.botInfo() }
            inFlight = task
        }
        defer { if inFlight == task { inFlight = nil } }
        do {
            let fetched = try await task.value
            if info == nil {
                logger.notice("Lark bot identified", metadata: ["bot": "\(fetched.name)", "open_id": "\(fetched.openID)"])
            }
            info = fetched
            return fetched
        } catch {
            lastFailure = api.clock.now
            logger.error("cannot fetch the Lark bot's own info; group messages that mention it are refused (Feishu re-pushes them) until it works", metadata: ["error": "\(error)"])
            throw error
        }
    }
}

/// Answers Lark/Feishu messages (protocols E.4, E.5): every message is a reply
/// (`POST /open-apis/im/v1/messages/{message_id}/reply`) carrying a `uuid` derived from the platform message
/// id and the part, so Feishu itself refuses a second copy when a retry or a restart sends it again; with
/// `lark.card.mode` the answer streams into a card (``LarkCard``).
public struct LarkReplyChannel: ReplyChannel {
    public let api: LarkAPI
    let logger: Logger
    /// Card problems an admin must fix, each logged once (not once per message).
    let problems: LogOnce
    var settings: LarkSettings { api.settings }

    /// Bytes of text per message, counted as they are sent (UTF-8, escaped in JSON): Feishu takes 150 KB
    /// of content; the rest is room for the wrapper and the part number.
    static let maxTextBytes = 148_000

    public init(api: LarkAPI, logger: Logger) {
        self.api = api
        self.logger = logger
        problems = LogOnce(logger: logger)
    }

    public func parts(of text: String, replyingTo message: InboundMessage) -> [String] {
        Self.numberedParts(of: text, maxBytes: Self.maxTextBytes)
    }

    /// `text` in parts of at most `maxBytes` each as sent (part numbers included), numbered when several.
    static func numberedParts(of text: String, maxBytes: Int) -> [String] {
        let parts = splitter(maxBytes: maxBytes - 16).split(text)
        guard parts.count > 1 else { return parts }
        return parts.enumerated().map { index, part in "(\(index + 1)/\(parts.count))\n" + part }
    }

    /// Splits by the size Feishu counts: UTF-8 bytes of the text escaped in a JSON string.
    static func splitter(maxBytes: Int) -> TextSplitter {
        TextSplitter(maxCharacters: maxBytes, maxSize: maxBytes, size: jsonSize)
    }

    /// A character's UTF-8 bytes inside a JSON string: quotes, backslashes, slashes and line breaks take
    /// two, other control characters six (`\u0001`).
    @Sendable static func jsonSize(_ character: Character) -> Int {
        character.unicodeScalars.reduce(0) { total, scalar in
            switch scalar {
            case "\"", "\\", "/", "\n", "\r", "\t", "\u{08}", "\u{0C}": total + 2
            case _ where scalar.value < 0x20: total + 6
            default: total + scalar.utf8.count
            }
        }
    }

    public func deliver(part: String, replyingTo message: InboundMessage) async throws {
        do {
            _ = try await reply(to: message, type: "text", content: ["text": part], uuid: Self.uuid(message: message, salt: "text\n" + part))
        } catch {
            throw error.delivery
        }
    }

    public func liveReply(to message: InboundMessage, reference: String?, begun: Bool) -> (any LiveReply)? {
        // A card an earlier attempt began is continued even when cards were switched off since.
        guard settings.cardMode != .off || begun else { return nil }
        return LarkCard(message: message, reference: reference.flatMap(LarkCard.Reference.decode), channel: self)
    }

    /// Replies to `message` with one message; returns the new message's id.
    func reply(to message: InboundMessage, type: String, content: [String: Any], uuid: String) async throws(LarkAPIError) -> String {
        guard let contentJSON = try? JSONSerialization.data(withJSONObject: content) else {
            throw LarkAPIError(code: 0, httpStatus: 0, isRetryable: false, mayHaveBeenSent: false, description: "the reply could not be encoded")
        }
        let body: [String: Any] = [
            "msg_type": type, "content": String(decoding: contentJSON, as: UTF8.self), "uuid": uuid,
            "reply_in_thread": settings.replyInThread,
        ]
        let path = "/open-apis/im/v1/messages/\(Self.pathSegment(message.messageID))/reply"
        do {
            let data = try await api.call(.POST, path, body: body, what: "reply")
            return data["message_id"] as? String ?? ""
        } catch where error.code == 200770 {
            // The uuid was used already: this reply is in the chat.
            logger.notice("Feishu reports this reply as sent already (uuid in use); not sending it again", metadata: ["message_id": "\(message.messageID)"])
            return ""
        }
    }

    /// The reply's idempotency key (≤ 50 characters): a hash of the app, the platform message id and what
    /// identifies the part, never a database row id (Feishu's uuids are not scoped to a chat, and row ids
    /// repeat after a database reset).
    static func uuid(message: InboundMessage, salt: String) -> String {
        let digest = SHA256.hash(data: Data("\(message.botID)\n\(message.messageID)\n\(salt)".utf8))
        return "cb-" + digest.prefix(20).lowercaseHex
    }

    /// A platform id as one URL path segment: ids are `om_…` and similar; anything else is percent-encoded.
    static func pathSegment(_ id: String) -> String {
        id.addingPercentEncoding(withAllowedCharacters: .alphanumerics.union(CharacterSet(charactersIn: "_-"))) ?? id
    }
}

