import Foundation
import Hummingbird
import HTTPTypes
import NIOCore
import NIOFoundationCompat
import NIOHTTP1
import Synchronization

/// An OpenAI-compatible model server on loopback: streams answers over SSE with configurable latency,
/// speed and length, fails on request (scripted responses or a random error rate), and records requests.
public final class ModelSimulator: Sendable {
    /// How the simulated model behaves.
    public struct Behaviour: Sendable {
        /// Delay before the first token.
        public var firstTokenLatency: Duration = .zero
        /// Tokens per second after the first; 0 sends the whole answer at once.
        public var tokensPerSecond: Double = 0
        /// Filler words appended after the echo of the question.
        public var answerTokens: Int = 0
        /// Fraction of requests answered with HTTP 503 (0…1).
        public var errorRate: Double = 0
        public init() {}
    }

    /// A canned reply for the next request.
    public struct Scripted: Sendable {
        public var status: Int
        public var headers: [String: String]
        public var body: String
        /// When set, a 200 stream that sends this text and then breaks with an error event.
        public var midStreamError: String?
        /// When set, a 200 `text/event-stream` of exactly these `data:` payloads, then the end of the body.
        public var events: [String]?

        public init(status: Int, headers: [String: String] = [:], body: String) {
            self.status = status
            self.headers = headers
            self.body = body
        }

        /// A stream of exactly these `data:` payloads (JSON chunks, `[DONE]`, error objects), as given.
        public static func stream(_ events: [String]) -> Scripted {
            var scripted = Scripted(status: 200, body: "")
            scripted.events = events
            return scripted
        }

        /// One streamed chunk carrying `content` (and `finish_reason`, when given).
        public static func chunk(_ content: String?, finish: String? = nil, refusal: String? = nil) -> String {
            var delta: [String: Any] = [:]
            if let content { delta["content"] = content }
            if let refusal { delta["refusal"] = refusal }
            let choice: [String: Any] = ["index": 0, "delta": delta, "finish_reason": finish ?? NSNull()]
            let object: [String: Any] = ["id": "chatcmpl-sim", "object": "chat.completion.chunk", "created": 1, "model": "sim", "choices": [choice]]
            return String(decoding: (try? JSONSerialization.data(withJSONObject: object)) ?? Data(), as: UTF8.self)
        }

        public static func error(_ status: Int, code: String? = nil, message: String = "simulated error", retryAfter: String? = nil) -> Scripted {
            var headers: [String: String] = [:]
            if let retryAfter { headers["retry-after"] = retryAfter }
            let codeJSON = code.map { "\"\($0)\"" } ?? "null"
            return Scripted(status: status, headers: headers, body: #"{"error":{"message":"\#(message)","type":"\#(code ?? "server_error")","param":null,"code":\#(codeJSON)}}"#)
        }
    }

    /// What the simulator received.
    public struct Received: Sendable {
        public var messages: [[String: String]]
        public var authorization: String?
        public var apiKeyHeader: String?
        public var path: String
        public var query: String
        public var stream: Bool
        /// The `user` field of the request.
        public var user: String?
        /// When the request arrived, in seconds since 1970.
        public var at: Double
    }

    private struct State {
        var behaviour = Behaviour()
        var scripted: [Scripted] = []
        var received: [Received] = []
        /// Replies given to every request made with a key, until cleared.
        var byKey: [String: Scripted] = [:]
        var inFlight = 0
        var maxInFlight = 0
    }

    private let state = Mutex(State())
    private let answers = Gate(open: true)
    private let server: LoopbackServer

    public var port: Int { server.port }
    /// The `llm.base_url` to configure: `http://127.0.0.1:PORT/v1`.
    public var baseURL: String { server.baseURL + "/v1" }

    private init(server: LoopbackServer, state: State) {
        self.server = server
        self.state.withLock { $0 = state }
    }

