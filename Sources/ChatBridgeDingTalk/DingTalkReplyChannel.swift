import AsyncHTTPClient
import ChatBridgeCore
import Foundation
import Logging
import NIOCore
import NIOFoundationCompat
import NIOHTTP1

/// Delivers answers to DingTalk: markdown through the message's sessionWebhook while it is valid and
/// allowed, else through the robot OpenAPI. Long answers go as numbered parts, in order.
public struct DingTalkReplyChannel: ReplyChannel {
    public let settings: DingTalkSettings
    public let tokens: AccessTokenCache
    private let client: HTTPClient
    private let logger: Logger
    /// A webhook that expires sooner than this is not used.
    private let expiryMargin: TimeInterval = 10

    public init(settings: DingTalkSettings, client: HTTPClient, tokens: AccessTokenCache? = nil, logger: Logger) {
        self.settings = settings
        self.client = client
        self.tokens = tokens ?? AccessTokenCache(settings: settings, client: client)
        self.logger = logger
    }

    public func parts(of text: String) -> [String] {
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
                } catch let error as DeliveryError where settings.hasOpenAPICredentials {
                    logger.warning("sessionWebhook failed; using the OpenAPI", metadata: ["error": "\(error)"])
                }
            }
        }
        guard settings.hasOpenAPICredentials else {
            logger.error("reply undeliverable: no usable sessionWebhook and no OpenAPI credentials", metadata: ["message_id": "\(message.messageID)"])
            throw DeliveryError(isRetryable: false, reason: "undeliverable: no usable sessionWebhook and dingtalk.client_id/client_secret not set")
        }
        try await sendOpenAPI(text: text, title: title, message: message)
    }

    static func title(for text: String) -> String {
        let firstLine = text.split(whereSeparator: \.isNewline).first.map(String.init) ?? ""
        let plain = firstLine.filter { !"#*`>_[]()".contains($0) }.trimmingCharacters(in: .whitespaces)
        return plain.isEmpty ? "Reply" : String(plain.prefix(24))
    }

    // MARK: sessionWebhook

    private func sendWebhook(_ url: String, text: String, title: String, message: InboundMessage) async throws {
        var body: [String: Any] = ["msgtype": "markdown"]
        var markdownText = text
        if message.chat.kind == .group, let staff = message.sender.staffID {
            markdownText = "@\(staff) " + text
            body["at"] = ["atUserIds": [staff], "isAtAll": false]
        }
        body["markdown"] = ["title": title, "text": markdownText]
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        request.body = .bytes(ByteBuffer(data: try JSONSerialization.data(withJSONObject: body)))
        let response: HTTPClientResponse
        do {
            response = try await client.execute(request, timeout: .seconds(15))
        } catch {
            throw DeliveryError(isRetryable: true, reason: "sessionWebhook request failed: \(error)")
        }
        let data = try await response.body.collect(upTo: 64 * 1024)
        guard (200..<300).contains(response.status.code) else {
            throw DeliveryError(isRetryable: response.status.code >= 500 || response.status.code == 429, reason: "sessionWebhook answered HTTP \(response.status.code)")
        }
        struct Reply: Decodable {
            var errcode: Int?
            var errmsg: String?
        }
        if let reply = try? JSONDecoder().decode(Reply.self, from: Data(buffer: data)), let code = reply.errcode, code != 0 {
            throw DeliveryError(isRetryable: true, reason: "sessionWebhook errcode \(code): \(reply.errmsg ?? "")")
        }
    }

    // MARK: OpenAPI

    private func sendOpenAPI(text: String, title: String, message: InboundMessage) async throws {
        let param = String(decoding: try JSONEncoder().encode(["title": title, "text": text]), as: UTF8.self)
        var body: [String: Any] = ["robotCode": settings.robotCode, "msgKey": "sampleMarkdown", "msgParam": param]
        let path: String
        switch message.chat.kind {
        case .group:
            path = "/v1.0/robot/groupMessages/send"
            body["openConversationId"] = message.chat.id
        case .direct:
            guard let staff = message.sender.staffID else {
                throw DeliveryError(isRetryable: false, reason: "undeliverable: the sender has no staff id, so the OpenAPI cannot reach them")
            }
            path = "/v1.0/robot/oToMessages/batchSend"
            body["userIds"] = [staff]
        }
        let payload = try JSONSerialization.data(withJSONObject: body)
        var retriedAuth = false
        while true {
            let token: String
            do {
                token = try await tokens.token()
            } catch let error as AccessTokenCache.TokenError {
                throw DeliveryError(isRetryable: error.isRetryable, reason: error.description)
            }
            var request = HTTPClientRequest(url: settings.apiBaseURL + path)
            request.method = .POST
            request.headers.add(name: "Content-Type", value: "application/json")
            request.headers.add(name: "x-acs-dingtalk-access-token", value: token)
            request.body = .bytes(ByteBuffer(data: payload))
            let response: HTTPClientResponse
            do {
                response = try await client.execute(request, timeout: .seconds(15))
            } catch {
                throw DeliveryError(isRetryable: true, reason: "OpenAPI request failed: \(error)")
            }
            let data = try await response.body.collect(upTo: 64 * 1024)
            if (200..<300).contains(response.status.code) { return }
            struct Failure: Decodable {
                var code: String?
                var message: String?
            }
            let failure = try? JSONDecoder().decode(Failure.self, from: Data(buffer: data))
            let code = failure?.code ?? ""
            if (response.status.code == 401 || response.status.code == 400) && code.contains("InvalidAuthentication") && !retriedAuth {
                await tokens.invalidate(token)
                retriedAuth = true
                continue
            }
            let throttled = response.status.code == 429 || (response.status.code == 403 && code.contains("QpsLimit"))
            throw DeliveryError(
                isRetryable: throttled || response.status.code >= 500,
                reason: "OpenAPI \(path) answered HTTP \(response.status.code) \(code): \(failure?.message ?? "")")
        }
    }
}
