import Foundation

/// Wall-clock time and sleeping, injected into everything in Core that waits or stamps times, so tests can
/// drive time instead of waiting for it.
public protocol WallClock: Sendable {
    /// The current time.
    var now: Date { get }
    /// Suspends for `duration`; throws `CancellationError` when the task is cancelled.
    func sleep(for duration: Duration) async throws
}

/// The real clock: the system's time and `Task.sleep`. The only place in Core that reads either.
public struct SystemClock: WallClock {
    public init() {}
    public var now: Date { Date() }
    public func sleep(for duration: Duration) async throws { try await Task.sleep(for: duration) }
}

extension WallClock {
    /// Runs `operation`; returns its value, or nil when `timeout` passes first (the operation is cancelled).
    public func withTimeout<T: Sendable>(
        _ timeout: Duration, _ operation: @escaping @Sendable () async -> T
    ) async -> T? {
        await withTaskGroup(of: T?.self) { group in
            group.addTask { await operation() }
            group.addTask {
                try? await self.sleep(for: timeout)
                return nil
            }
            let first = await group.next() ?? nil
            group.cancelAll()
            return first
        }
    }
}

extension Date {
    public func adding(_ duration: Duration) -> Date {
        addingTimeInterval(duration.seconds)
    }
}

extension Duration {
    public var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }

    public var seconds: Double {
        let (seconds, attoseconds) = components
        return Double(seconds) + Double(attoseconds) / 1e18
    }

    /// The duration between two dates (zero when `end` is earlier).
    public static func between(_ start: Date, _ end: Date) -> Duration {
        .milliseconds(Int64(max(end.timeIntervalSince(start), 0) * 1000))
    }
}
