import ArgumentParser
import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeDingTalk
import ChatBridgeServer
import ChatBridgeSimulators
import ChatBridgeStore
import Foundation
import Logging
import NIOCore
import Synchronization

struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure acknowledgement latency, answer throughput and memory against loopback simulators.",
        discussion: "Starts a simulated model server and a simulated DingTalk (or, with --platform lark, Feishu) on loopback, starts 'chatbridge serve' as a child process against them with a fresh SQLite database (or --replicas N of them on one fresh PostgreSQL database with --database; or drives --target, DingTalk only), sends signed callbacks, encrypted and signed Lark webhook events, or frames over the simulated stream gateway, and reports acknowledgement and answer latencies, throughput, lost and duplicated answers, the server's peak RSS, CPU time and CPU per answer, SQLite commits and store calls per answer, and how long urgent store calls (acknowledgements, lease renewals) waited for their SQLite commit and how long commits took (from the server's closing log line: not with --target or PostgreSQL), the load generator's own CPU time, and the wake-up latency from sending a message to its model request. With --target, configure that server's llm.base_url and dingtalk.webhook_hosts/api_base_url against the simulator ports printed at start (fix them with --model-port and --dingtalk-port). --context measures context assembly for a short and a very long conversation instead."
    )

    @Option(help: "Distinct senders (each has its own conversation).") var users = 200
    @Option(help: "Callbacks per second (open loop).") var rate = 200.0
    @Option(help: "Closed loop instead of --rate: this many senders each waiting for their acknowledgement.") var concurrency: Int?
    @Option(help: "How long to send, in seconds.") var duration = 10.0
    @Option(help: "Model latency to first token, in milliseconds.") var modelLatency = 0
    @Option(help: "Model tokens per second after the first (0 = whole answer at once).") var tokensPerSecond = 0.0
    @Option(help: "Words per answer.") var answerTokens = 20
    @Option(help: "Fraction of model requests that fail with 503 (0…1).") var errorRate = 0.0
    @Option(help: "worker.concurrency of the started server.") var workers = 1000
    @Option(help: "Drive an already running server at this callback URL instead of starting one.") var target: String?
    @Option(help: "The target's dingtalk.client_secret (with --target).") var secret = "bench-secret"
    @Option(help: "Fixed port for the model simulator (0 = any).") var modelPort = 0
    @Option(help: "Fixed port for the DingTalk simulator (0 = any).") var dingtalkPort = 0
    @Option(help: "Fixed port for the Lark simulator (0 = any).") var larkPort = 0
    @Option(help: "The platform to drive: dingtalk or lark.") var platform: BenchPlatform = .dingtalk
    @Option(help: "Seconds to wait for outstanding answers after sending stops.") var drainWait = 120.0
    @Flag(help: "Send through the simulated DingTalk Stream gateway (or, with --platform lark, the Lark long connection) instead of HTTP callbacks or webhooks; reports frame-to-ack latency.") var stream = false
    @Option(help: "With --stream: the gateway ends the newest connection every this many seconds (0 = never); DingTalk sends disconnect, Lark closes the socket.") var disconnectEvery = 0.0
    @Flag(help: "Answer into simulated cards (DingTalk AI cards, or Lark CardKit cards); reports card updates.") var card = false
    @Option(help: "With --card: dingtalk.card.update_interval or lark.card.update_interval, in milliseconds.") var cardInterval = 500
    @Option(help: "With --card: dingtalk.card.max_qps.") var cardQps = 20
    @Option(help: "The database: sqlite (a new file, the default), postgres (a throwaway cluster of the installed PostgreSQL server binaries, /usr/lib/postgresql/N/bin), or a postgres://USER:PASSWORD@HOST:PORT/DB URL of a server on which the bench creates a new database and drops it afterwards (the role needs CREATEDB).") var database = "sqlite"
    @Option(help: "How many servers to start on the one database (PostgreSQL only); callbacks, webhook events and stream frames are spread round-robin over them.") var replicas = 1
    @Option(help: ArgumentHelp("Pin the started servers to these CPUs (a taskset list: 1, 0-1, 0,2), so \"one core to itself\" is a real condition.", valueName: "list")) var serverCpus: String?
    @Option(help: ArgumentHelp("Pin this process (the load generator and every simulator) to these CPUs.", valueName: "list")) var loadCpus: String?
    @Option(help: ArgumentHelp("Profile the (first) server with perf (cpu-clock samples) while the load is sent; the report, by library and symbol, demangled, goes to FILE and its top entries to standard error.", valueName: "file")) var profile: String?
    @Flag(help: "Print the report as JSON.") var json = false
    @Flag(help: "Measure context assembly for a 10-turn and a 10,000-turn conversation, then exit.") var context = false
    @Flag(help: "Measure what the operator controls add per message (access, 10,000 blocked words, routes, every limit counted in --database) and the blocked-word matcher with 10 and 10,000 words, then exit.") var controls = false

    func run() async throws {
        if context || controls, loadCpus != nil || serverCpus != nil || profile != nil {
            throw ValidationError("--load-cpus, --server-cpus and --profile apply to a load run, not to --context or --controls")
        }
        if context { return try await measureContext() }
        if controls { return try await measureControls() }
        guard replicas >= 1 else { throw ValidationError("--replicas must be at least 1") }
        if replicas > 1, database.lowercased() == "sqlite" {
            throw ValidationError("--replicas needs a PostgreSQL --database (postgres or a postgres:// URL): a SQLite database belongs to one server process")
        }
        if target != nil, replicas != 1 || database != "sqlite" {
            throw ValidationError("--target drives a server that is already running; --replicas and --database apply to the servers the bench starts")
        }
        for (name, list) in [("--server-cpus", serverCpus), ("--load-cpus", loadCpus)] {
            guard let list else { continue }
            guard list.range(of: "^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$", options: .regularExpression) != nil else {
                throw ValidationError("\(name) takes a CPU list such as 1, 0-1 or 0,2; got '\(list.prefix(40))'")
            }
            guard FileManager.default.isExecutableFile(atPath: BenchInstruments.taskset) else {
                throw ValidationError("\(name) needs \(BenchInstruments.taskset) (util-linux)")
            }
        }
        if target != nil, serverCpus != nil || profile != nil {
            throw ValidationError("--server-cpus and --profile apply to the servers the bench starts, not to --target")
        }
        if profile != nil, !FileManager.default.isExecutableFile(atPath: BenchInstruments.perf) {
            throw ValidationError("--profile needs \(BenchInstruments.perf) (Debian's linux-perf); or see the perf recipe in the README")
        }
        var behaviour = ModelSimulator.Behaviour()
        behaviour.firstTokenLatency = .milliseconds(modelLatency)
        behaviour.tokensPerSecond = tokensPerSecond
        behaviour.answerTokens = answerTokens
        behaviour.errorRate = errorRate
        let model = try await ModelSimulator.start(port: modelPort, behaviour: behaviour)
        let directory = NSTemporaryDirectory() + "chatbridge-bench-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store: BenchDatabase
        do {
            store = try await BenchDatabase.prepare(target == nil ? database : "sqlite", directory: directory)
        } catch {
            await model.stop()
            throw error
        }
        var report: Report
        do {
            switch platform {
            case .dingtalk: report = try await runDingTalk(model: model, database: store, directory: directory)
            case .lark: report = try await runLark(model: model, database: store, directory: directory)
            }
        } catch {
            await store.cleanup()
            throw error
        }
        await store.cleanup()
        report.database = target == nil ? store.kind : nil
        report.servers = target == nil ? replicas : nil
        await model.stop()
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
        } else {
            report.printTable()
        }
    }

    /// The environment every started server gets, whatever the platform.
    private func baseEnvironment(model: ModelSimulator, database: BenchDatabase) -> [String: String] {
        [
            "CHATBRIDGE_SERVER_HOST": "127.0.0.1", "CHATBRIDGE_SERVER_PORT": "0",
            "CHATBRIDGE_DATABASE_URL": database.url, "CHATBRIDGE_LLM_BASE_URL": model.baseURL,
            "CHATBRIDGE_LLM_API_KEY": "sk-bench", "CHATBRIDGE_LIMITS_USER_PER_MINUTE": "off", "CHATBRIDGE_WORKER_CONCURRENCY": "\(workers)", "CHATBRIDGE_LOG_LEVEL": "notice",
        ]
    }

    /// Calls `sendOne` with increasing indexes until `end`: at `--rate` per second, or from `--concurrency`
    /// senders that each wait for their acknowledgement.
    private func drive(start: Double, end: Double, recorder: Recorder, _ sendOne: @escaping @Sendable (Int) async -> Void) async {
        if let concurrency {
            await withDiscardingTaskGroup { group in
                for _ in 0..<concurrency {
                    group.addTask { [recorder] in
                        while Date().timeIntervalSince1970 < end {
                            await sendOne(recorder.counter.add(1, ordering: .relaxed).newValue)
                        }
                    }
                }
            }
        } else {
            let total = Int(rate * duration)
            await withDiscardingTaskGroup { group in
                for index in 0..<total {
                    let due = start + Double(index) / rate
                    let wait = due - Date().timeIntervalSince1970
                    if wait > 0 { try? await Task.sleep(for: .milliseconds(Int64(wait * 1000))) }
                    group.addTask { await sendOne(index) }
                }
            }
        }
    }

    /// Closes the newest connection every `--disconnect-every` seconds until `end`; returns how many it closed.
    private func forceDisconnects(until end: Double, _ disconnectNewest: @escaping @Sendable () async -> Bool) -> Task<Int, Never> {
        Task { [disconnectEvery, stream] in
            guard stream, disconnectEvery > 0 else { return 0 }
            var count = 0
            while Date().timeIntervalSince1970 < end {
                try? await Task.sleep(for: .milliseconds(Int64(disconnectEvery * 1000)))
                guard Date().timeIntervalSince1970 < end else { continue }
                if await disconnectNewest() { count += 1 }
            }
            return count
        }
    }

    /// Waits until `answered` reaches `expected`, or nothing progressed for 10 s, or `--drain-wait` passed.
    private func drain(expected: Int, sendingEnded: Double, answered: @Sendable () -> Int, progress: @Sendable () -> Int) async throws {
        var lastCount = -1
        var lastProgress = Date()
        while Date().timeIntervalSince(lastProgress) < 10, Date().timeIntervalSince1970 - sendingEnded < drainWait {
            if answered() >= expected { break }
            let count = progress()
            if count != lastCount {
                lastCount = count
                lastProgress = Date()
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        try await Task.sleep(for: .milliseconds(300))
    }

    private func runDingTalk(model: ModelSimulator, database: BenchDatabase, directory: String) async throws -> Report {
        let dingtalk = try await DingTalkSimulator.start(port: dingtalkPort)
        dingtalk.gateway.setCredentials(clientID: "dingbench", clientSecret: secret)
        log("model simulator: \(model.baseURL)  dingtalk simulator: \(dingtalk.baseURL)")
        var servers: BenchServers?
        let urls: [String]
        if let target {
            urls = [target]
        } else {
            var environment = baseEnvironment(model: model, database: database)
            environment.merge([
                "CHATBRIDGE_DINGTALK_CLIENT_ID": "dingbench",
                "CHATBRIDGE_DINGTALK_CLIENT_SECRET": secret, "CHATBRIDGE_DINGTALK_API_BASE_URL": dingtalk.baseURL,
                "CHATBRIDGE_DINGTALK_WEBHOOK_HOSTS": "127.0.0.1", "CHATBRIDGE_DINGTALK_MODE": stream ? "stream" : "http",
                "CHATBRIDGE_DINGTALK_STREAM_HOSTS": "127.0.0.1",
                "CHATBRIDGE_DINGTALK_CARD_TEMPLATE_ID": card ? "bench-template.schema" : "",
                "CHATBRIDGE_DINGTALK_CARD_UPDATE_INTERVAL": "\(cardInterval)ms", "CHATBRIDGE_DINGTALK_CARD_MAX_QPS": "\(cardQps)",
            ]) { $1 }
            let started = try await BenchServers.start(count: replicas, environment: environment, directory: directory, cpus: serverCpus)
            urls = started.ports.map { "http://127.0.0.1:\($0)/callbacks/dingtalk" }
            servers = started
        }
        try await Task.sleep(for: .seconds(1))
        let connections = replicas
        if stream {
            await dingtalk.gateway.wait { $0.openConnections.count >= connections }
            // As DingTalk: a frame still unacknowledged after 5s is delivered again (maybe on another connection).
            dingtalk.gateway.setRedelivery(after: .seconds(5))
        }
        let idleRSS = servers?.memory()?.current
        let startupCPU = servers?.cpuSeconds() ?? 0
        let databaseStartCPU = database.cpuSeconds()
        let instruments = try BenchInstruments.start(
            server: servers?.children.first, profile: profile, serverCPUs: serverCpus, loadCPUs: loadCpus, seconds: duration, directory: directory)

        let client = Self.httpClient()
        let senders = urls.map { CallbackSender(url: $0, secret: secret, robotCode: "dingbench") }
        let run = UUID().uuidString.prefix(8)
        let recorder = Recorder()
        let start = Date().timeIntervalSince1970
        let end = start + duration

        let users = self.users
        let streamMode = stream
        let disconnects = forceDisconnects(until: end) {
            guard let newest = dingtalk.gateway.openConnections.max() else { return false }
            return (try? await dingtalk.gateway.disconnect(newest)) != nil
        }
        await drive(start: start, end: end, recorder: recorder) { index in
            let id = "bench-\(run)-\(index)"
            let user = index % max(users, 1)
            let sender = senders[index % senders.count]
            let body = sender.body(
                messageID: id, text: "question \(index)", conversationID: "cidBench\(user)==", senderStaffID: "user\(user)",
                webhook: dingtalk.webhookURL(session: id))
            let sent = Date().timeIntervalSince1970
            if streamMode {
                // Round-robin over the replicas' connections (the newest when one is reconnecting).
                let open = dingtalk.gateway.openConnections.sorted()
                let connection = open.count >= connections ? open[index % open.count] : nil
                guard let frame = try? await dingtalk.gateway.pushMessage(body, to: connection) else { return recorder.record(id, sent: sent, acked: nil) }
                let ack = await SystemClock().withTimeout(.seconds(60)) { await dingtalk.gateway.firstAck(frame) } ?? nil
                recorder.record(id, sent: sent, acked: ack?.code == 200 ? ack?.at : nil)
                return
            }
            let status = try? await sender.post(body, client: client).status
            let acked = status == 200 ? Date().timeIntervalSince1970 : nil
            recorder.record(id, sent: sent, acked: acked)
        }
        let sendingEnded = Date().timeIntervalSince1970
        let acknowledged = recorder.snapshot.values.filter { $0.ack != nil }.count
        log("sent \(recorder.snapshot.count), acknowledged \(acknowledged); waiting for answers")
        let forcedDisconnects = await disconnects.value
        let cardMode = card
        let answeredCount: @Sendable () -> Int = {
            cardMode ? dingtalk.cards.cards.filter { $0.flowStatus == "3" }.count : Set(dingtalk.deliveries.map(\.target)).count
        }
        // Card calls are progress too: many cards share the card API rate.
        try await drain(expected: acknowledged, sendingEnded: sendingEnded, answered: answeredCount) {
            answeredCount() + (cardMode ? dingtalk.cards.calls.count : 0)
        }
        var deliveries = dingtalk.deliveries.map { Answer(id: $0.target, at: $0.receivedAt) }
        let cards = dingtalk.cards.cards
        let cardCalls = dingtalk.cards.calls
        let peakCardQPS = dingtalk.cards.peakCallsPerSecond
        let memory = servers?.memory()
        let cpu = servers?.cpuSeconds().map { $0 - startupCPU }
        let databaseCPU = zip2(database.cpuSeconds(), databaseStartCPU).map { $0 - $1 }
        let loadCPU = instruments.finish()
        await servers?.stop()
        try? await client.shutdown()
        await dingtalk.stop()

        let snapshot = recorder.snapshot
        var cardReport: CardReport?
        if card {
            // A finished card is the answer; more than one delivery of a card is a duplicate.
            var idForTrack: [String: String] = [:]
            for id in snapshot.keys { idForTrack[DingTalkCard.outTrackID(robotCode: "dingbench", messageID: id)] = id }
            var byCard: [String: [CardSimulator.Call]] = [:]
            for call in cardCalls { byCard[call.outTrackID, default: []].append(call) }
            var updates = 0
            var fastest = 0.0
            var visible: [Double] = []
            var firstText: [Double] = []
            for card in cards where card.flowStatus == "3" {
                guard let id = idForTrack[card.outTrackID], let record = snapshot[id] else { continue }
                let calls = byCard[card.outTrackID] ?? []
                let streaming = calls.filter { $0.path == "/v1.0/card/streaming" && $0.status == 200 && !$0.isFinalize }.map(\.at)
                updates += streaming.count
                // The pace counts every streaming call of the card, the final one too.
                let paced = calls.filter { $0.path == "/v1.0/card/streaming" }.map(\.at)
                if let gap = zip(paced, paced.dropFirst()).map({ $1 - $0 }).min(), gap > 0 { fastest = max(fastest, 1 / gap) }
                if let created = calls.first(where: { $0.path.hasSuffix("createAndDeliver") && $0.status == 200 })?.at {
                    visible.append((created - record.sent) * 1000)
                }
                if let first = streaming.first { firstText.append((first - record.sent) * 1000 - Double(modelLatency)) }
                deliveries.append(Answer(id: id, at: calls.last?.at ?? 0))
                for _ in 1..<max(card.deliveries, 1) { deliveries.append(Answer(id: id, at: 0)) }
            }
            let finished = cards.filter { $0.flowStatus == "3" }.count
            visible.sort()
            firstText.sort()
            cardReport = CardReport(
                cards: cards.count, updatesPerAnswer: Double(updates) / Double(max(finished, 1)), fastestCardUpdatesPerSecond: fastest,
                peakCardCallsPerSecond: peakCardQPS, cardVisibleP99: percentile(visible, 0.99),
                firstTextAfterFirstTokenP99: percentile(firstText, 0.99), markdownReplies: dingtalk.deliveries.count)
        }
        var report = Report(
            snapshot: snapshot, answers: deliveries, start: start, sendingEnded: sendingEnded,
            // Over the stream an unacknowledged frame is delivered again, so every message sent must be answered;
            // over HTTP the bench does not re-send, so only acknowledged ones must.
            everySentMustBeAnswered: stream, idleRSS: idleRSS, memory: memory, cpu: cpu, modelRequests: model.requestCount,
            platform: "dingtalk", transport: stream ? "stream" : "http", forcedDisconnects: stream ? forcedDisconnects : nil, card: cardReport)
        report.setWakeUps(snapshot: snapshot, answers: deliveries, requests: model.received, users: users) { "bench-\(run)-\($0)" }
        report.databaseCPUSeconds = databaseCPU
        report.loadCPUSeconds = loadCPU
        report.databaseCommits = servers?.databaseCommits()
        return report
    }

    private func runLark(model: ModelSimulator, database: BenchDatabase, directory: String) async throws -> Report {
        guard target == nil else { throw ValidationError("--target drives a DingTalk callback URL; --platform lark always starts its own server") }
        let lark = try await LarkSimulator.start(port: larkPort)
        log("model simulator: \(model.baseURL)  lark simulator: \(lark.baseURL)")
        let verificationToken = "bench-verification-token"
        let encryptKey = "bench-encrypt-key"
        var environment = baseEnvironment(model: model, database: database)
        environment.merge([
            "CHATBRIDGE_LARK_APP_ID": lark.appID, "CHATBRIDGE_LARK_APP_SECRET": lark.appSecret, "CHATBRIDGE_LARK_BASE_URL": lark.baseURL,
            "CHATBRIDGE_LARK_MODE": stream ? "websocket" : "webhook", "CHATBRIDGE_LARK_STREAM_HOSTS": "127.0.0.1",
            "CHATBRIDGE_LARK_VERIFICATION_TOKEN": verificationToken, "CHATBRIDGE_LARK_ENCRYPT_KEY": encryptKey,
            "CHATBRIDGE_LARK_CARD_MODE": card ? "cardkit" : "off", "CHATBRIDGE_LARK_CARD_UPDATE_INTERVAL": "\(cardInterval)ms",
        ]) { $1 }
        let servers = try await BenchServers.start(count: replicas, environment: environment, directory: directory, cpus: serverCpus)
        try await Task.sleep(for: .seconds(1))
        let gateway = lark.gateway
        let connections = replicas
        if stream {
            guard await gateway.wait(seconds: 30, until: { $0.openConnections.count >= connections }) else {
                throw ValidationError("the server did not open the long connection within 30 s; see its log")
            }
            // As Feishu: an event still without {"code":200} after 5 s is pushed again, maybe on another connection.
            gateway.setRedelivery(after: .seconds(5))
        }
        let idleRSS = servers.memory()?.current
        let startupCPU = servers.cpuSeconds() ?? 0
        let databaseStartCPU = database.cpuSeconds()
        let instruments = try BenchInstruments.start(
            server: servers.children.first, profile: profile, serverCPUs: serverCpus, loadCPUs: loadCpus, seconds: duration, directory: directory)

        let client = Self.httpClient()
        let senders = servers.ports.map {
            LarkEventSender(url: "http://127.0.0.1:\($0)/callbacks/lark", verificationToken: verificationToken, encryptKey: encryptKey, appID: lark.appID)
        }
        let run = UUID().uuidString.prefix(8)
        let recorder = Recorder()
        // Long connection: the frame's message_id → the Feishu message it carries, and when it was pushed.
        let frames = Mutex<[String: (id: String, sent: Double)]>([:])
        let start = Date().timeIntervalSince1970
        let end = start + duration
        let users = self.users
        let streamMode = stream
        let disconnects = forceDisconnects(until: end) {
            guard let newest = gateway.openConnections.max() else { return false }
            gateway.close(newest)
            return true
        }
        await drive(start: start, end: end, recorder: recorder) { index in
            let id = "om_bench_\(run)_\(index)"
            let user = index % max(users, 1)
            let sender = senders[index % senders.count]
            let event = sender.messageEvent(messageID: id, text: "question \(index)", chatID: "oc_bench\(user)", sender: "ou_bench\(user)")
            let sent = Date().timeIntervalSince1970
            guard streamMode else {
                let status = try? await sender.post(event, client: client).status
                return recorder.record(id, sent: sent, acked: status == 200 ? Date().timeIntervalSince1970 : nil)
            }
            // As Feishu: an event waits for a connection when none is open (during a reconnect).
            recorder.record(id, sent: sent, acked: nil)
            for _ in 0..<3 {
                // Round-robin over the replicas' connections (the newest when one is reconnecting).
                let open = gateway.openConnections.sorted()
                let connection = open.count >= connections ? open[index % open.count] : nil
                if let frame = try? await gateway.pushEvent(event, to: connection) {
                    frames.withLock { $0[frame] = (id, sent) }
                    return
                }
                await gateway.wait(seconds: 30) { !$0.openConnections.isEmpty }
            }
        }
        let sendingEnded = Date().timeIntervalSince1970
        let acknowledged = stream ? gateway.succeededEvents : recorder.snapshot.values.filter { $0.ack != nil }.count
        log("sent \(recorder.snapshot.count), acknowledged \(acknowledged) so far; waiting for answers")
        let forcedDisconnects = await disconnects.value
        let cardMode = card
        let expected = stream ? recorder.snapshot.count : acknowledged
        let answeredCount: @Sendable () -> Int = {
            cardMode ? lark.cards.filter { $0.closedAt != nil }.count : Set(lark.messages.compactMap(\.replyTo)).count
        }
        try await drain(expected: expected, sendingEnded: sendingEnded, answered: answeredCount) {
            answeredCount() + lark.cards.reduce(0) { $0 + $1.contentUpdates }
        }
        if stream {
            // The first {"code":200} response to each frame is its acknowledgement (re-pushes included, so
            // read after the drain).
            let pushed = frames.withLock { $0 }
            var firstSuccess: [String: Double] = [:]
            for reply in gateway.replies where reply.code == 200 && firstSuccess[reply.messageID] == nil {
                firstSuccess[reply.messageID] = reply.at
            }
            for (frame, message) in pushed {
                recorder.record(message.id, sent: message.sent, acked: firstSuccess[frame])
            }
        }
        let messages = lark.messages
        let cards = Dictionary(uniqueKeysWithValues: lark.cards.map { ($0.id, $0) })
        let replays = lark.duplicateReplies
        let memory = servers.memory()
        let cpu = servers.cpuSeconds().map { $0 - startupCPU }
        let databaseCPU = zip2(database.cpuSeconds(), databaseStartCPU).map { $0 - $1 }
        let loadCPU = instruments.finish()
        await servers.stop()
        try? await client.shutdown()
        await lark.stop()

        let snapshot = recorder.snapshot
        // An answer is a text reply, or a card reply whose card was closed; every further one is a duplicate.
        var answers: [Answer] = []
        var cardReport: CardReport?
        var updates = 0
        var visible: [Double] = []
        var refusedSequences = 0
        for message in messages {
            guard let id = message.replyTo, let record = snapshot[id] else { continue }
            guard let cardID = message.cardID else {
                answers.append(Answer(id: id, at: message.at))
                continue
            }
            guard let card = cards[cardID], let closed = card.closedAt else { continue }
            answers.append(Answer(id: id, at: closed))
            updates += card.contentUpdates
            refusedSequences += card.refusedSequences
            visible.append((message.at - record.sent) * 1000)
        }
        if card {
            visible.sort()
            let shown = answers.count
            cardReport = CardReport(
                cards: cards.count, updatesPerAnswer: Double(updates) / Double(max(shown, 1)), fastestCardUpdatesPerSecond: nil,
                peakCardCallsPerSecond: nil, cardVisibleP99: percentile(visible, 0.99), firstTextAfterFirstTokenP99: nil,
                markdownReplies: messages.filter { $0.cardID == nil }.count, refusedSequences: refusedSequences)
        }
        var report = Report(
            snapshot: snapshot, answers: answers, start: start, sendingEnded: sendingEnded,
            // Over the long connection an event without a response is pushed again, so every one sent must be
            // answered; over webhooks the bench does not re-send, so only acknowledged ones must.
            everySentMustBeAnswered: stream, idleRSS: idleRSS, memory: memory, cpu: cpu, modelRequests: model.requestCount,
            platform: "lark", transport: stream ? "websocket" : "webhook", forcedDisconnects: stream ? forcedDisconnects : nil, card: cardReport)
        report.replaysRefusedByUUID = replays
        report.setWakeUps(snapshot: snapshot, answers: answers, requests: model.received, users: users) { "om_bench_\(run)_\($0)" }
        report.databaseCPUSeconds = databaseCPU
        report.loadCPUSeconds = loadCPU
        report.databaseCommits = servers.databaseCommits()
        return report
    }

    private static func httpClient() -> HTTPClient {
        var configuration = HTTPClient.Configuration()
        configuration.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: 256)
        configuration.redirectConfiguration = .disallow
        return HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }

    private func log(_ text: String) {
        FileHandle.standardError.write(Data("bench: \(text)\n".utf8))
    }

    static func ownExecutable() -> String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }

    /// The time `Engine.plan` takes per question with no controls and with every check on (limits counted
    /// in the database), and the blocked-word matcher over a 2,000-character answer with 10 and 10,000 words.
    private func measureControls() async throws {
        let directory = NSTemporaryDirectory() + "chatbridge-bench-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let prepared = try await BenchDatabase.prepare(database, directory: directory)
        var logger = Logger(label: "bench")
        logger.logLevel = .critical
        let store = try await SQLStore.open(try DatabaseLocation.parse(prepared.url), options: .init(poolSize: 4), logger: logger)
        var all = Controls()
        all.access.admins = Set((0..<10).map { "dingtalk:admin\($0)" })
        all.access.allowUsers = Set((0..<1000).map { "dingtalk:user\($0)" })
        all.access.denyUsers = Set((0..<100).map { "dingtalk:banned\($0)" })
        all.access.denyChats = Set((0..<100).map { "dingtalk:cidBanned\($0)" })
        all.limits.userPerMinute = 100_000
        all.limits.userDailyMessages = 1_000_000
        all.limits.userDailyTokens = 1_000_000_000
        all.limits.chatDailyTokens = 1_000_000_000
        all.safety.blockedWords = BlockedWords((0..<10_000).map { "blocked\($0)词" })
        all.personas = (0..<10).map { Persona(name: "p\($0)", prompt: "persona \($0)") }
        all.routes = (0..<20).map { Route(chats: ["cidRoute\($0)"], persona: "p\($0 % 10)") }
        var none = Controls()
        none.limits = Limits()
        none.limits.userPerMinute = nil
        let clock = SystemClock()
        let model = RecordingBenchModel()
        func measure(_ controls: Controls, ledger: (any UsageLedger)?, label: String) async throws -> [Double] {
            let engine = Engine(
                settings: EngineSettings(), model: model, conversations: store, clock: clock, controls: ControlsBox(controls), ledger: ledger)
            var times: [Double] = []
            for index in 0..<2000 {
                let message = InboundMessage(
                    platform: "dingtalk", botID: "bench", messageID: "\(label)-\(index)", chat: .init(id: "cid\(index % 100)", kind: .group),
                    sender: .init(id: "user\(index % 100)", staffID: "user\(index % 100)", name: "u"),
                    body: .text("a question of ordinary length about the weather and the plans for tomorrow, number \(index)"), sentAt: Date())
                let started = ContinuousClock.now
                guard case .ask = try await engine.plan(message) else { throw ValidationError("a measured question was refused") }
                times.append((ContinuousClock.now - started).seconds * 1_000_000)
            }
            return times.sorted()
        }
        _ = try await measure(none, ledger: nil, label: "warm")
        let plain = try await measure(none, ledger: nil, label: "plain")
        let checked = try await measure(all, ledger: store, label: "checked")
        await store.close()
        await prepared.cleanup()
        try? FileManager.default.removeItem(atPath: directory)
        func at(_ values: [Double], _ q: Double) -> Double { values[min(values.count - 1, Int(Double(values.count - 1) * q))] }
        print("plan per question, \(prepared.kind), no controls: p50 \(String(format: "%.0f", at(plain, 0.5))) µs, p99 \(String(format: "%.0f", at(plain, 0.99))) µs")
        print("plan per question, \(prepared.kind), every check: p50 \(String(format: "%.0f", at(checked, 0.5))) µs, p99 \(String(format: "%.0f", at(checked, 0.99))) µs")
        print("added by the controls: p50 \(String(format: "%.0f", at(checked, 0.5) - at(plain, 0.5))) µs, p99 \(String(format: "%.0f", at(checked, 0.99) - at(plain, 0.99))) µs")
        let answer = String(repeating: "这是一段普通的回答文字，包含一些 English words and numbers 12345。", count: 40)
        for count in [10, 1_000, 10_000] {
            let words = BlockedWords((0..<count).map { "blocked\($0)词" })
            _ = words.masked(answer)
            let started = ContinuousClock.now
            for _ in 0..<200 { _ = words.masked(answer) }
            let micros = (ContinuousClock.now - started).seconds / 200 * 1_000_000
            print("blocked words, \(count) words, masking a \(answer.count)-character answer: \(String(format: "%.0f", micros)) µs")
        }
    }

    private func measureContext() async throws {
        let store = try await SQLStore.open(.sqliteMemory, logger: Logger(label: "bench"))
        let settings = EngineSettings()
        var results: [(Int, Double)] = []
        for turns in [10, 10_000] {
            let key = ConversationKey(rawValue: "bench/bot/chat/\(turns)")
            for i in 0..<turns {
                try await store.apply(.appendExchange(
                    question: Turn(role: .user, content: "question number \(i) about something", createdAt: Date()),
                    answer: Turn(role: .assistant, content: "answer number \(i) with a few more words in it", createdAt: Date())), to: key)
            }
            let iterations = 2000
            let started = ContinuousClock.now
            for _ in 0..<iterations {
                let history = try await store.recentTurns(key, limit: settings.maxTurns * 2)
                _ = ContextBuilder(settings: settings).messages(history: history, question: "new question", now: Date())
            }
            results.append((turns, (ContinuousClock.now - started).seconds / Double(iterations) * 1_000_000))
        }
        await store.close()
        for (turns, micros) in results {
            print("context assembly, \(turns) turns: \(String(format: "%.1f", micros)) µs")
        }
        print("ratio: \(String(format: "%.2f", results[1].1 / results[0].1))×")
    }
}

