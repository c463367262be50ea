import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeHTTP
@testable import ChatBridgeLark
@testable import ChatBridgeServer
import ChatBridgeSimulators
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Logging
import NIOCore
import NIOFoundationCompat
import Prometheus
import Testing

/// The real Lark long-connection client against the loopback gateway, on a manual clock, storing into the
/// in-memory inbox twin (so a store failure or a slow commit can be injected). End-to-end answers over the
/// long connection are in `LarkIntegrationTests`.
final class LarkStreamRig: @unchecked Sendable {
    let simulator: LarkSimulator
    let inbox = InMemoryInbox()
    let clock: ManualClock
    let connection: LarkLongConnection
    let registry = PrometheusCollectorRegistry()
    let sender: LarkEventSender
    private let client: HTTPClient
    private let task: Task<Void, any Error>

    var gateway: LarkGateway { simulator.gateway }

    /// Runs `body` with a rig and stops the rig afterwards (also when `body` throws). `prepare` sets the
    /// simulator up before the client starts.
    static func with(
        keepaliveTimeout: Duration = .seconds(5), prepare: (LarkSimulator) -> Void = { _ in }, _ body: (LarkStreamRig) async throws -> Void
    ) async throws {
        let simulator = try await LarkSimulator.start()
        prepare(simulator)
        let rig = LarkStreamRig(simulator: simulator, keepaliveTimeout: keepaliveTimeout)
        do {
            try await body(rig)
        } catch {
            await rig.stop()
            throw error
        }
        await rig.stop()
    }

    private init(simulator: LarkSimulator, keepaliveTimeout: Duration) {
        self.simulator = simulator
        clock = ManualClock(start: Date())
        var settings = LarkSettings(
            appID: simulator.appID, appSecret: simulator.appSecret, baseURL: simulator.baseURL, mode: .websocket, cardMode: .off)
        settings.stream.hosts = ["127.0.0.1"]
        settings.stream.keepaliveTimeout = keepaliveTimeout
        settings.stream.initialBackoff = .milliseconds(100)
        settings.stream.maxBackoff = .seconds(1)
        let logger = Logger(label: "lark-stream-test")
        client = OutboundHTTP.makeClient(readTimeout: .seconds(10))
        let api = LarkAPI(settings: settings, client: client, clock: clock, logger: logger)
        let bot = LarkBotIdentity(api: api, logger: logger)
        let metrics = PrometheusMetricsFactory(registry: registry)
        let ingress = LarkWebhookIngress(
            settings: settings, groupScope: .user, inbox: inbox, clock: clock, botOpenID: { await bot.openID() }, metrics: metrics,
            logger: logger, onAccepted: {})
        connection = LarkLongConnection(
            settings: settings, ingress: ingress, bot: bot, client: client, clock: clock, metrics: metrics, logger: logger, random: { 0.5 })
        sender = LarkEventSender(url: "", verificationToken: "", encryptKey: "", appID: simulator.appID)
        task = Task { [connection] in try await connection.run() }
    }

    func metric(_ sample: String) -> Double { metricValue(registry.emitToString(), sample) ?? 0 }

    func event(_ id: String) -> Data { sender.messageEvent(messageID: id, text: "question \(id)") }

    /// Waits until the client has its `number`th connection open and has sent a ping on it.
    func connected(number: Int = 1) async -> Bool {
        await gateway.wait(seconds: 10) { $0.connectionsAccepted >= number && $0.openConnections.contains(number) && $0.pings >= number }
    }

    /// Waits for the first response to the pushed frame `id`.
    func response(_ id: String) async -> LarkGateway.Reply? {
        await gateway.wait(seconds: 10) { !$0.replies(for: id).isEmpty }
        return gateway.replies(for: id).first
    }

    func stop() async {
        task.cancel()
        _ = try? await task.value
        try? await client.shutdown()
        await simulator.stop()
    }
}

