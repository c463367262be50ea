import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeSimulators
import ChatBridgeStore
import Foundation
import Logging
import Testing

/// Several `chatbridge serve` processes on one PostgreSQL database, against the loopback simulators.
@Suite(.enabled(if: TestPostgres.isAvailable, TestPostgres.skipNote), .serialized)
struct ReplicaTests {
    @Test func threeReplicasAnswerEveryMessageOnceInOrderWhenOneIsKilledMidAnswer() async throws {
        var behaviour = ModelSimulator.Behaviour()
        behaviour.firstTokenLatency = .milliseconds(400)
        let model = try await ModelSimulator.start(behaviour: behaviour)
        let dingtalk = try await DingTalkSimulator.start()
        let directory = temporaryDirectory()
        var environment = serverEnvironment(directory: directory, model: model, dingtalk: dingtalk)
        environment["CHATBRIDGE_DATABASE_URL"] = try await TestPostgres.freshDatabase()
        environment["CHATBRIDGE_WORKER_LEASE"] = "20s"
        let executable = chatbridgeExecutable()
        var replicas: [ChildServer] = []
        for index in 0..<3 {
            replicas.append(try ChildServer(executable: executable, environment: environment, logPath: "\(directory)/replica\(index).log"))
        }
        var ports: [Int] = []
        for replica in replicas { ports.append(try await replica.waitUntilListening()) }
        let senders = ports.map { CallbackSender(url: "http://127.0.0.1:\($0)/callbacks/dingtalk", secret: testSecret) }
        let client = HTTPClientFactory.make()
        let conversations = 5
        let perConversation = 6
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
        // Kill one replica while answers are in flight.
        #expect(await eventually { model.requestCount >= 4 })
        replicas[0].signal(SIGKILL)
        _ = await replicas[0].wait()
        // The others take over its claims when their leases expire, and answer everything.
        #expect(await eventually(seconds: 90) { Set(dingtalk.deliveries.map(\.target)).count == accepted.count })
        for replica in replicas.dropFirst() { replica.signal(SIGTERM) }
        for replica in replicas.dropFirst() { #expect(await replica.wait() == 0) }
        let deliveries = dingtalk.deliveries
        let perMessage = Dictionary(grouping: deliveries, by: \.target).mapValues(\.count)
        // A DingTalk webhook reply has no idempotency key: when the kill lands between a send and its record,
        // the replica that takes over sends that one part once more and logs it as a possible duplicate.
        // That is the only duplicate allowed, and only for a message logged so.
        let logs = (0..<3).map { (try? String(contentsOfFile: "\(directory)/replica\($0).log", encoding: .utf8)) ?? "" }.joined()
        let duplicated = perMessage.filter { $0.value > 1 }
        for (id, count) in duplicated {
            let warned = logs.split(separator: "\n").contains { $0.contains("message_id=\(id) ") && $0.contains("sending a reply part again") }
            #expect(count == 2 && warned, "\(id) answered \(count) times")
        }
        #expect(duplicated.count <= 1, "duplicates: \(duplicated)")
        for c in 0..<conversations {
            let order = deliveries.map(\.target).filter { $0.hasPrefix("r-\(c)-") }.reduce(into: [String]()) { if $0.last != $1 { $0.append($1) } }
            #expect(order == (0..<perConversation).map { "r-\(c)-\($0)" }, "conversation \(c) answered out of order")
            for n in 0..<perConversation {
                #expect(deliveries.first { $0.target == "r-\(c)-\(n)" }?.text == ModelSimulator.answer(to: "q \(c) \(n)"))
            }
        }
        try await client.shutdown()
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
