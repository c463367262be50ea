import AsyncHTTPClient
import ChatBridgeCore
import Crypto
import Foundation
import Logging
import Metrics
import Synchronization

/// One `models.<name>` profile: where and how to ask, with which keys, what to fall back to, what it costs.
public struct ModelProfile: Sendable, Equatable {
    public var name: String
    /// Provider, base URL, model, temperature, max tokens, timeout. Its `apiKey` is not used: keys are in
    /// `apiKeys`.
    public var settings: LLMSettings
    /// Empty: a server that needs no key (a local Ollama or vLLM).
    public var apiKeys: [String]
    /// The profile that answers when every key of this one is resting or disabled.
    public var fallback: String?
    /// Prices per million tokens.
    public var inputPrice: Double?
    public var outputPrice: Double?

    public init(name: String, settings: LLMSettings, apiKeys: [String], fallback: String? = nil, inputPrice: Double? = nil, outputPrice: Double? = nil) {
        self.name = name
        self.settings = settings
        self.apiKeys = apiKeys.filter { !$0.isEmpty }
        self.fallback = fallback
        self.inputPrice = inputPrice
        self.outputPrice = outputPrice
    }

    /// The stable id a key's health in a profile is stored under: a hash, never the key. Health is per
    /// profile, since a rate limit or a refused model can be the model's and not the whole key's (a key
    /// shared by two profiles and revoked is disabled in each after one refusal there).
    public static func keyID(_ key: String, profile: String) -> String {
        SHA256.hash(data: Data((profile + "\u{0}" + key).utf8)).prefix(16).lowercaseHex
    }
}

/// The `ChatModel` for every profile: picks the profile a request names, spreads requests over its keys
/// (least in flight), rests a rate-limited key for its `Retry-After` (or 30 s), disables a refused key
/// (401/403, no quota) until a re-check passes, and falls back to the profile's `fallback` when no key is
/// left. Key health lives in the database (``KeyHealthStore``), so every replica skips a dead key.
public final class ModelRouter: ChatModel, KeyDonations {
    private struct PoolKey: Sendable {
        var id: String
        var secret: String
        var fingerprint: String
        var donated: Bool
    }

    private struct State {
        var profiles: [String: ModelProfile]
        var inFlight: [String: Int] = [:]
        var turn = 0
        var health: [String: KeyHealth] = [:]
        var donated: [DonatedKey] = []
        var healthReadAt: Date?
        var models: [String: OpenAIChatModel] = [:]
        var disabledLogged: Set<String> = []
        /// (when, seconds) of answers in the last hour.
        var latencies: [(at: Date, seconds: Double)] = []
    }

    private let state: Mutex<State>
    private let store: (any KeyHealthStore)?
    private let client: HTTPClient
    private let clock: any WallClock
    private let logger: Logger
    private let metrics: any MetricsFactory
    /// How long health read from the database is trusted before it is read again.
    public let healthTTL: Duration
    /// How often a disabled key is tried again.
    public let recheckInterval: Duration
    /// How long a rate-limited key rests when the provider does not say.
    public static let defaultRest: Duration = .seconds(30)

    public init(
        profiles: [ModelProfile], store: (any KeyHealthStore)?, client: HTTPClient, clock: any WallClock = SystemClock(),
        healthTTL: Duration = .seconds(1), recheckInterval: Duration = .seconds(3600), metrics: any MetricsFactory = MetricsSystem.factory,
        logger: Logger
    ) {
        state = Mutex(State(profiles: Dictionary(profiles.map { ($0.name, $0) }, uniquingKeysWith: { $1 })))
        self.store = store
        self.client = client
        self.clock = clock
        self.healthTTL = healthTTL
        self.recheckInterval = recheckInterval
        self.metrics = metrics
        self.logger = logger
    }

    /// Replaces the profiles (a reload). Requests already running finish with the profile they started with.
    public func replace(profiles: [ModelProfile]) {
        state.withLock {
            $0.profiles = Dictionary(profiles.map { ($0.name, $0) }, uniquingKeysWith: { $1 })
            $0.models = [:]
        }
    }

