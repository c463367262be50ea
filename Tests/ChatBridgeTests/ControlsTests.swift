import AsyncHTTPClient
@testable import ChatBridgeCore
import ChatBridgeHTTP
import ChatBridgeLLM
@testable import ChatBridgeServer
import ChatBridgeSimulators
@testable import ChatBridgeStore
import Foundation
import Logging
import Synchronization
import Testing

/// A model twin that records what it was asked (profile, system prompt, messages) and answers.
final class RecordingModel: ChatModel {
    private let state = Mutex<[ChatRequest]>([])
    let answer: @Sendable (ChatRequest) -> String
    init(answer: @escaping @Sendable (ChatRequest) -> String = { "Answer to: " + ($0.messages.last?.content ?? "") }) { self.answer = answer }
    var requests: [ChatRequest] { state.withLock { $0 } }
    func complete(_ request: ChatRequest, onDelta: @escaping @Sendable (String) async -> Void) async throws -> ChatCompletion {
        state.withLock { $0.append(request) }
        let text = answer(request)
        await onDelta(text)
        return ChatCompletion(
            text: text, finishReason: "stop", promptTokens: 100, completionTokens: 20,
            servedBy: ModelUse(profile: request.profile ?? "default", model: "m-\(request.profile ?? "default")", keyFingerprint: "sk-…test", inputPrice: 2, outputPrice: 8))
    }
}

func groupMessage(_ id: String, _ text: String, chat: String = "g1", user: String = "u1") -> InboundMessage {
    InboundMessage(
        platform: "dingtalk", botID: "bot", messageID: id, chat: .init(id: chat, kind: .group),
        sender: .init(id: user, staffID: user, name: user), body: .text(text), sentAt: Date(timeIntervalSince1970: 1_800_000_000))
}

/// An engine over a real store, with controls the test sets.
struct ControlledEngine {
    let engine: Engine
    let store: SQLStore
    let model: RecordingModel
    let clock: ManualClock
    let box: ControlsBox

    static func make(_ kind: StoreKind = .sqlite, _ configure: (inout Controls) -> Void = { _ in }) async throws -> ControlledEngine {
        var controls = Controls()
        controls.profiles = ["default", "fast", "legal"]
        configure(&controls)
        let store = try await kind.open()
        let model = RecordingModel()
        let clock = ManualClock()
        let box = ControlsBox(controls)
        let engine = Engine(
            settings: EngineSettings(language: .en), model: model, conversations: store, clock: clock, controls: box, ledger: store,
            status: { StatusReport(pending: 3, running: 1, inFlightHere: 1, keys: [.init(profile: "default", fingerprint: "sk-…abcd", condition: .disabled)]) })
        return ControlledEngine(engine: engine, store: store, model: model, clock: clock, box: box)
    }

    /// Resolves and applies the effect, as a delivered answer would.
    @discardableResult
    func say(_ message: InboundMessage) async throws -> String {
        let resolution = try await engine.resolve(message)
        try await store.apply(resolution.effect, to: engine.conversationKey(for: message))
        return resolution.text
    }
}

@Suite struct BlockedWordsTests {
    @Test func matchesAnyListedWordCaseInsensitivelyAndMasksIt() {
        let words = BlockedWords(["Secret Plan", "机密", "ab", "abc", "  "])
        #expect(words.count == 4)
        #expect(words.containsMatch(in: "what is the SECRET plan?"))
        #expect(words.containsMatch(in: "这是机密文件"))
        #expect(!words.containsMatch(in: "a secret, plan"))
        #expect(words.masked("The secret PLAN is 机密 and xabcx") == "The *********** is ** and x***x")
        #expect(words.masked("nothing here") == "nothing here")
        #expect(BlockedWords([]).masked("ab") == "ab")
        // Overlapping words and a word inside a longer one.
        #expect(BlockedWords(["she", "he", "hers"]).masked("ushers") == "u*****")
    }

    @Test func aStreamedAnswerNeverShowsABlockedWordSplitAcrossDeltas() async {
        let shown = Mutex("")
        let masker = StreamMasker(words: BlockedWords(["password"])) { delta in shown.withLock { $0 += delta } }
        for piece in ["the pass", "wo", "rd is here and more text follows"] { await masker.append(piece) }
        #expect(!shown.withLock { $0 }.contains("pass"))
        #expect(shown.withLock { $0 }.hasPrefix("the ********"))
    }

    /// Its speed is measured by `chatbridge bench --controls` (flat from 10 to 10,000 words), not here.
    @Test func tenThousandWordsAreAllFoundAndMasked() {
        let words = BlockedWords((0..<10_000).map { "blocked\($0)词" })
        #expect(words.count == 10_000)
        let text = String(repeating: "普通的回答 ordinary text. ", count: 40)
        #expect(!words.containsMatch(in: text))
        #expect(words.containsMatch(in: text + "BLOCKED9999词"))
        #expect(words.masked("x blocked42词 y blocked4 z") == "x ********** y blocked4 z")
    }
}

@Suite struct AccessTests {
    func rules(_ configure: (inout AccessRules) -> Void) -> AccessRules {
        var rules = AccessRules()
        configure(&rules)
        return rules
    }

    @Test func denyWinsAllowListsRestrictAndAdminsPass() {
        let direct = textMessage("1", "hi", chat: "c1", user: "u1")
        let group = groupMessage("2", "hi", chat: "g1", user: "u1")
        #expect(AccessRules().decide(direct) == .allowed)
        #expect(AccessRules().decide(group) == .allowed)
        #expect(rules { $0.denyUsers = ["dingtalk:u1"] }.decide(direct) != .allowed)
        #expect(rules { $0.denyUsers = ["dingtalk:u1"]; $0.admins = ["dingtalk:u1"]; $0.allowUsers = ["dingtalk:u1"] }.decide(direct) != .allowed)
        #expect(rules { $0.denyChats = ["dingtalk:g1"] }.decide(group) == .ignoredGroup("chat in access.deny_chats"))
        #expect(rules { $0.allowUsers = ["dingtalk:u2"] }.decide(direct) == .refusedDirect("user not in access.allow_users"))
        #expect(rules { $0.allowUsers = ["dingtalk:u1"] }.decide(direct) == .allowed)
        #expect(rules { $0.allowUsers = ["dingtalk:u2"]; $0.admins = ["dingtalk:u1"] }.decide(direct) == .allowed)
        #expect(rules { $0.allowChats = ["dingtalk:g2"] }.decide(group) != .allowed)
        #expect(rules { $0.allowChats = ["dingtalk:g1"] }.decide(group) == .allowed)
        // allow_chats restricts groups only; direct chats follow allow_users.
        #expect(rules { $0.allowChats = ["dingtalk:g2"] }.decide(direct) == .allowed)
        #expect(rules { $0.directChats = false }.decide(direct) == .refusedDirect("access.direct_chats is false"))
        #expect(rules { $0.groupChats = false }.decide(group) == .ignoredGroup("access.group_chats is false"))
        #expect(rules { $0.groupChats = false }.decide(direct) == .allowed)
        // Another platform's user with the same id is someone else.
        #expect(rules { $0.denyUsers = ["lark:u1"] }.decide(direct) == .allowed)
    }

