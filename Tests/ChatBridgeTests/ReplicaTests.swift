import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeDingTalk
import ChatBridgeSimulators
@testable import ChatBridgeStore
import Foundation
import Logging
import SQLKit
import Synchronization
import Testing

/// Several `chatbridge serve` processes on one PostgreSQL database, against the loopback simulators.
@Suite(.enabled(if: TestPostgres.isAvailable, TestPostgres.skipNote), .serialized, .timeLimit(.minutes(5)))
struct ReplicaTests {
    @Test func threeReplicasAnswerEveryMessageOnceInOrderWhenOneIsKilledMidAnswer() async throws {
        var behaviour = ModelSimulator.Behaviour()
        behaviour.firstTokenLatency = .milliseconds(400)
        let model = try await ModelSimulator.start(behaviour: behaviour)
        let dingtalk = try await DingTalkSimulator.start()
        let directory = temporaryDirectory()
        let database = try await TestPostgres.freshDatabase()
        var environment = serverEnvironment(directory: directory, model: model, dingtalk: dingtalk)
        environment["CHATBRIDGE_DATABASE_URL"] = database
        environment["CHATBRIDGE_WORKER_LEASE"] = "20s"
        let (replicas, ports) = try await startReplicas(3, environment: environment, directory: directory)
        let senders = ports.map { CallbackSender(url: "http://127.0.0.1:\($0)/callbacks/dingtalk", secret: testSecret) }
        let client = HTTPClientFactory.make()
        let conversations = 5
        let perConversation = 6
        // The model waits until the kill below, so the killed replica is answering then (a kill between a
        // webhook send and its record is CrashTests' killedBetweenDeliveryAndItsRecord…).
        model.hold()
        // Each conversation asks its questions one after the other, round-robin over the replicas; every
        // third question is delivered twice at the same moment, to two different replicas.
        let accepted = try await withThrowingTaskGroup(of: [String].self) { group in
            for c in 0..<conversations {
                group.addTask {
                    var accepted: [String] = []
                    for n in 0..<perConversation {
                        let id = "r-\(c)-\(n)"
                        let body = senders[0].body(
                            messageID: id, text: "q \(c) \(n)", conversationID: "cid\(c)==", senderStaffID: "u\(c)", webhook: dingtalk.webhookURL(session: id))
                        let first = (c + n) % senders.count
                        var targets = [first]
                        if n % 3 == 0 { targets.append((first + 1) % senders.count) }
                        let statuses = try await withThrowingTaskGroup(of: Int.self) { posts in
                            for target in targets { posts.addTask { try await senders[target].post(body, client: client).status } }
                            return try await posts.reduce(into: [Int]()) { $0.append($1) }
                        }
                        if statuses.contains(200) { accepted.append(id) }
                    }
                    return accepted
                }
            }
            return try await group.reduce(into: [String]()) { $0 += $1 }
        }
        #expect(accepted.count == conversations * perConversation)
        // Kill a replica that is answering.
        let store = try await SQLStore.open(try DatabaseLocation.parse(database), logger: Logger(label: "t"))
        let victim = try #require(try await replicaHoldingAClaim(replicas, store: store))
        await store.close()
        replicas[victim].signal(SIGKILL)
        _ = await replicas[victim].wait()
        model.release()
        // The others take over its claims when their leases expire, and answer everything.
        #expect(await eventually(seconds: 90) { Set(dingtalk.deliveries.map(\.target)).count == accepted.count })
        let survivors = replicas.indices.filter { $0 != victim }.map { replicas[$0] }
        for replica in survivors { replica.signal(SIGTERM) }
        for replica in survivors { #expect(await replica.wait() == 0) }
        expectAnsweredOnceInOrder(
            dingtalk.deliveries, conversations: (0..<conversations).map { c in (0..<perConversation).map { "r-\(c)-\($0)" } },
            questions: { id in let parts = id.split(separator: "-"); return "q \(parts[1]) \(parts[2])" }, logs: replicaLogs(directory, count: 3))
        try await client.shutdown()
    }

    @Test func inStreamModeEveryReplicaHoldsAConnectionAndAFrameDeliveredToTwoReplicasOrLeftOnAKilledOneIsAnsweredOnce() async throws {
        var behaviour = ModelSimulator.Behaviour()
        behaviour.firstTokenLatency = .milliseconds(400)
        let database = try await TestPostgres.freshDatabase()
        let setup = try await StreamSetup.start(behaviour, database: database, settings: ["CHATBRIDGE_WORKER_LEASE": "20s"])
        let (model, dingtalk, directory, environment) = (setup.model, setup.dingtalk, setup.directory, setup.environment)
        let gateway = dingtalk.gateway
        let replicas = try await startReplicasOneByOne(3, environment: environment, directory: directory) { gateway.openConnections.count }
        let connections = gateway.openConnections
        try #require(connections.count == 3)
        // As DingTalk: a frame unacknowledged for 2 s is delivered again, on the newest connection.
        gateway.setRedelivery(after: .seconds(2))
        let sender = CallbackSender(url: "", secret: testSecret)
        func body(_ id: String, conversation: Int) -> Data {
            sender.body(
                messageID: id, text: "q \(conversation) \(id.split(separator: "-").last!)", conversationID: "cidS\(conversation)==",
                senderStaffID: "s\(conversation)", webhook: dingtalk.webhookURL(session: id))
        }
        let conversations = 4
        let perConversation = 6
        // The model waits until the kill below, so answers are in flight then.
        model.hold()
        // Each conversation asks one question after the other, round-robin over the connections; every third
        // frame is delivered on two connections (two replicas) at the same moment, under one frame id.
        try await withThrowingTaskGroup(of: Void.self) { group in
            for c in 0..<conversations {
                group.addTask {
                    for n in 0..<perConversation {
                        let id = "s-\(c)-\(n)"
                        let first = (c + n) % connections.count
                        var targets = [connections[first]]
                        if n % 3 == 0 { targets.append(connections[(first + 1) % connections.count]) }
                        let frame = "frame-\(id)"
                        try await withThrowingTaskGroup(of: Void.self) { pushes in
                            for target in targets { pushes.addTask { try await gateway.pushMessage(body(id, conversation: c), to: target, frameID: frame) } }
                            try await pushes.waitForAll()
                        }
                        #expect(await gateway.waitForAck(frame).code == 200)
                    }
                }
            }
            try await group.waitForAll()
        }
        // A replica that is answering stops (SIGSTOP), three more frames are pushed to its connection, and it
        // is killed: its claims are taken over once their leases expire, and the frames it never
        // acknowledged are delivered again on a live connection and answered there.
        let store = try await SQLStore.open(try DatabaseLocation.parse(database), logger: Logger(label: "t"))
        let victim = try #require(try await replicaHoldingAClaim(replicas, store: store))
        replicas[victim].signal(SIGSTOP)
        let late = (0..<3).map { "s-\(conversations + $0)-0" }
        for (offset, id) in late.enumerated() {
            try await gateway.pushMessage(body(id, conversation: conversations + offset), to: connections[victim], frameID: "frame-\(id)")
        }
        replicas[victim].signal(SIGKILL)
        _ = await replicas[victim].wait()
        model.release()
        let survivors = replicas.indices.filter { $0 != victim }.map { replicas[$0] }
        for id in late {
            let ack = await SystemClock().withTimeout(.seconds(60)) { await gateway.firstAck("frame-\(id)") } ?? nil
            #expect(ack?.code == 200 && ack?.connection != connections[victim], "\(id) acknowledged on a live connection")
        }
        let expected = (0..<conversations).map { c in (0..<perConversation).map { "s-\(c)-\($0)" } } + late.map { [$0] }
        #expect(await eventually(seconds: 90) { Set(dingtalk.deliveries.map(\.target)).count == expected.joined().count })
        for replica in survivors { replica.signal(SIGTERM) }
        for replica in survivors { #expect(await replica.wait() == 0) }
        expectAnsweredOnceInOrder(
            dingtalk.deliveries, conversations: expected,
            questions: { id in let parts = id.split(separator: "-"); return "q \(parts[1]) \(parts[2])" }, logs: replicaLogs(directory, count: 3))
        await store.close()
        await model.stop()
        await dingtalk.stop()
    }

    @Test func aCardStreamInterruptedByKillingItsReplicaIsFinishedOnceByAnother() async throws {
        var behaviour = ModelSimulator.Behaviour()
        // 8 s per answer: no card is finished yet when the kill lands (shortly after the fourth word).
        behaviour.tokensPerSecond = 5
        behaviour.answerTokens = 40
        let database = try await TestPostgres.freshDatabase()
        let setup = try await StreamSetup.start(behaviour, database: database, cards: true, settings: ["CHATBRIDGE_WORKER_LEASE": "20s"])
        let (model, dingtalk, directory, environment) = (setup.model, setup.dingtalk, setup.directory, setup.environment)
        let gateway = dingtalk.gateway
        let replicas = try await startReplicasOneByOne(2, environment: environment, directory: directory) { gateway.openConnections.count }
        let doomed = try #require(gateway.openConnections.first)
        let sender = CallbackSender(url: "", secret: testSecret)
        for i in 0..<4 {
            let body = sender.body(
                messageID: "rc-\(i)", text: "q\(i)", conversationID: "cidRC\(i)==", senderStaffID: "rc\(i)", group: i % 2 == 0,
                webhook: dingtalk.webhookURL(session: "rc-\(i)"))
            let frame = try await gateway.pushMessage(body, to: doomed)
            #expect(await gateway.waitForAck(frame).code == 200)
        }
        // All four cards are half written when a replica streaming at least one of them is killed (replica 1
        // may have claimed some that replica 0 accepted: every replica answers messages accepted by any).
        let store = try await SQLStore.open(try DatabaseLocation.parse(database), logger: Logger(label: "t"))
        #expect(await eventually { dingtalk.cards.cards.count == 4 && dingtalk.cards.cards.allSatisfy { $0.streamed.contains(" w3") } })
        let victim = try #require(try await replicaHoldingAClaim(replicas, store: store))
        replicas[victim].signal(SIGKILL)
        _ = await replicas[victim].wait()
        #expect(dingtalk.cards.cards.allSatisfy { $0.flowStatus != "3" })
        // The other takes the claims over when their leases expire and finishes the same cards.
        #expect(await eventually(seconds: 90) { dingtalk.cards.cards.allSatisfy { $0.flowStatus == "3" } })
        let survivor = replicas[1 - victim]
        survivor.signal(SIGTERM)
        #expect(await survivor.wait() == 0)
        #expect(dingtalk.cards.cards.count == 4, "no second card for any message")
        for i in 0..<4 {
            let card = try #require(dingtalk.cards.card(DingTalkCard.outTrackID(robotCode: "dingbot", messageID: "rc-\(i)")))
            #expect(card.deliveries == 1)
            #expect(card.finalized)
            #expect(card.streamed == ModelSimulator.answer(to: "q\(i)") + (0..<40).map { " w\($0)" }.joined())
        }
        #expect(dingtalk.deliveries.isEmpty, "no markdown besides the cards")
        #expect(dingtalk.cards.repeatedGuids == 0)
        let rows = try await store.inboxRows()
        #expect(rows.count == 4)
        #expect(rows.allSatisfy { $0.state == "answered" && $0.live == "finalized" })
        await store.close()
        await model.stop()
        await dingtalk.stop()
    }

    @Test func postgresRestartedUnderLoadLosesNothingAndAnswersEveryMessageOnceInOrder() async throws {
        let cluster = try PostgresCluster.start()
        defer { cluster.destroy() }
        var behaviour = ModelSimulator.Behaviour()
        behaviour.firstTokenLatency = .milliseconds(300)
        let model = try await ModelSimulator.start(behaviour: behaviour)
        let dingtalk = try await DingTalkSimulator.start()
        let directory = temporaryDirectory()
        var environment = serverEnvironment(directory: directory, model: model, dingtalk: dingtalk)
        environment["CHATBRIDGE_DATABASE_URL"] = cluster.url()
        environment["CHATBRIDGE_WORKER_LEASE"] = "20s"
        let (replicas, ports) = try await startReplicas(2, environment: environment, directory: directory)
        let senders = ports.map { CallbackSender(url: "http://127.0.0.1:\($0)/callbacks/dingtalk", secret: testSecret) }
        let client = HTTPClientFactory.make()
        let conversations = 6
        let perConversation = 8
        let sentBefore = EventCount()
        let refused = EventCount()
        let down = OneTimeEvent()
        let back = OneTimeEvent()
        // Each conversation asks two questions, then the rest once the database is down: the first of those is
        // refused (503) and, as DingTalk does, delivered again to the other replica once the database is back.
        let load = Task {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for c in 0..<conversations {
                    group.addTask {
                        for n in 0..<perConversation {
                            if n == 2 {
                                sentBefore.increment()
                                await down.wait()
                            }
                            let id = "pg-\(c)-\(n)"
                            let body = senders[0].body(
                                messageID: id, text: "q \(c) \(n)", conversationID: "cidPG\(c)==", senderStaffID: "pg\(c)",
                                webhook: dingtalk.webhookURL(session: id))
                            if (try? await senders[(c + n) % senders.count].post(body, client: client).status) == 200 { continue }
                            refused.increment()
                            await back.wait()
                            let accepted = await eventually(seconds: 60) {
                                (try? await senders[(c + n + 1) % senders.count].post(body, client: client).status) == 200
                            }
                            try #require(accepted, "\(id) accepted once the database is back")
                        }
                    }
                }
                try await group.waitForAll()
            }
        }
        // Stop the server abruptly (as a crash or a fail-over does) while answers are in flight, and start it
        // again once every conversation had a question refused because of it.
        #expect(await eventually { sentBefore.value == conversations && model.requestCount >= conversations })
        try cluster.stop(immediately: true)
        down.signal()
        #expect(await eventually(seconds: 60) { refused.value >= conversations })
        try cluster.startServer()
        back.signal()
        try await load.value
        let expected = (0..<conversations).map { c in (0..<perConversation).map { "pg-\(c)-\($0)" } }
        #expect(await eventually(seconds: 90) { Set(dingtalk.deliveries.map(\.target)).count == expected.joined().count })
        for replica in replicas { replica.signal(SIGTERM) }
        for replica in replicas { #expect(await replica.wait() == 0) }
        // The outage is shorter than a lease, so no claim changes hands and no reply part is sent twice.
        expectAnsweredOnceInOrder(
            dingtalk.deliveries, conversations: expected,
            questions: { id in let parts = id.split(separator: "-"); return "q \(parts[1]) \(parts[2])" },
            logs: replicaLogs(directory, count: 2), allowedResends: 0)
        try await client.shutdown()
        await model.stop()
        await dingtalk.stop()
    }

    @Test func streamFramesStayUnacknowledgedWhilePostgresIsAwayAndAreAnsweredOnceWhenItReturns() async throws {
        let cluster = try PostgresCluster.start()
        defer { cluster.destroy() }
        let setup = try await StreamSetup.start(database: cluster.url())
        let (model, dingtalk, directory, environment) = (setup.model, setup.dingtalk, setup.directory, setup.environment)
        let gateway = dingtalk.gateway
        let replicas = try await startReplicasOneByOne(2, environment: environment, directory: directory) { gateway.openConnections.count }
        let connections = gateway.openConnections
        let sender = CallbackSender(url: "", secret: testSecret)
        func body(_ id: String) -> Data {
            sender.body(messageID: id, text: "q \(id)", conversationID: "cidOut==", senderStaffID: "out", webhook: dingtalk.webhookURL(session: id))
        }
        let first = try await gateway.pushMessage(body("o1"), to: connections[0])
        #expect(await gateway.waitForAck(first).code == 200)
        #expect(await eventually { dingtalk.deliveries.count == 1 })
        try cluster.stop()
        // While the database is away the frame is not stored, so it is not acknowledged.
        let frame = try await gateway.pushMessage(body("o2"), to: connections[0])
        #expect(await eventually(seconds: 30) {
            (try? String(contentsOfFile: "\(directory)/replica0.log", encoding: .utf8))?.contains("could not store a Stream robot message") == true
        })
        #expect(gateway.acks(for: frame).isEmpty)
        try cluster.startServer()
        // DingTalk delivers it again, here on the other replica's connection, until it is acknowledged.
        #expect(await eventually(seconds: 60) {
            try? await gateway.pushMessage(body("o2"), to: connections[1], frameID: frame)
            return await SystemClock().withTimeout(.seconds(6)) { await gateway.firstAck(frame) }??.code == 200
        })
        #expect(await eventually(seconds: 30) { dingtalk.deliveries.count == 2 })
        for replica in replicas { replica.signal(SIGTERM) }
        for replica in replicas { #expect(await replica.wait() == 0) }
        #expect(dingtalk.deliveries.map(\.target) == ["o1", "o2"])
        #expect(dingtalk.deliveries.last?.text == ModelSimulator.answer(to: "q o2"))
        await model.stop()
        await dingtalk.stop()
    }

    @Test func onTheLarkLongConnectionAnEventPushedToTwoReplicasAtOnceIsAnsweredOnceInOrder() async throws {
        var behaviour = ModelSimulator.Behaviour()
        behaviour.firstTokenLatency = .milliseconds(200)
        let model = try await ModelSimulator.start(behaviour: behaviour)
        let dingtalk = try await DingTalkSimulator.start()
        let lark = try await LarkSimulator.start()
        let gateway = lark.gateway
        let directory = temporaryDirectory()
        var environment = serverEnvironment(directory: directory, model: model, dingtalk: dingtalk)
        environment.merge([
            "CHATBRIDGE_DATABASE_URL": try await TestPostgres.freshDatabase(),
            "CHATBRIDGE_LARK_APP_ID": lark.appID, "CHATBRIDGE_LARK_APP_SECRET": lark.appSecret, "CHATBRIDGE_LARK_BASE_URL": lark.baseURL,
            "CHATBRIDGE_LARK_MODE": "websocket", "CHATBRIDGE_LARK_STREAM_HOSTS": "127.0.0.1", "CHATBRIDGE_LARK_CARD_MODE": "off",
        ]) { $1 }
        let replicas = try await startReplicasOneByOne(2, environment: environment, directory: directory) { gateway.openConnections.count }
        let connections = gateway.openConnections
        try #require(connections.count == 2)
        let sender = LarkEventSender(url: "", verificationToken: "", encryptKey: "")
        let chats = 3
        let perChat = 4
        // Each chat's events arrive one after the other; every other one is pushed on both replicas'
        // connections at the same moment (Feishu re-pushing an event on another connection).
        try await withThrowingTaskGroup(of: Void.self) { group in
            for c in 0..<chats {
                group.addTask {
                    for n in 0..<perChat {
                        let event = sender.messageEvent(messageID: "om_r\(c)_\(n)", text: "q \(c) \(n)", chatID: "oc_r\(c)", sender: "ou_r\(c)")
                        var targets = [connections[(c + n) % 2]]
                        if n % 2 == 0 { targets.append(connections[(c + n + 1) % 2]) }
                        let frames = try await withThrowingTaskGroup(of: String.self) { pushes in
                            for target in targets { pushes.addTask { try await gateway.pushEvent(event, to: target) } }
                            return try await pushes.reduce(into: [String]()) { $0.append($1) }
                        }
                        for frame in frames {
                            #expect(await gateway.wait { $0.replies(for: frame).contains { $0.code == 200 } })
                        }
                    }
                }
            }
            try await group.waitForAll()
        }
        #expect(await eventually(seconds: 60) { Set(lark.messages.compactMap(\.replyTo)).count == chats * perChat })
        for replica in replicas { replica.signal(SIGTERM) }
        for replica in replicas { #expect(await replica.wait() == 0) }
        // Stored once, so asked of the model once and replied to once (not merely refused by Feishu's uuid check).
        #expect(model.requestCount == chats * perChat)
        #expect(lark.duplicateReplies == 0)
        for c in 0..<chats {
            let ids = (0..<perChat).map { "om_r\(c)_\($0)" }
            #expect(lark.messages.compactMap(\.replyTo).filter(ids.contains) == ids, "chat \(c): each answered once, in order")
            for n in 0..<perChat {
                #expect(lark.replies(to: "om_r\(c)_\(n)").map(\.text) == [ModelSimulator.answer(to: "q \(c) \(n)")])
            }
        }
        await model.stop()
        await dingtalk.stop()
        await lark.stop()
    }

    @Test func benchSpreadsCallbacksOverReplicasOnANewDatabaseAndDropsItAfterwards() async throws {
        let url = try await TestPostgres.freshDatabase()
        guard case .postgres(let server) = try DatabaseLocation.parse(url) else { throw SimulatorError(description: "not PostgreSQL") }
        let result = try runChatbridge(
            ["bench", "--database", url, "--replicas", "2", "--duration", "2", "--rate", "20", "--users", "10", "--json"],
            environment: [:], directory: temporaryDirectory())
        #expect(result.status == 0, "\(result.stderr)")
        let report = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        #expect(report["database"] as? String == "postgres" && report["servers"] as? Int == 2)
        #expect(report["sent"] as? Int == 40 && report["answered"] as? Int == 40)
        #expect(report["lost"] as? Int == 0 && report["duplicated"] as? Int == 0)
        #expect((report["cpuPerAnswerMicros"] as? Double ?? 0) > 0 && report["wakeUpP99"] is Double)
        // The run's own database (named on standard error) is gone; the one named in the URL is untouched.
        let name = try #require(result.stderr.firstMatch(of: /chatbridge_bench_[a-z0-9]+/).map { String($0.output) })
        let store = try await SQLStore.open(.postgres(server), logger: Logger(label: "t"))
        let left = try await store.single { db in
            try await db.raw("SELECT COUNT(*) AS n FROM pg_database WHERE datname = \(bind: name)").first()?.decode(column: "n", as: Int.self)
        }
        #expect(left == 0)
        await store.close()
    }

    @Test func whileTheDatabaseIsAwayCallbacksAre503AndEverythingResumesWhenItReturns() async throws {
        let cluster = try PostgresCluster.start()
        defer { cluster.destroy() }
        let h = try await Harness.start(["database.url": cluster.url()])
        let before = h.sender.body(messageID: "before", text: "one", webhook: h.dingtalk.webhookURL(session: "before"))
        #expect(try await h.sender.post(before, client: h.client).status == 200)
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
        try cluster.stop()
        // Refused, so the platform delivers it again; readiness says why.
        let during = h.sender.body(messageID: "during", text: "two", webhook: h.dingtalk.webhookURL(session: "during"))
        #expect(try await h.sender.post(during, client: h.client).status == 503)
        let ready = try await h.get("/readyz")
        #expect(ready.status == 503 && ready.body.contains("database unreachable"))
        try cluster.startServer()
        // No restart: the redelivery is accepted and answered, once.
        #expect(await eventually(seconds: 30) { (try? await h.sender.post(during, client: h.client).status) == 200 })
        #expect(await eventually(seconds: 30) { (try? await h.get("/readyz").status) == 200 })
        #expect(await eventually(seconds: 30) { h.dingtalk.deliveries.count == 2 })
        #expect(h.dingtalk.deliveries.map(\.target) == ["before", "during"])
        await h.stop()
    }
}

