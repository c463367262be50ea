import Foundation
import Hummingbird
import HTTPTypes
import NIOCore
import NIOFoundationCompat
import Synchronization

/// DingTalk's AI-card endpoints (protocols D.1), served by ``DingTalkSimulator``: createAndDeliver (or
/// create + deliver), the full-data PUT and the streaming PUT. Every call is recorded with its time, so a
/// test can check how often one card was updated and how many calls per second the app made.
///
/// Where DingTalk's behaviour is not documented the simulator takes the strict view, so a client that
/// relies on leniency fails here first: creating and delivering a card again with the same `outTrackId`
/// puts a second copy into the chat (`deliveries` counts them; a correct client keeps it at 1), a
/// streaming call after the stream was finalized is refused (400 `cardStreamFinalized`), and calls about
/// an unknown `outTrackId` answer 404 `cardNotFound`.
public final class CardSimulator: Sendable {
    /// A card as DingTalk holds it.
    public struct Card: Sendable, Equatable {
        public var outTrackID: String
        public var templateID: String
        public var openSpaceID: String
        public var robotCode: String
        public var atUserIds: [String: String]
        /// Times the card was put into the chat (exactly once for a correct client).
        public var deliveries: Int
        /// The card variables (`flowStatus`, the streaming key, …).
        public var params: [String: String]
        /// The streaming variable's text, as the user sees it.
        public var streamed: String
        public var finalized: Bool
        public var isError: Bool
        public var flowStatus: String { params["flowStatus"] ?? "" }
    }

    /// One card API call.
    public struct Call: Sendable, Equatable {
        public var method: String
        public var path: String
        public var outTrackID: String
        public var guid: String?
        public var content: String?
        public var isFinalize: Bool
        public var isError: Bool
        public var status: Int
        /// When it arrived, in seconds since 1970.
        public var at: Double
    }

    private struct State {
        var cards: [String: Card] = [:]
        var calls: [Call] = []
        var guids: Set<String> = []
        var repeatedGuids = 0
        var script: [String: [DingTalkSimulator.Scripted]] = [:]
        var qpsLimit: Int?
        var firstStreamed: [String: Double] = [:]
    }

    private let state = Mutex(State())
    private let isValidToken: @Sendable (String) -> Bool

    init(isValidToken: @escaping @Sendable (String) -> Bool) {
        self.isValidToken = isValidToken
    }

    public var cards: [Card] { state.withLock { Array($0.cards.values).sorted { $0.outTrackID < $1.outTrackID } } }
    public func card(_ outTrackID: String) -> Card? { state.withLock { $0.cards[outTrackID] } }
    public var calls: [Call] { state.withLock { $0.calls } }
    /// Streaming calls that reused a `guid` (must stay 0).
    public var repeatedGuids: Int { state.withLock { $0.repeatedGuids } }

    /// The next call to `path` (any card path when nil) gets `answers` first, in order.
    public func script(_ path: String? = nil, _ answers: DingTalkSimulator.Scripted...) {
        state.withLock { $0.script[path ?? "*", default: []].append(contentsOf: answers) }
    }

    /// Answers 403 `…QpsLimitForAppkeyAndApi` to calls beyond `limit` within one second (nil: no limit).
    public func setQPSLimit(_ limit: Int?) { state.withLock { $0.qpsLimit = limit } }

    /// The most card calls in any one-second window.
    public var peakCallsPerSecond: Int {
        let times = calls.map(\.at).sorted()
        var best = 0
        var start = 0
        for end in times.indices {
            while times[end] - times[start] >= 1 { start += 1 }
            best = max(best, end - start + 1)
        }
        return best
    }

    /// The shortest gap between two streaming updates of one card, in seconds (nil with fewer than two).
    public func shortestUpdateGap(_ outTrackID: String) -> Double? {
        let times = calls.filter { $0.path == "/v1.0/card/streaming" && $0.outTrackID == outTrackID && $0.status == 200 && !$0.isFinalize }.map(\.at)
        guard times.count > 1 else { return nil }
        return zip(times, times.dropFirst()).map { $1 - $0 }.min()
    }

    // MARK: Server side

