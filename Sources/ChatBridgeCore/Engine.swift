import Foundation

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
    case help
    case empty
    case unsupported(kind: String)
    case question(String)
}

/// Decides what a message means and produces its answer. Pure logic over the `ChatModel`,
/// `ConversationStore` and `WallClock` protocols; it has no I/O of its own.
public struct Engine: Sendable {
    public let settings: EngineSettings
    public let model: any ChatModel
    public let conversations: any ConversationStore
    public let clock: any WallClock

    public init(settings: EngineSettings, model: any ChatModel, conversations: any ConversationStore, clock: any WallClock) {
        self.settings = settings
        self.model = model
        self.conversations = conversations
        self.clock = clock
    }

    public func conversationKey(for message: InboundMessage) -> ConversationKey {
        ConversationKey(for: message, groupScope: settings.groupScope)
    }

    /// Classifies a message. Commands match the whole trimmed text, case-insensitively.
    public func intent(of body: MessageBody) -> Intent {
        switch body {
        case .unsupported(let kind):
            return .unsupported(kind: kind)
        case .text(let raw):
            let text = raw.trimmingCharacters(in: .whitespacesAndNewlines)
            if text.isEmpty { return .empty }
            let folded = text.lowercased()
            if settings.resetCommands.contains(where: { $0.lowercased() == folded }) { return .reset }
            if settings.helpCommands.contains(where: { $0.lowercased() == folded }) { return .help }
            return .question(text)
        }
    }

    public var helpText: String {
        settings.messages.help
            .replacingOccurrences(of: "{reset}", with: settings.resetCommands.joined(separator: " "))
            .replacingOccurrences(of: "{help}", with: settings.helpCommands.joined(separator: " "))
    }

    /// Produces the answer to a message. Commands, unsupported messages and over-long questions never
    /// reach the model. A question's turns are returned as the resolution's effect, to be stored when the
    /// answer has been delivered.
    public func resolve(
        _ message: InboundMessage,
        onDelta: @escaping @Sendable (String) async -> Void = { _ in }
    ) async throws -> Resolution {
        let now = clock.now
        let key = conversationKey(for: message)
        switch intent(of: message.body) {
        case .reset:
            return Resolution(text: settings.messages.resetDone, effect: .reset(at: now))
        case .help:
            return Resolution(text: helpText, effect: .none)
        case .empty:
            return Resolution(text: settings.messages.emptyQuestion, effect: .none)
        case .unsupported(let kind):
            let name = settings.messages.kindName(kind, language: settings.language)
            return Resolution(text: settings.messages.unsupported.replacingOccurrences(of: "{kind}", with: name), effect: .none)
        case .question(let question) where question.count > settings.maxQuestionChars:
            let text = settings.messages.questionTooLong
                .replacingOccurrences(of: "{length}", with: "\(question.count)")
                .replacingOccurrences(of: "{limit}", with: "\(settings.maxQuestionChars)")
            return Resolution(text: text, effect: .none)
        case .question(let question):
            let history = try await conversations.recentTurns(key, limit: settings.maxTurns * 2)
            let messages = ContextBuilder(settings: settings).messages(history: history, question: question, now: now)
            let completion = try await model.complete(ChatRequest(messages: messages, user: key.rawValue), onDelta: onDelta)
            var answer = completion.text.trimmingCharacters(in: .whitespacesAndNewlines)
            if answer.isEmpty, let refusal = completion.refusal?.trimmingCharacters(in: .whitespacesAndNewlines), !refusal.isEmpty {
                // The model declined; its own words are the answer, not a failure to retry.
                answer = refusal
            }
            guard !answer.isEmpty else {
                if completion.finishReason == "content_filter" {
                    throw ModelError(.contentFiltered, detail: "the answer was blocked by the provider's content filter")
                }
                throw ModelError(.invalidResponse, detail: "the model returned an empty answer (finish_reason \(completion.finishReason ?? "none"))")
            }
            // The context keeps the model's words; the user also sees that a cut-off answer was cut off.
            let text = completion.finishReason == "length" ? answer + "\n\n" + settings.messages.truncated : answer
            return Resolution(
                text: text,
                effect: .appendExchange(
                    question: Turn(role: .user, content: question, createdAt: now),
                    answer: Turn(role: .assistant, content: answer, createdAt: max(clock.now, now))
                )
            )
        }
    }
}

/// Assembles the context sent to the model: system prompt, the most recent whole exchanges that fit both
/// the turn limit and the token budget, and the new question.
public struct ContextBuilder: Sendable {
    public var settings: EngineSettings
    public init(settings: EngineSettings) { self.settings = settings }

    /// `history` is oldest first, as returned by the store. Turns before an idle gap longer than
    /// `idleReset` (or all of them, when the newest is that old) belong to an earlier session and are left out.
    public func messages(history: [Turn], question: String, now: Date) -> [ChatMessage] {
        let pairs = Self.livePairs(history, now: now, idleReset: settings.idleReset)
        var budget = settings.maxContextTokens
            - TokenEstimator.estimate(settings.systemPrompt) - TokenEstimator.estimate(question)
            - 2 * TokenEstimator.perMessageOverhead
        var kept: [(Turn, Turn)] = []
        for pair in pairs.reversed() {
            guard kept.count < settings.maxTurns else { break }
            let cost = pair.0.tokens + pair.1.tokens + 2 * TokenEstimator.perMessageOverhead
            guard cost <= budget else { break }
            budget -= cost
            kept.append(pair)
        }
        var result = [ChatMessage(role: .system, content: settings.systemPrompt)]
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
