import ChatBridgeCore
import Foundation
import SQLKit

/// The operator controls' counters (limits, usage, notices) and model keys' health, on both databases.
/// Every count is a query over rows keyed by message, so a retried message is counted once and every
/// replica sees the same numbers.
extension SQLStore: UsageLedger, KeyHealthStore {
    // MARK: Limits

    public func admit(_ record: RequestRecord, limits: RequestLimits, minuteAgo: Date) async throws -> Admission {
        let dialect = self.dialect
        // Without a question limit nothing is written: one statement outside a transaction does.
        let run: (@escaping @Sendable (any SQLDatabase) async throws -> Admission) async throws -> Admission = limits.countsQuestions
            // READ COMMITTED on PostgreSQL, whatever the server's default (in the BEGIN itself): the count must
            // see every admission committed before the lock was granted.
            ? { try await self.transaction(readCommitted: true, $0) } : { try await self.single($0) }
        return try await run { db in
            if dialect == .postgres && limits.countsQuestions {
                // One user's questions are admitted one at a time across replicas (the two-key lock space).
                try await db.raw("SELECT pg_advisory_xact_lock(\(unsafeRaw: String(Self.admissionLockKey)), hashtext(\(bind: record.user)))").run()
            }
            let noTokens: SQLQueryString = "CAST(0 AS BIGINT)"
            let userTokens: SQLQueryString = limits.userDailyTokens == nil ? noTokens : """
                (SELECT CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT) FROM usage_records
                 WHERE user_id = \(bind: record.user) AND day = \(bind: record.day) AND message_key <> \(bind: record.messageKey))
                """
            let chatTokens: SQLQueryString = limits.chatDailyTokens == nil ? noTokens : """
                (SELECT CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT) FROM usage_records
                 WHERE chat_id = \(bind: record.chat) AND day = \(bind: record.day) AND message_key <> \(bind: record.messageKey))
                """
            let row = try await db.raw("""
                SELECT
                    (SELECT CAST(COUNT(*) AS BIGINT) FROM requests WHERE message_key = \(bind: record.messageKey)) AS known,
                    (SELECT CAST(COUNT(*) AS BIGINT) FROM requests
                     WHERE user_id = \(bind: record.user) AND at_ms >= \(bind: minuteAgo.millis) AND message_key <> \(bind: record.messageKey)) AS minute,
                    (SELECT MIN(at_ms) FROM requests
                     WHERE user_id = \(bind: record.user) AND at_ms >= \(bind: minuteAgo.millis) AND message_key <> \(bind: record.messageKey)) AS oldest,
                    (SELECT CAST(COUNT(*) AS BIGINT) FROM requests
                     WHERE user_id = \(bind: record.user) AND day = \(bind: record.day) AND message_key <> \(bind: record.messageKey)) AS today,
                    \(userTokens) AS user_tokens,
                    \(chatTokens) AS chat_tokens
                """).first()
            guard let row else { throw StoreError(description: "the limit check returned nothing") }
            if try row.decode(column: "known", as: Int.self) > 0 { return .admitted }
            if let limit = limits.perMinute, try row.decode(column: "minute", as: Int.self) >= limit {
                let oldest = try row.decode(column: "oldest", as: Int64?.self).map(Date.init(millis:)) ?? record.at
                return .perMinute(oldest: oldest)
            }
            if let limit = limits.perDay, try row.decode(column: "today", as: Int.self) >= limit { return .perDay }
            if let limit = limits.userDailyTokens, try row.decode(column: "user_tokens", as: Int.self) >= limit { return .userDailyTokens }
            if let limit = limits.chatDailyTokens, try row.decode(column: "chat_tokens", as: Int.self) >= limit { return .chatDailyTokens }
            if limits.countsQuestions {
                try await db.raw("""
                    INSERT INTO requests (message_key, user_id, chat_id, day, at_ms)
                    VALUES (\(bind: record.messageKey), \(bind: record.user), \(bind: record.chat), \(bind: record.day), \(bind: record.at.millis))
                    ON CONFLICT (message_key) DO NOTHING
                    """).run()
            }
            return .admitted
        }
    }

