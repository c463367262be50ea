import ChatBridgeDingTalk
import ChatBridgeLark
import ChatBridgeSimulators
import ChatBridgeStore
import Logging
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

/// The environment of a `chatbridge serve` child against the simulators, with its database in `directory`.
func serverEnvironment(directory: String, model: ModelSimulator, dingtalk: DingTalkSimulator) -> [String: String] {
    [
        "CHATBRIDGE_SERVER_HOST": "127.0.0.1", "CHATBRIDGE_SERVER_PORT": "0",
        "CHATBRIDGE_DATABASE_URL": "sqlite:\(directory)/chatbridge.sqlite",
        "CHATBRIDGE_LLM_BASE_URL": model.baseURL, "CHATBRIDGE_LLM_API_KEY": "sk-test", "CHATBRIDGE_LIMITS_USER_PER_MINUTE": "off",
        "CHATBRIDGE_DINGTALK_CLIENT_ID": "dingbot", "CHATBRIDGE_DINGTALK_CLIENT_SECRET": testSecret,
        "CHATBRIDGE_DINGTALK_API_BASE_URL": dingtalk.baseURL, "CHATBRIDGE_DINGTALK_WEBHOOK_HOSTS": "127.0.0.1",
        "CHATBRIDGE_DINGTALK_MODE": "http", "CHATBRIDGE_DINGTALK_STREAM_HOSTS": "127.0.0.1",
    ]
}

/// The simulators and the `chatbridge serve` environment for DingTalk Stream mode: AI cards with `cards`,
/// on `database` (a new SQLite file when nil), with `settings` added.
struct StreamSetup {
    let model: ModelSimulator
    let dingtalk: DingTalkSimulator
    let directory: String
    let environment: [String: String]

    static func start(
        _ behaviour: ModelSimulator.Behaviour = .init(), database: String? = nil, cards: Bool = false, settings: [String: String] = [:]
    ) async throws -> StreamSetup {
        let model = try await ModelSimulator.start(behaviour: behaviour)
        let dingtalk = try await DingTalkSimulator.start()
        dingtalk.gateway.setCredentials(clientID: "dingbot", clientSecret: testSecret)
        let directory = temporaryDirectory()
        var environment = serverEnvironment(directory: directory, model: model, dingtalk: dingtalk)
        environment["CHATBRIDGE_DINGTALK_MODE"] = "stream"
        if let database { environment["CHATBRIDGE_DATABASE_URL"] = database }
        if cards {
            environment["CHATBRIDGE_DINGTALK_CARD_TEMPLATE_ID"] = "tpl.schema"
            environment["CHATBRIDGE_DINGTALK_CARD_UPDATE_INTERVAL"] = "100ms"
        }
        environment.merge(settings) { $1 }
        return StreamSetup(model: model, dingtalk: dingtalk, directory: directory, environment: environment)
    }
}

/// A `chatbridge serve` child against the simulators (its model answering after `firstTokenLatency`), and a
/// client to send it signed callbacks; `restart` starts the next server on the same database. With
/// `launcher` (a program and its arguments, such as `taskset -c 0`), the server is started through it.
struct CrashRun {
    let model: ModelSimulator
    let dingtalk: DingTalkSimulator
    let directory: String
    let environment: [String: String]
    let command: [String]
    let first: ChildServer
    let sender: CallbackSender
    let client: HTTPClient

    static func start(firstTokenLatency: Duration = .zero, launcher: [String] = []) async throws -> CrashRun {
        var behaviour = ModelSimulator.Behaviour()
        behaviour.firstTokenLatency = firstTokenLatency
        let model = try await ModelSimulator.start(behaviour: behaviour)
        let dingtalk = try await DingTalkSimulator.start()
        let directory = temporaryDirectory()
        let environment = serverEnvironment(directory: directory, model: model, dingtalk: dingtalk)
        let executable = chatbridgeExecutable()
        #expect(FileManager.default.isExecutableFile(atPath: executable), "build the chatbridge executable first (swift build)")
        let command = launcher + [executable, "serve"]
        let first = try Self.server(command, environment: environment, logPath: directory + "/first.log")
        let port = try await first.waitUntilListening()
        return CrashRun(
            model: model, dingtalk: dingtalk, directory: directory, environment: environment, command: command, first: first,
            sender: CallbackSender(url: "http://127.0.0.1:\(port)/callbacks/dingtalk", secret: testSecret), client: HTTPClientFactory.make())
    }

