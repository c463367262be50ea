import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeHTTP
import Foundation
import HummingbirdWSClient
import Logging
import Metrics
import NIOCore
import NIOFoundationCompat
import NIOHTTP1
import NIOWebSocket
import ServiceLifecycle
import Synchronization

/// DingTalk Stream mode (protocols C): an outbound WebSocket on which DingTalk pushes robot messages, so
/// no public URL is needed. A service in the application's service group.
///
/// - Every connect takes a fresh ticket from `connections/open`; the returned endpoint must be an allowed
///   host (`dingtalk.stream` hosts), never anything DingTalk's answer could point elsewhere.
/// - A robot message goes through the same ``DingTalkIngress/receive(_:)`` as an HTTP callback and is
///   acknowledged only after the inbox commit; when the store fails no ack is sent, so DingTalk re-delivers.
///   A re-delivery is a duplicate in the inbox and is acknowledged again.
/// - `disconnect` is make-before-break: a new connection is opened and confirmed first, the old one keeps
///   delivering (and acknowledging) until DingTalk closes it or `rotationGrace` passes.
/// - A WebSocket ping goes out every `keepaliveTimeout`; a ping still unanswered at the next one drops the
///   connection. Failures reconnect with exponential backoff and jitter; rejected credentials wait the cap.
public final class DingTalkStream: Service, Sendable {
    /// What `/readyz` shows.
    public typealias Status = ConnectionStatus

    private let settings: DingTalkSettings
    private let ingress: DingTalkIngress
    private let client: HTTPClient
    private let clock: any WallClock
    private let logger: Logger
    private let random: @Sendable () -> Double
    private let state = Mutex(State())
    private let metrics: any MetricsFactory
    private let connectedGauge: Gauge
    private let frames: LabelledCounters
    private let reconnects: LabelledCounters

    private struct State {
        /// What the supervisor is doing; shown as `connected` while a connection is open.
        var phase: Status = .off
        var open = 0
        var nextID = 0
        var tasks: [Int: Task<Void, Never>] = [:]
    }

    public init(
        settings: DingTalkSettings, ingress: DingTalkIngress, client: HTTPClient, clock: any WallClock,
        metrics: any MetricsFactory = MetricsSystem.factory, logger: Logger,
        random: @escaping @Sendable () -> Double = { Double.random(in: 0..<1) }
    ) {
        self.settings = settings
        self.ingress = ingress
        self.client = client
        self.clock = clock
        self.metrics = metrics
        self.logger = logger
        self.random = random
        connectedGauge = Gauge(label: "chatbridge_stream_connected", factory: metrics)
        frames = LabelledCounters(label: "chatbridge_stream_frames_total", dimension: "type", values: DingTalkStreamFrame.frameTypes, metrics: metrics)
        reconnects = LabelledCounters(label: "chatbridge_stream_reconnects_total", dimension: "reason", values: DingTalkStreamFrame.reconnectReasons, metrics: metrics)
        connectedGauge.record(0)
    }

    public var status: Status { state.withLock { $0.phase.with(openConnections: $0.open) } }
    /// Connections open now (two for a moment during a rotation).
    public var openConnections: Int { state.withLock { $0.open } }

    /// Why the stream will not connect, or nil when it will.
    public var configurationProblem: String? {
        if settings.mode == .http { return "dingtalk.mode is http" }
        if !settings.hasOpenAPICredentials {
            return "DingTalk Stream mode needs dingtalk.client_id and dingtalk.client_secret (CHATBRIDGE_DINGTALK_CLIENT_ID, CHATBRIDGE_DINGTALK_CLIENT_SECRET); set them, or dingtalk.mode: http for callbacks only"
        }
        return nil
    }

    public func run() async throws {
        if let problem = configurationProblem {
            if settings.mode == .stream { logger.warning("\(problem); running without the Stream connection") }
            try? await gracefulShutdown()
            return
        }
        setStatus(.connecting)
        // Graceful shutdown closes the connections (the WebSocket client closes on it); frames that arrive
        // until the close completes, and commits already begun, are still stored before they are acked.
        await cancelWhenGracefulShutdown { await self.supervise() }
        setStatus(.stopped)
        logger.info("DingTalk Stream stopped")
    }