    func handle(_ request: Request, path: String) async throws -> Response {
        let token = request.headers[HTTPField.Name("x-acs-dingtalk-access-token")!] ?? ""
        let bytes = try await request.body.collect(upTo: 1 << 20)
        let body = (try? JSONSerialization.jsonObject(with: Data(buffer: bytes))) as? [String: Any] ?? [:]
        let now = Date().timeIntervalSince1970
        let outTrackID = body["outTrackId"] as? String ?? ""
        var call = Call(
            method: request.method.rawValue, path: path, outTrackID: outTrackID, guid: body["guid"] as? String,
            content: body["content"] as? String, isFinalize: body["isFinalize"] as? Bool ?? false, isError: body["isError"] as? Bool ?? false,
            status: 200, at: now)
        let (scripted, overLimit) = state.withLock { state -> (DingTalkSimulator.Scripted?, Bool) in
            var scripted: DingTalkSimulator.Scripted?
            if var queue = state.script[path], !queue.isEmpty {
                scripted = queue.removeFirst()
                state.script[path] = queue
            } else if var queue = state.script["*"], !queue.isEmpty {
                scripted = queue.removeFirst()
                state.script["*"] = queue
            }
            let recent = state.calls.filter { now - $0.at < 1 && $0.status == 200 }.count
            return (scripted, state.qpsLimit.map { recent >= $0 } ?? false)
        }
        if let scripted {
            // `delivers`: DingTalk did the work, but the client gets the scripted answer (an unknown outcome).
            if scripted.delivers { _ = handle(path: path, method: request.method, token: token, body: body, call: call, overLimit: false, record: false) }
            call.status = scripted.status
            state.withLock { $0.calls.append(call) }
            return Response(
                status: .init(code: scripted.status), headers: [.contentType: "application/json"],
                body: .init(byteBuffer: ByteBuffer(string: scripted.body)))
        }
        return handle(path: path, method: request.method, token: token, body: body, call: call, overLimit: overLimit, record: true)
    }

    /// Does what DingTalk does with the call; `record`: the call goes into ``calls``.
    private func handle(path: String, method: HTTPRequest.Method, token: String, body: [String: Any], call: Call, overLimit: Bool, record: Bool) -> Response {
        var call = call
        let outTrackID = call.outTrackID
        let now = call.at
        func finish(_ status: Int, _ object: [String: Any]) -> Response {
            call.status = status
            if record { state.withLock { $0.calls.append(call) } }
            return .json(.init(code: status), object)
        }
        guard isValidToken(token) else {
            return finish(401, ["code": "InvalidAuthentication", "message": "不合法的access_token", "requestid": "sim"])
        }
        if overLimit {
            return finish(403, ["code": "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi", "message": "qps limit", "requestid": "sim"])
        }
        guard !outTrackID.isEmpty else { return finish(400, ["code": "invalidParameter", "message": "outTrackId is required"]) }
        switch method == .put ? "PUT " + path : path {
        case "/v1.0/card/instances/createAndDeliver", "/v1.0/card/instances":
            guard let template = body["cardTemplateId"] as? String, !template.isEmpty else {
                return finish(400, ["code": "invalidParameter", "message": "cardTemplateId is required"])
            }
            guard let params = Self.params(body) else {
                return finish(400, ["code": "invalidParameter", "message": "cardData.cardParamMap values must be strings"])
            }
            let deliver = path.hasSuffix("createAndDeliver")
            if deliver, let problem = Self.deliveryProblem(body) { return finish(400, ["code": "invalidParameter", "message": problem]) }
            state.withLock { state in
                if var card = state.cards[outTrackID] {
                    // Delivered again: a second copy in the chat.
                    if deliver { card.deliveries += 1 }
                    state.cards[outTrackID] = card
                    return
                }
                state.cards[outTrackID] = Card(
                    outTrackID: outTrackID, templateID: template, openSpaceID: body["openSpaceId"] as? String ?? "",
                    robotCode: Self.robotCode(body), atUserIds: Self.atUsers(body), deliveries: deliver ? 1 : 0, params: params,
                    streamed: "", finalized: false, isError: false)
            }
            if deliver {
                return finish(200, [
                    "success": true,
                    "result": ["outTrackId": outTrackID, "deliverResults": [["spaceType": "IM", "spaceId": body["openSpaceId"] as? String ?? "", "success": true, "carrierId": "sim", "errorMsg": ""]]],
                ])
            }
            return finish(200, ["success": true, "result": outTrackID])
        case "/v1.0/card/instances/deliver":
            if let problem = Self.deliveryProblem(body) { return finish(400, ["code": "invalidParameter", "message": problem]) }
            let found = state.withLock { state -> Bool in
                guard var card = state.cards[outTrackID] else { return false }
                if card.deliveries == 0 {
                    card.openSpaceID = body["openSpaceId"] as? String ?? ""
                    card.robotCode = Self.robotCode(body)
                    card.atUserIds = Self.atUsers(body)
                }
                card.deliveries += 1
                state.cards[outTrackID] = card
                return true
            }
            guard found else { return finish(404, ["code": "cardNotFound", "message": "no card with this outTrackId"]) }
            return finish(200, ["success": true, "result": [["spaceType": "IM", "success": true, "carrierId": "sim"]]])
        case "PUT /v1.0/card/instances":
            guard let params = Self.params(body) else {
                return finish(400, ["code": "invalidParameter", "message": "cardData.cardParamMap values must be strings"])
            }
            let byKey = ((body["cardUpdateOptions"] as? [String: Any])?["updateCardDataByKey"] as? Bool) ?? false
            let found = state.withLock { state -> Bool in
                guard var card = state.cards[outTrackID] else { return false }
                card.params = byKey ? card.params.merging(params) { $1 } : params
                state.cards[outTrackID] = card
                return true
            }
            guard found else { return finish(404, ["code": "cardNotFound", "message": "no card with this outTrackId"]) }
            return finish(200, ["success": true, "result": true])
        case "PUT /v1.0/card/streaming":
            guard let guid = body["guid"] as? String, !guid.isEmpty, let key = body["key"] as? String, !key.isEmpty,
                let content = body["content"] as? String
            else { return finish(400, ["code": "invalidParameter", "message": "guid, key and content are required"]) }
            enum Outcome { case missing, finalized, streamed }
            let outcome = state.withLock { state -> Outcome in
                guard var card = state.cards[outTrackID] else { return .missing }
                if !state.guids.insert(guid).inserted { state.repeatedGuids += 1 }
                if card.finalized { return .finalized }
                let full = body["isFull"] as? Bool ?? false
                card.streamed = full ? content : card.streamed + content
                card.params[key] = card.streamed
                if call.isFinalize { card.finalized = true }
                if call.isError { card.isError = true }
                state.cards[outTrackID] = card
                if state.firstStreamed[outTrackID] == nil { state.firstStreamed[outTrackID] = now }
                return .streamed
            }
            switch outcome {
            case .missing: return finish(404, ["code": "cardNotFound", "message": "no card with this outTrackId"])
            case .finalized: return finish(400, ["code": "cardStreamFinalized", "message": "the card's stream is already finalized"])
            case .streamed: return finish(200, ["success": true, "result": true])
            }
        default:
            return finish(404, ["code": "notFound", "message": "unknown card path"])
        }
    }

