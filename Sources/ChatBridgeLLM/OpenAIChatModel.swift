import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeHTTP
import Crypto
import Foundation
import Logging
import Metrics
import NIOCore
import NIOFoundationCompat
import NIOHTTP1

/// A `ChatModel` for OpenAI-compatible `chat/completions` endpoints (and Azure OpenAI), streaming over SSE.
/// It does not retry: the dispatcher retries durably, with backoff that honours `Retry-After`.
///
/// An answer is complete only when the stream says so (`[DONE]` or a `finish_reason`); a stream that just
/// stops is a retryable error. A server that ignores `stream: true` and answers with one JSON object is
/// read as a complete answer. Lines, events and the answer are size-capped so a misbehaving server
/// cannot exhaust memory.
public struct OpenAIChatModel: ChatModel {
    public let settings: LLMSettings
    private let client: HTTPClient
    private let logger: Logger
    private let ttft: Metrics.Timer
    private let total: Metrics.Timer
    private let errors: Counter

    /// The longest SSE line or event accepted.
    static let maxLineBytes = 1 << 20
    /// The longest answer accepted, in UTF-8 bytes.
    static let maxAnswerBytes = 256 * 1024

    public init(settings: LLMSettings, client: HTTPClient, metrics: any MetricsFactory = MetricsSystem.factory, logger: Logger) {
        self.settings = settings
        self.client = client
        self.logger = logger
        ttft = Metrics.Timer(label: "chatbridge_model_time_to_first_token_seconds", factory: metrics)
        total = Metrics.Timer(label: "chatbridge_model_answer_seconds", factory: metrics)
        errors = Counter(label: "chatbridge_model_errors_total", factory: metrics)
    }

    public func complete(
        _ request: ChatRequest, onDelta: @escaping @Sendable (String) async -> Void
    ) async throws -> ChatCompletion {
        do {
            return try await withThrowingTaskGroup(of: ChatCompletion?.self) { group in
                group.addTask { try await self.stream(request, onDelta: onDelta) }
                group.addTask {
                    try await Task.sleep(for: self.settings.timeout)
                    return nil
                }
                defer { group.cancelAll() }
                guard let first = try await group.next(), let completion = first else {
                    throw ModelError(.timeout, detail: "no complete answer within llm.timeout (\(self.settings.timeout))")
                }
                return completion
            }
        } catch let error as ModelError {
            errors.increment()
            logger.debug("model request failed", metadata: ["error": "\(error)"])
            throw error
        }
    }

    /// The `user` sent to the provider: a stable hash of the conversation, never the platform's ids.
    static func anonymised(_ user: String) -> String {
        "cb-" + SHA256.hash(data: Data(user.utf8)).prefix(16).lowercaseHex
    }

    func makeRequest(_ request: ChatRequest) throws -> HTTPClientRequest {
        var http = HTTPClientRequest(url: settings.completionsURL)
        http.method = .POST
        http.headers.add(name: "Content-Type", value: "application/json")
        http.headers.add(name: "Accept", value: "text/event-stream")
        switch settings.provider {
        case .openai:
            if !settings.apiKey.isEmpty { http.headers.add(name: "Authorization", value: "Bearer \(settings.apiKey)") }
        case .azure:
            http.headers.add(name: "api-key", value: settings.apiKey)
        }
        let body = RequestBody(
            model: settings.model, messages: request.messages, stream: true,
            stream_options: .init(include_usage: true), temperature: settings.temperature,
            max_tokens: settings.maxTokens, user: request.user.map(Self.anonymised)
        )
        http.body = .bytes(try body.json())
        return http
    }