enum BenchPlatform: String, ExpressibleByArgument, Sendable {
    case dingtalk, lark
}

/// The database a bench run's servers share, and how to remove it afterwards.
struct BenchDatabase: Sendable {
    /// `database.url` for the servers (with its password: only ever passed in their environment).
    var url: String
    /// `sqlite` or `postgres`, for the report.
    var kind: String
    var cleanup: @Sendable () async -> Void
    /// The database server's CPU time so far, when the bench started that server itself.
    var cpuSeconds: @Sendable () -> Double? = { nil }

    /// `sqlite`: a new file in `directory`; `postgres`: a throwaway cluster of the installed server binaries;
    /// a postgres:// URL: a new database on that server, dropped afterwards.
    static func prepare(_ spec: String, directory: String) async throws -> BenchDatabase {
        switch spec.lowercased() {
        case "sqlite":
            return BenchDatabase(url: "sqlite:\(directory)/bench.sqlite", kind: "sqlite", cleanup: {})
        case "postgres", "postgresql":
            guard PostgresCluster.binaryDirectory != nil else {
                throw ValidationError("--database postgres starts a throwaway cluster of Debian's postgresql server binaries, and none are installed (apt-get install postgresql); or pass a postgres:// URL")
            }
            let cluster = try PostgresCluster.start()
            return BenchDatabase(url: cluster.url(), kind: "postgres", cleanup: { cluster.destroy() }, cpuSeconds: { cluster.cpuSeconds() })
        default:
            let location: DatabaseLocation
            do { location = try DatabaseLocation.parse(spec) } catch { throw ValidationError("--database: \(error)") }
            guard case .postgres(let server) = location else {
                throw ValidationError("--database: sqlite, postgres, or a postgres://USER:PASSWORD@HOST:PORT/DB URL")
            }
            let name = "chatbridge_bench_" + UUID().uuidString.prefix(8).lowercased()
            try await PostgresAdmin.createDatabase(name, on: server)
            var bench = server
            bench.database = name
            FileHandle.standardError.write(Data("bench: database \(bench) (dropped afterwards)\n".utf8))
            return BenchDatabase(url: bench.urlWithPassword, kind: "postgres", cleanup: { try? await PostgresAdmin.dropDatabase(name, on: server) })
        }
    }
}