    /// The first key of the two-key advisory locks that admit one user's questions at a time.
    static let admissionLockKey = 0x4342

    // MARK: Usage

    public func recordUsage(_ record: UsageRecord) async throws {
        try await single { db in
            try await db.raw("""
                INSERT INTO usage_records (message_key, day, at_ms, platform, chat_id, user_id, profile, model, key_fingerprint,
                    prompt_tokens, completion_tokens, estimated, cost)
                VALUES (\(bind: record.messageKey), \(bind: record.day), \(bind: record.at.millis), \(bind: record.platform),
                    \(bind: record.chat), \(bind: record.user), \(bind: record.profile), \(bind: record.model), \(bind: record.keyFingerprint),
                    \(bind: record.promptTokens), \(bind: record.completionTokens), \(bind: record.estimated ? 1 : 0), \(bind: record.cost))
                ON CONFLICT (message_key) DO UPDATE SET
                    prompt_tokens = usage_records.prompt_tokens + excluded.prompt_tokens,
                    completion_tokens = usage_records.completion_tokens + excluded.completion_tokens,
                    cost = usage_records.cost + excluded.cost,
                    profile = excluded.profile, model = excluded.model, key_fingerprint = excluded.key_fingerprint,
                    estimated = excluded.estimated
                """).run()
        }
    }

    public func usage(_ query: UsageQuery) async throws -> [UsageTotal] {
        var conditions: [SQLQueryString] = []
        if let since = query.since { conditions.append("day >= \(bind: since)") }
        if let until = query.until { conditions.append("day <= \(bind: until)") }
        if let user = query.user { conditions.append("user_id = \(bind: user)") }
        if let chat = query.chat { conditions.append("chat_id = \(bind: chat)") }
        let filter: SQLQueryString = conditions.isEmpty ? "" : "WHERE \(conditions.joined(separator: " AND "))"
        let group: String? = switch query.grouping {
        case .user: "user_id"
        case .chat: "chat_id"
        case .model: "model"
        case .key: "key_fingerprint"
        case .day: "day"
        case .total: nil
        }
        let select = group ?? "'total'"
        let grouping = group.map { "GROUP BY \($0)" } ?? ""
        let order = query.grouping == .day ? "ORDER BY g" : group == nil ? "" : "ORDER BY tokens DESC, g"
        let limit = query.limit.map { "LIMIT \($0)" } ?? ""
        return try await single { db in
            try await db.raw("""
                SELECT \(unsafeRaw: select) AS g, CAST(COUNT(*) AS BIGINT) AS answers,
                       CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT) AS prompt, CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) AS completion,
                       CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT) AS tokens,
                       CAST(COALESCE(SUM(cost), 0) AS DOUBLE PRECISION) AS cost
                FROM usage_records \(filter) \(unsafeRaw: grouping) \(unsafeRaw: order) \(unsafeRaw: limit)
                """).all().map { row in
                UsageTotal(
                    group: try row.decode(column: "g", as: String.self), answers: try row.decode(column: "answers", as: Int.self),
                    promptTokens: try row.decode(column: "prompt", as: Int.self),
                    completionTokens: try row.decode(column: "completion", as: Int.self),
                    cost: try row.decode(column: "cost", as: Double.self))
            }
        }
    }

    public func claimNotice(_ subject: String, period: Duration, messageKey: String, now: Date) async throws -> Bool {
        let before = now.millis - Int64(period.components.seconds * 1000)
        return try await single { db in
            try await db.raw("""
                INSERT INTO notices (subject, last_at, message_key) VALUES (\(bind: subject), \(bind: now.millis), \(bind: messageKey))
                ON CONFLICT (subject) DO UPDATE SET last_at = excluded.last_at, message_key = excluded.message_key
                WHERE notices.last_at <= \(bind: before) OR notices.message_key = excluded.message_key
                RETURNING subject
                """).all().count == 1
        }
    }

    // MARK: Model keys

