import ChatBridgeCore
import Foundation
import Logging
import Metrics

/// What the webhook route answers after ``LarkWebhookIngress/receive(body:timestamp:nonce:signature:)``.
public enum LarkWebhookOutcome: Sendable, Equatable {
    /// URL verification: answer 200 `{"challenge": …}`.
    case challenge(String)
    /// Stored (or a duplicate of a stored message): answer 200.
    case stored(AcceptOutcome)
    /// Authentic but not for the bot (another event type, a group message that does not mention it): 200.
    case ignored(String)
}

/// Feishu/Lark events over HTTPS (protocols E.1), whatever the HTTP framework: decrypt → challenge →
/// verify the signature (when an encrypt key is set) and the verification token → normalise → store.
/// It returns only after the inbox commit, so the route answers 200 for a message that is safely stored.
///
/// The challenge is answered before the signature check: Feishu sends it encrypted but unsigned (its
/// token is still checked). Every other event must be signed when `lark.encrypt_key` is set.
public struct LarkWebhookIngress: Sendable {
    public let settings: LarkSettings
    private let clock: any WallClock
    private let botOpenID: @Sendable () async -> String?
    private let logger: Logger
    private let intake: InboxIntake

    /// `botOpenID`: the bot's own open_id (from `/open-apis/bot/v3/info`), nil while it is not known.
    public init(
        settings: LarkSettings, groupScope: GroupScope, inbox: any Inbox, clock: any WallClock,
        botOpenID: @escaping @Sendable () async -> String?, metrics: any MetricsFactory = MetricsSystem.factory, logger: Logger,
        onAccepted: @escaping @Sendable () -> Void
    ) {
        self.settings = settings
        self.clock = clock
        self.botOpenID = botOpenID
        self.logger = logger
        intake = InboxIntake(
            platform: "lark", groupScope: groupScope, inbox: inbox, clock: clock, metrics: metrics, logger: logger, onAccepted: onAccepted)
    }

    /// Handles one webhook delivery. `body` is the raw request body exactly as received; the headers are
    /// `X-Lark-Request-Timestamp`, `X-Lark-Request-Nonce` and `X-Lark-Signature`. Throws
    /// (``IngressRejection``) for a delivery that must not be stored, any other error when the inbox could
    /// not store it (503).
    public func receive(body: Data, timestamp: String?, nonce: String?, signature: String?) async throws -> LarkWebhookOutcome {
        guard settings.isEnabled else {
            throw reject(.notConfigured, "Lark is not configured: set lark.app_id and lark.app_secret (CHATBRIDGE_LARK_APP_ID, CHATBRIDGE_LARK_APP_SECRET)")
        }
        if let problem = settings.webhookConfigurationProblem { throw reject(.notConfigured, problem) }
        // With an encrypt key, the signature over the raw bytes is checked before anything is decrypted, and
        // an unsigned body (only the challenge may come unsigned) gets one answer whatever fails, so the
        // decryption cannot be probed (no padding oracle).
        let keyed = !settings.encryptKey.isEmpty
        let signed = keyed && LarkCrypto.verify(signature: signature, timestamp: timestamp, nonce: nonce, encryptKey: settings.encryptKey, body: body)
        if keyed, signature != nil, !signed { throw reject(.unauthorized, "the event's X-Lark-Signature is wrong") }
        let unsigned = "the event is not signed (X-Lark-Signature)"
        func malformed(_ reason: String) -> IngressRejection { keyed && !signed ? reject(.unauthorized, unsigned) : reject(.badRequest, reason) }
        guard let outer = try? JSONDecoder().decode(EncryptedEnvelope.self, from: body) else { throw malformed("the body is not a JSON object") }
        var json = body
        if let encrypted = outer.encrypt {
            guard keyed else { throw reject(.badRequest, "the event is encrypted but lark.encrypt_key is not set") }
            do {
                json = try LarkCrypto.decrypt(encrypted, encryptKey: settings.encryptKey)
            } catch {
                throw malformed(error.description)
            }
        } else if keyed {
            // With an encrypt key Feishu encrypts everything; a plain body is not from Feishu.
            throw reject(.unauthorized, "a plain event although lark.encrypt_key is set")
        }
        let event: LarkEvent
        do {
            event = try LarkEvent.decode(json)
        } catch {
            throw malformed(error.description)
        }
        if case .challenge(let challenge, let token) = event {
            try checkToken(token)
            return .challenge(challenge)
        }
        if keyed, !signed { throw reject(.unauthorized, unsigned) }
        try checkToken(event.token)
        return try await storeIfMessage(event)
    }