    @Test(arguments: StoreKind.enabled) func aRefusedUserIsToldOnceAnHourAndARefusedGroupGetsNothing(_ kind: StoreKind) async throws {
        let setup = try await ControlledEngine.make(kind) { $0.access.allowUsers = ["dingtalk:boss"] }
        #expect(try await setup.say(textMessage("1", "hi", user: "intern")) == setup.engine.texts.accessDenied)
        #expect(try await setup.say(textMessage("2", "hi again", user: "intern")) == "")
        // The message that was told, planned again (its reply was lost before it was sent), is still told.
        #expect(try await setup.say(textMessage("1", "hi", user: "intern")) == setup.engine.texts.accessDenied)
        setup.clock.advance(by: .seconds(3601))
        #expect(try await setup.say(textMessage("3", "hello?", user: "intern")) == setup.engine.texts.accessDenied)
        if case .silent = try await setup.engine.plan(groupMessage("4", "hi", user: "intern")) {} else {
            Issue.record("a group that is not allowed must be ignored")
        }
        #expect(try await setup.say(textMessage("5", "hi", user: "boss")).hasPrefix("Answer to"))
        #expect(setup.model.requests.count == 1)
        await setup.store.close()
    }
}

@Suite struct LimitTests {
    @Test(arguments: StoreKind.enabled) func perMinuteAndDailyLimitsResetAtTheConfiguredMidnight(_ kind: StoreKind) async throws {
        let setup = try await ControlledEngine.make(kind) {
            $0.limits.userPerMinute = 2
            $0.limits.userDailyMessages = 4
            $0.timeZone = TimeZone(identifier: "Asia/Kolkata")!
            $0.access.admins = ["dingtalk:admin"]
        }
        // 1_800_000_000 is 13:30 in Kolkata (not the default zone); its midnight is 10½ hours later.
        #expect(try await setup.say(textMessage("1", "q1")).hasPrefix("Answer"))
        #expect(try await setup.say(textMessage("2", "q2")).hasPrefix("Answer"))
        let fast = try await setup.say(textMessage("3", "q3"))
        #expect(fast.contains("at most 2 questions a minute") && fast.contains("13:31:00"), "\(fast)")
        // The same message asked again (a retry) is not counted twice.
        #expect(try await setup.say(textMessage("2", "q2")).hasPrefix("Answer"))
        setup.clock.advance(by: .seconds(61))
        #expect(try await setup.say(textMessage("4", "q4")).hasPrefix("Answer"))
        #expect(try await setup.say(textMessage("5", "q5")).hasPrefix("Answer"))
        setup.clock.advance(by: .seconds(61))
        let daily = try await setup.say(textMessage("6", "q6"))
        #expect(daily.contains("today's limit of 4 questions") && daily.contains("00:00 (Asia/Kolkata)"), "\(daily)")
        // Admins are exempt; other users have their own counts.
        #expect(try await setup.say(textMessage("7", "q7", user: "admin")).hasPrefix("Answer"))
        #expect(try await setup.say(textMessage("8", "q8", user: "u2")).hasPrefix("Answer"))
        // 23:57 is still the same day in Kolkata; past midnight it is a new one.
        setup.clock.advance(by: .seconds(10 * 3600 + 25 * 60))
        #expect(try await setup.say(textMessage("9", "q9")).contains("today's limit"))
        setup.clock.advance(by: .seconds(5 * 60))
        #expect(try await setup.say(textMessage("10", "q10")).hasPrefix("Answer"))
        #expect(setup.model.requests.count == 8)
        await setup.store.close()
    }

    @Test(arguments: StoreKind.enabled) func tokenQuotasOfUsersAndChatsCountRecordedUsage(_ kind: StoreKind) async throws {
        let setup = try await ControlledEngine.make(kind) {
            $0.limits.userPerMinute = nil
            $0.limits.userDailyTokens = 240
            $0.limits.chatDailyTokens = 300
        }
        // Each answer uses 120 tokens (100 prompt + 20 completion).
        #expect(try await setup.say(textMessage("1", "q1")).hasPrefix("Answer"))
        #expect(try await setup.say(textMessage("2", "q2")).hasPrefix("Answer"))
        #expect(try await setup.say(textMessage("3", "q3")).contains("today's limit of 240 tokens"))
        #expect(try await setup.say(groupMessage("4", "q4", user: "a")).hasPrefix("Answer"))
        #expect(try await setup.say(groupMessage("5", "q5", user: "b")).hasPrefix("Answer"))
        #expect(try await setup.say(groupMessage("6", "q6", user: "c")).hasPrefix("Answer"))
        #expect(try await setup.say(groupMessage("7", "q7", user: "d")).contains("This chat reached today's limit of 300 tokens"))
        #expect(setup.model.requests.count == 5)
        // A second replica (another engine on the same database) sees the same counts.
        let other = Engine(
            settings: EngineSettings(language: .en), model: setup.model, conversations: setup.store, clock: setup.clock, controls: setup.box,
            ledger: setup.store)
        #expect(try await other.resolve(textMessage("8", "q8")).text.contains("240 tokens"))
        // The next day (Shanghai's midnight is 8 hours after the start) both quotas start again.
        setup.clock.advance(by: .seconds(8 * 3600 + 60))
        #expect(try await setup.say(textMessage("9", "q9")).hasPrefix("Answer"))
        #expect(try await setup.say(groupMessage("10", "q10", user: "d")).hasPrefix("Answer"))
        await setup.store.close()
    }
}

@Suite struct SafetyTests {
    @Test func aQuestionWithABlockedWordIsRefusedWithoutTheModelAndAnswersAreMasked() async throws {
        let setup = try await ControlledEngine.make {
            $0.safety.blockedWords = BlockedWords(["forbidden", "禁词"])
            $0.safety.reply = "Not here, please."
        }
        #expect(try await setup.say(textMessage("1", "tell me the FORBIDDEN thing")) == "Not here, please.")
        #expect(try await setup.say(textMessage("2", "这是禁词吗")) == "Not here, please.")
        #expect(setup.model.requests.isEmpty)
        let masked = Engine(
            settings: EngineSettings(language: .en), model: RecordingModel { _ in "the Forbidden fruit" }, conversations: setup.store,
            clock: setup.clock, controls: setup.box)
        #expect(try await masked.resolve(textMessage("3", "what fruit?")).text == "the ********* fruit")
        await setup.store.close()
    }
}