    public func keyHealth() async throws -> [KeyHealth] {
        try await single(priority: .urgent) { db in
            try await db.raw("SELECT key_id, fingerprint, profile, state, until_ms, reason, checked_at FROM model_keys").all().map { row in
                KeyHealth(
                    keyID: try row.decode(column: "key_id", as: String.self),
                    fingerprint: try row.decode(column: "fingerprint", as: String.self),
                    profile: try row.decode(column: "profile", as: String.self),
                    condition: KeyHealth.Condition(rawValue: try row.decode(column: "state", as: String.self)) ?? .ok,
                    until: try row.decode(column: "until_ms", as: Int64?.self).map(Date.init(millis:)),
                    reason: try row.decode(column: "reason", as: String?.self),
                    checkedAt: try row.decode(column: "checked_at", as: Int64?.self).map(Date.init(millis:)))
            }
        }
    }

    @discardableResult
    public func setKeyHealth(_ health: KeyHealth, onlyIfCheckedAt: Date??, now: Date) async throws -> Bool {
        let condition: SQLQueryString = switch onlyIfCheckedAt {
        // A rest never overwrites a key another replica disabled (its copy of the health may be a second old).
        case .none: health.condition == .resting ? "WHERE model_keys.state <> 'disabled'" : ""
        case .some(.none): "WHERE model_keys.checked_at IS NULL"
        case .some(.some(let date)): "WHERE model_keys.checked_at = \(bind: date.millis)"
        }
        return try await single(priority: .urgent) { db in
            try await db.raw("""
                INSERT INTO model_keys (key_id, fingerprint, profile, state, until_ms, reason, checked_at, added_at)
                VALUES (\(bind: health.keyID), \(bind: health.fingerprint), \(bind: health.profile), \(bind: health.condition.rawValue),
                    \(bind: health.until?.millis), \(bind: health.reason), \(bind: health.checkedAt?.millis), \(bind: now.millis))
                ON CONFLICT (key_id) DO UPDATE SET state = excluded.state, until_ms = excluded.until_ms, reason = excluded.reason,
                    checked_at = excluded.checked_at
                \(condition)
                RETURNING key_id
                """).all().count == 1
        }
    }

    public func addDonatedKey(_ key: DonatedKey, now: Date) async throws -> Bool {
        try await single { db in
            try await db.raw("""
                INSERT INTO model_keys (key_id, fingerprint, profile, state, secret, donor, added_at)
                VALUES (\(bind: key.keyID), \(bind: key.fingerprint), \(bind: key.profile), 'ok', \(bind: key.secret), \(bind: key.donor), \(bind: now.millis))
                ON CONFLICT (key_id) DO NOTHING
                RETURNING key_id
                """).all().count == 1
        }
    }

    public func donatedKeys() async throws -> [DonatedKey] {
        try await single(priority: .urgent) { db in
            try await db.raw("SELECT key_id, secret, fingerprint, profile, donor FROM model_keys WHERE secret IS NOT NULL ORDER BY added_at, key_id")
                .all().map { row in
                    DonatedKey(
                        keyID: try row.decode(column: "key_id", as: String.self), secret: try row.decode(column: "secret", as: String.self),
                        fingerprint: try row.decode(column: "fingerprint", as: String.self),
                        profile: try row.decode(column: "profile", as: String.self), donor: try row.decode(column: "donor", as: String?.self) ?? "")
                }
        }
    }

    // MARK: Conversation preferences

    public func preferences(_ key: ConversationKey) async throws -> ConversationPreferences {
        try await single { db in try await Self.preferences(key, on: db) }
    }

    /// Both in one call: one trip through the commit queue (SQLite) or one pooled connection (PostgreSQL).
    public func context(_ key: ConversationKey, turns limit: Int) async throws -> ConversationContext {
        try await single { db in
            ConversationContext(preferences: try await Self.preferences(key, on: db), turns: try await Self.turns(key, limit: limit, on: db))
        }
    }

    private static let preferencesDecoder = JSONDecoder()

    static func preferences(_ key: ConversationKey, on db: any SQLDatabase) async throws -> ConversationPreferences {
        let json = try await db.raw("SELECT settings FROM conversations WHERE conversation_key = \(bind: key.rawValue)").first()?
            .decode(column: "settings", as: String?.self)
        guard let json, let preferences = try? preferencesDecoder.decode(ConversationPreferences.self, from: Data(json.utf8)) else {
            return ConversationPreferences()
        }
        return preferences
    }
}
