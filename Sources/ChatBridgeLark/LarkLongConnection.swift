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
import SwiftProtobuf

/// The Feishu/Lark long connection (protocols E.7): an outbound WebSocket of pbbp2 protobuf frames on which
/// Feishu pushes events, so no public URL is needed. A service in the application's service group; it also
/// fetches the bot's own identity at start (in webhook mode too), which group mentions are checked against.
///
/// - Every connect takes a fresh URL from `{lark.base_url}/callback/ws/endpoint`; it must be on an allowed
///   host (`lark.stream.hosts`). A client error there (bad credentials) is logged with what to fix and
///   retried only at the backoff cap; other failures reconnect with exponential backoff and full jitter.
/// - A ping goes out right after connecting and then every `PingInterval` (from the endpoint's and the
///   pongs' `ClientConfig`); a ping unanswered for `lark.stream.keepalive_timeout` drops the connection.
/// - A data frame of type `event` is reassembled from its fragments (`sum`, `seq`, by `message_id`), then
///   stored through the same ingress as a webhook event; only after the inbox commit is the frame sent
///   back with `biz_rt` and `{"code":200}` (`{"code":500}` when the store failed, so Feishu re-pushes).
public final class LarkLongConnection: Service, Sendable {
    /// What `/readyz` shows.
    public typealias Status = ConnectionStatus

    /// The reconnect and ping settings Feishu hands out (seconds).
    struct ClientConfig: Sendable, Equatable, Decodable {
        var reconnectCount: Int = -1
        var reconnectInterval: Int = 120
        var reconnectNonce: Int = 30
        var pingInterval: Int = 120

        enum CodingKeys: String, CodingKey {
            case reconnectCount = "ReconnectCount", reconnectInterval = "ReconnectInterval", reconnectNonce = "ReconnectNonce"
            case pingInterval = "PingInterval"
        }

        init() {}
        init(from decoder: any Swift.Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            reconnectCount = try c.decodeIfPresent(Int.self, forKey: .reconnectCount) ?? -1
            reconnectInterval = try c.decodeIfPresent(Int.self, forKey: .reconnectInterval) ?? 120
            reconnectNonce = try c.decodeIfPresent(Int.self, forKey: .reconnectNonce) ?? 30
            pingInterval = try c.decodeIfPresent(Int.self, forKey: .pingInterval) ?? 120
        }
    }

    private let settings: LarkSettings
    private let ingress: LarkWebhookIngress
    private let bot: LarkBotIdentity
    private let client: HTTPClient
    private let clock: any WallClock
    private let logger: Logger
    private let random: @Sendable () -> Double
    private let state = Mutex(State())
    private let connectedGauge: Gauge
    private let frames: LabelledCounters
    private let reconnects: LabelledCounters
    private let responseTimer: Metrics.Timer

    private struct State {
        var phase: Status = .off
        var open = 0
        var config = ClientConfig()
    }

    static let frameTypes = ["event", "fragment", "card", "pong", "unknown", "malformed"]
    /// Events of one connection being stored at once.
    static let framesInFlight = 512
    static let reconnectReasons = ["closed", "keepalive", "error", "connect_failed", "rejected"]

    public init(
        settings: LarkSettings, ingress: LarkWebhookIngress, bot: LarkBotIdentity, client: HTTPClient, clock: any WallClock,
        metrics: any MetricsFactory = MetricsSystem.factory, logger: Logger,
        random: @escaping @Sendable () -> Double = { Double.random(in: 0..<1) }
    ) {
        self.settings = settings
        self.ingress = ingress
        self.bot = bot
        self.client = client
        self.clock = clock
        self.logger = logger
        self.random = random
        connectedGauge = Gauge(label: "chatbridge_lark_stream_connected", factory: metrics)
        frames = LabelledCounters(label: "chatbridge_lark_stream_frames_total", dimension: "type", values: Self.frameTypes, metrics: metrics)
        reconnects = LabelledCounters(label: "chatbridge_lark_stream_reconnects_total", dimension: "reason", values: Self.reconnectReasons, metrics: metrics)
        responseTimer = Metrics.Timer(label: "chatbridge_ack_seconds", dimensions: [("platform", "lark_stream")], factory: metrics)
        connectedGauge.record(0)
    }

    public var status: Status { state.withLock { $0.phase.with(openConnections: $0.open) } }