    private func setStatus(_ status: Status) { state.withLock { $0.phase = status } }

    // MARK: Supervision

    /// Keeps one connection up: reconnects with backoff, rotates make-before-break on `disconnect`.
    /// Returns when cancelled (or at graceful shutdown), after every connection has ended.
    private func supervise() async {
        await withDiscardingTaskGroup { group in
            var failures = 0
            var current: Connection?
            var reconnectReason = "start"
            while !Task.isCancelled {
                let next: Connection
                do {
                    next = try await connect(in: &group, reason: reconnectReason)
                } catch let failure as ConnectFailure {
                    failures += 1
                    let delay: Duration
                    switch failure {
                    case .rejected(let reason):
                        setStatus(.rejected)
                        delay = settings.stream.maxBackoff
                        logger.error("DingTalk refused the Stream connection: \(reason); check dingtalk.client_id and dingtalk.client_secret (CHATBRIDGE_DINGTALK_CLIENT_ID, CHATBRIDGE_DINGTALK_CLIENT_SECRET)", metadata: ["retry_in": "\(delay)"])
                    case .failed(let reason):
                        setStatus(.connecting)
                        delay = backoff(afterFailures: failures)
                        logger.warning("could not open the DingTalk Stream connection: \(reason)", metadata: ["retry_in": "\(delay)"])
                    }
                    reconnects.count("connect_failed")
                    do { try await clock.sleep(for: delay) } catch { break }
                    continue
                } catch {
                    break  // cancelled
                }
                // The new connection is confirmed: now the old one (if rotating) may go.
                if let old = current { old.retire(after: settings.stream.rotationGrace, clock: clock) }
                current = next
                setStatus(.connected)
                let event = await next.nextEvent()
                // A connection that stayed up for a healthy while resets the backoff, however it ended.
                if Duration.between(next.openedAt, clock.now) >= settings.stream.healthyAfter { failures = 0 }
                switch event {
                case .rotate:
                    reconnectReason = "disconnect"
                    logger.info("DingTalk asked to rotate the Stream connection; opening the next one before closing this one", metadata: ["connection": "\(next.id)"])
                    reconnects.count("disconnect")
                case .ended(let reason, let kind):
                    current = nil
                    if Task.isCancelled || kind == "stopped" { break }
                    setStatus(.connecting)
                    failures += 1
                    reconnectReason = kind
                    let delay = backoff(afterFailures: failures)
                    logger.info("DingTalk Stream connection ended: \(reason); reconnecting", metadata: ["connection": "\(next.id)", "retry_in": "\(delay)"])
                    reconnects.count(kind)
                    do { try await clock.sleep(for: delay) } catch { break }
                case .confirmed:
                    break
                }
            }
            group.cancelAll()
        }
        await endConnections()
    }

    /// Cancels every connection and waits (a bounded while) for them to end: their frames being stored
    /// finish first, and nothing is acknowledged once the socket is closed.
    private func endConnections() async {
        let tasks = state.withLock { Array($0.tasks.values) }
        for task in tasks { task.cancel() }
        // Awaiting a task's value does not answer cancellation, so it is waited for through an event.
        let ended = OneTimeEvent()
        Task {
            for task in tasks { await task.value }
            ended.signal()
        }
        _ = await SystemClock().withTimeout(.seconds(5)) { await ended.wait() }
    }

    /// Exponential backoff with ±20 % jitter: 1 s, 2 s, 4 s … capped.
    func backoff(afterFailures failures: Int) -> Duration {
        let base = settings.stream.initialBackoff * (1 << min(max(failures - 1, 0), 20))
        let capped = min(base, settings.stream.maxBackoff)
        return min(capped * (0.8 + 0.4 * random()), settings.stream.maxBackoff)
    }

    // MARK: One connection

