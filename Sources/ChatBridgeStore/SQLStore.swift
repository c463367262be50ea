import ChatBridgeCore
import Foundation
import Logging
import NIOCore
import NIOPosix
import SQLKit
import SQLiteKit

/// The SQL implementation of ``Inbox`` and ``ConversationStore``, written once against SQLKit.
///
/// With SQLite one connection serves the process and one lock file keeps other processes away; every
/// operation runs as one serialised transaction. Timestamps are stored as integer milliseconds.
public final class SQLStore: Inbox, ConversationStore, Sendable {
    public struct StoreError: Error, CustomStringConvertible {
        public var description: String
    }

    private let connection: SQLiteConnection
    private let database: any SQLDatabase
    private let mutex = AsyncMutex()
    private let lock: ProcessLock?
    private let logger: Logger
    public let location: DatabaseLocation

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

    private init(connection: SQLiteConnection, lock: ProcessLock?, location: DatabaseLocation, logger: Logger) {
        self.connection = connection
        self.database = connection.sql(queryLogLevel: .trace)
        self.lock = lock
        self.location = location
        self.logger = logger
    }

    /// Opens (creating it if needed) the database, takes the process lock and applies migrations.
    public static func open(_ location: DatabaseLocation, logger: Logger) async throws -> SQLStore {
        let storage: SQLiteConnection.Storage
        var lock: ProcessLock?
        switch location {
        case .sqliteMemory:
            storage = .memory
        case .sqliteFile(let path):
            let directory = (path as NSString).deletingLastPathComponent
            if !directory.isEmpty {
                do {
                    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
                } catch {
                    throw StoreError(description: "cannot create the database directory \(directory): \(error.localizedDescription)")
                }
            }
            lock = try ProcessLock(path: path + ".lock")
            storage = .file(path: path)
        }
        let connection: SQLiteConnection
        do {
            connection = try await SQLiteConnection.open(storage: storage, logger: logger)
        } catch {
            throw StoreError(description: "cannot open the SQLite database \(location): \(error)")
        }
        let store = SQLStore(connection: connection, lock: lock, location: location, logger: logger)
        do {
            try await store.configure()
            try await store.migrate()
        } catch {
            try? await connection.close()
            throw error
        }
        return store
    }

    public func close() async {
        try? await connection.close()
    }

    private func configure() async throws {
        if case .sqliteFile = location {
            try await database.raw("PRAGMA journal_mode = WAL").run()
        }
        try await database.raw("PRAGMA synchronous = NORMAL").run()
        try await database.raw("PRAGMA busy_timeout = 5000").run()
    }

    // MARK: Transactions

    /// Runs `body` in one transaction; nothing else touches the connection meanwhile.
    func transaction<R: Sendable>(_ body: @Sendable (any SQLDatabase) async throws -> R) async throws -> R {
        try await mutex.withLock {
            try await database.raw("BEGIN IMMEDIATE").run()
            do {
                let result = try await body(database)
                try await database.raw("COMMIT").run()
                return result
            } catch {
                try? await database.raw("ROLLBACK").run()
                throw error
            }
        }
    }

    /// Runs one statement on its own (SQLite commits it by itself); nothing else touches the connection meanwhile.
    func single<R: Sendable>(priority: AsyncMutex.Priority = .background, _ body: @Sendable (any SQLDatabase) async throws -> R) async throws -> R {
        try await mutex.withLock(priority: priority) { try await body(database) }
    }

    // MARK: Migrations