    /// When the card first showed streamed text (seconds since 1970).
    public func firstStreamed(_ outTrackID: String) -> Double? { state.withLock { $0.firstStreamed[outTrackID] } }

    private static func params(_ body: [String: Any]) -> [String: String]? {
        guard let data = body["cardData"] as? [String: Any], let map = data["cardParamMap"] as? [String: Any] else { return [:] }
        var result: [String: String] = [:]
        for (key, value) in map {
            guard let string = value as? String else { return nil }
            result[key] = string
        }
        return result
    }

    private static func robotCode(_ body: [String: Any]) -> String {
        ((body["imGroupOpenDeliverModel"] as? [String: Any])?["robotCode"] as? String)
            ?? ((body["imRobotOpenDeliverModel"] as? [String: Any])?["robotCode"] as? String) ?? ""
    }

    private static func atUsers(_ body: [String: Any]) -> [String: String] {
        ((body["imGroupOpenDeliverModel"] as? [String: Any])?["atUserIds"] as? [String: String]) ?? [:]
    }

    /// What is wrong with the delivery fields, if anything (D.1).
    private static func deliveryProblem(_ body: [String: Any]) -> String? {
        guard let space = body["openSpaceId"] as? String else { return "openSpaceId is required" }
        if space.hasPrefix("dtv1.card//IM_GROUP.") {
            guard space.count > "dtv1.card//IM_GROUP.".count else { return "openSpaceId names no group" }
            guard let model = body["imGroupOpenDeliverModel"] as? [String: Any], model["robotCode"] as? String != nil else {
                return "imGroupOpenDeliverModel.robotCode is required for a group"
            }
            return nil
        }
        if space.hasPrefix("dtv1.card//IM_ROBOT.") {
            guard space.count > "dtv1.card//IM_ROBOT.".count else { return "openSpaceId names no user" }
            guard let model = body["imRobotOpenDeliverModel"] as? [String: Any], model["spaceType"] as? String == "IM_ROBOT" else {
                return "imRobotOpenDeliverModel.spaceType IM_ROBOT is required for a direct chat"
            }
            return nil
        }
        return "openSpaceId must be dtv1.card//IM_GROUP.<conversationId> or dtv1.card//IM_ROBOT.<userId>"
    }
}
