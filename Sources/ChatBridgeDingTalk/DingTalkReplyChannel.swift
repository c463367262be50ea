import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeHTTP
import Foundation
import Logging
import NIOCore
import NIOFoundationCompat
import NIOHTTP1

/// Delivers answers to DingTalk: markdown through the message's sessionWebhook while it is valid and
/// allowed, else through the robot OpenAPI. Long answers go as numbered parts, in order.
///
/// Every failure says whether DingTalk may have accepted the message anyway. Only a send known not to
/// have been delivered (refused before sending, an error status, a non-zero `errcode`) falls back to the
/// OpenAPI within the same attempt; a timeout or a broken answer after the request went out is reported
/// as possibly delivered and is never re-sent through another route.
public struct DingTalkReplyChannel: ReplyChannel {
    public let settings: DingTalkSettings
    public let tokens: AccessTokenCache
    private let client: HTTPClient
    let logger: Logger
    /// The deadline of one request to DingTalk; keep it well under `worker.lease`.
    private let requestTimeout: Duration
    /// A webhook that expires sooner than this is not used.
    private let expiryMargin: TimeInterval = 10
    /// How long to wait before retrying a recipient DingTalk reported as flow-controlled.
    static let flowControlPause: Duration = .seconds(30)

    public init(
        settings: DingTalkSettings, client: HTTPClient, tokens: AccessTokenCache? = nil, requestTimeout: Duration = .seconds(15), logger: Logger
    ) {
        self.settings = settings
        self.client = client
        self.requestTimeout = requestTimeout
        self.tokens = tokens ?? AccessTokenCache(settings: settings, client: client)
        self.logger = logger
        cardLimiter = CardRateLimiter(maxQPS: settings.card.maxQPS)
        cardProblems = CardProblems(logger: logger, templateID: settings.card.templateID)
    }

    /// Card API calls of the whole process share this rate (`dingtalk.card.max_qps`).
    private let cardLimiter: CardRateLimiter
    private let cardProblems: CardProblems

    /// With `dingtalk.card.template_id` set (and OpenAPI credentials), every answer streams into an AI card.
    public func liveReply(to message: InboundMessage, reference: String?, begun: Bool) -> (any LiveReply)? {
        // A card an earlier attempt began is continued even when cards were switched off since.
        guard settings.card.isEnabled || begun, settings.hasOpenAPICredentials else { return nil }
        return DingTalkCard(
            outTrackID: DingTalkCard.outTrackID(robotCode: settings.robotCode, messageID: message.messageID), message: message,
            channel: self, limiter: cardLimiter, problems: cardProblems)
    }

    public func parts(of text: String, replyingTo message: InboundMessage) -> [String] {
        let parts = TextSplitter(maxCharacters: max(settings.maxMessageChars - 16, 16)).split(text)
        guard parts.count > 1 else { return parts }
        return parts.enumerated().map { index, part in "(\(index + 1)/\(parts.count))\n\n" + part }
    }

    public func deliver(part text: String, replyingTo message: InboundMessage) async throws {
        let title = Self.title(for: text)
        if let webhook = message.reply.webhookURL, !webhook.isEmpty {
            let expired = message.reply.webhookExpiresAt.map { $0.timeIntervalSinceNow < expiryMargin } ?? false
            if !settings.allowsWebhook(webhook) {
                logger.warning(
                    "sessionWebhook not allowed; not requested",
                    metadata: ["host": "\(URLComponents(string: webhook)?.host ?? "?")", "message_id": "\(message.messageID)"])
            } else if !expired {
                do {
                    try await sendWebhook(webhook, text: text, title: title, message: message)
                    return
                } catch let error as DeliveryError where !error.mayHaveBeenDelivered && settings.hasOpenAPICredentials {
                    logger.warning("sessionWebhook failed; using the OpenAPI", metadata: ["error": "\(error)", "message_id": "\(message.messageID)"])
                }
            }
        }
        guard settings.hasOpenAPICredentials else {
            logger.error("reply undeliverable: no usable sessionWebhook and no OpenAPI credentials", metadata: ["message_id": "\(message.messageID)"])
            throw DeliveryError(isRetryable: false, reason: "undeliverable: no usable sessionWebhook and dingtalk.client_id/client_secret not set")
        }
        try await sendOpenAPI(text: text, title: title, message: message)
    }

