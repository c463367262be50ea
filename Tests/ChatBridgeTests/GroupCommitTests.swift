import ChatBridgeCore
@testable import ChatBridgeStore
import Foundation
import Logging
import SQLKit
import Synchronization
import Testing

/// The SQLite store commits the work that queued up behind a running batch together (group commit).
private let conversation = ConversationKey(rawValue: "dingtalk/bot/c1/u1")

@Suite struct GroupCommitTests {
    func openFile(_ path: String) async throws -> SQLStore {
        try await SQLStore.open(.sqliteFile(path: path), logger: .init(label: "t"))
    }

    /// Holds the connection with a call of its own until `release`, so other calls queue up behind it.
    func hold(_ store: SQLStore, until release: OneTimeEvent, group: inout ThrowingTaskGroup<Void, any Error>) async {
        let holding = OneTimeEvent()
        group.addTask {
            try await store.single { _ in
                holding.signal()
                await release.wait()
            }
        }
        await holding.wait()
    }

    func messageIDs(_ store: SQLStore) async throws -> [String] {
        try await store.inboxRows().map(\.messageID)
    }

    @Test func aLoneCallRunsAtOnceInACommitOfItsOwn() async throws {
        let store = try await openFile(temporaryDirectory() + "/db.sqlite")
        let queue = try #require(store.commitQueue)
        let before = queue.statistics
        #expect(try await store.accept(inboxMessage("m1"), conversation: conversation, now: Date()) == .accepted)
        let after = queue.statistics
        // Nothing waited for company: one batch holding just this call, and no batch ever held more.
        #expect(after.batches == before.batches + 1)
        #expect(after.operations == before.operations + 1)
        #expect(after.largestBatch == 1)
        // An acknowledgement: its wait and its commit are counted for the closing diagnostics line.
        #expect(after.urgentWait.count == before.urgentWait.count + 1)
        #expect(after.commit.count == before.commit.count + 1)
        await store.close()
    }

    @Test func durationPercentilesAreBucketBoundsInMicroseconds() {
        var histogram = DurationHistogram()
        #expect(histogram.percentile(0.99) == 0)
        for _ in 0..<99 { histogram.record(.microseconds(10)) }
        histogram.record(.milliseconds(5))
        #expect(histogram.percentile(0.5) == 16)
        #expect(histogram.percentile(0.99) == 16)
        #expect(histogram.percentile(1) == 8192)
        #expect(histogram.longestMicroseconds == 5000)
        histogram.record(.seconds(3600))
        #expect(histogram.percentile(1) == 1 << 27)
    }

    /// Queues `calls` in this order behind a call that holds the connection, then lets them go: calls of one
    /// priority queued so run as one batch.
    /// `whileRunning` runs once they were let go, beside them.
    func runQueuedTogether(_ store: SQLStore, _ calls: [@Sendable () async throws -> Void],
                           whileRunning: @Sendable () async throws -> Void = {}) async throws {
        let queue = try #require(store.commitQueue)
        let release = OneTimeEvent()
        try await withThrowingTaskGroup(of: Void.self) { group in
            await hold(store, until: release, group: &group)
            for (index, call) in calls.enumerated() {
                group.addTask { try await call() }
                #expect(await eventually { queue.waiting == index + 1 })
            }
            release.signal()
            try await whileRunning()
            try await group.waitForAll()
        }
    }

    @Test func callsQueuedBehindABatchShareOneCommit() async throws {
        let path = temporaryDirectory() + "/db.sqlite"
        let store = try await openFile(path)
        let outcomes = OrderLog()
        try await runQueuedTogether(store, (0..<30).map { index in
            { outcomes.append("\(try await store.accept(inboxMessage("m\(index)"), conversation: conversation, now: Date()))") }
        })
        #expect(outcomes.entries == Array(repeating: "\(AcceptOutcome.accepted)", count: 30))
        #expect(store.commitQueue?.statistics.largestBatch == 30)
        await store.close()
        // Committed: another process opening the file sees every one.
        let reopened = try await openFile(path)
        #expect(try await messageIDs(reopened).count == 30)
        await reopened.close()
    }

