import DequeModule
import Foundation
import SQLKit
import Synchronization

/// Runs the store's work on the one SQLite connection, on a thread of its own, one batch at a time, and
/// commits together the work that queued up while the previous batch ran (group commit).
///
/// - Nothing waits for a batch to fill: a call that finds the connection idle runs at once, alone, in a
///   transaction of its own.
/// - Under load, each caller's work runs inside the batch's transaction under a savepoint of its own, so
///   one caller's failure (a lost lease) rolls back only its own statements.
/// - A caller hears its outcome only after its batch committed. A crash in the middle of a batch loses
///   work that nobody was told about: no callback was acknowledged, no lease was reported taken.
/// - Urgent work (acknowledgements, lease renewals) is committed in batches of its own, ahead of the
///   background work queued before it. A background batch that finds urgent work waiting between two of its
///   calls commits what it ran so far and hands the rest back to the front of the queue, so an
///   acknowledgement waits for one running call and a commit, not for a whole batch. After four urgent
///   batches in a row while background work waited, a whole background batch runs first, so a steady stream
///   of acknowledgements never starves the answering work.
/// - A reader (`chatbridge usage` beside a running server) reads in deferred transactions, which never
///   take the write lock a running server needs.
/// - A store call made from inside one of the store's own transactions fails at once (``Reentered``)
///   instead of waiting for itself.
///
/// Measured with `chatbridge bench` (README): with a commit per store call (7 per answer) the commit path
/// (WAL frames, checkpoints, file locks) was the largest part of the store's CPU. Running batches on their
/// own thread lets the work that arrives meanwhile share the next commit; a caller pays the hop to that
/// thread and back once per call, not per statement.
final class SQLiteCommitQueue: Sendable {
    enum Priority: Sendable {
        case urgent
        case background
    }

    /// Counts of batches, for tests and diagnostics.
    struct Statistics: Sendable, Equatable {
        var batches = 0
        var operations = 0
        var largestBatch = 0
        /// Background batches committed early for urgent work that arrived while they ran; the calls not run
        /// went back to the front of their queue.
        var cutShort = 0
        /// Batches whose transaction failed before their last call; the calls not started went back too.
        var requeuedAfterFailure = 0
        /// How long urgent calls (acknowledgements, renewals) waited from queueing until their batch committed.
        var urgentWait = DurationHistogram()
        /// The part of it until its batch began.
        var urgentQueued = DurationHistogram()
        /// How long `COMMIT` took.
        var commit = DurationHistogram()
    }

    struct Closed: Error, CustomStringConvertible {
        var description: String { "the store is closed" }
    }

    struct Reentered: Error, CustomStringConvertible {
        var description: String { "a store call was made from inside one of the store's own transactions" }
    }

    struct RolledBack: Error, CustomStringConvertible {
        var reason: String
        var description: String { "the transaction was rolled back: \(reason)" }
    }

    /// One caller's work; its outcome is written by the committer before the caller is woken.
    private final class Entry: @unchecked Sendable {
        enum Kind {
            case work
            case close
        }
        let kind: Kind
        let priority: Priority
        let run: @Sendable (any SQLDatabase) async throws -> Void
        let fail: @Sendable (any Error) -> Void
        /// Set before the entry is queued; resumed once, by the committer (with true: the entry was run).
        var waker: CheckedContinuation<Bool, Never>?
        /// When it was queued.
        var queuedAt = ContinuousClock.Instant.now

        init(kind: Kind, priority: Priority, run: @escaping @Sendable (any SQLDatabase) async throws -> Void,
             fail: @escaping @Sendable (any Error) -> Void) {
            self.kind = kind
            self.priority = priority
            self.run = run
            self.fail = fail
        }
    }

    /// Where a caller's result lands; written before the caller is woken.
    private final class Outcome<R>: @unchecked Sendable {
        var result: Result<R, any Error>?
    }

