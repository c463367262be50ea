import ChatBridgeCore
import ChatBridgeDingTalk
import Foundation
import Hummingbird
import HummingbirdWebSocket
import HTTPTypes
import Logging
import NIOCore
import NIOFoundationCompat
import Synchronization

/// DingTalk's Stream gateway on loopback (protocols C.7), served by ``DingTalkSimulator``:
/// `POST /v1.0/gateway/connections/open` hands out single-use tickets valid 90 s, `GET /connect?ticket=`
/// upgrades to a WebSocket, and the test pushes CALLBACK frames, pings and disconnects over it and
/// reads back the acks.
///
/// Switches for the hard cases: `disconnect` followed by a close after `disconnectCloseDelay` (10 s, as
/// DingTalk), redelivery of frames left unacknowledged for `redeliverAfter`, ``goSilent()`` (the open
/// connections stop reading and writing — nor are pings answered — like a connection a NAT dropped), and
/// ``setDown(_:)`` (connections/open answers 503 and open connections are closed).
public final class StreamGateway: Sendable {
    /// One ack the client sent.
    public struct Ack: Sendable, Equatable {
        public var connection: Int
        public var messageID: String
        public var code: Int
        public var data: String
        public var message: String
        /// When it arrived, in seconds since 1970.
        public var at: Double
    }

    /// One frame pushed to a connection.
    public struct Pushed: Sendable, Equatable {
        public var connection: Int
        public var messageID: String
    }

    private struct Link {
        var outbound: WebSocketOutboundWriter
        var close: OneTimeEvent
        /// Gone silent: still there for pushes (which vanish), no longer counted as open.
        var silent = false
    }

    private struct State {
        var clientID = ""
        var clientSecret = ""
        var tickets: [String: Date] = [:]
        var openRequests: [Date] = []
        var openRefusals = 0
        var down = false
        var links: [Int: Link] = [:]
        var connectionsAccepted = 0
        var nextFrame = 0
        var acks: [Ack] = []
        var acksByID: [String: [Ack]] = [:]
        var ackWaiters: [String: [Int: CheckedContinuation<Void, Never>]] = [:]
        var nextWaiter = 0
        var pushed: [Pushed] = []
        var frames: [String: String] = [:]
        var disconnectCloseDelay: Duration = .seconds(10)
        var redeliverAfter: Duration?
        var ticketLifetime: TimeInterval = 90
        var silenced = 0
    }

    private let state = Mutex(State())
    private let changed = Broadcast()
    private let stopped = OneTimeEvent()
    private let silence = Silence()
    let endpointBase: @Sendable () -> String

    init(endpointBase: @escaping @Sendable () -> String) {
        self.endpointBase = endpointBase
    }

    // MARK: Controls

    /// The app credentials `connections/open` accepts; anything else is refused with 401 `authFailed`.
    public func setCredentials(clientID: String, clientSecret: String) {
        state.withLock {
            $0.clientID = clientID
            $0.clientSecret = clientSecret
        }
    }

    public func setDisconnectCloseDelay(_ delay: Duration) { state.withLock { $0.disconnectCloseDelay = delay } }
    /// Pushes a CALLBACK frame again (same `messageId`) when it is still unacknowledged after `delay`.
    public func setRedelivery(after delay: Duration?) { state.withLock { $0.redeliverAfter = delay } }

    /// While down, connections/open answers 503 and open connections are closed.
    public func setDown(_ down: Bool) {
        let links = state.withLock { state -> [Link] in
            state.down = down
            return down ? Array(state.links.values) : []
        }
        for link in links { link.close.signal() }
        changed.notify()
    }

    /// The open connections stop reading and writing: no frames, no acks seen, pings unanswered.
    public func goSilent() {
        silence.begin()
    }

    /// Ends a silence for new connections (silent ones stay silent until they are closed).
    public func endSilence() {
        silence.end()
    }

    /// Closes every connection now (a network drop as the client sees it, but with a close frame).
    public func closeAll() {
        for link in state.withLock({ Array($0.links.values) }) { link.close.signal() }
    }

    /// Closes one connection now.
    public func closeConnection(_ id: Int) { state.withLock { $0.links[id] }?.close.signal() }

    /// Connections open and not silent.
    public var openConnections: [Int] { state.withLock { $0.links.filter { !$0.value.silent }.keys.sorted() } }
    public var connectionsAccepted: Int { state.withLock { $0.connectionsAccepted } }
    /// Connections that went silent (stopped reading and writing) so far.
    public var silencedConnections: Int { state.withLock { $0.silenced } }
    /// When each connections/open request arrived (also the refused ones).
    public var openRequests: [Date] { state.withLock { $0.openRequests } }
    public var acks: [Ack] { state.withLock { $0.acks } }
    public var pushed: [Pushed] { state.withLock { $0.pushed } }
    public func acks(for messageID: String) -> [Ack] { state.withLock { $0.acksByID[messageID] ?? [] } }