    /// Why the long connection will not connect, or nil when it will.
    public var configurationProblem: String? {
        if !settings.isEnabled { return "Lark is not configured (lark.app_id)" }
        if settings.mode == .webhook { return "lark.mode is webhook" }
        if !settings.hasCredentials { return "the Lark long connection needs lark.app_id and lark.app_secret" }
        return nil
    }

    public func run() async throws {
        if settings.isEnabled, settings.hasCredentials {
            // The bot's open_id is needed for group mentions, whichever way events arrive.
            await cancelWhenGracefulShutdown { _ = try? await self.bot.fetch() }
        }
        if let problem = configurationProblem {
            if settings.isEnabled, settings.mode == .websocket { logger.warning("\(problem); running without the Lark long connection") }
            try? await gracefulShutdown()
            return
        }
        setPhase(.connecting)
        await cancelWhenGracefulShutdown { await self.supervise() }
        setPhase(.stopped)
        logger.info("Lark long connection stopped")
    }

    private func setPhase(_ phase: Status) { state.withLock { $0.phase = phase } }

    // MARK: Supervision

    /// Keeps one connection up; returns when cancelled.
    private func supervise() async {
        var failures = 0
        while !Task.isCancelled {
            let wait: Duration
            do {
                let (url, config) = try await endpoint()
                state.withLock { $0.config = config }
                let started = clock.now
                let (reason, kind) = await runGuarded(url: url)
                if Task.isCancelled { return }
                reconnects.count(kind)
                // A connection that stayed up a while was healthy: the next one starts the backoff afresh.
                let healthy = Duration.between(started, clock.now) >= .seconds(60)
                failures = healthy ? 1 : failures + 1
                logger.warning("the Lark long connection ended; reconnecting", metadata: ["reason": "\(reason)"])
                setPhase(.connecting)
                wait = backoff(afterFailures: failures)
            } catch ConnectFailure.rejected(let reason) {
                reconnects.count("rejected")
                setPhase(.rejected)
                logger.error("Feishu refused the long connection: \(reason); trying again in \(settings.stream.maxBackoff)")
                wait = settings.stream.maxBackoff
            } catch {
                if Task.isCancelled { return }
                failures += 1
                reconnects.count("connect_failed")
                wait = backoff(afterFailures: failures)
                logger.warning("cannot open the Lark long connection; retrying", metadata: ["error": "\(error)", "retry_in": "\(wait)"])
            }
            do { try await clock.sleep(for: wait) } catch { return }
        }
    }

    /// Exponential backoff with full jitter, capped by `lark.stream.max_backoff` and Feishu's
    /// `ReconnectInterval`.
    func backoff(afterFailures failures: Int) -> Duration {
        let interval = state.withLock { $0.config.reconnectInterval }
        let cap = min(settings.stream.maxBackoff, .seconds(max(interval, 1)))
        let initial = min(settings.stream.initialBackoff, cap)
        let exponent = min(max(failures - 1, 0), 16)
        let ceiling = min(initial * (1 << exponent), cap)
        return ceiling * random()
    }

    /// Asks Feishu where to connect (E.7 step 1).
    private func endpoint() async throws -> (String, ClientConfig) {
        var request = HTTPClientRequest(url: settings.baseURL + "/callback/ws/endpoint")
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        request.headers.add(name: "locale", value: "zh")
        request.body = .bytes(ByteBuffer(data: try JSONSerialization.data(withJSONObject: ["AppID": settings.appID, "AppSecret": settings.appSecret])))
        let response: HTTPClientResponse
        let body: ByteBuffer
        do {
            response = try await client.execute(request, timeout: .seconds(15))
            body = try await response.body.collect(upTo: 256 * 1024)
        } catch {
            throw ConnectFailure.failed("the endpoint request to \(OutboundHTTP.hostDescription(settings.baseURL)) failed: \(TransportFailure(error))")
        }
        struct Answer: Decodable {
            struct Payload: Decodable {
                var URL: String?
                var ClientConfig: LarkLongConnection.ClientConfig?
            }
            var code: Int?
            var msg: String?
            var data: Payload?
        }
        let status = Int(response.status.code)
        guard status == 200 else { throw ConnectFailure.failed("the endpoint request answered HTTP \(status)") }
        guard let answer = try? JSONDecoder().decode(Answer.self, from: Data(buffer: body)), let code = answer.code else {
            throw ConnectFailure.failed("the endpoint request answered without Feishu's JSON")
        }
        switch code {
        case 0:
            break
        case 1, 1000040343:
            throw ConnectFailure.failed("Feishu is busy (code \(code): \(answer.msg ?? ""))")
        default:
            throw ConnectFailure.rejected(
                "code \(code): \(answer.msg ?? "") — check lark.app_id and lark.app_secret, that the app is a self-built app with the bot capability and long-connection events enabled, and lark.base_url (open.feishu.cn for Feishu, open.larksuite.com for Lark)")
        }
        guard let url = answer.data?.URL, !url.isEmpty else { throw ConnectFailure.failed("the endpoint answer has no URL") }
        guard settings.stream.allows(url) else {
            throw ConnectFailure.rejected(
                "the endpoint answer points at \(OutboundHTTP.hostDescription(url)), which is not in lark.stream.hosts (\(settings.stream.hosts.joined(separator: ", "))); not connecting")
        }
        return (url, answer.data?.ClientConfig ?? ClientConfig())
    }

