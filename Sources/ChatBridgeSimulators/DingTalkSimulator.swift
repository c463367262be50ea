import AsyncHTTPClient
import ChatBridgeDingTalk
import Foundation
import Hummingbird
import HummingbirdCore
import HummingbirdWebSocket
import HTTPTypes
import NIOCore
import NIOFoundationCompat
import NIOHTTP1
import Synchronization

/// DingTalk's side on loopback: the sessionWebhook sink, the access-token endpoint and the robot send
/// APIs. Every reply it receives is recorded, in arrival order.
public final class DingTalkSimulator: Sendable {
    /// One message the bot sent.
    public struct Delivery: Sendable, Equatable, Codable {
        public enum Channel: String, Sendable, Codable { case webhook, group, direct }
        public var channel: Channel
        /// The webhook session, the group's openConversationId, or the user ids.
        public var target: String
        public var title: String
        public var text: String
        public var atUserIds: [String]
        /// When it arrived, in seconds since 1970.
        public var receivedAt: Double = Date().timeIntervalSince1970

        public init(channel: Channel, target: String, title: String, text: String, atUserIds: [String], receivedAt: Double = Date().timeIntervalSince1970) {
            self.channel = channel
            self.target = target
            self.title = title
            self.text = text
            self.atUserIds = atUserIds
            self.receivedAt = receivedAt
        }
    }

    /// A canned answer for the next request to an endpoint.
    public struct Scripted: Sendable {
        public var status: Int
        public var body: String
        public var headers: [String: String]
        /// DingTalk accepted the message: record it as delivered before answering.
        public var delivers: Bool
        /// After recording, hold the answer until ``releaseHeld()`` (a send whose outcome the bot cannot know).
        public var hold: Bool

        public init(status: Int = 200, body: String, headers: [String: String] = [:], delivers: Bool = false, hold: Bool = false) {
            self.status = status
            self.body = body
            self.headers = headers
            self.delivers = delivers
            self.hold = hold
        }