    func notices(_ store: SQLStore) async throws -> [String] {
        try await store.single { db in
            try await db.raw("SELECT subject FROM notices ORDER BY subject").all().map { try $0.decode(column: "subject", as: String.self) }
        }
    }

    static func insertNotice(_ subject: String, _ db: any SQLDatabase) async throws {
        try await db.raw("INSERT INTO notices (subject, last_at) VALUES (\(bind: subject), 0)").run()
    }

    /// Ends the batch's transaction under it, straight on the connection (callers' own transaction control is
    /// refused), as SQLite does after some errors (a full disk).
    static func endTransaction(under db: any SQLDatabase) throws {
        try (db as! SQLiteDriverDatabase).driver.execute("ROLLBACK", []) { _ in }
    }

    func notice(_ store: SQLStore, _ subject: String) async throws {
        try await store.transaction { db in try await Self.insertNotice(subject, db) }
    }

    @Test func aFailingCallInTheMiddleOfABatchRollsBackOnlyItsOwnWork() async throws {
        let store = try await openFile(temporaryDirectory() + "/db.sqlite")
        let outcomes = OrderLog()
        try await runQueuedTogether(store, [
            { try await notice(store, "a"); outcomes.append("a") },
            {
                do {
                    try await store.transaction { db in
                        try await Self.insertNotice("half-done", db)
                        throw GroupCommitRefusal()
                    }
                } catch is GroupCommitRefusal {
                    outcomes.append("refused")
                }
            },
            { try await notice(store, "b"); outcomes.append("b") },
        ])
        #expect(outcomes.entries.sorted() == ["a", "b", "refused"])
        #expect(store.commitQueue?.statistics.largestBatch == 3)
        #expect(try await notices(store) == ["a", "b"])
        await store.close()
    }

    /// The callers whose work ran in the lost transaction are told; the calls not yet started run later, in a
    /// transaction of their own.
    @Test func whenTheTransactionEndsUnderABatchItsCallersAreToldAndTheRestRunAfter() async throws {
        let store = try await openFile(temporaryDirectory() + "/db.sqlite")
        let failed = OrderLog()
        try await runQueuedTogether(store, [
            { do { try await notice(store, "a") } catch is SQLiteCommitQueue.RolledBack { failed.append("a") } },
            // Stands in for SQLite ending the transaction after an error (a full disk) that the caller
            // swallows and goes on: its next statement must not run in autocommit.
            {
                do {
                    try await store.transaction { db in
                        // Straight to the connection: callers' own transaction control is refused.
                        try Self.endTransaction(under: db)
                        try? await Self.insertNotice("autocommitted", db)
                    }
                } catch is SQLiteCommitQueue.RolledBack {
                    failed.append("ended")
                }
            },
            { do { try await notice(store, "b") } catch is SQLiteCommitQueue.RolledBack { failed.append("b") } },
        ])
        #expect(failed.entries.sorted() == ["a", "ended"])
        #expect(try await notices(store) == ["b"])
        #expect(store.commitQueue?.statistics.requeuedAfterFailure == 1)
        #expect(store.commitQueue?.statistics.cutShort == 0)
        // The store goes on.
        try await notice(store, "after")
        #expect(try await notices(store) == ["after", "b"])
        await store.close()
    }

