import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeHTTP
import Foundation
import Logging
import NIOCore
import NIOFoundationCompat
import NIOHTTP1

/// Obtains DingTalk OpenAPI access tokens and caches each until shortly before it expires
/// (``CachedToken``: concurrent callers share one request).
public struct AccessTokenCache: Sendable {
    private let settings: DingTalkSettings
    private let client: HTTPClient
    private let cache: CachedToken

    public init(settings: DingTalkSettings, client: HTTPClient, refreshMargin: TimeInterval = 300) {
        self.settings = settings
        self.client = client
        cache = CachedToken(refreshMargin: refreshMargin) { [settings, client] in
            try await Self.fetch(settings: settings, client: client)
        }
    }

    public struct TokenError: Error, CustomStringConvertible {
        public var description: String
        public var isRetryable: Bool
    }

    /// A valid token, from the cache when it has more than the refresh margin left.
    public func token() async throws -> String { try await cache.token() }

    /// Drops the cached token, after the API rejected it.
    public func invalidate(_ token: String) async { await cache.invalidate(token) }

    private static func fetch(settings: DingTalkSettings, client: HTTPClient) async throws -> (token: String, expiresAt: Date) {
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
