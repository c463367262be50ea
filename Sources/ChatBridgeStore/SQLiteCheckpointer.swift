import Foundation
import Synchronization
import VaporCSQLite

/// Copies the WAL back into the database file on a connection and a thread of its own, so no commit of the
/// store's connection (and no acknowledgement waiting for one) runs a checkpoint. Only a writer that never
/// pauses checkpoints itself, between two batches, at ``inlineLimit``: the calls queued then wait for it.
///
/// Measured with `chatbridge bench` (open loop, 500/s): with SQLite's automatic checkpoint, which runs inside
/// the `COMMIT` that grows the WAL past 1,000 pages and writes and syncs the database file, the longest
/// commit took 70–150 ms, and acknowledgements queued behind it.
///
/// - The store's connection has `wal_autocheckpoint = 0` and a WAL hook that wakes this checkpointer once
///   ``threshold`` pages of the WAL are not yet copied.
/// - Checkpoints are `PASSIVE`: they never wait for or block the writer. A pass repeats while the writer
///   added frames during it, so in a pause between commits the WAL is copied whole, and SQLite starts it over
///   from its beginning at the next write instead of growing it.
/// - A writer busy without a pause (a saturated server) leaves no such moment. Once the WAL holds
///   ``inlineLimit`` pages, the commit queue, between two batches, pauses this checkpointer and checkpoints
///   on the writer's own connection (``checkpointOnWriterIfDue(_:)``): nothing is then being written, so it
///   copies everything and the next write starts the WAL over. The file stays bounded.
final class SQLiteCheckpointer: @unchecked Sendable {
    /// Pages (of 4 KiB) not yet copied that wake the checkpointer: by default SQLite's own threshold.
    let threshold: Int32
    /// WAL pages at which the writer checkpoints itself between two batches: 16 times the threshold.
    let inlineLimit: Int32

    private let driver: SQLiteDriver
    private let condition = NSCondition()
    // Guarded by `condition`.
    private var requested = false
    private var stopping = false
    private var finished = false
    private var paused = false
    /// For tests: held, whatever the writer does.
    private var held = false
    private var passing = false

    private struct Progress {
        /// The WAL's frames after the last commit.
        var written: Int32 = 0
        /// Times the WAL started over (a pass that began before it reports frames of the old WAL).
        var restarts = 0
        /// Frames of the current WAL copied by the last pass.
        var copied: Int32 = 0
        var passes = 0
        /// Checkpoints the writer ran, and those of them that copied everything.
        var inlineAttempts = 0
        var inline = 0
        var inlineDue = false
        /// Whether the checkpointer is in a pass (or about to start one).
        var busy = false
        /// The WAL's frames when a checkpoint last made no progress (a reader holds old frames): no new
        /// attempt until a threshold's worth more was written, or the WAL started over.
        var stalledAt: Int32?
    }

    private let progress = Mutex(Progress())

    /// Opens a second connection to `path`.
    init(path: String, threshold: Int32 = 1_000) throws {
        self.threshold = max(1, threshold)
        let (limit, overflow) = self.threshold.multipliedReportingOverflow(by: 16)
        inlineLimit = overflow ? .max : limit
        driver = try SQLiteDriver(path: path)
        try driver.execute("PRAGMA busy_timeout = 5000", []) { _ in }
        // Reads the header, so the connection knows the file is in WAL mode (else a checkpoint does nothing).
        try driver.execute("PRAGMA journal_mode = WAL", []) { _ in }
        Thread { [self] in
            nameCurrentThread("cb-checkpoint")
            loop()
        }.start()
    }

    /// Passes run by the checkpointer, and completed checkpoints by the writer, for tests and diagnostics.
    var passes: Int { progress.withLock { $0.passes } }
    var inlineCheckpoints: Int { progress.withLock { $0.inline } }
    var inlineAttempts: Int { progress.withLock { $0.inlineAttempts } }

    /// Whether the checkpointer has nothing left to do: it caught up, or fewer than ``threshold`` pages wait.
    var isIdle: Bool { progress.withLock { !$0.busy } }

    /// Its counters, for a test's failure message.
    var progressDescription: String { progress.withLock { "\($0)" } }

    /// Turns off the automatic checkpoint on `writer` and has it wake this checkpointer instead. The writer
    /// must be closed before this checkpointer is released.
    func attach(to writer: SQLiteDriver) throws {
        try writer.execute("PRAGMA wal_autocheckpoint = 0", []) { _ in }
        writer.setWALHook(Unmanaged.passUnretained(self).toOpaque()) { context, _, _, pages in
            // Called inside the writer's COMMIT, after it succeeded: must return SQLITE_OK, or SQLite reports
            // the commit as failed although it committed.
            guard let context else { return SQLITE_OK }
            Unmanaged<SQLiteCheckpointer>.fromOpaque(context).takeUnretainedValue().committed(pages: pages)
            return SQLITE_OK
        }
    }

