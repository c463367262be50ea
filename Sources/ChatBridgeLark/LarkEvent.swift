import ChatBridgeCore
import Foundation

/// A Feishu/Lark event body after decryption (protocols E.1, E.2): the URL-verification challenge, a
/// schema-2.0 event, or something else.
public enum LarkEvent: Sendable, Equatable {
    /// `type: url_verification`: answer `{"challenge": …}`.
    case challenge(String, token: String?)
    /// `im.message.receive_v1`.
    case message(LarkMessageEvent, token: String?)
    /// Any other event (its type), acknowledged and ignored.
    case other(String, token: String?)

    public struct Malformed: Error, Sendable, CustomStringConvertible {
        public var description: String
    }

    /// The event type (`url_verification` for the challenge).
    public var type: String {
        switch self {
        case .challenge: "url_verification"
        case .message: "im.message.receive_v1"
        case .other(let type, _): type
        }
    }

    /// The verification token the event carries (`header.token`, or the top-level `token`).
    public var token: String? {
        switch self {
        case .challenge(_, let token), .message(_, let token), .other(_, let token): token
        }
    }

    public static func decode(_ json: Data) throws(Malformed) -> LarkEvent {
        struct Wire: Decodable {
            struct Header: Decodable {
                var event_type: String?
                var token: String?
            }
            var type: String?
            var challenge: String?
            var token: String?
            var schema: String?
            var header: Header?
            var event: LarkMessageEvent.Wire?
        }
        let wire: Wire
        do {
            wire = try JSONDecoder().decode(Wire.self, from: json)
        } catch {
            throw Malformed(description: "not a Lark event (JSON object expected)")
        }
        if wire.type == "url_verification" {
            guard let challenge = wire.challenge, !challenge.isEmpty else { throw Malformed(description: "url_verification without a challenge") }
            return .challenge(challenge, token: wire.token)
        }
        let token = wire.header?.token ?? wire.token
        guard let type = wire.header?.event_type else { return .other(wire.type ?? "unknown", token: token) }
        guard type == "im.message.receive_v1" else { return .other(type, token: token) }
        guard let event = wire.event, let message = LarkMessageEvent(event) else {
            throw Malformed(description: "im.message.receive_v1 without a message id, chat id and sender")
        }
        return .message(message, token: token)
    }
}

/// One received message (E.2), as far as the bot needs it.
public struct LarkMessageEvent: Sendable, Equatable {
    public struct Mention: Sendable, Equatable {
        /// The placeholder in the text, `@_user_1`.
        public var key: String
        public var openID: String
        public var name: String
    }

    public var messageID: String
    public var chatID: String
    public var isGroup: Bool
    /// The thread the message belongs to: its root message (`root_id`, the thread's first message), else
    /// `thread_id`; nil for a message that starts no thread yet.
    public var threadID: String?
    public var messageType: String
    /// `content`: a JSON document encoded as a string.
    public var content: String
    public var mentions: [Mention]
    public var senderOpenID: String
    public var senderUserID: String?
    public var senderType: String
    public var createTime: Date?

    struct Wire: Decodable {
        struct Sender: Decodable {
            struct ID: Decodable {
                var open_id: String?
                var user_id: String?
                var union_id: String?
            }
            var sender_id: ID?
            var sender_type: String?
        }
        struct Message: Decodable {
            struct Mention: Decodable {
                var key: String?
                var id: Sender.ID?
                var name: String?
            }
            var message_id: String?
            var root_id: String?
            var thread_id: String?
            var chat_id: String?
            var chat_type: String?
            var message_type: String?
            var content: String?
            var create_time: String?
            var mentions: [Mention]?
        }
        var sender: Sender?
        var message: Message?
    }

    init?(_ wire: Wire) {
        guard let message = wire.message, let id = message.message_id, !id.isEmpty, let chat = message.chat_id, !chat.isEmpty,
            let sender = wire.sender?.sender_id?.open_id ?? wire.sender?.sender_id?.union_id, !sender.isEmpty
        else { return nil }
        messageID = id
        chatID = chat
        isGroup = message.chat_type != "p2p"
        threadID = [message.root_id, message.thread_id].compactMap { $0 }.first { !$0.isEmpty }
        messageType = message.message_type ?? "unknown"
        content = message.content ?? "{}"
        mentions = (message.mentions ?? []).compactMap { mention in
            guard let key = mention.key, let openID = mention.id?.open_id else { return nil }
            return Mention(key: key, openID: openID, name: mention.name ?? "")
        }
        senderOpenID = sender
        senderUserID = wire.sender?.sender_id?.user_id
        senderType = wire.sender?.sender_type ?? "user"
        createTime = message.create_time.flatMap(Double.init).map { Date(timeIntervalSince1970: $0 / 1000) }
    }

