import ChatBridgeCore
import ChatBridgeLark
import Foundation
import Hummingbird
import HummingbirdWebSocket
import HTTPTypes
import NIOCore
import NIOFoundationCompat
import Synchronization
import SwiftProtobuf

/// Feishu's long-connection side on loopback (protocols E.7), served by ``LarkSimulator``:
/// `POST /callback/ws/endpoint` checks `AppID`/`AppSecret` and hands out a single-use URL with `device_id`
/// and `service_id`, and the WebSocket speaks pbbp2 frames: pings are answered with pongs carrying the
/// ClientConfig, events are pushed as data frames (split into fragments on request) and the client's
/// responses are recorded (code, `biz_rt`, time).
///
/// Switches for the hard cases: re-push of events left without a `{"code":200}` response, ``goSilent()``
/// (open connections stop reading and writing, pings unanswered), ``setDown(_:)`` (the endpoint answers
/// HTTP 503 and open connections close), ``refuseApp(code:)`` (the endpoint answers a client error).
public final class LarkGateway: Sendable {
    /// One response the client sent to a data frame.
    public struct Reply: Sendable, Equatable {
        public var connection: Int
        public var messageID: String
        public var code: Int
        /// The `biz_rt` header, when present.
        public var bizRT: String?
        /// The frame came back with the pushed frame's SeqID, LogID, service and headers.
        public var echoesFrame: Bool
        /// When it arrived, in seconds since 1970.
        public var at: Double
    }

    private struct Link {
        var outbound: WebSocketOutboundWriter
        var close: OneTimeEvent
        var service: Int32
        var silent = false
    }

    private struct State {
        var tickets: [String: (connection: Int, service: Int32)] = [:]
        var endpointRequests = 0
        var down = false
        var refusal: Int?
        var links: [Int: Link] = [:]
        var connectionsAccepted = 0
        var nextSeq: UInt64 = 0
        var pushed: [String: [Pbbp2_Frame]] = [:]
        var pushTimes: [String: Double] = [:]
        var replies: [Reply] = []
        var succeeded: Set<String> = []
        var pings = 0
        var pongConfig: [String: Int]?
        var pingInterval = 120
        var redeliverAfter: Duration?
        var pongs = true
        var stall: OneTimeEvent?
        var upgradesStalled = 0
    }

    private let state = Mutex(State())
    private let changed = Broadcast()
    private let stopped = OneTimeEvent()
    private let silence = Silence()
    let endpointBase: @Sendable () -> String
    let credentials: @Sendable () -> (String, String)

    init(endpointBase: @escaping @Sendable () -> String, credentials: @escaping @Sendable () -> (String, String)) {
        self.endpointBase = endpointBase
        self.credentials = credentials
    }

    // MARK: Controls

    /// The `PingInterval` (seconds) the endpoint hands out.
    public func setPingInterval(_ seconds: Int) { state.withLock { $0.pingInterval = seconds } }
    /// The ClientConfig every pong carries from now on (nil: pongs without payload).
    public func setPongConfig(_ config: [String: Int]?) { state.withLock { $0.pongConfig = config } }
    /// Pushes an event again (same `message_id`) when no `{"code":200}` came back for it within `delay`.
    public func setRedelivery(after delay: Duration?) { state.withLock { $0.redeliverAfter = delay } }
    /// Whether pbbp2 pings get a pong (WebSocket pings are answered either way): off, the connection
    /// looks alive to the socket but not to the protocol.
    public func answerPings(_ answer: Bool) { state.withLock { $0.pongs = answer } }
    /// While on, WebSocket upgrades are held unanswered (the TCP connection stays open), until switched off.
    public func stallUpgrades(_ stall: Bool) {
        let released = state.withLock { state -> OneTimeEvent? in
            if stall {
                if state.stall == nil { state.stall = OneTimeEvent() }
                return nil
            }
            defer { state.stall = nil }
            return state.stall
        }
        released?.signal()
    }
    /// Upgrades that were held by ``stallUpgrades(_:)``.
    public var upgradesStalled: Int { state.withLock { $0.upgradesStalled } }
    /// The endpoint answers this client-error code (nil: accept the app again).
    public func refuseApp(code: Int?) { state.withLock { $0.refusal = code } }

