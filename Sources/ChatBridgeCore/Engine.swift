import Foundation
import Logging
import Metrics
import Synchronization

/// Everything the engine needs to know about conversations and commands.
public struct EngineSettings: Sendable, Equatable {
    public var systemPrompt: String
    public var maxTurns: Int
    public var maxContextTokens: Int
    /// Longer questions get a reply naming the limit and never reach the model.
    public var maxQuestionChars: Int
    public var idleReset: Duration
    public var groupScope: GroupScope
    public var resetCommands: [String]
    public var helpCommands: [String]
    public var language: BotMessages.Language
    public var messages: BotMessages

    public init(
        systemPrompt: String = "You are a helpful assistant. Answer concisely and accurately.",
        maxTurns: Int = 10,
        maxContextTokens: Int = 6000,
        maxQuestionChars: Int = 8000,
        idleReset: Duration = .seconds(3600),
        groupScope: GroupScope = .user,
        resetCommands: [String] = ["/reset", "/clear", "/new", "重置", "清空会话", "新对话"],
        helpCommands: [String] = ["/help", "帮助"],
        language: BotMessages.Language = .zh,
        messages: BotMessages? = nil
    ) {
        self.systemPrompt = systemPrompt
        self.maxTurns = maxTurns
        self.maxContextTokens = maxContextTokens
        self.maxQuestionChars = maxQuestionChars
        self.idleReset = idleReset
        self.groupScope = groupScope
        self.resetCommands = resetCommands
        self.helpCommands = helpCommands
        self.language = language
        self.messages = messages ?? .defaults(for: language)
    }
}

/// What a message asks of the bot.
public enum Intent: Sendable, Equatable {
    case reset
    /// `/reset all`: the persona, model and custom prompt too.
    case resetAll
    case help
    case empty
    case unsupported(kind: String)
    case question(String)
    /// `/persona` (list) or `/persona NAME`.
    case persona(String?)
    /// `/system TEXT`, or `/system` alone to go back to the default.
    case system(String?)
    /// `/model` (list) or `/model NAME`.
    case model(String?)
    case usage
    case status
    /// `/donate KEY`; nil when the key is missing.
    case donate(String?)
}

/// What the engine will do with a message, decided before anything is shown: answer it at once (a
/// command, a refusal, a limit), stay silent (a group the bot may not serve), or ask the model.
public enum Plan: Sendable {
    case reply(Resolution)
    case silent(reason: String)
    case ask(PreparedQuestion)

    public var asksModel: Bool { if case .ask = self { true } else { false } }
}

/// A question that passed every check, with the profile and system prompt it is answered with.
public struct PreparedQuestion: Sendable {
    public var message: InboundMessage
    public var conversation: ConversationKey
    public var text: String
    public var profile: String
    public var systemPrompt: String
    public var startedAt: Date
    public var controls: Controls
    /// The conversation's recent turns, read with its preferences while planning (nil: read when answering).
    public var history: [Turn]?
}

/// Decides what a message means and produces its answer. Pure logic over the `ChatModel`,
/// `ConversationStore`, `UsageLedger` and `WallClock` protocols; it has no I/O of its own.
public struct Engine: Sendable {
    public let settings: EngineSettings
    public let model: any ChatModel
    public let conversations: any ConversationStore
    public let clock: any WallClock
    /// The operator's levers; swapped whole by a reload.
    public let controls: ControlsBox
    /// Counters for limits and usage; nil counts nothing (and enforces no limits).
    public let ledger: (any UsageLedger)?
    public let donations: (any KeyDonations)?
    public let status: (@Sendable () async -> StatusReport)?
    public let texts: ControlTexts
    private let logger: Logger
    private let refusalsLogged: LogOnce
    private let usageMetrics: UsageMetrics

    public init(
        settings: EngineSettings, model: any ChatModel, conversations: any ConversationStore, clock: any WallClock,
        controls: ControlsBox = ControlsBox(Controls()), ledger: (any UsageLedger)? = nil, donations: (any KeyDonations)? = nil,
        status: (@Sendable () async -> StatusReport)? = nil, metrics: any MetricsFactory = MetricsSystem.factory,
        logger: Logger = Logger(label: "chatbridge.engine")
    ) {
        self.settings = settings
        self.model = model
        self.conversations = conversations
        self.clock = clock
        self.controls = controls
        self.ledger = ledger
        self.donations = donations
        self.status = status
        self.texts = .defaults(for: settings.language)
        self.logger = logger
        self.refusalsLogged = LogOnce(logger: logger)
        self.usageMetrics = UsageMetrics(factory: metrics)
    }