    private func stream(_ request: ChatRequest, onDelta: @escaping @Sendable (String) async -> Void) async throws -> ChatCompletion {
        let started = ContinuousClock.now
        let response: HTTPClientResponse
        do {
            response = try await client.execute(try makeRequest(request), timeout: .seconds(Int64(max(settings.timeout.seconds, 1))))
        } catch {
            throw classifyTransport(error)
        }
        if (300..<400).contains(response.status.code) {
            let location = response.headers.first(name: "location").map { " to \(OutboundHTTP.hostDescription($0))" } ?? ""
            throw ModelError(
                .badRequest, status: Int(response.status.code),
                detail: "the model server answered with a redirect\(location), which is not followed; set llm.base_url to the final address")
        }
        guard response.status == .ok else {
            let body = try? await response.body.collect(upTo: 64 * 1024)
            throw ErrorClassifier.error(
                status: Int(response.status.code), headers: response.headers,
                body: body.map { String(buffer: $0) } ?? "", apiKey: settings.apiKey)
        }
        var accumulator = StreamAccumulator(maxAnswerBytes: Self.maxAnswerBytes)
        var firstTokenAt: Duration?
        /// Passes on any new text.
        func flush() async {
            if let delta = accumulator.takeDelta() {
                if firstTokenAt == nil { firstTokenAt = ContinuousClock.now - started }
                await onDelta(delta)
            }
        }
        let contentType = response.headers.first(name: "content-type")?.lowercased() ?? ""
        do {
            if contentType.contains("event-stream") {
                var parser = SSEParser(maxLineBytes: Self.maxLineBytes)
                streaming: for try await chunk in response.body {
                    for event in try parser.feed(chunk.readableBytesView) {
                        if try accumulator.consume(event, apiKey: settings.apiKey) == .done { break streaming }
                        await flush()
                    }
                }
                if !accumulator.isDone, let event = try parser.finish() {
                    _ = try accumulator.consume(event, apiKey: settings.apiKey)
                    await flush()
                }
            } else {
                // The server ignored `stream: true` (or labels its stream oddly): read the whole body, bounded.
                let body = try await response.body.collect(upTo: Self.maxAnswerBytes * 4)
                let bytes = body.readableBytesView
                if contentType.contains("json") || bytes.first(where: { ![0x20, 0x09, 0x0A, 0x0D].contains($0) }) == UInt8(ascii: "{") {
                    try accumulator.consumeWhole(Data(buffer: body), apiKey: settings.apiKey)
                    await flush()
                } else {
                    var parser = SSEParser(maxLineBytes: Self.maxLineBytes)
                    for event in try parser.feed(bytes) + [try parser.finish()].compactMap({ $0 }) {
                        if try accumulator.consume(event, apiKey: settings.apiKey) == .done { break }
                    }
                    await flush()
                }
            }
        } catch let error as ModelError {
            throw error
        } catch let error as SSEParser.TooLarge {
            throw ModelError(.invalidResponse, detail: "\(error); the model server misbehaves", shouldRetry: false)
        } catch is NIOTooManyBytesError {
            throw ModelError(.invalidResponse, detail: "the answer exceeded \(Self.maxAnswerBytes * 4 / 1024) KiB; the model server misbehaves", shouldRetry: false)
        } catch {
            // A connection that breaks after the finish_reason (before the usage chunk or [DONE]) loses nothing.
            guard accumulator.isComplete, !Task.isCancelled, !(error is CancellationError) else { throw classifyTransport(error) }
        }
        guard accumulator.isComplete else {
            throw ModelError(
                .invalidResponse,
                detail: "the answer stream ended before it was finished (no [DONE] and no finish_reason after \(accumulator.text.utf8.count) bytes)")
        }
        if let firstTokenAt { ttft.recordNanoseconds(firstTokenAt.nanoseconds) }
        let elapsed = ContinuousClock.now - started
        total.recordNanoseconds(elapsed.nanoseconds)
        logger.debug("model answered", metadata: [
            "model": "\(settings.model)", "ttft_ms": "\(firstTokenAt.map { Int($0.seconds * 1000) } ?? -1)",
            "total_ms": "\(Int(elapsed.seconds * 1000))", "prompt_tokens": "\(accumulator.promptTokens ?? -1)",
            "completion_tokens": "\(accumulator.completionTokens ?? -1)", "finish_reason": "\(accumulator.finishReason ?? "none")",
        ])
        return ChatCompletion(
            text: accumulator.text, finishReason: accumulator.finishReason, refusal: accumulator.refusal,
            promptTokens: accumulator.promptTokens, completionTokens: accumulator.completionTokens,
            timeToFirstToken: firstTokenAt
        )
    }