    private struct State {
        var closed = false
        var urgent = Deque<Entry>()
        var background = Deque<Entry>()
        /// The committer, parked while there is nothing to do.
        var idle: CheckedContinuation<Void, Never>?
        var statistics = Statistics()
        /// Urgent batches run in a row while background work waited: after ``urgentStreakLimit`` of them
        /// background work goes next, so a steady stream of acknowledgements never starves the answering
        /// work (and its lease-bound writes), and an acknowledgement rarely waits for answering work.
        var urgentStreak = 0

        var waiting: Int { urgent.count + background.count }
    }

    private let state = Mutex(State())
    private let driver: SQLiteDriver
    private let database: any SQLDatabase
    private let thread: SQLiteThread
    /// Checkpoints the WAL off the commit path (file databases written by a server).
    let checkpointer: SQLiteCheckpointer?
    /// Work committed together at most.
    let batchLimit: Int
    /// Deferred transactions (reads only, never the write lock) instead of immediate ones.
    let reader: Bool

    /// Urgent batches in a row, with background work waiting, before a background batch goes next.
    static let urgentStreakLimit = 4

    /// The queue whose committer is running the current task's work (to refuse calls back into it).
    @TaskLocal static var running: ObjectIdentifier?

    init(driver: SQLiteDriver, database: any SQLDatabase, batchLimit: Int = 64, reader: Bool = false,
         checkpointer: SQLiteCheckpointer? = nil) {
        self.driver = driver
        self.checkpointer = checkpointer
        self.database = database
        self.batchLimit = max(1, batchLimit)
        self.reader = reader
        self.thread = SQLiteThread()
        let thread = self.thread
        Task(executorPreference: thread) { [self] in
            await commitLoop()
            thread.stop()
        }
    }

    var statistics: Statistics { state.withLock { $0.statistics } }

    /// Callers waiting for their batch (not counting the batch running).
    var waiting: Int { state.withLock { $0.waiting } }

    /// Statements SQLite parsed again (``SQLiteDriver/reprepares``), read on the connection's thread.
    func reprepares() async throws -> Int {
        let driver = self.driver
        return try await perform(.background) { _ in driver.reprepares }
    }

    /// For tests: drops the connection as a crash would, without committing what the running batch did.
    /// Only while that batch is suspended in a caller's work, so nothing else is using the connection.
    func dropConnectionForTesting() { driver.close() }

    /// Runs `body` in a transaction (its own, or a savepoint of a shared one) and returns its result once
    /// that transaction committed.
    func perform<R: Sendable>(_ priority: Priority, _ body: @escaping @Sendable (any SQLDatabase) async throws -> R) async throws -> R {
        guard Self.running != ObjectIdentifier(self) else { throw Reentered() }
        let outcome = Outcome<R>()
        let entry = Entry(kind: .work, priority: priority, run: { outcome.result = .success(try await body($0)) },
                          fail: { outcome.result = .failure($0) })
        try await enter(entry)
        guard let result = outcome.result else { throw RolledBack(reason: "no outcome") }
        return try result.get()
    }

    /// Closes the connection after the urgent work queued before; later calls fail with ``Closed``.
    func close() async {
        let entry = Entry(kind: .close, priority: .urgent, run: { _ in }, fail: { _ in })
        try? await enter(entry)
    }