    /// Takes a ticket, connects and returns once the WebSocket is open; the connection then runs in `group`.
    private func connect(in group: inout DiscardingTaskGroup, reason: String) async throws -> Connection {
        let (endpoint, ticket) = try await openTicket()
        guard settings.allowsStreamEndpoint(endpoint) else {
            throw ConnectFailure.failed(
                "connections/open named an endpoint that is not an allowed wss:// host (\(OutboundHTTP.hostDescription(endpoint))); not connecting. Allowed hosts: dingtalk.stream.hosts")
        }
        var components = URLComponents(string: endpoint)!
        var query = components.percentEncodedQueryItems ?? []
        query.append(URLQueryItem(name: "ticket", value: ticket.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? ticket))
        components.percentEncodedQueryItems = query
        let url = components.string ?? endpoint
        let id = state.withLock { state -> Int in
            state.nextID += 1
            return state.nextID
        }
        let connection = Connection(id: id, openedAt: clock.now)
        // Not a child task: a connect that stalls before the upgrade does not answer cancellation, and
        // must hold up neither the supervisor nor shutdown. Connections are cancelled when supervision ends.
        let task = Task { await self.runConnection(connection, url: url) }
        state.withLock { $0.tasks[id] = task }
        group.addTask {
            // An upgrade that has not completed in time is a failed connect.
            try? await self.clock.sleep(for: .seconds(15))
            if !connection.wasConfirmed {
                connection.end("the WebSocket upgrade did not complete within 15s", kind: "connect_failed")
                task.cancel()
            }
        }
        switch await connection.nextEvent() {
        case .confirmed:
            logger.info("DingTalk Stream connected", metadata: ["connection": "\(id)", "reason": "\(reason)", "host": "\(OutboundHTTP.hostDescription(endpoint))"])
            return connection
        case .ended(_, "stopped"):
            throw CancellationError()
        case .ended(let why, _):
            throw ConnectFailure.failed(why)
        case .rotate:
            throw ConnectFailure.failed("asked to rotate before it was confirmed")
        }
    }

    /// `POST /v1.0/gateway/connections/open` (C.1): a single-use ticket and the endpoint to use it on.
    private func openTicket() async throws -> (endpoint: String, ticket: String) {
        struct Body: Encodable {
            struct Subscription: Encodable {
                var type: String
                var topic: String
            }
            var clientId: String
            var clientSecret: String
            var subscriptions: [Subscription]
            var ua: String
        }
        let body = Body(
            clientId: settings.clientID, clientSecret: settings.clientSecret,
            subscriptions: [.init(type: "CALLBACK", topic: DingTalkStreamFrame.botMessageTopic)], ua: "chatbridge-sdk-swift/1.0")
        var request = HTTPClientRequest(url: settings.apiBaseURL + "/v1.0/gateway/connections/open")
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        request.headers.add(name: "Accept", value: "application/json")
        request.body = .bytes(ByteBuffer(data: try JSONEncoder().encode(body)))
        let response: HTTPClientResponse
        let data: Data
        do {
            response = try await client.execute(request, timeout: .seconds(10))
            data = Data(buffer: try await response.body.collect(upTo: 64 * 1024))
        } catch {
            if error is CancellationError || Task.isCancelled { throw CancellationError() }
            throw ConnectFailure.failed("connections/open at \(OutboundHTTP.hostDescription(settings.apiBaseURL)) failed: \(TransportFailure(error))")
        }
        struct Answer: Decodable {
            var endpoint: String?
            var ticket: String?
            var code: String?
            var message: String?
        }
        let answer = try? JSONDecoder().decode(Answer.self, from: data)
        let status = Int(response.status.code)
        guard (200..<300).contains(status) else {
            let detail = "connections/open answered HTTP \(status)" + (answer?.code.map { " \($0)" } ?? "") + (answer?.message.map { ": \($0)" } ?? "")
            if (400..<500).contains(status), status != 429, answer?.code != nil { throw ConnectFailure.rejected(detail) }
            throw ConnectFailure.failed(detail)
        }
        guard let endpoint = answer?.endpoint, !endpoint.isEmpty, let ticket = answer?.ticket, !ticket.isEmpty else {
            throw ConnectFailure.failed("connections/open answered HTTP \(status) without an endpoint and a ticket")
        }
        return (endpoint, ticket)
    }