    /// Urgent calls not started when their batch's transaction failed go back to the urgent queue: still ahead
    /// of background work, never in a batch with it.
    @Test func urgentCallsNotStartedInAFailedBatchStayUrgent() async throws {
        let store = try await openFile(temporaryDirectory() + "/db.sqlite")
        let batches = try #require(store.commitQueue?.statistics.batches)
        let order = OrderLog()
        let failed = OrderLog()
        try await runQueuedTogether(store, [
            {
                do {
                    try await store.single(priority: .urgent) { db in
                        try Self.endTransaction(under: db)
                        order.append("ended")
                    }
                } catch is SQLiteCommitQueue.RolledBack {
                    failed.append("ended")
                }
            },
            { try await store.single(priority: .urgent) { db in try await Self.insertNotice("urgent", db); order.append("urgent") } },
            { try await store.single { db in try await Self.insertNotice("background", db); order.append("background") } },
        ])
        #expect(failed.entries == ["ended"])
        #expect(order.entries == ["ended", "urgent", "background"])
        #expect(store.commitQueue?.statistics.requeuedAfterFailure == 1)
        // The holding call, the failed batch, then the urgent call in a batch of its own and the background one
        // in another.
        #expect(store.commitQueue?.statistics.batches == batches + 4)
        #expect(try await notices(store) == ["background", "urgent"])
        await store.close()
    }

    @Test func aCallersOwnCommitInsideABatchIsRefusedAndCommitsNothingEarly() async throws {
        let store = try await openFile(temporaryDirectory() + "/db.sqlite")
        let refused = OrderLog()
        try await runQueuedTogether(store, [
            { try await notice(store, "a") },
            {
                do {
                    try await store.transaction { db in
                        try await Self.insertNotice("mine", db)
                        try await db.raw("COMMIT").run()
                    }
                } catch {
                    refused.append("\(error)")
                }
            },
            { try await notice(store, "b") },
        ])
        #expect(refused.entries.count == 1)
        #expect(try await notices(store) == ["a", "b"])
        await store.close()
    }