/// The `chatbridge serve` processes of a run, all on one database.
struct BenchServers: Sendable {
    var children: [ChildServer]
    var ports: [Int]

    /// Starts `count` servers at once (so they also race for the migrations) and waits until each listens;
    /// with `cpus`, pinned to those CPUs (taskset execs the server, so the pid is the server's).
    static func start(count: Int, environment: [String: String], directory: String, cpus: String? = nil) async throws -> BenchServers {
        var children: [ChildServer] = []
        for index in 0..<count {
            let log = count == 1 ? "server.log" : "server\(index).log"
            // Pinned: taskset runs the server (it execs, so the pid is still the server's).
            let command = (cpus.map { [BenchInstruments.taskset, "-c", $0] } ?? []) + [Bench.ownExecutable(), "serve"]
            children.append(try ChildServer(
                executable: command[0], environment: environment, logPath: "\(directory)/\(log)", arguments: Array(command.dropFirst())))
        }
        var ports: [Int] = []
        do {
            for child in children { ports.append(try await child.waitUntilListening()) }
        } catch {
            for child in children { child.signal(SIGKILL) }
            throw error
        }
        return BenchServers(children: children, ports: ports)
    }

    /// Resident set size now and at its peak of the largest server, in bytes.
    func memory() -> (current: Int, peak: Int)? {
        let all = children.compactMap { $0.memory() }
        guard !all.isEmpty else { return nil }
        return (all.map(\.current).max()!, all.map(\.peak).max()!)
    }

