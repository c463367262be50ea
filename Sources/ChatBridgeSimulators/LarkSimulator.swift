import AsyncHTTPClient
import ChatBridgeLark
import Foundation
import Hummingbird
import HummingbirdCore
import HummingbirdWebSocket
import HTTPTypes
import NIOCore
import NIOFoundationCompat
import NIOHTTP1
import Synchronization

/// Feishu/Lark's side on loopback (protocols E): the tenant token, the bot's info, message reply / create
/// / patch, the CardKit card endpoints, and on the same port the long-connection endpoint and its pbbp2
/// WebSocket (``LarkGateway``). Everything the bot sends is recorded.
///
/// Where Feishu is strict, so is the simulator: a repeated reply `uuid` returns the earlier message and
/// sends nothing; a CardKit card can be sent once; element content needs a `sequence` above every earlier
/// one on that card (300317) and streaming mode on (300309); a message is patched only when it is an
/// interactive card with `update_multi`, at most 5 times a second (230020); a token it did not issue, or
/// one it expired, is refused with 99991663.
public final class LarkSimulator: Sendable {
    /// A message the bot sent.
    public struct Message: Sendable, Equatable {
        public var id: String
        /// The message it replies to (nil for a message created in a chat).
        public var replyTo: String?
        public var type: String
        /// The `content` JSON string as sent (and as last patched).
        public var content: String
        public var uuid: String?
        public var replyInThread: Bool
        public var patches: Int
        /// When it was sent, in seconds since 1970.
        public var at: Double
        /// The text a user sees: the text message's text, or the markdown of a patched card.
        public var text: String {
            let object = (try? JSONSerialization.jsonObject(with: Data(content.utf8))) as? [String: Any] ?? [:]
            if let text = object["text"] as? String { return text }
            let elements = object["elements"] as? [[String: Any]] ?? []
            return elements.compactMap { $0["content"] as? String }.joined(separator: "\n")
        }
        /// The CardKit card it shows, when it shows one.
        public var cardID: String? {
            let object = (try? JSONSerialization.jsonObject(with: Data(content.utf8))) as? [String: Any] ?? [:]
            guard object["type"] as? String == "card" else { return nil }
            return (object["data"] as? [String: Any])?["card_id"] as? String
        }
    }

    /// A CardKit card entity.
    public struct Card: Sendable, Equatable {
        public var id: String
        public var streaming: Bool
        /// The markdown element's text as shown.
        public var text: String
        public var summary: String?
        /// Every sequence number used on it, in order.
        public var sequences: [Int]
        /// Content updates accepted (creation and the closing update not counted).
        public var contentUpdates: Int
        /// Times the card was sent in a message (Feishu allows one).
        public var sends: Int
        /// Full updates (PUT of the whole card) and settings changes.
        public var closes: Int
        /// Operations refused with 300317 because their sequence was not larger than the last one.
        public var refusedSequences = 0
        /// When streaming mode was last closed, in seconds since 1970.
        public var closedAt: Double?
    }

    /// A canned answer for the next request to an endpoint.
    public struct Scripted: Sendable {
        public var status: Int
        public var body: String
        public var headers: [String: String]
        public init(status: Int = 400, body: String, headers: [String: String] = [:]) {
            self.status = status
            self.body = body
            self.headers = headers
        }
        /// A Feishu failure `{"code":…,"msg":…}` with HTTP 400.
        public static func code(_ code: Int, status: Int = 400, _ message: String = "simulated") -> Scripted {
            Scripted(status: status, body: #"{"code":\#(code),"msg":"\#(message)"}"#)
        }
        /// The generic frequency limit: HTTP 429, code 99991400, `x-ogw-ratelimit-reset`.
        public static func rateLimited(reset seconds: Int = 1) -> Scripted {
            Scripted(
                status: 429, body: #"{"code":99991400,"msg":"request trigger frequency limit"}"#,
                headers: ["x-ogw-ratelimit-limit": "50", "x-ogw-ratelimit-reset": "\(seconds)"])
        }
    }

    /// Endpoints a script can address.
    public enum Endpoint: String, Sendable {
        case token, botInfo, reply, create, patch, cardCreate, cardContent, cardUpdate, cardSettings
    }

