import ChatBridgeCore
import ChatBridgeServer
import ChatBridgeSimulators
import ChatBridgeStore
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Logging
import NIOCore
import NIOFoundationCompat
import Testing

/// The callback route through Hummingbird's router test client: no sockets, the real ingress and store.
@Suite struct IngressTests {
    func makeApp(_ overrides: [String: String] = [:]) async throws -> ChatBridgeApplication {
        var values = [
            "database.url": "sqlite::memory:", "llm.base_url": "http://127.0.0.1:1/v1",
            "dingtalk.client_id": "dingbot", "dingtalk.client_secret": testSecret, "dingtalk.webhook_hosts": "127.0.0.1", "dingtalk.mode": "http",
        ]
        values.merge(overrides) { $1 }
        var logger = Logger(label: "ingress-test")
        logger.logLevel = .critical
        return try await buildApplication(configuration: ChatBridgeConfiguration.from(values: values), logger: logger)
    }

    let sender = CallbackSender(url: "/callbacks/dingtalk", secret: testSecret)

    func post(_ client: some TestClientProtocol, _ body: Data, headers: [(String, String)]? = nil) async throws -> (status: Int, body: String) {
        var fields = HTTPFields()
        for (name, value) in headers ?? sender.headers() { fields[HTTPField.Name(name)!] = value }
        let response = try await client.execute(uri: "/callbacks/dingtalk", method: .post, headers: fields, body: ByteBuffer(data: body))
        return (Int(response.status.code), String(buffer: response.body))
    }

    func body(_ id: String, robotCode: String = "dingbot", corp: String? = nil, webhook: String? = nil) throws -> Data {
        let base = CallbackSender(url: "", secret: testSecret, robotCode: robotCode).body(messageID: id, text: "hi", webhook: webhook)
        guard let corp else { return base }
        var object = try #require(try JSONSerialization.jsonObject(with: base) as? [String: Any])
        object["chatbotCorpId"] = corp
        return try JSONSerialization.data(withJSONObject: object)
    }

    @Test func aMessageForAnotherRobotOrOrganisationIsRefusedWith401AndNotStored() async throws {
        let app = try await makeApp(["dingtalk.corp_id": "dingcorp"])
        try await app.test(.router) { client in
            let robot = try await post(client, try body("r1", robotCode: "someone-elses-robot"))
            #expect(robot.status == 401)
            #expect(robot.body.contains("robotCode"))
            let corp = try await post(client, try body("r2", corp: "another-corp"))
            #expect(corp.status == 401)
            #expect(corp.body.contains("chatbotCorpId"))
            let unsigned = try await post(client, try body("r3"), headers: [("Content-Type", "application/json")])
            #expect(unsigned.status == 401)
            #expect(try await app.components.store.inboxRows().isEmpty)
            let good = try await post(client, try body("r4", corp: "dingcorp"))
            #expect(good.status == 200)
            #expect(good.body == #"{"msgtype":"empty"}"#)
            #expect(try await app.components.store.inboxRows().map(\.messageID) == ["r4"])
        }
    }

    @Test func aWebhookNotOfTheDocumentedFormIsDroppedAtTheDoor() async throws {
        let app = try await makeApp()
        try await app.test(.router) { client in
            let other = try await post(client, try body("w1", webhook: "http://127.0.0.1:9/robot/send?access_token=x"))
            let documented = try await post(client, try body("w2", webhook: "http://127.0.0.1:9/robot/sendBySession?session=ok"))
            #expect(other.status == 200 && documented.status == 200)
            // The dispatcher runs too (it has no model to reach): read what was stored, not what it claims.
            let stored = try await app.components.store.storedMessages()
            #expect(stored.map(\.reply.webhookURL) == [nil, "http://127.0.0.1:9/robot/sendBySession?session=ok"])
        }
    }

    @Test func withoutTheRobotsIdentityCallbacksAnswer503() async throws {
        let noSecret = try await makeApp(["dingtalk.client_secret": ""])
        try await noSecret.test(.router) { client in
            let result = try await post(client, try body("n1"))
            #expect(result.status == 503)
            #expect(result.body.contains("dingtalk.client_secret"))
        }
        let noRobot = try await makeApp(["dingtalk.client_id": ""])
        try await noRobot.test(.router) { client in
            let result = try await post(client, try body("n2"))
            #expect(result.status == 503)
            #expect(result.body.contains("dingtalk.client_id"))
        }
    }

    @Test func healthAndReadinessAnswerWithoutTraffic() async throws {
        let app = try await makeApp()
        try await app.test(.router) { client in
            let ready = try await client.execute(uri: "/readyz", method: .get)
            let healthy = try await client.execute(uri: "/healthz", method: .get)
            #expect(ready.status == .ok && healthy.status == .ok)
        }
    }

    @Test func aLiveCallbackIsAcknowledgedAndAnsweredThroughRealSockets() async throws {
        let model = try await ModelSimulator.start()
        let dingtalk = try await DingTalkSimulator.start()
        let app = try await makeApp([
            "database.url": "sqlite:\(temporaryDirectory())/live.sqlite", "llm.base_url": model.baseURL,
            "dingtalk.api_base_url": dingtalk.baseURL,
        ])
        try await app.test(.live) { client in
            let body = sender.body(messageID: "live-1", text: "over a socket", webhook: dingtalk.webhookURL(session: "live-1"))
            let ack = try await post(client, body)
            #expect(ack.status == 200)
            #expect(await eventually { dingtalk.deliveries.count == 1 })
            #expect(dingtalk.deliveries.first?.text == ModelSimulator.answer(to: "over a socket"))
        }
        await model.stop()
        await dingtalk.stop()
    }
}
