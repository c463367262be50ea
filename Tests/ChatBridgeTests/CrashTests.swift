import ChatBridgeSimulators
import Foundation
import Testing
import AsyncHTTPClient

enum HTTPClientFactory { static func make() -> HTTPClient { HTTPClient(eventLoopGroupProvider: .singleton) } }

/// The `chatbridge` executable built next to the test bundle.
func chatbridgeExecutable() -> String {
    let bundleDirectory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    for candidate in [bundleDirectory, bundleDirectory.deletingLastPathComponent()] {
        let path = candidate.appendingPathComponent("chatbridge").path
        if FileManager.default.isExecutableFile(atPath: path) { return path }
    }
    return bundleDirectory.appendingPathComponent("chatbridge").path
}

@Suite(.serialized) struct CrashTests {
    @Test func killedMidAnswerEveryAcceptedMessageIsAnsweredExactlyOnce() async throws {
        var behaviour = ModelSimulator.Behaviour()
        behaviour.firstTokenLatency = .milliseconds(800)
        let model = try await ModelSimulator.start(behaviour: behaviour)
        let dingtalk = try await DingTalkSimulator.start()
        let directory = temporaryDirectory()
        let environment = [
            "CHATBRIDGE_SERVER_HOST": "127.0.0.1", "CHATBRIDGE_SERVER_PORT": "0",
            "CHATBRIDGE_DATABASE_URL": "sqlite:\(directory)/chatbridge.sqlite",
            "CHATBRIDGE_LLM_BASE_URL": model.baseURL, "CHATBRIDGE_LLM_API_KEY": "sk-test",
            "CHATBRIDGE_DINGTALK_CLIENT_ID": "dingbot", "CHATBRIDGE_DINGTALK_CLIENT_SECRET": testSecret,
            "CHATBRIDGE_DINGTALK_API_BASE_URL": dingtalk.baseURL, "CHATBRIDGE_DINGTALK_WEBHOOK_HOSTS": "127.0.0.1",
        ]
        let executable = chatbridgeExecutable()
        #expect(FileManager.default.isExecutableFile(atPath: executable), "build the chatbridge executable first (swift build)")
        let first = try ChildServer(executable: executable, environment: environment, logPath: directory + "/first.log")
        let port = try await first.waitUntilListening()
        let sender = CallbackSender(url: "http://127.0.0.1:\(port)/callbacks/dingtalk", secret: testSecret)
        let client = HTTPClientFactory.make()
        var accepted: [String] = []
        for i in 0..<12 {
            let id = "crash-\(i)"
            let body = sender.body(messageID: id, text: "q\(i)", conversationID: "cid\(i % 4)==", senderStaffID: "u\(i % 4)", webhook: dingtalk.webhookURL(session: id))
            if try await sender.post(body, client: client).status == 200 { accepted.append(id) }
        }
        #expect(accepted.count == 12)
        // Kill while answers are in flight.
        #expect(await eventually { model.requestCount >= 4 })
        first.signal(SIGKILL)
        _ = await first.wait()
        let answeredBeforeKill = dingtalk.deliveries.count
        #expect(answeredBeforeKill < 12)

        let second = try ChildServer(executable: executable, environment: environment, logPath: directory + "/second.log")
        _ = try await second.waitUntilListening()
        #expect(await eventually(seconds: 60) { Set(dingtalk.deliveries.map(\.target)).count == 12 })
        try await Task.sleep(for: .milliseconds(500))
        let perMessage = Dictionary(grouping: dingtalk.deliveries, by: \.target).mapValues(\.count)
        #expect(perMessage.count == 12)
        #expect(perMessage.values.allSatisfy { $0 == 1 }, "duplicates: \(perMessage.filter { $0.value > 1 })")
        for id in accepted {
            let index = id.split(separator: "-").last!
            #expect(dingtalk.deliveries.first { $0.target == id }?.text == ModelSimulator.answer(to: "q\(index)"))
        }
        // SIGTERM drains and exits 0.
        second.signal(SIGTERM)
        #expect(await second.wait() == 0)
        try? await client.shutdown()
        await model.stop()
        await dingtalk.stop()
    }

    @Test func secondServerOnTheSameDatabaseIsRefused() async throws {
        let directory = temporaryDirectory()
        let environment = [
            "CHATBRIDGE_SERVER_HOST": "127.0.0.1", "CHATBRIDGE_SERVER_PORT": "0",
            "CHATBRIDGE_DATABASE_URL": "sqlite:\(directory)/chatbridge.sqlite",
        ]
        let first = try ChildServer(executable: chatbridgeExecutable(), environment: environment, logPath: directory + "/a.log")
        _ = try await first.waitUntilListening()
        let second = try ChildServer(executable: chatbridgeExecutable(), environment: environment, logPath: directory + "/b.log")
        #expect(await second.wait() == 1)
        let log = try String(contentsOfFile: directory + "/b.log", encoding: .utf8)
        #expect(log.contains("another chatbridge process is already using this database"))
        first.signal(SIGTERM)
        #expect(await first.wait() == 0)
    }
}