    /// CPU time of all servers together, in seconds.
    func cpuSeconds() -> Double? {
        let all = children.compactMap { $0.cpuSeconds() }
        return all.isEmpty ? nil : all.reduce(0, +)
    }

    func stop() async {
        for child in children { child.signal(SIGTERM) }
        for child in children { _ = await child.wait() }
    }

    /// The SQLite commits and store calls the (stopped) servers logged when they closed their database;
    /// nil with PostgreSQL.
    func databaseCommits() -> DatabaseCommits? {
        var total: DatabaseCommits?
        for child in children {
            guard let log = try? String(contentsOfFile: child.logPath, encoding: .utf8),
                  let line = log.split(separator: "\n").last(where: { $0.contains("closed the SQLite database") }),
                  let commits = Self.number("commits", in: line), let calls = Self.number("calls", in: line) else { continue }
            let largest = { (key: String, other: Int?) in max(Self.number(key, in: line) ?? 0, other ?? 0) }
            total = DatabaseCommits(
                commits: (total?.commits ?? 0) + commits, calls: (total?.calls ?? 0) + calls,
                urgentWaitP99Microseconds: largest("urgent_wait_p99_us", total?.urgentWaitP99Microseconds),
                urgentWaitMaxMicroseconds: largest("urgent_wait_max_us", total?.urgentWaitMaxMicroseconds),
                commitP99Microseconds: largest("commit_p99_us", total?.commitP99Microseconds),
                commitMaxMicroseconds: largest("commit_max_us", total?.commitMaxMicroseconds))
        }
        return total
    }

