import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeHTTP
import Foundation
import Logging
import NIOCore
import NIOFoundationCompat
import NIOHTTP1

/// A failed Feishu/Lark OpenAPI call: the platform's `code` (0 when there is none), what it means and
/// whether trying again later may succeed.
public struct LarkAPIError: Error, Sendable, CustomStringConvertible {
    public var code: Int
    public var httpStatus: Int
    public var isRetryable: Bool
    /// The request may have reached Feishu although no answer confirmed it.
    public var mayHaveBeenSent: Bool
    public var retryAfter: Duration?
    public var description: String

    public init(code: Int, httpStatus: Int, isRetryable: Bool, mayHaveBeenSent: Bool, description: String, retryAfter: Duration? = nil) {
        self.code = code
        self.httpStatus = httpStatus
        self.isRetryable = isRetryable
        self.mayHaveBeenSent = mayHaveBeenSent
        self.description = description
        self.retryAfter = retryAfter
    }

    /// The failure as the dispatcher's ``DeliveryError``. Replies carry a `uuid`, so a send whose outcome
    /// is unknown is safe to repeat: Feishu returns the earlier message instead of sending a second one.
    public var delivery: DeliveryError {
        DeliveryError(isRetryable: isRetryable || mayHaveBeenSent, reason: description, retryAfter: retryAfter)
    }

    /// Codes that mean the tenant token was refused; the token is fetched again and the call repeated once.
    static let tokenCodes: Set<Int> = [99991661, 99991663, 99991671]
    /// Frequency limits: the API's (99991400, with HTTP 429) and the per-chat message limit (230020).
    static let rateLimitCodes: Set<Int> = [99991400, 230020]
    /// Lack of permission: the app is missing a scope (99991672, 99991679, 230027).
    static let permissionCodes: Set<Int> = [99991672, 99991679, 230027]

    /// What an operator can do about a code, for the log.
    static func advice(for code: Int) -> String? {
        switch code {
        case 230002: "the bot is not in this group; add it to the group"
        case 230006: "the app's bot capability is off; enable Bot under the app's features and publish a version"
        case 230013: "the user is outside the app's availability range; widen it in the app's version settings"
        case 230011: "the message was recalled"
        case 230025: "the message is too long"
        case 230099, 200860: "the card content was refused (too large or malformed)"
        case 230027, 99991672, 99991679: "the app lacks a permission scope; grant it under Permissions & Scopes and publish a version"
        case 99991663, 99991661, 99991671: "the tenant access token was refused"
        case 10003, 10014: "the app id or secret is wrong; check lark.app_id and lark.app_secret"
        case 300309, 200850: "the card's streaming mode is closed (it closes by itself after 10 minutes)"
        case 300317: "the card update's sequence was not above the last one"
        default: nil
        }
    }
}

/// The bot's own identity from `GET /open-apis/bot/v3/info`.
public struct LarkBotInfo: Sendable, Equatable {
    public var openID: String
    public var name: String
    public var activateStatus: Int?
}

/// The plain exchange with the OpenAPI: one request, its JSON answer, and the failure classified.
struct LarkHTTP: Sendable {
    let settings: LarkSettings
    let client: HTTPClient
    let clock: any WallClock
    let requestTimeout: Duration

    struct Answer {
        var status: Int
        var code: Int
        var message: String
        var json: [String: Any]
        var headers: HTTPHeaders
    }

    /// Sends one request. Throws ``LarkAPIError`` for a transport failure; any HTTP answer is returned.
    func exchange(_ method: HTTPMethod, _ path: String, body: Data?, token: String?, headers extra: [(String, String)] = [], what: String) async throws(LarkAPIError) -> Answer {
        var request = HTTPClientRequest(url: settings.baseURL + path)
        request.method = method
        request.headers.add(name: "Content-Type", value: "application/json; charset=utf-8")
        if let token { request.headers.add(name: "Authorization", value: "Bearer \(token)") }
        for (name, value) in extra { request.headers.add(name: name, value: value) }
        if let body { request.body = .bytes(ByteBuffer(data: body)) }
        let response: HTTPClientResponse
        do {
            response = try await client.execute(request, timeout: .init(requestTimeout))
        } catch {
            let failure = TransportFailure(error)
            throw LarkAPIError(
                code: 0, httpStatus: 0, isRetryable: true, mayHaveBeenSent: failure.requestMayHaveBeenSent,
                description: "\(what) to \(OutboundHTTP.hostDescription(settings.baseURL)) failed: \(failure)")
        }
        let status = Int(response.status.code)
        var buffer: ByteBuffer?
        do {
            buffer = try await response.body.collect(upTo: 1 << 20)
        } catch {
            if (200..<300).contains(status) {
                throw LarkAPIError(
                    code: 0, httpStatus: status, isRetryable: true, mayHaveBeenSent: true,
                    description: "\(what) answered HTTP \(status) but its body could not be read: \(TransportFailure(error))")
            }
        }
        let json = buffer.flatMap { try? JSONSerialization.jsonObject(with: Data(buffer: $0)) as? [String: Any] } ?? [:]
        let code = (json["code"] as? NSNumber)?.intValue ?? -1
        return Answer(status: status, code: code, message: json["msg"] as? String ?? "", json: json, headers: response.headers)
    }