    /// While down, the endpoint answers HTTP 503 and open connections are closed.
    public func setDown(_ down: Bool) {
        let links = state.withLock { state -> [Link] in
            state.down = down
            return down ? Array(state.links.values) : []
        }
        for link in links { link.close.signal() }
        changed.notify()
    }

    /// Open connections stop reading and writing: nothing pushed arrives, pings go unanswered.
    public func goSilent() {
        // Marked at once, so nothing pushed after this call is written to them.
        state.withLock { state in
            for id in state.links.keys { state.links[id]?.silent = true }
        }
        silence.begin()
        changed.notify()
    }
    /// New connections are not silent any more.
    public func endSilence() { silence.end() }
    /// Closes one connection now (as Feishu does when it moves a client elsewhere).
    public func close(_ connection: Int) {
        state.withLock { $0.links[connection] }?.close.signal()
    }
    /// Closes every connection now.
    public func closeAll() {
        for link in state.withLock({ Array($0.links.values) }) { link.close.signal() }
    }

    public var openConnections: [Int] { state.withLock { $0.links.filter { !$0.value.silent }.keys.sorted() } }
    public var connectionsAccepted: Int { state.withLock { $0.connectionsAccepted } }
    public var endpointRequests: Int { state.withLock { $0.endpointRequests } }
    public var pings: Int { state.withLock { $0.pings } }
    /// Events (frame message_ids) that got a `{"code":200}` response.
    public var succeededEvents: Int { state.withLock { $0.succeeded.count } }
    public var replies: [Reply] { state.withLock { $0.replies } }
    public func replies(for messageID: String) -> [Reply] { state.withLock { $0.replies.filter { $0.messageID == messageID } } }
    /// Seconds from the first push of an event to each response, for the bench.
    public var responseDelays: [Double] {
        state.withLock { state in state.replies.compactMap { reply in state.pushTimes[reply.messageID].map { reply.at - $0 } } }
    }

    /// Waits until `condition` holds (checked after every change); false when `seconds` pass first.
    @discardableResult
    public func wait(seconds: Double = 20, until condition: @escaping @Sendable (LarkGateway) -> Bool) async -> Bool {
        await withTaskGroup(of: Bool.self) { group in
            group.addTask {
                while !Task.isCancelled {
                    let seen = self.changed.generation
                    if condition(self) { return true }
                    await self.changed.wait(past: seen)
                }
                return false
            }
            group.addTask {
                try? await Task.sleep(for: .seconds(seconds))
                return false
            }
            let first = await group.next() ?? false
            group.cancelAll()
            self.changed.notify()
            return first
        }
    }

    // MARK: Frames

    /// Pushes an event (the E.2 JSON) in `fragments` data frames; returns its `message_id` (the frame's,
    /// not the Feishu message's).
    @discardableResult
    public func pushEvent(_ event: Data, fragments: Int = 1, type: String = "event", messageID: String? = nil, to connection: Int? = nil) async throws -> String {
        try await pushEvent(event, fragments: fragments, type: type, messageID: messageID, to: connection, repeating: false)
    }