    private static func number(_ key: String, in line: Substring) -> Int? {
        guard let range = line.range(of: key + "=") else { return nil }
        return Int(line[range.upperBound...].prefix(while: \.isNumber))
    }
}

/// How many transactions the store committed for how many calls (group commit shares one among several).
struct DatabaseCommits: Encodable {
    var commits: Int
    var calls: Int
    /// How long an acknowledgement's (or renewal's) store call waited for its commit; p99 within a factor
    /// of two (a power-of-two bucket bound).
    var urgentWaitP99Microseconds: Int
    var urgentWaitMaxMicroseconds: Int
    /// How long a `COMMIT` took.
    var commitP99Microseconds: Int
    var commitMaxMicroseconds: Int
}

/// One answer the simulated platform showed: for which message, and when (seconds since 1970).
struct Answer {
    var id: String
    var at: Double
}

struct CardReport: Encodable {
    var cards: Int
    var updatesPerAnswer: Double
    var fastestCardUpdatesPerSecond: Double?
    var peakCardCallsPerSecond: Int?
    var cardVisibleP99: Double
    var firstTextAfterFirstTokenP99: Double?
    var markdownReplies: Int
    /// Lark: card operations refused because their sequence did not increase.
    var refusedSequences: Int?
}

/// What the load generator sent and when it was acknowledged.
final class Recorder: Sendable {
    private let records = Mutex<[String: (sent: Double, ack: Double?)]>([:])
    let counter = Atomic<Int>(0)
    func record(_ id: String, sent: Double, acked: Double?) { records.withLock { $0[id] = (sent, acked) } }
    var snapshot: [String: (sent: Double, ack: Double?)] { records.withLock { $0 } }
}