    private struct State {
        var appID = "cli_sim"
        var appSecret = "sim-secret"
        var bot = (openID: "ou_bot", name: "ChatBridge")
        var tokensIssued = 0
        var validTokens: Set<String> = []
        var messages: [Message] = []
        var byUUID: [String: Int] = [:]
        var cards: [String: Card] = [:]
        var nextCard = 7_355_372_766_134_157_000
        var script: [Endpoint: [Scripted]] = [:]
        var requests: [Endpoint: Int] = [:]
        var patchTimes: [String: [Double]] = [:]
        var duplicateReplies = 0
        var refusedCardKit = false
    }

    private let state = Mutex(State())
    private let server: LoopbackServer
    public var port: Int { server.port }
    public var baseURL: String { server.baseURL }
    /// The long-connection endpoint and WebSocket on the same port.
    public let gateway: LarkGateway

    private init(server: LoopbackServer, gateway: LarkGateway) {
        self.server = server
        self.gateway = gateway
    }

    public static func start(port: Int = 0) async throws -> LarkSimulator {
        let box = Box()
        let router = Router()
        func route(_ handler: @escaping @Sendable (LarkSimulator, Request, BasicRequestContext) async throws -> Response) -> @Sendable (Request, BasicRequestContext) async throws -> Response {
            { request, context in try await handler(box.simulator!, request, context) }
        }
        router.post("/open-apis/auth/v3/tenant_access_token/internal", use: route { sim, request, _ in try await sim.token(request) })
        router.get("/open-apis/bot/v3/info", use: route { sim, request, _ in try await sim.botInfo(request) })
        router.post("/open-apis/im/v1/messages/:id/reply", use: route { try await $0.send($1, replyTo: $2.parameters.get("id") ?? "") })
        router.post("/open-apis/im/v1/messages", use: route { sim, request, _ in try await sim.send(request, replyTo: nil) })
        router.patch("/open-apis/im/v1/messages/:id", use: route { try await $0.patch($1, id: $2.parameters.get("id") ?? "") })
        router.post("/open-apis/cardkit/v1/cards", use: route { sim, request, _ in try await sim.createCard(request) })
        router.put("/open-apis/cardkit/v1/cards/:card/elements/:element/content", use: route {
            try await $0.cardContent($1, card: $2.parameters.get("card") ?? "", element: $2.parameters.get("element") ?? "")
        })
        router.put("/open-apis/cardkit/v1/cards/:card", use: route { try await $0.cardUpdate($1, card: $2.parameters.get("card") ?? "") })
        router.patch("/open-apis/cardkit/v1/cards/:card/settings", use: route { try await $0.cardSettings($1, card: $2.parameters.get("card") ?? "") })
        let portBox = Mutex(0)
        let gateway = LarkGateway(
            endpointBase: { "ws://127.0.0.1:\(portBox.withLock { $0 })" },
            credentials: { box.simulator.map { sim in sim.state.withLock { ($0.appID, $0.appSecret) } } ?? ("", "") })
        router.post("/callback/ws/endpoint") { request, _ in try await gateway.endpoint(request) }
        var wsConfiguration = WebSocketServerConfiguration()
        wsConfiguration.maxFrameSize = 1 << 20
        let server = try await LoopbackServer.start(
            router: router, port: port, name: "lark",
            server: .http1WebSocketUpgrade(configuration: .init(ws: wsConfiguration)) { request, _, _ in
                guard let connection = await gateway.admit(request.path ?? "") else { return .dontUpgrade }
                return .upgrade([:]) { inbound, outbound, _ in await gateway.serve(connection, inbound: inbound, outbound: outbound) }
            })
        portBox.withLock { $0 = server.port }
        let simulator = LarkSimulator(server: server, gateway: gateway)
        box.simulator = simulator
        return simulator
    }

    private final class Box: @unchecked Sendable {
        // Written once before the server can route to it.
        var simulator: LarkSimulator?
    }

    public func stop() async {
        gateway.shutdown()
        await server.stop()
    }

    // MARK: Controls and records

