import ChatBridgeCore
import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import PostgresKit
import PostgresNIO
import SQLKit
import SQLiteKit
import Synchronization

/// The SQL implementation of ``Inbox`` and ``ConversationStore``, written once against SQLKit for SQLite and
/// PostgreSQL; what differs between the two is in ``Backend`` and the small functions marked *dialect*.
///
/// With SQLite one connection serves the process and one lock file keeps other processes away; every
/// operation runs as one serialised transaction. With PostgreSQL a pool of connections serves the process
/// and any number of processes (replicas) share the database: claims are serialised by an advisory lock,
/// migrations by another, and accepted messages wake every replica through `LISTEN`/`NOTIFY`.
/// Timestamps are stored as integer milliseconds.
///
/// Times: every method receives the caller's `now` and deadlines relative to it. With the database clock
/// (``TimeSource/database``, PostgreSQL's default) only the differences are used, applied to the database
/// server's own clock, so replicas whose clocks disagree still agree on when a lease expires.
///
/// Every write on a claimed row is conditional on the claim's lease token and must change exactly one
/// row, else it throws ``LeaseLost``. Statements are never logged with their bound values (they carry
/// message text and webhook tokens).
public final class SQLStore: Inbox, ConversationStore, Sendable {
    public struct StoreError: Error, CustomStringConvertible {
        public var description: String
    }

    /// Whose clock lease expiry and retry times are read from.
    public enum TimeSource: Sendable, Equatable {
        /// The `now` each call passes (SQLite's default: one process, one clock; tests drive it).
        case caller
        /// The database server's clock; the caller's times only give durations (PostgreSQL's default).
        case database
    }

    public struct Options: Sendable {
        /// PostgreSQL connections per process (`database.pool_size`), plus one for `LISTEN`.
        public var poolSize: Int
        /// Nil: the default of the database (``TimeSource``).
        public var timeSource: TimeSource?
        /// For reports beside a running server (`chatbridge usage`): no SQLite process lock and no
        /// migrations; a schema older than this build is refused.
        public var reader: Bool
        /// SQLite: WAL pages (4 KiB each) after which the WAL is copied back into the database file, off the
        /// commit path (``SQLiteCheckpointer``); the writer does it itself at 16 times as many.
        public var checkpointPages: Int32
        public init(poolSize: Int = 10, timeSource: TimeSource? = nil, reader: Bool = false, checkpointPages: Int32 = 1_000) {
            self.poolSize = poolSize
            self.timeSource = timeSource
            self.reader = reader
            self.checkpointPages = max(1, checkpointPages)
        }
    }

    /// The SQL dialect, where statements must differ.
    enum Dialect: Sendable {
        case sqlite
        case postgres
    }

    /// How statements reach the database.
    private enum Backend: Sendable {
        /// One connection, driven by one batch at a time (group commit); the lock file keeps other processes
        /// away.
        case sqlite(SQLiteCommitQueue, ProcessLock?)
        /// Two pools, run by one task: `client` for answering work, `urgent` for acknowledgements and lease
        /// renewals, so they never queue behind a burst of claims and finishes. The listener task (on
        /// `client`) turns notifications into wake-ups.
        case postgres(PostgresClient, urgent: PostgresClient, run: Task<Void, Never>, listener: TaskSlot)
    }

    private let backend: Backend
    let dialect: Dialect
    let timeSource: TimeSource
    private let closed = Atomic<Bool>(false)
    /// The batch tokens of this process's most recent claims that failed (they may have committed all the same).
    private let failedClaimBatches = Mutex<[String]>([])
    private let logger: Logger
    public let location: DatabaseLocation

    /// The channel accepted messages are announced on (PostgreSQL).
    static let notifyChannel = "chatbridge_inbox"
    /// Advisory lock keys: one serialises claims across replicas, one migrations.
    static let claimLockKey = 0x4342_0001
    static let migrationLockKey = 0x4342_0000