    public var profileNames: [String] { state.withLock { $0.profiles.keys.sorted() } }

    // MARK: Answering

    public func complete(_ request: ChatRequest, onDelta: @escaping @Sendable (String) async -> Void) async throws -> ChatCompletion {
        await refreshHealthIfStale()
        var name = request.profile ?? "default"
        var visited: Set<String> = []
        var lastError: ModelError?
        let streamed = Mutex(false)
        let deltas: @Sendable (String) async -> Void = { delta in
            streamed.withLock { $0 = true }
            await onDelta(delta)
        }
        while true {
            var found = state.withLock { $0.profiles[name] }
            if found == nil, name != "default", !visited.contains("default") {
                // Removed by a reload after the question was planned for it.
                logger.warning("a model profile is no longer configured; the default profile answers", metadata: ["profile": "\(name)"])
                name = "default"
                found = state.withLock { $0.profiles[name] }
            }
            guard let profile = found else {
                throw ModelError(.modelNotFound, detail: "no model profile \"\(name)\" is configured", shouldRetry: false)
            }
            visited.insert(name)
            var tried: Set<String> = []
            while let key = pick(profile, excluding: tried) {
                tried.insert(key.id)
                let model = self.model(for: profile, key: key)
                let started = ContinuousClock.now
                state.withLock { $0.inFlight[key.id, default: 0] += 1 }
                do {
                    var completion = try await model.complete(request, onDelta: deltas)
                    state.withLock { $0.inFlight[key.id, default: 1] -= 1 }
                    recordLatency(ContinuousClock.now - started)
                    completion.servedBy = ModelUse(
                        profile: profile.name, model: profile.settings.model, keyFingerprint: key.fingerprint,
                        inputPrice: profile.inputPrice, outputPrice: profile.outputPrice)
                    return completion
                } catch let error as ModelError {
                    state.withLock { $0.inFlight[key.id, default: 1] -= 1 }
                    if key.secret.isEmpty {
                        // A server without keys: only its fallback can help, when it is rate limited.
                        guard error.kind == .rateLimited, profile.fallback != nil, !streamed.withLock({ $0 }) else { throw error }
                        lastError = error
                        continue
                    }
                    // The key's health is recorded even when text was shown already (mid-stream)…
                    switch error.kind {
                    case .rateLimited:
                        let rest = min(error.retryAfter ?? Self.defaultRest, .seconds(3600))
                        await record(key, profile: profile.name, condition: .resting, until: clock.now.adding(rest), reason: "rate limited (\(error.status.map { "HTTP \($0)" } ?? "in stream"))")
                        logger.info("a model key is rate limited; resting it", metadata: [
                            "profile": "\(profile.name)", "key": "\(key.fingerprint)", "rest_s": "\(Int(rest.seconds))",
                        ])
                    case .invalidAPIKey, .permissionDenied, .quotaExceeded:
                        await record(key, profile: profile.name, condition: .disabled, until: nil, reason: error.kind.rawValue)
                    default:
                        throw error
                    }
                    // …but another key would start a shown answer over: then the attempt ends here.
                    guard !streamed.withLock({ $0 }) else { throw error }
                    lastError = error
                } catch {
                    state.withLock { $0.inFlight[key.id, default: 1] -= 1 }
                    throw error
                }
            }
            if let fallback = profile.fallback, !visited.contains(fallback) {
                logger.warning("no usable key in a model profile; its fallback answers", metadata: ["profile": "\(profile.name)", "fallback": "\(fallback)"])
                name = fallback
                continue
            }
            throw exhausted(profile, lastError: lastError)
        }
    }

