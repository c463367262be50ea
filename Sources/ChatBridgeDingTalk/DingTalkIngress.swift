import ChatBridgeCore
import Foundation
import Logging
import Metrics

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
    private let clock: any WallClock
    private let logger: Logger
    private let intake: InboxIntake

    public init(
        settings: DingTalkSettings, groupScope: GroupScope, inbox: any Inbox, clock: any WallClock,
        metrics: any MetricsFactory = MetricsSystem.factory, logger: Logger, onAccepted: @escaping @Sendable () -> Void
    ) {
        self.settings = settings
        self.clock = clock
        self.logger = logger
        intake = InboxIntake(
            platform: "dingtalk", groupScope: groupScope, inbox: inbox, clock: clock, metrics: metrics, logger: logger, onAccepted: onAccepted)
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
        return try await intake.accept(message)
    }

    /// Counts and logs a rejection made by the transport itself (an oversized body).
    public func noteRejected(_ reason: String) { _ = intake.reject(.badRequest, reason) }

    private func reject(_ kind: IngressRejection.Kind, _ reason: String) -> IngressRejection { intake.reject(kind, reason) }
}
