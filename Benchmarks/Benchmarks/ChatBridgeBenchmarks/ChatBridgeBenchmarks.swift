import Benchmark
import ChatBridgeCore
import ChatBridgeDingTalk
import ChatBridgeLLM
import ChatBridgeStore
import Foundation
import Logging

/// The hot pieces of one answered message, each alone: time, CPU and allocations per operation.
let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .cpuTotal, .mallocCountTotal, .throughput],
        maxDuration: .seconds(3), maxIterations: 1_000_000)

    let secret = "bench-app-secret-0123456789"
    let timestamp = "1800000000000"
    let sign = DingTalkSignature.sign(timestamp: timestamp, secret: secret)
    let now = Date(timeIntervalSince1970: 1_800_000_000)
    Benchmark("DingTalk signature check") { benchmark in
        for _ in benchmark.scaledIterations {
            blackHole(try? DingTalkSignature.verify(timestamp: timestamp, sign: sign, secret: secret, now: now))
        }
    }

    let body = Data("""
        {"conversationId":"cidBench==","atUsers":[{"dingtalkId":"$:LWCP_v1:$bot"}],"chatbotCorpId":"dingcorp","chatbotUserId":"$:LWCP_v1:$bot",
        "msgId":"msgBench123","senderNick":"Bench User","isAdmin":false,"senderStaffId":"0420001","sessionWebhookExpiredTime":1800003600000,
        "createAt":1800000000000,"senderCorpId":"dingcorp","conversationType":"2","senderId":"$:LWCP_v1:$sender","conversationTitle":"Bench",
        "isInAtList":true,"sessionWebhook":"https://oapi.dingtalk.com/robot/sendBySession?session=abc","text":{"content":" What is the weather like tomorrow? "},
        "robotCode":"dingbench","msgtype":"text"}
        """.utf8)
    Benchmark("DingTalk payload decode and normalise") { benchmark in
        for _ in benchmark.scaledIterations {
            blackHole(try? DingTalkMessage.decode(body).normalised(botID: "dingbench", receivedAt: now))
        }
    }

    let history = (0..<20).map { index in
        Turn(role: index % 2 == 0 ? .user : .assistant, content: "turn \(index) with a sentence or two of ordinary text in it", createdAt: now)
    }
    let builder = ContextBuilder(settings: EngineSettings())
    Benchmark("context assembly, 10 pairs") { benchmark in
        for _ in benchmark.scaledIterations {
            blackHole(builder.messages(history: history, question: "And what about the day after?", now: now))
        }
    }

    var stream = ""
    for index in 0..<40 {
        stream += #"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" word\#(index)"},"finish_reason":null}]}"# + "\n\n"
    }
    stream += "data: [DONE]\n\n"
    let sse = Array(stream.utf8)
    Benchmark("SSE parsing, a 40-chunk answer") { benchmark in
        for _ in benchmark.scaledIterations {
            var parser = SSEParser()
            blackHole(try? parser.feed(sse))
        }
    }

    let words = BlockedWords((0..<10_000).map { "blocked\($0)词" })
    let answer = String(repeating: "这是一段普通的回答文字，包含一些 English words and numbers 12345。", count: 40)
    Benchmark("blocked words: masking a 1,960-character answer with 10,000 words") { benchmark in
        for _ in benchmark.scaledIterations { blackHole(words.masked(answer)) }
    }

    Benchmark(
        "inbox accept, claim, store reply, finish (SQLite file)",
        configuration: .init(metrics: [.wallClock, .cpuTotal, .mallocCountTotal, .throughput], maxDuration: .seconds(5), maxIterations: 20_000)
    ) { benchmark in
        // One store for every sample: the steady state, not a fresh database's first operations.
        let store = try await InboxFixture.shared.store()
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            let index = await InboxFixture.shared.next()
            let message = InboundMessage(
                platform: "dingtalk", botID: "bench", messageID: "m\(index)", chat: .init(id: "c\(index % 64)", kind: .direct),
                sender: .init(id: "u\(index % 64)", name: "u"), body: .text("question \(index)"), sentAt: now)
            let key = ConversationKey(for: message, groupScope: .user)
            _ = try await store.accept(message, conversation: key, now: now)
            let claimed = try await store.claim(limit: 1, owner: "bench", leaseUntil: now.addingTimeInterval(30), maxAttempts: 5, now: now)
            guard case .ready(let item)? = claimed.first else { fatalError("message \(index) was not claimed") }
            let reply = StoredReply(
                text: "Answer to: question \(index)", kind: .answer,
                effect: .appendExchange(
                    question: Turn(role: .user, content: "question \(index)", createdAt: now),
                    answer: Turn(role: .assistant, content: "Answer to: question \(index)", createdAt: now)))
            try await store.storeReply(reply, for: item.lease, error: nil, now: now)
            try await store.finish(item.lease, reply: reply, conversation: item.conversation, now: now)
        }
        benchmark.stopMeasurement()
    }
}

/// The inbox benchmark's store, opened once (in a new directory) and kept for every sample.
actor InboxFixture {
    static let shared = InboxFixture()
    private var opened: SQLStore?
    private var counter = 0

    func store() async throws -> SQLStore {
        if let opened { return opened }
        let directory = NSTemporaryDirectory() + "chatbridge-benchmark-\(UUID().uuidString)"
        let store = try await SQLStore.open(.sqliteFile(path: directory + "/inbox.sqlite"), logger: Logger(label: "benchmark"))
        opened = store
        return store
    }

    func next() -> Int {
        counter += 1
        return counter
    }
}
