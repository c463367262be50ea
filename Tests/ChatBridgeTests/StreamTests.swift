import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeDingTalk
import ChatBridgeHTTP
import ChatBridgeSimulators
import Foundation
import Logging
import Metrics
import Testing

/// The real Stream client against the loopback gateway, storing into the in-memory inbox twin (so a
/// store failure can be injected). End-to-end answers over the stream are in `StreamAnswerTests`.
final class StreamRig: @unchecked Sendable {
    let simulator: DingTalkSimulator
    let inbox = InMemoryInbox()
    let stream: DingTalkStream
    let client: HTTPClient
    private let task: Task<Void, any Error>
    let sender = CallbackSender(url: "", secret: testSecret)
    /// The stream's log lines from info up.
    let lines = LogCapture()

    var gateway: StreamGateway { simulator.gateway }

    /// Runs `body` with a rig and stops the rig afterwards (also when `body` throws).
    static func with(
        clientSecret: String = testSecret, keepaliveTimeout: Duration = .seconds(10), maxBackoff: Duration = .milliseconds(300),
        clock: any WallClock = SystemClock(), _ body: (StreamRig) async throws -> Void
    ) async throws {
        let rig = try await StreamRig(clientSecret: clientSecret, keepaliveTimeout: keepaliveTimeout, maxBackoff: maxBackoff, clock: clock)
        do {
            try await body(rig)
        } catch {
            await rig.stop()
            throw error
        }
        await rig.stop()
    }

    init(clientSecret: String, keepaliveTimeout: Duration, maxBackoff: Duration, clock: any WallClock) async throws {
        simulator = try await DingTalkSimulator.start()
        simulator.gateway.setCredentials(clientID: "dingbot", clientSecret: testSecret)
        var settings = DingTalkSettings(clientID: "dingbot", clientSecret: clientSecret, apiBaseURL: simulator.baseURL, webhookHosts: ["127.0.0.1"])
        settings.stream.endpointHosts = ["127.0.0.1"]
        settings.stream.keepaliveTimeout = keepaliveTimeout
        settings.stream.maxBackoff = maxBackoff
        settings.stream.initialBackoff = .milliseconds(50)
        settings.stream.rotationGrace = .seconds(30)
        var logger = Logger(label: "stream-test") { [lines] _ in lines }
        logger.logLevel = .info
        client = OutboundHTTP.makeClient(readTimeout: .seconds(10))
        let ingress = DingTalkIngress(settings: settings, groupScope: .user, inbox: inbox, clock: clock, logger: logger, onAccepted: {})
        let stream = DingTalkStream(settings: settings, ingress: ingress, client: client, clock: clock, logger: logger, random: { 0.5 })
        self.stream = stream
        task = Task { try await stream.run() }
    }

    func body(_ id: String, text: String = "hi") -> Data { sender.body(messageID: id, text: text) }

    /// Waits for a connection and returns its id.
    func connection(number: Int = 1) async -> Int {
        await gateway.wait { $0.connectionsAccepted >= number && $0.openConnections.contains(number) }
        return number
    }

    /// A ping pushed after `frame` whose ack has come back: every ack written before the ping was handled is in.
    func settle(on connection: Int? = nil) async throws {
        let ping = try await gateway.ping(opaque: UUID().uuidString, to: connection)
        _ = await gateway.waitForAck(ping)
    }

    /// Cancels the service and waits for it to return.
    func stop() async {
        task.cancel()
        _ = try? await task.value
        try? await client.shutdown()
        await simulator.stop()
    }
}