    public func conversationKey(for message: InboundMessage) -> ConversationKey {
        ConversationKey(for: message, groupScope: settings.groupScope)
    }

    /// Classifies a message. Commands match the trimmed text case-insensitively: the reset and help
    /// commands whole, the slash commands by their first word.
    public func intent(of body: MessageBody) -> Intent {
        switch body {
        case .unsupported(let kind):
            return .unsupported(kind: kind)
        case .text(let raw):
            let text = raw.trimmed
            if text.isEmpty { return .empty }
            let folded = text.lowercased()
            if settings.resetCommands.contains(where: { $0.lowercased() == folded }) { return .reset }
            if settings.helpCommands.contains(where: { $0.lowercased() == folded }) { return .help }
            guard text.hasPrefix("/") else { return .question(text) }
            let head = String(folded.prefix(while: { !$0.isWhitespace }))
            let rest = text.dropFirst(head.count).trimmed
            let argument = rest.isEmpty ? nil : rest
            if settings.resetCommands.contains(where: { $0.lowercased() == head }), argument?.lowercased() == "all" { return .resetAll }
            switch head {
            case "/persona": return .persona(argument)
            case "/system": return .system(argument)
            case "/model": return .model(argument)
            case "/usage": return argument == nil ? .usage : .question(text)
            case "/status": return argument == nil ? .status : .question(text)
            case "/donate": return .donate(argument)
            default: return .question(text)
            }
        }
    }

    /// The help text with the commands that are enabled for this user.
    public func helpText(for message: InboundMessage? = nil, controls: Controls? = nil) -> String {
        let controls = controls ?? self.controls.current
        var text = settings.messages.help
            .replacingOccurrences(of: "{reset}", with: settings.resetCommands.joined(separator: " "))
            .replacingOccurrences(of: "{help}", with: settings.helpCommands.joined(separator: " "))
        var lines: [String] = []
        if !controls.personas.isEmpty || !controls.selectableModels.isEmpty || controls.allowCustomPrompt {
            lines.append(texts.helpResetAll.replacingOccurrences(of: "{reset}", with: settings.resetCommands.first(where: { $0.hasPrefix("/") }) ?? "/reset"))
        }
        if !controls.personas.isEmpty { lines.append(texts.helpPersona) }
        if controls.allowCustomPrompt { lines.append(texts.helpSystem) }
        if !controls.selectableModels.isEmpty { lines.append(texts.helpModel) }
        if ledger != nil { lines.append(texts.helpUsage) }
        if status != nil, message.map({ controls.access.isAdmin($0) }) ?? false { lines.append(texts.helpStatus) }
        if controls.acceptDonatedKeys, donations != nil, message?.chat.kind != .group { lines.append(texts.helpDonate) }
        if !lines.isEmpty { text += "\n" + lines.joined(separator: "\n") }
        return text
    }

    /// Kept for callers that have no message: the help text for an ordinary user.
    public var helpText: String { helpText(for: nil) }

    /// Produces the answer to a message (``plan(_:)`` then, for a question, ``answer(_:onDelta:)``). A
    /// silent plan gives an empty text.
    public func resolve(
        _ message: InboundMessage,
        onDelta: @escaping @Sendable (String) async -> Void = { _ in }
    ) async throws -> Resolution {
        switch try await plan(message) {
        case .reply(let resolution): return resolution
        case .silent: return Resolution(text: "", effect: .none)
        case .ask(let question): return try await answer(question, onDelta: onDelta)
        }
    }