    @Test func aSteadyStreamOfUrgentWorkDoesNotStarveBackgroundWork() async throws {
        let store = try await openFile(temporaryDirectory() + "/db.sqlite")
        let queue = try #require(store.commitQueue)
        let order = OrderLog()
        let gates = (0...SQLiteCommitQueue.urgentStreakLimit + 1).map { _ in OneTimeEvent() }
        let holding = OneTimeEvent()
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                try await store.single(priority: .urgent) { _ in
                    holding.signal()
                    await gates[0].wait()
                }
            }
            await holding.wait()
            group.addTask { try await store.single { _ in order.append("background") } }
            #expect(await eventually { queue.waiting == 1 })
            // Each urgent call arrives while the one before it runs, as acknowledgements do under load.
            let limit = SQLiteCommitQueue.urgentStreakLimit
            for index in 1...limit + 1 {
                group.addTask {
                    try await store.single(priority: .urgent) { _ in
                        order.append("urgent \(index)")
                        await gates[index].wait()
                    }
                }
                let backgroundDone = order.entries.contains("background")
                #expect(await eventually { queue.waiting == (backgroundDone ? 1 : 2) })
                gates[index - 1].signal()
                #expect(await eventually { order.entries.contains("urgent \(index)") })
            }
            gates[limit + 1].signal()
            try await group.waitForAll()
        }
        // Urgent work goes first (the acknowledgements) until `limit` urgent batches ran in a row while
        // background work waited; then the background work goes.
        let limit = SQLiteCommitQueue.urgentStreakLimit
        #expect(order.entries == (1...limit).map { "urgent \($0)" } + ["background", "urgent \(limit + 1)"])
        await store.close()
    }

    /// An acknowledgement that arrives while a batch of answering work runs waits for the call running and a
    /// commit, not for the rest of the batch; the rest runs after it, in order, and commits too.
    @Test(.timeLimit(.minutes(1))) func urgentWorkArrivingDuringABackgroundBatchGoesAfterTheCallRunning() async throws {
        let path = temporaryDirectory() + "/db.sqlite"
        let store = try await openFile(path)
        let queue = try #require(store.commitQueue)
        let order = OrderLog()
        let running = OneTimeEvent()
        let release = OneTimeEvent()
        try await runQueuedTogether(store, [
            {
                try await store.transaction { db in
                    try await Self.insertNotice("background 1", db)
                    running.signal()
                    await release.wait()
                    order.append("background 1")
                }
            },
            { try await store.transaction { db in try await Self.insertNotice("background 2", db); order.append("background 2") } },
            { try await store.transaction { db in try await Self.insertNotice("background 3", db); order.append("background 3") } },
        ], whileRunning: {
            await running.wait()
            // Stands in for an acknowledgement; the order is recorded where the work runs, on the connection.
            let urgent = Task {
                try await store.single(priority: .urgent) { db in try await Self.insertNotice("urgent", db); order.append("urgent") }
            }
            #expect(await eventually { queue.waiting == 1 })
            release.signal()
            try await urgent.value
        })
        #expect(order.entries == ["background 1", "urgent", "background 2", "background 3"])
        #expect(queue.statistics.cutShort == 1)
        await store.close()
        // Everything committed, the cut batch's first call included.
        let reopened = try await openFile(path)
        #expect(try await notices(reopened) == ["background 1", "background 2", "background 3", "urgent"])
        await reopened.close()
    }

    /// Background batches cut short for acknowledgements do not end an urgent streak: after four urgent
    /// batches in a row (with cut background batches between them) a background batch runs whole, so answering
    /// work is not reduced to one call per commit by a steady stream of acknowledgements.
    @Test(.timeLimit(.minutes(1))) func backgroundBatchesCutShortStillGetAWholeBatchAfterTheUrgentStreak() async throws {
        let store = try await openFile(temporaryDirectory() + "/db.sqlite")
        let queue = try #require(store.commitQueue)
        let order = OrderLog()
        let gates = (0...6).map { _ in OneTimeEvent() }
        let limit = SQLiteCommitQueue.urgentStreakLimit
        try await runQueuedTogether(store, (1...limit + 2).map { index in
            { try await store.single { _ in order.append("B\(index)"); await gates[index].wait() } }
        }, whileRunning: {
            var last: Task<Void, any Error>?
            for index in 1...limit + 1 {
                // A background call is running; an acknowledgement arrives meanwhile.
                #expect(await eventually { order.entries.contains("B\(index)") })
                let urgent = Task { try await store.single(priority: .urgent) { _ in order.append("U\(index)") } }
                #expect(await eventually { queue.waiting == 1 })
                gates[index].signal()
                if index <= limit { try await urgent.value } else { last = urgent }
            }
            gates[limit + 2].signal()
            try await last?.value
        })
        let cut = (1...limit).flatMap { ["B\($0)", "U\($0)"] }
        // After the fourth urgent batch, the fifth background call's batch runs whole: B6 before U5.
        #expect(order.entries == cut + ["B\(limit + 1)", "B\(limit + 2)", "U\(limit + 1)"])
        #expect(queue.statistics.cutShort == limit)
        await store.close()
    }

    @Test(.timeLimit(.minutes(1))) func aStoreCallFromInsideTheStoresOwnTransactionFailsInsteadOfWaitingForItself() async throws {
        let store = try await openFile(temporaryDirectory() + "/db.sqlite")
        await #expect(throws: SQLiteCommitQueue.Reentered.self) {
            try await store.transaction { _ in _ = try await store.counts() }
        }
        #expect(try await store.counts() == InboxCounts())
        await store.close()
    }

    @Test func aReaderBesideTheServerNeverHoldsUpItsWrites() async throws {
        let path = temporaryDirectory() + "/db.sqlite"
        let server = try await openFile(path)
        _ = try await server.accept(inboxMessage("m1"), conversation: conversation, now: Date())
        let reader = try await SQLStore.open(.sqliteFile(path: path), options: .init(reader: true), logger: .init(label: "t"))
        let reading = OneTimeEvent()
        let release = OneTimeEvent()
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                _ = try await reader.single { db in
                    let count = try await db.raw("SELECT COUNT(*) AS n FROM inbox").first()?.decode(column: "n", as: Int.self)
                    reading.signal()
                    await release.wait()
                    return count
                }
            }
            await reading.wait()
            // The reader is inside its transaction; the server still accepts (an immediate transaction
            // on the reader's side would keep it waiting for the busy timeout and then fail it).
            #expect(try await server.accept(inboxMessage("m2"), conversation: conversation, now: Date()) == .accepted)
            release.signal()
            try await group.waitForAll()
        }
        await #expect(throws: (any Error).self) {
            try await reader.single { db in try await Self.insertNotice("x", db) }
        }
        await reader.close()
        #expect(try await messageIDs(server) == ["m1", "m2"])
        await server.close()
    }

    @Test func aCrashInsideABatchLosesNothingThatWasAcknowledged() async throws {
        let path = temporaryDirectory() + "/db.sqlite"
        let store = try await openFile(path)
        let queue = try #require(store.commitQueue)
        // Acknowledged before the crash: its accept returned.
        #expect(try await store.accept(inboxMessage("before"), conversation: conversation, now: Date()) == .accepted)
        let returned = OrderLog()
        let failures = OrderLog()
        let first = OneTimeEvent()
        let inBatch = OneTimeEvent()
        let crashed = OneTimeEvent()
        try await withThrowingTaskGroup(of: Void.self) { group in
            await hold(store, until: first, group: &group)
            for id in ["b", "c"] {
                group.addTask {
                    do {
                        _ = try await store.accept(inboxMessage(id), conversation: conversation, now: Date())
                        returned.append(id)
                    } catch {
                        failures.append(id)
                    }
                }
            }
            #expect(await eventually { queue.waiting == 2 })
            // Last in the same (urgent) batch: stops it after b and c ran, before the commit.
            group.addTask {
                _ = try? await store.single(priority: .urgent) { _ in
                    inBatch.signal()
                    await crashed.wait()
                }
            }
            #expect(await eventually { queue.waiting == 3 })
            first.signal()
            await inBatch.wait()
            // b and c are written but not committed, and their callers have not been answered.
            #expect(returned.entries.isEmpty)
            queue.dropConnectionForTesting()
            crashed.signal()
            try await group.waitForAll()
        }
        #expect(returned.entries.isEmpty)
        #expect(failures.entries.sorted() == ["b", "c"])
        await store.close()
        let reopened = try await openFile(path)
        #expect(try await messageIDs(reopened) == ["before"])
        // Never acknowledged, so the platform delivers them again, and they are accepted then.
        #expect(try await reopened.accept(inboxMessage("b"), conversation: conversation, now: Date()) == .accepted)
        await reopened.close()
    }

    @Test func callsAfterCloseFailClearly() async throws {
        let store = try await openFile(temporaryDirectory() + "/db.sqlite")
        await store.close()
        await #expect(throws: SQLiteCommitQueue.Closed.self) {
            _ = try await store.accept(inboxMessage("late"), conversation: conversation, now: Date())
        }
    }
}