    public static func start(port: Int = 0, behaviour: Behaviour = .init()) async throws -> ModelSimulator {
        let box = Box()
        let router = Router()
        let handler: @Sendable (Request, BasicRequestContext) async throws -> Response = { request, _ in
            guard let simulator = box.simulator else { return Response(status: .serviceUnavailable) }
            return try await simulator.handle(request)
        }
        router.post("/v1/chat/completions", use: handler)
        router.post("/openai/deployments/:deployment/chat/completions", use: handler)
        router.post("/chat/completions", use: handler)
        let server = try await LoopbackServer.start(router: router, port: port, name: "model")
        var initial = State()
        initial.behaviour = behaviour
        let simulator = ModelSimulator(server: server, state: initial)
        box.simulator = simulator
        return simulator
    }

    private final class Box: @unchecked Sendable {
        // Written once before the server can route to it.
        var simulator: ModelSimulator?
    }

    public func stop() async { await server.stop() }

    public var behaviour: Behaviour {
        get { state.withLock { $0.behaviour } }
        set { state.withLock { $0.behaviour = newValue } }
    }

    /// Queues canned replies for the next requests, in order.
    public func script(_ replies: Scripted...) {
        state.withLock { $0.scripted.append(contentsOf: replies) }
    }

    /// From now on every request made with `key` (Bearer or api-key) gets `reply`; nil clears it.
    public func respond(toKey key: String, with reply: Scripted?) {
        state.withLock { $0.byKey[key] = reply }
    }

    /// How many requests were made with `key`.
    public func requests(withKey key: String) -> Int {
        state.withLock { $0.received.filter { $0.authorization == "Bearer \(key)" || $0.apiKeyHeader == key }.count }
    }

    /// From now on, requests are received but not answered until ``release()``.
    public func hold() { answers.close() }

    /// Answers the held requests and stops holding.
    public func release() { answers.open() }

    public var received: [Received] { state.withLock { $0.received } }
    public var requestCount: Int { state.withLock { $0.received.count } }
    /// The most requests that were being answered at the same time.
    public var maxConcurrentRequests: Int { state.withLock { $0.maxInFlight } }

    /// The answer the simulator gives to a question (without filler words).
    public static func answer(to question: String) -> String { "Answer to: " + question }