    private func committed(pages: Int32) {
        let wake = progress.withLock { progress -> Bool in
            if pages < progress.written {
                progress.restarts += 1
                progress.copied = 0
                progress.stalledAt = nil
            }
            progress.written = pages
            if let stalled = progress.stalledAt {
                guard pages >= stalled + threshold else { return false }
                progress.stalledAt = nil
            }
            if pages >= inlineLimit { progress.inlineDue = true }
            // Idle: any commit past the threshold starts a pass, so a pause between commits is used to copy the
            // WAL whole. Busy: its passes go on while frames are added; wake it again only once a threshold's
            // worth waits.
            let uncopied = pages - progress.copied
            guard uncopied >= threshold || (!progress.busy && pages >= threshold && uncopied > 0) else { return false }
            progress.busy = true
            return true
        }
        if wake { request() }
    }

    /// Wakes the checkpointer.
    func request() {
        condition.lock()
        requested = true
        condition.signal()
        condition.unlock()
    }

    /// Called by the commit queue between batches (no transaction open): when the WAL reached
    /// ``inlineLimit``, pauses the checkpointer and checkpoints on `writer`.
    func checkpointOnWriterIfDue(_ writer: SQLiteDriver) {
        guard progress.withLock({ $0.inlineDue }) else { return }
        condition.lock()
        paused = true
        while passing { condition.wait() }
        condition.unlock()
        let done = writer.checkpointPassively()
        progress.withLock { progress in
            progress.inlineDue = false
            progress.inlineAttempts += 1
            if let done, done.copied >= done.logged {
                progress.inline += 1
            } else {
                progress.stalledAt = progress.written
            }
        }
        condition.lock()
        paused = false
        condition.signal()
        condition.unlock()
    }

    /// For tests: the checkpointer stops taking requests, as one that cannot keep up.
    func holdForTesting() {
        condition.lock()
        held = true
        while passing { condition.wait() }
        condition.unlock()
    }

    /// Ends the thread after the pass running and closes the connection; returns once both are done.
    func stop() {
        condition.lock()
        stopping = true
        paused = false
        held = false
        condition.signal()
        while !finished { condition.wait() }
        condition.unlock()
    }

    private func loop() {
        while true {
            condition.lock()
            while !stopping && (!requested || paused || held) { condition.wait() }
            if stopping {
                driver.close()
                finished = true
                condition.broadcast()
                condition.unlock()
                return
            }
            requested = false
            passing = true
            condition.unlock()
            let again = checkpoint()
            condition.lock()
            // Stopped while the writer was still adding frames (commits then did not wake it): go on.
            if again { requested = true }
            passing = false
            condition.broadcast()
            condition.unlock()
        }
    }

    /// Passive passes until a pass copied everything the writer had committed. Returns whether to go on after
    /// a look at the requests: the writer kept adding frames, the WAL started over under a pass, or the writer
    /// wants the connection paused. Decided, with `busy`, in the same critical section as a commit's decision
    /// to wake it, so no wake-up is lost. Not when a pass made no progress (a reader holds old frames).
    private func checkpoint() -> Bool {
        var previous: Int32 = -1
        for _ in 0..<8 {
            let restarts = progress.withLock { $0.restarts }
            let result = driver.checkpointPassively()
            let again = progress.withLock { progress -> Bool? in
                progress.passes += 1
                let decided: Bool?
                if let (_, copied) = result {
                    if progress.restarts != restarts {
                        decided = progress.written >= threshold  // the WAL started over under this pass
                    } else {
                        progress.copied = copied
                        if progress.written <= copied {
                            decided = false
                        } else if copied == previous {
                            progress.stalledAt = progress.written
                            decided = false
                        } else {
                            previous = copied
                            decided = nil  // another pass
                        }
                    }
                } else {
                    decided = false  // SQLite refused (busy): the next commit past the threshold asks again
                }
                if let decided { progress.busy = decided }
                return decided
            }
            if let again { return again }
            condition.lock()
            let yielding = paused || held || stopping
            condition.unlock()
            // The writer waits for this pass to end: hand over, and go on afterwards.
            if yielding { return true }
        }
        return true
    }
}

extension SQLiteDriver {
    /// Runs a `PASSIVE` checkpoint; the WAL's frames and how many of them are now in the database file, or nil
    /// when SQLite refused (busy, or not in WAL mode).
    func checkpointPassively() -> (logged: Int32, copied: Int32)? {
        guard let handle = handleForCheckpoint else { return nil }
        var logged: Int32 = 0
        var copied: Int32 = 0
        let result = sqlite_nio_sqlite3_wal_checkpoint_v2(handle, nil, SQLITE_CHECKPOINT_PASSIVE, &logged, &copied)
        return result == SQLITE_OK && logged >= 0 ? (logged, copied) : nil
    }
}
