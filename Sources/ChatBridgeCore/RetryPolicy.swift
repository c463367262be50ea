/// When to try a failed message again: exponential backoff with jitter, or exactly as long as the provider
/// asked (`Retry-After`), never sooner.
public struct RetryPolicy: Sendable, Equatable {
    public var maxAttempts: Int
    public var baseDelay: Duration
    public var maxDelay: Duration
    /// The longest `Retry-After` worth waiting for. A provider asking for longer is told "later" for real:
    /// the message gives up with the busy reply instead of being retried early.
    public var maxRetryWait: Duration

    public init(
        maxAttempts: Int = 5, baseDelay: Duration = .seconds(1), maxDelay: Duration = .seconds(60),
        maxRetryWait: Duration = .seconds(600)
    ) {
        self.maxAttempts = maxAttempts
        self.baseDelay = baseDelay
        self.maxDelay = maxDelay
        self.maxRetryWait = maxRetryWait
    }

    public enum Decision: Sendable, Equatable {
        case retry(after: Duration)
        case giveUp(Reason)

        public enum Reason: Sendable, Equatable {
            /// The failure is permanent.
            case notRetryable
            /// Every attempt is used.
            case attemptsExhausted
            /// The provider asked to wait longer than `maxRetryWait`.
            case waitTooLong(Duration)
        }
    }

    /// What to do after attempt `attempt` (≥ 1) failed. `random` in [0, 1) spreads retries apart.
    public func decision(afterAttempt attempt: Int, retryable: Bool, retryAfter: Duration? = nil, random: Double) -> Decision {
        guard retryable else { return .giveUp(.notRetryable) }
        guard attempt < maxAttempts else { return .giveUp(.attemptsExhausted) }
        if let retryAfter, retryAfter > .zero {
            return retryAfter > maxRetryWait ? .giveUp(.waitTooLong(retryAfter)) : .retry(after: retryAfter)
        }
        return .retry(after: backoff(afterAttempt: attempt, random: random))
    }

    /// Exponential backoff: `baseDelay · 2^(attempt−1)`, capped at `maxDelay`, less up to 25 % jitter.
    public func backoff(afterAttempt attempt: Int, random: Double) -> Duration {
        let exponent = min(max(attempt - 1, 0), 30)
        let capped = min(baseDelay * (1 << exponent), maxDelay)
        return capped * (1.0 - 0.25 * min(max(random, 0), 1))
    }
}