        /// A legacy `{"errcode":…}` answer with HTTP 200.
        public static func errcode(_ code: Int, _ message: String = "simulated") -> Scripted {
            Scripted(body: #"{"errcode":\#(code),"errmsg":"\#(message)"}"#)
        }
        /// HTTP 200 with a body that is not JSON (a proxy's page).
        public static let notJSON = Scripted(body: "<html>ok</html>")
        /// A new-OpenAPI error: `{"code":…,"message":…}` with the given status.
        public static func failure(_ status: Int, code: String, message: String = "simulated") -> Scripted {
            Scripted(status: status, body: #"{"code":"\#(code)","message":"\#(message)","requestid":"sim"}"#)
        }
        /// A redirect to the simulator's `/_simulator/stolen`, which records anything that follows it.
        public static let redirect = Scripted(status: 302, body: "", headers: ["location": "/_simulator/stolen"])
        /// Delivered, but the answer never comes back until released.
        public static let deliveredThenHeld = Scripted(body: #"{"errcode":0,"errmsg":"ok"}"#, delivers: true, hold: true)
    }

    /// One request that followed a redirect to `/_simulator/stolen`.
    public struct StolenRequest: Sendable {
        public var headers: [String: String]
    }

    private struct State {
        var deliveries: [Delivery] = []
        var tokensIssued = 0
        var validTokens: Set<String> = []
        var rejectNextSends = 0
        var webhookFailures = 0
        var webhookSuccessesBeforeFailure = 0
        var webhookDelay: Duration = .zero
        var webhookScript: [Scripted] = []
        var sendScript: [Scripted] = []
        var tokenScript: [Scripted] = []
        var webhookRequests = 0
        var sendRequests = 0
        var stolen: [StolenRequest] = []
    }

    private let state = Mutex(State())
    private let heldAnswers = Gate(open: false)
    private let server: LoopbackServer
    public var port: Int { server.port }
    public var baseURL: String { server.baseURL }
    /// The Stream-mode gateway on the same port (`connections/open`, `/connect`).
    public let gateway: StreamGateway
    /// The AI-card endpoints on the same port.
    public let cards: CardSimulator

    private init(server: LoopbackServer, gateway: StreamGateway, cards: CardSimulator) {
        self.server = server
        self.gateway = gateway
        self.cards = cards
    }

    public static func start(port: Int = 0) async throws -> DingTalkSimulator {
        let box = Box()
        let router = Router()
        router.post("/robot/sendBySession") { request, _ in try await box.simulator!.webhook(request) }
        router.post("/v1.0/oauth2/accessToken") { request, _ in try await box.simulator!.accessToken(request) }
        router.post("/v1.0/robot/groupMessages/send") { request, _ in try await box.simulator!.send(request, channel: .group) }
        router.post("/v1.0/robot/oToMessages/batchSend") { request, _ in try await box.simulator!.send(request, channel: .direct) }
        let stolen: @Sendable (Request, BasicRequestContext) async throws -> Response = { request, _ in
            var headers: [String: String] = [:]
            for field in request.headers { headers[field.name.canonicalName] = field.value }
            box.simulator!.state.withLock { $0.stolen.append(StolenRequest(headers: headers)) }
            return .json(.ok, ["errcode": 0, "errmsg": "ok", "processQueryKey": "stolen"])
        }
        router.post("/_simulator/stolen", use: stolen)
        router.get("/_simulator/stolen", use: stolen)
        router.get("/_simulator/deliveries") { _, _ in
            let data = try JSONEncoder().encode(box.simulator!.deliveries)
            return Response(status: .ok, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(data: data)))
        }
        let cards = CardSimulator(isValidToken: { token in box.simulator?.state.withLock { $0.validTokens.contains(token) } ?? false })
        router.post("/v1.0/card/instances/createAndDeliver") { request, _ in try await cards.handle(request, path: "/v1.0/card/instances/createAndDeliver") }
        router.post("/v1.0/card/instances") { request, _ in try await cards.handle(request, path: "/v1.0/card/instances") }
        router.post("/v1.0/card/instances/deliver") { request, _ in try await cards.handle(request, path: "/v1.0/card/instances/deliver") }
        router.put("/v1.0/card/instances") { request, _ in try await cards.handle(request, path: "/v1.0/card/instances") }
        router.put("/v1.0/card/streaming") { request, _ in try await cards.handle(request, path: "/v1.0/card/streaming") }
        let portBox = Mutex(0)
        let gateway = StreamGateway(endpointBase: { "ws://127.0.0.1:\(portBox.withLock { $0 })" })
        router.post("/v1.0/gateway/connections/open") { request, _ in try await gateway.open(request) }
        var wsConfiguration = WebSocketServerConfiguration()
        wsConfiguration.maxFrameSize = 1 << 20
        let server = try await LoopbackServer.start(
            router: router, port: port, name: "dingtalk",
            server: .http1WebSocketUpgrade(configuration: .init(ws: wsConfiguration)) { request, _, _ in
                guard gateway.admit(request.path ?? "") else { return .dontUpgrade }
                return .upgrade([:]) { inbound, outbound, _ in await gateway.serve(inbound: inbound, outbound: outbound) }
            })
        portBox.withLock { $0 = server.port }
        let simulator = DingTalkSimulator(server: server, gateway: gateway, cards: cards)
        box.simulator = simulator
        return simulator
    }

    private final class Box: @unchecked Sendable {
        // Written once before the server can route to it.
        var simulator: DingTalkSimulator?
    }

    public func stop() async {
        gateway.shutdown()
        await server.stop()
    }

    /// A sessionWebhook URL on this simulator for a session name.
    public func webhookURL(session: String) -> String { baseURL + "/robot/sendBySession?session=" + session }

    public var deliveries: [Delivery] { state.withLock { $0.deliveries } }
    public var tokensIssued: Int { state.withLock { $0.tokensIssued } }
    /// sessionWebhook posts received, whatever they were answered.
    public var webhookRequests: Int { state.withLock { $0.webhookRequests } }
    /// OpenAPI robot sends received, whatever they were answered.
    public var sendRequests: Int { state.withLock { $0.sendRequests } }
    /// Requests that followed a redirect (none should).
    public var stolenRequests: [StolenRequest] { state.withLock { $0.stolen } }

    /// Answers the next sessionWebhook posts with these, in order.
    public func scriptWebhook(_ replies: Scripted...) { state.withLock { $0.webhookScript.append(contentsOf: replies) } }
    /// Answers the next OpenAPI robot sends (group and one-to-one) with these, in order.
    public func scriptSend(_ replies: Scripted...) { state.withLock { $0.sendScript.append(contentsOf: replies) } }
    /// Answers the next access-token requests with these, in order.
    public func scriptToken(_ replies: Scripted...) { state.withLock { $0.tokenScript.append(contentsOf: replies) } }
    /// Lets held answers (``Scripted/deliveredThenHeld``) return, now and from now on.
    public func releaseHeld() { heldAnswers.open() }

    /// Answers a scripted reply: records a delivery when it says so, holds when it says so.
    private func answer(_ scripted: Scripted, delivery: @autoclosure () -> Delivery) async -> Response {
        if scripted.delivers {
            let delivery = delivery()
            state.withLock { $0.deliveries.append(delivery) }
        }
        if scripted.hold { await heldAnswers.pass() }
        var headers: HTTPFields = [.contentType: scripted.body.hasPrefix("{") ? "application/json" : "text/html"]
        for (name, value) in scripted.headers { headers[HTTPField.Name(name)!] = value }
        return Response(status: .init(code: scripted.status), headers: headers, body: .init(byteBuffer: ByteBuffer(string: scripted.body)))
    }

    /// The next `count` OpenAPI sends answer 401 InvalidAuthentication (as for a revoked token).
    public func rejectNextSends(_ count: Int) { state.withLock { $0.rejectNextSends = count } }
    /// The next `count` webhook posts answer HTTP 500.
    public func failNextWebhooks(_ count: Int, after successes: Int = 0) {
        state.withLock {
            $0.webhookFailures = count
            $0.webhookSuccessesBeforeFailure = successes
        }
    }
    /// Webhook posts wait this long before answering.
    public func setWebhookDelay(_ delay: Duration) { state.withLock { $0.webhookDelay = delay } }

    private func json(_ request: Request) async throws -> [String: Any] {
        let body = try await request.body.collect(upTo: 1 << 20)
        return (try? JSONSerialization.jsonObject(with: Data(buffer: body))) as? [String: Any] ?? [:]
    }

    private func webhook(_ request: Request) async throws -> Response {
        let body = try await json(request)
        let session = request.uri.queryParameters.get("session") ?? ""
        let markdown = body["markdown"] as? [String: Any]
        let text = (markdown?["text"] as? String) ?? ((body["text"] as? [String: Any])?["content"] as? String) ?? ""
        let at = (body["at"] as? [String: Any])?["atUserIds"] as? [String] ?? []
        let scripted = state.withLock { state -> Scripted? in
            state.webhookRequests += 1
            return state.webhookScript.isEmpty ? nil : state.webhookScript.removeFirst()
        }
        if let scripted {
            return await answer(scripted, delivery: Delivery(channel: .webhook, target: session, title: markdown?["title"] as? String ?? "", text: text, atUserIds: at))
        }
        let (fail, delay) = state.withLock { state -> (Bool, Duration) in
            if state.webhookFailures > 0 {
                if state.webhookSuccessesBeforeFailure > 0 {
                    state.webhookSuccessesBeforeFailure -= 1
                    return (false, state.webhookDelay)
                }
                state.webhookFailures -= 1
                return (true, state.webhookDelay)
            }
            return (false, state.webhookDelay)
        }
        if delay > .zero { try await Task.sleep(for: delay) }
        if fail { return .json(.internalServerError, ["errcode": 500, "errmsg": "simulated failure"]) }
        state.withLock {
            $0.deliveries.append(Delivery(channel: .webhook, target: session, title: markdown?["title"] as? String ?? "", text: text, atUserIds: at))
        }
        return .json(.ok, ["errcode": 0, "errmsg": "ok"])
    }

    private func accessToken(_ request: Request) async throws -> Response {
        let body = try await json(request)
        if let scripted = state.withLock({ $0.tokenScript.isEmpty ? nil : $0.tokenScript.removeFirst() }) {
            return await answer(scripted, delivery: Delivery(channel: .direct, target: "", title: "", text: "", atUserIds: []))
        }
        guard let key = body["appKey"] as? String, !key.isEmpty, let secret = body["appSecret"] as? String, !secret.isEmpty else {
            return .json(.badRequest, ["code": "MissingParameter", "message": "appKey and appSecret are required"])
        }
        let token = state.withLock { state -> String in
            state.tokensIssued += 1
            let token = "token-\(state.tokensIssued)"
            state.validTokens.insert(token)
            return token
        }
        return .json(.ok, ["accessToken": token, "expireIn": 7200])
    }

    private func send(_ request: Request, channel: Delivery.Channel) async throws -> Response {
        let token = request.headers[HTTPField.Name("x-acs-dingtalk-access-token")!] ?? ""
        let body = try await json(request)
        let scripted = state.withLock { state -> Scripted? in
            state.sendRequests += 1
            return state.sendScript.isEmpty ? nil : state.sendScript.removeFirst()
        }
        if let scripted {
            let param = (body["msgParam"] as? String).flatMap { (try? JSONSerialization.jsonObject(with: Data($0.utf8))) as? [String: String] } ?? [:]
            let target = channel == .group ? (body["openConversationId"] as? String ?? "") : ((body["userIds"] as? [String]) ?? []).joined(separator: ",")
            return await answer(scripted, delivery: Delivery(channel: channel, target: target, title: param["title"] ?? "", text: param["text"] ?? "", atUserIds: []))
        }
        let authorised = state.withLock { state -> Bool in
            if state.rejectNextSends > 0 {
                state.rejectNextSends -= 1
                state.validTokens.remove(token)
                return false
            }
            return state.validTokens.contains(token)
        }
        guard authorised else {
            return .json(.unauthorized, ["code": "InvalidAuthentication", "message": "不合法的access_token", "requestid": "sim"])
        }
        guard body["msgKey"] as? String == "sampleMarkdown", let paramText = body["msgParam"] as? String,
            let param = (try? JSONSerialization.jsonObject(with: Data(paramText.utf8))) as? [String: String]
        else {
            return .json(.badRequest, ["code": "InvalidParameter", "message": "msgKey/msgParam not understood"])
        }
        let target = channel == .group ? (body["openConversationId"] as? String ?? "") : ((body["userIds"] as? [String]) ?? []).joined(separator: ",")
        state.withLock {
            $0.deliveries.append(Delivery(channel: channel, target: target, title: param["title"] ?? "", text: param["text"] ?? "", atUserIds: []))
        }
        return .json(.ok, ["processQueryKey": "sim-\(UUID().uuidString)"])
    }
}

/// Builds and sends signed DingTalk callbacks, as DingTalk's servers do.
public struct CallbackSender: Sendable {
    public var url: String
    public var secret: String
    public var robotCode: String