    private func classifyTransport(_ error: any Error) -> any Error {
        if error is CancellationError || Task.isCancelled { return CancellationError() }
        if let error = error as? ModelError { return error }
        if let error = error as? HTTPClientError, error == .cancelled { return CancellationError() }
        let failure = TransportFailure(error)
        let host = OutboundHTTP.hostDescription(settings.baseURL)
        if failure.isUnreachable {
            return ModelError(.connection, detail: "cannot reach \(host): \(failure.reason); check llm.base_url and the network")
        }
        if let error = error as? HTTPClientError, error == .readTimeout || error == .deadlineExceeded {
            return ModelError(.timeout, detail: "\(host): \(failure.reason)")
        }
        // Reached, but the exchange broke: the server's trouble, worth another try; not "cannot reach".
        return ModelError(.serverError, detail: "the connection to \(host) broke: \(ErrorClassifier.redact(failure.reason, apiKey: settings.apiKey))")
    }

    struct RequestBody: Encodable {
        struct StreamOptions: Encodable { var include_usage: Bool }
        var model: String
        var messages: [ChatMessage]
        var stream: Bool
        var stream_options: StreamOptions
        var temperature: Double?
        var max_tokens: Int?
        var user: String?
    }
}

/// Builds an answer from decoded stream chunks (or from one non-streamed response).
struct StreamAccumulator {
    enum Step: Equatable { case more, done }

    let maxAnswerBytes: Int
    private(set) var text = ""
    private(set) var refusal: String?
    private(set) var finishReason: String?
    private(set) var promptTokens: Int?
    private(set) var completionTokens: Int?
    /// `[DONE]` arrived.
    private(set) var isDone = false
    private var pending: String?
    private var bytes = 0

    init(maxAnswerBytes: Int = OpenAIChatModel.maxAnswerBytes) {
        self.maxAnswerBytes = maxAnswerBytes
    }

    /// The provider said the answer is finished: `[DONE]`, or a `finish_reason` (some servers omit `[DONE]`).
    var isComplete: Bool { isDone || finishReason != nil }

    private struct Usage: Decodable {
        var prompt_tokens: Int?
        var completion_tokens: Int?
    }

    private struct Chunk: Decodable {
        struct Choice: Decodable {
            struct Delta: Decodable {
                var content: String?
                var refusal: String?
            }
            var delta: Delta?
            var finish_reason: String?
        }
        var choices: [Choice]?
        var usage: Usage?
        var error: APIErrorBody.Detail?
    }

    private struct Whole: Decodable {
        struct Choice: Decodable {
            struct Message: Decodable {
                var content: String?
                var refusal: String?
            }
            var message: Message?
            var finish_reason: String?
        }
        var choices: [Choice]?
        var usage: Usage?
        var error: APIErrorBody.Detail?
    }

    /// One decoder for every chunk (a stream has one per token).
    private static let decoder = JSONDecoder()

    mutating func consume(_ event: SSEParser.Event, apiKey: String) throws -> Step {
        let data = event.data.trimmedOfSpaces
        if data.hasPrefix("[DONE]") {
            isDone = true
            return .done
        }
        if data.isEmpty { return .more }
        let chunk: Chunk
        do {
            chunk = try Self.decoder.decode(Chunk.self, from: Data(data.utf8))
        } catch {
            throw ModelError(.invalidResponse, detail: "unreadable stream chunk: \(ErrorClassifier.redact(String(data.prefix(200)), apiKey: apiKey))")
        }
        if let error = chunk.error { throw ErrorClassifier.error(inStream: error, apiKey: apiKey) }
        if let usage = chunk.usage {
            promptTokens = usage.prompt_tokens
            completionTokens = usage.completion_tokens
        }
        for choice in chunk.choices ?? [] {
            if let content = choice.delta?.content, !content.isEmpty { try append(content) }
            if let refusal = choice.delta?.refusal, !refusal.isEmpty { try appendRefusal(refusal) }
            if let reason = choice.finish_reason { finishReason = reason }
        }
        return .more
    }