    /// The error when no key of the last profile can be used: resting keys make it a rate limit (retried
    /// when the first one wakes), disabled ones a key problem the admin must fix.
    private func exhausted(_ profile: ModelProfile, lastError: ModelError?) -> ModelError {
        let now = clock.now
        let keys = self.keys(of: profile)
        let health = state.withLock { $0.health }
        let waking = keys.compactMap { health[$0.id] }.filter { $0.condition == .resting }.compactMap(\.until).filter { $0 > now }.min()
        if let waking {
            let wait = Duration.milliseconds(Int64(max(1, waking.timeIntervalSince(now) * 1000)))
            return ModelError(
                .rateLimited, status: lastError?.status,
                detail: "every key of model profile \"\(profile.name)\" is resting or disabled; the first wakes in \(Int(wait.seconds.rounded(.up))) s",
                retryAfter: wait)
        }
        let kind: ModelError.Kind = lastError?.kind == .quotaExceeded ? .quotaExceeded : .invalidAPIKey
        return ModelError(
            kind, status: lastError?.status,
            detail: "every key of model profile \"\(profile.name)\" is disabled (refused by the provider); fix llm/models keys", shouldRetry: false)
    }

    /// The usable key with the fewest requests in flight (ties go round the pool).
    private func pick(_ profile: ModelProfile, excluding tried: Set<String>) -> PoolKey? {
        let keys = self.keys(of: profile)
        let now = clock.now
        return state.withLock { state -> PoolKey? in
            let usable = keys.filter { !tried.contains($0.id) && (state.health[$0.id]?.isUsable(at: now) ?? true) }
            guard !usable.isEmpty else { return nil }
            state.turn &+= 1
            let start = state.turn % usable.count
            let rotated = Array(usable[start...] + usable[..<start])
            return rotated.min { (state.inFlight[$0.id] ?? 0) < (state.inFlight[$1.id] ?? 0) }
        }
    }

    /// The profile's keys: configured ones, and for `default` the donated ones.
    private func keys(of profile: ModelProfile) -> [PoolKey] {
        var keys = profile.apiKeys.map { PoolKey(id: ModelProfile.keyID($0, profile: profile.name), secret: $0, fingerprint: keyFingerprint($0), donated: false) }
        if keys.isEmpty && profile.name != "default" || keys.isEmpty && state.withLock({ $0.donated.isEmpty }) {
            return [PoolKey(id: "none:\(profile.name)", secret: "", fingerprint: "(no key)", donated: false)]
        }
        if profile.name == "default" {
            let known = Set(keys.map(\.id))
            for donated in state.withLock({ $0.donated }) where !known.contains(donated.keyID) {
                keys.append(PoolKey(id: donated.keyID, secret: donated.secret, fingerprint: donated.fingerprint, donated: true))
            }
        }
        return keys
    }

    private func model(for profile: ModelProfile, key: PoolKey) -> OpenAIChatModel {
        let cacheKey = profile.name + "\u{0}" + key.id
        if let model = state.withLock({ $0.models[cacheKey] }) { return model }
        var settings = profile.settings
        settings.apiKey = key.secret
        let model = OpenAIChatModel(settings: settings, client: client, metrics: metrics, logger: logger)
        state.withLock { $0.models[cacheKey] = model }
        return model
    }

    // MARK: Health

    /// Reads key health (and donated keys) from the database when the copy here is older than `healthTTL`.
    public func refreshHealthIfStale() async {
        guard let store else { return }
        let now = clock.now
        let stale = state.withLock { state in
            guard let read = state.healthReadAt else { return true }
            return now.timeIntervalSince(read) >= healthTTL.seconds || now < read
        }
        guard stale else { return }
        do {
            let rows = try await store.keyHealth()
            let donated = try await store.donatedKeys()
            let health = Dictionary(rows.map { ($0.keyID, $0) }, uniquingKeysWith: { $1 })
            let changed = state.withLock { state -> Bool in
                defer {
                    state.health = health
                    state.donated = donated
                    state.healthReadAt = now
                }
                return state.health != health || state.donated != donated
            }
            // Read every second on the answering path: the gauges change only when the health did.
            if changed { publishGauges() }
        } catch {
            // The last known health stays in use; the database's trouble is reported where it matters.
            logger.debug("could not read model key health", metadata: ["error": "\(error)"])
        }
    }

