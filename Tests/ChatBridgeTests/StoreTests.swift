import ChatBridgeCore
import ChatBridgeStore
import Foundation
import Logging
import Testing

@Suite struct StoreTests {
    func message(_ id: String, chat: String = "c1", user: String = "u1") -> InboundMessage {
        InboundMessage(platform: "dingtalk", botID: "bot", messageID: id, chat: .init(id: chat, kind: .direct),
                       sender: .init(id: user, name: user), body: .text("q \(id)"), sentAt: Date())
    }

    @Test func claimsOneMessagePerConversationInOrder() async throws {
        let directory = temporaryDirectory()
        let store = try await SQLStore.open(.sqliteFile(path: directory + "/db.sqlite"), logger: Logger(label: "t"))
        for id in ["a1", "a2", "b1"] {
            let m = message(id, chat: String(id.prefix(1)))
            #expect(try await store.accept(m, conversation: ConversationKey(for: m, groupScope: .user), now: Date()) == .accepted)
        }
        let lease = Date().addingTimeInterval(30)
        let first = try await store.claim(limit: 10, owner: "w", leaseUntil: lease, now: Date())
        #expect(first.map(\.message.messageID) == ["a1", "b1"])
        #expect(try await store.claim(limit: 10, owner: "w", leaseUntil: lease, now: Date()).isEmpty)
        try await store.storeAnswer(id: first[0].id, owner: "w", resolution: Resolution(text: "x", effect: .none), key: first[0].conversation, now: Date())
        try await store.markAnswered(id: first[0].id, owner: "w", now: Date())
        #expect(try await store.claim(limit: 10, owner: "w", leaseUntil: lease, now: Date()).map(\.message.messageID) == ["a2"])
        // An expired lease is taken over by another worker, with the stored answer.
        let later = Date().addingTimeInterval(60)
        #expect(try await store.releaseExpiredLeases(now: later) == 2)
        let reclaimed = try await store.claim(limit: 10, owner: "w2", leaseUntil: later.addingTimeInterval(30), now: later)
        #expect(Set(reclaimed.map(\.message.messageID)) == ["a2", "b1"])
        #expect(reclaimed.map(\.attempts) == [2, 2])
        await store.close()
    }

    @Test func duplicatesAreRecognisedUnderConcurrency() async throws {
        let store = try await SQLStore.open(.sqliteMemory, logger: Logger(label: "t"))
        let m = message("same")
        let outcomes = try await withThrowingTaskGroup(of: AcceptOutcome.self) { group in
            for _ in 0..<50 { group.addTask { try await store.accept(m, conversation: ConversationKey(rawValue: "k"), now: Date()) } }
            return try await group.reduce(into: [AcceptOutcome]()) { $0.append($1) }
        }
        #expect(outcomes.filter { $0 == .accepted }.count == 1)
        #expect(try await store.counts().pending == 1)
        await store.close()
    }

    @Test func turnsResetAndRecentWindow() async throws {
        let store = try await SQLStore.open(.sqliteMemory, logger: Logger(label: "t"))
        let key = ConversationKey(rawValue: "dingtalk/bot/c/u")
        for i in 0..<50 {
            try await store.apply(.appendExchange(question: Turn(role: .user, content: "q\(i)", createdAt: Date()),
                                                  answer: Turn(role: .assistant, content: "a\(i)", createdAt: Date())), to: key)
        }
        let recent = try await store.recentTurns(key, limit: 4)
        #expect(recent.map(\.content) == ["q48", "a48", "q49", "a49"])
        try await store.apply(.reset(at: Date()), to: key)
        #expect(try await store.recentTurns(key, limit: 4).isEmpty)
        try await store.apply(.appendExchange(question: Turn(role: .user, content: "new", createdAt: Date()),
                                              answer: Turn(role: .assistant, content: "ans", createdAt: Date())), to: key)
        #expect(try await store.recentTurns(key, limit: 4).map(\.content) == ["new", "ans"])
        await store.close()
    }

    @Test func secondProcessIsRefusedWithAClearError() async throws {
        let path = temporaryDirectory() + "/locked.sqlite"
        let first = try await SQLStore.open(.sqliteFile(path: path), logger: Logger(label: "t"))
        let child = Process()
        child.executableURL = URL(fileURLWithPath: "/usr/bin/flock")
        child.arguments = ["-n", path + ".lock", "true"]
        try child.run()
        child.waitUntilExit()
        #expect(child.terminationStatus != 0)
        await first.close()
    }
}
