import ChatBridgeCore
import ChatBridgeSimulators
@testable import ChatBridgeStore
import Foundation
import Logging
import SQLKit
import Synchronization
import Testing

/// What only a database shared by several processes can show: several store instances (replicas) on one
/// PostgreSQL database. Skipped, with one line saying how to enable it, when no PostgreSQL is at hand.
@Suite(.enabled(if: TestPostgres.isAvailable, TestPostgres.skipNote))
struct PostgresStoreTests {
    func message(_ id: String, chat: String) -> InboundMessage { inboxMessage(id, chat: chat, user: chat) }

    func key(_ m: InboundMessage) -> ConversationKey { ConversationKey(for: m, groupScope: .user) }

    /// `count` stores on one new database, on the database's clock as in production.
    func replicas(_ count: Int, url: String? = nil, timeSource: SQLStore.TimeSource = .database) async throws -> (url: String, stores: [SQLStore]) {
        let url = if let url { url } else { try await TestPostgres.freshDatabase() }
        var stores: [SQLStore] = []
        for _ in 0..<count {
            stores.append(try await SQLStore.open(try DatabaseLocation.parse(url), options: .init(poolSize: 4, timeSource: timeSource), logger: Logger(label: "t")))
        }
        return (url, stores)
    }

    /// A new database whose transactions default to `defaultIsolation` (the server's default when nil).
    func freshDatabase(defaultIsolation: String?) async throws -> String {
        let url = try await TestPostgres.freshDatabase()
        guard let defaultIsolation else { return url }
        let setup = try await SQLStore.open(try DatabaseLocation.parse(url), logger: Logger(label: "t"))
        try await setup.single { db in
            try await db.raw("DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET default_transaction_isolation = %L', current_database(), \(unsafeRaw: "'" + defaultIsolation + "'")); END $$").run()
        }
        await setup.close()
        return url
    }

    /// A claim's snapshot must start after the claim lock: its transaction is READ COMMITTED, begun as such,
    /// even on a database whose default is stricter.
    @Test func aClaimIsReadCommittedWhateverTheDatabaseDefault() async throws {
        let url = try await freshDatabase(defaultIsolation: "serializable")
        let (_, stores) = try await replicas(1, url: url)
        let store = stores[0]
        let show = { @Sendable (db: any SQLDatabase) async throws -> String in
            try await db.raw("SHOW transaction_isolation").first()?.decode(column: "transaction_isolation", as: String.self) ?? ""
        }
        #expect(try await store.transaction(show) == "serializable", "the database default took effect")
        #expect(try await store.transaction(readCommitted: true, show) == "read committed")
        _ = try await store.accept(message("m1", chat: "c1"), conversation: key(message("m1", chat: "c1")), now: Date())
        let claimed = try await store.claim(limit: 5, owner: "w", leaseUntil: Date().addingTimeInterval(30), maxAttempts: 5, now: Date())
        #expect(claimed.count == 1)
        for store in stores { await store.close() }
    }

