import Foundation
import Synchronization
import VaporCSQLite

/// Copies the WAL back into the database file on a connection and a thread of its own, so no commit of the
/// store's connection (and no acknowledgement waiting for one) runs a checkpoint.
///
/// Measured with `chatbridge bench` (open loop, 500/s): with SQLite's automatic checkpoint, which runs inside
/// the `COMMIT` that grows the WAL past 1,000 pages and writes and syncs the database file, the longest
/// commit took 70–150 ms, and acknowledgements queued behind it.
///
/// - The store's connection has `wal_autocheckpoint = 0` and a WAL hook that wakes this checkpointer once
///   the WAL holds ``threshold`` pages.
/// - Checkpoints are `PASSIVE`: they never wait for or block the writer. A pass repeats while the writer
///   added frames during it, so the WAL is usually fully copied when the next write transaction begins, and
///   SQLite then starts the WAL over from its beginning instead of growing it.
/// - That needs a moment without commits. A writer busy without a pause (a saturated server) keeps adding
///   frames; once the WAL reaches ``inlineLimit`` pages the writer checkpoints inline, as SQLite would by
///   itself, copying only what the checkpointer has not, so the file stays bounded.
final class SQLiteCheckpointer: @unchecked Sendable {
    /// WAL pages (of 4 KiB) that wake the checkpointer: by default SQLite's own for its automatic checkpoint.
    let threshold: Int32
    /// WAL pages at which the writer checkpoints itself.
    let inlineLimit: Int32

    private let driver: SQLiteDriver
    private let condition = NSCondition()
    private var requested = false
    private var stopping = false
    private var finished = false
    private var paused = false
    /// Checkpoint passes run by the checkpointer, and inline ones by the writer, for tests and diagnostics.
    private let counts = Mutex((passes: 0, inline: 0, written: Int32(0), copied: Int32(0)))

    /// Opens a second connection to `path`.
    init(path: String, threshold: Int32 = 1_000, inlineLimit: Int32 = 16_000) throws {
        self.threshold = threshold
        self.inlineLimit = inlineLimit
        driver = try SQLiteDriver(path: path)
        try driver.execute("PRAGMA busy_timeout = 5000", []) { _ in }
        // Reads the header, so the connection knows the file is in WAL mode (else a checkpoint does nothing).
        try driver.execute("PRAGMA journal_mode = WAL", []) { _ in }
        let thread = Thread { [self] in loop() }
        thread.name = "chatbridge-sqlite-checkpoint"
        thread.start()
    }

    var passes: Int { counts.withLock { $0.passes } }
    var inlineCheckpoints: Int { counts.withLock { $0.inline } }
    /// Whether the last pass copied every frame the writer had committed (the next write transaction then
    /// starts the WAL over).
    var caughtUp: Bool { counts.withLock { $0.copied >= $0.written } }

    /// Turns off the automatic checkpoint on `writer` and has it wake this checkpointer instead. The writer
    /// must be closed before this checkpointer is released.
    func attach(to writer: SQLiteDriver) throws {
        try writer.execute("PRAGMA wal_autocheckpoint = 0", []) { _ in }
        writer.setWALHook(Unmanaged.passUnretained(self).toOpaque()) { context, handle, _, pages in
            guard let context else { return SQLITE_OK }
            let checkpointer = Unmanaged<SQLiteCheckpointer>.fromOpaque(context).takeUnretainedValue()
            checkpointer.counts.withLock { $0.written = pages }
            if pages >= checkpointer.inlineLimit {
                checkpointer.counts.withLock { $0.inline += 1 }
                _ = sqlite_nio_sqlite3_wal_checkpoint_v2(handle, nil, SQLITE_CHECKPOINT_PASSIVE, nil, nil)
            } else if pages >= checkpointer.threshold {
                checkpointer.request()
            }
            return SQLITE_OK
        }
    }

    /// Wakes the checkpointer.
    func request() {
        condition.lock()
        requested = true
        condition.signal()
        condition.unlock()
    }

    /// Ends the thread after the pass running and closes the connection; returns once both are done.
    func stop() {
        condition.lock()
        stopping = true
        condition.signal()
        while !finished { condition.wait() }
        condition.unlock()
    }

    /// For tests: requests are ignored from now on.
    func stopForTesting() {
        condition.lock()
        paused = true
        condition.unlock()
    }

    private func loop() {
        while true {
            condition.lock()
            while !requested && !stopping { condition.wait() }
            if stopping {
                driver.close()
                finished = true
                condition.broadcast()
                condition.unlock()
                return
            }
            requested = false
            let skip = paused
            condition.unlock()
            if !skip { checkpoint() }
        }
    }

    /// Passive passes until the WAL is copied whole (or a pass makes no progress: a reader holds old frames).
    private func checkpoint() {
        var previous: Int32 = -1
        for _ in 0..<8 {
            guard let (logged, copied) = driver.checkpointPassively() else { return }
            // Compared with what the writer has committed by now, not with the WAL this pass began with.
            let written = counts.withLock {
                $0.passes += 1
                $0.copied = copied
                return $0.written
            }
            if copied >= max(logged, written) || copied == previous { return }
            previous = copied
        }
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