    private static let encoder = JSONEncoder()

    static func title(for text: String) -> String {
        let firstLine = text.split(whereSeparator: \.isNewline).first.map(String.init) ?? ""
        let plain = firstLine.filter { !"#*`>_[]()".contains($0) }.trimmedOfSpaces
        return plain.isEmpty ? "Reply" : String(plain.prefix(24))
    }

    // MARK: Exchanges

    /// Posts `body` and reads the answer, turning transport failures into ``DeliveryError``s that say
    /// whether the request can have reached DingTalk.
    func post(
        _ url: String, body: Data, headers: [(String, String)] = [], what: String, method: HTTPMethod = .POST
    ) async throws -> (status: Int, body: ByteBuffer?) {
        var request = HTTPClientRequest(url: url)
        request.method = method
        request.headers.add(name: "Content-Type", value: "application/json")
        for (name, value) in headers { request.headers.add(name: name, value: value) }
        request.body = .bytes(ByteBuffer(data: body))
        let response: HTTPClientResponse
        do {
            response = try await client.execute(request, timeout: .init(requestTimeout))
        } catch {
            if error is CancellationError { throw error }
            let failure = TransportFailure(error)
            let reason = "\(what) to \(OutboundHTTP.hostDescription(url)) failed: \(failure)"
            throw failure.requestMayHaveBeenSent ? DeliveryError.uncertain(reason) : DeliveryError(isRetryable: true, reason: reason)
        }
        let status = Int(response.status.code)
        do {
            return (status, try await response.body.collect(upTo: 64 * 1024))
        } catch {
            if error is CancellationError { throw error }
            // The head arrived; only a success status leaves the outcome open.
            if (200..<300).contains(status) {
                throw DeliveryError.uncertain("\(what) answered HTTP \(status) but its body could not be read: \(TransportFailure(error))")
            }
            return (status, nil)
        }
    }

    /// Classifies a non-2xx status shared by both routes.
    func statusFailure(_ status: Int, code: String, message: String, what: String) -> DeliveryError {
        let reason = "\(what) answered HTTP \(status)" + (code.isEmpty ? "" : " \(code)") + (message.isEmpty ? "" : ": \(message)")
        switch status {
        case 300..<400:
            return DeliveryError(isRetryable: false, reason: reason + " (a redirect, not followed)")
        case 429:
            return DeliveryError(isRetryable: true, reason: reason)
        case 403 where code.contains("QpsLimit"):
            return DeliveryError(isRetryable: true, reason: reason)
        case 502, 504:
            // A gateway's answer: DingTalk behind it may have sent the message.
            return DeliveryError.uncertain(reason)
        case 500..<600:
            return DeliveryError(isRetryable: true, reason: reason)
        default:
            return DeliveryError(isRetryable: false, reason: reason)
        }
    }

    // MARK: sessionWebhook

    /// Legacy `errcode`s that mean "try again later" and those that mean the gateway timed out with the
    /// outcome unknown (protocols B.4); every other non-zero code is permanent for this webhook.
    static let retryableWebhookCodes: Set<Int> = [-1, 130101, 410100]
    static let uncertainWebhookCodes: Set<Int> = [15, 88]