    public var appID: String { state.withLock { $0.appID } }
    public var appSecret: String { state.withLock { $0.appSecret } }
    public var botOpenID: String { state.withLock { $0.bot.openID } }
    /// Renames the bot (its open_id stays).
    public func renameBot(_ name: String) { state.withLock { $0.bot.name = name } }
    public var messages: [Message] { state.withLock { $0.messages } }
    public func message(_ id: String) -> Message? { state.withLock { $0.messages.first { $0.id == id } } }
    /// The replies to one platform message, in order.
    public func replies(to id: String) -> [Message] { state.withLock { $0.messages.filter { $0.replyTo == id } } }
    public var cards: [Card] { state.withLock { $0.cards.values.sorted { $0.id < $1.id } } }
    public func card(_ id: String) -> Card? { state.withLock { $0.cards[id] } }
    public var tokensIssued: Int { state.withLock { $0.tokensIssued } }
    /// Replies that repeated a uuid (answered with the earlier message, nothing sent).
    public var duplicateReplies: Int { state.withLock { $0.duplicateReplies } }
    public func requests(_ endpoint: Endpoint) -> Int { state.withLock { $0.requests[endpoint] ?? 0 } }

    /// Answers the next requests to `endpoint` with these, in order.
    public func script(_ endpoint: Endpoint, _ answers: Scripted...) { state.withLock { $0.script[endpoint, default: []].append(contentsOf: answers) } }
    /// Every token issued so far stops working (99991663), as when Feishu rotates it early.
    public func expireTokens() { state.withLock { $0.validTokens.removeAll() } }
    /// CardKit answers 99991672 (the app lacks `cardkit:card:write`) from now on.
    public func refuseCardKit() { state.withLock { $0.refusedCardKit = true } }

    // MARK: Endpoints

    private func json(_ request: Request) async throws -> [String: Any] {
        let body = try await request.body.collect(upTo: 1 << 20)
        return (try? JSONSerialization.jsonObject(with: Data(buffer: body))) as? [String: Any] ?? [:]
    }

    private func scripted(_ endpoint: Endpoint) -> Response? {
        let next = state.withLock { state -> Scripted? in
            state.requests[endpoint, default: 0] += 1
            guard var queue = state.script[endpoint], !queue.isEmpty else { return nil }
            let first = queue.removeFirst()
            state.script[endpoint] = queue
            return first
        }
        guard let next else { return nil }
        var headers: HTTPFields = [.contentType: "application/json"]
        for (name, value) in next.headers { headers[HTTPField.Name(name)!] = value }
        return Response(status: .init(code: next.status), headers: headers, body: .init(byteBuffer: ByteBuffer(string: next.body)))
    }

    private func authorised(_ request: Request) -> Bool {
        let header = request.headers[.authorization] ?? ""
        guard header.hasPrefix("Bearer ") else { return false }
        let token = String(header.dropFirst("Bearer ".count))
        return state.withLock { $0.validTokens.contains(token) }
    }

    private static func failure(_ code: Int, _ message: String, status: HTTPResponse.Status = .badRequest) -> Response {
        .json(status, ["code": code, "msg": message])
    }

    private static let invalidToken = failure(99991663, "Invalid access token for authorization. Please make a request with token attached.")

    private func token(_ request: Request) async throws -> Response {
        let body = try await json(request)
        if let scripted = scripted(.token) { return scripted }
        let issued = state.withLock { state -> String? in
            guard body["app_id"] as? String == state.appID, body["app_secret"] as? String == state.appSecret else { return nil }
            state.tokensIssued += 1
            let token = "t-sim-\(state.tokensIssued)"
            state.validTokens.insert(token)
            return token
        }
        guard let issued else { return Self.failure(10014, "app secret invalid") }
        return .json(.ok, ["code": 0, "msg": "ok", "tenant_access_token": issued, "expire": 7200])
    }

    private func botInfo(_ request: Request) async throws -> Response {
        if let scripted = scripted(.botInfo) { return scripted }
        guard authorised(request) else { return Self.invalidToken }
        let bot = state.withLock { $0.bot }
        return .json(.ok, ["code": 0, "msg": "ok", "bot": ["open_id": bot.openID, "app_name": bot.name, "activate_status": 2, "ip_white_list": []]])
    }

