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

    var gateway: StreamGateway { simulator.gateway }

    init(clientSecret: String = testSecret, keepaliveTimeout: Duration = .seconds(10), maxBackoff: Duration = .milliseconds(300)) async throws {
        simulator = try await DingTalkSimulator.start()
        simulator.gateway.setCredentials(clientID: "dingbot", clientSecret: testSecret)
        var settings = DingTalkSettings(clientID: "dingbot", clientSecret: clientSecret, apiBaseURL: simulator.baseURL, webhookHosts: ["127.0.0.1"])
        settings.stream.endpointHosts = ["127.0.0.1"]
        settings.stream.keepaliveTimeout = keepaliveTimeout
        settings.stream.maxBackoff = maxBackoff
        settings.stream.initialBackoff = .milliseconds(50)
        settings.stream.rotationGrace = .seconds(30)
        var logger = Logger(label: "stream-test")
        logger.logLevel = .critical
        client = OutboundHTTP.makeClient(readTimeout: .seconds(10))
        let ingress = DingTalkIngress(settings: settings, groupScope: .user, inbox: inbox, clock: SystemClock(), logger: logger, onAccepted: {})
        let stream = DingTalkStream(settings: settings, ingress: ingress, client: client, clock: SystemClock(), logger: logger)
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

    func stop() async {
        task.cancel()
        _ = try? await task.value
        try? await client.shutdown()
        await simulator.stop()
    }
}

@Suite(.serialized, .timeLimit(.minutes(2))) struct StreamTests {
    @Test func aRobotMessageIsAcknowledgedOnlyAfterItIsStored() async throws {
        let rig = try await StreamRig()
        defer { Task { await rig.stop() } }
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

    @Test func whenTheStoreFailsNothingIsAcknowledgedAndTheRedeliveryIsStoredOnce() async throws {
        let rig = try await StreamRig()
        defer { Task { await rig.stop() } }
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

    @Test func pingIsAnsweredWithItsOpaque() async throws {
        let rig = try await StreamRig()
        defer { Task { await rig.stop() } }
        let connection = await rig.connection()
        let ping = try await rig.gateway.ping(opaque: "123-dsfs", to: connection)
        let ack = await rig.gateway.waitForAck(ping)
        #expect(ack.code == 200)
        let echoed = try JSONSerialization.jsonObject(with: Data(ack.data.utf8)) as? [String: String]
        #expect(echoed == ["opaque": "123-dsfs"])
    }

    @Test func malformedAndUnknownFramesNeitherKillTheConnectionNorGetStored() async throws {
        let rig = try await StreamRig()
        defer { Task { await rig.stop() } }
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

    @Test func disconnectOpensTheNextConnectionBeforeTheOldOneCloses() async throws {
        let rig = try await StreamRig()
        defer { Task { await rig.stop() } }
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

    @Test func aSilentConnectionIsDroppedAndReplaced() async throws {
        let rig = try await StreamRig(keepaliveTimeout: .milliseconds(200))
        defer { Task { await rig.stop() } }
        _ = await rig.connection()
        rig.gateway.goSilent()
        await rig.gateway.wait { $0.silencedConnections == 1 }
        rig.gateway.endSilence()
        // The unanswered ping drops the zombie; a fresh ticket opens a working connection.
        let second = await rig.connection(number: 2)
        let frame = try await rig.gateway.pushMessage(rig.body("m1"), to: second)
        #expect(await rig.gateway.waitForAck(frame).code == 200)
        #expect(rig.gateway.openRequests.count >= 2)
    }

    @Test func theGatewayGoingDownAndComingBackReconnects() async throws {
        let rig = try await StreamRig()
        defer { Task { await rig.stop() } }
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

    @Test func rejectedCredentialsAreRetriedAtTheBackoffCapNotInATightLoop() async throws {
        let rig = try await StreamRig(clientSecret: "wrong-secret", maxBackoff: .milliseconds(300))
        defer { Task { await rig.stop() } }
        await rig.gateway.wait { $0.openRequests.count >= 3 }
        let times = rig.gateway.openRequests
        for (earlier, later) in zip(times, times.dropFirst()) {
            #expect(later.timeIntervalSince(earlier) >= 0.25, "a retry came \(later.timeIntervalSince(earlier))s after the last")
        }
        #expect(rig.stream.status == .rejected)
        #expect(rig.gateway.connectionsAccepted == 0)
    }

    @Test func withoutCredentialsTheStreamStaysOffAndDoesNotConnect() async throws {
        var settings = DingTalkSettings(clientID: "", clientSecret: "", apiBaseURL: "http://127.0.0.1:1")
        settings.mode = .stream
        let ingress = DingTalkIngress(settings: settings, groupScope: .user, inbox: InMemoryInbox(), clock: SystemClock(), logger: Logger(label: "t"), onAccepted: {})
        let client = OutboundHTTP.makeClient()
        let stream = DingTalkStream(settings: settings, ingress: ingress, client: client, clock: SystemClock(), logger: Logger(label: "t"))
        #expect(stream.configurationProblem?.contains("dingtalk.client_id") == true)
        #expect(stream.status == .off)
        try await client.shutdown()
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