    private func runConnection(_ connection: Connection, url: String) async {
        var configuration = WebSocketClientConfiguration()
        configuration.maxFrameSize = 1 << 20
        configuration.autoPing = .enabled(timePeriod: settings.stream.keepaliveTimeout)
        configuration.closeTimeout = .seconds(3)
        var wsLogger = logger
        wsLogger.logLevel = max(logger.logLevel, .notice)
        let outcome: String
        var kind = "closed"
        do {
            let close = try await WebSocketClient.connect(url: url, configuration: configuration, logger: wsLogger) { inbound, outbound, _ in
                self.opened(connection)
                defer { self.closed(connection) }
                let slots = FrameSlots(Self.framesInFlight)
                await withDiscardingTaskGroup { tasks in
                    tasks.addTask {
                        // Retire: DingTalk did not close the old connection in time after the new one came up.
                        // The frames being stored finish and are acknowledged first (a bounded wait).
                        await connection.retirement.wait()
                        guard !Task.isCancelled else { return }
                        _ = await SystemClock().withTimeout(.seconds(5)) { await slots.waitUntilIdle() }
                        try? await outbound.close(.normalClosure, reason: "rotated")
                    }
                    do {
                        for try await message in inbound.messages(maxSize: 1 << 20) {
                            connection.heard(at: self.clock.now)
                            guard case .text(let text) = message else { continue }
                            await slots.acquire()
                            tasks.addTask {
                                defer { slots.release() }
                                guard let ack = await self.handle(text, connection: connection) else { return }
                                do {
                                    try await outbound.write(.text(ack))
                                } catch {
                                    self.logger.debug("could not write an ack; DingTalk re-delivers the frame", metadata: ["error": "\(error)"])
                                }
                            }
                        }
                    } catch {
                        self.logger.debug("the Stream connection's read ended with an error", metadata: ["error": "\(error)"])
                    }
                    // The socket is closed: no ack can go out any more (DingTalk re-delivers what was not acked).
                    tasks.cancelAll()
                }
            }
            if let close {
                outcome = "closed by DingTalk (\(close.closeCode)\(close.reason.map { ": \($0)" } ?? ""))"
            } else if !Task.isCancelled, Duration.between(connection.lastHeard, clock.now) >= settings.stream.keepaliveTimeout {
                // Closed without a close frame from DingTalk after a quiet ping period: the ping went unanswered.
                outcome = "nothing arrived for \(settings.stream.keepaliveTimeout) and the ping went unanswered"
                kind = "keepalive"
            } else {
                outcome = "closed"
            }
        } catch {
            if Task.isCancelled {
                outcome = "stopped"
                kind = "stopped"
            } else {
                outcome = "\(error)"
                kind = "\(error)".lowercased().contains("ping") ? "keepalive" : "error"
            }
        }
        if !connection.wasConfirmed { kind = "connect_failed" }
        if Task.isCancelled { kind = "stopped" }
        state.withLock { _ = $0.tasks.removeValue(forKey: connection.id) }
        if connection.isRotating {
            // The supervisor has moved on to the next connection; this line is the old one's end.
            logger.info("the rotated-out DingTalk Stream connection closed: \(outcome)", metadata: ["connection": "\(connection.id)"])
        }
        connection.end(outcome, kind: kind)
    }

    private struct EndOfStream: Error {}

    /// Frames of one connection handled at once.
    static let framesInFlight = 512

    private func opened(_ connection: Connection) {
        connection.confirm(at: clock.now)
        let open = state.withLock { state -> Int in
            state.open += 1
            return state.open
        }
        connectedGauge.record(open > 0 ? 1 : 0)
    }