@Suite struct PersonaTests {
    func personas(_ controls: inout Controls) {
        controls.personas = [
            Persona(name: "lawyer", prompt: "You are a careful lawyer.", description: "legal questions"),
            Persona(name: "poet", prompt: "Answer in verse."),
        ]
        controls.selectableModels = ["default", "fast"]
        controls.routes = [Route(chats: ["legal-group"], profile: "legal", persona: "lawyer")]
    }

    @Test func personasCustomPromptsRoutesAndModelSwitchesShapeTheRequest() async throws {
        let setup = try await ControlledEngine.make(.sqlite, personas)
        let list = try await setup.say(textMessage("1", "/persona"))
        #expect(list.contains("lawyer: legal questions") && list.contains("poet"))
        #expect(try await setup.say(textMessage("2", "/persona poet")).contains("\"poet\""))
        _ = try await setup.say(textMessage("3", "hello"))
        #expect(setup.model.requests.last?.messages.first?.content == "Answer in verse.")
        #expect(try await setup.say(textMessage("4", "/persona nobody")).contains("no persona \"nobody\""))
        // A custom prompt is held to the question rules: length and blocked words.
        #expect(try await setup.say(textMessage("4a", "/system " + String(repeating: "x", count: 9000))).contains("too long"))
        // /system overrides the persona; /system alone goes back to it.
        _ = try await setup.say(textMessage("5", "/system Speak like a pirate."))
        _ = try await setup.say(textMessage("6", "hello"))
        #expect(setup.model.requests.last?.messages.first?.content == "Speak like a pirate.")
        _ = try await setup.say(textMessage("7", "/system"))
        _ = try await setup.say(textMessage("8", "hello"))
        #expect(setup.model.requests.last?.messages.first?.content == "Answer in verse.")
        // /reset keeps the persona, /reset all forgets it.
        _ = try await setup.say(textMessage("9", "/reset"))
        _ = try await setup.say(textMessage("10", "hello"))
        #expect(setup.model.requests.last?.messages.first?.content == "Answer in verse.")
        #expect(setup.model.requests.last?.messages.count == 2)
        _ = try await setup.say(textMessage("11", "/reset all"))
        _ = try await setup.say(textMessage("12", "hello"))
        #expect(setup.model.requests.last?.messages.first?.content == EngineSettings().systemPrompt)
        // /model lists and switches among the selectable profiles only.
        #expect(try await setup.say(textMessage("13", "/model")).contains("- default (current)\n- fast"))
        #expect(try await setup.say(textMessage("14", "/model legal")).contains("cannot switch"))
        _ = try await setup.say(textMessage("15", "/model fast"))
        _ = try await setup.say(textMessage("16", "hello"))
        #expect(setup.model.requests.last?.profile == "fast")
        // A route picks the legal group's profile and persona.
        _ = try await setup.say(groupMessage("17", "a contract question", chat: "legal-group"))
        #expect(setup.model.requests.last?.profile == "legal")
        #expect(setup.model.requests.last?.messages.first?.content == "You are a careful lawyer.")
        await setup.store.close()
    }

    @Test func customPromptsCanBeSwitchedOffAndHelpListsOnlyEnabledCommands() async throws {
        let setup = try await ControlledEngine.make {
            $0.allowCustomPrompt = false
            $0.access.admins = ["dingtalk:admin"]
        }
        #expect(try await setup.say(textMessage("1", "/system be rude")) == setup.engine.texts.disabled)
        let help = try await setup.say(textMessage("2", "/help"))
        #expect(!help.contains("/persona") && !help.contains("/system") && !help.contains("/model") && !help.contains("/status"))
        #expect(help.contains("/usage"))
        let adminHelp = try await setup.say(textMessage("3", "/help", user: "admin"))
        #expect(adminHelp.contains("/status"))
        #expect(try await setup.say(textMessage("4", "/status")) == setup.engine.texts.adminsOnly)
        let status = try await setup.say(textMessage("5", "/status", user: "admin"))
        #expect(status.contains("3 waiting") && status.contains("sk-…abcd: disabled"))
        let zh = Engine(settings: EngineSettings(language: .zh), model: setup.model, conversations: setup.store, clock: setup.clock)
        #expect(try await zh.resolve(textMessage("6", "/help")).text.contains("自定义系统提示"))
        await setup.store.close()
    }
}

@Suite struct UsageTests {
    @Test(arguments: StoreKind.enabled) func everyAnswerIsRecordedAndReportedByUserChatModelKeyAndDay(_ kind: StoreKind) async throws {
        let setup = try await ControlledEngine.make(kind) {
            $0.limits.userPerMinute = nil
            $0.access.admins = ["dingtalk:admin"]
            $0.selectableModels = ["fast"]
        }
        _ = try await setup.say(textMessage("1", "q1", user: "alice"))
        _ = try await setup.say(textMessage("2", "q2", user: "alice"))
        _ = try await setup.say(groupMessage("3", "q3", chat: "team", user: "bob"))
        _ = try await setup.say(textMessage("4", "/model fast", user: "bob"))
        _ = try await setup.say(textMessage("5", "q5", user: "bob"))
        setup.clock.advance(by: .seconds(86_400))
        _ = try await setup.say(textMessage("6", "q6", user: "alice"))
        let byUser = try await setup.store.usage(UsageQuery(grouping: .user))
        #expect(byUser.map(\.group) == ["dingtalk:alice", "dingtalk:bob"])
        #expect(byUser.map(\.answers) == [3, 2])
        #expect(byUser[0].promptTokens == 300 && byUser[0].completionTokens == 60)
        // 2 per million prompt tokens, 8 per million completion tokens.
        #expect(abs(byUser[0].cost - (300 * 2 + 60 * 8) / 1e6) < 1e-12)
        #expect(try await setup.store.usage(UsageQuery(grouping: .model)).map(\.group) == ["m-default", "m-fast"])
        #expect(try await setup.store.usage(UsageQuery(grouping: .day)).map(\.answers) == [4, 1])
        #expect(try await setup.store.usage(UsageQuery(grouping: .key)).map(\.group) == ["sk-…test"])
        let report = try await UsageReport.make(ledger: setup.store, since: "2027-01-15", until: "2027-01-15", grouping: .chat)
        let csv = report.render(.csv)
        #expect(csv.hasPrefix("chat,answers,prompt_tokens,completion_tokens,total_tokens,cost\n"))
        #expect(csv.contains("dingtalk:team,1,100,20,120,0.0004\n"))
        #expect(csv.hasSuffix("total,4,400,80,480,0.0014\n"), "\(csv)")
        #expect(report.render(.table).contains("total"))
        let json = try JSONSerialization.jsonObject(with: Data(report.render(.json).utf8)) as? [String: Any]
        #expect((json?["total"] as? [String: Any])?["total_tokens"] as? Int == 480)
        // /usage: the user's own today and this month; an admin also sees the top users and chats.
        let mine = try await setup.say(textMessage("7", "/usage", user: "alice"))
        #expect(mine.contains("today 1 answers, 120 tokens; this month 3 answers, 360 tokens"), "\(mine)")
        let admin = try await setup.say(textMessage("8", "/usage", user: "admin"))
        #expect(admin.contains("Top usage today:") && admin.contains("dingtalk:alice: 120 tokens"))
        await setup.store.close()
    }

