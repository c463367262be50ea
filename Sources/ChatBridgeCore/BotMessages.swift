/// The bot's own words: help, confirmations and error replies, in the configured language.
public struct BotMessages: Sendable, Equatable {
    public enum Language: String, Sendable, CaseIterable {
        case zh, en
    }

    /// Names of every overridable message, as used in configuration (`bot.messages.<name>`).
    public static let names = [
        "help", "reset_done", "empty_question", "unsupported", "busy", "timeout", "invalid_key", "quota",
        "model_not_found", "context_too_long", "content_filtered", "failed", "unreachable", "question_too_long",
        "truncated", "answer_follows",
    ]

    /// Help text; `{reset}` and `{help}` are replaced with the configured commands.
    public var help: String
    public var resetDone: String
    public var emptyQuestion: String
    /// `{kind}` is replaced with what was sent (picture, file, …).
    public var unsupported: String
    public var busy: String
    public var timeout: String
    public var invalidKey: String
    public var quota: String
    public var modelNotFound: String
    public var contextTooLong: String
    public var contentFiltered: String
    public var failed: String
    /// The model server cannot be reached (DNS, connection refused, TLS).
    public var unreachable: String
    /// `{length}` and `{limit}` are replaced with the question's length and the limit, in characters.
    public var questionTooLong: String
    /// Appended to an answer the model cut off at its token limit.
    public var truncated: String
    /// Shown in a live reply (card) that could not carry the answer, which is then sent as a message.
    public var answerFollows: String

    public static func defaults(for language: Language) -> BotMessages {
        switch language {
        case .zh:
            return BotMessages(
                help: "我是 AI 助手，直接提问即可，我会记住本次对话的上下文。\n\n- 重置对话：{reset}\n- 查看帮助：{help}",
                resetDone: "好的，已开始新的对话，之前的上下文已清空。",
                emptyQuestion: "你好！请直接输入你的问题。发送 /help 查看可用命令。",
                unsupported: "抱歉，我暂时只能读懂文字和语音消息，无法处理{kind}。请用文字描述你的问题。",
                busy: "模型服务繁忙，请稍后（约一分钟后）再试。",
                timeout: "模型响应超时，请稍后再试，或把问题拆得更小一些。",
                invalidKey: "机器人的模型 API 密钥无效，请联系管理员检查配置。",
                quota: "机器人的模型额度已用完，请联系管理员充值或更换密钥。",
                modelNotFound: "机器人配置的模型不存在或无权访问，请联系管理员检查模型名称。",
                contextTooLong: "对话内容太长，模型无法处理。请发送 /reset 开始新的对话后再试。",
                contentFiltered: "抱歉，这个问题触发了模型的内容安全策略，无法回答。",
                failed: "抱歉，回答失败了，请稍后再试。如果一直失败，请联系管理员。",
                unreachable: "暂时连接不上模型服务，请稍后再试。如果一直这样，请联系管理员检查网络和模型地址。",
                questionTooLong: "问题太长了（{length} 个字符，上限 {limit} 个），请精简后再发送。",
                truncated: "（回答达到长度上限，后面的内容被截断了。）",
                answerFollows: "卡片更新失败，完整回答见下一条消息。"
            )
        case .en:
            return BotMessages(
                help: "I'm an AI assistant. Just ask; I remember the context of this conversation.\n\n- Start over: {reset}\n- This help: {help}",
                resetDone: "OK, starting a new conversation. The previous context is cleared.",
                emptyQuestion: "Hi! Type your question. Send /help to see the commands.",
                unsupported: "Sorry, I can only read text and voice messages, not {kind}. Please describe your question in text.",
                busy: "The model is busy right now. Please try again in a minute.",
                timeout: "The model took too long to answer. Please try again, or ask a smaller question.",
                invalidKey: "The bot's model API key is invalid. Please tell your admin.",
                quota: "The bot's model quota is used up. Please tell your admin.",
                modelNotFound: "The bot's configured model does not exist or is not accessible. Please tell your admin.",
                contextTooLong: "This conversation is too long for the model. Send /reset to start over, then ask again.",
                contentFiltered: "Sorry, the model's content policy blocked this question.",
                failed: "Sorry, I could not answer. Please try again later; if it keeps failing, tell your admin.",
                unreachable: "The bot cannot reach its model service right now. Please try again later; if it keeps happening, tell your admin.",
                questionTooLong: "Your question is too long ({length} characters; the limit is {limit}). Please shorten it and send it again.",
                truncated: "(The answer reached the length limit and was cut off here.)",
                answerFollows: "This card could not be updated; the whole answer follows as a message."
            )
        }
    }

    /// Replaces the message with the given configuration name. Returns false for an unknown name.
    @discardableResult
    public mutating func override(_ name: String, with text: String) -> Bool {
        switch name {
        case "help": help = text
        case "reset_done": resetDone = text
        case "empty_question": emptyQuestion = text
        case "unsupported": unsupported = text
        case "busy": busy = text
        case "timeout": timeout = text
        case "invalid_key": invalidKey = text
        case "quota": quota = text
        case "model_not_found": modelNotFound = text
        case "context_too_long": contextTooLong = text
        case "content_filtered": contentFiltered = text
        case "failed": failed = text
        case "unreachable": unreachable = text
        case "question_too_long": questionTooLong = text
        case "truncated": truncated = text
        case "answer_follows": answerFollows = text
        default: return false
        }
        return true
    }

    /// The reply a user gets when their question finally failed.
    public func reply(for error: any Error) -> String {
        guard let error = error as? ModelError else { return failed }
        switch error.kind {
        case .rateLimited, .serverError, .invalidResponse: return busy
        case .connection: return unreachable
        case .timeout: return timeout
        case .invalidAPIKey, .permissionDenied: return invalidKey
        case .quotaExceeded: return quota
        case .modelNotFound: return modelNotFound
        case .contextTooLong: return contextTooLong
        case .contentFiltered: return contentFiltered
        case .badRequest: return failed
        }
    }

    /// A readable name for an unsupported message type.
    public func kindName(_ kind: String, language: Language) -> String {
        let zh = ["picture": "图片", "image": "图片", "file": "文件", "video": "视频", "audio": "语音", "sticker": "表情"]
        let en = ["picture": "pictures", "image": "pictures", "file": "files", "video": "videos", "audio": "voice messages without text", "sticker": "stickers"]
        switch language {
        case .zh: return zh[kind] ?? "这种类型的消息"
        case .en: return en[kind] ?? "this kind of message"
        }
    }
}