    private func send(_ request: Request, replyTo: String?) async throws -> Response {
        let body = try await json(request)
        if let scripted = scripted(replyTo == nil ? .create : .reply) { return scripted }
        guard authorised(request) else { return Self.invalidToken }
        guard let type = body["msg_type"] as? String, let content = body["content"] as? String,
            let object = (try? JSONSerialization.jsonObject(with: Data(content.utf8))) as? [String: Any]
        else {
            return Self.failure(230001, "invalid msg_type or content")
        }
        let limit = type == "text" ? 150 * 1024 : 30 * 1024
        guard content.utf8.count <= limit else { return Self.failure(230025, "message content too long") }
        let uuid = body["uuid"] as? String
        if let uuid, uuid.count > 50 { return Self.failure(230001, "uuid longer than 50 characters") }
        return state.withLock { state -> Response in
            if let uuid, let index = state.byUUID[uuid] {
                state.duplicateReplies += 1
                return .json(.ok, ["code": 0, "msg": "success", "data": Self.data(of: state.messages[index])])
            }
            if type == "interactive", object["type"] as? String == "card" {
                let cardID = (object["data"] as? [String: Any])?["card_id"] as? String ?? ""
                guard var card = state.cards[cardID] else { return Self.failure(230099, "card_id not found") }
                card.sends += 1
                state.cards[cardID] = card
                guard card.sends == 1 else { return Self.failure(230099, "the card entity has been sent already") }
            }
            let message = Message(
                id: "om_sim_\(state.messages.count + 1)", replyTo: replyTo, type: type, content: content, uuid: uuid,
                replyInThread: body["reply_in_thread"] as? Bool ?? false, patches: 0, at: Date().timeIntervalSince1970)
            state.messages.append(message)
            if let uuid { state.byUUID[uuid] = state.messages.count - 1 }
            return .json(.ok, ["code": 0, "msg": "success", "data": Self.data(of: message)])
        }
    }

    private static func data(of message: Message) -> [String: Any] {
        [
            "message_id": message.id, "msg_type": message.type, "chat_id": "oc_sim", "parent_id": message.replyTo ?? "",
            "body": ["content": message.content], "deleted": false, "updated": message.patches > 0,
            "sender": ["id": "cli_sim", "id_type": "app_id", "sender_type": "app"],
        ]
    }

    private func patch(_ request: Request, id: String) async throws -> Response {
        let body = try await json(request)
        if let scripted = scripted(.patch) { return scripted }
        guard authorised(request) else { return Self.invalidToken }
        guard let content = body["content"] as? String,
            let object = (try? JSONSerialization.jsonObject(with: Data(content.utf8))) as? [String: Any]
        else { return Self.failure(230001, "invalid content") }
        guard content.utf8.count <= 30 * 1024 else { return Self.failure(230025, "card content too long") }
        let now = Date().timeIntervalSince1970
        return state.withLock { state -> Response in
            guard let index = state.messages.firstIndex(where: { $0.id == id }) else { return Self.failure(230001, "message not found") }
            guard state.messages[index].type == "interactive" else { return Self.failure(230001, "only interactive messages can be patched") }
            let before = (try? JSONSerialization.jsonObject(with: Data(state.messages[index].content.utf8))) as? [String: Any] ?? [:]
            func shared(_ card: [String: Any]) -> Bool { (card["config"] as? [String: Any])?["update_multi"] as? Bool == true }
            guard shared(before), shared(object) else { return Self.failure(230099, "update_multi must be declared before and after") }
            var times = state.patchTimes[id, default: []].filter { now - $0 < 1 }
            guard times.count < 5 else { return Self.failure(230020, "frequency limit: 5 updates per second per message") }
            times.append(now)
            state.patchTimes[id] = times
            state.messages[index].content = content
            state.messages[index].patches += 1
            return .json(.ok, ["code": 0, "msg": "ok", "data": [:] as [String: Any]])
        }
    }

    private func createCard(_ request: Request) async throws -> Response {
        let body = try await json(request)
        if let scripted = scripted(.cardCreate) { return scripted }
        guard authorised(request) else { return Self.invalidToken }
        if state.withLock({ $0.refusedCardKit }) {
            return Self.failure(99991672, "Access denied. One of the following scopes is required: [cardkit:card:write]", status: .badRequest)
        }
        guard body["type"] as? String == "card_json", let data = body["data"] as? String,
            let card = (try? JSONSerialization.jsonObject(with: Data(data.utf8))) as? [String: Any], card["schema"] as? String == "2.0"
        else { return Self.failure(230099, "card_json with a JSON 2.0 card required") }
        let config = card["config"] as? [String: Any] ?? [:]
        let elements = (card["body"] as? [String: Any])?["elements"] as? [[String: Any]] ?? []
        return state.withLock { state -> Response in
            state.nextCard += 1
            let id = "\(state.nextCard)"
            state.cards[id] = Card(
                id: id, streaming: config["streaming_mode"] as? Bool ?? false,
                text: elements.first?["content"] as? String ?? "", summary: (config["summary"] as? [String: Any])?["content"] as? String,
                sequences: [], contentUpdates: 0, sends: 0, closes: 0)
            return .json(.ok, ["code": 0, "msg": "success", "data": ["card_id": id]])
        }
    }

