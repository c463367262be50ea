import ChatBridgeCore
@testable import ChatBridgeStore
import Foundation
import Logging
import SQLKit
import Synchronization
import Testing

/// A direct DingTalk message as the store tests put it into the inbox.
func inboxMessage(_ id: String, chat: String = "c1", user: String = "u1") -> InboundMessage {
    InboundMessage(platform: "dingtalk", botID: "bot", messageID: id, chat: .init(id: chat, kind: .direct),
                   sender: .init(id: user, name: user), body: .text("q \(id)"), sentAt: Date())
}

@Suite struct StoreTests {
    func message(_ id: String, chat: String = "c1", user: String = "u1") -> InboundMessage { inboxMessage(id, chat: chat, user: user) }

    func items(_ rows: [ClaimedRow]) -> [InboxItem] {
        rows.compactMap { if case .ready(let item) = $0 { item } else { nil } }
    }

    func accept(_ store: SQLStore, _ ids: [String], now: Date = Date()) async throws {
        for id in ids {
            let m = message(id, chat: String(id.prefix(1)))
            #expect(try await store.accept(m, conversation: ConversationKey(for: m, groupScope: .user), now: now) == .accepted)
        }
    }

    @Test(arguments: StoreKind.enabled) func claimsOneMessagePerConversationInOrderEachWithItsOwnToken(_ kind: StoreKind) async throws {
        let store = try await kind.open()
        try await accept(store, ["a1", "a2", "b1"])
        let lease = Date().addingTimeInterval(30)
        let first = items(try await store.claim(limit: 10, owner: "w", leaseUntil: lease, maxAttempts: 5, now: Date()))
        #expect(first.map(\.message.messageID) == ["a1", "b1"])
        #expect(Set(first.map(\.lease.token)).count == 2)
        #expect(try await store.claim(limit: 10, owner: "w", leaseUntil: lease, maxAttempts: 5, now: Date()).isEmpty)
        let reply = StoredReply(text: "x", kind: .answer, effect: .none)
        try await store.storeReply(reply, for: first[0].lease, error: nil, now: Date())
        try await store.finish(first[0].lease, reply: reply, conversation: first[0].conversation, now: Date())
        #expect(items(try await store.claim(limit: 10, owner: "w", leaseUntil: lease, maxAttempts: 5, now: Date())).map(\.message.messageID) == ["a2"])
        // An expired lease is taken over by another worker, with the stored reply.
        let later = Date().addingTimeInterval(60)
        #expect(try await store.releaseExpiredLeases(now: later, maxAttempts: 5, keeping: []) == ReleasedClaims(requeued: 2))
        let reclaimed = items(try await store.claim(limit: 10, owner: "w2", leaseUntil: later.addingTimeInterval(30), maxAttempts: 5, now: later))
        #expect(Set(reclaimed.map(\.message.messageID)) == ["a2", "b1"])
        #expect(reclaimed.map(\.attempts) == [2, 2])
        await store.close()
    }