    private static func server(_ command: [String], environment: [String: String], logPath: String) throws -> ChildServer {
        try ChildServer(executable: command[0], environment: environment, logPath: logPath, arguments: Array(command.dropFirst()))
    }

    /// The next server on the same database, logging to `second.log`.
    func restart() throws -> ChildServer {
        try Self.server(command, environment: environment, logPath: directory + "/second.log")
    }

    func stop() async {
        try? await client.shutdown()
        await model.stop()
        await dingtalk.stop()
    }
}

@Suite(.serialized) struct CrashTests {
    @Test func killedMidAnswerEveryAcceptedMessageIsAnsweredExactlyOnce() async throws {
        let run = try await CrashRun.start(firstTokenLatency: .milliseconds(800))
        let (model, dingtalk, directory, first, sender, client) = (run.model, run.dingtalk, run.directory, run.first, run.sender, run.client)
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

        let second = try run.restart()
        _ = try await second.waitUntilListening()
        #expect(await eventually(seconds: 60) { Set(dingtalk.deliveries.map(\.target)).count == 12 })
        // SIGTERM drains and exits 0; after that nothing more can be sent.
        second.signal(SIGTERM)
        #expect(await second.wait() == 0)
        let perMessage = Dictionary(grouping: dingtalk.deliveries, by: \.target).mapValues(\.count)
        #expect(perMessage.count == 12)
        // The one duplicate a kill can cause per answer in flight: it lands between a webhook send and its
        // record (a webhook reply has no idempotency key), and the restarted server sends that part once more
        // and logs it so.
        let log = (try? String(contentsOfFile: directory + "/second.log", encoding: .utf8)) ?? ""
        let duplicated = perMessage.filter { $0.value > 1 }
        for (id, count) in duplicated {
            let warned = log.split(separator: "\n").contains { $0.contains("message_id=\(id) ") && $0.contains("sending a reply part again") }
            #expect(count == 2 && warned, "\(id) answered \(count) times")
        }
        // Each of the 4 conversations has at most one answer in flight, so at most 4 can be in that window.
        #expect(duplicated.count <= 4, "duplicates: \(duplicated)")
        for id in accepted {
            let index = id.split(separator: "-").last!
            #expect(dingtalk.deliveries.first { $0.target == id }?.text == ModelSimulator.answer(to: "q\(index)"))
        }
        let store = try await SQLStore.open(.sqliteFile(path: "\(directory)/chatbridge.sqlite"), logger: Logger(label: "t"))
        #expect(try await store.inboxRows().allSatisfy { $0.state == "answered" })
        await store.close()
        await run.stop()
    }

    /// Group commit under a real crash: 300 callbacks arrive at once, so their accepts share commits, and
    /// the server is killed while they still arrive. Every callback that got its 200 is answered after the
    /// restart; those that did not are the platform's to deliver again.
    @Test func killedWhileCallbacksArriveTogetherNothingAcknowledgedIsLost() async throws {
        let run = try await CrashRun.start(firstTokenLatency: .milliseconds(200))
        let (dingtalk, directory, first, sender, client) = (run.dingtalk, run.directory, run.first, run.sender, run.client)
        let acknowledged = OrderLog()
        await withTaskGroup(of: Void.self) { group in
            for i in 0..<300 {
                group.addTask {
                    let id = "burst-\(i)"
                    let body = sender.body(messageID: id, text: "q\(i)", conversationID: "cid\(i % 40)==", senderStaffID: "u\(i % 40)",
                                           webhook: dingtalk.webhookURL(session: id))
                    if (try? await sender.post(body, client: client).status) == 200 { acknowledged.append(id) }
                }
            }
            // Killed while the burst is still being acknowledged.
            _ = await eventually { acknowledged.entries.count >= 30 }
            first.signal(SIGKILL)
            _ = await first.wait()
            await group.waitForAll()
        }
        let acked = Set(acknowledged.entries)
        #expect(acked.count >= 30)
        #expect(acked.count < 300, "the kill came after the burst")
        let second = try run.restart()
        _ = try await second.waitUntilListening()
        #expect(await eventually(seconds: 60) { acked.isSubset(of: Set(dingtalk.deliveries.map(\.target))) })
        second.signal(SIGTERM)
        #expect(await second.wait() == 0)
        let store = try await SQLStore.open(.sqliteFile(path: "\(directory)/chatbridge.sqlite"), logger: Logger(label: "t"))
        let stored = Set(try await store.inboxRows().map(\.messageID))
        #expect(acked.isSubset(of: stored), "acknowledged but not stored: \(acked.subtracting(stored).sorted())")
        await store.close()
        await run.stop()
    }