    /// Checks and records a card operation's sequence; nil when it may proceed.
    private static func sequenceProblem(_ card: inout Card, _ body: [String: Any]) -> Response? {
        guard let sequence = (body["sequence"] as? NSNumber)?.intValue, sequence >= 1, sequence <= Int(Int32.max) else {
            return failure(300301, "sequence is required (int32 ≥ 1)")
        }
        if let last = card.sequences.last, sequence <= last {
            card.refusedSequences += 1
            return failure(300317, "sequence must be larger than the last one (\(last))")
        }
        card.sequences.append(sequence)
        return nil
    }

    private func cardContent(_ request: Request, card id: String, element: String) async throws -> Response {
        let body = try await json(request)
        if let scripted = scripted(.cardContent) { return scripted }
        guard authorised(request) else { return Self.invalidToken }
        guard let content = body["content"] as? String, (1...100_000).contains(content.count) else {
            return Self.failure(300301, "content must be 1 to 100000 characters")
        }
        return state.withLock { state -> Response in
            guard var card = state.cards[id] else { return Self.failure(300302, "card not found") }
            guard element == "markdown_1" else { return Self.failure(300303, "element not found") }
            guard card.streaming else { return Self.failure(300309, "streaming mode is closed") }
            if let problem = Self.sequenceProblem(&card, body) {
                state.cards[id] = card
                return problem
            }
            card.text = content
            card.contentUpdates += 1
            state.cards[id] = card
            return .json(.ok, ["code": 0, "msg": "success", "data": [:] as [String: Any]])
        }
    }

    private func cardUpdate(_ request: Request, card id: String) async throws -> Response {
        let body = try await json(request)
        if let scripted = scripted(.cardUpdate) { return scripted }
        guard authorised(request) else { return Self.invalidToken }
        guard let wrapper = body["card"] as? [String: Any], wrapper["type"] as? String == "card_json", let data = wrapper["data"] as? String,
            let new = (try? JSONSerialization.jsonObject(with: Data(data.utf8))) as? [String: Any]
        else { return Self.failure(300301, "card.type card_json and card.data required") }
        guard data.utf8.count <= 30 * 1024 else { return Self.failure(200860, "card too large") }
        let config = new["config"] as? [String: Any] ?? [:]
        let elements = (new["body"] as? [String: Any])?["elements"] as? [[String: Any]] ?? []
        return state.withLock { state -> Response in
            guard var card = state.cards[id] else { return Self.failure(300302, "card not found") }
            if let problem = Self.sequenceProblem(&card, body) {
                state.cards[id] = card
                return problem
            }
            card.streaming = config["streaming_mode"] as? Bool ?? false
            if !card.streaming { card.closedAt = Date().timeIntervalSince1970 }
            card.summary = (config["summary"] as? [String: Any])?["content"] as? String
            card.text = elements.first?["content"] as? String ?? ""
            card.closes += 1
            state.cards[id] = card
            return .json(.ok, ["code": 0, "msg": "success", "data": [:] as [String: Any]])
        }
    }

    private func cardSettings(_ request: Request, card id: String) async throws -> Response {
        let body = try await json(request)
        if let scripted = scripted(.cardSettings) { return scripted }
        guard authorised(request) else { return Self.invalidToken }
        let settings = (body["settings"] as? String).flatMap { (try? JSONSerialization.jsonObject(with: Data($0.utf8))) as? [String: Any] } ?? [:]
        return state.withLock { state -> Response in
            guard var card = state.cards[id] else { return Self.failure(300302, "card not found") }
            if let problem = Self.sequenceProblem(&card, body) {
                state.cards[id] = card
                return problem
            }
            if let streaming = (settings["config"] as? [String: Any])?["streaming_mode"] as? Bool {
                card.streaming = streaming
                if !streaming { card.closedAt = Date().timeIntervalSince1970 }
            }
            card.closes += 1
            state.cards[id] = card
            return .json(.ok, ["code": 0, "msg": "success", "data": [:] as [String: Any]])
        }
    }
}

/// Builds, encrypts, signs and posts Feishu webhook events (protocols E.1, E.2), as Feishu's servers do.
public struct LarkEventSender: Sendable {
    public var url: String
    public var verificationToken: String
    public var encryptKey: String
    public var appID: String

