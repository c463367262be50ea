import Foundation

/// One question let through to the model, counted against its sender's limits. Recorded once per
/// message (`messageKey`), however many attempts the message takes.
public struct RequestRecord: Sendable, Equatable {
    public var messageKey: String
    public var user: String
    public var chat: String
    public var day: String
    public var at: Date
    public init(messageKey: String, user: String, chat: String, day: String, at: Date) {
        self.messageKey = messageKey
        self.user = user
        self.chat = chat
        self.day = day
        self.at = at
    }
}

/// The tokens one answer used and who used them.
public struct UsageRecord: Sendable, Equatable {
    public var messageKey: String
    public var day: String
    public var at: Date
    public var platform: String
    /// `platform:id`
    public var chat: String
    /// `platform:id`
    public var user: String
    public var profile: String
    public var model: String
    /// `sk-…abcd`, never the key.
    public var keyFingerprint: String
    public var promptTokens: Int
    public var completionTokens: Int
    /// The provider sent no usage; the tokens are this build's estimate.
    public var estimated: Bool
    /// In the currency of the profile's prices (per million tokens); 0 without prices.
    public var cost: Double

    public init(
        messageKey: String, day: String, at: Date, platform: String, chat: String, user: String, profile: String, model: String,
        keyFingerprint: String, promptTokens: Int, completionTokens: Int, estimated: Bool, cost: Double
    ) {
        self.messageKey = messageKey
        self.day = day
        self.at = at
        self.platform = platform
        self.chat = chat
        self.user = user
        self.profile = profile
        self.model = model
        self.keyFingerprint = keyFingerprint
        self.promptTokens = promptTokens
        self.completionTokens = completionTokens
        self.estimated = estimated
        self.cost = cost
    }
}

/// What usage is summed by.
public enum UsageGrouping: String, Sendable, CaseIterable {
    case user, chat, model, key, day, total
}

/// One line of a usage report.
public struct UsageTotal: Sendable, Equatable {
    /// The user, chat, model, key fingerprint or day; `total` for the grand total.
    public var group: String
    public var answers: Int
    public var promptTokens: Int
    public var completionTokens: Int
    public var cost: Double
    public init(group: String, answers: Int, promptTokens: Int, completionTokens: Int, cost: Double) {
        self.group = group
        self.answers = answers
        self.promptTokens = promptTokens
        self.completionTokens = completionTokens
        self.cost = cost
    }
    public var tokens: Int { promptTokens + completionTokens }
}

/// A question about recorded usage: days from `since` to `until` (inclusive, `YYYY-MM-DD`), optionally
/// one user or chat, summed by `grouping`, the largest first, at most `limit` lines.
public struct UsageQuery: Sendable, Equatable {
    public var since: String?
    public var until: String?
    public var user: String?
    public var chat: String?
    public var grouping: UsageGrouping
    public var limit: Int?
    public init(since: String? = nil, until: String? = nil, user: String? = nil, chat: String? = nil, grouping: UsageGrouping, limit: Int? = nil) {
        self.since = since
        self.until = until
        self.user = user
        self.chat = chat
        self.grouping = grouping
        self.limit = limit
    }
}

/// The limits one question is checked against; nil is unlimited.
public struct RequestLimits: Sendable, Equatable {
    public var perMinute: Int?
    public var perDay: Int?
    public var userDailyTokens: Int?
    public var chatDailyTokens: Int?
    public init(perMinute: Int? = nil, perDay: Int? = nil, userDailyTokens: Int? = nil, chatDailyTokens: Int? = nil) {
        self.perMinute = perMinute
        self.perDay = perDay
        self.userDailyTokens = userDailyTokens
        self.chatDailyTokens = chatDailyTokens
    }
    public var countsQuestions: Bool { perMinute != nil || perDay != nil }
}

/// Whether a question may go to the model.
public enum Admission: Sendable, Equatable {
    case admitted
    /// Over the per-minute limit; the oldest question of the last minute says when it frees up.
    case perMinute(oldest: Date)
    case perDay
    case userDailyTokens
    case chatDailyTokens
}

/// The durable counters behind limits, quotas, usage reports and one-per-hour notices. Kept in the
/// database, so every replica counts against the same numbers.
public protocol UsageLedger: Sendable {
    /// Checks a question against `limits` and, when it is admitted and questions are counted, records it —
    /// in one step per user that every replica sees (a lock per user), so two questions at once cannot
    /// both take the last one. A message recorded before (a retry) is admitted again and not counted twice.
    /// Token limits compare the tokens already used today (an answer's tokens are known only after it).
    func admit(_ record: RequestRecord, limits: RequestLimits, minuteAgo: Date) async throws -> Admission
    /// Adds one answer's usage (a second answer to the same message, after a retry, adds to it).
    func recordUsage(_ record: UsageRecord) async throws
    /// Usage summed as asked.
    func usage(_ query: UsageQuery) async throws -> [UsageTotal]
    /// True at most once per `period` for `subject` across every replica (and records it): a notice that
    /// must not repeat for every message, such as "you may not use this bot". The message that claimed it
    /// (`messageKey`) gets true again when asked again (a retry must still deliver the notice).
    func claimNotice(_ subject: String, period: Duration, messageKey: String, now: Date) async throws -> Bool
}