    /// A tenant access token (protocols E.3).
    func fetchTenantToken() async throws(LarkAPIError) -> (token: String, expiresAt: Date) {
        let what = "tenant access token request"
        let body = try? JSONSerialization.data(withJSONObject: ["app_id": settings.appID, "app_secret": settings.appSecret])
        let answer = try await exchange(.POST, "/open-apis/auth/v3/tenant_access_token/internal", body: body, token: nil, what: what)
        guard answer.status == 200, answer.code == 0, let token = answer.json["tenant_access_token"] as? String, !token.isEmpty else {
            let reason = "HTTP \(answer.status)" + (answer.code > 0 ? " code \(answer.code): \(answer.message)" : "")
            if answer.status == 429 || answer.status >= 500 || LarkAPIError.rateLimitCodes.contains(answer.code) {
                throw LarkAPIError(
                    code: answer.code, httpStatus: answer.status, isRetryable: true, mayHaveBeenSent: false,
                    description: "Feishu could not issue a tenant access token now (\(reason)); will retry")
            }
            throw LarkAPIError(
                code: answer.code, httpStatus: answer.status, isRetryable: false, mayHaveBeenSent: false,
                description: "Feishu refused the tenant access token request (\(reason)); check lark.app_id and lark.app_secret, and lark.base_url (open.feishu.cn for Feishu, open.larksuite.com for Lark)")
        }
        let lifetime = (answer.json["expire"] as? NSNumber)?.doubleValue ?? 7200
        return (token, clock.now.addingTimeInterval(lifetime))
    }
}

/// The Feishu/Lark OpenAPI as ChatBridge uses it: tenant tokens (refreshed early, and once more when a
/// call is refused for its token), frequency limits waited out in place (HTTP 429 with
/// `x-ogw-ratelimit-reset`, code 230020), and every other failure classified with what to fix.
public struct LarkAPI: Sendable {
    public let settings: LarkSettings
    let http: LarkHTTP
    /// Tenant tokens, refreshed five minutes early; concurrent callers share one request.
    let tokens: CachedToken
    let logger: Logger
    /// How many frequency-limit answers one call waits out before it gives up (the dispatcher retries later).
    let rateLimitRetries: Int
    /// The longest wait in place for one frequency limit.
    let maxRateLimitWait: Duration

    public init(
        settings: LarkSettings, client: HTTPClient, clock: any WallClock = SystemClock(), requestTimeout: Duration = .seconds(15),
        rateLimitRetries: Int = 3, maxRateLimitWait: Duration = .seconds(10), logger: Logger
    ) {
        self.settings = settings
        http = LarkHTTP(settings: settings, client: client, clock: clock, requestTimeout: requestTimeout)
        tokens = CachedToken(clock: clock) { [http] in try await http.fetchTenantToken() }
        self.logger = logger
        self.rateLimitRetries = rateLimitRetries
        self.maxRateLimitWait = maxRateLimitWait
    }

    var clock: any WallClock { http.clock }

    /// Calls `path` with a tenant token and returns the answer's `data` object. `body` is a JSON object.
    @discardableResult
    public func call(_ method: HTTPMethod, _ path: String, body: [String: Any]? = nil, what: String) async throws(LarkAPIError) -> [String: Any] {
        try await answer(method, path, body: body, what: what)["data"] as? [String: Any] ?? [:]
    }

