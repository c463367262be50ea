import ChatBridgeCore
import Foundation
import Logging
import Metrics

/// Why the ingress refused a delivery, and what the transport should answer.
public struct IngressRejection: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// Not from DingTalk, or not for this robot: HTTP 401.
        case unauthorized
        /// Malformed: HTTP 400.
        case badRequest
        /// This robot is not configured yet: HTTP 503.
        case notConfigured
    }
    public var kind: Kind
    public var reason: String
    public init(_ kind: Kind, _ reason: String) {
        self.kind = kind
        self.reason = reason
    }
    public var description: String { reason }
}

/// DingTalk robot messages in, whatever the transport: verify → decode → check the robot → normalise →
/// store in the inbox. It returns only after the inbox commit, so the transport acknowledges (HTTP 200 or
/// a Stream-mode ACK) a message that is safely stored and never one that is not.
///
/// The signature of an HTTP callback covers only its timestamp, so a leaked `timestamp`/`sign` pair could
/// carry any body for an hour; the body must therefore name this robot (`robotCode`, and `chatbotCorpId`
/// when `dingtalk.corp_id` is set), and a sessionWebhook not of the documented form is dropped here and
/// never requested.
public struct DingTalkIngress: Sendable {
    public let settings: DingTalkSettings
    private let groupScope: GroupScope
    private let inbox: any Inbox
    private let clock: any WallClock
    private let onAccepted: @Sendable () -> Void
    private let logger: Logger
    private let received: Counter
    private let duplicates: Counter
    private let rejected: Counter

    public init(
        settings: DingTalkSettings, groupScope: GroupScope, inbox: any Inbox, clock: any WallClock,
        metrics: any MetricsFactory = MetricsSystem.factory, logger: Logger, onAccepted: @escaping @Sendable () -> Void
    ) {
        self.settings = settings
        self.groupScope = groupScope
        self.inbox = inbox
        self.clock = clock
        self.onAccepted = onAccepted
        self.logger = logger
        received = Counter(label: "chatbridge_messages_received_total", dimensions: [("platform", "dingtalk")], factory: metrics)
        duplicates = Counter(label: "chatbridge_messages_deduplicated_total", dimensions: [("platform", "dingtalk")], factory: metrics)
        rejected = Counter(label: "chatbridge_callbacks_rejected_total", dimensions: [("platform", "dingtalk")], factory: metrics)
    }

    /// Throws `.notConfigured` until the robot can be verified.
    public func checkConfigured() throws(IngressRejection) {
        if let problem = settings.callbackConfigurationProblem { throw IngressRejection(.notConfigured, problem) }
    }

    /// Verifies an HTTP callback's `timestamp` and `sign` headers. Cheap; call it before reading the body.
    public func authenticate(timestamp: String?, sign: String?) throws(IngressRejection) {
        try checkConfigured()
        do {
            try DingTalkSignature.verify(timestamp: timestamp, sign: sign, secret: settings.clientSecret, now: clock.now)
        } catch {
            throw reject(.unauthorized, "invalid signature: \(error)")
        }
    }

    /// Decodes, checks and stores one robot message from an authenticated sender (a verified HTTP callback,
    /// or the Stream-mode connection). Throws ``IngressRejection`` for a message that must not be stored,
    /// any other error when the inbox could not store it (answer 503 / do not acknowledge).
    public func receive(_ body: Data) async throws -> AcceptOutcome {
        try checkConfigured()
        let payload: DingTalkMessage
        do {
            payload = try DingTalkMessage.decode(body)
        } catch {
            throw reject(.badRequest, error.description)
        }
        guard payload.robotCode == settings.robotCode else {
            throw reject(.unauthorized, "the message is not for this robot (robotCode does not match dingtalk.robot_code)")
        }
        if let corp = settings.corpID, payload.chatbotCorpId != corp {
            throw reject(.unauthorized, "the message is not from this organisation (chatbotCorpId does not match dingtalk.corp_id)")
        }
        var message = payload.normalised(botID: settings.robotCode, receivedAt: clock.now)
        if let webhook = message.reply.webhookURL, !settings.allowsWebhook(webhook) {
            // Never requested: replies go through the OpenAPI instead.
            logger.notice(
                "ignoring a sessionWebhook that is not an allowed https://<host>/robot/sendBySession address",
                metadata: ["host": "\(URLComponents(string: webhook)?.host ?? "?")", "message_id": "\(message.messageID)"])
            message.reply = .init()
        }
        let outcome = try await inbox.accept(message, conversation: ConversationKey(for: message, groupScope: groupScope), now: clock.now)
        switch outcome {
        case .accepted:
            received.increment()
            onAccepted()
        case .duplicate:
            duplicates.increment()
            logger.info("re-delivery acknowledged", metadata: ["message_id": "\(message.messageID)"])
        }
        return outcome
    }

    /// Counts and logs a rejection made by the transport itself (an oversized body).
    public func noteRejected(_ reason: String) {
        rejected.increment()
        logger.notice("rejected DingTalk callback", metadata: ["reason": "\(reason)"])
    }

    private func reject(_ kind: IngressRejection.Kind, _ reason: String) -> IngressRejection {
        noteRejected(reason)
        return IngressRejection(kind, reason)
    }
}