    public init(url: String, verificationToken: String, encryptKey: String, appID: String = "cli_sim") {
        self.url = url
        self.verificationToken = verificationToken
        self.encryptKey = encryptKey
        self.appID = appID
    }

    /// A mention inside a message: its placeholder key, who, and the name shown.
    public struct Mention: Sendable {
        public var key: String
        public var openID: String
        public var name: String
        public init(key: String, openID: String, name: String) {
            self.key = key
            self.openID = openID
            self.name = name
        }
    }

    /// An `im.message.receive_v1` event (schema 2.0) as JSON.
    public func messageEvent(
        messageID: String, text: String? = nil, chatID: String = "oc_direct", group: Bool = false, sender: String = "ou_user1",
        mentions: [Mention] = [], messageType: String = "text", content: String? = nil, threadID: String? = nil, rootID: String? = nil,
        eventID: String? = nil
    ) -> Data {
        let millis = String(Int64(Date().timeIntervalSince1970 * 1000))
        var message: [String: Any] = [
            "message_id": messageID, "create_time": millis, "update_time": millis, "chat_id": chatID,
            "chat_type": group ? "group" : "p2p", "message_type": messageType,
            "content": content ?? String(decoding: (try? JSONSerialization.data(withJSONObject: ["text": text ?? ""])) ?? Data(), as: UTF8.self),
        ]
        if let threadID { message["thread_id"] = threadID }
        if let rootID { message["root_id"] = rootID }
        if !mentions.isEmpty {
            message["mentions"] = mentions.map { ["key": $0.key, "id": ["open_id": $0.openID, "union_id": "on_" + $0.openID], "name": $0.name, "tenant_key": "sim"] }
        }
        let event: [String: Any] = [
            "schema": "2.0",
            "header": [
                "event_id": eventID ?? UUID().uuidString.lowercased(), "event_type": "im.message.receive_v1", "create_time": millis,
                "token": verificationToken, "app_id": appID, "tenant_key": "sim",
            ],
            "event": [
                "sender": ["sender_id": ["open_id": sender, "union_id": "on_" + sender], "sender_type": "user", "tenant_key": "sim"],
                "message": message,
            ],
        ]
        return (try? JSONSerialization.data(withJSONObject: event)) ?? Data()
    }

    /// The URL-verification event Feishu sends when the request URL is saved.
    public func challenge(_ value: String) -> Data {
        (try? JSONSerialization.data(withJSONObject: ["challenge": value, "token": verificationToken, "type": "url_verification"])) ?? Data()
    }

    /// The body and headers Feishu would send for `event`: encrypted and signed when an encrypt key is set
    /// (`signed: false` leaves the signature off, as Feishu does for the challenge).
    public func envelope(_ event: Data, signed: Bool = true) -> (body: Data, headers: [(String, String)]) {
        var headers = [("Content-Type", "application/json; charset=utf-8")]
        guard !encryptKey.isEmpty, let encrypted = try? LarkCrypto.encrypt(event, encryptKey: encryptKey) else { return (event, headers) }
        let body = (try? JSONSerialization.data(withJSONObject: ["encrypt": encrypted])) ?? Data()
        if signed {
            let timestamp = String(Int(Date().timeIntervalSince1970))
            let nonce = UUID().uuidString
            headers += [
                ("X-Lark-Request-Timestamp", timestamp), ("X-Lark-Request-Nonce", nonce),
                ("X-Lark-Signature", LarkCrypto.signature(timestamp: timestamp, nonce: nonce, encryptKey: encryptKey, body: body)),
            ]
        }
        return (body, headers)
    }

    /// Posts an event; returns the status and the response body.
    public func post(_ event: Data, signed: Bool = true, client: HTTPClient) async throws -> (status: Int, body: String) {
        let (body, headers) = envelope(event, signed: signed)
        return try await post(raw: body, headers: headers, client: client)
    }

    /// Posts a body exactly as given.
    public func post(raw body: Data, headers: [(String, String)], client: HTTPClient) async throws -> (status: Int, body: String) {
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        for (name, value) in headers { request.headers.add(name: name, value: value) }
        request.body = .bytes(ByteBuffer(data: body))
        let response = try await client.execute(request, timeout: .seconds(30))
        let data = try await response.body.collect(upTo: 1 << 20)
        return (Int(response.status.code), String(buffer: data))
    }
}