    @Test func theUsageCommandPrintsCSVFromTheConfiguredDatabase() async throws {
        let directory = temporaryDirectory()
        let store = try await SQLStore.open(.sqliteFile(path: directory + "/db.sqlite"), logger: Logger(label: "t"))
        for (index, user) in ["dingtalk:a", "dingtalk:a", "lark:ou_b"].enumerated() {
            try await store.recordUsage(UsageRecord(
                messageKey: "m\(index)", day: "2026-11-2\(index)", at: Date(), platform: "dingtalk", chat: "dingtalk:c", user: user, profile: "default",
                model: "gpt", keyFingerprint: "sk-…abcd", promptTokens: 1000, completionTokens: 500, estimated: false, cost: 0.01))
        }
        // The server holds the database: the report reads beside it.
        let csv = try runChatbridge(
            ["usage", "--since", "2026-11-20", "--until", "2026-11-21", "--by", "user", "--format", "csv"],
            environment: ["CHATBRIDGE_DATABASE_URL": "sqlite:\(directory)/db.sqlite"], directory: directory)
        #expect(csv.status == 0, "\(csv.stderr)")
        #expect(csv.stdout == "user,answers,prompt_tokens,completion_tokens,total_tokens,cost\ndingtalk:a,2,2000,1000,3000,0.0200\ntotal,2,2000,1000,3000,0.0200\n")
        let bad = try runChatbridge(["usage", "--since", "yesterday"], environment: ["CHATBRIDGE_DATABASE_URL": "sqlite:\(directory)/db.sqlite"], directory: directory)
        #expect(bad.status == 1 && bad.stderr.contains("--since must be a date written YYYY-MM-DD"))
        await store.close()
    }
}

@Suite(.serialized) struct KeyPoolTests {
    static let logger = Logger(label: "test")

    func profile(_ model: ModelSimulator, keys: [String], name: String = "default", fallback: String? = nil) -> ModelProfile {
        ModelProfile(name: name, settings: LLMSettings(baseURL: model.baseURL, model: "sim-\(name)", timeout: .seconds(10)), apiKeys: keys, fallback: fallback)
    }

    func ask(_ router: ModelRouter, _ text: String = "hi", profile: String? = nil) async throws -> ChatCompletion {
        try await router.complete(ChatRequest(messages: [ChatMessage(role: .user, content: text)], profile: profile), onDelta: { _ in })
    }

    @Test(arguments: StoreKind.enabled) func requestsSpreadOverKeysAndARateLimitedKeyRestsForItsRetryAfter(_ kind: StoreKind) async throws {
        let model = try await ModelSimulator.start()
        let store = try await kind.open()
        let client = OutboundHTTP.makeClient()
        let clock = ManualClock()
        let router = ModelRouter(profiles: [profile(model, keys: ["sk-key-one-1111", "sk-key-two-2222"])], store: store, client: client, clock: clock, logger: Self.logger)
        for _ in 0..<4 { _ = try await ask(router) }
        #expect(model.requests(withKey: "sk-key-one-1111") == 2 && model.requests(withKey: "sk-key-two-2222") == 2)
        model.respond(toKey: "sk-key-one-1111", with: .error(429, code: "rate_limit_exceeded", retryAfter: "20"))
        // Whichever key is picked, the answer comes: a 429 moves the request to the other key.
        for _ in 0..<3 { #expect(try await ask(router).servedBy?.keyFingerprint == "sk-…2222") }
        #expect(model.requests(withKey: "sk-key-one-1111") <= 3)
        let resting = model.requests(withKey: "sk-key-one-1111")
        for _ in 0..<3 { _ = try await ask(router) }
        #expect(model.requests(withKey: "sk-key-one-1111") == resting, "a resting key is not asked")
        #expect(try await store.keyHealth().first { $0.fingerprint == "sk-…1111" }?.condition == .resting)
        model.respond(toKey: "sk-key-one-1111", with: nil)
        clock.advance(by: .seconds(21))
        for _ in 0..<4 { _ = try await ask(router) }
        #expect(model.requests(withKey: "sk-key-one-1111") > resting, "after its rest the key is used again")
        try await client.shutdown()
        await store.close()
        await model.stop()
    }

    @Test(arguments: StoreKind.enabled) func aKeyRefusedOnOneReplicaIsSkippedByAnotherAndReCheckedLater(_ kind: StoreKind) async throws {
        let model = try await ModelSimulator.start()
        let store = try await kind.open()
        let client = OutboundHTTP.makeClient()
        let clock = ManualClock()
        let lines = LogCapture()
        let logger = Logger(label: "test") { _ in lines }
        let profiles = [profile(model, keys: ["sk-dead-key-0000", "sk-good-key-9999"])]
        let first = ModelRouter(profiles: profiles, store: store, client: client, clock: clock, recheckInterval: .seconds(3600), logger: logger)
        let second = ModelRouter(profiles: profiles, store: store, client: client, clock: clock, healthTTL: .zero, logger: logger)
        _ = try await ask(second)  // reads health before anything happened
        model.respond(toKey: "sk-dead-key-0000", with: .error(401, code: "invalid_api_key", message: "Incorrect API key provided"))
        for _ in 0..<3 { #expect(try await ask(first).servedBy?.keyFingerprint == "sk-…9999") }
        #expect(model.requests(withKey: "sk-dead-key-0000") == 1, "a refused key is asked once")
        let before = model.requests(withKey: "sk-dead-key-0000")
        for _ in 0..<4 { _ = try await ask(second) }
        #expect(model.requests(withKey: "sk-dead-key-0000") == before, "the other replica never uses the disabled key")
        #expect(lines.all.filter { $0.contains("refused by the provider") }.count == 1, "logged once")
        #expect(!lines.all.joined().contains("sk-dead-key-0000"))
        #expect(first.keyReport().contains { $0.fingerprint == "sk-…0000" && $0.condition == .disabled })
        // The re-check: not before the interval; then a key that works again is used again.
        model.respond(toKey: "sk-dead-key-0000", with: nil)
        await first.recheckDisabledKeys()
        #expect(model.requests(withKey: "sk-dead-key-0000") == before)
        clock.advance(by: .seconds(3601))
        await first.recheckDisabledKeys()
        #expect(model.requests(withKey: "sk-dead-key-0000") == before + 1)
        #expect(try await store.keyHealth().first { $0.fingerprint == "sk-…0000" }?.condition == .ok)
        for _ in 0..<4 { _ = try await ask(second) }
        #expect(model.requests(withKey: "sk-dead-key-0000") > before + 1)
        try await client.shutdown()
        await store.close()
        await model.stop()
    }

    @Test func concurrentRequestsGoToTheKeyWithTheFewestInFlight() async throws {
        let model = try await ModelSimulator.start()
        let client = OutboundHTTP.makeClient()
        let keys = ["sk-pool-key-0001", "sk-pool-key-0002", "sk-pool-key-0003"]
        let router = ModelRouter(profiles: [profile(model, keys: keys)], store: nil, client: client, clock: ManualClock(), logger: Self.logger)
        model.hold()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for index in 0..<6 {
                group.addTask { _ = try await self.ask(router, "q\(index)") }
                // Each request is in flight before the next is picked.
                #expect(await eventually { model.requestCount == index + 1 })
            }
            #expect(keys.map { model.requests(withKey: $0) } == [2, 2, 2], "held requests are spread evenly")
            // One key's requests finish: the next request goes to it.
            model.release()
            try await group.waitForAll()
        }
        try await client.shutdown()
        await model.stop()
    }

    @Test func theFallbackProfileAnswersWhenNoKeyIsLeftAndWithoutOneTheErrorIsActionable() async throws {
        let model = try await ModelSimulator.start()
        let backup = try await ModelSimulator.start()
        let store = try await StoreKind.sqlite.open()
        let client = OutboundHTTP.makeClient()
        let router = ModelRouter(
            profiles: [profile(model, keys: ["sk-only-key-1234"], fallback: "backup"), profile(backup, keys: ["sk-backup-5678"], name: "backup")],
            store: store, client: client, clock: ManualClock(), logger: Self.logger)
        model.respond(toKey: "sk-only-key-1234", with: .error(429, code: "insufficient_quota", message: "You exceeded your current quota"))
        let answer = try await ask(router)
        #expect(answer.servedBy?.profile == "backup" && answer.servedBy?.model == "sim-backup")
        #expect(backup.requestCount == 1)
        backup.respond(toKey: "sk-backup-5678", with: .error(401, code: "invalid_api_key"))
        await #expect {
            try await ask(router)
        } throws: { error in
            (error as? ModelError)?.kind == .invalidAPIKey && EngineSettings().messages.reply(for: error) == BotMessages.defaults(for: .zh).invalidKey
        }
        try await client.shutdown()
        await store.close()
        await model.stop()
        await backup.stop()
    }

