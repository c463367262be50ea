import ChatBridgeCore
import Crypto
import Foundation
import Logging
import NIOCore
import NIOFoundationCompat
import NIOHTTP1
import Synchronization

/// A DingTalk AI card that grows while the model writes (protocols D.1): created and delivered into the
/// chat, set "inputting", streamed with the whole text so far (`PUT /v1.0/card/streaming`, `isFull`, a new
/// `guid` on every call including retries), finalized, and finished with `flowStatus` 3 (or 5 for an error).
///
/// The card's `outTrackId` is derived from the robot and the platform's message id, so every attempt for
/// one message — a retry, a lease takeover, a restart after a crash — addresses the same card: creating it
/// again never puts a second card in the chat, and each update replaces its content.
public struct DingTalkCard: LiveReply {
    public let outTrackID: String
    let message: InboundMessage
    let channel: DingTalkReplyChannel
    let limiter: CardRateLimiter
    let problems: CardProblems

    /// `outTrackId` for the reply to `messageID` from `robotCode`: stable across attempts and restarts,
    /// different for every message and robot (not a database row id, which repeats after a reset).
    public static func outTrackID(robotCode: String, messageID: String) -> String {
        let digest = SHA256.hash(data: Data("\(robotCode)\n\(messageID)".utf8))
        return "chatbridge-" + digest.prefix(16).lowercaseHex
    }

    var settings: DingTalkSettings { channel.settings }
    var key: String { settings.card.contentKey }
    public var updateInterval: Duration { settings.card.updateInterval }

    /// Creates and delivers the card, then sets it inputting. Resuming, the card is set inputting first and
    /// created only when DingTalk does not know it, so an earlier attempt's card is never doubled.
    public func open(resuming: Bool) async throws {
        do {
            if resuming {
                do {
                    try await setInputting()
                    return
                } catch is CardMissing {}
            }
            try await createAndDeliver()
            try await setInputting()
        } catch let error as DeliveryError where !error.isRetryable {
            throw problems.permanent(error.reason)
        } catch let missing as CardMissing {
            throw DeliveryError(isRetryable: true, reason: missing.reason)
        }
    }

    private func setInputting() async throws {
        _ = try await call(.PUT, "/v1.0/card/instances", body: [
            "outTrackId": outTrackID,
            "cardData": ["cardParamMap": ["flowStatus": "2", key: ""]],
            "cardUpdateOptions": ["updateCardDataByKey": true],
        ], what: "card inputting")
    }

    private func createAndDeliver() async throws {
        var body: [String: Any] = [
            "cardTemplateId": settings.card.templateID, "outTrackId": outTrackID,
            "cardData": ["cardParamMap": ["flowStatus": "1", key: ""]],
            "callbackType": "STREAM", "userIdType": 1,
            "imGroupOpenSpaceModel": ["supportForward": true], "imRobotOpenSpaceModel": ["supportForward": true],
        ]
        switch message.chat.kind {
        case .group:
            body["openSpaceId"] = "dtv1.card//IM_GROUP.\(message.chat.id)"
            var deliver: [String: Any] = ["robotCode": settings.robotCode]
            if let staff = message.sender.staffID { deliver["atUserIds"] = [staff: message.sender.name.isEmpty ? staff : message.sender.name] }
            body["imGroupOpenDeliverModel"] = deliver
        case .direct:
            guard let staff = message.sender.staffID else {
                throw DeliveryError(isRetryable: false, reason: "a card cannot reach this user: the message has no senderStaffId")
            }
            body["openSpaceId"] = "dtv1.card//IM_ROBOT.\(staff)"
            body["imRobotOpenDeliverModel"] = ["spaceType": "IM_ROBOT", "robotCode": settings.robotCode]
        }
        let answer = try await call(.POST, "/v1.0/card/instances/createAndDeliver", body: body, what: "card createAndDeliver")
        struct Created: Decodable {
            struct Result: Decodable {
                struct Delivered: Decodable {
                    var success: Bool?
                    var errorMsg: String?
                }
                var deliverResults: [Delivered]?
            }
            var result: Result?
        }
        if let failed = (try? JSONDecoder().decode(Created.self, from: answer))?.result?.deliverResults?.first(where: { $0.success == false }) {
            throw DeliveryError(isRetryable: false, reason: "card createAndDeliver: DingTalk could not deliver the card (\(failed.errorMsg ?? "no reason given"))")
        }
    }