    private static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .millisecondsSince1970
        return encoder
    }()

    private static let decoder: JSONDecoder = {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .millisecondsSince1970
        return decoder
    }()

    private init(backend: Backend, dialect: Dialect, timeSource: TimeSource, location: DatabaseLocation, logger: Logger) {
        self.backend = backend
        self.dialect = dialect
        self.timeSource = timeSource
        self.location = location
        self.logger = logger
    }

    /// Opens (creating it if needed) the database, takes the process lock (SQLite) and applies migrations.
    public static func open(_ location: DatabaseLocation, options: Options = Options(), logger: Logger) async throws -> SQLStore {
        let store: SQLStore
        switch location {
        case .sqliteMemory, .sqliteFile:
            store = try await openSQLite(location, options: options, logger: logger)
        case .postgres(let postgres):
            store = try await openPostgres(postgres, location: location, options: options, logger: logger)
        }
        do {
            if options.reader {
                let version = try await store.schemaVersion()
                guard version >= latestVersion else {
                    throw StoreError(description: "the database \(location) has schema version \(version), older than this build's \(latestVersion); run 'chatbridge migrate' (or start the server) first")
                }
            } else {
                try await store.migrate()
            }
        } catch {
            await store.close()
            throw error
        }
        return store
    }

    private static func openSQLite(_ location: DatabaseLocation, options: Options, logger: Logger) async throws -> SQLStore {
        var path = ":memory:"
        var lock: ProcessLock?
        switch location {
        case .sqliteFile(let file):
            path = file
            let directory = (path as NSString).deletingLastPathComponent
            if !directory.isEmpty {
                do {
                    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
                } catch {
                    throw StoreError(description: "cannot create the database directory \(directory): \(error.localizedDescription)")
                }
            }
            if !options.reader {
                lock = try ProcessLock(path: path + ".lock")
            } else if !FileManager.default.fileExists(atPath: path) {
                throw StoreError(description: "there is no SQLite database at \(path)")
            }
        default:
            break
        }
        let driver: SQLiteDriver
        var opened: SQLiteDriver?
        var checkpointer: SQLiteCheckpointer?
        do {
            driver = try SQLiteDriver(path: path)
            opened = driver
            // A reader changes nothing, not even the journal mode (which would write to the file). (Closing it
            // when it is the file's last connection still copies back and removes the WAL, as SQLite does.)
            if options.reader { try driver.execute("PRAGMA query_only = 1", []) { _ in } }
            if case .sqliteFile = location, !options.reader {
                try driver.execute("PRAGMA journal_mode = WAL", []) { _ in }
                checkpointer = try SQLiteCheckpointer(path: path, threshold: options.checkpointPages)
                try checkpointer?.attach(to: driver)
            }
            try driver.execute("PRAGMA synchronous = NORMAL", []) { _ in }
            try driver.execute("PRAGMA busy_timeout = 5000", []) { _ in }
        } catch {
            // The writer first: its WAL hook points at the checkpointer.
            opened?.close()
            checkpointer?.stop()
            lock?.release()
            throw StoreError(description: "cannot open the SQLite database \(location): \(error)")
        }
        // No query logging: bound values carry message text and webhook tokens.
        let queue = SQLiteCommitQueue(driver: driver, database: SQLiteDriverDatabase(driver: driver, logger: logger), reader: options.reader,
                                      checkpointer: checkpointer)
        let backend = Backend.sqlite(queue, lock)
        return SQLStore(backend: backend, dialect: .sqlite, timeSource: options.timeSource ?? .caller, location: location, logger: logger)
    }

    private static func openPostgres(_ postgres: PostgresLocation, location: DatabaseLocation, options: Options, logger: Logger) async throws -> SQLStore {
        let tls = postgres.clientTLS
        var configuration = PostgresClient.Configuration(
            host: postgres.host, port: postgres.port, username: postgres.username, password: postgres.password,
            database: postgres.database, tls: tls)
        configuration.options.connectTimeout = .seconds(5)
        var urgentConfiguration = configuration
        // +1: the listener holds one connection of the main pool.
        configuration.options.maximumConnections = max(1, options.poolSize) + 1
        urgentConfiguration.options.maximumConnections = Self.urgentConnections(poolSize: options.poolSize)
        var quiet = logger
        quiet.logLevel = max(logger.logLevel, .notice)
        let client = PostgresClient(configuration: configuration, backgroundLogger: quiet)
        let urgent = PostgresClient(configuration: urgentConfiguration, backgroundLogger: quiet)
        let run = Task {
            await withDiscardingTaskGroup { group in
                group.addTask { await client.run() }
                group.addTask { await urgent.run() }
            }
        }
        let store = SQLStore(
            backend: .postgres(client, urgent: urgent, run: run, listener: TaskSlot()), dialect: .postgres,
            timeSource: options.timeSource ?? .database, location: location, logger: logger)
        do {
            // Fail fast with a clear error when the server cannot be reached or refuses the credentials.
            try await store.single { db in try await db.raw("SELECT 1 AS ok").run() }
            try await store.single(priority: .urgent) { db in try await db.raw("SELECT 1 AS ok").run() }
        } catch {
            await store.close()
            throw StoreError(description: "cannot open the PostgreSQL database \(location): \(error)")
        }
        return store
    }

    /// The SQLite commit queue (nil with PostgreSQL), for tests and diagnostics.
    var commitQueue: SQLiteCommitQueue? {
        if case .sqlite(let queue, _) = backend { queue } else { nil }
    }

    /// Connections of the PostgreSQL pool kept for acknowledgements and lease renewals, besides
    /// `database.pool_size`.
    public static func urgentConnections(poolSize: Int) -> Int { max(2, poolSize / 5) }

    /// Closes the connections (once; later calls do nothing) after the statements in progress, also from a
    /// cancelled task.
    public func close() async {
        guard closed.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged else { return }
        switch backend {
        case .sqlite(let queue, let lock):
            // A task of its own, so a cancelled caller still closes the connection.
            let logger = self.logger
            await Task {
                await queue.close()
                lock?.release()
                let statistics = queue.statistics
                logger.notice("closed the SQLite database", metadata: [
                    "commits": "\(statistics.batches)", "calls": "\(statistics.operations)", "largest_batch": "\(statistics.largestBatch)",
                    "cut_short": "\(statistics.cutShort)", "requeued_after_failure": "\(statistics.requeuedAfterFailure)",
                    "urgent_wait_p50_us": "\(statistics.urgentWait.percentile(0.5))",
                    "urgent_wait_p99_us": "\(statistics.urgentWait.percentile(0.99))",
                    "urgent_wait_max_us": "\(statistics.urgentWait.longestMicroseconds)",
                    "urgent_queued_p50_us": "\(statistics.urgentQueued.percentile(0.5))",
                    "urgent_queued_p99_us": "\(statistics.urgentQueued.percentile(0.99))",
                    "commit_p99_us": "\(statistics.commit.percentile(0.99))", "commit_max_us": "\(statistics.commit.longestMicroseconds)",
                ])
            }.value
        case .postgres(_, _, let run, let listener):
            let listening = listener.take()
            listening?.cancel()
            await listening?.value
            run.cancel()
            await run.value
        }
    }

    // MARK: Wake-ups

    /// Calls `wake` whenever any process sharing the database accepts a message, and once after every
    /// (re)connection of the listener, so a replica with free capacity claims it at once. Only PostgreSQL
    /// is shared; with SQLite the accepting process wakes its own dispatcher and this does nothing.
    public func listenForAcceptedMessages(_ wake: @escaping @Sendable () -> Void) {
        guard case .postgres(let client, _, _, let listener) = backend else { return }
        let logger = self.logger
        let task = Task {
            var failures = 0
            while !Task.isCancelled {
                do {
                    try await client.withConnection { connection in
                        try await connection.listen(on: Self.notifyChannel) { notifications in
                            if failures > 0 { logger.notice("listening for accepted messages again") }
                            failures = 0
                            wake()
                            for try await _ in notifications { wake() }
                        }
                    }
                } catch {
                    if Task.isCancelled { return }
                    if failures == 0 {
                        logger.warning("lost the database notification channel; polling until it is back", metadata: ["error": "\(Self.describe(error))"])
                    }
                    failures += 1
                }
                try? await Task.sleep(for: .milliseconds(min(5_000, 250 * (1 << min(failures, 5)))))
            }
        }
        listener.put(task)
    }

    // MARK: Transactions

    /// Runs `body` in one transaction (with SQLite, a savepoint of a batch's transaction that other calls may
    /// share; it returns once that committed).
    ///
    /// `readCommitted`: PostgreSQL begins it as READ COMMITTED whatever the server's default, in the `BEGIN`
    /// itself (a `SET TRANSACTION` would be one more round trip).
    func transaction<R: Sendable>(
        timeout: Duration = callTimeout, readCommitted: Bool = false, _ body: @escaping @Sendable (any SQLDatabase) async throws -> R
    ) async throws -> R {
        switch backend {
        case .sqlite(let queue, _):
            return try await queue.perform(.background, body)
        case .postgres(let client, _, _, _):
            do {
                let logger = self.logger
                return try await Self.within(timeout) {
                    try await client.withConnection { connection in
                        // A call given up by `within` while it waited for a connection must not run when one
                        // arrives: a claim whose result nobody reads would hold its messages for a lease.
                        try Task.checkCancellation()
                        return try await Self.inTransaction(on: connection, readCommitted: readCommitted, logger: logger) {
                            try await body(connection.sql(queryLogLevel: nil))
                        }
                    }
                }
            } catch {
                throw Self.storeError(error)
            }
        }
    }

    /// `BEGIN` (READ COMMITTED when asked), `body`, `COMMIT`; `ROLLBACK` when `body` throws. As postgres-nio's
    /// `withTransaction`, whose `BEGIN` cannot carry an isolation level.
    private static func inTransaction<R: Sendable>(
        on connection: PostgresConnection, readCommitted: Bool, logger: Logger, _ body: () async throws -> R
    ) async throws -> R {
        do {
            try await connection.query(readCommitted ? "BEGIN ISOLATION LEVEL READ COMMITTED;" : "BEGIN;", logger: logger)
        } catch {
            throw StoreError(description: describe(error))
        }
        let value: R
        do {
            value = try await body()
            // Given up by `within` while the body ran (its caller was already told it failed), or the caller was
            // cancelled: its work must not commit now. A timeout during the COMMIT round trip itself can still
            // tell the caller it failed while the work commits (as with postgres-nio's `withTransaction`); a
            // claim covers that with `noteFailedClaim`.
            try Task.checkCancellation()
        } catch {
            _ = try? await connection.query("ROLLBACK;", logger: logger)
            throw error
        }
        do {
            try await connection.query("COMMIT;", logger: logger)
        } catch {
            throw StoreError(description: describe(error))
        }
        return value
    }

    /// Runs `body` without a transaction of its own on PostgreSQL (each statement commits by itself; urgent
    /// work has connections of its own); with SQLite like ``transaction(timeout:_:)``, urgent work in
    /// batches of its own ahead of background work.
    func single<R: Sendable>(priority: SQLiteCommitQueue.Priority = .background, _ body: @escaping @Sendable (any SQLDatabase) async throws -> R) async throws -> R {
        switch backend {
        case .sqlite(let queue, _):
            return try await queue.perform(priority, body)
        case .postgres(let main, let urgent, _, _):
            let client = priority == .urgent ? urgent : main
            do {
                return try await Self.within(Self.callTimeout) {
                    try await client.withConnection { connection in
                        try Task.checkCancellation()  // given up by `within` while waiting: do not run it now
                        return try await body(connection.sql(queryLogLevel: nil))
                    }
                }
            } catch {
                throw Self.storeError(error)
            }
        }
    }

    /// How long a call may wait for PostgreSQL. While no connection can be made the pool would queue calls
    /// for up to a minute; a callback must be refused (503, the platform delivers it again) long before.
    static let callTimeout: Duration = .seconds(5)

    /// Runs `operation`, returning its outcome or, after `limit`, a timeout error, whichever comes first.
    /// The operation is then cancelled (which takes a call out of the queue for a connection) but not waited
    /// for: a statement already sent to a server that stopped answering finishes, or fails, on its own.
    private static func within<R: Sendable>(_ limit: Duration, _ operation: @escaping @Sendable () async throws -> R) async throws -> R {
        let work = Task { try await operation() }
        let first = FirstOutcome<R>()
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { continuation in
                first.wait(continuation)
                let timer = Task {
                    try await Task.sleep(for: limit)
                    if first.resume(.failure(StoreError(description: "PostgreSQL did not answer within \(limit) (unreachable, or every connection is busy)"))) {
                        work.cancel()
                    }
                }
                Task {
                    let result = await work.result
                    timer.cancel()
                    _ = first.resume(result)
                }
            }
        } onCancel: {
            work.cancel()
        }
    }

    /// The body's own errors (``LeaseLost``, ``StoreError``) as they are; the database's described.
    private static func storeError(_ error: any Error) -> any Error {
        if error is LeaseLost || error is StoreError || error is CancellationError { return error }
        return StoreError(description: describe(error))
    }

    /// A PostgreSQL error as an operator can act on it (postgres-nio's own description hides everything).
    static func describe(_ error: any Error) -> String {
        guard let error = error as? PSQLError else {
            // The pool's own errors (no connection can be made now) are not public types.
            if String(describing: type(of: error)).contains("ConnectionPool") {
                return "PostgreSQL is unreachable: no connection can be made now (\(error)); retrying"
            }
            return "\(error)"
        }
        if error.code == .server, let info = error.serverInfo {
            let message = info[.message] ?? "server error"
            return "PostgreSQL refused: \(message) (SQLSTATE \(info[.sqlState] ?? "?"))"
        }
        if let underlying = error.underlying {
            return "PostgreSQL is unreachable: \(underlying)"
        }
        switch error.code {
        case .serverClosedConnection, .uncleanShutdown, .connectionError:
            return "PostgreSQL is unreachable: the connection was closed"
        case .poolClosed, .clientClosedConnection:
            return "the store is closed"
        default:
            return "PostgreSQL error: \(error.code)"
        }
    }

    // MARK: Dialect

    /// The database's clock in milliseconds (dialect).
    private var databaseNow: SQLQueryString {
        switch dialect {
        case .sqlite: SQLQueryString("CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)")
        case .postgres: SQLQueryString("CAST(EXTRACT(EPOCH FROM statement_timestamp()) * 1000 AS BIGINT)")
        }
    }

    /// "Now" in a statement: the caller's `now`, or the database's clock.
    func sqlNow(_ now: Date) -> SQLQueryString {
        switch timeSource {
        case .caller: "\(bind: now.millis)"
        case .database: databaseNow
        }
    }

    /// A moment given on the caller's clock (`date`, when the caller's clock says `now`), in a statement.
    func sqlTime(_ date: Date, now: Date) -> SQLQueryString {
        switch timeSource {
        case .caller: "\(bind: date.millis)"
        case .database: "(\(databaseNow) + \(bind: date.millis - now.millis))"
        }
    }

    /// Takes a transaction-scoped lock shared by every process on the database (PostgreSQL; with SQLite the
    /// transaction itself is exclusive).
    private func lockAcrossProcesses(_ key: Int, on db: any SQLDatabase) async throws {
        guard dialect == .postgres else { return }
        try await db.raw("SELECT pg_advisory_xact_lock(\(unsafeRaw: String(key)))").run()
    }

    // MARK: Migrations

    /// The schema's history; a step's statements may depend on the dialect.
    static func migrations(_ dialect: Dialect) -> [(version: Int, statements: [String])] {
        let key = switch dialect {
        case .sqlite: "id INTEGER PRIMARY KEY AUTOINCREMENT"
        case .postgres: "id BIGSERIAL PRIMARY KEY"
        }
        return [
        (1, [
            """
            CREATE TABLE inbox (
                \(key),
                platform TEXT NOT NULL,
                bot_id TEXT NOT NULL,
                message_id TEXT NOT NULL,
                conversation_key TEXT NOT NULL,
                payload TEXT NOT NULL,
                state TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                not_before BIGINT NOT NULL,
                lease_owner TEXT,
                lease_expires_at BIGINT,
                answer TEXT,
                delivered_parts INTEGER NOT NULL DEFAULT 0,
                last_error TEXT,
                received_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                answered_at BIGINT,
                UNIQUE (platform, bot_id, message_id)
            )
            """,
            "CREATE INDEX inbox_open ON inbox (conversation_key, id) WHERE state IN ('pending', 'running')",
            "CREATE INDEX inbox_pending ON inbox (id) WHERE state = 'pending'",
            "CREATE INDEX inbox_leases ON inbox (lease_expires_at) WHERE state = 'running'",
            """
            CREATE TABLE conversations (
                conversation_key TEXT PRIMARY KEY,
                platform TEXT NOT NULL,
                last_activity BIGINT NOT NULL,
                last_seq BIGINT NOT NULL DEFAULT 0,
                context_start_seq BIGINT NOT NULL DEFAULT 0,
                settings TEXT
            )
            """,
            """
            CREATE TABLE turns (
                conversation_key TEXT NOT NULL,
                seq BIGINT NOT NULL,
                role TEXT NOT NULL,
                content TEXT NOT NULL,
                tokens INTEGER NOT NULL,
                created_at BIGINT NOT NULL,
                PRIMARY KEY (conversation_key, seq)
            )
            """,
        ]),
        // Each claim's own lease token; the reply's kind and its effect on the conversation, applied when it
        // has been delivered; sends of the next part whose outcome is unknown.
        (2, [
            "ALTER TABLE inbox ADD COLUMN lease_token TEXT",
            "ALTER TABLE inbox ADD COLUMN reply_kind TEXT",
            "ALTER TABLE inbox ADD COLUMN reply_effect TEXT",
            "ALTER TABLE inbox ADD COLUMN uncertain_sends INTEGER NOT NULL DEFAULT 0",
        ]),
        // How far the live reply (a streaming card) got: none, opening, opened, finalized, declined.
        (3, [
            "ALTER TABLE inbox ADD COLUMN live_state TEXT NOT NULL DEFAULT 'none'",
        ]),
        // The platform's reference to the live reply (a Lark card entity, the message showing it), so every
        // attempt continues the same card.
        (4, [
            "ALTER TABLE inbox ADD COLUMN live_ref TEXT",
        ]),
        // Operator controls: questions counted against limits (one row per message), the tokens and cost
        // of each answer, notices given at most once a period, and model API keys' health (and donated keys).
        (5, [
            """
            CREATE TABLE requests (
                message_key TEXT PRIMARY KEY,
                user_id TEXT NOT NULL,
                chat_id TEXT NOT NULL,
                day TEXT NOT NULL,
                at_ms BIGINT NOT NULL
            )
            """,
            "CREATE INDEX requests_user_at ON requests (user_id, at_ms)",
            "CREATE INDEX requests_user_day ON requests (user_id, day)",
            """
            CREATE TABLE usage_records (
                message_key TEXT PRIMARY KEY,
                day TEXT NOT NULL,
                at_ms BIGINT NOT NULL,
                platform TEXT NOT NULL,
                chat_id TEXT NOT NULL,
                user_id TEXT NOT NULL,
                profile TEXT NOT NULL,
                model TEXT NOT NULL,
                key_fingerprint TEXT NOT NULL,
                prompt_tokens BIGINT NOT NULL,
                completion_tokens BIGINT NOT NULL,
                estimated INTEGER NOT NULL,
                cost DOUBLE PRECISION NOT NULL
            )
            """,
            "CREATE INDEX usage_day ON usage_records (day)",
            "CREATE INDEX usage_user_day ON usage_records (user_id, day)",
            "CREATE INDEX usage_chat_day ON usage_records (chat_id, day)",
            "CREATE TABLE notices (subject TEXT PRIMARY KEY, last_at BIGINT NOT NULL, message_key TEXT)",
            """
            CREATE TABLE model_keys (
                key_id TEXT PRIMARY KEY,
                fingerprint TEXT NOT NULL,
                profile TEXT NOT NULL,
                state TEXT NOT NULL,
                until_ms BIGINT,
                reason TEXT,
                checked_at BIGINT,
                secret TEXT,
                donor TEXT,
                added_at BIGINT NOT NULL
            )
            """,
        ]),
        ]
    }

    /// The newest schema version this build knows.
    public static var latestVersion: Int { migrations(.sqlite).last?.version ?? 0 }

    /// Applies pending migrations; returns the versions applied.
    @discardableResult
    public func migrate() async throws -> [Int] {
        let migrations = Self.migrations(dialect)
        // Replicas waiting behind another's migration wait as long as it takes.
        return try await transaction(timeout: .seconds(3600)) { db in
            // Replicas starting together: one migrates, the others wait here and then find nothing to do.
            try await self.lockAcrossProcesses(Self.migrationLockKey, on: db)
            try await db.raw("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)").run()
            let rows = try await db.raw("SELECT version FROM schema_migrations").all()
            let applied = Set(try rows.map { try $0.decode(column: "version", as: Int.self) })
            if let newest = applied.max(), newest > Self.latestVersion {
                throw StoreError(description: "the database has schema version \(newest), newer than this build knows (\(Self.latestVersion)); upgrade chatbridge")
            }
            var done: [Int] = []
            for migration in migrations where !applied.contains(migration.version) {
                for statement in migration.statements {
                    try await db.raw(SQLQueryString(statement)).run()
                }
                try await db.raw("INSERT INTO schema_migrations (version, applied_at) VALUES (\(bind: migration.version), \(bind: Date().millis))").run()
                done.append(migration.version)
            }
            return done
        }
    }

    public func schemaVersion() async throws -> Int {
        try await single { db in
            let row = try await db.raw("SELECT MAX(version) AS v FROM schema_migrations").first()
            return try row?.decode(column: "v", as: Int?.self) ?? 0
        }
    }

    // MARK: Inbox

    public func accept(_ message: InboundMessage, conversation: ConversationKey, now: Date) async throws -> AcceptOutcome {
        let payload = String(decoding: try Self.encoder.encode(message), as: UTF8.self)
        let at = sqlNow(now)
        let insert: SQLQueryString = """
            INSERT INTO inbox (platform, bot_id, message_id, conversation_key, payload, state, attempts, not_before, received_at, updated_at)
            VALUES (\(bind: message.platform), \(bind: message.botID), \(bind: message.messageID), \(bind: conversation.rawValue),
                    \(bind: payload), 'pending', 0, \(at), \(at), \(at))
            ON CONFLICT (platform, bot_id, message_id) DO NOTHING
            RETURNING id
            """
        // PostgreSQL: the same statement announces the message to every replica, when it commits.
        let statement: SQLQueryString = switch dialect {
        case .sqlite: insert
        case .postgres: "WITH inserted AS (\(insert)) SELECT id, CAST(pg_notify('\(unsafeRaw: Self.notifyChannel)', '') AS TEXT) AS n FROM inserted"
        }
        return try await single(priority: .urgent) { db in
            try await db.raw(statement).first() == nil ? .duplicate : .accepted
        }
    }

    public func claim(limit: Int, owner: String, leaseUntil: Date, maxAttempts: Int, now: Date) async throws -> [ClaimedRow] {
        guard limit > 0 else { return [] }
        // Every row of this claim gets its own token: one random value for the statement plus the row id.
        let batch = UUID().uuidString.lowercased()
        // One statement: take the oldest waiting message of each conversation that has none running, and
        // return it. "None running" covers every id: with several replicas a message can commit after a
        // younger one of its conversation was claimed, and must then wait for it.
        let statement = { @Sendable (limit: SQLQueryString) -> SQLQueryString in
            """
            UPDATE inbox SET state = 'running', attempts = attempts + 1, lease_owner = \(bind: owner),
                lease_token = \(bind: batch) || '-' || CAST(id AS TEXT),
                lease_expires_at = \(self.sqlTime(leaseUntil, now: now)), updated_at = \(self.sqlNow(now))
            WHERE state = 'pending' AND id IN (
                SELECT i.id FROM inbox i
                WHERE i.state = 'pending' AND i.not_before <= \(self.sqlNow(now)) AND i.attempts < \(bind: maxAttempts)
                  AND NOT EXISTS (
                    SELECT 1 FROM inbox j
                    WHERE j.conversation_key = i.conversation_key AND j.state IN ('pending', 'running')
                      AND (j.state = 'running' OR j.id < i.id))
                ORDER BY i.id
                LIMIT \(limit))
            RETURNING id, lease_token, payload, conversation_key, attempts, answer, reply_kind, reply_effect,
                delivered_parts, uncertain_sends, live_state, live_ref
            """
        }
        let rows: [any SQLRow]
        do {
            rows = try await claimRows(limit: limit, statement)
        } catch {
            // The claim may have committed all the same (given up after it did): `releaseOwnClaims` returns
            // the rows of this batch, and only of failed batches.
            noteFailedClaim(batch)
            throw error
        }
        var claimed: [ClaimedRow] = []
        claimed.reserveCapacity(rows.count)
        for row in rows {
            // A row that cannot be read is handed out as such, to be failed; it never holds up the rest.
            guard let id = try? row.decode(column: "id", as: Int64.self),
                let token = try? row.decode(column: "lease_token", as: String.self)
            else { continue }
            let lease = Lease(id: id, token: token)
            do {
                claimed.append(.ready(try Self.item(from: row, lease: lease)))
            } catch {
                claimed.append(.unreadable(lease, reason: "\(error)"))
            }
        }
        return claimed.sorted { $0.lease.id < $1.lease.id }
    }

    private static func item(from row: any SQLRow, lease: Lease) throws -> InboxItem {
        let payload = try row.decode(column: "payload", as: String.self)
        let message: InboundMessage
        do {
            message = try decoder.decode(InboundMessage.self, from: Data(payload.utf8))
        } catch {
            throw StoreError(description: "the stored message payload does not decode (\(type(of: error)))")
        }
        var reply: StoredReply?
        if let text = try row.decode(column: "answer", as: String?.self) {
            let kind = try row.decode(column: "reply_kind", as: String?.self).flatMap(StoredReply.Kind.init(rawValue:)) ?? .answer
            var effect = ConversationEffect.none
            if let json = try row.decode(column: "reply_effect", as: String?.self) {
                do {
                    effect = try decoder.decode(ConversationEffect.self, from: Data(json.utf8))
                } catch {
                    throw StoreError(description: "the stored reply's effect does not decode (\(type(of: error)))")
                }
            }
            reply = StoredReply(text: text, kind: kind, effect: effect)
        }
        return InboxItem(
            lease: lease, message: message,
            conversation: ConversationKey(rawValue: try row.decode(column: "conversation_key", as: String.self)),
            attempts: try row.decode(column: "attempts", as: Int.self), reply: reply,
            deliveredParts: try row.decode(column: "delivered_parts", as: Int.self),
            uncertainSends: try row.decode(column: "uncertain_sends", as: Int.self),
            live: LiveReplyState(rawValue: try row.decode(column: "live_state", as: String.self)) ?? .none,
            liveReference: try row.decode(column: "live_ref", as: String?.self))
    }

    /// Remembers the batch token of a claim that failed (the most recent 64).
    func noteFailedClaim(_ batch: String) {
        failedClaimBatches.withLock { batches in
            batches.append(batch)
            if batches.count > 64 { batches.removeFirst(batches.count - 64) }
        }
    }

    /// Runs the claim statement: on PostgreSQL under the claim lock, so claims are serialised across replicas.
    private func claimRows(limit: Int, _ statement: @escaping @Sendable (SQLQueryString) -> SQLQueryString) async throws -> [any SQLRow] {
        switch dialect {
        case .sqlite:
            // SQLite parses a kept statement again every time a bare `LIMIT ?` is bound (its planner reads the
            // value), so the limit is written into the statement. Powers of two keep those statements few:
            // 300 runs as 256 + 32 + 8 + 4, in one call, until a part finds fewer rows than it asked for.
            return try await single { db in
                var rows: [any SQLRow] = []
                var chunk = 1 << (Int.bitWidth - 1 - limit.leadingZeroBitCount)
                var remaining = limit
                while remaining > 0 {
                    if chunk <= remaining {
                        let found = try await db.raw(statement("\(unsafeRaw: String(chunk))")).all()
                        rows += found
                        remaining -= chunk
                        if found.count < chunk { break }
                    }
                    chunk >>= 1
                }
                return rows
            }
        case .postgres:
            // Claims are serialised across replicas, and each sees every claim committed before it (a
            // statement's snapshot starts after the lock): no conversation ever has two messages running.
            // READ COMMITTED whatever the server's default (the snapshot must start after the lock), and a
            // replica that holds the lock and hangs cannot stall the others' claims for long. Four round trips:
            // BEGIN, the settings with the lock, the claim, COMMIT (six before; `bench --database postgres`
            // profile: the claim was half of the round trips per answer).
            return try await transaction(readCommitted: true) { db in
                // The settings are made in a subquery, before the lock is waited for (a subquery with volatile
                // functions is never merged into the outer query).
                try await db.raw("""
                    SELECT pg_advisory_xact_lock(\(unsafeRaw: String(Self.claimLockKey))) FROM (
                        SELECT set_config('lock_timeout', '5s', true) AS lock_timeout,
                            set_config('idle_in_transaction_session_timeout', '10s', true) AS idle_timeout) AS settings
                    """).run()
                // The lock can take almost as long as the whole call may: a claim given up meanwhile stops here.
                try Task.checkCancellation()
                return try await db.raw(statement("\(bind: limit)")).all()
            }
        }
    }

    public func renewLeases(_ leases: [Lease], until: Date, now: Date) async throws -> Int {
        var renewed = 0
        let expiry = sqlTime(until, now: now)
        // Tokens embed their row id, so matching both lists matches each row's own token (and uses the key).
        for chunk in stride(from: 0, to: leases.count, by: 400).map({ leases[$0..<min($0 + 400, leases.count)] }) {
            let ids: [any Encodable & Sendable] = chunk.map(\.id)
            let tokens: [any Encodable & Sendable] = chunk.map(\.token)
            renewed += try await single(priority: .urgent) { db in
                try await db.raw("""
                    UPDATE inbox SET lease_expires_at = \(expiry)
                    WHERE id IN (\(binds: ids)) AND lease_token IN (\(binds: tokens)) AND state = 'running'
                    RETURNING id
                    """).all().count
            }
        }
        return renewed
    }

    /// Why a row is given up when its last allowed attempt was interrupted.
    private static let interruptedLastAttempt = "gave up: the last allowed attempt was interrupted (process stopped or lease lost) before it finished"

    public func releaseExpiredLeases(now: Date, maxAttempts: Int, keeping: Set<Lease>) async throws -> ReleasedClaims {
        let nowSQL = sqlNow(now)
        // Usually nothing has expired: one indexed look, and only then the update of the rows found.
        let expired = try await single { db in
            try await db.raw("""
                SELECT id, lease_token FROM inbox WHERE state = 'running' AND lease_expires_at < \(nowSQL)
                """).all().compactMap { row -> Lease? in
                guard let id = try? row.decode(column: "id", as: Int64.self),
                    let token = try? row.decode(column: "lease_token", as: String.self)
                else { return nil }
                return Lease(id: id, token: token)
            }
        }
        let candidates = expired.filter { !keeping.contains($0) }
        var released = ReleasedClaims()
        for start in stride(from: 0, to: candidates.count, by: 400) {
            let chunk = candidates[start..<min(start + 400, candidates.count)]
            let ids: [any Encodable & Sendable] = chunk.map(\.id)
            let tokens: [any Encodable & Sendable] = chunk.map(\.token)
            let rows = try await single { db in
                try await db.raw("""
                    UPDATE inbox SET \(Self.releasing(maxAttempts: maxAttempts, now: nowSQL))
                    WHERE id IN (\(binds: ids)) AND lease_token IN (\(binds: tokens)) AND state = 'running'
                      AND lease_expires_at < \(nowSQL)
                    RETURNING \(Self.releasedColumns)
                    """).all()
            }
            let chunkReleased = Self.released(rows)
            released.requeued += chunkReleased.requeued
            released.gaveUp += chunkReleased.gaveUp
            released.gaveUpLive += chunkReleased.gaveUpLive
        }
        return released
    }

    public func releaseOwnClaims(owner: String, keeping: Set<Lease>, now: Date) async throws -> Int {
        let nowSQL = sqlNow(now)
        // Only rows of a claim that failed: a row left running by an attempt that ended without closing its
        // claim (it is retried after its lease) keeps its lease and its attempt.
        let batches = failedClaimBatches.withLock { $0 }
        guard !batches.isEmpty else { return 0 }
        let fromFailedClaims = batches.map { batch -> SQLQueryString in "lease_token LIKE \(bind: batch + "-%")" }.joined(separator: " OR ")
        let held = try await single { db in
            try await db.raw("""
                SELECT id, lease_token FROM inbox WHERE state = 'running' AND lease_owner = \(bind: owner) AND (\(fromFailedClaims))
                """).all().compactMap { row -> Lease? in
                guard let id = try? row.decode(column: "id", as: Int64.self),
                    let token = try? row.decode(column: "lease_token", as: String.self)
                else { return nil }
                return Lease(id: id, token: token)
            }
        }
        let orphans = held.filter { !keeping.contains($0) }
        var released = 0
        for start in stride(from: 0, to: orphans.count, by: 400) {
            let chunk = orphans[start..<min(start + 400, orphans.count)]
            let ids: [any Encodable & Sendable] = chunk.map(\.id)
            let tokens: [any Encodable & Sendable] = chunk.map(\.token)
            released += try await single { db in
                try await db.raw("""
                    UPDATE inbox SET state = 'pending', attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END,
                      lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = \(nowSQL)
                    WHERE id IN (\(binds: ids)) AND lease_token IN (\(binds: tokens)) AND state = 'running'
                      AND lease_owner = \(bind: owner)
                    RETURNING id
                    """).all().count
            }
        }
        return released
    }

    /// With a shared database (PostgreSQL) the running rows of other replicas are theirs: only expired
    /// claims are released, as the reaper would.
    public func reclaimRunning(now: Date, maxAttempts: Int) async throws -> ReleasedClaims {
        let nowSQL = sqlNow(now)
        let running: SQLQueryString = location.isShared ? "state = 'running' AND lease_expires_at < \(nowSQL)" : "state = 'running'"
        return try await single { db in
            Self.released(try await db.raw("""
                UPDATE inbox SET \(Self.releasing(maxAttempts: maxAttempts, now: nowSQL))
                WHERE (\(running)) OR (state = 'pending' AND attempts >= \(bind: maxAttempts))
                RETURNING \(Self.releasedColumns)
                """).all())
        }
    }

    /// Returns an abandoned claim to the queue, or gives it up when it has used its last allowed attempt.
    private static func releasing(maxAttempts: Int, now: SQLQueryString) -> SQLQueryString {
        """
        state = CASE WHEN attempts >= \(bind: maxAttempts) THEN 'failed' ELSE 'pending' END,
        last_error = CASE WHEN attempts >= \(bind: maxAttempts) THEN \(bind: interruptedLastAttempt) ELSE last_error END,
        answered_at = CASE WHEN attempts >= \(bind: maxAttempts) THEN \(now) ELSE answered_at END,
        lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = \(now)
        """
    }

    /// What a release returns: the new state, and for a message given up while its live reply may be
    /// showing, the message (so the reply can be told).
    private static let releasedColumns = SQLQueryString("""
        state, CASE WHEN state = 'failed' AND live_state IN ('opening', 'opened') THEN payload END AS live_payload, live_ref,
        answer, reply_kind
        """)

    private static func released(_ rows: [any SQLRow]) -> ReleasedClaims {
        var result = ReleasedClaims()
        for row in rows {
            guard (try? row.decode(column: "state", as: String.self)) == "failed" else {
                result.requeued += 1
                continue
            }
            result.gaveUp += 1
            if let payload = try? row.decode(column: "live_payload", as: String?.self),
                let message = try? decoder.decode(InboundMessage.self, from: Data(payload.utf8))
            {
                let reference = try? row.decode(column: "live_ref", as: String?.self)
                var reply: StoredReply?
                if let text = try? row.decode(column: "answer", as: String?.self) {
                    let kind = (try? row.decode(column: "reply_kind", as: String?.self)).flatMap { $0.flatMap(StoredReply.Kind.init(rawValue:)) } ?? .answer
                    reply = StoredReply(text: text, kind: kind, effect: .none)
                }
                result.gaveUpLive.append(LiveReplyAddress(message: message, reference: reference, reply: reply))
            }
        }
        return result
    }

    public func storeReply(_ reply: StoredReply, for lease: Lease, error: String?, now: Date) async throws {
        try await update(lease, set: "\(try Self.replyColumns(reply, error: error)), updated_at = \(sqlNow(now))")
    }

    public func storeReply(
        _ reply: StoredReply, for lease: Lease, error: String?, beginningSendUntil leaseUntil: Date, uncertainSends: Int, now: Date
    ) async throws {
        try await update(lease, set: """
            \(try Self.replyColumns(reply, error: error)), uncertain_sends = \(bind: uncertainSends),
            lease_expires_at = \(sqlTime(leaseUntil, now: now)), updated_at = \(sqlNow(now))
            """)
    }

    /// The columns a stored reply sets (the error reason kept when there is none now).
    private static func replyColumns(_ reply: StoredReply, error: String?) throws -> SQLQueryString {
        let effect = String(decoding: try encoder.encode(reply.effect), as: UTF8.self)
        return """
            answer = \(bind: reply.text), reply_kind = \(bind: reply.kind.rawValue), reply_effect = \(bind: effect),
            last_error = COALESCE(\(bind: error), last_error)
            """
    }

    public func beginSend(_ lease: Lease, uncertainSends: Int, leaseUntil: Date, now: Date) async throws {
        try await update(lease, set: """
            uncertain_sends = \(bind: uncertainSends), lease_expires_at = \(sqlTime(leaseUntil, now: now)), updated_at = \(sqlNow(now))
            """)
    }

    public func recordLive(_ lease: Lease, state: LiveReplyState, reference: String?, now: Date) async throws {
        try await update(lease, set: """
            live_state = \(bind: state.rawValue), live_ref = COALESCE(\(bind: reference), live_ref), updated_at = \(sqlNow(now))\(unsafeRaw:
                state == .declined ? ", attempts = 1" : "")
            """)
    }

    public func recordDelivered(_ lease: Lease, parts: Int, now: Date) async throws {
        try await update(lease, set: "delivered_parts = \(bind: parts), uncertain_sends = 0, updated_at = \(sqlNow(now))")
    }

    public func finish(_ lease: Lease, reply: StoredReply, conversation: ConversationKey, now: Date) async throws {
        let state = reply.kind == .answer ? "answered" : "failed"
        let statement = Self.update(lease, set: """
            state = \(bind: state), uncertain_sends = 0, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
            updated_at = \(sqlNow(now)), answered_at = \(sqlNow(now))
            """)
        try await transaction { db in
            guard try await db.raw(statement).all().count == 1 else { throw LeaseLost(lease) }
            if reply.effect == .forgetQuestion { try await Self.forgetText(ofRow: lease.id, on: db) }
            if reply.kind == .answer { try await Self.apply(reply.effect, to: conversation, on: db) }
        }
    }

    public func scheduleRetry(_ lease: Lease, notBefore: Date, error: String, lastSendFailed: Bool, now: Date) async throws {
        try await update(lease, set: """
            state = 'pending', lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
            not_before = \(sqlTime(notBefore, now: now)), last_error = \(bind: error),
            uncertain_sends = uncertain_sends - \(bind: lastSendFailed ? 1 : 0), updated_at = \(sqlNow(now))
            """)
    }

    public func markFailed(_ lease: Lease, error: String, lastSendFailed: Bool, now: Date) async throws {
        try await update(lease, set: """
            state = 'failed', lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, last_error = \(bind: error),
            uncertain_sends = uncertain_sends - \(bind: lastSendFailed ? 1 : 0),
            updated_at = \(sqlNow(now)), answered_at = \(sqlNow(now))
            """)
    }

    /// The statement of every write on a claimed row: it changes the row only while `lease` holds it.
    private static func update(_ lease: Lease, set assignments: SQLQueryString) -> SQLQueryString {
        """
        UPDATE inbox SET \(assignments)
        WHERE id = \(bind: lease.id) AND lease_token = \(bind: lease.token) AND state = 'running'
        RETURNING id
        """
    }

    /// Runs one write on a claimed row; it must change exactly that row.
    private func update(_ lease: Lease, set assignments: SQLQueryString) async throws {
        let statement = Self.update(lease, set: assignments)
        let changed = try await single { db in try await db.raw(statement).all().count }
        guard changed == 1 else { throw LeaseLost(lease) }
    }

    public func nextWakeup(now: Date) async throws -> Date? {
        let nowSQL = sqlNow(now)
        return try await single { db in
            let row = try await db.raw("SELECT MIN(not_before) - \(nowSQL) AS t FROM inbox WHERE state = 'pending'").first()
            return try row?.decode(column: "t", as: Int64?.self).map { now.addingTimeInterval(Double($0) / 1000) }
        }
    }

    public func counts() async throws -> InboxCounts {
        // SQLite may otherwise scan the whole history (dialect).
        let hint = dialect == .sqlite ? "INDEXED BY inbox_open" : ""
        return try await single { db in
            let rows = try await db.raw("""
                SELECT state, COUNT(*) AS n FROM inbox \(unsafeRaw: hint) WHERE state IN ('pending', 'running') GROUP BY state
                """).all()
            var counts = InboxCounts()
            for row in rows {
                let n = try row.decode(column: "n", as: Int.self)
                switch try row.decode(column: "state", as: String.self) {
                case "pending": counts.pending = n
                case "running": counts.running = n
                default: break
                }
            }
            return counts
        }
    }

    /// A row of the inbox as stored, for tests and diagnostics.
    public struct InboxRow: Sendable, Equatable {
        public var id: Int64
        public var messageID: String
        public var state: String
        public var attempts: Int
        public var answer: String?
        public var lastError: String?
        public var leaseToken: String?
        public var deliveredParts: Int
        public var uncertainSends: Int
        public var notBefore: Date
        public var live: String
    }

    public func inboxRows() async throws -> [InboxRow] {
        try await single { db in
            try await db.raw("""
                SELECT id, message_id, state, attempts, answer, last_error, lease_token, delivered_parts, uncertain_sends, not_before,
                    live_state
                FROM inbox ORDER BY id
                """).all().map { row in
                InboxRow(
                    id: try row.decode(column: "id", as: Int64.self),
                    messageID: try row.decode(column: "message_id", as: String.self),
                    state: try row.decode(column: "state", as: String.self),
                    attempts: try row.decode(column: "attempts", as: Int.self),
                    answer: try row.decode(column: "answer", as: String?.self),
                    lastError: try row.decode(column: "last_error", as: String?.self),
                    leaseToken: try row.decode(column: "lease_token", as: String?.self),
                    deliveredParts: try row.decode(column: "delivered_parts", as: Int.self),
                    uncertainSends: try row.decode(column: "uncertain_sends", as: Int.self),
                    notBefore: Date(millis: try row.decode(column: "not_before", as: Int64.self)),
                    live: try row.decode(column: "live_state", as: String.self)
                )
            }
        }
    }

    /// The stored messages as normalised at the door, oldest first, for tests and diagnostics.
    public func storedMessages() async throws -> [InboundMessage] {
        try await single { db in
            try await db.raw("SELECT payload FROM inbox ORDER BY id").all().map { row in
                try Self.decoder.decode(InboundMessage.self, from: Data(try row.decode(column: "payload", as: String.self).utf8))
            }
        }
    }

    // MARK: Conversations

    public func recentTurns(_ key: ConversationKey, limit: Int) async throws -> [Turn] {
        guard limit > 0 else { return [] }
        return try await single { db in try await Self.turns(key, limit: limit, on: db) }
    }

    /// The LIMIT is written into the statement (an integer), here and in the claim: SQLite's planner reads
    /// a bound LIMIT's value, which marks the kept statement expired each time it is bound, so it was
    /// parsed again on every call (the profile of `chatbridge bench` showed `sqlite3Reprepare` at 2.9% of
    /// the server's CPU).
    static func turns(_ key: ConversationKey, limit: Int, on db: any SQLDatabase) async throws -> [Turn] {
        guard limit > 0 else { return [] }
        let rows = try await db.raw("""
            SELECT role, content, tokens, created_at FROM turns
            WHERE conversation_key = \(bind: key.rawValue)
              AND seq > COALESCE((SELECT context_start_seq FROM conversations WHERE conversation_key = \(bind: key.rawValue)), 0)
            ORDER BY seq DESC
            LIMIT \(unsafeRaw: String(limit))
            """).all()
        return try rows.reversed().map { row in
            Turn(
                role: Turn.Role(rawValue: try row.decode(column: "role", as: String.self)) ?? .user,
                content: try row.decode(column: "content", as: String.self),
                tokens: try row.decode(column: "tokens", as: Int.self),
                createdAt: Date(millis: try row.decode(column: "created_at", as: Int64.self))
            )
        }
    }

    public func apply(_ effect: ConversationEffect, to key: ConversationKey) async throws {
        try await transaction { db in try await Self.apply(effect, to: key, on: db) }
    }

    /// Replaces the text of a stored message (one that carried a secret) with a placeholder.
    private static func forgetText(ofRow id: Int64, on db: any SQLDatabase) async throws {
        guard let payload = try await db.raw("SELECT payload FROM inbox WHERE id = \(bind: id)").first()?.decode(column: "payload", as: String.self),
              var message = try? decoder.decode(InboundMessage.self, from: Data(payload.utf8)) else { return }
        message.body = .text("(removed: it carried an API key)")
        let redacted = String(decoding: try encoder.encode(message), as: UTF8.self)
        try await db.raw("UPDATE inbox SET payload = \(bind: redacted) WHERE id = \(bind: id)").run()
    }

    private static func apply(_ effect: ConversationEffect, to key: ConversationKey, on db: any SQLDatabase) async throws {
        let platform = String(key.rawValue.prefix(while: { $0 != "/" }))
        switch effect {
        case .none:
            return
        case .reset(let at):
            try await db.raw("""
                INSERT INTO conversations (conversation_key, platform, last_activity, last_seq, context_start_seq)
                VALUES (\(bind: key.rawValue), \(bind: platform), \(bind: at.millis), 0, 0)
                ON CONFLICT (conversation_key) DO UPDATE SET context_start_seq = conversations.last_seq, last_activity = excluded.last_activity
                """).run()
        case .resetAll(let at):
            try await db.raw("""
                INSERT INTO conversations (conversation_key, platform, last_activity, last_seq, context_start_seq)
                VALUES (\(bind: key.rawValue), \(bind: platform), \(bind: at.millis), 0, 0)
                ON CONFLICT (conversation_key) DO UPDATE SET context_start_seq = conversations.last_seq, last_activity = excluded.last_activity,
                    settings = NULL
                """).run()
        case .forgetQuestion:
            return
        case .preferences(let preferences):
            let json = preferences.isEmpty ? nil : String(decoding: try JSONEncoder().encode(preferences), as: UTF8.self)
            try await db.raw("""
                INSERT INTO conversations (conversation_key, platform, last_activity, last_seq, context_start_seq, settings)
                VALUES (\(bind: key.rawValue), \(bind: platform), 0, 0, 0, \(bind: json))
                ON CONFLICT (conversation_key) DO UPDATE SET settings = excluded.settings
                """).run()
        case .appendExchange(let question, let answer):
            let row = try await db.raw("""
                INSERT INTO conversations (conversation_key, platform, last_activity, last_seq, context_start_seq)
                VALUES (\(bind: key.rawValue), \(bind: platform), \(bind: answer.createdAt.millis), 2, 0)
                ON CONFLICT (conversation_key) DO UPDATE SET last_seq = conversations.last_seq + 2, last_activity = excluded.last_activity
                RETURNING last_seq
                """).first()
            guard let lastSeq = try row?.decode(column: "last_seq", as: Int64.self) else {
                throw StoreError(description: "could not advance conversation \(key)")
            }
            try await db.raw("""
                INSERT INTO turns (conversation_key, seq, role, content, tokens, created_at)
                VALUES (\(bind: key.rawValue), \(bind: lastSeq - 1), \(bind: question.role.rawValue), \(bind: question.content),
                        \(bind: question.tokens), \(bind: question.createdAt.millis)),
                       (\(bind: key.rawValue), \(bind: lastSeq), \(bind: answer.role.rawValue), \(bind: answer.content),
                        \(bind: answer.tokens), \(bind: answer.createdAt.millis))
                """).run()
        }
    }
}

/// Resumes one continuation with whichever outcome arrives first.
private final class FirstOutcome<R: Sendable>: Sendable {
    private let continuation = Mutex<CheckedContinuation<R, any Error>?>(nil)

    func wait(_ waiting: CheckedContinuation<R, any Error>) { continuation.withLock { $0 = waiting } }

    /// Returns whether this outcome was the first.
    func resume(_ result: Result<R, any Error>) -> Bool {
        guard let waiting = continuation.withLock({ $0.take() }) else { return false }
        waiting.resume(with: result)
        return true
    }
}

/// Holds one background task, to be cancelled at close.
final class TaskSlot: Sendable {
    private let task = Mutex<Task<Void, Never>?>(nil)
    func put(_ new: Task<Void, Never>) { task.withLock { $0?.cancel(); $0 = new } }
    func take() -> Task<Void, Never>? { task.withLock { $0.take() } }
}

extension Date {
    var millis: Int64 { Int64((timeIntervalSince1970 * 1000).rounded()) }
    init(millis: Int64) { self.init(timeIntervalSince1970: Double(millis) / 1000) }
}