    @Test func aDonatedKeyIsVerifiedAddedAndNeverShown() async throws {
        let model = try await ModelSimulator.start()
        let store = try await StoreKind.sqlite.open()
        let client = OutboundHTTP.makeClient()
        let lines = LogCapture()
        let logger = Logger(label: "test") { _ in lines }
        let router = ModelRouter(profiles: [profile(model, keys: ["sk-admin-key-1111"])], store: store, client: client, clock: ManualClock(), logger: logger)
        var controls = Controls()
        controls.acceptDonatedKeys = true
        let engine = Engine(
            settings: EngineSettings(language: .en), model: router, conversations: store, clock: ManualClock(), controls: ControlsBox(controls),
            ledger: store, donations: router, logger: logger)
        let donated = "sk-donated-secret-value-7777"
        let bad = "sk-revoked-secret-value-3333"
        model.respond(toKey: bad, with: .error(401, code: "invalid_api_key"))
        var replies: [String] = []
        for (index, text) in ["/donate \(donated)", "/donate \(bad)", "/donate \(donated)"].enumerated() {
            let message = textMessage("d\(index)", text)
            let resolution = try await engine.resolve(message)
            try await store.apply(resolution.effect, to: engine.conversationKey(for: message))
            replies.append(resolution.text)
        }
        let group = try await engine.resolve(groupMessage("g", "/donate \(donated)"))
        #expect(replies[0] == "Thank you! Key sk-…7777 works and was added to the pool.")
        #expect(replies[1].contains("sk-…3333 did not work"))
        #expect(replies[2].contains("already in the pool"))
        #expect(group.text.contains("Never post an API key in a group"))
        #expect(try await store.donatedKeys().map(\.donor) == ["dingtalk:u1"])
        // The donated key now answers questions; it is in no reply, log line, model message or history.
        for index in 0..<4 { _ = try await engine.resolve(textMessage("q\(index)", "question \(index)")) }
        #expect(model.requests(withKey: donated) >= 2)
        let everything = replies.joined() + group.text + lines.all.joined()
            + model.received.flatMap { $0.messages.map { $0["content"] ?? "" } }.joined()
            + (try await store.recentTurns(engine.conversationKey(for: textMessage("x", "")), limit: 100)).map(\.content).joined()
        #expect(!everything.contains(donated) && !everything.contains(bad) && !everything.contains("secret-value"))
        // Switched off: refused.
        let off = Engine(settings: EngineSettings(language: .en), model: router, conversations: store, clock: ManualClock(), donations: router)
        #expect(try await off.resolve(textMessage("o", "/donate sk-another-key-0000")).text == off.texts.donateOff)
        try await client.shutdown()
        await store.close()
        await model.stop()
    }
}

@Suite struct ControlsConfigurationTests {
    static let yaml = """
        llm:
          base_url: http://127.0.0.1:1/v1
          api_keys: [sk-first-key-aaaa, sk-second-key-bbbb]
          fallback: cheap
          price: {input: 0.15, output: 0.6}
        models:
          cheap:
            model: tiny
          legal:
            base_url: https://legal.example.com/v1
            api_key: sk-legal-key-cccc
            model: big
            temperature: 0.2
        personas:
          lawyer: {prompt: You are a careful lawyer., description: legal}
        routes:
          - {platform: dingtalk, chats: [cidLegal], profile: legal, persona: lawyer}
        conversation:
          selectable_models: [default, cheap]
        access:
          admins: [dingtalk:0420001]
          deny_users: ["lark:ou_bad"]
          group_chats: false
        limits:
          user_per_minute: 5
          user_daily_tokens: 50000
        safety:
          blocked_words: [foo, bar]
        bot:
          timezone: Europe/Berlin
        """