@Suite(.serialized, .timeLimit(.minutes(2))) struct LarkStreamTests {
    @Test func anEventIsRespondedToOnlyAfterItsCommit() async throws {
        try await LarkStreamRig.with { rig in
            #expect(await rig.connected())
            let release = OneTimeEvent()
            await rig.inbox.holdAccepts(until: release)
            let frame = try await rig.gateway.pushEvent(rig.event("om_1"))
            #expect(await eventually { await rig.inbox.acceptsBegun == 1 })
            // A barrier on the same socket: the next ping (after the first one's keepalive wait and the rest
            // of the interval) arrives after any response written before the commit began.
            await rig.clock.waitForSleep { $0 == .seconds(5) }
            rig.clock.advance(by: .seconds(5))
            await rig.clock.waitForSleep { $0 == .seconds(115) }
            rig.clock.advance(by: .seconds(115))
            #expect(await rig.gateway.wait(seconds: 10) { $0.pings == 2 })
            // The commit is held: no response has gone out.
            #expect(rig.gateway.replies(for: frame).isEmpty)
            #expect(await rig.inbox.rows.isEmpty)
            release.signal()
            let reply = await rig.response(frame)
            #expect(reply?.code == 200)
            #expect(reply?.echoesFrame == true)
            #expect(reply?.bizRT != nil)
            #expect(await rig.inbox.rows.count == 1)
        }
    }

    @Test func whenTheStoreFailsTheEventIsAnsweredCode500AndItsRePushIsStoredOnce() async throws {
        try await LarkStreamRig.with { rig in
            #expect(await rig.connected())
            await rig.inbox.failNext(.accept)
            rig.gateway.setRedelivery(after: .milliseconds(200))
            let frame = try await rig.gateway.pushEvent(rig.event("om_1"))
            #expect(await rig.gateway.wait(seconds: 10) { $0.replies(for: frame).contains { $0.code == 200 } })
            let replies = rig.gateway.replies(for: frame)
            #expect(replies.first?.code == 500, "the failed commit is answered 500 so Feishu pushes it again")
            #expect(replies.first?.bizRT == nil)
            // Re-pushes may overtake a slow commit; however many, the event is stored once.
            #expect(await rig.inbox.rows.count == 1)
        }
    }

    @Test func anEncryptedEventWithoutTheKeyIsAnswered500SoFeishuPushesItAgain() async throws {
        try await LarkStreamRig.with { rig in
            #expect(await rig.connected())
            let encrypted = try JSONSerialization.data(withJSONObject: ["encrypt": LarkCrypto.encrypt(rig.event("om_1"), encryptKey: "the app's key")])
            let frame = try await rig.gateway.pushEvent(encrypted)
            // A settings problem, not a bad event: it must not be answered 200 and dropped.
            #expect(await rig.response(frame)?.code == 500)
            #expect(await rig.inbox.rows.isEmpty)
        }
    }

    @Test func aStalledUpgradeIsAbandonedAfterItsDeadlineAndAFreshEndpointIsTried() async throws {
        try await LarkStreamRig.with(prepare: { $0.gateway.stallUpgrades(true) }) { rig in
            #expect(await rig.gateway.wait(seconds: 10) { $0.upgradesStalled == 1 })
            await rig.clock.waitForSleep { $0 == LarkLongConnection.upgradeTimeout }
            rig.clock.advance(by: LarkLongConnection.upgradeTimeout)
            // The backoff (on the same clock) before the next attempt.
            await rig.clock.waitForSleep { $0 < .seconds(1) }
            rig.clock.advance(by: .seconds(1))
            #expect(await rig.gateway.wait(seconds: 10) { $0.upgradesStalled == 2 })
            #expect(rig.gateway.endpointRequests == 2, "a fresh endpoint URL for the next attempt")
            #expect(rig.metric(#"chatbridge_lark_stream_reconnects_total{reason="connect_failed"}"#) == 1)
            #expect(rig.connection.status == .connecting)
            rig.gateway.stallUpgrades(false)
        }
    }

    @Test func aConnectionWhoseProtocolPingsGoUnansweredIsReplacedEvenWhileTheSocketAnswers() async throws {
        try await LarkStreamRig.with(prepare: { $0.gateway.answerPings(false) }) { rig in
            #expect(await rig.connected())
            // WebSocket pings are still answered; only the pbbp2 ping is not.
            await rig.clock.waitForSleep { $0 == .seconds(5) }
            rig.clock.advance(by: .seconds(5))
            await rig.clock.waitForSleep { $0 < .seconds(1) }
            #expect(rig.metric(#"chatbridge_lark_stream_reconnects_total{reason="keepalive"}"#) == 1)
            rig.gateway.answerPings(true)
            rig.clock.advance(by: .seconds(1))
            #expect(await rig.connected(number: 2))
            #expect(rig.gateway.endpointRequests == 2)
        }
    }

    @Test func thePingIntervalFromAPongIsApplied() async throws {
        try await LarkStreamRig.with(prepare: { $0.gateway.setPongConfig(["PingInterval": 30, "ReconnectInterval": 120]) }) { rig in
            #expect(await rig.connected())
            // The endpoint said 120 s; the pong says 30 s: after the 5 s keepalive wait, the rest is 25 s.
            #expect(await eventually { rig.metric(#"chatbridge_lark_stream_frames_total{type="pong"}"#) == 1 })
            await rig.clock.waitForSleep { $0 == .seconds(5) }
            rig.clock.advance(by: .seconds(5))
            await rig.clock.waitForSleep { $0 == .seconds(25) }
            #expect(!rig.clock.pendingSleeps.contains(.seconds(115)))
            rig.clock.advance(by: .seconds(25))
            #expect(await rig.gateway.wait(seconds: 10) { $0.pings == 2 })
        }
    }
}