    /// The `service_id` query parameter of the connection URL (pings carry it).
    static func serviceID(of url: String) -> Int32 {
        URLComponents(string: url)?.queryItems?.first { $0.name == "service_id" }?.value.flatMap { Int32($0) } ?? 0
    }

    // MARK: One connection

    /// How long the WebSocket upgrade may take before the connect counts as failed.
    static let upgradeTimeout = Duration.seconds(15)

    /// Runs one connection in a task of its own, so a connect that stalls before the upgrade (which does
    /// not answer cancellation) holds up neither reconnection nor shutdown: after ``upgradeTimeout`` without
    /// an open socket it is cancelled and left behind. At cancellation (shutdown) it is cancelled and given
    /// up to 5 s to finish the events it is storing, as the WebSocket close lets it.
    private func runGuarded(url: String) async -> (String, String) {
        let opened = OneTimeEvent()
        let outcome = FirstOutcome()
        let done = OneTimeEvent()
        let finished = OneTimeEvent()
        let connection = Task {
            let result = await self.runConnection(url: url, opened: opened)
            outcome.set(result)
            finished.signal()
            done.signal()
        }
        let watchdog = Task {
            do { try await self.clock.sleep(for: Self.upgradeTimeout) } catch { return }
            guard !opened.hasHappened else { return }
            outcome.set(("the WebSocket upgrade did not complete within \(Self.upgradeTimeout)", "connect_failed"))
            connection.cancel()
            done.signal()
        }
        await withTaskCancellationHandler {
            await done.wait()
        } onCancel: {
            connection.cancel()
        }
        watchdog.cancel()
        if Task.isCancelled {
            connection.cancel()
            // Waited for from a task the cancellation does not reach, on real time (a stalled connect never ends).
            await Task { _ = await SystemClock().withTimeout(.seconds(5)) { await finished.wait() } }.value
        }
        return outcome.value ?? ("stopped", "closed")
    }