    /// Like ``call(_:_:body:what:)`` but returns the whole JSON answer.
    func answer(_ method: HTTPMethod, _ path: String, body: [String: Any]? = nil, what: String) async throws(LarkAPIError) -> [String: Any] {
        let payload = body.flatMap { try? JSONSerialization.data(withJSONObject: $0) }
        var refreshedToken = false
        var limited = 0
        while true {
            let token = try await tenantToken()
            let answer = try await http.exchange(method, path, body: payload, token: token, what: what)
            if (200..<300).contains(answer.status), answer.code == 0 {
                return answer.json
            }
            if LarkAPIError.tokenCodes.contains(answer.code), !refreshedToken {
                await tokens.invalidate(token)
                refreshedToken = true
                continue
            }
            let limitedNow = answer.status == 429 || LarkAPIError.rateLimitCodes.contains(answer.code)
            if limitedNow {
                let reset = answer.headers.first(name: "x-ogw-ratelimit-reset").flatMap(Double.init).map { Duration.milliseconds(Int64(max($0, 0) * 1000)) }
                let wait = min(reset ?? .milliseconds(500 << min(limited, 4)), maxRateLimitWait)
                if limited < rateLimitRetries {
                    limited += 1
                    logger.debug("Feishu frequency limit; waiting before trying again", metadata: ["what": "\(what)", "code": "\(answer.code)", "wait": "\(wait)"])
                    do { try await clock.sleep(for: wait) } catch {
                        throw LarkAPIError(code: answer.code, httpStatus: answer.status, isRetryable: true, mayHaveBeenSent: false, description: "\(what) cancelled")
                    }
                    continue
                }
                throw failure(answer, what: what, retryAfter: reset ?? .seconds(1))
            }
            throw failure(answer, what: what, retryAfter: nil)
        }
    }

    private func failure(_ answer: LarkHTTP.Answer, what: String, retryAfter: Duration?) -> LarkAPIError {
        var reason = "\(what) answered HTTP \(answer.status)"
        if answer.code > 0 { reason += " code \(answer.code)" + (answer.message.isEmpty ? "" : ": \(answer.message)") }
        if answer.code == -1 && (200..<300).contains(answer.status) { reason += " without Feishu's JSON" }
        if let advice = LarkAPIError.advice(for: answer.code) { reason += " — \(advice)" }
        let retryable: Bool
        let mayHaveBeenSent: Bool
        switch answer.status {
        case 300..<400:
            reason += " (a redirect, not followed)"
            (retryable, mayHaveBeenSent) = (false, false)
        case 429:
            (retryable, mayHaveBeenSent) = (true, false)
        case 502, 504:
            (retryable, mayHaveBeenSent) = (true, true)
        case 500..<600:
            (retryable, mayHaveBeenSent) = (true, false)
        case 200..<300 where answer.code == -1:
            (retryable, mayHaveBeenSent) = (true, true)
        default:
            let retryableCodes: Set<Int> = [1, 1000040343, 99991400, 230020, 99991663, 99991661, 99991671]
            (retryable, mayHaveBeenSent) = (retryableCodes.contains(answer.code), false)
        }
        return LarkAPIError(
            code: answer.code, httpStatus: answer.status, isRetryable: retryable, mayHaveBeenSent: mayHaveBeenSent, description: reason,
            retryAfter: retryAfter)
    }

    private func tenantToken() async throws(LarkAPIError) -> String {
        do {
            return try await tokens.token()
        } catch let error as LarkAPIError {
            throw error
        } catch {
            throw LarkAPIError(code: 0, httpStatus: 0, isRetryable: true, mayHaveBeenSent: false, description: "\(error)")
        }
    }

    /// Fetches a tenant token (for `check --probe`): nil when it worked, else why not.
    public func probeToken() async -> String? {
        do {
            _ = try await tenantToken()
            return nil
        } catch {
            return error.description
        }
    }

    /// The bot's own identity (`GET /open-apis/bot/v3/info`); the open_id is how a group message's
    /// mention of the bot is recognised.
    public func botInfo() async throws(LarkAPIError) -> LarkBotInfo {
        // Through the same token refresh and frequency-limit waits as every other call.
        let json = try await answer(.GET, "/open-apis/bot/v3/info", what: "bot info request")
        guard let bot = json["bot"] as? [String: Any], let openID = bot["open_id"] as? String, !openID.isEmpty else {
            throw LarkAPIError(
                code: 0, httpStatus: 200, isRetryable: false, mayHaveBeenSent: false,
                description: "bot info request answered without the bot's open_id; enable the Bot capability of the app")
        }
        return LarkBotInfo(openID: openID, name: bot["app_name"] as? String ?? "", activateStatus: (bot["activate_status"] as? NSNumber)?.intValue)
    }
}