private struct GroupCommitRefusal: Error {}

/// The WAL is copied back into the database file on a connection and thread of their own, never inside a
/// commit of the store's connection.
@Suite struct CheckpointTests {
    /// Commits one notice of about 20 KB (6–7 WAL pages).
    func writePages(_ store: SQLStore, _ subject: String, _ text: String) async throws {
        try await store.transaction { db in
            try await db.raw("INSERT INTO notices (subject, last_at, message_key) VALUES (\(bind: subject), 0, \(bind: text))").run()
        }
    }

    /// The notices in the database file at `path`, read by a store opened afresh.
    func noticesInFile(_ path: String) async throws -> Int? {
        let reopened = try await SQLStore.open(.sqliteFile(path: path), logger: .init(label: "t"))
        let count = try await reopened.single { db in
            try await db.raw("SELECT COUNT(*) AS n FROM notices").first()?.decode(column: "n", as: Int.self)
        }
        await reopened.close()
        return count
    }

    func walPages(_ path: String) -> Int {
        let size = (try? FileManager.default.attributesOfItem(atPath: path + "-wal")[.size] as? Int) ?? 0
        return size / 4096
    }

    @Test func theCheckpointerKeepsTheWALBoundedAndTheWriterNeverCheckpoints() async throws {
        let path = temporaryDirectory() + "/db.sqlite"
        let store = try await SQLStore.open(.sqliteFile(path: path), options: .init(checkpointPages: 50), logger: .init(label: "t"))
        let checkpointer = try #require(store.commitQueue?.checkpointer)
        let text = String(repeating: "x", count: 20_000)
        // About 2,500 pages written, in 25 bursts of about 100 (twice the threshold).
        for burst in 0..<25 {
            for index in burst * 20..<(burst + 1) * 20 {
                try await writePages(store, "n\(index)", text)
            }
            // The pause between bursts, as between commits in a server: the checkpointer catches up (or leaves
            // fewer pages than its threshold).
            #expect(await eventually(seconds: 5) { checkpointer.passes > 0 && checkpointer.isIdle }, "\(checkpointer.progressDescription)")
        }
        #expect(checkpointer.inlineAttempts == 0)
        // The WAL started over from its beginning instead of holding everything written.
        #expect(walPages(path) < 500, "WAL of \(walPages(path)) pages")
        await store.close()
        // Closing copied the rest and removed the WAL; everything is in the database file.
        #expect(!FileManager.default.fileExists(atPath: path + "-wal"))
        #expect(try await noticesInFile(path) == 500)
    }