    /// Whether the bot itself is @-mentioned (by open_id: a renamed bot, or a user who shares its name,
    /// changes nothing).
    public func mentions(botOpenID: String) -> Bool { mentions.contains { $0.openID == botOpenID } }

    /// The message for the engine, or nil when it is not for the bot (a group message that does not
    /// mention it, when only mentions are answered).
    /// `botOpenID` may be nil (not known yet) only where it is not needed: direct chats, and groups when
    /// every message is answered.
    public func normalised(settings: LarkSettings, botOpenID: String?, receivedAt: Date) -> InboundMessage? {
        if isGroup, settings.groupReply == .mention, !(botOpenID.map(mentions(botOpenID:)) ?? false) { return nil }
        var chat = chatID
        // Answered in a thread, a message that is in none starts one rooted at itself: its thread's later
        // messages carry it as `root_id`, so they continue its conversation.
        if settings.replyInThread { chat += "#" + (threadID ?? messageID) }
        return InboundMessage(
            platform: "lark", botID: settings.appID, messageID: messageID,
            chat: .init(id: chat, kind: isGroup ? .group : .direct),
            sender: .init(id: senderOpenID, staffID: senderUserID, name: ""),
            body: body(botOpenID: botOpenID), sentAt: createTime ?? receivedAt)
    }

    /// Text and rich text become the question (mention placeholders replaced by names, the bot's own
    /// mention removed); anything else is named for the "I can only read text" reply.
    func body(botOpenID: String?) -> MessageBody {
        let object = (try? JSONSerialization.jsonObject(with: Data(content.utf8))) as? [String: Any] ?? [:]
        switch messageType {
        case "text":
            return .text(resolvingMentions(object["text"] as? String ?? "", botOpenID: botOpenID))
        case "post":
            return .text(resolvingMentions(Self.flatten(post: object), botOpenID: botOpenID))
        case "image": return .unsupported(kind: "image")
        case "media": return .unsupported(kind: "video")
        case "audio", "file", "sticker": return .unsupported(kind: messageType)
        default: return .unsupported(kind: messageType)
        }
    }

    private func resolvingMentions(_ text: String, botOpenID: String?) -> String {
        var text = text
        // Longest keys first, so @_user_1 does not eat the start of @_user_10.
        for mention in mentions.sorted(by: { $0.key.count > $1.key.count }) {
            if mention.openID == botOpenID {
                text = text.replacingOccurrences(of: mention.key + " ", with: "").replacingOccurrences(of: mention.key, with: "")
            } else {
                text = text.replacingOccurrences(of: mention.key, with: "@" + mention.name)
            }
        }
        return text.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Rich text (`post`) as plain text: the title, then each paragraph; code blocks kept fenced; pictures,
    /// media and emoji left out; `at` elements become their placeholder (resolved like text mentions).
    static func flatten(post object: [String: Any]) -> String {
        // Received posts carry `title`/`content` directly; sent ones may be keyed by locale.
        var post = object
        if post["content"] == nil, let localised = object.values.first(where: { ($0 as? [String: Any])?["content"] != nil }) as? [String: Any] {
            post = localised
        }
        var lines: [String] = []
        if let title = post["title"] as? String, !title.isEmpty { lines.append(title) }
        for paragraph in post["content"] as? [[[String: Any]]] ?? [] {
            var line = ""
            for element in paragraph {
                switch element["tag"] as? String {
                case "text", "a": line += element["text"] as? String ?? ""
                case "at": line += (element["user_id"] as? String).map { $0.hasPrefix("@_") ? $0 : "@" + (element["user_name"] as? String ?? $0) } ?? ""
                case "code_block":
                    let language = (element["language"] as? String ?? "").lowercased()
                    if !line.isEmpty {
                        lines.append(line)
                        line = ""
                    }
                    lines.append("```\(language)\n\(element["text"] as? String ?? "")\n```")
                case "hr": line += "---"
                default: break
                }
            }
            if !line.isEmpty { lines.append(line) }
        }
        return lines.joined(separator: "\n")
    }
}
