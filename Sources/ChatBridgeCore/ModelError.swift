/// A failure talking to the model, classified so callers know whether to retry and what to tell the user.
public struct ModelError: Error, Sendable, CustomStringConvertible {
    public enum Kind: String, Sendable, CaseIterable {
        case rateLimited = "rate_limited"
        case quotaExceeded = "quota_exceeded"
        case invalidAPIKey = "invalid_api_key"
        case permissionDenied = "permission_denied"
        case modelNotFound = "model_not_found"
        case contextTooLong = "context_too_long"
        case contentFiltered = "content_filtered"
        case badRequest = "bad_request"
        case serverError = "server_error"
        case timeout = "timeout"
        case connection = "connection"
        case invalidResponse = "invalid_response"
    }

    public var kind: Kind
    /// The HTTP status, when there was one.
    public var status: Int?
    /// Detail for the operator's log. Never contains the API key.
    public var detail: String
    /// How long the provider asked us to wait before trying again.
    public var retryAfter: Duration?
    /// The provider's explicit retry advice (`x-should-retry`), when given.
    public var shouldRetryOverride: Bool?

    public init(_ kind: Kind, status: Int? = nil, detail: String, retryAfter: Duration? = nil, shouldRetry: Bool? = nil) {
        self.kind = kind
        self.status = status
        self.detail = detail
        self.retryAfter = retryAfter
        self.shouldRetryOverride = shouldRetry
    }

    /// Whether another attempt may succeed.
    public var isRetryable: Bool {
        if let shouldRetryOverride { return shouldRetryOverride }
        switch kind {
        case .rateLimited, .serverError, .timeout, .connection, .invalidResponse: return true
        case .quotaExceeded, .invalidAPIKey, .permissionDenied, .modelNotFound, .contextTooLong, .contentFiltered,
            .badRequest:
            return false
        }
    }

    public var description: String {
        // "cannot reach HOST: why; check llm.base_url and the network" says everything an operator needs.
        if kind == .connection { return detail }
        var text = "model error \(kind.rawValue)"
        if let status { text += " (HTTP \(status))" }
        return text + ": \(detail)"
    }
}