    @Test func aWriterThatNeverPausesCheckpointsItselfAtTheLimit() async throws {
        let path = temporaryDirectory() + "/db.sqlite"
        let store = try await SQLStore.open(.sqliteFile(path: path), options: .init(checkpointPages: 10), logger: .init(label: "t"))
        let checkpointer = try #require(store.commitQueue?.checkpointer)
        // A checkpointer that cannot keep up: the writer checkpoints itself between two batches once the WAL
        // holds 16 times the threshold, so the WAL stays bounded.
        checkpointer.holdForTesting()
        let text = String(repeating: "y", count: 20_000)
        for index in 0..<200 {
            try await writePages(store, "n\(index)", text)
        }
        #expect(checkpointer.inlineCheckpoints > 0)
        #expect(walPages(path) < 160 + 20, "WAL of \(walPages(path)) pages")
        await store.close()
    }

    /// Commits back to back while the checkpointer runs beside them (it holds SQLite's checkpoint lock much of
    /// the time, and the writer must pause it to checkpoint): the WAL still stays within the limit and one
    /// batch. A guard of the bound under contention; the held-checkpointer test above is the one that needs
    /// the writer's own checkpoint.
    @Test func backToBackCommitsWithTheCheckpointerRunningKeepTheWALBounded() async throws {
        let path = temporaryDirectory() + "/db.sqlite"
        let store = try await SQLStore.open(.sqliteFile(path: path), options: .init(checkpointPages: 20), logger: .init(label: "t"))
        let text = String(repeating: "z", count: 20_000)
        try await withThrowingTaskGroup(of: Void.self) { group in
            // Sixteen writers, so a batch always waits: the writer never pauses.
            for writer in 0..<16 {
                group.addTask {
                    for index in 0..<25 {
                        try await writePages(store, "w\(writer)-\(index)", text)
                    }
                }
            }
            try await group.waitForAll()
        }
        // About 2,400 pages written; the limit is 320, and one batch (about 7 pages per insert) may follow it.
        let largest = try #require(store.commitQueue?.statistics.largestBatch)
        #expect(walPages(path) < 320 + 8 * largest, "WAL of \(walPages(path)) pages, largest batch \(largest)")
        await store.close()
        #expect(try await noticesInFile(path) == 400)
    }
}
