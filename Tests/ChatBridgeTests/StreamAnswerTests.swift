import ChatBridgeCore
import ChatBridgeDingTalk
import ChatBridgeServer
import ChatBridgeSimulators
import ChatBridgeStore
import Foundation
import Testing

/// The whole application in Stream mode: messages pushed by the loopback gateway are answered once.
@Suite(.serialized, .timeLimit(.minutes(2))) struct StreamAnswerTests {
    static let stream = ["dingtalk.mode": "stream"]

    @Test func aStreamMessageIsAnsweredOnceAlsoWhenDeliveredTwiceAcrossARotation() async throws {
        let h = try await Harness.start(Self.stream)
        defer { Task { await h.stop() } }
        let gateway = h.dingtalk.gateway
        await gateway.wait { $0.openConnections == [1] }
        #expect(await eventually { (try? await h.get("/readyz").body.contains(#""dingtalk_stream":"connected""#)) == true })
        gateway.setDisconnectCloseDelay(.seconds(30))
        try await gateway.disconnect(1)
        await gateway.wait { $0.openConnections == [1, 2] }
        let body = h.sender.body(messageID: "s1", text: "hello", webhook: h.dingtalk.webhookURL(session: "s1"))
        let onOld = try await gateway.pushMessage(body, to: 1)
        let onNew = try await gateway.pushMessage(body, to: 2)
        #expect(await gateway.waitForAck(onOld).code == 200)
        #expect(await gateway.waitForAck(onNew).code == 200)
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
        #expect(await eventually { (try? await h.store.inboxRows().first?.state) == "answered" })
        #expect(h.dingtalk.deliveries[0].text == ModelSimulator.answer(to: "hello"))
        #expect(try await h.store.inboxRows().count == 1)
        #expect(try await h.metric(#"chatbridge_stream_connected"#) == 1)
        #expect(try await h.metric(#"chatbridge_stream_frames_total{type="callback"}"#) == 2)
        #expect(try await h.metric(#"chatbridge_stream_reconnects_total{reason="disconnect"}"#) == 1)
        // Nothing more is sent for the duplicate.
        #expect(h.dingtalk.deliveries.count == 1)
    }

    @Test func inStreamModeSignedCallbacksStillWork() async throws {
        let h = try await Harness.start(Self.stream)
        defer { Task { await h.stop() } }
        await h.dingtalk.gateway.wait { $0.openConnections == [1] }
        #expect(try await h.send("cb1", "over http").status == 200)
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
        #expect(h.dingtalk.deliveries[0].text == ModelSimulator.answer(to: "over http"))
    }

    @Test func httpModeOpensNoStreamConnection() async throws {
        let h = try await Harness.start(["dingtalk.mode": "http"])
        defer { Task { await h.stop() } }
        // The service has decided by the time the server answers (it runs in the same group).
        #expect(await eventually { (try? await h.get("/readyz").body.contains(#""dingtalk_stream":"off""#)) == true })
        #expect(h.app.components.stream.configurationProblem == "dingtalk.mode is http")
        #expect(try await h.send("h1", "hi").status == 200)
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
        #expect(h.dingtalk.gateway.openRequests.isEmpty)
    }

    @Test func shutdownClosesTheStreamBeforeTheDrainAndTheAnswerInFlightStillGoesOut() async throws {
        let h = try await Harness.start(Self.stream)
        defer { Task { await h.stop() } }
        let gateway = h.dingtalk.gateway
        await gateway.wait { $0.openConnections == [1] }
        h.model.hold()
        let body = h.sender.body(messageID: "d1", text: "slow one", webhook: h.dingtalk.webhookURL(session: "d1"))
        #expect(await gateway.waitForAck(try await gateway.pushMessage(body)).code == 200)
        #expect(await eventually { h.model.requestCount == 1 })
        // SIGTERM: the Stream connection closes first (nothing more is read, so nothing more is acknowledged)
        // while the answer in flight is still being drained.
        await h.beginShutdown()
        await gateway.wait { $0.openConnections.isEmpty }
        #expect(h.app.components.dispatcher.inFlightCount == 1)
        #expect(h.dingtalk.deliveries.isEmpty)
        #expect(await eventually { h.app.components.stream.status == .stopped })
        h.model.release()
        await h.stopApp()
        #expect(h.dingtalk.deliveries.map(\.text) == [ModelSimulator.answer(to: "slow one")])
        #expect(gateway.connectionsAccepted == 1)
    }
}