    @Test func profilesPersonasRoutesAccessLimitsAndSafetyAreRead() async throws {
        let directory = temporaryDirectory()
        try Self.yaml.write(toFile: directory + "/c.yaml", atomically: true, encoding: .utf8)
        let config = try await ChatBridgeConfiguration.load(file: directory + "/c.yaml", environment: [:])
        #expect(config.errors.isEmpty, "\(config.errors)")
        #expect(config.profiles.map(\.name) == ["default", "cheap", "legal"])
        #expect(config.profiles[0].apiKeys == ["sk-first-key-aaaa", "sk-second-key-bbbb"] && config.profiles[0].fallback == "cheap")
        #expect(config.profiles[0].inputPrice == 0.15 && config.profiles[0].outputPrice == 0.6)
        #expect(config.profiles[1].apiKeys == config.profiles[0].apiKeys, "same server: the keys are inherited")
        #expect(config.profiles[2].apiKeys == ["sk-legal-key-cccc"] && config.profiles[2].settings.temperature == 0.2)
        #expect(config.controls.persona(named: "lawyer")?.prompt == "You are a careful lawyer.")
        #expect(config.controls.routes == [Route(platform: "dingtalk", chats: ["cidLegal"], profile: "legal", persona: "lawyer")])
        #expect(config.controls.access.admins == ["dingtalk:0420001"] && !config.controls.access.groupChats)
        #expect(config.controls.limits.userPerMinute == 5 && config.controls.limits.userDailyTokens == 50000 && config.controls.limits.userDailyMessages == nil)
        #expect(config.controls.safety.blockedWords.count == 2 && config.controls.timeZone.identifier == "Europe/Berlin")
        // A words file adds one word per line (comments and blank lines skipped) to the list.
        try "# words\nkiwi\n\n  Plum  \n".write(toFile: directory + "/words.txt", atomically: true, encoding: .utf8)
        let withFile = try await ChatBridgeConfiguration.load(
            file: directory + "/c.yaml", environment: ["CHATBRIDGE_SAFETY_BLOCKED_WORDS_FILE": directory + "/words.txt"])
        #expect(withFile.controls.safety.blockedWords.words == ["bar", "foo", "kiwi", "plum"])
        #expect(config.controls.selectableModels == ["default", "cheap"])
        // Only llm.* still makes the default profile alone, with the old single key.
        let plain = ChatBridgeConfiguration.from(values: ["llm.api_key": "sk-plain-key-dddd"])
        #expect(plain.profiles.map(\.name) == ["default"] && plain.profiles[0].apiKeys == ["sk-plain-key-dddd"])
        #expect(plain.controls.limits.userPerMinute == 10 && plain.controls.access == AccessRules())
    }

    @Test func mistakesAreNamedByTheirKey() async throws {
        let directory = temporaryDirectory()
        let bad = """
            models:
              x: {model: m, fallback: nowhere}
            routes:
              - {chats: [a], profile: missing, persona: ghost, color: red}
            access:
              admins: [0420001]
            bot:
              timezone: Mars/Olympus
            conversation:
              selectable_models: [nope]
            safety:
              blocked_words_file: /nonexistent/words.txt
            """
        try bad.write(toFile: directory + "/bad.yaml", atomically: true, encoding: .utf8)
        let config = try await ChatBridgeConfiguration.load(file: directory + "/bad.yaml", environment: [:])
        let keys = Set(config.errors.map(\.key))
        #expect(keys.isSuperset(of: [
            "models.x.fallback", "routes[0].profile", "routes[0].persona", "routes[0].color", "access.admins", "bot.timezone",
            "conversation.selectable_models", "safety.blocked_words_file",
        ]), "\(config.errors)")
    }

    @Test func aReloadAppliesAGoodFileAndKeepsTheRunningConfigurationForABadOne() async throws {
        let directory = temporaryDirectory()
        let path = directory + "/c.yaml"
        try "llm: {base_url: 'http://127.0.0.1:1/v1'}\nserver: {port: 8080}\n".write(toFile: path, atomically: true, encoding: .utf8)
        let initial = try await ChatBridgeConfiguration.load(file: path, environment: [:])
        let box = ControlsBox(initial.controls)
        let client = OutboundHTTP.makeClient()
        let router = ModelRouter(profiles: initial.profiles, store: nil, client: client, logger: Logger(label: "t"))
        let lines = LogCapture()
        let reloader = ConfigReloader(configuration: initial, environment: [:], controls: box, models: router, logger: Logger(label: "t") { _ in lines })
        try (Self.yaml + "\nserver: {port: 9090}\n").write(toFile: path, atomically: true, encoding: .utf8)
        let outcome = await reloader.reload(because: "test")
        #expect(outcome == .applied(needsRestart: ["server.port"]), "\(outcome)")
        #expect(box.current.safety.blockedWords.count == 2 && box.current.persona(named: "lawyer") != nil)
        #expect(router.profileNames == ["cheap", "default", "legal"])
        #expect(lines.all.contains { $0.contains("takes effect only after a restart") && $0.contains("server.port") })
        try "routes: [{profile: nowhere}]\nlimits: {user_per_minute: lots}\n".write(toFile: path, atomically: true, encoding: .utf8)
        guard case .rejected(let problems) = await reloader.reload(because: "test") else {
            Issue.record("a bad file must be rejected")
            return
        }
        #expect(problems.contains { $0.contains("routes[0].profile") } && problems.contains { $0.contains("limits.user_per_minute") })
        #expect(box.current.safety.blockedWords.count == 2, "the running configuration stays")
        #expect(router.profileNames == ["cheap", "default", "legal"])
        try await client.shutdown()
    }
}

/// The dispatcher decides before anything shows: commands and refusals never open a live reply, and a
/// group the bot may not serve gets nothing at all.
@Suite struct ControlsDispatchTests {
    @Test func commandsAndRefusalsAreWholeMessagesAndIgnoredGroupsGetNothing() async throws {
        let live = LiveTwin()
        var controls = Controls()
        controls.access.groupChats = false
        controls.safety.blockedWords = BlockedWords(["forbidden"])
        let f = DispatcherFixture(live: live, controls: controls)
        let help = try await f.accept("m1", "/help")
        let blocked = try await f.accept("m2", "the forbidden question", chat: "c2")
        let group = groupMessage("m3", "hello group")
        _ = try await f.inbox.accept(group, conversation: ConversationKey(for: group, groupScope: .user), now: f.clock.now)
        let groupID = await f.inbox.rows.last!.id
        f.dispatcher.wake()
        f.start()
        #expect(await eventually {
            let states = [await f.state(help), await f.state(blocked), await f.state(groupID)]
            return states.allSatisfy { $0 == "answered" }
        })
        #expect(live.calls.isEmpty, "no live reply for a command or a refusal")
        #expect(f.replies.delivered.count == 2)
        #expect(f.replies.delivered.contains { $0.contains("Sorry, your question contains words") })
        #expect(f.model.calls == 0)
        // A question still gets its live reply.
        let question = try await f.accept("m4", "a fine question", chat: "c3")
        #expect(await eventually { await f.state(question) == "answered" })
        #expect(live.calls.first == .open(resuming: false))
        await f.stop()
    }
}