    /// Also on a database whose default isolation is REPEATABLE READ: the claim begins its own transaction as
    /// READ COMMITTED, so its snapshot starts after the claim lock (else concurrent claims fail to serialise).
    @Test(arguments: [nil, "repeatable read"])
    func concurrentClaimersNeverHoldTwoMessagesOfOneConversationAndAnswerInOrder(defaultIsolation: String?) async throws {
        let url = try await freshDatabase(defaultIsolation: defaultIsolation)
        let (_, stores) = try await replicas(4, url: url)
        let conversations = 12
        let perConversation = 15
        let total = conversations * perConversation
        let tracker = ConversationTracker()
        let deadline = Date().addingTimeInterval(60)
        try await withThrowingTaskGroup(of: Void.self) { group in
            // Each conversation's questions arrive one after the other, through different replicas, while
            // the replicas are already claiming: a question can commit after a younger one was claimed.
            for c in 0..<conversations {
                group.addTask {
                    for n in 0..<perConversation {
                        let m = message("c\(c)-\(n)", chat: "chat\(c)")
                        _ = try await stores[(c + n) % stores.count].accept(m, conversation: key(m), now: Date())
                    }
                }
            }
            // Four replicas claim and answer concurrently until everything is answered.
            for (index, store) in stores.enumerated() {
                group.addTask {
                    while tracker.answered.count < total, Date() < deadline {
                        let now = Date()
                        let claimed = try await store.claim(limit: 5, owner: "r\(index)", leaseUntil: now.addingTimeInterval(30), maxAttempts: 5, now: now)
                        if claimed.isEmpty {
                            await Task.yield()
                            continue
                        }
                        try await withThrowingTaskGroup(of: Void.self) { answers in
                            for case .ready(let item) in claimed {
                                answers.addTask {
                                    tracker.begin(item)
                                    // While answering, the database itself must show one running message per conversation.
                                    tracker.record(try await store.conversationsRunningTwice())
                                    tracker.end(item)
                                    let reply = StoredReply(text: "a", kind: .answer, effect: .none)
                                    try await store.finish(item.lease, reply: reply, conversation: item.conversation, now: Date())
                                }
                            }
                            try await answers.waitForAll()
                        }
                    }
                }
            }
            try await group.waitForAll()
        }
        #expect(tracker.violations == [])
        #expect(tracker.answered.count == total)
        for c in 0..<conversations {
            #expect(tracker.order(of: "chat\(c)") == (0..<perConversation).map { "c\(c)-\($0)" })
        }
        #expect(try await stores[0].inboxRows().allSatisfy { $0.state == "answered" })
        for store in stores { await store.close() }
    }

    @Test func aMessageCommittedAfterAYoungerOneOfItsConversationWasClaimedWaitsForIt() async throws {
        let (_, stores) = try await replicas(2)
        let older = message("older", chat: "c")
        let younger = message("younger", chat: "c")
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .millisecondsSince1970
        let payload = String(decoding: try encoder.encode(older), as: UTF8.self)
        let conversation = key(older).rawValue
        let inserted = OneTimeEvent()
        let commit = OneTimeEvent()
        // One replica stores the older message but has not committed yet (it takes the smaller id)...
        let slow = Task {
            try await stores[0].transaction { db in
                try await db.raw("""
                    INSERT INTO inbox (platform, bot_id, message_id, conversation_key, payload, state, attempts, not_before, received_at, updated_at)
                    VALUES ('dingtalk', 'bot', 'older', \(bind: conversation), \(bind: payload), 'pending', 0, 0, 0, 0)
                    """).run()
                inserted.signal()
                await commit.wait()
            }
        }
        await inserted.wait()
        // ...while another stores the younger one, and it is claimed.
        _ = try await stores[1].accept(younger, conversation: key(younger), now: Date())
        let claimed = try await stores[1].claim(limit: 5, owner: "b", leaseUntil: Date().addingTimeInterval(30), maxAttempts: 5, now: Date())
        #expect(claimed.map { if case .ready(let item) = $0 { item.message.messageID } else { "" } } == ["younger"])
        commit.signal()
        try await slow.value
        // The older one is now visible, but its conversation has a message running: it waits.
        #expect(try await stores[0].claim(limit: 5, owner: "a", leaseUntil: Date().addingTimeInterval(30), maxAttempts: 5, now: Date()).isEmpty)
        #expect(try await stores[0].conversationsRunningTwice().isEmpty)
        guard case .ready(let item) = try #require(claimed.first) else { return }
        try await stores[1].finish(item.lease, reply: StoredReply(text: "a", kind: .answer, effect: .none), conversation: item.conversation, now: Date())
        let next = try await stores[0].claim(limit: 5, owner: "a", leaseUntil: Date().addingTimeInterval(30), maxAttempts: 5, now: Date())
        #expect(next.map { if case .ready(let item) = $0 { item.message.messageID } else { "" } } == ["older"])
        for store in stores { await store.close() }
    }