    /// Queues `entry` and returns once the committer has finished it.
    private func enter(_ entry: Entry) async throws {
        let queued: Bool = await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
            let admission = state.withLock { state -> Admission in
                guard !state.closed else { return .refused }
                if entry.kind == .close { state.closed = true }
                entry.waker = continuation
                entry.queuedAt = .now
                switch entry.priority {
                case .urgent: state.urgent.append(entry)
                case .background: state.background.append(entry)
                }
                let idle = state.idle
                state.idle = nil
                return .queued(wake: idle)
            }
            switch admission {
            case .refused: continuation.resume(returning: false)
            case .queued(let committer): committer?.resume()
            }
        }
        if !queued { throw Closed() }
    }

    private enum Admission {
        case refused
        case queued(wake: CheckedContinuation<Void, Never>?)
    }

    /// Takes batches and runs them until the connection is closed.
    private func commitLoop() async {
        while true {
            let (batch, whole) = await nextBatch()
            if let closing = batch.last, closing.kind == .close {
                let before = Array(batch.dropLast())
                if !before.isEmpty {
                    // Urgent work only (a close is queued as urgent): never cut short; after a failed
                    // transaction the calls not started are told the store closed.
                    let ran = await Self.$running.withValue(ObjectIdentifier(self)) { await run(before, whole: true) }.count
                    for entry in before[ran...] { entry.fail(Closed()) }
                    record(before, ran: ran, failed: true, began: nil)
                    for entry in before { entry.waker?.resume(returning: true) }
                }
                let abandoned = state.withLock { state -> [Entry] in
                    let rest = Array(state.urgent) + Array(state.background)
                    state.urgent.removeAll()
                    state.background.removeAll()
                    return rest
                }
                // The checkpointer's connection first: the last connection to close copies the WAL back
                // and removes it.
                checkpointer?.stop()
                driver.close()
                for entry in abandoned {
                    entry.fail(Closed())
                    entry.waker?.resume(returning: true)
                }
                closing.waker?.resume(returning: true)
                return
            }
            let began = ContinuousClock.Instant.now
            let (ran, failed) = await Self.$running.withValue(ObjectIdentifier(self)) { await run(batch, whole: whole) }
            record(batch, ran: ran, failed: failed, began: began)
            for entry in batch.prefix(ran) { entry.waker?.resume(returning: true) }
            // Between batches, no transaction open: where a writer that never pauses copies its WAL back.
            checkpointer?.checkpointOnWriterIfDue(driver)
        }
    }

    /// Counts a batch of which the first `ran` entries ran, and puts the others (not run, not failed, not
    /// answered) back at the front of their own queue, in their order. A background batch that ran whole
    /// ends an urgent streak; one cut short does not, so background work still gets a whole batch after
    /// ``urgentStreakLimit`` urgent batches.
    private func record(_ batch: [Entry], ran: Int, failed: Bool, began: ContinuousClock.Instant?) {
        let now = ContinuousClock.Instant.now
        state.withLock { state in
            for entry in batch.prefix(ran) where entry.priority == .urgent {
                state.statistics.urgentWait.record(entry.queuedAt.duration(to: now))
                if let began { state.statistics.urgentQueued.record(entry.queuedAt.duration(to: began)) }
            }
            state.statistics.batches += 1
            state.statistics.operations += ran
            state.statistics.largestBatch = max(state.statistics.largestBatch, ran)
            guard began != nil else { return }
            if ran < batch.count {
                if failed { state.statistics.requeuedAfterFailure += 1 } else { state.statistics.cutShort += 1 }
                for entry in batch[ran...].reversed() {
                    switch entry.priority {
                    case .urgent: state.urgent.prepend(entry)
                    case .background: state.background.prepend(entry)
                    }
                }
            } else if batch.first?.priority == .background {
                state.urgentStreak = 0
            }
        }
    }

    /// The next batch: the urgent work waiting, alone (a close request ends it); else background work, which
    /// may be cut short for urgent work unless it is background work's turn after an urgent streak (`whole`).
    private func nextBatch() async -> (entries: [Entry], whole: Bool) {
        while true {
            let batch = state.withLock { state -> (entries: [Entry], whole: Bool) in
                var batch: [Entry] = []
                // Urgent work and background work never share a batch: an acknowledgement never waits for a
                // batch of answering work committed with it. They alternate while both wait.
                let backgroundsTurn = state.urgentStreak >= Self.urgentStreakLimit && !state.background.isEmpty
                    && state.urgent.first?.kind != .close
                if !backgroundsTurn {
                    while batch.count < batchLimit, let next = state.urgent.first {
                        batch.append(state.urgent.removeFirst())
                        if next.kind == .close { return (batch, true) }
                    }
                }
                if !batch.isEmpty { state.urgentStreak = state.background.isEmpty ? 0 : state.urgentStreak + 1 }
                if batch.isEmpty {
                    while batch.count < batchLimit, !state.background.isEmpty {
                        batch.append(state.background.removeFirst())
                    }
                    // Its turn is taken (whether or not its transaction then fails, urgent work goes next).
                    if backgroundsTurn { state.urgentStreak = 0 }
                    return (batch, backgroundsTurn)
                }
                return (batch, true)
            }
            if !batch.entries.isEmpty { return batch }
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let ready = state.withLock { state -> Bool in
                    if state.waiting > 0 { return true }
                    state.idle = continuation
                    return false
                }
                if ready { continuation.resume() }
            }
        }
    }

    /// Runs the batch in one transaction; a lone entry without savepoints. Whatever goes wrong with the
    /// transaction itself (a savepoint that cannot be released or rolled back, SQLite ending the transaction
    /// after a full disk, a failed commit) rolls back what the batch ran and fails those callers: no caller
    /// is told it failed while its work commits. The entries not started are left for the caller to queue
    /// again.
    ///
    /// Returns how many entries, from the front, were run and have their outcome. A background batch that
    /// need not run `whole` stops early, and commits, when urgent work arrived while it ran; the entries after
    /// that were not touched.
    private func run(_ batch: [Entry], whole: Bool) async -> (count: Int, failed: Bool) {
        guard driver.isOpen else {
            for entry in batch { entry.fail(Closed()) }
            return (batch.count, true)
        }
        do {
            // A reader's deferred transaction never takes the write lock a running server needs.
            try statement(reader ? "BEGIN" : "BEGIN IMMEDIATE")
        } catch {
            for entry in batch { entry.fail(error) }
            return (batch.count, true)
        }
        driver.transactionExpected = true
        defer { driver.transactionExpected = false }
        let shared = batch.count > 1
        let mayStopEarly = shared && !whole && batch.allSatisfy { $0.priority == .background }
        var done: [Entry] = []
        var ran = 0
        for entry in batch {
            if mayStopEarly && ran > 0 && urgentWaiting { break }
            ran += 1
            let started = batch[..<ran]
            do {
                if shared { try statement("SAVEPOINT entry") }
                do {
                    try await entry.run(database)
                } catch {
                    entry.fail(error)
                    // The caller's own failure (a lost lease): only its statements are undone, and it keeps its
                    // own error whatever happens to the rest of the batch.
                    guard shared, driver.inTransaction else {
                        throw Abandon(reason: "SQLite ended the transaction after: \(error)", failed: entry)
                    }
                    do {
                        try statement("ROLLBACK TO entry")
                        try statement("RELEASE entry")
                    } catch let savepoint {
                        throw Abandon(reason: "a savepoint could not be rolled back: \(savepoint)", failed: entry)
                    }
                    continue
                }
                guard driver.inTransaction else { throw Abandon(reason: "SQLite ended the transaction", failed: nil) }
                if shared { try statement("RELEASE entry") }
                done.append(entry)
            } catch let abandon as Abandon {
                rollBack(started, done: done, reason: abandon.reason, except: abandon.failed)
                return (ran, true)
            } catch {
                rollBack(started, done: done, reason: "\(error)", except: nil)
                return (ran, true)
            }
        }
        do {
            let started = ContinuousClock.Instant.now
            try statement("COMMIT")
            let took = started.duration(to: .now)
            state.withLock { $0.statistics.commit.record(took) }
        } catch {
            rollBack(batch[..<ran], done: done, reason: "the commit failed: \(error)", except: nil)
            return (ran, true)
        }
        return (ran, false)
    }

    /// Whether urgent work (not a close: the batch running finishes first) is waiting for the connection.
    private var urgentWaiting: Bool { state.withLock { $0.urgent.first?.kind == .work } }

    /// Why a batch is rolled back whole; `failed` already has its own error.
    private struct Abandon: Error {
        var reason: String
        var failed: Entry?
    }

    /// Rolls the whole transaction back and fails every caller of the batch (but `except`, which already has
    /// its own error; a lone entry's failure is such a case).
    private func rollBack(_ batch: ArraySlice<Entry>, done: [Entry], reason: String, except: Entry?) {
        if driver.inTransaction { try? statement("ROLLBACK") }
        let failure = RolledBack(reason: reason)
        for entry in batch where entry !== except { entry.fail(failure) }
    }

    private func statement(_ sql: String) throws {
        try driver.execute(sql, []) { _ in }
    }
}