    /// Reads a complete (non-streamed) chat completion, or the error object it carries.
    mutating func consumeWhole(_ data: Data, apiKey: String) throws {
        let whole: Whole
        do {
            whole = try JSONDecoder().decode(Whole.self, from: data)
        } catch {
            throw ModelError(.invalidResponse, detail: "unreadable answer: \(ErrorClassifier.redact(String(decoding: data.prefix(200), as: UTF8.self), apiKey: apiKey))")
        }
        if let error = whole.error { throw ErrorClassifier.error(inStream: error, apiKey: apiKey) }
        guard let choice = whole.choices?.first else {
            throw ModelError(.invalidResponse, detail: "the answer has no choices")
        }
        if let content = choice.message?.content, !content.isEmpty { try append(content) }
        if let refusal = choice.message?.refusal, !refusal.isEmpty { try appendRefusal(refusal) }
        // A complete response is finished even when a compatible server leaves finish_reason out.
        finishReason = choice.finish_reason ?? "stop"
        promptTokens = whole.usage?.prompt_tokens
        completionTokens = whole.usage?.completion_tokens
    }

    private mutating func append(_ content: String) throws {
        try count(content)
        text += content
        pending = (pending ?? "") + content
    }

    private mutating func appendRefusal(_ content: String) throws {
        try count(content)
        refusal = (refusal ?? "") + content
    }

    private mutating func count(_ content: String) throws {
        bytes += content.utf8.count
        guard bytes <= maxAnswerBytes else {
            throw ModelError(.invalidResponse, detail: "the answer exceeded \(maxAnswerBytes / 1024) KiB; the model server misbehaves", shouldRetry: false)
        }
    }

    mutating func takeDelta() -> String? {
        defer { pending = nil }
        return pending
    }
}

/// OpenAI's error body, tolerant of the variants compatible servers send (`code` as string, number or null).
struct APIErrorBody: Decodable {
    struct Detail: Decodable {
        var message: String?
        var type: String?
        var code: FlexibleString?
    }
    var error: Detail?
}

struct FlexibleString: Decodable {
    var value: String?
    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let string = try? container.decode(String.self) {
            value = string
        } else if let int = try? container.decode(Int.self) {
            value = String(int)
        } else {
            value = nil
        }
    }
}

/// Maps HTTP failures and error objects to ``ModelError`` per the provider error table. An error object
/// inside a stream (or a 200 JSON body) is classified like the same error before the stream.
public enum ErrorClassifier {
    public static func error(status: Int, headers: HTTPHeaders, body: String, apiKey: String) -> ModelError {
        let parsed = try? JSONDecoder().decode(APIErrorBody.self, from: Data(body.utf8))
        let code = parsed?.error?.code?.value
        let type = parsed?.error?.type
        let message = redact(parsed?.error?.message ?? String(body.prefix(300)), apiKey: apiKey)
        let shouldRetry = headers.first(name: "x-should-retry").flatMap { value -> Bool? in
            switch value.lowercased() {
            case "true": true
            case "false": false
            default: nil
            }
        }
        let detail = "HTTP \(status)" + (code.map { " \($0)" } ?? "") + ": \(message)"
        let kind = self.kind(status: status, code: code, type: type, message: message)
        return ModelError(kind, status: status, detail: detail, retryAfter: retryAfter(headers), shouldRetry: isPermanent(kind) ? false : shouldRetry)
    }