/// Starts `count` replicas one after the other (their logs are `replicaINDEX.log`), each once the one before
/// opened its platform connection (`connections` counts them), so connection i, in the order they opened,
/// belongs to replica i.
func startReplicasOneByOne(
    _ count: Int, environment: [String: String], directory: String, connections: @escaping @Sendable () -> Int
) async throws -> [ChildServer] {
    var replicas: [ChildServer] = []
    for index in 0..<count {
        let replica = try ChildServer(executable: chatbridgeExecutable(), environment: environment, logPath: "\(directory)/replica\(index).log")
        replicas.append(replica)
        _ = try await replica.waitUntilListening()
        try #require(await eventually { connections() == index + 1 }, "replica \(index) opened its connection")
    }
    return replicas
}

/// Starts `count` replicas at once (they race for the migrations) and returns them with their ports.
func startReplicas(_ count: Int, environment: [String: String], directory: String) async throws -> ([ChildServer], [Int]) {
    let replicas = try (0..<count).map {
        try ChildServer(executable: chatbridgeExecutable(), environment: environment, logPath: "\(directory)/replica\($0).log")
    }
    var ports: [Int] = []
    for replica in replicas { ports.append(try await replica.waitUntilListening()) }
    return (replicas, ports)
}

/// The index of a replica that holds at least one claim, waiting up to 20 s for one to.
func replicaHoldingAClaim(_ replicas: [ChildServer], store: SQLStore) async throws -> Int? {
    var found: Int?
    _ = try await eventually {
        for (index, replica) in replicas.enumerated() where try await store.runningClaims(of: replica) > 0 {
            found = index
            return true
        }
        return false
    }
    return found
}