/// The thread the SQLite connection is used on: a task executor running one job at a time, so the
/// committer's work (and the callers' statements inside it) never blocks the shared concurrency pool.
final class SQLiteThread: TaskExecutor, @unchecked Sendable {
    private let condition = NSCondition()
    private var jobs: [UnownedJob] = []
    private var stopping = false

    init() {
        Thread { [self] in
            nameCurrentThread("cb-sqlite")
            loop()
        }.start()
    }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        condition.lock()
        jobs.append(job)
        condition.signal()
        condition.unlock()
    }

    /// Ends the thread once the jobs queued are run.
    func stop() {
        condition.lock()
        stopping = true
        condition.signal()
        condition.unlock()
    }

    private func loop() {
        var running: [UnownedJob] = []
        while true {
            condition.lock()
            while jobs.isEmpty && !stopping { condition.wait() }
            if jobs.isEmpty && stopping {
                condition.unlock()
                return
            }
            swap(&running, &jobs)
            condition.unlock()
            for job in running { job.runSynchronously(on: asUnownedTaskExecutor()) }
            running.removeAll(keepingCapacity: true)
        }
    }
}

/// Durations counted in power-of-two buckets of microseconds: cheap enough to record on every call, precise
/// enough (within a factor of two) for a percentile in a diagnostic line.
struct DurationHistogram: Sendable, Equatable {
    /// Bucket `i` counts durations under 2^i µs (the last one everything longer).
    private var buckets = [Int](repeating: 0, count: 28)
    private(set) var count = 0
    private(set) var longest: Duration = .zero

