import ChatBridgeCore
import Foundation

/// A robot message as DingTalk delivers it (HTTP callback body, or Stream-mode `data`).
public struct DingTalkMessage: Decodable, Sendable {
    public struct Text: Decodable, Sendable { public var content: String? }
    public struct Content: Decodable, Sendable {
        public struct Segment: Decodable, Sendable {
            public var text: String?
            public var type: String?
        }
        public var recognition: String?
        public var richText: [Segment]?
        public var fileName: String?
    }

    public var msgtype: String?
    public var text: Text?
    public var content: Content?
    public var msgId: String?
    public var createAt: Int64?
    public var conversationType: String?
    public var conversationId: String?
    public var conversationTitle: String?
    public var senderId: String?
    public var senderStaffId: String?
    public var senderNick: String?
    public var robotCode: String?
    public var chatbotCorpId: String?
    public var chatbotUserId: String?
    public var sessionWebhook: String?
    public var sessionWebhookExpiredTime: Int64?

    private enum CodingKeys: String, CodingKey {
        case msgtype, text, content, msgId, createAt, conversationType, conversationId, conversationTitle, senderId
        case senderStaffId, senderNick, robotCode, chatbotCorpId, chatbotUserId, sessionWebhook, sessionWebhookExpiredTime
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        msgtype = try? c.decodeIfPresent(String.self, forKey: .msgtype)
        text = try? c.decodeIfPresent(Text.self, forKey: .text)
        content = try? c.decodeIfPresent(Content.self, forKey: .content)
        msgId = try? c.decodeIfPresent(String.self, forKey: .msgId)
        createAt = Self.lenientInt(c, .createAt)
        conversationType = (try? c.decodeIfPresent(String.self, forKey: .conversationType))
            ?? Self.lenientInt(c, .conversationType).map(String.init)
        conversationId = try? c.decodeIfPresent(String.self, forKey: .conversationId)
        conversationTitle = try? c.decodeIfPresent(String.self, forKey: .conversationTitle)
        senderId = try? c.decodeIfPresent(String.self, forKey: .senderId)
        senderStaffId = try? c.decodeIfPresent(String.self, forKey: .senderStaffId)
        senderNick = try? c.decodeIfPresent(String.self, forKey: .senderNick)
        robotCode = try? c.decodeIfPresent(String.self, forKey: .robotCode)
        chatbotCorpId = try? c.decodeIfPresent(String.self, forKey: .chatbotCorpId)
        chatbotUserId = try? c.decodeIfPresent(String.self, forKey: .chatbotUserId)
        sessionWebhook = try? c.decodeIfPresent(String.self, forKey: .sessionWebhook)
        sessionWebhookExpiredTime = Self.lenientInt(c, .sessionWebhookExpiredTime)
    }

    private static func lenientInt(_ c: KeyedDecodingContainer<CodingKeys>, _ key: CodingKeys) -> Int64? {
        if let value = try? c.decodeIfPresent(Int64.self, forKey: key) { return value }
        if let string = try? c.decodeIfPresent(String.self, forKey: key) { return Int64(string) }
        return nil
    }

    /// Why a body cannot be turned into a message.
    public struct Invalid: Error, Equatable, CustomStringConvertible {
        public var description: String
        public init(description: String) { self.description = description }
    }

    /// Decodes and validates a callback body.
    public static func decode(_ body: Data) throws(Invalid) -> DingTalkMessage {
        let message: DingTalkMessage
        do {
            message = try JSONDecoder().decode(DingTalkMessage.self, from: body)
        } catch {
            throw Invalid(description: "body is not a JSON object")
        }
        var missing: [String] = []
        if message.msgId?.isEmpty ?? true { missing.append("msgId") }
        if message.conversationId?.isEmpty ?? true { missing.append("conversationId") }
        if message.msgtype?.isEmpty ?? true { missing.append("msgtype") }
        if (message.senderId?.isEmpty ?? true) && (message.senderStaffId?.isEmpty ?? true) { missing.append("senderId") }
        if !missing.isEmpty {
            throw Invalid(description: "body is missing \(missing.joined(separator: ", "))")
        }
        return message
    }

    /// The normalised message. `botID` is the configured robot code (the ingress has checked the body's).
    public func normalised(botID: String, receivedAt: Date) -> InboundMessage {
        let kind: ChatKind = conversationType == "2" ? .group : .direct
        return InboundMessage(
            platform: "dingtalk",
            botID: botID,
            messageID: msgId ?? "",
            chat: .init(id: conversationId ?? "", kind: kind, title: conversationTitle),
            sender: .init(
                id: (senderId?.isEmpty == false ? senderId! : senderStaffId ?? ""),
                staffID: senderStaffId?.isEmpty == false ? senderStaffId : nil,
                name: senderNick ?? ""),
            body: body,
            reply: .init(
                webhookURL: sessionWebhook,
                webhookExpiresAt: sessionWebhookExpiredTime.map { Date(timeIntervalSince1970: Double($0) / 1000) }),
            sentAt: createAt.map { Date(timeIntervalSince1970: Double($0) / 1000) } ?? receivedAt
        )
    }

    var body: MessageBody {
        switch msgtype ?? "" {
        case "text":
            return .text((text?.content ?? "").trimmed)
        case "audio":
            if let recognition = content?.recognition?.trimmed, !recognition.isEmpty {
                return .text(recognition)
            }
            return .unsupported(kind: "audio")
        case "richText":
            let joined = (content?.richText ?? []).compactMap(\.text).joined(separator: "\n").trimmed
            return joined.isEmpty ? .unsupported(kind: "picture") : .text(joined)
        case let other:
            return .unsupported(kind: other)
        }
    }
}
