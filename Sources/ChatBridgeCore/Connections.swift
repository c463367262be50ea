import Foundation
import Logging
import Metrics
import Synchronization

/// What `/readyz` shows for an outbound platform connection (DingTalk Stream, the Lark long connection).
public enum ConnectionStatus: String, Sendable {
    /// Not configured to connect.
    case off
    case connecting
    case connected
    /// The platform refused the app (credentials, too many connections); retried only at the backoff cap.
    case rejected
    case stopped

    /// The status while `open` connections are up: `connected` for any, else what the supervisor is doing.
    public func with(openConnections open: Int) -> ConnectionStatus {
        switch self {
        case .off, .stopped: self
        case .connecting, .connected, .rejected: open > 0 ? .connected : (self == .connected ? .connecting : self)
        }
    }
}

/// A bearer token fetched on demand and cached until `refreshMargin` before it expires. Concurrent callers
/// share one fetch; a token the API refused is dropped with ``invalidate(_:)`` so the next caller fetches
/// a new one.
public actor CachedToken {
    public typealias Fetch = @Sendable () async throws -> (token: String, expiresAt: Date)

    private let fetch: Fetch
    private let clock: any WallClock
    private let refreshMargin: TimeInterval
    private var cached: (token: String, expiresAt: Date)?
    private var inFlight: Task<(token: String, expiresAt: Date), any Error>?

    public init(refreshMargin: TimeInterval = 300, clock: any WallClock = SystemClock(), fetch: @escaping Fetch) {
        self.fetch = fetch
        self.clock = clock
        self.refreshMargin = refreshMargin
    }

    /// A valid token: the cached one while more than the refresh margin is left, else a fresh one.
    public func token() async throws -> String {
        if let cached, cached.expiresAt.timeIntervalSince(clock.now) > refreshMargin { return cached.token }
        let task: Task<(token: String, expiresAt: Date), any Error>
        if let inFlight {
            task = inFlight
        } else {
            task = Task { [fetch] in try await fetch() }
            inFlight = task
        }
        defer { if inFlight == task { inFlight = nil } }
        let fetched = try await task.value
        cached = fetched
        return fetched.token
    }

    /// Drops the cached token after the API refused it.
    public func invalidate(_ token: String) {
        if cached?.token == token { cached = nil }
    }
}

/// Logs a problem an operator must fix once per key, not once per message.
public final class LogOnce: Sendable {
    private let logger: Logger
    private let logged = Mutex<Set<String>>([])

    public init(logger: Logger) { self.logger = logger }

    /// Logs `message` as an error the first time `key` is seen; returns whether it did.
    @discardableResult
    public func error(_ key: String, _ message: @autoclosure () -> Logger.Message, metadata: Logger.Metadata = [:]) -> Bool {
        guard logged.withLock({ $0.insert(key).inserted }) else { return false }
        logger.error(message(), metadata: metadata)
        return true
    }
}

/// A counter per value of one dimension (`chatbridge_…_total{type="…"}`), made once.
public struct LabelledCounters: Sendable {
    private let counters: [String: Counter]

    public init(label: String, dimension: String, values: [String], metrics: any MetricsFactory) {
        counters = Dictionary(uniqueKeysWithValues: values.map {
            ($0, Counter(label: label, dimensions: [(dimension, $0)], factory: metrics))
        })
    }

    /// Counts one `value`; values not named at creation are not counted.
    public func count(_ value: String) { counters[value]?.increment() }
}