    @Test func concurrentAcceptsOfOneMessageOnSeveralReplicasStoreItOnce() async throws {
        let (_, stores) = try await replicas(4)
        let outcomes = try await withThrowingTaskGroup(of: (String, AcceptOutcome).self) { group in
            for n in 0..<25 {
                for store in stores {
                    group.addTask {
                        let m = message("m\(n)", chat: "chat\(n % 3)")
                        return ("m\(n)", try await store.accept(m, conversation: key(m), now: Date()))
                    }
                }
            }
            return try await group.reduce(into: [(String, AcceptOutcome)]()) { $0.append($1) }
        }
        for n in 0..<25 {
            #expect(outcomes.filter { $0.0 == "m\(n)" && $0.1 == .accepted }.count == 1)
        }
        #expect(try await stores[0].inboxRows().count == 25)
        for store in stores { await store.close() }
    }

    @Test func anExpiredLeaseIsTakenOverByAnotherReplica() async throws {
        let (_, stores) = try await replicas(2)
        let (a, b) = (stores[0], stores[1])
        let m = message("m1", chat: "c")
        _ = try await a.accept(m, conversation: key(m), now: Date())
        let first = try #require(try await a.claim(limit: 1, owner: "a", leaseUntil: Date().addingTimeInterval(0.3), maxAttempts: 5, now: Date()).first)
        // Replica a "dies": b takes the message over once the lease has expired on the database's clock.
        var taken: [ClaimedRow] = []
        #expect(try await eventually(seconds: 10) {
            _ = try await b.releaseExpiredLeases(now: Date(), maxAttempts: 5, keeping: [])
            taken = try await b.claim(limit: 1, owner: "b", leaseUntil: Date().addingTimeInterval(30), maxAttempts: 5, now: Date())
            return !taken.isEmpty
        })
        guard case .ready(let second) = try #require(taken.first) else { Issue.record("unreadable"); return }
        #expect(second.attempts == 2 && second.lease.token != first.lease.token)
        // The first owner's writes now change nothing.
        await #expect(throws: LeaseLost.self) {
            try await a.finish(first.lease, reply: StoredReply(text: "x", kind: .answer, effect: .none), conversation: key(m), now: Date())
        }
        try await b.finish(second.lease, reply: StoredReply(text: "x", kind: .answer, effect: .none), conversation: key(m), now: Date())
        #expect(try await a.inboxRows().map(\.state) == ["answered"])
        for store in stores { await store.close() }
    }

    /// One user's questions arriving at once on several replicas of a database whose default isolation is
    /// REPEATABLE READ: the limit check begins READ COMMITTED, so each count sees the admissions committed
    /// before its lock was granted (with the default, each snapshot predates the lock and all are admitted).
    @Test func concurrentQuestionsOfOneUserOnSeveralReplicasNeverPassTheLimit() async throws {
        let url = try await freshDatabase(defaultIsolation: "repeatable read")
        let (_, stores) = try await replicas(4, url: url)
        let now = Date()
        let limits = RequestLimits(perMinute: 5)
        let admitted = try await withThrowingTaskGroup(of: Bool.self) { group in
            for n in 0..<24 {
                group.addTask {
                    let record = RequestRecord(messageKey: "q\(n)", user: "u1", chat: "c1", day: "2026-11-22", at: now)
                    return try await stores[n % stores.count].admit(record, limits: limits, minuteAgo: now.addingTimeInterval(-60)) == .admitted
                }
            }
            return try await group.reduce(0) { $0 + ($1 ? 1 : 0) }
        }
        #expect(admitted == 5)
        for store in stores { await store.close() }
    }

    @Test func replicasWithSkewedClocksStillAgreeOnLeasesAndRetries() async throws {
        let (url, stores) = try await replicas(2)
        let (a, ahead) = (stores[0], stores[1])
        let hour: TimeInterval = 3600
        let m = message("m1", chat: "c")
        _ = try await a.accept(m, conversation: key(m), now: Date())
        let claim = try #require(try await a.claim(limit: 1, owner: "a", leaseUntil: Date().addingTimeInterval(30), maxAttempts: 5, now: Date()).first)
        // A replica whose clock runs an hour ahead neither releases nor takes over the live claim.
        #expect(try await ahead.releaseExpiredLeases(now: Date().addingTimeInterval(hour), maxAttempts: 5, keeping: []) == ReleasedClaims())
        #expect(try await ahead.reclaimRunning(now: Date().addingTimeInterval(hour), maxAttempts: 5) == ReleasedClaims())
        #expect(try await ahead.claim(limit: 5, owner: "ahead", leaseUntil: Date().addingTimeInterval(hour + 30), maxAttempts: 5, now: Date().addingTimeInterval(hour)).isEmpty)
        // A retry scheduled by a replica an hour behind is not due an hour early for the others.
        try await a.scheduleRetry(claim.lease, notBefore: Date().addingTimeInterval(-hour + 60), error: "x", lastSendFailed: false, now: Date().addingTimeInterval(-hour))
        #expect(try await ahead.claim(limit: 5, owner: "ahead", leaseUntil: Date().addingTimeInterval(hour + 30), maxAttempts: 5, now: Date().addingTimeInterval(hour)).isEmpty)
        let wake = try #require(try await ahead.nextWakeup(now: Date().addingTimeInterval(hour)))
        #expect(abs(wake.timeIntervalSince(Date().addingTimeInterval(hour + 60))) < 5)
        // Against that, a store that trusted its own clock would release the claim: the skew is real.
        let (_, trusting) = try await replicas(1, url: url, timeSource: .caller)
        #expect(try await trusting[0].claim(limit: 5, owner: "t", leaseUntil: Date().addingTimeInterval(hour + 30), maxAttempts: 5, now: Date().addingTimeInterval(hour)).count == 1)
        for store in stores + trusting { await store.close() }
    }

    @Test func replicasStartingTogetherMigrateOnce() async throws {
        let url = try await TestPostgres.freshDatabase()
        let stores = try await withThrowingTaskGroup(of: SQLStore.self) { group in
            for _ in 0..<6 {
                group.addTask { try await SQLStore.open(try DatabaseLocation.parse(url), options: .init(poolSize: 2), logger: Logger(label: "t")) }
            }
            return try await group.reduce(into: [SQLStore]()) { $0.append($1) }
        }
        #expect(stores.count == 6)
        let versions = try await stores[0].single { db in
            try await db.raw("SELECT version FROM schema_migrations ORDER BY version").all().map { try $0.decode(column: "version", as: Int.self) }
        }
        #expect(versions == Array(1...SQLStore.latestVersion))
        for store in stores { await store.close() }
    }

    @Test func aDatabaseNewerThanThisBuildIsRefused() async throws {
        let (url, stores) = try await replicas(1)
        try await stores[0].single { db in try await db.raw("INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)").run() }
        await stores[0].close()
        await #expect {
            _ = try await SQLStore.open(try DatabaseLocation.parse(url), logger: Logger(label: "t"))
        } throws: { "\($0)".contains("newer than this build knows") }
    }

    @Test func aMessageAcceptedByOneReplicaWakesTheOthers() async throws {
        let (_, stores) = try await replicas(2)
        let wakes = Atomic<Int>(0)
        stores[1].listenForAcceptedMessages { wakes.add(1, ordering: .relaxed) }
        // Once listening, it wakes once by itself (it may have missed an announcement while connecting).
        #expect(await eventually { wakes.load(ordering: .relaxed) >= 1 })
        let before = wakes.load(ordering: .relaxed)
        let m = message("m1", chat: "c")
        _ = try await stores[0].accept(m, conversation: key(m), now: Date())
        #expect(await eventually(seconds: 5) { wakes.load(ordering: .relaxed) > before })
        // A duplicate announces nothing.
        let after = wakes.load(ordering: .relaxed)
        #expect(try await stores[0].accept(m, conversation: key(m), now: Date()) == .duplicate)
        let other = message("m2", chat: "c")
        _ = try await stores[0].accept(other, conversation: key(other), now: Date())
        #expect(await eventually(seconds: 5) { wakes.load(ordering: .relaxed) > after })
        #expect(wakes.load(ordering: .relaxed) == after + 1)
        for store in stores { await store.close() }
    }

    @Test func anAcknowledgementDoesNotQueueBehindAnsweringWorkThatHoldsEveryPooledConnection() async throws {
        let url = try await TestPostgres.freshDatabase()
        let store = try await SQLStore.open(try DatabaseLocation.parse(url), options: .init(poolSize: 1), logger: Logger(label: "t"))
        let claimed = message("m0", chat: "a")
        _ = try await store.accept(claimed, conversation: key(claimed), now: Date())
        let rows = try await store.claim(limit: 1, owner: "w", leaseUntil: Date().addingTimeInterval(30), maxAttempts: 5, now: Date())
        guard case .ready(let item) = try #require(rows.first) else { throw SimulatorError(description: "not claimed") }
        // Answering work holds both connections of the main pool (pool_size 1, +1 kept for the listener): two
        // statements wait for a lock that another session holds until the test lets it go.
        let holder = try await SQLStore.open(try DatabaseLocation.parse(url), logger: Logger(label: "t"))
        let held = OneTimeEvent()
        let letGo = OneTimeEvent()
        let holding = Task {
            try await holder.transaction(timeout: .seconds(120)) { db in
                try await db.raw("SELECT pg_advisory_xact_lock(4242)").run()
                held.signal()
                await letGo.wait()
            }
        }
        await held.wait()
        let busy = Task {
            await withTaskGroup(of: Void.self) { group in
                for _ in 0..<2 {
                    group.addTask { _ = try? await store.single { db in try await db.raw("SELECT pg_advisory_xact_lock(4242)").run() } }
                }
            }
        }
        @Sendable func waiting() async throws -> Int? {
            try await store.single(priority: .urgent) { db in
                try await db.raw("""
                    SELECT COUNT(*) AS n FROM pg_stat_activity
                    WHERE wait_event_type = 'Lock' AND query LIKE 'SELECT pg_advisory_xact_lock%'
                    """).first()?.decode(column: "n", as: Int.self)
            }
        }
        #expect(try await eventually { try await waiting() == 2 })
        // An acknowledgement's write and a lease renewal go through connections of their own: queued behind the
        // answering work they would wait for the lock, and give up after 5 s.
        let m = message("m1", chat: "c")
        #expect(try await store.accept(m, conversation: key(m), now: Date()) == .accepted)
        #expect(try await store.renewLeases([item.lease], until: Date().addingTimeInterval(60), now: Date()) == 1)
        letGo.signal()
        try await holding.value
        await busy.value
        await holder.close()
        await store.close()
    }

    @Test func theDatabaseGoingAwayFailsCallsClearlyAndTheyResumeWhenItIsBack() async throws {
        let cluster = try PostgresCluster.start()
        defer { cluster.destroy() }
        let store = try await SQLStore.open(try DatabaseLocation.parse(cluster.url()), logger: Logger(label: "t"))
        let first = message("m1", chat: "c")
        #expect(try await store.accept(first, conversation: key(first), now: Date()) == .accepted)
        try cluster.stop()
        let second = message("m2", chat: "c")
        await #expect {
            _ = try await store.accept(second, conversation: key(second), now: Date())
        } throws: { "\($0)".contains("PostgreSQL") }
        try cluster.startServer()
        // No restart of the store: the pool connects again.
        #expect(await eventually(seconds: 20) { (try? await store.accept(second, conversation: key(second), now: Date())) != nil })
        #expect(try await store.inboxRows().map(\.messageID) == ["m1", "m2"])
        await store.close()
    }

    @Test func aWholeSQLiteDatabaseIsCopiedIntoAnEmptyPostgreSQLDatabase() async throws {
        let sqlite = try await SQLStore.open(.sqliteFile(path: temporaryDirectory() + "/old.sqlite"), logger: Logger(label: "t"))
        var conversations: [ConversationKey] = []
        for n in 0..<3 {
            let m = message("m\(n)", chat: "chat\(n)")
            _ = try await sqlite.accept(m, conversation: key(m), now: Date())
            conversations.append(key(m))
        }
        for row in try await sqlite.claim(limit: 2, owner: "w", leaseUntil: Date().addingTimeInterval(30), maxAttempts: 5, now: Date()) {
            guard case .ready(let item) = row else { continue }
            let reply = StoredReply(text: "answer \(item.message.messageID)", kind: .answer, effect: .appendExchange(
                question: Turn(role: .user, content: "q", createdAt: Date()), answer: Turn(role: .assistant, content: "a", createdAt: Date())))
            try await sqlite.storeReply(reply, for: item.lease, error: nil, now: Date())
            try await sqlite.finish(item.lease, reply: reply, conversation: item.conversation, now: Date())
        }
        let (_, stores) = try await replicas(1)
        let postgres = stores[0]
        let copied = try await postgres.copyEverything(from: sqlite)
        #expect(copied == SQLStore.TableCounts(conversations: 2, turns: 4, inbox: 3))
        #expect(try await postgres.inboxRows() == (try await sqlite.inboxRows()))
        #expect(try await postgres.recentTurns(conversations[0], limit: 10).map(\.content) == ["q", "a"])
        // New messages continue after the copied ones, and the waiting one is answered there.
        let next = message("m9", chat: "chat9")
        #expect(try await postgres.accept(next, conversation: key(next), now: Date()) == .accepted)
        #expect(try await postgres.inboxRows().last?.id == 4)
        #expect(try await postgres.claim(limit: 5, owner: "w", leaseUntil: Date().addingTimeInterval(30), maxAttempts: 5, now: Date()).count == 2)
        // A second copy into the now non-empty database is refused and changes nothing.
        await #expect { _ = try await postgres.copyEverything(from: sqlite) } throws: { "\($0)".contains("is not empty") }
        #expect(try await postgres.tableCounts().inbox == 4)
        await postgres.close()
        await sqlite.close()
    }
}