    /// Waits until `condition` holds on the gateway (checked after every change).
    public func wait(until condition: @Sendable (StreamGateway) -> Bool) async {
        while true {
            let seen = changed.generation
            if condition(self) { return }
            await changed.wait(past: seen)
        }
    }

    /// The first ack of the frame, once it has arrived.
    /// (Cancelled first, it returns an ack with code 0.)
    public func waitForAck(_ messageID: String) async -> Ack {
        await firstAck(messageID) ?? Ack(connection: 0, messageID: messageID, code: 0, data: "", message: "cancelled", at: 0)
    }

    /// The first ack of the frame once it has arrived, or nil when the task is cancelled first.
    public func firstAck(_ messageID: String) async -> Ack? {
        let id = state.withLock { state -> Int in
            state.nextWaiter += 1
            return state.nextWaiter
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let now = state.withLock { state -> Bool in
                    if state.acksByID[messageID] != nil || Task.isCancelled { return true }
                    state.ackWaiters[messageID, default: [:]][id] = continuation
                    return false
                }
                if now { continuation.resume() }
            }
        } onCancel: {
            state.withLock { $0.ackWaiters[messageID]?.removeValue(forKey: id) }?.resume()
        }
        return acks(for: messageID).first
    }

    // MARK: Frames

    /// Pushes a robot message (an A.2 body) as a CALLBACK frame; returns the frame's `messageId`.
    @discardableResult
    public func pushMessage(_ body: Data, to connection: Int? = nil, frameID: String? = nil) async throws -> String {
        let id = frameID ?? nextFrameID()
        try await push(type: "CALLBACK", topic: DingTalkStreamFrame.botMessageTopic, messageID: id, data: String(decoding: body, as: UTF8.self), to: connection)
        if let delay = state.withLock({ $0.redeliverAfter }) {
            Task {
                try? await Task.sleep(for: delay)
                if self.acks(for: id).isEmpty {
                    try? await self.push(
                        type: "CALLBACK", topic: DingTalkStreamFrame.botMessageTopic, messageID: id, data: String(decoding: body, as: UTF8.self), to: nil)
                }
            }
        }
        return id
    }

    /// Sends a SYSTEM `ping` with `opaque`; returns the frame's `messageId`.
    @discardableResult
    public func ping(opaque: String, to connection: Int? = nil) async throws -> String {
        let id = nextFrameID()
        let data = String(decoding: try JSONSerialization.data(withJSONObject: ["opaque": opaque]), as: UTF8.self)
        try await push(type: "SYSTEM", topic: "ping", messageID: id, data: data, to: connection)
        return id
    }

    /// Sends a SYSTEM `disconnect` on a connection and closes it after the close delay.
    public func disconnect(_ connection: Int, reason: String = "connection is expired") async throws {
        let data = String(decoding: try JSONSerialization.data(withJSONObject: ["reason": reason]), as: UTF8.self)
        try await push(type: "SYSTEM", topic: "disconnect", messageID: nextFrameID(), data: data, to: connection)
        let (delay, link) = state.withLock { ($0.disconnectCloseDelay, $0.links[connection]) }
        Task {
            try? await Task.sleep(for: delay)
            link?.close.signal()
        }
    }

    /// Sends any text as a frame (malformed frames, unknown topics).
    public func pushRaw(_ text: String, to connection: Int? = nil) async throws {
        guard let (id, link) = self.link(connection) else { throw SimulatorError(description: "no open Stream connection") }
        state.withLock { $0.pushed.append(Pushed(connection: id, messageID: "")) }
        guard !link.silent else { return }
        try await link.outbound.write(.text(text))
    }

    /// A frame of any type and topic.
    public func push(type: String, topic: String, messageID: String, data: String, to connection: Int?) async throws {
        guard let (id, link) = self.link(connection) else { throw SimulatorError(description: "no open Stream connection") }
        let frame: [String: Any] = [
            "specVersion": "1.0", "type": type, "data": data,
            "headers": [
                "appId": "sim-app", "connectionId": "conn-\(id)", "contentType": "application/json", "messageId": messageID,
                "time": String(Int64(Date().timeIntervalSince1970 * 1000)), "topic": topic,
            ],
        ]
        let text = String(decoding: try JSONSerialization.data(withJSONObject: frame), as: UTF8.self)
        state.withLock {
            $0.pushed.append(Pushed(connection: id, messageID: messageID))
            $0.frames[messageID] = text
        }
        // A silent connection swallows what is pushed to it, as a connection a NAT dropped.
        guard !link.silent else { return }
        try await link.outbound.write(.text(text))
    }

    private func nextFrameID() -> String {
        state.withLock { state -> String in
            state.nextFrame += 1
            return "frame-\(state.nextFrame)"
        }
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

    func open(_ request: Request) async throws -> Response {
        let body = try await request.body.collect(upTo: 1 << 20)
        let json = (try? JSONSerialization.jsonObject(with: Data(buffer: body))) as? [String: Any] ?? [:]
        let (down, valid) = state.withLock { state -> (Bool, Bool) in
            state.openRequests.append(Date())
            let valid = (json["clientId"] as? String) == state.clientID && (json["clientSecret"] as? String) == state.clientSecret
                && !state.clientID.isEmpty
            if !valid || state.down { state.openRefusals += 1 }
            return (state.down, valid)
        }
        changed.notify()
        if down { return .json(.serviceUnavailable, ["code": "ServiceUnavailable", "message": "simulated outage"]) }
        guard valid else { return .json(.unauthorized, ["requestid": "sim", "code": "authFailed", "message": "鉴权失败"]) }
        let subscriptions = json["subscriptions"] as? [[String: Any]] ?? []
        guard subscriptions.contains(where: { $0["type"] as? String == "CALLBACK" && $0["topic"] as? String == DingTalkStreamFrame.botMessageTopic }) else {
            return .json(.badRequest, ["code": "invalidParameter", "message": "no CALLBACK subscription for robot messages"])
        }
        let ticket = UUID().uuidString.lowercased()
        state.withLock { $0.tickets[ticket] = Date() }
        return .json(.ok, ["endpoint": endpointBase() + "/connect", "ticket": ticket])
    }

    /// Whether `/connect?ticket=` may upgrade: the ticket exists, is fresh, and is used now.
    func admit(_ target: String) -> Bool {
        let ticket = URLComponents(string: target)?.queryItems?.first(where: { $0.name == "ticket" })?.value ?? ""
        return state.withLock { state in
            guard !state.down, URLComponents(string: target)?.path == "/connect", let issued = state.tickets.removeValue(forKey: ticket) else { return false }
            return Date().timeIntervalSince(issued) <= state.ticketLifetime
        }
    }

    func serve(inbound: WebSocketInboundStream, outbound: WebSocketOutboundWriter) async {
        let close = OneTimeEvent()
        let id = state.withLock { state -> Int in
            state.connectionsAccepted += 1
            state.links[state.connectionsAccepted] = Link(outbound: outbound, close: close)
            return state.connectionsAccepted
        }
        changed.notify()
        defer {
            state.withLock { _ = $0.links.removeValue(forKey: id) }
            changed.notify()
        }
        await silence.serve(
            inbound: inbound, close: close, stopped: stopped,
            onSilent: {
                self.state.withLock {
                    $0.silenced += 1
                    $0.links[id]?.silent = true
                }
                self.changed.notify()
            },
            receive: { message in
                guard case .text(let text) = message else { return }
                self.record(ack: text, connection: id)
            })
    }

    private func record(ack text: String, connection: Int) {
        guard let object = (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any],
            let headers = object["headers"] as? [String: Any], let messageID = headers["messageId"] as? String
        else { return }
        let ack = Ack(
            connection: connection, messageID: messageID, code: object["code"] as? Int ?? 0, data: object["data"] as? String ?? "",
            message: object["message"] as? String ?? "", at: Date().timeIntervalSince1970)
        let waiters = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.acks.append(ack)
            state.acksByID[messageID, default: []].append(ack)
            return Array((state.ackWaiters.removeValue(forKey: messageID) ?? [:]).values)
        }
        for waiter in waiters { waiter.resume() }
        changed.notify()
    }

    func shutdown() {
        stopped.signal()
        closeAll()
    }
}

/// Wakes every waiter on each change; a waiter names the generation it saw, so no change is missed.
final class Broadcast: Sendable {
    private let state = Mutex<(generation: Int, waiters: [CheckedContinuation<Void, Never>])>((0, []))
    var generation: Int { state.withLock { $0.generation } }
    func notify() {
        let all = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.generation += 1
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in all { waiter.resume() }
    }
    func wait(past generation: Int) async {
        await withCheckedContinuation { continuation in
            let now = state.withLock { state -> Bool in
                if state.generation != generation { return true }
                state.waiters.append(continuation)
                return false
            }
            if now { continuation.resume() }
        }
    }
}
