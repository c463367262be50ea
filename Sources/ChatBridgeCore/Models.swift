import Foundation

/// Whether a chat is a one-to-one conversation with the bot or a group.
public enum ChatKind: String, Codable, Sendable {
    case direct
    case group
}

/// What a user sent, reduced to what the engine can act on.
public enum MessageBody: Codable, Sendable, Equatable {
    /// Text the bot can answer (typed text, speech recognised by the platform, rich-text segments).
    case text(String)
    /// Something the bot cannot read (picture, file, video, …); `kind` names it for the reply.
    case unsupported(kind: String)
}

/// A platform message after verification and normalisation. Platform types never travel past ingress.
public struct InboundMessage: Codable, Sendable, Equatable {
    public struct Chat: Codable, Sendable, Equatable {
        public var id: String
        public var kind: ChatKind
        public var title: String?
        public init(id: String, kind: ChatKind, title: String? = nil) {
            self.id = id
            self.kind = kind
            self.title = title
        }
    }

    public struct Sender: Codable, Sendable, Equatable {
        /// The platform's stable id of the sender.
        public var id: String
        /// The organisation user id (DingTalk staffId), when the platform gives one.
        public var staffID: String?
        public var name: String
        public init(id: String, staffID: String? = nil, name: String) {
            self.id = id
            self.staffID = staffID
            self.name = name
        }
    }

    /// How to answer: a short-lived reply address and its expiry, when the platform gives one.
    public struct ReplyRoute: Codable, Sendable, Equatable {
        public var webhookURL: String?
        public var webhookExpiresAt: Date?
        public init(webhookURL: String? = nil, webhookExpiresAt: Date? = nil) {
            self.webhookURL = webhookURL
            self.webhookExpiresAt = webhookExpiresAt
        }
    }

    public var platform: String
    public var botID: String
    public var messageID: String
    public var chat: Chat
    public var sender: Sender
    public var body: MessageBody
    public var reply: ReplyRoute
    public var sentAt: Date

    public init(
        platform: String, botID: String, messageID: String, chat: Chat, sender: Sender,
        body: MessageBody, reply: ReplyRoute = .init(), sentAt: Date
    ) {
        self.platform = platform
        self.botID = botID
        self.messageID = messageID
        self.chat = chat
        self.sender = sender
        self.body = body
        self.reply = reply
        self.sentAt = sentAt
    }
}

/// How group members share context.
public enum GroupScope: String, Codable, Sendable, CaseIterable {
    /// Each person in a group has their own thread.
    case user
    /// The whole group shares one thread.
    case chat
}

/// Identifies one conversation thread: `platform/bot/chat/user`, or `platform/bot/chat` for shared groups.
public struct ConversationKey: Hashable, Sendable, Codable, CustomStringConvertible {
    public var rawValue: String
    public init(rawValue: String) { self.rawValue = rawValue }

    public init(for message: InboundMessage, groupScope: GroupScope) {
        var parts = [message.platform, message.botID, message.chat.id]
        if message.chat.kind == .direct || groupScope == .user {
            parts.append(message.sender.id)
        }
        self.rawValue = parts.joined(separator: "/")
    }

    public var description: String { rawValue }
}

/// One side of a question/answer exchange.
public struct Turn: Sendable, Equatable, Codable {
    public enum Role: String, Sendable, Codable {
        case user
        case assistant
    }

    public var role: Role
    public var content: String
    public var tokens: Int
    public var createdAt: Date

    public init(role: Role, content: String, tokens: Int? = nil, createdAt: Date) {
        self.role = role
        self.content = content
        self.tokens = tokens ?? TokenEstimator.estimate(content)
        self.createdAt = createdAt
    }
}

/// What an answered message changes in its conversation. It is stored with the reply and applied in the
/// same transaction that marks the message answered, so the context holds only what the user received.
public enum ConversationEffect: Sendable, Equatable, Codable {
    case none
    /// Append the question and the answer as two turns.
    case appendExchange(question: Turn, answer: Turn)
    /// Start a fresh context.
    case reset(at: Date)
    /// Start a fresh context and forget the conversation's persona, model and system prompt.
    case resetAll(at: Date)
    /// Replace the conversation's persona, model and system prompt.
    case preferences(ConversationPreferences)
    /// Nothing changes in the conversation, and the message's text is removed from the inbox: it carried a
    /// secret (`/donate KEY`).
    case forgetQuestion
}

/// The engine's result for one message: the text to deliver and its effect on the conversation.
public struct Resolution: Sendable, Equatable {
    public var text: String
    public var effect: ConversationEffect
    public init(text: String, effect: ConversationEffect) {
        self.text = text
        self.effect = effect
    }
}

/// A reply stored on its inbox row before delivery, so a retry after a crash re-sends it without asking
/// the model again.
public struct StoredReply: Sendable, Equatable {
    public enum Kind: String, Sendable, Codable {
        /// The answer (or a command's reply): the message ends answered.
        case answer
        /// The reply telling the user why there is no answer: the message ends failed.
        case error
    }

    public var text: String
    public var kind: Kind
    /// Applied to the conversation once every part of `text` was delivered.
    public var effect: ConversationEffect

    public init(text: String, kind: Kind, effect: ConversationEffect) {
        self.text = text
        self.kind = kind
        self.effect = effect
    }
}