extension SQLStore {
    /// Conversations with more than one running message (there must never be any).
    func conversationsRunningTwice() async throws -> [String] {
        try await single { db in
            try await db.raw("""
                SELECT conversation_key FROM inbox WHERE state = 'running' GROUP BY conversation_key HAVING COUNT(*) > 1
                """).all().map { try $0.decode(column: "conversation_key", as: String.self) }
        }
    }
}

/// Records which conversations have a message being answered, and the order answers happened in.
final class ConversationTracker: Sendable {
    private struct State {
        var running: Set<String> = []
        var violations: [String] = []
        var answered: [(chat: String, id: String)] = []
    }
    private let state = Mutex(State())

    func begin(_ item: InboxItem) {
        state.withLock { state in
            if !state.running.insert(item.conversation.rawValue).inserted {
                state.violations.append("\(item.conversation.rawValue) had two messages running (\(item.message.messageID))")
            }
            state.answered.append((item.message.chat.id, item.message.messageID))
        }
    }

    func record(_ conversations: [String]) {
        guard !conversations.isEmpty else { return }
        state.withLock { $0.violations += conversations.map { "\($0) had two messages running in the database" } }
    }

    func end(_ item: InboxItem) {
        _ = state.withLock { $0.running.remove(item.conversation.rawValue) }
    }

    var violations: [String] { state.withLock { $0.violations } }
    var answered: [String] { state.withLock { $0.answered.map(\.id) } }
    func order(of chat: String) -> [String] { state.withLock { $0.answered.filter { $0.chat == chat }.map(\.id) } }
}