    /// Handles one event from the long connection, which is authenticated when it connects: the payload
    /// is the E.2 JSON (decrypted first if it comes encrypted). Throws like ``receive(body:timestamp:nonce:signature:)``.
    public func receiveTrusted(_ payload: Data) async throws -> LarkWebhookOutcome {
        var json = payload
        if let encrypted = (try? JSONDecoder().decode(EncryptedEnvelope.self, from: payload))?.encrypt {
            // A settings problem, not a bad event: answered so that Feishu pushes it again, and stored once
            // the admin has set the key.
            guard !settings.encryptKey.isEmpty else {
                throw reject(.unavailable, "an encrypted event although lark.encrypt_key is not set; set it to the app's Encrypt Key (Events & Callbacks)")
            }
            do {
                json = try LarkCrypto.decrypt(encrypted, encryptKey: settings.encryptKey)
            } catch {
                throw reject(.unavailable, "an event that lark.encrypt_key does not decrypt (\(error.description)); check it against the app's Encrypt Key")
            }
        }
        let event: LarkEvent
        do {
            event = try LarkEvent.decode(json)
        } catch {
            throw reject(.badRequest, error.description)
        }
        return try await storeIfMessage(event)
    }

    /// `{"encrypt": …}`: how an encrypted event arrives.
    private struct EncryptedEnvelope: Decodable { var encrypt: String? }

    /// Stores an authenticated event when it is a message; other event types are acknowledged and ignored.
    private func storeIfMessage(_ event: LarkEvent) async throws -> LarkWebhookOutcome {
        guard case .message(let message, _) = event else {
            logger.debug("ignoring a Lark event", metadata: ["type": "\(event.type)"])
            return .ignored(event.type)
        }
        return try await store(message)
    }

    /// Stores one authenticated message event (also the long connection's way in).
    public func store(_ event: LarkMessageEvent) async throws -> LarkWebhookOutcome {
        guard event.senderType == "user" else { return .ignored("a message from \(event.senderType)") }
        // Only a group message answered on mention needs the bot's own open_id to decide; nothing else waits
        // for it in the acknowledgement path.
        let needsBot = event.isGroup && settings.groupReply == .mention
        let bot = needsBot ? await botOpenID() : nil
        if bot == nil, needsBot {
            throw reject(.unavailable, "the bot's own open_id is not known yet (GET /open-apis/bot/v3/info); Feishu re-pushes the event")
        }
        guard let message = event.normalised(settings: settings, botOpenID: bot, receivedAt: clock.now) else {
            return .ignored("a group message that does not mention the bot")
        }
        return .stored(try await intake.accept(message))
    }

    private func checkToken(_ token: String?) throws(IngressRejection) {
        guard !settings.verificationToken.isEmpty else { return }
        guard let token, constantTimeEqual(Array(token.utf8), Array(settings.verificationToken.utf8)) else {
            throw reject(.unauthorized, "the event's verification token does not match lark.verification_token")
        }
    }

    /// Counts and logs a rejection made by the transport itself (an oversized body).
    public func noteRejected(_ reason: String) { _ = intake.reject(.badRequest, reason) }

    private func reject(_ kind: IngressRejection.Kind, _ reason: String) -> IngressRejection { intake.reject(kind, reason) }
}