    private func pushEvent(_ event: Data, fragments: Int, type: String, messageID: String?, to connection: Int?, repeating: Bool) async throws -> String {
        let id = messageID ?? UUID().uuidString.lowercased()
        guard let (_, link) = self.link(connection) else { throw SimulatorError(description: "no open Lark connection") }
        let count = max(1, min(fragments, event.count))
        let size = (event.count + count - 1) / count
        var frames: [Pbbp2_Frame] = []
        for index in 0..<count {
            let start = index * size
            let end = min(start + size, event.count)
            var frame = Pbbp2_Frame()
            frame.seqID = state.withLock { state -> UInt64 in
                state.nextSeq += 1
                return state.nextSeq
            }
            frame.logID = frame.seqID + 1_000_000
            frame.service = link.service
            frame.method = 1
            frame.headers = [
                Self.header("type", type), Self.header("message_id", id), Self.header("sum", "\(count)"), Self.header("seq", "\(index)"),
                Self.header("trace_id", "trace-\(id)"),
            ]
            frame.payload = start < end ? event.subdata(in: start..<end) : Data()
            frames.append(frame)
        }
        state.withLock { state in
            state.pushed[id] = frames
            if state.pushTimes[id] == nil { state.pushTimes[id] = Date().timeIntervalSince1970 }
        }
        changed.notify()
        if !repeating, let delay = state.withLock({ $0.redeliverAfter }) {
            // Feishu pushes an event again when no success response came back (to any open connection),
            // until one does (here every `delay`, at most 20 times; Feishu waits 15 s, 5 min, 1 h, 6 h).
            Task {
                for _ in 0..<20 {
                    try? await Task.sleep(for: delay)
                    if self.state.withLock({ $0.succeeded.contains(id) }) || self.stopped.hasHappened { return }
                    guard self.link(nil) != nil else { continue }
                    _ = try? await self.pushEvent(event, fragments: fragments, type: type, messageID: id, to: nil, repeating: true)
                }
            }
        }
        guard !link.silent else { return id }
        // Fragments out of order, as the protocol allows: the last one first when there are several.
        let order = frames.count > 1 ? [frames.count - 1] + Array(0..<(frames.count - 1)) : [0]
        for index in order {
            try await link.outbound.write(.binary(ByteBuffer(bytes: try frames[index].serializedBytes() as [UInt8])))
        }
        return id
    }

    private static func header(_ key: String, _ value: String) -> Pbbp2_Header {
        var header = Pbbp2_Header()
        header.key = key
        header.value = value
        return header
    }

    /// The given connection, or the newest open one that is not silent.
    private func link(_ connection: Int?) -> (Int, Link)? {
        state.withLock { state in
            if let connection { return state.links[connection].map { (connection, $0) } }
            guard let newest = state.links.filter({ !$0.value.silent }).keys.max() else { return nil }
            return (newest, state.links[newest]!)
        }
    }

    // MARK: Server side

    func endpoint(_ request: Request) async throws -> Response {
        let body = try await request.body.collect(upTo: 1 << 20)
        let json = (try? JSONSerialization.jsonObject(with: Data(buffer: body))) as? [String: Any] ?? [:]
        let (appID, secret) = credentials()
        let valid = json["AppID"] as? String == appID && json["AppSecret"] as? String == secret
        let answer = state.withLock { state -> (down: Bool, refusal: Int?, url: String?, ping: Int) in
            state.endpointRequests += 1
            if state.down { return (true, nil, nil, 0) }
            if let refusal = state.refusal { return (false, refusal, nil, 0) }
            guard valid else { return (false, 1000040344, nil, 0) }
            state.connectionsAccepted += 1
            let ticket = UUID().uuidString.lowercased()
            let service = Int32(33_000 + state.connectionsAccepted)
            state.tickets[ticket] = (state.connectionsAccepted, service)
            let url = "/ws/v2?fpid=1&aid=1&device_id=conn-\(state.connectionsAccepted)&access_key=\(ticket)&service_id=\(service)&ticket=\(ticket)"
            return (false, nil, url, state.pingInterval)
        }
        changed.notify()
        if answer.down { return .json(.serviceUnavailable, ["code": 500, "msg": "simulated outage"]) }
        if let refusal = answer.refusal { return .json(.ok, ["code": refusal, "msg": "app credentials invalid (simulated)"]) }
        return .json(.ok, [
            "code": 0, "msg": "ok",
            "data": [
                "URL": endpointBase() + (answer.url ?? ""),
                "ClientConfig": ["ReconnectCount": -1, "ReconnectInterval": 120, "ReconnectNonce": 30, "PingInterval": answer.ping],
            ],
        ])
    }