    /// An `{"error": …}` object received with HTTP 200, inside the stream or as the whole body.
    static func error(inStream error: APIErrorBody.Detail, apiKey: String) -> ModelError {
        let code = error.code?.value
        let message = redact(error.message ?? "unknown", apiKey: apiKey)
        let status = code.flatMap(Int.init).flatMap { (400...599).contains($0) ? $0 : nil }
        let kind = self.kind(status: status, code: code, type: error.type, message: message)
        return ModelError(
            kind, status: status, detail: "error in the answer stream" + (code.map { " \($0)" } ?? "") + ": \(message)",
            shouldRetry: isPermanent(kind) ? false : nil)
    }

    /// The kind of a failure from its HTTP status (when known) and the error object's code, type and message.
    static func kind(status: Int?, code: String?, type: String?, message: String?) -> ModelError.Kind {
        let tags = [code, type].compactMap { $0?.lowercased() }
        if tags.contains("insufficient_quota") { return .quotaExceeded }
        if isContextLength(code: code, message: message) { return .contextTooLong }
        if tags.contains(where: { $0 == "content_filter" || $0 == "content_policy_violation" }) { return .contentFiltered }
        switch status {
        case 401: return .invalidAPIKey
        case 403: return .permissionDenied
        case 404: return .modelNotFound
        case 408, 504: return .timeout
        case 409: return .serverError
        case 429: return .rateLimited
        case 400, 422: return .badRequest
        case .some(500...599): return .serverError
        case .some: return .badRequest
        case nil:
            if tags.contains("invalid_api_key") { return .invalidAPIKey }
            if tags.contains("model_not_found") { return .modelNotFound }
            if tags.contains(where: { $0 == "rate_limit_exceeded" || $0 == "requests" || $0 == "tokens" }) { return .rateLimited }
            if tags.contains("invalid_request_error") { return .badRequest }
            return .serverError
        }
    }

    /// Permanent failures are never retried, whatever a header says.
    static func isPermanent(_ kind: ModelError.Kind) -> Bool {
        [.invalidAPIKey, .permissionDenied, .modelNotFound, .quotaExceeded, .badRequest, .contextTooLong, .contentFiltered].contains(kind)
    }

    static func isContextLength(code: String?, message: String?) -> Bool {
        if code == "context_length_exceeded" { return true }
        let lower = message?.lowercased() ?? ""
        return lower.contains("maximum context length") || lower.contains("context length") || lower.contains("too many tokens")
    }

    /// `retry-after-ms` (milliseconds) or `retry-after` (seconds, or an HTTP date).
    /// A server's value is capped at a year (`inf` or `1e300` mean "much later", not a crash).
    public static func retryAfter(_ headers: HTTPHeaders) -> Duration? {
        if let ms = headers.first(name: "retry-after-ms").flatMap(Double.init), ms > 0 {
            return milliseconds(ms)
        }
        guard let value = headers.first(name: "retry-after")?.trimmingCharacters(in: .whitespaces) else { return nil }
        if let seconds = Double(value) { return seconds > 0 ? milliseconds(seconds * 1000) : nil }
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss zzz"
        if let date = formatter.date(from: value) {
            let seconds = date.timeIntervalSinceNow
            return seconds > 0 ? milliseconds(seconds * 1000) : nil
        }
        return nil
    }

    private static func milliseconds(_ value: Double) -> Duration? {
        guard !value.isNaN else { return nil }
        return .milliseconds(Int64(min(value, 365 * 86_400_000)))
    }

    /// Removes the API key, and anything shaped like one, from text meant for logs.
    public static func redact(_ text: String, apiKey: String) -> String {
        var result = text
        if apiKey.count >= 4 { result = result.replacingOccurrences(of: apiKey, with: "***") }
        if let regex = try? NSRegularExpression(pattern: "sk-[A-Za-z0-9_\\-*]{4,}") {
            result = regex.stringByReplacingMatches(
                in: result, range: NSRange(result.startIndex..., in: result), withTemplate: "sk-***")
        }
        return result
    }
}