    private func sendWebhook(_ url: String, text: String, title: String, message: InboundMessage) async throws {
        // Encoded from a type, not a dictionary: JSONSerialization bridged through NSDictionary and was
        // 2.8% of the server's CPU per answer in a profile of `chatbridge bench`.
        struct Body: Encodable {
            struct Markdown: Encodable {
                var title: String
                var text: String
            }
            struct At: Encodable {
                var atUserIds: [String]
                var isAtAll = false
            }
            var msgtype = "markdown"
            var markdown: Markdown
            var at: At?
        }
        var body = Body(markdown: .init(title: title, text: text))
        if message.chat.kind == .group, let staff = message.sender.staffID {
            body.markdown.text = "@\(staff) " + text
            body.at = .init(atUserIds: [staff])
        }
        let (status, data) = try await post(url, body: try Self.encoder.encode(body), what: "sessionWebhook")
        struct Reply: Decodable {
            var errcode: Int?
            var errmsg: String?
        }
        guard (200..<300).contains(status) else {
            throw statusFailure(status, code: "", message: "", what: "sessionWebhook")
        }
        guard let data, let reply = try? JSONDecoder().decode(Reply.self, from: Data(buffer: data)), let code = reply.errcode else {
            // DingTalk always answers {"errcode":…}; something else answered, and may have passed the message on.
            throw DeliveryError.uncertain("sessionWebhook answered HTTP \(status) without an errcode (not DingTalk's answer)")
        }
        guard code != 0 else { return }
        let reason = "sessionWebhook errcode \(code): \(reply.errmsg ?? "")"
        if Self.uncertainWebhookCodes.contains(code) { throw DeliveryError.uncertain(reason) }
        throw DeliveryError(isRetryable: Self.retryableWebhookCodes.contains(code), reason: reason)
    }

    // MARK: OpenAPI

    private func sendOpenAPI(text: String, title: String, message: InboundMessage) async throws {
        let param = String(decoding: try JSONEncoder().encode(["title": title, "text": text]), as: UTF8.self)
        var body: [String: Any] = ["robotCode": settings.robotCode, "msgKey": "sampleMarkdown", "msgParam": param]
        let path: String
        var staff: String?
        switch message.chat.kind {
        case .group:
            path = "/v1.0/robot/groupMessages/send"
            body["openConversationId"] = message.chat.id
        case .direct:
            guard let id = message.sender.staffID else {
                throw DeliveryError(isRetryable: false, reason: "undeliverable: the sender has no staff id, so the OpenAPI cannot reach them")
            }
            path = "/v1.0/robot/oToMessages/batchSend"
            body["userIds"] = [id]
            staff = id
        }
        let what = "OpenAPI \(path)"
        let payload = try JSONSerialization.data(withJSONObject: body)
        var retriedAuth = false
        while true {
            let token: String
            do {
                token = try await tokens.token()
            } catch let error as AccessTokenCache.TokenError {
                throw DeliveryError(isRetryable: error.isRetryable, reason: error.description)
            }
            let (status, data) = try await post(
                settings.apiBaseURL + path, body: payload, headers: [("x-acs-dingtalk-access-token", token)], what: what)
            struct Reply: Decodable {
                var code: String?
                var message: String?
                var processQueryKey: String?
                var invalidStaffIdList: [String]?
                var flowControlledStaffIdList: [String]?
                var filteredStaffIdList: [String]?
            }
            let reply = data.flatMap { try? JSONDecoder().decode(Reply.self, from: Data(buffer: $0)) }
            if (200..<300).contains(status) {
                guard let reply else {
                    throw DeliveryError.uncertain("\(what) answered HTTP \(status) with a body that is not DingTalk's JSON")
                }
                if let staff { try Self.checkRecipient(staff, in: reply.invalidStaffIdList, reply.flowControlledStaffIdList, reply.filteredStaffIdList) }
                return
            }
            let code = reply?.code ?? ""
            if (status == 401 || status == 400) && code.contains("InvalidAuthentication") && !retriedAuth {
                await tokens.invalidate(token)
                retriedAuth = true
                continue
            }
            throw statusFailure(status, code: code, message: reply?.message ?? "", what: what)
        }
    }

    /// `batchSend` answers 200 also for recipients it did not send to; such a recipient is not delivered.
    static func checkRecipient(_ staff: String, in invalid: [String]?, _ flowControlled: [String]?, _ filtered: [String]?) throws {
        if flowControlled?.contains(staff) == true {
            throw DeliveryError(
                isRetryable: true, reason: "DingTalk flow-controlled the message to this user (flowControlledStaffIdList); retrying later",
                retryAfter: flowControlPause)
        }
        if invalid?.contains(staff) == true {
            throw DeliveryError(
                isRetryable: false,
                reason: "DingTalk reports the user id as invalid for this robot (invalidStaffIdList): the user may have left, or is outside the app's visible range")
        }
        if filtered?.contains(staff) == true {
            throw DeliveryError(isRetryable: false, reason: "DingTalk filtered the message to this user (filteredStaffIdList)")
        }
    }
}