/// The health of one model API key, shared by every replica.
public struct KeyHealth: Sendable, Equatable {
    public enum Condition: String, Sendable, Equatable, CaseIterable {
        case ok
        /// Rate limited: not used until `until`.
        case resting
        /// Refused (401/403, no quota): not used until a re-check succeeds.
        case disabled
    }
    /// A hash of the key; never the key.
    public var keyID: String
    public var fingerprint: String
    public var profile: String
    public var condition: Condition
    public var until: Date?
    public var reason: String?
    public var checkedAt: Date?
    public init(keyID: String, fingerprint: String, profile: String, condition: Condition, until: Date? = nil, reason: String? = nil, checkedAt: Date? = nil) {
        self.keyID = keyID
        self.fingerprint = fingerprint
        self.profile = profile
        self.condition = condition
        self.until = until
        self.reason = reason
        self.checkedAt = checkedAt
    }

    /// Whether the key may be used at `now`.
    public func isUsable(at now: Date) -> Bool {
        switch condition {
        case .ok: true
        case .resting: (until ?? .distantPast) <= now
        case .disabled: false
        }
    }
}

/// A key a user donated, as stored.
public struct DonatedKey: Sendable, Equatable {
    public var keyID: String
    public var secret: String
    public var fingerprint: String
    public var profile: String
    /// `platform:id` of the donor.
    public var donor: String
    public init(keyID: String, secret: String, fingerprint: String, profile: String, donor: String) {
        self.keyID = keyID
        self.secret = secret
        self.fingerprint = fingerprint
        self.profile = profile
        self.donor = donor
    }
}

/// Where key health and donated keys live (the database).
public protocol KeyHealthStore: Sendable {
    /// Every key's recorded health.
    func keyHealth() async throws -> [KeyHealth]
    /// Records a key's health. `onlyIfCheckedAt`: change it only while the recorded check time is still
    /// this one (a replica claiming a re-check); returns whether a row changed.
    @discardableResult
    func setKeyHealth(_ health: KeyHealth, onlyIfCheckedAt: Date??, now: Date) async throws -> Bool
    /// Stores a donated key; false when it was known already.
    func addDonatedKey(_ key: DonatedKey, now: Date) async throws -> Bool
    func donatedKeys() async throws -> [DonatedKey]
}

/// What `/status` shows an admin.
public struct StatusReport: Sendable, Equatable {
    public struct Key: Sendable, Equatable {
        public var profile: String
        public var fingerprint: String
        public var condition: KeyHealth.Condition
        public var until: Date?
        public init(profile: String, fingerprint: String, condition: KeyHealth.Condition, until: Date? = nil) {
            self.profile = profile
            self.fingerprint = fingerprint
            self.condition = condition
            self.until = until
        }
    }
    public var pending: Int
    public var running: Int
    public var inFlightHere: Int
    public var keys: [Key]
    /// Model answer time over the last hour, in this process.
    public var latencyP50: Duration?
    public var latencyP99: Duration?
    public var latencySamples: Int
    /// Outbound platform connections and their state (`dingtalk.stream: connected`).
    public var connections: [(name: String, status: String)]

    public init(
        pending: Int = 0, running: Int = 0, inFlightHere: Int = 0, keys: [Key] = [], latencyP50: Duration? = nil,
        latencyP99: Duration? = nil, latencySamples: Int = 0, connections: [(name: String, status: String)] = []
    ) {
        self.pending = pending
        self.running = running
        self.inFlightHere = inFlightHere
        self.keys = keys
        self.latencyP50 = latencyP50
        self.latencyP99 = latencyP99
        self.latencySamples = latencySamples
        self.connections = connections
    }

    public static func == (a: StatusReport, b: StatusReport) -> Bool {
        a.pending == b.pending && a.running == b.running && a.inFlightHere == b.inFlightHere && a.keys == b.keys
            && a.latencyP50 == b.latencyP50 && a.latencyP99 == b.latencyP99 && a.latencySamples == b.latencySamples
            && a.connections.map(\.name) == b.connections.map(\.name) && a.connections.map(\.status) == b.connections.map(\.status)
    }
}

/// Verifies a key a user offers (`/donate`) and adds it to the default profile's pool.
public protocol KeyDonations: Sendable {
    /// Checks the key with a tiny request; on success stores it with its donor. Returns the outcome.
    func donate(_ key: String, donor: String) async -> DonationOutcome
}

public enum DonationOutcome: Sendable, Equatable {
    case added(fingerprint: String)
    case alreadyKnown(fingerprint: String)
    /// The provider refused the key or could not be asked; `reason` has no part of the key.
    case refused(fingerprint: String, reason: String)
}

/// The fingerprint a key is shown by: `sk-…abcd` (its prefix up to the first dash, and its last four
/// characters), never more of it.
public func keyFingerprint(_ key: String) -> String {
    let trimmed = key.trimmingCharacters(in: .whitespacesAndNewlines)
    guard trimmed.count >= 8 else { return trimmed.isEmpty ? "(no key)" : "…" }
    let prefix = trimmed.hasPrefix("sk-") ? "sk-" : ""
    return prefix + "…" + trimmed.suffix(4)
}