    /// Decides what to do with a message before anything is shown: access, commands, what the model may not
    /// be asked (unsupported, too long, blocked words), and the limits. A question that passes is counted
    /// against its sender's limits (once per message) and comes back ready for ``answer(_:onDelta:)``.
    public func plan(_ message: InboundMessage) async throws -> Plan {
        let controls = self.controls.current
        let now = clock.now
        let key = conversationKey(for: message)
        let admin = controls.access.isAdmin(message)
        switch controls.access.decide(message) {
        case .allowed:
            break
        case .ignoredGroup(let why):
            refusalsLogged.error(
                "group:\(AccessRules.chatID(of: message))", "ignoring messages from a group the access rules do not allow (logged once per group)",
                metadata: ["chat": "\(AccessRules.chatID(of: message))", "why": "\(why)"])
            return .silent(reason: why)
        case .refusedDirect(let why):
            let user = AccessRules.userIDs(of: message)[0]
            if let ledger, try await !ledger.claimNotice("access:\(user)", period: .seconds(3600), messageKey: Self.messageKey(message), now: now) {
                return .silent(reason: why + " (told within the hour)")
            }
            return .reply(Resolution(text: texts.accessDenied, effect: .none))
        }
        func reply(_ text: String, _ effect: ConversationEffect = .none) -> Plan { .reply(Resolution(text: text, effect: effect)) }
        switch intent(of: message.body) {
        case .reset:
            return reply(settings.messages.resetDone, .reset(at: now))
        case .resetAll:
            return reply(texts.resetAllDone, .resetAll(at: now))
        case .help:
            return reply(helpText(for: message, controls: controls))
        case .empty:
            return reply(settings.messages.emptyQuestion)
        case .unsupported(let kind):
            let name = settings.messages.kindName(kind, language: settings.language)
            return reply(settings.messages.unsupported.replacingOccurrences(of: "{kind}", with: name))
        case .persona(let name):
            return try await personaCommand(name, key: key, controls: controls)
        case .system(let prompt):
            guard controls.allowCustomPrompt else { return reply(texts.disabled) }
            // A custom prompt is held to what a question is: the same length limit and blocked words.
            if let prompt, prompt.count > settings.maxQuestionChars {
                return reply(settings.messages.questionTooLong
                    .replacingOccurrences(of: "{length}", with: "\(prompt.count)")
                    .replacingOccurrences(of: "{limit}", with: "\(settings.maxQuestionChars)"))
            }
            if let prompt, controls.safety.blockedWords.containsMatch(in: prompt) { return reply(controls.safety.reply ?? texts.blocked) }
            var preferences = try await conversations.preferences(key)
            preferences.systemPrompt = prompt
            return reply(prompt == nil ? texts.systemCleared : texts.systemSet, .preferences(preferences))
        case .model(let name):
            return try await modelCommand(name, message: message, key: key, controls: controls)
        case .usage:
            return reply(try await usageReport(for: message, admin: admin, controls: controls, now: now))
        case .status:
            guard admin else { return reply(texts.adminsOnly) }
            guard let status else { return reply(texts.disabled) }
            return reply(statusText(await status(), controls: controls))
        case .donate(let secret):
            // The message carries a key: its text is removed from the inbox once answered. Checking a key
            // costs a provider request, so donations count against the question limits.
            if message.chat.kind == .direct, controls.acceptDonatedKeys, !admin,
               let refusal = try await checkLimits(message, controls: controls, now: now) {
                return reply(refusal, .forgetQuestion)
            }
            return reply(await donate(secret, message: message, controls: controls), .forgetQuestion)
        case .question(let question) where question.count > settings.maxQuestionChars:
            let text = settings.messages.questionTooLong
                .replacingOccurrences(of: "{length}", with: "\(question.count)")
                .replacingOccurrences(of: "{limit}", with: "\(settings.maxQuestionChars)")
            return reply(text)
        case .question(let question):
            if controls.safety.blockedWords.containsMatch(in: question) {
                return reply(controls.safety.reply ?? texts.blocked)
            }
            if !admin, let refusal = try await checkLimits(message, controls: controls, now: now) {
                return reply(refusal)
            }
            let context = try await conversations.context(key, turns: settings.maxTurns * 2)
            let preferences = context.preferences
            let route = controls.route(for: message)
            let chosenModel: String? = preferences.model.flatMap { controls.selectableModels.contains($0) ? $0 : nil }
            let candidates: [String] = [chosenModel, route?.profile].compactMap { $0 }
            let profile = candidates.first(where: { controls.profiles.contains($0) }) ?? "default"
            let personaNames: [String] = [preferences.persona, route?.persona].compactMap { $0 }
            let persona: Persona? = personaNames.compactMap { controls.persona(named: $0) }.first
            let systemPrompt = preferences.systemPrompt ?? persona?.prompt ?? controls.systemPrompt ?? settings.systemPrompt
            return .ask(PreparedQuestion(
                message: message, conversation: key, text: question, profile: profile, systemPrompt: systemPrompt, startedAt: now,
                controls: controls, history: context.turns))
        }
    }