/// Both values, when there are both.
private func zip2<A, B>(_ a: A?, _ b: B?) -> (A, B)? {
    guard let a, let b else { return nil }
    return (a, b)
}

private func percentile(_ sorted: [Double], _ p: Double) -> Double {
    guard !sorted.isEmpty else { return 0 }
    return sorted[min(sorted.count - 1, Int((Double(sorted.count) * p).rounded(.up)) - 1)]
}

struct Report: Encodable {
    var platform: String
    var sent: Int
    var acknowledged: Int
    var ackP50: Double
    var ackP90: Double
    var ackP99: Double
    var ackMax: Double
    var answered: Int
    var answerP50: Double
    var answerP99: Double
    var throughput: Double
    var lost: Int
    var duplicated: Int
    var idleRSSMB: Double?
    var peakRSSMB: Double?
    var cpuSeconds: Double?
    var modelRequests: Int
    var transport: String
    var forcedDisconnects: Int?
    var card: CardReport?
    /// Lark: replies the platform recognised by their uuid and did not show again.
    var replaysRefusedByUUID: Int?
    /// `sqlite` or `postgres` (nil with --target).
    var database: String?
    /// How many servers shared the database (nil with --target).
    var servers: Int?
    /// Server CPU time (all servers) ÷ answered messages, in microseconds.
    var cpuPerAnswerMicros: Double?
    /// CPU time of the PostgreSQL server during the run (when the bench started it: `--database postgres`).
    var databaseCPUSeconds: Double?
    /// This process's CPU time during the run: the load generator and every simulator. When it nears the
    /// CPUs it may use, the load side was the limit, not the server.
    var loadCPUSeconds: Double?
    var databaseCommits: DatabaseCommits?
    /// From sending a message to the model request for it, for messages with nothing ahead of them in their
    /// conversation, in milliseconds: an upper bound of accept → wake-up → claim.
    var wakeUpP50: Double?
    var wakeUpP99: Double?