    @Test(arguments: StoreKind.enabled) func claimsWhoseResultWasLostAreReturnedByTheirOwnerWithTheirAttempt(_ kind: StoreKind) async throws {
        let store = try await kind.open()
        try await accept(store, ["a1", "b1", "c1", "d1"])
        let lease = Date().addingTimeInterval(30)
        let mine = items(try await store.claim(limit: 3, owner: "me", leaseUntil: lease, maxAttempts: 5, now: Date()))
        let theirs = items(try await store.claim(limit: 3, owner: "other", leaseUntil: lease, maxAttempts: 5, now: Date()))
        #expect(mine.count == 3 && theirs.count == 1)
        try await accept(store, ["e1"])
        let kept = items(try await store.claim(limit: 3, owner: "me", leaseUntil: lease, maxAttempts: 5, now: Date()))
        #expect(kept.count == 1)
        // The first claim's call failed after it committed (as a call given up after 5 s): its batch token
        // (each lease token is BATCH-ID) is remembered. "me" works on one of its rows only.
        let batch = String(mine[0].lease.token.dropLast("-\(mine[0].lease.id)".count))
        store.noteFailedClaim(batch)
        #expect(try await store.releaseOwnClaims(owner: "me", keeping: [mine[0].lease], now: Date()) == 2)
        #expect(try await store.inboxRows().first { $0.messageID == kept[0].message.messageID }?.state == "running",
                "a row of a claim that succeeded keeps its lease, worked on or not")
        let rows = Dictionary(uniqueKeysWithValues: try await store.inboxRows().map { ($0.messageID, $0) })
        #expect(rows[mine[0].message.messageID]?.state == "running")
        #expect(rows[theirs[0].message.messageID]?.state == "running", "another owner's claim is left alone")
        for item in mine.dropFirst() {
            #expect(rows[item.message.messageID]?.state == "pending")
            #expect(rows[item.message.messageID]?.attempts == 0, "the attempt is given back")
        }
        // Their old tokens write nothing, and they are claimed again at once.
        await #expect(throws: LeaseLost.self) {
            try await store.scheduleRetry(mine[1].lease, notBefore: Date(), error: "x", lastSendFailed: false, now: Date())
        }
        #expect(items(try await store.claim(limit: 5, owner: "me", leaseUntil: lease, maxAttempts: 5, now: Date())).count == 2)
        await store.close()
    }

    @Test(arguments: StoreKind.enabled) func aCopyOfManyPagesOfEveryTableHoldsEveryRowOnce(_ kind: StoreKind) async throws {
        let source = try await StoreKind.sqlite.open()
        // More rows than one page (200) of each table, with keys whose text order differs from their numbers.
        let count = 450
        for n in 0..<count {
            let key = ConversationKey(rawValue: "dingtalk/bot/c\(n)")
            try await source.apply(.appendExchange(
                question: Turn(role: .user, content: "q\(n)", createdAt: Date()),
                answer: Turn(role: .assistant, content: "a\(n)", createdAt: Date())), to: key)
            let m = message("m\(n)", chat: "c\(n)")
            _ = try await source.accept(m, conversation: key, now: Date())
        }
        let target = try await kind.open()
        let copied = try await target.copyEverything(from: source)
        #expect(copied == SQLStore.TableCounts(conversations: count, turns: 2 * count, inbox: count))
        #expect(try await target.inboxRows() == (try await source.inboxRows()))
        for n in [0, 199, 200, 449] {
            #expect(try await target.recentTurns(ConversationKey(rawValue: "dingtalk/bot/c\(n)"), limit: 10).map(\.content) == ["q\(n)", "a\(n)"])
        }
        await target.close()
        await source.close()
    }

    @Test(arguments: StoreKind.enabled) func aWriteWithAStaleLeaseTokenChangesNothing(_ kind: StoreKind) async throws {
        let store = try await kind.open()
        try await accept(store, ["a1"])
        let now = Date()
        let old = try #require(items(try await store.claim(limit: 1, owner: "w", leaseUntil: now.addingTimeInterval(30), maxAttempts: 5, now: now)).first)
        _ = try await store.releaseExpiredLeases(now: now.addingTimeInterval(31), maxAttempts: 5, keeping: [])
        let current = try #require(items(try await store.claim(limit: 1, owner: "w", leaseUntil: now.addingTimeInterval(90), maxAttempts: 5, now: now.addingTimeInterval(31))).first)
        #expect(old.lease.id == current.lease.id && old.lease.token != current.lease.token)
        let before = try await store.inboxRows()
        let reply = StoredReply(text: "stale", kind: .answer, effect: .appendExchange(
            question: Turn(role: .user, content: "q", createdAt: now), answer: Turn(role: .assistant, content: "stale", createdAt: now)))
        let writes: [(String, () async throws -> Void)] = [
            ("storeReply", { try await store.storeReply(reply, for: old.lease, error: nil, now: now) }),
            ("beginSend", { try await store.beginSend(old.lease, uncertainSends: 1, leaseUntil: now.addingTimeInterval(300), now: now) }),
            ("recordDelivered", { try await store.recordDelivered(old.lease, parts: 3, now: now) }),
            ("finish", { try await store.finish(old.lease, reply: reply, conversation: old.conversation, now: now) }),
            ("scheduleRetry", { try await store.scheduleRetry(old.lease, notBefore: now, error: "x", lastSendFailed: true, now: now) }),
            ("markFailed", { try await store.markFailed(old.lease, error: "x", lastSendFailed: false, now: now) }),
        ]
        for (name, write) in writes {
            await #expect(throws: LeaseLost.self, "\(name)") { try await write() }
        }
        #expect(try await store.renewLeases([old.lease], until: now.addingTimeInterval(600), now: now) == 0)
        #expect(try await store.inboxRows() == before)
        #expect(try await store.recentTurns(old.conversation, limit: 10).isEmpty)
        // The current claim still works.
        try await store.beginSend(current.lease, uncertainSends: 1, leaseUntil: now.addingTimeInterval(120), now: now)
        #expect(try await store.inboxRows()[0].uncertainSends == 1)
        // Repeated (its first result lost), it still counts the send once.
        try await store.beginSend(current.lease, uncertainSends: 1, leaseUntil: now.addingTimeInterval(120), now: now)
        #expect(try await store.inboxRows()[0].uncertainSends == 1)
        await store.close()
    }

    @Test(arguments: StoreKind.enabled) func anUnreadableRowIsHandedOutAsSuchAndTheRestOfTheBatchProceeds(_ kind: StoreKind) async throws {
        let store = try await kind.open()
        try await accept(store, ["a1", "b1", "c1"])
        try await store.single { db in try await db.raw("UPDATE inbox SET payload = '{broken' WHERE message_id = 'b1'").run() }
        let claimed = try await store.claim(limit: 10, owner: "w", leaseUntil: Date().addingTimeInterval(30), maxAttempts: 5, now: Date())
        #expect(claimed.count == 3)
        #expect(items(claimed).map(\.message.messageID) == ["a1", "c1"])
        guard case .unreadable(let lease, let reason) = claimed[1] else {
            Issue.record("expected the broken row to be unreadable")
            return
        }
        #expect(reason.contains("does not decode"))
        try await store.markFailed(lease, error: "unreadable: \(reason)", lastSendFailed: false, now: Date())
        #expect(try await store.inboxRows().map(\.state) == ["running", "failed", "running"])
        await store.close()
    }

    @Test(arguments: StoreKind.enabled) func rowsPastTheAttemptLimitAreNeverClaimedAndGiveUpWhenReleased(_ kind: StoreKind) async throws {
        let store = try await kind.open()
        try await accept(store, ["a1", "b1"])
        var now = Date()
        for _ in 0..<2 {
            #expect(items(try await store.claim(limit: 10, owner: "dead", leaseUntil: now.addingTimeInterval(30), maxAttempts: 2, now: now)).count == 2)
            now = now.addingTimeInterval(31)
            _ = try await store.releaseExpiredLeases(now: now, maxAttempts: 5, keeping: [])
        }
        // Both have used two attempts: with a limit of two, neither is claimed again.
        #expect(try await store.claim(limit: 10, owner: "w", leaseUntil: now.addingTimeInterval(30), maxAttempts: 2, now: now).isEmpty)
        // Start-up gives up on them (and on interrupted last attempts) instead of leaving them to block their conversations.
        #expect(try await store.reclaimRunning(now: now, maxAttempts: 2) == ReleasedClaims(gaveUp: 2))
        let rows = try await store.inboxRows()
        #expect(rows.map(\.state) == ["failed", "failed"])
        #expect(rows[0].lastError?.contains("last allowed attempt") == true)
        // A lease that expires on the last attempt gives up too.
        try await accept(store, ["c1"])
        _ = try await store.claim(limit: 10, owner: "dead", leaseUntil: now.addingTimeInterval(30), maxAttempts: 1, now: now)
        #expect(try await store.releaseExpiredLeases(now: now.addingTimeInterval(31), maxAttempts: 1, keeping: []) == ReleasedClaims(gaveUp: 1))
        await store.close()
    }

    @Test(arguments: StoreKind.enabled) func aGiveUpReturnsTheMessagesWhoseLiveReplyMayBeShowing(_ kind: StoreKind) async throws {
        let store = try await kind.open()
        try await accept(store, ["shown", "opening", "plain"])
        let now = Date()
        let claimed = items(try await store.claim(limit: 10, owner: "dead", leaseUntil: now.addingTimeInterval(30), maxAttempts: 1, now: now))
        #expect(claimed.count == 3)
        let byID = Dictionary(uniqueKeysWithValues: claimed.map { ($0.message.messageID, $0) })
        try await store.recordLive(byID["shown"]!.lease, state: .opening, reference: "card-1", now: now)
        // Recording the next step without a reference keeps the recorded one.
        try await store.recordLive(byID["shown"]!.lease, state: .opened, reference: nil, now: now)
        try await store.storeReply(StoredReply(text: "the answer", kind: .answer, effect: .none), for: byID["shown"]!.lease, error: nil, now: now)
        try await store.recordLive(byID["opening"]!.lease, state: .opening, reference: nil, now: now)
        // The process dies on the last allowed attempt; the next start gives up all three and names the two
        // whose card may be showing, so they can be marked failed instead of "thinking" forever. (After the
        // lease: on a shared database a start-up leaves claims that may be another replica's alone until then.)
        let released = try await store.reclaimRunning(now: now.addingTimeInterval(31), maxAttempts: 1)
        #expect(released.gaveUp == 3)
        #expect(Set(released.gaveUpLive.map(\.message.messageID)) == ["shown", "opening"])
        // With the reply stored for it, so a card that may show the answer is completed with it.
        #expect(
            released.gaveUpLive.first { $0.message.messageID == "shown" }
                == LiveReplyAddress(message: byID["shown"]!.message, reference: "card-1", reply: StoredReply(text: "the answer", kind: .answer, effect: .none)))
        #expect(released.gaveUpLive.first { $0.message.messageID == "opening" }?.reply == nil)
        // The same through the lease reaper.
        try await accept(store, ["late"])
        let later = Date()
        let late = try #require(items(try await store.claim(limit: 1, owner: "dead", leaseUntil: later.addingTimeInterval(30), maxAttempts: 1, now: later)).first)
        try await store.recordLive(late.lease, state: .opened, reference: nil, now: later)
        let reaped = try await store.releaseExpiredLeases(now: later.addingTimeInterval(31), maxAttempts: 1, keeping: [])
        #expect(reaped.gaveUpLive.map(\.message.messageID) == ["late"])
        await store.close()
    }

    @Test(arguments: StoreKind.enabled) func recordingADeclinedLiveReplyGivesTheMessageRouteItsOwnAttempts(_ kind: StoreKind) async throws {
        let store = try await kind.open()
        try await accept(store, ["m1"])
        var now = Date()
        for _ in 0..<2 {
            _ = try await store.claim(limit: 1, owner: "w", leaseUntil: now.addingTimeInterval(30), maxAttempts: 3, now: now)
            now = now.addingTimeInterval(31)
            _ = try await store.releaseExpiredLeases(now: now, maxAttempts: 3, keeping: [])
        }
        let third = try #require(items(try await store.claim(limit: 1, owner: "w", leaseUntil: now.addingTimeInterval(30), maxAttempts: 3, now: now)).first)
        #expect(third.attempts == 3)
        try await store.recordLive(third.lease, state: .opened, reference: nil, now: now)
        #expect(try await store.inboxRows().first?.attempts == 3)
        try await store.recordLive(third.lease, state: .declined, reference: nil, now: now)
        #expect(try await store.inboxRows().first?.attempts == 1)
        await store.close()
    }

    @Test(arguments: StoreKind.enabled) func theExchangeIsStoredWhenTheReplyIsFinishedNotBefore(_ kind: StoreKind) async throws {
        let store = try await kind.open()
        try await accept(store, ["a1"])
        let now = Date()
        let item = try #require(items(try await store.claim(limit: 1, owner: "w", leaseUntil: now.addingTimeInterval(30), maxAttempts: 5, now: now)).first)
        let reply = StoredReply(text: "ans", kind: .answer, effect: .appendExchange(
            question: Turn(role: .user, content: "q", createdAt: now), answer: Turn(role: .assistant, content: "ans", createdAt: now)))
        try await store.storeReply(reply, for: item.lease, error: nil, now: now)
        #expect(try await store.recentTurns(item.conversation, limit: 10).isEmpty)
        try await store.finish(item.lease, reply: reply, conversation: item.conversation, now: now)
        #expect(try await store.recentTurns(item.conversation, limit: 10).map(\.content) == ["q", "ans"])
        await store.close()
    }

    @Test(arguments: StoreKind.enabled) func aProcessNeverReleasesTheClaimsItIsStillWorkingOn(_ kind: StoreKind) async throws {
        let store = try await kind.open()
        try await accept(store, ["a1", "b1"])
        let now = Date()
        let claimed = items(try await store.claim(limit: 10, owner: "w", leaseUntil: now.addingTimeInterval(30), maxAttempts: 1, now: now))
        let later = now.addingTimeInterval(60)
        // Both leases lapsed (renewal was missed), but a1's attempt is alive in this process.
        let released = try await store.releaseExpiredLeases(now: later, maxAttempts: 1, keeping: [claimed[0].lease])
        #expect(released == ReleasedClaims(gaveUp: 1))
        #expect(try await store.inboxRows().map(\.state) == ["running", "failed"])
        try await store.beginSend(claimed[0].lease, uncertainSends: 1, leaseUntil: later.addingTimeInterval(30), now: later)
        await store.close()
    }

    @Test func renewalGoesAheadOfQueuedBackgroundWork() async throws {
        let store = try await StoreKind.sqlite.open()
        let queue = try #require(store.commitQueue)
        let order = OrderLog()
        let holding = OneTimeEvent()
        let release = OneTimeEvent()
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                try await store.single { _ in
                    holding.signal()
                    await release.wait()
                }
            }
            await holding.wait()
            // A burst of background work queues up first, then a renewal arrives.
            for index in 0..<20 {
                group.addTask { try await store.single { _ in order.append("background \(index) in batch \(queue.statistics.batches)") } }
            }
            #expect(await eventually { queue.waiting == 20 })
            group.addTask { try await store.single(priority: .urgent) { _ in order.append("renewal in batch \(queue.statistics.batches)") } }
            #expect(await eventually { queue.waiting == 21 })
            release.signal()
            try await group.waitForAll()
        }
        // The renewal runs first and commits alone: it never waits for the background work queued before it.
        let batches = order.entries.map { Int($0.split(separator: " ").last!)! }
        #expect(order.entries.first?.hasPrefix("renewal") == true)
        #expect(batches.dropFirst().allSatisfy { $0 > batches[0] })
        await store.close()
    }

    @Test(arguments: StoreKind.enabled) func duplicatesAreRecognisedUnderConcurrency(_ kind: StoreKind) async throws {
        let store = try await kind.open()
        let m = message("same")
        let outcomes = try await withThrowingTaskGroup(of: AcceptOutcome.self) { group in
            for _ in 0..<50 { group.addTask { try await store.accept(m, conversation: ConversationKey(rawValue: "k"), now: Date()) } }
            return try await group.reduce(into: [AcceptOutcome]()) { $0.append($1) }
        }
        #expect(outcomes.filter { $0 == .accepted }.count == 1)
        #expect(try await store.counts().pending == 1)
        await store.close()
    }

    @Test(arguments: StoreKind.enabled) func turnsResetAndRecentWindow(_ kind: StoreKind) async throws {
        let store = try await kind.open()
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

    @Test func aSecondOpenOfTheSameDatabaseIsRefusedWithAClearError() async throws {
        let path = temporaryDirectory() + "/locked.sqlite"
        let first = try await SQLStore.open(.sqliteFile(path: path), logger: Logger(label: "t"))
        await #expect {
            _ = try await SQLStore.open(.sqliteFile(path: path), logger: Logger(label: "t"))
        } throws: { error in
            "\(error)".contains("another chatbridge process is already using this database") && "\(error)".contains(path + ".lock")
        }
        await first.close()
    }

    @Test(arguments: StoreKind.enabled) func statementsAreNeverLoggedWithTheirValues(_ kind: StoreKind) async throws {
        let lines = LogCapture()
        var logger = Logger(label: "t") { _ in lines }
        logger.logLevel = .trace
        let store = try await kind.open(logger: logger)
        var m = message("secret-1")
        m.body = .text("a very private question")
        m.reply = .init(webhookURL: "https://oapi.dingtalk.com/robot/sendBySession?session=TOKEN-abc123", webhookExpiresAt: Date())
        _ = try await store.accept(m, conversation: ConversationKey(rawValue: "k"), now: Date())
        let item = try #require(items(try await store.claim(limit: 1, owner: "w", leaseUntil: Date().addingTimeInterval(30), maxAttempts: 5, now: Date())).first)
        try await store.storeReply(StoredReply(text: "a very private answer", kind: .answer, effect: .none), for: item.lease, error: nil, now: Date())
        await store.close()
        let text = lines.all.joined(separator: "\n")
        #expect(!text.contains("private"))
        #expect(!text.contains("TOKEN-abc123"))
    }
}

final class OrderLog: Sendable {
    private let state = Mutex<[String]>([])
    func append(_ entry: String) { state.withLock { $0.append(entry) } }
    var entries: [String] { state.withLock { $0 } }
}

/// Collects every log line (message and metadata) at every level. A value type like the real handlers,
/// so a logger copy that changes its level does not change the others'; the lines are shared.
struct LogCapture: LogHandler, Sendable {
    private final class Lines: Sendable {
        let lines = Mutex<[String]>([])
    }
    private let storage = Lines()
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) {
        storage.lines.withLock { $0.append("\(event.message) \(event.metadata ?? [:]) \(metadata)") }
    }
    var all: [String] { storage.lines.withLock { $0 } }
}