    /// The window that remains: DingTalk has accepted a reply, but the process dies before the statement
    /// recording it commits. The sessionWebhook has no idempotency key, so the next attempt cannot know;
    /// it sends the reply once more, logged as a possible duplicate, and never a third time.
    @Test func killedBetweenDeliveryAndItsRecordTheReplyIsSentOnceMoreAndFlagged() async throws {
        let model = try await ModelSimulator.start()
        let dingtalk = try await DingTalkSimulator.start()
        let directory = temporaryDirectory()
        let environment = serverEnvironment(directory: directory, model: model, dingtalk: dingtalk)
        // DingTalk takes the reply, but its answer does not come back before the process dies.
        dingtalk.scriptWebhook(.deliveredThenHeld)
        let first = try ChildServer(executable: chatbridgeExecutable(), environment: environment, logPath: directory + "/first.log")
        let port = try await first.waitUntilListening()
        let sender = CallbackSender(url: "http://127.0.0.1:\(port)/callbacks/dingtalk", secret: testSecret)
        let client = HTTPClientFactory.make()
        let body = sender.body(messageID: "window-1", text: "in the window", webhook: dingtalk.webhookURL(session: "window-1"))
        #expect(try await sender.post(body, client: client).status == 200)
        #expect(await eventually { dingtalk.deliveries.count == 1 })
        first.signal(SIGKILL)
        _ = await first.wait()
        dingtalk.releaseHeld()

        let second = try ChildServer(executable: chatbridgeExecutable(), environment: environment, logPath: directory + "/second.log")
        _ = try await second.waitUntilListening()
        #expect(await eventually { dingtalk.deliveries.count == 2 })
        #expect(await eventually { ((try? String(contentsOfFile: directory + "/second.log", encoding: .utf8)) ?? "").contains("may appear twice") })
        second.signal(SIGTERM)
        #expect(await second.wait() == 0)
        #expect(dingtalk.deliveries.map(\.target) == ["window-1", "window-1"])
        #expect(model.requestCount == 1)
        let store = try await SQLStore.open(.sqliteFile(path: "\(directory)/chatbridge.sqlite"), logger: Logger(label: "t"))
        let rows = try await store.inboxRows()
        #expect(rows.map(\.state) == ["answered"])
        #expect(rows.map(\.attempts) == [2])
        await store.close()
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

/// Stream mode and cards through the real binary: killed mid-stream, restarted, every card finished once.
@Suite(.serialized) struct StreamCrashTests {
    @Test func killedWhileCardsStreamTheSameCardsAreFinishedAfterTheRestart() async throws {
        var behaviour = ModelSimulator.Behaviour()
        behaviour.tokensPerSecond = 20
        behaviour.answerTokens = 40
        let setup = try await StreamSetup.start(behaviour, cards: true)
        let (model, dingtalk, directory, environment) = (setup.model, setup.dingtalk, setup.directory, setup.environment)
        let executable = chatbridgeExecutable()
        let first = try ChildServer(executable: executable, environment: environment, logPath: directory + "/first.log")
        _ = try await first.waitUntilListening()
        await dingtalk.gateway.wait { !$0.openConnections.isEmpty }
        let sender = CallbackSender(url: "", secret: testSecret)
        var frames: [String] = []
        for i in 0..<4 {
            let body = sender.body(
                messageID: "sk-\(i)", text: "q\(i)", conversationID: "cidK\(i)==", senderStaffID: "k\(i)", group: i % 2 == 0,
                webhook: dingtalk.webhookURL(session: "sk-\(i)"))
            frames.append(try await dingtalk.gateway.pushMessage(body))
        }
        for frame in frames { #expect(await dingtalk.gateway.waitForAck(frame).code == 200) }
        // Kill while the cards are half written.
        #expect(await eventually { dingtalk.cards.cards.contains { $0.streamed.contains(" w3") } })
        first.signal(SIGKILL)
        _ = await first.wait()
        #expect(dingtalk.cards.cards.allSatisfy { $0.flowStatus != "3" })

        let second = try ChildServer(executable: executable, environment: environment, logPath: directory + "/second.log")
        _ = try await second.waitUntilListening()
        #expect(await eventually(seconds: 60) { dingtalk.cards.cards.count == 4 && dingtalk.cards.cards.allSatisfy { $0.flowStatus == "3" } })
        second.signal(SIGTERM)
        #expect(await second.wait() == 0)
        for i in 0..<4 {
            let card = try #require(dingtalk.cards.card(DingTalkCard.outTrackID(robotCode: "dingbot", messageID: "sk-\(i)")))
            #expect(card.deliveries == 1)
            #expect(card.finalized)
            #expect(card.streamed == ModelSimulator.answer(to: "q\(i)") + (0..<40).map { " w\($0)" }.joined())
        }
        #expect(dingtalk.deliveries.isEmpty, "no markdown besides the cards")
        #expect(dingtalk.cards.repeatedGuids == 0)
        let store = try await SQLStore.open(.sqliteFile(path: "\(directory)/chatbridge.sqlite"), logger: Logger(label: "t"))
        let rows = try await store.inboxRows()
        #expect(rows.count == 4)
        #expect(rows.allSatisfy { $0.state == "answered" && $0.live == "finalized" })
        await store.close()
        await model.stop()
        await dingtalk.stop()
    }
}

/// The real binary over the Lark long connection with CardKit answers, killed mid-stream.
@Suite(.serialized) struct LarkCrashTests {
    @Test func killedWhileCardKitCardsStreamTheSameCardsAreFinishedOnceAfterTheRestart() async throws {
        var behaviour = ModelSimulator.Behaviour()
        behaviour.tokensPerSecond = 20
        behaviour.answerTokens = 40
        let model = try await ModelSimulator.start(behaviour: behaviour)
        let dingtalk = try await DingTalkSimulator.start()
        let lark = try await LarkSimulator.start()
        lark.gateway.setRedelivery(after: .seconds(1))
        let directory = temporaryDirectory()
        var environment = serverEnvironment(directory: directory, model: model, dingtalk: dingtalk)
        environment.merge([
            "CHATBRIDGE_LARK_APP_ID": lark.appID, "CHATBRIDGE_LARK_APP_SECRET": lark.appSecret, "CHATBRIDGE_LARK_BASE_URL": lark.baseURL,
            "CHATBRIDGE_LARK_MODE": "websocket", "CHATBRIDGE_LARK_STREAM_HOSTS": "127.0.0.1", "CHATBRIDGE_LARK_CARD_UPDATE_INTERVAL": "100ms",
            "CHATBRIDGE_LARK_STREAM_MAX_BACKOFF": "300ms",
        ]) { $1 }
        let executable = chatbridgeExecutable()
        let first = try ChildServer(executable: executable, environment: environment, logPath: directory + "/first.log")
        _ = try await first.waitUntilListening()
        #expect(await lark.gateway.wait { !$0.openConnections.isEmpty })
        let sender = LarkEventSender(url: "", verificationToken: "", encryptKey: "")
        for i in 0..<4 {
            let event = sender.messageEvent(messageID: "om_k\(i)", text: "q\(i)", chatID: "oc_k\(i)", sender: "ou_k\(i)")
            let frame = try await lark.gateway.pushEvent(event)
            #expect(await lark.gateway.wait { $0.replies(for: frame).contains { $0.code == 200 } })
        }
        // Kill while the cards are half written.
        #expect(await eventually { lark.cards.count == 4 && lark.cards.allSatisfy { $0.text.contains(" w3") } })
        first.signal(SIGKILL)
        _ = await first.wait()
        #expect(lark.cards.allSatisfy { $0.streaming })

        let second = try ChildServer(executable: executable, environment: environment, logPath: directory + "/second.log")
        _ = try await second.waitUntilListening()
        #expect(await eventually(seconds: 60) { lark.cards.count == 4 && lark.cards.allSatisfy { !$0.streaming } })
        second.signal(SIGTERM)
        #expect(await second.wait() == 0)
        for i in 0..<4 {
            let replies = lark.replies(to: "om_k\(i)")
            #expect(replies.count == 1, "one card message per question")
            let card = try #require(replies.first?.cardID.flatMap { lark.card($0) })
            #expect(card.sends == 1)
            #expect(card.text == ModelSimulator.answer(to: "q\(i)") + (0..<40).map { " w\($0)" }.joined())
            #expect(zip(card.sequences, card.sequences.dropFirst()).allSatisfy { $0 < $1 }, "sequences rise across the restart")
        }
        #expect(lark.cards.count == 4, "no second card entity for any message")
        let store = try await SQLStore.open(.sqliteFile(path: "\(directory)/chatbridge.sqlite"), logger: Logger(label: "t"))
        let rows = try await store.inboxRows()
        #expect(rows.count == 4)
        #expect(rows.allSatisfy { $0.state == "answered" && $0.live == "finalized" })
        await store.close()
        await model.stop()
        await dingtalk.stop()
        await lark.stop()
    }
}