/// The card against the Lark simulator on a manual clock, for what takes real time on Feishu's side.
@Suite struct LarkCardTests {
    static func channel(_ simulator: LarkSimulator, clock: ManualClock, client: HTTPClient) -> LarkReplyChannel {
        let settings = LarkSettings(appID: simulator.appID, appSecret: simulator.appSecret, baseURL: simulator.baseURL, cardMode: .patch)
        let logger = Logger(label: "lark-card-test")
        return LarkReplyChannel(api: LarkAPI(settings: settings, client: client, clock: clock, logger: logger), logger: logger)
    }

    static func message(_ id: String) -> InboundMessage {
        InboundMessage(
            platform: "lark", botID: "cli_sim", messageID: id, chat: .init(id: "oc_direct", kind: .direct),
            sender: .init(id: "ou_user1", staffID: nil, name: ""), body: .text("question"), sentAt: Date())
    }

    @Test func aPatchedCardBegunBeyondFeishusUUIDWindowIsNotShownAgain() async throws {
        let simulator = try await LarkSimulator.start()
        let client = OutboundHTTP.makeClient(readTimeout: .seconds(10))
        let clock = ManualClock(start: Date())
        let channel = Self.channel(simulator, clock: clock, client: client)
        func reference(minutesAgo: Double) -> String {
            LarkCard.Reference(mode: .patch, created: Int64((clock.now.timeIntervalSince1970 - minutesAgo * 60) * 1000)).encoded
        }
        // Begun 56 minutes ago and maybe shown: the uuid no longer protects it, so it is declined.
        let old = try #require(channel.liveReply(to: Self.message("om_old"), reference: reference(minutesAgo: 56), begun: true))
        await #expect {
            try await old.open(resuming: true)
        } throws: { ($0 as? DeliveryError)?.isRetryable == false }
        #expect(simulator.messages.isEmpty)
        // Begun 10 minutes ago: resumed under the same uuid.
        let recent = try #require(channel.liveReply(to: Self.message("om_new"), reference: reference(minutesAgo: 10), begun: true))
        try await recent.open(resuming: true)
        #expect(simulator.replies(to: "om_new").count == 1)
        try? await client.shutdown()
        await simulator.stop()
    }

    @Test func aPatchedCardReplyReportedAsSentWithoutItsMessageIsDeclined() async throws {
        let simulator = try await LarkSimulator.start()
        let client = OutboundHTTP.makeClient(readTimeout: .seconds(10))
        let channel = Self.channel(simulator, clock: ManualClock(start: Date()), client: client)
        simulator.script(.reply, .code(200770, "uuid already used"))
        let card = try #require(channel.liveReply(to: Self.message("om_1"), reference: nil, begun: false))
        _ = try await card.prepare()
        // Without the message id the card cannot be patched: the answer goes out as a message instead of
        // retrying the reply until the attempts run out.
        await #expect {
            try await card.open(resuming: false)
        } throws: { ($0 as? DeliveryError)?.isRetryable == false }
        try? await client.shutdown()
        await simulator.stop()
    }
}

/// `/callbacks/lark` through Hummingbird's router test client, storing into the inbox twin so the store
/// can fail.
@Suite struct LarkCallbackTests {
    @Test func whenTheStoreFailsTheWebhookAnswers503AndFeishusRetryIsStoredOnce() async throws {
        let inbox = InMemoryInbox()
        let settings = LarkSettings(appID: "cli_sim", appSecret: "s", verificationToken: "token", encryptKey: "key", mode: .webhook)
        let logger = Logger(label: "lark-callback-test")
        let ingress = LarkWebhookIngress(
            settings: settings, groupScope: .user, inbox: inbox, clock: SystemClock(), botOpenID: { "ou_bot" }, logger: logger, onAccepted: {})
        let router = Router()
        LarkCallbackController(ingress: ingress, maxBodyBytes: 1 << 20, metrics: PrometheusMetricsFactory(registry: PrometheusCollectorRegistry()), logger: logger).addRoutes(to: router)
        let sender = LarkEventSender(url: "/callbacks/lark", verificationToken: "token", encryptKey: "key")
        let event = sender.messageEvent(messageID: "om_1", text: "hello")
        await inbox.failNext(.accept)
        try await Application(router: router).test(.router) { client in
            func post() async throws -> Int {
                let (body, headers) = sender.envelope(event)
                var fields = HTTPFields()
                for (name, value) in headers { fields[HTTPField.Name(name)!] = value }
                return Int(try await client.execute(uri: "/callbacks/lark", method: .post, headers: fields, body: ByteBuffer(data: body)).status.code)
            }
            let failed = try await post()
            #expect(failed == 503, "not acknowledged: Feishu retries")
            #expect(await inbox.rows.isEmpty)
            let retried = try await post()
            let repeated = try await post()
            #expect(retried == 200)
            #expect(repeated == 200, "a repeat is acknowledged and not stored again")
            #expect(await inbox.rows.count == 1)
        }
    }
}