    /// Runs one connection until it ends; returns why and the reconnect reason.
    private func runConnection(url: String, opened: OneTimeEvent) async -> (String, String) {
        var configuration = WebSocketClientConfiguration()
        configuration.maxFrameSize = 1 << 20
        configuration.closeTimeout = .seconds(3)
        // WebSocket pings as well: a peer that stops answering them has its socket closed by the client,
        // which ends the read below (a dead peer never answers a close either).
        configuration.autoPing = .enabled(timePeriod: settings.stream.keepaliveTimeout)
        var wsLogger = logger
        wsLogger.logLevel = max(logger.logLevel, .notice)
        let service = Self.serviceID(of: url)
        let liveness = Liveness()
        do {
            let close = try await WebSocketClient.connect(url: url, configuration: configuration, logger: wsLogger) { inbound, outbound, _ in
                // An upgrade that completed after its deadline: that attempt was given up already.
                guard !Task.isCancelled else { return }
                opened.signal()
                self.changeOpen(by: 1)
                self.logger.notice("Lark long connection open")
                defer { self.changeOpen(by: -1) }
                let fragments = Fragments()
                let slots = FrameSlots(Self.framesInFlight)
                // The pinger ends the connection when a ping goes unanswered: the reader is cancelled and the
                // socket closed, whatever the other side does (a dead peer never answers a close either).
                await withTaskGroup(of: Void.self) { connection in
                    connection.addTask {
                        // Pings: at once, then every PingInterval.
                        while !Task.isCancelled {
                            liveness.pinged()
                            try? await outbound.write(.binary(ByteBuffer(bytes: Self.ping(service: service))))
                            do { try await self.clock.sleep(for: self.settings.stream.keepaliveTimeout) } catch { return }
                            if !liveness.answered {
                                liveness.markDead()
                                try? await outbound.close(.goingAway, reason: "ping unanswered")
                                return
                            }
                            let interval = Duration.seconds(max(self.state.withLock { $0.config.pingInterval }, 1))
                            let rest = interval - self.settings.stream.keepaliveTimeout
                            if rest > .zero {
                                do { try await self.clock.sleep(for: rest) } catch { return }
                            }
                        }
                    }
                    connection.addTask {
                        await withDiscardingTaskGroup { tasks in
                            do {
                                for try await message in inbound.messages(maxSize: 1 << 20) {
                                    guard case .binary(let buffer) = message else { continue }
                                    let frame: Pbbp2_Frame
                                    do {
                                        frame = try Pbbp2_Frame(serializedBytes: Array(buffer.readableBytesView))
                                    } catch {
                                        self.frames.count("malformed")
                                        self.logger.warning("ignoring a frame that is not pbbp2", metadata: ["error": "\(error)"])
                                        continue
                                    }
                                    if frame.method == 0 {
                                        self.control(frame, liveness: liveness)
                                        continue
                                    }
                                    guard let payload = self.data(frame, fragments: fragments) else { continue }
                                    // At the bound, reading stops until an event is stored (Feishu is held back).
                                    await slots.acquire()
                                    tasks.addTask {
                                        defer { slots.release() }
                                        let started = ContinuousClock.now
                                        let response = await self.respond(to: frame, payload: payload, started: started)
                                        do {
                                            try await outbound.write(.binary(ByteBuffer(bytes: response)))
                                            self.responseTimer.recordNanoseconds((ContinuousClock.now - started).nanoseconds)
                                        } catch {
                                            self.logger.debug("could not write a response; Feishu pushes the event again", metadata: ["error": "\(error)"])
                                        }
                                    }
                                }
                            } catch {
                                self.logger.debug("the long connection's read ended with an error", metadata: ["error": "\(error)"])
                            }
                        }
                    }
                    await connection.next()
                    connection.cancelAll()
                }
            }
            if liveness.dead { return ("a ping went unanswered for \(settings.stream.keepaliveTimeout)", "keepalive") }
            if let close { return ("closed by Feishu (\(close.closeCode)\(close.reason.map { ": \($0)" } ?? ""))", "closed") }
            return ("closed", "closed")
        } catch {
            if Task.isCancelled { return ("stopped", "closed") }
            if !opened.hasHappened {
                return (
                    "the WebSocket handshake failed (\(error)); Feishu refuses it for bad credentials (514) or when the app has too many connections (1000040350: at most 50 per app)",
                    "connect_failed")
            }
            return ("\(error)", "error")
        }
    }

    private func changeOpen(by delta: Int) {
        let open = state.withLock { state -> Int in
            state.open += delta
            if delta > 0 { state.phase = .connected }
            return state.open
        }
        connectedGauge.record(open > 0 ? 1 : 0)
    }

    /// A pong: the connection is alive, and its payload may carry a new ClientConfig.
    private func control(_ frame: Pbbp2_Frame, liveness: Liveness) {
        guard frame.header("type") == "pong" else {
            frames.count("unknown")
            return
        }
        frames.count("pong")
        liveness.ponged()
        if frame.hasPayload, !frame.payload.isEmpty, let config = try? JSONDecoder().decode(ClientConfig.self, from: frame.payload) {
            state.withLock { $0.config = config }
        }
    }

    /// The whole payload of a data frame, once every fragment of its message has arrived; nil while some
    /// are missing and for frames that are not events.
    private func data(_ frame: Pbbp2_Frame, fragments: Fragments) -> Data? {
        switch frame.header("type") {
        case "event":
            break
        case "card":
            // Card callbacks are not used; like the official client, they get no response.
            frames.count("card")
            return nil
        default:
            frames.count("unknown")
            return nil
        }
        let sum = frame.header("sum").flatMap(Int.init) ?? 1
        guard sum > 1 else {
            frames.count("event")
            return frame.payload
        }
        frames.count("fragment")
        let seq = frame.header("seq").flatMap(Int.init) ?? 0
        guard let whole = fragments.add(messageID: frame.header("message_id") ?? "", seq: seq, sum: sum, payload: frame.payload, now: clock.now) else {
            return nil
        }
        frames.count("event")
        return whole
    }