    private func closed(_ connection: Connection) {
        let open = state.withLock { state -> Int in
            state.open -= 1
            return state.open
        }
        connectedGauge.record(open > 0 ? 1 : 0)
    }

    /// Handles one text frame and returns the ack to send, if any.
    func handle(_ text: String, connection: Connection) async -> String? {
        let frame: DingTalkStreamFrame
        do {
            frame = try DingTalkStreamFrame.parse(text)
        } catch {
            frames.count("malformed")
            logger.warning("ignoring a malformed Stream frame", metadata: ["error": "\(error)", "connection": "\(connection.id)"])
            return nil
        }
        switch (frame.type, frame.topic) {
        case ("SYSTEM", "ping"):
            frames.count("ping")
            return frame.ack(code: 200, data: frame.data ?? "{}")
        case ("SYSTEM", "disconnect"):
            frames.count("disconnect")
            connection.requestRotation()
            return frame.ack(code: 200, data: frame.data ?? "{}")
        case ("CALLBACK", DingTalkStreamFrame.botMessageTopic):
            frames.count("callback")
            guard let data = frame.data else {
                logger.warning("a robot message frame without data; acknowledged and dropped", metadata: ["frame_id": "\(frame.messageID)"])
                return frame.ack(code: 200, data: #"{"response":null}"#)
            }
            do {
                // A commit that has begun completes even when the connection ends or the service stops
                // meanwhile; the ack may then not go out, and DingTalk's re-delivery is a duplicate.
                let ingress = self.ingress
                _ = try await Task { try await ingress.receive(Data(data.utf8)) }.value
                return frame.ack(code: 200, data: #"{"response":null}"#)
            } catch let rejection as IngressRejection where rejection.kind != .unavailable {
                // Nothing a re-delivery could change: acknowledged so DingTalk stops, never stored.
                logger.warning("refused a Stream robot message; acknowledged, not stored", metadata: ["reason": "\(rejection)", "frame_id": "\(frame.messageID)"])
                return frame.ack(code: 200, data: #"{"response":null}"#)
            } catch {
                // Not stored, so not acknowledged: DingTalk delivers it again.
                logger.error("could not store a Stream robot message; not acknowledged, DingTalk re-delivers it", metadata: ["error": "\(error)", "frame_id": "\(frame.messageID)"])
                return nil
            }
        default:
            frames.count("unknown")
            logger.debug("unhandled Stream frame; acknowledged with 404", metadata: ["type": "\(frame.type)", "topic": "\(frame.topic)"])
            return frame.ack(code: 404, data: "{}")
        }
    }
}

/// One WebSocket connection's life, as the supervisor sees it.
final class Connection: Sendable {
    enum Event: Sendable {
        case confirmed
        /// DingTalk sent `disconnect`: open the next connection.
        case rotate
        /// The connection is gone (`kind` labels the reconnect metric).
        case ended(String, kind: String)
    }

    let id: Int
    let openedAt: Date
    let retirement = OneTimeEvent()
    private struct State {
        var confirmed = false
        var rotating = false
        var ended: Event?
        var queue: [Event] = []
        var waiter: CheckedContinuation<Event, Never>?
        var lastFrame: Date
    }
    private let state: Mutex<State>

    init(id: Int, openedAt: Date) {
        self.id = id
        self.openedAt = openedAt
        state = Mutex(State(lastFrame: openedAt))
    }

    var wasConfirmed: Bool { state.withLock { $0.confirmed } }
    /// DingTalk asked to rotate it: the supervisor has moved on to the next connection.
    var isRotating: Bool { state.withLock { $0.rotating } }
    /// When the last frame arrived.
    var lastHeard: Date { state.withLock { $0.lastFrame } }
    func heard(at date: Date) { state.withLock { $0.lastFrame = date } }

    func confirm(at date: Date) {
        post { state in
            state.lastFrame = date
            state.confirmed = true
            return .confirmed
        }
    }

    func requestRotation() {
        post { state in
            guard !state.rotating else { return nil }
            state.rotating = true
            return .rotate
        }
    }

    /// Closes the connection after `grace`, unless it ends before.
    func retire(after grace: Duration, clock: any WallClock) {
        Task {
            try? await clock.sleep(for: grace)
            retirement.signal()
        }
    }

    func end(_ reason: String, kind: String) {
        post { state in
            guard state.ended == nil else { return nil }
            state.ended = .ended(reason, kind: kind)
            return state.ended
        }
        retirement.signal()
    }

    private func post(_ make: (inout State) -> Event?) {
        let waiter = state.withLock { state -> (CheckedContinuation<Event, Never>, Event)? in
            guard let event = make(&state) else { return nil }
            if let waiter = state.waiter {
                state.waiter = nil
                return (waiter, event)
            }
            state.queue.append(event)
            return nil
        }
        if let (continuation, event) = waiter { continuation.resume(returning: event) }
    }

    /// The next event; `.ended` (again) once the connection is gone, `.ended(kind: "stopped")` when the
    /// waiting task is cancelled. One waiter at a time.
    func nextEvent() async -> Event {
        await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let ready = state.withLock { state -> Event? in
                    if !state.queue.isEmpty { return state.queue.removeFirst() }
                    if let ended = state.ended { return ended }
                    if Task.isCancelled { return Self.stopped }
                    state.waiter = continuation
                    return nil
                }
                if let ready { continuation.resume(returning: ready) }
            }
        } onCancel: {
            let waiter = state.withLock { state -> CheckedContinuation<Event, Never>? in
                defer { state.waiter = nil }
                return state.waiter
            }
            waiter?.resume(returning: Self.stopped)
        }
    }

    static let stopped = Event.ended("stopped", kind: "stopped")
}

/// A Stream frame (C.3) and its ack (C.4).
public struct DingTalkStreamFrame: Sendable, Equatable {
    public static let botMessageTopic = "/v1.0/im/bot/messages/get"