    /// The connection a `/ws/v2?…&ticket=` upgrade may open (the ticket is used up), or nil; held first
    /// while upgrades are stalled.
    func admit(_ target: String) async -> (connection: Int, service: Int32)? {
        if let stall = state.withLock({ state -> OneTimeEvent? in
            if state.stall != nil { state.upgradesStalled += 1 }
            return state.stall
        }) {
            changed.notify()
            await stall.wait()
        }
        guard let components = URLComponents(string: target), components.path == "/ws/v2" else { return nil }
        let ticket = components.queryItems?.first(where: { $0.name == "ticket" })?.value ?? ""
        return state.withLock { state in
            guard !state.down else { return nil }
            return state.tickets.removeValue(forKey: ticket)
        }
    }

    func serve(_ admitted: (connection: Int, service: Int32), inbound: WebSocketInboundStream, outbound: WebSocketOutboundWriter) async {
        let close = OneTimeEvent()
        let id = admitted.connection
        state.withLock { $0.links[id] = Link(outbound: outbound, close: close, service: admitted.service) }
        changed.notify()
        defer {
            state.withLock { _ = $0.links.removeValue(forKey: id) }
            changed.notify()
        }
        await silence.serve(
            inbound: inbound, close: close, stopped: stopped,
            onSilent: {
                self.state.withLock { $0.links[id]?.silent = true }
                self.changed.notify()
            },
            receive: { message in
                guard case .binary(let buffer) = message, let frame = try? Pbbp2_Frame(serializedBytes: Array(buffer.readableBytesView)) else { return }
                await self.received(frame, connection: id, outbound: outbound)
            })
    }

    private func received(_ frame: Pbbp2_Frame, connection: Int, outbound: WebSocketOutboundWriter) async {
        if frame.method == 0 {
            guard frame.header("type") == "ping" else { return }
            let (config, answer) = state.withLock { state -> ([String: Int]?, Bool) in
                state.pings += 1
                return (state.pongConfig, state.pongs)
            }
            changed.notify()
            guard answer else { return }
            var pong = frame
            pong.headers = [Self.header("type", "pong")]
            if let config, let payload = try? JSONSerialization.data(withJSONObject: config) { pong.payload = payload }
            if let bytes = try? pong.serializedBytes() as [UInt8] { try? await outbound.write(.binary(ByteBuffer(bytes: bytes))) }
            return
        }
        let messageID = frame.header("message_id") ?? ""
        let code = (try? JSONSerialization.jsonObject(with: frame.payload) as? [String: Any])?["code"] as? Int ?? 0
        state.withLock { state in
            // The response must be one of the pushed frames (any fragment; the client answers on the one
            // that completed the event), with its headers kept and only `biz_rt` added.
            let echoes = state.pushed[messageID]?.contains { pushed in
                pushed.seqID == frame.seqID && pushed.logID == frame.logID && pushed.service == frame.service && pushed.method == frame.method
                    && Array(frame.headers.prefix(pushed.headers.count)) == pushed.headers
                    && frame.headers.dropFirst(pushed.headers.count).allSatisfy { $0.key == "biz_rt" }
            } ?? false
            let reply = Reply(
                connection: connection, messageID: messageID, code: code, bizRT: frame.header("biz_rt"), echoesFrame: echoes,
                at: Date().timeIntervalSince1970)
            state.replies.append(reply)
            if code == 200 { state.succeeded.insert(messageID) }
        }
        changed.notify()
    }

    func shutdown() {
        stallUpgrades(false)
        stopped.signal()
        closeAll()
    }
}
