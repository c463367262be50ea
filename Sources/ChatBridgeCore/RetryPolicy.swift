/// Exponential backoff with jitter, honouring a server's `Retry-After` when it gives one.
public struct RetryPolicy: Sendable, Equatable {
    public var maxAttempts: Int
    public var baseDelay: Duration
    public var maxDelay: Duration
    /// A server-requested delay longer than this is capped to it.
    public var maxRetryAfter: Duration

    public init(maxAttempts: Int = 5, baseDelay: Duration = .seconds(1), maxDelay: Duration = .seconds(60), maxRetryAfter: Duration = .seconds(120)) {
        self.maxAttempts = maxAttempts
        self.baseDelay = baseDelay
        self.maxDelay = maxDelay
        self.maxRetryAfter = maxRetryAfter
    }

    /// The delay before attempt `attempt + 1`, after `attempt` attempts failed (`attempt` ≥ 1).
    /// `random` is a number in [0, 1) that spreads retries of many messages apart.
    public func delay(afterAttempt attempt: Int, retryAfter: Duration? = nil, random: Double) -> Duration {
        if let retryAfter, retryAfter > .zero {
            return min(retryAfter, maxRetryAfter)
        }
        let exponent = min(max(attempt - 1, 0), 30)
        let raw = baseDelay * (1 << exponent)
        let capped = min(raw, maxDelay)
        // Jitter: between 75 % and 100 % of the capped delay.
        return capped * (1.0 - 0.25 * min(max(random, 0), 1))
    }

    public func shouldRetry(afterAttempt attempt: Int, retryable: Bool) -> Bool {
        retryable && attempt < maxAttempts
    }
}