/// The controls in the running server: real callbacks, the SQLite store, the simulated model.
@Suite(.serialized) struct ControlsIntegrationTests {
    @Test func theServerRefusesIgnoresAndLimitsWithoutAskingTheModelAndCountsTokens() async throws {
        let h = try await Harness.start([
            "access.group_chats": "false", "safety.blocked_words": "forbidden,机密", "limits.user_daily_messages": "1",
            "llm.price.input": "1", "llm.price.output": "2", "access.admins": "dingtalk:0420009",
        ])
        defer { Task { await h.stop() } }
        #expect(try await h.send("g1", "hello group", conversation: "cidGroup==", group: true).status == 200)
        #expect(try await h.send("d1", "what is 机密?").status == 200)
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
        #expect(h.dingtalk.deliveries[0].text.contains("contains words this bot may not discuss"))
        #expect(try await h.send("d2", "first question").status == 200)
        #expect(await eventually { h.dingtalk.deliveries.count == 2 })
        #expect(try await h.send("d3", "second question").status == 200)
        #expect(await eventually { h.dingtalk.deliveries.count == 3 })
        #expect(h.dingtalk.deliveries[2].text.contains("today's limit of 1 questions"))
        #expect(try await eventually { try await h.store.inboxRows().allSatisfy { $0.state == "answered" } })
        #expect(h.model.requestCount == 1)
        #expect(h.dingtalk.deliveries.count == 3, "the group got nothing")
        #expect(try await h.metric(#"chatbridge_tokens_total{profile="default",model="sim",kind="completion"}"#) == 3)
        #expect(try await h.metric(#"chatbridge_tokens_total{profile="default",model="sim",kind="prompt"}"#) == 20)
        // 20 prompt tokens at 1 and 3 completion tokens at 2 per million.
        #expect(abs((try await h.metric(#"chatbridge_cost_total{profile="default",model="sim"}"#) ?? 0) - 26e-6) < 1e-12)
        #expect(try await h.metric(#"chatbridge_model_key_state{profile="default",key="sk-…3456",state="ok"}"#) == 1)
        #expect(try await h.store.usage(UsageQuery(grouping: .user)).map(\.group) == ["dingtalk:0420001"])
        // /status for an admin, from the running server's parts; others are refused.
        #expect(try await h.send("s1", "/status", staff: "0420009").status == 200)
        #expect(await eventually { h.dingtalk.deliveries.count == 4 })
        let status = h.dingtalk.deliveries[3].text
        #expect(status.contains("queue: 0 waiting") && status.contains("model latency (1 h, 1 answers)"), "\(status)")
        #expect(status.contains("key default sk-…3456: ok"), "\(status)")
        #expect(!status.contains("sk-test-secret-key-123456"))
    }

    @Test func aDonatedKeyLeavesNoTraceInTheInboxTheLogOrTheModelRequests() async throws {
        let h = try await Harness.start(["llm.accept_donated_keys": "true", "limits.user_per_minute": "5"])
        defer { Task { await h.stop() } }
        let secret = "sk-donor-secret-abcdefgh-9876"
        #expect(try await h.send("k1", "/donate \(secret)").status == 200)
        #expect(await eventually { h.dingtalk.deliveries.count == 1 })
        #expect(h.dingtalk.deliveries[0].text == "Thank you! Key sk-…9876 works and was added to the pool.")
        #expect(try await h.send("k2", "/donate \(secret)", conversation: "cidGroup==", group: true).status == 200)
        #expect(await eventually { h.dingtalk.deliveries.count == 2 })
        #expect(h.dingtalk.deliveries[1].text.contains("Never post an API key in a group"))
        #expect(try await eventually { try await h.store.inboxRows().allSatisfy { $0.state == "answered" } })
        // The stored messages no longer hold the key; the conversation never did.
        let stored = try await h.store.storedMessages()
        #expect(stored.allSatisfy { $0.body == .text("(removed: it carried an API key)") })
        let rows = try await h.store.inboxRows()
        #expect(!rows.contains { ($0.answer ?? "").contains(secret) || ($0.lastError ?? "").contains(secret) })
        // The probe was the only request with the key, and no request carried it in a message.
        #expect(h.model.requests(withKey: secret) == 1)
        #expect(!h.model.received.contains { $0.messages.contains { ($0["content"] ?? "").contains(secret) } })
        #expect(try await h.store.donatedKeys().map(\.fingerprint) == ["sk-…9876"])
        let metrics = try await h.get("/metrics").body
        #expect(!metrics.contains(secret) && metrics.contains("sk-…9876"))
    }
}

