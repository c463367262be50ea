import AsyncHTTPClient
import ChatBridgeCore
import Foundation
import Logging
import Metrics
import NIOCore
import NIOFoundationCompat
import NIOHTTP1

/// A `ChatModel` for OpenAI-compatible `chat/completions` endpoints (and Azure OpenAI), streaming over SSE.
/// It does not retry: the dispatcher retries durably, with backoff that honours `Retry-After`.
public struct OpenAIChatModel: ChatModel {
    public let settings: LLMSettings
    private let client: HTTPClient
    private let logger: Logger
    private let ttft = Metrics.Timer(label: "chatbridge_model_time_to_first_token_seconds")
    private let total = Metrics.Timer(label: "chatbridge_model_answer_seconds")
    private let errors = Counter(label: "chatbridge_model_errors_total")

    public init(settings: LLMSettings, client: HTTPClient, logger: Logger) {
        self.settings = settings
        self.client = client
        self.logger = logger
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
            max_tokens: settings.maxTokens, user: request.user
        )
        http.body = .bytes(ByteBuffer(data: try JSONEncoder().encode(body)))
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
        guard response.status == .ok else {
            let body = try? await response.body.collect(upTo: 64 * 1024)
            throw ErrorClassifier.error(
                status: Int(response.status.code), headers: response.headers,
                body: body.map { String(buffer: $0) } ?? "", apiKey: settings.apiKey)
        }
        var parser = SSEParser()
        var accumulator = StreamAccumulator()
        var firstTokenAt: Duration?
        /// Feeds one event to the accumulator and passes on any new text; false once the stream is done.
        func handle(_ event: SSEParser.Event) async throws -> Bool {
            if try accumulator.consume(event, apiKey: settings.apiKey) == .done { return false }
            if let delta = accumulator.takeDelta() {
                if firstTokenAt == nil { firstTokenAt = ContinuousClock.now - started }
                await onDelta(delta)
            }
            return true
        }
        do {
            streaming: for try await chunk in response.body {
                for event in parser.feed(chunk.readableBytesView) where try await !handle(event) { break streaming }
            }
            if !accumulator.isDone, let event = parser.finish() {
                _ = try await handle(event)
            }
        } catch let error as ModelError {
            throw error
        } catch {
            throw classifyTransport(error)
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
            text: accumulator.text, finishReason: accumulator.finishReason,
            promptTokens: accumulator.promptTokens, completionTokens: accumulator.completionTokens,
            timeToFirstToken: firstTokenAt
        )
    }

    private func classifyTransport(_ error: any Error) -> any Error {
        if error is CancellationError || Task.isCancelled { return CancellationError() }
        if let error = error as? ModelError { return error }
        if let error = error as? HTTPClientError {
            if error == .readTimeout || error == .deadlineExceeded || error == .connectTimeout {
                return ModelError(.timeout, detail: "HTTP \(error)")
            }
            if error == .cancelled { return CancellationError() }
        }
        return ModelError(.connection, detail: ErrorClassifier.redact("\(error)", apiKey: settings.apiKey))
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

/// Builds an answer from decoded stream chunks.
struct StreamAccumulator {
    enum Step: Equatable { case more, done }

    private(set) var text = ""
    private(set) var finishReason: String?
    private(set) var promptTokens: Int?
    private(set) var completionTokens: Int?
    private(set) var isDone = false
    private var pending: String?

    private struct Chunk: Decodable {
        struct Choice: Decodable {
            struct Delta: Decodable { var content: String? }
            var delta: Delta?
            var finish_reason: String?
        }
        struct Usage: Decodable {
            var prompt_tokens: Int?
            var completion_tokens: Int?
        }
        var choices: [Choice]?
        var usage: Usage?
        var error: APIErrorBody.Detail?
    }

    mutating func consume(_ event: SSEParser.Event, apiKey: String) throws -> Step {
        let data = event.data.trimmingCharacters(in: .whitespaces)
        if data.hasPrefix("[DONE]") {
            isDone = true
            return .done
        }
        if data.isEmpty { return .more }
        let chunk: Chunk
        do {
            chunk = try JSONDecoder().decode(Chunk.self, from: Data(data.utf8))
        } catch {
            throw ModelError(.invalidResponse, detail: "unreadable stream chunk: \(ErrorClassifier.redact(String(data.prefix(200)), apiKey: apiKey))")
        }
        if let error = chunk.error {
            let kind: ModelError.Kind = ErrorClassifier.isContextLength(code: error.code?.value, message: error.message) ? .contextTooLong : .serverError
            throw ModelError(kind, detail: "error in stream: \(ErrorClassifier.redact(error.message ?? "unknown", apiKey: apiKey))")
        }
        if let usage = chunk.usage {
            promptTokens = usage.prompt_tokens
            completionTokens = usage.completion_tokens
        }
        for choice in chunk.choices ?? [] {
            if let content = choice.delta?.content, !content.isEmpty {
                text += content
                pending = (pending ?? "") + content
            }
            if let reason = choice.finish_reason { finishReason = reason }
        }
        return .more
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

/// Maps HTTP failures to ``ModelError`` per the provider error table.
public enum ErrorClassifier {
    public static func error(status: Int, headers: HTTPHeaders, body: String, apiKey: String) -> ModelError {
        let parsed = try? JSONDecoder().decode(APIErrorBody.self, from: Data(body.utf8))
        let code = parsed?.error?.code?.value
        let type = parsed?.error?.type
        let message = redact(parsed?.error?.message ?? String(body.prefix(300)), apiKey: apiKey)
        let retryAfter = retryAfter(headers)
        let shouldRetry = headers.first(name: "x-should-retry").flatMap { value -> Bool? in
            switch value.lowercased() {
            case "true": true
            case "false": false
            default: nil
            }
        }
        let detail = "HTTP \(status)" + (code.map { " \($0)" } ?? "") + ": \(message)"
        let kind: ModelError.Kind
        switch status {
        case 401: kind = .invalidAPIKey
        case 403: kind = .permissionDenied
        case 404: kind = .modelNotFound
        case 408, 504: kind = .timeout
        case 409: kind = .serverError
        case 429:
            kind = (code == "insufficient_quota" || type == "insufficient_quota") ? .quotaExceeded : .rateLimited
        case 400, 422:
            if isContextLength(code: code, message: message) {
                kind = .contextTooLong
            } else if code == "content_filter" || code == "content_policy_violation" {
                kind = .contentFiltered
            } else {
                kind = .badRequest
            }
        case 500...599: kind = .serverError
        default: kind = .badRequest
        }
        // Permanent failures are never retried, whatever a header says.
        let permanent: Set<ModelError.Kind> = [.invalidAPIKey, .permissionDenied, .modelNotFound, .quotaExceeded, .badRequest, .contextTooLong, .contentFiltered]
        return ModelError(kind, status: status, detail: detail, retryAfter: retryAfter, shouldRetry: permanent.contains(kind) ? false : shouldRetry)
    }

    static func isContextLength(code: String?, message: String?) -> Bool {
        if code == "context_length_exceeded" { return true }
        let lower = message?.lowercased() ?? ""
        return lower.contains("maximum context length") || lower.contains("context length") || lower.contains("too many tokens")
    }

    /// `retry-after-ms` (milliseconds) or `retry-after` (seconds, or an HTTP date).
    public static func retryAfter(_ headers: HTTPHeaders) -> Duration? {
        if let ms = headers.first(name: "retry-after-ms").flatMap(Double.init), ms > 0 {
            return .milliseconds(Int64(ms))
        }
        guard let value = headers.first(name: "retry-after")?.trimmingCharacters(in: .whitespaces) else { return nil }
        if let seconds = Double(value), seconds > 0 { return .milliseconds(Int64(seconds * 1000)) }
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss zzz"
        if let date = formatter.date(from: value) {
            let seconds = date.timeIntervalSinceNow
            return seconds > 0 ? .milliseconds(Int64(seconds * 1000)) : nil
        }
        return nil
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