    private func record(_ key: PoolKey, profile: String, condition: KeyHealth.Condition, until: Date?, reason: String) async {
        let now = clock.now
        let health = KeyHealth(
            keyID: key.id, fingerprint: key.fingerprint, profile: key.donated ? "default" : profile, condition: condition, until: until,
            reason: reason, checkedAt: now)
        let first = state.withLock { state -> Bool in
            state.health[key.id] = health
            return condition == .disabled ? state.disabledLogged.insert(key.id).inserted : false
        }
        if first {
            logger.error("a model API key was refused by the provider; it is not used until a re-check passes", metadata: [
                "profile": "\(profile)", "key": "\(key.fingerprint)", "why": "\(reason)", "recheck_every": "\(recheckInterval)",
            ])
        }
        publishGauges()
        guard let store else { return }
        do {
            try await store.setKeyHealth(health, onlyIfCheckedAt: .none, now: now)
        } catch {
            logger.warning("could not record a model key's health; other replicas may still use it", metadata: ["key": "\(key.fingerprint)", "error": "\(error)"])
        }
    }

    /// The health of every key of every profile, for `/status` and the gauges.
    public func keyReport() -> [StatusReport.Key] {
        let profiles = state.withLock { $0.profiles.values.sorted { $0.name < $1.name } }
        let now = clock.now
        let health = state.withLock { $0.health }
        var seen: Set<String> = []
        var report: [StatusReport.Key] = []
        for profile in profiles {
            for key in keys(of: profile) where key.secret != "" {
                guard seen.insert(profile.name + key.id).inserted else { continue }
                let current = health[key.id]
                var condition = current?.condition ?? .ok
                if condition == .resting, current?.isUsable(at: now) == true { condition = .ok }
                report.append(StatusReport.Key(profile: profile.name, fingerprint: key.fingerprint, condition: condition, until: current?.until))
            }
        }
        return report
    }

    private func publishGauges() {
        for key in keyReport() {
            for condition in KeyHealth.Condition.allCases {
                Gauge(
                    label: "chatbridge_model_key_state",
                    dimensions: [("profile", key.profile), ("key", key.fingerprint), ("state", condition.rawValue)], factory: metrics
                ).record(condition == key.condition ? 1 : 0)
            }
        }
    }

    /// Tries every disabled key whose last check is older than `recheckInterval` with a tiny request; a key
    /// that answers is used again. Replicas share the work: one claims a key's check by its check time.
    public func recheckDisabledKeys() async {
        guard let store else { return }
        let now = clock.now
        let rows: [KeyHealth]
        do {
            rows = try await store.keyHealth()
        } catch {
            return
        }
        let due = rows.filter { $0.condition == .disabled && ($0.checkedAt.map { now.timeIntervalSince($0) >= recheckInterval.seconds } ?? true) }
        for row in due {
            guard let (profile, key) = locate(row.keyID) else { continue }
            var claimed = row
            claimed.checkedAt = now
            guard (try? await store.setKeyHealth(claimed, onlyIfCheckedAt: .some(row.checkedAt), now: now)) == true else { continue }
            switch await probe(key.secret, settings: profile.settings) {
            case .success:
                var healthy = row
                healthy.condition = .ok
                healthy.until = nil
                healthy.reason = "re-check passed"
                healthy.checkedAt = now
                _ = try? await store.setKeyHealth(healthy, onlyIfCheckedAt: .none, now: now)
                state.withLock {
                    $0.health[row.keyID] = healthy
                    $0.disabledLogged.remove(row.keyID)
                }
                logger.notice("a disabled model API key passed its re-check and is used again", metadata: ["key": "\(row.fingerprint)"])
            case .failure(let error):
                logger.info("a disabled model API key is still refused", metadata: ["key": "\(row.fingerprint)", "why": "\(error.kind.rawValue)"])
            }
        }
        state.withLock { $0.healthReadAt = nil }
        publishGauges()
    }