    /// Asks the model. The question's turns are returned as the resolution's effect, to be stored when the
    /// answer has been delivered; the tokens are recorded as usage at once (they were spent).
    public func answer(_ question: PreparedQuestion, onDelta: @escaping @Sendable (String) async -> Void = { _ in }) async throws -> Resolution {
        let now = question.startedAt
        let key = question.conversation
        let history: [Turn]
        if let read = question.history {
            history = read
        } else {
            history = try await conversations.recentTurns(key, limit: settings.maxTurns * 2)
        }
        let messages = ContextBuilder(settings: settings).messages(history: history, question: question.text, now: now, systemPrompt: question.systemPrompt)
        let words = question.controls.safety.blockedWords
        let deltas: @Sendable (String) async -> Void
        if words.isEmpty {
            deltas = onDelta
        } else {
            let masker = StreamMasker(words: words, onDelta: onDelta)
            deltas = { delta in await masker.append(delta) }
        }
        let completion = try await model.complete(
            ChatRequest(messages: messages, user: key.rawValue, profile: question.profile), onDelta: deltas)
        await recordUsage(completion, messages: messages, question: question)
        var answer = completion.text.trimmed
        if answer.isEmpty, let refusal = completion.refusal?.trimmed, !refusal.isEmpty {
            // The model declined; its own words are the answer, not a failure to retry.
            answer = refusal
        }
        guard !answer.isEmpty else {
            if completion.finishReason == "content_filter" {
                throw ModelError(.contentFiltered, detail: "the answer was blocked by the provider's content filter")
            }
            throw ModelError(.invalidResponse, detail: "the model returned an empty answer (finish_reason \(completion.finishReason ?? "none"))")
        }
        answer = words.masked(answer)
        // The context keeps the model's words; the user also sees that a cut-off answer was cut off.
        let text = completion.finishReason == "length" ? answer + "\n\n" + settings.messages.truncated : answer
        return Resolution(
            text: text,
            effect: .appendExchange(
                question: Turn(role: .user, content: question.text, createdAt: now),
                answer: Turn(role: .assistant, content: answer, createdAt: max(clock.now, now))
            )
        )
    }

    // MARK: Limits and usage

    static func messageKey(_ message: InboundMessage) -> String { "\(message.platform)/\(message.botID)/\(message.messageID)" }

    /// The refusal when a limit is reached, else nil after counting the question (in one step with the
    /// check, shared by every replica).
    private func checkLimits(_ message: InboundMessage, controls: Controls, now: Date) async throws -> String? {
        guard let ledger, !controls.limits.isUnlimited else { return nil }
        let limits = controls.limits
        let calendar = controls.calendar
        let record = RequestRecord(
            messageKey: Self.messageKey(message), user: AccessRules.userIDs(of: message)[0], chat: AccessRules.chatID(of: message),
            day: calendar.day(of: now), at: now)
        let admission = try await ledger.admit(
            record,
            limits: RequestLimits(
                perMinute: limits.userPerMinute, perDay: limits.userDailyMessages, userDailyTokens: limits.userDailyTokens,
                chatDailyTokens: limits.chatDailyTokens),
            minuteAgo: now.addingTimeInterval(-60))
        var midnight: String { calendar.describe(calendar.nextMidnight(after: now)) }
        func refusal(_ template: String, _ limit: Int?, _ reset: String) -> String {
            template.replacingOccurrences(of: "{limit}", with: "\(limit ?? 0)").replacingOccurrences(of: "{reset}", with: reset)
        }
        switch admission {
        case .admitted:
            return nil
        case .perMinute(let oldest):
            let free = oldest.addingTimeInterval(60)
            return refusal(texts.limitPerMinute, limits.userPerMinute, calendar.timeOfDay(free))
        case .perDay: return refusal(texts.limitDailyMessages, limits.userDailyMessages, midnight)
        case .userDailyTokens: return refusal(texts.limitDailyTokens, limits.userDailyTokens, midnight)
        case .chatDailyTokens: return refusal(texts.limitChatTokens, limits.chatDailyTokens, midnight)
        }
    }