    /// An intermediate update is skipped when the process's card calls are queued up (the next update
    /// carries the whole text anyway), so opening and finishing cards never wait behind updates.
    public func update(_ text: String) async throws {
        guard limiter.hasRoom() else { throw DeliveryError(isRetryable: true, reason: "card update skipped: the card API rate (dingtalk.card.max_qps) is fully used") }
        do {
            try await stream(text, finalize: false, error: false)
        } catch let missing as CardMissing {
            throw DeliveryError(isRetryable: false, reason: missing.reason)
        }
    }

    public func finish(_ text: String) async throws { try await complete(text, status: "3", error: false) }

    public func fail(_ text: String) async throws { try await complete(text, status: "5", error: true) }

    /// The final streaming call, then the full-data PUT with the status and the whole text. The PUT alone
    /// shows the final text too, so a streaming call DingTalk refuses (a stream already finalized by an
    /// attempt that then crashed, a streaming permission withdrawn) does not stop the card from finishing.
    private func complete(_ text: String, status: String, error: Bool) async throws {
        do {
            do {
                try await stream(text, finalize: true, error: error)
            } catch let refused as DeliveryError where !refused.isRetryable {
                channel.logger.debug("the final card streaming call was refused; finishing with the full update", metadata: ["error": "\(refused)"])
            } catch is CardMissing {}
            try await setStatus(status, text: text)
        } catch let missing as CardMissing {
            throw problems.permanent(missing.reason)
        } catch let refused as DeliveryError where !refused.isRetryable {
            throw problems.permanent(refused.reason)
        }
    }

    private func stream(_ text: String, finalize: Bool, error: Bool) async throws {
        _ = try await call(.PUT, "/v1.0/card/streaming", what: finalize ? "card streaming (final)" : "card streaming") {
            [
                "outTrackId": outTrackID, "guid": UUID().uuidString.lowercased(), "key": key, "content": text,
                "isFull": true, "isFinalize": finalize, "isError": error,
            ]
        }
    }

    /// The finishing full update: the status and the whole text (a PUT without the text would blank it).
    private func setStatus(_ status: String, text: String) async throws {
        _ = try await call(.PUT, "/v1.0/card/instances", body: [
            "outTrackId": outTrackID,
            "cardData": ["cardParamMap": ["flowStatus": status, key: text]],
            "cardUpdateOptions": ["updateCardDataByKey": true],
        ], what: "card finish")
    }

    private func call(_ method: HTTPMethod, _ path: String, body: [String: Any], what: String) async throws -> Data {
        try await call(method, path, what: what) { body }
    }