    private func locate(_ keyID: String) -> (ModelProfile, PoolKey)? {
        let (profiles, donated) = state.withLock { ($0.profiles, $0.donated) }
        for profile in profiles.values.sorted(by: { $0.name < $1.name }) {
            if let secret = profile.apiKeys.first(where: { ModelProfile.keyID($0, profile: profile.name) == keyID }) {
                return (profile, PoolKey(id: keyID, secret: secret, fingerprint: keyFingerprint(secret), donated: false))
            }
        }
        if let key = donated.first(where: { $0.keyID == keyID }), let profile = profiles["default"] {
            return (profile, PoolKey(id: keyID, secret: key.secret, fingerprint: key.fingerprint, donated: true))
        }
        return nil
    }

    /// A one-token request with `key`.
    private func probe(_ key: String, settings: LLMSettings) async -> Result<Void, ModelError> {
        var settings = settings
        settings.apiKey = key
        settings.maxTokens = 1
        settings.timeout = min(settings.timeout, .seconds(30))
        let model = OpenAIChatModel(settings: settings, client: client, metrics: metrics, logger: logger)
        do {
            _ = try await model.complete(ChatRequest(messages: [ChatMessage(role: .user, content: "ping")]), onDelta: { _ in })
            return .success(())
        } catch let error as ModelError {
            return .failure(error)
        } catch {
            return .failure(ModelError(.connection, detail: "the check did not finish"))
        }
    }

    // MARK: Donations

    public func donate(_ key: String, donor: String) async -> DonationOutcome {
        let fingerprint = keyFingerprint(key)
        guard let profile = state.withLock({ $0.profiles["default"] }) else {
            return .refused(fingerprint: fingerprint, reason: "no default profile")
        }
        let id = ModelProfile.keyID(key, profile: "default")
        if profile.apiKeys.contains(key) || state.withLock({ $0.donated.contains { $0.keyID == id } }) {
            return .alreadyKnown(fingerprint: fingerprint)
        }
        switch await probe(key, settings: profile.settings) {
        case .failure(let error):
            logger.info("a donated key was refused", metadata: ["key": "\(fingerprint)", "why": "\(error.kind.rawValue)"])
            return .refused(fingerprint: fingerprint, reason: error.kind.rawValue)
        case .success:
            guard let store else { return .refused(fingerprint: fingerprint, reason: "no database to keep it in") }
            do {
                let added = try await store.addDonatedKey(
                    DonatedKey(keyID: id, secret: key, fingerprint: fingerprint, profile: "default", donor: donor), now: clock.now)
                state.withLock { $0.healthReadAt = nil }
                await refreshHealthIfStale()
                logger.notice(added ? "a donated key was verified and added to the default profile" : "a donated key was known already", metadata: [
                    "key": "\(fingerprint)", "donor": "\(donor)",
                ])
                return added ? .added(fingerprint: fingerprint) : .alreadyKnown(fingerprint: fingerprint)
            } catch {
                return .refused(fingerprint: fingerprint, reason: "it could not be stored")
            }
        }
    }

    // MARK: Latency

    private func recordLatency(_ elapsed: Duration) {
        let now = clock.now
        state.withLock { state in
            state.latencies.append((now, elapsed.seconds))
            if state.latencies.count > 4096 || (state.latencies.first.map { now.timeIntervalSince($0.at) > 3600 } ?? false) {
                state.latencies.removeAll { now.timeIntervalSince($0.at) > 3600 }
                if state.latencies.count > 4096 { state.latencies.removeFirst(state.latencies.count - 4096) }
            }
        }
    }

    /// Answer times of the last hour in this process: p50, p99 and how many.
    public func latencySummary() -> (p50: Duration?, p99: Duration?, count: Int) {
        let now = clock.now
        let values = state.withLock { $0.latencies.filter { now.timeIntervalSince($0.at) <= 3600 }.map(\.seconds) }.sorted()
        guard !values.isEmpty else { return (nil, nil, 0) }
        func at(_ q: Double) -> Duration { .milliseconds(Int64(values[min(values.count - 1, Int(Double(values.count - 1) * q + 0.5))] * 1000)) }
        return (at(0.5), at(0.99), values.count)
    }
}