    private func recordUsage(_ completion: ChatCompletion, messages: [ChatMessage], question: PreparedQuestion) async {
        let estimated = completion.promptTokens == nil || completion.completionTokens == nil
        let prompt = completion.promptTokens
            ?? messages.reduce(0) { $0 + TokenEstimator.estimate($1.content) + TokenEstimator.perMessageOverhead }
        let answerTokens = completion.completionTokens ?? TokenEstimator.estimate(completion.text + (completion.refusal ?? ""))
        let use = completion.servedBy ?? ModelUse(profile: question.profile, model: "unknown", keyFingerprint: "(unknown)")
        let cost = use.cost(prompt: prompt, completion: answerTokens)
        usageMetrics.record(profile: use.profile, model: use.model, prompt: prompt, completion: answerTokens, cost: cost)
        guard let ledger else { return }
        let message = question.message
        let now = clock.now
        let record = UsageRecord(
            messageKey: Self.messageKey(message), day: question.controls.day(of: now), at: now, platform: message.platform,
            chat: AccessRules.chatID(of: message), user: AccessRules.userIDs(of: message)[0], profile: use.profile, model: use.model,
            keyFingerprint: use.keyFingerprint, promptTokens: prompt, completionTokens: answerTokens, estimated: estimated, cost: cost)
        do {
            try await ledger.recordUsage(record)
        } catch {
            // The answer is not asked again for a lost record: that would spend the tokens twice.
            logger.warning("could not record an answer's usage", metadata: ["message_id": "\(message.messageID)", "error": "\(error)"])
        }
    }

    private func usageReport(for message: InboundMessage, admin: Bool, controls: Controls, now: Date) async throws -> String {
        guard let ledger else { return texts.disabled }
        let calendar = controls.calendar
        let today = calendar.day(of: now)
        let user = AccessRules.userIDs(of: message)[0]
        let day = try await ledger.usage(UsageQuery(since: today, until: today, user: user, grouping: .total)).first
        let month = try await ledger.usage(UsageQuery(since: calendar.firstDayOfMonth(of: now), until: today, user: user, grouping: .total)).first
        var text = texts.usageSelf
            .replacingOccurrences(of: "{today_answers}", with: "\(day?.answers ?? 0)")
            .replacingOccurrences(of: "{today_tokens}", with: "\(day?.tokens ?? 0)")
            .replacingOccurrences(of: "{month_answers}", with: "\(month?.answers ?? 0)")
            .replacingOccurrences(of: "{month_tokens}", with: "\(month?.tokens ?? 0)")
        if admin {
            let users = try await ledger.usage(UsageQuery(since: today, until: today, grouping: .user, limit: 5))
            let chats = try await ledger.usage(UsageQuery(since: today, until: today, grouping: .chat, limit: 5))
            text += "\n\n" + texts.usageTop
            for line in users { text += "\n- \(line.group): \(line.tokens) tokens, \(line.answers)" + Self.costText(line.cost) }
            for line in chats { text += "\n- \(line.group): \(line.tokens) tokens, \(line.answers)" + Self.costText(line.cost) }
        }
        return text
    }

    static func costText(_ cost: Double) -> String { cost > 0 ? String(format: ", %.4f", cost) : "" }

    private func statusText(_ report: StatusReport, controls: Controls) -> String {
        let calendar = controls.calendar
        func ms(_ d: Duration?) -> String { d.map { "\(Int(($0.seconds * 1000).rounded())) ms" } ?? "-" }
        var lines = [texts.statusTitle]
        lines.append("- queue: \(report.pending) waiting, \(report.running) being answered (\(report.inFlightHere) in this process)")
        lines.append("- model latency (1 h, \(report.latencySamples) answers): p50 \(ms(report.latencyP50)), p99 \(ms(report.latencyP99))")
        for key in report.keys {
            var line = "- key \(key.profile) \(key.fingerprint): \(key.condition.rawValue)"
            if key.condition == .resting, let until = key.until { line += " until \(calendar.describe(until))" }
            lines.append(line)
        }
        for connection in report.connections { lines.append("- \(connection.name): \(connection.status)") }
        return lines.joined(separator: "\n")
    }