    public init(url: String, secret: String, robotCode: String = "dingbot") {
        self.url = url
        self.secret = secret
        self.robotCode = robotCode
    }

    /// A robot message body; `group` adds the group fields.
    public func body(
        messageID: String, text: String, conversationID: String = "cidDirect==", senderStaffID: String = "0420001",
        senderID: String? = nil, group: Bool = false, webhook: String? = nil, webhookExpiresAt: Date? = nil,
        msgtype: String = "text", content: [String: Any]? = nil
    ) -> Data {
        let now = Date()
        var object: [String: Any] = [
            "msgtype": msgtype, "msgId": messageID, "createAt": Int64(now.timeIntervalSince1970 * 1000),
            "conversationType": group ? "2" : "1", "conversationId": conversationID,
            "senderId": senderID ?? "$:LWCP_v1:$\(senderStaffID)", "senderStaffId": senderStaffID, "senderNick": "User \(senderStaffID)",
            "senderCorpId": "dingcorp", "chatbotCorpId": "dingcorp", "chatbotUserId": "$:LWCP_v1:$bot", "robotCode": robotCode,
            "isAdmin": false,
        ]
        if msgtype == "text" { object["text"] = ["content": " " + text] }
        if let content { object["content"] = content }
        if group {
            object["conversationTitle"] = "Test group"
            object["isInAtList"] = true
        }
        if let webhook {
            object["sessionWebhook"] = webhook
            object["sessionWebhookExpiredTime"] = Int64((webhookExpiresAt ?? now.addingTimeInterval(5400)).timeIntervalSince1970 * 1000)
        }
        return (try? JSONSerialization.data(withJSONObject: object)) ?? Data()
    }

    /// Signed headers for a callback sent now (or at `timestamp`).
    public func headers(timestamp: Date = Date()) -> [(String, String)] {
        let millis = String(Int64(timestamp.timeIntervalSince1970 * 1000))
        return [("timestamp", millis), ("sign", DingTalkSignature.sign(timestamp: millis, secret: secret)), ("Content-Type", "application/json")]
    }

    /// Posts a body with the given headers; returns the status and the response body.
    public func post(_ body: Data, headers: [(String, String)]? = nil, client: HTTPClient) async throws -> (status: Int, body: String) {
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        for (name, value) in headers ?? self.headers() { request.headers.add(name: name, value: value) }
        request.body = .bytes(ByteBuffer(data: body))
        let response = try await client.execute(request, timeout: .seconds(30))
        let data = try await response.body.collect(upTo: 1 << 20)
        return (Int(response.status.code), String(buffer: data))
    }
}