    /// Fills the wake-up figures. Message `i` asked "question i"; its conversation's previous message is
    /// `i - users`. A message whose predecessor was not answered before it was sent waited for it, which is
    /// ordering, not wake-up, so it is left out.
    mutating func setWakeUps(
        snapshot: [String: (sent: Double, ack: Double?)], answers: [Answer], requests: [ModelSimulator.Received], users: Int,
        id: (Int) -> String
    ) {
        var requested: [Int: Double] = [:]
        for request in requests {
            guard let question = request.messages.last(where: { $0["role"] == "user" })?["content"], question.hasPrefix("question "),
                let index = Int(question.dropFirst("question ".count))
            else { continue }
            requested[index] = min(requested[index] ?? .infinity, request.at)
        }
        var firstAnswer: [String: Double] = [:]
        for answer in answers where answer.at > 0 { firstAnswer[answer.id] = min(firstAnswer[answer.id] ?? .infinity, answer.at) }
        let users = max(users, 1)
        var latencies: [Double] = []
        for (index, at) in requested {
            guard let sent = snapshot[id(index)]?.sent else { continue }
            if index >= users {
                guard let previous = firstAnswer[id(index - users)], previous <= sent else { continue }
            }
            latencies.append(max(0, at - sent) * 1000)
        }
        latencies.sort()
        guard !latencies.isEmpty else { return }
        wakeUpP50 = percentile(latencies, 0.5)
        wakeUpP99 = percentile(latencies, 0.99)
    }

    /// The figures for what was sent (`snapshot`) and what the platform showed (`answers`, one entry per
    /// answer shown, so a message shown twice counts as a duplicate).
    init(
        snapshot: [String: (sent: Double, ack: Double?)], answers: [Answer], start: Double, sendingEnded: Double,
        everySentMustBeAnswered: Bool, idleRSS: Int?, memory: (current: Int, peak: Int)?, cpu: Double?, modelRequests: Int,
        platform: String, transport: String, forcedDisconnects: Int?, card: CardReport?
    ) {
        let ackLatencies = snapshot.values.compactMap { record in record.ack.map { ($0 - record.sent) * 1000 } }.sorted()
        var firstAnswer: [String: Double] = [:]
        for answer in answers where firstAnswer[answer.id] == nil { firstAnswer[answer.id] = answer.at }
        let answerLatencies = firstAnswer.compactMap { id, at in snapshot[id].map { (at - $0.sent) * 1000 } }.sorted()
        let ackedIDs = Set(snapshot.filter { $0.value.ack != nil }.keys)
        let answeredIDs = Set(firstAnswer.keys)
        let lastAnswer = answers.map(\.at).max() ?? sendingEnded
        self.platform = platform
        sent = snapshot.count
        acknowledged = ackedIDs.count
        ackP50 = percentile(ackLatencies, 0.5)
        ackP90 = percentile(ackLatencies, 0.9)
        ackP99 = percentile(ackLatencies, 0.99)
        ackMax = ackLatencies.last ?? 0
        answered = answeredIDs.count
        answerP50 = percentile(answerLatencies, 0.5)
        answerP99 = percentile(answerLatencies, 0.99)
        throughput = Double(answeredIDs.count) / max(lastAnswer - start, 0.001)
        lost = (everySentMustBeAnswered ? Set(snapshot.keys) : ackedIDs).subtracting(answeredIDs).count
        duplicated = answers.count - answeredIDs.count
        idleRSSMB = idleRSS.map { Double($0) / 1_048_576 }
        peakRSSMB = memory.map { Double($0.peak) / 1_048_576 }
        cpuSeconds = cpu
        self.modelRequests = modelRequests
        self.transport = transport
        self.forcedDisconnects = forcedDisconnects
        self.card = card
        if let cpu, !answeredIDs.isEmpty { cpuPerAnswerMicros = cpu / Double(answeredIDs.count) * 1_000_000 }
    }

    func printTable() {
        func f(_ v: Double) -> String { String(format: "%.1f", v) }
        let frames = transport == "stream" || transport == "websocket"
        var rows: [(String, String)] = [
            ("platform", platform),
            ("database", database.map { "\($0), \(servers ?? 1) server\((servers ?? 1) == 1 ? "" : "s")" } ?? "n/a (--target)"),
            ("transport", transport + (forcedDisconnects.map { ", \($0) forced disconnects" } ?? "")),
            ("sent", "\(sent)"), ("acknowledged", "\(acknowledged)"),
            (frames ? "frame-to-ack p50 / p90 / p99 / max" : "ack latency p50 / p90 / p99 / max", "\(f(ackP50)) / \(f(ackP90)) / \(f(ackP99)) / \(f(ackMax)) ms"),
            ("answered", "\(answered)"), ("answer latency p50 / p99", "\(f(answerP50)) / \(f(answerP99)) ms"),
            ("throughput", "\(f(throughput)) answers/s"), ("lost", "\(lost)"), ("duplicated", "\(duplicated)"),
            ("model requests", "\(modelRequests)"),
            ((servers ?? 1) > 1 ? "idle RSS (largest server)" : "server idle RSS", idleRSSMB.map { "\(f($0)) MB" } ?? "n/a"), ((servers ?? 1) > 1 ? "peak RSS (largest server)" : "server peak RSS", peakRSSMB.map { "\(f($0)) MB" } ?? "n/a"),
            ("server CPU time (after start-up)", cpuSeconds.map { "\(f($0)) s" + ((servers ?? 1) > 1 ? " (all servers)" : "") } ?? "n/a"),
            ("server CPU per answer", cpuPerAnswerMicros.map { "\(Int($0.rounded())) µs" } ?? "n/a"),
            ("SQLite commits (store calls) per answer", databaseCommits.map {
                answered > 0 ? String(format: "%.2f (%.2f)", Double($0.commits) / Double(answered), Double($0.calls) / Double(answered)) : "n/a"
            } ?? "n/a"),
            ("SQLite ack wait p99 / max; commit p99 / max", databaseCommits.map {
                "≤\($0.urgentWaitP99Microseconds) / \($0.urgentWaitMaxMicroseconds) µs; ≤\($0.commitP99Microseconds) / \($0.commitMaxMicroseconds) µs"
            } ?? "n/a"),
            ("load generator CPU time (with the simulators)", loadCPUSeconds.map { "\(f($0)) s" + (answered > 0 ? " (\(Int(($0 / Double(answered) * 1_000_000).rounded())) µs per answer)" : "") } ?? "n/a"),
            ("database server CPU time", databaseCPUSeconds.map { "\(f($0)) s" + (answered > 0 ? " (\(Int(($0 / Double(answered) * 1_000_000).rounded())) µs per answer)" : "") } ?? "n/a"),
            ("wake-up (sent → model request) p50 / p99", wakeUpP50.map { "\(f($0)) / \(f(wakeUpP99 ?? 0)) ms" } ?? "n/a"),
        ]
        if let replaysRefusedByUUID { rows.append(("replies refused by uuid", "\(replaysRefusedByUUID)")) }
        if let card {
            rows += [
                ("cards (text replies)", "\(card.cards) (\(card.markdownReplies))"),
                ("card updates per answer", f(card.updatesPerAnswer)),
            ]
            if let fastest = card.fastestCardUpdatesPerSecond { rows.append(("fastest updates of one card", "\(f(fastest)) /s")) }
            if let peak = card.peakCardCallsPerSecond { rows.append(("peak card API calls", "\(peak) /s")) }
            rows.append(("card visible after send p99", "\(f(card.cardVisibleP99)) ms"))
            if let first = card.firstTextAfterFirstTokenP99 { rows.append(("first text after first token p99", "\(f(first)) ms")) }
            if let refused = card.refusedSequences { rows.append(("sequences refused", "\(refused)")) }
        }
        let width = rows.map(\.0.count).max() ?? 0
        for (name, value) in rows { print(name.padding(toLength: width, withPad: " ", startingAt: 0) + "  " + value) }
    }
}