@Suite(.serialized, .timeLimit(.minutes(2))) struct StreamTests {
    @Test func aRobotMessageIsAcknowledgedOnlyAfterItIsStored() async throws {
        try await StreamRig.with { rig in
            let connection = await rig.connection()
            let release = OneTimeEvent()
            await rig.inbox.holdAccepts(until: release)
            let frame = try await rig.gateway.pushMessage(rig.body("m1"), to: connection)
            #expect(await eventually { await rig.inbox.acceptsBegun == 1 })
            // A ping sent after the message is answered while the message is still being stored: no early ack.
            try await rig.settle(on: connection)
            #expect(rig.gateway.acks(for: frame).isEmpty)
            #expect(await rig.inbox.rows.isEmpty)
            release.signal()
            let ack = await rig.gateway.waitForAck(frame)
            #expect(ack.code == 200)
            #expect(await rig.inbox.rows.count == 1)
            #expect(rig.stream.status == .connected)
        }
    }

    @Test func whenTheStoreFailsNothingIsAcknowledgedAndTheRedeliveryIsStoredOnce() async throws {
        try await StreamRig.with { rig in
            let connection = await rig.connection()
            await rig.inbox.failNext(.accept)
            let frame = try await rig.gateway.pushMessage(rig.body("m1"), to: connection)
            #expect(await eventually { await rig.inbox.failuresFired.contains(.accept) })
            try await rig.settle(on: connection)
            #expect(rig.gateway.acks(for: frame).isEmpty)
            // DingTalk re-delivers the unacknowledged frame (same messageId); now it is stored and acknowledged.
            try await rig.gateway.pushMessage(rig.body("m1"), to: connection, frameID: frame)
            #expect(await rig.gateway.waitForAck(frame).code == 200)
            // And a repeat of the same messageId gets the same ack again; still one row.
            try await rig.gateway.pushMessage(rig.body("m1"), to: connection, frameID: frame)
            #expect(await eventually { rig.gateway.acks(for: frame).count == 2 })
            #expect(rig.gateway.acks(for: frame).allSatisfy { $0.code == 200 })
            #expect(await rig.inbox.rows.count == 1)
        }
    }

    @Test func pingIsAnsweredWithItsOpaque() async throws {
        try await StreamRig.with { rig in
            let connection = await rig.connection()
            let ping = try await rig.gateway.ping(opaque: "123-dsfs", to: connection)
            let ack = await rig.gateway.waitForAck(ping)
            #expect(ack.code == 200)
            let echoed = try JSONSerialization.jsonObject(with: Data(ack.data.utf8)) as? [String: String]
            #expect(echoed == ["opaque": "123-dsfs"])
        }
    }

    @Test func malformedAndUnknownFramesNeitherKillTheConnectionNorGetStored() async throws {
        try await StreamRig.with { rig in
            let connection = await rig.connection()
            try await rig.gateway.pushRaw("{not json", to: connection)
            try await rig.gateway.pushRaw(#"{"type":"CALLBACK","headers":{"topic":"/v1.0/im/bot/messages/get"},"data":"{}"}"#, to: connection)
            try await rig.gateway.push(type: "EVENT", topic: "chat_update_title", messageID: "evt-1", data: "{}", to: connection)
            try await rig.gateway.push(type: "CALLBACK", topic: "/v1.0/card/instances/callback", messageID: "cb-1", data: "{}", to: connection)
            try await rig.gateway.push(type: "CALLBACK", topic: DingTalkStreamFrame.botMessageTopic, messageID: "bad-1", data: "{\"msgtype\":", to: connection)
            #expect(await rig.gateway.waitForAck("evt-1").code == 404)
            #expect(await rig.gateway.waitForAck("cb-1").code == 404)
            // An undecodable robot message is refused for good: acknowledged so it is not re-sent, never stored.
            #expect(await rig.gateway.waitForAck("bad-1").code == 200)
            let frame = try await rig.gateway.pushMessage(rig.body("m1"), to: connection)
            #expect(await rig.gateway.waitForAck(frame).code == 200)
            #expect(rig.gateway.connectionsAccepted == 1)
            #expect(await rig.inbox.rows.count == 1)
        }
    }

    @Test func disconnectOpensTheNextConnectionBeforeTheOldOneCloses() async throws {
        try await StreamRig.with { rig in
            let first = await rig.connection()
            rig.gateway.setDisconnectCloseDelay(.seconds(30))
            try await rig.gateway.disconnect(first)
            // Make before break: the second connection is up while the first is still open.
            await rig.gateway.wait { $0.openConnections == [1, 2] }
            // Frames still arriving on the old connection are stored and acknowledged; so are the new one's,
            // and the same message on both connections is one row.
            let onOld = try await rig.gateway.pushMessage(rig.body("old"), to: first)
            let onNew = try await rig.gateway.pushMessage(rig.body("new"), to: 2)
            let twiceOld = try await rig.gateway.pushMessage(rig.body("both"), to: first)
            let twiceNew = try await rig.gateway.pushMessage(rig.body("both"), to: 2)
            for frame in [onOld, onNew, twiceOld, twiceNew] { #expect(await rig.gateway.waitForAck(frame).code == 200) }
            #expect(rig.gateway.acks(for: onOld).first?.connection == first)
            #expect(await rig.inbox.rows.count == 3)
            // The old connection is closed by the gateway; the new one stays.
            rig.gateway.closeConnection(first)
            await rig.gateway.wait { $0.openConnections == [2] }
            let after = try await rig.gateway.pushMessage(rig.body("after"))
            #expect(await rig.gateway.waitForAck(after).connection == 2)
            #expect(rig.gateway.connectionsAccepted == 2)
        }
    }

    @Test func retiringTheOldConnectionWaitsForTheFramesItIsStoringAndAcknowledgesThem() async throws {
        let clock = ManualClock()
        try await StreamRig.with(clock: clock) { rig in
            let first = await rig.connection()
            let release = OneTimeEvent()
            await rig.inbox.holdAccepts(until: release)
            let frame = try await rig.gateway.pushMessage(rig.body("m1"), to: first)
            #expect(await eventually { await rig.inbox.acceptsBegun == 1 })
            rig.gateway.setDisconnectCloseDelay(.seconds(600))
            try await rig.gateway.disconnect(first)
            await rig.gateway.wait { $0.openConnections == [1, 2] }
            // DingTalk does not close the old connection; the grace runs out while the frame is being stored.
            await clock.waitForSleep { $0 == .seconds(30) }
            clock.advance(by: .seconds(30))
            release.signal()
            // Stored, then acknowledged on the old connection, and only then is the old connection closed.
            let ack = await rig.gateway.waitForAck(frame)
            #expect(ack.code == 200 && ack.connection == first)
            await rig.gateway.wait { $0.openConnections == [2] }
            #expect(await rig.inbox.rows.count == 1)
        }
    }

    @Test func aSilentConnectionIsDroppedAndReplaced() async throws {
        try await StreamRig.with(keepaliveTimeout: .milliseconds(200)) { rig in
            _ = await rig.connection()
            rig.gateway.goSilent()
            await rig.gateway.wait { $0.silencedConnections == 1 }
            // A message pushed now vanishes into the dead connection.
            let lost = try await rig.gateway.pushMessage(rig.body("lost"), to: 1)
            rig.gateway.endSilence()
            // The unanswered ping drops the zombie; a fresh ticket opens a working connection.
            let second = await rig.connection(number: 2)
            #expect(rig.lines.all.contains { $0.contains("the ping went unanswered") }, "\(rig.lines.all)")
            // DingTalk delivers the unacknowledged message again, on the new connection.
            try await rig.gateway.pushMessage(rig.body("lost"), to: second, frameID: lost)
            #expect(await rig.gateway.waitForAck(lost).connection == second)
            #expect(await rig.inbox.rows.count == 1)
            #expect(rig.gateway.openRequests.count >= 2)
        }
    }

    @Test func theGatewayGoingDownAndComingBackReconnects() async throws {
        try await StreamRig.with { rig in
            _ = await rig.connection()
            rig.gateway.setDown(true)
            await rig.gateway.wait { $0.openConnections.isEmpty && $0.openRequests.count >= 3 }
            #expect(rig.stream.status == .connecting)
            rig.gateway.setDown(false)
            await rig.gateway.wait { !$0.openConnections.isEmpty }
            let frame = try await rig.gateway.pushMessage(rig.body("m1"))
            #expect(await rig.gateway.waitForAck(frame).code == 200)
            #expect(await rig.inbox.rows.count == 1)
        }
    }

    @Test func rejectedCredentialsAreRetriedAtTheBackoffCapNotInATightLoop() async throws {
        let clock = ManualClock()
        try await StreamRig.with(clientSecret: "wrong-secret", maxBackoff: .seconds(60), clock: clock) { rig in
            for attempt in 1...3 {
                // After each refusal the stream waits the whole cap before it asks again.
                await clock.waitForSleep { $0 == .seconds(60) }
                #expect(rig.gateway.openRequests.count == attempt)
                #expect(rig.stream.status == .rejected)
                clock.advance(by: .seconds(59))
                #expect(rig.gateway.openRequests.count == attempt)
                clock.advance(by: .seconds(1))
                await rig.gateway.wait { $0.openRequests.count == attempt + 1 }
            }
            #expect(rig.gateway.connectionsAccepted == 0)
        }
    }

    @Test func failedConnectsBackOffExponentiallyAndAHealthyConnectionResetsTheBackoff() async throws {
        let clock = ManualClock()
        try await StreamRig.with(maxBackoff: .seconds(60), clock: clock) { rig in
            _ = await rig.connection()
            rig.gateway.setDown(true)
            // 50ms doubling (the rig's first backoff), jitter fixed at its middle.
            for (attempt, expected) in [50, 100, 200, 400].enumerated() {
                await clock.waitForSleep { $0 == .milliseconds(expected) }
                #expect(rig.stream.status == .connecting)
                clock.advance(by: .milliseconds(expected))
                await rig.gateway.wait { $0.openRequests.count == attempt + 2 }
            }
            rig.gateway.setDown(false)
            await clock.waitForSleep { $0 == .milliseconds(800) }
            clock.advance(by: .milliseconds(800))
            _ = await rig.connection(number: 2)
            #expect(await eventually { rig.stream.openConnections == 1 })
            // Up for a healthy while (the 15s upgrade watchdog sleeps on the clock too): the next drop starts over.
            clock.advance(by: .seconds(60))
            rig.gateway.closeAll()
            await clock.waitForSleep { $0 == .milliseconds(50) }
            #expect(rig.stream.status == .connecting)
        }
    }

    @Test func cancellingTheServiceClosesItsConnectionsAndReturns() async throws {
        let rig = try await StreamRig(clientSecret: testSecret, keepaliveTimeout: .seconds(10), maxBackoff: .seconds(1), clock: SystemClock())
        _ = await rig.connection()
        #expect(await eventually { rig.stream.status == .connected })
        await rig.stop()
        #expect(rig.stream.status == .stopped)
        #expect(rig.stream.openConnections == 0)
    }

    @Test func withoutCredentialsTheStreamStaysOffAndDoesNotConnect() async throws {
        let simulator = try await DingTalkSimulator.start()
        var settings = DingTalkSettings(clientID: "", clientSecret: "", apiBaseURL: simulator.baseURL)
        settings.mode = .stream
        let lines = LogCapture()
        let logger = Logger(label: "t") { _ in lines }
        let ingress = DingTalkIngress(settings: settings, groupScope: .user, inbox: InMemoryInbox(), clock: SystemClock(), logger: logger, onAccepted: {})
        let client = OutboundHTTP.makeClient()
        let stream = DingTalkStream(settings: settings, ingress: ingress, client: client, clock: SystemClock(), logger: logger)
        #expect(stream.configurationProblem?.contains("dingtalk.client_id") == true)
        let returned = OneTimeEvent()
        let service = Task {
            try await stream.run()
            returned.signal()
        }
        #expect(await eventually { lines.all.contains { $0.contains("DingTalk Stream mode needs dingtalk.client_id and dingtalk.client_secret") } })
        // It runs on (a service that returned early would stop the application), without connecting.
        #expect(!returned.hasHappened)
        #expect(stream.status == .off)
        service.cancel()
        _ = try? await service.value
        #expect(simulator.gateway.openRequests.isEmpty)
        #expect(lines.all.count == 1)
        try await client.shutdown()
        await simulator.stop()
    }

    @Test func frameParsingAndAcks() throws {
        let frame = try DingTalkStreamFrame.parse(
            #"{"specVersion":"1.0","type":"CALLBACK","headers":{"appId":"a","connectionId":"c","contentType":"application/json","messageId":"212ca9d7_974","time":"1690362102194","topic":"/v1.0/im/bot/messages/get","extra":5},"data":"{\"msgId\":\"x\"}"}"#)
        #expect(frame.type == "CALLBACK")
        #expect(frame.messageID == "212ca9d7_974")
        #expect(frame.data == #"{"msgId":"x"}"#)
        let ack = try #require(try JSONSerialization.jsonObject(with: Data(frame.ack(code: 200, data: #"{"response":null}"#).utf8)) as? [String: Any])
        #expect(ack["code"] as? Int == 200)
        #expect((ack["headers"] as? [String: String]) == ["messageId": "212ca9d7_974", "contentType": "application/json"])
        #expect(ack["data"] as? String == #"{"response":null}"#)
        #expect(throws: DingTalkStreamFrame.Malformed.self) { try DingTalkStreamFrame.parse(#"{"type":"SYSTEM","headers":{},"data":"{}"}"#) }
        #expect(throws: DingTalkStreamFrame.Malformed.self) { try DingTalkStreamFrame.parse("[]") }
    }

    @Test func onlyAllowedStreamEndpointsAreConnectedTo() {
        var settings = DingTalkSettings(clientID: "a", clientSecret: "b")
        #expect(settings.allowsStreamEndpoint("wss://wss-open-connection.dingtalk.com:443/connect"))
        #expect(!settings.allowsStreamEndpoint("ws://wss-open-connection.dingtalk.com/connect"))
        #expect(!settings.allowsStreamEndpoint("wss://evil.example.com/connect"))
        #expect(!settings.allowsStreamEndpoint("wss://user:pw@wss-open-connection.dingtalk.com/connect"))
        #expect(!settings.allowsStreamEndpoint("https://wss-open-connection.dingtalk.com/connect"))
        settings.stream.endpointHosts = ["127.0.0.1"]
        #expect(settings.allowsStreamEndpoint("ws://127.0.0.1:8080/connect"))
    }
}
