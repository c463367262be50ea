import ChatBridgeCore
import Foundation
import SQLKit

/// The operator controls' counters (limits, usage, notices) and model keys' health, on both databases.
/// Every count is a query over rows keyed by message, so a retried message is counted once and every
/// replica sees the same numbers.
extension SQLStore: UsageLedger, KeyHealthStore {
    // MARK: Limits

    public func requestCounts(user: String, since minuteAgo: Date, day: String, excluding messageKey: String) async throws -> RequestCounts {
        try await single(priority: .background) { db in
            let row = try await db.raw("""
                SELECT CAST(COALESCE(SUM(CASE WHEN at_ms >= \(bind: minuteAgo.millis) THEN 1 ELSE 0 END), 0) AS BIGINT) AS minute,
                       MIN(CASE WHEN at_ms >= \(bind: minuteAgo.millis) THEN at_ms END) AS oldest,
                       CAST(COALESCE(SUM(CASE WHEN day = \(bind: day) THEN 1 ELSE 0 END), 0) AS BIGINT) AS today
                FROM requests
                WHERE user_id = \(bind: user) AND (at_ms >= \(bind: minuteAgo.millis) OR day = \(bind: day)) AND message_key <> \(bind: messageKey)
                """).first()
            return RequestCounts(
                lastMinute: try row?.decode(column: "minute", as: Int.self) ?? 0,
                oldestInLastMinute: try row?.decode(column: "oldest", as: Int64?.self).map(Date.init(millis:)),
                today: try row?.decode(column: "today", as: Int.self) ?? 0)
        }
    }

    public func recordRequest(_ record: RequestRecord) async throws {
        try await single { db in
            try await db.raw("""
                INSERT INTO requests (message_key, user_id, chat_id, day, at_ms)
                VALUES (\(bind: record.messageKey), \(bind: record.user), \(bind: record.chat), \(bind: record.day), \(bind: record.at.millis))
                ON CONFLICT (message_key) DO NOTHING
                """).run()
        }
    }

    public func tokensUsed(user: String?, chat: String?, day: String, excluding messageKey: String) async throws -> Int {
        let who: SQLQueryString = if let user { "user_id = \(bind: user)" } else { "chat_id = \(bind: chat ?? "")" }
        return try await single { db in
            try await db.raw("""
                SELECT CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT) AS t FROM usage_records
                WHERE \(who) AND day = \(bind: day) AND message_key <> \(bind: messageKey)
                """).first()?.decode(column: "t", as: Int.self) ?? 0
        }
    }

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

    public func claimNotice(_ subject: String, period: Duration, now: Date) async throws -> Bool {
        let before = now.millis - Int64(period.components.seconds * 1000)
        return try await single { db in
            try await db.raw("""
                INSERT INTO notices (subject, last_at) VALUES (\(bind: subject), \(bind: now.millis))
                ON CONFLICT (subject) DO UPDATE SET last_at = excluded.last_at WHERE notices.last_at <= \(bind: before)
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
        case .none: ""
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
        let json = try await single { db in
            try await db.raw("SELECT settings FROM conversations WHERE conversation_key = \(bind: key.rawValue)").first()?
                .decode(column: "settings", as: String?.self)
        }
        guard let json, let preferences = try? JSONDecoder().decode(ConversationPreferences.self, from: Data(json.utf8)) else {
            return ConversationPreferences()
        }
        return preferences
    }
}
