import AsyncHTTPClient
import ChatBridgeHTTP
import Foundation
import Logging
import NIOCore
import NIOFoundationCompat
import NIOHTTP1

/// Obtains DingTalk OpenAPI access tokens and caches each until shortly before it expires.
/// Concurrent callers share one request.
public actor AccessTokenCache {
    private let settings: DingTalkSettings
    private let client: HTTPClient
    private let refreshMargin: TimeInterval
    private var cached: (token: String, expiresAt: Date)?
    private var inFlight: Task<(String, Date), any Error>?

    public init(settings: DingTalkSettings, client: HTTPClient, refreshMargin: TimeInterval = 300) {
        self.settings = settings
        self.client = client
        self.refreshMargin = refreshMargin
    }

    public struct TokenError: Error, CustomStringConvertible {
        public var description: String
        public var isRetryable: Bool
    }

    /// A valid token, from the cache when it has more than the refresh margin left.
    public func token(now: Date = Date()) async throws -> String {
        if let cached, cached.expiresAt.timeIntervalSince(now) > refreshMargin { return cached.token }
        if let inFlight { return try await inFlight.value.0 }
        let task = Task { try await self.fetch() }
        inFlight = task
        defer { inFlight = nil }
        let (token, expiresAt) = try await task.value
        cached = (token, expiresAt)
        return token
    }

    /// Drops the cached token, after the API rejected it.
    public func invalidate(_ token: String) {
        if cached?.token == token { cached = nil }
    }

    private func fetch() async throws -> (String, Date) {
        var request = HTTPClientRequest(url: settings.apiBaseURL + "/v1.0/oauth2/accessToken")
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        let body = try JSONEncoder().encode(["appKey": settings.clientID, "appSecret": settings.clientSecret])
        request.body = .bytes(ByteBuffer(data: body))
        let response: HTTPClientResponse
        let data: ByteBuffer
        do {
            response = try await client.execute(request, timeout: .seconds(15))
            data = try await response.body.collect(upTo: 64 * 1024)
        } catch {
            throw TokenError(
                description: "access token request to \(OutboundHTTP.hostDescription(settings.apiBaseURL)) failed: \(TransportFailure(error))",
                isRetryable: true)
        }
        struct Reply: Decodable {
            var accessToken: String?
            var expireIn: Int?
            var code: String?
            var message: String?
        }
        let reply = try? JSONDecoder().decode(Reply.self, from: Data(buffer: data))
        guard response.status == .ok, let token = reply?.accessToken, !token.isEmpty else {
            let status = Int(response.status.code)
            let code = reply?.code ?? ""
            let reason = "HTTP \(status)" + (code.isEmpty ? "" : " \(code): \(reply?.message ?? "")")
            // Throttling (429, or 403 with a QpsLimit code) and server trouble pass; anything else needs the admin.
            let throttled = status == 429 || (status == 403 && code.contains("QpsLimit"))
            if throttled || status >= 500 {
                throw TokenError(description: "DingTalk could not issue an access token now (\(reason)); will retry", isRetryable: true)
            }
            throw TokenError(
                description: "DingTalk refused the access token request (\(reason)); check dingtalk.client_id and dingtalk.client_secret",
                isRetryable: false)
        }
        return (token, Date().addingTimeInterval(TimeInterval(reply?.expireIn ?? 7200)))
    }
}