    /// Stores the event and returns the frame to send back: `{"code":200}` once it is committed (or when a
    /// re-push could change nothing), `{"code":500}` when it could not be stored.
    private func respond(to frame: Pbbp2_Frame, payload: Data, started: ContinuousClock.Instant) async -> [UInt8] {
        var code = 200
        do {
            // A commit that has begun completes even when the connection ends meanwhile; the response may
            // then not go out, and Feishu's re-push is a duplicate.
            let ingress = self.ingress
            _ = try await Task { try await ingress.receiveTrusted(payload) }.value
        } catch let rejection as IngressRejection where rejection.kind != .unavailable {
            logger.warning("refused a long-connection event; answered, not stored", metadata: ["reason": "\(rejection)", "message_id": "\(frame.header("message_id") ?? "")"])
        } catch {
            code = 500
            logger.error("could not store a long-connection event; answering code 500 so Feishu pushes it again", metadata: ["error": "\(error)"])
        }
        var response = frame
        let elapsed = Int((ContinuousClock.now - started) / .milliseconds(1))
        if code == 200 {
            var header = Pbbp2_Header()
            header.key = "biz_rt"
            header.value = "\(elapsed)"
            response.headers.append(header)
        }
        response.payload = Data(#"{"code":\#(code)}"#.utf8)
        return (try? response.serializedBytes()) ?? []
    }

    static func ping(service: Int32) -> [UInt8] {
        var frame = Pbbp2_Frame()
        frame.seqID = 0
        frame.logID = 0
        frame.service = service
        frame.method = 0
        var header = Pbbp2_Header()
        header.key = "type"
        header.value = "ping"
        frame.headers = [header]
        return (try? frame.serializedBytes()) ?? []
    }
}

extension Pbbp2_Frame {
    /// The value of the first header named `key`.
    public func header(_ key: String) -> String? { headers.first { $0.key == key }?.value }
}

/// How a connection ended: the first of its own end and the upgrade watchdog.
final class FirstOutcome: Sendable {
    private let state = Mutex<(String, String)?>(nil)
    func set(_ outcome: (String, String)) { state.withLock { if $0 == nil { $0 = outcome } } }
    var value: (String, String)? { state.withLock { $0 } }
}

/// Whether the last ping was answered, and whether the connection was given up for it.
final class Liveness: Sendable {
    private let state = Mutex((answered: true, dead: false))
    func pinged() { state.withLock { $0.answered = false } }
    func ponged() { state.withLock { $0.answered = true } }
    var answered: Bool { state.withLock { $0.answered } }
    func markDead() { state.withLock { $0.dead = true } }
    var dead: Bool { state.withLock { $0.dead } }
}

/// Fragments of split events, by `message_id`; a message whose fragments do not all arrive within
/// `timeout` is dropped (Feishu pushes it again, since it got no response).
final class Fragments: Sendable {
    private struct Partial {
        var parts: [Int: Data]
        var sum: Int
        var started: Date
    }
    private let state = Mutex([String: Partial]())
    private let timeout: TimeInterval = 5

    /// Adds one fragment; returns the whole payload when this one completes it.
    func add(messageID: String, seq: Int, sum: Int, payload: Data, now: Date) -> Data? {
        state.withLock { partials in
            partials = partials.filter { now.timeIntervalSince($0.value.started) < timeout }
            guard (0..<sum).contains(seq), sum <= 1000 else { return nil }
            var partial = partials[messageID] ?? Partial(parts: [:], sum: sum, started: now)
            // Fragments of one message that disagree on their number are not put together.
            guard partial.sum == sum else { return nil }
            partial.parts[seq] = payload
            guard partial.parts.count == partial.sum else {
                partials[messageID] = partial
                return nil
            }
            partials.removeValue(forKey: messageID)
            var whole = Data()
            for index in 0..<partial.sum { whole.append(partial.parts[index] ?? Data()) }
            return whole
        }
    }
}