    // MARK: Commands

    private func personaCommand(_ name: String?, key: ConversationKey, controls: Controls) async throws -> Plan {
        guard !controls.personas.isEmpty else { return .reply(Resolution(text: texts.personaNone, effect: .none)) }
        var preferences = try await conversations.preferences(key)
        guard let name else {
            let current = preferences.persona?.lowercased()
            let list = controls.personas.map { persona in
                "- \(persona.name)" + (persona.description.isEmpty ? "" : ": \(persona.description)")
                    + (persona.name.lowercased() == current ? texts.current : "")
            }
            return .reply(Resolution(text: ([texts.personaList] + list).joined(separator: "\n"), effect: .none))
        }
        guard let persona = controls.persona(named: name) else {
            return .reply(Resolution(text: texts.personaUnknown.replacingOccurrences(of: "{name}", with: String(name.prefix(60))), effect: .none))
        }
        preferences.persona = persona.name
        return .reply(Resolution(text: texts.personaSet.replacingOccurrences(of: "{name}", with: persona.name), effect: .preferences(preferences)))
    }

    private func modelCommand(_ name: String?, message: InboundMessage, key: ConversationKey, controls: Controls) async throws -> Plan {
        guard !controls.selectableModels.isEmpty else { return .reply(Resolution(text: texts.disabled, effect: .none)) }
        var preferences = try await conversations.preferences(key)
        guard let name else {
            let current = preferences.model ?? controls.route(for: message)?.profile ?? "default"
            let list = controls.selectableModels.map { "- \($0)" + ($0 == current ? texts.current : "") }
            return .reply(Resolution(text: ([texts.modelList] + list).joined(separator: "\n"), effect: .none))
        }
        guard let chosen = controls.selectableModels.first(where: { $0.lowercased() == name.lowercased() }), controls.profiles.contains(chosen) else {
            return .reply(Resolution(text: texts.modelUnknown.replacingOccurrences(of: "{name}", with: String(name.prefix(60))), effect: .none))
        }
        preferences.model = chosen
        return .reply(Resolution(text: texts.modelSet.replacingOccurrences(of: "{name}", with: chosen), effect: .preferences(preferences)))
    }

    private func donate(_ secret: String?, message: InboundMessage, controls: Controls) async -> String {
        let fingerprint = secret.map(keyFingerprint) ?? ""
        if message.chat.kind == .group {
            return texts.donateGroup.replacingOccurrences(of: "{fingerprint}", with: fingerprint)
        }
        guard controls.acceptDonatedKeys, let donations else { return texts.donateOff }
        guard let secret, !secret.contains(where: \.isWhitespace) else { return texts.donateMissing }
        switch await donations.donate(secret, donor: AccessRules.userIDs(of: message)[0]) {
        case .added(let fingerprint): return texts.donateAdded.replacingOccurrences(of: "{fingerprint}", with: fingerprint)
        case .alreadyKnown(let fingerprint): return texts.donateKnown.replacingOccurrences(of: "{fingerprint}", with: fingerprint)
        case .refused(let fingerprint, let reason):
            return texts.donateRefused.replacingOccurrences(of: "{fingerprint}", with: fingerprint).replacingOccurrences(of: "{reason}", with: reason)
        }
    }
}

/// `chatbridge_tokens_total{profile,model,kind}` and `chatbridge_cost_total{profile,model}`, made once per
/// profile and model.
final class UsageMetrics: Sendable {
    private struct Set: @unchecked Sendable {
        let prompt: Counter
        let completion: Counter
        let cost: FloatingPointCounter
    }
    private let factory: any MetricsFactory
    private let made = Mutex<[String: Set]>([:])

    init(factory: any MetricsFactory) { self.factory = factory }