    mutating func record(_ duration: Duration) {
        let micros = max(0, Self.microseconds(duration))
        let bucket = min(buckets.count - 1, micros == 0 ? 0 : Int64.bitWidth - micros.leadingZeroBitCount)
        buckets[bucket] += 1
        count += 1
        longest = max(longest, duration)
    }

    /// The bucket bound, in microseconds, under which the fraction `p` (0…1) of the durations fell; 0 when
    /// nothing was recorded.
    func percentile(_ p: Double) -> Int {
        guard count > 0 else { return 0 }
        let wanted = max(1, Int((Double(count) * p).rounded(.up)))
        var seen = 0
        for (index, number) in buckets.enumerated() {
            seen += number
            if seen >= wanted { return 1 << index }
        }
        return 1 << (buckets.count - 1)
    }

    var longestMicroseconds: Int { Int(Self.microseconds(longest)) }

    private static func microseconds(_ duration: Duration) -> Int64 {
        duration.components.seconds * 1_000_000 + duration.components.attoseconds / 1_000_000_000_000
    }
}

/// Names the calling thread for `top -H`, `perf` and /proc (at most 15 bytes; Linux only). Without it a
/// thread keeps the name of the thread that started it, such as an event loop's (Foundation's `Thread.name`
/// of more than 15 bytes is refused by Linux without a word).
func nameCurrentThread(_ name: String) {
    #if os(Linux)
    guard let file = fopen("/proc/thread-self/comm", "w") else { return }
    fputs(String(name.prefix(15)), file)
    fclose(file)
    #endif
}