/// Live reload of a running `chatbridge serve`: SIGHUP and a changed file apply new controls without a
/// restart (no connection or message dropped); a file with errors is rejected and the old one kept.
@Suite(.serialized) struct ReloadTests {
    @Test func sighupAndAChangedFileReloadTheControlsAndABadFileIsRejected() async throws {
        let model = try await ModelSimulator.start()
        let dingtalk = try await DingTalkSimulator.start()
        let directory = temporaryDirectory()
        let path = directory + "/chatbridge.yaml"
        try "safety:\n  reply: Not allowed.\n".write(toFile: path, atomically: true, encoding: .utf8)
        let server = try ChildServer(
            executable: chatbridgeExecutable(), environment: serverEnvironment(directory: directory, model: model, dingtalk: dingtalk),
            logPath: directory + "/serve.log", arguments: ["serve", "--config", path])
        let port = try await server.waitUntilListening()
        let sender = CallbackSender(url: "http://127.0.0.1:\(port)/callbacks/dingtalk", secret: testSecret)
        let client = HTTPClientFactory.make()
        func ask(_ id: String, _ text: String) async throws -> String? {
            let before = dingtalk.deliveries.count
            let body = sender.body(messageID: id, text: text, conversationID: "cid==", senderStaffID: "u1", webhook: dingtalk.webhookURL(session: id))
            #expect(try await sender.post(body, client: client).status == 200)
            guard await eventually({ dingtalk.deliveries.count > before }) else { return nil }
            return dingtalk.deliveries.last?.text
        }
        func log() -> String { (try? String(contentsOfFile: directory + "/serve.log", encoding: .utf8)) ?? "" }
        #expect(try await ask("1", "apple pie?")?.hasPrefix("Answer to") == true)
        // SIGHUP: the new words apply to the next message.
        try "safety:\n  reply: Not allowed.\n  blocked_words: [apple]\nconfig:\n  watch: false\n".write(toFile: path, atomically: true, encoding: .utf8)
        server.signal(SIGHUP)
        #expect(await eventually { log().contains("configuration reloaded") })
        #expect(try await ask("2", "apple pie?") == "Not allowed.")
        // A bad file is rejected with its problem named; the running controls stay.
        try "safety:\n  blocked_words: [pear]\nlimits:\n  user_daily_messages: many\n".write(toFile: path, atomically: true, encoding: .utf8)
        server.signal(SIGHUP)
        #expect(await eventually { log().contains("configuration reload rejected: error: limits.user_daily_messages") })
        #expect(try await ask("3", "pear and apple?") == "Not allowed.")
        #expect(try await ask("4", "pear?")?.hasPrefix("Answer to") == true)
        // A restart-only setting is named.
        try "server:\n  max_body_bytes: 4096\nsafety:\n  reply: Not allowed.\n  blocked_words: [pear]\n".write(toFile: path, atomically: true, encoding: .utf8)
        server.signal(SIGHUP)
        #expect(await eventually { log().contains("takes effect only after a restart") && log().contains("server.max_body_bytes") })
        #expect(try await ask("5", "pear?") == "Not allowed.")
        // Nothing was dropped: every message was answered once; the process still runs.
        #expect(dingtalk.deliveries.count == 5)
        #expect(server.process.isRunning)
        server.signal(SIGTERM)
        #expect(await server.wait() == 0)
        try await client.shutdown()
        await model.stop()
    }

    @Test func aReloadKeepsTheStreamConnectionAndItsMessages() async throws {
        let setup = try await StreamSetup.start()
        let (dingtalk, directory) = (setup.dingtalk, setup.directory)
        let gateway = dingtalk.gateway
        let path = directory + "/chatbridge.yaml"
        try "config:\n  watch: false\n".write(toFile: path, atomically: true, encoding: .utf8)
        let server = try ChildServer(
            executable: chatbridgeExecutable(), environment: setup.environment, logPath: directory + "/serve.log",
            arguments: ["serve", "--config", path])
        _ = try await server.waitUntilListening()
        #expect(await eventually { gateway.openConnections.count == 1 })
        let connection = gateway.openConnections[0]
        let sender = CallbackSender(url: "", secret: testSecret)
        func push(_ id: String, _ text: String) async throws {
            let body = sender.body(messageID: id, text: text, conversationID: "cidStream==", senderStaffID: "s1", webhook: dingtalk.webhookURL(session: id))
            let frame = try await gateway.pushMessage(body, to: connection)
            #expect(await gateway.waitForAck(frame).code == 200)
        }
        try await push("s1", "melon?")
        #expect(await eventually { dingtalk.deliveries.count == 1 })
        try "config:\n  watch: false\nsafety:\n  blocked_words: [melon]\n  reply: No melons.\n".write(toFile: path, atomically: true, encoding: .utf8)
        // A message pushed while the reload runs is acknowledged and answered like any other.
        server.signal(SIGHUP)
        try await push("s2", "melon again?")
        #expect(await eventually { (try? String(contentsOfFile: directory + "/serve.log", encoding: .utf8))?.contains("configuration reloaded") == true })
        try await push("s3", "melon now?")
        #expect(await eventually { dingtalk.deliveries.count == 3 })
        #expect(dingtalk.deliveries[2].text == "No melons.")
        // The same connection throughout: the reload opened no new one.
        #expect(gateway.connectionsAccepted == 1 && gateway.openConnections == [connection])
        server.signal(SIGTERM)
        #expect(await server.wait() == 0)
        await setup.model.stop()
    }

    @Test func aChangedFileIsReloadedWhenWatched() async throws {
        let directory = temporaryDirectory()
        let path = directory + "/c.yaml"
        try "llm: {base_url: 'http://127.0.0.1:1/v1'}\n".write(toFile: path, atomically: true, encoding: .utf8)
        let initial = try await ChatBridgeConfiguration.load(file: path, environment: [:])
        #expect(initial.watchConfig)
        let box = ControlsBox(initial.controls)
        let client = OutboundHTTP.makeClient()
        let router = ModelRouter(profiles: initial.profiles, store: nil, client: client, logger: Logger(label: "t"))
        let reloader = ConfigReloader(configuration: initial, environment: [:], controls: box, models: router, pollInterval: .milliseconds(50), logger: Logger(label: "t"))
        let task = Task { try await reloader.run() }
        try "llm: {base_url: 'http://127.0.0.1:1/v1'}\nsafety: {blocked_words: [kiwi, plum]}\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(await eventually { box.current.safety.blockedWords.count == 2 })
        // Counted just after the swap: read it once it is.
        #expect(await eventually { reloader.appliedCount == 1 })
        task.cancel()
        _ = try? await task.value
        try await client.shutdown()
    }
}

/// `runChatbridge` on a thread of its own: waiting for the child must not hold one of the few threads the
/// simulators it talks to need.
func runChatbridgeOffThePool(_ arguments: [String], environment: [String: String], directory: String) async throws -> (status: Int32, stdout: String, stderr: String) {
    try await withCheckedThrowingContinuation { continuation in
        Thread {
            continuation.resume(with: Result { try runChatbridge(arguments, environment: environment, directory: directory) })
        }.start()
    }
}

@Suite struct CheckPoolTests {
    @Test func checkProbeTriesEveryKeyOfEveryProfileByItsFingerprint() async throws {
        let model = try await ModelSimulator.start()
        model.respond(toKey: "sk-revoked-key-2222", with: .error(401, code: "invalid_api_key"))
        let directory = temporaryDirectory()
        let result = try await runChatbridgeOffThePool(["check", "--probe"], environment: [
            "CHATBRIDGE_LLM_BASE_URL": model.baseURL, "CHATBRIDGE_LLM_API_KEYS": "sk-working-key-1111,sk-revoked-key-2222",
        ], directory: directory)
        #expect(result.status == 1)
        #expect(result.stdout.contains("probe model default key sk-…1111: ok"), "\(result.stdout)")
        #expect(result.stdout.contains("probe model default key sk-…2222: failed: model error invalid_api_key (HTTP 401)"), "\(result.stdout)")
        #expect(result.stdout.contains("llm.api_keys = 2 key(s)") || result.stdout.contains("2 key(s)"))
        #expect(!result.stdout.contains("working-key") && !result.stdout.contains("revoked-key"))
        await model.stop()
    }
}