    func record(profile: String, model: String, prompt: Int, completion: Int, cost: Double) {
        let key = profile + "\u{0}" + model
        let set = made.withLock { made -> Set in
            if let set = made[key] { return set }
            let dimensions = [("profile", profile), ("model", model)]
            let set = Set(
                prompt: Counter(label: "chatbridge_tokens_total", dimensions: dimensions + [("kind", "prompt")], factory: factory),
                completion: Counter(label: "chatbridge_tokens_total", dimensions: dimensions + [("kind", "completion")], factory: factory),
                cost: FloatingPointCounter(label: "chatbridge_cost_total", dimensions: dimensions, factory: factory))
            made[key] = set
            return set
        }
        set.prompt.increment(by: prompt)
        set.completion.increment(by: completion)
        if cost > 0 { set.cost.increment(by: cost) }
    }
}

/// Masks blocked words in a streamed answer: text is passed on only once no blocked word can still end
/// inside it (the longest word's length is held back), so a live reply never shows one.
final class StreamMasker: Sendable {
    private struct State {
        /// The text not yet passed on, with the last `longestWord` characters before it (the context a
        /// word ending later may start in).
        var tail = ""
        /// How many characters at the start of `tail` were passed on already.
        var context = 0
    }
    private let words: BlockedWords
    private let onDelta: @Sendable (String) async -> Void
    private let state = Mutex(State())

    init(words: BlockedWords, onDelta: @escaping @Sendable (String) async -> Void) {
        self.words = words
        self.onDelta = onDelta
    }

    func append(_ delta: String) async {
        let out = state.withLock { state -> String? in
            state.tail += delta
            let text = Array(state.tail)
            let masked = Array(words.masked(state.tail))
            // Masking keeps one character per character; if a sequence did not, wait for the end.
            guard masked.count == text.count else { return nil }
            let safe = masked.count - words.longestWord
            guard safe > state.context else { return nil }
            let piece = String(masked[state.context..<safe])
            // Keep only what a later word could still reach back into.
            let keep = max(0, safe - words.longestWord)
            state.tail = String(text[keep...])
            state.context = safe - keep
            return piece
        }
        if let out { await onDelta(out) }
    }
}

/// Assembles the context sent to the model: system prompt, the most recent whole exchanges that fit both
/// the turn limit and the token budget, and the new question.
public struct ContextBuilder: Sendable {
    public var settings: EngineSettings
    public init(settings: EngineSettings) { self.settings = settings }

    /// `history` is oldest first, as returned by the store. Turns before an idle gap longer than
    /// `idleReset` (or all of them, when the newest is that old) belong to an earlier session and are left out.
    public func messages(history: [Turn], question: String, now: Date, systemPrompt: String? = nil) -> [ChatMessage] {
        let systemPrompt = systemPrompt ?? settings.systemPrompt
        let pairs = Self.livePairs(history, now: now, idleReset: settings.idleReset)
        var budget = settings.maxContextTokens
            - TokenEstimator.estimate(systemPrompt) - TokenEstimator.estimate(question)
            - 2 * TokenEstimator.perMessageOverhead
        var kept: [(Turn, Turn)] = []
        for pair in pairs.reversed() {
            guard kept.count < settings.maxTurns else { break }
            let cost = pair.0.tokens + pair.1.tokens + 2 * TokenEstimator.perMessageOverhead
            guard cost <= budget else { break }
            budget -= cost
            kept.append(pair)
        }
        var result = [ChatMessage(role: .system, content: systemPrompt)]
        for (q, a) in kept.reversed() {
            result.append(ChatMessage(role: .user, content: q.content))
            result.append(ChatMessage(role: .assistant, content: a.content))
        }
        result.append(ChatMessage(role: .user, content: question))
        return result
    }

    /// Whole question/answer pairs of the current session, oldest first.
    static func livePairs(_ history: [Turn], now: Date, idleReset: Duration) -> [(Turn, Turn)] {
        let idle = Double(idleReset.components.seconds) + Double(idleReset.components.attoseconds) / 1e18
        var pairs: [(Turn, Turn)] = []
        var index = 0
        while index + 1 < history.count {
            if history[index].role == .user, history[index + 1].role == .assistant {
                pairs.append((history[index], history[index + 1]))
                index += 2
            } else {
                index += 1
            }
        }
        var newer = now
        var start = pairs.count
        for i in stride(from: pairs.count - 1, through: 0, by: -1) {
            if newer.timeIntervalSince(pairs[i].1.createdAt) > idle { break }
            newer = pairs[i].0.createdAt
            start = i
        }
        return Array(pairs[start...])
    }
}