    static let migrations: [(version: Int, statements: [String])] = [
        (1, [
            """
            CREATE TABLE inbox (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
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
    ]

    /// The newest schema version this build knows.
    public static var latestVersion: Int { migrations.last?.version ?? 0 }

    /// Applies pending migrations; returns the versions applied.
    @discardableResult
    public func migrate() async throws -> [Int] {
        try await transaction { db in
            try await db.raw("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)").run()
            let rows = try await db.raw("SELECT version FROM schema_migrations").all()
            let applied = Set(try rows.map { try $0.decode(column: "version", as: Int.self) })
            if let newest = applied.max(), newest > Self.latestVersion {
                throw StoreError(description: "the database has schema version \(newest), newer than this build knows (\(Self.latestVersion)); upgrade chatbridge")
            }
            var done: [Int] = []
            for migration in Self.migrations where !applied.contains(migration.version) {
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
        let millis = now.millis
        return try await single(priority: .urgent) { db in
            let row = try await db.raw("""
                INSERT INTO inbox (platform, bot_id, message_id, conversation_key, payload, state, attempts, not_before, received_at, updated_at)
                VALUES (\(bind: message.platform), \(bind: message.botID), \(bind: message.messageID), \(bind: conversation.rawValue),
                        \(bind: payload), 'pending', 0, \(bind: millis), \(bind: millis), \(bind: millis))
                ON CONFLICT (platform, bot_id, message_id) DO NOTHING
                RETURNING id
                """).first()
            return row == nil ? .duplicate : .accepted
        }
    }

    public func claim(limit: Int, owner: String, leaseUntil: Date, now: Date) async throws -> [InboxItem] {
        guard limit > 0 else { return [] }
        let nowMillis = now.millis
        let leaseMillis = leaseUntil.millis
        // One statement: take the oldest ready message of each idle conversation and return it.
        let rows = try await single { db in
            try await db.raw("""
                UPDATE inbox SET state = 'running', attempts = attempts + 1, lease_owner = \(bind: owner),
                    lease_expires_at = \(bind: leaseMillis), updated_at = \(bind: nowMillis)
                WHERE id IN (
                    SELECT i.id FROM inbox i
                    WHERE i.state = 'pending' AND i.not_before <= \(bind: nowMillis)
                      AND NOT EXISTS (
                        SELECT 1 FROM inbox j
                        WHERE j.conversation_key = i.conversation_key AND j.state IN ('pending', 'running') AND j.id < i.id)
                    ORDER BY i.id
                    LIMIT \(bind: limit))
                RETURNING id, payload, conversation_key, attempts, answer, delivered_parts
                """).all()
        }
        var items: [InboxItem] = []
        items.reserveCapacity(rows.count)
        for row in rows {
            let payload = try row.decode(column: "payload", as: String.self)
            items.append(InboxItem(
                id: try row.decode(column: "id", as: Int64.self),
                message: try Self.decoder.decode(InboundMessage.self, from: Data(payload.utf8)),
                conversation: ConversationKey(rawValue: try row.decode(column: "conversation_key", as: String.self)),
                attempts: try row.decode(column: "attempts", as: Int.self),
                storedAnswer: try row.decode(column: "answer", as: String?.self),
                deliveredParts: try row.decode(column: "delivered_parts", as: Int.self)
            ))
        }
        return items.sorted { $0.id < $1.id }
    }

    public func releaseExpiredLeases(now: Date) async throws -> Int {
        let nowMillis = now.millis
        return try await single { db in
            try await db.raw("""
                UPDATE inbox SET state = 'pending', lease_owner = NULL, lease_expires_at = NULL, updated_at = \(bind: nowMillis)
                WHERE state = 'running' AND lease_expires_at < \(bind: nowMillis)
                RETURNING id
                """).all().count
        }
    }

    public func storeAnswer(id: Int64, owner: String, resolution: Resolution, key: ConversationKey, now: Date) async throws {
        let millis = now.millis
        try await transaction { db in
            let updated = try await db.raw("""
                UPDATE inbox SET answer = \(bind: resolution.text), updated_at = \(bind: millis)
                WHERE id = \(bind: id) AND state = 'running' AND lease_owner = \(bind: owner)
                RETURNING id
                """).first()
            guard updated != nil else {
                throw StoreError(description: "message \(id) is no longer claimed by this worker; its answer was not stored")
            }
            try await Self.apply(resolution.effect, to: key, on: db)
        }
    }

    public func markPartsDelivered(id: Int64, owner: String, count: Int) async throws {
        try await single { db in
            try await db.raw("""
                UPDATE inbox SET delivered_parts = \(bind: count) WHERE id = \(bind: id) AND lease_owner = \(bind: owner)
                """).run()
        }
    }

    public func markAnswered(id: Int64, owner: String, now: Date) async throws {
        try await finish(id: id, owner: owner, state: "answered", error: nil, now: now)
    }

    public func markFailed(id: Int64, owner: String, error: String, now: Date) async throws {
        try await finish(id: id, owner: owner, state: "failed", error: error, now: now)
    }

    private func finish(id: Int64, owner: String, state: String, error: String?, now: Date) async throws {
        let millis = now.millis
        try await single { db in
            try await db.raw("""
                UPDATE inbox SET state = \(bind: state), lease_owner = NULL, lease_expires_at = NULL,
                    last_error = COALESCE(\(bind: error), last_error), updated_at = \(bind: millis), answered_at = \(bind: millis)
                WHERE id = \(bind: id) AND lease_owner = \(bind: owner)
                """).run()
        }
    }

    public func scheduleRetry(id: Int64, owner: String, notBefore: Date, error: String, now: Date) async throws {
        let millis = now.millis
        try await single { db in
            try await db.raw("""
                UPDATE inbox SET state = 'pending', lease_owner = NULL, lease_expires_at = NULL,
                    not_before = \(bind: notBefore.millis), last_error = \(bind: error), updated_at = \(bind: millis)
                WHERE id = \(bind: id) AND lease_owner = \(bind: owner)
                """).run()
        }
    }

    public func reclaimRunning(now: Date) async throws -> Int {
        let millis = now.millis
        return try await single { db in
            let rows = try await db.raw("""
                UPDATE inbox SET state = 'pending', lease_owner = NULL, lease_expires_at = NULL, updated_at = \(bind: millis)
                WHERE state = 'running'
                RETURNING id
                """).all()
            return rows.count
        }
    }

    public func renewLeases(ids: [Int64], owner: String, leaseUntil: Date) async throws {
        guard !ids.isEmpty else { return }
        let binds: [any Encodable & Sendable] = ids
        try await single { db in
            try await db.raw("""
                UPDATE inbox SET lease_expires_at = \(bind: leaseUntil.millis)
                WHERE lease_owner = \(bind: owner) AND state = 'running' AND id IN (\(binds: binds))
                """).run()
        }
    }

    public func nextWakeup() async throws -> Date? {
        try await single { db in
            let row = try await db.raw("SELECT MIN(not_before) AS t FROM inbox WHERE state = 'pending'").first()
            return try row?.decode(column: "t", as: Int64?.self).map(Date.init(millis:))
        }
    }

    public func counts() async throws -> InboxCounts {
        try await single { db in
            let rows = try await db.raw("""
                SELECT state, COUNT(*) AS n FROM inbox INDEXED BY inbox_open WHERE state IN ('pending', 'running') GROUP BY state
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
        public var messageID: String
        public var state: String
        public var attempts: Int
        public var answer: String?
        public var lastError: String?
    }

    public func inboxRows() async throws -> [InboxRow] {
        try await single { db in
            try await db.raw("SELECT message_id, state, attempts, answer, last_error FROM inbox ORDER BY id").all().map { row in
                InboxRow(
                    messageID: try row.decode(column: "message_id", as: String.self),
                    state: try row.decode(column: "state", as: String.self),
                    attempts: try row.decode(column: "attempts", as: Int.self),
                    answer: try row.decode(column: "answer", as: String?.self),
                    lastError: try row.decode(column: "last_error", as: String?.self)
                )
            }
        }
    }

    // MARK: Conversations

    public func recentTurns(_ key: ConversationKey, limit: Int) async throws -> [Turn] {
        guard limit > 0 else { return [] }
        return try await single { db in
            let rows = try await db.raw("""
                SELECT role, content, tokens, created_at FROM turns
                WHERE conversation_key = \(bind: key.rawValue)
                  AND seq > COALESCE((SELECT context_start_seq FROM conversations WHERE conversation_key = \(bind: key.rawValue)), 0)
                ORDER BY seq DESC
                LIMIT \(bind: limit)
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
    }

    public func apply(_ effect: ConversationEffect, to key: ConversationKey) async throws {
        try await transaction { db in try await Self.apply(effect, to: key, on: db) }
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

extension Date {
    var millis: Int64 { Int64((timeIntervalSince1970 * 1000).rounded()) }
    init(millis: Int64) { self.init(timeIntervalSince1970: Double(millis) / 1000) }
}