    /// One card API call within the process's rate, with the access token; a QPS-limit answer waits and
    /// tries again with a fresh body (a new `guid`), a rejected token is renewed once. A failure is
    /// ``CardMissing`` (DingTalk does not know the card) or a ``DeliveryError``: retryable (transport, 5xx,
    /// QPS limit after the tries) or permanent (permission, unknown template, bad request).
    private func call(_ method: HTTPMethod, _ path: String, what: String, body: () -> [String: Any]) async throws -> Data {
        var qpsTries = 0
        var renewedToken = false
        while true {
            try await limiter.acquire()
            let token: String
            do {
                token = try await channel.tokens.token()
            } catch let error as AccessTokenCache.TokenError {
                throw DeliveryError(isRetryable: error.isRetryable, reason: error.description)
            }
            let payload = try JSONSerialization.data(withJSONObject: body())
            let (status, data): (Int, ByteBuffer?)
            do {
                (status, data) = try await channel.post(
                    settings.apiBaseURL + path, body: payload, headers: [("x-acs-dingtalk-access-token", token)], what: what, method: method)
            } catch let error as DeliveryError {
                // A card call only replaces what the card shows (and creating addresses the same card), so an
                // unknown outcome is simply retried.
                throw DeliveryError(isRetryable: true, reason: error.reason, retryAfter: error.retryAfter)
            }
            let bytes = data.map { Data(buffer: $0) } ?? Data()
            struct Failure: Decodable {
                var code: String?
                var message: String?
                var success: Bool?
            }
            let answer = try? JSONDecoder().decode(Failure.self, from: bytes)
            if (200..<300).contains(status), answer?.success != false { return bytes }
            let code = answer?.code ?? ""
            if code.contains("QpsLimit") {
                qpsTries += 1
                if qpsTries <= 3 {
                    try await Task.sleep(for: settings.card.qpsLimitPause)
                    continue
                }
                throw DeliveryError(isRetryable: true, reason: "\(what): DingTalk's card QPS limit (\(code)) persisted", retryAfter: settings.card.qpsLimitPause)
            }
            if (status == 401 || code.contains("InvalidAuthentication")) && !renewedToken {
                await channel.tokens.invalidate(token)
                renewedToken = true
                continue
            }
            let reason = "\(what) answered HTTP \(status)" + (code.isEmpty ? "" : " \(code)") + (answer?.message.map { ": \($0)" } ?? "")
            if status == 429 || status >= 500 || (200..<300).contains(status) {
                throw DeliveryError(isRetryable: true, reason: reason)
            }
            if status == 404 || code.lowercased().contains("notfound") || code.lowercased().contains("notexist") {
                throw CardMissing(reason: reason)
            }
            throw DeliveryError(isRetryable: false, reason: reason)
        }
    }
}

/// DingTalk does not know the card (404, or a code naming a card that does not exist).
struct CardMissing: Error {
    var reason: String
}

/// Permanent card errors are logged once per process with what to fix; every message still gets its answer.
final class CardProblems: Sendable {
    private let once: LogOnce
    private let templateID: String

    init(logger: Logger, templateID: String) {
        once = LogOnce(logger: logger)
        self.templateID = templateID
    }

    func permanent(_ reason: String) -> DeliveryError {
        once.error(
            reason,
            "DingTalk refused the AI card; answering with markdown instead. Check that dingtalk.card.template_id is an AI-card template of this app with the streaming variable dingtalk.card.content_key, and that the app has the card permissions (Card.Instance.Write and Card.Streaming.Write) and the robot send permission",
            metadata: ["reason": "\(reason)", "template": "\(templateID)"])
        return DeliveryError(isRetryable: false, reason: reason)
    }
}

/// Spaces card API calls so the process stays within `max_qps` in every second, across all cards (with a
/// 5 % margin for network jitter).
public final class CardRateLimiter: Sendable {
    private let spacing: Duration
    private let next = Mutex<ContinuousClock.Instant?>(nil)

    public init(maxQPS: Int) {
        spacing = .seconds(1) * 1.05 / max(maxQPS, 1)
    }

    /// Whether a call now would go out after only a short wait (at most five slots) behind others.
    func hasRoom() -> Bool {
        let now = ContinuousClock().now
        return next.withLock { ($0 ?? now) <= now.advanced(by: spacing * 5) }
    }

    /// Returns when the next call may go out: the slot it was given.
    /// Throws `CancellationError` when the task is cancelled while it waits (the call is not made).
    @discardableResult
    public func acquire() async throws -> ContinuousClock.Instant {
        let clock = ContinuousClock()
        let slot = next.withLock { next -> ContinuousClock.Instant in
            let now = clock.now
            let slot = max(now, next ?? now)
            next = slot.advanced(by: spacing)
            return slot
        }
        if slot > clock.now { try await clock.sleep(until: slot) }
        return slot
    }
}