    public var type: String
    public var topic: String
    public var messageID: String
    /// The frame's `data`: a JSON document encoded as a string.
    public var data: String?

    public struct Malformed: Error, CustomStringConvertible {
        public var description: String
    }

    public static func parse(_ text: String) throws -> DingTalkStreamFrame {
        struct Wire: Decodable {
            struct Headers: Decodable {
                var topic: String?
                var messageId: String?
            }
            var type: String?
            var headers: Headers?
            var data: String?
        }
        let wire: Wire
        do {
            wire = try JSONDecoder().decode(Wire.self, from: Data(text.utf8))
        } catch {
            throw Malformed(description: "not a Stream frame (JSON with type, headers and a string data)")
        }
        guard let messageID = wire.headers?.messageId, !messageID.isEmpty else {
            throw Malformed(description: "the frame has no headers.messageId")
        }
        return DingTalkStreamFrame(type: wire.type ?? "", topic: wire.headers?.topic ?? "", messageID: messageID, data: wire.data)
    }

    /// The ack for this frame: `headers.messageId` echoed, `data` a JSON string.
    public func ack(code: Int, data: String) -> String {
        struct Ack: Encodable {
            struct Headers: Encodable {
                var messageId: String
                var contentType = "application/json"
            }
            var code: Int
            var headers: Headers
            var message: String
            var data: String
        }
        let ack = Ack(code: code, headers: .init(messageId: messageID), message: code == 200 ? "OK" : "not handled", data: data)
        return String(decoding: (try? JSONEncoder().encode(ack)) ?? Data(), as: UTF8.self)
    }

    /// `chatbridge_stream_frames_total{type}` values.
    static let frameTypes = ["callback", "ping", "disconnect", "unknown", "malformed"]
    /// `chatbridge_stream_reconnects_total{reason}` values: DingTalk's rotation, an unanswered keepalive
    /// ping, a close by the other side, a network error, a failed connect (ticket or upgrade).
    static let reconnectReasons = ["disconnect", "keepalive", "closed", "error", "connect_failed"]

}