    private func handle(_ request: Request) async throws -> Response {
        state.withLock {
            $0.inFlight += 1
            $0.maxInFlight = max($0.maxInFlight, $0.inFlight)
        }
        var streaming = false
        defer { if !streaming { state.withLock { $0.inFlight -= 1 } } }
        let body = try await request.body.collect(upTo: 4 << 20)
        let json = (try? JSONSerialization.jsonObject(with: Data(buffer: body))) as? [String: Any] ?? [:]
        let messages = (json["messages"] as? [[String: Any]] ?? []).map { message in
            ["role": message["role"] as? String ?? "", "content": message["content"] as? String ?? ""]
        }
        let authorization = request.headers[.authorization]
        let apiKeyHeader = request.headers[HTTPField.Name("api-key")!]
        let key = authorization.map { $0.hasPrefix("Bearer ") ? String($0.dropFirst(7)) : $0 } ?? apiKeyHeader
        let (behaviour, scripted) = state.withLock { state -> (Behaviour, Scripted?) in
            state.received.append(Received(
                messages: messages, authorization: request.headers[.authorization],
                apiKeyHeader: request.headers[HTTPField.Name("api-key")!], path: request.uri.path,
                query: request.uri.query ?? "", stream: json["stream"] as? Bool ?? false, user: json["user"] as? String,
                at: Date().timeIntervalSince1970))
            if let key, let reply = state.byKey[key] { return (state.behaviour, reply) }
            return (state.behaviour, state.scripted.isEmpty ? nil : state.scripted.removeFirst())
        }
        await answers.pass()
        if let events = scripted?.events {
            let body = events.map { "data: \($0)\n\n" }.joined()
            return Response(status: .ok, headers: [.contentType: "text/event-stream"], body: .init(byteBuffer: ByteBuffer(string: body)))
        }
        if let scripted, scripted.midStreamError == nil {
            var headers: HTTPFields = [.contentType: "application/json"]
            for (name, value) in scripted.headers { headers[HTTPField.Name(name)!] = value }
            return Response(status: .init(code: scripted.status), headers: headers, body: .init(byteBuffer: ByteBuffer(string: scripted.body)))
        }
        if behaviour.errorRate > 0, Double.random(in: 0..<1) < behaviour.errorRate {
            return Response(status: .serviceUnavailable, headers: [.contentType: "application/json"],
                body: .init(byteBuffer: ByteBuffer(string: #"{"error":{"message":"The engine is currently overloaded","type":"server_error","code":"server_is_overloaded"}}"#)))
        }
        let question = messages.last(where: { $0["role"] == "user" })?["content"] ?? ""
        var pieces = ["Answer", " to:", " " + question]
        for index in 0..<behaviour.answerTokens { pieces.append(" w\(index)") }
        let midStreamError = scripted?.midStreamError
        let streamRequested = json["stream"] as? Bool ?? false
        if !streamRequested {
            if behaviour.firstTokenLatency > .zero { try await Task.sleep(for: behaviour.firstTokenLatency) }
            return .json(.ok, [
                "id": "chatcmpl-sim", "object": "chat.completion", "model": json["model"] as? String ?? "sim",
                "choices": [["index": 0, "message": ["role": "assistant", "content": pieces.joined()], "finish_reason": "stop"]],
            ])
        }
        let model = json["model"] as? String ?? "sim"
        let messageCount = messages.count
        streaming = true
        return Response(
            status: .ok, headers: [.contentType: "text/event-stream", .cacheControl: "no-cache"],
            body: .init { [pieces, self] writer in
                defer { self.state.withLock { $0.inFlight -= 1 } }
                func chunk(_ delta: String?, finish: String? = nil) -> ByteBuffer {
                    var choice: [String: Any] = ["index": 0, "delta": delta.map { ["content": $0] } ?? [:]]
                    choice["finish_reason"] = finish ?? NSNull()
                    let object: [String: Any] = ["id": "chatcmpl-sim", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [choice]]
                    let data = (try? JSONSerialization.data(withJSONObject: object)) ?? Data()
                    return ByteBuffer(string: "data: " + String(decoding: data, as: UTF8.self) + "\n\n")
                }
                try await writer.write(ByteBuffer(string: ": keep-alive\n\n"))
                if behaviour.firstTokenLatency > .zero { try await Task.sleep(for: behaviour.firstTokenLatency) }
                try await writer.write(ByteBuffer(string: #"data: {"id":"chatcmpl-sim","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"# + "\n\n"))
                if let midStreamError {
                    try await writer.write(chunk(midStreamError))
                    try await writer.write(ByteBuffer(string: #"data: {"error":{"message":"stream interrupted by the server","type":"server_error"}}"# + "\n\n"))
                    try await writer.finish(nil)
                    return
                }
                if behaviour.tokensPerSecond > 0 {
                    let pause = Duration.milliseconds(Int64(1000 / behaviour.tokensPerSecond))
                    for (index, piece) in pieces.enumerated() {
                        if index > 0 { try await Task.sleep(for: pause) }
                        try await writer.write(chunk(piece))
                    }
                } else {
                    try await writer.write(chunk(pieces.joined()))
                }
                try await writer.write(chunk(nil, finish: "stop"))
                let usage = #"data: {"id":"chatcmpl-sim","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":\#(messageCount * 10),"completion_tokens":\#(pieces.count),"total_tokens":\#(messageCount * 10 + pieces.count)}}"#
                try await writer.write(ByteBuffer(string: usage + "\n\ndata: [DONE]\n\n"))
                try await writer.finish(nil)
            }
        )
    }
}
