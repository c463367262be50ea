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

/// Bounds the frames of one connection being handled at once: at the bound, the connection stops reading
/// (the socket's flow control then holds the platform back) until one finishes.
public final class FrameSlots: Sendable {
    private struct State {
        var free: Int
        var waiters: [CheckedContinuation<Void, Never>] = []
        var idleWaiters: [Int: CheckedContinuation<Void, Never>] = [:]
        var nextID = 0
    }
    private let state: Mutex<State>
    private let capacity: Int

    public init(_ count: Int) {
        capacity = count
        state = Mutex(State(free: count))
    }

    /// Returns once no frame is being handled, or when the task is cancelled.
    public func waitUntilIdle() async {
        let id = state.withLock { state -> Int in
            state.nextID += 1
            return state.nextID
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let now = state.withLock { state -> Bool in
                    if state.free == capacity || Task.isCancelled { return true }
                    state.idleWaiters[id] = continuation
                    return false
                }
                if now { continuation.resume() }
            }
        } onCancel: {
            state.withLock { $0.idleWaiters.removeValue(forKey: id) }?.resume()
        }
    }

    public func acquire() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let now = state.withLock { state -> Bool in
                if state.free > 0 {
                    state.free -= 1
                    return true
                }
                state.waiters.append(continuation)
                return false
            }
            if now { continuation.resume() }
        }
    }

    public func release() {
        let (waiter, idle) = state.withLock { state -> (CheckedContinuation<Void, Never>?, [CheckedContinuation<Void, Never>]) in
            if !state.waiters.isEmpty { return (state.waiters.removeFirst(), []) }
            state.free += 1
            guard state.free == capacity else { return (nil, []) }
            defer { state.idleWaiters = [:] }
            return (nil, Array(state.idleWaiters.values))
        }
        waiter?.resume()
        for continuation in idle { continuation.resume() }
    }
}

/// Why an outbound platform connection could not be opened.
public enum ConnectFailure: Error, CustomStringConvertible {
    /// The platform refused the credentials (or the request): retried only at the backoff cap.
    case rejected(String)
    /// Anything that may pass: retried with backoff.
    case failed(String)
    public var description: String {
        switch self {
        case .rejected(let reason), .failed(let reason): reason
        }
    }
}