/// What a run measures besides the servers: the load generator's own CPU time (this process: the senders
/// and every simulator), and, with `--profile`, a perf profile of the first server.
final class BenchInstruments: @unchecked Sendable {
    static let taskset = "/usr/bin/taskset"
    static let perf = "/usr/bin/perf"

    private let startCPU: Double
    private let perfPID: pid_t?
    /// Whether `finish` waited for perf; if not (the run failed), perf is stopped at deinit.
    private var waited = false
    private let serverPID: pid_t?
    private let profile: String?
    private let directory: String

    private init(startCPU: Double, perfPID: pid_t?, serverPID: pid_t?, profile: String?, directory: String) {
        self.startCPU = startCPU
        self.perfPID = perfPID
        self.serverPID = serverPID
        self.profile = profile
        self.directory = directory
    }

    deinit {
        if let perfPID, !waited {
            kill(perfPID, SIGKILL)
            Spawn.wait(perfPID)
        }
    }

    /// This process's CPU time (user + system, every thread), in seconds.
    static func ownCPUSeconds() -> Double {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        func seconds(_ t: timeval) -> Double { Double(t.tv_sec) + Double(t.tv_usec) / 1_000_000 }
        return seconds(usage.ru_utime) + seconds(usage.ru_stime)
    }

    /// Pins every thread of this process (and so the threads it starts later) to `cpus`.
    static func pinThisProcess(to cpus: String) throws {
        let status = try Spawn.run([taskset, "-a", "-p", "-c", cpus, "\(getpid())"], output: "/dev/null")
        guard status == 0 else { throw ValidationError("taskset could not pin the load generator to CPUs \(cpus)") }
    }

    /// Pins this process to `loadCPUs` (only now, so the servers and the database started before keep their
    /// own CPUs) and, with `profile`, samples the CPUs (the server's, when pinned; else all) for `seconds`
    /// (the sending time, not the drain after it) and keeps the server's samples. perf attached to the
    /// server's threads (`-p`) spins without end in some containers; sampling whole CPUs while a `sleep`
    /// runs does not.
    static func start(
        server: ChildServer?, profile: String?, serverCPUs: String?, loadCPUs: String?, seconds: Double, directory: String
    ) throws -> BenchInstruments {
        if let loadCPUs { try pinThisProcess(to: loadCPUs) }
        var perfPID: pid_t?
        if profile != nil, server != nil {
            perfPID = try Spawn.start(
                [perf, "record", "-e", "cpu-clock", "-F", "999", "-a"] + (serverCPUs.map { ["-C", $0] } ?? [])
                    + ["-o", directory + "/perf.data", "--", "/bin/sleep", String(format: "%.1f", seconds)],
                output: directory + "/perf.out")
        }
        return BenchInstruments(
            startCPU: ownCPUSeconds(), perfPID: perfPID, serverPID: server?.process.processIdentifier, profile: profile, directory: directory)
    }

    /// Stops the profile (writing its report) and returns the load generator's CPU time since the start.
    func finish() -> Double {
        let cpu = Self.ownCPUSeconds() - startCPU
        guard let perfPID, let profile else { return cpu }
        waited = true
        guard Spawn.wait(perfPID) == 0 else {
            let said = (try? String(contentsOfFile: directory + "/perf.out", encoding: .utf8)) ?? ""
            FileHandle.standardError.write(Data("bench: perf record failed, no profile: \(said.suffix(600))\n".utf8))
            return cpu
        }
        // Paths and the pid go in as arguments, never into the script's text.
        let script = """
            demangle=cat; command -v swift-demangle >/dev/null 2>&1 && demangle="swift-demangle --simplified"
            { echo '# by library'; "$0" report -i "$1" --pid "$2" --stdio --no-children --sort dso 2>/dev/null
              echo '# by symbol'; "$0" report -i "$1" --pid "$2" --stdio --no-children --sort dso,symbol --percent-limit 0.2 2>/dev/null
            } | $demangle > "$3"
            """
        _ = try? Spawn.run(
            ["/bin/sh", "-c", script, Self.perf, directory + "/perf.data", serverPID.map { "\($0)" } ?? "-1", profile], output: "/dev/null")
        let lines = ((try? String(contentsOfFile: profile, encoding: .utf8)) ?? "").split(separator: "\n")
            .filter { !$0.hasPrefix("#") && !$0.trimmingCharacters(in: .whitespaces).isEmpty }
        FileHandle.standardError.write(Data("bench: profile of the server written to \(profile); the top entries:\n".utf8))
        for line in lines.prefix(25) { FileHandle.standardError.write(Data("  \(line.prefix(160))\n".utf8)) }
        return cpu
    }
}

/// Never asked: `--controls` measures only the decision before the model.
private struct RecordingBenchModel: ChatModel {
    func complete(_ request: ChatRequest, onDelta: @escaping @Sendable (String) async -> Void) async throws -> ChatCompletion {
        ChatCompletion(text: "", finishReason: "stop")
    }
}