/// The logs of replicas `0..<count`, joined.
func replicaLogs(_ directory: String, count: Int) -> String {
    (0..<count).map { (try? String(contentsOfFile: "\(directory)/replica\($0).log", encoding: .utf8)) ?? "" }.joined()
}

/// Every message of every conversation answered with its own answer, in the order asked. A DingTalk webhook
/// reply has no idempotency key: when a kill lands between a send and its record, the replica that takes
/// over sends that one part once more and logs it as a possible duplicate. That is the only duplicate
/// allowed, at most `allowedResends` of them, and only for a message logged so.
func expectAnsweredOnceInOrder(
    _ deliveries: [DingTalkSimulator.Delivery], conversations: [[String]], questions: (String) -> String, logs: String,
    allowedResends: Int = 1, sourceLocation: SourceLocation = #_sourceLocation
) {
    let perMessage = Dictionary(grouping: deliveries, by: \.target).mapValues(\.count)
    let duplicated = perMessage.filter { $0.value > 1 }
    let lines = logs.split(separator: "\n")
    for (id, count) in duplicated {
        let warned = lines.contains { $0.contains("message_id=\(id) ") && $0.contains("sending a reply part again") }
        #expect(count == 2 && warned, "\(id) answered \(count) times", sourceLocation: sourceLocation)
    }
    #expect(duplicated.count <= allowedResends, "duplicates: \(duplicated)", sourceLocation: sourceLocation)
    for ids in conversations {
        let asked = Set(ids)
        let order = deliveries.map(\.target).filter(asked.contains).reduce(into: [String]()) { if $0.last != $1 { $0.append($1) } }
        #expect(order == ids, "answered out of order: \(order)", sourceLocation: sourceLocation)
        for id in ids {
            #expect(deliveries.first { $0.target == id }?.text == ModelSimulator.answer(to: questions(id)), "\(id)", sourceLocation: sourceLocation)
        }
    }
}

extension SQLStore {
    /// How many messages `replica` has claimed and not finished (its lease owner names its process id).
    func runningClaims(of replica: ChildServer) async throws -> Int {
        let pattern = "%-\(replica.process.processIdentifier)-%"
        return try await single { db in
            try await db.raw("SELECT COUNT(*) AS n FROM inbox WHERE state = 'running' AND lease_owner LIKE \(bind: pattern)")
                .first()?.decode(column: "n", as: Int.self) ?? 0
        }
    }
}
