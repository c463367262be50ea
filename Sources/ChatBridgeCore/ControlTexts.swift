import Foundation

/// The bot's words for the operator controls (access, limits, safety, personas, models, usage, status,
/// donations), in the configured language. `{…}` placeholders are filled in by the engine.
public struct ControlTexts: Sendable, Equatable {
    public var accessDenied: String
    public var blocked: String
    public var limitPerMinute: String
    public var limitDailyMessages: String
    public var limitDailyTokens: String
    public var limitChatTokens: String
    public var adminsOnly: String
    public var disabled: String
    public var personaList: String
    public var personaNone: String
    public var personaSet: String
    public var personaUnknown: String
    public var systemSet: String
    public var systemCleared: String
    public var resetAllDone: String
    public var modelList: String
    public var modelSet: String
    public var modelUnknown: String
    public var usageSelf: String
    public var usageTop: String
    public var statusTitle: String
    public var donateGroup: String
    public var donateOff: String
    public var donateMissing: String
    public var donateAdded: String
    public var donateKnown: String
    public var donateRefused: String
    public var current: String
    public var helpPersona: String
    public var helpSystem: String
    public var helpModel: String
    public var helpUsage: String
    public var helpStatus: String
    public var helpDonate: String
    public var helpResetAll: String

    public static func defaults(for language: BotMessages.Language) -> ControlTexts {
        switch language {
        case .zh:
            return ControlTexts(
                accessDenied: "抱歉，你没有使用这个机器人的权限。如需开通，请联系管理员。",
                blocked: "抱歉，你的问题包含不允许讨论的内容，无法回答。",
                limitPerMinute: "你提问太快了：每分钟最多 {limit} 个问题，请在 {reset} 之后再试。",
                limitDailyMessages: "你今天的提问次数已达上限（{limit} 次），{reset} 重置。",
                limitDailyTokens: "你今天的用量已达上限（{limit} tokens），{reset} 重置。",
                limitChatTokens: "这个会话今天的用量已达上限（{limit} tokens），{reset} 重置。",
                adminsOnly: "这个命令只有管理员可以使用。",
                disabled: "这个命令没有开启。",
                personaList: "可用的角色（发送 /persona 名称 切换）：",
                personaNone: "没有配置角色。",
                personaSet: "好的，本会话的角色已切换为「{name}」。",
                personaUnknown: "没有名为「{name}」的角色。发送 /persona 查看可用角色。",
                systemSet: "好的，本会话将使用你设置的系统提示。发送 /system 可恢复默认。",
                systemCleared: "好的，本会话已恢复默认的系统提示。",
                resetAllDone: "好的，已开始新的对话，上下文、角色、模型和自定义提示都已恢复默认。",
                modelList: "可切换的模型（发送 /model 名称 切换）：",
                modelSet: "好的，本会话的模型已切换为「{name}」。",
                modelUnknown: "不能切换到「{name}」。发送 /model 查看可用模型。",
                usageSelf: "你的用量：今天 {today_answers} 次回答、{today_tokens} tokens；本月 {month_answers} 次回答、{month_tokens} tokens。",
                usageTop: "今天用量最多：",
                statusTitle: "机器人状态：",
                donateGroup: "⚠️ 请不要在群里发送 API 密钥！这个密钥（{fingerprint}）没有被使用，请尽快到服务商处作废它，然后在私聊中发送 /donate。",
                donateOff: "这个机器人不接受捐赠的密钥。",
                donateMissing: "请发送 /donate 加上你的 API 密钥，例如 /donate sk-…",
                donateAdded: "谢谢！密钥 {fingerprint} 验证通过，已加入密钥池。",
                donateKnown: "密钥 {fingerprint} 已经在密钥池里了，谢谢！",
                donateRefused: "密钥 {fingerprint} 验证未通过（{reason}），没有加入密钥池。",
                current: "（当前）",
                helpPersona: "- 角色：/persona 查看，/persona 名称 切换",
                helpSystem: "- 自定义系统提示：/system 内容（/system 恢复默认）",
                helpModel: "- 模型：/model 查看，/model 名称 切换",
                helpUsage: "- 我的用量：/usage",
                helpStatus: "- 机器人状态（管理员）：/status",
                helpDonate: "- 捐赠 API 密钥（仅私聊）：/donate 密钥",
                helpResetAll: "- 全部恢复默认（含角色和模型）：{reset} all"
            )
        case .en:
            return ControlTexts(
                accessDenied: "Sorry, you are not allowed to use this bot. Ask your admin for access.",
                blocked: "Sorry, your question contains words this bot may not discuss.",
                limitPerMinute: "You are asking too fast: at most {limit} questions a minute. Try again after {reset}.",
                limitDailyMessages: "You reached today's limit of {limit} questions. It resets at {reset}.",
                limitDailyTokens: "You reached today's limit of {limit} tokens. It resets at {reset}.",
                limitChatTokens: "This chat reached today's limit of {limit} tokens. It resets at {reset}.",
                adminsOnly: "Only admins may use this command.",
                disabled: "This command is not enabled.",
                personaList: "Personas (send /persona NAME to switch):",
                personaNone: "No personas are configured.",
                personaSet: "OK, this conversation now uses the persona \"{name}\".",
                personaUnknown: "There is no persona \"{name}\". Send /persona to see them.",
                systemSet: "OK, this conversation now uses your system prompt. Send /system alone to go back to the default.",
                systemCleared: "OK, this conversation uses the default system prompt again.",
                resetAllDone: "OK, starting over: the context, persona, model and custom prompt are back to the defaults.",
                modelList: "Models you can switch to (send /model NAME):",
                modelSet: "OK, this conversation now uses the model \"{name}\".",
                modelUnknown: "You cannot switch to \"{name}\". Send /model to see the choices.",
                usageSelf: "Your usage: today {today_answers} answers, {today_tokens} tokens; this month {month_answers} answers, {month_tokens} tokens.",
                usageTop: "Top usage today:",
                statusTitle: "Bot status:",
                donateGroup: "⚠️ Never post an API key in a group! This key ({fingerprint}) was not used. Revoke it with your provider now, then send /donate in a direct chat.",
                donateOff: "This bot does not accept donated keys.",
                donateMissing: "Send /donate followed by your API key, e.g. /donate sk-…",
                donateAdded: "Thank you! Key {fingerprint} works and was added to the pool.",
                donateKnown: "Key {fingerprint} is already in the pool. Thank you!",
                donateRefused: "Key {fingerprint} did not work ({reason}); it was not added.",
                current: " (current)",
                helpPersona: "- Personas: /persona to list, /persona NAME to switch",
                helpSystem: "- Your own system prompt: /system TEXT (/system alone for the default)",
                helpModel: "- Models: /model to list, /model NAME to switch",
                helpUsage: "- Your usage: /usage",
                helpStatus: "- Bot status (admins): /status",
                helpDonate: "- Donate an API key (direct chat only): /donate KEY",
                helpResetAll: "- Reset everything (persona and model too): {reset} all"
            )
        }
    }
}
